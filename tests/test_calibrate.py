"""Single-CCD calibration against the simulator's injected truth, on full-size ITL CCDs."""

from __future__ import annotations

from dataclasses import dataclass

import galsim
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from dmstream.payloads import photometry
from dmstream.payloads.astrometry import fit_tan_sip, gnomonic, inverse_gnomonic, reference_positions
from dmstream.payloads.background import BackgroundConfig, estimate_background
from dmstream.payloads.calibrate import Calibrate, CalibrateResult
from dmstream.payloads.camera import detector_wcs, get_detector
from dmstream.payloads.conditions import DARK_SKY_MAG
from dmstream.payloads.image import CcdImage
from dmstream.payloads.masks import MaskPlane, empty_mask
from dmstream.payloads.psf import adaptive_moments, half_max_fwhm, lanczos_shift
from dmstream.payloads.render import Psf
from dmstream.streams.sky import Observation, Sky, SkyConfig, render_exposure

BORESIGHT = (150.0, 2.0)
NIGHT = (61000.0, 61000.4)
READ_NOISE = 6.0


@dataclass
class Case:
    observation: Observation
    psf: Psf
    true_wcs: WCS
    truth: pa.Table
    sky_model: np.ndarray
    result: CalibrateResult
    shape: tuple[int, int]


def perturbed_wcs(wcs: WCS, shape: tuple[int, int], east: float, north: float, rotation: float) -> WCS:
    """``wcs`` moved by (east, north) arcsec at the detector centre and turned by ``rotation`` deg about it.

    The tangent point stays on the boresight, as in a raw header whose pointing is slightly off.
    """
    cx, cy = (shape[1] - 1) / 2, (shape[0] - 1) / 2
    ra, dec = (float(v) for v in wcs.pixel_to_world_values(cx, cy))
    target = (ra + east / 3600 / np.cos(np.radians(dec)), dec + north / 3600)
    angle = np.radians(rotation)
    cd = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ wcs.wcs.cd
    out = wcs.deepcopy()
    out.wcs.cd = cd
    out.wcs.crpix = np.array([cx, cy]) + 1.0 - np.linalg.solve(cd, gnomonic(*target, *wcs.wcs.crval))
    out.wcs.set()
    return out


def sky_plane(sky: Sky, observation: Observation, psf: Psf, shape: tuple[int, int]) -> np.ndarray:
    """The sky that render_exposure laid under the sources (its level and gradient)."""
    mag = observation.sky_mag if np.isfinite(observation.sky_mag) else DARK_SKY_MAG[observation.band]
    level = float(photometry.sky_electrons_per_pixel(mag, observation.band, observation.exptime,
                                                     psf.pixel_scale))
    slope_x, slope_y = sky._exposure_rng(observation.mjd_start, 3).uniform(-1.0, 1.0, 2) \
        * sky.config.sky_gradient / 2
    rows, cols = shape
    yy, xx = np.ogrid[0:rows, 0:cols]
    return level * (1.0 + slope_x * (2 * xx / (cols - 1) - 1.0) + slope_y * (2 * yy / (rows - 1) - 1.0))


def make_case(config: SkyConfig, observation: Observation, detector: str, seed: int) -> Case:
    geometry = get_detector(detector)
    sky = Sky.generate([BORESIGHT], config, mjd_range=NIGHT)
    true_wcs = detector_wcs(geometry, *BORESIGHT, 0.0)
    rng = np.random.default_rng(seed)
    expected, truth = render_exposure(sky, observation, true_wcs, geometry.shape, rng)
    variance = (expected + READ_NOISE**2).astype(np.float32)
    image = expected + rng.standard_normal(expected.shape, dtype=np.float32) * np.sqrt(variance)
    ccd = CcdImage(image.astype(np.float32), variance, empty_mask(geometry.shape), band=observation.band,
                   exptime=observation.exptime)
    approx = perturbed_wcs(true_wcs, geometry.shape, 1.7, -1.1, 0.3)
    mid = observation.mjd_start + observation.exptime / 2 / 86400
    result = Calibrate().run(ccd, approx, sky.reference_catalog(), mid)
    psf = sky.exposure_psf(observation)
    return Case(observation, psf, true_wcs, truth, sky_plane(sky, observation, psf, geometry.shape), result,
                geometry.shape)


@pytest.fixture(scope="module")
def dense() -> Case:
    """A star-rich field (5x the default density) in i at airmass 1.3 through thin cloud, 1.0″ seeing."""
    observation = Observation(band="i", mjd_start=61000.21, exptime=30.0, airmass=1.3, transparency=0.85,
                              fwhm_geom=1.0, ra=BORESIGHT[0], dec=BORESIGHT[1])
    return make_case(SkyConfig(seed=3, star_density=10_000.0), observation, "R01_S00", 11)


