"""Alerts in Rubin's official format: records of lsst-alert-packet's newest schema, Confluent wire format."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import fastavro
import numpy as np
import pyarrow as pa
import pytest
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.wcs import WCS
from lsst.alert.packet import Schema, get_schema_path

from dmstream.backbone.apdb import Apdb
from dmstream.payloads import alerts, cutouts, diasource, ids, subtract, warp
from dmstream.schemas import SchemaError
from dmstream.schemas.alerts import ALERT_SCHEMA_ID, all_alert_schemas, decode_alert, encode_alert
from dmstream.streams.scenes import make_scene

VISIT = 2026120900042
DETECTOR = 94
EXPOSURE_S = 30.0
PROCESSED = 61000.21


@pytest.fixture(scope="module")
def scene() -> dict:
    """A small difference-imaging scene: transients, their true positions and fluxes, and their cutouts."""
    made = make_scene((256, 256), transients=4, stars=10, seed=2)
    template = warp.warp_image(made.template, made.science.wcs, made.science.shape).image
    result = subtract.run(made.science, template)
    stamps = cutouts.make_cutouts(made.science, result.template, result.difference, made.transient_x,
                                  made.transient_y)
    ra, dec = made.science.wcs.pixel_to_world_values(made.transient_x, made.transient_y)
    midpoint = made.science.metadata["MJD-OBS"] + EXPOSURE_S / 2 / 86400
    return {"x": made.transient_x, "y": made.transient_y, "ra": ra, "dec": dec, "cutouts": stamps,
            "midpoint": midpoint, "flux_njy": made.transient_flux
            * diasource.njy_per_electron(made.science.zero_point),
            "images": (made.science, result.template, result.difference)}


def dia_source_table(scene: dict, object_ids: list[int | None], **extra: list) -> pa.Table:
    """DiaSources at the scene's transients as measurement and association give them (APDB columns)."""
    count = len(object_ids)
    flux = scene["flux_njy"][:count]
    flux_err = flux / np.linspace(12.0, 80.0, count)
    return pa.table({
        "diaSourceId": ids.dia_source_ids(VISIT, DETECTOR, count), "visit": [VISIT] * count,
        "detector": pa.array([DETECTOR] * count, pa.int16()),
        "diaObjectId": pa.array(object_ids, pa.int64()), "midpointMjdTai": [scene["midpoint"]] * count,
        "exposureTime": pa.array([EXPOSURE_S] * count, pa.float32()), "band": ["r"] * count,
        "ra": scene["ra"][:count], "dec": scene["dec"][:count],
        "raErr": pa.array([2e-6] * count, pa.float32()), "decErr": pa.array([2e-6] * count, pa.float32()),
        "x": pa.array(scene["x"][:count], pa.float32()), "y": pa.array(scene["y"][:count], pa.float32()),
        "psfFlux": pa.array(flux, pa.float32()), "psfFluxErr": pa.array(flux_err, pa.float32()),
        "snr": pa.array(flux / flux_err, pa.float32()),
        # A source whose trail was not measured: NaN in our tables, null in the alert.
        "trailLength": pa.array([np.nan] * count, pa.float32()),
        "psfNdata": pa.array([81] * count, pa.int32()), "trailNdata": pa.array([0] * count, pa.int32()),
        "dipoleNdata": pa.array([0] * count, pa.int32()), "bboxSize": pa.array([9] * count, pa.int32()),
        "isDipole": [False] * count, "reliability": pa.array([0.93] * count, pa.float32()), **extra})


def dia_object_table(object_ids: list[int], ras: list[float], decs: list[float], n_sources: list[int]
                     ) -> pa.Table:
    count = len(object_ids)
    return pa.table({
        "diaObjectId": pa.array(object_ids, pa.int64()), "validityStartMjdTai": [PROCESSED] * count,
        "ra": ras, "dec": decs, "nDiaSources": pa.array(n_sources, pa.int32()),
        "r_psfFluxMean": pa.array([5000.0] * count, pa.float32()),
        **{f"{band}_psfFluxNdata": pa.array([n if band == "r" else 0 for n in n_sources], pa.int32())
           for band in "ugrizy"}})


