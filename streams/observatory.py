"""The simulated observatory: one night of LSSTCam exposures and their conditions.

``plan_night`` turns a :class:`NightConfig` into a :class:`NightPlan`: the
evening calibration sequence (biases, darks, dome flats), then science visits
chosen by a small greedy scheduler between the -12° twilights, each exposure
with its identifiers (as Rubin names them), pointing, timing and the
conditions (seeing, sky, clouds) the camera and sky simulators need.
``plan_reference_night`` plans a night's reference night: the same fields
and bands, days earlier, in good seeing, for the templates.

Conventions, learnt from Rubin's public code and documents:

- ``day_obs`` is the date in the UTC-12h time zone (SITCOMTN-032; obs_lsst
  rolls over 12 h after midnight).
- ``exposure_id = day_obs * 100000 + seq_num``; ``obs_id`` is
  ``MC_<controller>_<day_obs>_<seq_num:06d>`` where the controller is ``O``
  when the OCS commanded the camera and ``C`` when the camera control system
  did; since 2023-10 both share one counter, so the id formula is the same.
  Calibrations taken by OCS scripts (what the summit does each afternoon) are
  ``MC_O`` too; ``NightConfig.calib_controller`` chooses.
- the visit id of a visit is the exposure id of its first snap; the snaps of
  a visit (or the images of a calibration sequence) share a ``group_id``, the
  ISO-8601 UTC time of the first one.
- times are TAI unix seconds (ts_salobj's convention; UTC unix + 37 s) unless
  named ``utc``; angles in degrees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import astropy.units as u
import numpy as np
from astropy.coordinates import AltAz, EarthLocation, SkyCoord, get_body, solar_system_ephemeris
from astropy.time import Time
from astropy.utils import iers

from dmstream.payloads import conditions
from dmstream.streams.ocs import LSSTCAM_FILTERS, TAI_MINUS_UTC

# The summit simulator must run without network: use the IERS tables bundled
# with astropy and never fetch newer ones.
iers.conf.auto_download = False

SITE_LATITUDE = -30.2446
SITE_LONGITUDE = -70.7494
SITE_HEIGHT = 2663.0
SITE = EarthLocation.from_geodetic(SITE_LONGITUDE * u.deg, SITE_LATITUDE * u.deg, SITE_HEIGHT * u.m)

INSTRUMENT = "LSSTCam"
#: Two-letter code of LSSTCam in image names.
IMAGE_SOURCE = "MC"
#: Seconds between 00:00 UTC and the start of an observing day (UTC-12h).
DAY_OBS_OFFSET = 12 * 3600.0
MJD_UNIX_EPOCH = 40587.0

#: Dome-flat exposure times per band, s: the screen is faint in u and y.
FLAT_EXPTIME = {"u": 40.0, "g": 8.0, "r": 6.0, "i": 6.0, "z": 8.0, "y": 15.0}
#: Where the telescope waits during calibrations (pointing at the flat screen).
CALIB_ALT, CALIB_AZ = 45.0, 0.0
#: Reach of LSSTCam's rotator either side of zero, deg.
ROTATOR_LIMIT = 90.0

IMG_TYPES = ("BIAS", "DARK", "FLAT", "OBJECT")
SNAP_POLICIES = ("1x30", "2x15", "mixed")


@dataclass(frozen=True)
class NightConfig:
    """What to simulate: which night, how many visits, in which bands, with which policies.

    Attributes
    ----------
    seed : int
        Seed of every random choice; the same config gives the same plan.
    day_obs : int
        Observing day, YYYYMMDD: the night starting on the evening of that date.
    n_visits : int or None
        Number of science visits; None fills the night.
    bands : tuple of str
        Bands in the filter changer tonight (LSSTCam holds five of six).
    snaps : str
        ``1x30`` (one 30 s exposure per visit), ``2x15`` (two 15 s snaps) or
        ``mixed`` (two snaps with probability ``snap_fraction``).
    """

    seed: int = 0
    day_obs: int = 20261125
    n_visits: int | None = None
    bands: tuple[str, ...] = ("g", "r", "i", "z")
    snaps: str = "1x30"
    snap_fraction: float = 0.5
    visit_exptime: float = 30.0
    survey: str = "BLOCK-365"

    n_bias: int = 10
    n_dark: int = 5
    dark_exptime: float = 30.0
    n_flat: int = 5
    flat_bands: tuple[str, ...] | None = None
    flat_exptime: dict[str, float] = field(default_factory=lambda: dict(FLAT_EXPTIME))
    calib_controller: str = "O"
    calib_survey: str = "calibrations"
    #: Time between the end of calibrations and the evening twilight, s.
    calib_lead: float = 900.0

    twilight_alt: float = -12.0
    field_spacing: float = 3.0
    dec_range: tuple[float, float] = (-80.0, 5.0)
    #: Fields observed per blob; every field is visited twice in a blob, so
    #: the pair separation is about blob_fields * cadence (~25 min for 40).
    blob_fields: int = 40
    max_airmass: float = 1.5
    #: Fields this close to the zenith are avoided: the mount cannot follow them in azimuth, deg.
    zenith_avoidance: float = 4.0
    moon_avoidance: float = 30.0
    max_filter_changes: int = 6
    #: Largest rotator angle drawn for a visit, deg (LSSTCam's rotator reaches ±90°).
    max_rot_tel: float = 60.0

    readout_time: float = 2.0
    slew_rate: float = 2.0
    settle_time: float = 3.0
    filter_change_time: float = 120.0
    #: Gap between successive calibration sequences (script overhead), s.
    sequence_gap: float = 5.0
    announce_lead: float = 25.0

    seeing_median: float = 0.70
    #: Scatter (natural log) of a night's median seeing about ``seeing_median``, and within the night.
    seeing_night_sigma: float = 0.15
    seeing_sigma: float = 0.15
    cloud_episodes: float = 1.0
    conditions_step: float = 60.0

    def __post_init__(self) -> None:
        if self.snaps not in SNAP_POLICIES:
            raise ValueError(f"snaps must be one of {SNAP_POLICIES}, not {self.snaps!r}")
        unknown = set(self.bands) - set(LSSTCAM_FILTERS)
        if unknown or not self.bands:
            raise ValueError(f"bands must be a non-empty subset of {tuple(LSSTCAM_FILTERS)}")
        if self.n_visits is not None and self.n_visits < 0:
            raise ValueError("n_visits must be >= 0")
        if self.n_visits == 1:
            raise ValueError("every field is visited at least twice a night: ask for 2 or more visits")


class ReferenceNightError(ValueError):
    """A reference night cannot be planned as asked."""


@dataclass(frozen=True)
class ReferenceConfig:
    """The reference night of a night: its fields again, days earlier, in good seeing, for templates.

    Attributes
    ----------
    visits_per_field : int
        Visits of one ``NightConfig.visit_exptime`` exposure (1x30 s) of each
        field in each band the night observed it in.  At least 2: a coadd of
        one visit keeps that visit's cosmic rays and satellite trails.
    days_before : int
        How many days before the night the reference night is.
    seeing_median : float
        Median DIMM seeing (500 nm, zenith) of the reference night, arcsec.
    seeing_sigma : float
        Scatter (natural log) of the reference night's seeing, of its median
        about ``seeing_median`` and within the night: small, since templates
        are built from nights and visits chosen for their seeing.
    cloud_episodes : float
        Mean number of cloud episodes; 0 is a photometric night.
    """

    visits_per_field: int = 3
    days_before: int = 21
    seeing_median: float = 0.6
    seeing_sigma: float = 0.05
    cloud_episodes: float = 0.0

    def __post_init__(self) -> None:
        if self.visits_per_field < 2:
            raise ReferenceNightError(f"visits_per_field must be 2 or more (a template is a coadd), "
                                      f"not {self.visits_per_field}")
        if self.days_before < 1:
            raise ReferenceNightError(f"days_before must be 1 or more, not {self.days_before}")
        if not self.seeing_median > 0 or not self.seeing_sigma >= 0 or not self.cloud_episodes >= 0:
            raise ReferenceNightError("seeing_median must be > 0, seeing_sigma and cloud_episodes >= 0")


@dataclass(frozen=True)
class Exposure:
    """One image of the camera, with everything a camera or sky simulator needs.

    Times are TAI unix seconds (``tai_*``); UTC and MJD views are properties.
    Pointing and conditions are at mid-exposure.  Exposures that do not see
    the sky (BIAS, DARK, FLAT) have NaN seeing, sky brightness and
    transparency, and the pointing of the telescope parked at the flat screen.
    """

    exposure_id: int
    obs_id: str
    day_obs: int
    seq_num: int
    group_id: str
    visit_id: int
    img_type: str
    band: str
    physical_filter: str
    exptime: float
    darktime: float
    tai_start: float
    tai_end: float
    readout_time: float
    ra: float
    dec: float
    rot_sky_pos: float
    rot_tel_pos: float
    alt: float
    az: float
    airmass: float
    fwhm_500: float
    fwhm_eff: float
    fwhm_geom: float
    sky_mag: float
    transparency: float
    sun_alt: float
    moon_alt: float
    moon_separation: float
    moon_illumination: float
    nimages: int
    snap: int
    survey: str
    controller: str
    field_id: int

    @property
    def tai_readout_end(self) -> float:
        return self.tai_end + self.readout_time

    @property
    def utc_start(self) -> float:
        return self.tai_start - TAI_MINUS_UTC

    @property
    def utc_end(self) -> float:
        return self.tai_end - TAI_MINUS_UTC

    @property
    def mjd_start(self) -> float:
        """MJD (TAI) of the start of integration, as MJD-OBS in LSSTCam headers."""
        return MJD_UNIX_EPOCH + self.tai_start / 86400.0

    @property
    def mjd_end(self) -> float:
        return MJD_UNIX_EPOCH + self.tai_end / 86400.0

    @property
    def mjd_utc_start(self) -> float:
        return MJD_UNIX_EPOCH + self.utc_start / 86400.0

    @property
    def mjd_utc_end(self) -> float:
        return MJD_UNIX_EPOCH + self.utc_end / 86400.0

    @property
    def can_see_sky(self) -> bool:
        return self.img_type == "OBJECT"


@dataclass(frozen=True)
class Visit:
    """A science visit: one field, one band, ``nimages`` snaps sharing a group id."""

    visit_id: int
    group_id: str
    field_id: int
    field_visit: int
    ra: float
    dec: float
    rot_sky_pos: float
    band: str
    physical_filter: str
    nimages: int
    exptime: float
    survey: str
    announce_tai: float
    slew_start_tai: float
    slew_distance: float
    filter_change: bool
    exposures: tuple[Exposure, ...]

    @property
    def tai_start(self) -> float:
        return self.exposures[0].tai_start

    @property
    def tai_end(self) -> float:
        """End of the readout of the last snap."""
        return self.exposures[-1].tai_readout_end

    @property
    def duration(self) -> float:
        return self.tai_end - self.tai_start


@dataclass(frozen=True)
class Conditions:
    """Time series of the site conditions, sampled every ``NightConfig.conditions_step`` s."""

    tai: np.ndarray
    fwhm_500: np.ndarray
    transparency: np.ndarray

    def at(self, tai: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """DIMM seeing (arcsec) and transparency at the given TAI times."""
        return (np.interp(tai, self.tai, self.fwhm_500), np.interp(tai, self.tai, self.transparency))


@dataclass(frozen=True)
class NightPlan:
    """A simulated night: calibrations, science visits and the conditions behind them."""

    config: NightConfig
    day_obs: int
    twilight_evening_tai: float
    twilight_morning_tai: float
    calibrations: tuple[Exposure, ...]
    visits: tuple[Visit, ...]
    conditions: Conditions

    @property
    def exposures(self) -> tuple[Exposure, ...]:
        """Every exposure of the night in time (and seq_num) order."""
        return self.calibrations + tuple(e for v in self.visits for e in v.exposures)

    @property
    def band_changes(self) -> int:
        """Filter changes between science visits."""
        return sum(a.band != b.band for a, b in zip(self.visits, self.visits[1:], strict=False))

    def __iter__(self) -> Iterator[Exposure]:
        return iter(self.exposures)


def day_obs_of(tai: float) -> int:
    """Observing day (YYYYMMDD, UTC-12h) of a TAI unix time."""
    moment = datetime.fromtimestamp(tai - TAI_MINUS_UTC - DAY_OBS_OFFSET, UTC)
    return int(moment.strftime("%Y%m%d"))


def exposure_id_of(day_obs: int, seq_num: int) -> int:
    return day_obs * 100_000 + seq_num


def obs_id_of(day_obs: int, seq_num: int, controller: str = "O") -> str:
    return f"{IMAGE_SOURCE}_{controller}_{day_obs}_{seq_num:06d}"


def group_id_of(tai: float) -> str:
    """Group id of a sequence starting at ``tai``: its ISO-8601 UTC time to the millisecond."""
    return datetime.fromtimestamp(tai - TAI_MINUS_UTC, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


@contextlib.contextmanager
def offline_astropy() -> Iterator[None]:
    """Let astropy compute with its bundled IERS table and built-in Sun/Moon ephemeris.

    Dates past the bundled predictions get UT1-UTC of the last entry: errors
    of a fraction of a second in time, far below what a simulated night needs.
    """
    with iers.conf.set_temp("iers_degraded_accuracy", "ignore"), \
            iers.conf.set_temp("auto_max_age", None), solar_system_ephemeris.set("builtin"):
        yield


def _time(tai: np.ndarray | float) -> Time:
    return Time(np.asarray(tai) - TAI_MINUS_UTC, format="unix", scale="utc")


def altaz(ra: np.ndarray, dec: np.ndarray, tai: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Altitude and azimuth (deg, no refraction) of ICRS positions at TAI times, in one transform."""
    with offline_astropy():
        frame = AltAz(obstime=_time(tai), location=SITE)
        horizontal = SkyCoord(ra=np.asarray(ra) * u.deg, dec=np.asarray(dec) * u.deg).transform_to(frame)
    return horizontal.alt.deg, horizontal.az.deg


