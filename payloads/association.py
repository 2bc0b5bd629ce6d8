"""Association of DiaSources with DiaObjects and solar-system objects, on state passed in and returned.

One call associates the DiaSources of a batch (one detector-visit, or the
part of it in one sky pixel) with the DiaObjects that any of them can match,
as the stream keeps them (:mod:`dmstream.payloads.skypixels` names the keys
to gather), and returns the new state of every object it changed:

1. Solar-system attribution: a DiaSource within ``ss_match_radius`` of the
   position predicted for a known solar-system object at the visit gets its
   ``ssObjectId`` and no DiaObject (``diaObjectId`` null), as in the APDB.
2. DiaObject matching: candidate pairs within ``match_radius`` from a k-d
   tree of unit vectors, then, in each connected group of sources and
   objects that share candidates, the one-to-one assignment of least total
   angular distance among those that match the most sources
   (``scipy.optimize.linear_sum_assignment``).  A greedy nearest match can
   hand a source its neighbour's object and leave the neighbour's own source
   unmatched; the assignment cannot.  Negative DiaSources (``isNegative``)
   associate like positive ones: a variable fainter than in the template is
   still the same object.
3. Every unmatched DiaSource creates a DiaObject whose ``diaObjectId`` is
   its ``diaSourceId`` (:mod:`dmstream.payloads.ids`).

A DiaObject is one row of :data:`STATE_SCHEMA`: the official APDB
``DiaObject`` columns of ``lsst-sdm-schemas`` (:data:`OBJECT_SCHEMA`) plus
the running sums from which its statistics are updated without its history
(float64, per band: for psfFlux Σw, Σwf, Σwf², Σf, Σf², Σσ, and the last flux
and its time; Σw and Σwf for scienceFlux; w = 1/σ²).  Its
position is the inverse-covariance weighted mean of its DiaSources'
positions, updated as a static Kalman filter: with the object's covariance
``C`` (raErr, decErr, ra_dec_Cov, in RA·cos Dec and Dec) and a source's
``S`` at offset ``d`` on the tangent plane of the object, the mean moves by
``(C⁻¹ + S⁻¹)⁻¹ S⁻¹ d`` and the covariance becomes ``(C⁻¹ + S⁻¹)⁻¹``; this
is the batch weighted mean exactly (on the plane), so no sums are kept for
it.  A source without a usable position error moves nothing but an object
it creates.

The state is also what makes a retry harmless: ``lastDiaSourceId`` names
the DiaSource that last updated each object.  A DiaSource already folded
into an object (a batch processed again after a restart, on the state the
first run stored) is bound to that object without being counted twice, and
an object that a DiaSource of the same visit already updated (in another
batch) is no candidate for the others, which keeps the assignment one to
one across batches.  DiaSources are expected in time order per object; an
earlier one is folded into every statistic but the last flux and MaxSlope.

All the DiaObject statistics follow Rubin's definitions: psfFluxMean and
scienceFluxMean are inverse-variance weighted means with their standard
errors, psfFluxSigma the sample standard deviation (n - 1), psfFluxErrMean
the mean error, psfFluxMaxSlope the largest (signed) slope between
consecutive fluxes in time, nJy per day.  The forced-photometry means
(``fpFluxMean``, ``fpFluxMeanErr``) are left null, as Rubin's association
leaves them: DiaObject statistics come from DiaSources only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse
import scipy.sparse.csgraph
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from dmstream.payloads.alerts import AlertConfig
from dmstream.payloads.astrometry import gnomonic, inverse_gnomonic
from dmstream.payloads.conditions import BANDS
from dmstream.payloads.ids import split_dia_source_id
from dmstream.payloads.skypixels import unit_vectors

ARCSEC = 1.0 / 3600.0
_FLOAT = pa.float32()
_PSF_STATISTICS = ("psfFluxMean", "psfFluxMeanErr", "psfFluxSigma")
_PSF_EXTREMES = ("psfFluxMin", "psfFluxMax", "psfFluxMaxSlope", "psfFluxErrMean")
#: The official APDB DiaObject columns that association fills (``validityEndMjdTai`` is the APDB's own).
OBJECT_SCHEMA = pa.schema(
    [pa.field("diaObjectId", pa.int64(), nullable=False),
     pa.field("validityStartMjdTai", pa.float64(), nullable=False),
     pa.field("ra", pa.float64(), nullable=False), pa.field("raErr", _FLOAT),
     pa.field("dec", pa.float64(), nullable=False), pa.field("decErr", _FLOAT),
     pa.field("ra_dec_Cov", _FLOAT)]
    + [field for band in BANDS for field in (
        *(pa.field(f"{band}_{name}", _FLOAT) for name in _PSF_STATISTICS),
        pa.field(f"{band}_psfFluxNdata", pa.int32(), nullable=False),
        pa.field(f"{band}_fpFluxMean", _FLOAT), pa.field(f"{band}_fpFluxMeanErr", _FLOAT),
        pa.field(f"{band}_scienceFluxMean", _FLOAT), pa.field(f"{band}_scienceFluxMeanErr", _FLOAT),
        *(pa.field(f"{band}_{name}", _FLOAT) for name in _PSF_EXTREMES))]
    + [pa.field("firstDiaSourceMjdTai", pa.float64()), pa.field("lastDiaSourceMjdTai", pa.float64()),
       pa.field("nDiaSources", pa.int32(), nullable=False)])
#: Running sums of each band's fluxes: (kind, sums) with kind the flux measured.
_SUMS = (("psfFlux", ("sumW", "sumWFlux", "sumWFlux2", "sumFlux", "sumFlux2", "sumErr", "last",
                      "lastMjdTai")),
         ("scienceFlux", ("sumW", "sumWFlux")))
SUM_COLUMNS = tuple(f"{band}_{kind}_{name}" for band in BANDS for kind, names in _SUMS for name in names)
#: One DiaObject as the stream stores it: the official columns, the DiaSource that last updated it,
#: and the running sums (float64; a last flux and its time are null until the band has one).
STATE_SCHEMA = pa.schema([*OBJECT_SCHEMA, pa.field("lastDiaSourceId", pa.int64(), nullable=False),
                          *(pa.field(name, pa.float64()) for name in SUM_COLUMNS)])
#: DiaSource columns :func:`run` reads (``ra_dec_Cov``, ``scienceFlux`` and ``scienceFluxErr`` are optional).
REQUIRED_SOURCE_COLUMNS = ("diaSourceId", "midpointMjdTai", "band", "ra", "dec", "raErr", "decErr", "psfFlux",
                           "psfFluxErr")
#: Columns of the solar-system attributions, as the alert's ``ssSource`` names them (offsets in arcsec).
SS_SOURCE_SCHEMA = pa.schema([
    pa.field("diaSourceId", pa.int64(), nullable=False), pa.field("ssObjectId", pa.int64(), nullable=False),
    pa.field("ephRa", pa.float64()), pa.field("ephDec", pa.float64()), pa.field("ephOffset", _FLOAT),
    pa.field("ephOffsetRa", pa.float64()), pa.field("ephOffsetDec", pa.float64()),
    pa.field("diaDistanceRank", pa.int32())])


class AssociationError(ValueError):
    """Inputs association cannot use: missing columns, repeated ids, unknown bands, bad positions."""


@dataclass(frozen=True)
class AssociationConfig:
    """How DiaSources are matched, and how much of each object's history the stream keeps.

    Attributes
    ----------
    match_radius : float
        Largest distance of a DiaSource from the DiaObject it joins, arcsec
        (Rubin's ap_association: 1″).
    ss_match_radius : float
        Largest distance of a DiaSource from a solar-system object's
        predicted position for it to be attributed to that object, arcsec.
    history_days : float
        DiaSources and DiaForcedSources older than this before the visit are
        dropped from an object's history (:func:`trim_history`), days; the
        window of an alert's history (12 months).
    max_history : int
        Most history rows of one kind kept per object, the latest: enough for
        the longest history an alert carries (:class:`~dmstream.payloads.alerts.AlertConfig`).
    """

    match_radius: float = 1.0
    ss_match_radius: float = 1.0
    history_days: float = AlertConfig.history_days
    max_history: int = max(AlertConfig.max_prv_dia_sources, AlertConfig.max_prv_forced_sources)

    def __post_init__(self) -> None:
        if not (self.match_radius > 0 and self.ss_match_radius > 0):
            raise AssociationError(f"match radii must be positive: {self}")
        if self.history_days < 0 or self.max_history < 0:
            raise AssociationError(f"history window and cap must be non-negative: {self}")


@dataclass
class AssociationResult:
    """What one association did.

    Attributes
    ----------
    dia_sources : pyarrow.Table
        The input DiaSources, in their order, with ``diaObjectId`` (null for
        solar-system attributions) and ``ssObjectId`` (null otherwise).
    updated : pyarrow.Table
        Existing DiaObjects that a DiaSource joined, their new version
        (:data:`OBJECT_SCHEMA`, by diaObjectId).
    created : pyarrow.Table
        DiaObjects created by unmatched DiaSources (:data:`OBJECT_SCHEMA`, by diaObjectId).
    state : pyarrow.Table
        :data:`STATE_SCHEMA` rows of the updated and created objects, by
        diaObjectId (objects of no DiaSource of this call are unchanged): what
        the stream must store, under :func:`~dmstream.payloads.skypixels.pixel_of`
        of its (possibly moved) position.
    ss_sources : pyarrow.Table
        One row per solar-system attribution (:data:`SS_SOURCE_SCHEMA`).
    matched, new, solar_system : int
        DiaSources that joined an existing DiaObject, created one, or were
        attributed to a solar-system object.
    """

    dia_sources: pa.Table
    updated: pa.Table
    created: pa.Table
    state: pa.Table
    ss_sources: pa.Table
    matched: int
    new: int
    solar_system: int

    @property
    def dia_objects(self) -> pa.Table:
        """Every DiaObject a DiaSource of this call belongs to (updated and created), by diaObjectId."""
        table = pa.concat_tables([self.updated, self.created])
        return table.take(pc.sort_indices(table, [("diaObjectId", "ascending")]))


def empty_state() -> pa.Table:
    """A state table with no DiaObjects."""
    return STATE_SCHEMA.empty_table()


def _column(table: pa.Table, name: str, dtype: type, default: float | None = None) -> NDArray:
    if name not in table.column_names:
        return np.full(table.num_rows, default, dtype=dtype)
    return table.column(name).to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def _check_columns(table: pa.Table, required: Sequence[str], what: str) -> None:
    missing = [name for name in required if name not in table.column_names]
    if missing:
        raise AssociationError(f"{what} lack column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")


def _check_positions(ra: NDArray[np.float64], dec: NDArray[np.float64], what: str) -> None:
    if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec)) and np.all(np.abs(dec) <= 90.0)):
        raise AssociationError(f"{what} hold positions that are not finite or lie beyond the poles")


def _sorting(ids: NDArray[np.int64], what: str) -> NDArray[np.int64]:
    """The order that sorts ``ids``, which must be distinct."""
    order = np.argsort(ids, kind="stable")
    if np.any(ids[order[1:]] == ids[order[:-1]]):
        raise AssociationError(f"{what} repeat")
    return order


def _chord(radius_deg: float) -> float:
    return 2.0 * np.sin(np.radians(radius_deg) / 2.0)


def candidate_pairs(ra1: NDArray[np.float64], dec1: NDArray[np.float64], ra2: NDArray[np.float64],
                    dec2: NDArray[np.float64], radius: float
                    ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float64]]:
    """Every pair of positions of two sets closer than ``radius``.

    Parameters
    ----------
    ra1, dec1, ra2, dec2 : numpy.ndarray
        The two sets, deg.
    radius : float
        Deg.

    Returns
    -------
    first, second : numpy.ndarray
        Indices into each set of every pair, sorted by ``first`` then ``second``.
    distance : numpy.ndarray
        Great-circle distance of each pair, deg.
    """
    if ra1.size == 0 or ra2.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    # The tree goes on the smaller set.  Of the larger one, only the points in the cap around the smaller
    # set are looked up against it (a dot product each), and only those with a neighbour enter a second tree.
    swap = ra1.size > ra2.size
    small, large = (unit_vectors(ra2, dec2), unit_vectors(ra1, dec1)) if swap else (
        unit_vectors(ra1, dec1), unit_vectors(ra2, dec2))
    chord = _chord(radius)
    centre = small.sum(axis=0)
    centre /= max(np.linalg.norm(centre), 1e-300)
    extent = np.arccos(np.clip((small @ centre).min(), -1.0, 1.0)) + np.radians(radius)
    in_cap = np.flatnonzero(large @ centre >= np.cos(extent)) if extent < np.pi else np.arange(len(large))
    tree = cKDTree(small)
    nearest, _ = tree.query(large[in_cap], k=1, distance_upper_bound=chord)
    near = in_cap[np.isfinite(nearest)]
    large_tree = cKDTree(large[near])
    pairs = tree.sparse_distance_matrix(large_tree, chord, output_type="ndarray")
    small_index = pairs["i"].astype(np.int64)
    large_index = near[pairs["j"]].astype(np.int64)
    first, second = (large_index, small_index) if swap else (small_index, large_index)
    distance = np.degrees(2.0 * np.arcsin(np.clip(pairs["v"] / 2.0, 0.0, 1.0)))
    order = np.lexsort((second, first))
    return first[order], second[order], distance[order]


def assign(first: NDArray[np.int64], second: NDArray[np.int64], cost: NDArray[np.float64], n_first: int,
           n_second: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """One-to-one assignment over candidate pairs: the most pairs, then the least total cost.

    Each connected group of the bipartite candidate graph is solved on its
    own (most are one pair).  Pairs that are not candidates cost more than
    all candidate pairs of the group together, so the solver never takes one
    while a candidate could be matched instead, and those it takes are dropped.

    Parameters
    ----------
    first, second : numpy.ndarray
        Indices of the candidate pairs in each set.
    cost : numpy.ndarray
        Cost of each pair (non-negative).
    n_first, n_second : int
        Sizes of the sets.

    Returns
    -------
    first, second : numpy.ndarray
        The matched pairs, sorted by ``first``.
    """
    if first.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    graph = scipy.sparse.coo_matrix((np.ones(first.size), (first, n_first + second)),
                                    shape=(n_first + n_second,) * 2)
    _, component = scipy.sparse.csgraph.connected_components(graph, directed=False)
    pair_component = component[first]
    pairs_in = np.bincount(pair_component, minlength=component.max() + 1)
    single = pairs_in[pair_component] == 1
    matched_first, matched_second = [first[single]], [second[single]]
    shared = np.flatnonzero(~single)
    by_component = shared[np.argsort(pair_component[shared], kind="stable")]
    bounds = np.flatnonzero(np.diff(pair_component[by_component])) + 1
    for group in np.split(by_component, bounds) if by_component.size else []:
        rows, row_index = np.unique(first[group], return_inverse=True)
        columns, column_index = np.unique(second[group], return_inverse=True)
        forbidden = 1.0 + cost[group].sum()
        matrix = np.full((rows.size, columns.size), forbidden)
        matrix[row_index, column_index] = cost[group]
        chosen_rows, chosen_columns = linear_sum_assignment(matrix)
        allowed = matrix[chosen_rows, chosen_columns] < forbidden
        matched_first.append(rows[chosen_rows[allowed]])
        matched_second.append(columns[chosen_columns[allowed]])
    result_first, result_second = np.concatenate(matched_first), np.concatenate(matched_second)
    order = np.argsort(result_first, kind="stable")
    return result_first[order], result_second[order]


def _information(ra_err: NDArray[np.float64], dec_err: NDArray[np.float64], covariance: NDArray[np.float64]
                 ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Inverse of the position covariances, (a, b, c) of [[a, b], [b, c]], deg⁻²; 0 where unusable."""
    covariance = np.nan_to_num(covariance)
    determinant = ra_err**2 * dec_err**2 - covariance**2
    usable = (np.isfinite(determinant) & (determinant > 0) & (ra_err > 0) & (dec_err > 0))
    safe = np.where(usable, determinant, 1.0)
    zero = np.zeros_like(safe)
    return (np.where(usable, dec_err**2 / safe, zero), np.where(usable, -covariance / safe, zero),
            np.where(usable, ra_err**2 / safe, zero))


class _Objects:
    """State rows being updated, as numpy arrays keyed by column name."""

    def __init__(self, table: pa.Table) -> None:
        self.columns: dict[str, NDArray] = {}
        for field in STATE_SCHEMA:
            dtype = np.int64 if pa.types.is_integer(field.type) else np.float64
            self.columns[field.name] = _column(table, field.name, dtype)

    @classmethod
    def created_at(cls, ids: NDArray[np.int64], ra: NDArray[np.float64], dec: NDArray[np.float64]
                   ) -> _Objects:
        """Objects with no DiaSource yet at these positions, to fold their creating sources into."""
        n = ids.size
        columns = {f.name: np.zeros(n, np.int64) if pa.types.is_integer(f.type) else np.full(n, np.nan)
                   for f in STATE_SCHEMA}
        for name in SUM_COLUMNS:
            if not name.endswith(("last", "lastMjdTai")):
                columns[name] = np.zeros(n)
        columns.update(diaObjectId=ids.copy(), lastDiaSourceId=ids.copy(), ra=ra.copy(), dec=dec.copy())
        objects = cls.__new__(cls)
        objects.columns = columns
        return objects

    def __getitem__(self, name: str) -> NDArray:
        return self.columns[name]

    def fold_positions(self, rows: NDArray[np.int64], ra: NDArray[np.float64], dec: NDArray[np.float64],
                       info: tuple[NDArray[np.float64], ...]) -> None:
        c = self.columns
        obj_a, obj_b, obj_c = _information(c["raErr"][rows], c["decErr"][rows], c["ra_dec_Cov"][rows])
        src_a, src_b, src_c = info
        a, b, cc = obj_a + src_a, obj_b + src_b, obj_c + src_c
        determinant = a * cc - b * b
        informed = determinant > 0
        safe = np.where(informed, determinant, 1.0)
        xi, eta = gnomonic(ra, dec, c["ra"][rows], c["dec"][rows])
        pulled_xi, pulled_eta = src_a * xi + src_b * eta, src_b * xi + src_c * eta
        shift_xi = np.where(informed, (cc * pulled_xi - b * pulled_eta) / safe, 0.0)
        shift_eta = np.where(informed, (a * pulled_eta - b * pulled_xi) / safe, 0.0)
        new_ra, new_dec = inverse_gnomonic(shift_xi, shift_eta, c["ra"][rows], c["dec"][rows])
        c["ra"][rows], c["dec"][rows] = new_ra, new_dec
        c["raErr"][rows] = np.where(informed, np.sqrt(np.where(informed, cc / safe, 1.0)), c["raErr"][rows])
        c["decErr"][rows] = np.where(informed, np.sqrt(np.where(informed, a / safe, 1.0)), c["decErr"][rows])
        c["ra_dec_Cov"][rows] = np.where(informed, -b / safe, c["ra_dec_Cov"][rows])

    def fold_sources(self, rows: NDArray[np.int64], source_ids: NDArray[np.int64], mjd: NDArray[np.float64],
                     bands: NDArray, fluxes: dict[str, NDArray[np.float64]]) -> None:
        c = self.columns
        c["nDiaSources"][rows] += 1
        c["firstDiaSourceMjdTai"][rows] = np.fmin(c["firstDiaSourceMjdTai"][rows], mjd)
        c["lastDiaSourceMjdTai"][rows] = np.fmax(c["lastDiaSourceMjdTai"][rows], mjd)
        c["validityStartMjdTai"][rows] = mjd
        c["lastDiaSourceId"][rows] = source_ids
        for band in BANDS:
            in_band = bands == band
            psf, psf_err = fluxes["psfFlux"][in_band], fluxes["psfFluxErr"][in_band]
            self._fold_psf(band, rows[in_band], mjd[in_band], psf, psf_err)
            self._fold_mean(f"{band}_scienceFlux", rows[in_band], fluxes["scienceFlux"][in_band],
                            fluxes["scienceFluxErr"][in_band])

    def _fold_psf(self, band: str, rows: NDArray[np.int64], mjd: NDArray[np.float64],
                  flux: NDArray[np.float64], err: NDArray[np.float64]) -> None:
        c, prefix = self.columns, f"{band}_psfFlux"
        good = np.isfinite(flux) & np.isfinite(err) & (err > 0)
        rows, mjd, flux, err = rows[good], mjd[good], flux[good], err[good]
        weight = 1.0 / err**2
        c[f"{prefix}_sumW"][rows] += weight
        c[f"{prefix}_sumWFlux"][rows] += weight * flux
        c[f"{prefix}_sumWFlux2"][rows] += weight * flux**2
        c[f"{prefix}_sumFlux"][rows] += flux
        c[f"{prefix}_sumFlux2"][rows] += flux**2
        c[f"{prefix}_sumErr"][rows] += err
        c[f"{prefix}Ndata"][rows] += 1
        c[f"{prefix}Min"][rows] = np.fmin(c[f"{prefix}Min"][rows], flux)
        c[f"{prefix}Max"][rows] = np.fmax(c[f"{prefix}Max"][rows], flux)
        last_mjd = c[f"{prefix}_lastMjdTai"][rows]
        later = ~(mjd <= last_mjd)  # also where the band had no flux yet (NaN)
        with np.errstate(invalid="ignore", divide="ignore"):
            slope = np.where(later & np.isfinite(last_mjd),
                             (flux - c[f"{prefix}_last"][rows]) / (mjd - last_mjd), np.nan)
        c[f"{prefix}MaxSlope"][rows] = np.fmax(c[f"{prefix}MaxSlope"][rows], slope)
        c[f"{prefix}_last"][rows] = np.where(later, flux, c[f"{prefix}_last"][rows])
        c[f"{prefix}_lastMjdTai"][rows] = np.where(later, mjd, last_mjd)

    def _fold_mean(self, prefix: str, rows: NDArray[np.int64], flux: NDArray[np.float64],
                   err: NDArray[np.float64]) -> None:
        good = np.isfinite(flux) & np.isfinite(err) & (err > 0)
        weight = 1.0 / err[good] ** 2
        self.columns[f"{prefix}_sumW"][rows[good]] += weight
        self.columns[f"{prefix}_sumWFlux"][rows[good]] += weight * flux[good]

    def derive(self) -> None:
        """Recompute the official statistics from the running sums."""
        c = self.columns
        with np.errstate(invalid="ignore", divide="ignore"):
            for band in BANDS:
                for kind in ("psfFlux", "scienceFlux"):
                    weight, prefix = c[f"{band}_{kind}_sumW"], f"{band}_{kind}"
                    c[f"{prefix}Mean"] = np.where(weight > 0, c[f"{prefix}_sumWFlux"] / weight, np.nan)
                    c[f"{prefix}MeanErr"] = np.where(weight > 0, 1.0 / np.sqrt(weight), np.nan)
                prefix, n = f"{band}_psfFlux", c[f"{band}_psfFluxNdata"].astype(float)
                spread = c[f"{prefix}_sumFlux2"] - c[f"{prefix}_sumFlux"] ** 2 / n
                c[f"{prefix}Sigma"] = np.where(n > 1, np.sqrt(np.clip(spread, 0, None) / (n - 1)), np.nan)
                c[f"{prefix}ErrMean"] = np.where(n > 0, c[f"{prefix}_sumErr"] / n, np.nan)

    def table(self, rows: NDArray[np.int64]) -> pa.Table:
        arrays = [pa.array(self.columns[f.name][rows], type=f.type, from_pandas=True) for f in STATE_SCHEMA]
        return pa.Table.from_arrays(arrays, schema=STATE_SCHEMA)


def flux_chi2(state: pa.Table, band: str) -> NDArray[np.float64]:
    """χ² of each object's psfFlux in ``band`` about its weighted mean, Σ (f - mean)² / σ².

    Not an APDB column; it says how variable an object is, from the running sums.
    """
    if band not in BANDS:
        raise AssociationError(f"unknown band {band!r}; bands: {', '.join(BANDS)}")
    prefix = f"{band}_psfFlux"
    _check_columns(state, [f"{prefix}_{name}" for name in ("sumW", "sumWFlux", "sumWFlux2")], "DiaObjects")
    weight, weighted, squares = (_column(state, f"{prefix}_{name}", np.float64)
                                 for name in ("sumW", "sumWFlux", "sumWFlux2"))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, np.clip(squares - weighted**2 / weight, 0, None), np.nan)


