"""DiaObject association and sky-pixel keys, against injected truth.

True objects with known positions and fluxes are observed over several
visits as DiaSources scattered by their stated errors; association, run the
way the stream runs it (state stored per sky pixel, gathered by the pixels
the sources' match circles touch), must recover the true grouping and the
true positions and fluxes within the errors it states.
"""

from collections import defaultdict

import fastavro
import hpgeom
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from dmstream.backbone.apdb import Apdb, arrow_schema
from dmstream.payloads import alerts, association, skypixels
from dmstream.payloads.association import ARCSEC, AssociationConfig, AssociationError
from dmstream.payloads.astrometry import gnomonic, inverse_gnomonic
from dmstream.payloads.conditions import angular_separation
from dmstream.payloads.ids import dia_source_ids
from dmstream.payloads.skypixels import SkyPixelConfig, SkyPixelError
from dmstream.streams.sky import offset_position

DAY_OBS = 20260315
DETECTOR = 42
RADIUS = AssociationConfig().match_radius * ARCSEC


def visit_id(sequence: int) -> int:
    return DAY_OBS * 100_000 + sequence


def observe(truth_ra, truth_dec, flux, sequence, band, mjd, rng, negative=None, err_range=(0.05, 0.2)):
    """DiaSources of true objects in one visit, scattered by their own stated (correlated) errors.

    ``flux`` in nJy; the flux error is 5 % of |flux| plus 20 nJy.
    """
    n = truth_ra.size
    ra_err = rng.uniform(*err_range, n) * ARCSEC
    dec_err = rng.uniform(*err_range, n) * ARCSEC
    covariance = rng.uniform(-0.5, 0.5, n) * ra_err * dec_err
    offsets = np.array([rng.multivariate_normal([0, 0], [[a * a, c], [c, d * d]])
                        for a, c, d in zip(ra_err, covariance, dec_err, strict=True)]).reshape(n, 2)
    ra, dec = inverse_gnomonic(offsets[:, 0], offsets[:, 1], truth_ra, truth_dec)
    flux_err = 0.05 * np.abs(flux) + 20.0
    measured = flux + rng.normal(0, flux_err)
    return pa.table({
        "diaSourceId": dia_source_ids(visit_id(sequence), DETECTOR, n),
        "visit": np.full(n, visit_id(sequence)), "detector": pa.array(np.full(n, DETECTOR), pa.int16()),
        "midpointMjdTai": np.full(n, mjd), "band": [band] * n,
        "ra": ra, "dec": dec, "raErr": ra_err.astype(np.float32), "decErr": dec_err.astype(np.float32),
        "ra_dec_Cov": covariance.astype(np.float32),
        "psfFlux": measured.astype(np.float32), "psfFluxErr": flux_err.astype(np.float32),
        "scienceFlux": (measured + 5000).astype(np.float32), "scienceFluxErr": flux_err.astype(np.float32),
        "isNegative": measured < 0 if negative is None else negative,
    })


class PixelStore:
    """The stream's state: DiaObject rows stored under the sky pixel of their position."""

    def __init__(self):
        self.values: dict[int, pa.Table] = {}

    def gather(self, pixels) -> pa.Table:
        tables = [self.values[p] for p in pixels if p in self.values]
        return pa.concat_tables(tables) if tables else association.empty_state()

    def put(self, loaded_pixels, state: pa.Table) -> None:
        """Store changed rows under their (possibly new) pixel, removing them from where they were."""
        changed = state.column("diaObjectId")
        for pixel in loaded_pixels:
            if pixel in self.values:
                self.values[pixel] = self.values[pixel].filter(
                    pc.invert(pc.is_in(self.values[pixel].column("diaObjectId"), value_set=changed)))
        keys = skypixels.pixel_of(state.column("ra").to_numpy(), state.column("dec").to_numpy())
        for pixel in np.unique(keys):
            rows = state.filter(pa.array(keys == pixel))
            self.values[int(pixel)] = pa.concat_tables([self.values.get(int(pixel),
                                                                       association.empty_state()), rows])

    def associate(self, sources: pa.Table, **kwargs) -> association.AssociationResult:
        pixels = skypixels.pixels_touching(sources.column("ra").to_numpy(), sources.column("dec").to_numpy(),
                                           RADIUS)
        result = association.run(sources, self.gather(pixels), **kwargs)
        self.put(pixels, result.state)
        return result

    def all(self) -> pa.Table:
        return self.gather(list(self.values))


