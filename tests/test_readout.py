"""The readout wire format: pixels compressed losslessly, detectors gathered from amplifiers."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from dmstream.streams.readout import (
    ReadoutCollector,
    ReadoutError,
    amplifier_messages,
    compress_pixels,
    decompress_pixels,
)


def _amp(seed: int, shape: tuple[int, int] = (64, 40)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (20000 + rng.normal(0, 6, shape) + rng.poisson(500, shape)).astype(np.int32)


def test_pixels_round_trip_exactly_and_shrink() -> None:
    pixels = _amp(1, (2048, 576))
    payload = compress_pixels(pixels)
    assert len(payload) < pixels.nbytes / 3
    np.testing.assert_array_equal(decompress_pixels(payload, 2048, 576), pixels)


def test_extreme_values_survive() -> None:
    pixels = np.array([[0, -1, 2**31 - 1, -(2**31)], [262143, 1, 2, 3]], dtype=np.int32)
    np.testing.assert_array_equal(decompress_pixels(compress_pixels(pixels), 2, 4), pixels)


def test_wrong_shape_or_garbage_is_a_readout_error() -> None:
    payload = compress_pixels(_amp(2))
    with pytest.raises(ReadoutError, match="expected"):
        decompress_pixels(payload, 65, 40)
    with pytest.raises(ReadoutError, match="decompress"):
        decompress_pixels(b"not zstd at all", 64, 40)
    with pytest.raises(ReadoutError, match="unknown pixel compression"):
        decompress_pixels(payload, 64, 40, compression="lzma")


def _detector_messages(obs_id: str, detector: str, n_amps: int = 4) -> tuple[list[dict], list[np.ndarray]]:
    primary = fits.Header({"OBSID": obs_id, "DETNAME": detector, "DAYOBS": 20261125, "SEQNUM": 7})
    amps = [_amp(i + sum(map(ord, detector))) for i in range(n_amps)]
    headers = [fits.Header({"EXTNAME": f"Segment{i:02d}", "DATASEC": "[4:35,1:60]"}) for i in range(n_amps)]
    return amplifier_messages(primary, zip(headers, amps, strict=True), sent_tai=1.8e9), amps


def test_collector_rebuilds_interleaved_detectors() -> None:
    first, first_amps = _detector_messages("MC_O_20261125_000007", "R22_S11")
    second, _ = _detector_messages("MC_O_20261125_000007", "R22_S12")
    collector = ReadoutCollector()
    done = []
    for a, b in zip(first, second, strict=True):
        for message in (a, b):
            readout = collector.add(message)
            if readout is not None:
                done.append(readout)
    assert [r.detector_name for r in done] == ["R22_S11", "R22_S12"]
    hdus = done[0].hdu_list()
    assert hdus[0].header["OBSID"] == "MC_O_20261125_000007"
    assert [h.header["EXTNAME"] for h in hdus[1:]] == [f"Segment{i:02d}" for i in range(4)]
    for hdu, amp in zip(hdus[1:], first_amps, strict=True):
        np.testing.assert_array_equal(hdu.data, amp)
    assert collector.incomplete == []


def test_missing_amplifier_leaves_the_detector_incomplete() -> None:
    messages, _ = _detector_messages("MC_O_20261125_000008", "R22_S11")
    collector = ReadoutCollector()
    for message in messages[:-1]:
        assert collector.add(message) is None
    [pending] = collector.incomplete
    with pytest.raises(ReadoutError, match="3 of 4"):
        pending.hdu_list()
