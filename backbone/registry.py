"""The dataset registry of the Data Backbone: what datasets exist, under which data id, in which file.

A dataset is identified by its type and its data id, Rubin's way: a mapping
of dimensions (``instrument``, ``day_obs``, ``exposure``, ``visit``,
``detector``, ``band``, ``physical_filter``, ``skytile``) to values.  Each type
names the dimensions that identify its datasets (its *key*) and, optionally,
*implied* dimensions that are recorded and can be queried but identify
nothing (the band of a raw follows from its exposure).

The registry lives in SQL through SQLAlchemy Core: a SQLite file by default,
PostgreSQL by URL.  Two tables, described in ``docs/backbone.md``:
``dataset_type`` and ``dataset``, the latter unique on (type, key) and on the
file path.  Concurrent writers are serialised by the database; a writer that
loses a race on the same data id sees the winner's row (see :meth:`Registry.add`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa

from dmstream.backbone.sql import create_engine, insert_ignoring_duplicates

#: Dimensions a data id may use, with the Python type of their values.
DIMENSIONS: dict[str, type] = {
    "instrument": str,  # e.g. LSSTCam
    "day_obs": int,  # observing day YYYYMMDD (UTC-12 h)
    "exposure": int,  # day_obs * 100000 + seq_num
    "visit": int,  # exposure id of the visit's first snap
    "detector": int,  # 0-188 for LSSTCam science detectors
    "band": str,  # u g r i z y
    "physical_filter": str,  # e.g. r_57
    "skytile": int,  # sky tile of a template (the template builder's pixelisation)
}
#: Values of string dimensions: safe in file names, no path separators.
_STRING_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_TYPE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


class BackboneError(Exception):
    """Base class of the Data Backbone's errors."""


class DataIdError(BackboneError, ValueError):
    """A data id that does not fit its dataset type: unknown, missing or malformed values."""


class UnknownDatasetTypeError(BackboneError, KeyError):
    """A dataset type that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0])


class DatasetTypeConflictError(BackboneError):
    """A dataset type registered again with another definition."""


class DatasetConflictError(BackboneError):
    """A dataset put again under the same data id with different content."""


class DatasetNotFoundError(BackboneError, LookupError):
    """No dataset of that type and data id."""


@dataclass(frozen=True)
class DatasetType:
    """A kind of dataset: which dimensions identify it and how it is stored.

    Attributes
    ----------
    name : str
    dimensions : tuple of str
        The dimensions that identify a dataset (all required), in the order
        used for file names and sorting.
    storage : str
        Name of the formatter that writes and reads its files (see
        :data:`dmstream.backbone.formatters.FORMATTERS`).
    implied : tuple of str
        Dimensions recorded when given, queryable, but not part of the identity.
    description : str
    """

    name: str
    dimensions: tuple[str, ...]
    storage: str
    implied: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if not _TYPE_NAME.match(self.name):
            raise DataIdError(f"dataset type name {self.name!r}: letters, digits and _, from a letter")
        object.__setattr__(self, "dimensions", tuple(self.dimensions))
        object.__setattr__(self, "implied", tuple(self.implied))
        every = self.dimensions + self.implied
        unknown = [name for name in every if name not in DIMENSIONS]
        if unknown:
            raise DataIdError(f"dataset type {self.name}: unknown dimensions {', '.join(unknown)}; "
                              f"known: {', '.join(DIMENSIONS)}")
        if not self.dimensions or len(set(every)) != len(every):
            raise DataIdError(f"dataset type {self.name}: dimensions must be non-empty and not repeat")

    def normalize(self, data_id: Mapping[str, Any], complete: bool = True) -> dict[str, Any]:
        """The data id with values of the right type, key dimensions first.

        Parameters
        ----------
        data_id : mapping
            Dimension → value; integers may come as numpy integers or decimal strings.
        complete : bool
            Require every key dimension (False for queries by partial data id).

        Raises
        ------
        DataIdError
            On a dimension this type does not have, a missing key dimension or a malformed value.
        """
        unknown = [name for name in data_id if name not in self.dimensions + self.implied]
        if unknown:
            raise DataIdError(f"{self.name} has no dimension {', '.join(unknown)}; its data id is "
                              f"{self.describe_data_id()}")
        missing = [name for name in self.dimensions if name not in data_id]
        if complete and missing:
            raise DataIdError(f"{self.name} data id lacks {', '.join(missing)}; its data id is "
                              f"{self.describe_data_id()}")
        return {name: normalize_value(name, data_id[name])
                for name in self.dimensions + self.implied if name in data_id}

    def key(self, data_id: Mapping[str, Any]) -> str:
        """Canonical text of a complete, normalized data id's key: ``name=value`` pairs joined by ``,``."""
        return ",".join(f"{name}={data_id[name]}" for name in self.dimensions)

    def describe_data_id(self) -> str:
        text = ", ".join(self.dimensions)
        return f"{text} (optionally {', '.join(self.implied)})" if self.implied else text


