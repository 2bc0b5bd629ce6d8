"""Science/template image pairs with injected truth, for testing and timing difference imaging.

The images stand for what calibration hands over: background-subtracted
electrons with an honest variance plane, a WCS and a PSF model (here the
simulator's own PSF behind a ``PsfModel`` adapter).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import galsim
import numpy as np
from astropy.wcs import WCS

from dmstream.payloads.image import CcdImage
from dmstream.payloads.masks import empty_mask
from dmstream.payloads.render import Psf, draw_point_sources

PIXEL_SCALE = 0.2
READ_NOISE = 9.0
SKY = 1200.0
ZERO_POINT = 31.0


class RenderPsfModel:
    """``PsfModel`` of a :class:`~dmstream.payloads.render.Psf` on a detector of ``shape``."""

    def __init__(self, psf: Psf, shape: tuple[int, int]) -> None:
        self.psf, self.shape = psf, shape

    @lru_cache(maxsize=64)  # noqa: B019 - a few instances per test, each asked the same stamps
    def _centre_kernel(self, size: int) -> np.ndarray:
        profile = galsim.Convolve(self.psf.galsim_profile(0, 0, (1, 1)), galsim.Pixel(PIXEL_SCALE))
        stamp = profile.drawImage(nx=size, ny=size, scale=PIXEL_SCALE, method="no_pixel").array
        return stamp / stamp.sum()

    def kernel(self, x: float, y: float, size: int) -> np.ndarray:
        return self._centre_kernel(size)

    def fwhm(self, x: float, y: float) -> float:
        return self.psf.fwhm / PIXEL_SCALE


def tan_wcs(shape: tuple[int, int], ra: float, dec: float, rotation_deg: float = 0.0,
            offset: tuple[float, float] = (0.0, 0.0)) -> WCS:
    """A TAN WCS at 0.2″/px with the tangent point at the image centre (+ ``offset`` pixels)."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [(shape[1] + 1) / 2 + offset[0], (shape[0] + 1) / 2 + offset[1]]
    theta = np.radians(rotation_deg)
    scale = PIXEL_SCALE / 3600
    wcs.wcs.cd = scale * np.array([[-np.cos(theta), np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return wcs


def observe(expected: np.ndarray, rng: np.random.Generator, sky: float, depth: float = 1.0) -> tuple[
        np.ndarray, np.ndarray]:
    """Background-subtracted noisy image and its variance, for ``depth`` exposures' worth of signal."""
    variance = ((sky + np.clip(expected, 0, None)) / depth + READ_NOISE**2 / depth).astype(np.float32)
    image = expected + rng.standard_normal(expected.shape, dtype=np.float32) * np.sqrt(variance)
    return image.astype(np.float32), variance


@dataclass
class Scene:
    """A science image, its template (on its own grid), and the truth."""

    science: CcdImage
    template: CcdImage
    transient_x: np.ndarray
    transient_y: np.ndarray
    transient_flux: np.ndarray
    star_x: np.ndarray
    star_y: np.ndarray
    negative_xy: tuple[float, float]
    dipole_xy: tuple[float, float]


def make_scene(shape: tuple[int, int] = (1024, 1024), transients: int = 150, stars: int = 300,
               seed: int = 1, science_fwhm: float = 1.0, template_fwhm: float = 0.7) -> Scene:
    """Static stars in both images, transients in the science image only, one fading star, one shifted star.

    Transient fluxes are spread log-uniformly so that their difference-image
    SNR runs from about 3 to 100.
    """
    rng = np.random.default_rng(seed)
    rows, cols = shape
    ra, dec = 150.0, 2.0
    science_wcs = tan_wcs(shape, ra, dec, 0.0)
    template_wcs = tan_wcs(shape, ra, dec, 0.4, offset=(3.3, -2.6))
    margin = 40
    sx = rng.uniform(margin, cols - margin, stars)
    sy = rng.uniform(margin, rows - margin, stars)
    star_flux = 10 ** rng.uniform(3.0, 5.5, stars)
    tx = rng.uniform(margin, cols - margin, transients)
    ty = rng.uniform(margin, rows - margin, transients)
    # Noise-equivalent area of the science PSF (Kolmogorov: about 2.3 times the Gaussian 4 pi sigma^2).
    fwhm_px = science_fwhm / PIXEL_SCALE
    nea = 2.3 * 4 * np.pi * (fwhm_px / 2.3548) ** 2
    noise = np.sqrt((SKY + READ_NOISE**2) * nea * 1.15)
    target_snr = 10 ** rng.uniform(np.log10(3), 2.0, transients)
    flux = target_snr * noise
    negative = (float(cols * 0.3), float(rows * 0.7))
    dipole = (float(cols * 0.7), float(rows * 0.3))

    science_psf = Psf(fwhm=science_fwhm)
    template_psf = Psf(fwhm=template_fwhm)
    science_truth = np.zeros(shape, np.float32)
    draw_point_sources(science_truth, sx, sy, star_flux, science_psf)
    draw_point_sources(science_truth, tx, ty, flux, science_psf)
    # A star 40 % fainter in the science image, and one moved by 0.6 px.
    draw_point_sources(science_truth, [negative[0], dipole[0] + 0.6], [negative[1], dipole[1]],
                       [0.6 * 60000.0, 60000.0], science_psf)

    # The template sees the same sky (stars only) on its own grid, 4 times deeper, at its own zero point.
    t_sx, t_sy = template_wcs.world_to_pixel_values(*science_wcs.pixel_to_world_values(
        np.r_[sx, negative[0], dipole[0]], np.r_[sy, negative[1], dipole[1]]))
    template_truth = np.zeros(shape, np.float32)
    template_scale = 2.0
    draw_point_sources(template_truth, t_sx, t_sy, np.r_[star_flux, 60000.0, 60000.0] * template_scale,
                       template_psf)

    science_image, science_var = observe(science_truth, rng, SKY)
    template_image, template_var = observe(template_truth, rng, SKY * template_scale,
                                           depth=4 / template_scale)
    science = CcdImage(science_image, science_var, empty_mask(shape), science_wcs,
                       RenderPsfModel(science_psf, shape), ZERO_POINT, "r", 30.0, {"MJD-OBS": 61000.2})
    template = CcdImage(template_image, template_var, empty_mask(shape), template_wcs,
                        RenderPsfModel(template_psf, shape), ZERO_POINT + 2.5 * np.log10(template_scale), "r")
    return Scene(science, template, tx, ty, flux, sx, sy, negative, dipole)