class _Ephemeris:
    """Sun, Moon and sidereal time on a one-minute grid over the night, interpolated."""

    def __init__(self, start_tai: float, end_tai: float) -> None:
        self.tai = np.arange(start_tai, end_tai + 60.0, 60.0)
        with offline_astropy():
            times = _time(self.tai)
            frame = AltAz(obstime=times, location=SITE)
            sun = get_body("sun", times, SITE)
            moon = get_body("moon", times, SITE)
            self.sun_alt = sun.transform_to(frame).alt.deg
            self.moon_alt = moon.transform_to(frame).alt.deg
            self.moon_ra = np.unwrap(moon.ra.rad)
            self.moon_dec = moon.dec.deg
            self.phase_angle = 180.0 - moon.separation(sun).deg
            self.lst = np.unwrap(times.sidereal_time("mean", SITE.lon).rad)

    def _at(self, values: np.ndarray, tai: np.ndarray | float) -> np.ndarray:
        return np.interp(tai, self.tai, values)

    def sun(self, tai: np.ndarray | float) -> np.ndarray:
        return self._at(self.sun_alt, tai)

    def moon(self, tai: np.ndarray | float) -> tuple[np.ndarray, ...]:
        """Altitude, RA, Dec and phase angle of the Moon, deg."""
        return (self._at(self.moon_alt, tai), np.degrees(self._at(self.moon_ra, tai)) % 360.0,
                self._at(self.moon_dec, tai), self._at(self.phase_angle, tai))

    def lst_deg(self, tai: np.ndarray | float) -> np.ndarray:
        return np.degrees(self._at(self.lst, tai)) % 360.0

    def crossing(self, level: float, rising: bool) -> float:
        """First time the Sun crosses ``level`` going down (or, with ``rising``, up after it set)."""
        below = self.sun_alt < level
        edges = np.flatnonzero(~below[:-1] & below[1:]) if not rising else \
            np.flatnonzero(below[:-1] & ~below[1:])
        if rising:
            evening = self.crossing(level, rising=False)
            edges = edges[self.tai[edges] > evening]
        if edges.size == 0:
            raise ValueError(f"the Sun does not cross {level}° on this day")
        i = edges[0]
        a0, a1 = self.sun_alt[i], self.sun_alt[i + 1]
        return float(self.tai[i] + (level - a0) / (a1 - a0) * (self.tai[i + 1] - self.tai[i]))


