"""Alert packets: one record of Rubin's official alert schema per DiaSource.

A record holds the triggering ``diaSource``, its ``diaObject``, the object's
earlier DiaSources and DiaForcedSources within a history window
(``prvDiaSources``, ``prvDiaForcedSources``), the ``ssSource`` when the source
was attributed to a solar-system object, and the science, template and
difference cutouts as FITS bytes (:func:`dmstream.payloads.cutouts.make_cutouts`).
The record layout is read from the newest schema ``lsst-alert-packet`` ships
(:func:`dmstream.schemas.alerts.alert_schema`), so every field of it is filled
or explicitly null and no field outside it is written.

Inputs carry the APDB column names of ``lsst-sdm-schemas``, which are the
alert schema's field names: the DiaSource table of
:mod:`dmstream.payloads.diasource` plus ``diaObjectId`` (and ``ssObjectId``)
from association, DiaObject rows as association updated them for this visit,
and history rows as :meth:`dmstream.backbone.apdb.Apdb.dia_sources` and
``dia_forced_sources`` return them.

The alert is identified by its ``diaSourceId`` (the top-level field of the
v11 schemas, "Identifier of the triggering DiaSource"; the older schemas'
``alertId`` was set to the diaSourceId by Rubin's alert packaging).  The id is
bit-packed from (visit, detector, source index) by :mod:`dmstream.payloads.ids`,
and the record depends only on the inputs (no clock is read: the processing
time is an input), so a replay or a restarted worker builds the same bytes.

History is what was observed strictly before the triggering DiaSource, within
the window: a replay whose APDB already holds later visits builds the same
alert as the live night did.  Float values that are NaN (not measured) go out
as null where the schema allows null.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import astropy.units as u
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from astropy.coordinates import HeliocentricEclipticIAU76, SkyCoord
from numpy.typing import NDArray

from dmstream.payloads.cutouts import Cutouts
from dmstream.payloads.ids import split_dia_source_id
from dmstream.schemas.alerts import alert_schema

#: Arrow type of each Avro primitive the alert schema uses.
_ARROW_TYPES = {"long": pa.int64(), "int": pa.int32(), "float": pa.float32(), "double": pa.float64(),
                "boolean": pa.bool_(), "string": pa.string(), "bytes": pa.binary()}
#: APDB columns that the alert records of the same table do not carry.
_APDB_ONLY = {"diaSource": {"ssObjectReassocTimeMjdTai"}, "diaObject": {"validityEndMjdTai"},
              "diaForcedSource": set(), "ssSource": set()}
#: ssSource fields derived from the DiaSource's observed position when the input does not give them.
_SKY_ANGLES = ("eclLambda", "eclBeta", "galLon", "galLat")


class AlertError(ValueError):
    """Inputs that cannot make valid alerts: missing required fields, foreign columns, unknown ids."""


@dataclass(frozen=True)
class AlertConfig:
    """What an alert carries of its object's history.

    Attributes
    ----------
    history_days : float
        Window of ``prvDiaSources`` and ``prvDiaForcedSources`` before the
        DiaSource's midpoint, days (Rubin: 12 months).
    max_prv_dia_sources, max_prv_forced_sources : int
        Most history rows of each kind in one alert; the most recent are kept.
        The defaults keep an alert within Kafka's default largest message
        (1 MiB) even with every field set and 102-px cutouts: a prvDiaSource
        encodes to at most 0.44 kB, a prvDiaForcedSource 0.09 kB, the three
        cutouts 0.42 MB.
    """

    history_days: float = 365.0
    max_prv_dia_sources: int = 1000
    max_prv_forced_sources: int = 1500

    def __post_init__(self) -> None:
        if self.history_days < 0 or self.max_prv_dia_sources < 0 or self.max_prv_forced_sources < 0:
            raise ValueError(f"history window and caps must be non-negative: {self}")


@dataclass
class AlertResult:
    """Alert records, in the row order of the DiaSources.

    Attributes
    ----------
    records : list of dict
        One per DiaSource, fields of the newest alert schema; encode with
        :func:`dmstream.schemas.alerts.encode_alert`.  History entries are
        shared between alerts of one object in the same call: treat as read-only.
    alert_ids : numpy.ndarray
        The diaSourceId of each record (int64), the Kafka message key.
    capped : int
        Alerts whose history was cut to the caps of :class:`AlertConfig`.
    """

    records: list[dict[str, Any]]
    alert_ids: NDArray[np.int64]
    capped: int


@dataclass(frozen=True)
class AlertField:
    """A field of a record of the alert schema: name, Arrow type of its Avro type, whether null is allowed."""

    name: str
    type: pa.DataType
    nullable: bool


def _named_records(node: Any, found: dict[str, list[dict[str, Any]]]) -> None:
    if isinstance(node, dict):
        if node.get("type") == "record":
            found[node["name"].rsplit(".", 1)[-1]] = node["fields"]
        for value in node.values():
            _named_records(value, found)
    elif isinstance(node, list):
        for value in node:
            _named_records(value, found)


@cache
def record_fields(record: str) -> tuple[AlertField, ...]:
    """Fields of a record of the newest alert schema (``alert``, ``diaSource``, ``diaObject``, ...)."""
    found: dict[str, list[dict[str, Any]]] = {}
    _named_records(alert_schema(), found)
    fields = []
    for field in found[record]:
        kind = field["type"]
        nullable = isinstance(kind, list) and "null" in kind
        if isinstance(kind, list):
            kind = next(k for k in kind if k != "null")
        fields.append(AlertField(field["name"], _ARROW_TYPES.get(kind) if isinstance(kind, str) else None,
                             nullable))
    return tuple(fields)


def _records(table: pa.Table, record: str, fills: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows of ``table`` as records of the alert schema's ``record``, converted a column at a time."""
    fields = record_fields(record)
    names = {f.name for f in fields}
    foreign = [c for c in table.column_names if c not in names and c not in _APDB_ONLY[record]]
    if foreign:
        raise AlertError(f"{record} has no field {', '.join(foreign)} in the alert schema")
    fills = fills or {}
    columns = []
    for field in fields:
        if field.name in table.column_names:
            column = table.column(field.name)
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise AlertError(f"{record}.{field.name} ({column.type}) does not fit the schema's "
                                 f"{field.type}: {exc}") from None
            if field.nullable and pa.types.is_floating(field.type):
                column = pc.if_else(pc.is_nan(column), pa.scalar(None, field.type), column)
            elif not field.nullable and column.null_count:
                raise AlertError(f"{record}.{field.name} is required but {column.null_count} rows are null")
            columns.append(column.to_pylist())
        elif field.name in fills:
            columns.append(itertools.repeat(fills[field.name], table.num_rows))
        elif field.nullable:
            columns.append(itertools.repeat(None, table.num_rows))
        else:
            raise AlertError(f"{record} lacks {field.name}, which the alert schema requires")
    keys = [f.name for f in fields]
    return [dict(zip(keys, row, strict=True)) for row in zip(*columns, strict=False)]