def separated_positions(rng, n, centre, half_width, min_separation):
    """``n`` positions in a box, no two closer than ``min_separation`` (deg)."""
    ra, dec = np.zeros(0), np.zeros(0)
    while ra.size < n:
        xi, eta = rng.uniform(-half_width, half_width, 2)
        candidate_ra, candidate_dec = inverse_gnomonic(xi, eta, *centre)
        if ra.size == 0 or angular_separation(ra, dec, candidate_ra, candidate_dec).min() > min_separation:
            ra, dec = np.append(ra, candidate_ra), np.append(dec, candidate_dec)
    return ra, dec


@pytest.fixture(scope="module")
def survey():
    """Seven visits of 240 true objects (40 appearing later, 20 variables dipping below the template)
    in a field across a corner of sky pixels."""
    rng = np.random.default_rng(7)
    corner_ra, corner_dec = hpgeom.boundaries(SkyPixelConfig().nside, 123456, step=1)
    centre = (float(np.ravel(corner_ra)[0]), float(np.ravel(corner_dec)[0]))
    n = 240
    ra, dec = separated_positions(rng, n, centre, 60 * ARCSEC, 3.2 * ARCSEC)
    bands = ("g", "r", "i")
    true_flux = {band: rng.uniform(-3000, 20000, n) for band in bands}
    first_visit = np.where(np.arange(n) < 200, 0, rng.integers(1, 6, n))
    detection = 0.85
    store = PixelStore()
    observed, results = [], []
    for sequence in range(7):
        band = bands[sequence % 3]
        seen = np.flatnonzero((first_visit <= sequence) & (rng.uniform(size=n) < detection))
        sources = observe(ra[seen], dec[seen], true_flux[band][seen], sequence + 1, band,
                          61000.0 + 0.7 * sequence, rng)
        sources = sources.append_column("truth", pa.array(seen))
        result = store.associate(sources)
        observed.append(result.dia_sources)
        results.append(result)
    history = pa.concat_tables(observed)
    return {"ra": ra, "dec": dec, "history": history, "results": results, "store": store}


def test_association_recovers_the_true_objects(survey):
    history = survey["history"]
    truth = history.column("truth").to_numpy()
    objects = history.column("diaObjectId").to_numpy()
    groups_of_truth = defaultdict(set)
    truths_of_group = defaultdict(set)
    for true_id, object_id in zip(truth, objects, strict=True):
        groups_of_truth[true_id].add(object_id)
        truths_of_group[object_id].add(true_id)
    # Completeness: each true object is one DiaObject; purity: each DiaObject is one true object.
    assert all(len(groups) == 1 for groups in groups_of_truth.values())
    assert all(len(truths) == 1 for truths in truths_of_group.values())
    # The DiaObject is named after the object's first DiaSource.
    first = history.group_by("truth").aggregate([("diaSourceId", "min")])
    expected = dict(zip(first.column("truth").to_pylist(), first.column("diaSourceId_min").to_pylist(),
                        strict=True))
    assert all(objects[i] == expected[truth[i]] for i in range(truth.size))
    # Negative DiaSources joined their objects too.
    assert pc.sum(history.column("isNegative")).as_py() > 20
    counts = [(r.matched, r.new) for r in survey["results"]]
    assert sum(new for _, new in counts) == len(groups_of_truth)
    assert sum(matched + new for matched, new in counts) == history.num_rows
    # The objects straddle sky pixels: the field is laid across a pixel corner.
    assert sum(value.num_rows > 0 for value in survey["store"].values.values()) >= 3


