"""DiaSource detection and measurement against injected truth, and alert cutouts."""

import io

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.wcs import WCS

from dmstream.payloads import cutouts, diasource, subtract, warp
from dmstream.streams.scenes import Scene, make_scene


def _pipeline(scene: Scene) -> tuple[subtract.SubtractResult, dict[str, np.ndarray]]:
    template = warp.warp_image(scene.template, scene.science.wcs, scene.science.shape).image
    result = subtract.run(scene.science, template)
    table = diasource.run(result, scene.science, visit=7, detector=94).table
    return result, {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}


def _robust_std(values: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


@pytest.mark.slow
def test_injection_recovery_full_ccd() -> None:
    scene = make_scene((4000, 4072), transients=1000, stars=3000, seed=11)
    _, table = _pipeline(scene)
    to_njy = diasource.njy_per_electron(scene.science.zero_point)
    distance = np.hypot(table["x"][:, None] - scene.transient_x, table["y"][:, None] - scene.transient_y)
    nearest = distance.argmin(axis=0)
    found = distance.min(axis=0) < 2.0
    flux_err = table["psfFluxErr"][nearest] / to_njy
    true_snr = scene.transient_flux / flux_err
    bright = true_snr >= 10
    completeness = found[bright].mean()

    others = np.r_[scene.star_x, scene.negative_xy[0], scene.dipole_xy[0]], np.r_[
        scene.star_y, scene.negative_xy[1], scene.dipole_xy[1]]
    far_from_transients = distance.min(axis=1) > 3.0
    to_others = np.hypot(table["x"][:, None] - others[0], table["y"][:, None] - others[1])
    far_from_stars = to_others.min(axis=1) > 5
    spurious = int((far_from_transients & far_from_stars).sum())

    matched = found & bright
    dx = (table["x"][nearest] - scene.transient_x) / table["xErr"][nearest]
    dy = (table["y"][nearest] - scene.transient_y) / table["yErr"][nearest]
    # The 2-D radius holding the 98.9 % that |dx| < 3 and |dy| < 3 would hold together.
    within = (np.hypot(dx, dy)[matched] < np.sqrt(-2 * np.log(1 - 0.989))).mean()
    within_3 = ((np.abs(dx) < 3) & (np.abs(dy) < 3))[matched].mean()
    pulls = (table["psfFlux"][nearest] / to_njy - scene.transient_flux) / flux_err
    print(f"completeness(SNR>=10) {completeness:.3f} of {bright.sum()}, spurious {spurious}, "
          f"positions within 3 sigma {within_3:.3f} (2-D {within:.3f}), pull median "
          f"{np.median(pulls[matched]):.3f} robust std {_robust_std(pulls[matched]):.3f}")
    assert completeness >= 0.95
    assert spurious <= 5
    assert within_3 >= 0.95
    assert abs(np.median(pulls[matched])) < 0.1
    assert abs(_robust_std(pulls[matched]) - 1) < 0.2


def test_negative_and_dipole() -> None:
    scene = make_scene((768, 768), transients=20, stars=60, seed=5)
    _, table = _pipeline(scene)
    at_negative = np.hypot(table["x"] - scene.negative_xy[0], table["y"] - scene.negative_xy[1]) < 2
    assert at_negative.sum() == 1
    assert table["isNegative"][at_negative][0] and table["psfFlux"][at_negative][0] < 0
    assert not table["isDipole"][at_negative][0]
    at_dipole = np.hypot(table["x"] - scene.dipole_xy[0] - 0.3, table["y"] - scene.dipole_xy[1]) < 2
    assert at_dipole.sum() == 1
    assert table["isDipole"][at_dipole][0]
    # A 0.6 px move gives lobes about a FWHM (1 arcsec) apart, the positive one to +x (West: 270 deg).
    assert 0.3 < table["dipoleLength"][at_dipole][0] < 2.0
    assert table["dipoleAngle"][at_dipole][0] == pytest.approx(270, abs=20)
    assert table["reliability"][at_dipole][0] < table["reliability"][at_negative][0]
    assert set(table) == set(diasource.SCHEMA.names)
    assert (np.diff(table["diaSourceId"]) == 1).all()


def test_cutouts_open_with_astropy_and_carry_the_wcs() -> None:
    scene = make_scene((512, 512), transients=10, stars=20, seed=2)
    result, table = _pipeline(scene)
    x, y = table["x"][:3], table["y"][:3]
    made = cutouts.make_cutouts(scene.science, result.template, result.difference, x, y)
    side = cutouts.stamp_size(scene.science.psf.fwhm(0, 0))
    assert 30 <= side <= 102
    for stamps, sx, sy in zip(made, x, y, strict=True):
        for blob in (stamps.cutoutScience, stamps.cutoutTemplate, stamps.cutoutDifference):
            with fits.open(io.BytesIO(blob)) as hdus:
                hdus.verify("exception")
                assert [hdu.data.shape for hdu in hdus] == [(side, side)] * 3
                stamp = WCS(hdus[0].header)
                x0, y0 = round(float(sx)) - side // 2, round(float(sy)) - side // 2
                sky = stamp.pixel_to_world_values(5.0, 7.0)
                truth = scene.science.wcs.pixel_to_world_values(x0 + 5.0, y0 + 7.0)
                assert np.allclose(sky, truth, atol=1e-9)
            data = CCDData.read(io.BytesIO(blob), hdu_uncertainty="UNCERT", hdu_mask="MASK")
            assert str(data.unit) == "nJy"
    # A source at the corner: the off-image part is NO_DATA.
    corner = cutouts.make_cutouts(scene.science, result.template, result.difference, np.array([1.0]),
                                  np.array([1.0]))[0]
    with fits.open(io.BytesIO(corner.cutoutDifference)) as hdus:
        assert (hdus["MASK"].data[0, 0] & 256) and np.isnan(hdus["UNCERT"].data[0, 0])


def test_a_source_without_usable_pixels_is_flagged_not_lost() -> None:
    """A detection whose whole stamp is masked (e.g. a saturated core) keeps a finite position."""
    from dmstream.payloads.masks import MaskPlane

    scene = make_scene(transients=20, stars=50, seed=5)
    x, y = int(scene.transient_x[0]), int(scene.transient_y[0])
    scene.science.mask[y - 15:y + 16, x - 15:x + 16] |= np.uint32(MaskPlane.SAT)
    _, table = _pipeline(scene)
    assert np.isfinite(table["x"]).all() and np.isfinite(table["y"]).all()
    masked = np.hypot(table["x"] - x, table["y"] - y) < 3
    assert masked.any() and table["centroid_flag"][masked].all()
