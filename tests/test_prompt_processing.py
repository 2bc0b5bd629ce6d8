"""Prompt Processing in-stream: a replayed night goes from camera readout to DiaSources by sky region."""

from __future__ import annotations

import asyncio
import io
import time

import pyarrow as pa
import pytest
from astropy.io import fits

from dmstream import schemas
from dmstream.backbone import Backbone
from dmstream.infra.kafka import read_topics
from dmstream.infra.process import free_port
from dmstream.infra.stack import Stack
from dmstream.streams.rawfits import read_raw
from dmstream.streams.replay import ReplayConfig, replay
from dmstream.topics import DEAD_LETTERS, DIA_SOURCES, DIFFERENCES
from dmstream.workers import WorkerProcess, get_json

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _science_exposures(night) -> set[tuple[int, int]]:
    found = set()
    for path in (night / "raw").rglob("*.fits"):
        header = read_raw(path).primary_header
        if header["IMGTYPE"] == "OBJECT":
            found.add((int(header["DAYOBS"]) * 100_000 + int(header["SEQNUM"]) - int(header.get("SNAP", 0)),
                       int(header["DETECTOR"])))
    return found


def _wait(condition, worker: WorkerProcess, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if not worker.process.is_running():
            raise AssertionError(f"the worker exited:\n{worker.process.log_tail(60)}")
        time.sleep(1.0)
    raise AssertionError(f"{what} after {timeout} s:\n{worker.process.log_tail(60)}")


def test_a_replayed_night_becomes_diasources(stack: Stack, small_nights,
                                                    prepared_backbone: Backbone) -> None:
    expected = _science_exposures(small_nights.night)
    day_obs = next(iter(expected))[0] // 100_000
    worker = WorkerProcess(stack.settings, "prompt", free_port())
    worker.start()
    try:
        worker.wait_healthy()
        asyncio.run(replay([small_nights.night], stack.settings.kafka_bootstrap, ReplayConfig(speed=None)))

        def differences() -> set[tuple[int, int]]:
            return {(ref.data_id["visit"], ref.data_id["detector"])
                    for ref in prepared_backbone.query("difference", day_obs=day_obs)}

        def measured() -> set[tuple[int, int]]:
            return {(ref.data_id["visit"], ref.data_id["detector"])
                    for ref in prepared_backbone.query("diaSource", day_obs=day_obs)}

        _wait(lambda: differences() >= expected and measured() >= expected, worker, 300,
              "difference images or DiaSource tables missing")
        time.sleep(2.0)
        _, metrics = get_json(f"{worker.url}/metrics/")
    finally:
        worker.stop()
    # The session's stack also carries other tests' nights, which this worker archives and tries too.
    steps = metrics["steps"]
    for name in ("isr", "snaps", "calibrate", "subtract", "measure"):
        assert steps.get(f"done.{name}", 0) >= len(expected), steps
    seen = asyncio.run(read_topics(stack.settings.kafka_bootstrap, [DIFFERENCES, DIA_SOURCES, DEAD_LETTERS]))
    ours = [message for message in (schemas.decode(m.value) for m in seen[DIFFERENCES.name])
            if message["dayObs"] == day_obs]
    assert {(p["visitId"], p["detector"]) for p in ours} == expected
    for product in ours:
        assert set(product["stepSeconds"]) == {"isr", "snaps", "calibrate", "subtract"}
    for letter in (schemas.decode(m.value) for m in seen[DEAD_LETTERS.name]):
        given_up = schemas.decode(letter["value"]) if letter["value"] else {}
        assert given_up.get("dayObs") != day_obs, letter["reason"]
    for visit, detector in expected:
        calexp = prepared_backbone.get("calexp", instrument="LSSTCam", day_obs=visit // 100_000, visit=visit,
                                       detector=detector)
        assert calexp.zero_point is not None and calexp.psf is not None

    # DiaSources travel by association region, each with its three cutouts.
    batches = [batch for batch in (schemas.decode(message.value) for message in seen[DIA_SOURCES.name])
               if batch["visitId"] // 100_000 == day_obs]
    sent = pa.concat_tables([pa.ipc.open_stream(batch["diaSources"]).read_all() for batch in batches])
    stored = pa.concat_tables([prepared_backbone.get("diaSource", **ref.data_id)
                               for ref in prepared_backbone.query("diaSource", day_obs=day_obs)])
    assert sorted(sent["diaSourceId"].to_pylist()) == sorted(stored["diaSourceId"].to_pylist())
    assert stored.num_rows > 0
    for batch in batches:
        stamps = pa.ipc.open_stream(batch["cutouts"]).read_all()
        assert stamps.num_rows == pa.ipc.open_stream(batch["diaSources"]).read_all().num_rows
        with fits.open(io.BytesIO(stamps["cutoutDifference"][0].as_py())) as hdus:
            assert 30 <= hdus[0].data.shape[0] <= 102