@pytest.fixture(scope="module")
def sparse() -> Case:
    """The default (high-latitude) density in r, clear, 0.7″ seeing: a dozen reference stars."""
    observation = Observation(band="r", mjd_start=61000.25, exptime=30.0, airmass=1.1, fwhm_geom=0.7,
                              ra=BORESIGHT[0], dec=BORESIGHT[1])
    return make_case(SkyConfig(seed=1), observation, "R10_S12", 12)


def _truth_stars(case: Case) -> dict[str, np.ndarray]:
    kind = np.asarray(case.truth["kind"].to_pylist())
    star = kind == "star"
    return {name: case.truth[name].to_numpy()[star] for name in ("x", "y", "ra", "dec", "flux_e")}


def _pixel_psf_truth(psf: Psf, x: float, y: float, shape: tuple[int, int]) -> tuple[float, float, float]:
    """FWHM (pixels, pixel response included, same estimator as the model) and e1, e2 of the true PSF."""
    stamp = galsim.Convolve(psf.galsim_profile(x, y, shape), galsim.Pixel(psf.pixel_scale)).drawImage(
        nx=41, ny=41, scale=psf.pixel_scale, method="no_pixel").array
    _, e1, e2 = psf.at(x, y, shape)
    return half_max_fwhm(stamp), float(e1), float(e2)


POSITIONS = [(200.0, 200.0), (2036.0, 2000.0), (3870.0, 3800.0), (200.0, 3800.0), (3870.0, 200.0),
             (1000.0, 3000.0)]


@pytest.mark.parametrize("name", ["dense", "sparse"])
def test_psf_fwhm_and_ellipticity_match_truth(name, request):
    case: Case = request.getfixturevalue(name)
    model = case.result.image.psf
    for x, y in POSITIONS:
        fwhm, e1, e2 = _pixel_psf_truth(case.psf, x, y, case.shape)
        got_e1, got_e2 = (float(v[0]) for v in model.ellipticity(x, y))
        print(f"{name} ({x:.0f}, {y:.0f}): FWHM {model.fwhm(x, y):.3f} vs {fwhm:.3f} px, "
              f"e1 {got_e1:+.4f} vs {e1:+.4f}, e2 {got_e2:+.4f} vs {e2:+.4f}")
        assert model.fwhm(x, y) == pytest.approx(fwhm, rel=0.03)
        assert abs(got_e1 - e1) < 0.012 and abs(got_e2 - e2) < 0.012
    kernel = model.kernel(1000.0, 1000.0, 31)
    assert kernel.shape == (31, 31) and kernel.sum() == pytest.approx(1.0)
    assert np.unravel_index(np.argmax(kernel), kernel.shape) == (15, 15)


@pytest.mark.parametrize("name", ["dense", "sparse"])
def test_wcs_puts_stars_on_their_truth_positions(name, request):
    case: Case = request.getfixturevalue(name)
    stars = _truth_stars(case)
    ra, dec = case.result.image.wcs.pixel_to_world_values(stars["x"], stars["y"])
    d_ra = ((ra - stars["ra"] + 180) % 360 - 180) * np.cos(np.radians(stars["dec"])) * 3.6e6
    d_dec = (dec - stars["dec"]) * 3.6e6
    rms = float(np.sqrt(np.mean(d_ra**2 + d_dec**2)))
    # And back: sky to pixel through the SIP inverse.
    x, y = case.result.image.wcs.world_to_pixel_values(stars["ra"], stars["dec"])
    pixel_rms = float(np.sqrt(np.mean((x - stars["x"]) ** 2 + (y - stars["y"]) ** 2)))
    quality = case.result.quality
    solution = case.result.astrometry
    print(f"{name}: WCS vs truth {rms:.1f} mas rms over {stars['x'].size} stars, "
          f"{pixel_rms * 200:.1f} mas back; scatter {quality.astrometric_scatter:.1f} mas over "
          f"{quality.astrometry_matches} matches, start off by {solution.offset_arcsec:.2f}″, "
          f"{solution.rotation_deg:.3f}°")
    assert rms < 20.0 and pixel_rms * 200 < 20.0
    assert quality.astrometric_scatter < 20.0
    assert case.result.astrometry.offset_arcsec == pytest.approx(np.hypot(1.7, 1.1), abs=0.1)
    assert abs(case.result.astrometry.rotation_deg) == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize("name", ["dense", "sparse"])
