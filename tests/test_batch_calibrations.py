"""Calibration products through the Data Backbone, against the simulated camera's truth.

One small simulated night (calibration exposures only: 2 biases, 1 dark, 1 flat
in r, one full-size e2v detector) is ingested into a backbone; the masters are
built from it and compared with the electronics the simulator drew.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from click.testing import CliRunner

from dmstream.backbone import Backbone
from dmstream.batch.calibrations import (
    MissingCalibrationError,
    build_masters,
    ingest_curated,
    isr_calibrations,
)
from dmstream.cli import main
from dmstream.payloads.camera import assemble, get_detector
from dmstream.payloads.isr import Isr, IsrConfig
from dmstream.settings import ENV_PREFIX
from dmstream.streams.camera import DetectorElectronics, simulate_raw, truth_calibrations
from dmstream.streams.night import NightFormatError
from dmstream.streams.observatory import NightConfig
from dmstream.streams.simulate import SimulationConfig, simulate_night

SEED, DAY_OBS, DETECTOR = 4, 20261209, "R22_S11"
INSTRUMENT = "LSSTCam"
SKY_E = 800.0


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("calibration-night") / "night"
    config = NightConfig(seed=SEED, day_obs=DAY_OBS, n_visits=0, bands=("r",), n_bias=2, n_dark=1, n_flat=1)
    simulate_night(out, SimulationConfig(night=config, detectors=(DETECTOR,), compress=False, jobs=2))
    return out


@pytest.fixture(scope="module")
def electronics() -> DetectorElectronics:
    """What the simulator drew for the detector: the truth the products are checked against."""
    return DetectorElectronics.draw(get_detector(DETECTOR), SEED)


def _new_backbone(root: Path) -> Backbone:
    return Backbone(f"sqlite:///{root}/r.sqlite3", root / "files")


def _raws(night: Path, img_types: set[str]) -> list[Path]:
    return [path for path in sorted((night / "raw").rglob("*.fits"))
            if fits.getheader(path)["IMGTYPE"] in img_types]


@pytest.fixture(scope="module")
def backbone(night: Path, tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    store = _new_backbone(tmp_path_factory.mktemp("backbone"))
    for path in _raws(night, {"BIAS", "DARK", "FLAT"}):
        store.ingest_raw(path)
    ingest_curated(night, store)
    yield store
    store.close()


@pytest.fixture(scope="module")
def built(backbone: Backbone):
    return build_masters(backbone, DAY_OBS)


def _master(backbone: Backbone, dataset_type: str, **extra) -> dict[str, np.ndarray]:
    return backbone.get(dataset_type, instrument=INSTRUMENT, day_obs=DAY_OBS, detector=94, **extra)


def _pulls(measured: np.ndarray, truth: np.ndarray, variance: np.ndarray) -> np.ndarray:
    return ((measured - truth) / np.sqrt(variance)).ravel()


def test_the_first_build_makes_a_bias_a_dark_and_a_flat_per_band(built) -> None:
    assert [(p.ref.dataset_type, p.ref.data_id.get("band")) for p in built.new] == [
        ("bias", None), ("dark", None), ("flat", "r")]
    assert built.kept == []


def test_master_bias_recovers_the_bias_structure_within_its_noise(backbone, built, electronics) -> None:
    bias = _master(backbone, "bias")
    detector = electronics.detector
    # What overscan correction leaves of a bias: the fixed column pattern in e-, up to a constant per amp.
    pattern = assemble([np.broadcast_to(electronics.bias_columns[i] * electronics.gain[i], amp.raw_shape)
                        for i, amp in enumerate(detector.amplifiers)], detector, dtype=np.float32)
    for amp in detector.amplifiers:
        section = amp.detector_slices
        pulls = _pulls(bias["image"][section], pattern[section], bias["variance"][section])
        # The per-row overscan levels add a few % of noise that the variance model leaves out.
        assert pulls.std() == pytest.approx(1.0, abs=0.05)


def test_master_dark_recovers_dark_current_and_hot_pixels_within_its_noise(backbone, built,
                                                                            electronics) -> None:
    dark = _master(backbone, "dark")
    truth = electronics.dark_image()
    for amp in electronics.detector.amplifiers:
        # Truth 0.002-0.02 e-/s; a 30 s dark measures it to ~0.001 e-/s (the per-row overscan levels).
        assert (dark["image"] - truth)[amp.detector_slices].mean() == pytest.approx(0.0, abs=0.005)
    pulls = _pulls(dark["image"], truth, dark["variance"])
    # The noise model counts a pixel's own positive read noise as Poisson signal, which shrinks
    # positive pulls: with one dark frame and ~7 e- of read noise, by a few % (mean < 0, std < 1).
    assert pulls.mean() == pytest.approx(0.0, abs=0.04)
    assert pulls.std() == pytest.approx(1.0, abs=0.05)
    hot = electronics.hot_pixels
    hot_pulls = _pulls(dark["image"][hot["y"], hot["x"]], truth[hot["y"], hot["x"]],
                       dark["variance"][hot["y"], hot["x"]])
    assert np.all(np.abs(hot_pulls) < 5)


def test_master_flat_recovers_the_pixel_response_within_its_noise(backbone, built, electronics) -> None:
    flat = _master(backbone, "flat", band="r")
    live = electronics.flat > 0
    truth = electronics.flat / np.median(electronics.flat[live])
    pulls = _pulls(flat["image"][live], truth[live], flat["variance"][live])
    assert pulls.mean() == pytest.approx(0.0, abs=0.02)
    assert pulls.std() == pytest.approx(1.0, abs=0.03)
    # Dead columns divide by 1: ISR flags them from the defects instead.
    assert np.all(flat["image"][~live] == 1.0)


def test_isr_calibrations_are_the_curated_values_exactly_and_the_latest_masters(backbone, built,
                                                                               electronics) -> None:
    calibs = isr_calibrations(backbone, INSTRUMENT, DAY_OBS, DETECTOR, "r")
    truth = truth_calibrations(electronics)
    for name in ("gain", "read_noise", "saturation", "linearity", "crosstalk", "defects"):
        assert np.array_equal(getattr(calibs, name), getattr(truth, name)), name
    assert np.array_equal(calibs.suspect, IsrConfig().suspect_fraction * truth.saturation)
    assert np.array_equal(calibs.flat, _master(backbone, "flat", band="r")["image"])
    # A later day uses the latest products made before it; an earlier day has none.
    later = isr_calibrations(backbone, INSTRUMENT, DAY_OBS + 3, 94, "r")
    for name in ("bias", "bias_variance", "dark", "dark_variance", "flat", "flat_variance", "defects"):
        assert np.array_equal(getattr(later, name), getattr(calibs, name)), name
    with pytest.raises(MissingCalibrationError, match="no camera constants, crosstalk, defects, bias, dark, "
                                                      "flat of band r made for day_obs 20261208 or before"):
        isr_calibrations(backbone, INSTRUMENT, DAY_OBS - 1, DETECTOR, "r")


def test_a_missing_flat_is_named_with_its_band(backbone, built) -> None:
    with pytest.raises(MissingCalibrationError, match=r"R22_S11 \(94\): no flat of band g made for day_obs"):
        isr_calibrations(backbone, INSTRUMENT, DAY_OBS, DETECTOR, "g")


def test_building_and_ingesting_again_change_nothing(backbone, built, night) -> None:
    counts = backbone.counts()
    again = build_masters(backbone, DAY_OBS, detectors=[DETECTOR])
    assert again.new == [] and [p.ref for p in again.kept] == [p.ref for p in built.new]
    assert ingest_curated(night, backbone).new == []
    assert backbone.counts() == counts


def test_isr_with_the_assembled_calibrations_returns_the_injected_electrons(backbone, built,
                                                                          electronics) -> None:
    detector = electronics.detector
    rng = np.random.default_rng(7)
    signal = np.full(detector.shape, SKY_E, dtype=np.float32)
    yy, xx = np.mgrid[-12:13, -12:13]
    for _ in range(30):
        y, x = rng.integers(20, detector.shape[0] - 20), rng.integers(20, detector.shape[1] - 20)
        signal[y - 12:y + 13, x - 12:x + 13] += 2e4 / (2 * np.pi * 2.0**2) * np.exp(-(yy**2 + xx**2) / 8.0)
    raw = simulate_raw(signal, 30.0, 30.0, electronics, rng)
    calibs = isr_calibrations(backbone, INSTRUMENT, DAY_OBS, DETECTOR, "r")
    exposure = Isr().run(raw, detector, calibs, exptime=30.0, darktime=30.0).exposure
    good = exposure.mask == 0
    assert np.count_nonzero(~good) == pytest.approx(np.count_nonzero(calibs.defects), rel=0.05)
    residual = (exposure.image - signal)[good]
    pulls = residual / np.sqrt(exposure.variance[good])
    assert abs(residual.mean()) < 0.5
    assert pulls.mean() == pytest.approx(0.0, abs=0.03)
    assert pulls.std() == pytest.approx(1.0, abs=0.03)


def test_missing_exposures_and_curated_calibrations_are_named(night, tmp_path) -> None:
    only_flats = _new_backbone(tmp_path / "flats")
    for path in _raws(night, {"FLAT"}):
        only_flats.ingest_raw(path)
    ingest_curated(night, only_flats)
    with pytest.raises(MissingCalibrationError, match=r"R22_S11 \(94\), day_obs 20261209: too few "
                                                      r"calibration exposures .*: BIAS \(0 of at least 2\), "
                                                      r"DARK \(0 of"):
        build_masters(only_flats, DAY_OBS)
    no_curated = _new_backbone(tmp_path / "no-curated")
    for path in _raws(night, {"BIAS", "DARK", "FLAT"}):
        no_curated.ingest_raw(path)
    with pytest.raises(MissingCalibrationError, match="no camera constants, crosstalk, defects made"):
        build_masters(no_curated, DAY_OBS)
    assert no_curated.query("bias") == []
    with pytest.raises(MissingCalibrationError, match="no raw exposures of day_obs 20261208"):
        build_masters(no_curated, DAY_OBS - 1)


def test_a_malformed_curated_calibration_is_refused_naming_its_file(night, tmp_path) -> None:
    copy = tmp_path / "night"
    shutil.copytree(night, copy, ignore=shutil.ignore_patterns("raw"))
    listing = json.loads((copy / "night.json").read_text())["curated_calibrations"][DETECTOR]
    constants = json.loads((copy / listing["constants"]).read_text())
    constants["amplifiers"] = constants["amplifiers"][:15]
    (copy / listing["constants"]).write_text(json.dumps(constants))
    store = _new_backbone(tmp_path / "store")
    with pytest.raises(NightFormatError, match=r"R22_S11\.json: not a curated calibration.*Segment"):
        ingest_curated(copy, store)
    assert store.query("crosstalk") == []


def test_cli_ingests_and_builds_and_says_what_it_did(backbone, built, night, monkeypatch) -> None:
    monkeypatch.setenv(ENV_PREFIX + "REGISTRY_URL", str(backbone.registry.engine.url))
    monkeypatch.setenv(ENV_PREFIX + "BACKBONE_ROOT", str(backbone.datastore.root))
    runner = CliRunner()
    ingested = runner.invoke(main, ["calibs", "ingest-curated", str(night)])
    assert ingested.exit_code == 0, ingested.output
    assert ingested.output.splitlines()[-1] == "ingested 0 calibration product(s); 3 already in the backbone"
    rebuilt = runner.invoke(main, ["calibs", "build", "--day-obs", str(DAY_OBS), "--detector", DETECTOR])
    assert rebuilt.exit_code == 0, rebuilt.output
    lines = rebuilt.output.splitlines()
    assert any(line.split()[:2] == ["kept", "flat"] and "band=r" in line for line in lines)
    assert rebuilt.output.splitlines()[-1] == "built 0 calibration product(s); 3 already in the backbone"
    unknown = runner.invoke(main, ["calibs", "build", "--day-obs", str(DAY_OBS), "--detector", "R99_S99"])
    assert unknown.exit_code == 2 and "no LSSTCam science detector 'R99_S99'" in unknown.output
    empty = runner.invoke(main, ["calibs", "build", "--day-obs", "20200101"])
    assert empty.exit_code == 1 and "no raw exposures of day_obs 20200101" in empty.output
