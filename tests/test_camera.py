"""The LSSTCam geometry and the simulated detector electronics."""

from __future__ import annotations

import numpy as np
import pytest

from dmstream.payloads.camera import (
    E2V_READOUT,
    ITL_READOUT,
    assemble,
    detector_wcs,
    disassemble,
    focal_plane,
    get_detector,
    parse_section,
)
from dmstream.streams.camera import DetectorElectronics, simulate_raw

SKY_E = 1000.0


def test_focal_plane_has_rubins_science_detectors() -> None:
    detectors = focal_plane()
    assert len(detectors) == 189
    assert [d.id for d in detectors] == list(range(189))
    assert get_detector("R22_S11").id == 94 and get_detector(94).name == "R22_S11"
    assert get_detector("R01_S00").id == 0 and get_detector("R43_S22").id == 188
    assert get_detector("R10_S02").id == 29 and get_detector("R22_S21").id == 97
    assert {d.raft for d in detectors if d.vendor == "ITL"} == {
        "R01", "R02", "R03", "R10", "R20", "R41", "R42", "R43"}
    assert sum(d.vendor == "E2V" for d in detectors) == 13 * 9
    assert get_detector("R22_S11").center_mm == (0.0, 0.0)
    assert get_detector("R01_S00").center_mm == pytest.approx((-127.0 - 42.25, -254.0 - 42.25))
    centres = np.array([d.center_mm for d in detectors])
    gaps = np.hypot(*(centres[:, None, :] - centres[None, :, :]).transpose(2, 0, 1))
    assert gaps[~np.eye(189, dtype=bool)].min() == pytest.approx(42.25)
    with pytest.raises(KeyError):
        get_detector("R00_S11")


@pytest.mark.parametrize("name", ["R22_S11", "R01_S01"])
def test_data_sections_tile_the_detector_once(name: str) -> None:
    detector = get_detector(name)
    coverage = np.zeros(detector.shape, dtype=np.int32)
    for amp in detector.amplifiers:
        coverage[amp.detector_slices] += 1
        assert amp.raw_shape == (2048, 576)
    assert (coverage == 1).all()
    assert detector.shape == ((4000, 4072) if detector.vendor == "ITL" else (4004, 4096))


def test_sections_match_lsstcam_raws() -> None:
    itl = {amp.name: amp for amp in get_detector("R01_S01").amplifiers}
    e2v = {amp.name: amp for amp in get_detector("R22_S11").amplifiers}
    # As in LSSTCam ITL raws and LSSTCamSim e2v raws.
    assert itl["Segment10"].datasec == "[4:512,1:2000]"
    assert itl["Segment00"].detsec == "[509:1,1:2000]"
    assert e2v["Segment13"].datasec == "[11:522,1:2002]"
    assert e2v["Segment13"].detsec == "[2048:1537,4004:2003]"
    assert e2v["Segment00"].detsec == "[1:512,1:2002]"
    assert itl["Segment10"].biassec == "[513:576,1:2000]"
    assert parse_section("[509:1,1:2000]") == (509, 1, 1, 2000)
    with pytest.raises(ValueError):
        parse_section("[0:5,1:2]")
    assert [a.name for a in get_detector(0).amplifiers] == (
        [f"Segment1{k}" for k in range(8)] + [f"Segment0{k}" for k in range(7, -1, -1)])
    assert ITL_READOUT.raw_shape == E2V_READOUT.raw_shape == (2048, 576)


def test_disassemble_inverts_assemble() -> None:
    detector = get_detector("R22_S11")
    image = np.arange(detector.shape[0] * detector.shape[1], dtype=np.int32).reshape(detector.shape)
    amps = disassemble(image, detector, fill=-7)
    amp = detector.amplifiers[0]
    assert (amps[0][amp.serial_overscan_slices] == -7).all()
    # Segment10 is flipped in x and y: its first data pixel read is the top-right corner of its box.
    assert amps[0][0, amp.prescan] == image[amp.bbox[3] - 1, amp.bbox[2] - 1]
    np.testing.assert_array_equal(assemble(amps, detector), image)