def history(apdb: Apdb, object_id: int, ra: float, dec: float, mjds: list[float], first_visit: int = 1
            ) -> None:
    """Earlier DiaSources and DiaForcedSources of one object, stored in the APDB as the night stores them."""
    visits = [VISIT - 1000 + first_visit + i for i in range(len(mjds))]
    source_ids = [int(ids.dia_source_ids(v, DETECTOR, 1)[0]) for v in visits]
    count = len(mjds)
    apdb.store("DiaSource", pa.table({
        "diaSourceId": pa.array(source_ids, pa.int64()),
        "diaObjectId": pa.array([object_id] * count, pa.int64()), "visit": visits,
        "detector": [DETECTOR] * count, "midpointMjdTai": mjds, "ra": [ra] * count,
        "dec": [dec] * count, "x": [100.0] * count, "y": [120.0] * count, "psfFlux": [900.0] * count,
        "psfNdata": [81] * count, "trailNdata": [0] * count, "dipoleNdata": [0] * count,
        "bboxSize": [9] * count, "band": ["r"] * count, "timeProcessedMjdTai": [m + 0.001 for m in mjds]}))
    apdb.store("DiaForcedSource", pa.table({
        "diaForcedSourceId": pa.array([s + 1 for s in source_ids], pa.int64()),
        "diaObjectId": pa.array([object_id] * count, pa.int64()), "visit": visits,
        "detector": [DETECTOR] * count, "midpointMjdTai": mjds, "ra": [ra] * count, "dec": [dec] * count,
        "psfFlux": [850.0] * count, "psfFluxErr": [30.0] * count, "band": ["r"] * count,
        "timeProcessedMjdTai": [m + 0.001 for m in mjds]}))


@pytest.fixture
def apdb(tmp_path: Path) -> Apdb:
    database = Apdb(f"sqlite:///{tmp_path / 'apdb.sqlite3'}")
    yield database
    database.close()


@pytest.fixture
def night(scene: dict, apdb: Apdb) -> dict:
    """Three DiaSources: of a known object with history, of a new object, and of an asteroid."""
    known, new = 7001, int(ids.dia_source_ids(VISIT, DETECTOR, 2)[1])
    history(apdb, known, scene["ra"][0], scene["dec"][0], [scene["midpoint"] - d for d in (30.0, 2.0)])
    sources = dia_source_table(scene, [known, new, None])
    objects = dia_object_table([known, new], list(scene["ra"][:2]), list(scene["dec"][:2]), [3, 1])
    ss = pa.table({"diaSourceId": sources.column("diaSourceId").slice(2), "ssObjectId": pa.array([20231],
                                                                                                   pa.int64()),
                   "designation": ["2011 QF99"], "ephOffset": pa.array([0.12], pa.float32())})
    since = scene["midpoint"] - alerts.AlertConfig().history_days
    return {"sources": sources, "objects": objects, "ss": ss,
            "history": apdb.dia_sources([known, new], since),
            "forced": apdb.dia_forced_sources([known, new], since)}


def build(scene: dict, night: dict, config: alerts.AlertConfig | None = None) -> alerts.AlertResult:
    return alerts.run(night["sources"], night["objects"], night["history"], night["forced"],
                      scene["cutouts"][:night["sources"].num_rows], night["ss"], config,
                      processed_mjd_tai=PROCESSED, observation_reason="wfd", target_name="")


def official_schema() -> Schema:
    """The newest alert schema, loaded by lsst-alert-packet alone."""
    return Schema.from_file()


def test_alerts_decode_and_validate_with_lsst_alert_packet_alone(scene: dict, night: dict) -> None:
    result = build(scene, night)
    official = official_schema()
    for record in result.records:
        message = encode_alert(record)
        magic, schema_id = struct.unpack(">bI", message[:5])
        assert (magic, schema_id) == (0, 1101) == (0, official.get_schema_id()) == (0, ALERT_SCHEMA_ID)
        parsed = fastavro.parse_schema(official.definition)
        decoded = fastavro.schemaless_reader(io.BytesIO(message[5:]), parsed)
        assert official.validate(decoded)
        assert decoded == record == decode_alert(message)
        assert decoded["diaSourceId"] == decoded["diaSource"]["diaSourceId"]
        assert decoded["diaSource"]["timeProcessedMjdTai"] == PROCESSED
        assert decoded["diaSource"]["trailLength"] is None
        assert decoded["observation_reason"] == "wfd"


