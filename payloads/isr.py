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

Units: raw amplifiers and overscan levels in ADU; everything after the gain in
electrons (e⁻), variances in e⁻²; dark current in e⁻/s; times in seconds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import astroscrappy
import numpy as np
from scipy.linalg.blas import saxpy

from dmstream.payloads.camera import AMPLIFIERS_PER_DETECTOR, DetectorGeometry
from dmstream.payloads.image import CcdImage
from dmstream.payloads.masks import MASK_DTYPE, MaskPlane

#: 1 / Φ⁻¹(3/4): turns a median absolute deviation into a Gaussian sigma.
MAD_TO_SIGMA = 1.4826
#: Rows per block of the cache-friendly passes.
_BLOCK_ROWS = 64
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
        The 16 raw amplifiers (readout orientation), ADU.
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
    levels = np.median(overscan, axis=2)
    # The noise about the row levels and the fixed column pattern, clipped at 5 sigma.
    deviation = overscan - levels[:, :, None]
    deviation -= np.median(deviation, axis=1, keepdims=True)
    flat = deviation.reshape(len(raw_amps), -1)
    sigma = MAD_TO_SIGMA * np.median(np.abs(flat), axis=1, keepdims=True)
    noise = np.sqrt(np.mean(np.where(np.abs(flat) <= 5 * sigma, flat**2, 0), axis=1)
                    / np.mean(np.abs(flat) <= 5 * sigma, axis=1))
    return _running_mean(levels, smoothing).astype(np.float32), noise