def field_grid(spacing: float, dec_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Field centres on rings of declination ``spacing`` apart, alternate rings offset by half a step."""
    ras, decs = [], []
    for ring, dec in enumerate(np.arange(dec_range[0] + spacing / 2, dec_range[1], spacing)):
        count = max(1, int(360.0 * np.cos(np.radians(dec)) / spacing))
        ras.append((np.arange(count) + 0.5 * (ring % 2)) * 360.0 / count)
        decs.append(np.full(count, dec))
    return np.concatenate(ras), np.concatenate(decs)


def _hour_angle_alt(lst: float | np.ndarray, ra: np.ndarray, dec: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    ha = (lst - ra + 180.0) % 360.0 - 180.0
    lat, d, h = np.radians(SITE_LATITUDE), np.radians(dec), np.radians(ha)
    alt = np.degrees(np.arcsin(np.sin(lat) * np.sin(d) + np.cos(lat) * np.cos(d) * np.cos(h)))
    return ha, alt


@dataclass
class _Shot:
    """One exposure before its conditions are known."""

    img_type: str
    band: str
    exptime: float
    tai_start: float
    nimages: int
    snap: int
    group_start: float
    controller: str
    survey: str
    ra: float = np.nan
    dec: float = np.nan
    rot_sky_pos: float = 0.0
    field_id: int = -1
    visit: int = -1


class _Scheduler:
    """Greedy blob scheduler: fields near the meridian, each visited twice about blob_fields visits apart."""

    def __init__(self, config: NightConfig, ephemeris: _Ephemeris, start: float, end: float,
                 rng: np.random.Generator, band: str) -> None:
        self.config = config
        self.eph = ephemeris
        self.end = end
        self.rng = rng
        self.field_ra, self.field_dec = field_grid(config.field_spacing, config.dec_range)
        self.observed = np.zeros(self.field_ra.size, dtype=bool)
        self.band = band
        self.band_counts = dict.fromkeys(config.bands, 0)
        self.changes = 0
        self.passes_since_change = 0
        self.shutter_closed = start
        self.camera_ready = start
        self.ra: float | None = None
        self.dec: float | None = None
        exposure = {"1x30": config.visit_exptime, "2x15": config.visit_exptime + config.readout_time,
                    "mixed": config.visit_exptime + config.snap_fraction * config.readout_time}
        self.cadence = exposure[config.snaps] + config.settle_time + config.field_spacing / config.slew_rate
        passes = (end - start) / (2 * config.blob_fields * self.cadence) * 2
        self.min_passes_between_changes = max(1, int(passes // (config.max_filter_changes + 1)))
        self.visits: list[dict] = []

    def run(self, n_visits: int | None) -> list[dict]:
        left = n_visits if n_visits is not None else 10**9
        while left > 0:
            # Leave room for a filter change and a long slew back to the first field.
            room = int((self.end - self.camera_ready - 2 * self.config.filter_change_time)
                       // (2 * 1.1 * self.cadence))
            n = min(self.config.blob_fields, room, left // 2)
            if n < 1:
                if left == 1 and self.visits and room >= 1:
                    # An odd request: the last field of the last blob gets a third visit.
                    last = self.visits[-1]
                    self._visit(last["field_id"], self.band, last["rot_tel"])
                break
            fields = self._choose_blob(n)
            if fields.size == 0:
                break
            self.observed[fields] = True
            order = self._greedy_order(fields)
            for _ in range(2):
                band = self._choose_band(self.camera_ready + n * self.cadence / 2)
                rot_tel = float(self.rng.uniform(-self.config.max_rot_tel, self.config.max_rot_tel))
                for f in order:
                    self._visit(int(f), band, rot_tel)
            left -= 2 * fields.size
        # A blob that overran the morning twilight loses the fields it could not finish.
        late = {v["field_id"] for v in self.visits if v["end"] > self.end}
        return [v for v in self.visits if v["field_id"] not in late]

    def _choose_blob(self, n: int) -> np.ndarray:
        t_mid = self.camera_ready + n * self.cadence
        _, alt = _hour_angle_alt(float(self.eph.lst_deg(t_mid)), self.field_ra, self.field_dec)
        x = conditions.airmass(alt)
        moon_alt, moon_ra, moon_dec, _ = self.eph.moon(t_mid)
        moon_sep = conditions.angular_separation(self.field_ra, self.field_dec, moon_ra, moon_dec)
        near_moon = (moon_sep < self.config.moon_avoidance) & (moon_alt > 0)
        usable = (x < self.config.max_airmass) & (alt > 0) & (alt < 90.0 - self.config.zenith_avoidance)
        candidates = np.flatnonzero(~self.observed & usable & ~near_moon)
        if candidates.size == 0:
            return candidates
        # A little noise breaks the ties of a regular grid differently every night.
        seed = candidates[np.argmin(x[candidates] + self.rng.uniform(0, 0.01, candidates.size))]
        distance = conditions.angular_separation(self.field_ra[seed], self.field_dec[seed],
                                                 self.field_ra[candidates], self.field_dec[candidates])
        return candidates[np.argsort(distance, kind="stable")[:n]]

    def _greedy_order(self, fields: np.ndarray) -> list[int]:
        ra, dec = self.field_ra[fields], self.field_dec[fields]
        if self.ra is None:
            current = int(np.argmax(dec))
        else:
            current = int(np.argmin(conditions.angular_separation(self.ra, self.dec, ra, dec)))
        order, left = [current], set(range(fields.size)) - {current}
        while left:
            rest = np.array(sorted(left))
            current = int(rest[np.argmin(conditions.angular_separation(ra[current], dec[current],
                                                                       ra[rest], dec[rest]))])
            order.append(current)
            left.discard(current)
        return [int(fields[i]) for i in order]

    def _choose_band(self, tai: float) -> str:
        moon_alt, _, _, phase = self.eph.moon(tai)
        bright = moon_alt > 0 and conditions.moon_illumination(phase) > 0.4
        allowed = [b for b in self.config.bands if not (bright and b == "u")] or list(self.config.bands)
        forced = self.band not in allowed
        may_change = (self.changes < self.config.max_filter_changes
                      and self.passes_since_change >= self.min_passes_between_changes)
        if forced or may_change:
            others = [b for b in allowed if b != self.band] or allowed
            band = min(others, key=lambda b: (self.band_counts[b], allowed.index(b)))
            if self.visits and band != self.band:
                self.changes += 1
                self.passes_since_change = 0
            self.band = band
        else:
            self.passes_since_change += 1
        return self.band

    def _visit(self, field_id: int, band: str, rot_tel: float) -> None:
        cfg = self.config
        ra, dec = float(self.field_ra[field_id]), float(self.field_dec[field_id])
        distance = (0.0 if self.ra is None
                    else float(conditions.angular_separation(self.ra, self.dec, ra, dec)))
        filter_change = bool(self.visits) and band != self.visits[-1]["band"]
        slew = cfg.settle_time + distance / cfg.slew_rate
        if filter_change:
            slew = max(slew, cfg.filter_change_time)
        # The telescope moves as soon as the shutter closes, during the readout.
        start = max(self.shutter_closed + slew, self.camera_ready)
        two = cfg.snaps == "2x15" or (cfg.snaps == "mixed" and self.rng.random() < cfg.snap_fraction)
        nimages = 2 if two else 1
        exptime = cfg.visit_exptime / nimages
        ha, _ = _hour_angle_alt(float(self.eph.lst_deg(start)), np.array([ra]), np.array([dec]))
        pa = float(conditions.parallactic_angle(ha, dec, SITE_LATITUDE)[0])
        rot_sky_pos = (pa - rot_tel - 90.0) % 360.0
        end_of_last = start + nimages * exptime + (nimages - 1) * cfg.readout_time
        self.visits.append({
            "field_id": field_id, "band": band, "ra": ra, "dec": dec, "rot_sky_pos": rot_sky_pos,
            "rot_tel": rot_tel, "start": start, "nimages": nimages, "exptime": exptime,
            "slew_start": self.shutter_closed, "slew_distance": distance, "filter_change": filter_change,
            "end": end_of_last + cfg.readout_time,
        })
        self.band_counts[band] += 1
        self.shutter_closed = end_of_last
        self.camera_ready = end_of_last + cfg.readout_time
        self.ra, self.dec = ra, dec


def _calibration_shots(config: NightConfig, start: float) -> list[_Shot]:
    flat_bands = config.flat_bands if config.flat_bands is not None else config.bands
    sequences: list[tuple[str, str, float, int]] = [
        ("BIAS", flat_bands[0], 0.0, config.n_bias),
        ("DARK", flat_bands[0], config.dark_exptime, config.n_dark),
    ]
    sequences += [("FLAT", b, config.flat_exptime[b], config.n_flat) for b in flat_bands]
    shots, t, band = [], start, flat_bands[0]
    for img_type, seq_band, exptime, count in sequences:
        if count == 0:
            continue
        if seq_band != band:
            t += config.filter_change_time
            band = seq_band
        group_start = t
        for i in range(count):
            shots.append(_Shot(img_type, band, exptime, t, count, i, group_start,
                               config.calib_controller, config.calib_survey))
            t += exptime + config.readout_time
        t += config.sequence_gap
    return shots


def _calibration_duration(config: NightConfig) -> float:
    shots = _calibration_shots(config, 0.0)
    return shots[-1].tai_start + shots[-1].exptime + config.readout_time if shots else 0.0


def _night_frame(config: NightConfig) -> tuple[_Ephemeris, float, float]:
    """The ephemeris of the observing day and its evening and morning twilights (TAI)."""
    date = datetime.strptime(str(config.day_obs), "%Y%m%d").replace(tzinfo=UTC)
    day_start_tai = (date + timedelta(seconds=DAY_OBS_OFFSET)).timestamp() + TAI_MINUS_UTC
    eph = _Ephemeris(day_start_tai, day_start_tai + 86400.0)
    evening = eph.crossing(config.twilight_alt, rising=False)
    return eph, evening, eph.crossing(config.twilight_alt, rising=True)


def plan_night(config: NightConfig | None = None) -> NightPlan:
    """Plan one night: calibrations before the evening twilight, then science visits until morning.

    Deterministic: the same ``config`` gives the same plan.
    """
    config = config or NightConfig()
    # Independent streams, so that the visit count does not change the weather.
    rng, seeing_rng, cloud_rng = (np.random.default_rng(s)
                                  for s in np.random.SeedSequence(config.seed).spawn(3))
    eph, evening, morning = _night_frame(config)
    calib_start = evening - config.calib_lead - _calibration_duration(config)
    shots = _calibration_shots(config, calib_start)
    first_band = shots[-1].band if shots else config.bands[0]
    planned = _Scheduler(config, eph, evening, morning, rng, first_band).run(config.n_visits)
    return _assemble(config, eph, evening, morning, calib_start, shots, planned, seeing_rng, cloud_rng)


def days_earlier(day_obs: int, days: int) -> int:
    """The observing day ``days`` before ``day_obs`` (both YYYYMMDD)."""
    return int((datetime.strptime(str(day_obs), "%Y%m%d") - timedelta(days=days)).strftime("%Y%m%d"))


def plan_reference_night(night: NightPlan, reference: ReferenceConfig | None = None) -> NightPlan:
    """Plan the reference night of ``night``: its fields in its bands again, earlier, in good seeing.

    The reference night is ``reference.days_before`` days earlier and keeps
    the night's camera setup and calibration sequence (templates are built
    from raws through ISR).  Every field and band the night observed gets
    ``reference.visits_per_field`` visits of one exposure, all bands of a
    field in one block centred as near the field's transit as the airmass
    limit, the zenith cap, the Moon and the other fields allow.  Visits reuse
    the rotations the night used on that field and band, so that templates
    cover the same detectors, turned by half a turn where the rotator cannot
    reach them (the focal plane is symmetric under 180°).  The weather is
    the reference night's own, drawn from (seed, day_obs) with the seeing and
    clouds of ``reference``.  Deterministic: the same night and
    ``reference`` give the same plan.

    Raises
    ------
    ReferenceNightError
        The night has no science visits, a field cannot be observed on the
        reference night, or the visits do not fit between its twilights.
    """
    reference = reference or ReferenceConfig()
    if not night.visits:
        raise ReferenceNightError(f"night {night.day_obs} has no science visits to build templates for")
    pairs = {(visit.field_id, visit.band) for visit in night.visits}
    config = replace(night.config, day_obs=days_earlier(night.day_obs, reference.days_before),
                     n_visits=len(pairs) * reference.visits_per_field, snaps="1x30",
                     seeing_median=reference.seeing_median, seeing_night_sigma=reference.seeing_sigma,
                     seeing_sigma=reference.seeing_sigma, cloud_episodes=reference.cloud_episodes)
    # Another night's weather: not the stream the night itself drew its seeing from.
    seeing_rng, cloud_rng = (np.random.default_rng(s)
                             for s in np.random.SeedSequence([config.seed, config.day_obs]).spawn(2))
    eph, evening, morning = _night_frame(config)
    calib_start = evening - config.calib_lead - _calibration_duration(config)
    shots = _calibration_shots(config, calib_start)
    first_band = shots[-1].band if shots else config.bands[0]
    planned = _reference_visits(night, config, reference.visits_per_field, eph, evening, morning, first_band)
    return _assemble(config, eph, evening, morning, calib_start, shots, planned, seeing_rng, cloud_rng)


def _reference_visits(night: NightPlan, config: NightConfig, per_field: int, eph: _Ephemeris, evening: float,
                      morning: float, band: str) -> list[dict]:
    """Schedule the reference visits: one block per field, blocks in the order of their best times."""
    position: dict[int, tuple[float, float]] = {}
    rotations: dict[tuple[int, str], list[float]] = {}
    for visit in night.visits:
        position[visit.field_id] = (visit.ra, visit.dec)
        rotations.setdefault((visit.field_id, visit.band), []).append(visit.rot_sky_pos)
    field_ids = sorted(position)
    ra = np.array([position[f][0] for f in field_ids])
    dec = np.array([position[f][1] for f in field_ids])
    bands = [[b for b in config.bands if (f, b) in rotations] for f in field_ids]
    per_visit = config.visit_exptime + config.readout_time + config.settle_time
    duration = np.array([len(b) * per_visit * per_field + (len(b) - 1) * config.filter_change_time
                         for b in bands])

    # Where each block's middle may fall: the field high enough, off the zenith and the Moon, in the night.
    grid = eph.tai[(eph.tai >= evening) & (eph.tai <= morning)][:, None]
    _, alt = _hour_angle_alt(eph.lst_deg(grid), ra, dec)
    moon_alt, moon_ra, moon_dec, _ = eph.moon(grid)
    moon_separation = conditions.angular_separation(ra, dec, moon_ra, moon_dec)
    near_moon = (moon_separation < config.moon_avoidance) & (moon_alt > 0)
    usable = ((alt > 0) & (conditions.airmass(alt) < config.max_airmass)
              & (alt < 90.0 - config.zenith_avoidance) & ~near_moon
              & (grid >= evening + duration / 2) & (grid <= morning - duration / 2))
    never = [f for f, ok in zip(field_ids, usable.any(axis=0), strict=True) if not ok]
    if never:
        raise ReferenceNightError(
            f"fields {never} are never above airmass {config.max_airmass}, off the zenith and away from the "
            f"Moon long enough on {config.day_obs}: choose another days_before")
    best = grid[np.argmax(np.where(usable, alt, -np.inf), axis=0), 0]

    visits: list[dict] = []
    shutter_closed = camera_ready = evening
    here: tuple[float, float] | None = None
    for k in sorted(range(len(field_ids)), key=lambda k: (best[k], field_ids[k])):
        block_start = best[k] - duration[k] / 2
        # The filter in the camera first, then the changer's order.
        for b in sorted(bands[k], key=lambda b: (b != band, config.bands.index(b))):
            angles = rotations[(field_ids[k], b)]
            for n in range(per_field):
                distance = 0.0 if here is None else float(conditions.angular_separation(*here, ra[k], dec[k]))
                filter_change = bool(visits) and b != visits[-1]["band"]
                slew = config.settle_time + distance / config.slew_rate
                if filter_change:
                    slew = max(slew, config.filter_change_time)
                start = max(shutter_closed + slew, camera_ready, block_start)
                rot_sky_pos, rot_tel = _reachable_rotation(angles[n % len(angles)], eph, start, ra[k], dec[k])
                end = start + config.visit_exptime
                visits.append({
                    "field_id": field_ids[k], "band": b, "ra": float(ra[k]), "dec": float(dec[k]),
                    "rot_sky_pos": rot_sky_pos, "rot_tel": rot_tel, "start": start, "nimages": 1,
                    "exptime": config.visit_exptime, "slew_start": shutter_closed, "slew_distance": distance,
                    "filter_change": filter_change, "end": end + config.readout_time,
                })
                shutter_closed, camera_ready, here, band = end, end + config.readout_time, (ra[k], dec[k]), b
    _check_reference_visits(visits, config, eph, morning, len(rotations), per_field)
    return visits


def _reachable_rotation(rot_sky_pos: float, eph: _Ephemeris, tai: float, ra: float, dec: float
                        ) -> tuple[float, float]:
    """A sky rotation within the rotator's reach at ``tai``, and the rotator angle for it (deg)."""
    ha, _ = _hour_angle_alt(float(eph.lst_deg(tai)), np.array([ra]), np.array([dec]))
    pa = float(conditions.parallactic_angle(ha, dec, SITE_LATITUDE)[0])
    rot_tel = (pa - rot_sky_pos - 90.0 + 180.0) % 360.0 - 180.0
    if abs(rot_tel) > ROTATOR_LIMIT:
        rot_sky_pos, rot_tel = (rot_sky_pos + 180.0) % 360.0, rot_tel % 360.0 - 180.0
    return rot_sky_pos, rot_tel