def _numbers(table: pa.Table, name: str, dtype: type) -> NDArray[Any]:
    return table.column(name).to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def _optional_ids(table: pa.Table, name: str) -> pa.Array:
    if name not in table.column_names:
        return pa.nulls(table.num_rows, pa.int64())
    return table.column(name).combine_chunks().cast(pa.int64())


def _row_of(keys: pa.Array, table: pa.Table, key: str, what: str) -> pa.Array:
    """Row of ``table`` whose ``key`` equals each of ``keys`` (null for a null key); keys must be unique."""
    if key not in table.column_names:
        raise AlertError(f"{what} lacks {key}")
    values = table.column(key).combine_chunks().cast(pa.int64())
    if len(pc.unique(values)) != len(values):
        raise AlertError(f"{what} holds a {key} more than once")
    return pc.index_in(keys, value_set=values, skip_nulls=True)


def sky_angles(ra: NDArray[np.float64], dec: NDArray[np.float64]) -> dict[str, NDArray[np.float64]]:
    """Ecliptic (IAU 1976, heliocentric direction) and Galactic coordinates of ICRS positions, degrees.

    The ssSource definitions: longitude and latitude of the observed direction.
    """
    ecliptic = SkyCoord(ra=ra * u.deg, dec=dec * u.deg, distance=1 * u.au, frame="hcrs").transform_to(
        HeliocentricEclipticIAU76())
    galactic = SkyCoord(ra=ra * u.deg, dec=dec * u.deg, frame="icrs").galactic
    return {"eclLambda": ecliptic.lon.deg, "eclBeta": ecliptic.lat.deg, "galLon": galactic.l.deg,
            "galLat": galactic.b.deg}


