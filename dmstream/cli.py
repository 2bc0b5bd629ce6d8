"""The ``dmstream`` command line."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import click

from dmstream import logs, settings


def _settings() -> settings.Settings:
    return settings.load()


@click.group()
def main() -> None:
    """dmstream: the LSST Data Management System on Faust and Kafka."""
    config = _settings()
    logs.configure(config.log_format, config.log_level)


@main.group()
def stack() -> None:
    """The local stack: Kafka (KRaft), InfluxDB 1.8 and Redis on loopback."""


def _print_health(rows: list) -> bool:
    for health in rows:
        mark = "healthy" if health.healthy else "DOWN"
        pid = f"pid {health.pid}" if health.pid else ""
        click.echo(f"  {health.service:<9} {mark:<8} {pid:<10} {health.detail}")
    return all(h.healthy for h in rows)


@stack.command("install")
def stack_install() -> None:
    """Fetch the Kafka jars, build influxd, install redis-server (whatever is missing)."""
    from dmstream.infra.stack import Stack

    Stack(_settings()).install()
    click.echo("stack installed")


@stack.command("up")
def stack_up() -> None:
    """Install what is missing and start every service; harmless when already up."""
    from dmstream.infra.process import StackError
    from dmstream.infra.stack import Stack

    config = _settings()
    try:
        rows = Stack(config).up()
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"stack up (data in {config.data_dir}):")
    _print_health(rows)
    click.echo(f"  kafka bootstrap {config.kafka_bootstrap} · influxdb {config.influxdb_url} · "
               f"redis {config.redis_url}")


@stack.command("down")
def stack_down() -> None:
    """Stop every service of the stack."""
    from dmstream.infra.stack import Stack

    stopped = Stack(_settings()).down()
    click.echo(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@stack.command("status")
def stack_status() -> None:
    """Check each service with a real round trip; exit 1 unless all are healthy."""
    from dmstream.infra.stack import Stack

    if not _print_health(Stack(_settings()).status()):
        sys.exit(1)


@main.command("topics")
def list_topics() -> None:
    """The Kafka topics dmstream declares."""
    from dmstream.topics import ALL_TOPICS

    for spec in ALL_TOPICS:
        click.echo(f"{spec.name:<45} {spec.partitions:>3} partitions  {spec.description}")


@main.command()
@click.option("--worker-id", default=None, help="Name of this worker (default: DMSTREAM_WORKER_ID).")
@click.option("--web-port", type=int, default=None, help="Port of its web endpoint.")
def worker(worker_id: str | None, web_port: int | None) -> None:
    """Run one Faust worker in the foreground (stop with Ctrl-C or SIGTERM)."""
    if worker_id:
        os.environ[settings.ENV_PREFIX + "WORKER_ID"] = worker_id
    if web_port:
        os.environ[settings.ENV_PREFIX + "WEB_PORT"] = str(web_port)
    import faust

    from dmstream.app import SETTINGS, app

    app.conf.datadir.parent.mkdir(parents=True, exist_ok=True)
    logs.get_logger("dmstream.worker").info(
        "worker starting", worker=SETTINGS.worker_id, broker=SETTINGS.kafka_bootstrap,
        web=SETTINGS.web_url,
    )
    faust.Worker(app, loglevel=SETTINGS.log_level, quiet=True).execute_from_commandline()


@main.command()
@click.option("--night-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the simulated night goes (default: <data dir>/nights/demo); reused if it matches.")
@click.option("--visits", default=4, show_default=True, help="Science visits of the simulated night.")
@click.option("--seed", default=1, show_default=True)
def demo(night_dir: Path | None, visits: int, seed: int) -> None:
    """The main job: a simulated night replayed through Kafka into a worker."""
    from dmstream import demo as main_job
    from dmstream.infra.process import StackError

    config = _settings()
    try:
        main_job.run(config, night_dir or config.data_dir / "nights" / "demo",
                     main_job.DemoNight(seed=seed, visits=visits))
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc


@main.group()
def night() -> None:
    """Recorded nights: simulate one, replay nights onto Kafka, record live topics."""


@night.command("simulate")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=1, show_default=True, help="Same seed, same bytes.")
@click.option("--day-obs", default=20261209, show_default=True, help="Observing day YYYYMMDD.")
@click.option("--visits", default=6, show_default=True, help="Science visits (0: the whole night).")
@click.option("--detectors", default="R22_S11", show_default=True, help="Comma-separated detector names.")
@click.option("--bands", default="g,r,i", show_default=True)
@click.option("--snaps", type=click.Choice(["1x30", "2x15", "mixed"]), default="mixed", show_default=True)
@click.option("--biases", default=3, show_default=True)
@click.option("--darks", default=2, show_default=True)
@click.option("--flats", default=2, show_default=True, help="Dome flats per band.")
@click.option("--jobs", default=os.cpu_count() or 1, show_default=True, help="Parallel processes.")
@click.option("--compress/--no-compress", default=True, show_default=True, help="RICE_1 raw files.")
@click.option("--reference", "reference_out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the night's reference night (its fields days earlier, in good seeing, for "
                   "templates) into this directory.")
@click.option("--reference-visits", default=3, show_default=True,
              help="Reference visits of each field in each band of the night.")
@click.option("--reference-days-before", default=21, show_default=True,
              help="Days between the reference night and the night.")
@click.option("--reference-seeing", default=0.6, show_default=True,
              help="Median DIMM seeing of the reference night, arcsec.")
def night_simulate(out: Path, seed: int, day_obs: int, visits: int, detectors: str, bands: str, snaps: str,
                   biases: int, darks: int, flats: int, jobs: int, compress: bool, reference_out: Path | None,
                   reference_visits: int, reference_days_before: int, reference_seeing: float) -> None:
    """Simulate a night of the summit into directory OUT (and its reference night with --reference)."""
    from dmstream.streams.observatory import NightConfig, ReferenceConfig, ReferenceNightError
    from dmstream.streams.simulate import SimulationConfig, simulate_night, simulate_reference_night

    band_list = tuple(b.strip() for b in bands.split(",") if b.strip())
    config = SimulationConfig(
        night=NightConfig(seed=seed, day_obs=day_obs, n_visits=visits or None, bands=band_list, snaps=snaps,
                          n_bias=biases, n_dark=darks, n_flat=flats, flat_bands=band_list),
        detectors=tuple(d.strip() for d in detectors.split(",") if d.strip()),
        compress=compress, jobs=jobs,
    )
    if reference_out is not None:
        # First, so that a reference night that cannot be planned stops us before the night is simulated.
        try:
            reference = ReferenceConfig(visits_per_field=reference_visits, days_before=reference_days_before,
                                        seeing_median=reference_seeing)
            summary = simulate_reference_night(reference_out, config, reference)
        except ReferenceNightError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"reference night: {summary.exposures} exposures x {len(config.detectors)} detectors = "
                   f"{summary.raw_files} raw files, {summary.events} events, "
                   f"{summary.sources_drawn} sources drawn, in {summary.seconds:.1f} s -> {reference_out}")
    summary = simulate_night(out, config)
    click.echo(f"simulated {summary.exposures} exposures x {len(config.detectors)} detectors = "
               f"{summary.raw_files} raw files, {summary.events} events, "
               f"{summary.sources_drawn} sources drawn, in {summary.seconds:.1f} s -> {out}")


@night.command("replay")
@click.argument("nights", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--speed", default="max", show_default=True,
              help="Multiple of real time (1 = as it happened), or 'max' for as fast as Kafka takes it.")
@click.option("--max-lag", type=int, default=None,
              help="Wait while the pipeline is more than this many readout messages behind.")
def night_replay(nights: tuple[Path, ...], speed: str, max_lag: int | None) -> None:
    """Replay recorded NIGHTS, in order, onto the summit's Kafka topics."""
    from dmstream.streams.night import NightFormatError
    from dmstream.streams.replay import ReplayConfig, replay

    config = ReplayConfig(speed=None if speed == "max" else float(speed), max_lag=max_lag)
    try:
        stats = asyncio.run(replay(list(nights), _settings().kafka_bootstrap, config))
    except NightFormatError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"replayed {stats.nights} night(s): {stats.messages} messages, {stats.readouts} detector "
               f"readouts ({stats.amplifier_messages} amplifier messages), {stats.bytes_sent / 1e6:.1f} MB "
               f"in {stats.seconds:.1f} s ({stats.megabytes_per_second:.1f} MB/s)")
    if stats.skipped_files or stats.rejected_events or stats.malformed_lines:
        click.echo(f"skipped {len(stats.skipped_files)} raw files, rejected {stats.rejected_events} events, "
                   f"{stats.malformed_lines} malformed lines:")
        for path, reason in stats.skipped_files:
            click.echo(f"  {path}: {reason}")