def _check_reference_visits(visits: list[dict], config: NightConfig, eph: _Ephemeris, morning: float,
                            pairs: int, per_field: int) -> None:
    overrun = visits[-1]["end"] - morning
    if overrun > 0:
        raise ReferenceNightError(
            f"{len(visits)} reference visits ({pairs} field-bands x {per_field}) do not fit in the night of "
            f"{config.day_obs}: they end {overrun / 60:.0f} min after the morning twilight; ask fewer visits "
            f"per field")
    start = np.array([v["start"] for v in visits])
    _, alt = _hour_angle_alt(eph.lst_deg(start), np.array([v["ra"] for v in visits]),
                             np.array([v["dec"] for v in visits]))
    late = np.flatnonzero(conditions.airmass(alt) > config.max_airmass)
    if late.size:
        worst = late[np.argmax(conditions.airmass(alt[late]))]
        raise ReferenceNightError(
            f"field {visits[worst]['field_id']} would be observed at airmass "
            f"{float(conditions.airmass(alt[worst])):.2f} (limit {config.max_airmass}) on {config.day_obs}: "
            f"too many fields compete for the same hours; ask fewer visits per field")


def _assemble(config: NightConfig, eph: _Ephemeris, evening: float, morning: float, calib_start: float,
              shots: list[_Shot], planned: list[dict], seeing_rng: np.random.Generator,
              cloud_rng: np.random.Generator) -> NightPlan:
    """A plan from its calibration shots and scheduled visits: the site's conditions, then every exposure."""
    for index, visit in enumerate(planned):
        for snap in range(visit["nimages"]):
            t0 = visit["start"] + snap * (visit["exptime"] + config.readout_time)
            shots.append(_Shot("OBJECT", visit["band"], visit["exptime"], t0, visit["nimages"], snap,
                               visit["start"], "O", config.survey, visit["ra"], visit["dec"],
                               visit["rot_sky_pos"], visit["field_id"], index))

    step = config.conditions_step
    series_tai = np.arange(calib_start - step, morning + 2 * step, step)
    seeing = conditions.dimm_seeing(series_tai.size, step, seeing_rng, median=config.seeing_median,
                                    night_sigma=config.seeing_night_sigma, sigma=config.seeing_sigma)
    transparency = conditions.cloud_transparency(series_tai, cloud_rng, config.cloud_episodes)
    site = Conditions(series_tai, seeing, transparency)

    exposures = _expose(config, shots, eph, site)
    visits = []
    by_visit: dict[int, list[Exposure]] = {}
    for shot, exposure in zip(shots, exposures, strict=True):
        if shot.visit >= 0:
            by_visit.setdefault(shot.visit, []).append(exposure)
    field_visits: dict[int, int] = {}
    for index, visit in enumerate(planned):
        snaps = tuple(by_visit[index])
        field_visits[visit["field_id"]] = field_visits.get(visit["field_id"], 0) + 1
        visits.append(Visit(
            visit_id=snaps[0].visit_id, group_id=snaps[0].group_id, field_id=visit["field_id"],
            field_visit=field_visits[visit["field_id"]], ra=visit["ra"], dec=visit["dec"],
            rot_sky_pos=visit["rot_sky_pos"], band=visit["band"],
            physical_filter=LSSTCAM_FILTERS[visit["band"]], nimages=visit["nimages"],
            exptime=visit["exptime"] * visit["nimages"], survey=config.survey,
            announce_tai=visit["start"] - config.announce_lead, slew_start_tai=visit["slew_start"],
            slew_distance=visit["slew_distance"], filter_change=visit["filter_change"], exposures=snaps,
        ))
    calibrations = tuple(e for e in exposures if not e.can_see_sky)
    return NightPlan(config, config.day_obs, evening, morning, calibrations, tuple(visits), site)


