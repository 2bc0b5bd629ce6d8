"""The renderer and the photometric conversions, checked against injected truth."""

import galsim
import numpy as np
import pytest
import scipy.optimize

from dmstream.payloads import photometry, render
from dmstream.payloads.render import Psf, add_cosmic_rays, draw_galaxies, draw_point_sources, draw_trail

SIZE = 161


def _moments(image: np.ndarray, x: float, y: float, radius: float) -> tuple[float, float, float]:
    """Flux and centroid within ``radius`` pixels of (x, y)."""
    yy, xx = np.indices(image.shape)
    inside = np.hypot(xx - x, yy - y) <= radius
    flux = image[inside].sum(dtype=float)
    return flux, (image * xx)[inside].sum(dtype=float) / flux, (image * yy)[inside].sum(dtype=float) / flux


def _half_max_fwhm(image: np.ndarray) -> float:
    """FWHM of a round star from the area above half its peak, pixels."""
    area = np.count_nonzero(image >= image.max() / 2)
    return 2 * np.sqrt(area / np.pi)


@pytest.mark.parametrize("profile", ["kolmogorov", "moffat"])
@pytest.mark.parametrize("offset", [(0.0, 0.0), (0.3, 0.77), (0.49, -0.49), (0.9, 0.125), (-0.06, 0.51)])
def test_point_source_centroid_and_flux(profile, offset):
    x, y = SIZE // 2 + offset[0], SIZE // 2 + offset[1]
    image = np.zeros((SIZE, SIZE), dtype=np.float32)
    draw_point_sources(image, [x], [y], [1e6], Psf(fwhm=0.8, profile=profile))
    flux, cx, cy = _moments(image, x, y, 70)
    assert abs(cx - x) <= 0.01 and abs(cy - y) <= 0.01
    assert flux == pytest.approx(1e6, rel=0.005)


