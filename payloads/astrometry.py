"""Astrometric calibration of a CCD: match its stars to a reference catalogue and fit a TAN-SIP WCS.

1. The reference stars are moved by their proper motions to the epoch of the
   exposure and put on the pixel grid by the approximate (boresight) WCS.
2. Matching by voting: for each trial rotation of the reference positions
   about the detector centre, every (detection, reference) pair closer than the
   largest expected pointing error votes for its offset in a 2-D histogram;
   the true rotation and offset collect one vote per star while wrong pairs
   scatter.  This tolerates arcseconds of offset and a fraction of a degree of
   rotation with no need for the two lists to agree in brightness.
3. Nearest-neighbour matches under the voted transform, refined by affine fits
   with a shrinking match radius.
4. A linear least-squares fit of a polynomial from pixels to the gnomonic
   plane about the boresight (the approximate WCS's tangent point), of a
   degree the number of matches affords; outliers are clipped and the matches
   redone with each new solution.  The solution is written as a TAN-SIP WCS
   about the detector centre: CD and SIP A/B from a fit on a dense grid, the
   inverse AP/BP likewise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from astropy.wcs import WCS, Sip
from numpy.typing import ArrayLike, NDArray
from scipy.spatial import cKDTree

_MJD_J2000 = 51544.5
_MAS_PER_DEG = 3.6e6


@dataclass(frozen=True)
class AstrometryConfig:
    """How stars are matched and the WCS fitted.

    Attributes
    ----------
    max_offset : float
        Largest pointing error of the approximate WCS searched, arcsec.
    max_rotation : float
        Largest rotation error searched, deg.
    vote_bin : float
        Bin of the offset histogram, pixels.
    max_detections, max_references : int
        Brightest detections and references that vote.
    match_radius : float
        Final match radius, arcsec.
    fit_degree : int
        Degree of the pixel → tangent-plane polynomial about the boresight (1 =
        plain TAN, enough without optical distortion); lowered when there are
        too few matches.
    sip_order : int
        Order of the SIP terms that represent the fit about the detector centre.
    matches_per_term : float
        Matches needed per coefficient of each axis to keep a degree.
    clip : float
        Matches whose residual exceeds this many robust sigmas are dropped.
    min_clip : float
        Residuals below this are never clipped, arcsec.
    iterations : int
        Fit, clip and re-match rounds.
    """

    max_offset: float = 10.0
    max_rotation: float = 1.0
    vote_bin: float = 2.0
    max_detections: int = 300
    max_references: int = 200
    match_radius: float = 0.5
    fit_degree: int = 2
    sip_order: int = 3
    matches_per_term: float = 3.0
    clip: float = 3.0
    min_clip: float = 0.05
    iterations: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.fit_degree <= 5 or not self.fit_degree <= max(self.sip_order, 1) <= 5:
            raise ValueError("need 1 <= fit_degree <= max(sip_order, 1) <= 5")


@dataclass(frozen=True)
class AstrometryResult:
    """A fitted WCS and the matches behind it.

    Attributes
    ----------
    wcs : astropy.wcs.WCS
        TAN-SIP, 0-based pixels as astropy uses them.
    detection_index, reference_index : numpy.ndarray of int
        Matched pairs kept in the final fit (rows of the inputs).
    scatter_mas : float
        RMS distance between matched stars and their references (both axes
        together, i.e. sqrt(<Δα*² + Δδ²>)), mas.
    offset_arcsec : float
        How far the approximate WCS was from the fit at the detector centre, arcsec.
    rotation_deg : float
        Rotation of the fit relative to the approximate WCS, deg.
    degree : int
        Degree of the fitted polynomial.
    """

    wcs: WCS
    detection_index: NDArray[np.intp]
    reference_index: NDArray[np.intp]
    scatter_mas: float
    offset_arcsec: float
    rotation_deg: float
    degree: int

    @property
    def matched(self) -> int:
        return int(self.detection_index.size)


def reference_positions(refcat: pa.Table, epoch_mjd: float
                        ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """RA, Dec (deg) of reference stars moved by proper motion from ``ref_epoch`` to ``epoch_mjd``.

    Parallax is ignored (≲1 mas for the stars a CCD calibrates on).
    """
    ra = refcat["ra"].to_numpy()
    dec = refcat["dec"].to_numpy()
    years = 2000.0 + (epoch_mjd - _MJD_J2000) / 365.25 - refcat["ref_epoch"].to_numpy()
    pmra = np.nan_to_num(refcat["pmra"].to_numpy(zero_copy_only=False))
    pmdec = np.nan_to_num(refcat["pmdec"].to_numpy(zero_copy_only=False))
    # pmra is μα* = μα cos δ (Gaia's convention).
    new_dec = dec + pmdec * years / _MAS_PER_DEG
    new_ra = (ra + pmra * years / _MAS_PER_DEG / np.cos(np.radians(dec))) % 360.0
    return new_ra, new_dec


def gnomonic(ra: ArrayLike, dec: ArrayLike, ra0: float, dec0: float
             ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Tangent-plane coordinates (ξ East, η North) about (ra0, dec0), deg."""
    a, d = np.radians(np.asarray(ra, dtype=float) - ra0), np.radians(np.asarray(dec, dtype=float))
    d0 = np.radians(dec0)
    denominator = np.sin(d) * np.sin(d0) + np.cos(d) * np.cos(d0) * np.cos(a)
    xi = np.cos(d) * np.sin(a) / denominator
    eta = (np.sin(d) * np.cos(d0) - np.cos(d) * np.sin(d0) * np.cos(a)) / denominator
    return np.degrees(xi), np.degrees(eta)


