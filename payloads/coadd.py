"""Templates: inverse-variance weighted coadds of calibrated visits on a common sky grid.

Each visit is warped onto the tile's grid (:mod:`dmstream.payloads.warp`),
scaled to the coadd zero point, and averaged with one weight per visit, the
inverse of its typical (median) variance.  Per-visit rather than per-pixel
weights keep the coadd PSF the same weighted sum of the input PSFs everywhere,
including around bright stars whose Poisson noise would otherwise tilt the
weights pixel by pixel.  Pixels flagged NO_DATA, BAD, SAT or CR in a visit are
left out of its sum, and the weights renormalised there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from astropy.wcs import WCS

from dmstream.payloads.image import CcdImage, PsfModel
from dmstream.payloads.masks import MASK_DTYPE, MaskPlane
from dmstream.payloads.subtract import zero_point_scale
from dmstream.payloads.warp import WarpConfig, warp_image

#: Planes that exclude a visit's pixel from the coadd.
REJECTED_PLANES = MaskPlane.NO_DATA | MaskPlane.BAD | MaskPlane.SAT | MaskPlane.CR


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
        Weight of each input visit (1 / its median variance at the coadd zero point).
    depth : numpy.ndarray
        int16, number of visits contributing to each pixel.
    """

    coadd: CcdImage
    weights: np.ndarray
    depth: np.ndarray


class CoaddPsf:
    """Weighted sum of the input PSFs (already carried onto the tile grid) at a position.

    Parameters
    ----------
    psfs : sequence of PsfModel
        PSFs of the warped visits.
    weights : numpy.ndarray
        Visit weights.
    footprints : sequence of numpy.ndarray
        Boolean coverage of each visit on the tile; a visit counts at (x, y) only where it has data.
    """

    def __init__(self, psfs: Sequence[PsfModel], weights: np.ndarray,
                 footprints: Sequence[np.ndarray]) -> None:
        self.psfs, self.weights, self.footprints = list(psfs), np.asarray(weights, float), list(footprints)

    def _weights_at(self, x: float, y: float) -> np.ndarray:
        rows, cols = self.footprints[0].shape
        iy, ix = int(np.clip(round(y), 0, rows - 1)), int(np.clip(round(x), 0, cols - 1))
        covered = np.array([footprint[iy, ix] for footprint in self.footprints])
        weights = self.weights * covered
        return weights / weights.sum() if weights.sum() > 0 else self.weights / self.weights.sum()

    def kernel(self, x: float, y: float, size: int) -> np.ndarray:
        weights = self._weights_at(x, y)
        total = sum(w * psf.kernel(x, y, size) for w, psf in zip(weights, self.psfs, strict=True) if w > 0)
        return total / total.sum()

    def fwhm(self, x: float, y: float) -> float:
        # The weighted mean FWHM; exact for equal PSFs, a fair approximation for similar ones.
        weights = self._weights_at(x, y)
        return float(sum(w * psf.fwhm(x, y) for w, psf in zip(weights, self.psfs, strict=True) if w > 0))


def run(visits: Sequence[CcdImage], tile_wcs: WCS, tile_shape: tuple[int, int],
        config: CoaddConfig | None = None) -> CoaddResult:
    """Coadd calibrated visits onto a tile.

    Parameters
    ----------
    visits : sequence of CcdImage
        Background-subtracted, with WCS, PSF and zero point.
    tile_wcs : astropy.wcs.WCS
        The common sky grid.
    tile_shape : tuple of int
        (rows, cols) of the tile.
    config : CoaddConfig, optional

    Returns
    -------
    CoaddResult
    """
    config = config or CoaddConfig()
    if not visits:
        raise ValueError("nothing to coadd")
    total = np.zeros(tile_shape, np.float64)
    total_weight = np.zeros(tile_shape, np.float64)
    total_variance = np.zeros(tile_shape, np.float64)
    depth = np.zeros(tile_shape, np.int16)
    mask = np.zeros(tile_shape, MASK_DTYPE)
    weights, psfs, footprints = [], [], []
    for visit in visits:
        warped = warp_image(visit, tile_wcs, tile_shape, config.warp).image
        scale = zero_point_scale(visit.zero_point, config.zero_point)
        good = (warped.mask & REJECTED_PLANES) == 0
        variance = warped.variance[good].astype(np.float64) * scale**2
        weight = 1.0 / float(np.median(variance)) if variance.size else 0.0
        weights.append(weight)
        psfs.append(warped.psf)
        footprints.append(good)
        w = np.where(good, weight, 0.0)
        total += w * np.where(good, warped.image, 0.0) * scale
        total_variance += w**2 * np.where(good, warped.variance, 0.0) * scale**2
        total_weight += w
        depth += good
        mask |= np.where((warped.mask & MaskPlane.NO_DATA) == 0, warped.mask & REJECTED_PLANES, 0).astype(
            MASK_DTYPE)
    covered = total_weight > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        image = np.where(covered, total / total_weight, 0.0).astype(np.float32)
        variance = np.where(covered, total_variance / total_weight**2, np.nan).astype(np.float32)
    mask[~covered] |= MASK_DTYPE(MaskPlane.NO_DATA)
    weights_array = np.array(weights)
    coadd = CcdImage(image, variance, mask, tile_wcs, CoaddPsf(psfs, weights_array, footprints),
                     config.zero_point, visits[0].band, float(sum(v.exptime for v in visits)))
    return CoaddResult(coadd, weights_array, depth)
