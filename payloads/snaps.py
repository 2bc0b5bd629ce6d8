"""Snap combination: a visit's two ~15 s snaps become one exposure, cosmic rays found in their difference.

A visit of LSSTCam is either one 30 s exposure or two back-to-back snaps of
~15 s.  Two snaps see the same sky through nearly the same atmosphere, so
their difference holds only noise, what changed between them and cosmic rays,
each of which hits one snap only.  :func:`run` sums the post-ISR snaps (image,
variance, exposure time) and repairs every cosmic-ray pixel with twice the
other snap's value (variance four times the other snap's): a measurement of
the same sky, not an interpolation.

A pixel is a cosmic-ray candidate in snap X where X exceeds the other snap Y
by more than

    ``cr_sigma`` · √(2 var_Y) + ``flux_tolerance`` · (brightest pixel of Y within ``guard_radius`` - sky_Y)

(after removing the median difference, a change of sky level).  ``2 var_Y``
is the variance the difference would have without the cosmic ray (the
variance plane of X is inflated by the cosmic ray's own charge).  The second
term is the guard for bright stars: a change of seeing, guiding or
transparency between the snaps changes a star's pixels by a fraction of its
peak (a seeing change of 10 % moves the peak by ~20 %, less in the wings),
which for a bright star is many sigma.  Cosmic rays within ``guard_radius``
of a star and fainter than that fraction of its peak are left alone.

Candidates are grouped (8-connected, per snap).  A group is a cosmic ray only
when its most significant pixel stands ``seed_sigma`` high and is sharper than
any PSF could make it: along one of the four lines through it (row, column,
diagonals), the pixel must exceed the mean of its two neighbours divided by
what a centred Gaussian of FWHM ``min_psf_fwhm`` (the sharpest seeing
expected) keeps at that distance, by ``sharpness_sigma`` sigma.  A cosmic ray
deposits its charge in one or two pixels across its track, so it is that
sharp across it, whatever its length; everything that came through the
atmosphere is at least a PSF wide in every direction.

Moving objects: a solar-system object that moves a few pixels between the
snaps leaves a positive PSF-shaped group in the difference where it was in
one snap and a negative one where it was in the other.  Both groups are as
smooth as the PSF, so neither is a cosmic ray: the sum keeps the object at
both positions (half its flux at each, as a 30 s exposure would hold a short
trail), and :attr:`SnapCombineResult.n_kept_changes` counts such groups.
Variable sources and satellite glints in one snap are kept the same way.

Limits: in seeing sharper than ``min_psf_fwhm`` a faint mover can pass for a
cosmic ray and be replaced by the other snap (set ``min_psf_fwhm`` from the
night's seeing where it is that good); cosmic rays on bright stars below the
guard stay in the sum unflagged; a pixel hit in both snaps cannot be repaired.

Units: images in e⁻, variances in e⁻², exposure times in seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dmstream.payloads.image import CcdImage
from dmstream.payloads.isr import grown_pixels
from dmstream.payloads.masks import MASK_DTYPE, MaskPlane

#: Pixels where either snap has one of these planes are never cosmic-ray candidates.
UNRELIABLE_PLANES = MaskPlane.BAD | MaskPlane.SAT | MaskPlane.INTRP | MaskPlane.SUSPECT | MaskPlane.NO_DATA
#: FWHM of a Gaussian in units of its sigma.
_FWHM_PER_SIGMA = 2 * np.sqrt(2 * np.log(2))
#: Rows per block of the passes over the whole image (temporaries stay in cache).
_BLOCK_ROWS = 64
#: Directions of the lines through a group's peak along which its sharpness is measured (row, column steps).
_DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))


class SnapError(ValueError):
    """The snaps given cannot be combined (count, shape, detector or band)."""


@dataclass(frozen=True)
class SnapCombineConfig:
    """How to combine the snaps of a visit.

    Attributes
    ----------
    cr_sigma : float
        Excess over the other snap, in sigma of the difference, above which a pixel is a candidate.
    seed_sigma : float
        A group of candidates is a cosmic ray only if one of its pixels stands
        this high: 5-sigma noise peaks (a few per million pixels) stay alone.
    flux_tolerance : float
        Fraction of the other snap's brightest signal above sky within
        ``guard_radius`` by which a pixel may change between snaps without
        being a candidate (seeing, guiding and transparency changes at bright
        stars; with the sharpness test, 0.5 keeps every star through seeing
        changes of 17 % at 0.6″ and 29 % at 0.7″, tested).
    guard_radius : int
        Half-size of the box searched for that brightest signal, pixels.
    min_psf_fwhm : float
        FWHM of the sharpest PSF expected, pixels (2.5 px = 0.5″): a group no
        sharper than a Gaussian of this FWHM is a real change, not a cosmic ray.
    sharpness_sigma : float
        How far, in sigma, a group's peak must stand above what such a PSF
        would allow given its two neighbours along some line through it.
    grow : int
        Pixels by which every cosmic ray grows (its faint edges), in a box.
    """

    cr_sigma: float = 5.0
    seed_sigma: float = 6.0
    flux_tolerance: float = 0.5
    guard_radius: int = 1
    min_psf_fwhm: float = 2.5
    sharpness_sigma: float = 3.0
    grow: int = 1

    def __post_init__(self) -> None:
        if self.cr_sigma <= 0 or self.flux_tolerance < 0 or self.min_psf_fwhm <= 0 or self.grow < 0:
            raise ValueError(f"cr_sigma and min_psf_fwhm must be positive, flux_tolerance and grow "
                             f"non-negative: {self}")


@dataclass
class SnapCombineResult:
    """What :func:`run` returns.

    Attributes
    ----------
    exposure : CcdImage
        The sum of the snaps (e⁻, e⁻², exposure time summed), cosmic rays
        repaired and flagged CR; metadata ``NSNAPS`` says how many snaps it holds.
    cosmic_rays : numpy.ndarray
        (n, 3) int (snap index, row, column) of every pixel flagged CR, the
        growth included, each once per snap.  A pixel hit in both snaps (rare)
        has no clean value: it is flagged and keeps the plain sum.
    n_kept_changes : int
        Significant groups of the difference no sharper than the PSF (moving or
        variable objects), left in the sum.
    sky_change : float
        Median of first snap minus second, subtracted before the search, e⁻.
    """

    exposure: CcdImage
    cosmic_rays: np.ndarray
    n_kept_changes: int = 0
    sky_change: float = 0.0

    @property
    def n_cosmic_rays(self) -> int:
        """Pixels flagged CR in one snap or the other."""
        return int(self.cosmic_rays.shape[0])


def run(snaps: Sequence[CcdImage], config: SnapCombineConfig | None = None) -> SnapCombineResult:
    """Combine the post-ISR snaps of one visit and detector into one exposure.

    Parameters
    ----------
    snaps : sequence of CcdImage
        One or two snaps in time order, after ISR (cosmic-ray repair off), on
        the same pixel grid.  One snap is returned as it is, with ``NSNAPS = 1``.
        The sum takes WCS, band and metadata from the first snap, and no PSF
        or zero point (those describe one snap, not the sum).
    config : SnapCombineConfig, optional

    Returns
    -------
    SnapCombineResult

    Raises
    ------
    SnapError
        For no snap or more than two, or snaps of different shapes, detectors or bands.
    """
    config = config or SnapCombineConfig()
    _check(snaps)
    if len(snaps) == 1:
        only = snaps[0]
        return SnapCombineResult(exposure=replace(only, metadata={**only.metadata, "NSNAPS": 1}),
                                 cosmic_rays=np.empty((0, 3), dtype=np.intp))
    first, second = snaps
    sky_change = _sky_change(first, second)
    candidates = _candidates(first, second, sky_change, config)
    cosmic, n_kept = _cosmic_ray_groups(first, second, sky_change, candidates, config)
    grown = grown_pixels(cosmic, first.shape, config.grow, config.grow)
    cols = first.shape[1]
    hit = [np.unique(grown[grown[:, 0] == snap, 1] * cols + grown[grown[:, 0] == snap, 2]) for snap in (0, 1)]
    cosmic = np.concatenate([np.column_stack([np.full(pixels.size, snap), *np.divmod(pixels, cols)])
                             for snap, pixels in enumerate(hit)])

    image, variance, mask = _sum(first, second)
    both = np.intersect1d(*hit, assume_unique=True)
    flat_image, flat_variance, flat_mask = image.reshape(-1), variance.reshape(-1), mask.reshape(-1)
    for snap, other in ((0, second), (1, first)):
        pixels = np.setdiff1d(hit[snap], both, assume_unique=True)
        # The other snap measured the same sky there: twice its value is the sum's.
        flat_image[pixels] = np.float32(2.0) * other.image.reshape(-1)[pixels]
        flat_variance[pixels] = np.float32(4.0) * other.variance.reshape(-1)[pixels]
        flat_mask[hit[snap]] |= MASK_DTYPE(MaskPlane.CR)

    exposure = replace(first, image=image, variance=variance, mask=mask, psf=None, zero_point=None,
                       exptime=first.exptime + second.exptime, metadata={**first.metadata, "NSNAPS": 2})
    return SnapCombineResult(exposure=exposure, cosmic_rays=cosmic, n_kept_changes=n_kept,
                             sky_change=sky_change)


def _check(snaps: Sequence[CcdImage]) -> None:
    if not 1 <= len(snaps) <= 2:
        raise SnapError(f"a visit has one or two snaps, got {len(snaps)}")
    if len(snaps) == 1:
        return
    first, second = snaps
    if first.shape != second.shape:
        raise SnapError(f"snaps differ in shape: {first.shape} and {second.shape}")
    detectors = first.metadata.get("DETECTOR"), second.metadata.get("DETECTOR")
    if None not in detectors and detectors[0] != detectors[1]:
        raise SnapError(f"snaps of different detectors: {detectors[0]} and {detectors[1]}")
    if first.band and second.band and first.band != second.band:
        raise SnapError(f"snaps in different bands: {first.band} and {second.band}")


def _sky_change(first: CcdImage, second: CcdImage) -> float:
    """Median of first minus second over a grid of reliable pixels, e⁻."""
    grid = np.s_[::8, ::8]
    usable = ((first.mask[grid] | second.mask[grid]) & MASK_DTYPE(UNRELIABLE_PLANES)) == 0
    difference = first.image[grid][usable] - second.image[grid][usable]
    return float(np.median(difference)) if difference.size else 0.0


def _candidates(first: CcdImage, second: CcdImage, sky_change: float, config: SnapCombineConfig
                ) -> np.ndarray:
    """(n, 3) int (snap with the excess, row, column) of the pixels above the module docstring's threshold."""
    rows = first.shape[0]
    skies = [np.float32(np.median(snap.image[::16, ::16])) for snap in (first, second)]
    unreliable = MASK_DTYPE(UNRELIABLE_PLANES)
    found = []
    for start in range(0, rows, _BLOCK_ROWS):
        block = slice(start, min(start + _BLOCK_ROWS, rows))
        difference = first.image[block] - second.image[block]
        difference -= np.float32(sky_change)
        # The threshold is at least cr_sigma sigma of the block's lowest variance: a cheap
        # necessary test leaves few pixels for the full one.
        lowest = min(float(first.variance[block].min()), float(second.variance[block].min()))
        floor = config.cr_sigma * np.sqrt(2 * lowest) * (1 - 1e-5) if lowest > 0 else 0.0
        y, x = np.nonzero(np.abs(difference) > np.float32(floor))
        if y.size == 0:
            continue
        excess = difference[y, x]
        in_first = excess > 0
        y_full = y + start
        other_variance = np.where(in_first, second.variance[y_full, x], first.variance[y_full, x])
        noise_threshold = config.cr_sigma * np.sqrt(2 * np.maximum(other_variance, 0))
        # The guard at the pixel itself first: cheap, and never above the guard over its box.
        other_signal = np.where(in_first, second.image[y_full, x], first.image[y_full, x])
        other_signal -= np.where(in_first, skies[1], skies[0])
        keep = np.abs(excess) > noise_threshold + config.flux_tolerance * np.maximum(other_signal, 0)
        keep &= ((first.mask[y_full, x] | second.mask[y_full, x]) & unreliable) == 0
        found.append((np.where(in_first, 0, 1)[keep], y_full[keep], x[keep], np.abs(excess[keep]),
                      noise_threshold[keep]))
    if not found:
        return np.empty((0, 3), dtype=np.intp)
    snap, y, x, excess, noise_threshold = (np.concatenate(column) for column in zip(*found, strict=True))
    keep = np.zeros(snap.size, dtype=bool)
    for index, other, sky in ((0, second, skies[1]), (1, first, skies[0])):
        mine = snap == index
        brightest = _local_maximum(other.image, y[mine], x[mine], config.guard_radius) - sky
        keep[mine] = excess[mine] > noise_threshold[mine] + config.flux_tolerance * np.maximum(brightest, 0)
    return np.stack([snap[keep], y[keep], x[keep]], axis=1)


