"""Calibration products against the simulated electronics' truth (DetectorElectronics.truth())."""

from __future__ import annotations

import numpy as np
import pytest

from dmstream.payloads.calibration import (
    CrosstalkMeasurement,
    DefectFinder,
    MasterBias,
    MasterDark,
    MasterFlat,
    photon_transfer_gain,
)
from dmstream.payloads.camera import assemble, get_detector
from dmstream.payloads.isr import IsrCalibrations
from dmstream.streams.camera import DetectorElectronics, simulate_raw, truth_calibrations

DARKTIME = 100.0
FLAT_E = 30_000.0


@pytest.fixture(scope="module")
def electronics() -> DetectorElectronics:
    return DetectorElectronics.draw(get_detector("R22_S11"), seed=11)


@pytest.fixture(scope="module")
def truth(electronics):
    return electronics.truth()


@pytest.fixture(scope="module")
def base_calibs(electronics) -> IsrCalibrations:
    """Gains, non-linearity, crosstalk and saturation from the truth; the rest is measured."""
    truth = truth_calibrations(electronics)
    return IsrCalibrations(gain=truth.gain, read_noise=truth.read_noise, saturation=truth.saturation,
                           linearity=truth.linearity, crosstalk=truth.crosstalk)


@pytest.fixture(scope="module")
def biases(electronics):
    rng = np.random.default_rng(1)
    return [simulate_raw(None, 0.0, 0.0, electronics, rng) for _ in range(5)]


@pytest.fixture(scope="module")
def bias(electronics, biases, base_calibs):
    return MasterBias().run(biases, electronics.detector, base_calibs)


@pytest.fixture(scope="module")
def dark(electronics, bias, base_calibs):
    rng = np.random.default_rng(2)
    frames = [simulate_raw(None, 0.0, DARKTIME, electronics, rng) for _ in range(3)]
    calibs = IsrCalibrations(**{**base_calibs.__dict__, "read_noise": bias.read_noise, "bias": bias.bias,
                                "bias_variance": bias.variance})
    return MasterDark().run(frames, [DARKTIME] * 3, electronics.detector, calibs)


@pytest.fixture(scope="module")
def flats(electronics):
    rng = np.random.default_rng(3)
    signal = np.full(electronics.detector.shape, FLAT_E, dtype=np.float32)
    return [simulate_raw(signal, 10.0, 10.0, electronics, rng) for _ in range(3)]


@pytest.fixture(scope="module")
def flat(electronics, flats, bias, dark, base_calibs):
    calibs = IsrCalibrations(**{**base_calibs.__dict__, "read_noise": bias.read_noise, "bias": bias.bias,
                                "bias_variance": bias.variance, "dark": dark.dark})
    return MasterFlat().run(flats, [10.0] * len(flats), "r", electronics.detector, calibs)


def test_read_noise_from_bias_differences(bias, truth):
    np.testing.assert_allclose(bias.read_noise_adu, truth["read_noise_adu"], rtol=0.02)
    np.testing.assert_allclose(bias.read_noise, truth["read_noise"], rtol=0.02)


def test_master_bias_recovers_the_bias_structure(electronics, bias, truth):
    detector = electronics.detector
    # What the serial overscan leaves: the fixed column pattern, in electrons, up to a constant per amp.
    pattern = [np.broadcast_to(truth["bias_columns"][i] * truth["gain"][i], amp.raw_shape)
               for i, amp in enumerate(detector.amplifiers)]
    expected = assemble(pattern, detector, dtype=np.float32)
    for amp in detector.amplifiers:
        section = amp.detector_slices
        residual = bias.bias[section] - expected[section]
        residual -= residual.mean()
        noise = np.sqrt(bias.variance[section].mean())
        # Within the noise of the mean of 5 frames (plus the per-row overscan noise, a few %).
        assert residual.std() / noise == pytest.approx(1.0, abs=0.08)
        measured_columns = bias.bias[section].mean(axis=0)
        true_columns = expected[section].mean(axis=0)
        assert np.corrcoef(measured_columns, true_columns)[0, 1] > 0.99