def overscan_corrected_data(raw_amps: Sequence[np.ndarray], detector: DetectorGeometry,
                            row_levels: np.ndarray | None, parallel: bool = False,
                            parallel_skip: int = 2) -> np.ndarray:
    """Data sections of the 16 amplifiers minus their overscan levels, stacked in readout orientation.

    Parameters
    ----------
    raw_amps : sequence of numpy.ndarray
        The 16 raw amplifiers, ADU.
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
    amps = detector.amplifiers
    rows, cols = amps[0].data_shape
    rows_slice, cols_slice = amps[0].data_slices
    data = np.empty((len(raw_amps), rows, cols), dtype=np.float32)
    for i, raw in enumerate(raw_amps):
        data[i] = raw[rows_slice, cols_slice]
        if row_levels is not None:
            data[i] -= row_levels[i, :rows, None]
        if parallel:
            below = raw[rows + parallel_skip:, cols_slice].astype(np.float32)
            if row_levels is not None:
                below -= row_levels[i, rows + parallel_skip:, None]
            data[i] -= np.median(below, axis=0)
    return data


def saturation_mask(data: np.ndarray, levels: np.ndarray, grow_rows: int = 0,
                    grow_columns: int = 0) -> np.ndarray:
    """Pixels at or above their amplifier's level, grown along columns and rows.

    Parameters
    ----------
    data : numpy.ndarray
        (16, rows, cols) overscan-corrected amplifiers, readout orientation, ADU.
    levels : numpy.ndarray
        (16,) threshold per amplifier, ADU.
    grow_rows, grow_columns : int
        Pixels to grow the mask by along a column (bleed direction) and along a row.

    Returns
    -------
    numpy.ndarray
        Boolean, shape of ``data``.
    """
    mask = data >= np.asarray(levels, dtype=np.float32)[:, None, None]
    if not mask.any():
        return mask
    seed = mask.copy()
    for step in range(1, grow_rows + 1):
        mask[:, step:] |= seed[:, :-step]
        mask[:, :-step] |= seed[:, step:]
    seed = mask.copy() if grow_columns else seed
    for step in range(1, grow_columns + 1):
        mask[:, :, step:] |= seed[:, :, :-step]
        mask[:, :, :-step] |= seed[:, :, step:]
    return mask


def correct_crosstalk(data: np.ndarray, crosstalk: np.ndarray) -> None:
    """Undo inter-amplifier crosstalk in place.

    The electronics read ``(I + X) s`` where ``s`` are the amplifiers' own
    (non-linear, bias-free) ADU, so ``s = (I + X)⁻¹ y`` exactly, including
    saturated sources whose values are still known.

    Parameters
    ----------
    data : numpy.ndarray
        (16, rows, cols) overscan-corrected amplifiers, readout orientation, ADU; C-contiguous.
    crosstalk : numpy.ndarray
        (16, 16) ``crosstalk[victim, source]``.
    """
    n = data.shape[0]
    inverse = np.linalg.inv(np.eye(n) + crosstalk).astype(np.float32)
    flat = data.reshape(n, -1)
    flat[...] = inverse @ flat


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
    work = np.empty(data.shape[1:], dtype=np.float32)
    for i, amp in enumerate(data):
        scale = np.float32(gain[i]) if gain is not None else np.float32(1.0)
        if linearity is not None and linearity[i] != 0:
            np.multiply(amp, np.float32(4.0 * linearity[i]), out=work)
            work += np.float32(1.0)
            np.maximum(work, np.float32(0.0), out=work)
            np.sqrt(work, out=work)
            work += np.float32(1.0)
            amp *= np.float32(2.0) * scale
            amp /= work
        elif gain is not None:
            amp *= scale


def assemble_data(data: np.ndarray, detector: DetectorGeometry) -> np.ndarray:
    """The assembled detector from stacked data sections (as :func:`payloads.camera.assemble` lays them).

    Parameters
    ----------
    data : numpy.ndarray
        (16, rows, cols) data sections in raw-file order and readout orientation, any dtype.
    detector : DetectorGeometry

    Returns
    -------
    numpy.ndarray
        ``detector.shape``, dtype of ``data``.
    """
    image = np.empty(detector.shape, dtype=data.dtype)
    for amp, section in zip(detector.amplifiers, data, strict=True):
        image[amp.detector_slices] = section[amp.flip]
    return image


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
    sub = bad[rows]
    columns = np.arange(ncols, dtype=np.int32)
    left = np.where(sub, np.int32(-1), columns)
    np.maximum.accumulate(left, axis=1, out=left)
    right = np.where(sub, np.int32(ncols), columns)[:, ::-1]
    right = np.minimum.accumulate(right, axis=1)[:, ::-1]
    r, c = np.nonzero(sub)
    lo, hi = left[r, c], right[r, c]
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
        neighbours -= sky
        neighbours *= np.float32(sharpness)
        candidate = excess > neighbours
        candidate &= excess > 0
        excess *= excess
        candidate &= excess > np.float32(sigma**2) * variance[start:stop, 1:-1]
        candidate &= ~ignore[start:stop, 1:-1]
        if candidate.any():
            found.append(np.argwhere(candidate) + np.array([start, 1]))
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
        data = overscan_corrected_data(raw_amps, detector, levels if cfg.do_serial_overscan else None,
                                       cfg.do_parallel_overscan, cfg.parallel_overscan_skip)
        lap("overscan")

        saturation = np.asarray(calibs.saturation, dtype=float)
        sat = suspect = None
        if cfg.do_saturation:
            sat = saturation_mask(data, cfg.saturation_margin * saturation, cfg.saturation_grow_rows,
                                  cfg.saturation_grow_columns)
        if cfg.do_suspect:
            suspect_levels = cfg.suspect_fraction * saturation if calibs.suspect is None else calibs.suspect
            suspect = saturation_mask(data, suspect_levels)
        lap("saturation")

        if cfg.do_crosstalk:
            correct_crosstalk(data, _required(calibs.crosstalk, "crosstalk"))
        lap("crosstalk")
        linearize_and_apply_gain(data, _required(calibs.linearity, "linearity") if cfg.do_linearity else None,
                                 calibs.gain if cfg.do_gain else None)
        lap("linearity_gain")

        image = assemble_data(data, detector)
        del data
        mask = np.zeros(detector.shape, dtype=MASK_DTYPE)
        if sat is not None:
            sat = assemble_data(sat, detector)
            np.bitwise_or(mask, _SAT, out=mask, where=sat)
        if suspect is not None:
            suspect = assemble_data(suspect, detector)
            if sat is not None:
                suspect &= ~sat
            np.bitwise_or(mask, _SUSPECT, out=mask, where=suspect)
        lap("assembly")

        variance = self._bias_dark_flat(image, mask, detector, calibs, darktime)
        lap("bias_dark_flat")

        bad = calibs.defects if cfg.do_defects else None
        if sat is not None:
            bad = sat if bad is None else bad | sat
        if cfg.do_interpolation and bad is not None:
            replaced = interpolate_rows(image, bad, variance)
            np.bitwise_or(mask, _INTRP, out=mask, where=replaced)
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
                         overscan_noise=noise,
                         n_saturated=int(np.count_nonzero(sat)) if sat is not None else 0, n_cosmic_rays=n_cr,
                         timings=timings)

    def _bias_dark_flat(self, image: np.ndarray, mask: np.ndarray, detector: DetectorGeometry,
                        calibs: IsrCalibrations, darktime: float) -> np.ndarray:
        """Bias, variance plane, dark, defects and flat, in place on ``image`` and ``mask``; the variance."""
        cfg = self.config
        if cfg.do_bias:
            image -= _required(calibs.bias, "bias")
        # Poisson variance of every electron collected (dark current included),
        # before the dark and the flat take them apart.
        variance = np.maximum(image, np.float32(0.0))
        for amp in detector.amplifiers:
            variance[amp.detector_slices] += np.float32(calibs.read_noise[amp.index] ** 2)
        if cfg.do_bias and calibs.bias_variance is not None:
            variance += calibs.bias_variance
        if cfg.do_dark:
            _axpy(-darktime, _required(calibs.dark, "dark"), image)
            if calibs.dark_variance is not None:
                _axpy(darktime**2, calibs.dark_variance, variance)
        if cfg.do_defects:
            np.bitwise_or(mask, _BAD, out=mask, where=_required(calibs.defects, "defects"))
        if cfg.do_flat:
            flat = _required(calibs.flat, "flat")
            image /= flat
            variance /= flat
            variance /= flat
            if calibs.flat_variance is not None:
                # Relative flat error times the flat-fielded signal, squared.
                term = np.square(image)
                term *= calibs.flat_variance
                term /= flat
                term /= flat
                variance += term
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
