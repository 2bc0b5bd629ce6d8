"""Catch-up Archiving: after an archiver outage, exactly the missing raws come back, with EFD metadata."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from dmstream import topics
from dmstream.backbone import Backbone
from dmstream.batch.catchup import (
    EFD_KEYWORDS,
    WCS_KEYWORDS,
    CatchUpError,
    CatchUpReport,
    Efd,
    OcsLog,
    SummitLogs,
    catch_up,
    read_kafka_logs,
    read_night_logs,
)
from dmstream.infra.stack import Stack
from dmstream.payloads.camera import detector_wcs, get_detector
from dmstream.payloads.conditions import angular_separation
from dmstream.streams.observatory import NightConfig, exposure_id_of
from dmstream.streams.rawfits import DERIVED_KEYWORDS, read_raw, write_raw
from dmstream.streams.replay import ReplayConfig, replay
from dmstream.streams.simulate import SimulationConfig, simulate_night
from dmstream.streams.sky import SkyConfig

#: No other test replays a night of this day onto the session's Kafka, so its log is ours alone.
DAY_OBS = 20261217
DETECTOR = "R22_S11"
#: The archiver ran for the first two exposures (the bias and the first snap), then stopped.
ARCHIVED = 2
MAS = 1e-3 / 3600.0


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bias and two visits of 2 x 15 s on one detector: 5 exposures."""
    out = tmp_path_factory.mktemp("catchup") / "night"
    sparse_sky = SkyConfig(star_density=2000.0, galaxy_density=0.0, supernova_density=0.0, flare_density=0.0,
                           sso_density=0.0, satellite_rate=0.0)
    simulate_night(out, SimulationConfig(
        night=NightConfig(seed=5, day_obs=DAY_OBS, n_visits=2, bands=("r",), snaps="2x15", n_bias=1, n_dark=0,
                          n_flat=0),
        detectors=(DETECTOR,), sky=sparse_sky, compress=False, jobs=2))
    return out


@pytest.fixture(scope="module")
def logs(night: Path) -> SummitLogs:
    return read_night_logs(night)


@pytest.fixture(scope="module")
def raws(night: Path) -> dict[str, Path]:
    """The night's raw files by obs_id, in exposure order."""
    return {path.name.rsplit("_", 2)[0]: path for path in sorted((night / "raw").rglob("*.fits"))}


@pytest.fixture(scope="module")
def truth(night: Path) -> dict[str, dict]:
    """What the simulator planned for each exposure, by obs_id."""
    return {row["obs_id"]: row for row in pq.read_table(night / "truth" / "exposures.parquet").to_pylist()}


def _backbone(root: Path) -> Backbone:
    return Backbone(f"sqlite:///{root / 'r.sqlite3'}", root / "files")


@pytest.fixture
def backbone(tmp_path: Path) -> Iterator[Backbone]:
    store = _backbone(tmp_path)
    yield store
    store.close()


def _archive(backbone: Backbone, raws: dict[str, Path], archived: list[str]) -> Backbone:
    """What the archiver wrote before it stopped."""
    for obs_id in archived:
        backbone.ingest_raw(raws[obs_id])
    return backbone


def _exposure(obs_id: str) -> int:
    return exposure_id_of(DAY_OBS, int(obs_id[-6:]))


def _archived(backbone: Backbone, obs_id: str) -> Path:
    return backbone.path("raw", instrument="LSSTCam", day_obs=DAY_OBS, exposure=_exposure(obs_id),
                         detector=get_detector(DETECTOR).id)


def _pixel_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for amp in read_raw(path).amps:
        digest.update(np.ascontiguousarray(amp).tobytes())
    return digest.hexdigest()


def _extension_bytes(path: Path) -> bytes:
    """The file after its primary header: the amplifier extensions as stored."""
    with fits.open(path) as hdus:
        start = hdus.fileinfo(1)["hdrLoc"]
    return path.read_bytes()[start:]


