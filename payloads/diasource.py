"""Detection and measurement of DiaSources on a difference image.

Detection: connected pixels of the score image (a PSF-flux estimate at every
pixel, see :mod:`dmstream.payloads.subtract`) above ``threshold`` sigma, positive
and negative separately, one source per component at its peak.  A positive and
a negative peak closer than ``dipole_radius`` FWHM become one dipole.

Measurement, vectorised over sources on fixed-size stamps, with PSF kernels
interpolated from a coarse grid of positions and moved by separable Fourier
(band-limited) shifts evaluated only on the stamp pixels:

- centroid: a linearised least-squares PSF fit (flux and shift, two
  Gauss-Newton steps from the score peak), errors from its Fisher matrix;
- psfFlux: the linear PSF fit at that centroid with the variance plane;
  scienceFlux / templateFlux: the same fit, forced, on the science image and
  the PSF-matched template with their own PSFs;
- apFlux: 12-pixel-radius aperture (APDB definition), ``sep``;
- ixx, iyy, ixy: Gaussian-weighted moments (weight = PSF-sized Gaussian)
  corrected for the weight, i.e. the moments of a Gaussian with the same
  weighted moments (one step of adaptive moments), arcsec²;
- trail: for sources whose major axis exceeds the PSF's, the length of a line
  that convolved with the PSF gives the measured moments (variance along the
  trail is s^2 + L^2/12 for a PSF of width s), its position angle, and its aperture flux;
- dipole: linear two-lobe PSF fit at the lobes' centroids;
- pixel flags from the mask in the footprint (1 FWHM radius) and the central
  3 x 3 pixels; a heuristic reliability from shape, flags and dipole-ness.

The output is a pyarrow Table whose columns carry the names, types and units
of the APDB ``DiaSource`` table of ``lsst-sdm-schemas`` (fluxes in nJy,
moments in arcsec², angles in degrees East of North).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import scipy.sparse
import scipy.sparse.csgraph
import sep
from astropy.wcs import WCS

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
#: Pixels kept around the fitting stamps on the PSF kernels that are shifted: more than the largest
#: centroid shift (1.5) plus the reach of the band-limited interpolant's significant lobes.
_SHIFT_MARGIN = 8
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
     ("trailRa", pa.float64()), ("trailDec", pa.float64()), ("trailLength", _FLOAT),
     ("trailAngle", _FLOAT), ("trail_flag", pa.bool_()), ("trail_flag_edge", pa.bool_()),
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
    dipole_radius : float
        Largest separation of a positive and a negative peak merged into a dipole, FWHM.
    aperture_radius : float
        Radius of apFlux, pixels (12 in the APDB definition).
    trail_min_excess : float
        A source counts as trailed when its major-axis moment exceeds the PSF's
        by this factor (and its SNR exceeds ``trail_min_snr``).
    trail_min_snr : float
    psf_grid : float
        Spacing of the nodes where the PSF models are evaluated, pixels; kernels
        in between are bilinear interpolations of the four nearest.
    """

    threshold: float = 5.0
    min_pixels: int = 2
    stamp_fwhms: float = 2.0
    deblend_separation: float = 1.5
    dipole_radius: float = 2.0
    aperture_radius: float = 12.0
    trail_min_excess: float = 1.6
    trail_min_snr: float = 10.0
    psf_grid: float = 512.0


@dataclass
class DiaSourceResult:
    """Detected and measured DiaSources.

    Attributes
    ----------
    table : pyarrow.Table
        One row per DiaSource, columns of ``SCHEMA``.
    positive, negative : int
        Peaks found above and below threshold (before dipole merging).
    """

    table: pa.Table
    positive: int
    negative: int


def njy_per_electron(zero_point: float | None) -> float:
    """nJy of one electron at ``zero_point`` (AB mag of 1 e⁻); NaN when unknown."""
    return float(10.0 ** (0.4 * (AB_NJY_ZERO_POINT - zero_point))) if zero_point is not None else float("nan")


