"""The ``tokenweir`` command line (typer, rich tables).

Public: :func:`main` (the console script) and the module :mod:`serving.cli.runtime` (start or join
Ray, deploy, wait until ready; the tests use it too). ``_main`` and ``_tenancy`` hold the commands.
"""

from serving.cli._main import main

__all__ = ["main"]
