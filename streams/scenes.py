"""Science/template image pairs with injected truth, for testing and timing difference imaging.

The images stand for what calibration hands over: background-subtracted
electrons with an honest variance plane, a WCS and a PSF model (here the
simulator's own PSF behind a ``PsfModel`` adapter).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import galsim
import numpy as np
from astropy.wcs import WCS

from dmstream.payloads.image import CcdImage
from dmstream.payloads.masks import empty_mask
from dmstream.payloads.render import Psf, draw_point_sources, draw_trail

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


def _scatter(rng: np.random.Generator, radius: np.ndarray, shape: tuple[int, int], margin: float,
             taken: tuple[np.ndarray, np.ndarray, np.ndarray], separation: float
             ) -> tuple[np.ndarray, np.ndarray]:
    """Centres of discs of ``radius`` (pixels) inside the image less ``margin``, each at least
    ``separation`` clear of the others and of the discs ``taken`` (x, y, radius)."""
    rows, cols = shape
    xs, ys, rs = (list(np.asarray(v, float)) for v in taken)
    out_x, out_y = [], []
    for r in np.asarray(radius, float):
        for _ in range(10000):
            x = rng.uniform(margin + r, cols - margin - r)
            y = rng.uniform(margin + r, rows - margin - r)
            clear = np.hypot(np.array(xs) - x, np.array(ys) - y) >= np.array(rs) + r + separation
            if clear.all():
                break
        else:
            raise ValueError(f"no room for a disc of radius {r:.0f} px {separation} px clear of the others")
        xs.append(x)
        ys.append(y)
        rs.append(r)
        out_x.append(x)
        out_y.append(y)
    return np.array(out_x), np.array(out_y)


@dataclass
class Scene:
    """A science image, its template (on its own grid), and the truth.

    Positions are pixels of the science image, fluxes electrons of the
    science image, angles radians from +x towards +y.
    """

    science: CcdImage
    template: CcdImage
    transient_x: np.ndarray
    transient_y: np.ndarray
    transient_flux: np.ndarray
    star_x: np.ndarray
    star_y: np.ndarray
    negative_xy: tuple[float, float]
    dipole_xy: tuple[float, float]
    #: Streaks in the science image only: centre, length (pixels), direction, total flux.
    trail_x: np.ndarray = field(default_factory=lambda: np.zeros(0))
    trail_y: np.ndarray = field(default_factory=lambda: np.zeros(0))
    trail_length: np.ndarray = field(default_factory=lambda: np.zeros(0))
    trail_angle: np.ndarray = field(default_factory=lambda: np.zeros(0))
    trail_flux: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: Moving stars, at centre - separation/2 in the template and + separation/2 in the science image.
    mover_x: np.ndarray = field(default_factory=lambda: np.zeros(0))
    mover_y: np.ndarray = field(default_factory=lambda: np.zeros(0))
    mover_separation: np.ndarray = field(default_factory=lambda: np.zeros(0))
    mover_angle: np.ndarray = field(default_factory=lambda: np.zeros(0))
    mover_flux: np.ndarray = field(default_factory=lambda: np.zeros(0))


def make_scene(shape: tuple[int, int] = (1024, 1024), transients: int = 150, stars: int = 300,
               seed: int = 1, science_fwhm: float = 1.0, template_fwhm: float = 0.7,
               snr_range: tuple[float, float] = (3.0, 100.0), template_depth: float = 4.0,
               min_separation: float = 0.0, trails: int = 0,
               trail_length_range: tuple[float, float] = (2.0, 20.0),
               trail_snr_range: tuple[float, float] = (30.0, 300.0), movers: int = 0,
               mover_separation_range: tuple[float, float] = (0.2, 2.0),
               mover_snr_range: tuple[float, float] = (100.0, 3000.0)) -> Scene:
    """Static stars in both images, transients in the science image only, one fading star, one shifted star.

    Transient fluxes are spread log-uniformly so that their difference-image
    SNR (as point sources) runs over ``snr_range``.  On request, the
    transients (and the other objects below) keep ``min_separation`` pixels
    apart; ``trails`` streaks of lengths (arcsec) and SNRs drawn
    log-uniformly from their ranges, at random angles, cross the science
    image; ``movers`` stars of point-source SNR in ``mover_snr_range`` move
    between template and science image by a separation (pixels) drawn
    uniformly from ``mover_separation_range`` in a random direction, which
    leaves a dipole in the difference.  The template is ``template_depth``
    times deeper than the science image.
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
    if min_separation > 0:
        tx, ty = _scatter(rng, np.zeros(transients), shape, margin, (np.zeros(0),) * 3, min_separation)
    else:
        tx = rng.uniform(margin, cols - margin, transients)
        ty = rng.uniform(margin, rows - margin, transients)
    # Noise-equivalent area of the science PSF (Kolmogorov: about 2.3 times the Gaussian 4 pi sigma^2).
    fwhm_px = science_fwhm / PIXEL_SCALE
    nea = 2.3 * 4 * np.pi * (fwhm_px / 2.3548) ** 2
    noise = np.sqrt((SKY + READ_NOISE**2) * nea * 1.15)
    target_snr = 10 ** rng.uniform(*np.log10(snr_range), transients)
    flux = target_snr * noise
    negative = (float(cols * 0.3), float(rows * 0.7))
    dipole = (float(cols * 0.7), float(rows * 0.3))

    taken = (tx, ty, np.zeros(transients))
    trail_length = np.zeros(0)
    trail_angle = trail_flux = trail_x = trail_y = trail_length
    if trails:
        trail_length = 10 ** rng.uniform(*np.log10(trail_length_range), trails) / PIXEL_SCALE
        trail_angle = rng.uniform(0, np.pi, trails)
        # Noise of a streak: that of a point source times the root of how many PSF widths it covers.
        trail_flux = 10 ** rng.uniform(*np.log10(trail_snr_range), trails) * noise * np.sqrt(
            1 + trail_length / fwhm_px)
        trail_x, trail_y = _scatter(rng, trail_length / 2 + 2 * fwhm_px, shape, margin, taken, min_separation)
        taken = tuple(np.r_[a, b] for a, b in zip(taken, (trail_x, trail_y, trail_length / 2 + 2 * fwhm_px),
                                                   strict=True))
    mover_x = mover_y = mover_separation = mover_angle = mover_flux = np.zeros(0)
    if movers:
        mover_separation = rng.uniform(*mover_separation_range, movers)
        mover_angle = rng.uniform(0, 2 * np.pi, movers)
        mover_flux = 10 ** rng.uniform(*np.log10(mover_snr_range), movers) * noise
        mover_x, mover_y = _scatter(rng, np.zeros(movers), shape, margin, taken, max(min_separation, 1.0))
    mover_dx = mover_separation / 2 * np.cos(mover_angle)
    mover_dy = mover_separation / 2 * np.sin(mover_angle)

    science_psf = Psf(fwhm=science_fwhm)
    template_psf = Psf(fwhm=template_fwhm)
    science_truth = np.zeros(shape, np.float32)
    draw_point_sources(science_truth, sx, sy, star_flux, science_psf)
    draw_point_sources(science_truth, tx, ty, flux, science_psf)
    draw_point_sources(science_truth, mover_x + mover_dx, mover_y + mover_dy, mover_flux, science_psf)
    for x, y, length, angle, trail_total in zip(trail_x, trail_y, trail_length, trail_angle, trail_flux,
                                                strict=True):
        half_x, half_y = length / 2 * np.cos(angle), length / 2 * np.sin(angle)
        draw_trail(science_truth, x - half_x, y - half_y, x + half_x, y + half_y, trail_total, science_psf)
    # A star 40 % fainter in the science image, and one moved by 0.6 px.
    draw_point_sources(science_truth, [negative[0], dipole[0] + 0.6], [negative[1], dipole[1]],
                       [0.6 * 60000.0, 60000.0], science_psf)

    # The template sees the same sky (stars only) on its own grid, 4 times deeper, at its own zero point.
    t_sx, t_sy = template_wcs.world_to_pixel_values(*science_wcs.pixel_to_world_values(
        np.r_[sx, negative[0], dipole[0], mover_x - mover_dx],
        np.r_[sy, negative[1], dipole[1], mover_y - mover_dy]))
    template_truth = np.zeros(shape, np.float32)
    template_scale = 2.0
    draw_point_sources(template_truth, t_sx, t_sy,
                       np.r_[star_flux, 60000.0, 60000.0, mover_flux] * template_scale, template_psf)

    science_image, science_var = observe(science_truth, rng, SKY)
    template_image, template_var = observe(template_truth, rng, SKY * template_scale,
                                           depth=template_depth / template_scale)
    science = CcdImage(science_image, science_var, empty_mask(shape), science_wcs,
                       RenderPsfModel(science_psf, shape), ZERO_POINT, "r", 30.0, {"MJD-OBS": 61000.2})
    template = CcdImage(template_image, template_var, empty_mask(shape), template_wcs,
                        RenderPsfModel(template_psf, shape), ZERO_POINT + 2.5 * np.log10(template_scale), "r")
    return Scene(science, template, tx, ty, flux, sx, sy, negative, dipole, trail_x, trail_y, trail_length,
                 trail_angle, trail_flux, mover_x, mover_y, mover_separation, mover_angle, mover_flux)