def test_mean_position_converges_to_truth_within_its_error(survey):
    state = survey["store"].all()
    history = survey["history"]
    order = np.argsort(state.column("diaObjectId").to_numpy())
    state = state.take(order)
    ids = state.column("diaObjectId").to_numpy()
    truth_of = dict(zip(history.column("diaObjectId").to_pylist(), history.column("truth").to_pylist(),
                        strict=False))
    true_index = np.array([truth_of[i] for i in ids])
    xi, eta = gnomonic(state.column("ra").to_numpy(), state.column("dec").to_numpy(),
                       survey["ra"][true_index], survey["dec"][true_index])
    ra_err, dec_err, cov = (state.column(c).to_numpy().astype(float)
                            for c in ("raErr", "decErr", "ra_dec_Cov"))
    determinant = ra_err**2 * dec_err**2 - cov**2
    chi2 = (dec_err**2 * xi**2 - 2 * cov * xi * eta + ra_err**2 * eta**2) / determinant
    # chi² of 2 degrees of freedom: mean 2; 240 objects put the mean within ±0.4 and none beyond 20.
    assert abs(chi2.mean() - 2.0) < 0.4
    assert chi2.max() < 20.0
    n = state.column("nDiaSources").to_numpy()
    # The error shrinks as 1/√n: objects seen 6-7 times know their position to 0.03-0.1″.
    assert np.all(np.hypot(ra_err, dec_err)[n >= 6] < 0.13 * ARCSEC)

    # The running update equals the batch inverse-covariance weighted mean of each object's DiaSources.
    for k in range(0, ids.size, 17):
        rows = history.filter(pc.equal(history.column("diaObjectId"), ids[k]))
        sx, sy = gnomonic(rows.column("ra").to_numpy(), rows.column("dec").to_numpy(),
                          survey["ra"][true_index[k]], survey["dec"][true_index[k]])
        information, weighted = np.zeros((2, 2)), np.zeros(2)
        for x, y, a, d, c in zip(sx, sy, *(rows.column(name).to_numpy().astype(float)
                                          for name in ("raErr", "decErr", "ra_dec_Cov")), strict=True):
            inverse = np.linalg.inv([[a * a, c], [c, d * d]])
            information += inverse
            weighted += inverse @ [x, y]
        covariance = np.linalg.inv(information)
        mean = covariance @ weighted
        assert np.hypot(xi[k] - mean[0], eta[k] - mean[1]) < 1e-3 * ra_err[k]
        assert ra_err[k] == pytest.approx(np.sqrt(covariance[0, 0]), rel=1e-5)
        assert cov[k] == pytest.approx(covariance[0, 1], rel=1e-4, abs=1e-6 * ra_err[k] ** 2)


def test_flux_statistics_match_numpy_over_the_full_history(survey):
    state = survey["store"].all()
    history = survey["history"]
    for k in range(0, state.num_rows, 11):
        row = state.slice(k, 1)
        object_id = row.column("diaObjectId")[0].as_py()
        mine = history.filter(pc.equal(history.column("diaObjectId"), object_id))
        assert row.column("nDiaSources")[0].as_py() == mine.num_rows
        assert row.column("firstDiaSourceMjdTai")[0].as_py() == min(mine.column("midpointMjdTai").to_pylist())
        assert row.column("lastDiaSourceMjdTai")[0].as_py() == max(mine.column("midpointMjdTai").to_pylist())
        for band in ("g", "r", "i", "u"):
            in_band = mine.filter(pc.equal(mine.column("band"), band))
            flux = in_band.column("psfFlux").to_numpy().astype(float)
            err = in_band.column("psfFluxErr").to_numpy().astype(float)
            times = in_band.column("midpointMjdTai").to_numpy()

            def value(name, row=row, band=band):
                return row.column(f"{band}_{name}")[0].as_py()
            assert value("psfFluxNdata") == flux.size
            if flux.size == 0:
                assert value("psfFluxMean") is None and value("psfFluxSigma") is None
                continue
            weight = 1 / err**2
            mean = np.sum(weight * flux) / np.sum(weight)
            assert value("psfFluxMean") == pytest.approx(mean, rel=1e-5, abs=1e-3)
            assert value("psfFluxMeanErr") == pytest.approx(np.sum(weight) ** -0.5, rel=1e-5)
            assert value("psfFluxErrMean") == pytest.approx(err.mean(), rel=1e-5)
            assert value("psfFluxMin") == pytest.approx(flux.min()) and value("psfFluxMax") == pytest.approx(
                flux.max())
            assert association.flux_chi2(row, band)[0] == pytest.approx(np.sum(weight * (flux - mean) ** 2),
                                                                          rel=1e-6, abs=1e-6)
            science = in_band.column("scienceFlux").to_numpy().astype(float)
            science_mean = np.sum(weight * science) / np.sum(weight)
            assert value("scienceFluxMean") == pytest.approx(science_mean, rel=1e-5)
            if flux.size > 1:
                assert value("psfFluxSigma") == pytest.approx(np.std(flux, ddof=1), rel=1e-4)
                order = np.argsort(times)
                assert value("psfFluxMaxSlope") == pytest.approx(
                    np.max(np.diff(flux[order]) / np.diff(times[order])), rel=1e-5, abs=1e-2)
            else:
                assert value("psfFluxSigma") is None and value("psfFluxMaxSlope") is None