def test_wcs_points_the_detector_on_the_sky() -> None:
    centre = get_detector("R22_S11")
    wcs = detector_wcs(centre, 30.0, -40.0, 0.0)
    ra, dec = wcs.pixel_to_world_values((4096 - 1) / 2, (4004 - 1) / 2)
    assert (ra, dec) == pytest.approx((30.0, -40.0))
    assert np.sqrt(abs(np.linalg.det(wcs.wcs.cd))) * 3600 == pytest.approx(0.2)
    # At ROTPA 0, +y is North and +x West; R22_S12 lies 42.25 mm (845") along +x.
    ra, dec = detector_wcs(get_detector("R22_S12"), 30.0, -40.0, 0.0).pixel_to_world_values(2047.5, 2001.5)
    assert (ra - 30.0) * np.cos(np.radians(-40.0)) * 3600 == pytest.approx(-845.0, abs=0.5)
    ra, dec = detector_wcs(get_detector("R22_S21"), 30.0, -40.0, 90.0).pixel_to_world_values(2047.5, 2001.5)
    assert (ra - 30.0) * np.cos(np.radians(-40.0)) * 3600 == pytest.approx(845.0, abs=0.5)


@pytest.fixture(scope="module")
def electronics() -> DetectorElectronics:
    return DetectorElectronics.draw(get_detector("R22_S11"), seed=2026)


def _gaussian(shape: tuple[int, int], x: float, y: float, sigma: float, total: float) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    blob = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return (blob * (total / blob.sum())).astype(np.float32)


STAR = dict(x=1200.3, y=900.7, sigma=2.0, total=2.0e5)
BRIGHT = dict(x=3000.2, y=3100.4, sigma=2.0, total=5.0e8)


def _stamp(star: dict[str, float], half: int = 40) -> tuple[slice, slice]:
    x, y = int(star["x"]), int(star["y"])
    return slice(y - half, y + half), slice(x - half, x + half)


@pytest.fixture(scope="module")
def exposure(electronics: DetectorElectronics) -> tuple[np.ndarray, list[np.ndarray]]:
    detector = electronics.detector
    signal = np.full(detector.shape, SKY_E, dtype=np.float32)
    for star in (STAR, BRIGHT):
        signal[_stamp(star)] += _gaussian((80, 80), star["x"] % 1 + 40, star["y"] % 1 + 40,
                                          star["sigma"], star["total"])
    return signal, simulate_raw(signal, 30.0, 31.0, electronics, np.random.default_rng(7))


def test_electronics_are_drawn_from_the_seed(electronics: DetectorElectronics) -> None:
    again = DetectorElectronics.draw(get_detector("R22_S11"), seed=2026)
    for key, value in electronics.truth().items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, again.truth()[key])
    other = DetectorElectronics.draw(get_detector("R22_S12"), seed=2026)
    assert not np.array_equal(other.gain, electronics.gain)
    assert electronics.gain.min() >= 1.2 and electronics.gain.max() <= 1.8
    assert electronics.read_noise.min() >= 5 and electronics.read_noise.max() <= 9
    assert electronics.bias_level.min() >= 15_000 and electronics.bias_level.max() <= 25_000
    assert abs(np.diag(electronics.crosstalk)).max() == 0
    assert 1e-4 < abs(electronics.crosstalk[0, 1]) < 1e-3
    assert electronics.flat.mean() == pytest.approx(1.0, abs=0.003)
    assert electronics.flat.dtype == np.float32


