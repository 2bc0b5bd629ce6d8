"""Resampling an image from one WCS onto another pixel grid.

The pixel mapping is smooth, so the WCS (astropy, slow per point) is evaluated
only on a coarse grid of nodes and carried to every output pixel by cubic
splines, a tensor product that costs two small matrix products.  The image is
then interpolated with cubic B-splines (``scipy.ndimage.map_coordinates``,
order 3: interpolating, with a Lanczos-like response but a compact 4 x 4
footprint), the variance with bilinear weights (smooth, stays positive), the
mask by nearest pixel, grown by one pixel so that a flagged pixel taints every
output pixel whose interpolant touched it.  Output pixels that map outside the
input are NO_DATA, with image 0 and variance NaN.

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
        Output rows interpolated at a time (keeps the coordinate arrays in cache).
    """

    grid_spacing: int = 64
    block_rows: int = 256


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


def pixel_mapping(source_wcs: WCS, target_wcs: WCS, target_shape: tuple[int, int],
                  spacing: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Source pixel coordinates of every target pixel.

    Parameters
    ----------
    source_wcs, target_wcs : astropy.wcs.WCS
    target_shape : tuple of int
        (rows, cols) of the target grid.
    spacing : int
        Node spacing of the coarse grid, pixels.

    Returns
    -------
    x, y : numpy.ndarray
        float32 arrays of ``target_shape``: the source column and row (0-based) of each target pixel.
    """
    rows, cols = target_shape
    node_x = np.unique(np.r_[np.arange(0, cols, spacing), cols - 1]).astype(float)
    node_y = np.unique(np.r_[np.arange(0, rows, spacing), rows - 1]).astype(float)
    # At least 4 nodes per axis so that the cubic spline is defined; extra nodes beyond the edge are harmless.
    if node_x.size < 4:
        node_x = np.linspace(0, max(cols - 1, 3), 4)
    if node_y.size < 4:
        node_y = np.linspace(0, max(rows - 1, 3), 4)
    grid_x, grid_y = np.meshgrid(node_x, node_y)
    ra, dec = target_wcs.pixel_to_world_values(grid_x, grid_y)
    src_x, src_y = source_wcs.world_to_pixel_values(ra, dec)
    along_y = _spline_matrix(node_y, np.arange(rows, dtype=float))
    along_x = _spline_matrix(node_x, np.arange(cols, dtype=float))
    return ((along_y @ src_x @ along_x.T).astype(np.float32),
            (along_y @ src_y @ along_x.T).astype(np.float32))


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


def warp_image(source: CcdImage, target_wcs: WCS, target_shape: tuple[int, int],
               config: WarpConfig | None = None) -> WarpResult:
    """Resample ``source`` (image, variance, mask, PSF) onto the grid of ``target_wcs``.

    Parameters
    ----------
    source : CcdImage
        Must have a WCS.
    target_wcs : astropy.wcs.WCS
    target_shape : tuple of int
        (rows, cols) of the target grid.
    config : WarpConfig, optional

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
    map_x, map_y = pixel_mapping(source.wcs, target_wcs, target_shape, config.grid_spacing)
    rows_in, cols_in = source.shape
    image = np.zeros(target_shape, dtype=np.float32)
    variance = np.zeros(target_shape, dtype=np.float32)
    mask = np.full(target_shape, MaskPlane.NO_DATA, dtype=MASK_DTYPE)
    # Spline coefficients once for the whole image; NaN-free input is required, so masked
    # NO_DATA pixels count as 0 there (they are flagged in the output mask anyway).
    clean = np.where(np.isfinite(source.image), source.image, 0.0).astype(np.float32)
    coefficients = ndi.spline_filter(clean, order=3, output=np.float32)
    source_mask = source.mask | grow_bits(source.mask & SPREADING_PLANES, 1)
    for start in range(0, target_shape[0], config.block_rows):
        block = slice(start, start + config.block_rows)
        bx, by = map_x[block], map_y[block]
        inside = (bx >= -0.5) & (bx <= cols_in - 0.5) & (by >= -0.5) & (by <= rows_in - 0.5)
        if not inside.any():
            continue
        coords = [by, bx]
        image[block] = ndi.map_coordinates(coefficients, coords, order=3, prefilter=False,
                                           mode="nearest", output=np.float32)
        variance[block] = ndi.map_coordinates(source.variance, coords, order=1, mode="nearest",
                                              output=np.float32)
        ix = np.clip(np.rint(bx).astype(np.intp), 0, cols_in - 1)
        iy = np.clip(np.rint(by).astype(np.intp), 0, rows_in - 1)
        mask[block] = np.where(inside, source_mask[iy, ix], MaskPlane.NO_DATA)
    no_data = (mask & MaskPlane.NO_DATA) != 0
    image[no_data] = 0.0
    variance[no_data] = np.nan
    psf = WarpedPsf(source.psf, source.wcs, target_wcs) if source.psf is not None else None
    warped = replace(source, image=image, variance=variance, mask=mask, wcs=target_wcs, psf=psf)
    return WarpResult(warped, float(1.0 - no_data.mean()))