class _History:
    """History rows of the objects of this batch in [since, until), sorted by object then time, as records."""

    def __init__(self, table: pa.Table | None, record: str, object_ids: pa.Array, since: float, until: float
                 ) -> None:
        if table is None or not table.num_rows:
            self.objects = np.zeros(0, np.int64)
            self.times = np.zeros(0)
            self.records: list[dict[str, Any]] = []
            return
        for required in ("diaObjectId", "midpointMjdTai"):
            if required not in table.column_names:
                raise AlertError(f"{record} history lacks {required}")
        times = table.column("midpointMjdTai")
        ours = pc.is_in(table.column("diaObjectId"), value_set=pc.drop_null(object_ids))
        table = table.filter(pc.and_(ours, pc.and_(pc.greater_equal(times, since), pc.less(times, until))))
        table = table.take(pc.sort_indices(table, [("diaObjectId", "ascending"),
                                                   ("midpointMjdTai", "ascending")]))
        self.objects = _numbers(table, "diaObjectId", np.int64)
        self.times = _numbers(table, "midpointMjdTai", np.float64)
        self.records = _records(table, record)

    def before(self, object_id: int, midpoint: float, days: float, cap: int
               ) -> tuple[list[dict[str, Any]], bool]:
        """Rows of the object in [midpoint - days, midpoint), the latest ``cap``; and whether capped."""
        first, end = np.searchsorted(self.objects, object_id, "left"), np.searchsorted(self.objects,
                                                                                     object_id, "right")
        start, stop = first + np.searchsorted(self.times[first:end], [midpoint - days, midpoint], "left")
        capped = stop - start > cap
        return self.records[max(start, stop - cap):stop], bool(capped)


def run(dia_sources: pa.Table, dia_objects: pa.Table, history_sources: pa.Table | None,
        history_forced: pa.Table | None, cutouts: Sequence[Cutouts] | None,
        ss_sources: pa.Table | None = None, config: AlertConfig | None = None, *,
        processed_mjd_tai: float | None = None, observation_reason: str | None = None,
        target_name: str | None = None) -> AlertResult:
    """Alert records of DiaSources.

    Parameters
    ----------
    dia_sources : pyarrow.Table
        The DiaSources to alert on, APDB columns (those of
        :data:`dmstream.payloads.diasource.SCHEMA`) plus ``diaObjectId``
        (null for a source attributed to a solar-system object) and optionally
        ``ssObjectId`` and ``timeProcessedMjdTai``.  ``diaSourceId`` must be
        the packing of :mod:`dmstream.payloads.ids` of the row's visit and detector.
    dia_objects : pyarrow.Table
        One row per DiaObject (APDB ``DiaObject`` columns, the version after
        this visit's association), including every ``diaObjectId`` of ``dia_sources``.
    history_sources, history_forced : pyarrow.Table or None
        Earlier DiaSources and DiaForcedSources of those objects (APDB
        columns); rows of other objects, at or after a source's midpoint or
        outside the window are ignored.  None: no history.
    cutouts : sequence of Cutouts or None
        One per row of ``dia_sources``, in order; None leaves the cutout fields null.
    ss_sources : pyarrow.Table, optional
        Solar-system attributions: ``diaSourceId``, ``ssObjectId`` and any
        other ssSource fields known (ephemeris predictions etc.).  eclLambda,
        eclBeta, galLon and galLat are derived from the DiaSource's position
        when absent.  A DiaSource whose ``ssObjectId`` column is set but has no
        row here gets an ssSource of those derived fields.
    config : AlertConfig, optional
    processed_mjd_tai : float, optional
        Processing time (MJD TAI) for DiaSources without ``timeProcessedMjdTai``.
    observation_reason, target_name : str, optional
        The scheduler's reason and target of the visit (RTN-097).

    Returns
    -------
    AlertResult

    Raises
    ------
    AlertError
        If a required field is missing or null, a column is not an alert
        field, ids are duplicated or do not match, or a DiaObject is missing.
    """
    config = config or AlertConfig()
    n = dia_sources.num_rows
    for required in ("diaSourceId", "visit", "detector", "midpointMjdTai", "ra", "dec"):
        if required not in dia_sources.column_names:
            raise AlertError(f"diaSource lacks {required}, which the alert schema requires")
    alert_ids = _numbers(dia_sources, "diaSourceId", np.int64)
    if np.unique(alert_ids).size != n:
        raise AlertError("diaSourceIds repeat: each DiaSource gets exactly one alert")
    visit, detector, _ = split_dia_source_id(alert_ids)
    if not (np.array_equal(visit, _numbers(dia_sources, "visit", np.int64))
            and np.array_equal(detector, _numbers(dia_sources, "detector", np.int64))):
        raise AlertError("diaSourceIds do not pack their rows' visit and detector (dmstream.payloads.ids)")
    if cutouts is not None and len(cutouts) != n:
        raise AlertError(f"{len(cutouts)} cutouts for {n} DiaSources")
    if "timeProcessedMjdTai" not in dia_sources.column_names and processed_mjd_tai is None:
        raise AlertError("diaSource lacks timeProcessedMjdTai and no processed_mjd_tai was given")

    object_ids = _optional_ids(dia_sources, "diaObjectId")
    object_rows = _row_of(object_ids, dia_objects, "diaObjectId", "dia_objects")
    unknown = pc.and_(pc.is_valid(object_ids), pc.is_null(object_rows))
    if pc.any(unknown).as_py():
        missing = pc.filter(object_ids, unknown).to_pylist()
        raise AlertError(f"no DiaObject row for diaObjectId {', '.join(map(str, missing[:10]))}")

    ss_object_ids, ss_table = _ss_sources(dia_sources, ss_sources)
    dia_sources = dia_sources.drop_columns([c for c in ("diaObjectId", "ssObjectId")
                                            if c in dia_sources.column_names])
    dia_sources = dia_sources.append_column("diaObjectId", object_ids).append_column("ssObjectId",
                                                                                      ss_object_ids)
    sources = _records(dia_sources, "diaSource", {"timeProcessedMjdTai": processed_mjd_tai})
    objects = _records(dia_objects, "diaObject")
    ss_records = iter(_records(ss_table, "ssSource"))
    midpoints = _numbers(dia_sources, "midpointMjdTai", np.float64)
    window = (float(midpoints.min()) - config.history_days, float(midpoints.max())) if n else (0.0, 0.0)
    history = _History(history_sources, "diaSource", object_ids, *window)
    forced = _History(history_forced, "diaForcedSource", object_ids, *window)

    records, capped = [], 0
    for i, (source, object_row, ss_object) in enumerate(zip(
            sources, object_rows.to_pylist(), ss_object_ids.to_pylist(), strict=True)):
        prv_sources = prv_forced = None
        if object_row is not None:
            object_id = source["diaObjectId"]
            prv_sources, capped_sources = history.before(object_id, midpoints[i], config.history_days,
                                                         config.max_prv_dia_sources)
            prv_forced, capped_forced = forced.before(object_id, midpoints[i], config.history_days,
                                                      config.max_prv_forced_sources)
            capped += capped_sources or capped_forced
        stamps = cutouts[i] if cutouts is not None else None
        records.append({
            "diaSourceId": source["diaSourceId"], "observation_reason": observation_reason,
            "target_name": target_name, "diaSource": source, "prvDiaSources": prv_sources,
            "prvDiaForcedSources": prv_forced,
            "diaObject": objects[object_row] if object_row is not None else None,
            "ssSource": next(ss_records) if ss_object is not None else None, "mpc_orbits": None,
            "cutoutDifference": stamps.cutoutDifference if stamps else None,
            "cutoutScience": stamps.cutoutScience if stamps else None,
            "cutoutTemplate": stamps.cutoutTemplate if stamps else None,
        })
    return AlertResult(records, alert_ids, capped)


