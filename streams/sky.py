"""The simulated universe over a night's footprint, and its rendering into detector images.

Static populations (stars with their variables, galaxies) are procedural: the
sky is cut into tiles of about 0.5° by 0.5° and each tile's sources are drawn
from a generator seeded by (seed, population, tile), so any part of the sky is
the same whichever process asks for it and nothing but the configuration needs
pickling.  Populations that live in time (supernovae, flares, solar-system
objects) are drawn once over the footprint and the night by
:meth:`Sky.generate`; satellites are drawn per exposure from (seed, start time),
so every detector of an exposure sees the same trails.

Facts used (approximate, for a simulator): star counts at high Galactic
latitude rise by ~0.25 dex/mag, galaxy counts by ~0.35 dex/mag at r≈20-25;
stellar colours follow the SDSS stellar locus (Covey et al. 2007, AJ 134,
2398) with rough main-sequence absolute magnitudes; Gaia-like astrometric
errors grow from ~0.02 mas at G<15 to ~1 mas at G=21 (Gaia DR3, Lindegren et
al. 2021); supernova light curves use the Bazin et al. (2009, A&A 499, 653)
form; main-belt asteroids move ~0.25°/day, near-Earth objects up to tens of
degrees per day; cosmic rays are counted per cm² per second of dark time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
from astropy.wcs import WCS
from numpy.typing import ArrayLike, NDArray
from scipy.spatial import cKDTree

from dmstream.payloads import photometry
from dmstream.payloads.conditions import BANDS, DARK_SKY_MAG
from dmstream.payloads.render import (
    HALO_RADIUS,
    Psf,
    add_cosmic_rays,
    draw_galaxies,
    draw_point_sources,
    trail_samples,
)
from dmstream.payloads.skypixels import unit_vectors

Columns = dict[str, NDArray[Any]]

#: Height of a tile (a declination stripe), deg; tiles are about as wide on the sky.
TILE_DEG = 0.5
#: Code of each kind of source: the top digits of its truth id.
KIND_CODES = {"star": 1, "galaxy": 2, "supernova": 3, "flare": 4, "solar_system": 5, "satellite": 6,
              "cosmic_ray": 7}
_ID_KIND = 10**15
_ID_TILE = 10**6
#: Epoch of the reference catalogue (Gaia DR3), Julian years.
REF_EPOCH = 2016.0
#: Origin of the phases of periodic variables, MJD.
VARIABLE_EPOCH_MJD = 60000.0
_MJD_J2000 = 51544.5

#: Stellar locus, F0 to M5: g-r, then u-g, r-i, i-z, z-y and main-sequence M_r
#: (after Covey et al. 2007); a star's colours interpolate between two rows.
_LOCUS = np.array([
    # g-r   u-g   r-i   i-z   z-y   M_r
    [0.20, 0.95, 0.05, 0.00, 0.00, 2.8],
    [0.45, 1.20, 0.15, 0.05, 0.02, 4.5],
    [0.65, 1.65, 0.23, 0.10, 0.04, 5.7],
    [1.10, 2.30, 0.40, 0.20, 0.08, 7.5],
    [1.35, 2.50, 0.75, 0.38, 0.17, 8.8],
    [1.45, 2.60, 1.30, 0.70, 0.32, 11.0],
    [1.50, 2.60, 1.80, 1.00, 0.45, 13.0],
])
#: How often each interval of the locus is drawn (turn-off stars and M dwarfs dominate faint counts).
_LOCUS_WEIGHTS = np.array([0.25, 0.2, 0.12, 0.1, 0.18, 0.15])
#: Galaxy colours relative to r (blue star-forming, red passive).
_GALAXY_COLOURS = {"blue": {"u": 0.9, "g": 0.4, "r": 0.0, "i": -0.2, "z": -0.3, "y": -0.35},
                   "red": {"u": 2.4, "g": 0.9, "r": 0.0, "i": -0.4, "z": -0.7, "y": -0.85}}
#: Supernova colours near peak relative to r, and how much redder per day after peak.
_SUPERNOVA_COLOURS = {"u": 1.0, "g": 0.3, "r": 0.0, "i": 0.1, "z": 0.3, "y": 0.5}
_SUPERNOVA_REDDENING = {"u": 0.05, "g": 0.03, "r": 0.0, "i": -0.005, "z": -0.005, "y": -0.005}
#: Flare (hot, ~10⁴ K continuum) colours relative to r.
_FLARE_COLOURS = {"u": -0.15, "g": -0.25, "r": 0.0, "i": 0.2, "z": 0.35, "y": 0.45}
#: Asteroid colours relative to r: C-type and S-type (reflected sunlight).
_ASTEROID_COLOURS = {"C": {"u": 1.85, "g": 0.45, "r": 0.0, "i": -0.1, "z": -0.12, "y": -0.1},
                     "S": {"u": 2.55, "g": 0.65, "r": 0.0, "i": -0.2, "z": -0.15, "y": -0.15}}
#: Amplitude of periodic variables in each band relative to r (pulsators are bluer at maximum).
_VARIABLE_BAND_SCALE = {"u": 1.4, "g": 1.25, "r": 1.0, "i": 0.8, "z": 0.7, "y": 0.65}


@dataclass(frozen=True)
class SkyConfig:
    """What the simulated sky holds.

    Attributes
    ----------
    seed : int
        Same seed, same sky.
    field_radius : float
        Radius of a field of view around each field centre, deg.
    star_density, galaxy_density : float
        Stars (galaxies) per deg² brighter than r = 24.
    star_mags, galaxy_mags : tuple of float
        Range of r magnitudes drawn.
    star_count_slope, galaxy_count_slope : float
        d log10 N / dm of the number counts.
    variable_fraction : float
        Fraction of stars that are periodic variables.
    supernova_density : float
        Supernovae per deg² with a peak between 40 days before and 15 days after the night.
    host_fraction : float
        Fraction of supernovae placed in a galaxy.
    flare_density : float
        Stellar flares per deg² during the night (on M dwarfs).
    sso_density : float
        Solar-system objects per deg² on the ecliptic (a tenth of it far from it).
    satellite_rate : float
        Mean number of satellite trails across the focal plane per exposure.
    cosmic_ray_rate : float
        Cosmic rays per cm² of sensor per second of dark time; 0 for none.
    refcat_g_limit : float
        Faintest Gaia G of the reference catalogue.
    psf_profile : str
        ``"kolmogorov"`` or ``"moffat"``.
    psf_ellipticity : float
        Scatter of the PSF ellipticity components between exposures.
    psf_variation : float
        Scale of the PSF's change across a detector: fractional FWHM change to
        the corners, and ellipticity change to the edges.
    sky_gradient : float
        Largest fractional change of the sky level across a detector.
    """

    seed: int = 0
    field_radius: float = 1.9
    star_density: float = 2000.0
    star_mags: tuple[float, float] = (13.0, 25.0)
    star_count_slope: float = 0.25
    galaxy_density: float = 1000.0
    galaxy_mags: tuple[float, float] = (16.0, 25.0)
    galaxy_count_slope: float = 0.35
    variable_fraction: float = 0.02
    supernova_density: float = 20.0
    host_fraction: float = 0.8
    flare_density: float = 2.0
    sso_density: float = 30.0
    satellite_rate: float = 0.1
    cosmic_ray_rate: float = 0.03
    refcat_g_limit: float = 21.0
    psf_profile: str = "kolmogorov"
    psf_ellipticity: float = 0.02
    psf_variation: float = 0.04
    sky_gradient: float = 0.02


class ExposureLike(Protocol):
    """What :func:`render_exposure` reads from an exposure (``streams.observatory.Exposure`` has it)."""

    band: str
    exptime: float
    darktime: float
    airmass: float
    transparency: float
    sky_mag: float
    fwhm_geom: float
    ra: float
    dec: float

    @property
    def mjd_start(self) -> float: ...


@dataclass(frozen=True)
class Observation:
    """A stand-alone exposure description for :func:`render_exposure`.

    Attributes
    ----------
    band : str
    mjd_start : float
        Start of integration, MJD (TAI).
    exptime, darktime : float
        Open-shutter time and dark time, s (``darktime`` defaults to ``exptime``).
    airmass, transparency : float
    sky_mag : float
        Sky brightness, AB mag/arcsec²; NaN for the dark zenith sky of the band.
    fwhm_geom : float
        PSF FWHM, arcsec.
    ra, dec : float
        Boresight, deg; NaN for the detector centre.
    """

    band: str
    mjd_start: float
    exptime: float = 30.0
    darktime: float = float("nan")
    airmass: float = 1.0
    transparency: float = 1.0
    sky_mag: float = float("nan")
    fwhm_geom: float = 0.8
    ra: float = float("nan")
    dec: float = float("nan")


# --- spherical geometry -----------------------------------------------------------------------------------

def angular_distance(ra1: ArrayLike, dec1: ArrayLike, ra2: ArrayLike, dec2: ArrayLike) -> NDArray[np.float64]:
    """Great-circle distance, deg (haversine, accurate at small separations)."""
    ra1, dec1, ra2, dec2 = (np.radians(np.asarray(v, dtype=float)) for v in (ra1, dec1, ra2, dec2))
    h = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))


def offset_position(ra: ArrayLike, dec: ArrayLike, position_angle: ArrayLike, distance: ArrayLike
                    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Point ``distance`` deg from (ra, dec) on the great circle leaving at ``position_angle`` ° E of N."""
    ra0, dec0, pa, s = (np.radians(np.asarray(v, dtype=float)) for v in (ra, dec, position_angle, distance))
    dec1 = np.arcsin(np.clip(np.sin(dec0) * np.cos(s) + np.cos(dec0) * np.sin(s) * np.cos(pa), -1.0, 1.0))
    ra1 = ra0 + np.arctan2(np.sin(pa) * np.sin(s) * np.cos(dec0), np.cos(s) - np.sin(dec0) * np.sin(dec1))
    return np.degrees(ra1) % 360.0, np.degrees(dec1)