def test_candidate_pairs_are_every_pair_within_the_radius():
    rng = np.random.default_rng(12)
    # A cluster (around RA 0 near the pole, to cross the wrap) against points clustered and all over the sky.
    ra1, dec1 = offset_position(0.0, 80.0, rng.uniform(0, 360, 300), rng.uniform(0, 0.02, 300))
    ra2, dec2 = offset_position(0.0, 80.0, rng.uniform(0, 360, 3000), rng.uniform(0, 0.03, 3000))
    ra2 = np.concatenate([ra2, rng.uniform(0, 360, 3000)])
    dec2 = np.concatenate([dec2, np.degrees(np.arcsin(rng.uniform(-1, 1, 3000)))])
    radius = 5 * ARCSEC
    for first_set, second_set in (((ra1, dec1), (ra2, dec2)), ((ra2, dec2), (ra1, dec1))):
        first, second, distance = association.candidate_pairs(*first_set, *second_set, radius)
        brute = angular_separation(first_set[0][:, None], first_set[1][:, None], second_set[0][None, :],
                                   second_set[1][None, :])
        expected_first, expected_second = np.nonzero(brute <= radius)
        assert first.size > 50
        assert np.array_equal(first, expected_first) and np.array_equal(second, expected_second)
        assert np.allclose(distance, brute[first, second], rtol=0, atol=1e-6 * ARCSEC)


def test_close_pair_is_not_swapped_where_a_greedy_match_would():
    rng = np.random.default_rng(3)
    centre_ra, centre_dec = 150.0, 2.0
    # Objects A and B 1.2″ apart on a line East-West; source a (from A) lies 0.65″ from A but 0.55″ from B,
    # source b (from B) 0.3″ beyond B, 1.5″ from A.
    xi_objects = np.array([0.0, 1.2]) * ARCSEC
    object_ra, object_dec = inverse_gnomonic(xi_objects, np.zeros(2), centre_ra, centre_dec)
    first = observe(object_ra, object_dec, np.array([5000.0, 5000.0]), 1, "r", 61000.0, rng,
                    err_range=(1e-4, 2e-4))
    objects = association.run(first).state
    a_id, b_id = first.column("diaSourceId").to_pylist()
    objects_xi, _ = gnomonic(objects.column("ra").to_numpy(), objects.column("dec").to_numpy(), centre_ra,
                             centre_dec)
    source_xi = objects_xi + np.array([0.65, 0.3]) * ARCSEC
    source_ra, source_dec = inverse_gnomonic(source_xi, np.zeros(2), centre_ra, centre_dec)
    second = observe(source_ra, source_dec, np.array([5000.0, 5000.0]), 2, "r", 61001.0, rng,
                     err_range=(1e-4, 2e-4))
    ra, dec = second.column("ra").to_numpy(), second.column("dec").to_numpy()
    object_ra, object_dec = objects.column("ra").to_numpy(), objects.column("dec").to_numpy()

    # Greedy, source by source, each takes its nearest free object within the radius.
    free, greedy = [a_id, b_id], []
    for i in range(2):
        distance = angular_separation(ra[i], dec[i], object_ra, object_dec)
        ids = objects.column("diaObjectId").to_pylist()
        choices = [ids[j] for j in np.argsort(distance) if distance[j] <= RADIUS and ids[j] in free]
        greedy.append(choices[0] if choices else None)
        if choices:
            free.remove(greedy[-1])
    assert greedy == [b_id, None]

    result = association.run(second, objects)
    assert result.dia_sources.column("diaObjectId").to_pylist() == [a_id, b_id]
    assert (result.matched, result.new) == (2, 0)


