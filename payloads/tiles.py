"""A fixed tiling of the whole sky for coadds (a skymap): declination rings of square tiles.

Like Rubin's tracts and patches, every point of the sky belongs to exactly one
tile, the tiling never changes (a tile's id and grid are functions of the
skymap's three parameters only), and each tile has its own pixel grid: a TAN
projection about the tile's centre at 0.2″/px, north up and east left,
covering the tile's own cell (its *core*) plus a margin shared with its
neighbours.

The scheme.  The sky is cut into rings of constant height ``H`` in
declination (``H`` = ``tile_size`` pixels, rounded so that a whole number of
rings spans the sphere); rings 0 and N are caps of radius ``H / 2`` around the
poles, one tile each.  Ring ``r`` (centre Dec = -90° + r H) is cut into
``n_r = ceil(360° cos(δ_e) / H)`` equal cells in RA, δ_e being the ring's
edge nearest the equator, so that no cell is wider than ``H`` on the sky;
cell ``i`` is centred on RA = i · 360° / n_r.  A point's tile is found by
two roundings (ring from Dec, cell from RA), and tile ids count the cells
ring after ring from the south pole.

Why rings rather than HEALPix: a ring cell is bounded by a parallel and two
meridians, nearly a square in its own tangent plane, so a square TAN grid
holds it with little waste (a 4000-pixel core in a 4200-pixel grid: 91 % of
the grid is core); HEALPix cells are diamonds whose enclosing square is
twice their area, and their shapes change over the sphere.  Near the poles
the cells become annular sectors whose curvature needs a few tens of pixels
more height; each ring's grid size is measured, not assumed.

Why 4000 pixels (800″, the size of a Rubin patch) with a 100-pixel margin:

- A 4k x 4k CCD (13.6 arcmin on a side) has its pixels in 4.1 tile cores on
  average when aligned with the rings, 4.8 when rotated by 45°, never more
  than 6 (40 random pointings each; at most 7 counting tiles whose margin
  alone reaches it).  Making one CCD's template costs about one CCD warp
  plus a fixed cost per tile, so few tiles per CCD keeps it near one warp;
  2000-pixel tiles would mean 9 to 15 tiles per CCD.
- A tile fits in memory: 4200² = 17.6 Mpx, 212 MB as float32 image and
  variance and a 32-bit mask, about 0.6 GB while it is being built; 8000-pixel
  tiles would need 0.9 GB to hold and more than 2 GB to build.
- TAN distortion is negligible across a tile: 0.16° from the tangent point
  the pixel scale departs from 0.2″ by 8 ppm (0.03 pixel over the half-tile).
- The margin (at least ``MIN_MARGIN``) lets a template take, for every
  science pixel, the tile whose core holds it, with the interpolation taps
  and the blocky ownership boundary of :func:`SkyMap.owners` still on that
  tile's own pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np
from astropy.wcs import WCS
from numpy.typing import ArrayLike

from dmstream.payloads.warp import grid_outline

#: Side of the square blocks of CCD pixels that take one tile (see :meth:`SkyMap.owners`), pixels.
OWNER_BLOCK = 16
#: Smallest margin that keeps a block's pixels and their interpolation taps inside the owning tile, pixels.
MIN_MARGIN = 2 * OWNER_BLOCK


class SkyMapError(ValueError):
    """A tile or a skymap that cannot exist."""


@dataclass(frozen=True)
class SkyMap:
    """The tiling: declination rings of square tiles with TAN grids.

    Attributes
    ----------
    tile_size : int
        Height of a ring and largest width of a tile's core, pixels.
    margin : int
        Pixels of the grid beyond the core on every side (at least ``MIN_MARGIN``).
    pixel_scale : float
        Arcsec per pixel.
    """

    tile_size: int = 4000
    margin: int = 100
    pixel_scale: float = 0.2

    def __post_init__(self) -> None:
        if self.tile_size < 4 * OWNER_BLOCK:
            raise SkyMapError(f"tile_size must be at least {4 * OWNER_BLOCK} pixels, got {self.tile_size}")
        if self.margin < MIN_MARGIN:
            raise SkyMapError(f"margin must be at least {MIN_MARGIN} pixels, got {self.margin}")
        if not 0 < self.tile_size * self.pixel_scale <= 3 * 3600:
            raise SkyMapError("a tile must be between 0 and 3 degrees on a side for its TAN grid to hold it")

    @property
    def name(self) -> str:
        """Name for data ids: tile size and margin, e.g. ``rings4000-100``."""
        return f"rings{self.tile_size}-{self.margin}"

    @cached_property
    def polar_ring(self) -> int:
        """Index N of the northern cap (ring 0 is the southern one)."""
        return max(2, round(180.0 * 3600.0 / (self.tile_size * self.pixel_scale)))

    @property
    def ring_height(self) -> float:
        """Height of a ring in declination, deg."""
        return 180.0 / self.polar_ring

    @cached_property
    def tiles_per_ring(self) -> np.ndarray:
        """Number of tiles in each ring, ring 0 (south cap) to N (north cap)."""
        height = self.ring_height
        lower = -90.0 + (np.arange(self.polar_ring + 1) - 0.5) * height
        upper = lower + height
        equatorward = np.where((lower <= 0) & (upper >= 0), 0.0, np.minimum(np.abs(lower), np.abs(upper)))
        # The small tolerance keeps an exact multiple from rounding up to one more tile.
        count = np.ceil(360.0 * np.cos(np.radians(equatorward)) / height - 1e-9).astype(np.int64)
        count[[0, -1]] = 1
        return count

    @cached_property
    def first_ids(self) -> np.ndarray:
        """Id of the first tile of each ring, and the total number of tiles at the end."""
        return np.r_[0, np.cumsum(self.tiles_per_ring)]

    @property
    def tile_count(self) -> int:
        return int(self.first_ids[-1])

    def tile_ids_at(self, ra: ArrayLike, dec: ArrayLike) -> np.ndarray:
        """Id of the tile whose core holds each sky position.

        Parameters
        ----------
        ra, dec : array_like
            Degrees.

        Returns
        -------
        numpy.ndarray
            int64, the broadcast shape of ``ra`` and ``dec``.
        """
        ra, dec = np.broadcast_arrays(np.asarray(ra, dtype=float), np.asarray(dec, dtype=float))
        if not (np.isfinite(ra).all() and np.isfinite(dec).all()) or np.abs(dec).max(initial=0) > 90:
            raise SkyMapError("positions must be finite with |Dec| <= 90 deg")
        ring = np.clip(np.floor((dec + 90.0) / self.ring_height + 0.5), 0, self.polar_ring).astype(np.int64)
        count = self.tiles_per_ring[ring]
        index = np.floor(np.mod(ra, 360.0) * count / 360.0 + 0.5).astype(np.int64) % count
        return self.first_ids[ring] + index

    def tile(self, tile_id: int) -> Tile:
        """The tile of an id."""
        tile_id = int(tile_id)
        if not 0 <= tile_id < self.tile_count:
            raise SkyMapError(f"tile id {tile_id} is not in {self.name} (0 to {self.tile_count - 1})")
        ring = int(np.searchsorted(self.first_ids, tile_id, side="right")) - 1
        index = tile_id - int(self.first_ids[ring])
        ra = index * 360.0 / int(self.tiles_per_ring[ring])
        dec = float(np.clip(-90.0 + ring * self.ring_height, -90.0, 90.0))
        shape, crpix = _ring_grid(self, ring)
        wcs = WCS(naxis=2)
        wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        wcs.wcs.crval = [ra, dec]
        wcs.wcs.crpix = crpix
        scale = self.pixel_scale / 3600.0
        wcs.wcs.cd = [[-scale, 0.0], [0.0, scale]]
        return Tile(tile_id, ring, index, ra, dec, shape, self, wcs)

    def owners(self, wcs: WCS, shape: tuple[int, int], block: int = OWNER_BLOCK) -> np.ndarray:
        """Tile id of each square block of a CCD's pixels: the tile whose core holds the block's centre.

        One tile per block rather than per pixel: the sky position of a
        block's centre costs one WCS evaluation per 256 pixels, and the
        ownership boundary, a staircase within ``block`` pixels of the cores'
        edges, stays well inside every tile's margin.

        Parameters
        ----------
        wcs : astropy.wcs.WCS
            The CCD's pixel -> sky mapping.
        shape : tuple of int
            (rows, cols) of the CCD.
        block : int
            Side of the blocks, pixels (the last row and column of blocks may be narrower).

        Returns
        -------
        numpy.ndarray
            int64, (ceil(rows / block), ceil(cols / block)).
        """
        centre_y, centre_x = (_block_centres(length, block) for length in shape)
        x, y = np.meshgrid(centre_x, centre_y)
        return self.tile_ids_at(*wcs.pixel_to_world_values(x, y))

    def tiles_overlapping(self, wcs: WCS, shape: tuple[int, int]) -> list[Tile]:
        """Tiles whose grid (core and margin) overlaps a CCD, by id.

        These are the tiles a visit contributes to, and a superset of those a
        template of the CCD is made of: the owners of the CCD's blocks, and
        the tiles whose margin alone reaches the CCD, found among the owners
        of blocks up to √2 margins beyond its edges and kept if the CCD's
        outline (sampled every 4 pixels) enters their grid.

        Parameters
        ----------
        wcs : astropy.wcs.WCS
        shape : tuple of int
            (rows, cols) of the CCD.
        """
        rows, cols = shape
        found = set(np.unique(self.owners(wcs, shape)).tolist())
        reach = int(np.ceil(self.margin * np.sqrt(2))) + OWNER_BLOCK
        x, y = np.meshgrid(np.arange(-reach, cols + reach, OWNER_BLOCK, dtype=float),
                           np.arange(-reach, rows + reach, OWNER_BLOCK, dtype=float))
        nearby = set(np.unique(self.tile_ids_at(*wcs.pixel_to_world_values(x, y))).tolist()) - found
        if nearby:
            outline = wcs.pixel_to_world_values(*grid_outline(shape, 4.0))
            for tile_id in nearby:
                if self.tile(tile_id).contains(*outline).any():
                    found.add(tile_id)
        return [self.tile(tile_id) for tile_id in sorted(found)]


@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`SkyMap`.

    Attributes
    ----------
    id : int
        Unique in its skymap; tiles are counted ring after ring from the south pole.
    ring, index : int
        The ring (0 = south cap) and the cell within it (0 is centred on RA 0).
    ra, dec : float
        Centre of the cell and tangent point of the grid, deg.
    shape : tuple of int
        (rows, cols) of the grid.
    skymap : SkyMap
    wcs : astropy.wcs.WCS
        TAN, 0-based pixels as astropy uses them.
    """

    id: int
    ring: int
    index: int
    ra: float
    dec: float
    shape: tuple[int, int]
    skymap: SkyMap = field(repr=False)
    wcs: WCS = field(compare=False, repr=False)

    @property
    def name(self) -> str:
        """Name for paths and data ids, e.g. ``r0405t0123`` (ring 405, cell 123)."""
        return f"r{self.ring:04d}t{self.index:04d}"

    @property
    def data_id(self) -> dict[str, str | int]:
        """The tile as Rubin's data ids name a patch: skymap and tile id."""
        return {"skymap": self.skymap.name, "tile": self.id}

    def contains(self, ra: ArrayLike, dec: ArrayLike) -> np.ndarray:
        """Whether each sky position (deg) falls on the tile's grid."""
        x, y = self.wcs.world_to_pixel_values(ra, dec)
        rows, cols = self.shape
        return (x >= -0.5) & (x < cols - 0.5) & (y >= -0.5) & (y < rows - 0.5)


