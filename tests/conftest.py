"""Shared fixtures.

Integration tests run against a real stack that this test session starts on
free loopback ports with its state in a temporary directory (so it never
touches a developer's running stack), reusing the project's cached Kafka jars
and ``influxd``.  If the stack cannot start, those tests fail and say why.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from dmstream.backbone import Backbone
from dmstream.batch.calibrations import build_masters, ingest_curated
from dmstream.batch.single_frame import ingest_reference_catalog
from dmstream.batch.templates import build_templates
from dmstream.infra.process import free_port
from dmstream.infra.stack import Stack
from dmstream.models import NextVisit
from dmstream.settings import ENV_PREFIX, Settings
from dmstream.streams.efd import EfdConfig, summit_events
from dmstream.streams.night import Manifest
from dmstream.streams.observatory import NightConfig, plan_night
from dmstream.streams.rawfits import read_raw
from dmstream.streams.simulate import SimulationConfig, simulate_night, simulate_reference_night
from dmstream.topics import NEXT_VISIT

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _shared_cache_dir() -> Path:
    return Path(os.environ.get(ENV_PREFIX + "CACHE_DIR", PROJECT_ROOT / ".dmstream" / "cache")).resolve()


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    """Settings of a throw-away stack: its own data directory and free ports."""
    ports = {
        name: free_port()
        for name in ("kafka_port", "kafka_controller_port", "influxdb_port",
                     "influxdb_rpc_port", "redis_port", "web_port")
    }
    values = {"data_dir": data_dir, "cache_dir": _shared_cache_dir(), **ports, **overrides}
    return Settings(**values)


@cache
def planned_announcements(count: int, seed: int) -> tuple[NextVisit, ...]:
    """The ``nextVisit`` announcements of a planned night of ``count`` visits."""
    plan = plan_night(NightConfig(seed=seed, day_obs=20261209, n_visits=count, n_bias=0, n_dark=0, n_flat=0))
    return tuple(NextVisit(**event.record) for event in summit_events(plan, EfdConfig(telemetry=False))
                 if event.topic == NEXT_VISIT)


@pytest.fixture(scope="session")
def announcements() -> object:
    """``announcements(count, seed)``: nextVisit records of a planned night."""
    return planned_announcements


@pytest.fixture(scope="session")
def new_settings() -> object:
    """Make the settings of another throw-away stack: ``new_settings(tmp_path, **overrides)``."""
    return make_settings


@pytest.fixture(scope="session", autouse=True)
def _no_inherited_endpoints() -> None:
    """Endpoints exported in the developer's shell must not redirect the tests."""
    for name in ("KAFKA_BOOTSTRAP", "INFLUXDB_URL", "REDIS_URL"):
        os.environ.pop(ENV_PREFIX + name, None)


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(tmp_path_factory.mktemp("stack"))


@pytest.fixture(scope="session")
def stack(stack_settings: Settings) -> Iterator[Stack]:
    """The real local stack (Kafka, InfluxDB, Redis), up for the whole session."""
    running = Stack(stack_settings)
    try:
        running.up()
    except Exception as exc:
        running.down()
        pytest.fail(f"the local stack did not start: {exc}", pytrace=False)
    yield running
    running.down()


@pytest.fixture
def child_env(stack_settings: Settings) -> dict[str, str]:
    """Environment for a ``dmstream`` subprocess pointed at the session's stack."""
    return {**os.environ, **stack_settings.as_env()}


@dataclass(frozen=True)
class SmallNights:
    """A small simulated night and its reference night, for the Prompt Processing chain."""

    night: Path
    reference: Path
    config: SimulationConfig


@pytest.fixture(scope="session")
def small_nights(tmp_path_factory: pytest.TempPathFactory) -> SmallNights:
    """Two r-band visits on one e2v detector, and their reference night (3 visits per field, 21 days earlier).

    Telemetry is left out: these nights feed pixels, not the EFD.
    """
    root = tmp_path_factory.mktemp("small-nights")
    config = SimulationConfig(
        night=NightConfig(seed=6, day_obs=20261213, n_visits=2, bands=("r",), snaps="1x30", n_bias=2,
                          n_dark=1, n_flat=1, flat_bands=("r",)),
        detectors=("R22_S11",), efd=EfdConfig(telemetry=False), compress=False)
    simulate_night(root / "night", config)
    simulate_reference_night(root / "reference", config)
    return SmallNights(root / "night", root / "reference", config)


@pytest.fixture(scope="session")
def prepared_backbone(small_nights: SmallNights, stack_settings: Settings) -> Backbone:
    """The session stack's Data Backbone as the afternoon leaves it before the night.

    Both nights' curated calibrations, calibration raws, master calibrations
    and reference catalogs; the reference night's science raws and the
    templates built from them.  The main night's science raws are left for the
    archiver.
    """
    backbone = Backbone.from_settings(stack_settings)
    for night in (small_nights.reference, small_nights.night):
        ingest_curated(night, backbone)
        ingest_reference_catalog(night, backbone)
        for raw in sorted((night / "raw").rglob("*.fits")):
            if night == small_nights.reference or read_raw(raw).primary_header["IMGTYPE"] != "OBJECT":
                backbone.ingest_raw(raw)
        build_masters(backbone, Manifest.read(night).day_obs)
    build_templates(backbone, [Manifest.read(small_nights.reference).day_obs])
    return backbone
