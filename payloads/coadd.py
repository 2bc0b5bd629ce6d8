"""Templates: weighted coadds of calibrated visits on sky tiles, and a science CCD's template cut from them.

Coadds (:func:`run`, :func:`build_tile`).  Each visit is warped
(:mod:`dmstream.payloads.warp`) onto the part of the tile's grid it covers,
scaled to the coadd zero point, and averaged with one weight per visit, the
inverse of its typical (median) variance.  Per-visit rather than per-pixel
weights keep the coadd PSF the same weighted sum of the input PSFs everywhere,
including around bright stars whose Poisson noise would otherwise tilt the
weights pixel by pixel; and a visit's weight is a property of the visit, the
same in every tile it reaches, so neighbouring tiles agree where they overlap.
Pixels flagged NO_DATA, BAD, SAT or CR in a visit are left out of its sum, and
the weights renormalised there.

Templates (:func:`template_for`).  A science CCD's template is stitched from
the tile coadds that cover it: every 16 x 16 block of science pixels takes the
tile whose core holds the block's centre (:meth:`~dmstream.payloads.tiles.SkyMap.owners`),
and each tile is resampled onto its own blocks only, so the template costs
about one CCD warp however many tiles it spans.  One tile per pixel, rather
than a blend where the tiles' grids overlap, keeps the template's PSF at every
pixel that of one tile coadd: :class:`TemplatePsf` looks up the same
ownership.  Both tiles hold the same visits with the same weights where they
meet, so the seam is continuous to the accuracy of the interpolation.

Variances follow :func:`~dmstream.payloads.warp.warp_image`: a warped pixel's
variance is that of the input pixels it was interpolated from, not the
smaller variance of the interpolated value itself, which is what sums over
several pixels (PSF fluxes, the subtraction's filters) need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from astropy.wcs import WCS

from dmstream.payloads.image import CcdImage, PsfModel
from dmstream.payloads.masks import MASK_DTYPE, MaskPlane
from dmstream.payloads.subtract import zero_point_scale
from dmstream.payloads.tiles import OWNER_BLOCK, Tile
from dmstream.payloads.warp import WarpConfig, WarpedPsf, overlap_box, warp_image

T = TypeVar("T")

#: Planes that exclude a visit's pixel from the coadd.
REJECTED_PLANES = MaskPlane.NO_DATA | MaskPlane.BAD | MaskPlane.SAT | MaskPlane.CR


class CoaddError(ValueError):
    """Inputs that cannot make a coadd or a template."""


@dataclass(frozen=True)
class CoaddConfig:
    """How to coadd.

    Attributes
    ----------
    zero_point : float
        AB magnitude of one count of the coadd (31.4 makes a count 1 nJy).
    warp : WarpConfig
    """

    zero_point: float = 31.4
    warp: WarpConfig = field(default_factory=WarpConfig)


@dataclass
class CoaddResult:
    """A coadd and what went into it.

    Attributes
    ----------
    coadd : CcdImage
        On the tile grid; PSF a :class:`CoaddPsf`; mask NO_DATA where no visit
        contributed, and the OR of the rejected planes where any visit had them.
    weights : numpy.ndarray
        Weight of each input visit (1 / its median variance at the coadd zero
        point; 0 for a visit that does not reach the grid).
    depth : numpy.ndarray
        int16, number of visits contributing to each pixel.
    tile : Tile or None
        The sky tile, for coadds made by :func:`build_tile`.
    """

    coadd: CcdImage
    weights: np.ndarray
    depth: np.ndarray
    tile: Tile | None = None


class Coverage:
    """Where one visit contributes to a coadd: a box of the coadd grid and its pixels with data.

    The pixels are kept as bits (``numpy.packbits``): a coadd PSF outlives its
    coadd in every template cut from it, and a byte per pixel per visit would
    be 18 MB per visit on a 4200-pixel tile.

    Parameters
    ----------
    box : tuple of slice
        (rows, cols) of the coadd grid.
    pixels : numpy.ndarray
        Boolean, the shape of the box: True where the visit has data.
    """

    def __init__(self, box: tuple[slice, slice], pixels: np.ndarray) -> None:
        self.box, self.shape = box, pixels.shape
        self.bits = np.packbits(pixels, axis=1)

    def covers(self, x: float, y: float) -> bool:
        """Whether the pixel nearest to (x, y) of the coadd grid has this visit's data."""
        iy, ix = round(y) - self.box[0].start, round(x) - self.box[1].start
        rows, cols = self.shape
        return 0 <= iy < rows and 0 <= ix < cols and bool(self.bits[iy, ix >> 3] >> (7 - (ix & 7)) & 1)


