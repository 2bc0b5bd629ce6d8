"""Instrument Signature Removal: from 16 raw amplifiers to a calibrated CCD image in electrons.

Pure functions on numpy arrays plus a small :class:`Isr` task, in the spirit of
Rubin's ``ip_isr``.  The order of the steps undoes the simulated electronics of
:mod:`dmstream.streams.camera` in reverse, which is also the order of Rubin's
ISR for LSSTCam:

1. serial overscan (a robust level per row) and, optionally, parallel overscan
   (a level per column), in ADU, per amplifier in readout orientation;
2. saturation and suspect masking on the overscan-corrected ADU (SAT, SUSPECT),
   the saturated runs grown along their columns to cover bleed trails;
3. crosstalk correction: amplifiers are read in lockstep, so the simulator adds
   ``crosstalk[victim, source]`` times the source's non-linear ADU to the
   victim's pixel at the same readout position; we invert ``I + crosstalk``
   exactly (one 16 x 16 matrix product over all data pixels);
4. linearity correction of ``ADU_out = ADU + c ADU²`` (exact inverse), then the
   gain, ADU to electrons.  Crosstalk and linearity are done in ADU, before the
   gain, because that is where the electronics apply them;
5. assembly into the detector's orientation;
6. bias subtraction, variance plane (read noise² + Poisson variance of the
   collected electrons, plus the noise of the master calibrations), dark
   subtraction scaled by the dark time, defects (BAD), flat division;
7. interpolation over BAD and SAT pixels along rows (INTRP);
8. cosmic rays found with astroscrappy and repaired (CR).

Steps 1-5 run as one pass over blocks of readout rows, all 16 amplifiers at
once: a block of a few rows stays in the CPU cache from the raw integers to the
assembled electrons, and no full-size intermediate of the 16 amplifiers is
ever made.  Saturated and suspect pixels are kept as coordinates (they are
rare) and grown afterwards.  Step 6 runs in blocks of detector rows for the
same reason.  The only full-size arrays ISR allocates are the three planes it
returns and a boolean map of the pixels to interpolate.

Units: raw amplifiers and overscan levels in ADU; everything after the gain in
electrons (e⁻), variances in e⁻²; dark current in e⁻/s; times in seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import astroscrappy
import numpy as np
from scipy.linalg.blas import saxpy

from dmstream.payloads.camera import AMPLIFIERS_PER_DETECTOR, DetectorGeometry
from dmstream.payloads.image import CcdImage
from dmstream.payloads.masks import MASK_DTYPE, MaskPlane

#: 1 / Φ⁻¹(3/4): turns a median absolute deviation into a Gaussian sigma.
MAD_TO_SIGMA = 1.4826
#: Rows per block of the cache-friendly passes over the assembled detector.
_BLOCK_ROWS = 64
#: Half-width of the range of overscan deviations counted for their medians, 1/2 ADU.
_COUNTED_WINDOW = 256
#: Readout rows of all 16 amplifiers per block of the pass from raw amplifiers to electrons.
_READOUT_BLOCK_ROWS = 16
#: Detector rows per block of bias, dark and flat (six arrays of that many rows in cache).
_CALIBRATION_BLOCK_ROWS = 32
# Mask bits as the mask's own dtype: numpy would widen an IntFlag to int64.
_BAD, _SAT, _SUSPECT, _INTRP, _CR = (MASK_DTYPE(plane) for plane in (
    MaskPlane.BAD, MaskPlane.SAT, MaskPlane.SUSPECT, MaskPlane.INTRP, MaskPlane.CR))


@dataclass
class IsrConfig:
    """Switches and parameters of :class:`Isr`.

    Attributes
    ----------
    do_serial_overscan : bool
        Subtract a robust level per row measured in the serial overscan.
    serial_overscan_skip : int
        Overscan columns next to the data to ignore (on real sensors they hold
        the trail of charge-transfer inefficiency).
    serial_overscan_smoothing : int
        Width (rows, odd) of a running mean over the per-row levels; 1 = none.
        Smoothing lowers the noise the correction adds to every row but blurs
        row-to-row bias jumps, which real sensors have.
    do_parallel_overscan : bool
        Subtract a robust level per column measured in the parallel overscan.
        Off by default: the simulator's column pattern is fixed, so the master
        bias removes it, and a per-column level from ~46 rows would only add
        column-correlated noise (~0.18 of the read noise).
    parallel_overscan_skip : int
        Parallel overscan rows next to the data to ignore.
    do_saturation, do_suspect : bool
        Flag SAT pixels (at or above the saturation level) and SUSPECT pixels
        (at or above the suspect level, below saturation).
    saturation_margin : float
        Fraction of the saturation level at which a pixel counts as saturated:
        a pixel at full well reads its level minus noise and crosstalk.
    suspect_fraction : float
        Suspect level as a fraction of the saturation level, where none is given.
    saturation_grow_rows, saturation_grow_columns : int
        Pixels by which SAT grows along columns (bleed trails end in partly
        filled pixels) and along rows.
    do_crosstalk, do_linearity, do_gain, do_bias, do_dark, do_defects, do_flat : bool
        The steps of the same names.
    do_interpolation : bool
        Replace BAD and SAT pixels by a linear interpolation along their row.
    do_cosmic_rays : bool
        Detect and repair cosmic rays (off for snaps that are combined later).
    cr_candidate_sigma : float
        A pixel is a cosmic-ray candidate where it stands above the mean of its
        four neighbours by this many sigma ...
    cr_candidate_sharpness : float
        ... and by this fraction of the neighbours' height above the sky: a
        well-sampled PSF is not that sharp (a Gaussian of FWHM 3.5 px gives ~0.25).
    cr_tile, cr_margin : int
        astroscrappy runs only on ``cr_tile``-pixel tiles holding candidates,
        padded by ``cr_margin`` pixels; a full CCD would take ~10 s on one core.
    cr_sigclip, cr_sigfrac, cr_objlim, cr_niter : float, float, float, int
        astroscrappy's detection limit, neighbour limit, contrast limit against
        objects and number of iterations.
    """

    do_serial_overscan: bool = True
    serial_overscan_skip: int = 2
    serial_overscan_smoothing: int = 1
    do_parallel_overscan: bool = False
    parallel_overscan_skip: int = 2
    do_saturation: bool = True
    do_suspect: bool = True
    saturation_margin: float = 0.995
    suspect_fraction: float = 0.9
    saturation_grow_rows: int = 2
    saturation_grow_columns: int = 1
    do_crosstalk: bool = True
    do_linearity: bool = True
    do_gain: bool = True
    do_bias: bool = True
    do_dark: bool = True
    do_defects: bool = True
    do_flat: bool = True
    do_interpolation: bool = True
    do_cosmic_rays: bool = True
    cr_candidate_sigma: float = 6.0
    cr_candidate_sharpness: float = 0.5
    cr_tile: int = 32
    cr_margin: int = 16
    cr_sigclip: float = 6.0
    cr_sigfrac: float = 0.3
    cr_objlim: float = 5.0
    cr_niter: int = 2


@dataclass
class IsrCalibrations:
    """What ISR needs to know of one detector; per-amplifier arrays in raw-file order.

    Attributes
    ----------
    gain : numpy.ndarray
        (16,) e⁻/ADU.
    read_noise : numpy.ndarray
        (16,) e⁻ rms.
    saturation : numpy.ndarray
        (16,) overscan-corrected level at which a pixel is saturated, ADU (as read, non-linear).
    linearity : numpy.ndarray or None
        (16,) c of ``ADU_read = ADU + c ADU²``, 1/ADU.
    crosstalk : numpy.ndarray or None
        (16, 16) ``crosstalk[victim, source]``, dimensionless, on ADU.
    suspect : numpy.ndarray or None
        (16,) suspect level, ADU; default a fraction of ``saturation``.
    bias, bias_variance : numpy.ndarray or None
        Master bias of the assembled detector and its variance, e⁻ and e⁻².
    dark, dark_variance : numpy.ndarray or None
        Master dark, e⁻/s, and its variance, (e⁻/s)².
    flat, flat_variance : numpy.ndarray or None
        Master flat (mean ~1, positive everywhere: defects are flagged, not
        zeroed) and its variance, dimensionless.
    defects : numpy.ndarray or None
        Boolean defect map of the assembled detector (True = BAD).
    """

    gain: np.ndarray
    read_noise: np.ndarray
    saturation: np.ndarray
    linearity: np.ndarray | None = None
    crosstalk: np.ndarray | None = None
    suspect: np.ndarray | None = None
    bias: np.ndarray | None = None
    bias_variance: np.ndarray | None = None
    dark: np.ndarray | None = None
    dark_variance: np.ndarray | None = None
    flat: np.ndarray | None = None
    flat_variance: np.ndarray | None = None
    defects: np.ndarray | None = None


@dataclass
class IsrResult:
    """What :meth:`Isr.run` returns.

    Attributes
    ----------
    exposure : CcdImage
        Image in e⁻, variance in e⁻², mask of :class:`MaskPlane` bits.
    overscan_level : numpy.ndarray
        (16,) mean serial-overscan level, ADU.
    overscan_noise : numpy.ndarray
        (16,) clipped rms of the serial overscan about its row levels and column pattern, ADU
        (the read noise in ADU, for QC).
    n_saturated, n_cosmic_rays : int
        Pixels flagged SAT and CR.
    timings : dict of str to float
        Wall-clock seconds of each step, for processing-time QC.
    """

    exposure: CcdImage
    overscan_level: np.ndarray
    overscan_noise: np.ndarray
    n_saturated: int = 0
    n_cosmic_rays: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def _running_mean(values: np.ndarray, width: int) -> np.ndarray:
    """Running mean along the last axis over ``width`` samples, the ends averaging what they have."""
    if width <= 1:
        return values
    kernel = np.ones(width) / width
    norm = np.convolve(np.ones(values.shape[-1]), kernel, mode="same")
    return np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="same") / norm, -1, values)


def serial_overscan_levels(raw_amps: Sequence[np.ndarray], detector: DetectorGeometry, skip: int = 2,
                           smoothing: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-row bias level of every amplifier from its serial overscan.

    Parameters
    ----------
    raw_amps : sequence of numpy.ndarray
        The 16 raw amplifiers (readout orientation), integer ADU.
    detector : DetectorGeometry
    skip : int
        Overscan columns next to the data left out.
    smoothing : int
        Width of a running mean over rows applied to the levels (1 = none).

    Returns
    -------
    levels : numpy.ndarray
        (16, raw rows) float32 median of each row's overscan, ADU.
    noise : numpy.ndarray
        (16,) rms of the overscan pixels about their row level and column pattern, clipped at 5 sigma, ADU.
    """
    amp = detector.amplifiers[0]
    first = amp.prescan + amp.data_shape[1] + skip
    overscan = np.stack([raw[:, first:first + amp.serial_overscan - skip] for raw in raw_amps])
    if overscan.dtype.kind not in "iu":
        raise TypeError(f"{detector.name}: raw amplifiers must hold integer ADU, got {overscan.dtype}")
    overscan = overscan.astype(np.int32, copy=False)
    # Integer arithmetic in units of 1/2 and 1/4 ADU keeps every median below
    # exact, and lets numpy sort short integer rows (SIMD) and count values
    # instead of partitioning, several times faster than np.median.
    ordered = np.sort(overscan, axis=2)
    n = ordered.shape[2]
    twice_levels = ordered[:, :, (n - 1) // 2] + ordered[:, :, n // 2]
    del ordered
    # The noise about the row levels and the fixed column pattern, clipped at 5 sigma.
    halves = 2 * overscan - twice_levels[:, :, None]
    amps, rows, columns = halves.shape
    by_column = np.ascontiguousarray(halves.transpose(0, 2, 1)).reshape(amps * columns, rows)
    pattern = 2 * _counted_medians(by_column, -_COUNTED_WINDOW, _COUNTED_WINDOW)
    quarters = (2 * halves - pattern.astype(np.int32).reshape(amps, 1, columns)).reshape(amps, -1)
    size = np.abs(quarters)
    sigma = MAD_TO_SIGMA * _counted_medians(size, 0, 4 * _COUNTED_WINDOW)[:, None]
    keep = size <= 5 * sigma
    squares = np.square(quarters, dtype=np.float64)
    noise = np.sqrt(np.mean(np.where(keep, squares, 0), axis=1) / np.mean(keep, axis=1)) / 4
    return _running_mean(twice_levels / 2, smoothing).astype(np.float32), noise


def _counted_medians(values: np.ndarray, low: int, high: int) -> np.ndarray:
    """Exact median of each row of a 2-D integer array, by counting its values.

    Values outside ``[low, high]`` are counted at the nearer end, which leaves a
    median strictly inside the range unchanged; rows whose median reaches an
    end are done again by np.median.

    Returns
    -------
    numpy.ndarray
        (rows,) float64 medians (integers or half-integers).
    """
    rows, n = values.shape
    span = high - low + 1
    index = np.clip(values, low, high).astype(np.intp)
    index += (np.arange(rows) * span - low)[:, None]
    counted = np.cumsum(np.bincount(index.reshape(-1), minlength=rows * span).reshape(rows, span), axis=1)
    # The value of rank r (0-based) is the first whose cumulative count exceeds r.
    lower = np.argmax(counted > (n - 1) // 2, axis=1)
    upper = np.argmax(counted > n // 2, axis=1)
    medians = low + (lower + upper) / 2
    at_end = (lower == 0) | (upper == span - 1)
    if at_end.any():
        medians[at_end] = np.median(values[at_end], axis=1)
    return medians


def parallel_overscan_levels(raw_amps: Sequence[np.ndarray], detector: DetectorGeometry,
                             row_levels: np.ndarray | None, skip: int = 2) -> np.ndarray:
    """Per-column bias level of every amplifier from its parallel overscan, after the row levels.

    Parameters
    ----------
    raw_amps : sequence of numpy.ndarray
        The 16 raw amplifiers, integer ADU.
    detector : DetectorGeometry
    row_levels : numpy.ndarray or None
        (16, raw rows) serial overscan levels subtracted first, ADU; None subtracts none.
    skip : int
        Parallel overscan rows next to the data left out.

    Returns
    -------
    numpy.ndarray
        (16, data cols) float32 median of each data column's parallel overscan, ADU.
    """
    rows = detector.readout.data_shape[0]
    cols_slice = detector.amplifiers[0].data_slices[1]
    levels = []
    for i, raw in enumerate(raw_amps):
        below = raw[rows + skip:, cols_slice].astype(np.float32)
        if row_levels is not None:
            below -= row_levels[i, rows + skip:, None]
        levels.append(np.median(below, axis=0))
    return np.stack(levels)


def _overscan_corrected_rows(raw_amps: Sequence[np.ndarray], detector: DetectorGeometry,
                             row_levels: np.ndarray | None, column_levels: np.ndarray | None,
                             start: int, out: np.ndarray) -> None:
    """Readout rows ``start:start + out.shape[1]`` of the 16 data sections minus their overscan levels."""
    stop = start + out.shape[1]
    cols_slice = detector.amplifiers[0].data_slices[1]
    for i, raw in enumerate(raw_amps):
        out[i] = raw[start:stop, cols_slice]
        if row_levels is not None:
            out[i] -= row_levels[i, start:stop, None]
        if column_levels is not None:
            out[i] -= column_levels[i]


def overscan_corrected_data(raw_amps: Sequence[np.ndarray], detector: DetectorGeometry,
                            row_levels: np.ndarray | None, parallel: bool = False,
                            parallel_skip: int = 2) -> np.ndarray:
    """Data sections of the 16 amplifiers minus their overscan levels, stacked in readout orientation.

    Parameters
    ----------
    raw_amps : sequence of numpy.ndarray
        The 16 raw amplifiers, integer ADU.
    detector : DetectorGeometry
    row_levels : numpy.ndarray or None
        (16, raw rows) serial overscan levels from :func:`serial_overscan_levels`, ADU; None skips.
    parallel : bool
        Also subtract the per-column median of the parallel overscan (after the row levels).
    parallel_skip : int
        Parallel overscan rows next to the data left out.

    Returns
    -------
    numpy.ndarray
        (16, data rows, data cols) float32, ADU.  All amplifiers share one
        readout format, so ``[:, y, x]`` are pixels read at the same time.
    """
    column_levels = (parallel_overscan_levels(raw_amps, detector, row_levels, parallel_skip)
                     if parallel else None)
    data = np.empty((len(raw_amps), *detector.readout.data_shape), dtype=np.float32)
    _overscan_corrected_rows(raw_amps, detector, row_levels, column_levels, 0, data)
    return data


def grown_pixels(seeds: np.ndarray, shape: tuple[int, int], grow_rows: int = 0,
                 grow_columns: int = 0) -> np.ndarray:
    """Pixels within a box around ``seeds`` on each of several planes of one shape (amplifiers, snaps).

    ISR grows its saturation mask this way along columns (bleed trails) and
    rows, amplifier by amplifier; snap combination grows cosmic rays.

    Parameters
    ----------
    seeds : numpy.ndarray
        (n, 3) int (plane, row, column), e.g. (amplifier, row, column) in readout orientation.
    shape : tuple of int
        (rows, cols) of a plane; the growth stops at its edges.
    grow_rows, grow_columns : int
        Pixels to grow by along a column and along a row.

    Returns
    -------
    numpy.ndarray
        (m, 3) int (plane, row, column); a pixel near several seeds appears more than once.
    """
    if seeds.size == 0 or (grow_rows == 0 and grow_columns == 0):
        return seeds
    offsets = np.array([(0, dy, dx) for dy in range(-grow_rows, grow_rows + 1)
                        for dx in range(-grow_columns, grow_columns + 1)])
    grown = (seeds[:, None, :] + offsets[None, :, :]).reshape(-1, 3)
    inside = (grown[:, 1] >= 0) & (grown[:, 1] < shape[0]) & (grown[:, 2] >= 0) & (grown[:, 2] < shape[1])
    return grown[inside]


def detector_indices(pixels: np.ndarray, detector: DetectorGeometry) -> np.ndarray:
    """Flat indices in the assembled detector of (amplifier, row, column) readout positions.

    Parameters
    ----------
    pixels : numpy.ndarray
        (n, 3) int (amplifier in raw-file order, row, column), readout orientation.
    detector : DetectorGeometry

    Returns
    -------
    numpy.ndarray
        (n,) int indices into ``image.reshape(-1)`` of the assembled detector.
    """
    rows, cols = detector.readout.data_shape
    amps = detector.amplifiers
    y0 = np.array([amp.bbox[1] for amp in amps])[pixels[:, 0]]
    x0 = np.array([amp.bbox[0] for amp in amps])[pixels[:, 0]]
    flip_y = np.array([amp.flip_y for amp in amps])[pixels[:, 0]]
    flip_x = np.array([amp.flip_x for amp in amps])[pixels[:, 0]]
    y = y0 + np.where(flip_y, rows - 1 - pixels[:, 1], pixels[:, 1])
    x = x0 + np.where(flip_x, cols - 1 - pixels[:, 2], pixels[:, 2])
    return y * detector.shape[1] + x


def crosstalk_inverse(crosstalk: np.ndarray) -> np.ndarray:
    """``(I + X)⁻¹`` as float32: the electronics read ``(I + X) s`` of the amplifiers' own signals ``s``.

    Parameters
    ----------
    crosstalk : numpy.ndarray
        (16, 16) ``crosstalk[victim, source]``, dimensionless, on ADU.
    """
    return np.linalg.inv(np.eye(crosstalk.shape[0]) + crosstalk).astype(np.float32)


def correct_crosstalk(data: np.ndarray, inverse: np.ndarray, out: np.ndarray) -> None:
    """Undo inter-amplifier crosstalk: ``out = (I + X)⁻¹ data`` across amplifiers.

    The inversion is exact, including for saturated sources whose values are still known.

    Parameters
    ----------
    data : numpy.ndarray
        (16, rows, cols) overscan-corrected amplifiers, readout orientation, ADU; C-contiguous.
    inverse : numpy.ndarray
        (16, 16) float32 from :func:`crosstalk_inverse`.
    out : numpy.ndarray
        C-contiguous float32 array of ``data``'s shape, not overlapping it.
    """
    n = data.shape[0]
    np.matmul(inverse, data.reshape(n, -1), out=out.reshape(n, -1))


def linearize_and_apply_gain(data: np.ndarray, linearity: np.ndarray | None, gain: np.ndarray | None) -> None:
    """Undo ``ADU_read = ADU + c ADU²`` and convert ADU to electrons, in place.

    The inverse ``ADU = 2 y / (1 + sqrt(1 + 4 c y))`` is exact and stays finite at c = 0.

    Parameters
    ----------
    data : numpy.ndarray
        (16, rows, cols) overscan- and crosstalk-corrected amplifiers, ADU.
    linearity : numpy.ndarray or None
        (16,) c per amplifier, 1/ADU; None skips the correction.
    gain : numpy.ndarray or None
        (16,) e⁻/ADU; None leaves the data in ADU.
    """
    if linearity is None and gain is None:
        return
    n = data.shape[0]
    scale = np.ones(n, np.float32) if gain is None else np.asarray(gain, dtype=np.float32)
    scale = scale[:, None, None]
    coefficient = None if linearity is None else (4.0 * np.asarray(linearity, dtype=float)).astype(np.float32)
    # All amplifiers at once, in blocks of rows: few numpy calls, temporaries in cache.
    for start in range(0, data.shape[1], _READOUT_BLOCK_ROWS):
        block = data[:, start:start + _READOUT_BLOCK_ROWS]
        if coefficient is None:
            block *= scale
            continue
        work = block * coefficient[:, None, None]
        work += np.float32(1.0)
        np.maximum(work, np.float32(0.0), out=work)
        np.sqrt(work, out=work)
        work += np.float32(1.0)
        block *= np.float32(2.0) * scale
        block /= work


def amplifier_map(detector: DetectorGeometry) -> tuple[np.ndarray, int, int]:
    """Raw-file index of the amplifier of every (row, column) block of the assembled detector.

    Returns
    -------
    table : numpy.ndarray
        (2, 8) int, ``table[y // rows, x // cols]``.
    rows, cols : int
        Size of an amplifier's data section.
    """
    rows, cols = detector.readout.data_shape
    table = np.empty((2, 8), dtype=np.intp)
    for amp in detector.amplifiers:
        x0, y0, _, _ = amp.bbox
        table[y0 // rows, x0 // cols] = amp.index
    return table, rows, cols


def per_amplifier_image(values: np.ndarray, detector: DetectorGeometry) -> np.ndarray:
    """A float32 image of the assembled detector holding each amplifier's value on its pixels."""
    image = np.empty(detector.shape, dtype=np.float32)
    for amp in detector.amplifiers:
        image[amp.detector_slices] = values[amp.index]
    return image


def interpolate_rows(image: np.ndarray, bad: np.ndarray, variance: np.ndarray | None = None) -> np.ndarray:
    """Replace bad pixels, in place, by a linear interpolation between the nearest good pixels of their row.

    A run touching the edge of the image takes the value of its one good
    neighbour; a row with no good pixel is left as it is.

    Parameters
    ----------
    image : numpy.ndarray
        2-D float image.
    bad : numpy.ndarray
        Boolean, True where a pixel must be replaced.
    variance : numpy.ndarray or None
        Interpolated alike, so that the variance follows the neighbours' noise.

    Returns
    -------
    numpy.ndarray
        Boolean mask of the pixels replaced.
    """
    replaced = np.zeros(bad.shape, dtype=bool)
    rows = np.flatnonzero(bad.any(axis=1))
    if rows.size == 0:
        return replaced
    ncols = image.shape[1]
    r, c = np.nonzero(bad[rows])
    # The bad pixels of a run (consecutive in a row) share their two good neighbours.
    starts = np.flatnonzero(np.concatenate(([True], (c[1:] != c[:-1] + 1) | (r[1:] != r[:-1]))))
    lengths = np.diff(np.append(starts, c.size))
    lo = np.repeat(c[starts] - 1, lengths)
    hi = np.repeat(c[starts + lengths - 1] + 1, lengths)
    has_lo, has_hi = lo >= 0, hi < ncols
    ok = has_lo | has_hi
    r, c, lo, hi, has_lo, has_hi = r[ok], c[ok], lo[ok], hi[ok], has_lo[ok], has_hi[ok]
    # Weight of the right neighbour: linear in position, 0 or 1 at edges.
    span = np.where(has_lo & has_hi, hi - lo, 1)
    weight = np.where(has_lo & has_hi, (c - lo) / span, np.where(has_hi, 1.0, 0.0)).astype(np.float32)
    lo, hi = np.where(has_lo, lo, hi), np.where(has_hi, hi, lo)
    y = rows[r]
    targets = [image] if variance is None else [image, variance]
    for array in targets:
        array[y, c] = (1 - weight) * array[y, lo] + weight * array[y, hi]
    replaced[y, c] = True
    return replaced


def cosmic_ray_candidates(image: np.ndarray, variance: np.ndarray, ignore: np.ndarray, sigma: float,
                          sharpness: float) -> np.ndarray:
    """Pixels much sharper than a PSF: where astroscrappy has to look.

    Parameters
    ----------
    image, variance : numpy.ndarray
        Assembled detector, e⁻ and e⁻² (not background-subtracted).
    ignore : numpy.ndarray
        Boolean, pixels never candidates (BAD, SAT, interpolated).
    sigma : float
        Excess over the mean of the four neighbours, in sigma of the pixel.
    sharpness : float
        Excess as a fraction of the neighbours' height above the sky (a median of the image).

    Returns
    -------
    numpy.ndarray
        (n, 2) int rows and columns of the candidates.
    """
    sky = np.float32(np.median(image[::16, ::16]))
    sigma2, sharp = np.float32(sigma**2), np.float32(sharpness)
    found = []
    # Blocks of rows keep the temporaries in cache: several times faster than whole-image passes.
    rows = image.shape[0]
    for start in range(1, rows - 1, _BLOCK_ROWS):
        stop = min(start + _BLOCK_ROWS, rows - 1)
        core = image[start:stop, 1:-1]
        neighbours = image[start - 1:stop - 1, 1:-1] + image[start + 1:stop + 1, 1:-1]
        neighbours += image[start:stop, :-2]
        neighbours += image[start:stop, 2:]
        neighbours *= np.float32(0.25)
        excess = core - neighbours
        # Every candidate stands sigma above the block's lowest noise: a cheap
        # necessary test (with a margin for rounding) leaves few pixels for the
        # full one, which is then evaluated in the same float32 arithmetic.
        variance_block = variance[start:stop, 1:-1]
        lowest = float(variance_block.min())
        floor = np.float32(sigma * np.sqrt(lowest) * (1 - 1e-5)) if lowest > 0 else np.float32(0.0)
        maybe = np.flatnonzero(excess > floor)
        if maybe.size == 0:
            continue
        y, x = np.divmod(maybe, core.shape[1])
        excess = excess[y, x]
        height = (neighbours[y, x] - sky) * sharp
        candidate = (excess > height) & (excess > 0)
        candidate &= excess * excess > sigma2 * variance_block[y, x]
        y, x = y + start, x + 1
        candidate &= ~ignore[y, x]
        found.append(np.stack([y[candidate], x[candidate]], axis=1))
    return np.concatenate(found) if found else np.empty((0, 2), dtype=np.intp)


def find_cosmic_rays(image: np.ndarray, variance: np.ndarray, ignore: np.ndarray, read_noise: float,
                     config: IsrConfig) -> tuple[np.ndarray, np.ndarray]:
    """Cosmic rays by astroscrappy (L.A.Cosmic), run only on tiles around sharp candidates.

    Parameters
    ----------
    image, variance : numpy.ndarray
        Assembled detector in e⁻ (sky included, as L.A.Cosmic's noise model needs) and e⁻².
    ignore : numpy.ndarray
        Boolean, pixels astroscrappy must leave alone (BAD, SAT).
    read_noise : float
        Typical read noise, e⁻.
    config : IsrConfig

    Returns
    -------
    ys, xs : numpy.ndarray
        Rows and columns of the cosmic-ray pixels.
    values : numpy.ndarray
        float32 values astroscrappy puts in their place, e⁻.
    """
    candidates = cosmic_ray_candidates(image, variance, ignore, config.cr_candidate_sigma,
                                       config.cr_candidate_sharpness)
    rows, cols = image.shape
    tile, margin = config.cr_tile, config.cr_margin
    found: dict[tuple[int, int], float] = {}
    for ty, tx in np.unique(candidates // tile, axis=0):
        y0, x0 = max(ty * tile - margin, 0), max(tx * tile - margin, 0)
        y1, x1 = min((ty + 1) * tile + margin, rows), min((tx + 1) * tile + margin, cols)
        crs, cleaned = astroscrappy.detect_cosmics(
            image[y0:y1, x0:x1], inmask=ignore[y0:y1, x0:x1], gain=1.0, readnoise=read_noise,
            satlevel=np.inf, sigclip=config.cr_sigclip, sigfrac=config.cr_sigfrac,
            objlim=config.cr_objlim, niter=config.cr_niter)
        for y, x in zip(*np.nonzero(crs), strict=True):
            found[(y0 + int(y), x0 + int(x))] = float(cleaned[y, x])
    if not found:
        return np.empty(0, np.intp), np.empty(0, np.intp), np.empty(0, np.float32)
    ys, xs = np.array(list(found), dtype=np.intp).T
    return ys, xs, np.array(list(found.values()), dtype=np.float32)


class Isr:
    """Instrument Signature Removal of one detector exposure.

    Parameters
    ----------
    config : IsrConfig, optional
    """

    def __init__(self, config: IsrConfig | None = None) -> None:
        self.config = config or IsrConfig()

    def run(self, raw_amps: Sequence[np.ndarray], detector: DetectorGeometry, calibs: IsrCalibrations,
            exptime: float, darktime: float) -> IsrResult:
        """Turn 16 raw amplifiers into a CCD image in electrons with variance and mask.

        Parameters
        ----------
        raw_amps : sequence of numpy.ndarray
            The 16 raw amplifiers (int, ADU) in raw-file order and readout orientation.
        detector : DetectorGeometry
        calibs : IsrCalibrations
            Every product a switched-on step needs.
        exptime, darktime : float
            Open-shutter and dark time, s.

        Returns
        -------
        IsrResult
        """
        cfg = self.config
        if len(raw_amps) != AMPLIFIERS_PER_DETECTOR:
            raise ValueError(f"{detector.name}: {len(raw_amps)} amplifiers, expected 16")
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(step: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[step] = timings.get(step, 0.0) + now - clock
            clock = now

        levels, noise = serial_overscan_levels(raw_amps, detector, cfg.serial_overscan_skip,
                                               cfg.serial_overscan_smoothing)
        row_levels = levels if cfg.do_serial_overscan else None
        column_levels = (parallel_overscan_levels(raw_amps, detector, row_levels, cfg.parallel_overscan_skip)
                         if cfg.do_parallel_overscan else None)
        lap("overscan")
        image, sat_seeds, suspect_seeds = self._electrons(raw_amps, detector, calibs, row_levels,
                                                          column_levels, lap)

        mask = np.zeros(detector.shape, dtype=MASK_DTYPE)
        flat_mask = mask.reshape(-1)
        sat = None
        if sat_seeds is not None:
            grown = grown_pixels(sat_seeds, detector.readout.data_shape, cfg.saturation_grow_rows,
                                 cfg.saturation_grow_columns)
            sat = np.unique(detector_indices(grown, detector))
            flat_mask[sat] |= _SAT
        if suspect_seeds is not None:
            suspect = detector_indices(suspect_seeds, detector)
            if sat is not None:
                suspect = suspect[~np.isin(suspect, sat)]
            flat_mask[suspect] |= _SUSPECT
        lap("saturation")

        variance = self._bias_dark_flat(image, mask, detector, calibs, darktime)
        lap("bias_dark_flat")

        bad = None
        if cfg.do_defects or sat is not None:
            bad = (_required(calibs.defects, "defects").copy() if cfg.do_defects
                   else np.zeros(detector.shape, dtype=bool))
            if sat is not None:
                bad.reshape(-1)[sat] = True
        if cfg.do_interpolation and bad is not None:
            replaced = interpolate_rows(image, bad, variance)
            np.bitwise_or(mask, _INTRP, out=mask, where=replaced)
            del replaced
        lap("interpolation")

        n_cr = 0
        if cfg.do_cosmic_rays:
            ignore = bad if bad is not None else np.zeros(detector.shape, dtype=bool)
            typical_noise = float(np.median(calibs.read_noise))
            ys, xs, values = find_cosmic_rays(image, variance, ignore, typical_noise, cfg)
            image[ys, xs] = values
            mask[ys, xs] |= _CR
            self._refresh_variance(image, variance, ys, xs, detector, calibs)
            n_cr = int(ys.size)
        lap("cosmic_rays")

        exposure = CcdImage(image=image, variance=variance, mask=mask, exptime=exptime,
                            metadata={"DETECTOR": detector.id, "DETNAME": detector.name})
        return IsrResult(exposure=exposure, overscan_level=levels.mean(axis=1, dtype=np.float64),
                         overscan_noise=noise, n_saturated=int(sat.size) if sat is not None else 0,
                         n_cosmic_rays=n_cr, timings=timings)

    def _electrons(self, raw_amps: Sequence[np.ndarray], detector: DetectorGeometry, calibs: IsrCalibrations,
                   row_levels: np.ndarray | None, column_levels: np.ndarray | None,
                   lap: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Overscan, saturation and suspect levels, crosstalk, linearity, gain and assembly in one pass.

        Returns the assembled image in e⁻ and the (amplifier, row, column)
        readout positions at or above the saturation and suspect levels (None
        where the step is off), found on the overscan-corrected ADU.
        """
        cfg = self.config
        n = len(raw_amps)
        rows, cols = detector.readout.data_shape
        saturation = np.asarray(calibs.saturation, dtype=float)
        levels = {}
        if cfg.do_saturation:
            levels["sat"] = cfg.saturation_margin * saturation
        if cfg.do_suspect:
            levels["suspect"] = (cfg.suspect_fraction * saturation if calibs.suspect is None
                                 else calibs.suspect)
        thresholds = {key: np.asarray(value, dtype=np.float32)[:, None, None]
                      for key, value in levels.items()}
        seeds: dict[str, list[np.ndarray]] = {key: [] for key in thresholds}
        inverse = crosstalk_inverse(_required(calibs.crosstalk, "crosstalk")) if cfg.do_crosstalk else None
        linearity = _required(calibs.linearity, "linearity") if cfg.do_linearity else None
        gain = calibs.gain if cfg.do_gain else None

        image = np.empty(detector.shape, dtype=np.float32)
        # Each amplifier's pixels of the image, seen in readout orientation: writing
        # readout rows into these views assembles the detector.
        readout_views = [image[amp.detector_slices][amp.flip] for amp in detector.amplifiers]
        buffers = np.empty((2, n * _READOUT_BLOCK_ROWS * cols), dtype=np.float32)
        for start in range(0, rows, _READOUT_BLOCK_ROWS):
            block_rows = min(_READOUT_BLOCK_ROWS, rows - start)
            data, spare = (buffer[:n * block_rows * cols].reshape(n, block_rows, cols) for buffer in buffers)
            _overscan_corrected_rows(raw_amps, detector, row_levels, column_levels, start, data)
            lap("overscan")
            for key, threshold in thresholds.items():
                above = data >= threshold
                if above.any():
                    found = np.argwhere(above)
                    found[:, 1] += start
                    seeds[key].append(found)
            lap("saturation")
            if inverse is not None:
                correct_crosstalk(data, inverse, out=spare)
                data = spare
            lap("crosstalk")
            linearize_and_apply_gain(data, linearity, gain)
            lap("linearity_gain")
            for view, section in zip(readout_views, data, strict=True):
                view[start:start + block_rows] = section
            lap("assembly")
        found = {key: np.concatenate(value) if value else np.empty((0, 3), dtype=np.intp)
                 for key, value in seeds.items()}
        return image, found.get("sat"), found.get("suspect")

    def _bias_dark_flat(self, image: np.ndarray, mask: np.ndarray, detector: DetectorGeometry,
                        calibs: IsrCalibrations, darktime: float) -> np.ndarray:
        """Bias, variance plane, dark, defects and flat, in place on ``image`` and ``mask``; the variance.

        Runs in blocks of rows that stay in the CPU cache through every step.
        """
        cfg = self.config
        bias = _required(calibs.bias, "bias") if cfg.do_bias else None
        bias_variance = calibs.bias_variance if cfg.do_bias else None
        dark = _required(calibs.dark, "dark") if cfg.do_dark else None
        defects = _required(calibs.defects, "defects") if cfg.do_defects else None
        flat = _required(calibs.flat, "flat") if cfg.do_flat else None
        variance = np.empty_like(image)
        # Read noise² along a row of each half of the detector (amplifiers side by side).
        table, amp_rows, amp_cols = amplifier_map(detector)
        read_variance = np.repeat((np.asarray(calibs.read_noise, dtype=float) ** 2).astype(np.float32)[table],
                                  amp_cols, axis=1)
        for half, half_start in enumerate(range(0, detector.shape[0], amp_rows)):
            for start in range(half_start, half_start + amp_rows, _CALIBRATION_BLOCK_ROWS):
                block = slice(start, min(start + _CALIBRATION_BLOCK_ROWS, half_start + amp_rows))
                img, var = image[block], variance[block]
                if bias is not None:
                    img -= bias[block]
                # Poisson variance of every electron collected (dark current included),
                # before the dark and the flat take them apart.
                np.maximum(img, np.float32(0.0), out=var)
                var += read_variance[half]
                if bias_variance is not None:
                    var += bias_variance[block]
                if dark is not None:
                    _axpy(-darktime, dark[block], img)
                    if calibs.dark_variance is not None:
                        _axpy(darktime**2, calibs.dark_variance[block], var)
                if defects is not None:
                    np.bitwise_or(mask[block], _BAD, out=mask[block], where=defects[block])
                if flat is not None:
                    flat_block = flat[block]
                    img /= flat_block
                    var /= flat_block
                    var /= flat_block
                    if calibs.flat_variance is not None:
                        # Relative flat error times the flat-fielded signal, squared.
                        term = np.square(img)
                        term *= calibs.flat_variance[block]
                        term /= flat_block
                        term /= flat_block
                        var += term
        return variance

    def _refresh_variance(self, image: np.ndarray, variance: np.ndarray, ys: np.ndarray, xs: np.ndarray,
                          detector: DetectorGeometry, calibs: IsrCalibrations) -> None:
        """Variance of repaired pixels ``(ys, xs)`` from their new values (read noise² + Poisson, / flat)."""
        if ys.size == 0:
            return
        table, rows, cols = amplifier_map(detector)
        read_var = np.asarray(calibs.read_noise, dtype=np.float32)[table[ys // rows, xs // cols]] ** 2
        flat = calibs.flat[ys, xs] if self.config.do_flat and calibs.flat is not None else np.float32(1.0)
        variance[ys, xs] = read_var / flat**2 + np.maximum(image[ys, xs], 0) / flat


def _axpy(scale: float, x: np.ndarray, y: np.ndarray) -> None:
    """``y += scale * x`` in one pass without a temporary (BLAS saxpy on the flattened float32 arrays)."""
    saxpy(x.reshape(-1), y.reshape(-1), a=scale)


def _required(value: np.ndarray | None, name: str) -> np.ndarray:
    if value is None:
        raise ValueError(f"ISR step needs the {name} calibration, which is missing")
    return value
