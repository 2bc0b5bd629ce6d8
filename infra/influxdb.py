"""InfluxDB 1.8 on loopback, built from its Go module with the machine's Go.

1.8.10 is the last 1.x release published as a Go module; it speaks both the
1.x API (line protocol and InfluxQL, for ``lsst-efd-client``, Chronograf and
Grafana) and the 2.x-compatible ``/api/v2/write`` and ``/api/v2/query`` that
``influxdb-client`` uses.  The binary is cached under ``<cache_dir>``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS

from dmstream.infra.process import StackError, run_checked
from dmstream.infra.service import Service, render_template
from dmstream.logs import get_logger

log = get_logger(__name__)

INFLUXDB_VERSION = "1.8.10"
INFLUXDB_MODULE = "github.com/influxdata/influxdb/cmd/influxd"
#: Where the stack's own health probes go, away from the EFD and QC data.
HEALTH_DATABASE = "dmstream_health"


def influxql(url: str, query: str, database: str | None = None, timeout: float = 10.0
             ) -> list[dict[str, Any]]:
    """Run an InfluxQL statement through the 1.x ``/query`` endpoint; return its results."""
    params = {"q": query, "epoch": "ns"}
    if database:
        params["db"] = database
    request = urllib.request.Request(
        f"{url}/query", data=urllib.parse.urlencode(params).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = json.load(response)
    for result in body.get("results", []):
        if "error" in result:
            raise StackError(f"InfluxQL {query!r} failed: {result['error']}")
    return body.get("results", [])


class InfluxDB(Service):
    name = "influxdb"

    @property
    def ports(self) -> dict[str, int]:
        return {
            "influxdb_port": self.settings.influxdb_port,
            "influxdb_rpc_port": self.settings.influxdb_rpc_port,
        }

    @property
    def binary(self) -> Path:
        return self.settings.cache_dir / f"influxdb-{INFLUXDB_VERSION}" / "bin" / "influxd"

    @property
    def databases(self) -> list[str]:
        return [self.settings.efd_database, self.settings.qc_database, HEALTH_DATABASE]

    def is_installed(self) -> bool:
        return self.binary.exists()

    def install(self) -> None:
        if self.is_installed():
            return
        if shutil.which("go") is None:
            raise StackError("influxdb: `go` is not on PATH; it builds influxd from its Go module")
        log.info("building influxd from its Go module (about a minute)",
                 module=f"{INFLUXDB_MODULE}@v{INFLUXDB_VERSION}")
        started = time.monotonic()
        run_checked(
            ["go", "install", f"{INFLUXDB_MODULE}@v{INFLUXDB_VERSION}"],
            "building influxd", self.binary.parent.parent / "go-install.log",
            env={"GOBIN": str(self.binary.parent), "CGO_ENABLED": os.environ.get("CGO_ENABLED", "1")},
        )
        log.info("built influxd", binary=str(self.binary),
                 seconds=round(time.monotonic() - started, 1))

    def command(self) -> list[str]:
        s = self.settings
        config = render_template(
            "influxdb.conf", self.state_dir / "influxdb.conf",
            host=s.host, port=s.influxdb_port, rpc_port=s.influxdb_rpc_port,
            state_dir=self.state_dir,
        )
        return [str(self.binary), "-config", str(config)]

    def after_start(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                for database in self.databases:
                    influxql(self.settings.influxdb_url, f'CREATE DATABASE "{database}"')
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def check(self) -> str:
        url = self.settings.influxdb_url
        token = uuid.uuid4().hex
        bucket = f"{HEALTH_DATABASE}/autogen"
        with InfluxDBClient(url=url, token="", org="-", timeout=10_000) as client:
            client.write_api(write_options=SYNCHRONOUS).write(
                bucket=bucket, record=f"probe,token={token} value=1i"
            )
            tables = client.query_api().query(
                f'from(bucket: "{bucket}") |> range(start: -1m) '
                f'|> filter(fn: (r) => r._measurement == "probe" and r.token == "{token}")'
            )
        if not any(table.records for table in tables):
            raise StackError("a point written through /api/v2/write did not come back from Flux")
        found = influxql(url, "SHOW DATABASES")[0]["series"][0]["values"]
        missing = set(self.databases) - {row[0] for row in found}
        if missing:
            raise StackError(f"databases missing: {sorted(missing)}")
        return (f"wrote and read back a point through /api/v2 (Flux); "
                f"InfluxQL lists {', '.join(self.databases)}")
