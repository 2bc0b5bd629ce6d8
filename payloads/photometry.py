"""AB magnitudes, fluxes in nJy and electrons on an LSSTCam pixel.

Pure functions, no I/O.  The instrumental zero points are Rubin's systems
engineering values (syseng_throughputs v1.9, SMTN-002; the same numbers are
``SysEngVals.zp_t`` in rubin_scheduler and the fiducial zero points of
obs_lsst): the AB magnitude of a flat-spectrum source that gives one
photo-electron per second through the whole system with the atmosphere of
airmass 1.0.  Away from airmass 1 the extinction coefficients of
:mod:`dmstream.payloads.conditions` apply, as in rubin_scheduler's
``m5_flat_sed`` (a term ``-k (X - 1)``).  AB flux: 0 mag is 3631 Jy, so
m = 31.4 - 2.5 log10(f / nJy).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from dmstream.payloads.conditions import BANDS, EXTINCTION

#: AB magnitude giving 1 e⁻/s on LSSTCam at airmass 1.0 (syseng_throughputs v1.9).
ZERO_POINT_E_PER_S = {"u": 26.52, "g": 28.51, "r": 28.36, "i": 28.17, "z": 27.78, "y": 26.82}
#: AB magnitude of a flux of 1 nJy: 2.5 log10(3631 Jy / 1 nJy).
AB_NJY_ZERO_POINT = 2.5 * np.log10(3631e9)
#: LSSTCam pixel scale, arcsec per pixel.
PIXEL_SCALE = 0.2


def _check_band(band: str) -> None:
    if band not in BANDS:
        raise ValueError(f"unknown band {band!r}; expected one of {BANDS}")


def mag_to_njy(mag: ArrayLike) -> NDArray[np.float64]:
    """AB magnitude to flux density, nJy."""
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - AB_NJY_ZERO_POINT))


def njy_to_mag(flux_njy: ArrayLike) -> NDArray[np.float64]:
    """Flux density (nJy, > 0) to AB magnitude; NaN where the flux is not positive."""
    flux = np.asarray(flux_njy, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, AB_NJY_ZERO_POINT - 2.5 * np.log10(flux), np.nan)


def exposure_zero_point(band: str, exptime: float, airmass: float = 1.0, transparency: float = 1.0) -> float:
    """AB magnitude of a point source that gives 1 e⁻ in the whole exposure.

    Parameters
    ----------
    band : str
        LSST band, ``u`` … ``y``.
    exptime : float
        Open-shutter time, s.
    airmass : float
        Airmass of the observation.
    transparency : float
        Fraction of the light that the clouds let through (1 for a clear sky).

    Returns
    -------
    float
        Zero point, AB mag.
    """
    _check_band(band)
    if exptime <= 0 or transparency <= 0:
        raise ValueError(f"need exptime > 0 and transparency > 0, got {exptime}, {transparency}")
    return (ZERO_POINT_E_PER_S[band] + 2.5 * np.log10(exptime) - EXTINCTION[band] * (airmass - 1.0)
            + 2.5 * np.log10(transparency))


def mag_to_electrons(mag: ArrayLike, band: str, exptime: float, airmass: float = 1.0,
                     transparency: float = 1.0) -> NDArray[np.float64]:
    """Expected photo-electrons of a source of AB magnitude ``mag`` in one exposure.

    Parameters
    ----------
    mag : array_like
        AB magnitudes above the atmosphere.
    band, exptime, airmass, transparency
        As for :func:`exposure_zero_point`.

    Returns
    -------
    numpy.ndarray
        Electrons (all pixels together).
    """
    zero_point = exposure_zero_point(band, exptime, airmass, transparency)
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - zero_point))


def electrons_to_mag(electrons: ArrayLike, band: str, exptime: float, airmass: float = 1.0,
                     transparency: float = 1.0) -> NDArray[np.float64]:
    """Inverse of :func:`mag_to_electrons`; NaN where ``electrons`` is not positive."""
    zero_point = exposure_zero_point(band, exptime, airmass, transparency)
    counts = np.asarray(electrons, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(counts > 0, zero_point - 2.5 * np.log10(counts), np.nan)


def njy_to_electrons(flux_njy: ArrayLike, band: str, exptime: float, airmass: float = 1.0,
                     transparency: float = 1.0) -> NDArray[np.float64]:
    """Expected photo-electrons of a source of flux density ``flux_njy`` (nJy) in one exposure."""
    zero_point = exposure_zero_point(band, exptime, airmass, transparency)
    return np.asarray(flux_njy, dtype=float) * 10.0 ** (-0.4 * (AB_NJY_ZERO_POINT - zero_point))


def electrons_to_njy(electrons: ArrayLike, band: str, exptime: float, airmass: float = 1.0,
                     transparency: float = 1.0) -> NDArray[np.float64]:
    """Inverse of :func:`njy_to_electrons`: flux density, nJy."""
    zero_point = exposure_zero_point(band, exptime, airmass, transparency)
    return np.asarray(electrons, dtype=float) * 10.0 ** (0.4 * (AB_NJY_ZERO_POINT - zero_point))


def sky_electrons_per_pixel(sky_mag: ArrayLike, band: str, exptime: float,
                            pixel_scale: float = PIXEL_SCALE) -> NDArray[np.float64]:
    """Expected sky photo-electrons per pixel in one exposure.

    The sky brightness is the one seen from the ground (it already includes the
    brightening towards the horizon), so the airmass-1 zero point applies with
    no extinction term, as rubin_scheduler counts sky photons.  Clouds are not
    taken to dim it: they scatter moonlight and city light as much as they
    absorb airglow.

    Parameters
    ----------
    sky_mag : array_like
        Sky surface brightness, AB mag/arcsec².
    band : str
        LSST band.
    exptime : float
        Open-shutter time, s.
    pixel_scale : float
        Arcsec per pixel.

    Returns
    -------
    numpy.ndarray
        Electrons per pixel.
    """
    _check_band(band)
    rate = 10.0 ** (-0.4 * (np.asarray(sky_mag, dtype=float) - ZERO_POINT_E_PER_S[band]))
    return rate * exptime * pixel_scale**2