def _linked_buffer(root: Path, raws: dict[str, Path]) -> dict[str, Path]:
    """A camera buffer of its own: hard links to the night's raws, which tests may then damage."""
    linked = {}
    for obs_id, path in raws.items():
        linked[obs_id] = root / obs_id / path.name
        linked[obs_id].parent.mkdir(parents=True)
        os.link(path, linked[obs_id])
    return linked


def _only(ocs: OcsLog, obs_id: str) -> OcsLog:
    """The OCS log of a short outage: one exposure."""
    return replace(ocs, exposures={obs_id: ocs.exposures[obs_id]})


def _rewrite_header(path: Path, drop: tuple[str, ...] = (), compress: bool = False, **values: float) -> None:
    """Replace a buffer raw by a copy whose primary header lacks ``drop`` and has ``values``."""
    if compress:
        raw = read_raw(path)
        kept = {key: value for key, value in raw.primary_header.items()
                if key not in (*DERIVED_KEYWORDS, "SIMPLE", "BITPIX", "NAXIS", "EXTEND")}
        path.unlink()
        write_raw(path, kept, raw.amps, raw.detector, compress=True)
    with fits.open(path) as hdus:
        for key in drop:
            del hdus[0].header[key]
        hdus[0].header.update(values)
        copy = path.with_name("copy.tmp")
        hdus.writeto(copy)
    copy.replace(path)


@dataclass
class CaughtUp:
    backbone: Backbone
    first: CatchUpReport
    second: CatchUpReport
    missing: list[str]


@pytest.fixture(scope="module")
def caught_up(tmp_path_factory: pytest.TempPathFactory, night: Path, logs: SummitLogs,
              raws: dict[str, Path]) -> Iterator[CaughtUp]:
    """An outage after two exposures, then catch-up from the night's log and raw/ tree, run twice."""
    order = list(raws)
    backbone = _archive(_backbone(tmp_path_factory.mktemp("backbone")), raws, order[:ARCHIVED])
    first = catch_up(backbone, logs.ocs, [night / "raw"], efd=logs.efd)
    second = catch_up(backbone, logs.ocs, [night / "raw"], efd=logs.efd)
    yield CaughtUp(backbone, first, second, order[ARCHIVED:])
    backbone.close()


def test_the_ocs_log_lists_every_exposure_read_out(logs: SummitLogs, raws: dict[str, Path]) -> None:
    assert set(logs.ocs.exposures) == set(raws)
    assert logs.ocs.detectors == (DETECTOR,)
    for obs_id, exposure in logs.ocs.exposures.items():
        header = fits.getheader(raws[obs_id])
        # Group ids are ISO times: their colons come escaped in the camera's additionalValues.
        assert exposure.group_id == header["GROUPID"]
        assert exposure.exposure_id == _exposure(obs_id)
        assert exposure.date_obs == pytest.approx((header["MJD-BEG"] - 40587.0) * 86400.0, abs=1e-3)


def test_exactly_the_missing_raws_are_recovered(caught_up: CaughtUp, raws: dict[str, Path]) -> None:
    report = caught_up.first
    assert report.expected == len(raws) and report.present == ARCHIVED
    assert [r.obs_id for r in report.recovered] == caught_up.missing
    assert report.still_missing == [] and report.notes == []
    archived = caught_up.backbone.query("raw", day_obs=DAY_OBS)
    assert sorted(ref.data_id["exposure"] for ref in archived) == sorted(_exposure(o) for o in raws)
    for recovered in report.recovered:
        path = _archived(caught_up.backbone, recovered.obs_id)
        assert _pixel_digest(path) == _pixel_digest(raws[recovered.obs_id])
        assert hashlib.sha256(path.read_bytes()).hexdigest() == recovered.checksum
        original, copy = fits.getheader(raws[recovered.obs_id]), fits.getheader(path)
        assert all(copy[key] == original[key] for key in original if key not in ("HISTORY", "COMMENT", ""))
        assert "lsst.sal.MTMount.elevation" in str(copy["HISTORY"])
        assert set(recovered.added_keywords) <= set(copy)