def _block_centres(length: int, block: int) -> np.ndarray:
    """Centres of the ``block``-pixel blocks along an axis of ``length`` pixels (the last may be short)."""
    starts = np.arange(0, length, block)
    return (starts + np.minimum(starts + block, length) - 1) / 2.0


#: Points per edge of a ring cell when its extent on the grid is measured.
_EDGE_SAMPLES = 129


@lru_cache(maxsize=4096)
def _ring_grid(skymap: SkyMap, ring: int) -> tuple[tuple[int, int], tuple[float, float]]:
    """Shape and CRPIX (1-based) of the grids of a ring's tiles: the core's extent plus the margin.

    All tiles of a ring are the same cell turned about the pole, so one cell
    (centred on RA 0) is measured on its own TAN grid.
    """
    height = skymap.ring_height
    dec = -90.0 + ring * height
    if ring in (0, skymap.polar_ring):
        # A cap: the parallel H / 2 from the pole.
        edge_ra = np.linspace(0.0, 360.0, 4 * _EDGE_SAMPLES)
        edge_dec = np.full(edge_ra.size, np.sign(dec) * (90.0 - height / 2))
    else:
        half_width = 180.0 / int(skymap.tiles_per_ring[ring])
        along_ra = np.linspace(-half_width, half_width, _EDGE_SAMPLES)
        along_dec = np.linspace(dec - height / 2, dec + height / 2, _EDGE_SAMPLES)
        edge_ra = np.r_[along_ra, along_ra, np.full(_EDGE_SAMPLES, -half_width),
                        np.full(_EDGE_SAMPLES, half_width)]
        edge_dec = np.r_[np.full(_EDGE_SAMPLES, along_dec[0]), np.full(_EDGE_SAMPLES, along_dec[-1]),
                         along_dec, along_dec]
    projection = WCS(naxis=2)
    projection.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    projection.wcs.crval = [0.0, dec]
    projection.wcs.crpix = [1.0, 1.0]  # pixel 0 at the tangent point
    scale = skymap.pixel_scale / 3600.0
    projection.wcs.cd = [[-scale, 0.0], [0.0, scale]]
    x, y = projection.world_to_pixel_values(np.mod(edge_ra, 360.0), edge_dec)
    x0, x1 = int(np.floor(x.min())) - skymap.margin, int(np.ceil(x.max())) + skymap.margin
    y0, y1 = int(np.floor(y.min())) - skymap.margin, int(np.ceil(y.max())) + skymap.margin
    return (y1 - y0 + 1, x1 - x0 + 1), (1.0 - x0, 1.0 - y0)


#: The skymap templates are built on unless told otherwise.
DEFAULT_SKYMAP = SkyMap()


def tiles_overlapping(wcs: WCS, shape: tuple[int, int], skymap: SkyMap = DEFAULT_SKYMAP) -> list[Tile]:
    """Tiles of ``skymap`` whose grid overlaps a CCD (see :meth:`SkyMap.tiles_overlapping`)."""
    return skymap.tiles_overlapping(wcs, shape)