def normalize_value(dimension: str, value: Any) -> int | str:
    """A dimension's value as its Python type.

    Raises
    ------
    DataIdError
        If the value is not of the dimension's type (booleans and non-integral
        numbers are refused) or, for a string, not safe in a file name.
    """
    kind = DIMENSIONS[dimension]
    if kind is int:
        if isinstance(value, bool | np.bool_):
            raise DataIdError(f"{dimension} must be an integer, got {value!r}")
        if isinstance(value, int | np.integer):
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
        raise DataIdError(f"{dimension} must be an integer, got {value!r}")
    if not isinstance(value, str) or not _STRING_VALUE.match(value):
        raise DataIdError(f"{dimension} must be a string of letters, digits, _ . + - (at most 64), "
                          f"got {value!r}")
    return value


#: Dataset types every backbone knows.  Calibrations are identified by the
#: observing day they were made for; ``Backbone.find_calibration`` picks the
#: latest one at or before a given day.
DEFAULT_TYPES: tuple[DatasetType, ...] = (
    DatasetType("raw", ("instrument", "day_obs", "exposure", "detector"), "raw",
                implied=("band", "physical_filter"),
                description="One detector of one exposure as the camera wrote it (docs/raw-format.md)."),
    DatasetType("bias", ("instrument", "day_obs", "detector"), "images",
                description="Master bias of an assembled detector, e-, and its variance."),
    DatasetType("dark", ("instrument", "day_obs", "detector"), "images",
                description="Master dark, e-/s, and its variance."),
    DatasetType("flat", ("instrument", "day_obs", "detector", "band"), "images",
                implied=("physical_filter",), description="Master flat of one band and its variance."),
    DatasetType("defects", ("instrument", "day_obs", "detector"), "images",
                description="Defect map of an assembled detector, True = BAD."),
    DatasetType("crosstalk", ("instrument", "day_obs", "detector"), "images",
                description="Crosstalk matrix[victim, source] of a detector's amplifiers, ADU/ADU."),
    DatasetType("template", ("skytile", "band"), "ccd_image",
                description="Template coadd of one sky tile in one band."),
    DatasetType("calexp", ("instrument", "day_obs", "visit", "detector"), "ccd_image",
                implied=("band", "physical_filter"), description="Calibrated visit image of a detector."),
    DatasetType("difference", ("instrument", "day_obs", "visit", "detector"), "ccd_image",
                implied=("band", "physical_filter"), description="Difference image (calexp - template)."),
    DatasetType("source", ("instrument", "day_obs", "visit", "detector"), "parquet",
                implied=("band", "physical_filter"), description="Source catalog of a calexp."),
    DatasetType("diaSource", ("instrument", "day_obs", "visit", "detector"), "parquet",
                implied=("band", "physical_filter"),
                description="DiaSources of a detector-visit, APDB DiaSource columns."),
    DatasetType("diaObject", ("instrument", "day_obs", "visit", "detector"), "parquet",
                implied=("band", "physical_filter"),
                description="DiaObjects updated by a detector-visit, APDB DiaObject columns."),
    DatasetType("diaForcedSource", ("instrument", "day_obs", "visit", "detector"), "parquet",
                implied=("band", "physical_filter"),
                description="Forced photometry of DiaObjects on a detector-visit, APDB columns."),
)


