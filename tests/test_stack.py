"""The real local stack: health checks that do round trips, idempotent start, clean stop."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dmstream.infra.influxdb import influxql
from dmstream.infra.process import PortInUseError, port_is_free, process_state
from dmstream.infra.stack import Stack

pytestmark = pytest.mark.integration


def test_every_service_is_healthy(stack: Stack) -> None:
    rows = {h.service: h for h in stack.status()}
    assert set(rows) == {"kafka", "influxdb", "redis"}
    assert all(h.healthy for h in rows.values()), rows
    assert "consumed" in rows["kafka"].detail
    assert "Flux" in rows["influxdb"].detail
    assert "PING" in rows["redis"].detail


def test_starting_twice_is_harmless(stack: Stack) -> None:
    before = {h.service: h.pid for h in stack.status()}
    again = {h.service: h.pid for h in stack.up()}
    assert again == before


def test_a_second_stack_on_the_same_ports_says_which_port(stack: Stack, tmp_path, new_settings) -> None:
    clash = new_settings(tmp_path, redis_port=stack.settings.redis_port)
    with pytest.raises(PortInUseError, match=f"port {stack.settings.redis_port}.*DMSTREAM_REDIS_PORT"):
        Stack(clash).service("redis").up()


def test_influxdb_speaks_influxql_line_protocol_and_has_the_efd(stack: Stack) -> None:
    import urllib.request

    url = stack.settings.influxdb_url
    point = b"lsst.sal.ATDome.position,salIndex=1 azimuthPosition=123.5,private_sndStamp=1.7e9"
    request = urllib.request.Request(f"{url}/write?db=efd&precision=s", data=point + b" 1700000000")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 204
    results = influxql(url, 'SELECT "azimuthPosition" FROM "lsst.sal.ATDome.position"', database="efd")
    assert results[0]["series"][0]["values"][-1][1] == 123.5


def test_cli_status_reports_healthy(stack: Stack, child_env) -> None:
    done = subprocess.run([sys.executable, "-m", "dmstream", "stack", "status"],
                          env=child_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("healthy") == 3


def test_down_leaves_no_process_behind(stack: Stack, tmp_path, new_settings) -> None:
    """A stack of its own: up, down, and nothing of it is left running or listening."""
    own = Stack(new_settings(tmp_path))
    pids = [h.pid for h in own.up()]
    assert all(pids)
    assert sorted(own.down()) == ["influxdb", "kafka", "redis"]
    for pid in pids:
        assert process_state(pid) in (None, "Z")
    for service in own.services:
        for port in service.ports.values():
            assert port_is_free(own.settings.host, port)
    assert not any(h.healthy for h in own.status())
