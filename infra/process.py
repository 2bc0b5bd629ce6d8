"""Background service processes: start detached, record the pid, stop cleanly.

Each service of the local stack runs as its own process group with its pid in
``<data_dir>/run/<name>.pid`` and its output in ``<data_dir>/logs/<name>.log``,
so that a later ``dmstream stack down`` from another shell can find and stop it.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from dmstream.logs import get_logger

log = get_logger(__name__)


class StackError(RuntimeError):
    """A service of the local stack could not be installed, started or reached."""


class PortInUseError(StackError):
    pass


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on ``host:port`` (a TIME_WAIT leftover does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel considers free right now (for throw-away stacks in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def require_free_ports(service: str, host: str, ports: dict[str, int]) -> None:
    """Raise a :class:`PortInUseError` naming the setting to change if a port is taken."""
    for setting, port in ports.items():
        if not port_is_free(host, port):
            raise PortInUseError(
                f"{service}: port {port} on {host} is already in use by another program. "
                f"Stop that program (a dmstream stack of another data directory stops with "
                f"`dmstream stack down` run there), or give {service} another port with "
                f"DMSTREAM_{setting.upper()}=<port>."
            )


def wait_for_port(host: str, port: int, timeout: float, is_alive: Callable[[], bool]) -> None:
    """Block until something accepts connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive():
            raise StackError(f"process exited before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise StackError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of ``pid`` (``None`` when there is no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class ManagedProcess:
    """One background process of the stack, found again through its pid file.

    Parameters
    ----------
    name : str
        Short name, used for the pid and log files.
    run_dir, log_dir : Path
        Where the pid file and the log file go.
    marker : str
        A string that appears in the process's command line (its config or data
        path), so that a recycled pid is never mistaken for our service.
    """

    def __init__(self, name: str, run_dir: Path, log_dir: Path, marker: str) -> None:
        self.name = name
        self.pid_file = run_dir / f"{name}.pid"
        self.log_file = log_dir / f"{name}.log"
        self.marker = marker
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        state = process_state(pid)
        if state is None or state in ("Z", "X") or self.marker not in _cmdline(pid):
            return None
        return pid

    def is_running(self) -> bool:
        if self._popen is not None:
            return self._popen.poll() is None
        return self.pid is not None

    def start(self, command: Sequence[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> int:
        """Start ``command`` in a new session, detached from this terminal."""
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:
            self._popen = subprocess.Popen(
                list(command),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **(env or {})},
                cwd=cwd,
            )
        self.pid_file.write_text(f"{self._popen.pid}\n")
        log.info("process started", service=self.name, pid=self._popen.pid, log=str(self.log_file))
        return self._popen.pid

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the process group: SIGTERM, then SIGKILL after ``timeout`` seconds.

        Returns True when a running process was stopped.
        """
        pid = self.pid
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._alive(pid):
            time.sleep(0.1)
        if self._alive(pid):
            log.warning("process ignored SIGTERM, killing", service=self.name, pid=pid)
            os.killpg(pid, signal.SIGKILL)
            while self._alive(pid):
                time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)
        log.info("process stopped", service=self.name, pid=pid)
        return True

    def _alive(self, pid: int) -> bool:
        if self._popen is not None and self._popen.pid == pid:
            return self._popen.poll() is None
        return process_state(pid) not in (None, "Z", "X")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def run_checked(command: Sequence[str], what: str, log_file: Path, cwd: Path | None = None,
                env: dict[str, str] | None = None) -> None:
    """Run an install or setup step, keeping its output in ``log_file``; raise with its tail."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        result = subprocess.run(
            list(command), stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
            env={**os.environ, **(env or {})}, check=False,
        )
    if result.returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
        raise StackError(f"{what} failed (exit {result.returncode}); see {log_file}:\n{tail}")
