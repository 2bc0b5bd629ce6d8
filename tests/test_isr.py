"""ISR of simulated raw exposures against the known input electrons and the electronics' truth."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from dmstream.payloads.calibration import MasterBias
from dmstream.payloads.camera import get_detector
from dmstream.payloads.isr import Isr, IsrCalibrations, IsrConfig, interpolate_rows, serial_overscan_levels
from dmstream.payloads.masks import MaskPlane
from dmstream.streams.camera import DetectorElectronics, simulate_raw, truth_calibrations

SKY_E = 800.0
SIGMA_PX = 1.7


def _star(signal, y, x, flux, sigma=SIGMA_PX):
    half = int(6 * sigma) + 1
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    stamp = flux / (2 * np.pi * sigma**2) * np.exp(-(yy**2 + xx**2) / (2 * sigma**2))
    signal[y - half:y + half + 1, x - half:x + half + 1] += stamp.astype(np.float32)


@pytest.fixture(scope="module")
def electronics() -> DetectorElectronics:
    return DetectorElectronics.draw(get_detector("R22_S11"), seed=5)


@pytest.fixture(scope="module")
def calibs(electronics) -> IsrCalibrations:
    """Measured master bias; the other products from the truth, so that ISR alone is tested."""
    rng = np.random.default_rng(1)
    truth = truth_calibrations(electronics)
    raws = [simulate_raw(None, 0.0, 0.0, electronics, rng) for _ in range(4)]
    bias = MasterBias().run(raws, electronics.detector, truth)
    return replace(truth, bias=bias.bias, bias_variance=bias.variance)


@pytest.fixture(scope="module")
def scene(electronics):
    """Flat sky, isolated stars of known flux, two saturated stars and cosmic rays (e-, before the flat)."""
    detector = electronics.detector
    rng = np.random.default_rng(2)
    signal = np.full(detector.shape, SKY_E, dtype=np.float32)
    stars = []
    while len(stars) < 25:
        y, x = int(rng.integers(40, detector.shape[0] - 40)), int(rng.integers(40, detector.shape[1] - 40))
        if all(abs(y - sy) > 40 or abs(x - sx) > 40 for sy, sx, _ in stars):
            stars.append((y, x, float(10 ** rng.uniform(4.0, 5.5))))
    for y, x, flux in stars:
        _star(signal, y, x, flux)
    saturated = [(1000, 700), (3000, 2500)]
    for y, x in saturated:
        _star(signal, y, x, 3e7)
    cosmic = np.zeros(detector.shape, dtype=bool)
    for _ in range(15):
        y, x = int(rng.integers(20, detector.shape[0] - 20)), int(rng.integers(20, detector.shape[1] - 20))
        cosmic[y, x:x + 3] = True
    signal_with_crs = signal + np.where(cosmic, np.float32(4000.0), np.float32(0.0))
    raw = simulate_raw(signal_with_crs, 30.0, 30.0, electronics, rng)
    return signal, stars, saturated, cosmic, raw


@pytest.fixture(scope="module")
def result(electronics, calibs, scene):
    return Isr().run(scene[4], electronics.detector, calibs, exptime=30.0, darktime=30.0)


def test_isr_returns_the_input_electrons_within_noise(result, scene):
    signal, *_ = scene
    exposure = result.exposure
    good = exposure.mask == 0
    residual = (exposure.image - signal)[good]
    pull = residual / np.sqrt(exposure.variance[good])
    assert abs(residual.mean()) < 0.3
    # The variance comes from the noisy pixels themselves, which pulls the mean slightly negative.
    assert pull.mean() == pytest.approx(0.0, abs=0.03)
    assert pull.std() == pytest.approx(1.0, abs=0.03)


def test_overscan_measurements(result, electronics):
    np.testing.assert_allclose(result.overscan_noise, electronics.read_noise_adu, rtol=0.03)
    np.testing.assert_allclose(result.overscan_level, electronics.bias_level, atol=3.0)


def test_star_fluxes_within_errors(result, scene):
    signal, stars, *_ = scene
    exposure = result.exposure
    yy, xx = np.mgrid[-8:9, -8:9]
    aperture = yy**2 + xx**2 <= 7**2
    pulls = []
    for y, x, _flux in stars:
        cut = np.s_[y - 8:y + 9, x - 8:x + 9]
        true = (signal[cut] - SKY_E)[aperture].sum()
        measured = (exposure.image[cut] - SKY_E)[aperture].sum()
        pulls.append((measured - true) / np.sqrt(exposure.variance[cut][aperture].sum()))
    pulls = np.array(pulls)
    assert np.abs(pulls).max() < 4
    assert np.mean(pulls**2) < 2.0


def test_masks_sat_bad_intrp(result, scene, calibs, electronics):
    signal, _, saturated, *_ = scene
    mask = result.exposure.mask
    for y, x in saturated:
        assert mask[y, x] & MaskPlane.SAT
    full = signal * electronics.flat >= 1.02 * electronics.full_well.max()
    assert np.all(mask[full] & MaskPlane.SAT)
    assert np.array_equal((mask & MaskPlane.BAD) != 0, calibs.defects)
    assert np.all(mask[calibs.defects] & MaskPlane.INTRP)
    assert np.all(mask[(mask & MaskPlane.SAT) != 0] & MaskPlane.INTRP)
    assert result.n_saturated == np.count_nonzero(mask & MaskPlane.SAT)


def test_cosmic_rays_flagged_and_repaired(result, scene):
    signal, _, _, cosmic, _ = scene
    exposure = result.exposure
    flagged = (exposure.mask & MaskPlane.CR) != 0
    assert flagged[cosmic].mean() >= 0.9
    # Few false detections away from the injected tracks (a pixel of margin for their edges).
    near = cosmic.copy()
    for axis in (0, 1):
        near |= np.roll(cosmic, 1, axis) | np.roll(cosmic, -1, axis)
    assert np.count_nonzero(flagged & ~near) <= 10
    repaired = (exposure.image - signal)[cosmic & flagged] / np.sqrt(exposure.variance[cosmic & flagged])
    assert np.abs(repaired).max() < 5


def test_parallel_overscan_removes_the_column_pattern(electronics, calibs):
    rng = np.random.default_rng(3)
    raw = simulate_raw(None, 0.0, 0.0, electronics, rng)
    config = IsrConfig(do_parallel_overscan=True, do_bias=False, do_dark=False, do_flat=False,
                       do_defects=False, do_interpolation=False, do_cosmic_rays=False)
    image = Isr(config).run(raw, electronics.detector, calibs, 0.0, 0.0).exposure.image
    amp = electronics.detector.amplifiers[0]
    columns = image[amp.detector_slices].mean(axis=0)
    # Left: the noise of a 44-row median, ~1.25 rn / sqrt(44), not the 1.5 ADU pattern.
    expected = 1.25 * electronics.read_noise[0] / np.sqrt(44)
    assert columns.std() < 1.3 * expected
    pattern = electronics.bias_columns[0][amp.data_slices[1]][amp.flip[1]]
    assert abs(np.corrcoef(columns, pattern)[0, 1]) < 0.3


def test_interpolate_rows_is_linear_between_neighbours():
    image = np.tile(np.arange(10, dtype=np.float32), (3, 1))
    bad = np.zeros_like(image, dtype=bool)
    bad[0, 3:6] = True
    bad[1, 0:2] = True
    image[bad] = -100
    replaced = interpolate_rows(image, bad)
    assert np.array_equal(replaced, bad)
    np.testing.assert_allclose(image[0], np.arange(10))
    np.testing.assert_allclose(image[1, :2], [2, 2])


def test_overscan_levels_and_noise_are_exact_medians_even_with_outliers(electronics):
    """Row levels and the clipped noise equal numpy's medians, also where outliers leave the counted range."""
    detector = electronics.detector
    rng = np.random.default_rng(4)
    raw = simulate_raw(None, 0.0, 0.0, electronics, rng)
    first = detector.amplifiers[0].prescan + detector.amplifiers[0].data_shape[1] + 2
    raw[3][:, first + 5] += 50_000  # a hot overscan column: its median lies far outside the window
    raw[7][100:110, first:] += 30_000  # rows hit by a bleed trail reaching the serial register
    levels, noise = serial_overscan_levels(raw, detector)

    overscan = np.stack([amp[:, first:first + detector.amplifiers[0].serial_overscan - 2] for amp in raw])
    expected_levels = np.median(overscan, axis=2)
    deviation = overscan - expected_levels[:, :, None]
    deviation -= np.median(deviation, axis=1, keepdims=True)
    flat = deviation.reshape(16, -1)
    keep = np.abs(flat) <= 5 * 1.4826 * np.median(np.abs(flat), axis=1, keepdims=True)
    expected_noise = np.sqrt((flat**2 * keep).sum(axis=1) / keep.sum(axis=1))
    np.testing.assert_array_equal(levels, expected_levels.astype(np.float32))
    np.testing.assert_allclose(noise, expected_noise, rtol=1e-12)
    np.testing.assert_allclose(noise, electronics.read_noise_adu, rtol=0.03)
