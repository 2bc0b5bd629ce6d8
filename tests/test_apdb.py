"""The APDB: official lsst-sdm-schemas columns, idempotent stores, the queries Prompt Processing needs."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import sqlalchemy as sa
import yaml
from astropy.time import Time
from click.testing import CliRunner

from dmstream.backbone import sql
from dmstream.backbone.apdb import TABLES, Apdb, ApdbError, ApdbSchemaError
from dmstream.cli import main
from dmstream.payloads import diasource
from dmstream.settings import ENV_PREFIX

MJD = 61004.1


@pytest.fixture
def apdb(tmp_path: Path) -> Apdb:
    database = Apdb(f"sqlite:///{tmp_path / 'apdb.sqlite3'}")
    yield database
    database.close()


def official_columns() -> dict[str, list[str]]:
    """Column names of each table of apdb.yaml, read with plain PyYAML."""
    text = (importlib.resources.files("lsst.sdm.schemas") / "apdb.yaml").read_text()
    return {table["name"]: [column["name"] for column in table["columns"]]
            for table in yaml.safe_load(text)["tables"]}


def dia_sources(ids: list[int], object_ids: list[int], mjds: list[float], ras: list[float] | None = None,
                **extra: list) -> pa.Table:
    count = len(ids)
    ras = ras or [10.0 + 1e-4 * i for i in range(count)]
    visits = [int(mjd * 10) for mjd in mjds]
    return pa.table({
        "diaSourceId": pa.array(ids, pa.int64()), "diaObjectId": pa.array(object_ids, pa.int64()),
        "visit": visits, "detector": [94] * count, "midpointMjdTai": mjds, "ra": ras, "dec": [-30.0] * count,
        "x": [100.0] * count, "y": [200.0] * count, "psfFlux": [1000.0 + i for i in range(count)],
        "psfNdata": [49] * count, "trailNdata": [0] * count, "dipoleNdata": [0] * count,
        "bboxSize": [15] * count, "band": ["r"] * count, **extra})


def dia_objects(ids: list[int], ras: list[float], decs: list[float], start: float,
                n_sources: int = 1) -> pa.Table:
    count = len(ids)
    return pa.table({
        "diaObjectId": pa.array(ids, pa.int64()), "validityStartMjdTai": [start] * count, "ra": ras,
        "dec": decs, "nDiaSources": [n_sources] * count,
        **{f"{band}_psfFluxNdata": [0] * count for band in "ugrizy"}})


def test_tables_have_the_official_columns_in_order(apdb: Apdb) -> None:
    official = official_columns()
    for name in TABLES:
        assert [column.name for column in apdb.tables[name].columns] == official[name]
    inspector = sa.inspect(apdb.engine)
    assert set(TABLES) <= set(inspector.get_table_names())
    assert inspector.get_pk_constraint("DiaForcedSource")["constrained_columns"] == [
        "diaObjectId", "visit", "detector"]


def test_payload_diasource_columns_are_official() -> None:
    assert set(diasource.SCHEMA.names) <= set(official_columns()["DiaSource"])


def test_storing_is_idempotent_by_primary_key(apdb: Apdb) -> None:
    rows = dia_sources([11, 12, 13], [1, 1, 2], [MJD, MJD, MJD])
    before = Time.now().tai.mjd
    apdb.store("DiaSource", rows)
    apdb.store("DiaSource", rows)
    apdb.store("DiaSource", rows.slice(1, 1))
    assert apdb.counts()["DiaSource"] == 3
    stored = apdb.dia_sources([1, 2], since_mjd=0.0)
    assert stored.column("diaSourceId").to_pylist() == [11, 12, 13]
    assert stored.column("psfFlux").to_pylist() == [1000.0, 1001.0, 1002.0]
    # Official columns the rows lacked are null; the processing time is the time of storing.
    assert stored.column("ssObjectId").to_pylist() == [None] * 3
    assert stored.column("trailRaErr").null_count == 3
    processed = stored.column("timeProcessedMjdTai").to_numpy()
    assert np.all((processed >= before) & (processed <= Time.now().tai.mjd))
    assert stored.schema.field("detector").type == pa.int16()
    assert stored.schema.field("psfFlux").type == pa.float32()


def test_foreign_columns_are_refused_by_name(apdb: Apdb) -> None:
    rows = dia_sources([1], [1], [MJD], myScore=[0.5], ccdName=["R22_S11"])
    with pytest.raises(ApdbSchemaError, match="DiaSource has no column myScore, ccdName"):
        apdb.store("DiaSource", rows)
    assert apdb.counts()["DiaSource"] == 0
    with pytest.raises(ApdbError, match="no APDB table 'Object'"):
        apdb.store("Object", rows)


def test_missing_required_columns_bad_values_and_long_strings_are_refused(apdb: Apdb) -> None:
    with pytest.raises(ApdbSchemaError, match="lack required column trailNdata"):
        apdb.store("DiaSource", dia_sources([1], [1], [MJD]).drop_columns(["trailNdata"]))
    with pytest.raises(ApdbSchemaError, match=r"DiaSource.ra is required but 1 rows have null or NaN"):
        apdb.store("DiaSource", dia_sources([1, 2], [1, 1], [MJD, MJD], ras=[10.0, float("nan")]))
    with pytest.raises(ApdbSchemaError, match=r"DiaSource.visit .* cannot be stored as int64"):
        apdb.store("DiaSource", dia_sources([1], [1], [MJD]).set_column(2, "visit", pa.array(["v1"])))
    with pytest.raises(ApdbSchemaError, match="reliabilityVersion holds at most 7 characters"):
        apdb.store("DiaSource", dia_sources([1], [1], [MJD], reliabilityVersion=["dmstream-heuristic-1"]))
    assert apdb.counts()["DiaSource"] == 0


def test_history_of_objects_since_an_mjd(apdb: Apdb) -> None:
    apdb.store("DiaSource", dia_sources([1, 2, 3, 4, 5], [7, 7, 7, 8, 9],
                                        [MJD - 400, MJD - 30, MJD - 1, MJD - 2, MJD - 1]))
    forced = pa.table({"diaForcedSourceId": pa.array([21, 22, 23], pa.int64()), "diaObjectId": [7, 7, 8],
                       "ra": [10.0] * 3, "dec": [-30.0] * 3, "visit": [1, 2, 2], "detector": [94] * 3,
                       "midpointMjdTai": [MJD - 500, MJD - 3, MJD - 3], "psfFlux": [5.0, 6.0, 7.0]})
    apdb.store("DiaForcedSource", forced)
    since = MJD - 365
    history = apdb.dia_sources([8, 7, 123], since)
    assert history.column("diaSourceId").to_pylist() == [2, 3, 4]
    assert apdb.dia_forced_sources([7, 8], since).column("diaForcedSourceId").to_pylist() == [22, 23]
    assert len(apdb.dia_sources([], since)) == 0
    assert len(apdb.dia_sources(range(100_000, 103_000), since)) == 0


def test_objects_in_a_region_are_the_current_versions(apdb: Apdb) -> None:
    apdb.store("DiaObject", dia_objects([1, 2, 3, 4], ras=[359.9995, 0.0004, 0.01, 180.0],
                                        decs=[-30.0, -30.0, -30.0, -30.0], start=MJD))
    across_zero = apdb.dia_objects_in_cone(0.0, -30.0, 2.0 / 3600)
    assert sorted(across_zero.column("diaObjectId").to_pylist()) == [1, 2]
    box = apdb.dia_objects_in_box(359.0, 1.0, -31.0, -29.0)
    assert sorted(box.column("diaObjectId").to_pylist()) == [1, 2, 3]
    # A new version of object 2, moved: the region queries see it alone.
    apdb.store("DiaObject", dia_objects([2], ras=[0.02], decs=[-30.0], start=MJD + 1, n_sources=2))
    apdb.store("DiaObject", dia_objects([2], ras=[0.0004], decs=[-30.0], start=MJD))  # a replay: no change
    assert apdb.dia_objects_in_cone(0.0, -30.0, 2.0 / 3600).column("diaObjectId").to_pylist() == [1]
    moved = apdb.dia_objects_in_cone(0.02, -30.0, 1.0 / 3600)
    assert moved.column("nDiaSources").to_pylist() == [2]
    assert apdb.counts()["DiaObject"] == 4
    with apdb.engine.connect() as connection:
        versions = connection.execute(sa.text(
            'SELECT "validityStartMjdTai", "validityEndMjdTai" FROM "DiaObject" WHERE "diaObjectId" = 2 '
            'ORDER BY 1')).all()
    assert versions == [(MJD, MJD + 1), (MJD + 1, None)]
    assert len(apdb.dia_objects_in_cone(90.0, 89.9999, 1.0)) == 0


def test_a_long_read_does_not_block_the_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without WAL the writer would wait for the reader's lock until this timeout, then fail.
    monkeypatch.setattr(sql, "SQLITE_BUSY_TIMEOUT", 2.0)
    url = f"sqlite:///{tmp_path / 'apdb.sqlite3'}"
    writer, reader = Apdb(url), Apdb(url)
    writer.store("DiaSource", dia_sources([1], [1], [MJD]))
    with reader.engine.connect() as connection:
        connection.exec_driver_sql("BEGIN")
        count = 'SELECT count(*) FROM "DiaSource"'
        assert connection.exec_driver_sql(count).scalar_one() == 1
        writer.store("DiaSource", dia_sources([2, 3], [1, 1], [MJD, MJD]))
        assert connection.exec_driver_sql(count).scalar_one() == 1  # the reader's snapshot
        connection.exec_driver_sql("ROLLBACK")
    assert reader.counts()["DiaSource"] == 3
    writer.close()
    reader.close()


def test_a_database_of_another_schema_version_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'apdb.sqlite3'}"
    Apdb(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE metadata SET value = '9.0.0' WHERE name = 'version:schema'"))
    engine.dispose()
    with pytest.raises(ApdbError, match=r"holds APDB schema 9\.0\.0"):
        Apdb(url)


def test_cli_counts_and_cone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_PREFIX + "DATA_DIR", str(tmp_path))
    monkeypatch.delenv(ENV_PREFIX + "APDB_URL", raising=False)
    database = Apdb.from_settings()
    database.store("DiaObject", dia_objects([5, 6], ras=[150.0, 150.1], decs=[2.0, 2.0], start=MJD))
    database.close()
    runner = CliRunner()
    counts = runner.invoke(main, ["apdb", "query"])
    assert counts.exit_code == 0, counts.output
    assert counts.output.split() == ["DiaObject", "2", "DiaSource", "0", "DiaForcedSource", "0",
                                     "SSObject", "0"]
    cone = runner.invoke(main, ["apdb", "query", "--ra", "150.0", "--dec", "2.0", "--radius", "10", "--json"])
    assert cone.exit_code == 0, cone.output
    assert [json.loads(line)["diaObjectId"] for line in cone.output.splitlines()] == [5]
    assert runner.invoke(main, ["apdb", "query", "--ra", "150"]).exit_code == 2
