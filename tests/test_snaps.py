"""Snap combination against injected truth: cosmic rays in one snap, stars under a seeing change, a mover."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest

from dmstream.payloads import snaps
from dmstream.payloads.image import CcdImage
from dmstream.payloads.masks import MASK_DTYPE, MaskPlane
from dmstream.payloads.render import Psf, add_cosmic_rays, draw_point_sources

SHAPE = (640, 640)
SKY_E = 600.0
READ_NOISE_E = 7.0
SNAP_S = 15.0
MOVER_FLUX_E = 3e4
#: The mover's position in the first snap and its motion until the second, pixels.
MOVER_START, MOVER_STEP = (320.4, 150.6), (4.0, 1.5)


@dataclass
class Visit:
    first: CcdImage
    second: CcdImage
    truth: np.ndarray  # expected electrons of the sum, without cosmic rays
    cosmic_rays: np.ndarray  # electrons the cosmic rays added to the first snap
    stars: np.ndarray  # (n, 3) x, y, flux of one snap
    result: snaps.SnapCombineResult


def _snap(expected: np.ndarray, rng: np.random.Generator) -> CcdImage:
    """A post-ISR snap: Gaussian noise of Poisson and read variance; variance plane from the pixels."""
    noise = rng.standard_normal(expected.shape, dtype=np.float32) * np.sqrt(expected + READ_NOISE_E**2)
    image = (expected + noise).astype(np.float32)
    variance = (np.maximum(image, 0) + np.float32(READ_NOISE_E**2)).astype(np.float32)
    return CcdImage(image=image, variance=variance, mask=np.zeros(SHAPE, dtype=MASK_DTYPE), exptime=SNAP_S,
                    band="r", metadata={"DETECTOR": 94})


def _visit(seed: int, fwhm: tuple[float, float]) -> Visit:
    rng = np.random.default_rng(seed)
    n = 60
    stars = np.column_stack([rng.uniform(25, SHAPE[1] - 25, n), rng.uniform(25, SHAPE[0] - 25, n),
                             10 ** rng.uniform(3.5, 5.8, n)])
    expected = []
    for snap, seeing in enumerate(fwhm):
        signal = np.full(SHAPE, SKY_E, dtype=np.float32)
        # Guiding wanders by a few hundredths of a pixel between the snaps.
        jitter = rng.normal(0.0, 0.03, 2) if snap else np.zeros(2)
        draw_point_sources(signal, stars[:, 0] + jitter[0], stars[:, 1] + jitter[1], stars[:, 2],
                           Psf(fwhm=seeing))
        mover_x, mover_y = (start + snap * step for start, step in zip(MOVER_START, MOVER_STEP, strict=True))
        draw_point_sources(signal, mover_x, mover_y, MOVER_FLUX_E, Psf(fwhm=seeing))
        expected.append(signal)
    cosmic_rays = np.zeros(SHAPE, dtype=np.float32)
    add_cosmic_rays(cosmic_rays, rate=3.0, rng=rng, duration=SNAP_S)
    first = _snap(expected[0] + cosmic_rays, rng)
    second = _snap(expected[1], rng)
    return Visit(first, second, expected[0] + expected[1], cosmic_rays, stars,
                 snaps.run([first, second]))


@pytest.fixture(scope="module")
def visit() -> Visit:
    """Seeing 0.70″ then 0.76″ (an ordinary change between snaps)."""
    return _visit(1, (0.70, 0.76))


def _box(x: float, y: float, half: int) -> tuple[slice, slice]:
    """The (2 half + 1)² pixels around (x, y)."""
    column, row = round(float(x)), round(float(y))
    return np.s_[row - half:row + half + 1, column - half:column + half + 1]


def _near(truth: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within ``radius`` (box) of a True pixel."""
    grown = truth.copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            grown |= np.roll(np.roll(truth, dy, axis=0), dx, axis=1)
    return grown


def test_cosmic_rays_are_found_from_the_snap_difference(visit):
    flagged = (visit.result.exposure.mask & MaskPlane.CR) != 0
    sigma = np.sqrt(2 * visit.second.variance)
    bright = visit.cosmic_rays > 5 * sigma
    assert bright.sum() > 150
    assert flagged[bright].mean() >= 0.95
    # Beyond the one-pixel growth of the tracks, at most one 5-sigma noise peak (3x3 after growth).
    assert np.count_nonzero(flagged & ~_near(visit.cosmic_rays > 0, 1)) <= 9
    assert visit.result.n_cosmic_rays == np.count_nonzero(flagged)


def test_repaired_pixels_hold_twice_the_other_snap_and_agree_with_truth(visit):
    exposure = visit.result.exposure
    snap, y, x = visit.result.cosmic_rays.T
    assert np.all(snap == 0)
    np.testing.assert_array_equal(exposure.image[y, x], 2 * visit.second.image[y, x])
    np.testing.assert_array_equal(exposure.variance[y, x], 4 * visit.second.variance[y, x])
    pulls = (exposure.image[y, x] - visit.truth[y, x]) / np.sqrt(exposure.variance[y, x])
    assert abs(pulls.mean()) < 0.15
    assert pulls.std() == pytest.approx(1.0, abs=0.1)


def test_cosmic_rays_in_the_second_snap_are_found_alike(visit):
    """With the snaps swapped the tracks are in the second snap: same pixels flagged, same sum."""
    swapped = snaps.run([visit.second, visit.first])
    np.testing.assert_array_equal(swapped.cosmic_rays[:, 0], 1)
    np.testing.assert_array_equal(swapped.cosmic_rays[:, 1:], visit.result.cosmic_rays[:, 1:])
    np.testing.assert_array_equal(swapped.exposure.image, visit.result.exposure.image)
    np.testing.assert_array_equal(swapped.exposure.mask, visit.result.exposure.mask)


