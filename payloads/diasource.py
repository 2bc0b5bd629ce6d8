"""Detection and measurement of DiaSources on a difference image.

Detection: connected pixels of the score image (a PSF-flux estimate at every
pixel, see :mod:`dmstream.payloads.subtract`) above ``threshold`` sigma,
positive and negative separately.  The local maxima of one region are one
source when they lie closer than ``deblend_separation`` FWHM, or when the
score between them never falls more than ``ridge_depth`` sigma below the lower
of the two: the noise bumps along a streak's ridge make one trailed source, a
real valley keeps two sources apart.

Measurement, vectorised over sources on fixed-size stamps, with PSF kernels
(at the sources, or interpolated from a coarse grid of positions when there
are many; normalised to the PSF's total light) moved by separable Fourier
(band-limited) shifts evaluated only on the stamp pixels:

- centroid: a least-squares PSF fit (flux and shift, Gauss-Newton from the
  score peak; the stamp follows the centroid when it leaves its pixel).  Sources
  whose stamps overlap are fitted together, by iterated subtraction of their
  neighbours' fitted models, so that a neighbour's light does not pull the
  centroid.  Errors are those of the Fisher matrix at the fitted position,
  widened by √(χ²/dof) where the PSF fits worse than the noise allows
  (unresolved blends, PSF-model errors of bright sources);
- psfFlux: the linear PSF fit at that centroid with the variance plane, on the
  deblended stamp; scienceFlux / templateFlux: the same fit, forced, on the
  science image and the PSF-matched template with their own PSFs;
- apFlux: 12-pixel-radius aperture (APDB definition), ``sep``;
- ixx, iyy, ixy: Gaussian-weighted moments (weight = PSF-sized Gaussian)
  corrected for the weight, i.e. the moments of a Gaussian with the same
  weighted moments (one step of adaptive moments), arcsec²;
- dipole (pairs of a positive and a negative peak within ``dipole_radius``):
  :func:`fit_dipoles`, a positive and a negative PSF fitted jointly (centre,
  separation vector, mean and difference of the lobes' fluxes);
- trail (sources elongated beyond the PSF, or whose peaks were joined along a
  ridge): :func:`fit_trails`, a PSF convolved with a line segment (flux,
  centre, length, angle);
- pixel flags from the mask in the footprint (1 FWHM radius) and the central
  3 x 3 pixels; a heuristic reliability from shape, flags and dipole-ness.

The output is a pyarrow Table whose columns carry the names, types and units
of the APDB ``DiaSource`` table of ``lsst-sdm-schemas`` (fluxes in nJy,
moments in arcsec², angles in degrees East of North).

Known limits, measured against injected truth: two sources closer than about
1.5 FWHM are one DiaSource whose centroid is their light-weighted mean (no
deblending into children); around sources brighter than SNR ~100 the ZOGY
difference's noise is anticorrelated (the science filter sharpens), which the
per-pixel variance does not say, so their position and flux errors are about
5-10 % too large.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import scipy.fft
import scipy.sparse
import scipy.sparse.csgraph
import sep
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from dmstream.payloads.image import CcdImage, PsfModel
from dmstream.payloads.masks import MaskPlane
from dmstream.payloads.photometry import AB_NJY_ZERO_POINT
from dmstream.payloads.subtract import SubtractResult

#: Version string stored with every reliability score.
RELIABILITY_VERSION = "dmstream-heuristic-1"

#: pixelFlags_* column suffix → mask planes that set it.
PIXEL_FLAG_PLANES = {
    "bad": MaskPlane.BAD,
    "cr": MaskPlane.CR,
    "edge": MaskPlane.EDGE | MaskPlane.NO_DATA,
    "nodata": MaskPlane.NO_DATA,
    "interpolated": MaskPlane.INTRP,
    "saturated": MaskPlane.SAT,
    "suspect": MaskPlane.SUSPECT,
    "streak": MaskPlane.STREAK,
    "injected": MaskPlane.INJECTED,
}
#: Mask planes whose pixels carry no measurement and get no weight in the fits.
UNFIT_PLANES = MaskPlane.NO_DATA | MaskPlane.SAT | MaskPlane.BAD
#: Pixels kept around the fitting stamps on the PSF kernels that are shifted: more than the largest
#: centroid shift (1.5) plus the reach of the band-limited interpolant's significant lobes.
_SHIFT_MARGIN = 8
#: Radius, in FWHM, within which a PSF model is taken to hold all of a point source's light.
_TOTAL_FLUX_FWHMS = 20.0
#: Regions with at most this many peaks have every pair checked for a ridge; larger ones only close pairs.
_ALL_PAIRS_LIMIT = 64
#: Largest centroid shift from the stamp's centre pixel, pixels.
_MAX_SHIFT = 1.5
#: Flags also measured on the central 3 x 3 pixels (``pixelFlags_<name>Center``).
CENTER_FLAGS = ("cr", "nodata", "interpolated", "saturated", "suspect", "streak", "injected")

_FLOAT = pa.float32()
#: Columns written, with APDB types.
SCHEMA = pa.schema(
    [("diaSourceId", pa.int64()), ("visit", pa.int64()), ("detector", pa.int16()),
     ("midpointMjdTai", pa.float64()), ("exposureTime", _FLOAT), ("band", pa.string()),
     ("ra", pa.float64()), ("raErr", _FLOAT), ("dec", pa.float64()), ("decErr", _FLOAT),
     ("ra_dec_Cov", _FLOAT), ("x", _FLOAT), ("xErr", _FLOAT), ("y", _FLOAT), ("yErr", _FLOAT),
     ("centroid_flag", pa.bool_()), ("apFlux", _FLOAT), ("apFluxErr", _FLOAT), ("apFlux_flag", pa.bool_()),
     ("apFlux_flag_apertureTruncated", pa.bool_()), ("isNegative", pa.bool_()), ("snr", _FLOAT),
     ("psfFlux", _FLOAT), ("psfFluxErr", _FLOAT), ("psfLnL", _FLOAT), ("psfChi2", _FLOAT),
     ("psfNdata", pa.int32()), ("psfFlux_flag", pa.bool_()), ("psfFlux_flag_edge", pa.bool_()),
     ("psfFlux_flag_noGoodPixels", pa.bool_()), ("trailFlux", _FLOAT), ("trailFluxErr", _FLOAT),
     ("trailRa", pa.float64()), ("trailRaErr", _FLOAT), ("trailDec", pa.float64()), ("trailDecErr", _FLOAT),
     ("trailLength", _FLOAT), ("trailLengthErr", _FLOAT), ("trailAngle", _FLOAT), ("trailAngleErr", _FLOAT),
     ("trailChi2", _FLOAT), ("trailNdata", pa.int32()), ("trail_flag", pa.bool_()),
     ("trail_flag_edge", pa.bool_()),
     ("dipoleMeanFlux", _FLOAT), ("dipoleMeanFluxErr", _FLOAT), ("dipoleFluxDiff", _FLOAT),
     ("dipoleFluxDiffErr", _FLOAT), ("dipoleLength", _FLOAT), ("dipoleAngle", _FLOAT),
     ("dipoleChi2", _FLOAT), ("dipoleNdata", pa.int32()), ("isDipole", pa.bool_()),
     ("dipoleFitAttempted", pa.bool_()), ("scienceFlux", _FLOAT), ("scienceFluxErr", _FLOAT),
     ("forced_PsfFlux_flag", pa.bool_()), ("templateFlux", _FLOAT), ("templateFluxErr", _FLOAT),
     ("ixx", _FLOAT), ("iyy", _FLOAT), ("ixy", _FLOAT), ("ixxPSF", _FLOAT), ("iyyPSF", _FLOAT),
     ("ixyPSF", _FLOAT), ("shape_flag", pa.bool_()), ("extendedness", _FLOAT), ("reliability", _FLOAT),
     ("reliabilityVersion", pa.string()), ("bboxSize", pa.int32()), ("pixelFlags", pa.bool_()),
     ("pixelFlags_offimage", pa.bool_()), ("pixelFlags_injected_template", pa.bool_()),
     ("pixelFlags_injected_templateCenter", pa.bool_())]
    + [(f"pixelFlags_{name}", pa.bool_()) for name in PIXEL_FLAG_PLANES]
    + [(f"pixelFlags_{name}Center", pa.bool_()) for name in CENTER_FLAGS])


@dataclass(frozen=True)
class DiaSourceConfig:
    """How to detect and measure.

    Attributes
    ----------
    threshold : float
        Detection threshold on the score SNR, in sigma (positive and negative).
    min_pixels : int
        Fewest pixels above threshold for a detection.
    stamp_fwhms : float
        Half-width of the fitting stamps, in difference-PSF FWHM.
    deblend_separation : float
        Closest two peaks of one region kept apart, FWHM.
    ridge_depth : float
        Two peaks of one region (within 3 ``deblend_separation``) are one
        source when the score on the straight line between them never falls
        more than this below the lower peak, in sigma.
    neighbour_iterations : int
        Rounds of refitting sources whose stamps overlap, each with its
        neighbours' latest models subtracted.
    dipole_radius : float
        Largest separation of a positive and a negative peak fitted as a dipole, FWHM.
    dipole_flux_prior : bool
        Constrain the dipole's mean lobe flux by forced PSF photometry of the
        science image at the positive lobe and of the template at the
        negative one.  Without it, a dipole narrower than the PSF only
        measures the product of flux and separation.
    dipole_significance : float
        isDipole needs both lobes' fluxes and the separation this many sigma from 0.
    dipole_position_floor : float
        Systematic error of each dipole lobe's position, pixels: resampling the
        template (Lanczos-3 moves a 0.7″ PSF by up to ~0.01 px depending on
        its sub-pixel phase) and PSF-model errors, which the pixel noise does
        not show; added in quadrature.
    aperture_radius : float
        Radius of apFlux, pixels (12 in the APDB definition).
    trail_min_excess, trail_noise_excess : float
        A source is fitted as a trail when its major-axis moment exceeds the
        PSF's by a factor ``trail_min_excess + trail_noise_excess / snr``
        (noise alone elongates about 10 % of point sources at SNR 10 by 1.6,
        1 % by 2.0), or when its peaks were joined along a ridge longer than
        ``deblend_separation``; and its SNR is at least ``trail_min_snr``.
    trail_min_snr : float
    trail_max_length : float
        Longest trail fitted, pixels; a longer streak (a satellite, which
        costs more to fit than the rest of the CCD) only gets ``trail_flag``.
    psf_grid : float
        Spacing of the nodes where the PSF models are evaluated when sources
        outnumber the nodes, pixels; kernels in between are bilinear
        interpolations of the four nearest.
    """

    threshold: float = 5.0
    min_pixels: int = 2
    stamp_fwhms: float = 2.0
    deblend_separation: float = 1.5
    ridge_depth: float = 3.0
    neighbour_iterations: int = 3
    dipole_radius: float = 2.0
    dipole_flux_prior: bool = True
    dipole_significance: float = 3.0
    dipole_position_floor: float = 0.01
    aperture_radius: float = 12.0
    trail_min_excess: float = 1.3
    trail_noise_excess: float = 12.0
    trail_min_snr: float = 10.0
    trail_max_length: float = 250.0
    psf_grid: float = 512.0


@dataclass
class DiaSourceResult:
    """Detected and measured DiaSources.

    Attributes
    ----------
    table : pyarrow.Table
        One row per DiaSource, columns of ``SCHEMA``.
    positive, negative : int
        Sources found above and below threshold (before dipole merging).
    dipole_length_err, dipole_angle_err : numpy.ndarray
        Per row, the errors of dipoleLength (arcsec) and dipoleAngle (deg),
        which the APDB schema has no columns for; NaN where no dipole was fitted.
    """

    table: pa.Table
    positive: int
    negative: int
    dipole_length_err: np.ndarray
    dipole_angle_err: np.ndarray


@dataclass
class Detections:
    """Sources found by :func:`detect`, one peak each.

    Attributes
    ----------
    x, y : numpy.ndarray
        Integer pixels of the highest peak of each source.
    sign : numpy.ndarray
        +1 or -1.
    snr : numpy.ndarray
        Score SNR at the peak (signed).
    bbox : numpy.ndarray
        Side of the square bounding the source's region, pixels.
    ends : numpy.ndarray
        (n, 2, 2): the two peaks of the source farthest apart, ((x0, y0), (x1,
        y1)); both the peak itself when the source has one.
    """

    x: np.ndarray
    y: np.ndarray
    sign: np.ndarray
    snr: np.ndarray
    bbox: np.ndarray
    ends: np.ndarray

    @property
    def span(self) -> np.ndarray:
        """Distance between the ends, pixels."""
        return np.hypot(*(self.ends[:, 1] - self.ends[:, 0]).T)


@dataclass
class DipoleFit:
    """Joint fits of a positive and a negative PSF (:func:`fit_dipoles`), one per pair.

    Positions in pixels, fluxes in electrons of the difference image.

    Attributes
    ----------
    x, y : numpy.ndarray
        Midpoint of the lobes.
    centre_covariance : numpy.ndarray
        (n, 2, 2) covariance of (x, y), pixels².
    separation_x, separation_y : numpy.ndarray
        Positive lobe minus negative lobe.
    separation_covariance : numpy.ndarray
        (n, 2, 2), pixels².
    mean_flux, mean_flux_err, flux_diff, flux_diff_err : numpy.ndarray
        Mean of the two lobes' (absolute) fluxes, and positive minus negative.
    positive_flux_snr, negative_flux_snr : numpy.ndarray
        Each lobe's flux over its error.
    chi2 : numpy.ndarray
        Of the difference pixels (not counting the flux constraint).
    ndata : numpy.ndarray
        Pixels used.
    converged : numpy.ndarray
    """

    x: np.ndarray
    y: np.ndarray
    centre_covariance: np.ndarray
    separation_x: np.ndarray
    separation_y: np.ndarray
    separation_covariance: np.ndarray
    mean_flux: np.ndarray
    mean_flux_err: np.ndarray
    flux_diff: np.ndarray
    flux_diff_err: np.ndarray
    positive_flux_snr: np.ndarray
    negative_flux_snr: np.ndarray
    chi2: np.ndarray
    ndata: np.ndarray
    converged: np.ndarray

    @property
    def length(self) -> np.ndarray:
        """Lobe separation, pixels."""
        return np.hypot(self.separation_x, self.separation_y)

    @property
    def length_err(self) -> np.ndarray:
        """Error of ``length`` (its gradient through the separation covariance), pixels."""
        length = np.maximum(self.length, 1e-12)[:, None]
        unit = np.stack([self.separation_x, self.separation_y], axis=1) / length
        return np.sqrt(np.einsum("ni,nij,nj->n", unit, self.separation_covariance, unit))

    @property
    def angle_err(self) -> np.ndarray:
        """Error of the separation's direction, radians."""
        normal = np.stack([-self.separation_y, self.separation_x], axis=1) / np.maximum(self.length, 1e-12)[
            :, None]
        return np.sqrt(np.einsum("ni,nij,nj->n", normal, self.separation_covariance, normal)) / np.maximum(
            self.length, 1e-12)


