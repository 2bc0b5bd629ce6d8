"""Everything the simulated summit sends besides pixels, in time order.

From a :class:`~dmstream.streams.observatory.NightPlan`: the ScriptQueue
``nextVisit`` announcements, the MTCamera image events of every exposure, and
telemetry of the mount, rotator, dome, DIMM and weather station.  Records
carry the private fields ts_salobj writes (``private_sndStamp`` in TAI unix
seconds, ``private_efdStamp`` = the same instant in UTC, a per-topic
``private_seqNum`` from 1, ``private_origin``, ``private_identity``) and
``salIndex`` for indexed components only (ScriptQueue, DIMM, ESS), as SAL does.
"""

from __future__ import annotations

import heapq
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.time import Time

from dmstream import topics
from dmstream.models import NextVisit
from dmstream.payloads import conditions
from dmstream.streams.observatory import (
    CALIB_ALT,
    CALIB_AZ,
    INSTRUMENT,
    SITE,
    SITE_LATITUDE,
    NightPlan,
    altaz,
    offline_astropy,
)
from dmstream.streams.ocs import TAI_MINUS_UTC
from dmstream.topics import TopicSpec

#: Script metadata enums of ts_xml (Script.MetadataCoordSys / MetadataRotSys / MetadataDome).
COORDSYS_ICRS, ROTSYS_SKY, DOME_OPEN = 2, 2, 2
#: Range of the mount's azimuth axis either side of north, deg.
AZIMUTH_LIMIT = 270.0
#: The camera publishes endOfImageTelemetry about this long after the end of readout, s.
END_OF_TELEMETRY_DELAY = 0.3


@dataclass(frozen=True)
class EfdConfig:
    """Rates and instruments of the simulated telemetry.

    Attributes
    ----------
    mount_rate, rotator_rate, dome_rate : float
        Samples per second of MTMount azimuth/elevation, MTRotator, MTDome.
    dimm_interval, weather_interval : float
        Seconds between DIMM measurements (while the dome is open) and between
        weather-station samples.
    margin : float
        Telemetry starts this long before the first exposure and ends this
        long after the last readout, s.
    dome_speed : float
        Largest dome rotation speed, deg/s.
    """

    mount_rate: float = 1.0
    rotator_rate: float = 1.0
    dome_rate: float = 1.0
    dimm_interval: float = 60.0
    weather_interval: float = 10.0
    margin: float = 60.0
    dome_speed: float = 1.5
    dimm_index: int = 1
    ess_index: int = 301
    telemetry: bool = True


@dataclass(frozen=True)
class SummitEvent:
    """One message of the summit: ``record`` goes to ``topic`` under ``key`` at ``time_tai``."""

    time_tai: float
    topic: TopicSpec
    key: str
    record: dict[str, Any]


class _Publisher:
    """Stamps records of one SAL component the way ts_salobj does."""

    def __init__(self, csc: str, index: int = 0, indexed: bool = False) -> None:
        self.identity = f"{csc}:{index}" if indexed else csc
        self.key = f"{csc}:{index}"
        self.index = index if indexed else None
        # A stable stand-in for the publisher's process id.
        self.origin = 1000 + zlib.crc32(self.identity.encode()) % 60000
        self.seq: dict[str, int] = {}

    def stamp(self, topic: TopicSpec, tai: float, fields: dict[str, Any]) -> dict[str, Any]:
        seq = self.seq[topic.name] = self.seq.get(topic.name, 0) + 1
        record = {"private_sndStamp": tai, "private_efdStamp": tai - TAI_MINUS_UTC, "private_seqNum": seq,
                  "private_origin": self.origin, "private_identity": self.identity}
        if self.index is not None:
            record["salIndex"] = self.index
        record.update(fields)
        return record


