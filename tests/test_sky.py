"""The simulated sky: catalogues, light curves, movers, and rendered exposures against their truth."""

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from astropy.wcs import WCS

from dmstream.payloads import photometry
from dmstream.payloads.camera import detector_wcs, get_detector
from dmstream.payloads.render import Psf
from dmstream.streams.sky import (
    Observation,
    Sky,
    SkyConfig,
    angular_distance,
    bazin_flux,
    flare_flux,
    render_exposure,
)

NIGHT = (61000.0, 61000.4)
FIELDS = [(150.0, 2.0), (151.5, 2.5)]


@pytest.fixture(scope="module")
def sky() -> Sky:
    return Sky.generate(FIELDS, SkyConfig(seed=5), mjd_range=NIGHT)


def _small_wcs(ra: float, dec: float, size: int) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [(size + 1) / 2, (size + 1) / 2]
    wcs.wcs.cd = np.array([[-0.2, 0.0], [0.0, 0.2]]) / 3600.0
    return wcs


def test_reference_catalog_columns(sky):
    refcat = sky.reference_catalog()
    expected = {"source_id": pa.int64(), "ra": pa.float64(), "dec": pa.float64(), "ra_error": pa.float32(),
                "dec_error": pa.float32(), "pmra": pa.float64(), "pmdec": pa.float64(),
                "parallax": pa.float64(), "ref_epoch": pa.float64(), "phot_g_mean_mag": pa.float32(),
                **{band: pa.float32() for band in "ugrizy"}}
    for name, kind in expected.items():
        assert refcat.schema.field(name).type == kind, name
    units = {name: refcat.schema.field(name).metadata[b"unit"].decode() for name in ("ra", "ra_error", "pmra",
                                                                                     "parallax")}
    assert units == {"ra": "deg", "ra_error": "mas", "pmra": "mas/yr", "parallax": "mas"}
    assert len(refcat) > 1000
    g = refcat["phot_g_mean_mag"].to_numpy()
    assert g.max() < 21.0 and g.min() < 16.0
    assert np.all(refcat["ref_epoch"].to_numpy() == 2016.0)
    assert len(np.unique(refcat["source_id"].to_numpy())) == len(refcat)
    ra, dec = refcat["ra"].to_numpy(), refcat["dec"].to_numpy()
    assert sky.in_footprint(ra, dec).mean() > 0.99
    # Errors grow with magnitude; counts rise towards faint magnitudes.
    errors = refcat["ra_error"].to_numpy()
    assert np.median(errors[g > 20]) > 5 * np.median(errors[g < 17])
    counts, _ = np.histogram(refcat["r"].to_numpy(), bins=[15, 16, 17, 18, 19, 20])
    assert np.all(np.diff(counts) > 0)


def test_same_seed_same_sky():
    one = Sky.generate(FIELDS, SkyConfig(seed=11), mjd_range=NIGHT)
    two = Sky.generate(FIELDS, SkyConfig(seed=11), mjd_range=NIGHT)
    other = Sky.generate(FIELDS, SkyConfig(seed=12), mjd_range=NIGHT)
    assert one.reference_catalog().equals(two.reference_catalog())
    for name, table in one.truth_tables().items():
        assert table.equals(two.truth_tables()[name]), name
    assert not one.reference_catalog().equals(other.reference_catalog())
    wcs = _small_wcs(150.0, 2.0, 400)
    observation = Observation(band="g", mjd_start=61000.1, ra=150.0, dec=2.0)
    image_one, truth_one = render_exposure(one, observation, wcs, (400, 400), np.random.default_rng(3))
    image_two, truth_two = render_exposure(two, observation, wcs, (400, 400), np.random.default_rng(3))
    assert np.array_equal(image_one, image_two)
    assert truth_one.equals(truth_two)


def test_supernova_light_curves_rise_and_fall(sky):
    t = np.linspace(-30, 100, 1301)
    flux = bazin_flux(t, 0.0, 2.5, 25.0)
    peak = np.argmax(flux)
    assert t[peak] == pytest.approx(0.0, abs=0.1) and flux[peak] == pytest.approx(1.0)
    assert np.all(np.diff(flux[:peak]) > 0) and np.all(np.diff(flux[peak:]) < 0)
    assert flux[0] < 1e-3 and flux[-1] < 0.05
    supernovae = sky.supernovae
    assert supernovae["id"].size > 10
    peaks = supernovae["peak_mjd"]
    assert peaks.min() < NIGHT[0] < peaks.max()
    assert (supernovae["host_id"] >= 0).mean() > 0.5
    # One supernova seen through sources_at at three times: faint, at peak, fading.
    k = int(np.argmin(supernovae["peak_r"]))
    mags = []
    for dt in (-15.0, 0.0, 30.0):
        found = sky.sources_at(peaks[k] + dt, "r", supernovae["ra"][k], supernovae["dec"][k], 0.01)
        row = found["supernova"]["id"] == supernovae["id"][k]
        mags.append(found["supernova"]["mag"][row][0] if row.any() else np.inf)
    assert mags[1] == pytest.approx(supernovae["peak_r"][k])
    assert mags[0] > mags[1] + 1 and mags[2] > mags[1] + 0.5