class CoaddPsf:
    """Weighted sum of the input PSFs (already carried onto the coadd grid) at a position.

    Parameters
    ----------
    psfs : sequence of PsfModel
        PSFs of the warped visits.
    weights : numpy.ndarray
        Visit weights.
    coverages : sequence of Coverage
        Where each visit has data on the coadd grid; a visit counts at (x, y) only there.
    """

    def __init__(self, psfs: Sequence[PsfModel], weights: np.ndarray, coverages: Sequence[Coverage]) -> None:
        self.psfs, self.weights, self.coverages = list(psfs), np.asarray(weights, float), list(coverages)

    def _weights_at(self, x: float, y: float) -> np.ndarray:
        covered = np.array([coverage.covers(x, y) for coverage in self.coverages])
        weights = self.weights * covered
        # Where no visit has data the PSF is undefined; the mean of them all stands in.
        return weights / weights.sum() if weights.sum() > 0 else self.weights / self.weights.sum()

    def kernel(self, x: float, y: float, size: int) -> np.ndarray:
        weights = self._weights_at(x, y)
        total = sum(w * psf.kernel(x, y, size) for w, psf in zip(weights, self.psfs, strict=True) if w > 0)
        return total / total.sum()

    def fwhm(self, x: float, y: float) -> float:
        # The weighted mean FWHM; exact for equal PSFs, a fair approximation for similar ones.
        weights = self._weights_at(x, y)
        return float(sum(w * psf.fwhm(x, y) for w, psf in zip(weights, self.psfs, strict=True) if w > 0))


def _visit_weight(visit: CcdImage, scale: float) -> float:
    """1 / the median variance of a visit's usable pixels at the coadd zero point (a strided sample)."""
    sample = visit.variance[::4, ::4][(visit.mask[::4, ::4] & REJECTED_PLANES) == 0]
    sample = sample[np.isfinite(sample) & (sample > 0)]
    return 1.0 / (float(np.median(sample)) * scale**2) if sample.size else 0.0


