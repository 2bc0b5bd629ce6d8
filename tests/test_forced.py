"""Forced photometry of DiaObjects (DiaForcedSources) against injected truth."""

import fastavro
import galsim
import numpy as np
import pyarrow as pa
import pytest
from lsst.alert.packet import Schema
from scipy.special import erf

from dmstream.backbone.apdb import Apdb, arrow_schema
from dmstream.payloads import forced, subtract, warp
from dmstream.payloads.ids import ccd_visit_id
from dmstream.payloads.image import CcdImage
from dmstream.payloads.masks import MaskPlane, empty_mask
from dmstream.payloads.photometry import mag_to_njy
from dmstream.streams.scenes import PIXEL_SCALE, READ_NOISE, SKY, ZERO_POINT, make_scene, observe, tan_wcs

SHAPE = (1024, 1024)
VISIT, DETECTOR, MIDPOINT = 2026031500042, 94, 61114.25
#: PSF kernels on nodes this far apart: the test PSFs change width by ~4 % between nodes.
CONFIG = forced.ForcedConfig(psf_grid=64.0)


def _pixel_gaussians(dx: np.ndarray, dy: np.ndarray, sigma: np.ndarray, half: int) -> np.ndarray:
    """(n, 2 half + 1, 2 half + 1) unit-flux round Gaussians centred (dx, dy) off the stamp centre,
    integrated over each pixel."""
    edges = np.arange(-half, half + 2) - 0.5
    scale = np.sqrt(2.0) * sigma[:, None]

    def along(offset: np.ndarray) -> np.ndarray:
        return 0.5 * np.diff(erf((edges[None, :] - offset[:, None]) / scale), axis=1)
    return along(dy)[:, :, None] * along(dx)[:, None, :]