def test_each_alert_carries_its_object_history_and_attribution(scene: dict, night: dict) -> None:
    known, new, asteroid = build(scene, night).records
    assert known["diaObject"]["diaObjectId"] == 7001 and known["diaObject"]["nDiaSources"] == 3
    assert known["diaSource"]["diaObjectId"] == 7001
    assert [s["midpointMjdTai"] for s in known["prvDiaSources"]] == pytest.approx(
        [scene["midpoint"] - 30.0, scene["midpoint"] - 2.0])
    assert len(known["prvDiaForcedSources"]) == 2
    assert all(s["diaObjectId"] == 7001 for s in known["prvDiaSources"] + known["prvDiaForcedSources"])
    # A DiaObject created by this source has no history yet.
    assert new["diaObject"]["diaObjectId"] == new["diaSourceId"]
    assert new["prvDiaSources"] == [] and new["prvDiaForcedSources"] == []
    # An asteroid's source has no DiaObject; its ssSource keeps the given ephemeris values.
    assert asteroid["diaObject"] is None and asteroid["prvDiaSources"] is None
    assert asteroid["diaSource"]["ssObjectId"] == 20231 and asteroid["diaSource"]["diaObjectId"] is None
    assert asteroid["ssSource"]["ssObjectId"] == 20231
    assert asteroid["ssSource"]["designation"] == "2011 QF99"
    assert asteroid["ssSource"]["ephOffset"] == pytest.approx(0.12)
    assert known["ssSource"] is None and new["ssSource"] is None