def _attribute_solar_system(source_ids: NDArray[np.int64], ra: NDArray[np.float64], dec: NDArray[np.float64],
                            ss_predictions: pa.Table | None, radius: float
                            ) -> tuple[NDArray[np.int64], NDArray[np.int64], pa.Table]:
    """Sources attributed to predicted solar-system positions: (source rows, ssObjectIds, ssSource rows)."""
    if ss_predictions is None or ss_predictions.num_rows == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), SS_SOURCE_SCHEMA.empty_table()
    _check_columns(ss_predictions, ("ssObjectId", "ra", "dec"), "solar-system predictions")
    ss_ids = _column(ss_predictions, "ssObjectId", np.int64)
    order = _sorting(ss_ids, "ssObjectIds of the solar-system predictions")
    ss_ids = ss_ids[order]
    eph_ra = _column(ss_predictions, "ra", np.float64)[order]
    eph_dec = _column(ss_predictions, "dec", np.float64)[order]
    _check_positions(eph_ra, eph_dec, "solar-system predictions")
    sources, predicted, distance = candidate_pairs(ra, dec, eph_ra, eph_dec, radius)
    rows, chosen = assign(sources, predicted, distance, ra.size, ss_ids.size)
    # Pairs are sorted by (source, prediction), so each chosen pair is found by its combined key.
    chosen_pair = np.searchsorted(sources * ss_ids.size + predicted, rows * ss_ids.size + chosen)
    # diaDistanceRank: rank of the source among those within the radius of the same prediction, 1 = closest.
    by_prediction = np.lexsort((distance, predicted))
    group_start = np.searchsorted(predicted[by_prediction], predicted[by_prediction], side="left")
    rank = np.empty(sources.size, np.int32)
    rank[by_prediction] = np.arange(sources.size) - group_start + 1
    offset_ra, offset_dec = gnomonic(ra[rows], dec[rows], eph_ra[chosen], eph_dec[chosen])
    columns = {"diaSourceId": source_ids[rows], "ssObjectId": ss_ids[chosen], "ephRa": eph_ra[chosen],
               "ephDec": eph_dec[chosen], "ephOffset": distance[chosen_pair] / ARCSEC,
               "ephOffsetRa": offset_ra / ARCSEC, "ephOffsetDec": offset_dec / ARCSEC,
               "diaDistanceRank": rank[chosen_pair]}
    table = pa.Table.from_arrays([pa.array(columns[f.name], type=f.type) for f in SS_SOURCE_SCHEMA],
                                 schema=SS_SOURCE_SCHEMA)
    return rows, ss_ids[chosen], table