def inverse_gnomonic(xi: ArrayLike, eta: ArrayLike, ra0: float, dec0: float
                     ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """RA, Dec (deg) of tangent-plane coordinates (deg) about (ra0, dec0)."""
    x, y = np.radians(np.asarray(xi, dtype=float)), np.radians(np.asarray(eta, dtype=float))
    d0 = np.radians(dec0)
    denominator = np.cos(d0) - y * np.sin(d0)
    ra = ra0 + np.degrees(np.arctan2(x, denominator))
    dec = np.degrees(np.arctan2(np.sin(d0) + y * np.cos(d0), np.hypot(x, denominator)))
    return ra % 360.0, dec


def _terms(u: NDArray[np.float64], v: NDArray[np.float64], degree: int, lowest: int = 0
           ) -> tuple[NDArray[np.float64], list[tuple[int, int]]]:
    powers = [(p, total - p) for total in range(lowest, degree + 1) for p in range(total, -1, -1)]
    return np.stack([u**p * v**q for p, q in powers], axis=-1), powers


def _design(x: NDArray[np.float64], y: NDArray[np.float64], centre: tuple[float, float], scale: float,
            degree: int, lowest: int = 0) -> tuple[NDArray[np.float64], list[tuple[int, int]]]:
    return _terms((x - centre[0]) / scale, (y - centre[1]) / scale, degree, lowest)


def fit_tan_sip(x: ArrayLike, y: ArrayLike, ra: ArrayLike, dec: ArrayLike, tangent: tuple[float, float],
                shape: tuple[int, int], degree: int = 1, weights: ArrayLike | None = None,
                sip_order: int = 3) -> WCS:
    """Least-squares astrometric solution through matched pixel and sky positions, as a TAN-SIP WCS.

    The model is a polynomial of ``degree`` from pixels to the gnomonic plane
    about ``tangent`` (the optical axis, where the projection is physically
    gnomonic; degree 1 is a plain TAN there).  An off-axis CCD seen through a
    TAN about its own centre shows a second-order distortion of tens of mas, so
    the model is then written as a TAN about the detector centre with SIP terms
    of ``sip_order`` fitted to it on a dense grid over the detector.

    Parameters
    ----------
    x, y : array_like
        0-based pixel positions.
    ra, dec : array_like
        Sky positions, deg.
    tangent : tuple of float
        Tangent point (RA, Dec) of the model, deg: the boresight.
    shape : tuple of int
        (rows, cols) of the detector.
    degree : int
        Degree of the pixel → tangent-plane polynomial (1-5).
    weights : array_like, optional
        Per-star weights (inverse variances).
    sip_order : int
        Order of the SIP terms of the returned WCS (≥ ``degree``; 0 for a
        plain TAN about the centre, exact only for an on-axis detector).

    Returns
    -------
    astropy.wcs.WCS
    """
    x, y, ra, dec = (np.asarray(v, dtype=float) for v in (x, y, ra, dec))
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float)
    rows, cols = shape
    centre = ((cols - 1) / 2, (rows - 1) / 2)
    # Pixel offsets scaled to ~[-1, 1] keep the normal equations well conditioned.
    scale = max(centre[0], centre[1], 1.0)
    design, _ = _design(x, y, centre, scale, degree)
    sqrt_w = np.sqrt(w)[:, None]
    xi, eta = gnomonic(ra, dec, *tangent)
    model = np.linalg.lstsq(design * sqrt_w, np.stack([xi, eta], axis=1) * sqrt_w, rcond=None)[0]

    # The model on a grid over the whole detector, as sky positions.
    gx, gy = (g.ravel() for g in np.meshgrid(np.linspace(-0.5, cols - 0.5, 21),
                                             np.linspace(-0.5, rows - 0.5, 21)))
    grid_ra, grid_dec = inverse_gnomonic(*(_design(gx, gy, centre, scale, degree)[0] @ model).T, *tangent)
    crval = inverse_gnomonic(*(_design(np.array([centre[0]]), np.array([centre[1]]), centre, scale, degree)[0]
                               @ model)[0], *tangent)
    # Representation: TAN about the centre; the polynomial has no constant term since CRVAL is its image.
    order = max(sip_order, 1)
    gxi, geta = gnomonic(grid_ra, grid_dec, float(crval[0]), float(crval[1]))
    terms, powers = _design(gx, gy, centre, scale, order, lowest=1)
    solution = np.linalg.lstsq(terms, np.stack([gxi, geta], axis=1), rcond=None)[0]
    solution /= scale ** np.array([p + q for p, q in powers])[:, None]
    cd = solution[:2].T  # rows: ξ, η; columns: u, v
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [float(crval[0]), float(crval[1])]
    wcs.wcs.crpix = [centre[0] + 1.0, centre[1] + 1.0]
    wcs.wcs.cd = cd
    wcs.wcs.radesys = "ICRS"
    if order < 2:
        wcs.wcs.set()
        return wcs
    higher = np.linalg.solve(cd, solution[2:].T)  # CD⁻¹ · (ξ, η) parts of order ≥ 2, per pixel^(p+q)
    a, b = np.zeros((order + 1, order + 1)), np.zeros((order + 1, order + 1))
    for k, (p, q) in enumerate(powers[2:]):
        a[p, q], b[p, q] = higher[0, k], higher[1, k]
    # Inverse polynomial (AP, BP), one order higher, fitted on the same grid.
    u, v = gx - centre[0], gy - centre[1]
    forward, _ = _terms(u, v, order, lowest=2)
    big_u, big_v = u + forward @ higher[0], v + forward @ higher[1]
    inverse, inverse_powers = _terms(big_u / scale, big_v / scale, order + 1, lowest=1)
    coeffs = np.linalg.lstsq(inverse, np.stack([u - big_u, v - big_v], axis=1), rcond=None)[0]
    coeffs /= scale ** np.array([p + q for p, q in inverse_powers])[:, None]
    ap, bp = np.zeros((order + 2, order + 2)), np.zeros((order + 2, order + 2))
    for k, (p, q) in enumerate(inverse_powers):
        ap[p, q], bp[p, q] = coeffs[k, 0], coeffs[k, 1]
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    wcs.sip = Sip(a, b, ap, bp, wcs.wcs.crpix)
    wcs.wcs.set()
    return wcs