def run(visits: Sequence[CcdImage], tile_wcs: WCS, tile_shape: tuple[int, int],
        config: CoaddConfig | None = None) -> CoaddResult:
    """Coadd calibrated visits onto a grid; each visit is warped only onto the part it covers.

    Parameters
    ----------
    visits : sequence of CcdImage
        Background-subtracted, with WCS, PSF and zero point, all in one band.
    tile_wcs : astropy.wcs.WCS
        The common sky grid.
    tile_shape : tuple of int
        (rows, cols) of the grid.
    config : CoaddConfig, optional

    Returns
    -------
    CoaddResult

    Raises
    ------
    CoaddError
        No visits, a visit without WCS or PSF, visits in different bands, or
        none that reaches the grid.
    """
    config = config or CoaddConfig()
    if not visits:
        raise CoaddError("nothing to coadd")
    for number, visit in enumerate(visits):
        if visit.wcs is None or visit.psf is None:
            raise CoaddError(f"visit {number} has no {'WCS' if visit.wcs is None else 'PSF'}")
    if len({visit.band for visit in visits}) > 1:
        raise CoaddError(f"visits in several bands: {sorted({visit.band for visit in visits})}")
    # float32 sums: a few tens of visits lose nothing, and a 4200-pixel tile's sums take 212 MB, not 424.
    total = np.zeros(tile_shape, np.float32)
    total_weight = np.zeros(tile_shape, np.float32)
    total_variance = np.zeros(tile_shape, np.float32)
    depth = np.zeros(tile_shape, np.int16)
    mask = np.zeros(tile_shape, MASK_DTYPE)
    weights = np.zeros(len(visits))
    psfs: list[PsfModel] = []
    coverages: list[Coverage] = []
    exptime = 0.0
    for number, visit in enumerate(visits):
        box = overlap_box(visit.wcs, visit.shape, tile_wcs, tile_shape)
        if box is None:
            continue
        scale = zero_point_scale(visit.zero_point, config.zero_point)
        weight = _visit_weight(visit, scale)
        if weight == 0:
            continue
        warped = warp_image(visit, tile_wcs.slice(box), _box_shape(box), config.warp).image
        good = (warped.mask & REJECTED_PLANES) == 0
        if not good.any():
            continue
        weights[number] = weight
        psfs.append(WarpedPsf(visit.psf, visit.wcs, tile_wcs))
        coverages.append(Coverage(box, good))
        # In place, over the box only: the warped arrays are this loop's own.
        np.multiply(warped.image, np.float32(weight * scale), out=warped.image)
        np.add(total[box], warped.image, out=total[box], where=good)
        np.multiply(warped.variance, np.float32((weight * scale) ** 2), out=warped.variance)
        np.add(total_variance[box], warped.variance, out=total_variance[box], where=good)
        np.add(total_weight[box], np.float32(weight), out=total_weight[box], where=good)
        np.add(depth[box], np.int16(1), out=depth[box], where=good)
        np.bitwise_or(mask[box], warped.mask & MASK_DTYPE(REJECTED_PLANES), out=mask[box],
                      where=(warped.mask & MaskPlane.NO_DATA) == 0)
        exptime += visit.exptime
    if not psfs:
        raise CoaddError("no visit reaches the coadd grid")
    # The sums become the coadd in place (uncovered pixels: image 0 as summed, variance NaN, NO_DATA).
    covered = total_weight > 0
    image, variance = total, total_variance
    np.divide(total, total_weight, out=image, where=covered)
    np.square(total_weight, out=total_weight)
    np.divide(total_variance, total_weight, out=variance, where=covered)
    uncovered = ~covered
    np.copyto(variance, np.float32(np.nan), where=uncovered)
    np.bitwise_or(mask, MASK_DTYPE(MaskPlane.NO_DATA), out=mask, where=uncovered)
    coadd = CcdImage(image, variance, mask, tile_wcs, CoaddPsf(psfs, weights[weights > 0], coverages),
                     config.zero_point, visits[0].band, exptime)
    return CoaddResult(coadd, weights, depth)


def build_tile(visits: Sequence[CcdImage], tile: Tile, config: CoaddConfig | None = None) -> CoaddResult:
    """Coadd of the visits that reach a sky tile, on the tile's grid (see :func:`run`).

    Parameters
    ----------
    visits : sequence of CcdImage
        Calibrated visits in one band; those that do not reach the tile are skipped.
    tile : Tile
        From :meth:`dmstream.payloads.tiles.SkyMap.tiles_overlapping` or ``SkyMap.tile``.
    config : CoaddConfig, optional

    Returns
    -------
    CoaddResult
        With ``tile`` set, and the tile's name, id and skymap in the coadd's metadata.
    """
    result = run(visits, tile.wcs, tile.shape, config)
    result.tile = tile
    result.coadd.metadata.update({"TILE": tile.name, "TILEID": tile.id, "SKYMAP": tile.skymap.name})
    return result