def _edge_point(pixel: int, config: SkyPixelConfig) -> tuple[float, float, float, float]:
    """The middle of a pixel's first edge, and the pixel's centre."""
    edge_ra, edge_dec = hpgeom.boundaries(config.nside, pixel, step=2)
    centre_ra, centre_dec = hpgeom.pixel_to_angle(config.nside, pixel)
    return float(edge_ra[1]), float(edge_dec[1]), float(centre_ra), float(centre_dec)


def test_source_near_a_pixel_boundary_joins_the_object_stored_under_the_neighbouring_pixel():
    rng = np.random.default_rng(11)
    config = SkyPixelConfig()
    mid_ra, mid_dec, centre_ra, centre_dec = _edge_point(98765, config)
    direction = np.array(gnomonic(centre_ra, centre_dec, mid_ra, mid_dec)).ravel()
    direction /= np.hypot(*direction)
    object_ra, object_dec = inverse_gnomonic(*(-0.4 * ARCSEC * direction), mid_ra, mid_dec)
    source_ra, source_dec = inverse_gnomonic(*(0.4 * ARCSEC * direction), mid_ra, mid_dec)
    object_pixel = skypixels.pixel_of(object_ra, object_dec)[0]
    source_pixel = skypixels.pixel_of(source_ra, source_dec)[0]
    assert object_pixel != source_pixel

    first = observe(np.atleast_1d(object_ra), np.atleast_1d(object_dec), np.array([3000.0]), 1, "g", 61000.0,
                    rng, err_range=(0.01, 0.02))
    second = observe(np.atleast_1d(source_ra), np.atleast_1d(source_dec), np.array([3000.0]), 2, "g", 61001.0,
                     rng, err_range=(0.01, 0.02))
    store = {int(object_pixel): association.run(first).state}

    # Only the source's own pixel: the object is not among the candidates, and a duplicate is made.
    alone = association.run(second, store.get(int(source_pixel)))
    assert (alone.matched, alone.new) == (0, 1)
    # The pixels its match circle touches include the object's.
    touched = skypixels.pixels_touching(second.column("ra").to_numpy(), second.column("dec").to_numpy(),
                                        RADIUS)
    assert set(touched) >= {object_pixel, source_pixel}
    gathered = pa.concat_tables([store[p] for p in touched if p in store])
    joined = association.run(second, gathered)
    assert (joined.matched, joined.new) == (1, 0)
    assert joined.dia_sources.column("diaObjectId").to_pylist() == first.column("diaSourceId").to_pylist()


def test_pixels_touching_never_misses_a_pixel_the_circle_overlaps():
    config = SkyPixelConfig()
    rng = np.random.default_rng(5)
    radius = RADIUS
    # Centres within 1.5 radii of pixel edges and corners all over the sky (poles and base-pixel corners
    # included), plus random ones.
    pixels = np.concatenate([rng.integers(0, hpgeom.nside_to_npixel(config.nside), 300),
                             np.arange(4), hpgeom.nside_to_npixel(config.nside) - 1 - np.arange(4),
                             [b * config.nside**2 for b in range(12)]])
    edge_ra, edge_dec = hpgeom.boundaries(config.nside, pixels, step=4)
    pick = rng.integers(0, edge_ra.shape[1], pixels.size)
    centre_ra, centre_dec = offset_position(edge_ra[np.arange(pixels.size), pick],
                                            edge_dec[np.arange(pixels.size), pick],
                                            rng.uniform(0, 360, pixels.size),
                                            rng.uniform(0, 1.5 * radius, pixels.size))
    centre_ra = np.concatenate([centre_ra, rng.uniform(0, 360, 200)])
    centre_dec = np.concatenate([centre_dec, np.degrees(np.arcsin(rng.uniform(-1, 1, 200)))])
    found = skypixels.pixels_touching(centre_ra, centre_dec, radius, config)
    # Brute force: the pixels of points filling each circle.
    rings = np.linspace(0, radius, 8)[1:]
    angles = np.linspace(0, 360, 360, endpoint=False)
    near_edge = 0
    for ra, dec in zip(centre_ra, centre_dec, strict=True):
        fill_ra, fill_dec = offset_position(ra, dec, np.tile(angles, rings.size),
                                            np.repeat(rings, angles.size))
        overlapped = set(hpgeom.angle_to_pixel(config.nside, fill_ra, fill_dec).tolist())
        each = skypixels.pixels_touching(ra, dec, radius, config)
        assert overlapped <= set(each.tolist())
        assert set(each.tolist()) <= set(found.tolist())
        near_edge += len(overlapped) > 1
    assert near_edge > 200
    # A circle well inside a pixel needs that pixel only.
    inside_ra, inside_dec = hpgeom.pixel_to_angle(config.nside, pixels)
    assert np.array_equal(skypixels.pixels_touching(inside_ra[:50], inside_dec[:50], radius, config),
                          np.unique(pixels[:50]))