def _stripe_count() -> int:
    return round(180.0 / TILE_DEG)


def _tiles_per_stripe(stripe: int) -> int:
    dec_low = -90.0 + stripe * TILE_DEG
    # Width set by the edge nearer the equator, so no tile is wider than it is tall.
    dec_high = dec_low + TILE_DEG
    nearest_equator = 0.0 if dec_low < 0.0 < dec_high else min(abs(dec_low), abs(dec_high))
    widest = np.cos(np.radians(nearest_equator))
    return max(1, int(np.ceil(360.0 * widest / TILE_DEG)))


def tiles_in_circle(ra: float, dec: float, radius: float) -> list[tuple[int, int]]:
    """Tiles (stripe, index) that may hold points within ``radius`` deg of (ra, dec)."""
    stripes = range(max(0, int(np.floor((dec - radius + 90.0) / TILE_DEG))),
                    min(_stripe_count(), int(np.floor((dec + radius + 90.0) / TILE_DEG)) + 1))
    tiles = []
    for stripe in stripes:
        count = _tiles_per_stripe(stripe)
        width = 360.0 / count
        extreme = max(abs(dec - radius), abs(dec + radius))
        if extreme >= 89.0 or count == 1:
            tiles.extend((stripe, i) for i in range(count))
            continue
        half_span = radius / np.cos(np.radians(extreme))
        if half_span >= 180.0:
            tiles.extend((stripe, i) for i in range(count))
            continue
        first = int(np.floor((ra - half_span) / width))
        last = int(np.floor((ra + half_span) / width))
        tiles.extend((stripe, i % count) for i in range(first, last + 1))
    return sorted(set(tiles))


def _tile_bounds(stripe: int, index: int) -> tuple[float, float, float, float]:
    width = 360.0 / _tiles_per_stripe(stripe)
    dec_low = -90.0 + stripe * TILE_DEG
    return index * width, (index + 1) * width, dec_low, dec_low + TILE_DEG


def _tile_area(stripe: int, index: int) -> float:
    ra0, ra1, dec0, dec1 = _tile_bounds(stripe, index)
    return (ra1 - ra0) * np.degrees(np.sin(np.radians(dec1)) - np.sin(np.radians(dec0)))


