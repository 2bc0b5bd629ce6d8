"""Sky tiles, tile coadds and templates cut from them, against injected truth.

The scene: stars of known flux on a grid, seen by three small calibrated
visits with their own WCS, rotation, seeing, sky and zero point; the visits
leave the top of the science CCD uncovered, and the worst-seeing one covers
only its left part.  The science CCD is centred on a corner where four tiles
of a small-tiled skymap meet, so its template is stitched from four tile
coadds, and grid rows and columns of stars sit on the tile boundaries.
"""

from dataclasses import dataclass, replace

import numpy as np
import pytest
from astropy.wcs import WCS

from dmstream.payloads import coadd, subtract
from dmstream.payloads.image import CcdImage
from dmstream.payloads.masks import MaskPlane, empty_mask
from dmstream.payloads.render import Psf, draw_point_sources
from dmstream.payloads.tiles import DEFAULT_SKYMAP, SkyMap, SkyMapError, tiles_overlapping
from dmstream.streams.scenes import READ_NOISE, RenderPsfModel, observe, tan_wcs

#: Tiles of 200 pixels (40″) with a 32-pixel margin: small images, the same geometry as the default skymap.
SKYMAP = SkyMap(tile_size=200, margin=32)
SCIENCE_SHAPE = (360, 360)
VISIT_SHAPE = (400, 400)
COADD_ZERO_POINT = 31.4  # 1 count = 1 nJy
STAR_FLUX = 1.0e4  # nJy, about SNR 50 on the template
#: Per visit: seeing (arcsec), rotation (deg), centre on the science grid (pixels), sky (e-), zero point.
VISITS = ((0.70, 2.0, (170.0, 110.0), 800.0, 31.0),
          (1.10, 25.0, (-40.0, 60.0), 1200.0, 31.2),
          (0.85, -4.0, (200.0, 100.0), 1000.0, 30.8))


@dataclass
class Scene:
    science_wcs: WCS
    corner: tuple[float, float]  # RA, Dec of the tile corner at the centre of the science grid, deg
    visits: list[CcdImage]
    noiseless_visits: list[CcdImage]  # the same without noise (and the same variance planes)
    star_x: np.ndarray  # science pixels
    star_y: np.ndarray
    truth: np.ndarray  # noiseless template on the science grid, nJy
    inside: np.ndarray  # per science pixel, distance inside the farthest-reaching visit's edge, pixels
    visit_edge: np.ndarray  # per star, distance to the nearest visit edge, pixels


def _tile_corner() -> tuple[float, float]:
    """RA, Dec where two rings of SKYMAP and two tiles of each meet, near (150°, 2°)."""
    height = SKYMAP.ring_height
    ring = int(np.floor((2.0 + 90.0) / height))
    count = int(SKYMAP.tiles_per_ring[ring])
    # Near the equator neighbouring rings have as many tiles, so their RA boundaries line up.
    assert SKYMAP.tiles_per_ring[ring + 1] == count
    return (int(150.0 * count / 360.0) + 0.5) * 360.0 / count, -90.0 + (ring + 0.5) * height