def detect(snr: np.ndarray, usable: np.ndarray, threshold: float, min_pixels: int, separation: float
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Peaks of connected regions beyond ±threshold.

    Regions are 4-connected pixels of one sign.  Every local maximum (of
    |snr|, over the 8 neighbours) inside a region is a peak, unless a higher
    peak of the same region lies within ``separation`` pixels: close
    neighbours (two transients, a transient on a galaxy) are kept apart, noise
    bumps on a bright source are not.  NaN in ``snr`` counts as 0.

    Returns
    -------
    x, y : numpy.ndarray
        Integer peak pixels.
    sign : numpy.ndarray
        +1 or -1.
    peak_snr : numpy.ndarray
    bbox : numpy.ndarray
        Side of the square bounding the region of each peak, pixels.
    """
    rows, cols = snr.shape
    with np.errstate(invalid="ignore"):
        py, px = np.nonzero((np.abs(snr) > threshold) & usable)
    if not py.size:
        empty = np.zeros(0, dtype=np.intp)
        return empty, empty, empty, np.zeros(0), empty
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
    keep = np.ones(py.size, bool)
    for i in range(py.size):
        if keep[i]:
            close = (label[i + 1:] == label[i]) & (np.hypot(px[i + 1:] - px[i], py[i + 1:] - py[i])
                                                    < separation)
            keep[i + 1:] &= ~close
    return px[keep], py[keep], sign[keep], (sign * value)[keep], bbox[label[keep]]


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


def _stamps(array: np.ndarray, cx: np.ndarray, cy: np.ndarray, half: int, fill: float = 0.0) -> np.ndarray:
    """(n, 2 half + 1, 2 half + 1) cut-outs centred on integer pixels, ``fill`` off the image."""
    rows, cols = array.shape
    offsets = np.arange(-half, half + 1)
    iy = cy[:, None] + offsets[None, :]
    ix = cx[:, None] + offsets[None, :]
    out = array[np.clip(iy, 0, rows - 1)[:, :, None], np.clip(ix, 0, cols - 1)[:, None, :]]
    outside = ((iy < 0) | (iy >= rows))[:, :, None] | ((ix < 0) | (ix >= cols))[:, None, :]
    return np.where(outside, fill, out)


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
        The moved kernels and, with ``derivatives``, their x and y spatial derivatives.
    """
    size = kernels.shape[-1]
    along_x, slope_x = _shift_matrices(dx, size, half)
    along_y, slope_y = _shift_matrices(dy, size, half)
    rows_moved = kernels @ np.swapaxes(along_x, 1, 2)
    moved = along_y @ rows_moved
    if not derivatives:
        return (moved,)
    return moved, along_y @ (kernels @ np.swapaxes(slope_x, 1, 2)), slope_y @ rows_moved


def _kernels(psf: PsfModel, x: np.ndarray, y: np.ndarray, size: int, half: int, spacing: float
             ) -> np.ndarray:
    """PSF kernels (unit sum over ``size`` pixels) at (x, y), cropped to +-``half``.

    The PSF varies slowly over a CCD, so it is evaluated only on the nodes of a
    grid ``spacing`` pixels apart around the sources and bilinearly
    interpolated between them.
    """
    if x.size == 0:
        return np.zeros((0, 2 * half + 1, 2 * half + 1))
    gx, gy = x / spacing, y / spacing
    x0, y0 = int(np.floor(gx.min())), int(np.floor(gy.min()))
    nx, ny = int(np.floor(gx.max())) - x0 + 2, int(np.floor(gy.max())) - y0 + 2
    nodes = np.array([[_crop(np.asarray(psf.kernel((x0 + i) * spacing, (y0 + j) * spacing, size), float),
                             half) for i in range(nx)] for j in range(ny)])
    ix, iy = np.floor(gx).astype(np.intp) - x0, np.floor(gy).astype(np.intp) - y0
    fx, fy = (gx - x0 - ix)[:, None, None], (gy - y0 - iy)[:, None, None]
    return ((1 - fy) * ((1 - fx) * nodes[iy, ix] + fx * nodes[iy, ix + 1])
            + fy * ((1 - fx) * nodes[iy + 1, ix] + fx * nodes[iy + 1, ix + 1]))


def _crop(stamps: np.ndarray, half: int) -> np.ndarray:
    centre = stamps.shape[-1] // 2
    return stamps[..., centre - half:centre + half + 1, centre - half:centre + half + 1]


def _linear_flux(data: np.ndarray, weight: np.ndarray, model: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares amplitude of ``model`` in ``data`` (per stamp) and its error."""
    information = (weight * model**2).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        flux = (weight * model * data).sum(axis=(1, 2)) / information
        return flux, 1.0 / np.sqrt(information)


def _fit_centroids(data: np.ndarray, weight: np.ndarray, kernels: np.ndarray, dx: np.ndarray,
                   dy: np.ndarray, half: int, steps: int = 2) -> tuple[np.ndarray, ...]:
    """Gauss-Newton fit of flux and shift of the PSF; returns dx, dy, covariance (n, 3, 3), flux."""
    for _ in range(steps + 1):
        model, ddx, ddy = _shifted(kernels, dx, dy, half)
        flux, _ = _linear_flux(data, weight, model)
        # Columns: d model / d flux, d model / d x0, d model / d y0.
        basis = np.stack([model, -flux[:, None, None] * ddx, -flux[:, None, None] * ddy], axis=1)
        fisher = np.einsum("nipq,njpq,npq->nij", basis, basis, weight)
        fisher += np.eye(3) * 1e-12 * np.trace(fisher, axis1=1, axis2=2)[:, None, None]
        residual = data - flux[:, None, None] * model
        gradient = np.einsum("nipq,npq->ni", basis, weight * residual)
        step = np.linalg.solve(fisher, gradient[..., None])[..., 0]
        # A source without usable pixels (all masked) keeps its starting position; centroid_flag says so.
        step = np.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0)
        dx = np.clip(dx + step[:, 1], -1.5, 1.5)
        dy = np.clip(dy + step[:, 2], -1.5, 1.5)
    covariance = np.linalg.inv(fisher)
    return dx, dy, covariance, flux


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
    wcs = science.wcs
    if wcs is None or science.psf is None or diff.psf is None:
        raise ValueError("the science image needs a WCS and a PSF")
    rows, cols = diff.shape
    usable = (diff.mask & MaskPlane.NO_DATA) == 0
    fwhm = diff.psf.fwhm((cols - 1) / 2, (rows - 1) / 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = subtraction.score / np.sqrt(subtraction.score_variance)
    px, py, sign, peak_snr, bbox = detect(snr, usable, config.threshold, config.min_pixels,
                                          config.deblend_separation * fwhm)
    positive, negative = int((sign > 0).sum()), int((sign < 0).sum())

    half = max(int(np.ceil(config.stamp_fwhms * fwhm)), 3)
    # Kernels normalised as wide as subtraction used, so that the fitted model holds (nearly) all the
    # flux, then cut to what a shift of the fitting stamp can reach.
    kernel_size = 2 * max(subtraction.kernel_half, half + _SHIFT_MARGIN) + 1

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

    image_stamps = _stamps(diff.image, px, py, half)
    var_stamps = np.nan_to_num(_stamps(diff.variance, px, py, half), nan=0.0)
    mask_stamps = _stamps(diff.mask, px, py, half, fill=int(MaskPlane.NO_DATA))
    bad_fit = MaskPlane.NO_DATA | MaskPlane.SAT | MaskPlane.BAD
    with np.errstate(divide="ignore"):
        weight = np.where(((mask_stamps & bad_fit) == 0) & (var_stamps > 0), 1.0 / var_stamps, 0.0)
    kernels = _kernels(diff.psf, px, py, kernel_size, half + _SHIFT_MARGIN, config.psf_grid)
    dx, dy, covariance, _ = _fit_centroids(image_stamps, weight, kernels, start_dx, start_dy, half)
    x, y = px + dx, py + dy
    model = _shifted(kernels, dx, dy, half, derivatives=False)[0]
    psf_flux, psf_flux_err = _linear_flux(image_stamps, weight, model)
    residual = image_stamps - psf_flux[:, None, None] * model
    ndata = (weight > 0).sum(axis=(1, 2))
    chi2 = (weight * residual**2).sum(axis=(1, 2))
    ln_l = -0.5 * chi2 - 0.5 * np.where(weight > 0, np.log(2 * np.pi / np.where(weight > 0, weight, 1)),
                                        0).sum(axis=(1, 2))

    # Dipoles: pair each negative peak with the nearest positive one within reach.
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
    rows_out = [int(i) for i in np.flatnonzero(keep)] + [p for p, _ in pairs]
    index = np.array(rows_out, dtype=np.intp)
    is_dipole = np.zeros(index.size, bool)
    is_dipole[keep.sum():] = True
    dipole = {name: np.full(index.size, np.nan) for name in
              ("mean", "mean_err", "diff", "diff_err", "length", "angle", "chi2")}
    dipole_ndata = np.zeros(index.size, np.int32)
    out_x, out_y = x[index].copy(), y[index].copy()
    out_cov = covariance[index][:, 1:, 1:].copy()
    for k, (p, n) in enumerate(pairs, start=int(keep.sum())):
        fit = _fit_dipole(diff, x[p], y[p], x[n], y[n], half)
        dipole["mean"][k], dipole["mean_err"][k], dipole["diff"][k], dipole["diff_err"][k] = fit[:4]
        dipole["chi2"][k], dipole_ndata[k] = fit[4], fit[5]
        dipole["length"][k] = np.hypot(x[p] - x[n], y[p] - y[n])
        out_x[k], out_y[k] = (x[p] + x[n]) / 2, (y[p] + y[n]) / 2
        out_cov[k] = (covariance[p][1:, 1:] + covariance[n][1:, 1:]) / 4
    if pairs:
        p_idx, n_idx = np.array(pairs).T
        dipole["angle"][keep.sum():] = position_angle(wcs, out_x[keep.sum():], out_y[keep.sum():],
                                                      x[p_idx] - x[n_idx], y[p_idx] - y[n_idx])

    # Net PSF flux of a dipole is measured at its centre; single sources keep their fit.
    flux, flux_err = psf_flux[index].copy(), psf_flux_err[index].copy()
    if pairs:
        dip = slice(int(keep.sum()), None)
        cx, cy = np.rint(out_x[dip]).astype(np.intp), np.rint(out_y[dip]).astype(np.intp)
        flux[dip], flux_err[dip] = _forced(diff, out_x[dip], out_y[dip], cx, cy, half, kernel_size,
                                           config.psf_grid)
    ix, iy = np.rint(out_x).astype(np.intp), np.rint(out_y).astype(np.intp)
    ix_c, iy_c = np.clip(ix, 0, cols - 1), np.clip(iy, 0, rows - 1)
    science_flux, science_err = _forced(science, out_x, out_y, ix_c, iy_c, half, kernel_size, config.psf_grid)
    template = subtraction.template
    template_flux, template_err = _forced(template, out_x, out_y, ix_c, iy_c, half, kernel_size,
                                          config.psf_grid)

    ap_mask = (diff.mask & (MaskPlane.NO_DATA | MaskPlane.SAT | MaskPlane.BAD)) != 0
    variance = np.nan_to_num(diff.variance, nan=0.0)
    ap_flux, ap_err, ap_flag = sep.sum_circle(np.ascontiguousarray(diff.image, dtype=np.float32),
                                              out_x, out_y, config.aperture_radius,
                                              var=np.ascontiguousarray(variance, dtype=np.float32),
                                              mask=ap_mask)
    truncated = ((out_x < config.aperture_radius) | (out_y < config.aperture_radius)
                 | (out_x > cols - 1 - config.aperture_radius) | (out_y > rows - 1 - config.aperture_radius))

    # Shapes on sign-corrected stamps, weight a Gaussian of the PSF's size.
    sigma = fwhm / 2.3548
    sx, sy = out_x - ix, out_y - iy
    polarity = np.sign(np.where(flux == 0, 1, flux))[:, None, None]
    ixx, iyy, ixy, shape_ok = _weighted_moments(_stamps(diff.image, ix_c, iy_c, half) * polarity,
                                                sigma, sx, sy)
    centre = (cols - 1) / 2, (rows - 1) / 2
    centre_psf = _crop(np.asarray(diff.psf.kernel(*centre, kernel_size), float), half)[None]
    pxx, pyy, pxy, _ = _weighted_moments(centre_psf, sigma, np.zeros(1), np.zeros(1))
    trace_ratio = (ixx + iyy) / (pxx + pyy)

    # Trails: extent along the major axis beyond the PSF's, as a line convolved with the PSF.
    spread = np.sqrt(((ixx - iyy) / 2) ** 2 + ixy**2)
    major = (ixx + iyy) / 2 + spread
    psf_major = float(((pxx + pyy) / 2 + np.sqrt(((pxx - pyy) / 2) ** 2 + pxy**2))[0])
    snr_abs = np.abs(peak_snr[index])
    trailed = shape_ok & (major > config.trail_min_excess * psf_major) & (snr_abs >= config.trail_min_snr) \
        & ~is_dipole
    length_px = np.sqrt(np.clip(12.0 * (major - psf_major), 0.0, None))
    theta = 0.5 * np.arctan2(2 * ixy, ixx - iyy)
    pixel_scale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))) * 3600.0
    trail_length = np.where(trailed, length_px * pixel_scale, np.nan)
    trail_angle = np.where(trailed, position_angle(wcs, out_x, out_y, np.cos(theta), np.sin(theta)) % 180,
                           np.nan)
    trail_flux = np.full(index.size, np.nan)
    trail_err = np.full(index.size, np.nan)
    if trailed.any():
        radius = np.maximum(length_px[trailed] / 2 + 2 * fwhm, config.aperture_radius)
        trail_flux[trailed], trail_err[trailed], _ = sep.sum_circle(
            np.ascontiguousarray(diff.image, dtype=np.float32), out_x[trailed], out_y[trailed], radius,
            var=np.ascontiguousarray(variance, dtype=np.float32), mask=ap_mask)

    mask_out = _stamps(diff.mask, ix_c, iy_c, half, fill=int(MaskPlane.NO_DATA))
    footprint, center = _flag_masks(mask_out, max(fwhm, 2.0), sx, sy)
    tmask = _stamps(template.mask, ix_c, iy_c, half, fill=int(MaskPlane.NO_DATA))
    tfoot, tcenter = _flag_masks(tmask, max(fwhm, 2.0), sx, sy)
    offimage = (out_x < -0.5) | (out_y < -0.5) | (out_x > cols - 0.5) | (out_y > rows - 0.5)
    center_bad = (center & (MaskPlane.SAT | MaskPlane.CR | MaskPlane.BAD | MaskPlane.NO_DATA)) != 0
    chi2_dof = chi2[index] / np.maximum(ndata[index] - 3, 1)
    reliability = _reliability(trace_ratio, chi2_dof, center_bad, is_dipole, snr_abs)

    ra, dec, ra_err, dec_err, ra_dec_cov = _sky_errors(wcs, out_x, out_y, out_cov)
    to_njy = njy_per_electron(science.zero_point)
    arcsec2 = pixel_scale**2
    mjd = science.metadata.get("MJD-OBS")
    midpoint = float(mjd) + science.exptime / 2 / 86400 if mjd is not None else np.nan
    n = index.size
    bad_psf = ~np.isfinite(flux) | (ndata[index] == 0)
    columns = {
        "diaSourceId": id_offset + np.arange(n), "visit": np.full(n, visit), "detector": np.full(n, detector),
        "midpointMjdTai": np.full(n, midpoint), "exposureTime": np.full(n, science.exptime),
        "band": [science.band] * n,
        "ra": ra, "raErr": ra_err, "dec": dec, "decErr": dec_err, "ra_dec_Cov": ra_dec_cov,
        "x": out_x, "xErr": np.sqrt(out_cov[:, 0, 0]), "y": out_y, "yErr": np.sqrt(out_cov[:, 1, 1]),
        "centroid_flag": ~np.isfinite(out_cov[:, 0, 0]) | (np.abs(x - px)[index] > 1.4)
        | (np.abs(y - py)[index] > 1.4),
        "apFlux": ap_flux * to_njy, "apFluxErr": ap_err * to_njy, "apFlux_flag": ap_flag != 0,
        "apFlux_flag_apertureTruncated": truncated, "isNegative": sign[index] < 0, "snr": snr_abs,
        "psfFlux": flux * to_njy, "psfFluxErr": flux_err * to_njy, "psfLnL": ln_l[index],
        "psfChi2": chi2[index], "psfNdata": ndata[index], "psfFlux_flag": bad_psf,
        "psfFlux_flag_edge": (footprint & (MaskPlane.EDGE | MaskPlane.NO_DATA)) != 0,
        "psfFlux_flag_noGoodPixels": ndata[index] == 0,
        "trailFlux": trail_flux * to_njy, "trailFluxErr": trail_err * to_njy,
        "trailRa": np.where(trailed, ra, np.nan), "trailDec": np.where(trailed, dec, np.nan),
        "trailLength": trail_length, "trailAngle": trail_angle, "trail_flag": ~shape_ok,
        "trail_flag_edge": trailed & ((footprint & MaskPlane.EDGE) != 0),
        "dipoleMeanFlux": dipole["mean"] * to_njy, "dipoleMeanFluxErr": dipole["mean_err"] * to_njy,
        "dipoleFluxDiff": dipole["diff"] * to_njy, "dipoleFluxDiffErr": dipole["diff_err"] * to_njy,
        "dipoleLength": dipole["length"] * pixel_scale, "dipoleAngle": dipole["angle"],
        "dipoleChi2": dipole["chi2"], "dipoleNdata": dipole_ndata, "isDipole": is_dipole,
        "dipoleFitAttempted": is_dipole,
        "scienceFlux": science_flux * to_njy, "scienceFluxErr": science_err * to_njy,
        "forced_PsfFlux_flag": ~np.isfinite(science_flux),
        "templateFlux": template_flux * to_njy, "templateFluxErr": template_err * to_njy,
        "ixx": ixx * arcsec2, "iyy": iyy * arcsec2, "ixy": ixy * arcsec2,
        "ixxPSF": np.full(n, pxx[0] * arcsec2), "iyyPSF": np.full(n, pyy[0] * arcsec2),
        "ixyPSF": np.full(n, pxy[0] * arcsec2), "shape_flag": ~shape_ok,
        "extendedness": np.clip(trace_ratio - 1.0, 0.0, 1.0),
        "reliability": reliability, "reliabilityVersion": [RELIABILITY_VERSION] * n,
        "bboxSize": bbox[index], "pixelFlags": offimage, "pixelFlags_offimage": offimage,
        "pixelFlags_injected_template": (tfoot & MaskPlane.INJECTED) != 0,
        "pixelFlags_injected_templateCenter": (tcenter & MaskPlane.INJECTED) != 0,
    }
    for name, planes in PIXEL_FLAG_PLANES.items():
        columns[f"pixelFlags_{name}"] = (footprint & planes) != 0
    for name in CENTER_FLAGS:
        columns[f"pixelFlags_{name}Center"] = (center & PIXEL_FLAG_PLANES[name]) != 0
    arrays = [pa.array(np.asarray(columns[f.name]), type=f.type) if f.type != pa.string()
              else pa.array(columns[f.name], type=f.type) for f in SCHEMA]
    return DiaSourceResult(pa.Table.from_arrays(arrays, schema=SCHEMA), positive, negative)


def _forced(image: CcdImage, x: np.ndarray, y: np.ndarray, cx: np.ndarray, cy: np.ndarray, half: int,
            kernel_size: int, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear PSF flux at fixed positions (x, y) on stamps centred on pixels (cx, cy)."""
    if x.size == 0 or image.psf is None:
        return np.full(x.size, np.nan), np.full(x.size, np.nan)
    data = _stamps(image.image, cx, cy, half)
    var = np.nan_to_num(_stamps(image.variance, cx, cy, half), nan=0.0)
    bad = (_stamps(image.mask, cx, cy, half, fill=int(MaskPlane.NO_DATA))
           & (MaskPlane.NO_DATA | MaskPlane.SAT | MaskPlane.BAD)) != 0
    with np.errstate(divide="ignore"):
        weight = np.where(~bad & (var > 0), 1.0 / var, 0.0)
    kernels = _kernels(image.psf, x, y, kernel_size, half + _SHIFT_MARGIN, spacing)
    model = _shifted(kernels, x - cx, y - cy, half, derivatives=False)[0]
    return _linear_flux(data, weight, model)


def _fit_dipole(diff: CcdImage, xp: float, yp: float, xn: float, yn: float, half: int
                ) -> tuple[float, float, float, float, float, int]:
    """Linear fit of a positive and a negative PSF at fixed lobe positions.

    Returns mean absolute flux, its error, flux difference (positive minus
    negative lobe), its error, chi², pixels used.
    """
    assert diff.psf is not None
    cx, cy = round((xp + xn) / 2), round((yp + yn) / 2)
    reach = half + int(np.ceil(max(abs(xp - xn), abs(yp - yn)) / 2))
    pad = reach + 4
    centre = np.array([cx]), np.array([cy])
    data = _stamps(diff.image, *centre, reach)[0]
    var = np.nan_to_num(_stamps(diff.variance, *centre, reach)[0], nan=0.0)
    bad = (_stamps(diff.mask, *centre, reach, fill=int(MaskPlane.NO_DATA))[0]
           & (MaskPlane.NO_DATA | MaskPlane.SAT | MaskPlane.BAD)) != 0
    with np.errstate(divide="ignore"):
        weight = np.where(~bad & (var > 0), 1.0 / var, 0.0)
    kernel = diff.psf.kernel((xp + xn) / 2, (yp + yn) / 2, 2 * pad + 1)
    lobes = _shifted(np.stack([kernel, kernel]), np.array([xp - cx, xn - cx]), np.array([yp - cy, yn - cy]),
                     reach, derivatives=False)[0]
    basis = np.stack([lobes[0], -lobes[1]]).reshape(2, -1)
    w = weight.ravel()
    fisher = (basis * w) @ basis.T
    amplitudes = np.linalg.solve(fisher, (basis * w) @ data.ravel())
    cov = np.linalg.inv(fisher)
    chi2 = float((w * (data.ravel() - amplitudes @ basis) ** 2).sum())
    mean = (amplitudes[0] + amplitudes[1]) / 2
    mean_err = 0.5 * np.sqrt(cov[0, 0] + cov[1, 1] + 2 * cov[0, 1])
    difference = amplitudes[0] - amplitudes[1]
    difference_err = np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    return float(mean), float(mean_err), float(difference), float(difference_err), chi2, int((w > 0).sum())