def _local_maximum(image: np.ndarray, y: np.ndarray, x: np.ndarray, radius: int) -> np.ndarray:
    """Largest value of ``image`` in the (2 radius + 1)² box around each pixel (y, x), within the image."""
    rows, cols = image.shape
    best = image[y, x].copy()
    rows_near = [np.clip(y + dy, 0, rows - 1) for dy in range(-radius, radius + 1)]
    cols_near = [np.clip(x + dx, 0, cols - 1) for dx in range(-radius, radius + 1)]
    for near_y in rows_near:
        for near_x in cols_near:
            np.maximum(best, image[near_y, near_x], out=best)
    return best


def _groups(candidates: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Label of each candidate: 8-connected groups of pixels with their excess in the same snap."""
    rows, cols = shape
    snap, y, x = candidates.T
    # One flat index over both snaps' planes; neighbours across a plane's edge are excluded below.
    key = (snap * rows + y) * cols + x
    order = np.argsort(key)
    key_sorted = key[order]
    edges_from, edges_to = [], []
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
        inside = (y + dy < rows) & (x + dx >= 0) & (x + dx < cols)
        target = key + dy * cols + dx
        position = np.clip(np.searchsorted(key_sorted, target), 0, key.size - 1)
        linked = inside & (key_sorted[position] == target)
        edges_from.append(np.flatnonzero(linked))
        edges_to.append(order[position[linked]])
    start, stop = np.concatenate(edges_from), np.concatenate(edges_to)
    graph = coo_matrix((np.ones(start.size), (start, stop)), shape=(key.size, key.size))
    return connected_components(graph, directed=False)[1]


def _cosmic_ray_groups(first: CcdImage, second: CcdImage, sky_change: float, candidates: np.ndarray,
                       config: SnapCombineConfig) -> tuple[np.ndarray, int]:
    """The candidates of groups sharper than the PSF, and the number of groups that are not."""
    if candidates.shape[0] == 0:
        return candidates, 0
    rows, cols = first.shape
    labels = _groups(candidates, first.shape)
    snap, y, x = candidates.T
    sign = np.where(snap == 0, 1.0, -1.0)
    other_variance = np.where(snap == 0, second.variance[y, x], first.variance[y, x]).astype(float)
    excess = sign * (first.image[y, x].astype(float) - second.image[y, x] - sky_change)
    significance = excess / np.sqrt(np.maximum(2 * other_variance, 1e-30))
    # Most significant pixel of every group: first in label order, then by falling significance.
    order = np.lexsort((-significance, labels))
    peaks = order[np.flatnonzero(np.diff(labels[order], prepend=-1))]

    peak_snap, py, px = snap[peaks], y[peaks], x[peaks]
    peak_sign = sign[peaks]
    sigma = config.min_psf_fwhm / _FWHM_PER_SIGMA
    best = np.full(peaks.size, -np.inf)
    for dy, dx in _DIRECTIONS:
        # The two neighbours along this direction, outside the image replaced by the peak itself.
        pair_mean = np.zeros(peaks.size)
        pair_variance = np.zeros(peaks.size)
        for step in (-1, 1):
            ny, nx = py + step * dy, px + step * dx
            inside = (ny >= 0) & (ny < rows) & (nx >= 0) & (nx < cols)
            ny, nx = np.where(inside, ny, py), np.where(inside, nx, px)
            neighbour = first.image[ny, nx].astype(float) - second.image[ny, nx] - sky_change
            pair_mean += peak_sign * neighbour / 2
            pair_variance += 2 * np.where(peak_snap == 0, second.variance[ny, nx], first.variance[ny, nx]) / 4
        # A centred Gaussian is the sharpest a PSF of that FWHM gets along a line through its peak.
        psf_ratio = np.exp(-(dy**2 + dx**2) / (2 * sigma**2))
        sharpness = (excess[peaks] - pair_mean / psf_ratio) / np.sqrt(
            2 * other_variance[peaks] + pair_variance / psf_ratio**2)
        best = np.maximum(best, sharpness)
    is_cosmic_ray = (best > config.sharpness_sigma) & (significance[peaks] > config.seed_sigma)
    # Labels run from 0 and the peaks are in label order.
    return candidates[is_cosmic_ray[labels]], int(np.count_nonzero(~is_cosmic_ray))


def _sum(first: CcdImage, second: CcdImage) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, variance and mask of the plain sum of the two snaps."""
    image = np.add(first.image, second.image, dtype=np.float32)
    variance = np.add(first.variance, second.variance, dtype=np.float32)
    mask = np.bitwise_or(first.mask, second.mask)
    return image, variance, mask