class LinearGaussianPsf:
    """``PsfModel``: a pixel-integrated round Gaussian whose sigma runs linearly from left to right."""

    def __init__(self, sigma_left: float, sigma_right: float, cols: int) -> None:
        self.sigma_left, self.sigma_right, self.cols = sigma_left, sigma_right, cols

    def sigma(self, x: np.ndarray) -> np.ndarray:
        return self.sigma_left + (self.sigma_right - self.sigma_left) * np.asarray(x, float) / (self.cols - 1)

    def kernel(self, x: float, y: float, size: int) -> np.ndarray:
        stamp = _pixel_gaussians(np.zeros(1), np.zeros(1), np.atleast_1d(self.sigma(x)), size // 2)[0]
        return stamp / stamp.sum()

    def fwhm(self, x: float, y: float) -> float:
        return float(2.3548 * self.sigma(x))

    def draw(self, shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray) -> np.ndarray:
        """Expected electrons of point sources of ``flux`` at exact sub-pixel positions (x, y)."""
        half = 15
        cx, cy = np.rint(x).astype(int), np.rint(y).astype(int)
        stamps = flux[:, None, None] * _pixel_gaussians(x - cx, y - cy, self.sigma(x), half)
        offsets = np.arange(-half, half + 1)
        rows = np.broadcast_to((cy[:, None] + offsets)[:, :, None], stamps.shape)
        cols = np.broadcast_to((cx[:, None] + offsets)[:, None, :], stamps.shape)
        inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
        image = np.zeros(shape)
        np.add.at(image, (rows[inside], cols[inside]), stamps[inside])
        return image.astype(np.float32)


DIFFERENCE_PSF = LinearGaussianPsf(1.6, 2.3, SHAPE[1])
SCIENCE_PSF = LinearGaussianPsf(1.2, 1.8, SHAPE[1])
WCS = tan_wcs(SHAPE, 150.0, 2.0, rotation_deg=30.0)


def _njy(electrons: np.ndarray) -> np.ndarray:
    """nJy of fluxes in electrons at the test zero point (AB magnitude of 1 electron)."""
    return np.sign(electrons) * mag_to_njy(ZERO_POINT - 2.5 * np.log10(np.abs(electrons)))


def _image(truth: np.ndarray, psf: LinearGaussianPsf, rng: np.random.Generator) -> CcdImage:
    image, variance = observe(truth, rng, SKY)
    return CcdImage(image, variance, empty_mask(truth.shape), WCS, psf, ZERO_POINT, "i", 30.0)


def _objects(x: np.ndarray, y: np.ndarray, first_id: int = 1000) -> pa.Table:
    ra, dec = WCS.pixel_to_world_values(x, y)
    return pa.table({"diaObjectId": pa.array(first_id + np.arange(x.size), pa.int64()), "ra": ra, "dec": dec,
                     "nDiaSources": pa.array(np.ones(x.size, np.int32))})


def _point_error(psf: LinearGaussianPsf, x: np.ndarray, y: np.ndarray, variance: float) -> np.ndarray:
    """The PSF-flux error of an ideal fit on uniform noise, (Σ P² / variance)^-½, electrons."""
    model = _pixel_gaussians(x - np.rint(x), y - np.rint(y), psf.sigma(x), 15)
    return np.sqrt(variance / (model**2).sum(axis=(1, 2)))


def _run(difference: CcdImage, science: CcdImage, objects: pa.Table) -> forced.ForcedResult:
    return forced.run(difference, science, objects, CONFIG, visit=VISIT, detector=DETECTOR,
                      midpoint_mjd_tai=MIDPOINT)


def _column(result: forced.ForcedResult, name: str) -> np.ndarray:
    return result.table.column(name).to_numpy(zero_copy_only=False)


def test_forced_fluxes_recover_injected_truth_with_the_local_psf() -> None:
    rng = np.random.default_rng(61)
    # About 1700 objects 24 pixels (10 sigma of the widest PSF) apart, so that the median pull is known to
    # ±0.03 and a bias of 0.1 stands out.
    grid_x, grid_y = np.meshgrid(np.arange(20, SHAPE[1] - 15, 24.0), np.arange(20, SHAPE[0] - 15, 24.0))
    x = grid_x.ravel() + rng.uniform(-3, 3, grid_x.size)
    y = grid_y.ravel() + rng.uniform(-3, 3, grid_x.size)
    n = x.size
    # Difference fluxes of both signs (brightening and fading) at SNR 5-100; science fluxes all positive.
    noise = SKY + READ_NOISE**2
    diff_flux = (rng.choice([-1.0, 1.0], n) * 10 ** rng.uniform(np.log10(5), 2, n)
                 * _point_error(DIFFERENCE_PSF, x, y, noise))
    science_flux = 10 ** rng.uniform(np.log10(5), 2.5, n) * _point_error(SCIENCE_PSF, x, y, noise)
    difference = _image(DIFFERENCE_PSF.draw(SHAPE, x, y, diff_flux), DIFFERENCE_PSF, rng)
    science = _image(SCIENCE_PSF.draw(SHAPE, x, y, science_flux), SCIENCE_PSF, rng)

    result = _run(difference, science, _objects(x, y))

    assert len(result.table) == n and result.off_image.size == 0 and result.no_data.size == 0
    assert (_column(result, "diaObjectId") == 1000 + np.arange(n)).all()
    for flux, truth in (("psfFlux", diff_flux), ("scienceFlux", science_flux)):
        pulls = (_column(result, flux) - _njy(truth)) / _column(result, f"{flux}Err")
        print(f"{flux}: {n} objects, pull median {np.median(pulls):+.3f}, std {np.std(pulls):.3f}")
        assert abs(np.median(pulls)) < 0.1
        assert abs(np.std(pulls) - 1.0) < 0.2
        # The bright third alone: a PSF too narrow or too wide would bias these most.
        bright = np.abs(truth) > np.quantile(np.abs(truth), 2 / 3)
        assert abs(np.median(pulls[bright])) < 0.2
    assert (_column(result, "psfFlux")[diff_flux < 0] < 0).mean() > 0.95


def test_blank_positions_give_zero_flux_and_honest_errors() -> None:
    rng = np.random.default_rng(62)
    blank = np.zeros(SHAPE, np.float32)
    difference, science = _image(blank, DIFFERENCE_PSF, rng), _image(blank, SCIENCE_PSF, rng)
    x, y = rng.uniform(20, SHAPE[1] - 20, 400), rng.uniform(20, SHAPE[0] - 20, 400)

    result = _run(difference, science, _objects(x, y))

    noise = SKY + READ_NOISE**2
    for flux, psf in (("psfFlux", DIFFERENCE_PSF), ("scienceFlux", SCIENCE_PSF)):
        error = _column(result, f"{flux}Err")
        pulls = _column(result, flux) / error
        assert abs(pulls.mean()) < 3 / np.sqrt(pulls.size)
        assert abs(np.std(pulls) - 1.0) < 0.1
        # The errors are those of an ideal PSF fit on this noise, object by object.
        expected = _njy(_point_error(psf, x, y, noise))
        assert np.abs(error / expected - 1).max() < 0.02


def test_objects_off_the_image_or_on_no_data_are_skipped_and_edge_objects_measured() -> None:
    rng = np.random.default_rng(63)
    # Two inside, one at the very edge (half its stamp off the image), two off it, one on NO_DATA.
    x = np.array([300.0, 700.4, 0.2, -3.0, 1030.0, 500.2])
    y = np.array([300.0, 600.7, 400.6, 500.0, 20.0, 800.6])
    flux = np.full(x.size, 3000.0)
    difference = _image(DIFFERENCE_PSF.draw(SHAPE, x, y, flux), DIFFERENCE_PSF, rng)
    science = _image(SCIENCE_PSF.draw(SHAPE, x, y, flux), SCIENCE_PSF, rng)
    difference.mask[780:820, 480:520] = MaskPlane.NO_DATA
    difference.image[780:820, 480:520] = 0.0
    difference.variance[780:820, 480:520] = np.nan
    objects = _objects(x, y)
    # And one on the other side of the sky.
    objects = pa.concat_tables([objects, pa.table({"diaObjectId": pa.array([7], pa.int64()), "ra": [330.0],
                                                   "dec": [-2.0], "nDiaSources": pa.array([1], pa.int32())})])

    result = _run(difference, science, objects)

    assert _column(result, "diaObjectId").tolist() == [1000, 1001, 1002]
    assert sorted(result.off_image.tolist()) == [7, 1003, 1004]
    assert result.no_data.tolist() == [1005]
    pulls = (_column(result, "psfFlux") - _njy(flux[:3])) / _column(result, "psfFluxErr")
    assert (np.abs(pulls) < 4).all()
    # The edge object is fitted with the pixels it has, its error that of an ideal fit on those pixels:
    # larger (by 17 %) than for a whole PSF on the same noise.
    half = 15
    model = _pixel_gaussians(x[2:3], y[2:3] - 401, DIFFERENCE_PSF.sigma(x[2:3]), half)[0]
    variance = difference.variance[401 - half:401 + half + 1, :half + 1]
    on_image = model[:, half:]
    expected = _njy(np.array([(on_image**2 / variance).sum() ** -0.5]))[0]
    whole = _njy(np.array([(model**2 / (SKY + READ_NOISE**2 + flux[2] * model)).sum() ** -0.5]))[0]
    assert _column(result, "psfFluxErr")[2] == pytest.approx(expected, rel=0.03)
    print(f"edge object: error {expected / whole:.2f} times that of a whole PSF")
    assert expected > 1.1 * whole


def test_a_detector_without_known_objects_gives_an_empty_table() -> None:
    rng = np.random.default_rng(68)
    blank = np.zeros(SHAPE, np.float32)
    difference, science = _image(blank, DIFFERENCE_PSF, rng), _image(blank, SCIENCE_PSF, rng)

    result = _run(difference, science, _objects(np.zeros(0), np.zeros(0)))

    assert len(result.table) == 0 and result.table.schema == forced.SCHEMA
    assert result.off_image.size == 0 and result.no_data.size == 0


def test_an_object_whose_stamp_is_all_unusable_gets_null_fluxes() -> None:
    rng = np.random.default_rng(64)
    blank = np.zeros(SHAPE, np.float32)
    difference, science = _image(blank, DIFFERENCE_PSF, rng), _image(blank, SCIENCE_PSF, rng)
    science.mask[180:221, 180:221] = MaskPlane.SAT

    result = _run(difference, science, _objects(np.array([200.0, 600.0]), np.array([200.0, 600.0])))

    assert result.table.column("scienceFlux").to_pylist()[0] is None
    assert result.table.column("scienceFluxErr").to_pylist()[0] is None
    assert result.table.column("psfFlux").null_count == 0
    assert result.table.column("scienceFlux").null_count == 1


def test_ids_are_deterministic_unique_and_depend_only_on_the_pair() -> None:
    rng = np.random.default_rng(65)
    # diaObjectIds as association makes them (diaSourceIds of the first detection), over many ccdVisits.
    object_ids = (np.int64(ccd_visit_id(2026031500001, 17)) << 14) + rng.choice(1 << 14, 3000, replace=False)
    ccd_visits = [(2026031500001 + v, d) for v in range(0, 400, 20) for d in (0, 94, 188)]
    ids = np.concatenate([forced.dia_forced_source_ids(object_ids, v, d) for v, d in ccd_visits])
    assert ids.dtype == np.int64 and (ids >= 0).all()
    assert np.unique(ids).size == ids.size
    # Same pair, same id, whatever else is measured alongside.
    again = forced.dia_forced_source_ids(object_ids[::-1], *ccd_visits[5])[::-1]
    assert (again == forced.dia_forced_source_ids(object_ids, *ccd_visits[5])).all()
    # Consecutive object ids and consecutive visits give unrelated-looking ids (no shared high bits).
    neighbours = forced.dia_forced_source_ids(np.arange(1000, 1064), 5, 1)
    assert np.unique(neighbours >> 40).size > 50

    x, y = np.array([200.0, 400.0]), np.array([300.0, 500.0])
    blank = np.zeros(SHAPE, np.float32)
    difference, science = _image(blank, DIFFERENCE_PSF, rng), _image(blank, SCIENCE_PSF, rng)
    alone = _run(difference, science, _objects(x[:1], y[:1]))
    together = _run(difference, science, _objects(x, y))
    assert _column(alone, "diaForcedSourceId")[0] == _column(together, "diaForcedSourceId")[0]
    assert _column(together, "diaForcedSourceId").tolist() == forced.dia_forced_source_ids(
        [1000, 1001], VISIT, DETECTOR).tolist()


def _alert_record(name: str) -> dict:
    def find(node: object) -> dict | None:
        if isinstance(node, dict):
            if node.get("type") == "record" and node.get("name", "").split(".")[-1] == name:
                return node
            node = list(node.values())
        if isinstance(node, list):
            for item in node:
                found = find(item)
                if found:
                    return found
        return None
    record = find(Schema.from_file().definition)
    assert record is not None
    return record


def test_columns_are_the_official_apdb_and_alert_columns(tmp_path) -> None:
    official = arrow_schema("DiaForcedSource")
    ours = forced.SCHEMA
    assert set(official.names) - set(ours.names) == {"timeProcessedMjdTai", "timeWithdrawnMjdTai"}
    for field in ours:
        assert official.field(field.name).type == field.type, field.name
        assert official.field(field.name).nullable == field.nullable, field.name

    alert = {f["name"]: f["type"] for f in _alert_record("diaForcedSource")["fields"]}
    avro_types = {"long": (pa.int64(),), "int": (pa.int32(), pa.int16(), pa.int8()),
                  "double": (pa.float64(),), "float": (pa.float32(),), "string": (pa.string(),)}
    assert set(alert) - set(ours.names) == {"timeProcessedMjdTai", "timeWithdrawnMjdTai"}
    for field in ours:
        avro = alert[field.name]
        nullable = isinstance(avro, list) and "null" in avro
        assert nullable == field.nullable, field.name
        base = next(t for t in avro if t != "null") if isinstance(avro, list) else avro
        assert field.type in avro_types[base], field.name

    rng = np.random.default_rng(66)
    x, y = np.array([200.0, 400.0]), np.array([300.0, 500.0])
    difference = _image(DIFFERENCE_PSF.draw(SHAPE, x, y, np.array([5e3, -5e3])), DIFFERENCE_PSF, rng)
    science = _image(SCIENCE_PSF.draw(SHAPE, x, y, np.array([5e3, 1e4])), SCIENCE_PSF, rng)
    result = _run(difference, science, _objects(x, y))
    # Each row, with the processing time the caller adds, is a valid alert record and stores in the APDB.
    parsed = fastavro.parse_schema(_alert_record("diaForcedSource"))
    for row in result.table.to_pylist():
        assert fastavro.validation.validate({**row, "timeProcessedMjdTai": 61114.3}, parsed)
    apdb = Apdb(f"sqlite:///{tmp_path / 'apdb.sqlite3'}")
    apdb.store("DiaForcedSource", result.table)
    stored = apdb.dia_forced_sources([1000, 1001], MIDPOINT - 1)
    apdb.close()
    assert stored.column("diaForcedSourceId").to_pylist() == _column(result, "diaForcedSourceId").tolist()
    assert np.allclose(stored.column("psfFlux").to_numpy(), _column(result, "psfFlux"))
    assert stored.column("band").to_pylist() == ["i", "i"]


def test_forced_photometry_on_a_zogy_difference_recovers_transients() -> None:
    scene = make_scene(SHAPE, transients=500, stars=100, seed=3, min_separation=20, snr_range=(5.0, 100.0))
    template = warp.warp_image(scene.template, scene.science.wcs, SHAPE).image
    subtraction = subtract.run(scene.science, template)
    ra, dec = scene.science.wcs.pixel_to_world_values(scene.transient_x, scene.transient_y)
    objects = pa.table({"diaObjectId": pa.array(np.arange(ra.size) + 1, pa.int64()), "ra": ra, "dec": dec})

    result = forced.run(subtraction.difference, scene.science, objects, visit=VISIT, detector=DETECTOR,
                        midpoint_mjd_tai=MIDPOINT)

    # ZOGY normalises both PSFs on stamps of ±kernel_half pixels, so the difference's flux scale is the light
    # of the (Kolmogorov) science PSF within that box, 99.6 % here.
    box = 2 * subtraction.kernel_half + 1
    profile = galsim.Convolve(scene.science.psf.psf.galsim_profile(), galsim.Pixel(PIXEL_SCALE))
    within_box = float(profile.drawImage(nx=box, ny=box, scale=PIXEL_SCALE, method="no_pixel").array.sum())
    truth = _njy(scene.transient_flux) * within_box
    pulls = (_column(result, "psfFlux") - truth) / _column(result, "psfFluxErr")
    robust_std = 1.4826 * np.median(np.abs(pulls - np.median(pulls)))
    print(f"ZOGY difference: pull median {np.median(pulls):+.3f}, robust std {robust_std:.3f}")
    assert len(result.table) == ra.size
    assert abs(np.median(pulls)) < 0.1
    assert abs(robust_std - 1.0) < 0.2


def test_bad_input_gets_a_clear_error() -> None:
    rng = np.random.default_rng(67)
    blank = np.zeros((64, 64), np.float32)
    psf = LinearGaussianPsf(1.5, 1.5, 64)
    image = CcdImage(*observe(blank, rng, SKY), empty_mask((64, 64)), tan_wcs((64, 64), 150.0, 2.0), psf,
                     ZERO_POINT, "i")
    objects = pa.table({"diaObjectId": pa.array([1, 2], pa.int64()), "ra": [150.0, 150.0], "dec": [2.0, 2.0]})
    cases = [
        (image, image, objects.drop_columns(["dec"]), "lacks column dec"),
        (image, image, pa.table({"diaObjectId": pa.array([1, 1], pa.int64()), "ra": [150.0, 150.0],
                                 "dec": [2.0, 2.001]}), "more than once"),
        (image, image, pa.table({"diaObjectId": pa.array([-4], pa.int64()), "ra": [150.0], "dec": [2.0]}),
         "non-negative"),
        (CcdImage(image.image, image.variance, image.mask, image.wcs, None, ZERO_POINT), image, objects,
         "difference image needs a PSF"),
        (image, CcdImage(image.image, image.variance, image.mask, image.wcs, psf, None), objects,
         "needs a zero point"),
        (image, CcdImage(image.image, image.variance, image.mask, None, psf, ZERO_POINT), objects, "WCS"),
        (CcdImage(np.zeros((32, 64), np.float32), np.ones((32, 64), np.float32), empty_mask((32, 64)), None,
                  psf, ZERO_POINT), image, objects, "differ in shape"),
    ]
    for difference, science, table, message in cases:
        with pytest.raises(forced.ForcedPhotometryError, match=message):
            forced.run(difference, science, table, visit=1, detector=1, midpoint_mjd_tai=MIDPOINT)