@dataclass
class TrailFit:
    """Fits of a PSF convolved with a line segment (:func:`fit_trails`), one per source.

    Attributes
    ----------
    x, y : numpy.ndarray
        Centre of the segment, pixels.
    centre_covariance : numpy.ndarray
        (n, 2, 2), pixels².
    length, length_err : numpy.ndarray
        Length of the segment and the half-width of its 1-sigma interval,
        pixels.  The fit is in the squared length (``length_squared``, with
        Gaussian error ``length_squared_err``, pixels²), which may come out
        negative for a point source: the length is then 0.  Whether a
        length is consistent with 0 is best judged on the squared length.
    angle, angle_err : numpy.ndarray
        Direction from +x towards +y, radians in [0, pi), and its error.
    flux, flux_err : numpy.ndarray
        Electrons of the difference image.
    chi2 : numpy.ndarray
    ndata : numpy.ndarray
        Pixels used.
    converged : numpy.ndarray
        False when the fit did not settle or the trail outgrew its stamp.
    """

    x: np.ndarray
    y: np.ndarray
    centre_covariance: np.ndarray
    length: np.ndarray
    length_err: np.ndarray
    length_squared: np.ndarray
    length_squared_err: np.ndarray
    angle: np.ndarray
    angle_err: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    chi2: np.ndarray
    ndata: np.ndarray
    converged: np.ndarray


def njy_per_electron(zero_point: float | None) -> float:
    """nJy of one electron at ``zero_point`` (AB mag of 1 e⁻); NaN when unknown."""
    return float(10.0 ** (0.4 * (AB_NJY_ZERO_POINT - zero_point))) if zero_point is not None else float("nan")


# --- detection ----------------------------------------------------------------------------------------------

def detect(snr: np.ndarray, mask: np.ndarray, threshold: float, min_pixels: int, separation: float,
           ridge_depth: float = 3.0) -> Detections:
    """Sources in connected regions beyond ±threshold.

    Regions are 4-connected pixels of one sign, not NO_DATA in ``mask``.
    Every local maximum (of |snr|, over the 8 neighbours) inside a region is
    a peak.  Two peaks of one region belong to one source when they are
    closer than ``separation`` pixels, or when |snr| on the straight line
    between them stays within ``ridge_depth`` of the lower peak (all pairs
    of a region with up to 64 peaks, pairs within 3 ``separation`` in larger
    ones); sources are the connected groups of that relation.  So close
    neighbours (two transients, a transient on a galaxy) are kept apart,
    while noise bumps on a bright source or along a streak are not.  NaN in
    ``snr`` counts as 0.

    Returns
    -------
    Detections
    """
    rows, cols = snr.shape
    with np.errstate(invalid="ignore"):
        py, px = np.nonzero(np.abs(snr) > threshold)
    # Only the few pixels above threshold need their mask looked at.
    usable = (mask[py, px] & MaskPlane.NO_DATA) == 0
    py, px = py[usable], px[usable]
    if not py.size:
        empty = np.zeros(0, dtype=np.intp)
        return Detections(empty, empty, empty, np.zeros(0), empty, np.zeros((0, 2, 2)))
    signed = snr[py, px]
    sign = np.where(signed > 0, 1, -1)
    value = np.abs(signed)
    labels, count = _components(py, px, sign, cols)
    sizes = np.bincount(labels, minlength=count)
    extent = []
    for coordinate in (py, px):
        low = np.full(count, coordinate.max())
        high = np.zeros(count, coordinate.dtype)
        np.minimum.at(low, labels, coordinate)
        np.maximum.at(high, labels, coordinate)
        extent.append(high - low + 1)
    bbox = np.maximum(*extent)
    is_peak = sizes[labels] >= min_pixels
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            if oy or ox:
                ny, nx = np.clip(py + oy, 0, rows - 1), np.clip(px + ox, 0, cols - 1)
                # Ties go to the earlier pixel in raster order, so a flat top gives one peak.
                neighbour = np.nan_to_num(sign * snr[ny, nx], nan=0.0)
                later = (oy, ox) > (0, 0)
                is_peak &= (value > neighbour) | ((value == neighbour) & later)
    py, px, value, sign, label = py[is_peak], px[is_peak], value[is_peak], sign[is_peak], labels[is_peak]
    # Stable, so that equal peaks stay in raster order within each sign, positive first.
    order = np.lexsort((-value, -sign))
    py, px, value, sign, label = py[order], px[order], value[order], sign[order], label[order]

    first, owner = _join_peaks(snr, px, py, sign, value, label, separation, ridge_depth)
    ends = np.repeat(np.stack([px[first], py[first]], axis=1)[:, None, :].astype(float), 2, axis=1)
    # The members of joined sources (few: streaks, bright residuals) give each source's extent.
    for source in np.flatnonzero(np.bincount(owner, minlength=first.size) > 1):
        members = np.flatnonzero(owner == source)
        mx, my = px[members].astype(float), py[members].astype(float)
        distance = np.hypot(mx[:, None] - mx, my[:, None] - my)
        a, b = np.unravel_index(int(np.argmax(distance)), distance.shape)
        ends[source] = [[mx[a], my[a]], [mx[b], my[b]]]
    return Detections(px[first], py[first], sign[first], (sign * value)[first], bbox[label[first]], ends)


def _join_peaks(snr: np.ndarray, px: np.ndarray, py: np.ndarray, sign: np.ndarray, value: np.ndarray,
                label: np.ndarray, separation: float, ridge_depth: float) -> tuple[np.ndarray, np.ndarray]:
    """Group the peaks (sorted, best first) into sources.

    Returns
    -------
    first : numpy.ndarray
        Index of each source's best peak, in the order of the peaks.
    owner : numpy.ndarray
        For every peak, the number of its source.
    """
    n = px.size
    reach = 3.0 * separation
    pairs = [np.zeros((0, 2), np.intp)]
    order = np.argsort(label, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(label[order]) != 0])
    for members in np.split(order, starts[1:]):
        if members.size < 2:
            continue
        if members.size <= _ALL_PAIRS_LIMIT:
            # Any two peaks of a region may lie on one ridge (a streak's peaks can be far apart).
            upper = np.triu_indices(members.size, 1)
            pairs.append(np.column_stack([members[upper[0]], members[upper[1]]]))
        else:
            tree = cKDTree(np.column_stack([px[members], py[members]]))
            near = tree.query_pairs(reach, output_type="ndarray")
            pairs.append(members[near])
    pairs = np.concatenate(pairs)
    i, j = pairs[:, 0], pairs[:, 1]
    distance = np.hypot(px[i] - px[j], py[i] - py[j])
    joined = distance < separation
    ridge = ~joined
    if ridge.any():
        ri, rj = i[ridge], j[ridge]
        # Samples at most a pixel apart along each segment; the score there, of the pair's sign.
        t = np.linspace(0.0, 1.0, int(np.ceil(distance[ridge].max())) + 2)[None, :]
        sx = np.rint(px[ri][:, None] + t * (px[rj] - px[ri])[:, None]).astype(np.intp)
        sy = np.rint(py[ri][:, None] + t * (py[rj] - py[ri])[:, None]).astype(np.intp)
        along = np.nan_to_num(sign[ri][:, None] * snr[sy, sx], nan=0.0)
        joined[ridge] = np.minimum(value[ri], value[rj]) - along.min(axis=1) < ridge_depth
    graph = scipy.sparse.coo_matrix((np.ones(int(joined.sum()), np.int8), (i[joined], j[joined])),
                                    shape=(n, n))
    _, component = scipy.sparse.csgraph.connected_components(graph, directed=False)
    # Peaks are sorted best first, so each source's first peak is its best; sources are numbered so.
    _, first = np.unique(component, return_index=True)
    first.sort()
    number = np.empty(component.max() + 1, np.intp)
    number[component[first]] = np.arange(first.size)
    return first, number[component]