def summit_events(plan: NightPlan, config: EfdConfig | None = None) -> Iterator[SummitEvent]:
    """The time-ordered stream of OCS events, camera events and telemetry of ``plan``.

    Deterministic: the same plan and config give the same events.  Ties in
    time keep a fixed order (announcements, camera, then telemetry).
    """
    config = config or EfdConfig()
    streams: list[Iterable[SummitEvent]] = [_next_visits(plan), _camera_events(plan)]
    if config.telemetry and plan.exposures:
        # One generator per source: the sources are consumed lazily and interleaved.
        mount_rng, dimm_rng, weather_rng = (np.random.default_rng(s) for s in
                                            np.random.SeedSequence([plan.config.seed, 0xEFD]).spawn(3))
        start = plan.exposures[0].tai_start - config.margin
        end = plan.exposures[-1].tai_readout_end + config.margin
        streams += [_mount_events(plan, config, start, end, mount_rng), _dimm_events(plan, config, dimm_rng),
                    _weather_events(config, start, end, weather_rng)]
    return heapq.merge(*streams, key=lambda event: event.time_tai)


def _next_visits(plan: NightPlan) -> Iterator[SummitEvent]:
    queue = _Publisher("ScriptQueue", 1, indexed=True)
    for visit in plan.visits:
        record = queue.stamp(topics.NEXT_VISIT, visit.announce_tai, {})
        announcement = NextVisit(
            private_sndStamp=record["private_sndStamp"], private_efdStamp=record["private_efdStamp"],
            private_seqNum=record["private_seqNum"], private_origin=record["private_origin"],
            private_identity=record["private_identity"], salIndex=record["salIndex"],
            instrument=INSTRUMENT, groupId=visit.group_id, coordinateSystem=COORDSYS_ICRS,
            position=[visit.ra, visit.dec], startTime=visit.tai_start, rotationSystem=ROTSYS_SKY,
            cameraAngle=visit.rot_sky_pos, filters=visit.physical_filter, dome=DOME_OPEN,
            duration=visit.duration, nimages=visit.nimages, survey=visit.survey,
        )
        yield SummitEvent(visit.announce_tai, topics.NEXT_VISIT, visit.group_id, announcement.asdict())


def _camera_events(plan: NightPlan) -> list[SummitEvent]:
    """Image events of every exposure; those of back-to-back snaps interleave, hence the sort."""
    camera = _Publisher("MTCamera")
    events = []
    for e in plan.exposures:
        # CAP-572: ':' separates the values, so a ':' inside one is escaped.
        values = ":".join(v.replace(":", "\\:") for v in (e.group_id, e.img_type, e.survey))
        image = {
            "additionalKeys": "groupId:imageType:program", "additionalValues": values,
            "imagesInSequence": e.nimages, "imageName": e.obs_id, "imageIndex": e.snap + 1,
            "imageSource": e.obs_id[:2], "imageController": e.controller, "imageDate": str(e.day_obs),
            "imageNumber": e.seq_num, "timestampAcquisitionStart": e.tai_start,
        }
        shutter = e.img_type in ("OBJECT", "FLAT")
        steps = [
            (e.tai_start, topics.START_INTEGRATION,
             {"exposureTime": e.exptime, "mode": "normal" if e.can_see_sky else "calibration",
              "timeout": e.exptime + e.readout_time + 30.0}),
            (e.tai_end, topics.START_READOUT,
             {"exposureTime": e.exptime, "timestampStartOfReadout": e.tai_end}),
            (e.tai_readout_end, topics.END_READOUT,
             {"requestedExposureTime": e.exptime, "timestampEndOfReadout": e.tai_readout_end}),
            (e.tai_readout_end + END_OF_TELEMETRY_DELAY, topics.END_OF_IMAGE_TELEMETRY,
             {"exposureTime": e.exptime, "imageTag": f"{zlib.crc32(e.obs_id.encode()):08x}",
              "timestampDateObs": e.tai_start, "timestampDateEnd": e.tai_end,
              "measuredShutterOpenTime": e.exptime if shutter else 0.0, "darkTime": e.darktime,
              "emulatedImage": ""}),
        ]
        events += [SummitEvent(tai, topic, e.obs_id, {**image, **fields}) for tai, topic, fields in steps]
    events.sort(key=lambda event: event.time_tai)
    # Sequence numbers count in the order of sending.
    return [SummitEvent(ev.time_tai, ev.topic, ev.key, camera.stamp(ev.topic, ev.time_tai, ev.record))
            for ev in events]


def _wrap180(angle: np.ndarray) -> np.ndarray:
    return (angle + 180.0) % 360.0 - 180.0


