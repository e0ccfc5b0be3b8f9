"""Model catalog (``catalog.yaml``, :mod:`models.catalog`) and the tiny test model builder (:mod:`models.tiny`)."""

from models.catalog import ModelEntry, load_catalog, resolve_source

__all__ = ["ModelEntry", "load_catalog", "resolve_source"]
