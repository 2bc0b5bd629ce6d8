"""The Data Backbone (dataset registry + file datastore) and the APDB.

See ``docs/backbone.md`` for the layout on disk and the tables.
"""

from dmstream.backbone.butler import Backbone
from dmstream.backbone.datastore import CorruptDatasetError
from dmstream.backbone.formatters import FormatterError
from dmstream.backbone.registry import (
    DIMENSIONS,
    BackboneError,
    DataIdError,
    DatasetConflictError,
    DatasetNotFoundError,
    DatasetRef,
    DatasetType,
    DatasetTypeConflictError,
    UnknownDatasetTypeError,
)

__all__ = [
    "DIMENSIONS",
    "Backbone",
    "BackboneError",
    "CorruptDatasetError",
    "DataIdError",
    "DatasetConflictError",
    "DatasetNotFoundError",
    "DatasetRef",
    "DatasetType",
    "DatasetTypeConflictError",
    "FormatterError",
    "UnknownDatasetTypeError",
]