def _ss_sources(dia_sources: pa.Table, ss_sources: pa.Table | None) -> tuple[pa.Array, pa.Table]:
    """Each DiaSource's ssObjectId (null if none), and the ssSource rows of those that have one, in order."""
    column_ids = _optional_ids(dia_sources, "ssObjectId")
    dia_source_ids = dia_sources.column("diaSourceId").combine_chunks().cast(pa.int64())
    if ss_sources is None:
        ss_sources = pa.table({"diaSourceId": pa.array([], pa.int64()),
                               "ssObjectId": pa.array([], pa.int64())})
    if "ssObjectId" not in ss_sources.column_names:
        raise AlertError("ss_sources lacks ssObjectId")
    rows = _row_of(dia_source_ids, ss_sources, "diaSourceId", "ss_sources")
    aligned = ss_sources.take(rows)
    attributed = aligned.column("ssObjectId").combine_chunks().cast(pa.int64())
    disagree = pc.fill_null(pc.not_equal(attributed, column_ids), False)
    if pc.any(disagree).as_py():
        raise AlertError("ss_sources attribute DiaSources "
                         f"{pc.filter(dia_source_ids, disagree).to_pylist()[:10]} to other ssObjects "
                         "than their ssObjectId column")
    ss_object_ids = pc.coalesce(attributed, column_ids)
    has_ss = pc.is_valid(ss_object_ids)
    chosen = aligned.filter(has_ss).drop_columns(["diaSourceId", "ssObjectId"])
    chosen = chosen.add_column(0, "diaSourceId", pc.filter(dia_source_ids, has_ss))
    chosen = chosen.add_column(1, "ssObjectId", pc.filter(ss_object_ids, has_ss))
    positions = dia_sources.filter(has_ss)
    derived = (sky_angles(_numbers(positions, "ra", np.float64), _numbers(positions, "dec", np.float64))
               if positions.num_rows else dict.fromkeys(_SKY_ANGLES, np.zeros(0)))
    for name in _SKY_ANGLES:
        values = pa.array(derived[name])
        if name in chosen.column_names:
            given = chosen.column(name).cast(pa.float64())
            chosen = chosen.set_column(chosen.column_names.index(name), name, pc.coalesce(given, values))
        else:
            chosen = chosen.append_column(name, values)
    return ss_object_ids, chosen
