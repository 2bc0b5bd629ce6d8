"""Archiving: every raw the camera reads out lands in the Data Backbone once, pixel for pixel, announced."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from dmstream import schemas
from dmstream.backbone import Backbone
from dmstream.infra.kafka import read_topics
from dmstream.infra.process import free_port
from dmstream.infra.stack import Stack
from dmstream.streams.observatory import NightConfig
from dmstream.streams.rawfits import read_raw
from dmstream.streams.replay import ReplayConfig, replay
from dmstream.streams.simulate import SimulationConfig, simulate_night
from dmstream.topics import RAWS
from dmstream.workers import WorkerProcess, get_json

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 2-snap visits and four calibration frames on one detector."""
    directory = tmp_path_factory.mktemp("archiver") / "night"
    simulate_night(directory, SimulationConfig(
        night=NightConfig(seed=4, day_obs=20261211, n_visits=2, bands=("r",), snaps="2x15", n_bias=2,
                          n_dark=1, n_flat=1, flat_bands=("r",)),
        detectors=("R22_S11",), compress=False, jobs=2))
    return directory


def _wait_for_raws(backbone: Backbone, count: int, worker: WorkerProcess, timeout: float = 180.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        refs = backbone.query("raw")
        if len(refs) >= count:
            return refs
        if not worker.process.is_running():
            raise AssertionError(f"the worker exited:\n{worker.process.log_tail(40)}")
        time.sleep(1.0)
    raise AssertionError(f"{len(backbone.query('raw'))} of {count} raws archived after {timeout} s:\n"
                         f"{worker.process.log_tail(40)}")


def test_every_readout_is_archived_once_and_announced(stack: Stack, night: Path) -> None:
    files = sorted(night.glob("raw/**/*.fits"))
    worker = WorkerProcess(stack.settings, "archiver", free_port())
    worker.start()
    try:
        worker.wait_healthy()
        asyncio.run(replay([night], stack.settings.kafka_bootstrap, ReplayConfig(speed=None)))
        backbone = Backbone.from_settings(stack.settings)
        refs = _wait_for_raws(backbone, len(files), worker)
        # A second replay of the same night archives nothing new.
        asyncio.run(replay([night], stack.settings.kafka_bootstrap, ReplayConfig(speed=None)))
        time.sleep(5.0)
        _, metrics = get_json(f"{worker.url}/metrics/")
    finally:
        worker.stop()

    assert len(backbone.query("raw")) == len(files) == len(refs)
    originals = {read_raw(path).primary_header["OBSID"]: read_raw(path) for path in files}
    for ref in refs:
        archived = read_raw(backbone.path("raw", **ref.data_id))
        original = originals[archived.primary_header["OBSID"]]
        assert all(np.array_equal(a, b) for a, b in zip(archived.amps, original.amps, strict=True))
        assert archived.primary_header["GROUPID"] == original.primary_header["GROUPID"]
    assert metrics["steps"].get("done.archive", 0) == 2 * 16 * len(files)
    # (Prompt Processing, in the same worker, dead-letters these raws: this night has no calibrations.)
    assert "dead_letters.archive" not in metrics["steps"]

    notices = [schemas.decode(m.value) for m in
               asyncio.run(read_topics(stack.settings.kafka_bootstrap, [RAWS]))[RAWS.name]]
    assert {n["exposureId"] for n in notices} == {ref.data_id["exposure"] for ref in refs}
    science = [n for n in notices if n["imgType"] == "OBJECT"]
    assert {n["snapCount"] for n in science} == {2}
    for n in science:
        assert n["visitId"] == n["exposureId"] - n["snap"]
        assert n["path"] == backbone.ref("raw", instrument=n["instrument"], day_obs=n["dayObs"],
                                         exposure=n["exposureId"], detector=n["detector"]).path
