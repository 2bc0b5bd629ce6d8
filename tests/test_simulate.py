"""Simulated nights: deterministic, complete, and replayable onto the real broker."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from dmstream import schemas, topics
from dmstream.infra.kafka import read_topics
from dmstream.infra.stack import Stack
from dmstream.streams.night import MessageEvent, NightReader, ReadoutEvent
from dmstream.streams.observatory import NightConfig
from dmstream.streams.rawfits import read_raw
from dmstream.streams.replay import ReplayConfig, replay
from dmstream.streams.simulate import SimulationConfig, simulate_night

DETECTORS = ("R22_S11", "R01_S00")  # one e2v, one ITL


def _config(seed: int = 3) -> SimulationConfig:
    return SimulationConfig(
        night=NightConfig(seed=seed, day_obs=20261209, n_visits=2, bands=("r",), snaps="2x15",
                          n_bias=1, n_dark=0, n_flat=0),
        detectors=DETECTORS, compress=False, jobs=2,
    )


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("simulated") / "night"
    simulate_night(out, _config())
    return out


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(night: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    config = _config()
    simulate_night(again, SimulationConfig(night=config.night, detectors=config.detectors,
                                           compress=False, jobs=1))
    assert _digests(again) == _digests(night)


def test_night_is_complete_and_ordered(night: Path) -> None:
    reader = NightReader(night)
    assert reader.manifest.detectors == list(DETECTORS)
    events = list(reader.events())
    assert reader.stats.malformed == 0 and reader.stats.out_of_order == 0
    readouts = [e for e in events if isinstance(e, ReadoutEvent)]
    exposures = {read_raw(e.path).primary_header["OBSID"] for e in readouts}
    # 1 bias + 2 visits of 2 snaps, every one read out on each detector
    assert len(exposures) == 5 and len(readouts) == 5 * len(DETECTORS)
    for event in readouts:
        raw = read_raw(event.path)
        assert raw.detector.name == event.key
    announcements = [e for e in events if isinstance(e, MessageEvent) and e.topic == topics.NEXT_VISIT.name]
    assert len(announcements) == 2
    for announcement in announcements:
        group = announcement.value["groupId"]
        first_readout = min(e.time for e in readouts if read_raw(e.path).primary_header["GROUPID"] == group)
        assert announcement.time + 20 <= first_readout
    truth = json.loads((night / "night.json").read_text())["truth"]
    assert {"sources", "exposures"} <= set(truth)
    assert (night / "refcat" / "reference_catalog.parquet").exists()


@pytest.mark.integration
def test_replayed_night_reaches_kafka_in_order(stack: Stack, night: Path) -> None:
    stats = asyncio.run(replay([night], stack.settings.kafka_bootstrap, ReplayConfig(speed=None)))
    assert stats.readouts == 10 and not stats.skipped_files and not stats.rejected_events
    seen = asyncio.run(read_topics(stack.settings.kafka_bootstrap,
                                   [topics.NEXT_VISIT, topics.CAMERA_READOUT]))
    announced_at = {}
    for message in seen[topics.NEXT_VISIT.name]:
        announced_at.setdefault(schemas.decode(message.value)["groupId"], message.timestamp)
    amplifiers: dict[tuple[str, str], int] = {}
    for message in seen[topics.CAMERA_READOUT.name]:
        value = schemas.decode(message.value)
        if value["dayObs"] != 20261209:
            continue
        amplifiers[(value["obsId"], value["detectorName"])] = \
            amplifiers.get((value["obsId"], value["detectorName"]), 0) + 1
        if value["imgType"] == "OBJECT":
            assert announced_at[value["groupId"]] <= message.timestamp
    assert len(amplifiers) == 10 and set(amplifiers.values()) == {16}
