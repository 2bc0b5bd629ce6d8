"""PSF-matched image subtraction: the proper difference image of Zackay, Ofek & Gal-Yam (2016, "ZOGY").

Why ZOGY rather than Alard-Lupton here: with the PSFs of both images known
(every calibrated ``CcdImage`` carries a ``PsfModel``), ZOGY is a closed form
in Fourier space: a fixed count of whole-image FFTs (four forward and four
inverse for difference, score and their variances, plus five PSF and kernel
spectra at about half the cost each; about 20 rfft2 units of ARCHITECTURE.md
for a 4k x 4k pair with everything around them), no star selection and no kernel fit that can fail
on a sparse or crowded field.  Its difference has white noise by construction
(no decorrelation afterburner needed), its PSF is known in closed form, and
its matched filter is the optimal detection statistic.  Alard-Lupton would
need both a kernel fit on stamps and a decorrelation step to reach the same
noise properties.  The price: ZOGY trusts the PSF models and the astrometric
registration, and assumes each PSF constant over the region transformed; the
images are therefore cut into overlapping patches (``SubtractConfig.patch_size``)
with the PSFs taken at each patch centre.

Conventions, for images already on the same pixel grid, background-subtracted:
the template is first scaled to the science zero point, so with ``F_N = F_R = 1``,
noise variances v_N, v_R (per pixel, medians of the variance planes) and
PSF spectra P̂_N, P̂_R:

    D̂ = c (P̂_R N̂ - P̂_N R̂) / √(v_N |P̂_R|² + v_R |P̂_N|²),   c = √(v_N + v_R),
    P̂_D = c P̂_R P̂_N / √(v_N |P̂_R|² + v_R |P̂_N|²).

``D`` is in science electrons, a transient of flux f in the science image is
f·P_D in ``D`` (P_D sums to 1), and the noise of ``D`` is white with variance
c².  The per-pixel variance of ``D`` is propagated through the two linear
filters (var_N ⊗ k_N² + var_R ⊗ k_R²), which is c² where both images are
background-limited and larger near bright stars.  The score is ``D`` correlated
with P_D and scaled to a PSF-flux estimate at every pixel; its variance is
var_D ⊗ P_D² / (Σ P_D²)², so score / √score_variance is the detection SNR.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
import scipy.fft

from dmstream.payloads.image import CcdImage, PsfModel
from dmstream.payloads.masks import MASK_DTYPE, MaskPlane
from dmstream.payloads.warp import grow_bits

#: Planes of either input that make the difference unreliable wherever the filters carry them.
PROPAGATED_PLANES = (MaskPlane.BAD | MaskPlane.SAT | MaskPlane.CR | MaskPlane.INTRP | MaskPlane.NO_DATA
                     | MaskPlane.SUSPECT | MaskPlane.STREAK | MaskPlane.INJECTED)


@dataclass(frozen=True)
class SubtractConfig:
    """How to subtract.

    Attributes
    ----------
    kernel_fwhms : float
        Half-width of the PSF stamps, in FWHM of the wider PSF (Kolmogorov wings
        beyond 4 FWHM hold about 1 % of the flux, beyond 6 FWHM about 0.5 %;
        the stamp size does not change the cost of the whole-image FFTs).
    patch_size : int
        Side of the square patches transformed with one pair of PSFs, pixels
        (before their overlap margins); 0 transforms the whole image at once.
    fft_workers : int
        Threads of each ``scipy.fft`` call.
    """

    kernel_fwhms: float = 6.0
    patch_size: int = 0
    fft_workers: int = 1


@dataclass
class SubtractResult:
    """A difference image and its detection statistic.

    Attributes
    ----------
    difference : CcdImage
        Science minus PSF-matched template, science electrons; its PSF a
        :class:`DifferencePsf` (P_D at patch centres, following the science
        PSF elsewhere); mask: both inputs' masks, grown by the filter
        half-width, plus EDGE within that distance of the border.
    score : numpy.ndarray
        float32, PSF-flux estimate centred on every pixel, electrons.
    score_variance : numpy.ndarray
        float32, variance of ``score``, electrons².
    template : CcdImage
        The template in science electrons (zero point of the science image).
    kernel_half : int
        Half-width of the PSF stamps used, pixels.
    """

    difference: CcdImage
    score: np.ndarray
    score_variance: np.ndarray
    template: CcdImage
    kernel_half: int

    @property
    def snr(self) -> np.ndarray:
        """Detection signal-to-noise ratio of every pixel (0 where unknown)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            snr = self.score / np.sqrt(self.score_variance)
        return np.nan_to_num(snr, nan=0.0, posinf=0.0, neginf=0.0)


