"""Background processes and ports of the stack, without the services themselves."""

from __future__ import annotations

import socket
import sys

import pytest

from dmstream.infra.process import ManagedProcess, PortInUseError, port_is_free, require_free_ports


def test_taken_port_names_the_setting_to_change() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not port_is_free("127.0.0.1", port)
        with pytest.raises(PortInUseError, match=rf"port {port}.*DMSTREAM_KAFKA_PORT"):
            require_free_ports("kafka", "127.0.0.1", {"kafka_port": port})
    assert port_is_free("127.0.0.1", port)


def test_started_process_is_found_again_and_stopped(tmp_path) -> None:
    marker = str(tmp_path / "sleeper")
    first = ManagedProcess("sleeper", tmp_path / "run", tmp_path / "logs", marker)
    first.start([sys.executable, "-c", "import time, sys; time.sleep(60)", marker])
    # Another ManagedProcess (another shell) finds it through the pid file.
    again = ManagedProcess("sleeper", tmp_path / "run", tmp_path / "logs", marker)
    assert again.pid == first._popen.pid
    assert first.stop(timeout=5)
    assert again.pid is None
    assert not first.is_running()
    assert not again.stop()


def test_recycled_pid_is_not_ours(tmp_path) -> None:
    """A pid file pointing at an unrelated process never makes us stop it."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "other.pid").write_text("1\n")
    process = ManagedProcess("other", tmp_path / "run", tmp_path / "logs", str(tmp_path))
    assert process.pid is None
    assert not process.stop()
