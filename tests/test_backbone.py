"""The Data Backbone: formatters round-trip, puts are idempotent, conflicts and corruption are caught."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from astropy.io import fits
from astropy.wcs import WCS, Sip
from click.testing import CliRunner

from dmstream.backbone import (
    Backbone,
    CorruptDatasetError,
    DataIdError,
    DatasetConflictError,
    DatasetNotFoundError,
    DatasetTypeConflictError,
    FormatterError,
    UnknownDatasetTypeError,
)
from dmstream.cli import main
from dmstream.payloads.camera import get_detector
from dmstream.payloads.image import CcdImage
from dmstream.payloads.masks import MASK_DTYPE, MaskPlane
from dmstream.payloads.psf import PixelPsf
from dmstream.settings import ENV_PREFIX, Settings
from dmstream.streams.rawfits import RawExposure, write_raw

SHAPE = (24, 32)
CALEXP_ID = {"instrument": "LSSTCam", "day_obs": 20261125, "visit": 2026112500123, "detector": 94}
RAW_HEADER = {
    "OBSID": "MC_O_20261125_000123", "DAYOBS": 20261125, "SEQNUM": 123,
    "GROUPID": "2026-11-25T03:04:36.250", "IMGTYPE": "OBJECT", "EXPTIME": 30.0, "DARKTIME": 30.9,
    "MJD-OBS": 61004.128, "FILTBAND": "r", "FILTER": "r_57", "RA": 342.167, "DEC": -54.35, "ROTPA": 17.5,
}


@pytest.fixture
def backbone(tmp_path: Path) -> Backbone:
    store = Backbone(f"sqlite:///{tmp_path / 'registry.sqlite3'}", tmp_path / "files")
    yield store
    store.close()


def sip_wcs() -> WCS:
    """A rotated TAN-SIP WCS whose values need all 17 digits."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    wcs.wcs.crval = [342.16712345678901, -54.350987654321012]
    wcs.wcs.crpix = [16.123456789012345, 12.987654321098765]
    theta = np.radians(17.3)
    wcs.wcs.cd = 0.2 / 3600 * np.array([[-np.cos(theta), np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    a, b = np.zeros((4, 4)), np.zeros((4, 4))
    a[2, 0], a[0, 2], a[1, 2], b[1, 1], b[3, 0] = 1.2345678901234567e-6, -3.3e-7, 2.1e-9, 7.77e-7, -4.4e-10
    wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    return wcs


def make_ccd_image(seed: int = 1, **changes: object) -> CcdImage:
    rng = np.random.default_rng(seed)
    planes = np.array([int(plane) for plane in MaskPlane], dtype=MASK_DTYPE)
    mask = np.bitwise_or.reduce(rng.choice(planes, size=(*SHAPE, 3)), axis=-1).astype(MASK_DTYPE)
    values = {
        "image": rng.normal(0, 30, SHAPE).astype(np.float32),
        "variance": rng.uniform(800, 900, SHAPE).astype(np.float32),
        "mask": mask, "wcs": sip_wcs(), "psf": PixelPsf(rng.random((3, 21, 21)), 1, SHAPE),
        "zero_point": 31.123456789012345, "band": "r", "exptime": 29.999999999999996,
        "metadata": {"OBSID": "MC_O_20261125_000123", "DETECTOR": np.int64(94), "MJD-OBS": 61004.128000000004,
                     "seeing": float("nan"), "amps": [1, 2, 3], "nested": {"ok": True}},
    }
    values.update(changes)
    return CcdImage(**values)


def assert_same_wcs(actual: WCS, expected: WCS) -> None:
    x, y = np.meshgrid(np.linspace(-5, SHAPE[1] + 5, 9), np.linspace(-5, SHAPE[0] + 5, 7))
    np.testing.assert_array_equal(actual.all_pix2world(x, y, 0), expected.all_pix2world(x, y, 0))
    np.testing.assert_array_equal(actual.wcs.crval, expected.wcs.crval)
    np.testing.assert_array_equal(actual.wcs.crpix, expected.wcs.crpix)
    np.testing.assert_array_equal(actual.pixel_scale_matrix, expected.pixel_scale_matrix)
    np.testing.assert_array_equal(actual.sip.a, expected.sip.a)
    np.testing.assert_array_equal(actual.sip.b, expected.sip.b)


def test_ccd_image_round_trips_exactly(backbone: Backbone) -> None:
    original = make_ccd_image()
    backbone.put(original, "calexp", band="r", **CALEXP_ID)
    back = backbone.get("calexp", verify=True, **CALEXP_ID)
    for plane in ("image", "variance", "mask"):
        assert getattr(back, plane).dtype == getattr(original, plane).dtype
        np.testing.assert_array_equal(getattr(back, plane), getattr(original, plane))
    assert_same_wcs(back.wcs, original.wcs)
    assert isinstance(back.psf, PixelPsf)
    np.testing.assert_array_equal(back.psf.coefficients, original.psf.coefficients)
    assert (back.psf.degree, back.psf.detector_shape) == (1, SHAPE)
    assert (back.zero_point, back.band, back.exptime) == (31.123456789012345, "r", 29.999999999999996)
    assert np.isnan(back.metadata.pop("seeing"))
    assert back.metadata == {"OBSID": "MC_O_20261125_000123", "DETECTOR": 94, "MJD-OBS": 61004.128000000004,
                             "amps": [1, 2, 3], "nested": {"ok": True}}


def test_a_section_of_an_image_reads_back_exactly(backbone: Backbone) -> None:
    original = make_ccd_image()
    original.mask[::7, ::5] |= np.uint32(MaskPlane.SAT) | np.uint32(1 << 31)
    backbone.put(original, "calexp", band="r", **CALEXP_ID)
    section = (slice(3, SHAPE[0] - 5), slice(11, SHAPE[1] // 2))
    part = backbone.get("calexp", section=section, **CALEXP_ID)
    for plane in ("image", "variance", "mask"):
        assert getattr(part, plane).dtype == getattr(original, plane).dtype
        np.testing.assert_array_equal(getattr(part, plane), getattr(original, plane)[section])
    # The section's pixel (0, 0) is the whole image's (11, 3) on the sky.
    np.testing.assert_allclose(part.wcs.pixel_to_world_values(0.0, 0.0),
                               original.wcs.pixel_to_world_values(11.0, 3.0), rtol=0, atol=1e-12)
    assert part.metadata["SECTION_ORIGIN"] == [3, 11]


def test_ccd_image_file_is_readable_fits_with_mask_plane_names(backbone: Backbone) -> None:
    backbone.put(make_ccd_image(), "calexp", **CALEXP_ID)
    with fits.open(backbone.path("calexp", **CALEXP_ID)) as hdus:
        assert [hdu.name for hdu in hdus] == ["PRIMARY", "IMAGE", "VARIANCE", "MASK", "PSF"]
        assert hdus[0].header["FILTBAND"] == "r"
        planes = {key[3:]: value for key, value in hdus["MASK"].header.items() if key.startswith("MP_")}
        assert planes == {plane.name: int(plane).bit_length() - 1 for plane in MaskPlane}
        assert hdus["IMAGE"].header["CTYPE1"] == "RA---TAN-SIP"


class GaussianPsf:
    """A PSF model the formatter does not know: it keeps the kernel at the image centre."""

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma

    def kernel(self, x: float, y: float, size: int) -> np.ndarray:
        offsets = np.arange(size) - size // 2
        # Wider towards the right edge, so that the centre's kernel is told apart from others.
        sigma = self.sigma * (1 + x / 100)
        stamp = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
        return stamp / stamp.sum()

    def fwhm(self, x: float, y: float) -> float:
        return 2.3548 * self.sigma


def test_other_psf_models_are_stored_as_their_central_kernel(backbone: Backbone) -> None:
    psf = GaussianPsf(1.7)
    backbone.put(make_ccd_image(psf=psf), "difference", **CALEXP_ID)
    back = backbone.get("difference", **CALEXP_ID).psf
    centre = ((SHAPE[1] - 1) / 2, (SHAPE[0] - 1) / 2)
    np.testing.assert_allclose(back.kernel(*centre, 21), psf.kernel(*centre, 21), rtol=1e-12)
    np.testing.assert_allclose(back.kernel(0.0, 0.0, 21), psf.kernel(*centre, 21), rtol=1e-12)


def test_ccd_image_without_wcs_psf_or_zero_point(backbone: Backbone) -> None:
    backbone.put(make_ccd_image(wcs=None, psf=None, zero_point=None, metadata={}), "template", skytile=7,
                 band="g")
    back = backbone.get("template", skytile=7, band="g")
    assert (back.wcs, back.psf, back.zero_point, back.metadata) == (None, None, None, {})
    assert backbone.path("template", skytile=7, band="g").name == "template_7_g.fits"


def test_calibration_arrays_round_trip(backbone: Backbone) -> None:
    rng = np.random.default_rng(3)
    bias = {"bias": rng.normal(0, 5, SHAPE).astype(np.float32),
            "variance": rng.uniform(20, 30, SHAPE).astype(np.float64),
            "read_noise": rng.uniform(5, 7, 16)}
    defects = rng.random(SHAPE) < 0.05
    crosstalk = rng.normal(0, 1e-4, (16, 16))
    calibration_id = {"instrument": "LSSTCam", "day_obs": 20261125, "detector": 94}
    backbone.put(bias, "bias", **calibration_id)
    backbone.put(defects, "defects", **calibration_id)
    backbone.put(crosstalk, "crosstalk", **calibration_id)
    back = backbone.get("bias", verify=True, **calibration_id)
    assert list(back) == ["bias", "variance", "read_noise"]
    for name, array in bias.items():
        assert back[name].dtype == array.dtype
        np.testing.assert_array_equal(back[name], array)
    back_defects = backbone.get("defects", **calibration_id)
    assert back_defects.dtype == np.bool_
    np.testing.assert_array_equal(back_defects, defects)
    np.testing.assert_array_equal(backbone.get("crosstalk", **calibration_id), crosstalk)


def test_parquet_and_json_round_trip(backbone: Backbone) -> None:
    table = pa.table({"diaSourceId": pa.array([1, 2], pa.int64()), "ra": [10.0, 10.1],
                      "band": ["r", "r"], "psfFlux": pa.array([1.5, None], pa.float32())})
    backbone.put(table, "diaSource", **CALEXP_ID)
    assert backbone.get("diaSource", verify=True, **CALEXP_ID).equals(table)
    backbone.register_type("qcSummary", ("instrument", "day_obs", "visit", "detector"), "json",
                           description="Per-detector QC numbers.")
    summary = {"psfFwhm": 0.71, "zeroPoint": 31.2, "nDiaSources": np.int64(12), "flags": ["ok"]}
    ref = backbone.put(summary, "qcSummary", **CALEXP_ID)
    assert ref.path == "qcSummary/20261125/qcSummary_LSSTCam_2026112500123_94.json"
    assert backbone.get("qcSummary", **CALEXP_ID) == {**summary, "nDiaSources": 12}
    with pytest.raises(FormatterError, match="JSON"):
        backbone.put({"x": float("nan")}, "qcSummary", **{**CALEXP_ID, "detector": 95})


@pytest.fixture(scope="module")
def raw_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    detector = get_detector("R22_S11")
    amps = [np.full(amp.raw_shape, 1000 + amp.index, dtype=np.int32) for amp in detector.amplifiers]
    return write_raw(tmp_path_factory.mktemp("night") / "raw.fits", RAW_HEADER, amps, detector, compress=True)


def test_ingest_raw_takes_the_data_id_from_the_header_and_is_idempotent(backbone: Backbone,
                                                                           raw_file: Path) -> None:
    ref = backbone.ingest_raw(raw_file)
    assert ref.data_id == {"instrument": "LSSTCam", "day_obs": 20261125, "exposure": 2026112500123,
                           "detector": 94, "band": "r", "physical_filter": "r_57"}
    assert ref.path == "raw/20261125/raw_LSSTCam_2026112500123_94.fits"
    again = backbone.ingest_raw(raw_file)
    assert again == ref and again.created == ref.created
    assert len(backbone.query("raw")) == 1
    assert backbone.path("raw", **ref.data_id).read_bytes() == raw_file.read_bytes()
    raw = backbone.get("raw", verify=True, instrument="LSSTCam", day_obs=20261125, exposure=2026112500123,
                       detector=94)
    assert isinstance(raw, RawExposure)
    assert [int(amp[0, 0]) for amp in raw.amps] == [1000 + i for i in range(16)]
    # The same bytes put by an archiver under the same data id are the same dataset.
    assert backbone.put(raw_file.read_bytes(), "raw", **ref.data_id) == ref


def test_ingest_refuses_a_damaged_raw(backbone: Backbone, raw_file: Path, tmp_path: Path) -> None:
    from dmstream.streams.rawfits import RawFileError

    damaged = tmp_path / "damaged.fits"
    damaged.write_bytes(raw_file.read_bytes()[:-20000])
    with pytest.raises(RawFileError):
        backbone.ingest_raw(damaged)
    assert backbone.query("raw") == []


def test_conflicting_put_is_refused_and_the_first_content_kept(backbone: Backbone) -> None:
    calibration_id = {"instrument": "LSSTCam", "day_obs": 20261125, "detector": 94}
    first = np.zeros(SHAPE, np.float32)
    ref = backbone.put(first, "dark", **calibration_id)
    assert backbone.put(first.copy(), "dark", **calibration_id) == ref
    with pytest.raises(DatasetConflictError, match="other content"):
        backbone.put(first + 1, "dark", **calibration_id)
    np.testing.assert_array_equal(backbone.get("dark", verify=True, **calibration_id), first)
    leftovers = [p for p in backbone.datastore.root.rglob("*") if p.is_file() and p.name.startswith(".")]
    assert leftovers == []


def miss_next_look_up(registry: object) -> None:
    """Make the registry's next ``find`` see nothing, as if another process inserted the row just after."""
    real_find = registry.find

    def find(*args: object) -> None:
        registry.find = real_find
        return None

    registry.find = find


def test_a_put_that_loses_the_race_to_the_same_data_id_gets_the_winners_ref(backbone: Backbone) -> None:
    calibration_id = {"instrument": "LSSTCam", "day_obs": 20261125, "detector": 94}
    winner = backbone.put(np.ones(SHAPE), "dark", **calibration_id)
    miss_next_look_up(backbone.registry)
    assert backbone.put(np.ones(SHAPE), "dark", **calibration_id) == winner
    miss_next_look_up(backbone.registry)
    with pytest.raises(DatasetConflictError):
        backbone.put(np.zeros(SHAPE), "dark", **calibration_id)
    np.testing.assert_array_equal(backbone.get("dark", verify=True, **calibration_id), 1.0)


def test_corrupt_and_missing_files_are_detected(backbone: Backbone) -> None:
    calibration_id = {"instrument": "LSSTCam", "day_obs": 20261125, "detector": 94}
    backbone.put(np.arange(600, dtype=np.float64).reshape(20, 30), "bias", **calibration_id)
    path = backbone.path("bias", **calibration_id)
    with fits.open(path) as hdus:
        data_start = hdus.fileinfo(0)["datLoc"]
    content = bytearray(path.read_bytes())
    content[data_start + 8 * 37 + 2] ^= 0xFF  # a bit of pixel 37, header intact: only the checksum tells
    path.write_bytes(bytes(content))
    unverified = backbone.get("bias", **calibration_id)
    assert unverified.ravel()[37] != 37 and np.array_equal(np.delete(unverified.ravel(), 37),
                                                            np.delete(np.arange(600.0), 37))
    with pytest.raises(CorruptDatasetError, match="corrupt"):
        backbone.get("bias", verify=True, **calibration_id)
    path.write_bytes(bytes(content[:3000]))
    with pytest.raises(CorruptDatasetError, match="cannot be read"):
        backbone.get("bias", **calibration_id)
    path.unlink()
    with pytest.raises(CorruptDatasetError, match="missing"):
        backbone.get("bias", **calibration_id)


def test_query_by_partial_data_id(backbone: Backbone) -> None:
    table = pa.table({"diaSourceId": [1]})
    for visit, band in ((2026112500123, "r"), (2026112500130, "g")):
        for detector in (93, 94):
            backbone.put(table, "diaSource", band=band, **{**CALEXP_ID, "visit": visit, "detector": detector})
    by_detector = backbone.query("diaSource", detector=94)
    assert [ref.data_id["visit"] for ref in by_detector] == [2026112500123, 2026112500130]
    assert [ref.data_id["detector"] for ref in backbone.query("diaSource", band="g")] == [93, 94]
    assert len(backbone.query("diaSource", visit="2026112500130", detector="94")) == 1
    assert len(backbone.query("diaSource", day_obs=20261125)) == 4
    assert backbone.query("calexp") == []
    assert backbone.exists("diaSource", **CALEXP_ID)
    assert not backbone.exists("diaSource", **{**CALEXP_ID, "detector": 95})
    assert not backbone.exists("diaSource", band="g", **CALEXP_ID)
    with pytest.raises(DataIdError, match="no dimension exposure"):
        backbone.query("diaSource", exposure=1)
    with pytest.raises(UnknownDatasetTypeError, match="no dataset type 'calexps'"):
        backbone.query("calexps")
    with pytest.raises(DatasetNotFoundError):
        backbone.get("diaSource", **{**CALEXP_ID, "detector": 95})


@pytest.mark.parametrize(("data_id", "message"), [
    ({"instrument": "LSSTCam", "day_obs": 20261125, "visit": 1}, "lacks detector"),
    ({**CALEXP_ID, "detector": True}, "detector must be an integer"),
    ({**CALEXP_ID, "detector": 94.5}, "detector must be an integer"),
    ({**CALEXP_ID, "instrument": "../etc"}, "instrument must be a string"),
    ({**CALEXP_ID, "tract": 3}, "no dimension tract"),
])
def test_bad_data_ids_are_refused(backbone: Backbone, data_id: dict, message: str) -> None:
    with pytest.raises(DataIdError, match=message):
        backbone.put(make_ccd_image(), "calexp", **data_id)
    assert backbone.query("calexp") == []


def test_wrong_object_for_a_type_is_refused_and_leaves_nothing(backbone: Backbone) -> None:
    with pytest.raises(FormatterError, match="expected a CcdImage"):
        backbone.put(np.zeros(SHAPE), "calexp", **CALEXP_ID)
    with pytest.raises(FormatterError, match="not start a FITS file"):
        backbone.put(b"not fits", "raw", instrument="LSSTCam", day_obs=1, exposure=1, detector=1)
    assert backbone.query("calexp") == [] and backbone.query("raw") == []
    assert [p for p in backbone.datastore.root.rglob("*") if p.is_file()] == []


def test_latest_calibration_at_or_before_a_day(backbone: Backbone) -> None:
    for day_obs in (20261120, 20261123, 20261127):
        backbone.put(np.full(SHAPE, day_obs % 100, np.float32), "flat", instrument="LSSTCam", day_obs=day_obs,
                     detector=94, band="r")
    ref = backbone.find_calibration("flat", 20261125, instrument="LSSTCam", detector=94, band="r")
    assert ref.data_id["day_obs"] == 20261123
    with pytest.raises(DatasetNotFoundError):
        backbone.find_calibration("flat", 20261119, instrument="LSSTCam", detector=94, band="r")
    with pytest.raises(DatasetNotFoundError):
        backbone.find_calibration("flat", 20261125, instrument="LSSTCam", detector=94, band="g")


def test_registered_types_persist_and_cannot_be_redefined(backbone: Backbone, tmp_path: Path) -> None:
    backbone.register_type("postIsr", ("instrument", "day_obs", "exposure", "detector"), "ccd_image")
    backbone.register_type("postIsr", ("instrument", "day_obs", "exposure", "detector"), "ccd_image")
    with pytest.raises(DatasetTypeConflictError):
        backbone.register_type("postIsr", ("instrument", "exposure", "detector"), "ccd_image")
    with pytest.raises(FormatterError, match="no storage class"):
        backbone.register_type("thing", ("detector",), "pickle")
    other = Backbone(f"sqlite:///{tmp_path / 'registry.sqlite3'}", tmp_path / "files")
    assert "postIsr" in [kind.name for kind in other.types()]
    other.close()


def put_many(registry_url: str, root: str, worker: int, count: int) -> None:
    store = Backbone(registry_url, root)
    for index in range(count):
        store.put(np.full((8, 8), worker * 1000 + index, np.int32), "bias", instrument="LSSTCam",
                  day_obs=20261125, detector=worker * 100 + index)
        # Both workers also put the one same dataset, racing for it.
        store.put({"shared": True}, "shared", instrument="LSSTCam", day_obs=20261125, detector=0)
    store.close()


def test_two_processes_putting_at_once_all_land(backbone: Backbone, tmp_path: Path) -> None:
    registry_url = f"sqlite:///{tmp_path / 'registry.sqlite3'}"
    backbone.register_type("shared", ("instrument", "day_obs", "detector"), "json")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=put_many, args=(registry_url, str(tmp_path / "files"), worker, 25))
               for worker in (1, 2)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
        assert process.exitcode == 0
    refs = backbone.query("bias")
    assert len(refs) == 50
    for ref in refs:
        detector = ref.data_id["detector"]
        expected = (detector // 100) * 1000 + detector % 100
        np.testing.assert_array_equal(backbone.get("bias", verify=True, **ref.data_id), expected)
    assert len(backbone.query("shared")) == 1


def test_settings_put_the_registry_and_files_under_the_data_dir(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REGISTRY_URL", "BACKBONE_ROOT", "APDB_URL"):
        monkeypatch.delenv(ENV_PREFIX + name, raising=False)
    settings = Settings(data_dir=tmp_path)
    assert settings.registry_url == f"sqlite:///{tmp_path}/backbone/registry.sqlite3"
    assert settings.backbone_root == tmp_path / "backbone" / "files"
    assert settings.apdb_url == f"sqlite:///{tmp_path}/apdb.sqlite3"
    monkeypatch.setenv(ENV_PREFIX + "REGISTRY_URL", f"sqlite:///{tmp_path}/elsewhere.db")
    store = Backbone.from_settings(settings)
    store.put(np.zeros(3), "dark", instrument="LSSTCam", day_obs=20261125, detector=1)
    store.close()
    assert (tmp_path / "elsewhere.db").exists()
    assert (tmp_path / "backbone" / "files" / "dark" / "20261125" / "dark_LSSTCam_1.fits").exists()


def test_cli_lists_types_and_queries_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_PREFIX + "DATA_DIR", str(tmp_path))
    for name in ("REGISTRY_URL", "BACKBONE_ROOT"):
        monkeypatch.delenv(ENV_PREFIX + name, raising=False)
    store = Backbone.from_settings()
    for detector in (93, 94):
        store.put(make_ccd_image(), "calexp", band="r", **{**CALEXP_ID, "detector": detector})
    store.close()
    runner = CliRunner()

    types = runner.invoke(main, ["backbone", "types"])
    assert types.exit_code == 0, types.output
    assert any(line.split()[:3] == ["calexp", "2", "ccd_image"] for line in types.output.splitlines())

    listed = runner.invoke(main, ["backbone", "query", "calexp", "--where", "detector=94", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.output.splitlines()]
    assert [row["data_id"] for row in rows] == [{**CALEXP_ID, "band": "r"}]
    assert os.path.exists(tmp_path / "backbone" / "files" / rows[0]["path"])

    text = runner.invoke(main, ["backbone", "query", "calexp", "-w", "band=r"])
    assert text.exit_code == 0 and text.output.splitlines()[-1] == "2 calexp dataset(s)"

    malformed = runner.invoke(main, ["backbone", "query", "calexp", "--where", "detector"])
    assert malformed.exit_code == 2 and "KEY=VALUE" in malformed.output
    unknown = runner.invoke(main, ["backbone", "query", "nope"])
    assert unknown.exit_code == 1 and "no dataset type 'nope'" in unknown.output