def test_cutouts_are_fits_images_centred_on_their_diasource(scene: dict, night: dict) -> None:
    result = build(scene, night)
    for row, record in enumerate(decode_alert(encode_alert(r)) for r in result.records):
        source = record["diaSource"]
        for name in ("cutoutScience", "cutoutTemplate", "cutoutDifference"):
            with fits.open(io.BytesIO(record[name])) as hdus:
                hdus.verify("exception")
                assert [hdu.name for hdu in hdus] == ["PRIMARY", "UNCERT", "MASK"]
                image, variance, mask = (hdu.data for hdu in hdus)
                side = image.shape[0]
                assert 30 <= side <= 102 and image.shape == variance.shape == mask.shape
                assert np.all(variance[np.isfinite(variance)] >= 0)
                wcs = WCS(hdus[0].header)
                centre = wcs.world_to_pixel_values(source["ra"], source["dec"])
                # make_cutouts puts the source's rounded pixel at side // 2.
                assert np.allclose(centre, np.array([source["x"], source["y"]]) - np.round(
                    [source["x"], source["y"]]) + side // 2, atol=0.01)
            if name == "cutoutDifference":
                # The injected transient is the brightest thing near the middle of its difference cutout.
                middle = image[side // 2 - 5:side // 2 + 6, side // 2 - 5:side // 2 + 6]
                peak_y, peak_x = np.unravel_index(np.argmax(middle), middle.shape)
                assert abs(peak_x - 5) <= 1 and abs(peak_y - 5) <= 1
                assert np.sum(middle) == pytest.approx(scene["flux_njy"][row], rel=0.35)
            data = CCDData.read(io.BytesIO(record[name]), hdu_uncertainty="UNCERT", hdu_mask="MASK")
            assert str(data.unit) == "nJy" and data.wcs is not None


def test_same_inputs_give_the_same_alert_bytes(scene: dict, night: dict) -> None:
    first = [encode_alert(r) for r in build(scene, night).records]
    again = [encode_alert(r) for r in build(scene, night).records]
    assert first == again
    result = build(scene, night)
    assert list(result.alert_ids) == list(ids.dia_source_ids(VISIT, DETECTOR, 3))
    visit, detector, index = ids.split_dia_source_id(result.alert_ids)
    assert set(visit) == {VISIT} and set(detector) == {DETECTOR} and list(index) == [0, 1, 2]


def test_history_keeps_the_window_before_the_source_and_the_caps(scene: dict, apdb: Apdb) -> None:
    midpoint = scene["midpoint"]
    # Earlier visits at 400, 300, 10 and 1 days back; this source; one a day later (a replay's APDB has it).
    history(apdb, 7001, scene["ra"][0], scene["dec"][0],
            [midpoint - 400.0, midpoint - 300.0, midpoint - 10.0, midpoint - 1.0, midpoint + 1.0])
    sources = dia_source_table(scene, [7001])
    # The APDB may already hold this very source (stored before a worker restarted).
    apdb.store("DiaSource", sources.append_column("timeProcessedMjdTai", pa.array([PROCESSED])))
    objects = dia_object_table([7001], [scene["ra"][0]], [scene["dec"][0]], [6])
    rows = apdb.dia_sources([7001], 0.0), apdb.dia_forced_sources([7001], 0.0)
    assert rows[0].num_rows == 6

    def prv(config: alerts.AlertConfig) -> tuple[list[float], list[float], int]:
        result = alerts.run(sources, objects, *rows, None, config=config, processed_mjd_tai=PROCESSED)
        record = result.records[0]
        return ([round(midpoint - s["midpointMjdTai"]) for s in record["prvDiaSources"]],
                [round(midpoint - s["midpointMjdTai"]) for s in record["prvDiaForcedSources"]], result.capped)

    assert prv(alerts.AlertConfig()) == ([300, 10, 1], [300, 10, 1], 0)
    assert prv(alerts.AlertConfig(history_days=30)) == ([10, 1], [10, 1], 0)
    assert prv(alerts.AlertConfig(max_prv_dia_sources=2, max_prv_forced_sources=1)) == ([10, 1], [1], 1)
    assert prv(alerts.AlertConfig(max_prv_dia_sources=0)) == ([], [300, 10, 1], 1)


def every_field_set(record: str, count: int, object_id: int, midpoints: np.ndarray) -> pa.Table:
    """History rows with a value in every field of the alert schema's ``record``: the largest they encode."""
    columns = {}
    for field in alerts.record_fields(record):
        if pa.types.is_string(field.type):
            columns[field.name] = pa.array(["dmstream-heuristic-1"] * count)
        elif pa.types.is_boolean(field.type):
            columns[field.name] = pa.array([True] * count)
        else:
            columns[field.name] = pa.array(np.full(count, 2**40 if field.type == pa.int64() else 1e3),
                                           field.type)
    columns["diaObjectId"] = pa.array([object_id] * count, pa.int64())
    columns["midpointMjdTai"] = pa.array(midpoints)
    return pa.table(columns)


def test_an_alert_at_the_history_caps_fits_a_default_kafka_message(scene: dict) -> None:
    config = alerts.AlertConfig()
    large = cutouts.make_cutouts(*scene["images"], scene["x"][:1], scene["y"][:1],
                                 cutouts.CutoutConfig(min_size=102))
    earlier = scene["midpoint"] - np.linspace(300.0, 1.0, 2000)
    result = alerts.run(dia_source_table(scene, [7001]), dia_object_table([7001], [scene["ra"][0]],
                                                                          [scene["dec"][0]], [2001]),
                        every_field_set("diaSource", 2000, 7001, earlier),
                        every_field_set("diaForcedSource", 2000, 7001, earlier), large, config=config,
                        processed_mjd_tai=PROCESSED)
    record = result.records[0]
    assert len(record["prvDiaSources"]) == config.max_prv_dia_sources
    assert len(record["prvDiaForcedSources"]) == config.max_prv_forced_sources
    assert record["prvDiaSources"][-1]["midpointMjdTai"] == pytest.approx(scene["midpoint"] - 1.0)
    assert result.capped == 1
    # Kafka's default largest message (broker message.max.bytes, producer max.request.size).
    assert len(encode_alert(record)) < 1_048_576


def test_ssource_angles_come_from_the_observed_position(scene: dict) -> None:
    """Directions of known ecliptic and Galactic coordinates: equinox, ecliptic pole, Galactic centre."""
    ra, dec = np.array([0.0, 270.0, 266.405]), np.array([0.0, 66.560708, -28.936175])
    angles = alerts.sky_angles(ra, dec)
    assert angles["eclLambda"][0] == pytest.approx(0.0, abs=0.01) and angles["eclBeta"][0] == pytest.approx(
        0.0, abs=0.01)
    assert angles["eclBeta"][1] == pytest.approx(90.0, abs=0.01)
    assert (angles["galLon"][2] + 180) % 360 - 180 == pytest.approx(0.0, abs=0.01)
    assert angles["galLat"][2] == pytest.approx(0.0, abs=0.01)
    sources = dia_source_table(scene, [None], ssObjectId=pa.array([42], pa.int64()))
    record = alerts.run(sources, dia_object_table([], [], [], []), None, None, None,
                        processed_mjd_tai=PROCESSED).records[0]
    expected = alerts.sky_angles(np.array([scene["ra"][0]]), np.array([scene["dec"][0]]))
    assert record["ssSource"]["ssObjectId"] == 42
    assert record["ssSource"]["galLat"] == pytest.approx(expected["galLat"][0])
    assert record["cutoutScience"] is None


def test_every_shipped_schema_version_is_served_by_its_id() -> None:
    shipped = all_alert_schemas()
    assert {300, 400, 500, 600, 601, 700, 701, 702, 703, 704, 800, 900, 1000, 1100, 1101} <= set(shipped)
    for schema_id in shipped:
        major, minor = divmod(schema_id, 100)
        directory = Path(get_schema_path(major, minor))
        official = Schema.from_file(str(directory / f"lsst.v{major}_{minor}.alert.avsc"))
        assert official.get_schema_id() == schema_id
        # Each version's sample alert from lsst-alert-packet, serialized by that package under its own id.
        sample = json.loads((directory / "sample_data" / "alert.json").read_text())
        message = struct.pack(">bI", 0, schema_id) + official.serialize(sample)
        assert decode_alert(message) == official.deserialize(message[5:])


@pytest.mark.parametrize(("message", "complaint"), [
    (b"", "shorter than"),
    (b"\x01\x00\x00\x04\x4d" + b"\x00" * 8, "magic byte"),
    (struct.pack(">bI", 0, 1102) + b"\x00" * 8, "no alert schema has id 1102"),
    (struct.pack(">bI", 0, 10100) + b"\x00" * 8, "no alert schema has id 10100"),
])
def test_messages_that_are_not_alerts_get_a_schema_error(message: bytes, complaint: str) -> None:
    with pytest.raises(SchemaError, match=complaint):
        decode_alert(message)


def test_truncated_alerts_get_a_schema_error(scene: dict, night: dict) -> None:
    message = encode_alert(build(scene, night).records[0])
    for length in (6, 200, len(message) // 2, len(message) - 1):
        with pytest.raises(SchemaError, match="does not decode as alert-packet v1101"):
            decode_alert(message[:length])


def test_record_that_does_not_fit_the_schema_is_refused(scene: dict, night: dict) -> None:
    record = build(scene, night).records[0]
    with pytest.raises(SchemaError, match="does not fit"):
        encode_alert({**record, "diaSource": {**record["diaSource"], "ra": "ten"}})


def test_bad_inputs_are_named(scene: dict, night: dict) -> None:
    args = night["objects"], night["history"], night["forced"], None

    def refused(sources: pa.Table, match: str, objects: pa.Table | None = None) -> None:
        with pytest.raises(alerts.AlertError, match=match):
            alerts.run(sources, args[0] if objects is None else objects, *args[1:],
                       processed_mjd_tai=PROCESSED)

    sources = night["sources"]
    refused(sources.set_column(0, "diaSourceId", pa.array([5, 6, 7], pa.int64())), "do not pack")
    refused(sources.append_column("ccdName", pa.array(["R22_S11"] * 3)), "no field ccdName")
    refused(sources.drop_columns(["bboxSize"]), "lacks bboxSize")
    refused(sources, "no DiaObject row for diaObjectId 7001", objects=night["objects"].slice(1))
    refused(pa.concat_tables([sources, sources]), "repeat")
    with pytest.raises(alerts.AlertError, match="2 cutouts for 3"):
        alerts.run(sources, *args[:3], scene["cutouts"][:2], processed_mjd_tai=PROCESSED)
    with pytest.raises(alerts.AlertError, match="timeProcessedMjdTai"):
        alerts.run(sources, *args)


def test_every_column_of_our_diasource_measurement_is_an_alert_field() -> None:
    fields = {f.name for f in alerts.record_fields("diaSource")}
    assert set(diasource.SCHEMA.names) <= fields
