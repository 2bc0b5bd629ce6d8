"""The first flow end to end: nextVisit on Kafka → agent → table → web endpoint."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from dmstream.infra.process import free_port
from dmstream.infra.stack import Stack
from dmstream.streams.ocs import announce
from dmstream.streams.producer import SummitProducer
from dmstream.topics import NEXT_VISIT
from dmstream.workers import WorkerProcess, get_json

pytestmark = pytest.mark.integration


def test_announced_visits_reach_the_table_and_survive_a_restart(stack: Stack, announcements) -> None:
    worker = WorkerProcess(stack.settings, "flow", free_port())
    worker.start()
    try:
        health = worker.wait_healthy()
        assert any(a.startswith(NEXT_VISIT.name) for a in health["assignment"])

        visits = announcements(5, 11)

        async def send() -> None:
            async with SummitProducer(stack.settings.kafka_bootstrap) as producer:
                await announce(producer, visits)

        asyncio.run(send())
        found = worker.wait_for_visits({v.groupId for v in visits})
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
        recovered = worker.wait_for_visits({v.groupId for v in visits}, timeout=30)
        assert set(recovered) == {v.groupId for v in visits}
    finally:
        worker.stop()
    assert not worker.process.is_running()


def test_demo_runs_the_main_job(stack: Stack, child_env, tmp_path) -> None:
    night = tmp_path / "demo-night"
    command = [sys.executable, "-m", "dmstream", "demo", "--visits", "2", "--night-dir", str(night)]
    done = subprocess.run(command, env=child_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "simulated night" in done.stdout
    announced = [json.loads(line)["key"] for line in (night / "events.jsonl").read_text().splitlines()
                 if json.loads(line).get("topic") == NEXT_VISIT.name]
    assert len(announced) == 2
    for group_id in announced:
        assert group_id in done.stdout
    assert f"consumed 2 messages from {NEXT_VISIT.name}" in done.stdout
    # A second run reuses the night it already simulated.
    again = subprocess.run(command, env=child_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "reusing the simulated night" in again.stdout