def test_a_second_run_ingests_nothing(caught_up: CaughtUp, raws: dict[str, Path]) -> None:
    again = caught_up.second
    assert again.recovered == [] and again.still_missing == []
    assert again.present == again.expected == len(raws)
    assert caught_up.backbone.counts()["raw"] == len(raws)


def test_efd_pointing_is_the_planned_pointing(caught_up: CaughtUp, truth: dict[str, dict]) -> None:
    for recovered in caught_up.first.recovered:
        header = fits.getheader(_archived(caught_up.backbone, recovered.obs_id))
        planned = truth[recovered.obs_id]
        assert planned["img_type"] == "OBJECT"
        for ra_key, dec_key in (("RASTART", "DECSTART"), ("RAEND", "DECEND")):
            # The mount tracks the field: its encoders, to a few mas of noise, give the field's centre.
            offset = angular_separation(header[ra_key], header[dec_key], planned["ra"], planned["dec"])
            assert offset < 20 * MAS
        for key in ("ROTPABEG", "ROTPAEND"):
            assert abs((header[key] - planned["rot_sky_pos"] + 180) % 360 - 180) < 1e-3
        assert header["AMSTART"] == pytest.approx(planned["airmass"], abs=2e-3)
        assert header["SEEING"] == pytest.approx(planned["fwhm_500"], rel=0.2)


def test_keywords_the_efd_cannot_give_are_left_out(backbone: Backbone, night: Path, logs: SummitLogs,
                                                   raws: dict[str, Path]) -> None:
    bias = next(iter(raws))
    report = catch_up(backbone, _only(logs.ocs, bias), [night / "raw"], efd=logs.efd)
    assert [r.obs_id for r in report.recovered] == [bias]
    header = fits.getheader(_archived(backbone, bias))
    # The bias is taken before the evening twilight, when the DIMM does not measure yet.
    assert "SEEING" not in header and "ELSTART" in header and "AIRTEMP" in header


def test_a_lost_pointing_is_rebuilt_from_the_efd(tmp_path: Path, backbone: Backbone, logs: SummitLogs,
                                                 raws: dict[str, Path], truth: dict[str, dict]) -> None:
    target = list(raws)[-1]
    buffer = _linked_buffer(tmp_path / "buffer", raws)
    # The header service failed, and the camera wrote its buffer tile-compressed.
    _rewrite_header(buffer[target], drop=("RA", "DEC", "ROTPA", *WCS_KEYWORDS), compress=True)
    report = catch_up(backbone, _only(logs.ocs, target), [tmp_path / "buffer"], efd=logs.efd)
    assert [r.obs_id for r in report.recovered] == [target]
    assert _extension_bytes(_archived(backbone, target)) == _extension_bytes(buffer[target])
    archived = read_raw(_archived(backbone, target))
    header, planned = archived.primary_header, truth[target]
    assert angular_separation(header["RA"], header["DEC"], planned["ra"], planned["dec"]) < 20 * MAS
    assert abs((header["ROTPA"] - planned["rot_sky_pos"] + 180) % 360 - 180) < 1e-3
    assert "were missing: rebuilt from MTMount" in str(header["HISTORY"])
    # The rebuilt WCS puts the detector's centre where the planned pointing does.
    planned_wcs = detector_wcs(archived.detector, planned["ra"], planned["dec"], planned["rot_sky_pos"])
    rows, cols = archived.detector.shape
    centre = archived.wcs().pixel_to_world(cols / 2, rows / 2)
    expected = planned_wcs.pixel_to_world(cols / 2, rows / 2)
    assert centre.separation(expected).arcsec < 0.05


