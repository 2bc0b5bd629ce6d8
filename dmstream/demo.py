"""The main job: a simulated night replayed through Kafka into a running worker.

At this stage of dmstream the pipeline records the visits the observatory
announces; each later stage adds its step (archiving, ISR, alerts, QC) to what
this job prints.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import click

from dmstream.infra.process import free_port
from dmstream.settings import Settings
from dmstream.streams.night import MessageEvent, NightReader
from dmstream.streams.observatory import NightConfig
from dmstream.streams.replay import ReplayConfig, ReplayStats, replay
from dmstream.streams.simulate import SimulationConfig, simulate_night
from dmstream.topics import NEXT_VISIT
from dmstream.workers import WorkerProcess, get_json


@dataclass(frozen=True)
class DemoNight:
    """The small night the demo simulates (about 15 detector-exposures)."""

    seed: int = 1
    day_obs: int = 20261209
    visits: int = 4
    detectors: tuple[str, ...] = ("R22_S11",)
    bands: tuple[str, ...] = ("g", "r")

    def simulation(self) -> SimulationConfig:
        return SimulationConfig(
            night=NightConfig(seed=self.seed, day_obs=self.day_obs, n_visits=self.visits, bands=self.bands,
                              snaps="mixed", n_bias=2, n_dark=1, n_flat=1, flat_bands=self.bands),
            detectors=self.detectors,
        )


def ensure_night(directory: Path, night: DemoNight) -> Path:
    """Simulate the demo night unless ``directory`` already holds the same one."""
    wanted = {"seed": night.seed, "visits": night.visits}
    manifest = directory / "night.json"
    if manifest.exists():
        reader = NightReader(directory)
        if ({k: reader.manifest.simulation.get(k) for k in wanted} == wanted
                and reader.manifest.detectors == list(night.detectors)):
            click.echo(f"reusing the simulated night in {directory}")
            return directory
    summary = simulate_night(directory, night.simulation())
    click.echo(f"simulated night {directory}: {summary.exposures} exposures, {summary.raw_files} raw files, "
               f"{summary.events} events, {summary.sources_drawn} sources drawn ({summary.seconds:.1f} s)")
    return directory


def _announced_group_ids(night: Path) -> list[str]:
    return [event.key for event in NightReader(night).events()
            if isinstance(event, MessageEvent) and event.topic == NEXT_VISIT.name]


def run(settings: Settings, night_dir: Path, night: DemoNight) -> None:
    ensure_night(night_dir, night)
    group_ids = _announced_group_ids(night_dir)
    worker = WorkerProcess(settings, "demo", free_port(settings.host))
    worker.start()
    try:
        worker.wait_healthy()
        stats: ReplayStats = asyncio.run(
            replay([night_dir], settings.kafka_bootstrap, ReplayConfig(speed=None)))
        recorded = worker.wait_for_visits(set(group_ids))
        _, metrics = get_json(f"{worker.url}/metrics/")
    finally:
        worker.stop()
    click.echo(f"replayed the night onto Kafka: {stats.messages} OCS/EFD messages, {stats.readouts} detector "
               f"readouts as {stats.amplifier_messages} amplifier messages, {stats.bytes_sent / 1e6:.0f} MB "
               f"in {stats.seconds:.1f} s ({stats.megabytes_per_second:.0f} MB/s)")
    click.echo(f"the worker recorded {len(recorded)} announced visits in table announced-visits "
               f"(read back from {worker.url}/visits/):")
    click.echo(f"  {'groupId':<24} {'band':<4} {'snaps':>5} {'RA':>8} {'Dec':>8}  survey")
    for group_id in group_ids:
        row = recorded[group_id]
        click.echo(f"  {row['groupId']:<24} {row['filters'][:1]:<4} {row['nimages']:>5} "
                   f"{row['position'][0]:8.3f} {row['position'][1]:8.3f}  {row['survey']}")
    received = metrics["messages_received_by_topic"].get(NEXT_VISIT.name, 0)
    click.echo(f"the worker consumed {received} messages from {NEXT_VISIT.name}")