def _sources(dia_sources: pa.Table) -> dict[str, NDArray]:
    """The DiaSource columns association reads, checked, in diaSourceId order (``order``: input rows)."""
    _check_columns(dia_sources, REQUIRED_SOURCE_COLUMNS, "DiaSources")
    ids = _column(dia_sources, "diaSourceId", np.int64)
    order = _sorting(ids, "diaSourceIds")
    columns: dict[str, NDArray] = {"order": order, "diaSourceId": ids[order]}
    for name, default in (("midpointMjdTai", None), ("ra", None), ("dec", None), ("raErr", None),
                          ("decErr", None), ("psfFlux", None), ("psfFluxErr", None), ("ra_dec_Cov", 0.0),
                          ("scienceFlux", np.nan), ("scienceFluxErr", np.nan)):
        columns[name] = _column(dia_sources, name, np.float64, default)[order]
    _check_positions(columns["ra"], columns["dec"], "DiaSources")
    if not np.all(np.isfinite(columns["midpointMjdTai"])):
        raise AssociationError("DiaSources hold a midpointMjdTai that is null or not finite")
    bands = np.asarray(dia_sources.column("band").to_pylist(), dtype=object)[order]
    unknown = sorted({str(band) for band in bands} - set(BANDS))
    if unknown:
        raise AssociationError(f"DiaSources hold unknown band {', '.join(unknown)}; "
                               f"bands: {', '.join(BANDS)}")
    columns["band"] = bands
    columns["visit"] = split_dia_source_id(columns["diaSourceId"])[0]
    return columns