def test_pixels_of_footprint_cover_a_ccd_grown_by_the_margin():
    config = SkyPixelConfig()
    rng = np.random.default_rng(9)
    for centre_ra, centre_dec, rotation in ((0.05, -30.0, 20.0), (210.0, 88.5, -35.0), (45.0, 41.8, 0.0)):
        half = 0.115  # an LSSTCam CCD, 13.6 arcmin square
        corners = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
        turn = np.radians(rotation)
        corners = corners @ np.array([[np.cos(turn), np.sin(turn)], [-np.sin(turn), np.cos(turn)]])
        ra, dec = inverse_gnomonic(corners[:, 0], corners[:, 1], centre_ra, centre_dec)
        margin = 5 * RADIUS
        found = set(skypixels.pixels_of_footprint(ra, dec, margin, config).tolist())
        assert found == set(skypixels.pixels_of_footprint(ra[::-1], dec[::-1], margin, config).tolist())
        # Points inside the CCD, and points just within the margin outside each edge.
        inside = rng.uniform(-1, 1, (2000, 2)) @ (np.diag([half, half]) @ np.array(
            [[np.cos(turn), np.sin(turn)], [-np.sin(turn), np.cos(turn)]]))
        edge = rng.integers(0, 4, 2000)
        along = rng.uniform(0, 1, 2000)[:, None]
        start, end = corners[edge], corners[(edge + 1) % 4]
        middle = (start + end) / 2
        outward = middle / np.hypot(middle[:, 0], middle[:, 1])[:, None]
        outside = start + along * (end - start) + outward * 0.95 * margin
        points = np.concatenate([inside, outside])
        point_ra, point_dec = inverse_gnomonic(points[:, 0], points[:, 1], centre_ra, centre_dec)
        assert set(skypixels.pixel_of(point_ra, point_dec, config).tolist()) <= found
        # A CCD spans tens of pixels at the default order.
        assert 10 < len(found) < 60
    with pytest.raises(SkyPixelError, match="convex"):
        skypixels.pixels_of_footprint([10, 10.1, 10.05, 10.1, 10], [0, 0, 0.05, 0.1, 0.1])
    with pytest.raises(SkyPixelError, match="finite"):
        skypixels.pixel_of([np.nan], [0.0])