def _uniform_in_tile(rng: np.random.Generator, stripe: int, index: int, n: int
                     ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    ra0, ra1, dec0, dec1 = _tile_bounds(stripe, index)
    sin_dec = rng.uniform(np.sin(np.radians(dec0)), np.sin(np.radians(dec1)), n)
    return rng.uniform(ra0, ra1, n), np.degrees(np.arcsin(sin_dec))


def _power_law_mags(rng: np.random.Generator, n: int, mags: tuple[float, float], slope: float
                    ) -> NDArray[np.float64]:
    """Magnitudes with dN/dm ∝ 10^(slope m) between ``mags``."""
    low, high = (10.0 ** (slope * m) for m in mags)
    return np.log10(rng.uniform(low, high, n)) / slope


def _count_above(density_at_24: float, mags: tuple[float, float], slope: float) -> float:
    """Sources per deg² over ``mags`` given the number brighter than 24."""
    return density_at_24 * (10 ** (slope * mags[1]) - 10 ** (slope * mags[0])) / \
        (10 ** (slope * 24.0) - 10 ** (slope * mags[0]))


def _ids(kind: str, stripe: int, index: int, n: int) -> NDArray[np.int64]:
    tile_key = stripe * 10_000 + index
    return KIND_CODES[kind] * _ID_KIND + tile_key * _ID_TILE + np.arange(n, dtype=np.int64)


def _select(columns: Columns, mask: NDArray[np.bool_]) -> Columns:
    return {name: values[mask] for name, values in columns.items()}


def _concat(parts: Sequence[Columns], template: Columns) -> Columns:
    if not parts:
        return {name: values[:0] for name, values in template.items()}
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


# --- light curves -------------------------------------------------------------------------------------------

def bazin_flux(t: ArrayLike, t_peak: ArrayLike, tau_rise: ArrayLike, tau_fall: ArrayLike
               ) -> NDArray[np.float64]:
    """Supernova-like light curve (Bazin et al. 2009), normalised to 1 at its peak.

    f(t) ∝ exp(-(t - t0)/τ_fall) / (1 + exp(-(t - t0)/τ_rise)), with t0 set so
    that the maximum falls at ``t_peak``.  Times in days; needs τ_fall > τ_rise.
    """
    t, t_peak, tau_rise, tau_fall = np.broadcast_arrays(*(np.asarray(v, dtype=float)
                                                          for v in (t, t_peak, tau_rise, tau_fall)))
    t0 = t_peak - tau_rise * np.log(tau_fall / tau_rise - 1.0)

    def shape(time: NDArray[np.float64]) -> NDArray[np.float64]:
        x = (time - t0)
        # Written to stay finite far before the rise, where both exponentials overflow.
        return np.exp(-x / tau_fall - np.logaddexp(0.0, -x / tau_rise))

    return shape(t) / shape(t_peak)


def flare_flux(t: ArrayLike, t_peak: ArrayLike, rise: ArrayLike, decay: ArrayLike) -> NDArray[np.float64]:
    """Stellar flare: linear rise over ``rise`` days to 1 at ``t_peak``, then e-folds every ``decay`` days."""
    t, t_peak, rise, decay = np.broadcast_arrays(*(np.asarray(v, dtype=float)
                                                   for v in (t, t_peak, rise, decay)))
    before = np.clip(1.0 + (t - t_peak) / rise, 0.0, 1.0)
    after = np.exp(-np.maximum(t - t_peak, 0.0) / decay)
    return np.where(t < t_peak, before, after)


def variable_offset(t: ArrayLike, period: ArrayLike, phase: ArrayLike, kind: ArrayLike
                    ) -> NDArray[np.float64]:
    """Magnitude offset of a periodic variable per unit peak-to-peak amplitude, in [-0.5, 0.5].

    ``kind`` 1 is a sinusoid; 2 is RR Lyrae-like: a rise over 15 % of the
    period to maximum light (-0.5), then a slow linear decline.  0 is constant.
    """
    t, period, phase, kind = np.broadcast_arrays(*(np.asarray(v, dtype=float)
                                                   for v in (t, period, phase, kind)))
    with np.errstate(divide="ignore", invalid="ignore"):
        phi = np.mod((t - VARIABLE_EPOCH_MJD) / np.where(period > 0, period, 1.0) + phase, 1.0)
    sinusoid = 0.5 * np.sin(2 * np.pi * phi)
    rise = 0.15
    sawtooth = np.where(phi < rise, 0.5 - phi / rise, -0.5 + (phi - rise) / (1 - rise))
    return np.select([kind == 1, kind == 2], [sinusoid, sawtooth], 0.0)


def julian_year(mjd: ArrayLike) -> NDArray[np.float64]:
    """Julian epoch (e.g. 2016.0) of an MJD."""
    return 2000.0 + (np.asarray(mjd, dtype=float) - _MJD_J2000) / 365.25


def gaia_g_from_lsst(g: ArrayLike, r: ArrayLike, i: ArrayLike) -> NDArray[np.float64]:
    """Approximate Gaia G from LSST g, r, i (a smooth curve near published G-r vs g-i relations, ±0.1 mag)."""
    gi = np.asarray(g, dtype=float) - np.asarray(i, dtype=float)
    return np.asarray(r, dtype=float) - 0.10 - 0.22 * gi - 0.02 * gi**2


def gaia_position_error(g_mag: ArrayLike) -> NDArray[np.float64]:
    """Gaia DR3-like uncertainty of a position component at the reference epoch, mas."""
    return 0.015 + 0.8 * 10.0 ** (0.4 * (np.asarray(g_mag, dtype=float) - 21.0))


# --- the sky ------------------------------------------------------------------------------------------------

_STAR_TEMPLATE: Columns = {
    "id": np.empty(0, np.int64), "ra": np.empty(0), "dec": np.empty(0), "pmra": np.empty(0),
    "pmdec": np.empty(0), "parallax": np.empty(0), **{b: np.empty(0, np.float32) for b in BANDS},
    "variable_kind": np.empty(0, np.int8), "period": np.empty(0), "amplitude": np.empty(0, np.float32),
    "phase": np.empty(0),
}
_GALAXY_TEMPLATE: Columns = {
    "id": np.empty(0, np.int64), "ra": np.empty(0), "dec": np.empty(0),
    **{b: np.empty(0, np.float32) for b in BANDS}, "half_light_radius": np.empty(0, np.float32),
    "sersic_n": np.empty(0, np.float32), "axis_ratio": np.empty(0, np.float32),
    "position_angle": np.empty(0, np.float32),
}


def _generate_stars(config: SkyConfig, stripe: int, index: int) -> Columns:
    rng = np.random.default_rng([config.seed, KIND_CODES["star"], stripe, index])
    density = _count_above(config.star_density, config.star_mags, config.star_count_slope)
    n = rng.poisson(density * _tile_area(stripe, index))
    ra, dec = _uniform_in_tile(rng, stripe, index, n)
    r = _power_law_mags(rng, n, config.star_mags, config.star_count_slope)
    segment = rng.choice(_LOCUS_WEIGHTS.size, n, p=_LOCUS_WEIGHTS / _LOCUS_WEIGHTS.sum())
    t = rng.uniform(0.0, 1.0, n)[:, None]
    locus = (1 - t) * _LOCUS[segment] + t * _LOCUS[segment + 1]
    g_r, u_g, r_i, i_z, z_y, abs_r = (locus[:, k] + (0.03 * rng.standard_normal(n) if k < 5 else 0)
                                      for k in range(6))
    g = r + g_r
    i = r - r_i
    z = i - i_z
    mags = {"u": g + u_g, "g": g, "r": r, "i": i, "z": z, "y": z - z_y}
    distance_pc = 10.0 ** ((r - abs_r + 5.0 + 0.3 * rng.standard_normal(n)) / 5.0)
    # Tangential velocities of tens of km/s; 4.74 km/s is 1 AU/yr.
    velocity = rng.normal(0.0, 45.0, (2, n)) + np.array([[-10.0], [-20.0]])
    pm = velocity / (4.74 * distance_pc / 1000.0)
    variable = rng.uniform(0.0, 1.0, n) < config.variable_fraction
    rr_lyrae = variable & (rng.uniform(0.0, 1.0, n) < 0.3)
    kind = np.where(rr_lyrae, 2, np.where(variable, 1, 0)).astype(np.int8)
    period = np.where(rr_lyrae, rng.uniform(0.45, 0.8, n),
                      np.where(variable, np.exp(rng.uniform(np.log(0.1), np.log(50.0), n)), 0.0))
    amplitude = np.where(rr_lyrae, rng.uniform(0.5, 1.0, n),
                         np.where(variable, np.exp(rng.uniform(np.log(0.05), np.log(0.5), n)), 0.0))
    return {
        "id": _ids("star", stripe, index, n), "ra": ra, "dec": dec, "pmra": pm[0], "pmdec": pm[1],
        "parallax": 1000.0 / distance_pc, **{b: mags[b].astype(np.float32) for b in BANDS},
        "variable_kind": kind, "period": period, "amplitude": amplitude.astype(np.float32),
        "phase": np.where(variable, rng.uniform(0.0, 1.0, n), 0.0),
    }


def _generate_galaxies(config: SkyConfig, stripe: int, index: int) -> Columns:
    rng = np.random.default_rng([config.seed, KIND_CODES["galaxy"], stripe, index])
    density = _count_above(config.galaxy_density, config.galaxy_mags, config.galaxy_count_slope)
    n = rng.poisson(density * _tile_area(stripe, index))
    ra, dec = _uniform_in_tile(rng, stripe, index, n)
    r = _power_law_mags(rng, n, config.galaxy_mags, config.galaxy_count_slope)
    red = rng.uniform(0.0, 1.0, n) < 0.3
    mags = {}
    for band in BANDS:
        colour = np.where(red, _GALAXY_COLOURS["red"][band], _GALAXY_COLOURS["blue"][band])
        mags[band] = (r + colour + 0.1 * rng.standard_normal(n)).astype(np.float32)
    mags["r"] = r.astype(np.float32)
    # Fainter galaxies are smaller: ~1″ at r = 20, ~0.4″ at r = 24, with 0.25 dex of scatter.
    hlr = np.clip(10.0 ** (-0.1 * (r - 20.0) + 0.25 * rng.standard_normal(n)), 0.1, 4.0)
    sersic = np.where(red, rng.choice([2.5, 4.0], n), rng.choice([1.0, 1.0, 1.5], n))
    ellipticity = np.clip(np.abs(rng.normal(0.0, 0.3, n)), 0.0, 0.8)
    return {
        "id": _ids("galaxy", stripe, index, n), "ra": ra, "dec": dec, **mags,
        "half_light_radius": hlr.astype(np.float32), "sersic_n": sersic.astype(np.float32),
        "axis_ratio": np.sqrt((1 - ellipticity) / (1 + ellipticity)).astype(np.float32),
        "position_angle": rng.uniform(0.0, 180.0, n).astype(np.float32),
    }


_GENERATORS = {"star": (_generate_stars, _STAR_TEMPLATE), "galaxy": (_generate_galaxies, _GALAXY_TEMPLATE)}
_TILE_CACHE_SIZE = 512


@dataclass
class Sky:
    """The simulated universe over a footprint and a night.

    Build it with :meth:`generate`.  Stars and galaxies are available anywhere
    (:meth:`stars_in`, :meth:`galaxies_in`); supernovae, flares and
    solar-system objects were drawn over the footprint and the night.
    """

    config: SkyConfig
    fields: NDArray[np.float64]
    mjd_range: tuple[float, float]
    supernovae: Columns
    flares: Columns
    movers: Columns
    _tiles: OrderedDict[tuple[str, int, int], Columns] = field(default_factory=OrderedDict, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        # The tile cache is cheap to rebuild and would make every pickle as large as the sky seen so far.
        state = self.__dict__.copy()
        state["_tiles"] = OrderedDict()
        return state

    @classmethod
    def generate(cls, fields: Sequence[tuple[float, float]], config: SkyConfig | None = None, *,
                 mjd_range: tuple[float, float]) -> Sky:
        """Draw the sky over the union of fields and the transients of a night.

        Parameters
        ----------
        fields : sequence of (ra, dec)
            Field centres, deg; repeats are harmless.
        config : SkyConfig
        mjd_range : tuple of float
            First and last MJD of the night: supernova peaks are spread from 40
            days before to 15 days after it, flares and movers within it.
        """
        config = config or SkyConfig()
        centres = np.unique(np.round(np.asarray(fields, dtype=float).reshape(-1, 2), 6), axis=0)
        start, end = float(mjd_range[0]), float(mjd_range[1])
        if not end >= start:
            raise ValueError(f"mjd_range must be (start, end) with end >= start, got {mjd_range}")
        sky = cls(config, centres, (start, end), {}, {}, {})
        rng = np.random.default_rng([config.seed, 99])
        tiles = sky.footprint_tiles()
        sky.supernovae = sky._draw_supernovae(tiles, rng)
        sky.flares = sky._draw_flares(tiles, rng)
        sky.movers = sky._draw_movers(tiles, rng)
        return sky

    # -- footprint ---------------------------------------------------------------------------------

    def footprint_tiles(self) -> list[tuple[int, int]]:
        """Tiles that touch the footprint."""
        tiles: set[tuple[int, int]] = set()
        for ra, dec in self.fields:
            tiles.update(tiles_in_circle(ra, dec, self.config.field_radius))
        return sorted(tiles)

    def in_footprint(self, ra: ArrayLike, dec: ArrayLike) -> NDArray[np.bool_]:
        """Whether each position lies within ``field_radius`` of a field centre."""
        ra, dec = np.asarray(ra, dtype=float), np.asarray(dec, dtype=float)
        if ra.size == 0 or self.fields.size == 0:
            return np.zeros(ra.shape, dtype=bool)
        tree = cKDTree(unit_vectors(self.fields[:, 0], self.fields[:, 1]))
        chord, _ = tree.query(unit_vectors(ra, dec).reshape(-1, 3))
        limit = 2 * np.sin(np.radians(self.config.field_radius) / 2)
        return (chord <= limit).reshape(ra.shape)

    # -- static populations ------------------------------------------------------------------------

    def _tile(self, kind: str, stripe: int, index: int) -> Columns:
        key = (kind, stripe, index)
        if key in self._tiles:
            self._tiles.move_to_end(key)
            return self._tiles[key]
        columns = _GENERATORS[kind][0](self.config, stripe, index)
        self._tiles[key] = columns
        if len(self._tiles) > _TILE_CACHE_SIZE:
            self._tiles.popitem(last=False)
        return columns

    def _population_in(self, kind: str, ra: float, dec: float, radius: float) -> Columns:
        parts = []
        for stripe, index in tiles_in_circle(ra, dec, radius):
            tile = self._tile(kind, stripe, index)
            parts.append(_select(tile, angular_distance(ra, dec, tile["ra"], tile["dec"]) <= radius))
        return _concat(parts, _GENERATORS[kind][1])

    def _population_in_footprint(self, kind: str) -> Columns:
        parts = []
        for stripe, index in self.footprint_tiles():
            tile = self._tile(kind, stripe, index)
            parts.append(_select(tile, self.in_footprint(tile["ra"], tile["dec"])))
        return _concat(parts, _GENERATORS[kind][1])

    def stars_in(self, ra: float, dec: float, radius: float) -> Columns:
        """True stars within ``radius`` deg of (ra, dec): positions at ``REF_EPOCH``, mags at mean light."""
        return self._population_in("star", ra, dec, radius)

    def galaxies_in(self, ra: float, dec: float, radius: float) -> Columns:
        """Galaxies within ``radius`` deg of (ra, dec)."""
        return self._population_in("galaxy", ra, dec, radius)

    # -- populations of the night -------------------------------------------------------------------

    def _draw_supernovae(self, tiles: list[tuple[int, int]], rng: np.random.Generator) -> Columns:
        config, (start, end) = self.config, self.mjd_range
        parts = []
        for stripe, index in tiles:
            n = rng.poisson(config.supernova_density * _tile_area(stripe, index))
            if n == 0:
                continue
            ra, dec = _uniform_in_tile(rng, stripe, index, n)
            host = np.full(n, -1, dtype=np.int64)
            galaxies = self._tile("galaxy", stripe, index)
            hosted = (rng.uniform(0.0, 1.0, n) < config.host_fraction) & (galaxies["id"].size > 0)
            if hosted.any():
                chosen = rng.integers(0, max(galaxies["id"].size, 1), n)[hosted]
                host[hosted] = galaxies["id"][chosen]
                # Offset from the nucleus as in an exponential disc (radius/scale ~ Gamma(2)), on the
                # galaxy's ellipse; 1.678 scale lengths make one half-light radius.
                radius = galaxies["half_light_radius"][chosen] / 1.678 * rng.gamma(2.0, 1.0, chosen.size)
                angle = rng.uniform(0.0, 2 * np.pi, chosen.size)
                major, minor = radius * np.cos(angle), radius * np.sin(angle) * galaxies["axis_ratio"][chosen]
                pa = np.radians(galaxies["position_angle"][chosen])
                east = major * np.sin(pa) + minor * np.cos(pa)
                north = major * np.cos(pa) - minor * np.sin(pa)
                offset_pa = np.degrees(np.arctan2(east, north))
                ra[hosted], dec[hosted] = offset_position(galaxies["ra"][chosen], galaxies["dec"][chosen],
                                                          offset_pa, np.hypot(east, north) / 3600.0)
            parts.append({
                "id": _ids("supernova", stripe, index, n), "ra": ra, "dec": dec, "host_id": host,
                "peak_mjd": rng.uniform(start - 40.0, end + 15.0, n),
                "peak_r": _power_law_mags(rng, n, (18.0, 24.5), 0.4),
                "tau_rise": rng.uniform(1.5, 4.0, n), "tau_fall": rng.uniform(15.0, 40.0, n),
            })
        keep = [_select(p, self.in_footprint(p["ra"], p["dec"])) for p in parts]
        template = {"id": np.empty(0, np.int64), "ra": np.empty(0), "dec": np.empty(0),
                    "host_id": np.empty(0, np.int64), "peak_mjd": np.empty(0), "peak_r": np.empty(0),
                    "tau_rise": np.empty(0), "tau_fall": np.empty(0)}
        return _concat(keep, template)

    def _draw_flares(self, tiles: list[tuple[int, int]], rng: np.random.Generator) -> Columns:
        config, (start, end) = self.config, self.mjd_range
        parts = []
        for stripe, index in tiles:
            n = rng.poisson(config.flare_density * _tile_area(stripe, index))
            stars = self._tile("star", stripe, index)
            red = stars["g"] - stars["r"] > 1.3
            dwarfs = np.flatnonzero(red & self.in_footprint(stars["ra"], stars["dec"]))
            if n == 0 or dwarfs.size == 0:
                continue
            chosen = rng.choice(dwarfs, n)
            brightening = rng.uniform(0.5, 3.0, n)
            parts.append({
                "id": _ids("flare", stripe, index, n), "star_id": stars["id"][chosen],
                "peak_mjd": rng.uniform(start, end, n),
                "peak_r": stars["r"][chosen] - 2.5 * np.log10(10 ** (0.4 * brightening) - 1.0),
                "rise": rng.uniform(2.0, 5.0, n) / 1440.0, "decay": rng.uniform(5.0, 40.0, n) / 1440.0,
            })
        template = {"id": np.empty(0, np.int64), "star_id": np.empty(0, np.int64), "peak_mjd": np.empty(0),
                    "peak_r": np.empty(0), "rise": np.empty(0), "decay": np.empty(0)}
        return _concat(parts, template)

    def _draw_movers(self, tiles: list[tuple[int, int]], rng: np.random.Generator) -> Columns:
        from astropy.coordinates import GeocentricTrueEcliptic, SkyCoord

        config, (start, end) = self.config, self.mjd_range
        if not tiles:
            return {}
        bounds = np.array([_tile_bounds(*tile) for tile in tiles])
        centres = np.stack([bounds[:, :2].mean(axis=1), bounds[:, 2:].mean(axis=1)], axis=1)
        coords = SkyCoord(centres[:, 0], centres[:, 1], unit="deg").transform_to(GeocentricTrueEcliptic())
        latitude = coords.lat.deg
        # Position angle of the ecliptic through each tile: towards a point 1° further in longitude.
        ahead = SkyCoord(coords.lon.deg + 1.0, latitude, unit="deg", frame=GeocentricTrueEcliptic()).icrs
        here = coords.icrs
        ecliptic_pa = here.position_angle(ahead).deg
        reference = (start + end) / 2
        parts = []
        for (stripe, index), beta, along in zip(tiles, latitude, ecliptic_pa, strict=True):
            density = config.sso_density * (0.1 + 0.9 * np.exp(-((beta / 15.0) ** 2)))
            n = rng.poisson(density * _tile_area(stripe, index))
            if n == 0:
                continue
            ra, dec = _uniform_in_tile(rng, stripe, index, n)
            population = rng.choice(3, n, p=[0.1, 0.75, 0.15])  # outer (slow), main belt, near-Earth
            rate = np.select([population == 0, population == 1],
                             [rng.uniform(0.01, 0.1, n), rng.uniform(0.15, 0.35, n)],
                             np.exp(rng.uniform(np.log(0.5), np.log(25.0), n)))
            direction = np.where(population < 2, along + 180.0 * rng.integers(0, 2, n) + rng.normal(0, 10, n),
                                 rng.uniform(0.0, 360.0, n))
            c_type = rng.uniform(0.0, 1.0, n) < 0.5
            parts.append({
                "id": _ids("solar_system", stripe, index, n), "ra": ra, "dec": dec,
                "reference_mjd": np.full(n, reference), "rate": rate, "direction": direction % 360.0,
                "r": _power_law_mags(rng, n, (17.0, 24.5), 0.3), "c_type": c_type,
            })
        keep = [_select(p, self.in_footprint(p["ra"], p["dec"])) for p in parts]
        template = {"id": np.empty(0, np.int64), "ra": np.empty(0), "dec": np.empty(0),
                    "reference_mjd": np.empty(0), "rate": np.empty(0), "direction": np.empty(0),
                    "r": np.empty(0), "c_type": np.empty(0, bool)}
        return _concat(keep, template)

    # -- positions and brightness at a time -----------------------------------------------------------

    def ephemeris(self, mjd: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Positions of all solar-system objects at times ``mjd``.

        Returns arrays of shape (objects, times) (or (objects,) for a scalar
        time): RA and Dec, deg, moving along a great circle at a constant rate.
        """
        movers = self.movers
        t = np.asarray(mjd, dtype=float)
        if not movers or movers["id"].size == 0:
            return np.empty((0, *t.shape)), np.empty((0, *t.shape))
        expand = (slice(None),) + (None,) * t.ndim
        distance = movers["rate"][expand] * (t - movers["reference_mjd"][expand])
        return offset_position(movers["ra"][expand], movers["dec"][expand], movers["direction"][expand],
                               distance)

    def ephemeris_table(self, mjd: ArrayLike) -> pa.Table:
        """Predicted positions of every solar-system object at each time (one row per object and time)."""
        times = np.atleast_1d(np.asarray(mjd, dtype=float))
        ra, dec = self.ephemeris(times)
        ids = self.movers["id"] if self.movers else np.empty(0, np.int64)
        return pa.table({
            "sso_id": pa.array(np.repeat(ids, times.size), pa.int64()),
            "mjd": pa.array(np.tile(times, ids.size)),
            "ra": pa.array(ra.ravel()), "dec": pa.array(dec.ravel()),
            "rate_deg_per_day": pa.array(np.repeat(self.movers.get("rate", np.empty(0)), times.size)),
        })

    def sources_at(self, mjd: float, band: str, ra: float, dec: float, radius: float) -> dict[str, Columns]:
        """Everything within ``radius`` deg of (ra, dec) at time ``mjd``, with its AB magnitude in ``band``.

        Returns
        -------
        dict
            ``star`` (positions moved by proper motion to ``mjd``, variables at
            their phase), ``galaxy`` (with shape: half-light radius ″, Sérsic
            index, axis ratio, position angle ° E of N), ``supernova``,
            ``flare`` and ``solar_system`` (with ``rate`` °/day and
            ``direction`` ° E of N); each a dict of arrays with ``id``, ``ra``,
            ``dec`` (deg) and ``mag``.  Transients fainter than 30 mag are left out.
        """
        photometry.exposure_zero_point(band, 1.0)
        out: dict[str, Columns] = {}
        stars = self.stars_in(ra, dec, radius + 0.01)
        years = julian_year(mjd) - REF_EPOCH
        star_ra = stars["ra"] + stars["pmra"] * years / 3.6e6 / np.cos(np.radians(stars["dec"]))
        star_dec = stars["dec"] + stars["pmdec"] * years / 3.6e6
        offset = _VARIABLE_BAND_SCALE[band] * stars["amplitude"] * variable_offset(
            mjd, stars["period"], stars["phase"], stars["variable_kind"])
        out["star"] = {"id": stars["id"], "ra": star_ra % 360.0, "dec": star_dec,
                       "mag": stars[band].astype(float) + offset}

        galaxies = self.galaxies_in(ra, dec, radius)
        out["galaxy"] = {"id": galaxies["id"], "ra": galaxies["ra"], "dec": galaxies["dec"],
                         "mag": galaxies[band].astype(float),
                         **{k: galaxies[k] for k in ("half_light_radius", "sersic_n", "axis_ratio",
                                                     "position_angle")}}

        sn = _select(self.supernovae, angular_distance(ra, dec, self.supernovae["ra"], self.supernovae["dec"])
                     <= radius) if self.supernovae else {}
        if sn:
            with np.errstate(divide="ignore"):
                relative = bazin_flux(mjd, sn["peak_mjd"], sn["tau_rise"], sn["tau_fall"])
                mag = (sn["peak_r"] + _SUPERNOVA_COLOURS[band]
                       + _SUPERNOVA_REDDENING[band] * np.maximum(mjd - sn["peak_mjd"], 0.0)
                       - 2.5 * np.log10(relative))
            bright = mag < 30.0
            out["supernova"] = {"id": sn["id"][bright], "ra": sn["ra"][bright], "dec": sn["dec"][bright],
                                "mag": mag[bright], "host_id": sn["host_id"][bright]}

        flaring = self._flares_at(mjd, band, stars)
        if flaring:
            out["flare"] = flaring

        if self.movers and self.movers["id"].size:
            mover_ra, mover_dec = self.ephemeris(mjd)
            near = angular_distance(ra, dec, mover_ra, mover_dec) <= radius
            movers = self.movers
            colours = np.where(movers["c_type"], _ASTEROID_COLOURS["C"][band], _ASTEROID_COLOURS["S"][band])
            out["solar_system"] = {"id": movers["id"][near], "ra": mover_ra[near], "dec": mover_dec[near],
                                   "mag": (movers["r"] + colours)[near], "rate": movers["rate"][near],
                                   "direction": movers["direction"][near]}
        return out

    def _flares_at(self, mjd: float, band: str, stars: Columns) -> Columns:
        flares = self.flares
        if not flares or flares["id"].size == 0:
            return {}
        peak = flares["peak_mjd"]
        active = (mjd > peak - flares["rise"]) & (mjd < peak + 10 * flares["decay"])
        on_star = np.isin(flares["star_id"], stars["id"])
        chosen = np.flatnonzero(active & on_star)
        if chosen.size == 0:
            return {}
        where = {star_id: k for k, star_id in enumerate(stars["id"])}
        rows = np.array([where[s] for s in flares["star_id"][chosen]])
        years = julian_year(mjd) - REF_EPOCH
        ra = stars["ra"][rows] + stars["pmra"][rows] * years / 3.6e6 / np.cos(np.radians(stars["dec"][rows]))
        dec = stars["dec"][rows] + stars["pmdec"][rows] * years / 3.6e6
        relative = flare_flux(mjd, peak[chosen], flares["rise"][chosen], flares["decay"][chosen])
        with np.errstate(divide="ignore"):
            mag = flares["peak_r"][chosen] + _FLARE_COLOURS[band] - 2.5 * np.log10(relative)
        return {"id": flares["id"][chosen], "ra": ra % 360.0, "dec": dec, "mag": mag,
                "star_id": flares["star_id"][chosen]}

    # -- tables ---------------------------------------------------------------------------------------

    def reference_catalog(self) -> pa.Table:
        """Gaia-like reference catalogue of the footprint's stars brighter than ``refcat_g_limit``.

        Columns follow Gaia DR3 (``source_id``, ``ra``/``dec`` in deg at
        ``ref_epoch`` 2016.0, ``ra_error``/``dec_error`` in mas, ``pmra``,
        ``pmdec`` in mas/yr, ``parallax`` in mas, ``phot_g_mean_mag``) plus the
        true LSST AB magnitudes ``u`` … ``y`` at mean light.  Astrometry is the
        truth plus Gaia-like errors, so an astrometric fit sees realistic scatter.
        """
        stars = self._population_in_footprint("star")
        g_mag = gaia_g_from_lsst(stars["g"], stars["r"], stars["i"])
        keep = g_mag < self.config.refcat_g_limit
        stars, g_mag = _select(stars, keep), g_mag[keep]
        rng = np.random.default_rng([self.config.seed, 98])
        sigma = gaia_position_error(g_mag)
        noise = rng.standard_normal((5, g_mag.size))
        dec = stars["dec"] + sigma * noise[1] / 3.6e6
        ra = (stars["ra"] + sigma * noise[0] / 3.6e6 / np.cos(np.radians(stars["dec"]))) % 360.0
        columns: list[tuple[str, pa.DataType, NDArray[Any], str]] = [
            ("source_id", pa.int64(), stars["id"], ""),
            ("ra", pa.float64(), ra, "deg"), ("dec", pa.float64(), dec, "deg"),
            ("ra_error", pa.float32(), sigma, "mas"), ("dec_error", pa.float32(), sigma, "mas"),
            ("pmra", pa.float64(), stars["pmra"] + 1.1 * sigma * noise[2], "mas/yr"),
            ("pmdec", pa.float64(), stars["pmdec"] + 1.1 * sigma * noise[3], "mas/yr"),
            ("pmra_error", pa.float32(), 1.1 * sigma, "mas/yr"),
            ("pmdec_error", pa.float32(), 1.1 * sigma, "mas/yr"),
            ("parallax", pa.float64(), stars["parallax"] + 1.2 * sigma * noise[4], "mas"),
            ("parallax_error", pa.float32(), 1.2 * sigma, "mas"),
            ("ref_epoch", pa.float64(), np.full(g_mag.size, REF_EPOCH), "yr"),
            ("phot_g_mean_mag", pa.float32(), g_mag, "mag"),
            *((band, pa.float32(), stars[band], "mag") for band in BANDS),
        ]
        return _table(columns)

    def truth_tables(self) -> dict[str, pa.Table]:
        """Truth tables of the footprint and the night, by name.

        ``stars``, ``variables``, ``galaxies``, ``supernovae``, ``flares`` and
        ``solar_system``; the units are in each field's metadata.
        """
        stars = self._population_in_footprint("star")
        galaxies = self._population_in_footprint("galaxy")
        star_columns = [("id", pa.int64(), stars["id"], ""), ("ra", pa.float64(), stars["ra"], "deg"),
                        ("dec", pa.float64(), stars["dec"], "deg"),
                        ("pmra", pa.float64(), stars["pmra"], "mas/yr"),
                        ("pmdec", pa.float64(), stars["pmdec"], "mas/yr"),
                        ("parallax", pa.float64(), stars["parallax"], "mas"),
                        *((b, pa.float32(), stars[b], "mag") for b in BANDS)]
        variable = stars["variable_kind"] > 0
        variables = _select(stars, variable)
        kinds = np.array(["constant", "sinusoid", "rr_lyrae"])[variables["variable_kind"]]
        movers = self.movers or {k: np.empty(0) for k in ("id", "ra", "dec", "reference_mjd", "rate",
                                                          "direction", "r", "c_type")}
        return {
            "stars": _table(star_columns),
            "variables": _table([
                ("id", pa.int64(), variables["id"], ""), ("kind", pa.string(), kinds, ""),
                ("period", pa.float64(), variables["period"], "d"),
                ("amplitude", pa.float32(), variables["amplitude"], "mag"),
                ("phase", pa.float64(), variables["phase"], ""),
                ("phase_epoch_mjd", pa.float64(), np.full(variables["id"].size, VARIABLE_EPOCH_MJD), "d"),
            ]),
            "galaxies": _columns_table(galaxies),
            "supernovae": _columns_table(self.supernovae),
            "flares": _columns_table(self.flares),
            "solar_system": _table([
                ("id", pa.int64(), movers["id"], ""), ("ra", pa.float64(), movers["ra"], "deg"),
                ("dec", pa.float64(), movers["dec"], "deg"),
                ("reference_mjd", pa.float64(), movers["reference_mjd"], "d"),
                ("rate", pa.float64(), movers["rate"], "deg/d"),
                ("direction", pa.float64(), movers["direction"], "deg"),
                ("r", pa.float64(), movers["r"], "mag"),
                ("taxonomy", pa.string(), np.where(movers["c_type"].astype(bool), "C", "S"), ""),
            ]),
        }

    # -- per-exposure choices ------------------------------------------------------------------------

    def _exposure_rng(self, mjd_start: float, stream: int) -> np.random.Generator:
        # Keyed by the start time to the millisecond, so every detector of one exposure agrees.
        return np.random.default_rng([self.config.seed, stream, round(mjd_start * 86_400_000)])

    def exposure_psf(self, exposure: ExposureLike, fwhm: float | None = None) -> Psf:
        """The PSF of an exposure: its FWHM, an ellipticity and a smooth variation drawn per exposure."""
        rng = self._exposure_rng(exposure.mjd_start, 1)
        config = self.config
        e1, e2 = rng.normal(0.0, config.psf_ellipticity, 2)
        g1, g2 = rng.normal(0.0, config.psf_variation / 2, (2, 2))
        return Psf(fwhm=float(fwhm if fwhm is not None else exposure.fwhm_geom), e1=float(e1), e2=float(e2),
                   profile=config.psf_profile, fwhm_variation=float(rng.uniform(0.0, config.psf_variation)),
                   e1_gradient=(float(g1[0]), float(g1[1])), e2_gradient=(float(g2[0]), float(g2[1])))

    def satellites(self, exposure: ExposureLike) -> Columns:
        """Satellite passes of an exposure: a point of each track, its direction, rate and brightness.

        A satellite crosses (ra, dec) at ``crossing`` seconds after the start of
        integration, moving at ``rate`` deg/s along ``direction`` deg E of N;
        ``r`` is its AB magnitude.
        """
        rng = self._exposure_rng(exposure.mjd_start, 2)
        n = rng.poisson(self.config.satellite_rate)
        # Uniform over a disc of 2° around the boresight (the focal plane is 1.75° in radius).
        distance = 2.0 * np.sqrt(rng.uniform(0.0, 1.0, n))
        ra, dec = offset_position(exposure.ra, exposure.dec, rng.uniform(0.0, 360.0, n), distance)
        exposure_key = round(exposure.mjd_start * 86_400) % 10**9
        return {"id": KIND_CODES["satellite"] * _ID_KIND + exposure_key * 1000 + np.arange(n, dtype=np.int64),
                "ra": ra, "dec": dec, "direction": rng.uniform(0.0, 360.0, n),
                "rate": rng.uniform(0.2, 1.0, n), "crossing": rng.uniform(0.0, exposure.exptime, n),
                "r": rng.uniform(4.5, 9.0, n)}


_UNITS = {"ra": "deg", "dec": "deg", "half_light_radius": "arcsec", "position_angle": "deg", "peak_mjd": "d",
          "peak_r": "mag", "tau_rise": "d", "tau_fall": "d", "rise": "d", "decay": "d",
          **{band: "mag" for band in BANDS}}


def _columns_table(columns: Columns) -> pa.Table:
    return _table([(name, pa.from_numpy_dtype(values.dtype), values, _UNITS.get(name, ""))
                   for name, values in columns.items()])


def _table(columns: Sequence[tuple[str, pa.DataType, ArrayLike, str]]) -> pa.Table:
    fields, arrays = [], []
    for name, kind, values, unit in columns:
        fields.append(pa.field(name, kind, metadata={"unit": unit} if unit else None))
        arrays.append(pa.array(np.asarray(values), kind))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


# --- rendering ----------------------------------------------------------------------------------------------

TRUTH_SCHEMA = pa.schema([
    pa.field("id", pa.int64()), pa.field("kind", pa.string()),
    pa.field("ra", pa.float64(), metadata={"unit": "deg"}),
    pa.field("dec", pa.float64(), metadata={"unit": "deg"}),
    pa.field("x", pa.float64(), metadata={"unit": "pixel"}),
    pa.field("y", pa.float64(), metadata={"unit": "pixel"}),
    pa.field("mag", pa.float64(), metadata={"unit": "mag"}),
    pa.field("flux_njy", pa.float64(), metadata={"unit": "nJy"}),
    pa.field("flux_e", pa.float64(), metadata={"unit": "electron"}),
    pa.field("trail_length", pa.float64(), metadata={"unit": "pixel"}),
    pa.field("trail_angle", pa.float64(), metadata={"unit": "deg"}),
    pa.field("parent_id", pa.int64()),
])


def _local_jacobian(wcs: WCS, x: float, y: float) -> NDArray[np.float64]:
    """d(east, north)/d(x, y) at a pixel, arcsec per pixel."""
    ra0, dec0 = wcs.pixel_to_world_values(x, y)
    ras, decs = wcs.pixel_to_world_values(np.array([x + 1.0, x]), np.array([y, y + 1.0]))
    east = ((ras - ra0 + 180.0) % 360.0 - 180.0) * np.cos(np.radians(dec0)) * 3600.0
    north = (decs - dec0) * 3600.0
    return np.array([[east[0], east[1]], [north[0], north[1]]])


def sky_shape_to_pixel(axis_ratio: ArrayLike, position_angle: ArrayLike, jacobian: NDArray[np.float64]
                       ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Ellipticity (e1, e2) in pixel axes of an ellipse given by axis ratio and position angle (° E of N)."""
    pa_r = np.radians(np.asarray(position_angle, dtype=float))
    major_pixel = np.linalg.solve(jacobian, np.stack([np.sin(pa_r), np.cos(pa_r)]))
    angle = np.arctan2(major_pixel[1], major_pixel[0])
    q = np.asarray(axis_ratio, dtype=float)
    e = (1 - q**2) / (1 + q**2)
    return e * np.cos(2 * angle), e * np.sin(2 * angle)


def _on_image(x: NDArray[np.float64], y: NDArray[np.float64], shape: tuple[int, int], margin: float = 0.0
              ) -> NDArray[np.bool_]:
    rows, cols = shape
    return (x >= -0.5 - margin) & (x < cols - 0.5 + margin) & (y >= -0.5 - margin) & (y < rows - 0.5 + margin)


@dataclass
class _Truth:
    rows: list[dict[str, NDArray[Any]]] = field(default_factory=list)

    def add(self, kind: str, ids: ArrayLike, ra: ArrayLike, dec: ArrayLike, x: ArrayLike, y: ArrayLike,
            mag: ArrayLike, flux_njy: ArrayLike, flux_e: ArrayLike, trail_length: ArrayLike = 0.0,
            trail_angle: ArrayLike = 0.0, parent_id: ArrayLike = -1) -> None:
        ids = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        if ids.size == 0:
            return
        values = {"id": ids, "kind": np.full(ids.size, kind, dtype=object)}
        named = {"ra": ra, "dec": dec, "x": x, "y": y, "mag": mag, "flux_njy": flux_njy, "flux_e": flux_e,
                 "trail_length": trail_length, "trail_angle": trail_angle}
        for name, column in named.items():
            values[name] = np.broadcast_to(np.asarray(column, dtype=float), ids.shape)
        values["parent_id"] = np.broadcast_to(np.asarray(parent_id, dtype=np.int64), ids.shape)
        self.rows.append(values)

    def table(self) -> pa.Table:
        if not self.rows:
            return TRUTH_SCHEMA.empty_table()
        return pa.Table.from_arrays([pa.array(np.concatenate([r[f.name] for r in self.rows]), f.type)
                                     for f in TRUTH_SCHEMA], schema=TRUTH_SCHEMA)


def render_exposure(sky: Sky, exposure: ExposureLike, wcs: WCS, shape: tuple[int, int],
                    rng: np.random.Generator, psf: Psf | None = None) -> tuple[NDArray[np.float32], pa.Table]:
    """Expected electrons per pixel of one detector in one exposure, and the truth of what was drawn.

    Parameters
    ----------
    sky : Sky
    exposure : ExposureLike
        Band, start (MJD), exposure and dark time, airmass, transparency,
        sky brightness, PSF FWHM and boresight: a
        ``streams.observatory.Exposure`` or an :class:`Observation`.
    wcs : astropy.wcs.WCS
        WCS of the assembled detector.
    shape : tuple of int
        (rows, cols) of the assembled detector.
    rng : numpy.random.Generator
        Randomness of this detector-exposure (cosmic rays).
    psf : Psf, optional
        Defaults to :meth:`Sky.exposure_psf`.

    Returns
    -------
    image : numpy.ndarray
        float32, ``shape``, expected electrons per pixel (sky, sources, cosmic
        rays), without noise or flat field: the camera adds those.
    truth : pyarrow.Table
        One row per source whose centre (or, for trails, any part) is on the
        image, with columns of ``TRUTH_SCHEMA``: x, y are 0-based pixels at
        mid-exposure; flux_e is the total electrons drawn, flux_njy its flux
        density above the atmosphere; trails give their length (pixels) and
        angle from +x (deg).
    """
    band, exptime = exposure.band, float(exposure.exptime)
    airmass, transparency = float(exposure.airmass), float(exposure.transparency)
    start = float(exposure.mjd_start)
    mid = start + exptime / 2 / 86400.0
    psf = psf or sky.exposure_psf(exposure)
    rows, cols = shape
    sky_mag = exposure.sky_mag if np.isfinite(exposure.sky_mag) else DARK_SKY_MAG[band]
    level = float(photometry.sky_electrons_per_pixel(sky_mag, band, exptime, psf.pixel_scale))
    gradient_rng = sky._exposure_rng(start, 3)
    slope_x, slope_y = gradient_rng.uniform(-1.0, 1.0, 2) * sky.config.sky_gradient / 2
    yy, xx = np.ogrid[0:rows, 0:cols]
    image = (level * (1.0 + slope_x * (2 * xx / max(cols - 1, 1) - 1.0)
                      + slope_y * (2 * yy / max(rows - 1, 1) - 1.0))).astype(np.float32)

    centre = ((cols - 1) / 2, (rows - 1) / 2)
    ra_c, dec_c = (float(v) for v in wcs.pixel_to_world_values(*centre))
    corners_ra, corners_dec = wcs.pixel_to_world_values(np.array([-0.5, cols - 0.5, -0.5, cols - 0.5]),
                                                        np.array([-0.5, -0.5, rows - 0.5, rows - 0.5]))
    margin_deg = (HALO_RADIUS + 10) * psf.pixel_scale / 3600.0
    radius = float(angular_distance(ra_c, dec_c, corners_ra, corners_dec).max()) + margin_deg
    sources = sky.sources_at(mid, band, ra_c, dec_c, radius)
    to_e = photometry.mag_to_electrons(0.0, band, exptime, airmass, transparency)
    truth = _Truth()
    points_x, points_y, points_flux = [], [], []

    def add_points(kind: str, columns: Columns, parent: str | None = None) -> None:
        x, y = wcs.world_to_pixel_values(columns["ra"], columns["dec"])
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        flux = to_e * 10.0 ** (-0.4 * columns["mag"])
        drawn = _on_image(x, y, shape, HALO_RADIUS)
        points_x.append(x[drawn])
        points_y.append(y[drawn])
        points_flux.append(flux[drawn])
        listed = _on_image(x, y, shape)
        mag = columns["mag"][listed]
        truth.add(kind, columns["id"][listed], columns["ra"][listed], columns["dec"][listed], x[listed],
                  y[listed], mag, photometry.mag_to_njy(mag), flux[listed],
                  parent_id=columns[parent][listed] if parent else -1)

    add_points("star", sources["star"])
    for kind, parent in (("supernova", "host_id"), ("flare", "star_id")):
        if kind in sources:
            add_points(kind, sources[kind], parent)
    movers = sources.get("solar_system")
    if movers is not None and movers["id"].size:
        _add_movers(movers, start, exptime, wcs, shape, to_e, truth, points_x, points_y, points_flux)
    if np.isfinite(exposure.ra) and np.isfinite(exposure.dec):
        _add_satellites(sky.satellites(exposure), band, exposure, wcs, shape, to_e, truth,
                        points_x, points_y, points_flux)
    draw_point_sources(image, np.concatenate(points_x), np.concatenate(points_y), np.concatenate(points_flux),
                       psf)

    galaxies = sources["galaxy"]
    gx, gy = (np.asarray(v, dtype=float) for v in wcs.world_to_pixel_values(galaxies["ra"], galaxies["dec"]))
    reach = np.ceil(4 * galaxies["half_light_radius"] / psf.pixel_scale) + 10
    drawn = (gx > -reach) & (gx < cols + reach) & (gy > -reach) & (gy < rows + reach)
    flux = to_e * 10.0 ** (-0.4 * galaxies["mag"])
    e1, e2 = sky_shape_to_pixel(galaxies["axis_ratio"], galaxies["position_angle"],
                                _local_jacobian(wcs, *centre))
    draw_galaxies(image, gx[drawn], gy[drawn], flux[drawn], galaxies["half_light_radius"][drawn],
                  galaxies["sersic_n"][drawn], e1[drawn], e2[drawn], psf)
    listed = _on_image(gx, gy, shape)
    mag = galaxies["mag"][listed]
    truth.add("galaxy", galaxies["id"][listed], galaxies["ra"][listed], galaxies["dec"][listed], gx[listed],
              gy[listed], mag, photometry.mag_to_njy(mag), flux[listed])

    if sky.config.cosmic_ray_rate > 0:
        darktime = exposure.darktime if np.isfinite(exposure.darktime) else exptime
        rays = add_cosmic_rays(image, sky.config.cosmic_ray_rate, rng, duration=float(darktime))
        mx, my = (rays.x0 + rays.x1) / 2, (rays.y0 + rays.y1) / 2
        ray_ra, ray_dec = wcs.pixel_to_world_values(mx, my)
        ids = KIND_CODES["cosmic_ray"] * _ID_KIND + np.arange(len(rays), dtype=np.int64)
        truth.add("cosmic_ray", ids, ray_ra, ray_dec, mx, my, np.nan, np.nan, rays.charge_e, rays.length,
                  np.degrees(np.arctan2(rays.y1 - rays.y0, rays.x1 - rays.x0)))
    np.maximum(image, 0.0, out=image)
    return image, truth.table()


#: A mover is drawn as a trail when it moves at least this far during the exposure, pixels.
MIN_TRAIL_PX = 0.5


def _add_movers(movers: Columns, start: float, exptime: float, wcs: WCS, shape: tuple[int, int], to_e: float,
                truth: _Truth, points_x: list, points_y: list, points_flux: list) -> None:
    days = exptime / 86400.0
    half_move = movers["rate"] * days / 2
    ra0, dec0 = offset_position(movers["ra"], movers["dec"], movers["direction"], -half_move)
    ra1, dec1 = offset_position(movers["ra"], movers["dec"], movers["direction"], half_move)
    x0, y0 = (np.asarray(v, dtype=float) for v in wcs.world_to_pixel_values(ra0, dec0))
    x1, y1 = (np.asarray(v, dtype=float) for v in wcs.world_to_pixel_values(ra1, dec1))
    xm, ym = (np.asarray(v, dtype=float) for v in wcs.world_to_pixel_values(movers["ra"], movers["dec"]))
    flux = to_e * 10.0 ** (-0.4 * movers["mag"])
    length = np.hypot(x1 - x0, y1 - y0)
    trailed = length >= MIN_TRAIL_PX
    near = _on_image(xm, ym, shape, HALO_RADIUS + length)
    x, y, f, _ = trail_samples(x0[near & trailed], y0[near & trailed], x1[near & trailed], y1[near & trailed],
                               flux[near & trailed])
    points_x += [x, xm[near & ~trailed]]
    points_y += [y, ym[near & ~trailed]]
    points_flux += [f, flux[near & ~trailed]]
    listed = _on_image(xm, ym, shape, length / 2)
    truth.add("solar_system", movers["id"][listed], movers["ra"][listed], movers["dec"][listed], xm[listed],
              ym[listed], movers["mag"][listed], photometry.mag_to_njy(movers["mag"][listed]), flux[listed],
              np.where(trailed, length, 0.0)[listed], np.degrees(np.arctan2(y1 - y0, x1 - x0))[listed])


def _add_satellites(satellites: Columns, band: str, exposure: ExposureLike, wcs: WCS, shape: tuple[int, int],
                    to_e: float, truth: _Truth, points_x: list, points_y: list, points_flux: list) -> None:
    for k in range(satellites["id"].size):
        # Sample the track during the exposure finely enough to find where it crosses this detector.
        before = -satellites["rate"][k] * satellites["crossing"][k]
        after = satellites["rate"][k] * (exposure.exptime - satellites["crossing"][k])
        s = np.linspace(max(before, -4.0), min(after, 4.0), 4001)
        ra, dec = offset_position(satellites["ra"][k], satellites["dec"][k], satellites["direction"][k], s)
        x, y = (np.asarray(v, dtype=float) for v in wcs.world_to_pixel_values(ra, dec))
        inside = np.flatnonzero(_on_image(x, y, shape, HALO_RADIUS))
        if inside.size == 0:
            continue
        first, last = max(inside[0] - 1, 0), min(inside[-1] + 1, s.size - 1)
        length_deg = s[last] - s[first]
        # A satellite of magnitude r (solar colours) leaves flux / rate electrons per degree of track.
        mag = satellites["r"][k] + _ASTEROID_COLOURS["S"][band]
        flux = to_e * 10.0 ** (-0.4 * mag) / exposure.exptime * length_deg / satellites["rate"][k]
        px, py, pf, _ = trail_samples(x[first], y[first], x[last], y[last], flux)
        points_x.append(px)
        points_y.append(py)
        points_flux.append(pf)
        on_image = _on_image(x[first:last + 1], y[first:last + 1], shape)
        if on_image.any():
            mid = first + np.flatnonzero(on_image)[on_image.sum() // 2]
            length = np.hypot(x[last] - x[first], y[last] - y[first])
            truth.add("satellite", satellites["id"][k], ra[mid], dec[mid], x[mid], y[mid], mag,
                      photometry.mag_to_njy(mag), flux, length,
                      np.degrees(np.arctan2(y[last] - y[first], x[last] - x[first])))