@dataclass(frozen=True)
class TemplateConfig:
    """How to cut a science CCD's template from tile coadds.

    Attributes
    ----------
    block : int
        Side of the square blocks of science pixels that take one tile,
        pixels; at most the skymap's margin / 2, so that a block's pixels and
        the interpolation's taps stay on its tile's grid.
    warp : WarpConfig
    """

    block: int = OWNER_BLOCK
    warp: WarpConfig = field(default_factory=WarpConfig)


@dataclass
class TemplateResult:
    """A template on a science CCD's grid.

    Attributes
    ----------
    template : CcdImage
        At the tiles' zero point, on the science grid; PSF a
        :class:`TemplatePsf`; NO_DATA (image 0, variance NaN) where no given
        tile covers the pixel; exposure time the longest of the tiles';
        metadata ``TILES``, the names of the tiles used.
    tile_ids : list of int
        The tiles that make it.
    coverage : float
        Fraction of the science pixels with template data.
    """

    template: CcdImage
    tile_ids: list[int]
    coverage: float


class TemplatePsf:
    """PSF of a template stitched from tiles: at each pixel, that of the tile coadd the pixel came from.

    Parameters
    ----------
    owners : numpy.ndarray
        Tile id of each ``block`` x ``block`` block of the science grid.
    block : int
        Pixels.
    psfs : dict of int to PsfModel
        Each tile coadd's PSF carried onto the science grid.
    fallback : int
        The tile whose PSF stands in where the owning tile was not given.
    """

    def __init__(self, owners: np.ndarray, block: int, psfs: dict[int, PsfModel], fallback: int) -> None:
        self.owners, self.block, self.psfs, self.fallback = owners, block, psfs, fallback

    def _psf_at(self, x: float, y: float) -> PsfModel:
        rows, cols = self.owners.shape
        row = min(max(round(y) // self.block, 0), rows - 1)
        col = min(max(round(x) // self.block, 0), cols - 1)
        return self.psfs.get(int(self.owners[row, col]), self.psfs[self.fallback])

    def kernel(self, x: float, y: float, size: int) -> np.ndarray:
        return self._psf_at(x, y).kernel(x, y, size)

    def fwhm(self, x: float, y: float) -> float:
        return self._psf_at(x, y).fwhm(x, y)


def _box_shape(box: tuple[slice, slice]) -> tuple[int, int]:
    return box[0].stop - box[0].start, box[1].stop - box[1].start


def _block_runs(owned: np.ndarray, block: int, shape: tuple[int, int]) -> list[tuple[slice, slice]]:
    """Pixel slices, clipped to ``shape``, of the runs of True blocks along each row of ``owned``."""
    runs = []
    for row, flags in enumerate(owned):
        edges = np.flatnonzero(np.diff(np.r_[0, flags.astype(np.int8), 0]))
        rows = slice(row * block, min((row + 1) * block, shape[0]))
        runs.extend((rows, slice(start * block, min(stop * block, shape[1])))
                    for start, stop in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))
    return runs


def _single(values: set[T], what: str) -> T:
    """The one value all tile coadds share."""
    if len(values) != 1:
        raise CoaddError(f"the tile coadds differ in {what}: {sorted(map(str, values))}")
    return next(iter(values))


def template_for(tile_coadds: Sequence[CoaddResult], science_wcs: WCS, science_shape: tuple[int, int],
                 config: TemplateConfig | None = None) -> TemplateResult:
    """A science CCD's template, resampled from the tile coadds that cover it.

    Parameters
    ----------
    tile_coadds : sequence of CoaddResult
        From :func:`build_tile`, one skymap, band and zero point; more tiles
        than the CCD needs may be given.
    science_wcs : astropy.wcs.WCS
    science_shape : tuple of int
        (rows, cols) of the science CCD.
    config : TemplateConfig, optional

    Returns
    -------
    TemplateResult
        The template keeps the tiles' zero point;
        :func:`dmstream.payloads.subtract.run` scales it to the science image's.

    Raises
    ------
    CoaddError
        No tile coadds, coadds not made by :func:`build_tile`, coadds of
        different skymaps, bands or zero points, none that the CCD needs, or
        blocks too large for the skymap's margins.
    """
    config = config or TemplateConfig()
    if not tile_coadds:
        raise CoaddError("no tile coadds to make a template of")
    tiles = [result.tile for result in tile_coadds if result.tile is not None]
    if len(tiles) < len(tile_coadds):
        raise CoaddError("template_for needs tile coadds (from build_tile), not coadds on a free grid")
    by_id = {tile.id: (tile, result) for tile, result in zip(tiles, tile_coadds, strict=True)}
    skymap = _single({tile.skymap for tile in tiles}, "skymap")
    band = _single({result.coadd.band for result in tile_coadds}, "band")
    zero_point = _single({result.coadd.zero_point for result in tile_coadds}, "zero point")
    if config.block > skymap.margin // 2:
        raise CoaddError(f"blocks of {config.block} pixels reach beyond the {skymap.margin}-pixel margins "
                         f"of {skymap.name}'s tiles")
    owners = skymap.owners(science_wcs, science_shape, config.block)
    rows, cols = science_shape
    block = config.block
    image = np.zeros(science_shape, np.float32)
    variance = np.full(science_shape, np.nan, np.float32)
    mask = np.full(science_shape, MaskPlane.NO_DATA, MASK_DTYPE)
    psfs: dict[int, PsfModel] = {}
    owned_blocks: dict[int, int] = {}
    exptime = 0.0
    for tile_id in np.unique(owners).tolist():
        if tile_id not in by_id:
            continue
        tile, source = by_id[tile_id]
        owned = owners == tile_id
        block_rows, block_cols = np.flatnonzero(owned.any(axis=1)), np.flatnonzero(owned.any(axis=0))
        box = (slice(int(block_rows[0]) * block, min((int(block_rows[-1]) + 1) * block, rows)),
               slice(int(block_cols[0]) * block, min((int(block_cols[-1]) + 1) * block, cols)))
        shape = _box_shape(box)
        wanted = owned[block_rows[0]:block_rows[-1] + 1, block_cols[0]:block_cols[-1] + 1]
        wanted = np.repeat(np.repeat(wanted, block, axis=0), block, axis=1)[:shape[0], :shape[1]]
        part = warp_image(source.coadd, science_wcs.slice(box), shape, config.warp, where=wanted).image
        # Copied run by run of owned blocks: slices copy far faster than a masked copy of the box.
        for run_rows, run_cols in _block_runs(owned[block_rows[0]:block_rows[-1] + 1,
                                                    block_cols[0]:block_cols[-1] + 1], block, shape):
            inside = (slice(box[0].start + run_rows.start, box[0].start + run_rows.stop),
                      slice(box[1].start + run_cols.start, box[1].start + run_cols.stop))
            image[inside] = part.image[run_rows, run_cols]
            variance[inside] = part.variance[run_rows, run_cols]
            mask[inside] = part.mask[run_rows, run_cols]
        psfs[tile_id] = WarpedPsf(source.coadd.psf, tile.wcs, science_wcs)
        owned_blocks[tile_id] = int(owned.sum())
        exptime = max(exptime, source.coadd.exptime)
    if not psfs:
        needed = ", ".join(skymap.tile(tile_id).name for tile_id in np.unique(owners).tolist())
        raise CoaddError(f"none of the tiles the science CCD needs ({needed}) is among the tile coadds")
    fallback = max(owned_blocks, key=owned_blocks.__getitem__)
    template = CcdImage(image, variance, mask, science_wcs, TemplatePsf(owners, block, psfs, fallback),
                        zero_point, band, exptime, {"TILES": [by_id[tile_id][0].name for tile_id in psfs]})
    coverage = float(np.count_nonzero((mask & MaskPlane.NO_DATA) == 0)) / mask.size
    return TemplateResult(template, list(psfs), coverage)
