"""Resampling an image from one WCS onto another pixel grid.

The pixel mapping is smooth, so the WCS (astropy, slow per point) is evaluated
only on a coarse grid of nodes and carried to every output pixel by cubic
splines, a tensor product that costs two small matrix products.

Resampling is separable, in two passes over blocks of output rows: the first
interpolates each source column along y to the points where it crosses an
output row, the second interpolates that intermediate row along x to the
output pixels.  Over a CCD the mapping is close to affine with a small
rotation, so the two 1-D passes reproduce the 2-D interpolation while each
output value costs 2 x 6 taps instead of a 2-D footprint, gathered with
numpy in float32 from flat indices.  The image is interpolated by Lanczos-3
(interpolating; weights normalised to sum to 1, so fluxes are kept) with the
weights looked up in a table of sub-pixel offsets, the variance with linear
weights (bilinear overall: smooth, stays positive), the mask by nearest pixel
in each pass after growing the spreading planes by one pixel, so that a
flagged pixel taints every output pixel whose interpolant leaned on it with a
large weight (taps within 1.5 pixels; farther ones weigh less than 0.14).
Output pixels that map outside the input are NO_DATA, with image 0 and
variance NaN.

Positions are 0-based pixels, x = column, as astropy's ``*_values`` methods use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import scipy.interpolate
import scipy.ndimage as ndi
from astropy.wcs import WCS

from dmstream.payloads.image import CcdImage, PsfModel
from dmstream.payloads.masks import MASK_DTYPE, MaskPlane

#: Mask planes that spread to neighbours through the interpolation kernel.
SPREADING_PLANES = MaskPlane.BAD | MaskPlane.SAT | MaskPlane.CR | MaskPlane.NO_DATA | MaskPlane.INTRP


@dataclass(frozen=True)
class WarpConfig:
    """How to warp.

    Attributes
    ----------
    grid_spacing : int
        Distance between the nodes where the WCS is evaluated exactly, pixels.
        A TAN-to-TAN mapping over 64 pixels departs from its cubic spline by
        far less than 0.001 pixel.
    block_rows : int
        Output rows resampled at a time: both passes over a block, with their
        index arrays, stay in cache.
    """

    grid_spacing: int = 64
    block_rows: int = 32


@dataclass
class WarpResult:
    """A warped image and the pixel mapping that made it.

    Attributes
    ----------
    image : CcdImage
        On the target grid; its PSF is a :class:`WarpedPsf`.
    coverage : float
        Fraction of target pixels with data.
    """

    image: CcdImage
    coverage: float


def _spline_matrix(nodes: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Matrix (len(points), len(nodes)) that evaluates at ``points`` the cubic spline through node values."""
    return scipy.interpolate.CubicSpline(nodes, np.eye(nodes.size), axis=0)(points)


def _nodes(length: int, spacing: int) -> np.ndarray:
    """Spline nodes every ``spacing`` pixels along an axis of ``length`` pixels, both ends included."""
    nodes = np.unique(np.r_[np.arange(0, length, spacing), length - 1]).astype(float)
    # At least 4 nodes so that the cubic spline is defined; extra nodes beyond the edge are harmless.
    return nodes if nodes.size >= 4 else np.linspace(0, max(length - 1, 3), 4)


