"""The local stack as one thing: install, start, check and stop all services."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from dmstream.infra.influxdb import InfluxDB
from dmstream.infra.kafka import Kafka
from dmstream.infra.redis import Redis
from dmstream.infra.service import Health, Service
from dmstream.logs import get_logger
from dmstream.settings import Settings

log = get_logger(__name__)


class Stack:
    """Kafka, InfluxDB and Redis with their state under ``settings.data_dir``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.services: list[Service] = [Redis(settings), InfluxDB(settings), Kafka(settings)]

    def service(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    def install(self) -> None:
        """Fetch and build whatever is missing, all services at once (the Go build is slowest)."""
        with ThreadPoolExecutor(len(self.services)) as pool:
            for future in [pool.submit(s.install) for s in self.services]:
                future.result()

    def up(self) -> list[Health]:
        self.install()
        return [service.up() for service in self.services]

    def down(self) -> list[str]:
        """Stop every service, in the reverse order of starting them."""
        return [s.name for s in reversed(self.services) if s.down()]

    def status(self) -> list[Health]:
        return [service.status() for service in self.services]