def test_without_telemetry_the_pointing_comes_from_next_visit(tmp_path: Path, backbone: Backbone,
                                                              logs: SummitLogs, raws: dict[str, Path],
                                                              truth: dict[str, dict]) -> None:
    target = list(raws)[-1]
    buffer = _linked_buffer(tmp_path / "buffer", raws)
    _rewrite_header(buffer[target], drop=("RA", "DEC", "ROTPA"))
    report = catch_up(backbone, _only(logs.ocs, target), [tmp_path / "buffer"], efd=None)
    assert [r.obs_id for r in report.recovered] == [target]
    header, planned = fits.getheader(_archived(backbone, target)), truth[target]
    assert (header["RA"], header["DEC"]) == pytest.approx((planned["ra"], planned["dec"]), abs=1e-9)
    assert header["ROTPA"] == pytest.approx(planned["rot_sky_pos"], abs=1e-9)
    assert "nextVisit" in str(header["HISTORY"]) and "ELSTART" not in header


def test_a_header_the_mount_contradicts_is_noted_and_kept(tmp_path: Path, backbone: Backbone,
                                                          logs: SummitLogs, raws: dict[str, Path]) -> None:
    target = list(raws)[-1]
    buffer = _linked_buffer(tmp_path / "buffer", raws)
    shifted_dec = fits.getheader(raws[target])["DEC"] + 10.0 / 3600.0
    _rewrite_header(buffer[target], DEC=shifted_dec)
    report = catch_up(backbone, _only(logs.ocs, target), [tmp_path / "buffer"], efd=logs.efd)
    assert [r.obs_id for r in report.recovered] == [target]
    assert len(report.notes) == 1
    assert "differ from MTMount" in report.notes[0] and "10.0 arcsec" in report.notes[0]
    header = fits.getheader(_archived(backbone, target))
    assert header["DEC"] == shifted_dec and "10.0 arcsec" in str(header["HISTORY"])


def test_lost_and_damaged_raws_are_reported_with_the_reason(tmp_path: Path, backbone: Backbone,
                                                            logs: SummitLogs, raws: dict[str, Path]) -> None:
    order = list(raws)
    lost, damaged, intact = order[2], order[3], order[4]
    buffer = _linked_buffer(tmp_path / "buffer", raws)
    buffer[lost].unlink()
    head = buffer[damaged].read_bytes()[:200_000]
    buffer[damaged].unlink()
    buffer[damaged].write_bytes(head)
    _archive(backbone, raws, order[:ARCHIVED])
    first = catch_up(backbone, logs.ocs, [tmp_path / "buffer"], efd=logs.efd)
    assert [r.obs_id for r in first.recovered] == [intact]
    again = catch_up(backbone, logs.ocs, [tmp_path / "buffer"], efd=logs.efd)
    assert again.recovered == [] and again.present == ARCHIVED + 1
    for report in (first, again):
        missing = {m.obs_id: m.reason for m in report.still_missing}
        assert set(missing) == {lost, damaged}
        assert missing[lost].startswith("no file of it in")
        assert "not a valid raw" in missing[damaged]
        assert all(m.detector_name == DETECTOR for m in report.still_missing)


def test_a_dry_run_ingests_nothing(backbone: Backbone, night: Path, logs: SummitLogs,
                                   raws: dict[str, Path]) -> None:
    order = list(raws)
    _archive(backbone, raws, order[:ARCHIVED])
    report = catch_up(backbone, logs.ocs, [night / "raw"], efd=logs.efd, dry_run=True)
    assert [r.obs_id for r in report.recovered] == order[ARCHIVED:]
    assert all(r.checksum is None and "ELSTART" in r.added_keywords for r in report.recovered)
    assert backbone.counts()["raw"] == ARCHIVED


