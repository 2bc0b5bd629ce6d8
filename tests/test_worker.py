"""The first flow end to end: nextVisit on Kafka → agent → table → web endpoint."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from dmstream.infra.process import free_port
from dmstream.infra.stack import Stack
from dmstream.streams.ocs import announce, random_visits
from dmstream.streams.producer import SummitProducer
from dmstream.topics import NEXT_VISIT
from dmstream.workers import WorkerProcess, get_json

pytestmark = pytest.mark.integration


def _wait_for_visits(worker: WorkerProcess, wanted: set[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        _, body = get_json(f"{worker.url}/visits/")
        found = {row["groupId"]: row for row in body["visits"] if row["groupId"] in wanted}
        if len(found) == len(wanted) or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


def test_announced_visits_reach_the_table_and_survive_a_restart(stack: Stack) -> None:
    worker = WorkerProcess(stack.settings, "flow", free_port())
    worker.start()
    try:
        health = worker.wait_healthy()
        assert any(a.startswith(NEXT_VISIT.name) for a in health["assignment"])

        visits = random_visits(5, start_utc=1.7e9, seed=11)

        async def send() -> None:
            async with SummitProducer(stack.settings.kafka_bootstrap) as producer:
                await announce(producer, visits)

        asyncio.run(send())
        found = _wait_for_visits(worker, {v.groupId for v in visits})
        assert set(found) == {v.groupId for v in visits}
        for visit in visits:
            assert found[visit.groupId]["position"] == visit.position
            assert found[visit.groupId]["filters"] == visit.filters

        status, one = get_json(f"{worker.url}/visits/{visits[2].groupId}/")
        assert status == 200 and one["nimages"] == visits[2].nimages
        status, _ = get_json(f"{worker.url}/visits/no-such-visit/")
        assert status == 404

        _, metrics = get_json(f"{worker.url}/metrics/")
        assert metrics["messages_received_by_topic"][NEXT_VISIT.name] >= len(visits)

        # A restarted worker rebuilds the table from its changelog.
        worker.stop()
        worker.start()
        worker.wait_healthy()
        recovered = _wait_for_visits(worker, {v.groupId for v in visits}, timeout=30)
        assert set(recovered) == {v.groupId for v in visits}
    finally:
        worker.stop()
    assert not worker.process.is_running()


def test_demo_runs_the_main_job(stack: Stack, child_env) -> None:
    done = subprocess.run([sys.executable, "-m", "dmstream", "demo", "--visits", "4", "--seed", "5"],
                          env=child_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "announced 4 visits" in done.stdout
    visits = random_visits(4, start_utc=0, seed=5)
    for visit in visits:
        assert f"{visit.position[0]:8.3f}" in done.stdout
    assert f"consumed 4 messages from {NEXT_VISIT.name}" in done.stdout