def _vote(det_x: NDArray[np.float64], det_y: NDArray[np.float64], ref_x: NDArray[np.float64],
          ref_y: NDArray[np.float64], centre: tuple[float, float], max_offset_px: float, max_rotation: float,
          bin_px: float) -> tuple[float, float, float, int]:
    """Best (rotation rad, dx, dy) taking reference pixels onto detections, and its votes."""
    reach = max(np.hypot(ref_x - centre[0], ref_y - centre[1]).max(), 1.0)
    step = bin_px / reach
    angles = np.arange(-max_rotation, max_rotation + step / 2, step) if max_rotation > 0 else np.zeros(1)
    edges = np.arange(-max_offset_px - bin_px, max_offset_px + 1.5 * bin_px, bin_px)
    tree = cKDTree(np.stack([det_x, det_y], axis=1))
    best = (0.0, 0.0, 0.0, -1)
    ux, uy = ref_x - centre[0], ref_y - centre[1]
    for angle in angles:
        c, s = np.cos(angle), np.sin(angle)
        rx, ry = centre[0] + c * ux - s * uy, centre[1] + s * ux + c * uy
        pairs = tree.query_ball_point(np.stack([rx, ry], axis=1), max_offset_px * np.sqrt(2))
        lengths = np.fromiter((len(p) for p in pairs), dtype=np.intp, count=len(pairs))
        if lengths.sum() == 0:
            continue
        ref_index = np.repeat(np.arange(len(pairs)), lengths)
        det_index = np.concatenate([np.asarray(p, dtype=np.intp) for p in pairs if p])
        hist, _, _ = np.histogram2d(det_x[det_index] - rx[ref_index], det_y[det_index] - ry[ref_index],
                                    bins=(edges, edges))
        # Sum 2x2 neighbouring bins so that a peak on a bin edge is not split in two.
        pooled = hist[:-1, :-1] + hist[1:, :-1] + hist[:-1, 1:] + hist[1:, 1:]
        i, j = np.unravel_index(np.argmax(pooled), pooled.shape)
        votes = int(pooled[i, j])
        if votes > best[3]:
            best = (float(angle), float(edges[i + 1]), float(edges[j + 1]), votes)
    return best


