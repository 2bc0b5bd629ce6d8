"""Calibration products from stacks of calibration exposures, in the spirit of Rubin's ``cp_pipe``.

Each product is a config dataclass and a task whose ``run()`` returns a named
result: master bias (e⁻), master dark (e⁻/s), master flat (normalised, one per
band), the defect map, read noise and photon-transfer gain per amplifier, and
the crosstalk matrix measured from bright sources.  Every exposure goes through
the same :class:`~dmstream.payloads.isr.Isr` as science data, with the steps
the product must not depend on switched off, so that a product calibrates
exactly what ISR leaves behind.

Frames are full detectors and the combination holds them all in memory
(~65 MB each as float32); the clipped combination runs in blocks of rows.

Units: ADU for raw data and the crosstalk matrix (which acts on ADU, as in the
electronics), e⁻ after the gain, e⁻/s for dark current, seconds for times.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from dmstream.payloads.camera import AMPLIFIERS_PER_DETECTOR, DetectorGeometry
from dmstream.payloads.isr import (
    MAD_TO_SIGMA,
    Isr,
    IsrCalibrations,
    IsrConfig,
    linearize_and_apply_gain,
    overscan_corrected_data,
    per_amplifier_image,
    serial_overscan_levels,
)

RawFrame = Sequence[np.ndarray]
_BLOCK_ROWS = 128


def calibration_isr_config(bias: bool = False, dark: bool = False,
                           base: IsrConfig | None = None) -> IsrConfig:
    """The ISR of calibration exposures: overscan, crosstalk, linearity, gain, assembly and ``bias``/``dark``.

    Saturation, defects, flat, interpolation and cosmic rays are off: a product
    must not depend on the products built from it.
    """
    return replace(base or IsrConfig(), do_saturation=False, do_suspect=False, do_bias=bias, do_dark=dark,
                   do_defects=False, do_flat=False, do_interpolation=False, do_cosmic_rays=False)


def _isr_frames(raw_frames: Sequence[RawFrame], darktimes: Sequence[float], detector: DetectorGeometry,
                calibs: IsrCalibrations, config: IsrConfig) -> np.ndarray:
    """(n, rows, cols) float32 stack of the frames after ``config``'s ISR, e⁻."""
    isr = Isr(config)
    stack = np.empty((len(raw_frames), *detector.shape), dtype=np.float32)
    for i, (raw, darktime) in enumerate(zip(raw_frames, darktimes, strict=True)):
        stack[i] = isr.run(raw, detector, calibs, exptime=0.0, darktime=darktime).exposure.image
    return stack