@dataclass(frozen=True)
class DatasetRef:
    """A dataset in the registry.

    Attributes
    ----------
    dataset_type : str
    data_id : dict
        Key dimensions, then the implied ones that were recorded.
    path : str
        File path relative to the datastore root, ``/``-separated.
    size : int
        Bytes.
    checksum : str
        SHA-256 of the file, hex.
    created : datetime.datetime
        When it was registered, UTC.
    provenance : str
        Free text: what made it, from what.
    """

    dataset_type: str
    data_id: dict[str, Any]
    path: str
    size: int
    checksum: str
    created: datetime = field(compare=False)
    provenance: str = ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of this ref (``created`` as ISO-8601)."""
        return {"dataset_type": self.dataset_type, "data_id": dict(self.data_id), "path": self.path,
                "size": self.size, "checksum": self.checksum, "created": self.created.isoformat(),
                "provenance": self.provenance}


_metadata = sa.MetaData()
_dataset_type_table = sa.Table(
    "dataset_type", _metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("dimensions", sa.String(256), nullable=False),
    sa.Column("implied", sa.String(256), nullable=False),
    sa.Column("storage", sa.String(32), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
)
_dataset_table = sa.Table(
    "dataset", _metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("dataset_type", sa.String(64), sa.ForeignKey("dataset_type.name"), nullable=False),
    sa.Column("data_id", sa.String(512), nullable=False),
    *(sa.Column(name, sa.String(64) if kind is str else sa.BigInteger, nullable=True)
      for name, kind in DIMENSIONS.items()),
    sa.Column("path", sa.String(1024), nullable=False, unique=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("checksum", sa.String(64), nullable=False),
    sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    sa.Column("provenance", sa.Text, nullable=False),
    sa.UniqueConstraint("dataset_type", "data_id", name="uq_dataset_type_data_id"),
    sa.Index("ix_dataset_type_day_obs", "dataset_type", "day_obs"),
    sa.Index("ix_dataset_exposure", "exposure"),
    sa.Index("ix_dataset_visit", "visit"),
)


def _type_from_row(row: Any) -> DatasetType:
    return DatasetType(row.name, tuple(filter(None, row.dimensions.split(","))), row.storage,
                       tuple(filter(None, row.implied.split(","))), row.description)


class Registry:
    """The SQL registry of datasets.

    Parameters
    ----------
    url : str
        SQLAlchemy URL; tables are created if missing and the default dataset types registered.
    """

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        _metadata.create_all(self.engine)
        self._types: dict[str, DatasetType] = {}
        for dataset_type in DEFAULT_TYPES:
            self.register(dataset_type)

    def close(self) -> None:
        self.engine.dispose()

    def register(self, dataset_type: DatasetType) -> DatasetType:
        """Register a dataset type; registering the same definition again is a no-op.

        Raises
        ------
        DatasetTypeConflictError
            If a type of that name exists with other dimensions or storage.
        """
        row = {"name": dataset_type.name, "dimensions": ",".join(dataset_type.dimensions),
               "implied": ",".join(dataset_type.implied), "storage": dataset_type.storage,
               "description": dataset_type.description}
        with self.engine.begin() as connection:
            connection.execute(insert_ignoring_duplicates(self.engine, _dataset_type_table), [row])
        stored = self.dataset_type(dataset_type.name)
        if (stored.dimensions, stored.implied, stored.storage) != (
                dataset_type.dimensions, dataset_type.implied, dataset_type.storage):
            raise DatasetTypeConflictError(
                f"dataset type {dataset_type.name} is registered with data id {stored.describe_data_id()} "
                f"and storage {stored.storage}, not {dataset_type.describe_data_id()} and "
                f"{dataset_type.storage}")
        return stored

    def dataset_type(self, name: str) -> DatasetType:
        """The registered type ``name`` (re-read from the database if another process registered it)."""
        if name not in self._types:
            with self.engine.connect() as connection:
                row = connection.execute(
                    sa.select(_dataset_type_table).where(_dataset_type_table.c.name == name)).first()
            if row is None:
                known = ", ".join(t.name for t in self.dataset_types())
                raise UnknownDatasetTypeError(f"no dataset type {name!r}; registered: {known}")
            self._types[name] = _type_from_row(row)
        return self._types[name]

    def dataset_types(self) -> list[DatasetType]:
        """Every registered type, by name."""
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(_dataset_type_table).order_by(_dataset_type_table.c.name))
            types = [_type_from_row(row) for row in rows]
        self._types.update((t.name, t) for t in types)
        return types

    def _ref(self, row: Any) -> DatasetRef:
        dataset_type = self.dataset_type(row.dataset_type)
        data_id = {name: getattr(row, name) for name in dataset_type.dimensions + dataset_type.implied
                   if getattr(row, name) is not None}
        created = row.created if row.created.tzinfo else row.created.replace(tzinfo=UTC)
        return DatasetRef(row.dataset_type, data_id, row.path, int(row.size), row.checksum, created,
                          row.provenance)

    def find(self, dataset_type: DatasetType, data_id: Mapping[str, Any]) -> DatasetRef | None:
        """The dataset with this complete, normalized data id, or None."""
        query = sa.select(_dataset_table).where(_dataset_table.c.dataset_type == dataset_type.name,
                                                _dataset_table.c.data_id == dataset_type.key(data_id))
        with self.engine.connect() as connection:
            row = connection.execute(query).first()
        return None if row is None else self._ref(row)

    def query(self, dataset_type: DatasetType, where: Mapping[str, Any],
              before_day_obs: int | None = None) -> list[DatasetRef]:
        """Datasets of a type whose data id has the values of ``where`` (normalized, possibly partial).

        ``before_day_obs`` keeps those whose ``day_obs`` is at or before it.
        Sorted by the type's key dimensions.
        """
        table = _dataset_table
        query = sa.select(table).where(table.c.dataset_type == dataset_type.name,
                                       *(table.c[name] == value for name, value in where.items()))
        if before_day_obs is not None:
            query = query.where(table.c.day_obs <= before_day_obs)
        query = query.order_by(*(table.c[name] for name in dataset_type.dimensions))
        with self.engine.connect() as connection:
            return [self._ref(row) for row in connection.execute(query)]

    def add(self, ref: DatasetRef, publish: Callable[[], None]) -> DatasetRef:
        """Record ``ref``, calling ``publish`` (which puts its file in place) inside the transaction.

        The row and the file appear together: if ``publish`` fails nothing is
        recorded; if the commit fails the file is an orphan that the next put of
        the same data id overwrites.

        Returns
        -------
        DatasetRef
            ``ref``, or the ref already recorded under this data id with the same checksum
            (then ``publish`` is not called).

        Raises
        ------
        DatasetConflictError
            If the data id is recorded with another checksum, or the path belongs to another dataset.
        """
        dataset_type = self.dataset_type(ref.dataset_type)
        row = {"dataset_type": ref.dataset_type, "data_id": dataset_type.key(ref.data_id), **ref.data_id,
               "path": ref.path, "size": ref.size, "checksum": ref.checksum, "created": ref.created,
               "provenance": ref.provenance}
        try:
            with self.engine.begin() as connection:
                connection.execute(sa.insert(_dataset_table), [row])
                publish()
        except sa.exc.IntegrityError:
            existing = self.find(dataset_type, ref.data_id)
            if existing is None:
                raise DatasetConflictError(
                    f"{ref.path} is already the file of another dataset than {ref.dataset_type} "
                    f"{dataset_type.key(ref.data_id)}") from None
            check_same_content(existing, ref.checksum)
            return existing
        return ref

    def counts(self) -> dict[str, int]:
        """Number of datasets of each registered type."""
        query = sa.select(_dataset_table.c.dataset_type, sa.func.count()).group_by(
            _dataset_table.c.dataset_type)
        with self.engine.connect() as connection:
            counted = dict(connection.execute(query).all())
        return {t.name: int(counted.get(t.name, 0)) for t in self.dataset_types()}


def check_same_content(existing: DatasetRef, checksum: str) -> None:
    """Raise :class:`DatasetConflictError` unless ``existing`` has this checksum."""
    if existing.checksum != checksum:
        raise DatasetConflictError(
            f"{existing.dataset_type} {existing.data_id} is already in the backbone with other content "
            f"(sha256 {existing.checksum[:12]}…, new {checksum[:12]}…); a dataset is never overwritten")

