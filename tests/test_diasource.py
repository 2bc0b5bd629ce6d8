"""DiaSource detection and measurement against injected truth, and alert cutouts."""

import io

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.wcs import WCS

from dmstream.payloads import cutouts, diasource, subtract, warp
from dmstream.streams.scenes import Scene, make_scene

Measured = tuple[subtract.SubtractResult, diasource.DiaSourceResult, dict[str, np.ndarray]]


def _measure(scene: Scene) -> Measured:
    template = warp.warp_image(scene.template, scene.science.wcs, scene.science.shape).image
    result = subtract.run(scene.science, template)
    measured = diasource.run(result, scene.science, visit=7, detector=94)
    table = measured.table
    return result, measured, {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}


def _pipeline(scene: Scene) -> tuple[subtract.SubtractResult, dict[str, np.ndarray]]:
    result, _, table = _measure(scene)
    return result, table


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
    _, measured, table = _measure(scene)
    at_negative = np.hypot(table["x"] - scene.negative_xy[0], table["y"] - scene.negative_xy[1]) < 2
    assert at_negative.sum() == 1
    assert table["isNegative"][at_negative][0] and table["psfFlux"][at_negative][0] < 0
    assert not table["isDipole"][at_negative][0]
    at_dipole = np.hypot(table["x"] - scene.dipole_xy[0] - 0.3, table["y"] - scene.dipole_xy[1]) < 2
    assert at_dipole.sum() == 1
    assert table["isDipole"][at_dipole][0]
    # The star moved by 0.6 px (0.12 arcsec) towards +x (West: 270 deg); its lobes' peaks lie a FWHM apart.
    length_err = measured.dipole_length_err[at_dipole][0]
    assert table["dipoleLength"][at_dipole][0] == pytest.approx(0.12, abs=3 * length_err)
    angle_err = measured.dipole_angle_err[at_dipole][0]
    assert table["dipoleAngle"][at_dipole][0] == pytest.approx(270, abs=3 * angle_err)
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