class DifferencePsf:
    """PSF of the difference image for a source present in the science image only.

    ZOGY's filters are built from the two PSFs at a patch's centre, so a
    point source elsewhere in the patch, which keeps the science PSF of its
    own position, appears in the difference as F_N ⊗ P_N(x, y): the patch's
    science filter applied to the local science PSF.  That equals P_D only at
    the centre; measuring with P_D where the PSF is 2 % wider than at the
    centre would bias PSF fluxes by about 2 %.  The product is formed in
    Fourier space: the filter's kernel is not compact where both PSF spectra
    vanish, so no cropped real-space stamp of it can stand in.  Implements
    ``PsfModel``.

    Parameters
    ----------
    science_psf : PsfModel
        PSF of the science exposure.
    row_edges, col_edges : sequence of int
        Patch boundaries, pixels (first 0, last the image size).
    filter_spectra : numpy.ndarray
        (patch rows, patch cols, *grid spectrum shape*) rfft2 of each patch's
        science filter on a periodic grid of ``grid_shape``.
    grid_shape : tuple of int
        The grid, wide enough to hold the difference PSF without wrapping.
    stamp_size : int
        Side of the science PSF stamps the filters were made with.
    """

    def __init__(self, science_psf: PsfModel, row_edges: list[int], col_edges: list[int],
                 filter_spectra: np.ndarray, grid_shape: tuple[int, int], stamp_size: int) -> None:
        self.science_psf = science_psf
        self.row_edges, self.col_edges = np.asarray(row_edges), np.asarray(col_edges)
        self.filter_spectra, self.grid_shape, self.size = filter_spectra, grid_shape, stamp_size

    def _patch(self, x: float, y: float) -> tuple[int, int]:
        row = int(np.clip(np.searchsorted(self.row_edges, y, side="right") - 1, 0, len(self.row_edges) - 2))
        col = int(np.clip(np.searchsorted(self.col_edges, x, side="right") - 1, 0, len(self.col_edges) - 2))
        return row, col

    def kernel(self, x: float, y: float, size: int) -> np.ndarray:
        spectrum = _kernel_spectrum(_stamp(self.science_psf, x, y, self.size), self.grid_shape, 1)
        spectrum *= self.filter_spectra[self._patch(x, y)]
        reach = min(size // 2, (self.grid_shape[0] - 1) // 2)
        core = _centred(scipy.fft.irfft2(spectrum, self.grid_shape), reach)
        stamp = np.zeros((size, size))
        offset = size // 2 - reach
        stamp[offset:offset + 2 * reach + 1, offset:offset + 2 * reach + 1] = core
        return stamp / stamp.sum()

    def fwhm(self, x: float, y: float) -> float:
        stamp = self.kernel(x, y, self.size)
        half = self.size // 2
        offsets = np.arange(-half, half + 1)
        radius2 = offsets[:, None] ** 2 + offsets[None, :] ** 2
        # From the second moment of the core (within 2/3 of the stamp radius), as for a Gaussian.
        core = stamp * (radius2 <= (half / 1.5) ** 2)
        return float(2.3548 * np.sqrt((core * radius2).sum() / core.sum() / 2))


def zero_point_scale(from_zero_point: float | None, to_zero_point: float | None) -> float:
    """Factor that brings pixel values from one zero point to another (1 when either is unknown)."""
    if from_zero_point is None or to_zero_point is None:
        return 1.0
    return float(10.0 ** (0.4 * (to_zero_point - from_zero_point)))


def _kernel_spectrum(kernel: np.ndarray, fft_shape: tuple[int, int], workers: int) -> np.ndarray:
    """rfft2 of a centred stamp placed with its centre on pixel (0, 0) of a periodic array.

    Only the stamp's rows are transformed along x; the transform along y then
    runs over the full height, half the cost of a whole-array rfft2.
    """
    size, half = kernel.shape[0], kernel.shape[0] // 2
    placed = np.zeros((size, fft_shape[1]), dtype=np.float32)
    placed[:, :half + 1] = kernel[:, half:]
    placed[:, fft_shape[1] - half:] = kernel[:, :half]
    along_x = scipy.fft.rfft(placed, axis=1, workers=workers)
    spectrum = np.zeros((fft_shape[0], along_x.shape[1]), dtype=np.complex64)
    spectrum[:half + 1] = along_x[half:]
    spectrum[fft_shape[0] - half:] = along_x[:half]
    return scipy.fft.fft(spectrum, axis=0, workers=workers, overwrite_x=True)


def _filters(science_psf: np.ndarray, template_psf: np.ndarray, science_noise: float, template_noise: float,
             fft_shape: tuple[int, int], workers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spectra of the science PSF and of the two ZOGY filters, complex64 on ``fft_shape``."""
    psf_n = _kernel_spectrum(science_psf, fft_shape, workers)
    psf_r = _kernel_spectrum(template_psf, fft_shape, workers)
    scale = np.float32(np.sqrt(science_noise + template_noise))
    power_n = psf_n.real**2 + psf_n.imag**2
    power_r = psf_r.real**2 + psf_r.imag**2
    power_r *= np.float32(science_noise)
    power_n *= np.float32(template_noise)
    power_r += power_n
    # The floor only matters where both PSF spectra vanish, far beyond the band limit.
    gain = np.float32(1e-12) * scale
    power_r = scale / np.maximum(np.sqrt(power_r, out=power_r), gain, out=power_r)
    filter_n = psf_r
    filter_n *= power_r
    filter_r = psf_n * power_r
    return psf_n, filter_n, filter_r


def _filter_grid(stamp_size: int) -> tuple[int, int]:
    """Periodic grid for the filters of ``stamp_size`` stamps: wide enough that tails stay off cores."""
    return (scipy.fft.next_fast_len(4 * (stamp_size // 2) + 1, real=True),) * 2


def _centred(kernel: np.ndarray, half: int) -> np.ndarray:
    """The centred (2 half + 1)² stamp of a periodic kernel whose centre is pixel (0, 0)."""
    return np.roll(kernel, (half, half), axis=(0, 1))[:2 * half + 1, :2 * half + 1]


def _valid_median(values: np.ndarray, good: np.ndarray) -> float:
    # A strided subsample is plenty for a median and 16x cheaper.
    sample = values[::4, ::4][good[::4, ::4]]
    sample = sample[np.isfinite(sample)]
    return float(np.median(sample)) if sample.size else 1.0


def zogy(science: np.ndarray, template: np.ndarray, science_variance: np.ndarray,
         template_variance: np.ndarray, science_psf: np.ndarray, template_psf: np.ndarray,
         science_noise: float, template_noise: float, workers: int = 1
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Proper difference, its variance, score and score variance for one region.

    Parameters
    ----------
    science, template : numpy.ndarray
        Same shape, same flux units, background-subtracted; masked pixels set to 0.
    science_variance, template_variance : numpy.ndarray
        Per-pixel variances (finite), same units squared.
    science_psf, template_psf : numpy.ndarray
        Odd, centred stamps of the same size, each summing to 1.
    science_noise, template_noise : float
        Representative per-pixel variances v_N, v_R.
    workers : int
        Threads per FFT.

    Returns
    -------
    difference, difference_variance, score, score_variance : numpy.ndarray
        float32, the shape of ``science``.
    science_filter : numpy.ndarray
        rfft2 of F_N, the filter applied to the science image, on a periodic
        grid of twice the stamps' size (``_filter_grid(stamp size)``).
    """
    rows, cols = science.shape
    half = science_psf.shape[0] // 2
    # Zero padding by two kernel half-widths keeps the circular convolutions from wrapping.
    fft_shape = (scipy.fft.next_fast_len(rows + 2 * half, real=True),
                 scipy.fft.next_fast_len(cols + 2 * half, real=True))

    def forward(array: np.ndarray) -> np.ndarray:
        return scipy.fft.rfft2(array.astype(np.float32, copy=False), fft_shape, workers=workers)

    def inverse(spectrum: np.ndarray) -> np.ndarray:
        return scipy.fft.irfft2(spectrum, fft_shape, workers=workers, overwrite_x=True)[:rows, :cols]

    psf_n, filter_n, filter_r = _filters(science_psf, template_psf, science_noise, template_noise,
                                         fft_shape, workers)
    psf_n *= filter_n
    psf_d_spectrum = psf_n
    difference_spectrum = forward(science)
    difference_spectrum *= filter_n
    template_spectrum = forward(template)
    template_spectrum *= filter_r
    difference_spectrum -= template_spectrum
    del template_spectrum
    difference = inverse(difference_spectrum.copy())
    difference_spectrum *= psf_d_spectrum.conj()
    score = inverse(difference_spectrum)
    del difference_spectrum

    # The filters' kernels in real space, for the variance: on a small grid twice the stamps' size,
    # wide enough that their tails do not wrap onto their cores, then squared and brought back to
    # the image's grid.  Their spectra there are sampled finely enough to need no more.
    reach = 2 * half
    small_shape = _filter_grid(science_psf.shape[0])
    small_psf_n, small_filter_n, small_filter_r = _filters(science_psf, template_psf, science_noise,
                                                           template_noise, small_shape, workers)
    small_psf_n *= small_filter_n
    kernel_n, kernel_r, psf_d = (_centred(scipy.fft.irfft2(spectrum, small_shape, workers=workers), reach)
                                 for spectrum in (small_filter_n, small_filter_r, small_psf_n))
    variance_spectrum = forward(science_variance)
    variance_spectrum *= _kernel_spectrum(kernel_n**2, fft_shape, workers)
    template_variance_spectrum = forward(template_variance)
    template_variance_spectrum *= _kernel_spectrum(kernel_r**2, fft_shape, workers)
    variance_spectrum += template_variance_spectrum
    del template_variance_spectrum
    difference_variance = inverse(variance_spectrum.copy())
    variance_spectrum *= _kernel_spectrum(psf_d**2, fft_shape, workers)
    score_variance = inverse(variance_spectrum)

    norm = np.float32((psf_d**2).sum())
    # Squared-kernel FFT convolutions can leave round-off negatives where the variance is tiny.
    np.maximum(difference_variance, 0.0, out=difference_variance)
    np.maximum(score_variance, 0.0, out=score_variance)
    score /= norm
    score_variance /= norm**2
    return difference, difference_variance, score, score_variance, small_filter_n


def _patch_edges(length: int, size: int) -> list[int]:
    """Boundaries of pieces of about ``size`` tiling ``length`` (one piece when ``size`` is 0)."""
    count = max(1, round(length / size)) if size else 1
    return [int(edge) for edge in np.linspace(0, length, count + 1).round()]


def run(science: CcdImage, template: CcdImage, config: SubtractConfig | None = None) -> SubtractResult:
    """Subtract a template already resampled onto the science pixel grid.

    Parameters
    ----------
    science : CcdImage
        Calibrated, background-subtracted, with a PSF.
    template : CcdImage
        On the same grid (e.g. from :func:`dmstream.payloads.warp.warp_image`), with a PSF.
    config : SubtractConfig, optional

    Returns
    -------
    SubtractResult
    """
    config = config or SubtractConfig()
    if science.psf is None or template.psf is None:
        raise ValueError("both images need a PSF")
    if science.shape != template.shape:
        raise ValueError(f"science {science.shape} and template {template.shape} differ in shape")
    rows, cols = science.shape
    factor = np.float32(zero_point_scale(template.zero_point, science.zero_point))
    either_mask = science.mask | template.mask
    good = (either_mask & MaskPlane.NO_DATA) == 0
    zero = np.float32(0)
    science_image = np.where(good, science.image, zero)
    template_image = np.where(good, template.image, zero)
    template_image *= factor
    template_variance = template.variance * factor**2
    sigma_n = _valid_median(science.variance, good)
    sigma_r = _valid_median(template_variance, good)
    # Unknown variances (NO_DATA) take the typical value: those pixels are zero and flagged anyway.
    science_var = np.where(good & np.isfinite(science.variance), science.variance, np.float32(sigma_n))
    template_var = np.where(good & np.isfinite(template_variance), template_variance, np.float32(sigma_r))

    centre_x, centre_y = (cols - 1) / 2, (rows - 1) / 2
    fwhm = max(science.psf.fwhm(centre_x, centre_y), template.psf.fwhm(centre_x, centre_y))
    half = int(np.ceil(config.kernel_fwhms * fwhm))
    size = 2 * half + 1
    difference = np.zeros((rows, cols), dtype=np.float32)
    difference_variance = np.zeros_like(difference)
    score = np.zeros_like(difference)
    score_variance = np.zeros_like(difference)
    # Patches overlap by two kernel widths so that each core sees all the pixels its filters reach.
    margin = 2 * size
    row_edges, col_edges = _patch_edges(rows, config.patch_size), _patch_edges(cols, config.patch_size)
    grid = _filter_grid(size)
    science_filters = np.zeros((len(row_edges) - 1, len(col_edges) - 1, grid[0], grid[1] // 2 + 1),
                               np.complex64)
    for i, (y0, y1) in enumerate(itertools.pairwise(row_edges)):
        for j, (x0, x1) in enumerate(itertools.pairwise(col_edges)):
            oy0, oy1, ox0, ox1 = max(0, y0 - margin), min(rows, y1 + margin), max(0, x0 - margin), min(
                cols, x1 + margin)
            px, py = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
            region = (slice(oy0, oy1), slice(ox0, ox1))
            core = (slice(y0 - oy0, y1 - oy0), slice(x0 - ox0, x1 - ox0))
            parts = zogy(science_image[region], template_image[region], science_var[region],
                         template_var[region], _stamp(science.psf, px, py, size),
                         _stamp(template.psf, px, py, size), sigma_n, sigma_r, config.fft_workers)
            for out, part in zip((difference, difference_variance, score, score_variance), parts[:4],
                                 strict=True):
                out[y0:y1, x0:x1] = part[core]
            science_filters[i, j] = parts[4]

    mask = grow_bits(either_mask & PROPAGATED_PLANES, half) | science.mask
    edge = np.ones((rows, cols), dtype=bool)
    edge[half:-half, half:-half] = False
    mask[edge] |= MaskPlane.EDGE
    mask = mask.astype(MASK_DTYPE)
    masked = (mask & MaskPlane.NO_DATA) != 0
    difference[masked] = 0.0
    score[masked] = 0.0
    difference_variance[masked] = np.nan
    score_variance[masked] = np.nan
    psf = DifferencePsf(science.psf, row_edges, col_edges, science_filters, grid, size)
    result_image = replace(science, image=difference, variance=difference_variance, mask=mask, psf=psf)
    scaled_template = replace(template, image=template.image * factor, variance=template_variance,
                              zero_point=science.zero_point)
    return SubtractResult(result_image, score, score_variance, scaled_template, half)


def _stamp(psf: PsfModel, x: float, y: float, size: int) -> np.ndarray:
    kernel = np.asarray(psf.kernel(x, y, size), dtype=float)
    return kernel / kernel.sum()