def test_without_a_detector_list_the_nights_detectors_are_expected(tmp_path: Path, backbone: Backbone,
                                                                  night: Path, logs: SummitLogs,
                                                                  raws: dict[str, Path]) -> None:
    kafka_like = replace(logs.ocs, detectors=None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CatchUpError, match="no detector"):
        catch_up(backbone, kafka_like, [empty])
    report = catch_up(backbone, _only(kafka_like, next(iter(raws))), [night / "raw"], dry_run=True)
    assert report.detectors == (DETECTOR,) and report.expected == 1 and len(report.recovered) == 1
    with pytest.raises(CatchUpError, match="not found"):
        catch_up(backbone, logs.ocs, [tmp_path / "nowhere"])
    with pytest.raises(CatchUpError, match="R00_S00"):
        catch_up(backbone, logs.ocs, [night / "raw"], detectors=["R00_S00"])


def test_efd_values_are_interpolated_only_near_samples_and_angles_wrap() -> None:
    efd = Efd()
    for when, azimuth in ((100.0, 358.0), (101.0, 2.0), (200.0, 10.0)):
        efd.add(topics.DOME_AZIMUTH.name, {"private_sndStamp": when, "timestamp": when,
                                           "positionActual": azimuth})
    dome = efd.at("dome", [100.5, 150.0, 203.0, 206.0])
    # Across north the dome passes 0°, not 180°; mid-gap and 6 s past the last sample it is unknown.
    assert dome[0] == pytest.approx(0.0, abs=1e-9)
    assert np.isnan(dome[1]) and dome[2] == pytest.approx(10.0) and np.isnan(dome[3])
    efd.add(topics.DIMM_MEASUREMENT.name, {"private_sndStamp": 100.0, "timestamp": 100.0, "fwhm": 0.7})
    assert np.isnan(efd.at("seeing", 99.0)[0]) and efd.at("seeing", 250.0)[0] == pytest.approx(0.7)
    assert np.isnan(efd.at("seeing", 281.0)[0])


@pytest.mark.integration
def test_catch_up_from_the_log_on_kafka(stack: Stack, backbone: Backbone, night: Path, logs: SummitLogs,
                                        raws: dict[str, Path], caught_up: CaughtUp) -> None:
    bootstrap = stack.settings.kafka_bootstrap
    asyncio.run(replay([night], bootstrap, ReplayConfig(speed=None)))
    from_kafka = asyncio.run(read_kafka_logs(bootstrap, DAY_OBS))
    assert from_kafka.ocs.detectors is None
    assert from_kafka.ocs.exposures == logs.ocs.exposures
    assert from_kafka.ocs.announced == logs.ocs.announced
    assert from_kafka.efd.samples("elevation") == logs.efd.samples("elevation") > 0
    _archive(backbone, raws, list(raws)[:ARCHIVED])
    report = catch_up(backbone, from_kafka.ocs, [night / "raw"], efd=from_kafka.efd)
    assert report.detectors == (DETECTOR,) and report.still_missing == []
    assert [r.obs_id for r in report.recovered] == caught_up.missing
    for recovered in report.recovered:
        from_night = fits.getheader(_archived(caught_up.backbone, recovered.obs_id))
        header = fits.getheader(_archived(backbone, recovered.obs_id))
        assert recovered.added_keywords == tuple(k for k, _, _ in EFD_KEYWORDS)
        for keyword, source, _ in EFD_KEYWORDS:
            # Mount and rotator positions are Avro doubles; the weather and the DIMM travel as floats.
            exact = "MTMount" in source or "MTRotator" in source
            assert header[keyword] == pytest.approx(from_night[keyword], rel=0 if exact else 1e-6)


def test_the_cli_recovers_what_the_archiver_missed(night: Path, raws: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from dmstream.cli import main

    monkeypatch.setenv("DMSTREAM_DATA_DIR", str(tmp_path))
    store = Backbone.from_settings()
    _archive(store, raws, list(raws)[:2])
    result = CliRunner().invoke(main, ["archive", "catch-up", "--night", str(night)])
    assert result.exit_code == 0, result.output
    assert f"recovered={len(raws) - 2}" in result.output and "still_missing=0" in result.output
    assert len(store.query("raw")) == len(raws)
    again = CliRunner().invoke(main, ["archive", "catch-up", "--night", str(night), "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["recovered"] == []