def _pointing(plan: NightPlan, tai: np.ndarray) -> dict[str, np.ndarray]:
    """Mount alt/az and rotator angle at each time: parked, slewing (smoothly) or tracking a visit."""
    visits = plan.visits
    slew_start = np.array([v.slew_start_tai for v in visits])
    settled = np.array([v.tai_start for v in visits])
    ra = np.array([v.ra for v in visits])
    dec = np.array([v.dec for v in visits])
    rot_sky = np.array([v.rot_sky_pos for v in visits])
    current = np.searchsorted(slew_start, tai, side="right") - 1
    slewing = (current >= 0) & (tai < settled[np.maximum(current, 0)])
    tracking = (current >= 0) & ~slewing

    # Positions needed from astropy, in one transform: every tracking sample,
    # and both ends of every slew.
    before = np.maximum(np.arange(len(visits)) - 1, 0)
    query_ra = np.concatenate([ra[current[tracking]], ra[before], ra])
    query_dec = np.concatenate([dec[current[tracking]], dec[before], dec])
    query_tai = np.concatenate([tai[tracking], slew_start, settled])
    with offline_astropy():
        lst = Time(query_tai - TAI_MINUS_UTC, format="unix", scale="utc").sidereal_time("mean", SITE.lon).deg
    alt_q, az_q = altaz(query_ra, query_dec, query_tai)
    pa = conditions.parallactic_angle(_wrap180(lst - query_ra), query_dec, SITE_LATITUDE)
    rot_q = _wrap180(pa - np.concatenate([rot_sky[current[tracking]], rot_sky[before], rot_sky]) - 90.0)
    n_track = int(tracking.sum())
    ends = slice(n_track, n_track + len(visits)), slice(n_track + len(visits), None)
    from_alt, from_az, from_rot = alt_q[ends[0]], az_q[ends[0]], rot_q[ends[0]]
    # The first slew starts from the calibration position.
    from_alt[0], from_az[0], from_rot[0] = CALIB_ALT, CALIB_AZ, 0.0
    to_alt, to_az, to_rot = alt_q[ends[1]], az_q[ends[1]], rot_q[ends[1]]

    alt = np.full(tai.shape, CALIB_ALT)
    az = np.full(tai.shape, CALIB_AZ)
    rot = np.zeros(tai.shape)
    alt[tracking], az[tracking], rot[tracking] = alt_q[:n_track], az_q[:n_track], rot_q[:n_track]
    i = current[slewing]
    progress = np.clip((tai[slewing] - slew_start[i]) / np.maximum(settled[i] - slew_start[i], 1e-9), 0, 1)
    smooth = progress * progress * (3.0 - 2.0 * progress)
    alt[slewing] = from_alt[i] + smooth * (to_alt[i] - from_alt[i])
    az[slewing] = from_az[i] + smooth * _wrap180(to_az[i] - from_az[i])
    rot[slewing] = from_rot[i] + smooth * (to_rot[i] - from_rot[i])
    return {"alt": alt, "az": _cable_wrap(az), "rot": rot}


def _cable_wrap(az: np.ndarray, limit: float = AZIMUTH_LIMIT) -> np.ndarray:
    """Continuous azimuth within ±``limit``: the short way round unless the cable wrap forbids it."""
    out = np.empty_like(az)
    previous = _wrap180(az[0:1])[0] if az.size else 0.0
    for k in range(az.size):
        candidate = previous + (az[k] - previous + 180.0) % 360.0 - 180.0
        if abs(candidate) > limit:
            candidate -= np.sign(candidate) * 360.0
        out[k] = previous = candidate
    return out


def _dome_follow(target: np.ndarray, tai: np.ndarray, speed: float) -> np.ndarray:
    """Dome azimuth chasing the mount at a limited speed (shortest way round)."""
    dome = np.empty_like(target)
    dome[0] = target[0] % 360.0
    steps = np.diff(tai, prepend=tai[0]) * speed
    for k in range(1, target.size):
        error = (target[k] - dome[k - 1] + 180.0) % 360.0 - 180.0
        dome[k] = (dome[k - 1] + np.clip(error, -steps[k], steps[k])) % 360.0
    return dome