def _expose(config: NightConfig, shots: list[_Shot], eph: _Ephemeris, site: Conditions) -> list[Exposure]:
    """Give every shot its identifiers, pointing and conditions (vectorised over the night)."""
    if not shots:
        return []
    start = np.array([s.tai_start for s in shots])
    exptime = np.array([s.exptime for s in shots])
    mid = start + exptime / 2
    sky = np.array([s.img_type == "OBJECT" for s in shots])
    ra = np.array([s.ra for s in shots])
    dec = np.array([s.dec for s in shots])
    if (~sky).any():
        with offline_astropy():
            parked = SkyCoord(alt=np.full((~sky).sum(), CALIB_ALT) * u.deg,
                              az=np.full((~sky).sum(), CALIB_AZ) * u.deg,
                              frame=AltAz(obstime=_time(mid[~sky]), location=SITE)).icrs
        ra[~sky], dec[~sky] = parked.ra.deg, parked.dec.deg
    alt, az = altaz(ra, dec, mid)
    x = conditions.airmass(alt)
    bands = np.array([s.band for s in shots])
    fwhm_500, transparency = site.at(mid)
    fwhm_eff, fwhm_geom = conditions.delivered_fwhm(fwhm_500, x, bands)
    sun_alt = eph.sun(mid)
    moon_alt, moon_ra, moon_dec, phase = eph.moon(mid)
    moon_sep = conditions.angular_separation(ra, dec, moon_ra, moon_dec)
    sky_mag = conditions.sky_brightness(bands, alt, moon_alt, moon_sep, phase, sun_alt)
    ha = (eph.lst_deg(mid) - ra + 180.0) % 360.0 - 180.0
    pa = conditions.parallactic_angle(ha, dec, SITE_LATITUDE)
    rot_sky = np.array([s.rot_sky_pos for s in shots])
    rot_tel = (pa - rot_sky - 90.0 + 180.0) % 360.0 - 180.0
    rot_tel[~sky] = 0.0
    for column in (fwhm_500, fwhm_eff, fwhm_geom, sky_mag, transparency):
        column[~sky] = np.nan
    illumination = conditions.moon_illumination(phase)

    exposures = []
    group_ids: dict[float, tuple[str, int]] = {}
    for i, shot in enumerate(shots):
        seq_num = i + 1
        exposure_id = exposure_id_of(config.day_obs, seq_num)
        group_id, visit_id = group_ids.setdefault(shot.group_start,
                                                  (group_id_of(shot.group_start), exposure_id))
        exposures.append(Exposure(
            exposure_id=exposure_id, obs_id=obs_id_of(config.day_obs, seq_num, shot.controller),
            day_obs=config.day_obs, seq_num=seq_num, group_id=group_id,
            visit_id=visit_id if shot.img_type == "OBJECT" else exposure_id,
            img_type=shot.img_type, band=shot.band, physical_filter=LSSTCAM_FILTERS[shot.band],
            exptime=shot.exptime, darktime=shot.exptime, tai_start=shot.tai_start,
            tai_end=shot.tai_start + shot.exptime, readout_time=config.readout_time,
            ra=float(ra[i]), dec=float(dec[i]), rot_sky_pos=float(rot_sky[i]), rot_tel_pos=float(rot_tel[i]),
            alt=float(alt[i]), az=float(az[i]), airmass=float(x[i]), fwhm_500=float(fwhm_500[i]),
            fwhm_eff=float(fwhm_eff[i]), fwhm_geom=float(fwhm_geom[i]), sky_mag=float(sky_mag[i]),
            transparency=float(transparency[i]), sun_alt=float(sun_alt[i]), moon_alt=float(moon_alt[i]),
            moon_separation=float(moon_sep[i]), moon_illumination=float(illumination[i]),
            nimages=shot.nimages, snap=shot.snap, survey=shot.survey, controller=shot.controller,
            field_id=shot.field_id,
        ))
    return exposures
