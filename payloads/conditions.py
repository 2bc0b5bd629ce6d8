"""Observing conditions: airmass, delivered seeing, sky brightness, clouds.

Pure functions on numpy arrays, no I/O: the simulated observatory uses them to
give each exposure its conditions, and the QC side can use them to say what a
visit should have looked like.

Sources of the numbers (facts, not code): effective wavelengths, dark-sky
zenith brightness and extinction coefficients per band are Rubin's systems
engineering values (syseng_throughputs v1.9, as listed in SMTN-002 and
``rubin_scheduler.utils.SysEngVals``); the split of the delivered FWHM into
atmosphere and system, and FWHM_eff/FWHM_geom, follow SMTN-002 (Document-20160);
the Moon term is the model of Krisciunas & Schaefer (1991, PASP 103, 1033);
airmass is Kasten & Young (1989, Appl. Opt. 28, 4735).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.signal import lfilter

BANDS = ("u", "g", "r", "i", "z", "y")

#: Effective wavelength of each LSST band, nm.
EFFECTIVE_WAVELENGTH_NM = {"u": 372.4, "g": 480.7, "r": 622.1, "i": 755.9, "z": 868.0, "y": 975.3}
#: Dark-sky brightness at zenith (no Moon, no twilight), AB mag/arcsec².
DARK_SKY_MAG = {"u": 23.05, "g": 22.25, "r": 21.20, "i": 20.46, "z": 19.61, "y": 18.60}
#: Atmospheric extinction at zenith, mag per unit airmass.
EXTINCTION = {"u": 0.470, "g": 0.213, "r": 0.126, "i": 0.096, "z": 0.068, "y": 0.171}
#: Twilight brightness at a Sun altitude of -12°, as a multiple of the dark sky
#: flux of the band.  The twilight sky is blue while the dark sky of z and y is
#: dominated by OH emission, so the blue bands brighten most (relative).
TWILIGHT_AT_MINUS_12 = {"u": 3.0, "g": 3.0, "r": 2.0, "i": 1.5, "z": 1.0, "y": 0.7}
#: How fast twilight fades as the Sun goes down, mag per degree.
TWILIGHT_FADE_MAG_PER_DEG = 0.9
#: Zenith FWHM of the telescope, optics and camera together (SMTN-002:
#: 0.25″, 0.08″ and 0.30″ in quadrature), arcsec.
SYSTEM_FWHM = 0.40


def airmass(alt_deg: ArrayLike) -> NDArray[np.float64]:
    """Relative air mass at apparent altitude ``alt_deg`` (Kasten & Young 1989).

    Unlike sec(z) it stays finite at the horizon; above 30° altitude it is
    within 0.3 % of sec(z).

    Parameters
    ----------
    alt_deg : array_like
        Altitude above the horizon, deg.

    Returns
    -------
    numpy.ndarray
        Airmass, 1 at zenith.
    """
    alt = np.clip(np.asarray(alt_deg, dtype=float), 0.0, 90.0)
    # The fit is 0.03 % below 1 at zenith; an airmass is never below 1.
    return np.maximum(1.0 / (np.sin(np.radians(alt)) + 0.50572 * (alt + 6.07995) ** -1.6364), 1.0)


def delivered_fwhm(fwhm_500: ArrayLike, airmass: ArrayLike, band: ArrayLike,
                   system_fwhm: float = SYSTEM_FWHM,
                   wavelength_exponent: float = 0.2) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Delivered PSF FWHM of LSSTCam from the DIMM seeing.

    The atmospheric part scales as λ^-0.2 (Kolmogorov; SMTN-002 uses 0.3 to
    mimic a finite outer scale) and both parts as airmass^0.6.  The two are
    combined as in SMTN-002: FWHM_eff = 1.16 √(sys² + 1.04 atm²), and
    FWHM_geom = 0.822 FWHM_eff + 0.052″.

    Parameters
    ----------
    fwhm_500 : array_like
        Zenith seeing at 500 nm as a DIMM measures it, arcsec.
    airmass : array_like
        Airmass of the observation.
    band : array_like of str
        Band names (``u`` … ``y``).
    system_fwhm : float
        Zenith FWHM of the telescope and camera, arcsec.
    wavelength_exponent : float
        Power of (500 nm / λ) in the atmospheric FWHM.

    Returns
    -------
    fwhm_eff, fwhm_geom : numpy.ndarray
        Effective FWHM (the one that sets the S/N) and geometric FWHM (the
        width of the PSF profile), arcsec.
    """
    wavelength = np.vectorize(EFFECTIVE_WAVELENGTH_NM.__getitem__, otypes=[float])(band)
    scale = np.asarray(airmass, dtype=float) ** 0.6
    atmosphere = np.asarray(fwhm_500, dtype=float) * (500.0 / wavelength) ** wavelength_exponent * scale
    system = system_fwhm * scale
    fwhm_eff = 1.16 * np.sqrt(system**2 + 1.04 * atmosphere**2)
    return fwhm_eff, 0.822 * fwhm_eff + 0.052


