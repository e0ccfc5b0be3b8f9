"""The ``tokenweir`` command line."""

from serving.cli.main import main

__all__ = ["main"]