def _nearest(det_x: NDArray[np.float64], det_y: NDArray[np.float64], ref_x: NDArray[np.float64],
             ref_y: NDArray[np.float64], radius: float) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """One-to-one nearest pairs (detection, reference) closer than ``radius``."""
    if ref_x.size == 0 or det_x.size == 0:
        return np.empty(0, np.intp), np.empty(0, np.intp)
    distance, det = cKDTree(np.stack([det_x, det_y], axis=1)).query(np.stack([ref_x, ref_y], axis=1),
                                                                     distance_upper_bound=radius)
    ref = np.flatnonzero(np.isfinite(distance))
    det, distance = det[ref], distance[ref]
    # A detection claimed by two references keeps the nearer one.
    order = np.lexsort((distance, det))
    first = np.ones(order.size, dtype=bool)
    first[1:] = det[order][1:] != det[order][:-1]
    keep = order[first]
    return det[keep], ref[keep]


def _affine(src_x: NDArray[np.float64], src_y: NDArray[np.float64], dst_x: NDArray[np.float64],
            dst_y: NDArray[np.float64]) -> NDArray[np.float64]:
    """(3, 2) least-squares affine map from src to dst."""
    design = np.stack([np.ones_like(src_x), src_x, src_y], axis=1)
    return np.linalg.lstsq(design, np.stack([dst_x, dst_y], axis=1), rcond=None)[0]