def test_no_cosmic_ray_charge_is_left_in_the_sum(visit):
    """Every pixel a track touched, faint edges included, is back to the noise (away from stars' guards)."""
    exposure = visit.result.exposure
    guarded = np.zeros(SHAPE, dtype=bool)
    for x, y, _flux in visit.stars:
        guarded[_box(x, y, 6)] = True
    touched = (visit.cosmic_rays > 0) & ~guarded
    pulls = (exposure.image - visit.truth)[touched] / np.sqrt(exposure.variance[touched])
    assert touched.sum() > 150
    assert abs(pulls.mean()) < 0.15
    assert np.abs(pulls).max() < 4.5


def _flagged_stars(visit: Visit) -> list[tuple[float, float]]:
    """Stars with CR pixels within 8 px that no track explains."""
    flagged = ((visit.result.exposure.mask & MaskPlane.CR) != 0) & ~_near(visit.cosmic_rays > 0, 1)
    return [(x, y) for x, y, _flux in visit.stars if flagged[_box(x, y, 8)].any()]


def test_no_star_is_flagged(visit):
    assert _flagged_stars(visit) == []


def test_star_fluxes_in_the_sum_equal_truth(visit):
    """Aperture fluxes of the sum against injected truth, save where the bright-star guard left a track."""
    exposure = visit.result.exposure
    flagged = (exposure.mask & MaskPlane.CR) != 0
    yy, xx = np.mgrid[-10:11, -10:11]
    aperture = yy**2 + xx**2 <= 10**2
    pulls, left = [], 0
    for x, y, _flux in visit.stars:
        cut = _box(x, y, 10)
        error = np.sqrt(exposure.variance[cut][aperture].sum(dtype=float))
        if (visit.cosmic_rays[cut] * ~flagged[cut])[aperture].sum() > error:
            left += 1
            continue
        pulls.append((exposure.image[cut][aperture].sum() - visit.truth[cut][aperture].sum()) / error)
    pulls = np.array(pulls)
    assert left <= 2
    assert np.abs(pulls).max() < 4
    assert np.mean(pulls**2) < 1.6


def test_the_sum_has_sqrt2_the_noise_of_a_snap_and_honest_variance(visit):
    exposure = visit.result.exposure
    sky = (visit.truth < 2 * SKY_E + 1) & ~_near(visit.cosmic_rays > 0, 2)
    ratio = (exposure.image - visit.truth)[sky].std() / (visit.first.image - visit.truth / 2)[sky].std()
    assert ratio == pytest.approx(np.sqrt(2), rel=0.02)
    pulls = (exposure.image - visit.truth) / np.sqrt(exposure.variance)
    assert pulls.std() == pytest.approx(1.0, abs=0.03)
    assert exposure.exptime == 2 * SNAP_S
    assert exposure.metadata["NSNAPS"] == 2 and exposure.metadata["DETECTOR"] == 94


def test_a_moving_object_is_kept_at_both_positions(visit):
    """A mover shifts 4.3 px between snaps: two PSF-shaped groups in the difference, neither a cosmic ray.

    The sum holds it at both positions, each with the flux of one snap.
    """
    exposure = visit.result.exposure
    flagged = ((exposure.mask & MaskPlane.CR) != 0) & ~_near(visit.cosmic_rays > 0, 1)
    for snap in range(2):
        x, y = (start + snap * step for start, step in zip(MOVER_START, MOVER_STEP, strict=True))
        assert not flagged[_box(x, y, 8)].any()
        # A 7x7 box holds ~70 % of a 0.7" PSF: the mover's light there, on top of the sky and the other image.
        box = _box(x, y, 3)
        measured, error = exposure.image[box].sum(), np.sqrt(exposure.variance[box].sum(dtype=float))
        assert measured == pytest.approx(visit.truth[box].sum(), abs=4 * error)
        assert measured - 49 * 2 * SKY_E > 0.5 * MOVER_FLUX_E
    assert visit.result.n_kept_changes >= 1


@pytest.mark.parametrize("seeing", [(0.60, 0.70), (0.70, 0.90)])
def test_a_large_seeing_change_at_bright_stars_flags_no_star(seeing):
    """Changes of 17 % and 29 % of the FWHM, more than seeing does in a few seconds: no star flagged."""
    assert _flagged_stars(_visit(2, seeing)) == []


def test_a_single_snap_is_returned_unchanged():
    rng = np.random.default_rng(3)
    only = _snap(np.full(SHAPE, SKY_E, dtype=np.float32), rng)
    result = snaps.run([only])
    assert result.exposure.image is only.image and result.exposure.mask is only.mask
    assert result.exposure.exptime == SNAP_S and result.exposure.metadata["NSNAPS"] == 1
    assert result.n_cosmic_rays == 0


def test_snaps_that_cannot_be_combined_are_refused():
    rng = np.random.default_rng(4)
    snap = _snap(np.full(SHAPE, SKY_E, dtype=np.float32), rng)
    with pytest.raises(snaps.SnapError, match="one or two snaps"):
        snaps.run([snap, snap, snap])
    with pytest.raises(snaps.SnapError, match="one or two snaps"):
        snaps.run([])
    small = CcdImage(snap.image[:100], snap.variance[:100], snap.mask[:100])
    with pytest.raises(snaps.SnapError, match="shape"):
        snaps.run([snap, small])
    with pytest.raises(snaps.SnapError, match="detectors"):
        snaps.run([snap, replace(snap, metadata={"DETECTOR": 95})])