def _source_pixels(source_wcs: WCS, target_wcs: WCS, x: np.ndarray, y: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Source pixel (x, y) of target pixels (x, y)."""
    return source_wcs.world_to_pixel_values(*target_wcs.pixel_to_world_values(x, y))


def local_jacobian(source_wcs: WCS, target_wcs: WCS, x: float, y: float, step: float = 1.0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Source position of target pixel (x, y), and d(source pixel)/d(target pixel) there.

    The Jacobian is 2 x 2, rows (source x, source y), columns (target x, target y).
    """
    px = np.array([x, x + step, x - step, x, x])
    py = np.array([y, y, y, y + step, y - step])
    sx, sy = source_wcs.world_to_pixel_values(*target_wcs.pixel_to_world_values(px, py))
    jac = np.array([[sx[1] - sx[2], sx[3] - sx[4]], [sy[1] - sy[2], sy[3] - sy[4]]]) / (2 * step)
    return np.array([sx[0], sy[0]]), jac


def resample_kernel(kernel: np.ndarray, jacobian: np.ndarray, size: int) -> np.ndarray:
    """A PSF stamp seen through a local linear pixel mapping, on a ``size`` x ``size`` target stamp.

    Parameters
    ----------
    kernel : numpy.ndarray
        Odd, centred source stamp.
    jacobian : numpy.ndarray
        d(source pixel)/d(target pixel), (2, 2) with rows (x, y).
    size : int
        Odd side of the target stamp.

    Returns
    -------
    numpy.ndarray
        float64 stamp summing to 1.
    """
    half_in, half_out = kernel.shape[0] // 2, size // 2
    offsets = np.arange(size, dtype=float) - half_out
    ty, tx = np.meshgrid(offsets, offsets, indexing="ij")
    sx = jacobian[0, 0] * tx + jacobian[0, 1] * ty + half_in
    sy = jacobian[1, 0] * tx + jacobian[1, 1] * ty + half_in
    out = ndi.map_coordinates(kernel.astype(float), [sy, sx], order=3, mode="constant", cval=0.0)
    total = out.sum()
    return out / total if total > 0 else out


class WarpedPsf:
    """The PSF of a warped image: the source PSF carried through the local pixel mapping.

    Parameters
    ----------
    psf : PsfModel
        PSF on the source grid.
    source_wcs, target_wcs : astropy.wcs.WCS
    """

    def __init__(self, psf: PsfModel, source_wcs: WCS, target_wcs: WCS) -> None:
        self.psf, self.source_wcs, self.target_wcs = psf, source_wcs, target_wcs

    def kernel(self, x: float, y: float, size: int) -> np.ndarray:
        (sx, sy), jac = local_jacobian(self.source_wcs, self.target_wcs, x, y)
        # A margin on the source stamp so that rotation does not cut the corners.
        source_size = 2 * int(np.ceil(size * np.abs(jac).sum(axis=1).max() / 2)) + 1
        return resample_kernel(self.psf.kernel(float(sx), float(sy), source_size), jac, size)

    def fwhm(self, x: float, y: float) -> float:
        (sx, sy), jac = local_jacobian(self.source_wcs, self.target_wcs, x, y)
        # Source pixels per target pixel, as a length.
        return float(self.psf.fwhm(float(sx), float(sy)) / np.sqrt(abs(np.linalg.det(jac))))


def _running_or(array: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """OR of each element with its neighbours within ``radius`` along ``axis`` (zeros beyond the ends).

    OR has no inverse, so no running sum: windows of doubling length are ORed
    together instead, about log2(2 radius + 1) passes whatever the radius.
    """
    width, length = 2 * radius + 1, array.shape[axis]

    def along(start: int, stop: int | None) -> tuple[slice, ...]:
        return (slice(None),) * axis + (slice(start, stop),)

    shape = list(array.shape)
    shape[axis] += 2 * radius
    padded = np.zeros(shape, dtype=array.dtype)
    padded[along(radius, radius + length)] = array
    # After each step padded[i] holds the OR of the original padded[i:i + span].
    span = 1
    while 2 * span <= width:
        padded = padded[along(0, -span)] | padded[along(span, None)]
        span *= 2
    return padded[along(0, length)] | padded[along(width - span, width - span + length)]


def grow_bits(mask: np.ndarray, radius: int) -> np.ndarray:
    """Each pixel ORed with the bits of its neighbours within a (2 radius + 1)² box.

    The planes set somewhere are packed into the narrowest unsigned integer
    that holds them (a mask uses few planes, and a byte is a quarter of the
    traffic of the 32-bit mask), then dilated by two running ORs over the
    bounding box of the set pixels only.  Packing touches the set pixels only,
    which are few.
    """
    out = mask.copy()
    flat = mask.ravel()
    set_pixels = np.flatnonzero(flat)
    if radius <= 0 or set_pixels.size == 0:
        return out
    values = flat[set_pixels]
    present = int(np.bitwise_or.reduce(values))
    bits = [1 << k for k in range(present.bit_length()) if present >> k & 1]
    table = None
    if len(bits) <= 16:
        packed_type = np.uint8 if len(bits) <= 8 else np.uint16
        codes = np.zeros(values.size, dtype=packed_type)
        # Code bit k stands for the k-th plane present; the table maps every code back to its planes.
        table = np.zeros(1 << len(bits), dtype=mask.dtype)
        for k, bit in enumerate(bits):
            codes |= ((values & mask.dtype.type(bit)) != 0).astype(packed_type) << packed_type(k)
            table[(np.arange(table.size) >> k & 1) == 1] |= mask.dtype.type(bit)
        values = codes
    rows, cols = mask.shape
    set_rows, set_cols = set_pixels // cols, set_pixels % cols
    box = (slice(max(int(set_rows.min()) - radius, 0), min(int(set_rows.max()) + radius + 1, rows)),
           slice(max(int(set_cols.min()) - radius, 0), min(int(set_cols.max()) + radius + 1, cols)))
    packed = np.zeros(mask.shape, dtype=values.dtype)
    packed.ravel()[set_pixels] = values
    grown = _running_or(_running_or(packed[box], radius, 1), radius, 0)
    out[box] |= grown if table is None else table[grown]
    return out


#: Sub-pixel offsets per pixel in the table of interpolation weights (a power of 2, so that a
#: position scaled by it splits into pixel and offset by shift and mask).  Rounding the offset to
#: 1/1024 pixel moves a weight by less than 0.001.
WEIGHT_BINS = 1024
_BIN_BITS = WEIGHT_BINS.bit_length() - 1


def _lanczos_weights(bins: int, lobes: int = 3) -> np.ndarray:
    """Lanczos weights, (2 lobes, bins), of the taps at 1 - lobes ... lobes from the floor of a position.

    Column b is for a sub-pixel offset of b / bins; each column is normalised
    to sum to 1, so that a flat image stays flat and fluxes are kept.
    """
    t = np.arange(bins) / bins
    s = t[None, :] - np.arange(1 - lobes, lobes + 1)[:, None]
    weights = np.sinc(s) * np.sinc(s / lobes)
    return (weights / weights.sum(axis=0)).astype(np.float32)


_WEIGHTS = _lanczos_weights(WEIGHT_BINS)
#: Taps per pass, and the padding (= lobes) that keeps every tap of a clipped floor inside the array.
_TAPS = _WEIGHTS.shape[0]
_PAD = _TAPS // 2
#: Linear weight of the upper neighbour, by offset bin.
_LINEAR = (np.arange(WEIGHT_BINS) / WEIGHT_BINS).astype(np.float32)


class _Lines:
    """Image, variance and mask as lines to interpolate along, padded by ``_PAD`` pixels at both ends.

    The padding repeats the end pixels, so that taps beyond an end read the
    nearest pixel without clipping every tap's index.

    Parameters
    ----------
    shape : tuple of int
        Unpadded (rows, cols).
    axis : int
        The axis the lines run along.
    """

    def __init__(self, shape: tuple[int, int], axis: int) -> None:
        padded = list(shape)
        padded[axis] += 2 * _PAD
        self.image = np.empty(padded, np.float32)
        self.variance = np.empty(padded, np.float32)
        self.mask = np.empty(padded, MASK_DTYPE)
        self.axis = axis
        self.stride = 1 if axis == 1 else padded[1]  # flat distance between neighbours along a line

    def interior(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views of image, variance and mask without the padding, to fill."""
        inside = [slice(None), slice(None)]
        inside[self.axis] = slice(_PAD, -_PAD)
        return self.image[tuple(inside)], self.variance[tuple(inside)], self.mask[tuple(inside)]

    def fill_ends(self) -> None:
        """Copy the end pixels of the filled interior into the padding."""
        for array in (self.image, self.variance, self.mask):
            lines = np.moveaxis(array, self.axis, -1)
            lines[..., :_PAD] = lines[..., _PAD:_PAD + 1]
            lines[..., -_PAD:] = lines[..., -_PAD - 1:-_PAD]

    def interpolate(self, start: np.ndarray, bins: np.ndarray, outside: np.ndarray,
                    out: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        """Values at positions with first taps ``start`` (flat indices) and offset ``bins``.

        Writes into ``out`` (shaped like ``start``) the image by Lanczos-3, the
        variance by linear interpolation, the mask of the nearest pixel, NO_DATA
        where ``outside``.
        """
        image, variance, mask = out
        stride = self.stride
        flat_image, flat_variance, flat_mask = (a.reshape(-1) for a in (self.image, self.variance, self.mask))
        # Tap k of every position is element ``start`` of the array viewed from k strides on.  The
        # indices are in range by construction, and mode="wrap" is numpy's fastest take for them.
        np.multiply(_WEIGHTS[0].take(bins), flat_image.take(start, mode="wrap"), out=image)
        for k in range(1, _TAPS):
            image += _WEIGHTS[k].take(bins) * flat_image[k * stride:].take(start, mode="wrap")
        floor = (_PAD - 1) * stride
        low = flat_variance[floor:].take(start, mode="wrap")
        np.subtract(flat_variance[floor + stride:].take(start, mode="wrap"), low, out=variance)
        variance *= _LINEAR.take(bins)
        variance += low
        nearest = bins >> (_BIN_BITS - 1)  # 1 where the upper neighbour is the nearer
        if stride != 1:
            nearest *= stride
        nearest += start
        mask[...] = flat_mask[floor:].take(nearest, mode="wrap")
        np.copyto(mask, MASK_DTYPE(MaskPlane.NO_DATA), where=outside)


def _split(position: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First tap, offset bin and out-of-range flag of positions along lines of ``length`` pixels.

    The first tap is an index into the line padded by ``_PAD`` (= lobes) at each
    end: floor - lobes + 1 + ``_PAD``, with the floor clipped to [-1, length - 1]
    (outside positions only need valid indices).  ``position`` is overwritten.
    """
    position *= WEIGHT_BINS
    scaled = np.rint(position, out=position).astype(np.intp)
    # In range is -0.5 <= position <= length - 0.5; negative numbers read as unsigned are huge.
    outside = (scaled + WEIGHT_BINS // 2).view(np.uintp) > length * WEIGHT_BINS
    first = scaled >> _BIN_BITS
    np.clip(first, -1, length - 1, out=first)
    first += 1
    scaled &= WEIGHT_BINS - 1
    return first, scaled, outside


def _row_crossings(source_wcs: WCS, target_wcs: WCS, node_rows: np.ndarray, node_cols: np.ndarray
                   ) -> np.ndarray:
    """Source row where each target row in ``node_rows`` crosses each source column in ``node_cols``.

    Along a target row the source column is monotonic and nearly linear (the
    mapping is close to affine, with a rotation far below 45°), so the crossing
    is found by Newton steps that keep the slope of the first guess.
    """
    source_cols, target_rows = np.meshgrid(node_cols, node_rows)
    target_cols = source_cols.copy()
    sx, sy = _source_pixels(source_wcs, target_wcs, target_cols, target_rows)
    slope = _source_pixels(source_wcs, target_wcs, target_cols + 1.0, target_rows)[0] - sx
    for _ in range(20):
        miss = source_cols - sx
        if np.abs(miss).max() < 1e-5:
            break
        target_cols = target_cols + miss / slope
        sx, sy = _source_pixels(source_wcs, target_wcs, target_cols, target_rows)
    return sy


def grid_outline(shape: tuple[int, int], spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Points (x, y) at most ``spacing`` pixels apart along the outer pixel edges of a grid of ``shape``."""
    rows, cols = shape
    along_x = np.r_[np.arange(-0.5, cols - 0.5, spacing), cols - 0.5]
    along_y = np.r_[np.arange(-0.5, rows - 0.5, spacing), rows - 0.5]
    x = np.r_[along_x, along_x, np.full(along_y.size, -0.5), np.full(along_y.size, cols - 0.5)]
    y = np.r_[np.full(along_x.size, -0.5), np.full(along_x.size, rows - 0.5), along_y, along_y]
    return x, y


def overlap_box(source_wcs: WCS, source_shape: tuple[int, int], target_wcs: WCS,
                target_shape: tuple[int, int], spacing: int = 64) -> tuple[slice, slice] | None:
    """Bounding box of the target pixels that the source grid covers, or None when they do not meet.

    The source's outline (pixel edges, sampled every ``spacing`` pixels) is
    carried onto the target grid; over a CCD or a tile the mapping is close to
    affine, so the outline's extremes are the footprint's.

    Returns
    -------
    tuple of slice or None
        (rows, cols) slices of the target grid, clipped to it.
    """
    tx, ty = target_wcs.world_to_pixel_values(*source_wcs.pixel_to_world_values(
        *grid_outline(source_shape, spacing)))
    return _clipped_box(tx, ty, target_shape, margin=1)


def _clipped_box(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], margin: int
                 ) -> tuple[slice, slice] | None:
    """Pixels of a grid of ``shape`` within ``margin`` of the bounding box of points (x, y), or None.

    Points that the grid's projection cannot reach (NaN: more than 90° from
    its tangent point) are left out.
    """
    rows, cols = shape
    reached = np.isfinite(x) & np.isfinite(y)
    if not reached.any():
        return None
    x, y = x[reached], y[reached]
    x0, x1 = max(int(np.floor(x.min())) - margin, 0), min(int(np.ceil(x.max())) + margin + 1, cols)
    y0, y1 = max(int(np.floor(y.min())) - margin, 0), min(int(np.ceil(y.max())) + margin + 1, rows)
    return (slice(y0, y1), slice(x0, x1)) if x0 < x1 and y0 < y1 else None


def _nodes_around(where: np.ndarray, node_rows: np.ndarray, node_cols: np.ndarray) -> np.ndarray:
    """Which nodes of a grid are corners of a cell (between neighbouring nodes) with a pixel in ``where``."""
    if min(where.shape) < 4:
        # Such a grid's nodes run past its edge (see ``_nodes``): all of them are used.
        return np.ones((node_rows.size, node_cols.size), bool)
    row_starts, col_starts = node_rows[:-1].astype(np.intp), node_cols[:-1].astype(np.intp)
    cells = np.logical_or.reduceat(np.logical_or.reduceat(where, row_starts, axis=0), col_starts, axis=1)
    corners = np.zeros((node_rows.size, node_cols.size), bool)
    for dy in (0, 1):
        for dx in (0, 1):
            corners[dy:dy + cells.shape[0], dx:dx + cells.shape[1]] |= cells
    return corners


def _block_spans(where: np.ndarray, block_rows: int) -> list[slice]:
    """For each block of ``block_rows`` rows, the columns from its first to its last pixel in ``where``."""
    wanted = np.logical_or.reduceat(where, np.arange(0, where.shape[0], block_rows), axis=0)
    first = wanted.argmax(axis=1)
    last = where.shape[1] - wanted[:, ::-1].argmax(axis=1)
    return [slice(int(a), int(b)) if row.any() else slice(0, 0)
            for a, b, row in zip(first, last, wanted, strict=True)]


def _no_data(source: CcdImage, target_wcs: WCS, target_shape: tuple[int, int]) -> WarpResult:
    """The warp of an image that does not reach the target grid."""
    psf = WarpedPsf(source.psf, source.wcs, target_wcs) if source.psf is not None else None
    empty = replace(source, image=np.zeros(target_shape, np.float32),
                    variance=np.full(target_shape, np.nan, np.float32),
                    mask=np.full(target_shape, MaskPlane.NO_DATA, MASK_DTYPE), wcs=target_wcs, psf=psf)
    return WarpResult(empty, 0.0)


class _TransposedWcs:
    """The sky mapping of a transposed image: its pixel (x, y) is pixel (y, x) of the original."""

    def __init__(self, wcs: WCS) -> None:
        self.wcs = wcs

    def world_to_pixel_values(self, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.wcs.world_to_pixel_values(ra, dec)
        return y, x

    def pixel_to_world_values(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.wcs.pixel_to_world_values(y, x)


def warp_image(source: CcdImage, target_wcs: WCS, target_shape: tuple[int, int],
               config: WarpConfig | None = None, *, where: np.ndarray | None = None) -> WarpResult:
    """Resample ``source`` (image, variance, mask, PSF) onto the grid of ``target_wcs``.

    Only the part of the source that the target grid maps onto is read, so
    warping a large image (a coadd tile) onto a small grid costs what the
    small grid needs.  To resample onto part of a grid, pass
    ``target_wcs.slice((rows, cols))`` and the part's shape.

    Parameters
    ----------
    source : CcdImage
        Must have a WCS.
    target_wcs : astropy.wcs.WCS
    target_shape : tuple of int
        (rows, cols) of the target grid.
    config : WarpConfig, optional
    where : numpy.ndarray, optional
        Boolean, ``target_shape``: the target pixels wanted.  Resampling skips
        the blocks of rows without any, and in the others the columns outside
        the span of the wanted ones; the pixels skipped are NO_DATA.

    Returns
    -------
    WarpResult
        Image in the same units as the source (surface brightness per pixel is
        not rescaled: both grids are taken to have the same pixel area, as
        detectors and coadd tiles at 0.2″/px do).
    """
    config = config or WarpConfig()
    if source.wcs is None:
        raise ValueError("the source image has no WCS")
    if where is not None and where.shape != tuple(target_shape):
        raise ValueError(f"where {where.shape} does not match the target shape {tuple(target_shape)}")
    rows, cols = target_shape
    _, jacobian = local_jacobian(source.wcs, target_wcs, (cols - 1) / 2, (rows - 1) / 2)
    if abs(jacobian[0, 0]) < abs(jacobian[0, 1]):
        # Near a quarter turn, pass 1 would squeeze the intermediate rows to lines; the transposed
        # source leaves a turn of less than 45 degrees (and a reflection, which the passes take).
        transposed = replace(source, image=source.image.T, variance=source.variance.T, mask=source.mask.T,
                             wcs=_TransposedWcs(source.wcs), psf=None)
        result = warp_image(transposed, target_wcs, target_shape, config, where=where)
        psf = WarpedPsf(source.psf, source.wcs, target_wcs) if source.psf is not None else None
        return WarpResult(replace(result.image, psf=psf), result.coverage)
    spacing = config.grid_spacing
    node_rows, node_cols = _nodes(rows, spacing), _nodes(cols, spacing)
    grid_cols, grid_rows = np.meshgrid(node_cols, node_rows)
    source_x, source_y = _source_pixels(source.wcs, target_wcs, grid_cols, grid_rows)
    if not np.isfinite(source_x).any():
        return _no_data(source, target_wcs, target_shape)
    if not np.isfinite(source_x).all():
        raise ValueError("the target grid reaches beyond 90 deg from the source WCS's tangent point")
    # The source is cut to the bounding box of the target's nodes (those around wanted pixels), with
    # room for the taps and for the splines' departures from the nodes' hull (far below a pixel for a
    # smooth mapping).
    needed = np.ones(source_x.shape, bool) if where is None else _nodes_around(where, node_rows, node_cols)
    box = _clipped_box(source_x[needed], source_y[needed], source.shape, margin=_TAPS + 2)
    if box is None:
        return _no_data(source, target_wcs, target_shape)
    y0, x0 = box[0].start, box[1].start
    rows_in, cols_in = box[0].stop - y0, box[1].stop - x0
    # Splines of the mapping minus the identity and a whole-pixel shift: small numbers that float32
    # carries to 1e-5 pixel; adding the pixel index back leaves positions good to 1/4000 pixel.
    # Pass 1 needs the source row where each target row crosses each source column, pass 2 the
    # source column of each target pixel.  Source positions are counted from the box's corner.
    node_in = _nodes(cols_in, spacing)
    map_x = source_x - x0 - grid_cols
    map_y = _row_crossings(source.wcs, target_wcs, node_rows, node_in + x0) - y0 - node_rows[:, None]
    shift_x, shift_y = int(np.rint(np.median(map_x))), int(np.rint(np.median(map_y)))
    along_y = _spline_matrix(node_rows, np.arange(rows, dtype=float)).astype(np.float32)
    spline_x = ((map_x - shift_x) @ _spline_matrix(node_cols, np.arange(cols, dtype=float)).T
                ).astype(np.float32)
    spline_y = ((map_y - shift_y) @ _spline_matrix(node_in, np.arange(cols_in, dtype=float)).T
                ).astype(np.float32)

    columns = _Lines((rows_in, cols_in), axis=0)
    clean, columns_variance, columns_mask = columns.interior()
    # A NaN would spread through the taps, so non-finite (NO_DATA) pixels count as 0; they are
    # flagged in the output mask anyway.
    np.copyto(clean, source.image[box])
    finite = np.isfinite(clean)
    if not finite.all():
        clean[~finite] = 0.0
    np.copyto(columns_variance, source.variance[box])
    np.bitwise_and(source.mask[box], MASK_DTYPE(SPREADING_PLANES), out=columns_mask)
    np.bitwise_or(source.mask[box], grow_bits(columns_mask, 1), out=columns_mask)
    columns.fill_ends()
    image = np.empty(target_shape, dtype=np.float32)
    variance = np.empty(target_shape, dtype=np.float32)
    mask = np.empty(target_shape, dtype=MASK_DTYPE)
    no_data_pixels = 0
    out_cols = np.arange(cols, dtype=np.float32) + shift_x
    in_cols = np.arange(cols_in)
    spans = _block_spans(where, config.block_rows) if where is not None else None
    for number, start in enumerate(range(0, rows, config.block_rows)):
        block = slice(start, start + config.block_rows)
        target_rows = np.arange(start, min(start + config.block_rows, rows), dtype=np.float32)[:, None]
        span = slice(0, cols) if spans is None else spans[number]
        # Columns outside the span are not resampled.
        for outside in (slice(0, span.start), slice(span.stop, cols)):
            if outside.stop > outside.start:
                image[block, outside], variance[block, outside], mask[block, outside] = (
                    0.0, np.nan, MaskPlane.NO_DATA)
                no_data_pixels += image[block, outside].size
        if span.stop == span.start:
            continue
        out = image[block, span], variance[block, span], mask[block, span]
        first_x, bins_x, outside_x = _split(along_y[block] @ spline_x[:, span] + out_cols[span], cols_in)
        if outside_x.all():
            out[0][...], out[1][...], out[2][...] = 0.0, np.nan, MaskPlane.NO_DATA
            no_data_pixels += out[0].size
            continue
        # Pass 1 resamples only the source columns that pass 2's taps read: [first_x - _PAD, + _TAPS).
        used = slice(max(int(first_x.min()) - _PAD, 0), min(int(first_x.max()) - _PAD + _TAPS, cols_in))
        # Pass 1: those source columns at their crossings with the block's target rows.
        first_y, bins_y, outside_y = _split(along_y[block] @ spline_y[:, used] + (target_rows + shift_y),
                                            rows_in)
        first_y *= columns.stride  # flat index of the first tap
        first_y += in_cols[used]
        lines = _Lines((target_rows.size, used.stop - used.start), axis=1)
        columns.interpolate(first_y, bins_y, outside_y, lines.interior())
        lines.fill_ends()
        # Pass 2: along those intermediate rows to the output pixels.
        first_x -= used.start
        first_x += np.arange(target_rows.size)[:, None] * lines.image.shape[1]
        lines.interpolate(first_x, bins_x, outside_x, out)
        # NO_DATA pixels get image 0 and variance NaN here, while the block is in cache.
        no_data = (out[2] & MASK_DTYPE(MaskPlane.NO_DATA)) != 0
        np.copyto(out[0], 0.0, where=no_data)
        np.copyto(out[1], np.nan, where=no_data)
        no_data_pixels += int(np.count_nonzero(no_data))
    psf = WarpedPsf(source.psf, source.wcs, target_wcs) if source.psf is not None else None
    warped = replace(source, image=image, variance=variance, mask=mask, wcs=target_wcs, psf=psf)
    return WarpResult(warped, 1.0 - no_data_pixels / image.size)
