"""Run-time settings of dmstream, read from ``DMSTREAM_*`` environment variables.

Every default points at the local stack that ``dmstream stack up`` starts on
loopback, so that nothing needs configuring on one machine.  Ports are chosen
away from the services' usual ones (9092, 8086, 6379) so that a system-wide
Kafka, InfluxDB or Redis never collides with ours.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

ENV_PREFIX = "DMSTREAM_"


def _env(name: str, default: str) -> str:
    return os.environ.get(ENV_PREFIX + name, default)


@dataclass(frozen=True)
class Settings:
    """Where the services are and where dmstream keeps its state.

    Attributes
    ----------
    data_dir : Path
        Project-local state: service data, logs, pid files, Faust table stores.
    cache_dir : Path
        Downloaded or built tools (Kafka jars, the ``influxd`` binary); kept
        apart from ``data_dir`` so that a throw-away stack reuses them.
    """

    data_dir: Path = field(default_factory=lambda: Path(_env("DATA_DIR", ".dmstream")).resolve())
    cache_dir: Path = field(
        default_factory=lambda: Path(
            _env("CACHE_DIR", str(Path(_env("DATA_DIR", ".dmstream")) / "cache"))
        ).resolve()
    )
    host: str = field(default_factory=lambda: _env("HOST", "127.0.0.1"))
    kafka_port: int = field(default_factory=lambda: int(_env("KAFKA_PORT", "19092")))
    kafka_controller_port: int = field(
        default_factory=lambda: int(_env("KAFKA_CONTROLLER_PORT", "19093"))
    )
    kafka_heap: str = field(default_factory=lambda: _env("KAFKA_HEAP", "1g"))
    influxdb_port: int = field(default_factory=lambda: int(_env("INFLUXDB_PORT", "18086")))
    influxdb_rpc_port: int = field(default_factory=lambda: int(_env("INFLUXDB_RPC_PORT", "18088")))
    redis_port: int = field(default_factory=lambda: int(_env("REDIS_PORT", "16379")))
    web_port: int = field(default_factory=lambda: int(_env("WEB_PORT", "16066")))
    worker_id: str = field(default_factory=lambda: _env("WORKER_ID", "worker-1"))
    log_format: str = field(default_factory=lambda: _env("LOG_FORMAT", "console"))
    log_level: str = field(default_factory=lambda: _env("LOG_LEVEL", "INFO"))
    efd_database: str = field(default_factory=lambda: _env("EFD_DATABASE", "efd"))
    qc_database: str = field(default_factory=lambda: _env("QC_DATABASE", "lsst_prompt"))
    #: Seconds from the end of a detector's readout after which Prompt Processing gives it up
    #: to Offline Processing (alerts are due within 60 s).
    detector_budget: float = field(default_factory=lambda: float(_env("DETECTOR_BUDGET", "60")))

    @property
    def kafka_bootstrap(self) -> str:
        return os.environ.get(ENV_PREFIX + "KAFKA_BOOTSTRAP", f"{self.host}:{self.kafka_port}")

    @property
    def influxdb_url(self) -> str:
        return os.environ.get(ENV_PREFIX + "INFLUXDB_URL", f"http://{self.host}:{self.influxdb_port}")

    @property
    def redis_url(self) -> str:
        return os.environ.get(ENV_PREFIX + "REDIS_URL", f"redis://{self.host}:{self.redis_port}/0")

    @property
    def web_url(self) -> str:
        return f"http://{self.host}:{self.web_port}"

    @property
    def registry_url(self) -> str:
        """SQLAlchemy URL of the Data Backbone's dataset registry (SQLite here, PostgreSQL where it grows)."""
        return os.environ.get(ENV_PREFIX + "REGISTRY_URL",
                              f"sqlite:///{self.data_dir / 'backbone' / 'registry.sqlite3'}")

    @property
    def backbone_root(self) -> Path:
        """Root of the Data Backbone's files; shared by every process that shares the registry."""
        default = self.data_dir / "backbone" / "files"
        return Path(os.environ.get(ENV_PREFIX + "BACKBONE_ROOT", default)).resolve()

    @property
    def apdb_url(self) -> str:
        """SQLAlchemy URL of the APDB, the Level 1 database of DiaObjects, DiaSources and DiaForcedSources."""
        return os.environ.get(ENV_PREFIX + "APDB_URL", f"sqlite:///{self.data_dir / 'apdb.sqlite3'}")

    def as_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings in a child process."""
        env = {}
        for f in fields(self):
            env[ENV_PREFIX + f.name.upper()] = str(getattr(self, f.name))
        return env


def load() -> Settings:
    """Settings as the current environment gives them."""
    return Settings()