def _inside_distance(wcs: WCS, shape: tuple[int, int], ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Distance of sky positions inside the edge of a grid (negative outside), pixels."""
    x, y = wcs.world_to_pixel_values(ra, dec)
    rows, cols = shape
    return np.minimum(np.minimum(x + 0.5, cols - 0.5 - x), np.minimum(y + 0.5, rows - 0.5 - y))


@pytest.fixture(scope="module")
def scene() -> Scene:
    corner = _tile_corner()
    science_wcs = tan_wcs(SCIENCE_SHAPE, *corner)
    grid = 180.0 + 36.0 * np.arange(-4, 5)  # rows and columns 180 lie 0.5 px from the tile boundaries
    star_x, star_y = (v.ravel() for v in np.meshgrid(grid, grid))
    star_ra, star_dec = science_wcs.pixel_to_world_values(star_x, star_y)
    rows, cols = np.mgrid[0:SCIENCE_SHAPE[0], 0:SCIENCE_SHAPE[1]]
    pixel_ra, pixel_dec = science_wcs.pixel_to_world_values(cols, rows)
    rng = np.random.default_rng(5)
    visits, noiseless, weighted, weights, insides, star_edges = [], [], [], [], [], []
    for seeing, rotation, (cx, cy), sky, zero_point in VISITS:
        wcs = tan_wcs(VISIT_SHAPE, *(float(v) for v in science_wcs.pixel_to_world_values(cx, cy)), rotation)
        psf = Psf(fwhm=seeing)
        electrons_per_njy = 10 ** (0.4 * (zero_point - COADD_ZERO_POINT))
        signal = np.zeros(VISIT_SHAPE, np.float32)
        draw_point_sources(signal, *wcs.world_to_pixel_values(star_ra, star_dec),
                           STAR_FLUX * electrons_per_njy, psf)
        image, variance = observe(signal, rng, sky)
        visits.append(CcdImage(image, variance, empty_mask(VISIT_SHAPE), wcs,
                               RenderPsfModel(psf, VISIT_SHAPE), zero_point, "r", 30.0))
        noiseless.append(replace(visits[-1], image=signal))
        # The truth of the coadd: each visit's view of the stars on the science grid, where it has
        # data, weighted by its inverse sky variance in nJy².
        inside = _inside_distance(wcs, VISIT_SHAPE, pixel_ra, pixel_dec)
        weight = np.where(inside > 0, electrons_per_njy**2 / (sky + READ_NOISE**2), 0.0)
        seen = np.zeros(SCIENCE_SHAPE, np.float32)
        draw_point_sources(seen, star_x, star_y, STAR_FLUX, psf)
        weighted.append(weight * seen)
        weights.append(weight)
        insides.append(inside)
        star_edges.append(np.abs(_inside_distance(wcs, VISIT_SHAPE, star_ra, star_dec)))
    with np.errstate(invalid="ignore"):
        truth = sum(weighted) / sum(weights)
    return Scene(science_wcs, corner, visits, noiseless, star_x, star_y, truth, np.max(insides, axis=0),
                 np.min(star_edges, axis=0))


def _tile_coadds(scene: Scene, visits: list[CcdImage]) -> list[coadd.CoaddResult]:
    # The tiles the science CCD needs that some visit reaches, as a pipeline would plan them.
    reached = {tile for visit in visits for tile in SKYMAP.tiles_overlapping(visit.wcs, visit.shape)}
    needed = SKYMAP.tiles_overlapping(scene.science_wcs, SCIENCE_SHAPE)
    return [coadd.build_tile(visits, tile) for tile in needed if tile in reached]


@pytest.fixture(scope="module")
def tile_coadds(scene: Scene) -> list[coadd.CoaddResult]:
    return _tile_coadds(scene, scene.visits)


@pytest.fixture(scope="module")
def template(scene: Scene, tile_coadds: list[coadd.CoaddResult]) -> coadd.TemplateResult:
    return coadd.template_for(tile_coadds, scene.science_wcs, SCIENCE_SHAPE)


def _psf_fluxes(image: CcdImage, x: np.ndarray, y: np.ndarray, size: int = 51
                ) -> tuple[np.ndarray, np.ndarray]:
    """Linear PSF flux and its error at integer pixels, with the image's own PSF (NaN where masked)."""
    half = size // 2
    flux, error = np.full(x.size, np.nan), np.full(x.size, np.nan)
    for k, (ix, iy) in enumerate(zip(x.astype(int), y.astype(int), strict=True)):
        box = (slice(iy - half, iy + half + 1), slice(ix - half, ix + half + 1))
        rows, cols = image.shape
        if not (half <= iy < rows - half and half <= ix < cols - half) or (
                image.mask[box] & MaskPlane.NO_DATA).any():
            continue
        kernel = image.psf.kernel(float(ix), float(iy), size)
        norm = (kernel**2).sum()
        flux[k] = (image.image[box] * kernel).sum() / norm
        error[k] = np.sqrt((image.variance[box] * kernel**2).sum()) / norm
    return flux, error


def _binned(values: np.ndarray, size: int) -> np.ndarray:
    """Sums over size x size bins (the ragged edge dropped)."""
    rows, cols = (n // size * size for n in values.shape)
    return values[:rows, :cols].reshape(rows // size, size, cols // size, size).sum(axis=(1, 3))


def test_every_sky_position_lies_in_the_core_of_one_tile() -> None:
    rng = np.random.default_rng(1)
    # Over the sphere, and around the poles, where the caps and the first rings' curved cells are.
    ra = np.r_[rng.uniform(0, 360, 3200), 0.0, 180.0, 359.9999, 12.0]
    dec = np.r_[np.degrees(np.arcsin(rng.uniform(-1, 1, 3000))), rng.uniform(89.3, 90, 100),
                rng.uniform(-90, -89.3, 100), 90.0, -90.0, 0.0, 89.95]
    ids = DEFAULT_SKYMAP.tile_ids_at(ra, dec)
    margin = DEFAULT_SKYMAP.margin
    for tile_id in np.unique(ids):
        tile = DEFAULT_SKYMAP.tile(tile_id)
        assert tile.id == tile_id and DEFAULT_SKYMAP.tile(tile_id) == tile
        rows, cols = tile.shape
        x, y = tile.wcs.world_to_pixel_values(ra[ids == tile_id], dec[ids == tile_id])
        # A core position is a whole margin inside the grid, so neighbours' cores are on it too.
        assert x.min() >= margin - 1 and cols - 1 - x.max() >= margin - 1
        assert y.min() >= margin - 1 and rows - 1 - y.max() >= margin - 1
    # The cores tile the sphere: as many tiles as 800″ squares in 41 253 deg², to within a per cent.
    assert DEFAULT_SKYMAP.tile_count == pytest.approx(41252.96 / (800 / 3600) ** 2, rel=0.01)
    tile = DEFAULT_SKYMAP.tile(int(ids[0]))
    assert tile.wcs.proj_plane_pixel_scales()[0].to_value("arcsec") == pytest.approx(0.2)
    assert min(tile.shape) > 4100 and max(tile.shape) < 4400
    assert tile.name.startswith("r") and tile.data_id == {"skymap": "rings4000-100", "tile": tile.id}


def test_a_full_size_ccd_overlaps_few_tiles_and_each_of_its_pixels_is_in_one_of_them() -> None:
    shape = (4000, 4072)
    rows, cols = np.mgrid[0:shape[0]:25, 0:shape[1]:25]
    for rotation in (0.0, 45.0):
        wcs = tan_wcs(shape, 210.3, -33.7, rotation)
        tiles = tiles_overlapping(wcs, shape)
        assert 2 <= len(tiles) <= 9
        ra, dec = wcs.pixel_to_world_values(cols, rows)
        assert set(np.unique(DEFAULT_SKYMAP.tile_ids_at(ra, dec))) <= {tile.id for tile in tiles}
        for tile in tiles:
            assert tile.contains(ra, dec).any()


def test_tiles_overlapping_are_exactly_the_tiles_whose_grid_holds_a_pixel_of_the_ccd(scene: Scene) -> None:
    rows, cols = np.mgrid[0:SCIENCE_SHAPE[0], 0:SCIENCE_SHAPE[1]]
    ra, dec = scene.science_wcs.pixel_to_world_values(cols, rows)
    centre = SKYMAP.tile(SKYMAP.tile_ids_at(*scene.corner).item())
    # Brute force over the neighbourhood: two rings and four tiles on either side of the corner's.
    nearby = [int(SKYMAP.first_ids[ring]) + index for ring in range(centre.ring - 2, centre.ring + 3)
              for index in range(centre.index - 4, centre.index + 5)]
    expected = {tile_id for tile_id in nearby if SKYMAP.tile(tile_id).contains(ra, dec).any()}
    listed = {tile.id for tile in SKYMAP.tiles_overlapping(scene.science_wcs, SCIENCE_SHAPE)}
    assert listed == expected
    # The four tiles meeting at the corner hold the CCD's pixels; the others reach it with their margins.
    assert len(np.unique(SKYMAP.tile_ids_at(ra, dec))) == 4 < len(listed)


def test_bad_tiles_and_skymaps_are_refused() -> None:
    with pytest.raises(SkyMapError, match="not in rings4000-100"):
        DEFAULT_SKYMAP.tile(DEFAULT_SKYMAP.tile_count)
    with pytest.raises(SkyMapError, match="margin"):
        SkyMap(margin=8)
    with pytest.raises(SkyMapError, match="Dec"):
        DEFAULT_SKYMAP.tile_ids_at(10.0, 91.0)


def test_tile_coadds_weigh_each_visit_alike_and_count_depth(scene: Scene,
                                                            tile_coadds: list[coadd.CoaddResult]) -> None:
    # Inverse sky variance in nJy², the same for a visit in every tile it reaches.
    expected = np.array([10 ** (0.8 * (zp - COADD_ZERO_POINT)) / (sky + READ_NOISE**2)
                         for *_, sky, zp in VISITS])
    for result in tile_coadds:
        reached = result.weights > 0
        assert result.weights[reached] == pytest.approx(expected[reached], rel=0.02)
        assert result.coadd.metadata["TILE"] == result.tile.name
        tile_rows, tile_cols = np.mgrid[0:result.tile.shape[0]:7, 0:result.tile.shape[1]:7]
        ra, dec = result.tile.wcs.pixel_to_world_values(tile_cols, tile_rows)
        inside = np.array([_inside_distance(visit.wcs, VISIT_SHAPE, ra, dec) for visit in scene.visits])
        depth = result.depth[::7, ::7]
        clear = (np.abs(inside) > 4).all(axis=0)
        assert (depth[clear] == (inside > 0).sum(axis=0)[clear]).all()
        no_data = (result.coadd.mask[::7, ::7] & MaskPlane.NO_DATA) != 0
        assert (no_data[clear] == (depth[clear] == 0)).all()


def test_template_recovers_star_fluxes_on_both_sides_of_and_across_tile_boundaries(
        scene: Scene, template: coadd.TemplateResult) -> None:
    assert len(template.tile_ids) == 4
    flux, error = _psf_fluxes(template.template, scene.star_x, scene.star_y)
    # A star astride an input visit's edge is made of two PSFs, which no single model describes.
    usable = np.isfinite(flux) & (scene.visit_edge > 15)
    pulls = (flux - STAR_FLUX)[usable] / error[usable]
    x, y = scene.star_x[usable], scene.star_y[usable]
    across = (np.abs(x - 179.5) < 1) | (np.abs(y - 179.5) < 1)
    left, below = x < 179.5, y < 179.5
    assert across.sum() >= 8
    for side in (across, ~across & left & below, ~across & ~left & below, ~across & left & ~below,
                 ~across & ~left & ~below):
        assert side.sum() >= 3
        assert np.abs(pulls[side]).max() < 4
    assert abs(np.mean(pulls)) < 3 / np.sqrt(pulls.size)
    assert np.std(pulls) == pytest.approx(1.0, abs=0.25)


def test_noiseless_template_matches_the_truth_across_tile_boundaries(scene: Scene) -> None:
    template = coadd.template_for(_tile_coadds(scene, scene.noiseless_visits), scene.science_wcs,
                                  SCIENCE_SHAPE).template
    residual = template.image - scene.truth
    checked = 0
    for x, y, edge in zip(scene.star_x.astype(int), scene.star_y.astype(int), scene.visit_edge, strict=True):
        box = (slice(y - 8, y + 9), slice(x - 8, x + 9))
        if edge < 10 or template.mask[box].any():
            continue
        checked += 1
        # Flux to 0.1 %; pixels to 2 % of the peak (two Lanczos-3 resamplings soften the peak by ~1 %).
        assert abs(residual[box].sum()) < 1e-3 * scene.truth[box].sum()
        assert np.abs(residual[box]).max() < 0.02 * scene.truth[box].max()
    assert checked >= 50


def test_template_has_no_seam_and_an_honest_variance(scene: Scene, template: coadd.TemplateResult) -> None:
    image = template.template
    good = image.mask == 0
    residual = np.where(good, image.image - scene.truth, 0.0)
    # Interpolation correlates neighbouring pixels; over 4 x 4 bins the variance plane is what the
    # noise of a sum of pixels needs.
    bin_good = _binned(good.astype(int), 4) == 16
    variance = _binned(np.where(good, image.variance, 0.0), 4)
    pulls = _binned(residual, 4)[bin_good] / np.sqrt(variance[bin_good])
    assert np.std(pulls) == pytest.approx(1.0, abs=0.08)
    # Bins astride the boundaries (within 4 pixels of row or column 179.5) look like the rest.
    centres = np.arange(bin_good.shape[0]) * 4 + 1.5
    astride = (np.abs(centres[:, None] - 179.5) < 4) | (np.abs(centres[None, :] - 179.5) < 4)
    seam = pulls[astride[bin_good]]
    assert seam.size > 100
    assert abs(np.mean(seam)) < 3 / np.sqrt(seam.size)
    assert np.std(seam) == pytest.approx(np.std(pulls[~astride[bin_good]]), rel=0.15)


def test_template_is_no_data_where_no_visit_or_tile_covers(scene: Scene, template: coadd.TemplateResult,
                                                          tile_coadds: list[coadd.CoaddResult]) -> None:
    image = template.template
    no_data = (image.mask & MaskPlane.NO_DATA) != 0
    assert no_data[scene.inside < -4].all() and not no_data[scene.inside > 4].any()
    assert (scene.inside < -4).mean() > 0.05
    assert np.isnan(image.variance[no_data]).all() and (image.image[no_data] == 0).all()
    assert template.coverage == pytest.approx(1 - no_data.mean())
    # Without the tile of the lower-left quarter, that quarter has no template and the rest is unchanged.
    lower_left = SKYMAP.tile_ids_at(*scene.science_wcs.pixel_to_world_values(90.0, 90.0)).item()
    partial = coadd.template_for([c for c in tile_coadds if c.tile.id != lower_left], scene.science_wcs,
                                 SCIENCE_SHAPE).template
    assert (partial.mask[:176, :176] & MaskPlane.NO_DATA).all()
    assert np.array_equal(partial.image[184:, 184:], image.image[184:, 184:])
    assert partial.psf.kernel(90.0, 90.0, 21).sum() == pytest.approx(1.0)


def test_subtracting_a_stitched_template_leaves_noise(scene: Scene, template: coadd.TemplateResult) -> None:
    rng = np.random.default_rng(9)
    psf = Psf(fwhm=1.0)
    zero_point = 31.0
    signal = np.zeros(SCIENCE_SHAPE, np.float32)
    draw_point_sources(signal, scene.star_x, scene.star_y, STAR_FLUX * 10 ** (0.4 * (zero_point - 31.4)), psf)
    image, variance = observe(signal, rng, 1000.0)
    science = CcdImage(image, variance, empty_mask(SCIENCE_SHAPE), scene.science_wcs,
                       RenderPsfModel(psf, SCIENCE_SHAPE), zero_point, "r", 30.0)
    result = subtract.run(science, template.template)
    clean = result.difference.mask == 0
    normalised = result.difference.image[clean] / np.sqrt(result.difference.variance[clean])
    assert np.std(normalised) == pytest.approx(1.0, abs=0.06)
    assert np.abs(result.snr[clean]).max() < 5.5


def test_templates_refuse_mixed_or_missing_inputs(scene: Scene, tile_coadds: list[coadd.CoaddResult]) -> None:
    with pytest.raises(coadd.CoaddError, match="no tile coadds"):
        coadd.template_for([], scene.science_wcs, SCIENCE_SHAPE)
    other_band = replace(tile_coadds[0], coadd=replace(tile_coadds[0].coadd, band="g"))
    with pytest.raises(coadd.CoaddError, match="band"):
        coadd.template_for([other_band, *tile_coadds[1:]], scene.science_wcs, SCIENCE_SHAPE)
    far_away = tan_wcs(SCIENCE_SHAPE, 30.0, -40.0)
    with pytest.raises(coadd.CoaddError, match="none of the tiles"):
        coadd.template_for(tile_coadds, far_away, SCIENCE_SHAPE)
    with pytest.raises(coadd.CoaddError, match="no visit reaches"):
        coadd.build_tile(scene.visits, SKYMAP.tiles_overlapping(far_away, SCIENCE_SHAPE)[0])
