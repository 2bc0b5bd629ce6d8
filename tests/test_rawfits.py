"""Raw FITS files: the layout of docs/raw-format.md, determinism, damaged files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits

from dmstream.payloads.camera import disassemble, get_detector
from dmstream.streams.rawfits import RawFileError, read_raw, write_raw, write_readout
from dmstream.streams.readout import DetectorReadout

HEADER = {
    "OBSID": "MC_O_20261125_000123", "DAYOBS": 20261125, "SEQNUM": 123,
    "GROUPID": "2026-11-25T03:04:36.250", "IMGTYPE": "OBJECT", "EXPTIME": 30.0, "DARKTIME": 30.9,
    "MJD-OBS": 61004.128, "FILTBAND": "r", "FILTER": "r_57", "RA": 342.167, "DEC": -54.35, "ROTPA": 17.5,
    "PROGRAM": "BLOCK-365",
}


def _pattern(shape: tuple[int, int]) -> np.ndarray:
    """Every pixel a different value, so any misplaced pixel shows."""
    return np.arange(shape[0] * shape[1], dtype=np.int32).reshape(shape)


def _assemble_from_keywords(path: Path) -> np.ndarray:
    """Assemble a raw file from DATASEC/DETSEC alone, with plain astropy (independent of our code)."""
    def section(text: str) -> tuple[int, ...]:
        return tuple(int(v) for v in re.fullmatch(r"\[(\d+):(\d+),(\d+):(\d+)\]", text).groups())

    with fits.open(path) as hdus:
        width, _, height = section(hdus[0].header["DETSIZE"])[1:]
        image = np.full((height, width), -1, dtype=np.int64)
        for hdu in hdus[1:]:
            dx1, dx2, dy1, dy2 = section(hdu.header["DATASEC"])
            tx1, tx2, ty1, ty2 = section(hdu.header["DETSEC"])
            data = hdu.data[dy1 - 1:dy2, dx1 - 1:dx2]
            data = data[::1 if ty2 >= ty1 else -1, ::1 if tx2 >= tx1 else -1]
            image[min(ty1, ty2) - 1:max(ty1, ty2), min(tx1, tx2) - 1:max(tx1, tx2)] = data
    return image


@pytest.mark.parametrize("name", ["R22_S11", "R10_S02"])
def test_file_assembles_by_its_keywords_with_plain_astropy(tmp_path: Path, name: str) -> None:
    detector = get_detector(name)
    pattern = _pattern(detector.shape)
    path = write_raw(tmp_path / "raw.fits", HEADER, disassemble(pattern, detector, fill=-5), detector)
    with fits.open(path) as hdus:
        assert len(hdus) == 17
        primary = hdus[0].header
        for key in ("INSTRUME", "TELESCOP", "OBSID", "DAYOBS", "SEQNUM", "DETECTOR", "DETNAME", "CCD_MANU",
                    "IMGTYPE", "EXPTIME", "DARKTIME", "MJD-OBS", "MJD-BEG", "MJD-END", "DATE-OBS", "FILTER",
                    "FILTBAND", "RA", "DEC", "ROTPA", "GROUPID", "CTYPE1", "CD1_1", "PROGRAM"):
            assert key in primary, key
        assert (primary["DETECTOR"], primary["DETNAME"], primary["CCD_MANU"]) == (
            detector.id, name, detector.vendor)
        assert [h.header["EXTNAME"] for h in hdus[1:]] == [a.name for a in detector.amplifiers]
        assert all(h.header["BITPIX"] == 32 and h.data.shape == (2048, 576) for h in hdus[1:])
        amp = detector.amplifiers[3]
        assert (hdus[4].data[amp.serial_overscan_slices] == -5).all()
    np.testing.assert_array_equal(_assemble_from_keywords(path), pattern)
    raw = read_raw(path)
    np.testing.assert_array_equal(raw.assemble(), pattern)
    assert raw.detector == detector
    ra, dec = raw.wcs().pixel_to_world_values(*(np.array(detector.shape[::-1]) - 1) / 2)
    if name == "R22_S11":
        assert (ra, dec) == pytest.approx((HEADER["RA"], HEADER["DEC"]))


def _amps(detector_name: str = "R22_S11", seed: int = 0) -> list[np.ndarray]:
    detector = get_detector(detector_name)
    rng = np.random.default_rng(seed)
    # Bias-like pixels: a level plus a few ADU of noise, as real raws are.
    return [rng.integers(20_000, 20_016, amp.raw_shape, dtype=np.int32) for amp in detector.amplifiers]


@pytest.mark.parametrize("compress", [False, True])
def test_writing_is_deterministic_and_round_trips(tmp_path: Path, compress: bool) -> None:
    detector = get_detector("R22_S11")
    amps = _amps()
    first = write_raw(tmp_path / "a" / "one.fits", HEADER, amps, detector, compress=compress)
    second = write_raw(tmp_path / "b" / "two.fits", dict(HEADER), amps, detector, compress=compress)
    assert first.read_bytes() == second.read_bytes()
    assert sorted(p.name for p in first.parent.iterdir()) == ["one.fits"]
    raw = read_raw(first)
    for written, read in zip(amps, raw.amps, strict=True):
        np.testing.assert_array_equal(written, read)
        assert read.dtype == np.int32
    assert raw.primary_header["OBSID"] == HEADER["OBSID"]


def test_a_readout_is_written_back_unchanged(tmp_path: Path) -> None:
    detector = get_detector("R22_S11")
    original = write_raw(tmp_path / "original.fits", HEADER, _amps(), detector)
    raw = read_raw(original)
    readout = DetectorReadout(obs_id=HEADER["OBSID"], detector_name=detector.name, amp_count=16,
                              primary=raw.primary_header,
                              amps=dict(enumerate(raw.amplifiers())))
    copy = write_readout(tmp_path / "copy.fits", readout)
    assert copy.read_bytes() == original.read_bytes()


def test_bad_input_writes_nothing(tmp_path: Path) -> None:
    detector = get_detector("R22_S11")
    amps = _amps()
    with pytest.raises(ValueError, match="expected int32"):
        write_raw(tmp_path / "x.fits", HEADER, [a[:-1] for a in amps], detector)
    with pytest.raises(ValueError, match="lacks RA"):
        write_raw(tmp_path / "x.fits", {k: v for k, v in HEADER.items() if k != "RA"}, amps, detector)
    with pytest.raises(ValueError, match="come from the detector"):
        write_raw(tmp_path / "x.fits", {**HEADER, "DETECTOR": 3}, amps, detector)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def good_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    detector = get_detector("R01_S00")
    return write_raw(tmp_path_factory.mktemp("raw") / "good.fits", HEADER, _amps("R01_S00"), detector)


def _rewrite(good: Path, path: Path, change: Any) -> Path:
    with fits.open(good) as hdus:
        hdus = fits.HDUList([hdu.copy() for hdu in hdus])
    change(hdus)
    hdus.writeto(path)
    return path


def _swap_extensions(hdus: fits.HDUList) -> None:
    hdus[1], hdus[2] = hdus[2], hdus[1]


def _shrink(hdus: fits.HDUList) -> None:
    hdus[5].data = hdus[5].data[:, :500]


def _float_pixels(hdus: fits.HDUList) -> None:
    hdus[3].data = hdus[3].data.astype(np.float32)


def _move_detsec(hdus: fits.HDUList) -> None:
    hdus[7].header["DETSEC"] = "[1:509,1:2000]"


def _unknown_detector(hdus: fits.HDUList) -> None:
    hdus[0].header["DETNAME"] = "R00_S11"


@pytest.mark.parametrize("damage", [
    pytest.param(lambda data: data[: len(data) - 2880], id="truncated-data"),
    pytest.param(lambda data: data[: len(data) // 3], id="truncated-half"),
    pytest.param(lambda data: data[:1000], id="truncated-header"),
    pytest.param(lambda data: b"not a fits file" * 500, id="garbage"),
    pytest.param(lambda data: b"", id="empty"),
])
def test_damaged_bytes_raise_raw_file_error(good_file: Path, tmp_path: Path, damage: Any) -> None:
    path = tmp_path / "bad.fits"
    path.write_bytes(damage(good_file.read_bytes()))
    with pytest.raises(RawFileError):
        read_raw(path)


@pytest.mark.parametrize("change", [
    pytest.param(lambda hdus: hdus.pop(), id="missing-extension"),
    pytest.param(_swap_extensions, id="wrong-order"),
    pytest.param(_shrink, id="wrong-shape"),
    pytest.param(_float_pixels, id="float-pixels"),
    pytest.param(_move_detsec, id="wrong-detsec"),
    pytest.param(_unknown_detector, id="unknown-detector"),
])
def test_invalid_files_raise_raw_file_error(good_file: Path, tmp_path: Path, change: Any) -> None:
    path = _rewrite(good_file, tmp_path / "bad.fits", change)
    with pytest.raises(RawFileError):
        read_raw(path)


def test_missing_file_raises_raw_file_error(tmp_path: Path) -> None:
    with pytest.raises(RawFileError):
        read_raw(tmp_path / "absent.fits")
