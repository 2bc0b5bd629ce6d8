"""Catch-up Archiving: raws the OCS log says were taken but the Data Backbone lacks.

When the archiver stops during a night (a crash, a broker outage, a restart),
the camera goes on: it announces every image it read out on
``lsst.sal.MTCamera.logevent_endReadout`` and leaves the raw files in its
buffer.  :func:`catch_up` compares that log with the backbone's ``raw``
datasets, looks for each missing raw in the buffer directories, checks it with
:func:`~dmstream.streams.rawfits.read_raw`, adds to a copy of its primary
header what the EFD knew at the time of its exposure (the pointing from the
mount and rotator, the dome, the weather, the seeing; each group of keywords
with a HISTORY card naming its source) and ingests the copy.  The amplifier
extensions are copied byte for byte.  A raw it cannot recover is reported with
the reason.  Running it again ingests nothing: what it recovered is in the
backbone.

The recovered raw differs from the camera's file by its added header cards,
so the archiver, meeting the same image later (a restarted archiver reads the
readout topic's backlog), finds another content under its data id
(``DatasetConflictError``) and must take the raw as archived.  Run catch-up
once the archiver has drained that backlog, so that it fetches only what
Kafka no longer holds.

::

    logs = read_night_logs(Path("night"))          # or: await read_kafka_logs(bootstrap, day_obs)
    report = catch_up(Backbone.from_settings(), logs.ocs, [Path("night/raw")], efd=logs.efd)
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import astropy.units as u
import numpy as np
from aiokafka.errors import KafkaError
from astropy.coordinates import AltAz, SkyCoord
from astropy.io import fits
from astropy.time import Time
from numpy.typing import ArrayLike

from dmstream import schemas, topics
from dmstream.backbone import Backbone, DatasetConflictError
from dmstream.infra.kafka import read_topics
from dmstream.logs import get_logger
from dmstream.payloads import conditions
from dmstream.payloads.camera import DetectorGeometry, focal_plane, get_detector
from dmstream.streams.efd import COORDSYS_ICRS, ROTSYS_SKY, EfdConfig
from dmstream.streams.night import MessageEvent, NightReader
from dmstream.streams.observatory import (
    DAY_OBS_OFFSET,
    INSTRUMENT,
    MJD_UNIX_EPOCH,
    SITE,
    SITE_LATITUDE,
    exposure_id_of,
    offline_astropy,
)
from dmstream.streams.ocs import TAI_MINUS_UTC
from dmstream.streams.rawfits import (
    DERIVED_KEYWORDS,
    REQUIRED_KEYWORDS,
    RawFileError,
    primary_header,
    read_raw,
)

log = get_logger(__name__)

#: A raw's file name in a camera buffer or a recorded night: ``<obsId>_<detectorName>.fits``.
RAW_NAME = re.compile(r"^(?P<obs_id>[A-Z]{2}_[A-Z]_\d{8}_\d{6})_(?P<detector>R\d\d_S\d\d)\.fits$")
#: The WCS cards of a raw's primary header, as :func:`~dmstream.streams.rawfits.primary_header` writes them.
WCS_KEYWORDS = DERIVED_KEYWORDS[DERIVED_KEYWORDS.index("WCSAXES"):]
_HISTORY_PREFIX = "dmstream catch-up:"
_SCIENCE_DETECTORS = frozenset(detector.name for detector in focal_plane())


class CatchUpError(ValueError):
    """Catch-up cannot run: a buffer directory is missing, the log is unreadable, or no detector is known."""


@dataclass(frozen=True)
class CatchUpConfig:
    """How strictly the EFD must agree with a raw's header, and how often progress is logged.

    Attributes
    ----------
    pointing_tolerance : float
        Largest separation between the header's RA/DEC and the mount's position
        at mid-exposure before the disagreement is reported, arcsec.
    rotation_tolerance : float
        The same for ROTPA and the rotator's sky position angle, deg (0.02° moves
        the corner of the focal plane by about 2″).
    progress_interval : float
        Seconds between progress lines.
    """

    pointing_tolerance: float = 2.0
    rotation_tolerance: float = 0.02
    progress_interval: float = 5.0


# --- The OCS log ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoggedExposure:
    """An image the camera reported read out (``logevent_endReadout``).

    Times are TAI unix seconds.  ``date_obs`` and ``date_end`` (start and end
    of the exposure) come from ``logevent_endOfImageTelemetry`` and are None
    when the log lacks it.
    """

    obs_id: str
    day_obs: int
    seq_num: int
    group_id: str
    img_type: str
    end_of_readout: float
    date_obs: float | None = None
    date_end: float | None = None

    @property
    def exposure_id(self) -> int:
        return exposure_id_of(self.day_obs, self.seq_num)


@dataclass(frozen=True)
class AnnouncedPointing:
    """Where a ``nextVisit`` said the telescope would point: ICRS RA, Dec and sky position angle, deg."""

    ra: float
    dec: float
    rot_sky_pos: float


@dataclass
class OcsLog:
    """What the OCS log of one night says the camera took.

    Attributes
    ----------
    instrument, day_obs
        The night.
    exposures : dict
        :class:`LoggedExposure` by obs_id.
    announced : dict
        :class:`AnnouncedPointing` by group id (the ``nextVisit`` of each visit).
    detectors : tuple of str or None
        Detector names every exposure was read out on, when the source says so
        (a recorded night's manifest); None when it does not (Kafka: the
        camera's events do not list detectors).
    rejected : int
        Messages of the log that could not be read.
    """

    instrument: str
    day_obs: int
    exposures: dict[str, LoggedExposure] = field(default_factory=dict)
    announced: dict[str, AnnouncedPointing] = field(default_factory=dict)
    detectors: tuple[str, ...] | None = None
    rejected: int = 0


# --- The EFD --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Channel:
    """One telemetry quantity: a field of a topic, and how far from a sample it may be read.

    ``latest`` quantities are measurements that hold until the next one (DIMM);
    the others are interpolated between samples.  ``period`` marks angles that wrap.
    """

    topic: str
    field: str
    max_gap: float
    item: int | None = None
    period: float | None = None
    sal_index: int | None = None
    latest: bool = False


_WEATHER_STATION = EfdConfig().ess_index
_CHANNELS: dict[str, _Channel] = {
    "elevation": _Channel(topics.MOUNT_ELEVATION.name, "actualPosition", 5.0),
    "azimuth": _Channel(topics.MOUNT_AZIMUTH.name, "actualPosition", 5.0),
    "rotator": _Channel(topics.ROTATOR.name, "actualPosition", 5.0),
    "dome": _Channel(topics.DOME_AZIMUTH.name, "positionActual", 5.0, period=360.0),
    "temperature": _Channel(topics.ESS_TEMPERATURE.name, "temperatureItem", 60.0, item=0,
                            sal_index=_WEATHER_STATION),
    "pressure": _Channel(topics.ESS_PRESSURE.name, "pressureItem", 60.0, item=0, sal_index=_WEATHER_STATION),
    "humidity": _Channel(topics.ESS_HUMIDITY.name, "relativeHumidityItem", 60.0, sal_index=_WEATHER_STATION),
    "wind_speed": _Channel(topics.ESS_AIR_FLOW.name, "speed", 60.0, sal_index=_WEATHER_STATION),
    "wind_direction": _Channel(topics.ESS_AIR_FLOW.name, "direction", 60.0, period=360.0,
                               sal_index=_WEATHER_STATION),
    "seeing": _Channel(topics.DIMM_MEASUREMENT.name, "fwhm", 180.0, latest=True),
}


class Efd:
    """Telemetry samples of the quantities catch-up reads, queryable at any time.

    Samples are added as the records come (:meth:`add`, any order); the time of
    a sample is its record's ``timestamp`` (when it was measured), or its
    ``private_sndStamp``, TAI unix seconds.
    """

    def __init__(self) -> None:
        self._samples: dict[str, list[tuple[float, float]]] = {name: [] for name in _CHANNELS}
        self._series: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, topic: str, record: dict[str, Any]) -> None:
        """Keep what ``record`` of ``topic`` says of the channels read from it; other topics are ignored."""
        for name, channel in _CHANNELS.items():
            if channel.topic != topic:
                continue
            if channel.sal_index is not None and record.get("salIndex") != channel.sal_index:
                continue
            value = record[channel.field]
            if channel.item is not None:
                value = value[channel.item]
            when = record.get("timestamp", record["private_sndStamp"])
            self._samples[name].append((float(when), float(value)))
            self._series.pop(name, None)

    def samples(self, channel: str) -> int:
        """Number of samples of one channel."""
        return len(self._samples[channel])

    def _sorted(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self._series:
            pairs = np.array(sorted(set(self._samples[name])), dtype=float).reshape(-1, 2)
            # One sample per time: a log replayed twice holds every record twice.
            when, first = np.unique(pairs[:, 0], return_index=True)
            values = pairs[first, 1]
            period = _CHANNELS[name].period
            if period is not None and values.size:
                values = np.unwrap(values, period=period)
            self._series[name] = (when, values)
        return self._series[name]

    def at(self, channel: str, tai: ArrayLike) -> np.ndarray:
        """Value of a channel at TAI unix times; NaN where no sample is close enough.

        Parameters
        ----------
        channel : str
            ``elevation``, ``azimuth`` (mount, deg), ``rotator`` (deg), ``dome``
            (azimuth, deg), ``temperature`` (°C), ``pressure`` (Pa), ``humidity``
            (%), ``wind_speed`` (m/s), ``wind_direction`` (deg), ``seeing`` (DIMM FWHM, arcsec).
        tai : array_like
            TAI unix seconds.
        """
        spec = _CHANNELS[channel]
        tai = np.atleast_1d(np.asarray(tai, dtype=float))
        out = np.full(tai.shape, np.nan)
        when, values = self._sorted(channel)
        if when.size == 0:
            return out
        if spec.latest:
            before = np.searchsorted(when, tai, side="right") - 1
            fresh = before >= 0
            fresh[fresh] = tai[fresh] - when[before[fresh]] <= spec.max_gap
            out[fresh] = values[before[fresh]]
        else:
            after = np.clip(np.searchsorted(when, tai), 0, when.size - 1)
            before = np.clip(after - 1, 0, when.size - 1)
            nearest = np.minimum(np.abs(tai - when[before]), np.abs(when[after] - tai))
            close = nearest <= spec.max_gap
            out[close] = np.interp(tai[close], when, values)
        return out % spec.period if spec.period is not None else out


@dataclass
class SummitLogs:
    """The OCS log and the EFD of one night, read from one source."""

    ocs: OcsLog
    efd: Efd


def _day_window(day_obs: int) -> tuple[float, float]:
    """TAI unix seconds at which an observing day (UTC-12h) starts and ends."""
    midnight = datetime.strptime(str(day_obs), "%Y%m%d").replace(tzinfo=UTC).timestamp()
    start = midnight + DAY_OBS_OFFSET + TAI_MINUS_UTC
    return start, start + 86400.0


def _additional_values(record: dict[str, Any]) -> dict[str, str]:
    """A camera event's ``additionalKeys``/``additionalValues`` as a dict (CAP-572: ``\\:`` is a colon)."""
    keys = record.get("additionalKeys", "").split(":")
    values = [v.replace("\\:", ":") for v in re.split(r"(?<!\\):", record.get("additionalValues", ""))]
    return dict(zip(keys, values, strict=False))


class _LogBuilder:
    """Gathers one night's camera events, announcements and telemetry from messages in any order."""

    def __init__(self, instrument: str, day_obs: int, detectors: tuple[str, ...] | None = None) -> None:
        self.ocs = OcsLog(instrument, day_obs, detectors=detectors)
        self.efd = Efd()
        self.window = _day_window(day_obs)
        self._times: dict[str, tuple[float, float]] = {}

    def add(self, topic: str, value: dict[str, Any]) -> None:
        try:
            self._add(topic, value)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            self.ocs.rejected += 1
            log.warning("log message not understood", topic=topic, reason=repr(exc))

    def _add(self, topic: str, value: dict[str, Any]) -> None:
        if topic in (topics.END_READOUT.name, topics.END_OF_IMAGE_TELEMETRY.name):
            if value["imageDate"] != str(self.ocs.day_obs):
                return
            if topic == topics.END_OF_IMAGE_TELEMETRY.name:
                self._times[value["imageName"]] = (float(value["timestampDateObs"]),
                                                   float(value["timestampDateEnd"]))
                return
            extra = _additional_values(value)
            self.ocs.exposures[value["imageName"]] = LoggedExposure(
                obs_id=value["imageName"], day_obs=int(value["imageDate"]), seq_num=int(value["imageNumber"]),
                group_id=extra.get("groupId", ""), img_type=extra.get("imageType", ""),
                end_of_readout=float(value["timestampEndOfReadout"]))
        elif topic == topics.NEXT_VISIT.name:
            if not self.window[0] <= value["startTime"] < self.window[1]:
                return
            if value["coordinateSystem"] == COORDSYS_ICRS and value["rotationSystem"] == ROTSYS_SKY:
                self.ocs.announced[value["groupId"]] = AnnouncedPointing(
                    float(value["position"][0]), float(value["position"][1]), float(value["cameraAngle"]))
        elif self.window[0] <= value.get("timestamp", value["private_sndStamp"]) < self.window[1]:
            self.efd.add(topic, value)

    def finish(self) -> SummitLogs:
        for obs_id, (date_obs, date_end) in self._times.items():
            if obs_id in self.ocs.exposures:
                self.ocs.exposures[obs_id] = replace(self.ocs.exposures[obs_id], date_obs=date_obs,
                                                     date_end=date_end)
        log.info("OCS log read", day_obs=self.ocs.day_obs, exposures=len(self.ocs.exposures),
                 announced=len(self.ocs.announced), rejected=self.ocs.rejected,
                 mount_samples=self.efd.samples("elevation"))
        return SummitLogs(self.ocs, self.efd)


def read_night_logs(night: str | os.PathLike[str]) -> SummitLogs:
    """The OCS log and the EFD of a recorded night (``docs/recorded-night.md``).

    The expected detectors are the manifest's.

    Raises
    ------
    NightFormatError
        If ``night`` is not a recorded night.
    """
    reader = NightReader(Path(night))
    manifest = reader.manifest
    builder = _LogBuilder(manifest.instrument, manifest.day_obs, tuple(manifest.detectors))
    for event in reader.events():
        if isinstance(event, MessageEvent):
            builder.add(event.topic, event.value)
    return builder.finish()


async def read_kafka_logs(bootstrap: str, day_obs: int, instrument: str = INSTRUMENT) -> SummitLogs:
    """The OCS log and the EFD of ``day_obs`` as Kafka still holds them.

    Reads the camera's ``endReadout`` and ``endOfImageTelemetry``, the
    ``nextVisit`` announcements and the telemetry topics from their earliest
    retained offsets to their ends at the time of the call, and keeps what
    belongs to ``day_obs``.  The camera's events do not list detectors, so the
    log's ``detectors`` is None.

    Raises
    ------
    CatchUpError
        If the broker cannot be reached.
    """
    specs = (topics.END_READOUT, topics.END_OF_IMAGE_TELEMETRY, topics.NEXT_VISIT, *topics.TELEMETRY)
    log.info("reading the OCS log from Kafka", bootstrap=bootstrap, day_obs=day_obs, topics=len(specs))
    try:
        seen = await read_topics(bootstrap, specs)
    except KafkaError as exc:
        raise CatchUpError(f"cannot read the OCS log from Kafka at {bootstrap}: {exc}") from exc
    builder = _LogBuilder(instrument, day_obs)
    for topic, messages in seen.items():
        for message in messages:
            try:
                value = schemas.decode(message.value)
            except schemas.SchemaError as exc:
                builder.ocs.rejected += 1
                log.warning("undecodable log message", topic=topic, offset=message.offset, reason=str(exc))
                continue
            builder.add(topic, value)
    return builder.finish()


# --- What the EFD says of an exposure -------------------------------------------------------------

_MOUNT = f"{topics.MOUNT_ELEVATION.name} and {topics.MOUNT_AZIMUTH.name} actualPosition"
_ROTATOR = f"{topics.ROTATOR.name} actualPosition with the mount's position"
_DOME = f"{topics.DOME_AZIMUTH.name} positionActual"
_WEATHER = (f"{topics.ESS_TEMPERATURE.name}, {topics.ESS_PRESSURE.name}, {topics.ESS_HUMIDITY.name}, "
            f"{topics.ESS_AIR_FLOW.name} (salIndex {_WEATHER_STATION})")
_DIMM = f"{topics.DIMM_MEASUREMENT.name} fwhm"
#: Keywords catch-up adds, in header order: (keyword, source, comment).  Names follow Rubin's header service.
EFD_KEYWORDS: tuple[tuple[str, str, str], ...] = (
    ("ELSTART", _MOUNT, "[deg] mount elevation at start"),
    ("ELEND", _MOUNT, "[deg] mount elevation at end"),
    ("AZSTART", _MOUNT, "[deg] mount azimuth at start"),
    ("AZEND", _MOUNT, "[deg] mount azimuth at end"),
    ("AMSTART", _MOUNT, "airmass at start"),
    ("AMEND", _MOUNT, "airmass at end"),
    ("RASTART", _MOUNT, "[deg] ICRS RA of the mount at start"),
    ("DECSTART", _MOUNT, "[deg] ICRS Dec of the mount at start"),
    ("RAEND", _MOUNT, "[deg] ICRS RA of the mount at end"),
    ("DECEND", _MOUNT, "[deg] ICRS Dec of the mount at end"),
    ("ROTPABEG", _ROTATOR, "[deg] sky position angle at start"),
    ("ROTPAEND", _ROTATOR, "[deg] sky position angle at end"),
    ("DOMEAZ", _DOME, "[deg] dome azimuth at mid-exposure"),
    ("AIRTEMP", _WEATHER, "[deg C] outside air temperature"),
    ("PRESSURE", _WEATHER, "[Pa] atmospheric pressure"),
    ("HUMIDITY", _WEATHER, "[%] relative humidity"),
    ("WINDSPD", _WEATHER, "[m/s] wind speed"),
    ("WINDDIR", _WEATHER, "[deg] direction the wind comes from, E of N"),
    ("SEEING", _DIMM, "[arcsec] DIMM FWHM at zenith, 500 nm"),
)


@dataclass(frozen=True)
class ExposureMetadata:
    """What the EFD says of one exposure.

    Attributes
    ----------
    cards : tuple
        (keyword, value, comment) of :data:`EFD_KEYWORDS` the EFD could give, in header order.
    history : tuple of str
        One line per source: which keywords came from which topics.
    pointing : tuple of float or None
        RA, Dec (ICRS) and sky position angle at mid-exposure from the mount and rotator, deg.
    """

    cards: tuple[tuple[str, float, str], ...] = ()
    history: tuple[str, ...] = ()
    pointing: tuple[float, float, float] | None = None


def _wrap180(angle: np.ndarray) -> np.ndarray:
    return (angle + 180.0) % 360.0 - 180.0


def _utc(tai: np.ndarray) -> Time:
    return Time(tai - TAI_MINUS_UTC, format="unix", scale="utc")


def _icrs(elevation: np.ndarray, azimuth: np.ndarray, tai: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ICRS RA, Dec (deg) of mount positions at TAI times; NaN where a position is unknown.

    The elevation is taken as unrefracted, as the simulated summit writes it.
    """
    ra, dec = np.full(tai.shape, np.nan), np.full(tai.shape, np.nan)
    known = np.isfinite(elevation) & np.isfinite(azimuth)
    if known.any():
        with offline_astropy():
            frame = AltAz(obstime=_utc(tai[known]), location=SITE)
            sky = SkyCoord(alt=elevation[known] * u.deg, az=azimuth[known] * u.deg, frame=frame).icrs
        ra[known], dec[known] = sky.ra.deg, sky.dec.deg
    return ra, dec


def _sky_position_angle(ra: np.ndarray, dec: np.ndarray, rotator: np.ndarray, tai: np.ndarray) -> np.ndarray:
    """Sky position angle of the focal plane's +y axis (deg E of N) from the rotator and the pointing."""
    out = np.full(tai.shape, np.nan)
    known = np.isfinite(ra) & np.isfinite(dec) & np.isfinite(rotator)
    if known.any():
        with offline_astropy():
            lst = _utc(tai[known]).sidereal_time("mean", SITE.lon).deg
        parallactic = conditions.parallactic_angle(_wrap180(lst - ra[known]), dec[known], SITE_LATITUDE)
        out[known] = (parallactic - rotator[known] - 90.0) % 360.0
    return out


def efd_metadata(efd: Efd, date_obs: ArrayLike, date_end: ArrayLike) -> list[ExposureMetadata]:
    """What the EFD says of exposures that started at ``date_obs`` and ended at ``date_end``.

    Parameters
    ----------
    efd : Efd
    date_obs, date_end : array_like
        Start and end of each exposure, TAI unix seconds.

    Returns
    -------
    list of ExposureMetadata
        One per exposure, with only the keywords the EFD covers.
    """
    start = np.atleast_1d(np.asarray(date_obs, dtype=float))
    end = np.atleast_1d(np.asarray(date_end, dtype=float))
    mid = (start + end) / 2
    tai = np.concatenate([start, mid, end])
    elevation, azimuth, rotator = (efd.at(name, tai) for name in ("elevation", "azimuth", "rotator"))
    ra, dec = _icrs(elevation, azimuth, tai)
    rotpa = _sky_position_angle(ra, dec, rotator, tai)
    airmass = np.where(np.isfinite(elevation), conditions.airmass(np.nan_to_num(elevation)), np.nan)
    n = start.size
    at_start, at_mid, at_end = slice(0, n), slice(n, 2 * n), slice(2 * n, 3 * n)
    values = {
        "ELSTART": elevation[at_start], "ELEND": elevation[at_end], "AZSTART": azimuth[at_start] % 360.0,
        "AZEND": azimuth[at_end] % 360.0, "AMSTART": airmass[at_start], "AMEND": airmass[at_end],
        "RASTART": ra[at_start], "DECSTART": dec[at_start], "RAEND": ra[at_end], "DECEND": dec[at_end],
        "ROTPABEG": rotpa[at_start], "ROTPAEND": rotpa[at_end], "DOMEAZ": efd.at("dome", mid),
        "AIRTEMP": efd.at("temperature", mid), "PRESSURE": efd.at("pressure", mid),
        "HUMIDITY": efd.at("humidity", mid), "WINDSPD": efd.at("wind_speed", mid),
        "WINDDIR": efd.at("wind_direction", mid), "SEEING": efd.at("seeing", mid),
    }
    out = []
    for i in range(n):
        cards = tuple((keyword, float(values[keyword][i]), comment) for keyword, _, comment in EFD_KEYWORDS
                      if np.isfinite(values[keyword][i]))
        given = {keyword for keyword, _, _ in cards}
        sources: dict[str, list[str]] = {}
        for keyword, source, _ in EFD_KEYWORDS:
            if keyword in given:
                sources.setdefault(source, []).append(keyword)
        history = tuple(f"{_HISTORY_PREFIX} {' '.join(keywords)} from {source} at the time of the exposure"
                        for source, keywords in sources.items())
        mid_ra, mid_dec, mid_rotpa = (float(v[at_mid][i]) for v in (ra, dec, rotpa))
        pointing = (mid_ra, mid_dec, mid_rotpa) if np.all(np.isfinite([mid_ra, mid_dec, mid_rotpa])) else None
        out.append(ExposureMetadata(cards, history, pointing))
    return out


# --- The report -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecoveredRaw:
    """A raw catch-up ingested (or, in a dry run, would ingest).

    Attributes
    ----------
    source : pathlib.Path
        The file in the buffer.
    checksum : str or None
        SHA-256 of the dataset in the backbone; None in a dry run.
    added_keywords : tuple of str
        Primary-header keywords added from the EFD (HISTORY cards not counted).
    """

    obs_id: str
    exposure: int
    detector: int
    detector_name: str
    source: Path
    checksum: str | None
    added_keywords: tuple[str, ...]


@dataclass(frozen=True)
class MissingRaw:
    """A raw the OCS log says was taken that is still not in the backbone, and why."""

    obs_id: str
    exposure: int
    detector: int
    detector_name: str
    reason: str


@dataclass
class CatchUpReport:
    """What catch-up found and did for one night.

    Attributes
    ----------
    exposures : int
        Exposures in the OCS log.
    detectors : tuple of str
        Detectors every exposure is expected on.
    expected : int
        Raws the OCS log implies: exposures times detectors.
    present : int
        Of those, raws the backbone already held.
    recovered : list of RecoveredRaw
        Raws ingested now (with ``dry_run``: that would be ingested).
    still_missing : list of MissingRaw
        Raws neither in the backbone nor recoverable, with the reason.
    notes : list of str
        Metadata the EFD contradicts or could not rebuild, one line per exposure and problem.
    """

    instrument: str
    day_obs: int
    exposures: int = 0
    detectors: tuple[str, ...] = ()
    expected: int = 0
    present: int = 0
    recovered: list[RecoveredRaw] = field(default_factory=list)
    still_missing: list[MissingRaw] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The counts, for a progress line or a one-line answer."""
        return {"instrument": self.instrument, "day_obs": self.day_obs, "exposures": self.exposures,
                "detectors": len(self.detectors), "expected": self.expected, "present": self.present,
                "recovered": len(self.recovered), "still_missing": len(self.still_missing),
                "notes": len(self.notes), "dry_run": self.dry_run, "seconds": round(self.seconds, 2)}

    def as_dict(self) -> dict[str, Any]:
        """Everything, JSON-serialisable."""
        out = asdict(self)
        for item in out["recovered"]:
            item["source"] = str(item["source"])
        return out


# --- Catch-up -------------------------------------------------------------------------------------

def _index_buffers(buffers: Sequence[Path],
                   wanted: set[str]) -> tuple[dict[tuple[str, str], list[Path]], int]:
    """Raw files of the wanted obs_ids in the buffers, by (obs_id, detector name), in buffer order.

    Files named as raws are taken at their name (the header is checked before
    ingestion); other FITS files are identified by their primary header.
    Returns the index and the number of FITS files that could not be identified.
    """
    index: dict[tuple[str, str], list[Path]] = {}
    unidentified = 0
    for buffer in buffers:
        for path in sorted(buffer.rglob("*.fits")):
            if path.name.startswith("."):
                continue
            named = RAW_NAME.match(path.name)
            if named:
                key = (named["obs_id"], named["detector"])
            else:
                try:
                    header = fits.getheader(path, 0)
                    key = (str(header["OBSID"]), str(header["DETNAME"]))
                except (OSError, KeyError, ValueError) as exc:
                    unidentified += 1
                    log.warning("buffer file not identified", path=str(path), reason=str(exc))
                    continue
            if key[0] in wanted and key[1] in _SCIENCE_DETECTORS:
                index.setdefault(key, []).append(path)
    return index, unidentified


def _header_times(header: fits.Header) -> tuple[float, float] | None:
    """Start and end of the exposure from a raw's primary header, TAI unix seconds."""
    try:
        start = float(header.get("MJD-BEG", header["MJD-OBS"]))
        end = float(header.get("MJD-END", start + float(header["EXPTIME"]) / 86400.0))
    except (KeyError, ValueError):
        return None
    return (start - MJD_UNIX_EPOCH) * 86400.0, (end - MJD_UNIX_EPOCH) * 86400.0


def _wcs_cards(header: fits.Header, detector: DetectorGeometry) -> list[tuple[str, Any, str]]:
    """The WCS cards the raw writer gives a header with this exposure's keywords and pointing."""
    rebuilt = primary_header({key: header[key] for key in REQUIRED_KEYWORDS}, detector)
    return [(key, rebuilt[key], rebuilt.comments[key]) for key in WCS_KEYWORDS]


def write_annotated_copy(source: Path, header: fits.Header, destination: Path) -> None:
    """Write ``source`` with ``header`` as its primary header; every extension is copied byte for byte.

    Parameters
    ----------
    source : pathlib.Path
        A raw file (its primary HDU has no data).
    header : astropy.io.fits.Header
        The new primary header.
    destination : pathlib.Path
    """
    with fits.open(source, memmap=False) as hdus:
        extensions_at = hdus.fileinfo(1)["hdrLoc"]
    with source.open("rb") as original, destination.open("wb") as copy:
        copy.write(header.tostring(padding=True).encode("ascii"))
        original.seek(extensions_at)
        shutil.copyfileobj(original, copy, 16 * 1024 * 1024)


class _CatchUp:
    def __init__(self, backbone: Backbone, ocs: OcsLog, buffers: Sequence[Path], efd: Efd,
                 detectors: Sequence[str] | None, dry_run: bool, config: CatchUpConfig) -> None:
        self.backbone, self.ocs, self.buffers, self.efd = backbone, ocs, buffers, efd
        self.requested_detectors = tuple(detectors) if detectors is not None else None
        self.dry_run, self.config = dry_run, config
        self.report = CatchUpReport(ocs.instrument, ocs.day_obs, exposures=len(ocs.exposures),
                                    dry_run=dry_run)
        self._noted: set[tuple[str, str]] = set()

    def run(self) -> CatchUpReport:
        started = time.monotonic()
        archived = self.backbone.query("raw", instrument=self.ocs.instrument, day_obs=self.ocs.day_obs)
        present = {(int(ref.data_id["exposure"]), int(ref.data_id["detector"])) for ref in archived}
        found, unidentified = _index_buffers(self.buffers, set(self.ocs.exposures))
        names = self._expected_detectors(present, found)
        exposures = sorted(self.ocs.exposures.values(), key=lambda e: e.seq_num)
        expected = [(exposure, get_detector(name)) for exposure in exposures for name in names]
        missing = [(e, d) for e, d in expected if (e.exposure_id, d.id) not in present]
        self.report.detectors = names
        self.report.expected = len(expected)
        self.report.present = len(expected) - len(missing)
        log.info("catch-up started", day_obs=self.ocs.day_obs, exposures=len(exposures), detectors=len(names),
                 expected=len(expected), present=self.report.present, missing=len(missing),
                 buffer_files=sum(len(paths) for paths in found.values()), unidentified_files=unidentified,
                 dry_run=self.dry_run)
        metadata = self._metadata({e.obs_id: e for e, _ in missing}, found)
        last_report = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="dmstream-catch-up-") as staging:
            for done, (exposure, detector) in enumerate(missing, start=1):
                self._recover(exposure, detector, found.get((exposure.obs_id, detector.name), []),
                              metadata.get(exposure.obs_id, ExposureMetadata()), Path(staging))
                if time.monotonic() - last_report >= self.config.progress_interval:
                    last_report = time.monotonic()
                    log.info("catch-up progress", done=done, total=len(missing),
                             recovered=len(self.report.recovered),
                             still_missing=len(self.report.still_missing))
        self.report.seconds = time.monotonic() - started
        log.info("catch-up done", **self.report.summary())
        return self.report

    def _expected_detectors(self, present: set[tuple[int, int]],
                            found: dict[tuple[str, str], list[Path]]) -> tuple[str, ...]:
        """Detectors asked for, else the log's, else the night's detectors in the backbone or a buffer."""
        names = self.requested_detectors or self.ocs.detectors
        if names is None:
            names = tuple(sorted({get_detector(detector).name for _, detector in present}
                                 | {name for _, name in found}))
        if not names:
            raise CatchUpError(f"no detector of day_obs {self.ocs.day_obs} is known: nothing in the backbone "
                               "or the buffers, and the OCS log does not list them; give the detectors")
        try:
            return tuple(get_detector(name).name for name in names)
        except KeyError as exc:
            raise CatchUpError(f"cannot expect raws of {exc.args[0]}") from None

    def _metadata(self, exposures: dict[str, LoggedExposure],
                  found: dict[tuple[str, str], list[Path]]) -> dict[str, ExposureMetadata]:
        """The EFD's metadata of every exposure with a missing raw, in one pass over the telemetry."""
        files: dict[str, list[Path]] = {}
        for (obs_id, _), paths in found.items():
            files.setdefault(obs_id, []).extend(paths)
        times: dict[str, tuple[float, float]] = {}
        for obs_id, exposure in exposures.items():
            if exposure.date_obs is not None and exposure.date_end is not None:
                times[obs_id] = (exposure.date_obs, exposure.date_end)
                continue
            for path in files.get(obs_id, []):
                try:
                    from_header = _header_times(fits.getheader(path, 0))
                except (OSError, ValueError):
                    continue
                if from_header:
                    times[obs_id] = from_header
                    break
        for obs_id in exposures.keys() - times.keys():
            self._note(obs_id, "no exposure time in the OCS log or a raw header: no EFD metadata")
        ordered = sorted(times)
        computed = efd_metadata(self.efd, [times[o][0] for o in ordered], [times[o][1] for o in ordered]) \
            if ordered else []
        return dict(zip(ordered, computed, strict=True))

    def _note(self, obs_id: str, message: str) -> None:
        if (obs_id, message) not in self._noted:
            self._noted.add((obs_id, message))
            self.report.notes.append(f"{obs_id}: {message}")
            log.warning("catch-up metadata note", obs_id=obs_id, note=message)

    def _missing(self, exposure: LoggedExposure, detector: DetectorGeometry, reason: str) -> None:
        self.report.still_missing.append(MissingRaw(exposure.obs_id, exposure.exposure_id, detector.id,
                                                    detector.name, reason))
        log.warning("raw still missing", obs_id=exposure.obs_id, detector=detector.name, reason=reason)

    def _recover(self, exposure: LoggedExposure, detector: DetectorGeometry, candidates: list[Path],
                 metadata: ExposureMetadata, staging: Path) -> None:
        if not candidates:
            self._missing(exposure, detector, "no file of it in " + ", ".join(str(b) for b in self.buffers))
            return
        problems = []
        for path in candidates:
            try:
                header = read_raw(path).primary_header
            except RawFileError as exc:
                problems.append(f"not a valid raw: {exc}")
                continue
            if header.get("OBSID") != exposure.obs_id or header.get("DETNAME") != detector.name:
                problems.append(f"{path}: its header is of {header.get('OBSID')} {header.get('DETNAME')}")
                continue
            annotated, added = self._annotate(header, exposure, detector, metadata)
            checksum = None
            if not self.dry_run:
                copy = staging / path.name
                write_annotated_copy(path, annotated, copy)
                try:
                    checksum = self.backbone.ingest_raw(
                        copy, provenance=f"catch-up archiving of {path}; metadata from the EFD").checksum
                except RawFileError as exc:
                    problems.append(str(exc))
                    continue
                except DatasetConflictError:
                    # The archiver stored its own version meanwhile: the raw is archived.
                    self.report.present += 1
                    self._note(exposure.obs_id, f"{detector.name} was archived by another process meanwhile")
                    return
                finally:
                    copy.unlink(missing_ok=True)
            self.report.recovered.append(RecoveredRaw(exposure.obs_id, exposure.exposure_id, detector.id,
                                                      detector.name, path, checksum, added))
            log.debug("raw recovered", obs_id=exposure.obs_id, detector=detector.name, source=str(path))
            return
        self._missing(exposure, detector, "; ".join(problems))

    def _annotate(self, header: fits.Header, exposure: LoggedExposure, detector: DetectorGeometry,
                  metadata: ExposureMetadata) -> tuple[fits.Header, tuple[str, ...]]:
        """A copy of ``header`` with the EFD keywords it lacks, its pointing rebuilt if absent, else checked.

        Cards already in the header are never changed: the camera's header is the record of the exposure.
        """
        header = header.copy()
        added = []
        for keyword, value, comment in metadata.cards:
            if keyword not in header:
                header.append((keyword, value, comment))
                added.append(keyword)
        history = list(metadata.history)
        pointing, source = metadata.pointing, "MTMount and MTRotator at mid-exposure"
        if pointing is None:
            announced = self.ocs.announced.get(str(header.get("GROUPID", exposure.group_id)))
            if announced is not None:
                pointing = (announced.ra, announced.dec, announced.rot_sky_pos)
                source = f"the nextVisit of group {header.get('GROUPID', exposure.group_id)}"
        lacking = [key for key in ("RA", "DEC", "ROTPA") if key not in header]
        if lacking and pointing is None:
            self._note(exposure.obs_id, f"{' '.join(lacking)} missing and neither the EFD nor a nextVisit "
                                        "gives the pointing")
        elif lacking:
            values = dict(zip(("RA", "DEC", "ROTPA"), pointing, strict=True))
            for key in lacking:
                header.append((key, values[key], "[deg] rebuilt by catch-up, see HISTORY"))
                added.append(key)
            history.append(f"{_HISTORY_PREFIX} {' '.join(lacking)} were missing: rebuilt from {source}")
            if any(key not in header for key in WCS_KEYWORDS):
                try:
                    wcs = _wcs_cards(header, detector)
                except (KeyError, ValueError) as exc:
                    self._note(exposure.obs_id, f"no WCS rebuilt: {exc}")
                else:
                    for key, value, comment in wcs:
                        if key not in header:
                            header.append((key, value, comment))
                            added.append(key)
                    history.append(f"{_HISTORY_PREFIX} WCS rebuilt from the rebuilt RA DEC ROTPA")
        elif header.get("IMGTYPE") == "OBJECT" and pointing is not None:
            history += self._check_pointing(header, exposure, pointing, source)
        for line in history:
            header.add_history(line)
        return header, tuple(added)

    def _check_pointing(self, header: fits.Header, exposure: LoggedExposure,
                        pointing: tuple[float, float, float], source: str) -> list[str]:
        """Compare the header's RA/DEC/ROTPA with ``pointing``; return HISTORY lines for disagreements."""
        lines = []
        ra, dec, rotpa = pointing
        separation = 3600.0 * float(conditions.angular_separation(float(header["RA"]), float(header["DEC"]),
                                                                  ra, dec))
        if separation > self.config.pointing_tolerance:
            message = f"RA DEC differ from {source} by {separation:.1f} arcsec; header values kept"
            self._note(exposure.obs_id, message)
            lines.append(f"{_HISTORY_PREFIX} {message}")
        turn = abs(float(_wrap180(np.asarray(float(header["ROTPA"]) - rotpa))))
        if turn > self.config.rotation_tolerance:
            message = f"ROTPA differs from {source} by {turn:.3f} deg; header value kept"
            self._note(exposure.obs_id, message)
            lines.append(f"{_HISTORY_PREFIX} {message}")
        return lines


def catch_up(backbone: Backbone, ocs_log: OcsLog, buffers: Sequence[str | os.PathLike[str]],
             efd: Efd | None = None, *, detectors: Sequence[str] | None = None, dry_run: bool = False,
             config: CatchUpConfig | None = None) -> CatchUpReport:
    """Ingest the raws the OCS log says were taken and the backbone lacks, from the camera's buffers.

    Parameters
    ----------
    backbone : Backbone
    ocs_log : OcsLog
        From :func:`read_night_logs` or :func:`read_kafka_logs`.
    buffers : sequence of path-like
        Directories where the camera left raw files (a recorded night's
        ``raw/``, or any tree of raws), searched in order: the first valid
        file of a raw is used.
    efd : Efd, optional
        Telemetry of the night; without it the raws are ingested as they are
        (a pointing missing from a header can still come from a ``nextVisit``).
    detectors : sequence of str, optional
        Detector names every exposure was read out on.  Default: the OCS log's
        (a recorded night's manifest), else every detector of the night that
        the backbone or the buffers hold.
    dry_run : bool
        Find and check the raws and their metadata, ingest nothing.
    config : CatchUpConfig, optional

    Returns
    -------
    CatchUpReport

    Raises
    ------
    CatchUpError
        If a buffer is not a directory, or no detector can be expected.
    """
    paths = [Path(b) for b in buffers]
    absent = [str(p) for p in paths if not p.is_dir()]
    if absent:
        raise CatchUpError(f"buffer directories not found: {', '.join(absent)}")
    return _CatchUp(backbone, ocs_log, paths, efd if efd is not None else Efd(), detectors, dry_run,
                    config or CatchUpConfig()).run()