def test_flare_profile():
    t = np.array([-1.0, -0.5, 0.0, 1.0, 3.0])
    flux = flare_flux(t, 0.0, 1.0, 1.0)
    assert np.allclose(flux, [0.0, 0.5, 1.0, np.exp(-1), np.exp(-3)])


def test_solar_system_objects_move_at_their_rate(sky):
    movers = sky.movers
    assert movers["id"].size > 10
    assert movers["rate"].min() < 0.1 and movers["rate"].max() > 2.0
    t0, t1 = 61000.1, 61000.3
    ra, dec = sky.ephemeris(np.array([t0, t1]))
    moved = angular_distance(ra[:, 0], dec[:, 0], ra[:, 1], dec[:, 1])
    assert np.allclose(moved, movers["rate"] * (t1 - t0), rtol=1e-6)
    table = sky.ephemeris_table([t0, t1])
    assert len(table) == 2 * movers["id"].size
    assert set(table.column_names) >= {"sso_id", "mjd", "ra", "dec"}


def test_render_truth_matches_image():
    sky = Sky.generate([(150.0, 2.0)], SkyConfig(seed=2, galaxy_density=0.0, supernova_density=0.0,
                                                 cosmic_ray_rate=0.0, flare_density=0.0, sso_density=0.0,
                                                 satellite_rate=0.0, star_density=20000.0),
                       mjd_range=NIGHT)
    size = 600
    wcs = _small_wcs(150.0, 2.0, size)
    observation = Observation(band="r", mjd_start=61000.2, exptime=30.0, sky_mag=21.2, ra=150.0, dec=2.0)
    psf = Psf(fwhm=0.8)
    image, truth = render_exposure(sky, observation, wcs, (size, size), np.random.default_rng(0), psf)
    assert image.dtype == np.float32 and image.shape == (size, size)
    level = photometry.sky_electrons_per_pixel(21.2, "r", 30.0)
    assert np.median(image) == pytest.approx(level, rel=0.05)
    kinds = set(truth["kind"].to_pylist())
    assert kinds == {"star"}
    x, y, flux = (truth[name].to_numpy() for name in ("x", "y", "flux_e"))
    assert np.all((x >= -0.5) & (x < size - 0.5) & (y >= -0.5) & (y < size - 0.5))
    assert np.allclose(truth["flux_njy"].to_numpy(), photometry.mag_to_njy(truth["mag"].to_numpy()))
    # The brightest isolated star: its centroid and flux on the sky-subtracted image match its truth.
    order = np.argsort(flux)[::-1]
    for k in order[:10]:
        others = np.hypot(x - x[k], y - y[k])
        if np.sort(others)[1] > 40 and 30 < x[k] < size - 30 and 30 < y[k] < size - 30:
            break
    yy, xx = np.indices(image.shape)
    near = np.hypot(xx - x[k], yy - y[k]) < 15
    signal = image[near].astype(float) - np.median(image)
    assert signal.sum() == pytest.approx(flux[k], rel=0.05)
    assert (signal * xx[near]).sum() / signal.sum() == pytest.approx(x[k], abs=0.05)


def test_sources_at_lists_every_kind(sky):
    found = sky.sources_at(NIGHT[0] + 0.2, "i", 150.0, 2.0, 1.9)
    assert {"star", "galaxy", "supernova", "solar_system"} <= set(found)
    for columns in found.values():
        assert {"id", "ra", "dec", "mag"} <= set(columns)
        assert np.all(angular_distance(150.0, 2.0, columns["ra"], columns["dec"]) <= 1.92)
    galaxies = found["galaxy"]
    assert {"half_light_radius", "sersic_n", "axis_ratio", "position_angle"} <= set(galaxies)
    assert {"rate", "direction"} <= set(found["solar_system"])


def test_satellite_trail_crosses_the_detector():
    sky = Sky.generate([(150.0, 2.0)], SkyConfig(seed=1, satellite_rate=30.0), mjd_range=NIGHT)
    detector = get_detector("R22_S11")
    wcs = detector_wcs(detector, 150.0, 2.0, 0.0)
    observation = Observation(band="r", mjd_start=61000.2, ra=150.0, dec=2.0)
    _, truth = render_exposure(sky, observation, wcs, detector.shape, np.random.default_rng(0))
    trails = truth.filter(pc.equal(truth["kind"], "satellite"))
    assert len(trails) >= 1
    assert trails["trail_length"].to_numpy().min() > 100


@pytest.mark.slow
def test_full_size_exposure_default_density(capsys):
    detector = get_detector("R22_S11")
    sky = Sky.generate([(150.0, 2.0)], SkyConfig(seed=9), mjd_range=NIGHT)
    wcs = detector_wcs(detector, 150.0, 2.0, 20.0)
    observation = Observation(band="r", mjd_start=61000.2, ra=150.0, dec=2.0, fwhm_geom=0.75, airmass=1.2)
    start = time.perf_counter()
    image, truth = render_exposure(sky, observation, wcs, detector.shape, np.random.default_rng(1))
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nfull-size {detector.shape} exposure: {elapsed:.2f} s, {len(truth)} truth rows")
    assert image.shape == detector.shape and np.isfinite(image).all() and image.min() >= 0
    kinds = set(truth["kind"].to_pylist())
    assert {"star", "galaxy", "cosmic_ray"} <= kinds
