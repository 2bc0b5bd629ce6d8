"""Replaying recorded nights onto the real broker, read back by a plain aiokafka consumer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from astropy.io import fits

from dmstream import schemas, topics
from dmstream.infra.kafka import read_topics
from dmstream.infra.stack import Stack
from dmstream.streams.readout import ReadoutCollector
from dmstream.streams.record import record
from dmstream.streams.replay import ReplayConfig, replay
from dmstream.topics import MAX_MESSAGE_BYTES

pytestmark = pytest.mark.integration

DAY_OBS = 20261125
E2V = {"rows": 2048, "cols": 576, "pre": 10, "data_cols": 512, "data_rows": 2002}


def _hand_made_raw(path: Path, obs_id: str, seq: int, detector: tuple[int, str], level: int) -> None:
    """A raw file written with plain astropy from docs/raw-format.md, not with dmstream."""
    rows, cols, pre = E2V["rows"], E2V["cols"], E2V["pre"]
    data_cols, data_rows = E2V["data_cols"], E2V["data_rows"]
    primary = fits.PrimaryHDU()
    primary.header.update({
        "INSTRUME": "LSSTCam", "TELESCOP": "Simonyi Survey Telescope", "OBSID": obs_id,
        "DAYOBS": DAY_OBS, "SEQNUM": seq, "GROUPID": f"group-{seq}", "IMGTYPE": "BIAS",
        "DETECTOR": detector[0], "DETNAME": detector[1], "RAFTBAY": detector[1][:3],
        "CCDSLOT": detector[1][4:], "CCD_MANU": "E2V", "DETSIZE": "[1:4096,1:4004]",
        "EXPTIME": 0.0, "DARKTIME": 0.0, "TIMESYS": "TAI", "DATE-OBS": "2026-11-25T03:04:19.200",
        "MJD-OBS": 61004.128, "MJD-BEG": 61004.128, "MJD-END": 61004.128, "FILTER": "r",
        "FILTBAND": "r", "RA": 10.0, "DEC": -30.0, "ROTPA": 0.0, "WCSAXES": 2,
        "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRPIX1": 2048.5, "CRPIX2": 2002.5,
        "CRVAL1": 10.0, "CRVAL2": -30.0, "CD1_1": -0.2 / 3600, "CD1_2": 0.0, "CD2_1": 0.0,
        "CD2_2": 0.2 / 3600, "RADESYS": "ICRS", "EQUINOX": 2000.0,
    })
    hdus = [primary]
    for half, ks in ((1, range(8)), (0, range(7, -1, -1))):
        for k in ks:
            x0, y0 = k * data_cols, half * data_rows
            flip = half == 1
            xs = (x0 + data_cols, x0 + 1) if flip else (x0 + 1, x0 + data_cols)
            ys = (y0 + data_rows, y0 + 1) if flip else (y0 + 1, y0 + data_rows)
            pixels = np.full((rows, cols), level + 10 * half + k, dtype=np.int32)
            hdu = fits.ImageHDU(pixels)
            hdu.header.update({
                "EXTNAME": f"Segment{half}{k}", "BUNIT": "adu",
                "DATASEC": f"[{pre + 1}:{pre + data_cols},1:{data_rows}]",
                "BIASSEC": f"[{pre + data_cols + 1}:{cols},1:{data_rows}]",
                "DETSEC": f"[{xs[0]}:{xs[1]},{ys[0]}:{ys[1]}]", "DETSIZE": "[1:4096,1:4004]",
            })
            hdus.append(hdu)
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.HDUList(hdus).writeto(path)


def _next_visit(group_id: str, sent: float) -> dict:
    return {
        "private_sndStamp": sent, "private_efdStamp": sent - 37, "private_seqNum": 1, "private_origin": 1,
        "private_identity": "ScriptQueue:1", "salIndex": 1, "scriptSalIndex": 0, "instrument": "LSSTCam",
        "groupId": group_id, "coordinateSystem": 2, "position": [10.0, -30.0], "startTime": sent + 25,
        "rotationSystem": 2, "cameraAngle": 0.0, "filters": "r_57", "dome": 2, "duration": 32.0,
        "nimages": 1, "survey": "BLOCK-365", "totalCheckpoints": 0,
    }


def _hand_made_night(root: Path) -> Path:
    """Two exposures of two detectors, a corrupt raw file and a malformed line."""
    detectors = [(94, "R22_S11"), (95, "R22_S12")]
    lines = []
    t0 = 1.8e9
    for seq in (1, 2):
        obs_id = f"MC_O_{DAY_OBS}_{seq:06d}"
        start = t0 + 40 * seq
        lines.append({"time": start - 25, "topic": topics.NEXT_VISIT.name, "key": f"group-{seq}",
                      "value": _next_visit(f"group-{seq}", start - 25)})
        for number, name in detectors:
            relative = f"raw/{DAY_OBS}/{seq:06d}/{obs_id}_{name}.fits"
            _hand_made_raw(root / relative, obs_id, seq, (number, name), level=1000 * seq + number)
            lines.append({"time": start + 32, "readout": relative, "key": name})
    corrupt = root / f"raw/{DAY_OBS}/000003/MC_O_{DAY_OBS}_000003_R22_S11.fits"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"SIMPLE  =                    T" + b"\0" * 100)
    lines.append({"time": t0 + 200, "readout": corrupt.relative_to(root).as_posix(), "key": "R22_S11"})
    lines.append({"time": t0 + 201, "readout": "raw/missing.fits", "key": "R22_S11"})
    manifest = {"format": "dmstream-night", "version": 1, "instrument": "LSSTCam", "day_obs": DAY_OBS,
                "detectors": [name for _, name in detectors], "reference_catalog": None, "truth": {}}
    (root / "night.json").write_text(json.dumps(manifest))
    with (root / "events.jsonl").open("w") as log:
        for line in lines[:2]:
            log.write(json.dumps(line) + "\n")
        log.write("this line is not JSON\n")
        for line in lines[2:]:
            log.write(json.dumps(line) + "\n")
    return root


def test_a_hand_made_night_replays(stack: Stack, tmp_path: Path) -> None:
    night = _hand_made_night(tmp_path / "night")
    bootstrap = stack.settings.kafka_bootstrap
    stats = asyncio.run(replay([night], bootstrap, ReplayConfig(speed=None)))
    assert stats.messages == 2 and stats.readouts == 4 and stats.amplifier_messages == 64
    assert stats.malformed_lines == 1
    assert sorted(Path(p).name for p, _ in stats.skipped_files) == \
        ["MC_O_20261125_000003_R22_S11.fits", "missing.fits"]

    seen = asyncio.run(read_topics(bootstrap, [topics.NEXT_VISIT, topics.CAMERA_READOUT]))
    announcements = {m.key.decode(): m for m in seen[topics.NEXT_VISIT.name]}
    collector, complete = ReadoutCollector(), []
    for message in seen[topics.CAMERA_READOUT.name]:
        value = schemas.decode(message.value)
        if value["dayObs"] != DAY_OBS:
            continue  # another test's night on the session's stack
        assert message.key.decode() == value["detectorName"]
        first_amp_time = message.timestamp
        group = announcements[value["groupId"]]
        assert group.timestamp <= first_amp_time
        readout = collector.add(value)
        if readout is not None:
            complete.append(readout)
    assert sorted((r.obs_id, r.detector_name) for r in complete) == [
        (f"MC_O_{DAY_OBS}_{seq:06d}", name) for seq in (1, 2) for name in ("R22_S11", "R22_S12")]
    for readout in complete:
        original = fits.open(night / f"raw/{DAY_OBS}/{int(readout.obs_id[-6:]):06d}/"
                             f"{readout.obs_id}_{readout.detector_name}.fits")
        rebuilt = readout.hdu_list()
        assert rebuilt[0].header["DETNAME"] == original[0].header["DETNAME"]
        for ours, theirs in zip(rebuilt[1:], original[1:], strict=True):
            assert ours.header["DETSEC"] == theirs.header["DETSEC"]
            np.testing.assert_array_equal(ours.data, theirs.data)


def test_replay_paces_at_the_requested_speed(stack: Stack, tmp_path: Path) -> None:
    night = tmp_path / "paced"
    night.mkdir()
    (night / "night.json").write_text(json.dumps(
        {"format": "dmstream-night", "version": 1, "instrument": "LSSTCam", "day_obs": DAY_OBS,
         "detectors": []}))
    with (night / "events.jsonl").open("w") as log:
        for i in range(5):
            sent = 1.8e9 + 10 * i
            log.write(json.dumps({"time": sent, "topic": topics.NEXT_VISIT.name, "key": f"paced-{i}",
                                  "value": _next_visit(f"paced-{i}", sent)}) + "\n")
    stats = asyncio.run(replay([night], stack.settings.kafka_bootstrap, ReplayConfig(speed=20.0)))
    # 40 s of night at 20x is 2 s of wall time.
    assert stats.messages == 5
    assert 1.9 <= stats.seconds < 6


def test_recording_the_replay_gives_the_night_back(stack: Stack, tmp_path: Path) -> None:
    night = _hand_made_night(tmp_path / "source")
    bootstrap = stack.settings.kafka_bootstrap

    async def replay_while_recording():
        recording = asyncio.create_task(record(tmp_path / "recorded", bootstrap, idle_seconds=3.0))
        await asyncio.sleep(2.0)
        await replay([night], bootstrap, ReplayConfig(speed=None))
        return await recording

    stats = asyncio.run(replay_while_recording())
    assert stats.readouts == 4 and stats.messages == 2
    events = [json.loads(line) for line in (tmp_path / "recorded" / "events.jsonl").read_text().splitlines()]
    assert [e["time"] for e in events] == sorted(e["time"] for e in events)
    readouts = [e for e in events if "readout" in e]
    assert len(readouts) == 4
    for line in readouts:
        recorded = fits.open(tmp_path / "recorded" / line["readout"])
        original = fits.open(night / line["readout"])
        for ours, theirs in zip(recorded[1:], original[1:], strict=True):
            np.testing.assert_array_equal(ours.data, theirs.data)


def test_replay_waits_for_a_lagging_pipeline(stack: Stack, tmp_path: Path) -> None:
    """With max_lag, replay holds back until the consumer group catches up."""
    night = _hand_made_night(tmp_path / "lagging")
    bootstrap = stack.settings.kafka_bootstrap
    group = "lag-test-pipeline"
    readout = topics.CAMERA_READOUT
    partitions = [TopicPartition(readout.name, p) for p in range(readout.partitions)]

    async def scenario() -> tuple[int, int]:
        pipeline = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                    fetch_max_bytes=MAX_MESSAGE_BYTES,
                                    max_partition_fetch_bytes=MAX_MESSAGE_BYTES)
        await pipeline.start()
        try:
            pipeline.assign(partitions)
            await pipeline.seek_to_end(*partitions)
            await pipeline.commit({tp: await pipeline.position(tp) for tp in partitions})
            config = ReplayConfig(speed=None, max_lag=20, lag_group=group)
            replaying = asyncio.create_task(replay([night], bootstrap, config))
            await asyncio.sleep(4.0)
            assert not replaying.done()
            ends = await pipeline.end_offsets(partitions)
            held_back = 0
            for tp in partitions:
                held_back += ends[tp] - await pipeline.committed(tp)
            # The pipeline catches up; replay goes on to the end.
            while not replaying.done():
                await pipeline.getmany(timeout_ms=500)
                await pipeline.commit()
            stats = await replaying
            return held_back, stats.amplifier_messages
        finally:
            await pipeline.stop()

    held_back, sent = asyncio.run(scenario())
    # Two detectors of 16 amplifiers went out before the lag bound held the rest.
    assert 16 <= held_back <= 36
    assert sent == 64