def _components(py: np.ndarray, px: np.ndarray, sign: np.ndarray, cols: int) -> tuple[np.ndarray, int]:
    """4-connected components of same-sign pixels given in raster order; labels from 0, and their count.

    The pixels above threshold are few, so a graph on them is much cheaper
    than labelling the whole image.
    """
    flat = py * cols + px
    heads, tails = [], []
    for step, same_row in ((1, True), (cols, False)):
        at = np.searchsorted(flat, flat + step)
        at_ok = np.minimum(at, flat.size - 1)
        linked = (at < flat.size) & (flat[at_ok] == flat + step) & (sign[at_ok] == sign)
        if same_row:
            linked &= px < cols - 1
        heads.append(np.flatnonzero(linked))
        tails.append(at[linked])
    head, tail = np.concatenate(heads), np.concatenate(tails)
    graph = scipy.sparse.coo_matrix((np.ones(head.size, np.int8), (head, tail)), shape=(flat.size, flat.size))
    count, labels = scipy.sparse.csgraph.connected_components(graph, directed=False)
    return labels, count


# --- stamps and PSF kernels ---------------------------------------------------------------------------------

def _stamps(array: np.ndarray, cx: np.ndarray, cy: np.ndarray, half: int, fill: float = 0.0) -> np.ndarray:
    """(n, 2 half + 1, 2 half + 1) cut-outs centred on integer pixels, ``fill`` off the image."""
    rows, cols = array.shape
    offsets = np.arange(-half, half + 1)
    iy = cy[:, None] + offsets[None, :]
    ix = cx[:, None] + offsets[None, :]
    out = array[np.clip(iy, 0, rows - 1)[:, :, None], np.clip(ix, 0, cols - 1)[:, None, :]]
    outside = ((iy < 0) | (iy >= rows))[:, :, None] | ((ix < 0) | (ix >= cols))[:, None, :]
    return np.where(outside, fill, out)