def test_solar_system_prediction_takes_precedence_over_a_dia_object():
    rng = np.random.default_rng(2)
    object_ra, object_dec = np.array([80.0, 80.01]), np.array([20.0, 20.0])
    first = observe(object_ra, object_dec, np.array([4000.0, 4000.0]), 1, "r", 61000.0, rng)
    objects = association.run(first).state
    # An asteroid passes 0.3″ from the first object; its DiaSource lies 0.25″ from the object too.
    source_ra, source_dec = offset_position(object_ra, object_dec, [90.0, 0.0], [0.25 * ARCSEC, 0.1 * ARCSEC])
    eph_ra, eph_dec = offset_position(source_ra[0], source_dec[0], 200.0, 0.3 * ARCSEC)
    second = observe(source_ra, source_dec, np.array([4000.0, 4000.0]), 2, "r", 61001.0, rng,
                     err_range=(1e-4, 2e-4))
    predictions = pa.table({"ssObjectId": [9_000_001, 9_000_002], "ra": [float(eph_ra), 80.5],
                            "dec": [float(eph_dec), 21.0]})
    result = association.run(second, objects, predictions)
    assert result.dia_sources.column("ssObjectId").to_pylist() == [9_000_001, None]
    assert result.dia_sources.column("diaObjectId").to_pylist() == [None, first["diaSourceId"][1].as_py()]
    assert (result.matched, result.new, result.solar_system) == (1, 0, 1)
    # The first object is left as it was: no new version, no count.
    assert result.updated.column("diaObjectId").to_pylist() == [first["diaSourceId"][1].as_py()]
    row = result.ss_sources.to_pylist()[0]
    assert row["diaSourceId"] == second["diaSourceId"][0].as_py() and row["diaDistanceRank"] == 1
    assert row["ephOffset"] == pytest.approx(0.3, abs=0.002)
    assert np.hypot(row["ephOffsetRa"], row["ephOffsetDec"]) == pytest.approx(row["ephOffset"], rel=1e-4)
    # The ssSource rows and DiaObjects go straight into alerts.
    measured = result.dia_sources
    for name, value in (("x", 100.0), ("y", 200.0), ("psfNdata", 81), ("trailNdata", 0), ("dipoleNdata", 0),
                        ("bboxSize", 15), ("timeProcessedMjdTai", 61001.01)):
        measured = measured.append_column(name, pa.array(np.full(2, value)))
    packets = alerts.run(measured, result.dia_objects, None, None, None, result.ss_sources)
    parsed = fastavro.parse_schema(alerts.alert_schema())
    for record in packets.records:
        assert fastavro.validation.validate(record, parsed)
    assert packets.records[0]["ssSource"]["ssObjectId"] == 9_000_001


def test_ss_predictions_follow_a_great_circle_between_ephemeris_samples():
    start, rate, direction = (33.0, -12.0), np.array([0.25, 12.0]), np.array([110.0, 15.0])
    samples = np.array([61000.0, 61000.5, 61001.0])
    ra, dec = offset_position(start[0], start[1], direction[:, None], rate[:, None] * (samples - 61000.0))
    ephemeris = pa.table({"sso_id": np.repeat([7, 5], 3), "mjd": np.tile(samples, 2), "ra": ra.ravel(),
                          "dec": dec.ravel()})
    at = 61000.61
    predicted = association.ss_predictions_at(ephemeris, at)
    assert predicted.column("ssObjectId").to_pylist() == [5, 7]
    true_ra, true_dec = offset_position(start[0], start[1], direction[::-1], rate[::-1] * (at - 61000.0))
    separation = angular_separation(predicted["ra"].to_numpy(), predicted["dec"].to_numpy(), true_ra,
                                    true_dec)
    assert np.all(separation < 1e-6 * ARCSEC)
    assert association.ss_predictions_at(ephemeris, 61002.0).num_rows == 0


def test_same_inputs_in_any_order_give_the_same_association(survey):
    rng = np.random.default_rng(4)
    store = survey["store"]
    objects = store.all()
    history = survey["history"]
    truth = np.unique(history.column("truth").to_numpy())
    sources = observe(survey["ra"][truth], survey["dec"][truth], np.full(truth.size, 2000.0), 90, "z",
                      61010.0, rng)
    first = association.run(sources, objects)
    shuffled = association.run(sources.take(rng.permutation(sources.num_rows)),
                               objects.take(rng.permutation(objects.num_rows)))
    by_source = {s: o for s, o in zip(*(shuffled.dia_sources.column(c).to_pylist()
                                        for c in ("diaSourceId", "diaObjectId")), strict=True)}
    assert [by_source[s] for s in first.dia_sources.column("diaSourceId").to_pylist()] == \
        first.dia_sources.column("diaObjectId").to_pylist()
    assert shuffled.state.equals(first.state)
    assert first.new == 0 and first.matched == truth.size