def _sampled(start: float, end: float, rate: float) -> np.ndarray:
    return np.arange(start, end, 1.0 / rate)


def _mount_events(plan: NightPlan, config: EfdConfig, start: float, end: float,
                  rng: np.random.Generator) -> Iterator[SummitEvent]:
    mount, rotator, dome = _Publisher("MTMount"), _Publisher("MTRotator"), _Publisher("MTDome")
    streams = []
    if plan.visits:
        t = _sampled(start, end, config.mount_rate)
        where = _pointing(plan, t)
        for topic, demand in ((topics.MOUNT_AZIMUTH, where["az"]), (topics.MOUNT_ELEVATION, where["alt"])):
            # Tracking errors of a few milliarcseconds between demand and encoder.
            actual = demand + rng.normal(0.0, 1e-6, t.size)
            streams.append(_axis_stream(mount, topic, t, demand, actual))
        t_rot = _sampled(start, end, config.rotator_rate)
        rot = np.interp(t_rot, t, where["rot"])
        streams.append(_rotator_stream(rotator, t_rot, rot, rng))
        t_dome = _sampled(start, end, config.dome_rate)
        commanded = np.interp(t_dome, t, where["az"]) % 360.0
        actual = _dome_follow(commanded, t_dome, config.dome_speed)
        streams.append(_dome_stream(dome, t_dome, commanded, actual))
    return heapq.merge(*streams, key=lambda event: event.time_tai)


def _axis_stream(mount: _Publisher, topic: TopicSpec, t: np.ndarray, demand: np.ndarray,
                 actual: np.ndarray) -> Iterator[SummitEvent]:
    demand_velocity = np.gradient(demand, t) if t.size > 1 else np.zeros_like(t)
    actual_velocity = np.gradient(actual, t) if t.size > 1 else np.zeros_like(t)
    for k in range(t.size):
        tk = float(t[k])
        fields = {
            "actualPosition": float(actual[k]), "actualPositionTimestamp": tk,
            "actualVelocity": float(actual_velocity[k]), "actualVelocityTimestamp": tk,
            "demandPosition": float(demand[k]), "demandPositionTimestamp": tk,
            "demandVelocity": float(demand_velocity[k]), "demandVelocityTimestamp": tk,
            "timestamp": tk,
        }
        yield SummitEvent(tk, topic, mount.key, mount.stamp(topic, tk, fields))


def _rotator_stream(rotator: _Publisher, t: np.ndarray, demand: np.ndarray,
                    rng: np.random.Generator) -> Iterator[SummitEvent]:
    actual = demand + rng.normal(0.0, 1e-5, t.size)
    velocity = np.gradient(demand, t) if t.size > 1 else np.zeros_like(t)
    acceleration = np.gradient(velocity, t) if t.size > 1 else np.zeros_like(t)
    actual_velocity = np.gradient(actual, t) if t.size > 1 else np.zeros_like(t)
    odometer = np.concatenate([[0.0], np.cumsum(np.abs(np.diff(actual)))])
    for k in range(t.size):
        tk = float(t[k])
        fields = {"demandPosition": float(demand[k]), "demandVelocity": float(velocity[k]),
                  "demandAcceleration": float(acceleration[k]), "actualPosition": float(actual[k]),
                  "actualVelocity": float(actual_velocity[k]), "odometer": float(odometer[k]),
                  "timestamp": tk}
        yield SummitEvent(tk, topics.ROTATOR, rotator.key, rotator.stamp(topics.ROTATOR, tk, fields))


def _dome_stream(dome: _Publisher, t: np.ndarray, commanded: np.ndarray,
                 actual: np.ndarray) -> Iterator[SummitEvent]:
    def rate(position: np.ndarray) -> np.ndarray:
        return np.gradient(np.unwrap(position, period=360.0), t) if t.size > 1 else np.zeros_like(t)

    commanded_velocity, actual_velocity = rate(commanded), rate(actual)
    for k in range(t.size):
        tk = float(t[k])
        fields = {"positionActual": float(actual[k]), "positionCommanded": float(commanded[k]),
                  "velocityActual": float(actual_velocity[k]),
                  "velocityCommanded": float(commanded_velocity[k]), "timestamp": tk}
        yield SummitEvent(tk, topics.DOME_AZIMUTH, dome.key, dome.stamp(topics.DOME_AZIMUTH, tk, fields))


