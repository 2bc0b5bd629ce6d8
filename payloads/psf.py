"""An empirical point-spread function that varies across the CCD, built from the image's own stars.

The model is a pixel basis: each pixel of a centred, unit-sum stamp is a
polynomial (degree 0-2) in the position on the detector.  Isolated, unsaturated
stars are cut out, re-centred by a sub-pixel Lanczos shift, normalised, and
every pixel's polynomial is fitted by weighted least squares over the stars
(one small normal system per pixel, so pixels that a neighbour or a defect
spoils in some stamps are simply left out of those stamps).  Stars that the
model fits badly (blends, galaxies, cosmic rays) are clipped and the fit redone.

Also here: cutting stamps out of an image, the Lanczos shift, and Gaussian
adaptive moments (centroid, second moments and their errors) of many stamps at
once, which detection uses for its shape measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage
from numpy.typing import ArrayLike, NDArray

from dmstream.payloads.image import PsfModel

#: Half-width of the Lanczos kernel used for sub-pixel shifts, pixels.
LANCZOS_ORDER = 3
#: Gaussian sigma to FWHM.
SIGMA_TO_FWHM = 2.0 * np.sqrt(2.0 * np.log(2.0))


# --- stamps -----------------------------------------------------------------------------------------------

def cutouts(array: np.ndarray, x: ArrayLike, y: ArrayLike, half: int, fill: float = 0.0
            ) -> tuple[np.ndarray, NDArray[np.bool_]]:
    """Square stamps of ``array`` centred on integer pixels.

    Parameters
    ----------
    array : numpy.ndarray
        2-D image (any dtype).
    x, y : array_like of int
        Centre column and row of each stamp.
    half : int
        Half-width: stamps are ``2 half + 1`` pixels on a side.
    fill : float
        Value of stamp pixels that fall off the image.

    Returns
    -------
    stamps : numpy.ndarray
        (N, 2 half + 1, 2 half + 1), of ``array``'s dtype.
    inside : numpy.ndarray of bool
        Whether each stamp lies wholly on the image.
    """
    x, y = np.asarray(x, dtype=np.intp), np.asarray(y, dtype=np.intp)
    rows, cols = array.shape
    offsets = np.arange(-half, half + 1)
    ys = y[:, None] + offsets
    xs = x[:, None] + offsets
    inside = (ys[:, 0] >= 0) & (ys[:, -1] < rows) & (xs[:, 0] >= 0) & (xs[:, -1] < cols)
    stamps = array[np.clip(ys, 0, rows - 1)[:, :, None], np.clip(xs, 0, cols - 1)[:, None, :]]
    if not inside.all():
        off = ((ys < 0) | (ys >= rows))[:, :, None] | ((xs < 0) | (xs >= cols))[:, None, :]
        stamps = np.where(off, np.asarray(fill, dtype=stamps.dtype), stamps)
    return stamps, inside


def _lanczos_matrices(shift: NDArray[np.float64], size_in: int, margin: int) -> NDArray[np.float64]:
    """(N, size_in - 2 margin, size_in) matrices that resample a row at positions ``i + margin + shift``."""
    size_out = size_in - 2 * margin
    target = np.arange(size_out)[None, :, None] + margin + shift[:, None, None]
    distance = np.arange(size_in)[None, None, :] - target
    a = LANCZOS_ORDER
    weights = np.where(np.abs(distance) < a, np.sinc(distance) * np.sinc(distance / a), 0.0)
    # Normalised so that a flat row stays flat (Lanczos weights sum to 1 only on average).
    return weights / weights.sum(axis=2, keepdims=True)


def lanczos_shift(stamps: np.ndarray, dx: ArrayLike, dy: ArrayLike, margin: int = LANCZOS_ORDER
                  ) -> NDArray[np.float64]:
    """Resample stamps so that what sits at (centre + dx, centre + dy) lands on the centre.

    Parameters
    ----------
    stamps : numpy.ndarray
        (N, S, S) stamps.
    dx, dy : array_like
        Sub-pixel offsets of each stamp's feature from its centre pixel, pixels
        (|d| ≤ ``margin``).
    margin : int
        Pixels lost on each side (the kernel's reach).

    Returns
    -------
    numpy.ndarray
        (N, S - 2 margin, S - 2 margin), float64.
    """
    size = stamps.shape[-1]
    kx = _lanczos_matrices(np.asarray(dx, dtype=float).reshape(-1), size, margin)
    ky = _lanczos_matrices(np.asarray(dy, dtype=float).reshape(-1), size, margin)
    return ky @ stamps.astype(np.float64) @ kx.transpose(0, 2, 1)


# --- adaptive moments ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Moments:
    """Gaussian adaptive moments of stamps (pixels, relative to each stamp's centre pixel).

    Attributes
    ----------
    dx, dy : numpy.ndarray
        Centroid offset from the stamp centre, pixels.
    dx_err, dy_err : numpy.ndarray
        Their 1-sigma errors, pixels (from the variance stamps).
    ixx, iyy, ixy : numpy.ndarray
        Second moments of the matched elliptical Gaussian, pixels².
    converged : numpy.ndarray of bool
    """

    dx: NDArray[np.float64]
    dy: NDArray[np.float64]
    dx_err: NDArray[np.float64]
    dy_err: NDArray[np.float64]
    ixx: NDArray[np.float64]
    iyy: NDArray[np.float64]
    ixy: NDArray[np.float64]
    converged: NDArray[np.bool_]

    @property
    def e1(self) -> NDArray[np.float64]:
        """(Ixx - Iyy) / (Ixx + Iyy)."""
        return (self.ixx - self.iyy) / (self.ixx + self.iyy)

    @property
    def e2(self) -> NDArray[np.float64]:
        """2 Ixy / (Ixx + Iyy)."""
        return 2.0 * self.ixy / (self.ixx + self.iyy)

    @property
    def sigma(self) -> NDArray[np.float64]:
        """Determinant radius (Ixx Iyy - Ixy²)^¼, pixels."""
        return np.maximum(self.ixx * self.iyy - self.ixy**2, 0.0) ** 0.25


def adaptive_moments(stamps: np.ndarray, variance: np.ndarray | None = None, sigma0: float = 2.0,
                     iterations: int = 30, tolerance: float = 1e-4) -> Moments:
    """Centroids and second moments of many stamps with an elliptical Gaussian weight matched to each.

    The weight's centre and shape are iterated until they agree with the
    weighted moments (for a Gaussian, the weighted covariance is half the
    weight's once they match), as in HSM's adaptive moments.  For a profile
    with elliptical isophotes the matched ellipse has the isophotes' ellipticity.

    Parameters
    ----------
    stamps : numpy.ndarray
        (N, S, S) background-subtracted stamps centred near their source.
    variance : numpy.ndarray, optional
        (N, S, S) pixel variances, for the centroid errors (NaN without it).
    sigma0 : float
        Starting Gaussian sigma, pixels.
    iterations : int
    tolerance : float
        Convergence on centroid (pixels) and moments (relative).

    Returns
    -------
    Moments
    """
    n, size, _ = stamps.shape
    data = stamps.astype(np.float64)
    grid = np.arange(size) - size // 2
    gx, gy = grid[None, None, :], grid[:, None][None]
    cx, cy = np.zeros(n), np.zeros(n)
    mxx, myy, mxy = np.full(n, sigma0**2), np.full(n, sigma0**2), np.zeros(n)
    converged = np.zeros(n, dtype=bool)
    limit = (size / 4.0) ** 2
    for _ in range(iterations):
        det = mxx * myy - mxy**2
        ux, uy = gx - cx[:, None, None], gy - cy[:, None, None]
        q = (myy[:, None, None] * ux**2 - 2 * mxy[:, None, None] * ux * uy + mxx[:, None, None] * uy**2)
        weight = np.exp(-0.5 * q / det[:, None, None])
        wi = weight * data
        total = wi.sum(axis=(1, 2))
        good = total > 0
        safe = np.where(good, total, 1.0)
        # For a weight matched to a Gaussian the weighted centroid moves by half the true offset.
        shift_x = 2.0 * (wi * ux).sum(axis=(1, 2)) / safe
        shift_y = 2.0 * (wi * uy).sum(axis=(1, 2)) / safe
        new_xx = 2.0 * (wi * ux**2).sum(axis=(1, 2)) / safe
        new_yy = 2.0 * (wi * uy**2).sum(axis=(1, 2)) / safe
        new_xy = 2.0 * (wi * ux * uy).sum(axis=(1, 2)) / safe
        ok = good & (new_xx > 0.05) & (new_yy > 0.05) & (new_xx * new_yy > new_xy**2) \
            & (new_xx < limit) & (new_yy < limit)
        step = np.hypot(shift_x, shift_y)
        change = np.abs(new_xx + new_yy - mxx - myy) / (mxx + myy)
        converged = ok & (step < tolerance) & (change < tolerance)
        cx = np.where(ok, np.clip(cx + np.clip(shift_x, -1, 1), -size / 4, size / 4), cx)
        cy = np.where(ok, np.clip(cy + np.clip(shift_y, -1, 1), -size / 4, size / 4), cy)
        mxx, myy, mxy = (np.where(ok, new, old) for new, old in ((new_xx, mxx), (new_yy, myy), (new_xy, mxy)))
        if converged.all():
            break
    if variance is None:
        err_x = err_y = np.full(n, np.nan)
    else:
        ux, uy = gx - cx[:, None, None], gy - cy[:, None, None]
        q = (myy[:, None, None] * ux**2 - 2 * mxy[:, None, None] * ux * uy + mxx[:, None, None] * uy**2)
        # Moments that never became positive definite give non-finite errors: NaN, not a warning.
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            weight = np.exp(-0.5 * q / (mxx * myy - mxy**2)[:, None, None])
            total = np.maximum((weight * data).sum(axis=(1, 2)), 1e-30)
            w2v = weight**2 * variance
            err_x = 2.0 * np.sqrt((w2v * ux**2).sum(axis=(1, 2))) / total
            err_y = 2.0 * np.sqrt((w2v * uy**2).sum(axis=(1, 2))) / total
    return Moments(cx, cy, err_x, err_y, mxx, myy, mxy, converged)


# --- the model ---------------------------------------------------------------------------------------------

def _poly_terms(u: NDArray[np.float64], v: NDArray[np.float64], degree: int) -> NDArray[np.float64]:
    """(N, T) monomials u^p v^q with p + q ≤ degree."""
    return np.stack([u**p * v ** (total - p) for total in range(degree + 1) for p in range(total, -1, -1)],
                    axis=-1)


@dataclass(frozen=True)
class PixelPsf:
    """A PSF whose pixels are polynomials in the detector position (implements ``PsfModel``).

    Attributes
    ----------
    coefficients : numpy.ndarray
        (T, S, S): the stamp is Σ_t coefficients[t] · term_t(u, v), with
        (u, v) the position scaled to [-1, 1] across the detector.
    degree : int
        Polynomial degree of the spatial variation.
    detector_shape : tuple of int
        (rows, cols) of the detector the model was fitted on.
    """

    coefficients: NDArray[np.float64]
    degree: int
    detector_shape: tuple[int, int]

    @property
    def stamp_size(self) -> int:
        return int(self.coefficients.shape[-1])

    @classmethod
    def approximating(cls, psf: PsfModel, detector_shape: tuple[int, int], stamp_size: int, degree: int = 2,
                      nodes: int = 6) -> PixelPsf:
        """A PixelPsf fitted to another PSF model sampled on a ``nodes`` x ``nodes`` grid of positions.

        For models that only exist in memory (a coadd's weighted sum of warped
        PSFs, say): the approximation is a plain array, stored and read back
        exactly, that follows the original's variation to the given degree.
        """
        rows, cols = detector_shape
        gx, gy = np.meshgrid(np.linspace(0, cols - 1, nodes), np.linspace(0, rows - 1, nodes))
        x, y = gx.ravel(), gy.ravel()
        stamps = np.stack([np.asarray(psf.kernel(xi, yi, stamp_size), float)
                           for xi, yi in zip(x, y, strict=True)])
        shell = cls(np.zeros((1, stamp_size, stamp_size)), degree, detector_shape)
        terms = _poly_terms(*shell._scaled(x, y), degree)
        coefficients, *_ = np.linalg.lstsq(terms, stamps.reshape(len(stamps), -1), rcond=None)
        return cls(coefficients.reshape(-1, stamp_size, stamp_size), degree, detector_shape)

    def _scaled(self, x: ArrayLike, y: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        rows, cols = self.detector_shape
        u = (np.asarray(x, dtype=float) - (cols - 1) / 2) / ((cols - 1) / 2)
        v = (np.asarray(y, dtype=float) - (rows - 1) / 2) / ((rows - 1) / 2)
        return u, v

    def stamps(self, x: ArrayLike, y: ArrayLike) -> NDArray[np.float64]:
        """(N, S, S) model stamps at many positions, centred, each summing to 1."""
        u, v = self._scaled(np.atleast_1d(x), np.atleast_1d(y))
        terms = _poly_terms(u, v, self.degree)
        size = self.stamp_size
        stamps = (terms @ self.coefficients.reshape(len(self.coefficients), -1)).reshape(-1, size, size)
        return stamps / stamps.sum(axis=(1, 2), keepdims=True)

    def kernel(self, x: float, y: float, size: int) -> np.ndarray:
        """The PSF at pixel (x, y) on a ``size`` x ``size`` stamp (odd), centred, summing to 1."""
        if size % 2 == 0 or size < 1:
            raise ValueError(f"size must be odd and positive, got {size}")
        stamp = self.stamps(x, y)[0]
        own = self.stamp_size
        if size <= own:
            cut = (own - size) // 2
            stamp = stamp[cut:cut + size, cut:cut + size]
        else:
            pad = (size - own) // 2
            stamp = np.pad(stamp, pad)
        return stamp / stamp.sum()

    def fwhm(self, x: float, y: float) -> float:
        """FWHM at (x, y), pixels: the diameter of the circle whose area is that above half the peak.

        For an elliptical profile this is the geometric mean of the FWHM along
        its axes.  It is the FWHM of the image PSF, pixel response included.
        """
        return float(half_max_fwhm(self.stamps(x, y)[0]))

    def moments(self, x: ArrayLike, y: ArrayLike) -> Moments:
        """Adaptive moments of the model at positions (x, y)."""
        return adaptive_moments(self.stamps(x, y), sigma0=self.stamp_size / 10)

    def ellipticity(self, x: ArrayLike, y: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(e1, e2) of the model at (x, y): (a² - b²)/(a² + b²) along x and along x = y."""
        m = self.moments(x, y)
        return m.e1, m.e2


#: Fine pixels per pixel when the half-maximum contour is measured.
_FWHM_UPSAMPLING = 8


def half_max_fwhm(stamp: np.ndarray) -> float:
    """FWHM of a centred, well-sampled profile from the area above half its peak, pixels.

    The stamp's central part is interpolated by a cubic spline onto a grid
    ``_FWHM_UPSAMPLING`` times finer, so the area is not counted in whole pixels.
    """
    size = stamp.shape[0]
    peak_index = np.unravel_index(np.argmax(stamp), stamp.shape)
    above = stamp >= stamp[peak_index] / 4
    reach = int(np.max(np.abs(np.argwhere(above) - size // 2))) + 2
    centre = size // 2
    lo, hi = max(centre - reach, 0), min(centre + reach + 1, size)
    fine = scipy.ndimage.zoom(stamp[lo:hi, lo:hi].astype(np.float64), _FWHM_UPSAMPLING, order=3,
                              grid_mode=True, mode="nearest")
    area = np.count_nonzero(fine >= fine.max() / 2) / _FWHM_UPSAMPLING**2
    return 2.0 * np.sqrt(area / np.pi)


@dataclass(frozen=True)
class PsfConfig:
    """How the PSF model is built.

    Attributes
    ----------
    stamp_size : int
        Side of the model's stamp, pixels (odd); 0 picks about 6 FWHM, 21-41.
    spatial_degree : int
        Degree of the polynomial variation across the CCD (0-2); lowered when
        there are too few stars for it.
    stars_per_term : float
        Stars needed per polynomial term to keep a degree.
    min_snr : float
        Faintest star used, signal-to-noise ratio of its flux.
    max_stars : int
        Most stars used (the brightest).
    clip : float
        Stars whose normalised residual exceeds the median by this many
        robust sigmas are dropped.
    iterations : int
        Fit-and-clip rounds.
    """

    stamp_size: int = 0
    spatial_degree: int = 2
    stars_per_term: float = 3.0
    min_snr: float = 50.0
    max_stars: int = 300
    clip: float = 4.0
    iterations: int = 3

    def __post_init__(self) -> None:
        if self.stamp_size and (self.stamp_size % 2 == 0 or self.stamp_size < 9):
            raise ValueError("stamp_size must be 0 or odd and >= 9")
        if not 0 <= self.spatial_degree <= 2:
            raise ValueError("spatial_degree must be 0, 1 or 2")


@dataclass(frozen=True)
class PsfFit:
    """A fitted PSF model and the stars behind it.

    Attributes
    ----------
    psf : PixelPsf
    used : numpy.ndarray of int
        Indices (into the candidates given) of the stars kept in the final fit.
    candidates : int
        Stars offered.
    """

    psf: PixelPsf
    used: NDArray[np.intp]
    candidates: int


def auto_stamp_size(fwhm_px: float) -> int:
    """An odd stamp side of about 6 FWHM, between 21 and 41 pixels."""
    return int(np.clip(2 * int(np.ceil(3.0 * fwhm_px)) + 1, 21, 41))


def fit_psf(image: np.ndarray, variance: np.ndarray, bad: np.ndarray, x: ArrayLike, y: ArrayLike,
            snr: ArrayLike, fwhm_guess: float, config: PsfConfig | None = None) -> PsfFit:
    """Fit a :class:`PixelPsf` to stars of a background-subtracted image.

    Parameters
    ----------
    image : numpy.ndarray
        Background-subtracted image, e⁻ per pixel.
    variance : numpy.ndarray
        Pixel variance, e⁻².
    bad : numpy.ndarray of bool
        Pixels not to use: defects, saturation, cosmic rays, other sources.
    x, y : array_like
        Centroids of candidate stars (isolated, unsaturated point sources), pixels.
    snr : array_like
        Their flux signal-to-noise ratios (weights and selection).
    fwhm_guess : float
        Typical FWHM, pixels (sets the stamp size when not configured).
    config : PsfConfig, optional

    Returns
    -------
    PsfFit
    """
    config = config or PsfConfig()
    x, y, snr = (np.asarray(v, dtype=float) for v in (x, y, snr))
    candidates = x.size
    order = np.argsort(-snr)
    order = order[snr[order] >= config.min_snr][:config.max_stars]
    size = config.stamp_size or auto_stamp_size(fwhm_guess)
    half, margin = size // 2, LANCZOS_ORDER
    xi, yi = np.rint(x[order]).astype(np.intp), np.rint(y[order]).astype(np.intp)
    raw, inside = cutouts(image, xi, yi, half + margin)
    masked, _ = cutouts(bad, xi, yi, half + margin, fill=True)
    var, _ = cutouts(variance, xi, yi, half + margin, fill=np.inf)
    keep = inside & ~masked[:, margin:-margin, margin:-margin][:, half - 1:half + 2, half - 1:half + 2].any(
        axis=(1, 2))
    order, raw, masked, var = order[keep], raw[keep], masked[keep], var[keep]
    dx, dy = x[order] - xi[keep], y[order] - yi[keep]
    # Pull each star onto the stamp centre; bad pixels are zeroed first and, through the
    # absolute kernel, every output pixel they touch is excluded.
    stamps = lanczos_shift(np.where(masked, 0.0, raw), dx, dy)
    spoiled = lanczos_shift(masked.astype(np.float64), dx, dy) != 0
    noise = lanczos_shift(np.where(masked, 0.0, var), dx, dy)
    flux = np.where(spoiled, 0.0, stamps).sum(axis=(1, 2))
    ok = flux > 0
    stamps, spoiled, noise, flux, order = stamps[ok], spoiled[ok], noise[ok], flux[ok], order[ok]
    stamps /= flux[:, None, None]
    noise /= flux[:, None, None] ** 2
    # One weight per star (its mean normalised pixel variance in the core) so that a pixel's
    # noise, which holds the star's own shot noise, does not bias that pixel's fit.
    core = noise[:, half - 2:half + 3, half - 2:half + 3].mean(axis=(1, 2))
    star_weight = 1.0 / np.maximum(core, 1e-12)
    u = (x[order] - (image.shape[1] - 1) / 2) / ((image.shape[1] - 1) / 2)
    v = (y[order] - (image.shape[0] - 1) / 2) / ((image.shape[0] - 1) / 2)
    active = np.ones(order.size, dtype=bool)
    degree = config.spatial_degree
    model = None
    for _ in range(max(config.iterations, 1)):
        degree = _affordable_degree(int(active.sum()), config.spatial_degree, config.stars_per_term)
        model = _solve_pixels(stamps[active], spoiled[active], star_weight[active], u[active], v[active],
                              degree)
        predicted = np.einsum("nt,tij->nij", _poly_terms(u, v, degree), model)
        chi2 = np.where(spoiled, 0.0, (stamps - predicted) ** 2 / np.maximum(noise, 1e-30)).sum(axis=(1, 2))
        chi2 /= np.maximum((~spoiled).sum(axis=(1, 2)), 1)
        median = np.median(chi2[active])
        spread = 1.4826 * np.median(np.abs(chi2[active] - median))
        still = chi2 <= median + config.clip * max(spread, 0.05 * median)
        if np.array_equal(still & active, active):
            break
        active &= still
    if model is None or not active.any():
        raise ValueError("no usable PSF stars")
    return PsfFit(PixelPsf(model, degree, (int(image.shape[0]), int(image.shape[1]))), order[active],
                  candidates)


def _affordable_degree(stars: int, wanted: int, per_term: float) -> int:
    for degree in range(wanted, 0, -1):
        if stars >= per_term * (degree + 1) * (degree + 2) / 2:
            return degree
    return 0


def _solve_pixels(stamps: NDArray[np.float64], spoiled: NDArray[np.bool_], weight: NDArray[np.float64],
                  u: NDArray[np.float64], v: NDArray[np.float64], degree: int) -> NDArray[np.float64]:
    """Weighted least squares of every pixel's polynomial: (T, S, S)."""
    terms = _poly_terms(u, v, degree)  # (N, T)
    n, size, _ = stamps.shape
    w = np.where(spoiled, 0.0, weight[:, None, None]).reshape(n, -1)  # (N, P)
    normal = np.einsum("np,nt,ns->pts", w, terms, terms)
    rhs = np.einsum("np,nt,np->pt", w, terms, stamps.reshape(n, -1))
    # A pixel seen by too few stars gets a tiny ridge so its system stays solvable.
    normal += 1e-9 * np.trace(normal, axis1=1, axis2=2).max() * np.eye(terms.shape[1])
    solution = np.linalg.solve(normal, rhs[..., None])[..., 0]
    return solution.T.reshape(-1, size, size)