def _already_folded(source_ids: NDArray[np.int64], last_source: NDArray[np.int64],
                    candidates: NDArray[np.bool_]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Sources (rows) that are the last DiaSource of an object (its row): this batch, run again."""
    rows = np.flatnonzero(candidates)
    if last_source.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    by_last = np.argsort(last_source, kind="stable")
    at = np.minimum(np.searchsorted(last_source[by_last], source_ids[rows]), last_source.size - 1)
    hit = last_source[by_last][at] == source_ids[rows]
    return rows[hit], by_last[at[hit]]


def run(dia_sources: pa.Table, dia_objects: pa.Table | None = None, ss_predictions: pa.Table | None = None,
        config: AssociationConfig | None = None) -> AssociationResult:
    """Associate DiaSources with DiaObjects and solar-system objects, and update the DiaObjects.

    Parameters
    ----------
    dia_sources : pyarrow.Table
        DiaSources of one batch, APDB columns
        (:data:`dmstream.payloads.diasource.SCHEMA`); at least
        :data:`REQUIRED_SOURCE_COLUMNS`.  Positions in deg, errors in deg
        (RA·cos Dec), fluxes in nJy; ``diaSourceId`` packed by
        :mod:`dmstream.payloads.ids`.
    dia_objects : pyarrow.Table, optional
        The state of every DiaObject any of the sources can match
        (:data:`STATE_SCHEMA`, e.g. the ``state`` of earlier results), in any
        row order.  Objects farther than ``match_radius`` from every source
        are passed over.  None: no DiaObjects yet.
    ss_predictions : pyarrow.Table, optional
        Solar-system objects' predicted positions at the visit's midpoint:
        ``ssObjectId``, ``ra``, ``dec`` (deg), as :func:`ss_predictions_at` gives them.
    config : AssociationConfig, optional

    Returns
    -------
    AssociationResult
        Depends only on the inputs, not on their row order.

    Raises
    ------
    AssociationError
        If a column is missing, ids repeat, a band is unknown, or a position
        or midpoint is not finite.
    """
    config = config or AssociationConfig()
    sources = _sources(dia_sources)
    n = sources["diaSourceId"].size
    state = empty_state() if dia_objects is None else dia_objects
    _check_columns(state, STATE_SCHEMA.names, "DiaObjects")
    stored_ids = _column(state, "diaObjectId", np.int64)
    object_order = _sorting(stored_ids, "diaObjectIds")
    object_ra = _column(state, "ra", np.float64)[object_order]
    object_dec = _column(state, "dec", np.float64)[object_order]
    _check_positions(object_ra, object_dec, "DiaObjects")
    last_source = _column(state, "lastDiaSourceId", np.int64)[object_order]

    ss_rows, ss_object_ids, ss_sources = _attribute_solar_system(
        sources["diaSourceId"], sources["ra"], sources["dec"], ss_predictions,
        config.ss_match_radius * ARCSEC)
    open_source = np.ones(n, bool)
    open_source[ss_rows] = False

    folded_rows, folded_objects = _already_folded(sources["diaSourceId"], last_source, open_source)
    open_source[folded_rows] = False

    open_rows = np.flatnonzero(open_source)
    first, second, distance = candidate_pairs(sources["ra"][open_rows], sources["dec"][open_rows], object_ra,
                                              object_dec, config.match_radius * ARCSEC)
    # An object a DiaSource of the same visit has joined is taken, whichever batch that was in.
    taken = split_dia_source_id(last_source)[0][second] == sources["visit"][open_rows][first]
    taken |= np.isin(second, folded_objects)
    first, second, distance = first[~taken], second[~taken], distance[~taken]
    matched_source, matched_object = assign(first, second, distance, open_rows.size, object_ra.size)
    matched_rows = open_rows[matched_source]
    new_rows = np.setdiff1d(open_rows, matched_rows)

    existing = np.concatenate([matched_object, folded_objects])
    objects = _Objects(state.take(object_order[existing]))
    created = _Objects.created_at(sources["diaSourceId"][new_rows], sources["ra"][new_rows],
                                  sources["dec"][new_rows])
    for name, values in created.columns.items():
        objects.columns[name] = np.concatenate([objects.columns[name], values])
    fold_rows = np.concatenate([matched_rows, new_rows])
    fold_objects = np.concatenate([np.arange(matched_rows.size),
                                   existing.size + np.arange(new_rows.size)])
    objects.fold_positions(fold_objects, sources["ra"][fold_rows], sources["dec"][fold_rows],
                           _information(sources["raErr"][fold_rows], sources["decErr"][fold_rows],
                                        sources["ra_dec_Cov"][fold_rows]))
    objects.fold_sources(fold_objects, sources["diaSourceId"][fold_rows],
                         sources["midpointMjdTai"][fold_rows], sources["band"][fold_rows],
                         {name: sources[name][fold_rows]
                          for name in ("psfFlux", "psfFluxErr", "scienceFlux", "scienceFluxErr")})
    objects.derive()

    object_of = np.zeros(n, np.int64)
    object_of[np.concatenate([matched_rows, folded_rows])] = objects["diaObjectId"][:existing.size]
    object_of[new_rows] = sources["diaSourceId"][new_rows]
    ss_of = np.zeros(n, np.int64)
    ss_of[ss_rows] = ss_object_ids
    attributed = np.zeros(n, bool)
    attributed[ss_rows] = True
    # Objects whose last DiaSource is the one that created them: the new ones, and those a source
    # folded in by an earlier run of this batch created then.
    is_created = objects["diaObjectId"] == objects["lastDiaSourceId"]
    by_id = np.argsort(objects["diaObjectId"], kind="stable")
    state_rows = objects.table(by_id)
    official = state_rows.select(OBJECT_SCHEMA.names).cast(OBJECT_SCHEMA)
    created_mask = pa.array(is_created[by_id])

    in_input_order = np.empty(n, np.int64)
    in_input_order[sources["order"]] = np.arange(n)
    with_ids = dia_sources.drop_columns([c for c in ("diaObjectId", "ssObjectId")
                                         if c in dia_sources.column_names])
    attributed = attributed[in_input_order]
    with_ids = with_ids.append_column("diaObjectId", pa.array(object_of[in_input_order], pa.int64(),
                                                              mask=attributed))
    with_ids = with_ids.append_column("ssObjectId", pa.array(ss_of[in_input_order], pa.int64(),
                                                             mask=~attributed))
    new_count = int(is_created.sum())
    return AssociationResult(
        dia_sources=with_ids, updated=official.filter(pc.invert(created_mask)),
        created=official.filter(created_mask), state=state_rows, ss_sources=ss_sources,
        matched=n - ss_rows.size - new_count, new=new_count, solar_system=int(ss_rows.size))


def trim_history(history: pa.Table, mjd: float, config: AssociationConfig | None = None) -> pa.Table:
    """DiaObjects' DiaSource or DiaForcedSource history, cut to what the stream keeps.

    Parameters
    ----------
    history : pyarrow.Table
        Rows with ``diaObjectId`` and ``midpointMjdTai`` (any other columns).
    mjd : float
        The current visit's midpoint, MJD TAI.
    config : AssociationConfig, optional
        ``history_days`` and ``max_history``.

    Returns
    -------
    pyarrow.Table
        Rows at or after ``mjd - history_days``, the latest ``max_history``
        of each object, by object then time.
    """
    config = config or AssociationConfig()
    _check_columns(history, ("diaObjectId", "midpointMjdTai"), "history rows")
    times = _column(history, "midpointMjdTai", np.float64)
    recent = np.flatnonzero(times >= mjd - config.history_days)
    objects = _column(history, "diaObjectId", np.int64)[recent]
    latest_first = recent[np.lexsort((-times[recent], objects))]
    sorted_objects = _column(history, "diaObjectId", np.int64)[latest_first]
    rank = np.arange(latest_first.size) - np.searchsorted(sorted_objects, sorted_objects, side="left")
    kept = latest_first[rank < config.max_history]
    kept = kept[np.lexsort((times[kept], _column(history, "diaObjectId", np.int64)[kept]))]
    return history.take(pa.array(kept, pa.int64()))


def ss_predictions_at(ephemeris: pa.Table, mjd: float) -> pa.Table:
    """Predicted positions of solar-system objects at a time, from an ephemeris sampled in time.

    Between its two samples around ``mjd`` an object moves along the great
    circle through them at a constant rate (spherical linear interpolation),
    exactly as the simulator's objects do.  Objects with no sample at or
    before and at or after ``mjd`` are left out.

    Parameters
    ----------
    ephemeris : pyarrow.Table
        ``sso_id``, ``mjd`` (MJD TAI), ``ra``, ``dec`` (deg): the simulator's
        ephemeris (:meth:`dmstream.streams.sky.Sky.ephemeris_table`, the
        recorded night's ``ssobjects`` truth table).
    mjd : float
        MJD TAI, the visit's midpoint.

    Returns
    -------
    pyarrow.Table
        ``ssObjectId``, ``ra``, ``dec``, one row per object, by ssObjectId.
    """
    _check_columns(ephemeris, ("sso_id", "mjd", "ra", "dec"), "ephemeris rows")
    ids, times = _column(ephemeris, "sso_id", np.int64), _column(ephemeris, "mjd", np.float64)
    order = np.lexsort((times, ids))
    ids, times = ids[order], times[order]
    vectors = unit_vectors(_column(ephemeris, "ra", np.float64)[order], _column(ephemeris, "dec",
                                                                                np.float64)[order])
    around = np.flatnonzero((ids[:-1] == ids[1:]) & (times[:-1] <= mjd) & (times[1:] >= mjd))
    _, first_of_object = np.unique(ids[around], return_index=True)
    start = around[first_of_object]
    before, after = vectors[start], vectors[start + 1]
    span = times[start + 1] - times[start]
    fraction = np.where(span > 0, (mjd - times[start]) / np.where(span > 0, span, 1.0), 0.0)
    angle = np.arccos(np.clip(np.sum(before * after, axis=1), -1.0, 1.0))
    moving = angle > 1e-15
    sin_angle = np.where(moving, np.sin(angle), 1.0)
    weight_before = np.where(moving, np.sin((1 - fraction) * angle) / sin_angle, 1 - fraction)
    weight_after = np.where(moving, np.sin(fraction * angle) / sin_angle, fraction)
    position = weight_before[:, None] * before + weight_after[:, None] * after
    ra = np.degrees(np.arctan2(position[:, 1], position[:, 0])) % 360.0
    dec = np.degrees(np.arctan2(position[:, 2], np.hypot(position[:, 0], position[:, 1])))
    return pa.table({"ssObjectId": pa.array(ids[start], pa.int64()), "ra": pa.array(ra),
                     "dec": pa.array(dec)})