def _pulls(table: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """For each true position: matched within 2 px, and the x and y pulls of the nearest DiaSource."""
    distance = np.hypot(table["x"][:, None] - x, table["y"][:, None] - y)
    row = distance.argmin(axis=0)
    return (distance.min(axis=0) < 2, (table["x"][row] - x) / table["xErr"][row],
            (table["y"][row] - y) / table["yErr"][row], row)


def test_position_errors_hold_from_snr_5_to_500_with_neighbours_and_template_noise() -> None:
    # Dense transients (a quarter with another within 25 px, none closer than 2 FWHM) and a template
    # only as deep as the science image: neighbours' light and template noise are both in the stamps.
    scene = make_scene((2048, 2048), transients=700, stars=300, seed=21, snr_range=(5.0, 500.0),
                       template_depth=1.0, min_separation=10.0)
    _, table = _pipeline(scene)
    found, pull_x, pull_y, row = _pulls(table, scene.transient_x, scene.transient_y)
    to_njy = diasource.njy_per_electron(scene.science.zero_point)
    snr = scene.transient_flux / (table["psfFluxErr"][row] / to_njy)
    others = np.hypot(scene.transient_x[:, None] - scene.transient_x,
                      scene.transient_y[:, None] - scene.transient_y)
    np.fill_diagonal(others, np.inf)
    groups = [(f"SNR {low}-{high}", found & (snr >= low) & (snr < high)) for low, high in
              ((5, 20), (20, 100), (100, 500))]
    # Before neighbours were fitted together, their light pulled bright centroids by several sigma.
    groups.append(("with a neighbour within 25 px", found & (others.min(axis=1) < 25)))
    for name, group in groups:
        assert group.sum() >= 140, name
        within = ((np.abs(pull_x) < 3) & (np.abs(pull_y) < 3))[group].mean()
        assert within >= 0.95, f"{name}: {within:.3f} within 3 sigma"
        for pulls in (pull_x[group], pull_y[group]):
            assert abs(pulls.std() - 1) < 0.2, f"{name}: pull width {pulls.std():.2f}"


def test_trails_are_fitted_with_their_length_angle_and_flux() -> None:
    scene = make_scene((1536, 1536), transients=40, stars=60, seed=7, trails=12, min_separation=20.0)
    result, _, table = _measure(scene)
    wcs = scene.science.wcs
    to_njy = diasource.njy_per_electron(scene.science.zero_point)
    fwhm_arcsec = 1.0
    true_angle = diasource.position_angle(wcs, scene.trail_x, scene.trail_y, np.cos(scene.trail_angle),
                                          np.sin(scene.trail_angle)) % 180
    fit_x, fit_y = wcs.world_to_pixel_values(table["trailRa"], table["trailDec"])
    for k in range(scene.trail_x.size):
        length = scene.trail_length[k] * 0.2
        # The whole streak is one DiaSource, whose trail centre is the streak's.
        direction = np.cos(scene.trail_angle[k]), np.sin(scene.trail_angle[k])
        rx, ry = table["x"] - scene.trail_x[k], table["y"] - scene.trail_y[k]
        on_trail = (np.abs(rx * direction[0] + ry * direction[1]) < scene.trail_length[k] / 2 + 5) & (
            np.abs(-rx * direction[1] + ry * direction[0]) < 5)
        assert on_trail.sum() == 1, f"trail {k} ({length:.1f} arcsec) gave {on_trail.sum()} DiaSources"
        row = int(np.flatnonzero(on_trail)[0])
        assert not table["trail_flag"][row]
        assert np.hypot(fit_x[row] - scene.trail_x[k], fit_y[row] - scene.trail_y[k]) < 1.0
        if length >= 3 * fwhm_arcsec:
            assert table["trailLength"][row] == pytest.approx(length, rel=0.1)
            angle_error = (table["trailAngle"][row] - true_angle[k] + 90) % 180 - 90
            assert abs(angle_error) < 3.0
        flux_pull = (table["trailFlux"][row] / to_njy - scene.trail_flux[k]) / (
            table["trailFluxErr"][row] / to_njy)
        assert abs(flux_pull) < 3, f"trail {k}: flux pull {flux_pull:.2f}"
    # Point sources: the trail model finds a length consistent with 0.
    point = diasource.fit_trails(result.difference, scene.transient_x, scene.transient_y,
                                 np.zeros(scene.transient_x.size), np.zeros(scene.transient_x.size))
    zero_within = point.length_squared < 3 * point.length_squared_err
    assert zero_within.mean() >= 0.9
    assert np.median(point.length) < 0.5 * fwhm_arcsec / 0.2
    # And the table leaves them without trail measurements.
    found, _, _, row = _pulls(table, scene.transient_x, scene.transient_y)
    assert found.sum() >= 30
    assert np.isnan(table["trailLength"][row[found]]).mean() >= 0.9


def test_dipoles_of_moving_stars_give_separation_and_angle_and_points_are_not_dipoles() -> None:
    scene = make_scene((1536, 1536), transients=60, stars=60, seed=9, movers=40, min_separation=25.0,
                       mover_separation_range=(0.2, 2.0))
    _, measured, table = _measure(scene)
    wcs = scene.science.wcs
    true_angle = diasource.position_angle(wcs, scene.mover_x, scene.mover_y, np.cos(scene.mover_angle),
                                          np.sin(scene.mover_angle))
    found, _, _, row = _pulls(table, scene.mover_x, scene.mover_y)
    bright = found & (table["snr"][row] >= 20)
    assert bright.sum() >= 25
    rows = row[bright]
    assert table["isDipole"][rows].all()
    true_length = scene.mover_separation[bright] * 0.2
    length_pull = (table["dipoleLength"][rows] - true_length) / measured.dipole_length_err[rows]
    angle_error = (table["dipoleAngle"][rows] - true_angle[bright] + 180) % 360 - 180
    angle_pull = angle_error / measured.dipole_angle_err[rows]
    assert (np.abs(length_pull) < 3).mean() >= 0.95
    assert (np.abs(angle_pull) < 3).mean() >= 0.95
    # The fit is not fooled by the lobes' peaks, which lie about a FWHM (1″) apart even for 0.2 px moves.
    small = scene.mover_separation[bright] < 1.0
    assert small.sum() >= 5 and (table["dipoleLength"][rows][small] < 0.22).all()
    points, _, _, point_rows = _pulls(table, scene.transient_x, scene.transient_y)
    assert points.sum() >= 40 and not table["isDipole"][point_rows[points]].any()
