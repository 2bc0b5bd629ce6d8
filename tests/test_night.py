"""Reading recorded nights: the manifest, and a log with damaged lines."""

from __future__ import annotations

import json

import pytest

from dmstream.streams.night import (
    EventLogWriter,
    Manifest,
    MessageEvent,
    NightFormatError,
    NightReader,
    ReadoutEvent,
    raw_path,
)


def _night(tmp_path, lines: list[str]):
    Manifest(instrument="LSSTCam", day_obs=20261125, detectors=["R22_S11"]).write(tmp_path)
    (tmp_path / "events.jsonl").write_text("".join(line + "\n" for line in lines))
    return tmp_path


def test_events_come_back_as_written(tmp_path) -> None:
    path = raw_path(tmp_path, 20261125, 12, "MC_O_20261125_000012", "R22_S11")
    with EventLogWriter(tmp_path) as writer:
        writer.message(10.0, "lsst.sal.ESS.temperature", "ESS:1", {"temperatureItem0": 11.5})
        writer.readout(12.5, path, "R22_S11")
    Manifest(instrument="LSSTCam", day_obs=20261125, detectors=["R22_S11"]).write(tmp_path)
    events = list(NightReader(tmp_path).events())
    assert events == [
        MessageEvent(10.0, "lsst.sal.ESS.temperature", "ESS:1", {"temperatureItem0": 11.5}),
        ReadoutEvent(12.5, path, "R22_S11"),
    ]
    assert json.loads((tmp_path / "events.jsonl").read_text().splitlines()[1])["readout"] == \
        "raw/20261125/000012/MC_O_20261125_000012_R22_S11.fits"


def test_malformed_lines_are_counted_and_skipped(tmp_path) -> None:
    good = json.dumps({"time": 1.0, "topic": "t", "key": "k", "value": {}})
    night = _night(tmp_path, [
        good,
        "{not json",
        json.dumps({"time": "late", "topic": "t", "key": "k", "value": {}}),
        json.dumps({"time": 2.0, "topic": "t", "value": {}}),
        json.dumps([1, 2]),
        json.dumps({"time": 0.5, "topic": "t", "key": "k2", "value": {}}),
        json.dumps({"time": 3.0, "readout": "raw/x.fits", "key": "R22_S11"}),
    ])
    reader = NightReader(night)
    events = list(reader.events())
    assert [e.key for e in events] == ["k", "k2", "R22_S11"]
    assert reader.stats.malformed == 4
    assert reader.stats.out_of_order == 1


def test_not_a_night_is_refused_clearly(tmp_path) -> None:
    with pytest.raises(NightFormatError, match=r"no night\.json"):
        NightReader(tmp_path)
    (tmp_path / "night.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(NightFormatError, match="format"):
        NightReader(tmp_path)


def test_unknown_manifest_keys_are_ignored(tmp_path) -> None:
    data = {"format": "dmstream-night", "version": 1, "instrument": "LSSTCam", "day_obs": 20261125,
            "detectors": [], "made_with": "a notebook"}
    (tmp_path / "night.json").write_text(json.dumps(data))
    assert Manifest.read(tmp_path).day_obs == 20261125
