"""What every service of the local stack does: install, start, check, stop."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from string import Template

from dmstream.infra.process import ManagedProcess, StackError, require_free_ports, wait_for_port
from dmstream.logs import get_logger
from dmstream.settings import Settings

log = get_logger(__name__)

TEMPLATES = Path(__file__).parent / "templates"


def render_template(name: str, destination: Path, **values: object) -> Path:
    """Fill ``infra/templates/<name>`` with ``values`` and write it to ``destination``."""
    text = Template((TEMPLATES / name).read_text()).substitute(
        {key: str(value) for key, value in values.items()}
    )
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(text)
    return destination


@dataclass
class Health:
    service: str
    healthy: bool
    detail: str
    pid: int | None = None


class Service(ABC):
    """One service of the local stack with its state under ``<data_dir>/<name>/``."""

    name: str
    #: How long a cold start may take before it counts as failed, s.
    start_timeout: float = 60.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = settings.data_dir / self.name
        self.process = ManagedProcess(
            self.name, settings.data_dir / "run", settings.data_dir / "logs", self.process_marker
        )

    @property
    def process_marker(self) -> str:
        """What the service's command line shows, to recognise its pid (see ManagedProcess)."""
        return str(self.state_dir)

    @property
    @abstractmethod
    def ports(self) -> dict[str, int]:
        """Ports this service listens on, by the name of their setting."""

    @abstractmethod
    def is_installed(self) -> bool: ...

    @abstractmethod
    def install(self) -> None:
        """Fetch or build what the service needs; a no-op when already there."""

    @abstractmethod
    def command(self) -> list[str]:
        """Write the configuration and return the command line that runs the service."""

    @abstractmethod
    def check(self) -> str:
        """A real round trip through the service; return what was checked, raise if it failed."""

    def after_start(self) -> None:  # noqa: B027 - an optional hook
        """Create databases, topics, etc. once the service answers."""

    def up(self) -> Health:
        """Start the service unless it already runs; idempotent."""
        if self.process.is_running():
            log.info("already running", service=self.name, pid=self.process.pid)
            return self.status()
        if not self.is_installed():
            self.install()
        require_free_ports(self.name, self.settings.host, self.ports)
        command = self.command()
        self.process.start(command, cwd=self.state_dir)
        started = time.monotonic()
        try:
            for port in self.ports.values():
                wait_for_port(self.settings.host, port, self.start_timeout, self.process.is_running)
            self.after_start()
            health = self.status()
        except Exception as exc:
            self.process.stop(timeout=10)
            raise StackError(
                f"{self.name} did not come up: {exc}\n--- last lines of {self.process.log_file}:\n"
                f"{self.process.log_tail()}"
            ) from exc
        if not health.healthy:
            self.process.stop(timeout=10)
            raise StackError(f"{self.name} started but is unhealthy: {health.detail}")
        log.info("service up", service=self.name, pid=health.pid,
                 seconds=round(time.monotonic() - started, 1), check=health.detail)
        return health

    def down(self) -> bool:
        return self.process.stop()

    def status(self) -> Health:
        pid = self.process.pid
        if pid is None:
            return Health(self.name, False, "not running")
        try:
            detail = self.check()
        except Exception as exc:
            return Health(self.name, False, f"running but failing its check: {exc}", pid)
        return Health(self.name, True, detail, pid)