def test_master_dark_recovers_dark_current_and_hot_pixels(electronics, dark, flat, truth):
    detector = electronics.detector
    defects = DefectFinder().run(dark, flat, detector)
    hot = truth["hot_pixels"]
    for amp in detector.amplifiers:
        rate = dark.dark[amp.detector_slices]
        typical = rate[rate < 0.5].mean()
        assert typical == pytest.approx(truth["dark_current"][amp.index], abs=0.002)
    # Every hot pixel above 1 e-/s is found, with its rate within 5 sigma; few false ones.
    bright = hot[hot["rate"] > 1.0]
    assert defects.defects[bright["y"], bright["x"]].all()
    measured = dark.dark[bright["y"], bright["x"]]
    base = [truth["dark_current"][_amp_at(detector, y, x)]
            for y, x in zip(bright["y"], bright["x"], strict=True)]
    expected = bright["rate"] + np.array(base)
    assert np.all(np.abs(measured - expected) < 5 * np.sqrt(dark.variance[bright["y"], bright["x"]]))
    true_hot = set(zip(hot["y"].tolist(), hot["x"].tolist(), strict=True))
    false_hot = [tuple(p) for p in defects.hot.tolist() if tuple(p) not in true_hot]
    assert len(false_hot) <= 3
    # Dead columns from the flat.
    dead = electronics.flat == 0
    assert np.array_equal(defects.defects & ~_hot_map(detector, defects.hot), dead)


def _amp_at(detector, y, x):
    for amp in detector.amplifiers:
        rows, cols = amp.detector_slices
        if rows.start <= y < rows.stop and cols.start <= x < cols.stop:
            return amp.index
    raise ValueError((y, x))


def _hot_map(detector, hot):
    result = np.zeros(detector.shape, dtype=bool)
    result[hot[:, 0], hot[:, 1]] = True
    return result


def test_master_flat_recovers_response_and_vignetting(electronics, flat, truth):
    live = truth["flat"] > 0
    expected = truth["flat"] / np.median(truth["flat"][live])
    pull = (flat.flat - expected)[live] / np.sqrt(flat.variance[live])
    assert np.abs(pull.mean()) < 0.05
    assert pull.std() == pytest.approx(1.0, abs=0.06)
    assert np.array_equal(flat.dead, ~live)
    assert flat.level == pytest.approx(FLAT_E / 1.0, rel=0.05)


def test_photon_transfer_gain(electronics, flats, bias, truth):
    result = photon_transfer_gain((flats[0], flats[1]), electronics.detector, bias.read_noise_adu,
                                  truth["nonlinearity"])
    np.testing.assert_allclose(result.gain, truth["gain"], rtol=0.015)


def _star(signal, y, x, flux, sigma):
    half = int(6 * sigma) + 1
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    stamp = flux / (2 * np.pi * sigma**2) * np.exp(-(yy**2 + xx**2) / (2 * sigma**2))
    signal[y - half:y + half + 1, x - half:x + half + 1] += stamp.astype(np.float32)


def test_crosstalk_matrix_from_saturated_stars(electronics, truth):
    detector = electronics.detector
    rng = np.random.default_rng(4)
    signal = np.full(detector.shape, 200.0, dtype=np.float32)
    for amp in detector.amplifiers:
        rows, cols = amp.detector_slices
        for _ in range(4):
            y = int(rng.integers(rows.start + 500, rows.stop - 500))
            x = int(rng.integers(cols.start + 30, cols.stop - 30))
            _star(signal, y, x, 1e8, 2.0)
    raw = simulate_raw(signal, 30.0, 30.0, electronics, rng)
    result = CrosstalkMeasurement().run([raw], detector)
    true = truth["crosstalk"]
    dominant = np.abs(true) >= 2e-4
    relative = np.abs(result.matrix[dominant] - true[dominant]) / np.abs(true[dominant])
    assert relative.max() < 0.10
    offdiag = ~np.eye(16, dtype=bool)
    pulls = (result.matrix - true)[offdiag] / result.error[offdiag]
    assert np.abs(pulls).std() < 1.3
    assert np.abs(pulls).max() < 5
