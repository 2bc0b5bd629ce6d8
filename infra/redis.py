"""Redis on loopback (Debian's ``redis-server``): caches and mini-broker state."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import redis

from dmstream.infra.process import StackError, run_checked
from dmstream.infra.service import Service, render_template
from dmstream.logs import get_logger

log = get_logger(__name__)


def apt_install(package: str, log_dir: Path) -> None:
    """Install a Debian package, as root or through sudo."""
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise StackError(f"installing {package} needs root: run `apt-get install {package}`")
        prefix = ["sudo", "-n"]
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    log_file = log_dir / f"apt-{package}.log"
    log.info("installing Debian package", package=package)
    run_checked([*prefix, "apt-get", "update", "-q"], "apt-get update", log_file, env=env)
    run_checked([*prefix, "apt-get", "install", "-y", "-q", package],
                f"apt-get install {package}", log_file, env=env)


class Redis(Service):
    name = "redis"
    start_timeout = 20.0

    @property
    def ports(self) -> dict[str, int]:
        return {"redis_port": self.settings.redis_port}

    def is_installed(self) -> bool:
        return shutil.which("redis-server") is not None

    def install(self) -> None:
        if not self.is_installed():
            apt_install("redis-server", self.settings.data_dir / "logs")

    def command(self) -> list[str]:
        s = self.settings
        config = render_template("redis.conf", self.state_dir / "redis.conf",
                                 host=s.host, port=s.redis_port, state_dir=self.state_dir)
        return [shutil.which("redis-server") or "redis-server", str(config)]

    def check(self) -> str:
        client = redis.Redis.from_url(self.settings.redis_url, socket_timeout=5)
        try:
            if not client.ping():
                raise StackError("PING did not answer PONG")
            key, token = f"dmstream:health:{uuid.uuid4().hex}", uuid.uuid4().hex
            client.set(key, token, ex=60)
            if client.get(key) != token.encode():
                raise StackError("a value written with SET did not come back with GET")
            client.delete(key)
            version = client.info("server")["redis_version"]
        finally:
            client.close()
        return f"PING, SET and GET answered (redis {version})"
