"""Warping, coadds and ZOGY subtraction on simulated images with known truth."""

import numpy as np
import pytest

from dmstream.payloads import coadd, subtract, warp
from dmstream.payloads.image import CcdImage
from dmstream.payloads.masks import MaskPlane, empty_mask
from dmstream.payloads.render import Psf, draw_point_sources
from dmstream.streams.scenes import ZERO_POINT, RenderPsfModel, make_scene, observe, tan_wcs

SHAPE = (512, 512)


def _robust_std(values: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def test_warp_matches_rendering_on_the_target_grid() -> None:
    source_wcs = tan_wcs(SHAPE, 150.0, 2.0, 0.4, offset=(3.3, -2.6))
    target_wcs = tan_wcs(SHAPE, 150.0, 2.0)
    rng = np.random.default_rng(3)
    x, y, flux = rng.uniform(40, 470, 50), rng.uniform(40, 470, 50), rng.uniform(1e4, 1e5, 50)
    psf = Psf(fwhm=0.8)
    expected = np.zeros(SHAPE, np.float32)
    draw_point_sources(expected, x, y, flux, psf)
    sx, sy = source_wcs.world_to_pixel_values(*target_wcs.pixel_to_world_values(x, y))
    drawn = np.zeros(SHAPE, np.float32)
    draw_point_sources(drawn, sx, sy, flux, psf)
    source = CcdImage(drawn, np.ones(SHAPE, np.float32), empty_mask(SHAPE), source_wcs,
                      RenderPsfModel(psf, SHAPE))
    result = warp.warp_image(source, target_wcs, SHAPE)
    inside = (result.image.mask & MaskPlane.NO_DATA) == 0
    residual = np.abs(result.image.image - expected)[inside].max()
    assert residual < 0.01 * expected.max()
    assert 0.97 < result.coverage < 1.0
    assert np.isnan(result.image.variance[~inside]).all()
    kernel = result.image.psf.kernel(256, 256, 31)
    assert kernel.sum() == pytest.approx(1.0)
    assert result.image.psf.fwhm(256, 256) == pytest.approx(4.0, rel=0.01)


def test_warp_keeps_a_flat_image_flat_and_spreads_flags() -> None:
    source_wcs = tan_wcs(SHAPE, 150.0, 2.0, 1.0, offset=(5.7, -4.2))
    target_wcs = tan_wcs(SHAPE, 150.0, 2.0)
    image = np.full(SHAPE, 100.0, np.float32)
    mask = empty_mask(SHAPE)
    image[300, 200] = np.nan
    mask[300, 200] = MaskPlane.NO_DATA
    mask[100, 400] = MaskPlane.SAT
    source = CcdImage(image, np.full(SHAPE, 4.0, np.float32), mask, source_wcs, None)
    result = warp.warp_image(source, target_wcs, SHAPE).image
    assert np.isfinite(result.image).all()
    # Lanczos taps reach 3 pixels, beyond the one-pixel growth of the flags: a zeroed NaN pixel
    # still leaks a little into its unflagged neighbours, so flatness is checked away from it.
    far = result.mask == 0
    for (row, col), plane in (((300, 200), MaskPlane.NO_DATA), ((100, 400), MaskPlane.SAT)):
        tx, ty = (int(np.rint(v)) for v in target_wcs.world_to_pixel_values(
            *source_wcs.pixel_to_world_values(col, row)))
        # Each flagged source pixel taints the few target pixels whose interpolant leans on it.
        near = (result.mask[ty - 4:ty + 5, tx - 4:tx + 5] & plane) != 0
        assert near[4, 4] and 9 <= near.sum() <= 16
        far[ty - 4:ty + 5, tx - 4:tx + 5] = False
    assert np.abs(result.image[far] - 100.0).max() < 1e-3
    assert np.abs(result.variance[far] - 4.0).max() < 1e-4


def test_difference_noise_is_white_and_score_is_an_snr() -> None:
    scene = make_scene(SHAPE, transients=0, stars=40, seed=4)
    template = warp.warp_image(scene.template, scene.science.wcs, SHAPE).image
    result = subtract.run(scene.science, template)
    clean = (result.difference.mask == 0)
    normalised = result.difference.image[clean] / np.sqrt(result.difference.variance[clean])
    assert _robust_std(normalised) == pytest.approx(1.0, abs=0.05)
    assert abs(np.median(normalised)) < 0.05
    assert _robust_std(result.snr[clean]) == pytest.approx(1.0, abs=0.07)
    assert result.difference.psf.kernel(0, 0, 41).sum() == pytest.approx(1.0)


def test_masks_propagate_and_patches_agree() -> None:
    scene = make_scene(SHAPE, transients=5, stars=20, seed=6)
    scene.science.mask[100:104, 200:260] |= np.uint32(MaskPlane.SAT)
    template = warp.warp_image(scene.template, scene.science.wcs, SHAPE).image
    whole = subtract.run(scene.science, template)
    mask = whole.difference.mask
    assert (mask[95:109, 195:265] & MaskPlane.SAT).all()
    assert (mask[:2] & MaskPlane.EDGE).all() and not (mask[256, 256] & MaskPlane.EDGE)
    assert (mask & MaskPlane.NO_DATA).any()  # the template's rotated grid leaves corners empty
    patched = subtract.run(scene.science, template, subtract.SubtractConfig(patch_size=256))
    interior = mask == 0
    # Constant PSFs: patching changes the difference by a few per cent of its noise at most (filter tails).
    assert np.abs(patched.difference.image - whole.difference.image)[interior].max() < 0.05 * np.sqrt(
        np.nanmedian(whole.difference.variance))


def test_coadd_flux_variance_and_psf() -> None:
    tile_wcs = tan_wcs(SHAPE, 150.0, 2.0)
    rng = np.random.default_rng(8)
    x, y = np.array([150.0, 300.0, 400.0]), np.array([200.0, 350.0, 120.0])
    flux_njy = 3e4  # per source at the coadd zero point 31.4 (1 count = 1 nJy)
    visits = []
    for k, (fwhm, rotation, sky) in enumerate([(0.7, 0.0, 800.0), (0.9, 0.3, 1200.0), (0.8, -0.2, 1000.0)]):
        wcs = tan_wcs(SHAPE, 150.0, 2.0, rotation, offset=(1.7 * k, -0.9 * k))
        psf = Psf(fwhm=fwhm)
        vx, vy = wcs.world_to_pixel_values(*tile_wcs.pixel_to_world_values(x, y))
        truth = np.zeros(SHAPE, np.float32)
        electrons = flux_njy * 10 ** (0.4 * (ZERO_POINT - 31.4))
        draw_point_sources(truth, vx, vy, electrons, psf)
        image, variance = observe(truth, rng, sky)
        visits.append(CcdImage(image, variance, empty_mask(SHAPE), wcs, RenderPsfModel(psf, SHAPE),
                               ZERO_POINT))
    result = coadd.run(visits, tile_wcs, SHAPE)
    stacked = result.coadd
    assert result.weights[0] > result.weights[2] > result.weights[1]
    kernel = stacked.psf.kernel(300, 350, 41)
    for sx, sy in zip(x, y, strict=True):
        ix, iy = round(sx), round(sy)
        box = (slice(iy - 20, iy + 21), slice(ix - 20, ix + 21))
        measured = (stacked.image[box] * kernel).sum() / (kernel**2).sum()
        assert measured == pytest.approx(flux_njy, rel=0.03)
    sky_pixels = stacked.image[5:60, 5:60]
    assert _robust_std(sky_pixels / np.sqrt(stacked.variance[5:60, 5:60])) == pytest.approx(1.0, abs=0.1)
    assert stacked.psf.fwhm(300, 350) == pytest.approx(4.0, rel=0.1)
    assert result.depth.max() == 3
