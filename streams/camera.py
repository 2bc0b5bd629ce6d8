"""The simulated LSSTCam detector electronics: from electrons on the sensor to raw integer amplifiers.

A :class:`DetectorElectronics` is drawn once per detector from a seed and stays
the same all night, so that biases, darks and flats taken in the afternoon
calibrate the science exposures of the night.  :func:`simulate_raw` turns the
expected photo-electrons of one exposure into the 16 raw amplifier arrays the
camera would read out (readout orientation, with prescan and overscan), laid
out as in :mod:`dmstream.payloads.camera`.

The order of effects follows the charge through a CCD and its electronics:
pixel response (flat field, vignetting, dead columns) -> shot noise (with the
dark current, whose electrons are Poisson too) -> full well and blooming along
columns -> output amplifier gain (electrons to ADU) -> non-linearity ->
crosstalk between simultaneously read amplifiers -> bias level and structure
and read noise (data and overscan alike) -> 18-bit ADC.

The parameter ranges are typical of LSSTCam sensors as characterised on the
test stands (gains 1.2-1.8 e-/ADU, read noise 5-9 e-, full well 100-150 ke-,
obs_lsst ``policy/lsstCam/R*.yaml``); the individual values are made up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dmstream.payloads.camera import AMPLIFIERS_PER_DETECTOR, DetectorGeometry, pixel_to_focal_plane
from dmstream.payloads.isr import IsrCalibrations

#: Below this many expected electrons a pixel's shot noise is drawn from a
#: Poisson distribution; above it a Gaussian of the same variance is
#: indistinguishable for our purposes and several times faster to draw.
POISSON_BELOW_E = 30.0


@dataclass(frozen=True)
class ElectronicsConfig:
    """Ranges the parameters of one detector's electronics are drawn from.

    Pairs are (low, high) of a uniform draw, or of a log-uniform draw where the
    attribute says so.
    """

    gain_e_per_adu: tuple[float, float] = (1.2, 1.8)
    read_noise_e: tuple[float, float] = (5.0, 9.0)
    bias_adu: tuple[float, float] = (15_000.0, 25_000.0)
    #: rms of the fixed column-to-column bias pattern, ADU.
    bias_column_rms_adu: float = 1.5
    #: Largest change of the bias across the readout of one amplifier, ADU.
    bias_row_ramp_adu: float = 4.0
    #: Dark current of an amplifier's pixels, e-/s/px (log-uniform).
    dark_current_e_per_s: tuple[float, float] = (0.002, 0.02)
    hot_pixel_count: tuple[int, int] = (20, 60)
    #: Dark current of a hot pixel, e-/s (log-uniform).
    hot_pixel_e_per_s: tuple[float, float] = (0.5, 50.0)
    #: rms pixel response non-uniformity.
    prnu: float = 0.01
    #: Focal-plane radius where vignetting sets in, mm.
    vignetting_start_mm: float = 200.0
    #: Focal-plane radius where the response has lost ``vignetting_edge_loss``, mm.
    vignetting_edge_mm: float = 450.0
    vignetting_edge_loss: float = 0.25
    full_well_e: tuple[float, float] = (100_000.0, 150_000.0)
    bad_column_count: tuple[int, int] = (1, 4)
    #: Crosstalk coefficient between amplifiers that are side by side, magnitude.
    crosstalk_neighbour: tuple[float, float] = (2e-4, 6e-4)
    #: Crosstalk coefficient between other pairs, magnitude (log-uniform).
    crosstalk_other: tuple[float, float] = (1e-5, 1e-4)
    #: Quadratic non-linearity coefficient c in ADU_out = ADU + c ADU^2, 1/ADU.
    nonlinearity_per_adu: tuple[float, float] = (-1.5e-7, -0.5e-7)
    adc_bits: int = 18


def vignetting(radius_mm: np.ndarray, config: ElectronicsConfig) -> np.ndarray:
    """Relative throughput at focal-plane radius ``radius_mm`` (1 on axis, falling quadratically outside).

    An illustrative shape, not Rubin's measured vignetting: flat out to
    ``vignetting_start_mm``, then losing ``vignetting_edge_loss`` by ``vignetting_edge_mm``.
    """
    span = config.vignetting_edge_mm - config.vignetting_start_mm
    outside = np.clip((radius_mm - config.vignetting_start_mm) / span, 0.0, None)
    return 1.0 - config.vignetting_edge_loss * outside**2


def _vignetting_image(detector: DetectorGeometry, config: ElectronicsConfig) -> np.ndarray | np.float32:
    """Vignetting of every pixel of the assembled detector (or 1 where the whole detector is unvignetted)."""
    rows, cols = detector.shape
    corners_x, corners_y = pixel_to_focal_plane(detector, np.array([0, cols - 1, 0, cols - 1]),
                                                np.array([0, 0, rows - 1, rows - 1]))
    if np.hypot(corners_x, corners_y).max() <= config.vignetting_start_mm:
        return np.float32(1.0)
    # The pixel-to-focal-plane map is affine: f(x, y) = f(x, 0) + f(0, y) - f(0, 0),
    # which builds the radius from two 1-D arrays without float64 images.
    along_x = pixel_to_focal_plane(detector, np.arange(cols), 0)
    along_y = pixel_to_focal_plane(detector, 0, np.arange(rows))
    origin = pixel_to_focal_plane(detector, 0, 0)
    x_mm = (along_x[0] - origin[0]).astype(np.float32)[None, :] + along_y[0].astype(np.float32)[:, None]
    y_mm = (along_x[1] - origin[1]).astype(np.float32)[None, :] + along_y[1].astype(np.float32)[:, None]
    return vignetting(np.hypot(x_mm, y_mm), config).astype(np.float32)


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float], size: Any = None) -> np.ndarray:
    return np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]), size))


@dataclass(frozen=True, eq=False)
class DetectorElectronics:
    """Every parameter of one detector's sensor and electronics (the truth calibration is tested against).

    Per-amplifier arrays have 16 entries in raw-file order
    (``detector.amplifiers``).  Pixel positions are 0-based in the assembled
    detector.

    Attributes
    ----------
    detector : DetectorGeometry
    seed : int
        The night's seed the parameters were drawn from (with the detector id).
    gain : numpy.ndarray
        (16,) electrons per ADU.
    read_noise : numpy.ndarray
        (16,) read noise, electrons rms.
    bias_level : numpy.ndarray
        (16,) mean bias, ADU.
    bias_rows : numpy.ndarray
        (16, raw rows) bias change along the readout (a slow ramp), ADU, zero mean.
    bias_columns : numpy.ndarray
        (16, raw cols) fixed column pattern of the bias, ADU, zero mean.
    dark_current : numpy.ndarray
        (16,) dark current of ordinary pixels, e-/s/px.
    hot_pixels : numpy.ndarray
        Structured array (``y``, ``x``, ``rate``): hot pixels and their extra dark current, e-/s.
    bad_columns : numpy.ndarray
        Structured array (``x``, ``y_start``, ``y_stop``): dead column segments
        (zero response, stop exclusive), from a charge trap to the midline of the detector.
    flat : numpy.ndarray
        (rows, cols) float32 relative response: PRNU x vignetting, 0 on bad columns.
    full_well : numpy.ndarray
        (16,) electrons a pixel holds before charge blooms along its column.
    crosstalk : numpy.ndarray
        (16, 16) ``crosstalk[victim, source]``: fraction of the source amplifier's
        signal (ADU) added to the victim's pixel read at the same time; zero diagonal.
    nonlinearity : numpy.ndarray
        (16,) c of ADU_out = ADU + c ADU^2, 1/ADU.
    adc_max : int
        Largest value of the ADC, ADU (2^18 - 1).
    config : ElectronicsConfig
        The ranges the parameters were drawn from.
    """

    detector: DetectorGeometry
    seed: int
    gain: np.ndarray
    read_noise: np.ndarray
    bias_level: np.ndarray
    bias_rows: np.ndarray
    bias_columns: np.ndarray
    dark_current: np.ndarray
    hot_pixels: np.ndarray
    bad_columns: np.ndarray
    flat: np.ndarray
    full_well: np.ndarray
    crosstalk: np.ndarray
    nonlinearity: np.ndarray
    adc_max: int
    config: ElectronicsConfig = field(default_factory=ElectronicsConfig)

    @classmethod
    def draw(cls, detector: DetectorGeometry, seed: int,
             config: ElectronicsConfig | None = None) -> DetectorElectronics:
        """Draw the electronics of ``detector`` for the night of ``seed`` (deterministic).

        Takes ~0.3 s for a full detector, mostly the flat field.
        """
        config = config or ElectronicsConfig()
        rng = np.random.default_rng([seed, detector.id])
        n = AMPLIFIERS_PER_DETECTOR
        raw_rows, raw_cols = detector.readout.raw_shape
        rows, cols = detector.shape

        ramp = config.bias_row_ramp_adu * rng.uniform(-1.0, 1.0, (n, 1)) * np.linspace(-0.5, 0.5, raw_rows)
        column_pattern = rng.normal(0.0, config.bias_column_rms_adu, (n, raw_cols))
        column_pattern -= column_pattern.mean(axis=1, keepdims=True)

        n_hot = int(rng.integers(config.hot_pixel_count[0], config.hot_pixel_count[1] + 1))
        hot = np.zeros(n_hot, dtype=[("y", np.int64), ("x", np.int64), ("rate", np.float64)])
        hot["y"], hot["x"] = np.unravel_index(rng.choice(rows * cols, n_hot, replace=False), (rows, cols))
        hot["rate"] = _log_uniform(rng, config.hot_pixel_e_per_s, n_hot)

        n_bad = int(rng.integers(config.bad_column_count[0], config.bad_column_count[1] + 1))
        bad = np.zeros(n_bad, dtype=[("x", np.int64), ("y_start", np.int64), ("y_stop", np.int64)])
        bad["x"] = rng.choice(cols, n_bad, replace=False)
        # A trap blocks the charge of the pixels behind it, away from the
        # serial register, which is at the outer edge of each half.
        trap = rng.integers(0, rows // 2, n_bad)
        top = rng.random(n_bad) < 0.5
        bad["y_start"] = np.where(top, rows // 2, trap)
        bad["y_stop"] = np.where(top, rows - trap, rows // 2)

        flat = rng.standard_normal((rows, cols), dtype=np.float32)
        flat *= np.float32(config.prnu)
        flat += np.float32(1.0)
        flat *= _vignetting_image(detector, config)
        for x, y_start, y_stop in bad:
            flat[y_start:y_stop, x] = 0.0

        crosstalk = _draw_crosstalk(rng, config)
        return cls(
            detector=detector, seed=seed,
            gain=rng.uniform(*config.gain_e_per_adu, n),
            read_noise=rng.uniform(*config.read_noise_e, n),
            bias_level=rng.uniform(*config.bias_adu, n),
            bias_rows=ramp, bias_columns=column_pattern,
            dark_current=_log_uniform(rng, config.dark_current_e_per_s, n),
            hot_pixels=hot, bad_columns=bad, flat=flat,
            full_well=rng.uniform(*config.full_well_e, n),
            crosstalk=crosstalk,
            nonlinearity=rng.uniform(*config.nonlinearity_per_adu, n),
            adc_max=2**config.adc_bits - 1, config=config,
        )

    @property
    def read_noise_adu(self) -> np.ndarray:
        """(16,) read noise in ADU rms."""
        return self.read_noise / self.gain

    def bias_image(self, index: int) -> np.ndarray:
        """Expected (noise-free) bias of raw amplifier ``index``, ADU, raw shape."""
        return self.bias_level[index] + self.bias_rows[index][:, None] + self.bias_columns[index][None, :]

    def dark_image(self) -> np.ndarray:
        """Dark current of every pixel of the assembled detector, e-/s/px."""
        dark = np.empty(self.detector.shape, dtype=np.float32)
        for amp, rate in zip(self.detector.amplifiers, self.dark_current, strict=True):
            dark[amp.detector_slices] = rate
        dark[self.hot_pixels["y"], self.hot_pixels["x"]] += self.hot_pixels["rate"].astype(np.float32)
        return dark

    def truth(self) -> dict[str, Any]:
        """Every parameter by name (arrays as held, not copied); units as in the class docstring."""
        return {
            "detector": self.detector.name, "detector_id": self.detector.id, "seed": self.seed,
            "amplifiers": [amp.name for amp in self.detector.amplifiers],
            "gain": self.gain, "read_noise": self.read_noise, "read_noise_adu": self.read_noise_adu,
            "bias_level": self.bias_level, "bias_rows": self.bias_rows, "bias_columns": self.bias_columns,
            "dark_current": self.dark_current, "hot_pixels": self.hot_pixels,
            "bad_columns": self.bad_columns, "flat": self.flat, "full_well": self.full_well,
            "crosstalk": self.crosstalk, "nonlinearity": self.nonlinearity, "adc_max": self.adc_max,
            "config": self.config,
        }


def _draw_crosstalk(rng: np.random.Generator, config: ElectronicsConfig) -> np.ndarray:
    n = AMPLIFIERS_PER_DETECTOR
    index = np.arange(n)
    same_half = (index[:, None] < n // 2) == (index[None, :] < n // 2)
    # Within a half, raw-file order runs along the serial direction, so
    # neighbouring indices are amplifiers side by side.
    neighbour = same_half & (np.abs(index[:, None] - index[None, :]) == 1)
    sign = np.where(rng.random((n, n)) < 0.5, -1.0, 1.0)
    magnitude = np.where(neighbour, rng.uniform(*config.crosstalk_neighbour, (n, n)),
                         _log_uniform(rng, config.crosstalk_other, (n, n)))
    crosstalk = sign * magnitude
    np.fill_diagonal(crosstalk, 0.0)
    return crosstalk


def _shot_noise(mean: np.ndarray, rng: np.random.Generator, poisson_below: float) -> np.ndarray:
    """Replace expected electrons by a noisy realisation, in place where it can."""
    np.maximum(mean, 0.0, out=mean)
    small = mean < poisson_below
    n_small = int(np.count_nonzero(small))
    if n_small == mean.size:
        return rng.poisson(mean).astype(np.float32)
    small_means = mean[small] if n_small else None
    noise = rng.standard_normal(mean.shape, dtype=np.float32)
    noise *= np.sqrt(mean)
    mean += noise
    if small_means is not None:
        mean[small] = rng.poisson(small_means)
    return mean


def _spill(column: np.ndarray, charge: float, full_well: float) -> None:
    """Fill ``column`` (ordered away from a saturated run) with ``charge`` electrons up to the full well."""
    room = np.maximum(full_well - column, 0.0)
    filled = np.cumsum(room, dtype=np.float64)
    n_full = int(np.searchsorted(filled, charge))
    if n_full < column.size:
        column[n_full] += charge - (filled[n_full - 1] if n_full else 0.0)
    # Pixels already above the full well keep their charge: they are runs of
    # their own and spill when their turn comes.
    np.maximum(column[:n_full], full_well, out=column[:n_full])


def _bloom(electrons: np.ndarray, electronics: DetectorElectronics) -> None:
    """Cap pixels at the full well and spread the excess up and down their column, within the amplifier."""
    for amp, full_well in zip(electronics.detector.amplifiers, electronics.full_well, strict=True):
        segment = electrons[amp.detector_slices]
        for x in np.flatnonzero(segment.max(axis=0) > full_well):
            column = segment[:, x]
            over = np.concatenate(([False], column > full_well, [False]))
            edges = np.flatnonzero(np.diff(over.astype(np.int8)))
            for start, stop in zip(edges[::2], edges[1::2], strict=True):
                excess = float(np.sum(column[start:stop] - full_well, dtype=np.float64))
                column[start:stop] = full_well
                _spill(column[stop:], excess / 2, full_well)
                _spill(column[:start][::-1], excess / 2, full_well)


def simulate_raw(signal_e: np.ndarray | None, exptime: float, darktime: float,
                 electronics: DetectorElectronics, rng: np.random.Generator,
                 poisson_below: float = POISSON_BELOW_E) -> list[np.ndarray]:
    """The 16 raw amplifier arrays of one exposure of one detector.

    Parameters
    ----------
    signal_e : numpy.ndarray or None
        Expected photo-electrons per pixel of the assembled detector during the
        exposure, before the flat field (float32, ``detector.shape``); None or
        zeros for biases and darks, a constant for a flat.  Not modified.
    exptime : float
        Open-shutter time, s.
    darktime : float
        Time from the clear of the sensor to its readout, s (>= ``exptime``);
        dark current accumulates over it.
    electronics : DetectorElectronics
    rng : numpy.random.Generator
        Source of the noise; the same state gives identical arrays.
    poisson_below : float
        Expected electrons below which shot noise is drawn from a Poisson
        distribution instead of a Gaussian.

    Returns
    -------
    list of numpy.ndarray
        16 int32 arrays of ``amp.raw_shape``, ADU, in raw-file order and readout
        orientation, with prescan, serial and parallel overscan.
    """
    detector = electronics.detector
    if exptime < 0 or darktime < exptime:
        raise ValueError(f"need 0 <= exptime <= darktime, got exptime={exptime}, darktime={darktime}")
    if signal_e is None:
        mean = np.zeros(detector.shape, dtype=np.float32)
    elif signal_e.shape != detector.shape:
        raise ValueError(f"{detector.name}: signal shape {signal_e.shape}, expected {detector.shape}")
    else:
        mean = np.multiply(signal_e, electronics.flat, dtype=np.float32)
    if darktime > 0:
        for amp, rate in zip(detector.amplifiers, electronics.dark_current, strict=True):
            mean[amp.detector_slices] += np.float32(rate * darktime)
        hot = electronics.hot_pixels
        mean[hot["y"], hot["x"]] += (hot["rate"] * darktime).astype(np.float32)

    electrons = _shot_noise(mean, rng, poisson_below)
    _bloom(electrons, electronics)

    n = AMPLIFIERS_PER_DETECTOR
    raw_rows, raw_cols = detector.readout.raw_shape
    raw = np.zeros((n, raw_rows, raw_cols), dtype=np.float32)
    work = np.empty((raw_rows, raw_cols), dtype=np.float32)
    for i, amp in enumerate(detector.amplifiers):
        np.multiply(electrons[amp.detector_slices][amp.flip], np.float32(1.0 / electronics.gain[i]),
                    out=raw[i][amp.data_slices])
        np.multiply(raw[i], np.float32(electronics.nonlinearity[i]), out=work)
        work += np.float32(1.0)
        raw[i] *= work
    del electrons, mean

    # Amplifiers are read in lockstep, so crosstalk couples pixels at the
    # same readout position, overscan included.
    flat_view = raw.reshape(n, -1)
    flat_view += electronics.crosstalk.astype(np.float32) @ flat_view

    read_noise_adu = electronics.read_noise_adu
    for i in range(n):
        rng.standard_normal(dtype=np.float32, out=work)
        work *= np.float32(read_noise_adu[i])
        raw[i] += work
        # +0.5 so that the truncation to int32 below rounds to the nearest ADU.
        raw[i] += (electronics.bias_rows[i] + (electronics.bias_level[i] + 0.5)).astype(np.float32)[:, None]
        raw[i] += electronics.bias_columns[i].astype(np.float32)
    np.clip(raw, 0, electronics.adc_max, out=raw)
    return list(raw.astype(np.int32))


def truth_calibrations(electronics: DetectorElectronics) -> IsrCalibrations:
    """The calibrations a perfect calibration pipeline would measure for ``electronics``.

    Gains, read noise, non-linearity, crosstalk, dark current, flat and defects
    come straight from the simulator; the saturation level is the full well as
    read (through the non-linearity, which lowers it by up to ~1 %).  The
    master bias is left out (None): callers either measure it or, where the
    bias does not matter, give a flat one.
    """
    full_well_adu = electronics.full_well / electronics.gain
    defects = electronics.flat == 0
    defects[electronics.hot_pixels["y"], electronics.hot_pixels["x"]] = True
    return IsrCalibrations(
        gain=electronics.gain, read_noise=electronics.read_noise,
        saturation=full_well_adu + electronics.nonlinearity * full_well_adu**2,
        linearity=electronics.nonlinearity, crosstalk=electronics.crosstalk,
        dark=electronics.dark_image(), flat=np.where(defects, 1, electronics.flat).astype(np.float32),
        defects=defects,
    )