def test_a_batch_run_again_on_its_own_result_changes_nothing():
    rng = np.random.default_rng(8)
    ra, dec = separated_positions(rng, 30, (300.0, -60.0), 20 * ARCSEC, 3 * ARCSEC)
    first = association.run(observe(ra[:20], dec[:20], np.full(20, 900.0), 1, "i", 61000.0, rng,
                                    err_range=(0.02, 0.05)))
    batch = observe(ra, dec, np.full(30, 950.0), 2, "i", 61001.0, rng, err_range=(0.02, 0.05))
    once = association.run(batch, first.state)
    assert (once.matched, once.new) == (20, 10)
    # A restarted worker processes the batch again, with the state the first run stored.
    merged = pa.concat_tables([first.state.filter(pc.invert(pc.is_in(first.state["diaObjectId"],
                                                                     value_set=once.state["diaObjectId"]))),
                               once.state])
    again = association.run(batch, merged)
    assert again.dia_sources.equals(once.dia_sources)
    assert again.state.equals(once.state)
    assert (again.matched, again.new) == (20, 10)
    assert again.created.equals(once.created) and again.updated.equals(once.updated)

    # Another batch of the same visit (the next sky pixel) cannot take an object this visit already joined.
    neighbour = observe(ra[:1], dec[:1], np.full(1, 950.0), 2, "i", 61001.0, rng)
    next_id = dia_source_ids(visit_id(2), DETECTOR, 31)[30:]
    neighbour = neighbour.set_column(0, "diaSourceId", pa.array(next_id))
    other = association.run(neighbour, merged)
    assert (other.matched, other.new) == (0, 1)


def test_dia_objects_have_official_apdb_columns_and_store(tmp_path):
    official = arrow_schema("DiaObject")
    for field in association.OBJECT_SCHEMA:
        assert official.field(field.name).type == field.type, field.name
        assert official.field(field.name).nullable == field.nullable, field.name
    # Every official statistic association can fill, it fills.
    assert set(official.names) - set(association.OBJECT_SCHEMA.names) == {"validityEndMjdTai"}
    rng = np.random.default_rng(1)
    result = association.run(observe(np.array([1.0, 1.1]), np.array([0.5, 0.5]), np.array([100.0, -300.0]),
                                     1, "u", 61000.0, rng))
    apdb = Apdb(f"sqlite:///{tmp_path / 'apdb.sqlite3'}")
    apdb.store("DiaObject", result.dia_objects)
    stored = apdb.dia_objects_in_cone(1.05, 0.5, 0.1)
    apdb.close()
    assert stored.column("diaObjectId").to_pylist() == result.dia_objects.column("diaObjectId").to_pylist()
    assert stored.column("u_psfFluxMean").to_pylist() == pytest.approx([100.0, -300.0], abs=60)


def test_trim_history_keeps_the_window_and_the_latest_rows():
    history = pa.table({"diaObjectId": [1, 1, 1, 1, 2, 2], "midpointMjdTai": [10.0, 600.0, 700.0, 650.0, 50.0,
                                                                             690.0],
                        "psfFlux": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]})
    trimmed = association.trim_history(history, 700.0, AssociationConfig(history_days=365.0, max_history=2))
    assert trimmed.column("diaObjectId").to_pylist() == [1, 1, 2]
    assert trimmed.column("midpointMjdTai").to_pylist() == [650.0, 700.0, 690.0]


def test_bad_input_is_named():
    rng = np.random.default_rng(0)
    sources = observe(np.array([1.0, 1.01]), np.array([0.0, 0.0]), np.array([1.0, 1.0]), 1, "r", 61000.0, rng)
    with pytest.raises(AssociationError, match="psfFluxErr"):
        association.run(sources.drop_columns(["psfFluxErr"]))
    with pytest.raises(AssociationError, match="diaSourceIds repeat"):
        association.run(pa.concat_tables([sources, sources]))
    with pytest.raises(AssociationError, match="unknown band w"):
        band = sources.schema.get_field_index("band")
        association.run(sources.set_column(band, "band", pa.array(["w", "r"])))
    with pytest.raises(AssociationError, match="lastDiaSourceId"):
        association.run(sources, association.run(sources).dia_objects)
    with pytest.raises(AssociationError, match="positive"):
        AssociationConfig(match_radius=0.0)