def test_point_source_matches_galsim():
    psf = Psf(fwhm=0.9, e1=0.05, e2=-0.03)
    x, y = 80.37, 79.81
    image = np.zeros((SIZE, SIZE), dtype=np.float32)
    draw_point_sources(image, [x], [y], [1e5], psf)
    exact = psf.galsim_profile(flux=1e5).drawImage(nx=SIZE, ny=SIZE, scale=psf.pixel_scale,
                                                   offset=(x - SIZE // 2, y - SIZE // 2)).array
    assert np.abs(image - exact).max() < 2e-3 * exact.max()


@pytest.mark.parametrize("fwhm", [0.6, 0.9, 1.2])
def test_drawn_fwhm_is_requested(fwhm):
    image = np.zeros((SIZE, SIZE), dtype=np.float32)
    draw_point_sources(image, [SIZE // 2 + 0.3], [SIZE // 2 - 0.2], [1e6], Psf(fwhm=fwhm))

    def misfit(trial: float) -> float:
        model = galsim.Kolmogorov(fwhm=trial, flux=1e6).drawImage(nx=SIZE, ny=SIZE, scale=0.2,
                                                                 offset=(0.3, -0.2)).array
        return float(((model - image) ** 2).sum())

    # The FWHM is measured by fitting a pixelated Kolmogorov profile to the drawn star.
    fit = scipy.optimize.minimize_scalar(misfit, bounds=(0.3, 2.0), method="bounded",
                                         options={"xatol": 1e-4})
    assert fit.x == pytest.approx(fwhm, rel=0.02)
    # The half-maximum contour agrees too, to the few % that pixelisation allows.
    assert _half_max_fwhm(image) * 0.2 == pytest.approx(fwhm, rel=0.15)
    moments = galsim.hsm.FindAdaptiveMom(galsim.Image(image, scale=0.2))
    assert abs(moments.observed_shape.e1) < 0.01 and abs(moments.observed_shape.e2) < 0.01


def test_psf_ellipticity_and_spatial_variation():
    shape = (1000, 1000)
    psf = Psf(fwhm=0.8, e1=0.06, fwhm_variation=0.3)
    sizes = []
    for x, y in ((500.0, 500.0), (50.0, 50.0)):
        image = np.zeros(shape, dtype=np.float32)
        draw_point_sources(image, [x], [y], [1e6], psf)
        cut = image[int(y) - 40:int(y) + 41, int(x) - 40:int(x) + 41]
        moments = galsim.hsm.FindAdaptiveMom(galsim.Image(np.ascontiguousarray(cut), scale=0.2))
        sizes.append(moments.moments_sigma)
        assert moments.observed_shape.e1 == pytest.approx(0.06, abs=0.01)
    # 50 pixels from the corner the FWHM is 24 % larger (0.3 r² with r² = 0.81).
    assert sizes[1] / sizes[0] == pytest.approx(1.24, rel=0.03)


def test_wings_by_fft_equal_wings_stamp_by_stamp(monkeypatch):
    rng = np.random.default_rng(4)
    x, y = rng.uniform(-30, 330, 60), rng.uniform(-30, 330, 60)
    flux = 10 ** rng.uniform(2, 6, 60)
    images = []
    for ratio in (0.0, 1e12):
        monkeypatch.setattr(render, "_DIRECT_HALO_COST_RATIO", ratio)
        image = np.zeros((300, 310), dtype=np.float32)
        draw_point_sources(image, x, y, flux, Psf(fwhm=0.7, fwhm_variation=0.1))
        images.append(image)
    assert np.abs(images[0] - images[1]).max() < 1e-5 * images[0].max()


def test_sources_off_the_edge():
    image = np.zeros((100, 100), dtype=np.float32)
    draw_point_sources(image, [-3.0, 50.0, 1e4, np.nan], [50.0, 102.0, 5.0, 1.0], [1e5, 1e5, 1e5, 1e5], Psf())
    assert 0 < image[:, :10].sum() < 0.5e5
    assert 0 < image[90:, :].sum() < 0.5e5
    draw_point_sources(image, [], [], [], Psf())


def test_galaxy_flux_and_centre():
    image = np.zeros((201, 201), dtype=np.float32)
    x, y = 100.3, 99.6
    draw_galaxies(image, [x], [y], [1e5], [0.8], [1.0], [0.3], [0.1], Psf(fwhm=0.7))
    flux, cx, cy = _moments(image, x, y, 95)
    assert flux == pytest.approx(1e5, rel=0.01)
    assert abs(cx - x) < 0.02 and abs(cy - y) < 0.02
    moments = galsim.hsm.FindAdaptiveMom(galsim.Image(image, scale=0.2))
    assert moments.observed_shape.e1 > 0.1


def test_trail_flux_centre_and_length():
    image = np.zeros((200, 300), dtype=np.float32)
    draw_trail(image, 60.0, 80.0, 240.0, 120.0, 2e5, Psf(fwhm=0.8))
    flux, cx, cy = _moments(image, 150.0, 100.0, 150)
    assert flux == pytest.approx(2e5, rel=0.01)
    assert abs(cx - 150.0) < 0.05 and abs(cy - 100.0) < 0.05
    along = image[np.round(80 + (np.arange(60, 241) - 60) * 40 / 180).astype(int), np.arange(60, 241)]
    assert along[20:-20].std() < 0.1 * along[20:-20].mean()


def test_cosmic_rays_truth():
    image = np.zeros((2000, 2000), dtype=np.float32)
    rays = add_cosmic_rays(image, 0.05, np.random.default_rng(7), duration=30.0)
    assert len(rays) > 5
    assert image.sum(dtype=float) == pytest.approx(rays.charge_e.sum(), rel=1e-4)
    assert np.median(rays.length) < 20 and rays.charge_e.min() > 1000
    again = np.zeros_like(image)
    add_cosmic_rays(again, 0.05, np.random.default_rng(7), duration=30.0)
    assert np.array_equal(image, again)


def test_magnitudes_electrons_round_trip():
    mags = np.linspace(14.0, 26.0, 13)
    for band in photometry.ZERO_POINT_E_PER_S:
        electrons = photometry.mag_to_electrons(mags, band, 30.0, 1.3, 0.8)
        assert np.allclose(photometry.electrons_to_mag(electrons, band, 30.0, 1.3, 0.8), mags)
        njy = photometry.mag_to_njy(mags)
        assert np.allclose(photometry.njy_to_electrons(njy, band, 30.0, 1.3, 0.8), electrons)
        assert np.allclose(photometry.electrons_to_njy(electrons, band, 30.0, 1.3, 0.8), njy)


def test_zero_points():
    assert photometry.mag_to_njy(0.0) == pytest.approx(3631e9)
    assert photometry.njy_to_mag(3631e9) == pytest.approx(0.0)
    assert photometry.mag_to_njy(31.4) == pytest.approx(1.0, rel=1e-3)
    # The zero point gives 1 e-/s at airmass 1; 5 mag fainter is 100 times fewer.
    assert photometry.mag_to_electrons(28.36, "r", 1.0) == pytest.approx(1.0)
    assert photometry.mag_to_electrons(23.36, "r", 30.0) == pytest.approx(3000.0)
    # Extinction k = 0.126 mag/airmass in r; clouds scale the flux directly.
    assert photometry.mag_to_electrons(20.0, "r", 30.0, 2.0) / photometry.mag_to_electrons(20.0, "r", 30.0) \
        == pytest.approx(10 ** (-0.4 * 0.126))
    assert photometry.mag_to_electrons(20.0, "r", 30.0, 1.0, 0.5) == \
        pytest.approx(0.5 * photometry.mag_to_electrons(20.0, "r", 30.0))
    # Dark r sky (21.2 mag/arcsec^2) on a 0.2" pixel in 30 s: ~1 000 e-.
    assert 800 < photometry.sky_electrons_per_pixel(21.2, "r", 30.0) < 1500
    with pytest.raises(ValueError):
        photometry.mag_to_electrons(20.0, "x", 30.0)