@night.command("record")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--from-beginning", is_flag=True, help="Start at the oldest retained messages.")
@click.option("--idle", default=30.0, show_default=True,
              help="Stop after this many seconds without messages.")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds.")
def night_record(out: Path, from_beginning: bool, idle: float, duration: float | None) -> None:
    """Record the live summit topics into a recorded night OUT."""
    from dmstream.streams.record import record

    stats = asyncio.run(record(out, _settings().kafka_bootstrap, from_beginning=from_beginning,
                               idle_seconds=idle, duration=duration))
    click.echo(f"recorded {stats.messages} messages and {stats.readouts} detector readouts "
               f"({len(stats.detectors)} detectors) into {out}; {stats.rejected} rejected, "
               f"{stats.incomplete_readouts} incomplete readouts")


@main.group()
def backbone() -> None:
    """The Data Backbone: datasets in the registry (DMSTREAM_REGISTRY_URL) and their files."""


@backbone.command("types")
def backbone_types() -> None:
    """The registered dataset types: how many datasets, storage class, data id."""
    from dmstream.backbone import Backbone

    store = Backbone.from_settings(_settings())
    counts = store.counts()
    for kind in store.types():
        click.echo(f"{kind.name:<16} {counts[kind.name]:>7}  {kind.storage:<10} {kind.describe_data_id()}")