def combine_clipped(stack: np.ndarray, read_variance: np.ndarray, nsigma: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel mean of a stack of frames, rejecting outliers against a noise model.

    The noise of one frame is ``read_variance + max(median, 0)`` (read noise and
    Poisson noise in electrons), which keeps hot pixels and bright flats from
    being clipped as their own outliers, as a per-pixel scatter of a few frames
    would not.

    Parameters
    ----------
    stack : numpy.ndarray
        (n, rows, cols) frames, e⁻.
    read_variance : numpy.ndarray
        (rows, cols) variance of one frame without signal, e⁻².
    nsigma : float
        Rejection threshold about the per-pixel median.

    Returns
    -------
    mean : numpy.ndarray
        float32 clipped mean, e⁻.
    variance : numpy.ndarray
        float32 variance of the mean from the noise model, e⁻².
    n_used : numpy.ndarray
        uint8 number of frames kept per pixel.
    """
    _, rows, cols = stack.shape
    mean = np.empty((rows, cols), dtype=np.float32)
    variance = np.empty((rows, cols), dtype=np.float32)
    n_used = np.empty((rows, cols), dtype=np.uint8)
    for start in range(0, rows, _BLOCK_ROWS):
        block = stack[:, start:start + _BLOCK_ROWS]
        median = np.median(block, axis=0)
        var_one = read_variance[start:start + _BLOCK_ROWS] + np.maximum(median, 0)
        keep = np.abs(block - median) <= np.float32(nsigma) * np.sqrt(var_one)
        count = keep.sum(axis=0)
        used = np.maximum(count, 1)
        mean[start:start + _BLOCK_ROWS] = np.where(count > 0, np.where(keep, block, 0).sum(axis=0) / used,
                                                   median)
        variance[start:start + _BLOCK_ROWS] = var_one / used
        n_used[start:start + _BLOCK_ROWS] = count
    return mean, variance, n_used


def read_noise_adu(raw_frames: Sequence[RawFrame], detector: DetectorGeometry) -> np.ndarray:
    """Read noise of every amplifier from differences of consecutive bias frames, ADU rms.

    The difference of two biases cancels the bias level and its fixed
    structure; its clipped rms over √2 is the read noise.

    Parameters
    ----------
    raw_frames : sequence of raw frames
        At least two biases, each 16 raw amplifiers (int ADU).
    detector : DetectorGeometry

    Returns
    -------
    numpy.ndarray
        (16,) ADU rms.
    """
    if len(raw_frames) < 2:
        raise ValueError("read noise needs at least two bias frames")
    rows_slice, cols_slice = detector.amplifiers[0].data_slices
    estimates = []
    for first, second in itertools.pairwise(raw_frames):
        per_amp = []
        for a, b in zip(first, second, strict=True):
            diff = (a[rows_slice, cols_slice][::4].astype(np.float32)
                    - b[rows_slice, cols_slice][::4].astype(np.float32)).ravel()
            per_amp.append(_clipped_std(diff) / np.sqrt(2.0))
        estimates.append(per_amp)
    return np.mean(estimates, axis=0)


def _clipped_std(values: np.ndarray, nsigma: float = 5.0) -> float:
    """rms about the median of the values within ``nsigma`` robust sigma of it."""
    centre = np.median(values)
    deviation = values - centre
    sigma = MAD_TO_SIGMA * np.median(np.abs(deviation))
    kept = deviation[np.abs(deviation) <= nsigma * sigma] if sigma > 0 else deviation
    return float(np.sqrt(np.mean(kept.astype(np.float64) ** 2)))


@dataclass
class MasterBiasConfig:
    """Attributes: ``isr`` (applied to each bias, no bias subtraction), ``nsigma`` (clipping)."""

    isr: IsrConfig = field(default_factory=calibration_isr_config)
    nsigma: float = 5.0


@dataclass
class MasterBiasResult:
    """Master bias of the assembled detector.

    Attributes
    ----------
    bias, variance : numpy.ndarray
        What overscan correction leaves of a zero-second exposure, e⁻, and its variance, e⁻².
    read_noise_adu, read_noise : numpy.ndarray
        (16,) read noise from bias differences, ADU and e⁻.
    n_frames : int
    """

    bias: np.ndarray
    variance: np.ndarray
    read_noise_adu: np.ndarray
    read_noise: np.ndarray
    n_frames: int


class MasterBias:
    """Combine bias frames into a master bias and measure the read noise."""

    def __init__(self, config: MasterBiasConfig | None = None) -> None:
        self.config = config or MasterBiasConfig()

    def run(self, raw_frames: Sequence[RawFrame], detector: DetectorGeometry,
            calibs: IsrCalibrations) -> MasterBiasResult:
        """Build the master bias.

        Parameters
        ----------
        raw_frames : sequence of raw frames
            Bias exposures, each 16 raw amplifiers (int ADU); at least two.
        detector : DetectorGeometry
        calibs : IsrCalibrations
            Gain (and linearity, crosstalk if the ISR config uses them); read
            noise is not needed and is measured here.

        Returns
        -------
        MasterBiasResult
        """
        noise_adu = read_noise_adu(raw_frames, detector)
        noise_e = noise_adu * np.asarray(calibs.gain)
        calibs = replace(calibs, read_noise=noise_e)
        stack = _isr_frames(raw_frames, [0.0] * len(raw_frames), detector, calibs, self.config.isr)
        read_var = per_amplifier_image(noise_e**2, detector)
        bias, variance, _ = combine_clipped(stack, read_var, self.config.nsigma)
        return MasterBiasResult(bias=bias, variance=variance, read_noise_adu=noise_adu, read_noise=noise_e,
                                n_frames=len(raw_frames))


@dataclass
class MasterDarkConfig:
    """Attributes: ``isr`` (applied to each dark, with bias subtraction), ``nsigma`` (clipping)."""

    isr: IsrConfig = field(default_factory=lambda: calibration_isr_config(bias=True))
    nsigma: float = 5.0


@dataclass
class MasterDarkResult:
    """Master dark: ``dark`` in e⁻/s, its ``variance`` in (e⁻/s)², from ``n_frames`` exposures."""

    dark: np.ndarray
    variance: np.ndarray
    n_frames: int


class MasterDark:
    """Combine bias-subtracted dark exposures, each scaled by its dark time, into a dark-current image."""

    def __init__(self, config: MasterDarkConfig | None = None) -> None:
        self.config = config or MasterDarkConfig()

    def run(self, raw_frames: Sequence[RawFrame], darktimes: Sequence[float], detector: DetectorGeometry,
            calibs: IsrCalibrations) -> MasterDarkResult:
        """Build the master dark.

        Parameters
        ----------
        raw_frames : sequence of raw frames
            Dark exposures (shutter closed), 16 raw amplifiers each.
        darktimes : sequence of float
            Their dark times, s (> 0).
        detector : DetectorGeometry
        calibs : IsrCalibrations
            Gain, read noise and the master bias (with its variance).

        Returns
        -------
        MasterDarkResult
        """
        times = np.asarray(darktimes, dtype=float)
        if np.any(times <= 0):
            raise ValueError("dark times must be positive")
        stack = _isr_frames(raw_frames, times, detector, calibs, self.config.isr)
        # Combine at the common dark time so that the Poisson model holds, then scale to a rate.
        mean_time = float(times.mean())
        stack *= (mean_time / times).astype(np.float32)[:, None, None]
        read_var = per_amplifier_image(np.asarray(calibs.read_noise) ** 2, detector)
        if calibs.bias_variance is not None:
            read_var += calibs.bias_variance
        electrons, variance, _ = combine_clipped(stack, read_var, self.config.nsigma)
        return MasterDarkResult(dark=electrons / np.float32(mean_time),
                                variance=variance / np.float32(mean_time**2), n_frames=len(raw_frames))


@dataclass
class MasterFlatConfig:
    """Parameters of :class:`MasterFlat`.

    Attributes
    ----------
    isr : IsrConfig
        Applied to each flat (bias and dark subtracted).
    nsigma : float
        Clipping threshold of the combination.
    dead_fraction : float
        Pixels whose response is below this fraction of the median are dead:
        flagged in ``dead`` and set to 1 so that ISR can divide by the flat.
    """

    isr: IsrConfig = field(default_factory=lambda: calibration_isr_config(bias=True, dark=True))
    nsigma: float = 5.0
    dead_fraction: float = 0.5


@dataclass
class MasterFlatResult:
    """Master flat of one band.

    Attributes
    ----------
    flat, variance : numpy.ndarray
        Relative response, median 1 over live pixels (1 on dead pixels), and its variance.
    dead : numpy.ndarray
        Boolean, pixels below ``dead_fraction`` of the median response.
    band : str
    level : float
        Median level of the input flats, e⁻ per pixel.
    n_frames : int
    """

    flat: np.ndarray
    variance: np.ndarray
    dead: np.ndarray
    band: str
    level: float
    n_frames: int


class MasterFlat:
    """Combine dome flats of one band into a normalised flat field (pixel response and vignetting)."""

    def __init__(self, config: MasterFlatConfig | None = None) -> None:
        self.config = config or MasterFlatConfig()

    def run(self, raw_frames: Sequence[RawFrame], darktimes: Sequence[float], band: str,
            detector: DetectorGeometry, calibs: IsrCalibrations) -> MasterFlatResult:
        """Build the master flat of ``band``.

        Parameters
        ----------
        raw_frames : sequence of raw frames
            Flats of one band, 16 raw amplifiers each.
        darktimes : sequence of float
            Their dark times, s.
        band : str
        detector : DetectorGeometry
        calibs : IsrCalibrations
            Gain, read noise, master bias and dark.

        Returns
        -------
        MasterFlatResult
        """
        stack = _isr_frames(raw_frames, darktimes, detector, calibs, self.config.isr)
        # Bring every flat to the common level: the lamp need not be stable.
        levels = np.array([np.median(frame[::8, ::8]) for frame in stack])
        level = float(levels.mean())
        stack *= (level / levels).astype(np.float32)[:, None, None]
        read_var = per_amplifier_image(np.asarray(calibs.read_noise) ** 2, detector)
        electrons, variance, _ = combine_clipped(stack, read_var, self.config.nsigma)
        live = electrons > self.config.dead_fraction * np.median(electrons[::8, ::8])
        norm = np.float32(np.median(electrons[live]))
        flat = electrons / norm
        flat[~live] = 1.0
        return MasterFlatResult(flat=flat, variance=variance / norm**2, dead=~live, band=band, level=level,
                                n_frames=len(raw_frames))


@dataclass
class DefectConfig:
    """Parameters of :class:`DefectFinder`.

    Attributes
    ----------
    hot_nsigma : float
        A pixel is hot where its dark current exceeds its amplifier's median by
        this many sigma of the master dark ...
    hot_min_rate : float
        ... and by at least this much, e⁻/s.
    """

    hot_nsigma: float = 6.0
    hot_min_rate: float = 0.2


@dataclass
class DefectResult:
    """The defect map: ``defects`` (True = BAD), and the ``hot`` (n, 2) and ``dead`` pixel counts."""

    defects: np.ndarray
    hot: np.ndarray
    n_hot: int
    n_dead: int


class DefectFinder:
    """Hot pixels from the master dark and dead pixels from the master flat."""

    def __init__(self, config: DefectConfig | None = None) -> None:
        self.config = config or DefectConfig()

    def run(self, dark: MasterDarkResult, flat: MasterFlatResult, detector: DetectorGeometry) -> DefectResult:
        """Build the defect map.

        Parameters
        ----------
        dark : MasterDarkResult
        flat : MasterFlatResult
        detector : DetectorGeometry

        Returns
        -------
        DefectResult
        """
        cfg = self.config
        typical = np.empty(AMPLIFIERS_PER_DETECTOR)
        for amp in detector.amplifiers:
            typical[amp.index] = np.median(dark.dark[amp.detector_slices])
        excess = dark.dark - per_amplifier_image(typical, detector)
        hot = (excess > cfg.hot_nsigma * np.sqrt(dark.variance)) & (excess > cfg.hot_min_rate)
        defects = hot | flat.dead
        return DefectResult(defects=defects, hot=np.argwhere(hot), n_hot=int(np.count_nonzero(hot)),
                            n_dead=int(np.count_nonzero(flat.dead)))


@dataclass
class GainResult:
    """Photon-transfer gain: ``gain`` (16,) e⁻/ADU from ``mean_adu`` and ``variance_adu`` of a flat pair."""

    gain: np.ndarray
    mean_adu: np.ndarray
    variance_adu: np.ndarray


def photon_transfer_gain(flat_pair: tuple[RawFrame, RawFrame], detector: DetectorGeometry,
                         read_noise: np.ndarray, linearity: np.ndarray | None = None) -> GainResult:
    """Gain of every amplifier from two flats of equal level (one point of the photon-transfer curve).

    Their difference cancels the flat field and fixed patterns; half its variance
    is ``mean / gain + read_noise²`` in ADU.

    Parameters
    ----------
    flat_pair : (raw frame, raw frame)
        Two flats taken alike.
    detector : DetectorGeometry
    read_noise : numpy.ndarray
        (16,) read noise, ADU.
    linearity : numpy.ndarray or None
        (16,) c of ``ADU_read = ADU + c ADU²``, corrected first if given.

    Returns
    -------
    GainResult
    """
    frames = []
    for raw in flat_pair:
        levels, _ = serial_overscan_levels(raw, detector)
        data = overscan_corrected_data(raw, detector, levels)
        linearize_and_apply_gain(data, linearity, None)
        frames.append(data)
    first, second = frames
    mean = np.array([0.5 * (np.median(a) + np.median(b)) for a, b in zip(first, second, strict=True)])
    half_var = np.array([_clipped_std((a - b).ravel()) ** 2 / 2 for a, b in zip(first, second, strict=True)])
    return GainResult(gain=mean / (half_var - np.asarray(read_noise) ** 2), mean_adu=mean,
                      variance_adu=half_var)


@dataclass
class CrosstalkConfig:
    """Parameters of :class:`CrosstalkMeasurement`.

    Attributes
    ----------
    source_threshold : float
        Overscan-corrected level above which a source pixel is used, ADU
        (saturated pixels and bleed trails give the most leverage).
    quiet_level : float
        Readout positions where any amplifier exceeds this level are left out
        of the column backgrounds, ADU.
    victim_max : float
        Victim pixels further than this from their amplifier's median are
        their own sources and are skipped, ADU (crosstalk is ≲ 0.1 % of 2^18).
    """

    source_threshold: float = 30_000.0
    quiet_level: float = 1_000.0
    victim_max: float = 300.0


@dataclass
class CrosstalkResult:
    """Measured ``matrix[victim, source]`` (ADU/ADU), its ``error`` (0 where not measured), and
    ``n_pixels``, the bright pixels of each source."""

    matrix: np.ndarray
    error: np.ndarray
    n_pixels: np.ndarray


class CrosstalkMeasurement:
    """Crosstalk coefficients from science-like frames with bright (saturated) sources.

    Every amplifier's pixels are taken over the median of their column at
    quiet readout positions (the sky and the fixed column bias pattern, which
    would otherwise bias the few columns a bleed trail covers by ~1.5 ADU /
    70 kADU).  At the readout
    positions where any amplifier is bright, each victim's excess is fitted
    by least squares as a sum of the excesses of all other amplifiers times
    their coefficients: a joint fit, because the wings of a star in a third
    amplifier leak too.  Victim pixels that hold their own sources are left
    out, then the fit is repeated without 5-sigma outliers.
    """

    def __init__(self, config: CrosstalkConfig | None = None) -> None:
        self.config = config or CrosstalkConfig()

    def run(self, raw_frames: Sequence[RawFrame], detector: DetectorGeometry) -> CrosstalkResult:
        """Measure the crosstalk matrix.

        Parameters
        ----------
        raw_frames : sequence of raw frames
            Exposures with bright sources on every amplifier, 16 raw amplifiers each.
        detector : DetectorGeometry

        Returns
        -------
        CrosstalkResult
        """
        cfg = self.config
        n = AMPLIFIERS_PER_DETECTOR
        excesses, brights = [], []
        for raw in raw_frames:
            levels, _ = serial_overscan_levels(raw, detector)
            data = overscan_corrected_data(raw, detector, levels)
            # Column backgrounds from quiet readout positions only: a bleed trail covers a large
            # part of its column and would drag a plain median of every victim's column along.
            busy = (data > np.float32(cfg.quiet_level)).any(axis=0)
            data -= np.nanmedian(np.where(busy, np.float32(np.nan), data), axis=1, keepdims=True)
            data = data.reshape(n, -1)
            bright = data > np.float32(cfg.source_threshold)
            where = np.flatnonzero(bright.any(axis=0))
            excesses.append(data[:, where])
            brights.append(bright[:, where])
        excess = np.concatenate(excesses, axis=1).astype(np.float64)
        bright = np.concatenate(brights, axis=1)
        matrix = np.zeros((n, n))
        error = np.zeros((n, n))
        n_pixels = bright.sum(axis=1)
        for victim in range(n):
            sources = np.array([s for s in range(n) if s != victim and n_pixels[s] > 0])
            usable = np.abs(excess[victim]) <= cfg.victim_max
            for _ in range(2):
                design = excess[sources][:, usable].T
                target = excess[victim, usable]
                coefficients, *_ = np.linalg.lstsq(design, target, rcond=None)
                residual = excess[victim] - coefficients @ excess[sources]
                sigma = _clipped_std(residual[usable])
                usable &= np.abs(residual) <= 5 * sigma
            matrix[victim, sources] = coefficients
            covariance = sigma**2 * np.linalg.inv(design.T @ design)
            error[victim, sources] = np.sqrt(np.diag(covariance))
        return CrosstalkResult(matrix=matrix, error=error, n_pixels=n_pixels)
