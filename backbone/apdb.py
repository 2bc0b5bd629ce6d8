"""The APDB: the durable Level 1 database of DiaObjects, DiaSources and DiaForcedSources, in SQL.

Its tables are made from the official Science Data Model: the ``apdb.yaml``
schema that ``lsst-sdm-schemas`` ships, turned into SQLAlchemy tables by that
package's own tool, ``felis``, so column names, types, nullability, primary
keys and indexes are Rubin's.  Only ``DiaObject``, ``DiaSource``,
``DiaForcedSource``, ``SSObject`` and ``metadata`` are created; one index is
added (``DiaObject.dec``) for sky-region queries.

Writes are idempotent by primary key (insert-or-ignore, on SQLite and
PostgreSQL), so a replayed or restarted chain can store the same rows again.
DiaObjects are versioned as in Rubin's APDB: a row per (diaObjectId,
validityStartMjdTai); storing a new version closes the previous one
(``validityEndMjdTai``), and queries return the open versions.  Versions of
one object are expected in time order, as association produces them.

On SQLite the file is in WAL mode: queries run while a night is written.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from astropy.time import Time

from dmstream.backbone.sql import create_engine, insert_ignoring_duplicates
from dmstream.payloads.conditions import angular_separation
from dmstream.settings import Settings, load

#: Tables of the APDB schema that this APDB creates and stores.
TABLES = ("DiaObject", "DiaSource", "DiaForcedSource", "SSObject")
#: Days of DiaSource and DiaForcedSource history an alert carries (Rubin: 12 months).
HISTORY_DAYS = 365.0
#: Columns filled with the time of storing when a table to store lacks them (MJD TAI).
PROCESSING_TIME_COLUMN = "timeProcessedMjdTai"
_SCHEMA_VERSION_KEY = "version:schema"
#: Arrow type of each felis datatype.
_ARROW_TYPES = {
    "boolean": pa.bool_(), "byte": pa.int8(), "short": pa.int16(), "int": pa.int32(), "long": pa.int64(),
    "float": pa.float32(), "double": pa.float64(), "char": pa.string(), "string": pa.string(),
    "unicode": pa.string(), "text": pa.string(), "binary": pa.binary(), "timestamp": pa.timestamp("us"),
}
#: Ids per IN (...) clause of the history queries.
_ID_CHUNK = 1000


class ApdbError(ValueError):
    """A request the APDB cannot serve: unknown table, or a database made with another schema."""


class ApdbSchemaError(ApdbError):
    """Rows that do not fit the official schema: foreign or missing columns, wrong types, too long strings."""


@functools.cache
def official_schema() -> Any:
    """The felis ``Schema`` of ``lsst.sdm.schemas/apdb.yaml``."""
    from felis.datamodel import Schema

    with (importlib.resources.files("lsst.sdm.schemas") / "apdb.yaml").open() as stream:
        return Schema.from_stream(stream, context={"id_generation": True})


def schema_version() -> str:
    version = official_schema().version
    return str(getattr(version, "current", version))


@functools.cache
def _metadata() -> sa.MetaData:
    from felis.metadata import MetaDataBuilder

    metadata = MetaDataBuilder(official_schema(), apply_schema_to_metadata=False).build()
    sa.Index("dmstream_DiaObject_dec", metadata.tables["DiaObject"].c.dec)
    return metadata


def _columns(table: str) -> list[Any]:
    return next(t for t in official_schema().tables if t.name == table).columns


@functools.cache
def arrow_schema(table: str) -> pa.Schema:
    """The Arrow schema of an APDB table: official columns in official order, nullability included."""
    return pa.schema([pa.field(c.name, _ARROW_TYPES[c.datatype.value], nullable=c.nullable is not False)
                      for c in _columns(table)])


@functools.cache
def _string_lengths(table: str) -> dict[str, int]:
    return {c.name: int(c.length) for c in _columns(table)
            if c.length and _ARROW_TYPES[c.datatype.value] == pa.string()}


def now_mjd_tai() -> float:
    return float(Time.now().tai.mjd)


class Apdb:
    """The Level 1 database.

    Parameters
    ----------
    url : str
        SQLAlchemy URL (``DMSTREAM_APDB_URL``, default ``sqlite:///<data dir>/apdb.sqlite3``).
        Tables are created if missing.

    Raises
    ------
    ApdbError
        If the database was made with another version of the official schema.
    """

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        metadata = _metadata()
        self.tables = {name: metadata.tables[name] for name in (*TABLES, "metadata")}
        metadata.create_all(self.engine, tables=list(self.tables.values()))
        version = schema_version()
        meta = self.tables["metadata"]
        with self.engine.begin() as connection:
            connection.execute(insert_ignoring_duplicates(self.engine, meta),
                               [{"name": _SCHEMA_VERSION_KEY, "value": version}])
            stored = connection.execute(sa.select(meta.c.value).where(meta.c.name == _SCHEMA_VERSION_KEY))
            stored_version = stored.scalar_one()
        if stored_version != version:
            raise ApdbError(f"{url} holds APDB schema {stored_version}; the installed lsst-sdm-schemas "
                            f"is {version}")

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Apdb:
        """The APDB at ``DMSTREAM_APDB_URL`` (default: in the data dir)."""
        return cls((settings or load()).apdb_url)

    def close(self) -> None:
        self.engine.dispose()

    def _table(self, name: str) -> sa.Table:
        if name not in TABLES:
            raise ApdbError(f"no APDB table {name!r}; tables: {', '.join(TABLES)}")
        return self.tables[name]

    def conform(self, table: str, rows: pa.Table) -> pa.Table:
        """``rows`` checked against the official schema and cast to its types.

        Official columns that ``rows`` lacks become null, except
        ``timeProcessedMjdTai``, which gets the time of the call.

        Raises
        ------
        ApdbSchemaError
            Naming the columns that are not in the official table, required
            (NOT NULL) columns that are missing or hold nulls or NaN, columns
            that cannot be cast to their official type, and strings longer than
            their official length.
        """
        schema = arrow_schema(self._table(table).name)
        foreign = [name for name in rows.column_names if name not in schema.names]
        if foreign:
            raise ApdbSchemaError(f"{table} has no column {', '.join(foreign)} in the official APDB schema "
                                  f"{schema_version()} (lsst-sdm-schemas)")
        if PROCESSING_TIME_COLUMN in schema.names and PROCESSING_TIME_COLUMN not in rows.column_names:
            rows = rows.append_column(PROCESSING_TIME_COLUMN, pa.array(np.full(len(rows), now_mjd_tai())))
        missing = [f.name for f in schema if not f.nullable and f.name not in rows.column_names]
        if missing:
            raise ApdbSchemaError(f"{table} rows lack required column {', '.join(missing)}")
        arrays = {}
        for name in rows.column_names:
            target = schema.field(name).type
            try:
                arrays[name] = rows.column(name).cast(target, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise ApdbSchemaError(f"{table}.{name} ({rows.schema.field(name).type}) cannot be stored as "
                                      f"{target}: {exc}") from None
        for name, array in arrays.items():
            self._check_values(table, schema.field(name), array)
        return pa.table(arrays)

    @staticmethod
    def _check_values(table: str, field: pa.Field, array: pa.ChunkedArray) -> None:
        if not field.nullable:
            empty = array.null_count
            if pa.types.is_floating(field.type):
                empty += int(pc.sum(pc.is_nan(array)).as_py() or 0)
            if empty:
                raise ApdbSchemaError(f"{table}.{field.name} is required but {empty} rows have null or NaN")
        length = _string_lengths(table).get(field.name)
        if length is not None and len(array):
            longest = pc.max(pc.utf8_length(array)).as_py() or 0
            if longest > length:
                raise ApdbSchemaError(f"{table}.{field.name} holds at most {length} characters; a value has "
                                      f"{longest}")

    def store(self, table: str, rows: pa.Table) -> None:
        """Insert rows; rows whose primary key is already stored are left as they are.

        Parameters
        ----------
        table : str
            ``DiaObject``, ``DiaSource``, ``DiaForcedSource`` or ``SSObject``.
        rows : pyarrow.Table
            Columns with the official names (any subset that includes the required ones).

        Raises
        ------
        ApdbSchemaError
            See :meth:`conform`.
        """
        sql_table = self._table(table)
        conformed = self.conform(table, rows)
        if not len(conformed):
            return
        records = conformed.to_pylist()
        with self.engine.begin() as connection:
            connection.execute(insert_ignoring_duplicates(self.engine, sql_table), records)
            if table == "DiaObject":
                self._close_previous_versions(connection, sql_table, conformed)

    @staticmethod
    def _close_previous_versions(connection: sa.Connection, table: sa.Table, rows: pa.Table) -> None:
        """End the open versions of each stored object that started before the version just stored."""
        order = pc.sort_indices(rows, [("validityStartMjdTai", "ascending")])
        ids = pc.take(rows.column("diaObjectId"), order).to_pylist()
        starts = pc.take(rows.column("validityStartMjdTai"), order).to_pylist()
        statement = (sa.update(table)
                     .where(table.c.diaObjectId == sa.bindparam("object_id"),
                            table.c.validityEndMjdTai.is_(None),
                            table.c.validityStartMjdTai < sa.bindparam("start"))
                     .values(validityEndMjdTai=sa.bindparam("start")))
        connection.execute(statement, [{"object_id": object_id, "start": start}
                                       for object_id, start in zip(ids, starts, strict=True)])

    def _select(self, table: str, query: sa.Select) -> pa.Table:
        schema = arrow_schema(table)
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        columns = list(zip(*rows, strict=True)) if rows else [[] for _ in schema]
        return pa.table([pa.array(values, type=f.type) for values, f in zip(columns, schema, strict=True)],
                        schema=schema)

    def dia_objects_in_box(self, ra_min: float, ra_max: float, dec_min: float, dec_max: float) -> pa.Table:
        """Current DiaObjects with ra in [ra_min, ra_max] and dec in [dec_min, dec_max], degrees.

        ``ra_min > ra_max`` is a box across RA 0 (e.g. 359 to 1).
        """
        table = self.tables["DiaObject"]
        query = sa.select(*table.c).where(table.c.dec.between(dec_min, dec_max),
                                          table.c.validityEndMjdTai.is_(None))
        if ra_max - ra_min < 360.0:
            low, high = ra_min % 360.0, ra_max % 360.0
            query = query.where(table.c.ra.between(low, high) if low <= high
                                else sa.or_(table.c.ra >= low, table.c.ra <= high))
        return self._select("DiaObject", query.order_by(table.c.diaObjectId))

    def dia_objects_in_cone(self, ra: float, dec: float, radius: float) -> pa.Table:
        """Current DiaObjects within ``radius`` degrees of (ra, dec), degrees."""
        dec_min, dec_max = max(dec - radius, -90.0), min(dec + radius, 90.0)
        cos_dec = math.cos(math.radians(dec))
        if dec_max >= 90.0 or dec_min <= -90.0 or math.sin(math.radians(radius)) >= cos_dec:
            candidates = self.dia_objects_in_box(0.0, 360.0, dec_min, dec_max)
        else:
            # The RA half-width of a cone: where the small circle touches its tangent meridians.
            half_width = math.degrees(math.asin(math.sin(math.radians(radius)) / cos_dec))
            candidates = self.dia_objects_in_box(ra - half_width, ra + half_width, dec_min, dec_max)
        separation = angular_separation(ra, dec, candidates.column("ra").to_numpy(),
                                        candidates.column("dec").to_numpy())
        return candidates.filter(pa.array(separation <= radius))

    def _history(self, table: str, dia_object_ids: Iterable[int], since_mjd: float) -> pa.Table:
        sql_table = self.tables[table]
        ids = sorted({int(i) for i in dia_object_ids})
        parts = []
        for start in range(0, len(ids), _ID_CHUNK):
            query = (sa.select(*sql_table.c)
                     .where(sql_table.c.diaObjectId.in_(ids[start:start + _ID_CHUNK]),
                            sql_table.c.midpointMjdTai >= since_mjd)
                     .order_by(sql_table.c.diaObjectId, sql_table.c.midpointMjdTai))
            parts.append(self._select(table, query))
        return pa.concat_tables(parts) if parts else arrow_schema(table).empty_table()

    def dia_sources(self, dia_object_ids: Sequence[int], since_mjd: float) -> pa.Table:
        """DiaSources of these DiaObjects with ``midpointMjdTai >= since_mjd``, by object then time.

        An alert's ``prvDiaSources``: ``since_mjd`` = the visit's MJD - :data:`HISTORY_DAYS`.
        """
        return self._history("DiaSource", dia_object_ids, since_mjd)

    def dia_forced_sources(self, dia_object_ids: Sequence[int], since_mjd: float) -> pa.Table:
        """DiaForcedSources of these DiaObjects with ``midpointMjdTai >= since_mjd``, by object then time."""
        return self._history("DiaForcedSource", dia_object_ids, since_mjd)

    def counts(self) -> dict[str, int]:
        """Rows in each table (DiaObject: current versions only)."""
        counted = {}
        with self.engine.connect() as connection:
            for name in TABLES:
                table = self.tables[name]
                query = sa.select(sa.func.count()).select_from(table)
                if name == "DiaObject":
                    query = query.where(table.c.validityEndMjdTai.is_(None))
                counted[name] = int(connection.execute(query).scalar_one())
        return counted