@backbone.command("query")
@click.argument("dataset_type")
@click.option("--where", "-w", "conditions", multiple=True, metavar="KEY=VALUE",
              help="Keep datasets whose data id has this value (repeatable), e.g. -w detector=94.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per dataset.")
def backbone_query(dataset_type: str, conditions: tuple[str, ...], as_json: bool) -> None:
    """The datasets of DATASET_TYPE matching a partial data id, sorted by data id."""

    from dmstream.backbone import Backbone, BackboneError

    where = {}
    for condition in conditions:
        key, equals, value = condition.partition("=")
        if not equals or not key.strip():
            raise click.BadParameter(f"{condition!r} is not KEY=VALUE", param_hint="--where")
        where[key.strip()] = value.strip()
    try:
        refs = Backbone.from_settings(_settings()).query(dataset_type, **where)
    except BackboneError as exc:
        raise click.ClickException(str(exc)) from exc
    for ref in refs:
        if as_json:
            click.echo(json.dumps(ref.to_json()))
        else:
            data_id = " ".join(f"{key}={value}" for key, value in ref.data_id.items())
            click.echo(f"{data_id}  {ref.path}  {ref.size} B  sha256 {ref.checksum[:12]}")
    if not as_json:
        click.echo(f"{len(refs)} {dataset_type} dataset(s)")


@main.group()
def apdb() -> None:
    """The APDB, the Level 1 database (DMSTREAM_APDB_URL)."""


@apdb.command("query")
@click.option("--ra", type=float, default=None, help="Centre of a cone, degrees.")
@click.option("--dec", type=float, default=None, help="Centre of a cone, degrees.")
@click.option("--radius", type=float, default=60.0, show_default=True, help="Radius of the cone, arcsec.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per DiaObject, every column.")
def apdb_query(ra: float | None, dec: float | None, radius: float, as_json: bool) -> None:
    """Rows in each APDB table; with --ra and --dec, the current DiaObjects of that cone."""

    from dmstream.backbone.apdb import Apdb

    database = Apdb.from_settings(_settings())
    if ra is None or dec is None:
        if ra is not None or dec is not None:
            raise click.UsageError("give both --ra and --dec, or neither")
        for table, count in database.counts().items():
            click.echo(f"{table:<16} {count:>10}")
        return
    objects = database.dia_objects_in_cone(ra, dec, radius / 3600.0)
    for row in objects.to_pylist():
        if as_json:
            click.echo(json.dumps(row))
        else:
            click.echo(f"{row['diaObjectId']:>20}  ra {row['ra']:.6f}  dec {row['dec']:+.6f}  "
                       f"{row['nDiaSources']} DiaSources")
    if not as_json:
        click.echo(f"{len(objects)} DiaObject(s) within {radius:g} arcsec of ({ra:g}, {dec:g})")


