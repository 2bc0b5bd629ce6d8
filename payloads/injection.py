"""Synthetic point sources added to a calibrated exposure, to measure what detection recovers.

As Rubin's source injection does, sources go into the calibrated science
exposure before subtraction, drawn with the exposure's own PSF model (moved
to their sub-pixel positions by the shift theorem, which an interpolating
kernel would blur by a few hundredths of a pixel), with
their photon noise added to the pixels and to the variance, and flagged
``INJECTED`` in the mask so that nothing downstream mistakes them for real
transients.  The truth table returned is what recovery is scored against.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from dmstream.payloads.image import CcdImage
from dmstream.payloads.masks import MASK_DTYPE, MaskPlane
from dmstream.payloads.photometry import AB_NJY_ZERO_POINT


@dataclass(frozen=True)
class InjectionConfig:
    """Where and how bright the injected sources are.

    Attributes
    ----------
    count : int
        Sources to inject.
    magnitudes : tuple of float
        AB magnitude range, drawn uniformly.
    edge_margin : int
        Pixels kept clear at the borders.
    min_separation : float
        Minimum distance between two injected sources, pixels.
    stamp_fwhms : float
        Half-width of the drawn stamps, in PSF FWHM.
    flag_radius_fwhms : float
        Radius of the ``INJECTED`` mask around each source, in PSF FWHM.
    seed : int
    """

    count: int = 200
    magnitudes: tuple[float, float] = (18.0, 24.0)
    edge_margin: int = 64
    min_separation: float = 40.0
    stamp_fwhms: float = 5.0
    flag_radius_fwhms: float = 1.0
    seed: int = 0


@dataclass
class InjectionResult:
    """An exposure with sources added and what was added.

    Attributes
    ----------
    exposure : CcdImage
        A copy of the input with the sources in ``image`` and ``variance``
        and ``INJECTED`` set in ``mask``.
    truth : pyarrow.Table
        One row per source: ``injection_id``, ``x``, ``y`` (0-based pixels),
        ``ra``, ``dec`` (deg), ``mag`` (AB), ``flux_e`` (electrons in the
        exposure), ``flux_njy``.
    """

    exposure: CcdImage
    truth: pa.Table


def _positions(rng: np.random.Generator, shape: tuple[int, int], config: InjectionConfig
               ) -> tuple[np.ndarray, np.ndarray]:
    """Uniform positions on the detector, none closer than ``min_separation`` to another (dart throwing)."""
    rows, cols = shape
    low, high_x, high_y = config.edge_margin, cols - 1 - config.edge_margin, rows - 1 - config.edge_margin
    if high_x <= low or high_y <= low:
        raise ValueError(f"a {shape} exposure has no room inside an edge margin of {config.edge_margin}")
    kept_x: list[float] = []
    kept_y: list[float] = []
    for _ in range(50):
        x = rng.uniform(low, high_x, 4 * config.count)
        y = rng.uniform(low, high_y, 4 * config.count)
        for xi, yi in zip(x, y, strict=True):
            if len(kept_x) == config.count:
                return np.array(kept_x), np.array(kept_y)
            if not kept_x or np.min(np.hypot(np.array(kept_x) - xi, np.array(kept_y) - yi)) \
                    >= config.min_separation:
                kept_x.append(float(xi))
                kept_y.append(float(yi))
    raise ValueError(f"{config.count} sources {config.min_separation} px apart do not fit on a {shape} "
                     "exposure")


def _shifted(stamp: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """A centred stamp moved by (dx, dy) pixels by the shift theorem: exact for a band-limited PSF."""
    rows, cols = stamp.shape
    phase = np.exp(-2j * np.pi * (np.fft.fftfreq(rows)[:, None] * dy + np.fft.rfftfreq(cols)[None, :] * dx))
    return np.fft.irfft2(np.fft.rfft2(stamp) * phase, stamp.shape)


def run(exposure: CcdImage, config: InjectionConfig | None = None) -> InjectionResult:
    """Inject point sources into a calibrated exposure.

    Parameters
    ----------
    exposure : CcdImage
        Calibrated: with a PSF, a WCS and a zero point (AB magnitude of one electron).
    config : InjectionConfig, optional

    Returns
    -------
    InjectionResult
    """
    config = config or InjectionConfig()
    if exposure.psf is None or exposure.wcs is None or exposure.zero_point is None:
        raise ValueError("injection needs a calibrated exposure: PSF, WCS and zero point")
    rng = np.random.default_rng(config.seed)
    x, y = _positions(rng, exposure.shape, config)
    mag = rng.uniform(*config.magnitudes, x.size)
    flux_e = 10.0 ** (-0.4 * (mag - exposure.zero_point))
    image, variance, mask = exposure.image.copy(), exposure.variance.copy(), exposure.mask.copy()
    for xi, yi, fi in zip(x, y, flux_e, strict=True):
        fwhm = exposure.psf.fwhm(xi, yi)
        half = int(np.ceil(config.stamp_fwhms * fwhm))
        cx, cy = round(xi), round(yi)
        stamp = _shifted(np.asarray(exposure.psf.kernel(xi, yi, 2 * half + 1), float), xi - cx, yi - cy)
        stamp *= fi / stamp.sum()
        box = (slice(cy - half, cy + half + 1), slice(cx - half, cx + half + 1))
        noise = rng.standard_normal(stamp.shape) * np.sqrt(np.clip(stamp, 0.0, None))
        image[box] += (stamp + noise).astype(np.float32)
        variance[box] += np.clip(stamp, 0.0, None).astype(np.float32)
        radius = config.flag_radius_fwhms * fwhm
        oy, ox = np.ogrid[-half:half + 1, -half:half + 1]
        mask[box][(ox + cx - xi) ** 2 + (oy + cy - yi) ** 2 <= radius**2] |= MASK_DTYPE(MaskPlane.INJECTED)
    ra, dec = exposure.wcs.pixel_to_world_values(x, y)
    truth = pa.table({
        "injection_id": pa.array(np.arange(x.size), pa.int64()),
        "x": x, "y": y, "ra": np.asarray(ra, float), "dec": np.asarray(dec, float), "mag": mag,
        "flux_e": flux_e, "flux_njy": 10.0 ** (-0.4 * (mag - AB_NJY_ZERO_POINT)),
    })
    return InjectionResult(replace(exposure, image=image, variance=variance, mask=mask), truth)