def _dimm_events(plan: NightPlan, config: EfdConfig, rng: np.random.Generator) -> Iterator[SummitEvent]:
    """The DIMM measures while the Sun is below the twilight limit, with a few per cent of noise."""
    dimm = _Publisher("DIMM", config.dimm_index, indexed=True)
    t = np.arange(plan.twilight_evening_tai, plan.twilight_morning_tai, config.dimm_interval)
    fwhm = plan.conditions.at(t)[0] * (1.0 + rng.normal(0.0, 0.03, t.size))
    fwhm_x = fwhm * (1.0 + rng.normal(0.0, 0.03, t.size))
    fwhm_y = 2.0 * fwhm - fwhm_x
    # r0 = 0.98 λ / FWHM at λ = 500 nm, in cm.
    r0 = 0.98 * 500e-9 / np.radians(fwhm / 3600.0) * 100.0
    secz = 1.0 + rng.exponential(0.15, t.size)
    stars = rng.integers(100, 9100, max(1, t.size // 30 + 1))
    for k in range(t.size):
        tk = float(t[k])
        fields = {"timestamp": tk, "expiresAt": tk - TAI_MINUS_UTC + 2 * config.dimm_interval,
                  "expiresIn": 2 * config.dimm_interval, "hrNum": int(stars[k // 30]), "secz": float(secz[k]),
                  "fwhm": float(fwhm[k]), "fwhmx": float(fwhm_x[k]), "fwhmy": float(fwhm_y[k]),
                  "r0": float(r0[k]), "nimg": 500}
        record = dimm.stamp(topics.DIMM_MEASUREMENT, tk, fields)
        yield SummitEvent(tk, topics.DIMM_MEASUREMENT, dimm.key, record)


def _weather_events(config: EfdConfig, start: float, end: float,
                    rng: np.random.Generator) -> Iterator[SummitEvent]:
    """Weather station: a night cooling slowly from ~11 °C, dry air, a northerly breeze, ~743 hPa."""
    ess = _Publisher("ESS", config.ess_index, indexed=True)
    step = config.weather_interval
    t = np.arange(start, end, step)
    hours = (t - start) / 3600.0
    temperature = (11.0 + rng.normal(0, 1.5) - 0.3 * hours
                   + conditions.ar1_series(t.size, step, 3600, 0.4, rng))
    humidity = np.clip(25.0 + rng.normal(0, 8) + conditions.ar1_series(t.size, step, 3600, 5.0, rng), 3, 99)
    pressure = 74300.0 + rng.normal(0, 80) + conditions.ar1_series(t.size, step, 7200, 30.0, rng)
    speed = np.clip(np.exp(np.log(4.0) + rng.normal(0, 0.4)
                           + conditions.ar1_series(t.size, step, 1800, 0.4, rng)), 0.0, 30.0)
    direction = (340.0 + conditions.ar1_series(t.size, step, 3600, 25.0, rng)) % 360.0
    # Channels not in use keep SAL's default value, 0 (NaN would not survive a strict JSON event log).
    unused = 0.0
    for k in range(t.size):
        tk = float(t[k])
        common = {"sensorName": "WeatherStation", "timestamp": tk, "location": "Weather tower"}
        gust = float(speed[k] * (1.3 + 0.2 * rng.random()))
        records = (
            (topics.ESS_TEMPERATURE, {**common, "numChannels": 1,
                                      "temperatureItem": [float(temperature[k])] + [unused] * 15}),
            (topics.ESS_AIR_FLOW, {**common, "direction": float(direction[k]), "directionStdDev": 15.0,
                                   "speed": float(speed[k]), "speedStdDev": float(0.15 * speed[k]),
                                   "maxSpeed": gust}),
            (topics.ESS_HUMIDITY, {**common, "relativeHumidityItem": float(humidity[k])}),
            (topics.ESS_PRESSURE, {**common, "numChannels": 1,
                                   "pressureItem": [float(pressure[k])] + [unused] * 7}),
        )
        for topic, fields in records:
            yield SummitEvent(tk, topic, ess.key, ess.stamp(topic, tk, fields))