@main.group()
def calibs() -> None:
    """Calibration products in the Data Backbone: curated calibrations and the day's masters."""


def _print_calibration_run(run, verb: str) -> None:
    for product in run.products:
        click.echo(f"  {product.describe()}")
    click.echo(f"{verb} {len(run.new)} calibration product(s); {len(run.kept)} already in the backbone")


@calibs.command("ingest-curated")
@click.argument("night_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def calibs_ingest_curated(night_dir: Path) -> None:
    """Put the curated calibrations (gains, read noise, linearity, crosstalk, defects) of NIGHT_DIR into
    the Data Backbone; again is a no-op."""
    from dmstream.backbone import Backbone, BackboneError
    from dmstream.batch.calibrations import ingest_curated
    from dmstream.streams.night import NightFormatError

    try:
        run = ingest_curated(night_dir, Backbone.from_settings(_settings()))
    except (NightFormatError, BackboneError) as exc:
        raise click.ClickException(str(exc)) from exc
    _print_calibration_run(run, "ingested")


@calibs.command("build")
@click.option("--day-obs", type=int, required=True, help="Observing day YYYYMMDD of the exposures.")
@click.option("--detector", "detectors", multiple=True, metavar="NAME",
              help="Detector name or id (repeatable; default: every detector with raws that day).")
def calibs_build(day_obs: int, detectors: tuple[str, ...]) -> None:
    """Build the master bias, dark and flats of DAY_OBS from its BIAS, DARK and FLAT raws in the backbone;
    products already there are kept."""
    from dmstream.backbone import Backbone, BackboneError
    from dmstream.batch.calibrations import MissingCalibrationError, build_masters

    keys = [int(key) if key.isdigit() else key for key in detectors]
    try:
        run = build_masters(Backbone.from_settings(_settings()), day_obs, keys or None)
    except KeyError as exc:
        raise click.BadParameter(exc.args[0], param_hint="--detector") from exc
    except (MissingCalibrationError, BackboneError) as exc:
        raise click.ClickException(str(exc)) from exc
    _print_calibration_run(run, "built")


@main.group()
def archive() -> None:
    """Archiving: raws in the Data Backbone."""


@archive.command("catch-up")
@click.option("--night", "night_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A recorded night: its event log is the OCS log and EFD, its raw/ the default buffer.")
@click.option("--day-obs", type=int, help="Read the OCS log and EFD of this day from Kafka instead.")
@click.option("--buffer", "buffers", multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Directory where the camera left raw files (repeatable; searched in order).")
@click.option("--detector", "detectors", multiple=True, metavar="NAME",
              help="Expected detector (repeatable).")
@click.option("--dry-run", is_flag=True, help="Find and check what is missing; ingest nothing.")
@click.option("--json", "as_json", is_flag=True, help="The full report as JSON.")
def archive_catch_up(night_dir: Path | None, day_obs: int | None, buffers: tuple[Path, ...],
                     detectors: tuple[str, ...], dry_run: bool, as_json: bool) -> None:
    """Ingest the raws the OCS log says were taken and the Data Backbone lacks, from the camera's buffers."""
    from dmstream.backbone import Backbone, BackboneError
    from dmstream.batch.catchup import CatchUpError, catch_up, read_kafka_logs, read_night_logs
    from dmstream.streams.night import NightFormatError

    if (night_dir is None) == (day_obs is None):
        raise click.UsageError("give exactly one of --night and --day-obs")
    config = _settings()
    try:
        logs = (read_night_logs(night_dir) if night_dir is not None
                else asyncio.run(read_kafka_logs(config.kafka_bootstrap, day_obs)))
        if not buffers and night_dir is not None:
            buffers = (night_dir / "raw",)
        if not buffers:
            raise click.UsageError("with --day-obs, give at least one --buffer")
        report = catch_up(Backbone.from_settings(config), logs.ocs, buffers, efd=logs.efd,
                          detectors=detectors or None, dry_run=dry_run)
    except (CatchUpError, NightFormatError, BackboneError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, default=str))
        return
    for missing in report.still_missing:
        click.echo(f"  still missing: {missing.obs_id} {missing.detector_name}: {missing.reason}")
    click.echo(" ".join(f"{key}={value}" for key, value in report.summary().items()))