def test_zero_point_within_one_percent(name, request):
    case: Case = request.getfixturevalue(name)
    obs = case.observation
    truth = photometry.exposure_zero_point(obs.band, obs.exptime, obs.airmass, obs.transparency)
    quality = case.result.quality
    print(f"{name}: ZP {quality.zero_point:.4f} ± {quality.zero_point_err:.4f} vs {truth:.4f} "
          f"({quality.zero_point_stars} stars, aperture correction {quality.aperture_correction:.4f})")
    assert abs(quality.zero_point - truth) < 0.01 * 1.0857
    assert case.result.image.zero_point == quality.zero_point


@pytest.mark.parametrize("name", ["dense", "sparse"])
def test_background_recovered(name, request):
    case: Case = request.getfixturevalue(name)
    background = case.result.background
    residual = background.model - case.sky_model
    level = float(np.median(case.sky_model))
    print(f"{name}: sky {background.level:.2f} vs {level:.2f} e-/px; model - truth median "
          f"{np.median(residual):+.3f}, rms {residual.std():.3f} e-/px; noise {background.noise:.2f} vs "
          f"{np.sqrt(level + READ_NOISE**2):.2f}")
    assert abs(np.median(residual)) < 0.002 * level
    assert residual.std() < 0.003 * level
    assert background.noise == pytest.approx(np.sqrt(level + READ_NOISE**2), rel=0.03)
    assert float(np.median(case.result.image.image)) == pytest.approx(0.0, abs=0.05 * background.noise)


def test_detection_finds_isolated_bright_stars(dense):
    stars = _truth_stars(dense)
    rows, cols = dense.shape
    sigma = dense.observation.fwhm_geom / 0.2 / 2.355
    sky = float(np.median(dense.sky_model)) + READ_NOISE**2
    snr = stars["flux_e"] / np.sqrt(stars["flux_e"] + 4 * np.pi * sigma**2 * sky)
    sources = dense.truth.filter(pc.not_equal(dense.truth["kind"], "cosmic_ray"))
    everything = np.stack([sources["x"].to_numpy(), sources["y"].to_numpy()], axis=1)
    neighbours = cKDTree(everything).query(np.stack([stars["x"], stars["y"]], axis=1), k=2)[0][:, 1]
    inside = (stars["x"] > 15) & (stars["x"] < cols - 16) & (stars["y"] > 15) & (stars["y"] < rows - 16)
    wanted = (snr > 50) & (neighbours > 15) & inside
    catalog = dense.result.catalog
    found = cKDTree(np.stack([catalog["x"].to_numpy(), catalog["y"].to_numpy()], axis=1)).query(
        np.stack([stars["x"][wanted], stars["y"][wanted]], axis=1))[0] < 1.0
    print(f"found {found.sum()} of {wanted.sum()} isolated stars at S/N > 50")
    assert wanted.sum() > 50
    assert found.mean() >= 0.95


def test_catalog_and_quality_summary(dense):
    result = dense.result
    catalog = result.catalog
    assert {"x", "y", "x_err", "ra", "dec", "ap_flux", "ap_flux_err", "ixx", "e1", "flags", "psf_star",
            "ref_id", "mag"} <= set(catalog.column_names)
    matched = catalog.filter(pc.greater_equal(catalog["ref_id"], 0))
    assert matched.num_rows == result.quality.astrometry_matches
    # Calibrated magnitudes of matched unblended stars agree with the reference.
    clean = matched.filter(pc.equal(matched["flags"], 0))
    residual = clean["mag"].to_numpy() - clean["ref_mag"].to_numpy()
    assert abs(np.median(residual)) < 0.01
    # Centroid errors are honest: pulls against the truth have unit scatter.
    stars = _truth_stars(dense)
    distance, index = cKDTree(np.stack([stars["x"], stars["y"]], axis=1)).query(
        np.stack([catalog["x"].to_numpy(), catalog["y"].to_numpy()], axis=1))
    near = (distance < 1.0) & (catalog["flags"].to_numpy() == 0)
    pull = (catalog["x"].to_numpy()[near] - stars["x"][index[near]]) / catalog["x_err"].to_numpy()[near]
    assert 0.7 < 1.4826 * np.median(np.abs(pull)) < 1.4
    quality = result.quality
    obs = dense.observation
    assert quality.psf_fwhm == pytest.approx(obs.fwhm_geom, rel=0.06)
    assert quality.psf_fwhm_min <= quality.psf_fwhm <= quality.psf_fwhm_max
    truth_zp = photometry.exposure_zero_point(obs.band, obs.exptime, obs.airmass, obs.transparency)
    expected_sky_mag = DARK_SKY_MAG[obs.band] - (photometry.ZERO_POINT_E_PER_S[obs.band]
                                                 + 2.5 * np.log10(obs.exptime) - truth_zp)
    assert quality.sky_mag == pytest.approx(expected_sky_mag, abs=0.02)
    # Thin cloud, airmass 1.3 and 1.0″ seeing under a dark sky: t_eff from the three factors.
    clear_zp = photometry.exposure_zero_point(obs.band, obs.exptime)
    expected = (obs.exptime * (0.7 / quality.psf_fwhm) ** 2 * 10 ** (0.8 * (truth_zp - clear_zp))
                * quality.effective_time_sky_scale)
    assert quality.effective_time == pytest.approx(expected, rel=0.02)
    assert quality.effective_time_sky_scale == pytest.approx(1.0, abs=0.02)
    image = result.image
    assert image.psf is not None and image.wcs is not None
    assert ((image.mask & np.uint32(MaskPlane.DETECTED)) != 0).any()