def _fit_weights(image: CcdImage, cx: np.ndarray, cy: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel stamps of ``image`` and their inverse-variance weights (0 where masked or unknown)."""
    data = _stamps(image.image, cx, cy, half)
    variance = np.nan_to_num(_stamps(image.variance, cx, cy, half), nan=0.0)
    unfit = (_stamps(image.mask, cx, cy, half, fill=int(MaskPlane.NO_DATA)) & UNFIT_PLANES) != 0
    with np.errstate(divide="ignore"):
        return data, np.where(~unfit & (variance > 0), 1.0 / np.where(variance > 0, variance, 1.0), 0.0)


def _dirichlet(offset: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The band-limited interpolant of a periodic array of odd ``size``, and its derivative, at ``offset``.

    Shifting by multiplying the DFT with a phase ramp is a convolution with this
    kernel (the Dirichlet kernel sin(pi t) / (size sin(pi t / size))), so
    evaluating it directly gives the Fourier shift on only the pixels wanted.
    """
    t = (offset + size / 2) % size - size / 2
    near = np.abs(t) < 1e-3
    # Closed forms cancel catastrophically at t = 0; a second-order expansion takes over there.
    curvature = np.pi**2 * (1 - 1 / size**2) / 6
    t_safe = np.where(near, 0.5, t)
    sin_t, cos_t = np.sin(np.pi * t_safe), np.cos(np.pi * t_safe)
    denominator = size * np.sin(np.pi * t_safe / size)
    value = sin_t / denominator
    slope = np.pi * (cos_t * denominator - sin_t * np.cos(np.pi * t_safe / size)) / denominator**2
    return np.where(near, 1 - curvature * t**2, value), np.where(near, -2 * curvature * t, slope)


def _shift_matrices(shift: np.ndarray, size: int, half: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 2 half + 1, size) matrices: a stamp axis moved by ``shift``, on its central 2 half + 1 pixels."""
    centre = size // 2
    # Entries depend only on (target - source pixel) and the shift: evaluate each such offset once.
    band = np.arange(centre - half - size + 1, centre + half + 1)
    value, slope = _dirichlet(band[None, :] - shift[:, None], size)
    index = np.arange(centre - half, centre + half + 1)[:, None] - np.arange(size)[None, :] - band[0]
    return value[:, index], slope[:, index]


def _shifted(kernels: np.ndarray, dx: np.ndarray, dy: np.ndarray, half: int, derivatives: bool = True
             ) -> tuple[np.ndarray, ...]:
    """Kernels moved by (dx, dy) pixels (Fourier shift), cropped to +-``half`` about their centre.

    The shift is separable: a matrix on each side of every stamp, so only the
    cropped pixels are computed.  The stamps must be larger than the region
    used, so that the periodic wrap of the shift only touches their border.

    Returns
    -------
    tuple of numpy.ndarray
        The moved kernels and, with ``derivatives``, their derivatives with
        respect to the shifts dx and dy.
    """
    size = kernels.shape[-1]
    along_x, slope_x = (m.astype(kernels.dtype) for m in _shift_matrices(dx, size, half))
    along_y, slope_y = (m.astype(kernels.dtype) for m in _shift_matrices(dy, size, half))
    rows_moved = kernels @ np.swapaxes(along_x, 1, 2)
    moved = along_y @ rows_moved
    if not derivatives:
        return (moved,)
    # The interpolant's slope is taken against the offset (pixel - shift), hence the sign.
    return moved, -(along_y @ (kernels @ np.swapaxes(slope_x, 1, 2))), -(slope_y @ rows_moved)


def _crop(stamps: np.ndarray, half: int) -> np.ndarray:
    centre = stamps.shape[-1] // 2
    return stamps[..., centre - half:centre + half + 1, centre - half:centre + half + 1]


class PsfKernels:
    """A PSF model's kernels where sources are, evaluated as few times as possible.

    The PSF varies slowly over a CCD, so with many sources it is evaluated
    only at the nodes of a grid ``spacing`` pixels apart around them, once
    each, and interpolated bilinearly; with fewer sources than nodes to
    evaluate, at the sources themselves.  The kernels are ``size`` wide but
    sum to the fraction of the PSF's light they hold (the rest lies in wings
    out to ``total_size``, measured once at the detector's centre), so that
    fitted amplitudes are total fluxes.  They are single precision, which
    halves the cost of shifting them and is far below the noise.
    """

    def __init__(self, psf: PsfModel, size: int, spacing: float, shape: tuple[int, int],
                 total_size: int | None = None) -> None:
        self.psf, self.size, self.spacing = psf, size, spacing
        self._nodes: dict[tuple[int, int], np.ndarray] = {}
        self._sources: dict[tuple[float, float], np.ndarray] = {}
        centre = (shape[1] - 1) / 2, (shape[0] - 1) / 2
        if total_size is None:
            total_size = 2 * int(np.ceil(_TOTAL_FLUX_FWHMS * psf.fwhm(*centre))) + 1
        self.fraction = 1.0
        if total_size > size:
            self.fraction = float(_crop(np.asarray(psf.kernel(*centre, total_size), float), size // 2).sum())

    def _kernel(self, x: float, y: float) -> np.ndarray:
        return (self.fraction * np.asarray(self.psf.kernel(x, y, self.size), float)).astype(np.float32)

    def at(self, x: np.ndarray, y: np.ndarray, half: int) -> np.ndarray:
        """(n, 2 half + 1, 2 half + 1) kernels at (x, y), cropped."""
        if x.size == 0:
            return np.zeros((0, 2 * half + 1, 2 * half + 1), np.float32)
        gx, gy = np.asarray(x, float) / self.spacing, np.asarray(y, float) / self.spacing
        ix, iy = np.floor(gx).astype(np.intp), np.floor(gy).astype(np.intp)
        offsets = ((0, 0), (1, 0), (0, 1), (1, 1))
        corner_keys = [list(zip((ix + ox).tolist(), (iy + oy).tolist(), strict=True)) for ox, oy in offsets]
        new_nodes = set().union(*corner_keys) - self._nodes.keys()
        positions = list(zip(np.asarray(x, float).tolist(), np.asarray(y, float).tolist(), strict=True))
        new_sources = set(positions) - self._sources.keys()
        if new_nodes and len(new_sources) < len(new_nodes):
            for key in new_sources:
                self._sources[key] = self._kernel(*key)
            return _crop(np.stack([self._sources[key] for key in positions]), half)
        for key in new_nodes:
            self._nodes[key] = self._kernel(key[0] * self.spacing, key[1] * self.spacing)
        fx = (gx - ix).astype(np.float32)[:, None, None]
        fy = (gy - iy).astype(np.float32)[:, None, None]
        corners = []
        for keys in corner_keys:
            unique = sorted(set(keys))
            table = _crop(np.stack([self._nodes[key] for key in unique]), half)
            position = {key: k for k, key in enumerate(unique)}
            corners.append(table[[position[key] for key in keys]])
        return ((1 - fy) * ((1 - fx) * corners[0] + fx * corners[1])
                + fy * ((1 - fx) * corners[2] + fx * corners[3]))


def _linear_flux(data: np.ndarray, weight: np.ndarray, model: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares amplitude of ``model`` in ``data`` (per stamp) and its error."""
    information = (weight * model**2).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        flux = (weight * model * data).sum(axis=(1, 2)) / information
        return flux, 1.0 / np.sqrt(information)


def _solve(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """Batched solve that gives 0 (not an exception) for singular systems."""
    ok = np.isfinite(matrix).all(axis=(1, 2)) & np.isfinite(vector).all(axis=1)
    ok &= np.abs(np.linalg.det(np.where(ok[:, None, None], matrix, np.eye(matrix.shape[-1])))) > 0
    safe = np.where(ok[:, None, None], matrix, np.eye(matrix.shape[-1]))
    solution = np.linalg.solve(safe, np.where(ok[:, None], vector, 0.0)[..., None])[..., 0]
    return np.where(ok[:, None], np.nan_to_num(solution, nan=0.0, posinf=0.0, neginf=0.0), 0.0)


def _inverse(matrix: np.ndarray) -> np.ndarray:
    """Batched inverse; NaN for singular or non-finite matrices."""
    out = np.full_like(matrix, np.nan)
    if matrix.shape[0] == 0:
        return out
    ok = np.isfinite(matrix).all(axis=(1, 2))
    ok[ok] &= np.linalg.cond(matrix[ok]) < 1e12
    out[ok] = np.linalg.inv(matrix[ok])
    return out


# --- point sources ------------------------------------------------------------------------------------------

def _fit_centroids(data: np.ndarray, weight: np.ndarray, kernels: np.ndarray, dx: np.ndarray,
                   dy: np.ndarray, half: int, steps: int = 2) -> tuple[np.ndarray, ...]:
    """Gauss-Newton fit of flux and shift of the PSF.

    Returns dx, dy, and at the fitted position the covariance (n, 3, 3) of
    (flux, dx, dy), the flux and the moved kernels.
    """
    for step_index in range(steps + 1):
        model, d_dx, d_dy = _shifted(kernels, dx, dy, half)
        flux, _ = _linear_flux(data, weight, model)
        # Columns: d model / d flux, d model / d x0, d model / d y0.
        basis = np.stack([model, flux[:, None, None] * d_dx, flux[:, None, None] * d_dy], axis=1)
        fisher = np.einsum("nipq,njpq,npq->nij", basis, basis, weight)
        if step_index == steps:
            break
        residual = data - flux[:, None, None] * model
        gradient = np.einsum("nipq,npq->ni", basis, weight * residual)
        # A source without usable pixels (all masked) keeps its starting position; centroid_flag says so.
        ridge = np.eye(3) * 1e-12 * np.trace(fisher, axis1=1, axis2=2)[:, None, None]
        step = _solve(fisher + ridge, gradient)
        dx = np.clip(dx + step[:, 1], -_MAX_SHIFT, _MAX_SHIFT)
        dy = np.clip(dy + step[:, 2], -_MAX_SHIFT, _MAX_SHIFT)
    return dx, dy, _inverse(fisher), flux, model


@dataclass
class _PointFits:
    """PSF fits of every detection: stamp centres, shifts from them, and what the fit gives."""

    cx: np.ndarray
    cy: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    covariance: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    chi2: np.ndarray
    ndata: np.ndarray
    ln_l: np.ndarray

    @property
    def x(self) -> np.ndarray:
        return self.cx + self.dx

    @property
    def y(self) -> np.ndarray:
        return self.cy + self.dy


def _fit_point_sources(diff: CcdImage, kernels: PsfKernels, px: np.ndarray, py: np.ndarray,
                       start_dx: np.ndarray, start_dy: np.ndarray, half: int, iterations: int) -> _PointFits:
    """Centroid and PSF flux of every detection, neighbours fitted together.

    A fit that leaves its stamp's centre pixel is refitted on a stamp centred
    where it went (twice at most).  Sources whose stamps overlap are refitted
    ``iterations`` times, each time with their neighbours' latest models
    subtracted from their stamps.
    """
    cx, cy = px.copy(), py.copy()
    data, weight = _fit_weights(diff, cx, cy, half)
    psf = kernels.at(cx, cy, half + _SHIFT_MARGIN)
    dx, dy, covariance, flux, model = _fit_centroids(data, weight, psf, start_dx, start_dy, half)
    for _ in range(2):
        move_x, move_y = np.rint(dx).astype(np.intp), np.rint(dy).astype(np.intp)
        moved = np.flatnonzero((move_x != 0) | (move_y != 0))
        if not moved.size:
            break
        cx[moved] += move_x[moved]
        cy[moved] += move_y[moved]
        data[moved], weight[moved] = _fit_weights(diff, cx[moved], cy[moved], half)
        psf[moved] = kernels.at(cx[moved], cy[moved], half + _SHIFT_MARGIN)
        dx[moved], dy[moved], covariance[moved], flux[moved], model[moved] = _fit_centroids(
            data[moved], weight[moved], psf[moved], dx[moved] - move_x[moved], dy[moved] - move_y[moved],
            half)

    crowded = _overlapping(cx, cy, half) if iterations else np.zeros(0, np.intp)
    for _ in range(iterations if crowded.size else 0):
        own = flux[crowded, None, None] * model[crowded]
        canvas = np.zeros(diff.shape, np.float32)
        _add_stamps(canvas, cx[crowded], cy[crowded], own)
        cleaned = data[crowded] - (_stamps(canvas, cx[crowded], cy[crowded], half) - own)
        dx[crowded], dy[crowded], covariance[crowded], flux[crowded], model[crowded] = _fit_centroids(
            cleaned, weight[crowded], psf[crowded], dx[crowded], dy[crowded], half)
    if crowded.size:
        data[crowded] = cleaned

    flux, flux_err = _linear_flux(data, weight, model)
    residual = data - flux[:, None, None] * model
    ndata = (weight > 0).sum(axis=(1, 2))
    chi2 = (weight * residual**2).sum(axis=(1, 2))
    ln_l = -0.5 * chi2 - 0.5 * np.where(weight > 0, np.log(2 * np.pi / np.where(weight > 0, weight, 1)),
                                        0).sum(axis=(1, 2))
    # Where the PSF fits worse than the noise allows (χ² more than 3 sigma above its expectation), its
    # Fisher errors are too small by about √(χ²/dof).
    dof = np.maximum(ndata - 3, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        excess = np.where(chi2 - dof > 3 * np.sqrt(2 * dof), chi2 / dof, 1.0)
    excess = np.nan_to_num(excess, nan=1.0)
    covariance = covariance * excess[:, None, None]
    flux_err = flux_err * np.sqrt(excess)
    correction = 1.0 + _centroid_flux_bias(weight, psf, dx, dy, half, covariance)
    return _PointFits(cx, cy, dx, dy, covariance, flux / correction, flux_err / correction, chi2, ndata, ln_l)


def _centroid_flux_bias(weight: np.ndarray, kernels: np.ndarray, dx: np.ndarray, dy: np.ndarray, half: int,
                        covariance: np.ndarray) -> np.ndarray:
    """Fractional excess of a PSF flux fitted at its own fitted centroid, on average.

    Fitting the position moves the PSF onto the noise that raises the flux
    most, so the flux is high by half the centroid covariance contracted with
    the curvature of the matched filter's response to a shift:
    (C_xx a_xx + C_yy a_yy + 2 C_xy a_xy) / 2, a_ij = Σ w ∂_i P ∂_j P / Σ w P².
    About 1/SNR² for a Gaussian PSF: 1 % at SNR 10, 0.25 % at SNR 20.
    """
    model, d_dx, d_dy = _shifted(kernels, dx, dy, half)
    norm = (weight * model**2).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        a_xx, a_yy, a_xy = ((weight * first * second).sum(axis=(1, 2)) / norm
                            for first, second in ((d_dx, d_dx), (d_dy, d_dy), (d_dx, d_dy)))
        bias = 0.5 * (covariance[:, 1, 1] * a_xx + covariance[:, 2, 2] * a_yy
                      + 2 * covariance[:, 1, 2] * a_xy)
    return np.nan_to_num(bias, nan=0.0, posinf=0.0, neginf=0.0)


def _overlapping(cx: np.ndarray, cy: np.ndarray, half: int) -> np.ndarray:
    """Indices of the sources whose stamp (centred on (cx, cy), ±half) overlaps another's."""
    if cx.size < 2:
        return np.zeros(0, np.intp)
    pairs = cKDTree(np.column_stack([cx, cy])).query_pairs((2 * half + 1) * np.sqrt(2), output_type="ndarray")
    touching = (np.abs(cx[pairs[:, 0]] - cx[pairs[:, 1]]) <= 2 * half) & (
        np.abs(cy[pairs[:, 0]] - cy[pairs[:, 1]]) <= 2 * half)
    return np.unique(pairs[touching])


def _add_stamps(canvas: np.ndarray, cx: np.ndarray, cy: np.ndarray, stamps: np.ndarray) -> None:
    """Add stamps centred on pixels (cx, cy) to ``canvas``, in place; what falls off it is dropped."""
    rows, cols = canvas.shape
    half = stamps.shape[-1] // 2
    offsets = np.arange(-half, half + 1)
    iy = np.broadcast_to((cy[:, None] + offsets)[:, :, None], stamps.shape)
    ix = np.broadcast_to((cx[:, None] + offsets)[:, None, :], stamps.shape)
    inside = (iy >= 0) & (iy < rows) & (ix >= 0) & (ix < cols)
    np.add.at(canvas, (iy[inside], ix[inside]), stamps[inside].astype(np.float32))


def _forced(image: CcdImage, kernels: PsfKernels | None, x: np.ndarray, y: np.ndarray, half: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Linear PSF flux at fixed positions (x, y) of ``image``."""
    if x.size == 0 or kernels is None:
        return np.full(x.size, np.nan), np.full(x.size, np.nan)
    rows, cols = image.shape
    cx = np.clip(np.rint(x).astype(np.intp), 0, cols - 1)
    cy = np.clip(np.rint(y).astype(np.intp), 0, rows - 1)
    data, weight = _fit_weights(image, cx, cy, half)
    model = _shifted(kernels.at(cx, cy, half + _SHIFT_MARGIN), x - cx, y - cy, half, derivatives=False)[0]
    return _linear_flux(data, weight, model)


# --- dipoles ------------------------------------------------------------------------------------------------

def _levenberg_marquardt(evaluate: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, ...]],
                         start: np.ndarray, lower: np.ndarray, upper: np.ndarray,
                         iterations: int, max_step: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Batched Levenberg-Marquardt.

    ``evaluate(params, which)`` returns, for the problems ``which`` (indices),
    chi², the normal matrix JᵀWJ and the gradient JᵀW r at ``params``
    (len(which), k).  Each iteration evaluates once: a step that did not
    lower chi² is taken back and the damping raised; problems stop when a
    step lowers chi² by less than 0.01.  Steps are clipped to ``max_step``
    and parameters to [lower, upper].

    Returns
    -------
    params, chi2, normal_matrix : numpy.ndarray
        At the best point found.
    converged : numpy.ndarray
        Whether the last accepted step lowered chi² by less than 0.01.
    """
    params = start.copy()
    best = start.copy()
    n, k = start.shape
    best_chi2 = np.full(n, np.inf)
    best_matrix = np.zeros((n, k, k))
    best_gradient = np.zeros((n, k))
    damping = np.full(n, 1e-3)
    change = np.full(n, np.inf)
    active = np.ones(n, bool)
    for _ in range(iterations):
        chi2, matrix, gradient = evaluate(params[active], np.flatnonzero(active))
        better = np.zeros(n, bool)
        better[active] = np.isfinite(chi2) & (chi2 <= best_chi2[active])
        improved = better[active]
        change[better] = np.where(np.isfinite(best_chi2[better]), best_chi2[better] - chi2[improved], np.inf)
        best[better], best_chi2[better] = params[better], chi2[improved]
        best_matrix[better], best_gradient[better] = matrix[improved], gradient[improved]
        damping = np.where(better, damping / 3, np.where(active, damping * 4, damping))
        active &= ~(better & (change < 0.01)) & (damping < 1e8)
        if not active.any():
            break
        diagonal = np.einsum("nii->ni", best_matrix[active])
        # A parameter the data do not constrain (a trail's angle at zero length) gets a unit ridge, so that
        # the system stays solvable and that parameter stays where it is.
        ridge = damping[active, None] * diagonal + (diagonal <= 0)
        system = best_matrix[active] + ridge[:, :, None] * np.eye(k)
        step = _solve(system, best_gradient[active])
        params[active] = np.clip(best[active] + np.clip(step, -max_step, max_step), lower, upper)
    return best, best_chi2, best_matrix, change < 0.01


def _covariance(matrix: np.ndarray) -> np.ndarray:
    """Inverse of normal matrices, NaN for the parameters they carry no information on.

    Rows and columns are scaled to unit diagonal before inverting, so that
    parameters of very different sizes (fluxes, pixels, radians) do not
    spoil the conditioning.
    """
    out = np.full_like(matrix, np.nan)
    diagonal = np.einsum("nii->ni", matrix)
    informed = np.isfinite(diagonal) & (diagonal > 0)
    for pattern in {tuple(row) for row in informed}:
        which = np.flatnonzero((informed == pattern).all(axis=1))
        keep = np.flatnonzero(pattern)
        if not keep.size:
            continue
        block = matrix[np.ix_(which, keep, keep)]
        scale = 1 / np.sqrt(diagonal[np.ix_(which, keep)])
        outer = scale[:, :, None] * scale[:, None, :]
        inverse = _inverse(block * outer) * outer
        out[np.ix_(which, keep, keep)] = inverse
    return out


def fit_dipoles(difference: CcdImage, xp: np.ndarray, yp: np.ndarray, xn: np.ndarray, yn: np.ndarray,
                half: int, kernels: PsfKernels | None = None,
                science_flux: tuple[np.ndarray, np.ndarray] | None = None,
                template_flux: tuple[np.ndarray, np.ndarray] | None = None, position_floor: float = 0.0,
                iterations: int = 20) -> DipoleFit:
    """Fit a positive and a negative PSF jointly to pairs of lobes on a difference image.

    The model on the difference is f₊ P(r - c - s/2) - f₋ P(r - c + s/2),
    with parameters the centre c, the separation s (negative to positive
    lobe), the mean flux (f₊ + f₋)/2 and the flux difference f₊ - f₋,
    fitted by Levenberg-Marquardt from the lobes' positions.  For s well below
    the PSF width the difference only measures the product of mean flux and s:
    a prior on the mean flux from the pre-subtraction images (the source's
    PSF flux in the science image at the positive lobe and in the template at
    the negative one) breaks that degeneracy.  Both measure the pixels' even
    part, which is orthogonal to the odd dipole signal that gives s, so the
    prior adds no noise counted twice to s.

    Parameters
    ----------
    difference : CcdImage
        With a PSF.
    xp, yp, xn, yn : numpy.ndarray
        Starting positions of the positive and negative lobes, pixels.
    half : int
        Half-width of the PSF-fitting stamps, pixels; the dipole's stamp adds half the lobe distance.
    kernels : PsfKernels, optional
        Kernels of ``difference.psf`` (made here when not given).
    science_flux, template_flux : tuple of numpy.ndarray, optional
        (flux, error) of the source at the positive lobe in the science image
        and at the negative one in the template, electrons at the difference's
        zero point; without them the mean flux is free.
    position_floor : float
        Systematic error of each lobe's position, pixels, added in quadrature
        to the fit's (the template's resampling and PSF-model errors, which the
        pixel noise does not show).
    iterations : int

    Returns
    -------
    DipoleFit
    """
    if difference.psf is None:
        raise ValueError("the difference image needs a PSF")
    n = xp.size
    reach = int(np.ceil(np.max(np.hypot(xp - xn, yp - yn), initial=0.0) / 2))
    stamp_half = half + reach
    # Lobes may move by up to the starting lobe distance plus a pixel from the stamp centre.
    margin = _SHIFT_MARGIN + reach + 2
    size = 2 * (stamp_half + margin) + 1
    if kernels is None or kernels.size < size:
        kernels = PsfKernels(difference.psf, size, 512.0, difference.shape)
    cx, cy = np.rint((xp + xn) / 2).astype(np.intp), np.rint((yp + yn) / 2).astype(np.intp)
    data, weight = _fit_weights(difference, cx, cy, stamp_half)
    psf = kernels.at(cx, cy, stamp_half + margin)

    prior_mean = np.full(n, np.nan)
    prior_information = np.zeros(n)
    if science_flux is not None and template_flux is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            prior_mean = (science_flux[0] + template_flux[0]) / 2
            prior_information = np.nan_to_num(4.0 / (science_flux[1] ** 2 + template_flux[1] ** 2), nan=0.0,
                                              posinf=0.0)
    prior_information = np.where(np.isfinite(prior_mean), prior_information, 0.0)
    prior_mean = np.nan_to_num(prior_mean, nan=0.0)

    def lobes(params: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, ...]:
        centre_x, centre_y, sep_x, sep_y = params[:, 0], params[:, 1], params[:, 2], params[:, 3]
        shift_x = np.concatenate([centre_x + sep_x / 2, centre_x - sep_x / 2])
        shift_y = np.concatenate([centre_y + sep_y / 2, centre_y - sep_y / 2])
        m = which.size
        moved, d_dx, d_dy = _shifted(np.concatenate([psf[which], psf[which]]), shift_x, shift_y, stamp_half)
        return moved[:m], moved[m:], d_dx[:m], d_dx[m:], d_dy[:m], d_dy[m:]

    def evaluate(params: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        plus, minus, plus_dx, minus_dx, plus_dy, minus_dy = lobes(params, which)
        mean, diff = params[:, 4, None, None], params[:, 5, None, None]
        f_plus, f_minus = mean + diff / 2, mean - diff / 2
        model = f_plus * plus - f_minus * minus
        jacobian = np.stack([f_plus * plus_dx - f_minus * minus_dx, f_plus * plus_dy - f_minus * minus_dy,
                             (f_plus * plus_dx + f_minus * minus_dx) / 2,
                             (f_plus * plus_dy + f_minus * minus_dy) / 2,
                             plus - minus, (plus + minus) / 2], axis=1)
        residual = data[which] - model
        chi2 = (weight[which] * residual**2).sum(axis=(1, 2))
        matrix = np.einsum("nipq,njpq,npq->nij", jacobian, jacobian, weight[which])
        gradient = np.einsum("nipq,npq->ni", jacobian, weight[which] * residual)
        information, mean_prior = prior_information[which], prior_mean[which]
        matrix[:, 4, 4] += information
        gradient[:, 4] += information * (mean_prior - params[:, 4])
        chi2 = chi2 + information * (mean_prior - params[:, 4]) ** 2
        return chi2, matrix, gradient

    # Start: the lobes' centre; for the separation, the linear fit of a PSF and its gradient at the
    # centre (difference ≈ mean s·∇P + diff P for s well below the PSF) divided by the prior's mean flux;
    # the lobes' distance where that is unknown or larger.
    start_cx, start_cy = (xp + xn) / 2 - cx, (yp + yn) / 2 - cy
    centre_psf, centre_dx, centre_dy = _shifted(psf, start_cx, start_cy, stamp_half)
    basis = np.stack([centre_dx, centre_dy, centre_psf], axis=1)
    amplitude = _solve(np.einsum("nipq,njpq,npq->nij", basis, basis, weight),
                       np.einsum("nipq,npq->ni", basis, weight * data))
    lobe_x, lobe_y = xp - xn, yp - yn
    lobe_distance = np.hypot(lobe_x, lobe_y)
    with np.errstate(invalid="ignore", divide="ignore"):
        sep_x = np.where(prior_mean > 0, amplitude[:, 0] / prior_mean, lobe_x)
        sep_y = np.where(prior_mean > 0, amplitude[:, 1] / prior_mean, lobe_y)
    too_far = ~np.isfinite(sep_x) | ~np.isfinite(sep_y) | (np.hypot(sep_x, sep_y) > lobe_distance)
    sep_x, sep_y = np.where(too_far, lobe_x, sep_x), np.where(too_far, lobe_y, sep_y)
    # The two lobes' amplitudes at the starting positions give the starting fluxes.
    start = np.stack([start_cx, start_cy, sep_x, sep_y, np.zeros(n), np.zeros(n)], axis=1)
    plus, minus = lobes(start, np.arange(n))[:2]
    lobe_basis = np.stack([plus, -minus], axis=1)
    amplitudes = _solve(np.einsum("nipq,njpq,npq->nij", lobe_basis, lobe_basis, weight),
                        np.einsum("nipq,npq->ni", lobe_basis, weight * data))
    start[:, 4] = np.where(prior_information > 0, prior_mean, amplitudes.mean(axis=1))
    start[:, 5] = amplitudes[:, 0] - amplitudes[:, 1]

    limit = np.array([_MAX_SHIFT, _MAX_SHIFT, 2 * reach + 2, 2 * reach + 2, np.inf, np.inf])
    params, chi2, matrix, converged = _levenberg_marquardt(
        evaluate, start, -limit, limit, iterations, np.array([0.5, 0.5, 0.5, 0.5, np.inf, np.inf]))
    covariance = _covariance(matrix)
    # A floor e on each lobe: the centre (p₊ + p₋)/2 gets e²/2, the separation p₊ - p₋ gets 2 e².
    covariance[:, :2, :2] += np.eye(2) * position_floor**2 / 2
    covariance[:, 2:4, 2:4] += np.eye(2) * 2 * position_floor**2
    chi2 = chi2 - prior_information * (prior_mean - params[:, 4]) ** 2
    mean, diff = params[:, 4], params[:, 5]
    mean_err, diff_err = np.sqrt(covariance[:, 4, 4]), np.sqrt(covariance[:, 5, 5])
    # f± = mean ± diff / 2.
    plus_var = covariance[:, 4, 4] + covariance[:, 5, 5] / 4 + covariance[:, 4, 5]
    minus_var = covariance[:, 4, 4] + covariance[:, 5, 5] / 4 - covariance[:, 4, 5]
    with np.errstate(invalid="ignore", divide="ignore"):
        plus_snr = (mean + diff / 2) / np.sqrt(plus_var)
        minus_snr = (mean - diff / 2) / np.sqrt(minus_var)
    at_limit = (np.abs(params[:, :4]) >= limit[:4] - 1e-9).any(axis=1)
    return DipoleFit(cx + params[:, 0], cy + params[:, 1], covariance[:, :2, :2], params[:, 2], params[:, 3],
                     covariance[:, 2:4, 2:4], mean, mean_err, diff, diff_err, plus_snr, minus_snr, chi2,
                     (weight > 0).sum(axis=(1, 2)), converged & ~at_limit & np.isfinite(mean_err))


# --- trails -------------------------------------------------------------------------------------------------

def _segment_spectrum(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin(pi √z) / (pi √z), continued to z < 0, and its derivative in z.

    With z the square of (length times frequency along the segment), this is the Fourier
    transform of a segment of unit flux; as a function of the squared length
    it is smooth through 0, which lets a fit reach and pass a point source.
    """
    small = np.abs(z) < 1e-4
    safe = np.where(small, 1.0, z)
    root = np.pi * np.sqrt(np.abs(safe))
    positive = safe > 0
    odd = np.where(positive, np.sin(root), np.sinh(root))
    even = np.where(positive, np.cos(root), np.cosh(root))
    value = odd / root
    derivative = (even * root - odd) / root**2 * np.where(positive, 1.0, -1.0) * np.pi**2 / (2 * root)
    return (np.where(small, 1 - np.pi**2 * z / 6 + np.pi**4 * z**2 / 120, value),
            np.where(small, -np.pi**2 / 6 + np.pi**4 * z / 60, derivative))


def fit_trails(difference: CcdImage, x: np.ndarray, y: np.ndarray, length: np.ndarray, angle: np.ndarray,
               kernels: PsfKernels | None = None, max_length: float = 250.0, iterations: int = 30
               ) -> TrailFit:
    """Fit a PSF convolved with a line segment to sources of a difference image.

    The model is the flux times the PSF ⊗ a segment of length L at angle θ centred on c,
    built in Fourier space on a padded stamp, where the segment is a sinc
    along its direction (the trailed-source model of Veres et al. 2012 with
    the image's own PSF instead of a Gaussian).  Parameters flux, c, L² and θ
    are fitted by Levenberg-Marquardt on the difference's pixels with their
    inverse variances; fitting L² rather than L keeps the model smooth (and
    the errors finite) for trails shorter than the PSF, down to point sources.

    Parameters
    ----------
    difference : CcdImage
        With a PSF.
    x, y : numpy.ndarray
        Starting centres, pixels.
    length : numpy.ndarray
        Starting lengths, pixels (0 for a source of unknown extent).
    angle : numpy.ndarray
        Starting directions from +x towards +y, radians.
    kernels : PsfKernels, optional
        Kernels of ``difference.psf`` (default: 12 FWHM wide, nodes 512 pixels apart).
    max_length : float
        Longest trail fitted, pixels; stamps are sized for it at most.
    iterations : int

    Returns
    -------
    TrailFit
    """
    psf = difference.psf
    if psf is None:
        raise ValueError("the difference image needs a PSF")
    n = x.size
    rows, cols = difference.shape
    fwhm = psf.fwhm((cols - 1) / 2, (rows - 1) / 2)
    if kernels is None:
        kernels = PsfKernels(psf, 2 * int(np.ceil(6 * fwhm)) + 1, 512.0, difference.shape)
    fields = {name: np.full(n, np.nan) for name in ("x", "y", "length", "length_err", "length_squared",
                                                    "length_squared_err", "angle", "angle_err", "flux",
                                                    "flux_err", "chi2")}
    centre_covariance = np.full((n, 2, 2), np.nan)
    ndata = np.zeros(n, np.int32)
    converged = np.zeros(n, bool)
    start_length = np.clip(np.nan_to_num(length, nan=0.0), 0.0, max_length)
    # Stamps hold the trail and 2.5 FWHM around it; sizes rounded up so that trails share transforms.
    step = 8
    halves = step * np.ceil((0.55 * start_length + 2.5 * fwhm + 2) / step).astype(int)
    for half in np.unique(halves):
        members = np.flatnonzero(halves == half)
        fit = _fit_trail_batch(difference, x[members], y[members], start_length[members], angle[members],
                               int(half), kernels, fwhm, iterations)
        for name in fields:
            fields[name][members] = fit[name]
        centre_covariance[members] = fit["centre_covariance"]
        ndata[members] = fit["ndata"]
        converged[members] = fit["converged"]
    return TrailFit(fields["x"], fields["y"], centre_covariance, fields["length"], fields["length_err"],
                    fields["length_squared"], fields["length_squared_err"], fields["angle"],
                    fields["angle_err"], fields["flux"], fields["flux_err"], fields["chi2"],
                    ndata, converged)


def _fit_trail_batch(difference: CcdImage, x: np.ndarray, y: np.ndarray, length: np.ndarray,
                     angle: np.ndarray, half: int, kernels: PsfKernels, fwhm: float, iterations: int
                     ) -> dict[str, np.ndarray]:
    """:func:`fit_trails` for trails sharing one stamp size."""
    n = x.size
    cx, cy = np.rint(x).astype(np.intp), np.rint(y).astype(np.intp)
    data, weight = _fit_weights(difference, cx, cy, half)
    side = 2 * half + 1
    # The periodic grid leaves room for the PSF's whole reach on both sides of the stamp, so that no
    # light wraps around onto it.
    pad = kernels.size // 2
    grid = scipy.fft.next_fast_len(side + 2 * pad, real=True)
    ks = kernels.size
    placed = np.zeros((n, grid, grid))
    placed[:, :ks, :ks] = kernels.at(cx, cy, pad)
    psf_spectrum = scipy.fft.rfft2(np.roll(placed, (-(ks // 2), -(ks // 2)), axis=(1, 2)), axes=(1, 2))
    fy = scipy.fft.fftfreq(grid)[:, None]
    fx = scipy.fft.rfftfreq(grid)[None, :]
    origin = half + pad

    def evaluate(params: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        flux, tx, ty, squared, theta = (params[:, k, None, None] for k in range(5))
        along = fx * np.cos(theta) + fy * np.sin(theta)
        across = -fx * np.sin(theta) + fy * np.cos(theta)
        segment, slope = _segment_spectrum(squared * along**2)
        phase = np.exp(-2j * np.pi * (fx * (origin + tx) + fy * (origin + ty)))
        base = psf_spectrum[which] * phase
        factors = np.stack([segment, flux * segment * (-2j * np.pi * fx), flux * segment * (-2j * np.pi * fy),
                            flux * slope * along**2, flux * slope * squared * 2 * along * across], axis=1)
        planes = scipy.fft.irfft2(base[:, None] * factors, (grid, grid), axes=(2, 3))
        planes = planes[:, :, pad:pad + side, pad:pad + side]
        model = flux * planes[:, 0]
        residual = data[which] - model
        chi2 = (weight[which] * residual**2).sum(axis=(1, 2))
        matrix = np.einsum("nipq,njpq,npq->nij", planes, planes, weight[which])
        gradient = np.einsum("nipq,npq->ni", planes, weight[which] * residual)
        return chi2, matrix, gradient

    start = np.stack([np.zeros(n), x - cx, y - cy, length**2, angle], axis=1)
    _, unit_matrix, unit_gradient = evaluate(np.where(np.arange(5) == 0, 1.0, start), np.arange(n))
    # The model is linear in the flux: with unit flux, its least-squares value is gradient / matrix.
    with np.errstate(invalid="ignore", divide="ignore"):
        start[:, 0] = np.nan_to_num(unit_gradient[:, 0] / unit_matrix[:, 0, 0], nan=0.0)
    reach = float(half - fwhm)
    lower = np.array([-np.inf, -reach / 2, -reach / 2, -(fwhm / 2) ** 2, -np.inf])
    upper = np.array([np.inf, reach / 2, reach / 2, (2 * reach) ** 2, np.inf])
    params, chi2, matrix, converged = _levenberg_marquardt(
        evaluate, start, lower, upper, iterations, np.array([np.inf, 2.0, 2.0, np.inf, 0.3]))
    covariance = _covariance(matrix)
    squared, squared_err = params[:, 3], np.sqrt(covariance[:, 3, 3])
    upper_length = np.sqrt(np.clip(squared + squared_err, 0.0, None))
    lower_length = np.sqrt(np.clip(squared - squared_err, 0.0, None))
    length_fit = np.sqrt(np.clip(squared, 0.0, None))
    outgrown = length_fit > 2 * reach - 1e-6
    at_bounds = (np.abs(params[:, 1:3]) >= reach / 2 - 1e-6).any(axis=1)
    return {"x": cx + params[:, 1], "y": cy + params[:, 2], "centre_covariance": covariance[:, 1:3, 1:3],
            "length": length_fit, "length_err": (upper_length - lower_length) / 2,
            "length_squared": squared, "length_squared_err": squared_err,
            "angle": params[:, 4] % np.pi, "angle_err": np.sqrt(covariance[:, 4, 4]),
            "flux": params[:, 0], "flux_err": np.sqrt(covariance[:, 0, 0]), "chi2": chi2,
            "ndata": (weight > 0).sum(axis=(1, 2)),
            "converged": converged & ~outgrown & ~at_bounds & np.isfinite(squared_err)}


# --- shapes, positions and flags ----------------------------------------------------------------------------

def _weighted_moments(data: np.ndarray, sigma: float, dx: np.ndarray, dy: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian-weighted second moments about (dx, dy), corrected for the weight; pixels²; ok flag."""
    half = data.shape[-1] // 2
    offsets = np.arange(-half, half + 1, dtype=float)
    xx = offsets[None, None, :] - dx[:, None, None]
    yy = offsets[None, :, None] - dy[:, None, None]
    w = np.exp(-(xx**2 + yy**2) / (2 * sigma**2)) * data
    total = w.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        mxx = (w * xx**2).sum(axis=(1, 2)) / total
        myy = (w * yy**2).sum(axis=(1, 2)) / total
        mxy = (w * xx * yy).sum(axis=(1, 2)) / total
        # Weighted moments M_w of a Gaussian M obey M_w⁻¹ = M⁻¹ + W⁻¹ with W = σ² I.
        det = mxx * myy - mxy**2
        ixx_inv, iyy_inv, ixy_inv = myy / det - 1 / sigma**2, mxx / det - 1 / sigma**2, -mxy / det
        det_inv = ixx_inv * iyy_inv - ixy_inv**2
        ixx, iyy, ixy = iyy_inv / det_inv, ixx_inv / det_inv, -ixy_inv / det_inv
    ok = (total > 0) & (det > 0) & (det_inv > 0) & (ixx_inv > 0)
    return ixx, iyy, ixy, ok


def _sky_errors(wcs: WCS, x: np.ndarray, y: np.ndarray, covariance: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """RA, Dec (deg) of pixels and their errors (RA·cos Dec, Dec) and covariance, deg, deg²."""
    ra, dec = wcs.pixel_to_world_values(x, y)
    ra_x, dec_x = wcs.pixel_to_world_values(x + 1, y)
    ra_y, dec_y = wcs.pixel_to_world_values(x, y + 1)
    cos_dec = np.cos(np.radians(dec))
    # Local Jacobian d(ra cos dec, dec)/d(x, y), deg per pixel; RA differences wrapped.
    j = np.empty((x.size, 2, 2))
    j[:, 0, 0] = ((ra_x - ra + 180) % 360 - 180) * cos_dec
    j[:, 0, 1] = ((ra_y - ra + 180) % 360 - 180) * cos_dec
    j[:, 1, 0] = dec_x - dec
    j[:, 1, 1] = dec_y - dec
    sky = j @ covariance @ np.transpose(j, (0, 2, 1))
    return ra, dec, np.sqrt(sky[:, 0, 0]), np.sqrt(sky[:, 1, 1]), sky[:, 0, 1]


def position_angle(wcs: WCS, x: np.ndarray, y: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Position angle (deg East of North, in [0, 360)) of the pixel direction (dx, dy) at (x, y)."""
    ra0, dec0 = wcs.pixel_to_world_values(x, y)
    scale = 1e-3 / np.maximum(np.hypot(dx, dy), 1e-12)
    ra1, dec1 = wcs.pixel_to_world_values(x + dx * scale, y + dy * scale)
    east = ((ra1 - ra0 + 180) % 360 - 180) * np.cos(np.radians(dec0))
    return np.degrees(np.arctan2(east, dec1 - dec0)) % 360


def _flag_masks(mask_stamps: np.ndarray, radius: float, dx: np.ndarray, dy: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """OR of mask bits within ``radius`` of the centroid, and over its 3 x 3 centre."""
    half = mask_stamps.shape[-1] // 2
    offsets = np.arange(-half, half + 1)
    inside = ((offsets[None, None, :] - dx[:, None, None]) ** 2
              + (offsets[None, :, None] - dy[:, None, None]) ** 2) <= radius**2
    footprint = np.bitwise_or.reduce(np.where(inside, mask_stamps, 0), axis=(1, 2))
    center = np.bitwise_or.reduce(mask_stamps[:, half - 1:half + 2, half - 1:half + 2], axis=(1, 2))
    return footprint, center


def _reliability(size_ratio: np.ndarray, chi2_per_dof: np.ndarray, center_bad: np.ndarray,
                 is_dipole: np.ndarray, snr: np.ndarray) -> np.ndarray:
    """A hand-tuned logistic score in [0, 1]: PSF-like, well fit, clean, not a dipole, significant."""
    logit = (3.0 - 6.0 * np.abs(np.log(np.clip(size_ratio, 0.05, 20.0)))
             - 0.5 * np.clip(chi2_per_dof - 1.5, 0.0, 10.0)
             - 3.0 * center_bad - 2.5 * is_dipole + 0.5 * np.clip(np.abs(snr) - 5.0, 0.0, 4.0))
    return 1.0 / (1.0 + np.exp(-np.nan_to_num(logit, nan=-5.0)))


def run(subtraction: SubtractResult, science: CcdImage, config: DiaSourceConfig | None = None, *,
        visit: int = 0, detector: int = 0, id_offset: int = 0) -> DiaSourceResult:
    """Detect and measure DiaSources.

    Parameters
    ----------
    subtraction : SubtractResult
        From :func:`dmstream.payloads.subtract.run`.
    science : CcdImage
        The science image that was subtracted (for forced photometry), with WCS and PSF.
    config : DiaSourceConfig, optional
    visit, detector : int
        Written to every row.
    id_offset : int
        diaSourceId of the first row; rows follow consecutively.  The caller
        keeps the ranges of different detector-visits apart.

    Returns
    -------
    DiaSourceResult
    """
    config = config or DiaSourceConfig()
    diff = subtraction.difference
    template = subtraction.template
    wcs = science.wcs
    if wcs is None or science.psf is None or diff.psf is None:
        raise ValueError("the science image needs a WCS and a PSF")
    rows, cols = diff.shape
    fwhm = diff.psf.fwhm((cols - 1) / 2, (rows - 1) / 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = subtraction.score / np.sqrt(subtraction.score_variance)
    found = detect(snr, diff.mask, config.threshold, config.min_pixels, config.deblend_separation * fwhm,
                   config.ridge_depth)
    px, py, sign, peak_snr = found.x, found.y, found.sign, found.snr
    positive, negative = int((sign > 0).sum()), int((sign < 0).sum())

    half = max(int(np.ceil(config.stamp_fwhms * fwhm)), 3)
    # Kernels normalised as wide as subtraction used, so that the fitted model holds (nearly) all the
    # flux, then cut to what a shift of the fitting stamp can reach.
    kernel_size = 2 * max(subtraction.kernel_half, half + _SHIFT_MARGIN) + 1
    diff_kernels = PsfKernels(diff.psf, kernel_size, config.psf_grid, diff.shape)
    science_kernels = PsfKernels(science.psf, kernel_size, config.psf_grid, diff.shape)
    template_kernels = PsfKernels(template.psf, kernel_size, config.psf_grid, diff.shape) if template.psf \
        else None

    # Sub-pixel start from a parabola through the score's peak and its neighbours.
    score = subtraction.score

    def parabola(lower: np.ndarray, centre: np.ndarray, upper: np.ndarray) -> np.ndarray:
        curvature = lower - 2 * centre + upper
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nan_to_num(np.clip(0.5 * (lower - upper) / curvature, -0.5, 0.5))
    cx0 = np.clip(px, 1, cols - 2)
    cy0 = np.clip(py, 1, rows - 2)
    start_dx = parabola(score[py, cx0 - 1], score[py, cx0], score[py, cx0 + 1])
    start_dy = parabola(score[cy0 - 1, px], score[cy0, px], score[cy0 + 1, px])
    fits = _fit_point_sources(diff, diff_kernels, px, py, start_dx, start_dy, half,
                              config.neighbour_iterations)
    x, y = fits.x, fits.y

    # Dipoles: pair each negative source with the nearest positive one within reach.
    pairs = []
    used = np.zeros(px.size, bool)
    reach = config.dipole_radius * fwhm
    for n in np.flatnonzero(sign < 0):
        candidates = np.flatnonzero((sign > 0) & ~used)
        if candidates.size == 0:
            break
        distance = np.hypot(x[candidates] - x[n], y[candidates] - y[n])
        best = int(np.argmin(distance))
        if distance[best] <= reach:
            pairs.append((int(candidates[best]), int(n)))
            used[[candidates[best], n]] = True
    keep = ~used
    singles = int(keep.sum())
    index = np.array([int(i) for i in np.flatnonzero(keep)] + [p for p, _ in pairs], dtype=np.intp)
    count = index.size
    is_pair = np.arange(count) >= singles
    out_x, out_y = x[index].copy(), y[index].copy()
    out_cov = fits.covariance[index][:, 1:, 1:].copy()
    centroid_bad = ~np.isfinite(out_cov[:, 0, 0]) | (np.maximum(np.abs(fits.dx), np.abs(fits.dy))[index]
                                                     >= _MAX_SHIFT - 1e-6)
    dipole = {name: np.full(count, np.nan) for name in
              ("mean", "mean_err", "diff", "diff_err", "length", "length_err", "angle", "angle_err", "chi2")}
    dipole_ndata = np.zeros(count, np.int32)
    is_dipole = np.zeros(count, bool)
    pixel_scale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))) * 3600.0
    if pairs:
        p_idx, n_idx = np.array(pairs).T
        lobes = x[p_idx], y[p_idx], x[n_idx], y[n_idx]
        # Priors first at the lobes' midpoint (lobe peaks of a close pair lie wider apart than the
        # sources), then at the positions of the first fit.
        mid_x, mid_y = (lobes[0] + lobes[2]) / 2, (lobes[1] + lobes[3]) / 2
        positive_at, negative_at = (mid_x, mid_y), (mid_x, mid_y)
        for _ in range(2 if config.dipole_flux_prior else 1):
            priors = {}
            if config.dipole_flux_prior:
                priors = {"science_flux": _forced(science, science_kernels, *positive_at, half),
                          "template_flux": _forced(template, template_kernels, *negative_at, half)}
            fit = fit_dipoles(diff, *lobes, half, diff_kernels, **priors,
                              position_floor=config.dipole_position_floor)
            sep_x, sep_y = np.nan_to_num(fit.separation_x), np.nan_to_num(fit.separation_y)
            positive_at = fit.x + sep_x / 2, fit.y + sep_y / 2
            negative_at = fit.x - sep_x / 2, fit.y - sep_y / 2
            lobes = (*positive_at, *negative_at)
        rows_of_pairs = slice(singles, None)
        fitted = fit.converged
        out_x[rows_of_pairs] = np.where(fitted, fit.x, (x[p_idx] + x[n_idx]) / 2)
        out_y[rows_of_pairs] = np.where(fitted, fit.y, (y[p_idx] + y[n_idx]) / 2)
        lobes_covariance = (fits.covariance[p_idx][:, 1:, 1:] + fits.covariance[n_idx][:, 1:, 1:]) / 4
        out_cov[rows_of_pairs] = np.where(fitted[:, None, None], fit.centre_covariance, lobes_covariance)
        centroid_bad[rows_of_pairs] = ~np.isfinite(out_cov[rows_of_pairs, 0, 0])
        dipole["mean"][rows_of_pairs], dipole["mean_err"][rows_of_pairs] = fit.mean_flux, fit.mean_flux_err
        dipole["diff"][rows_of_pairs], dipole["diff_err"][rows_of_pairs] = fit.flux_diff, fit.flux_diff_err
        dipole["length"][rows_of_pairs] = fit.length * pixel_scale
        dipole["length_err"][rows_of_pairs] = fit.length_err * pixel_scale
        dipole["angle"][rows_of_pairs] = position_angle(wcs, out_x[rows_of_pairs], out_y[rows_of_pairs],
                                                        fit.separation_x, fit.separation_y)
        dipole["angle_err"][rows_of_pairs] = np.degrees(fit.angle_err)
        dipole["chi2"][rows_of_pairs], dipole_ndata[rows_of_pairs] = fit.chi2, fit.ndata
        significance = config.dipole_significance
        with np.errstate(invalid="ignore", divide="ignore"):
            is_dipole[rows_of_pairs] = (fitted & (fit.positive_flux_snr >= significance)
                                        & (fit.negative_flux_snr >= significance)
                                        & (fit.length >= significance * fit.length_err))

    # Net PSF flux of a pair is measured at its centre; single sources keep their fit.
    flux, flux_err = fits.flux[index].copy(), fits.flux_err[index].copy()
    if pairs:
        flux[is_pair], flux_err[is_pair] = _forced(diff, diff_kernels, out_x[is_pair], out_y[is_pair], half)
    science_flux, science_err = _forced(science, science_kernels, out_x, out_y, half)
    template_flux, template_err = _forced(template, template_kernels, out_x, out_y, half)

    ap_mask = (diff.mask & UNFIT_PLANES) != 0
    # sep leaves masked pixels out, so their unknown (NaN) variances do no harm.
    ap_flux, ap_err, ap_flag = sep.sum_circle(np.ascontiguousarray(diff.image, dtype=np.float32),
                                              out_x, out_y, config.aperture_radius,
                                              var=np.ascontiguousarray(diff.variance, dtype=np.float32),
                                              mask=ap_mask)
    truncated = ((out_x < config.aperture_radius) | (out_y < config.aperture_radius)
                 | (out_x > cols - 1 - config.aperture_radius) | (out_y > rows - 1 - config.aperture_radius))

    # Shapes on sign-corrected stamps, weight a Gaussian of the PSF's size.
    sigma = fwhm / 2.3548
    ix, iy = np.rint(out_x).astype(np.intp), np.rint(out_y).astype(np.intp)
    ix_c, iy_c = np.clip(ix, 0, cols - 1), np.clip(iy, 0, rows - 1)
    sx, sy = out_x - ix, out_y - iy
    polarity = np.sign(np.where(flux == 0, 1, flux))[:, None, None]
    ixx, iyy, ixy, shape_ok = _weighted_moments(_stamps(diff.image, ix_c, iy_c, half) * polarity,
                                                sigma, sx, sy)
    centre = (cols - 1) / 2, (rows - 1) / 2
    centre_psf = _crop(np.asarray(diff.psf.kernel(*centre, kernel_size), float), half)[None]
    pxx, pyy, pxy, _ = _weighted_moments(centre_psf, sigma, np.zeros(1), np.zeros(1))
    trace_ratio = (ixx + iyy) / (pxx + pyy)

    # Trails: sources elongated beyond the PSF, or whose peaks were joined along a ridge.
    spread = np.sqrt(((ixx - iyy) / 2) ** 2 + ixy**2)
    major = (ixx + iyy) / 2 + spread
    psf_major = float(((pxx + pyy) / 2 + np.sqrt(((pxx - pyy) / 2) ** 2 + pxy**2))[0])
    snr_abs = np.abs(peak_snr[index])
    span = found.span[index]
    ridge = span > config.deblend_separation * fwhm
    with np.errstate(divide="ignore"):
        excess = config.trail_min_excess + config.trail_noise_excess / snr_abs
    elongated = shape_ok & (major > excess * psf_major)
    candidates = (elongated | ridge) & (snr_abs >= config.trail_min_snr) & ~is_pair
    too_long = candidates & (span + fwhm > config.trail_max_length)
    trail_rows = np.flatnonzero(candidates & ~too_long)
    trail = {name: np.full(count, np.nan) for name in ("flux", "flux_err", "ra", "ra_err", "dec", "dec_err",
                                                      "length", "length_err", "angle", "angle_err", "chi2")}
    trail_ndata = np.zeros(count, np.int32)
    trail_failed = too_long.copy()
    trail_edge = np.zeros(count, bool)
    if trail_rows.size:
        ends = found.ends[index[trail_rows]]
        from_ridge = ridge[trail_rows]
        theta = 0.5 * np.arctan2(2 * ixy[trail_rows], ixx[trail_rows] - iyy[trail_rows])
        ridge_vector = ends[:, 1] - ends[:, 0]
        start_x = np.where(from_ridge, ends[:, :, 0].mean(axis=1), out_x[trail_rows])
        start_y = np.where(from_ridge, ends[:, :, 1].mean(axis=1), out_y[trail_rows])
        start_length = np.where(from_ridge, span[trail_rows] + fwhm,
                                np.sqrt(np.clip(12.0 * (major[trail_rows] - psf_major), 0.0, None)))
        start_angle = np.where(from_ridge, np.arctan2(ridge_vector[:, 1], ridge_vector[:, 0]), theta)
        fit_t = fit_trails(diff, start_x, start_y, start_length, np.nan_to_num(start_angle), diff_kernels,
                           config.trail_max_length)
        t_ra, t_dec, t_ra_err, t_dec_err, _ = _sky_errors(wcs, fit_t.x, fit_t.y, fit_t.centre_covariance)
        trail["flux"][trail_rows], trail["flux_err"][trail_rows] = fit_t.flux, fit_t.flux_err
        trail["ra"][trail_rows], trail["dec"][trail_rows] = t_ra, t_dec
        trail["ra_err"][trail_rows], trail["dec_err"][trail_rows] = t_ra_err, t_dec_err
        trail["length"][trail_rows] = fit_t.length * pixel_scale
        trail["length_err"][trail_rows] = fit_t.length_err * pixel_scale
        trail["angle"][trail_rows] = position_angle(wcs, fit_t.x, fit_t.y, np.cos(fit_t.angle),
                                                    np.sin(fit_t.angle)) % 180
        trail["angle_err"][trail_rows] = np.degrees(fit_t.angle_err)
        trail["chi2"][trail_rows], trail_ndata[trail_rows] = fit_t.chi2, fit_t.ndata
        trail_failed[trail_rows] = ~fit_t.converged
        trail_edge[trail_rows] = _touches(diff.mask, fit_t, MaskPlane.EDGE | MaskPlane.NO_DATA, fwhm)

    mask_out = _stamps(diff.mask, ix_c, iy_c, half, fill=int(MaskPlane.NO_DATA))
    footprint, center = _flag_masks(mask_out, max(fwhm, 2.0), sx, sy)
    tmask = _stamps(template.mask, ix_c, iy_c, half, fill=int(MaskPlane.NO_DATA))
    tfoot, tcenter = _flag_masks(tmask, max(fwhm, 2.0), sx, sy)
    offimage = (out_x < -0.5) | (out_y < -0.5) | (out_x > cols - 0.5) | (out_y > rows - 0.5)
    center_bad = (center & (MaskPlane.SAT | MaskPlane.CR | MaskPlane.BAD | MaskPlane.NO_DATA)) != 0
    ndata, chi2 = fits.ndata[index], fits.chi2[index]
    chi2_dof = chi2 / np.maximum(ndata - 3, 1)
    reliability = _reliability(trace_ratio, chi2_dof, center_bad, is_dipole, snr_abs)

    ra, dec, ra_err, dec_err, ra_dec_cov = _sky_errors(wcs, out_x, out_y, out_cov)
    to_njy = njy_per_electron(science.zero_point)
    arcsec2 = pixel_scale**2
    mjd = science.metadata.get("MJD-OBS")
    midpoint = float(mjd) + science.exptime / 2 / 86400 if mjd is not None else np.nan
    bad_psf = ~np.isfinite(flux) | (ndata == 0)
    columns = {
        "diaSourceId": id_offset + np.arange(count), "visit": np.full(count, visit),
        "detector": np.full(count, detector), "midpointMjdTai": np.full(count, midpoint),
        "exposureTime": np.full(count, science.exptime), "band": [science.band] * count,
        "ra": ra, "raErr": ra_err, "dec": dec, "decErr": dec_err, "ra_dec_Cov": ra_dec_cov,
        "x": out_x, "xErr": np.sqrt(out_cov[:, 0, 0]), "y": out_y, "yErr": np.sqrt(out_cov[:, 1, 1]),
        "centroid_flag": centroid_bad,
        "apFlux": ap_flux * to_njy, "apFluxErr": ap_err * to_njy, "apFlux_flag": ap_flag != 0,
        "apFlux_flag_apertureTruncated": truncated, "isNegative": sign[index] < 0, "snr": snr_abs,
        "psfFlux": flux * to_njy, "psfFluxErr": flux_err * to_njy, "psfLnL": fits.ln_l[index],
        "psfChi2": chi2, "psfNdata": ndata, "psfFlux_flag": bad_psf,
        "psfFlux_flag_edge": (footprint & (MaskPlane.EDGE | MaskPlane.NO_DATA)) != 0,
        "psfFlux_flag_noGoodPixels": ndata == 0,
        "trailFlux": trail["flux"] * to_njy, "trailFluxErr": trail["flux_err"] * to_njy,
        "trailRa": trail["ra"], "trailRaErr": trail["ra_err"], "trailDec": trail["dec"],
        "trailDecErr": trail["dec_err"], "trailLength": trail["length"],
        "trailLengthErr": trail["length_err"],
        "trailAngle": trail["angle"], "trailAngleErr": trail["angle_err"], "trailChi2": trail["chi2"],
        "trailNdata": trail_ndata, "trail_flag": trail_failed, "trail_flag_edge": trail_edge,
        "dipoleMeanFlux": dipole["mean"] * to_njy, "dipoleMeanFluxErr": dipole["mean_err"] * to_njy,
        "dipoleFluxDiff": dipole["diff"] * to_njy, "dipoleFluxDiffErr": dipole["diff_err"] * to_njy,
        "dipoleLength": dipole["length"], "dipoleAngle": dipole["angle"],
        "dipoleChi2": dipole["chi2"], "dipoleNdata": dipole_ndata, "isDipole": is_dipole,
        "dipoleFitAttempted": is_pair,
        "scienceFlux": science_flux * to_njy, "scienceFluxErr": science_err * to_njy,
        "forced_PsfFlux_flag": ~np.isfinite(science_flux),
        "templateFlux": template_flux * to_njy, "templateFluxErr": template_err * to_njy,
        "ixx": ixx * arcsec2, "iyy": iyy * arcsec2, "ixy": ixy * arcsec2,
        "ixxPSF": np.full(count, pxx[0] * arcsec2), "iyyPSF": np.full(count, pyy[0] * arcsec2),
        "ixyPSF": np.full(count, pxy[0] * arcsec2), "shape_flag": ~shape_ok,
        "extendedness": np.clip(trace_ratio - 1.0, 0.0, 1.0),
        "reliability": reliability, "reliabilityVersion": [RELIABILITY_VERSION] * count,
        "bboxSize": found.bbox[index], "pixelFlags": offimage, "pixelFlags_offimage": offimage,
        "pixelFlags_injected_template": (tfoot & MaskPlane.INJECTED) != 0,
        "pixelFlags_injected_templateCenter": (tcenter & MaskPlane.INJECTED) != 0,
    }
    for name, planes in PIXEL_FLAG_PLANES.items():
        columns[f"pixelFlags_{name}"] = (footprint & planes) != 0
    for name in CENTER_FLAGS:
        columns[f"pixelFlags_{name}Center"] = (center & PIXEL_FLAG_PLANES[name]) != 0
    arrays = [pa.array(np.asarray(columns[f.name]), type=f.type) if f.type != pa.string()
              else pa.array(columns[f.name], type=f.type) for f in SCHEMA]
    return DiaSourceResult(pa.Table.from_arrays(arrays, schema=SCHEMA), positive, negative,
                           dipole["length_err"], dipole["angle_err"])


def _touches(mask: np.ndarray, trail: TrailFit, planes: int, fwhm: float) -> np.ndarray:
    """Whether pixels with ``planes`` lie on each fitted trail (extended by a FWHM at both ends)."""
    rows, cols = mask.shape
    out = np.zeros(trail.x.size, bool)
    for k in range(trail.x.size):
        length = np.nan_to_num(trail.length[k]) + 2 * fwhm
        t = np.linspace(-0.5, 0.5, int(np.ceil(length)) + 2)
        along_x = np.rint(trail.x[k] + t * length * np.cos(trail.angle[k])).astype(np.intp)
        along_y = np.rint(trail.y[k] + t * length * np.sin(trail.angle[k])).astype(np.intp)
        off = (along_x < 0) | (along_x >= cols) | (along_y < 0) | (along_y >= rows)
        out[k] = off.any() or bool((mask[along_y, along_x] & planes).any())
    return out