def ar1_series(n: int, step: float, timescale: float, sigma: float,
               rng: np.random.Generator) -> NDArray[np.float64]:
    """A stationary AR(1) (discretised Ornstein-Uhlenbeck) series of zero mean.

    Parameters
    ----------
    n : int
        Number of samples.
    step : float
        Time between samples, s.
    timescale : float
        Correlation time, s: samples ``timescale`` apart correlate at 1/e.
    sigma : float
        Standard deviation of the series.
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    numpy.ndarray
        ``n`` samples.
    """
    phi = np.exp(-step / timescale)
    noise = rng.standard_normal(n) * sigma * np.sqrt(1.0 - phi**2)
    # Start from the stationary distribution rather than from zero.
    noise[0] = rng.standard_normal() * sigma
    return lfilter([1.0], [1.0, -phi], noise)


def dimm_seeing(n: int, step: float, rng: np.random.Generator, median: float = 0.70,
                night_sigma: float = 0.15, sigma: float = 0.15, timescale: float = 2400.0,
                limits: tuple[float, float] = (0.35, 2.0)) -> NDArray[np.float64]:
    """A night of DIMM seeing at 500 nm, zenith, sampled every ``step`` s.

    The night's median is drawn log-normally around ``median`` (Cerro Pachón's
    DIMM median is about 0.7″), then the seeing wanders about it as a
    log-normal AR(1) process.

    Parameters
    ----------
    n : int
        Number of samples.
    step : float
        Time between samples, s.
    rng : numpy.random.Generator
        Source of randomness.
    median : float
        Median seeing over many nights, arcsec.
    night_sigma, sigma : float
        Scatter (natural log) of the nightly median and within the night.
    timescale : float
        Correlation time within the night, s.
    limits : tuple of float
        Values are clipped to this range, arcsec.

    Returns
    -------
    numpy.ndarray
        FWHM at 500 nm, arcsec.
    """
    night_median = median * np.exp(night_sigma * rng.standard_normal())
    log_seeing = np.log(night_median) + ar1_series(n, step, timescale, sigma, rng)
    return np.clip(np.exp(log_seeing), *limits)


def cloud_transparency(times: ArrayLike, rng: np.random.Generator, episodes_per_night: float = 1.0,
                       night_length: float = 36000.0, max_depth_mag: float = 1.0) -> NDArray[np.float64]:
    """Fraction of light that gets through the clouds at each time.

    Clear sky has a transparency of about 1 with a small jitter; cloud episodes
    (a Poisson number, ``episodes_per_night`` on average) are Gaussian bumps
    of extinction with a standard deviation of 5-30 min, up to ``max_depth_mag`` deep.

    Parameters
    ----------
    times : array_like
        Times of the samples, s (any origin).
    rng : numpy.random.Generator
        Source of randomness.
    episodes_per_night : float
        Mean number of cloud episodes in ``night_length``.
    night_length : float
        Length of a night, s: the rate is scaled to the span of ``times``.
    max_depth_mag : float
        Largest extinction at the peak of an episode, mag.

    Returns
    -------
    numpy.ndarray
        Transparency in (0, 1].
    """
    t = np.asarray(times, dtype=float)
    span = float(t.max() - t.min()) if t.size else 0.0
    count = rng.poisson(episodes_per_night * span / night_length)
    centres = rng.uniform(t.min(), t.max(), count) if count else np.empty(0)
    widths = rng.uniform(300.0, 1800.0, count)
    depths = rng.uniform(0.1, max_depth_mag, count)
    extinction = np.abs(rng.normal(0.0, 0.01, t.shape))
    for centre, width, depth in zip(centres, widths, depths, strict=True):
        extinction += depth * np.exp(-0.5 * ((t - centre) / width) ** 2)
    return 10.0 ** (-0.4 * extinction)


def moon_illumination(phase_angle_deg: ArrayLike) -> NDArray[np.float64]:
    """Illuminated fraction of the Moon's disc for a Sun-Moon-Earth phase angle (0° = full)."""
    return 0.5 * (1.0 + np.cos(np.radians(np.asarray(phase_angle_deg, dtype=float))))


def _nanolambert(mag: NDArray[np.float64]) -> NDArray[np.float64]:
    # Krisciunas & Schaefer's conversion between surface brightness and nL.
    return 34.08 * np.exp(20.7233 - 0.92104 * mag)


def _mag_from_nanolambert(brightness: NDArray[np.float64]) -> NDArray[np.float64]:
    return (20.7233 - np.log(brightness / 34.08)) / 0.92104