def test_overscan_matches_bias_and_read_noise(electronics: DetectorElectronics,
                                              exposure: tuple[np.ndarray, list[np.ndarray]]) -> None:
    _, amps = exposure
    for index in (0, 9):
        amp = electronics.detector.amplifiers[index]
        residual = (amps[index] - electronics.bias_image(index))[amp.serial_overscan_slices]
        expected_std = np.sqrt(electronics.read_noise_adu[index] ** 2 + 1 / 12)  # plus rounding
        assert abs(residual.mean()) < 5 * expected_std / np.sqrt(residual.size)
        assert residual.std() == pytest.approx(expected_std, rel=0.02)
        assert amps[index].dtype == np.int32 and amps[index].shape == amp.raw_shape


def _calibrated(amps: list[np.ndarray], electronics: DetectorElectronics) -> np.ndarray:
    """Naive ISR: subtract each amplifier's overscan median, multiply by the gain, assemble."""
    electrons = []
    for amp, raw, gain in zip(electronics.detector.amplifiers, amps, electronics.gain, strict=True):
        electrons.append((raw - np.median(raw[amp.serial_overscan_slices])) * gain)
    return assemble(electrons, electronics.detector, dtype=np.float64)


def test_injected_star_is_recovered(electronics: DetectorElectronics,
                                    exposure: tuple[np.ndarray, list[np.ndarray]]) -> None:
    signal, amps = exposure
    image = _calibrated(amps, electronics)
    stamp = _stamp(STAR)
    yy, xx = np.mgrid[stamp]
    radius = np.hypot(xx - STAR["x"], yy - STAR["y"])
    aperture, annulus = radius < 10, (radius > 15) & (radius < 30)
    assert electronics.flat[stamp][radius < 30].min() > 0.9, "star on a bad column"
    background = np.median(image[stamp][annulus])
    flux = (image[stamp][aperture] - background).sum()
    expected = ((signal[stamp] - SKY_E) * electronics.flat[stamp])[aperture].sum()
    read_noise = electronics.read_noise.max()
    variance = expected + aperture.sum() * (SKY_E + read_noise**2) * (1 + aperture.sum() / annulus.sum())
    assert flux == pytest.approx(expected, abs=4 * np.sqrt(variance))


def test_saturated_star_bleeds_along_its_column(electronics: DetectorElectronics,
                                                exposure: tuple[np.ndarray, list[np.ndarray]]) -> None:
    _, amps = exposure
    image = _calibrated(amps, electronics)
    x = round(BRIGHT["x"])
    full_well = electronics.full_well.min()
    saturated_rows = np.flatnonzero(image[:, x] > 0.8 * full_well)
    # ~5e8 e- in ~1e5 e- pixels: hundreds of rows along the columns through
    # the core (a few pixels wide), but only in its half of the detector.
    assert saturated_rows.size > 300
    assert saturated_rows.size == saturated_rows.max() - saturated_rows.min() + 1
    assert saturated_rows.min() >= electronics.detector.shape[0] // 2
    assert (image[:, x + 30] < 0.5 * full_well).all()


def test_same_seed_gives_identical_raws(electronics: DetectorElectronics,
                                        exposure: tuple[np.ndarray, list[np.ndarray]]) -> None:
    signal, amps = exposure
    again = simulate_raw(signal, 30.0, 31.0, electronics, np.random.default_rng(7))
    for a, b in zip(amps, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_dark_frame_shows_dark_current_and_hot_pixels(electronics: DetectorElectronics) -> None:
    darktime = 600.0
    amps = simulate_raw(None, 0.0, darktime, electronics, np.random.default_rng(3))
    image = _calibrated(amps, electronics)
    amp = electronics.detector.amplifiers[5]
    expected = electronics.dark_current[5] * darktime
    # Crosstalk of the other amplifiers' dark signal is ~1e-3 of it.
    assert np.median(image[amp.detector_slices]) == pytest.approx(expected, abs=1.0 + 0.1 * expected)
    hottest = electronics.hot_pixels[np.argmax(electronics.hot_pixels["rate"])]
    assert image[hottest["y"], hottest["x"]] > 0.5 * hottest["rate"] * darktime
    with pytest.raises(ValueError):
        simulate_raw(None, 30.0, 10.0, electronics, np.random.default_rng(3))