def _apply_affine(matrix: NDArray[np.float64], x: NDArray[np.float64], y: NDArray[np.float64]
                  ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    out = np.stack([np.ones_like(x), x, y], axis=1) @ matrix
    return out[:, 0], out[:, 1]


def _degree_for(matches: int, wanted: int, per_term: float) -> int:
    for degree in range(wanted, 1, -1):
        if matches >= per_term * (degree + 1) * (degree + 2) / 2:
            return degree
    return 1


def _sky_residuals(wcs: WCS, x: NDArray[np.float64], y: NDArray[np.float64], ra: NDArray[np.float64],
                   dec: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(Δα cos δ, Δδ) of fitted minus reference positions, arcsec."""
    fit_ra, fit_dec = wcs.pixel_to_world_values(x, y)
    d_ra = ((fit_ra - ra + 180.0) % 360.0 - 180.0) * np.cos(np.radians(dec)) * 3600.0
    return d_ra, (fit_dec - dec) * 3600.0


def solve_astrometry(x: ArrayLike, y: ArrayLike, flux: ArrayLike, position_error: ArrayLike,
                     approx_wcs: WCS, ref_ra: ArrayLike, ref_dec: ArrayLike, ref_mag: ArrayLike,
                     shape: tuple[int, int], config: AstrometryConfig | None = None) -> AstrometryResult:
    """Match detections to reference stars and fit a TAN-SIP WCS.

    Parameters
    ----------
    x, y : array_like
        Centroids of detections, 0-based pixels.
    flux : array_like
        Their fluxes (any unit): the brightest vote.
    position_error : array_like
        Centroid errors, pixels (weights of the fit).
    approx_wcs : astropy.wcs.WCS
        Starting WCS (e.g. from the boresight), good to ``max_offset`` and ``max_rotation``.
    ref_ra, ref_dec : array_like
        Reference positions at the epoch of the exposure, deg.
    ref_mag : array_like
        Reference magnitudes (the brightest vote).
    shape : tuple of int
        (rows, cols) of the detector.
    config : AstrometryConfig, optional

    Returns
    -------
    AstrometryResult

    Raises
    ------
    ValueError
        When fewer than 4 stars match.
    """
    config = config or AstrometryConfig()
    x, y, flux, err = (np.asarray(v, dtype=float) for v in (x, y, flux, position_error))
    ref_ra, ref_dec, ref_mag = (np.asarray(v, dtype=float) for v in (ref_ra, ref_dec, ref_mag))
    rows, cols = shape
    centre = ((cols - 1) / 2, (rows - 1) / 2)
    pixel_scale = float(np.sqrt(abs(np.linalg.det(approx_wcs.pixel_scale_matrix)))) * 3600.0
    max_offset_px = config.max_offset / pixel_scale

    px, py = (np.asarray(v, dtype=float) for v in approx_wcs.world_to_pixel_values(ref_ra, ref_dec))
    margin = max_offset_px + np.radians(config.max_rotation) * np.hypot(*centre)
    near = np.flatnonzero((px > -margin) & (px < cols - 1 + margin) & (py > -margin)
                          & (py < rows - 1 + margin) & np.isfinite(px) & np.isfinite(py))
    voters_ref = near[np.argsort(ref_mag[near])[:config.max_references]]
    voters_det = np.argsort(-flux)[:config.max_detections]
    angle, shift_x, shift_y, votes = _vote(x[voters_det], y[voters_det], px[voters_ref], py[voters_ref],
                                           centre, max_offset_px, np.radians(config.max_rotation),
                                           config.vote_bin)
    if votes < 4:
        raise ValueError(f"astrometric matching failed: {votes} votes")

    # Voted transform, then affine refinements with a shrinking radius, all in pixels.
    c, s = np.cos(angle), np.sin(angle)
    matrix = np.array([[centre[0] - c * centre[0] + s * centre[1] + shift_x,
                        centre[1] - s * centre[0] - c * centre[1] + shift_y],
                       [c, s], [-s, c]])
    for radius in (2.0 * config.vote_bin, config.vote_bin, 2.0 * config.match_radius / pixel_scale):
        mx, my = _apply_affine(matrix, px[near], py[near])
        det, ref = _nearest(x, y, mx, my, radius)
        if det.size < 4:
            raise ValueError(f"astrometric matching failed: {det.size} matches")
        matrix = _affine(px[near][ref], py[near][ref], x[det], y[det])

    det_all, ref_all = det, near[ref]
    keep = np.ones(det_all.size, dtype=bool)
    wcs = approx_wcs
    degree = 1
    # The approximate WCS's tangent point is the boresight (or, failing that, as good a guess as any).
    tangent = (float(approx_wcs.wcs.crval[0]), float(approx_wcs.wcs.crval[1]))
    # A floor on the centroid error keeps the brightest stars from owning the fit.
    weights_all = 1.0 / (np.maximum(err, 0.01) ** 2)
    for _ in range(config.iterations):
        degree = _degree_for(int(keep.sum()), config.fit_degree, config.matches_per_term)
        d, r = det_all[keep], ref_all[keep]
        wcs = fit_tan_sip(x[d], y[d], ref_ra[r], ref_dec[r], tangent, shape, degree, weights_all[d],
                          config.sip_order)
        # Re-match all candidates near the new solution, then clip.
        mx, my = (np.asarray(v, dtype=float) for v in wcs.world_to_pixel_values(ref_ra[near], ref_dec[near]))
        det_all, ref_index = _nearest(x, y, mx, my, config.match_radius / pixel_scale)
        ref_all = near[ref_index]
        if det_all.size < 4:
            raise ValueError(f"astrometric fit failed: {det_all.size} matches")
        d_ra, d_dec = _sky_residuals(wcs, x[det_all], y[det_all], ref_ra[ref_all], ref_dec[ref_all])
        distance = np.hypot(d_ra, d_dec)
        sigma = 1.4826 * np.median(distance) / np.sqrt(np.log(4.0))  # Rayleigh median → per-axis sigma
        new_keep = distance <= max(config.clip * sigma, config.min_clip)
        if new_keep.sum() < 4:
            new_keep = np.ones_like(new_keep)
        if new_keep.size == keep.size and np.array_equal(new_keep, keep):
            break
        keep = new_keep
    d, r = det_all[keep], ref_all[keep]
    wcs = fit_tan_sip(x[d], y[d], ref_ra[r], ref_dec[r], tangent, shape, degree, weights_all[d],
                      config.sip_order)
    d_ra, d_dec = _sky_residuals(wcs, x[d], y[d], ref_ra[r], ref_dec[r])
    scatter = float(np.sqrt(np.mean(d_ra**2 + d_dec**2))) * 1000.0

    fit_ra, fit_dec = wcs.pixel_to_world_values(*centre)
    old_ra, old_dec = approx_wcs.pixel_to_world_values(*centre)
    offset = float(np.hypot(((fit_ra - old_ra + 180) % 360 - 180) * np.cos(np.radians(fit_dec)),
                            fit_dec - old_dec)) * 3600.0
    turn = np.arctan2(*_column_angle(wcs, centre)) - np.arctan2(*_column_angle(approx_wcs, centre))
    rotation = (float(np.degrees(turn)) + 180.0) % 360.0 - 180.0
    return AstrometryResult(wcs, d, r, scatter, offset, rotation, degree)


def _column_angle(wcs: WCS, centre: tuple[float, float]) -> tuple[float, float]:
    """(East, North) sky direction of the +y pixel axis at the centre, for comparing rotations."""
    ra, dec = wcs.pixel_to_world_values(np.array([centre[0], centre[0]]),
                                        np.array([centre[1], centre[1] + 100]))
    return float(((ra[1] - ra[0] + 180) % 360 - 180) * np.cos(np.radians(dec[0]))), float(dec[1] - dec[0])