def _ks_airmass(alt_deg: NDArray[np.float64]) -> NDArray[np.float64]:
    zenith = np.radians(90.0 - np.clip(alt_deg, 0.0, 90.0))
    return (1.0 - 0.96 * np.sin(zenith) ** 2) ** -0.5


def sky_brightness(band: ArrayLike, alt_deg: ArrayLike, moon_alt_deg: ArrayLike,
                   moon_separation_deg: ArrayLike, moon_phase_angle_deg: ArrayLike,
                   sun_alt_deg: ArrayLike) -> NDArray[np.float64]:
    """Sky surface brightness in an LSST band, AB mag/arcsec².

    Three terms added in flux: the dark sky (brighter towards the horizon as
    X·10^(-0.4 k (X-1))), moonlight scattered by the atmosphere
    (Krisciunas & Schaefer 1991 with the band's extinction coefficient, zero
    when the Moon is down) and twilight (exponential in the Sun's altitude).

    Parameters
    ----------
    band : array_like of str
        Band names.
    alt_deg : array_like
        Altitude of the pointing, deg.
    moon_alt_deg, moon_separation_deg : array_like
        Altitude of the Moon, and its angular distance from the pointing, deg.
    moon_phase_angle_deg : array_like
        Sun-Moon-Earth angle, deg (0 = full Moon, 180 = new Moon).
    sun_alt_deg : array_like
        Altitude of the Sun, deg.

    Returns
    -------
    numpy.ndarray
        Sky brightness, mag/arcsec² (smaller is brighter).
    """
    bands = np.asarray(band)
    dark = np.vectorize(DARK_SKY_MAG.__getitem__, otypes=[float])(bands)
    k = np.vectorize(EXTINCTION.__getitem__, otypes=[float])(bands)
    twilight_scale = np.vectorize(TWILIGHT_AT_MINUS_12.__getitem__, otypes=[float])(bands)
    alt = np.asarray(alt_deg, dtype=float)
    moon_alt = np.asarray(moon_alt_deg, dtype=float)
    x = _ks_airmass(alt)

    dark_flux = _nanolambert(dark) * x * 10.0 ** (-0.4 * k * (x - 1.0))

    rho = np.clip(np.asarray(moon_separation_deg, dtype=float), 1.0, 180.0)
    alpha = np.abs(np.asarray(moon_phase_angle_deg, dtype=float))
    moon_brightness = 10.0 ** (-0.4 * (3.84 + 0.026 * alpha + 4e-9 * alpha**4))
    scattering = 10.0**5.36 * (1.06 + np.cos(np.radians(rho)) ** 2) + 10.0 ** (6.15 - rho / 40.0)
    moon_flux = (scattering * moon_brightness * 10.0 ** (-0.4 * k * _ks_airmass(moon_alt))
                 * (1.0 - 10.0 ** (-0.4 * k * x)))
    moon_flux = np.where(moon_alt > 0.0, moon_flux, 0.0)

    sun_alt = np.asarray(sun_alt_deg, dtype=float)
    twilight_flux = (_nanolambert(dark) * twilight_scale
                     * 10.0 ** (0.4 * TWILIGHT_FADE_MAG_PER_DEG * np.minimum(sun_alt + 12.0, 6.0)))
    twilight_flux = np.where(sun_alt > -18.0, twilight_flux, 0.0)

    return _mag_from_nanolambert(dark_flux + moon_flux + twilight_flux)


def angular_separation(ra1: ArrayLike, dec1: ArrayLike, ra2: ArrayLike,
                       dec2: ArrayLike) -> NDArray[np.float64]:
    """Great-circle distance between two positions (Vincenty's formula), deg."""
    ra1, dec1, ra2, dec2 = (np.radians(np.asarray(v, dtype=float)) for v in (ra1, dec1, ra2, dec2))
    dra = ra2 - ra1
    num = np.hypot(np.cos(dec2) * np.sin(dra),
                   np.cos(dec1) * np.sin(dec2) - np.sin(dec1) * np.cos(dec2) * np.cos(dra))
    den = np.sin(dec1) * np.sin(dec2) + np.cos(dec1) * np.cos(dec2) * np.cos(dra)
    return np.degrees(np.arctan2(num, den))


def parallactic_angle(hour_angle_deg: ArrayLike, dec_deg: ArrayLike, lat_deg: float) -> NDArray[np.float64]:
    """Parallactic angle at hour angle ``hour_angle_deg``, deg (positive west of the meridian)."""
    h = np.radians(np.asarray(hour_angle_deg, dtype=float))
    dec = np.radians(np.asarray(dec_deg, dtype=float))
    lat = np.radians(lat_deg)
    return np.degrees(np.arctan2(np.sin(h), np.tan(lat) * np.cos(dec) - np.sin(dec) * np.cos(h)))