def test_fit_tan_sip_reproduces_an_off_axis_tan():
    geometry = get_detector("R41_S22")
    wcs = detector_wcs(geometry, 30.0, -40.0, 17.0)
    rows, cols = geometry.shape
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, cols - 1, 40), rng.uniform(0, rows - 1, 40)
    ra, dec = wcs.pixel_to_world_values(x, y)
    fitted = fit_tan_sip(x, y, ra, dec, tuple(wcs.wcs.crval), geometry.shape, degree=1)
    gx, gy = rng.uniform(0, cols - 1, 500), rng.uniform(0, rows - 1, 500)
    want_ra, want_dec = wcs.pixel_to_world_values(gx, gy)
    got_ra, got_dec = fitted.pixel_to_world_values(gx, gy)
    error = np.hypot((got_ra - want_ra) * np.cos(np.radians(want_dec)), got_dec - want_dec) * 3.6e6
    assert error.max() < 0.5  # mas
    back_x, back_y = fitted.world_to_pixel_values(want_ra, want_dec)
    assert np.hypot(back_x - gx, back_y - gy).max() < 0.005


def test_gnomonic_round_trip():
    ra, dec = np.array([10.0, 10.5, 9.7]), np.array([-30.0, -29.2, -30.9])
    xi, eta = gnomonic(ra, dec, 10.1, -30.1)
    back_ra, back_dec = inverse_gnomonic(xi, eta, 10.1, -30.1)
    assert np.allclose(back_ra, ra, atol=1e-10) and np.allclose(back_dec, dec, atol=1e-10)


def test_reference_positions_apply_proper_motion():
    refcat = pa.table({"ra": [10.0], "dec": [60.0], "pmra": [1000.0], "pmdec": [-2000.0],
                       "ref_epoch": [2016.0]})
    ra, dec = reference_positions(refcat, 51544.5 + 365.25 * 26)  # J2026.0: ten years on
    assert (ra[0] - 10.0) * np.cos(np.radians(60.0)) * 3600 == pytest.approx(10.0, rel=1e-6)
    assert (dec[0] - 60.0) * 3600 == pytest.approx(-20.0, rel=1e-6)


def test_lanczos_shift_recentres_and_moments_measure_shape():
    profile = galsim.Gaussian(fwhm=0.9).shear(e1=0.1, e2=-0.05)
    centred = profile.drawImage(nx=25, ny=25, scale=0.2).array
    offset = profile.drawImage(nx=31, ny=31, scale=0.2, offset=(0.37, -0.21)).array
    shifted = lanczos_shift(offset[None], [0.37], [-0.21])[0]
    assert np.abs(shifted - centred).max() < 0.01 * centred.max()
    moments = adaptive_moments(offset[None, 3:-3, 3:-3])
    assert moments.dx[0] == pytest.approx(0.37, abs=0.005)
    assert moments.dy[0] == pytest.approx(-0.21, abs=0.005)
    # The pixel response dilutes the shape a little.
    assert moments.e1[0] == pytest.approx(0.1, abs=0.006) and moments.e2[0] == pytest.approx(-0.05, abs=0.004)


def test_background_ignores_masked_pixels():
    rng = np.random.default_rng(4)
    image = (500.0 + rng.normal(0.0, 20.0, (512, 512))).astype(np.float32)
    mask = empty_mask(image.shape)
    image[100:140, 100:400] = 60_000.0
    mask[100:140, 100:400] = MaskPlane.SAT
    background = estimate_background(image, mask, BackgroundConfig(mesh_size=64))
    assert np.abs(background.model - 500.0).max() < 6.0  # 0.3 sigma: mesh noise, not the 60k e- block
    assert background.noise == pytest.approx(20.0, rel=0.05)
