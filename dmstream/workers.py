"""Faust workers as background processes, for the demo, the tests and operators.

``dmstream worker`` runs one worker in the foreground; :class:`WorkerProcess`
starts one in the background with its own id and web port, waits until it is
healthy and stops it, the way a process supervisor would.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from dmstream.infra.process import ManagedProcess, StackError
from dmstream.settings import Settings


def get_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    """GET ``url`` and decode its JSON body; returns (HTTP status, body)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


class WorkerProcess:
    """One ``dmstream worker`` in the background, found again by its worker id."""

    def __init__(self, settings: Settings, worker_id: str, web_port: int) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.web_port = web_port
        self.url = f"http://{settings.host}:{web_port}"
        self.process = ManagedProcess(
            f"worker-{worker_id}", settings.data_dir / "run", settings.data_dir / "logs",
            marker=f"worker --worker-id {worker_id}",
        )

    def start(self, extra_env: dict[str, str] | None = None) -> None:
        env = {**self.settings.as_env(), **(extra_env or {})}
        self.process.start(
            [sys.executable, "-m", "dmstream", "worker", "--worker-id", self.worker_id,
             "--web-port", str(self.web_port)],
            env=env,
        )

    def wait_healthy(self, timeout: float = 120.0) -> dict[str, Any]:
        """Block until ``/health/`` says ok: partitions assigned, tables recovered."""
        deadline = time.monotonic() + timeout
        last: Any = "no answer"
        while time.monotonic() < deadline:
            if not self.process.is_running():
                raise StackError(f"worker {self.worker_id} exited:\n{self.process.log_tail(30)}")
            try:
                status, body = get_json(f"{self.url}/health/")
            except (OSError, ValueError) as exc:
                last = exc
            else:
                if status == 200:
                    return body
                last = body
            time.sleep(0.5)
        raise StackError(f"worker {self.worker_id} not healthy after {timeout:.0f} s: {last}\n"
                         f"{self.process.log_tail(30)}")

    def wait_for_visits(self, group_ids: set[str], timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        """Block until ``/visits/`` lists every one of ``group_ids``; return their rows."""
        deadline = time.monotonic() + timeout
        while True:
            _, body = get_json(f"{self.url}/visits/")
            found = {row["groupId"]: row for row in body["visits"] if row["groupId"] in group_ids}
            if len(found) == len(group_ids):
                return found
            if time.monotonic() > deadline:
                raise StackError(f"only {len(found)} of {len(group_ids)} visits reached the table of "
                                 f"worker {self.worker_id}")
            time.sleep(0.3)

    def stop(self, timeout: float = 30.0) -> bool:
        return self.process.stop(timeout=timeout)
