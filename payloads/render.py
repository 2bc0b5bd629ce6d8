"""Drawing the sky into CCD images: point sources, galaxies, trails, cosmic rays.

Pure functions on numpy arrays (with GalSim for the profiles), no I/O.  Images
are float32 arrays of expected electrons per pixel; positions are 0-based pixel
coordinates with ``x`` the column and integer values at pixel centres (the
convention of ``astropy.wcs.WCS.world_to_pixel_values``).  Every ``draw_*``
function adds to the image in place; sources may lie partly or wholly off it.

Point sources are the hot path (thousands per CCD), so GalSim is asked once
per PSF for an oversampled image of the pixel-convolved profile, from which
stamps at a grid of sub-pixel offsets are cut; a source is the bilinear blend
of the four nearest stamps, which keeps its centroid exact.  The faint wings
beyond the stamp (Kolmogorov wings hold ~1 % of the flux outside 4″) are added
by depositing every source's flux bilinearly on the pixel grid and convolving
with the wing, directly or by FFT when there are many sources; the stamps hold
the PSF minus what that deposit puts inside them, so the sum is the PSF out to
``HALO_RADIUS`` pixels (≥99.8 % of the flux for LSST seeing).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import galsim
import numpy as np
import scipy.fft
from numpy.typing import ArrayLike, NDArray

from dmstream.payloads.photometry import PIXEL_SCALE

#: Sub-pixel steps per pixel of the precomputed point-source stamps.
OVERSAMPLING = 8
#: Radius out to which point sources are drawn, pixels (12.8″ at 0.2″/px).
HALO_RADIUS = 64
#: Anchor points per axis of the PSF across the detector when it varies.
PSF_NODES = 3
#: Sources per batch when point-source stamps are assembled.
_BATCH = 512
#: Below this many sources the wings are added stamp by stamp, above by FFT
#: (a direct add of one wing costs about 1/16 as much per pixel as an FFT
#: convolution of the whole image; measured on one core).
_DIRECT_HALO_COST_RATIO = 16.0


@dataclass(frozen=True)
class Psf:
    """Point-spread function of one exposure on one detector.

    Attributes
    ----------
    fwhm : float
        FWHM of the round profile at the detector centre, arcsec.
    e1, e2 : float
        Ellipticity (a² - b²)/(a² + b²) along the pixel x axis and along the
        diagonal x = y, at the detector centre.  The shear keeps the area, so
        ``fwhm`` is the geometric mean of the FWHM along the two axes.
    profile : str
        ``"kolmogorov"`` (atmospheric turbulence, heavy wings) or ``"moffat"``.
    moffat_beta : float
        Moffat index when ``profile`` is ``"moffat"``.
    fwhm_variation : float
        Fractional change of the FWHM from the detector centre to its corners;
        quadratic in the distance from the centre.
    e1_gradient, e2_gradient : tuple of float
        Change of e1 (e2) from the detector centre to its right edge and to its
        top edge; linear in x and y.
    pixel_scale : float
        Arcsec per pixel.
    """

    fwhm: float = 0.8
    e1: float = 0.0
    e2: float = 0.0
    profile: str = "kolmogorov"
    moffat_beta: float = 3.5
    fwhm_variation: float = 0.0
    e1_gradient: tuple[float, float] = (0.0, 0.0)
    e2_gradient: tuple[float, float] = (0.0, 0.0)
    pixel_scale: float = PIXEL_SCALE

    def __post_init__(self) -> None:
        if self.profile not in ("kolmogorov", "moffat"):
            raise ValueError(f"profile must be 'kolmogorov' or 'moffat', not {self.profile!r}")
        if self.fwhm <= 0 or self.pixel_scale <= 0:
            raise ValueError("fwhm and pixel_scale must be positive")

    @property
    def varies(self) -> bool:
        """Whether the PSF changes across the detector."""
        return bool(self.fwhm_variation or any(self.e1_gradient) or any(self.e2_gradient))

    def at(self, x: ArrayLike, y: ArrayLike, shape: tuple[int, int]
           ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """FWHM (arcsec) and ellipticity (e1, e2) at pixels of a detector of ``shape`` (rows, cols)."""
        rows, cols = shape
        u = (np.asarray(x, dtype=float) - (cols - 1) / 2) / max((cols - 1) / 2, 1.0)
        v = (np.asarray(y, dtype=float) - (rows - 1) / 2) / max((rows - 1) / 2, 1.0)
        fwhm = self.fwhm * (1.0 + self.fwhm_variation * (u**2 + v**2) / 2)
        e1 = self.e1 + self.e1_gradient[0] * u + self.e1_gradient[1] * v
        e2 = self.e2 + self.e2_gradient[0] * u + self.e2_gradient[1] * v
        return fwhm, e1, e2

    def galsim_profile(self, x: float = 0.0, y: float = 0.0, shape: tuple[int, int] = (1, 1),
                       flux: float = 1.0) -> galsim.GSObject:
        """The PSF at pixel (x, y) of a detector of ``shape`` as a GalSim profile in arcsec (no pixel)."""
        fwhm, e1, e2 = (float(value) for value in self.at(x, y, shape))
        if self.profile == "kolmogorov":
            profile = galsim.Kolmogorov(fwhm=fwhm, flux=flux)
        else:
            profile = galsim.Moffat(beta=self.moffat_beta, fwhm=fwhm, flux=flux)
        return profile.shear(e1=e1, e2=e2) if e1 or e2 else profile


def _add_stamp(image: np.ndarray, stamp: np.ndarray, x0: int, y0: int) -> None:
    """Add ``stamp`` with its pixel [0, 0] on image pixel (x0, y0), clipped to the image."""
    rows, cols = image.shape
    sy0, sx0 = max(0, -y0), max(0, -x0)
    sy1 = min(stamp.shape[0], rows - y0)
    sx1 = min(stamp.shape[1], cols - x0)
    if sy1 > sy0 and sx1 > sx0:
        image[y0 + sy0:y0 + sy1, x0 + sx0:x0 + sx1] += stamp[sy0:sy1, sx0:sx1]


def _wing_taper(radius: np.ndarray, inner: float) -> np.ndarray:
    """0 inside ``inner``, 1 beyond ``inner + 3`` pixels, a smooth cos² in between."""
    t = np.clip((radius - inner) / 3.0, 0.0, 1.0)
    return np.sin(0.5 * np.pi * t) ** 2


@dataclass(frozen=True)
class _PointSpread:
    """Precomputed stamps of one PSF over one detector shape."""

    node_x: NDArray[np.float64]
    node_y: NDArray[np.float64]
    #: (nodes_y, nodes_x, K+1, K+1, 2h+1, 2h+1): PSF at sub-pixel offsets minus the wing deposit.
    core: NDArray[np.float32]
    #: (2R+1, 2R+1): the PSF at the detector centre outside the core, centred.
    wing: NDArray[np.float32]
    half: int


def _pixel_psf_oversampled(psf: Psf, x: float, y: float, shape: tuple[int, int], half: int) -> np.ndarray:
    """The pixel-convolved PSF sampled every 1/K pixel, centred, electrons per pixel for a unit flux."""
    k = OVERSAMPLING
    size = 2 * (half + 1) * k + 1
    profile = galsim.Convolve(psf.galsim_profile(x, y, shape), galsim.Pixel(psf.pixel_scale))
    fine = profile.drawImage(nx=size, ny=size, scale=psf.pixel_scale / k, method="no_pixel")
    # Sampling the pixel-convolved profile gives flux per fine pixel; a full pixel is K² of them.
    return fine.array.astype(np.float64) * k**2


@lru_cache(maxsize=4)
def _point_spread(psf: Psf, shape: tuple[int, int]) -> _PointSpread:
    rows, cols = shape
    k = OVERSAMPLING
    nodes = PSF_NODES if psf.varies else 1
    node_x = np.linspace(0.0, cols - 1.0, nodes) if nodes > 1 else np.array([(cols - 1) / 2])
    node_y = np.linspace(0.0, rows - 1.0, nodes) if nodes > 1 else np.array([(rows - 1) / 2])
    grid_x, grid_y = np.meshgrid(node_x, node_y)
    largest_fwhm_px = float(np.max(psf.at(grid_x, grid_y, shape)[0])) / psf.pixel_scale
    half = int(np.ceil(2.5 * largest_fwhm_px)) + 4
    radius = HALO_RADIUS
    if half + 2 >= radius:
        raise ValueError(f"PSF FWHM {largest_fwhm_px:.1f} px is too wide for the {radius}-pixel halo")

    centre = psf.galsim_profile((cols - 1) / 2, (rows - 1) / 2, shape)
    full = centre.drawImage(nx=2 * radius + 1, ny=2 * radius + 1, scale=psf.pixel_scale).array.astype(float)
    dy, dx = np.indices(full.shape) - radius
    wing = full * _wing_taper(np.hypot(dx, dy), half - 4)

    steps = np.arange(k + 1) / k
    core = np.empty((nodes, nodes, k + 1, k + 1, 2 * half + 1, 2 * half + 1), dtype=np.float32)
    # What the bilinear deposit of the wing puts inside the core box, for each shift (a, b) in {0, 1}².
    wing_in_box = [[wing[radius - half - b:radius + half - b + 1, radius - half - a:radius + half - a + 1]
                    for a in (0, 1)] for b in (0, 1)]
    for iy, ny in enumerate(node_y):
        for ix, nx in enumerate(node_x):
            fine = _pixel_psf_oversampled(psf, nx, ny, shape, half)
            centre_index = (half + 1) * k
            for jy in range(k + 1):
                rows_slice = slice(centre_index - half * k - jy, centre_index + half * k - jy + 1, k)
                for jx in range(k + 1):
                    cols_slice = slice(centre_index - half * k - jx, centre_index + half * k - jx + 1, k)
                    wx, wy = (1 - steps[jx], steps[jx]), (1 - steps[jy], steps[jy])
                    deposit = sum(wy[b] * wx[a] * wing_in_box[b][a] for a in (0, 1) for b in (0, 1))
                    core[iy, ix, jy, jx] = fine[rows_slice, cols_slice] - deposit
    return _PointSpread(node_x, node_y, core, wing.astype(np.float32), half)


def _interpolation(position: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower node index and weight of the upper node; constant beyond the end nodes."""
    if nodes.size == 1:
        return np.zeros(position.size, dtype=np.intp), np.zeros(position.size)
    f = np.clip((position - nodes[0]) / (nodes[1] - nodes[0]), 0.0, nodes.size - 1.0)
    lower = np.minimum(f.astype(np.intp), nodes.size - 2)
    return lower, f - lower


def _draw_cores(image: np.ndarray, spread: _PointSpread, x: np.ndarray, y: np.ndarray,
                flux: np.ndarray) -> None:
    k, half = OVERSAMPLING, spread.half
    base_x, base_y = np.floor(x), np.floor(y)
    sub_x, sub_y = (x - base_x) * k, (y - base_y) * k
    step_x = np.minimum(sub_x.astype(np.intp), k - 1)
    step_y = np.minimum(sub_y.astype(np.intp), k - 1)
    frac_x, frac_y = sub_x - step_x, sub_y - step_y
    node_x, node_wx = _interpolation(x, spread.node_x)
    node_y, node_wy = _interpolation(y, spread.node_y)
    node_corners = [(0, 0)] if spread.node_x.size == 1 else [(0, 0), (0, 1), (1, 0), (1, 1)]
    corner_x = base_x.astype(np.intp) - half
    corner_y = base_y.astype(np.intp) - half
    for start in range(0, x.size, _BATCH):
        batch = slice(start, start + _BATCH)
        stamps = np.zeros((len(x[batch]), 2 * half + 1, 2 * half + 1), dtype=np.float32)
        for ny, nx in node_corners:
            node_weight = (np.where(ny, node_wy[batch], 1 - node_wy[batch])
                           * np.where(nx, node_wx[batch], 1 - node_wx[batch]))
            for sy in (0, 1):
                for sx in (0, 1):
                    weight = node_weight * (np.where(sy, frac_y[batch], 1 - frac_y[batch])
                                            * np.where(sx, frac_x[batch], 1 - frac_x[batch]))
                    table = spread.core[node_y[batch] + ny, node_x[batch] + nx,
                                        step_y[batch] + sy, step_x[batch] + sx]
                    stamps += (weight * flux[batch]).astype(np.float32)[:, None, None] * table
        for stamp, cx, cy in zip(stamps, corner_x[batch], corner_y[batch], strict=True):
            _add_stamp(image, stamp, int(cx), int(cy))


def _draw_wings(image: np.ndarray, spread: _PointSpread, x: np.ndarray, y: np.ndarray,
                flux: np.ndarray) -> None:
    """Deposit each flux bilinearly on its four nearest pixels and convolve with the wing."""
    radius = HALO_RADIUS
    rows, cols = image.shape
    base_x, base_y = np.floor(x).astype(np.intp), np.floor(y).astype(np.intp)
    frac_x, frac_y = x - base_x, y - base_y
    deposits = [(base_x + a, base_y + b, flux * (frac_x if a else 1 - frac_x) * (frac_y if b else 1 - frac_y))
                for a in (0, 1) for b in (0, 1)]
    padded_shape = (rows + 2 * radius, cols + 2 * radius)
    direct_cost = 4 * x.size * spread.wing.size
    if direct_cost < _DIRECT_HALO_COST_RATIO * padded_shape[0] * padded_shape[1]:
        for px, py, weight in deposits:
            for cx, cy, w in zip(px, py, weight, strict=True):
                _add_stamp(image, np.float32(w) * spread.wing, int(cx) - radius, int(cy) - radius)
        return
    grid = np.zeros(padded_shape, dtype=np.float64)
    for px, py, weight in deposits:
        inside = (px >= -radius) & (px < cols + radius) & (py >= -radius) & (py < rows + radius)
        np.add.at(grid, (py[inside] + radius, px[inside] + radius), weight[inside])
    # Circular wrap-around only reaches the first 2R rows and columns, which are not kept.
    fft_shape = tuple(scipy.fft.next_fast_len(n, real=True) for n in padded_shape)
    spectrum = scipy.fft.rfft2(grid.astype(np.float32), fft_shape)
    spectrum *= scipy.fft.rfft2(spread.wing, fft_shape)
    convolved = scipy.fft.irfft2(spectrum, fft_shape)
    # 'valid' part: output pixel (i, j) sees the deposit at padded (i + R, j + R) through the wing centre.
    image += convolved[2 * radius:2 * radius + rows, 2 * radius:2 * radius + cols]


def draw_point_sources(image: np.ndarray, x: ArrayLike, y: ArrayLike, flux_e: ArrayLike, psf: Psf) -> None:
    """Add point sources to ``image`` in place.

    Parameters
    ----------
    image : numpy.ndarray
        2-D float32 image, electrons per pixel.
    x, y : array_like
        0-based column and row of each source centre, pixels; may be off the image.
    flux_e : array_like
        Total electrons of each source (the profile is drawn out to
        ``HALO_RADIUS`` pixels; the rest of the wing, <0.2 %, is not drawn).
    psf : Psf
        The PSF; its variation across the detector is taken relative to ``image.shape``.
    """
    x, y, flux = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (x, y, flux_e))
    x, y, flux = np.broadcast_arrays(x, y, flux)
    rows, cols = image.shape
    reach = HALO_RADIUS + 1
    keep = ((x > -reach) & (x < cols + reach) & (y > -reach) & (y < rows + reach)
            & (flux != 0) & np.isfinite(x) & np.isfinite(y))
    if not keep.any():
        return
    spread = _point_spread(psf, (rows, cols))
    x, y, flux = x[keep], y[keep], flux[keep]
    half = spread.half
    near = (x > -half - 1) & (x < cols + half) & (y > -half - 1) & (y < rows + half)
    _draw_cores(image, spread, x[near], y[near], flux[near])
    _draw_wings(image, spread, x, y, flux)


def trail_samples(x0: ArrayLike, y0: ArrayLike, x1: ArrayLike, y1: ArrayLike, flux_e: ArrayLike,
                  spacing: float = 0.25) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Points that stand for straight trails, for :func:`draw_point_sources`.

    Each segment is cut into equal pieces no longer than ``spacing`` pixels and
    replaced by a point of equal flux at the middle of each piece: summed
    through a PSF a few pixels wide, they are the trail convolved with the PSF.

    Parameters
    ----------
    x0, y0, x1, y1 : array_like
        Ends of each trail, pixels.
    flux_e : array_like
        Total electrons of each trail.
    spacing : float
        Largest distance between points, pixels.

    Returns
    -------
    x, y, flux_e, index : numpy.ndarray
        The points and, for each, the index of its trail.
    """
    x0, y0, x1, y1, flux = np.broadcast_arrays(*(np.atleast_1d(np.asarray(v, dtype=float))
                                                 for v in (x0, y0, x1, y1, flux_e)))
    pieces = np.maximum(np.ceil(np.hypot(x1 - x0, y1 - y0) / spacing), 1).astype(np.intp)
    index = np.repeat(np.arange(x0.size), pieces)
    first = np.cumsum(pieces) - pieces
    t = (np.arange(index.size) - first[index] + 0.5) / pieces[index]
    return (x0[index] + t * (x1 - x0)[index], y0[index] + t * (y1 - y0)[index],
            flux[index] / pieces[index], index)


def draw_trail(image: np.ndarray, x0: float, y0: float, x1: float, y1: float, flux_e: float,
               psf: Psf) -> None:
    """Add a straight streak from (x0, y0) to (x1, y1) with ``flux_e`` electrons, convolved with the PSF.

    For a source moving during the exposure or a satellite crossing the field;
    positions in pixels as for :func:`draw_point_sources`.
    """
    x, y, flux, _ = trail_samples(x0, y0, x1, y1, flux_e)
    draw_point_sources(image, x, y, flux, psf)


def galaxy_stamp_half_size(half_light_radius: float, sersic_n: float, psf_fwhm: float,
                           pixel_scale: float = PIXEL_SCALE, truncation: float = 0.0) -> int:
    """Half-width (pixels) of a stamp holding a galaxy out to its truncation radius plus the PSF."""
    extent = truncation or (4.0 + 1.5 * sersic_n) * half_light_radius
    return int(np.ceil((extent + 2.0 * psf_fwhm) / pixel_scale)) + 2


#: Sérsic profiles are cut at this many half-light radii (GalSim ``trunc``);
#: the flux and half-light radius given are those of the truncated profile.
SERSIC_TRUNCATION = 6.0
#: Largest stamp for a galaxy, pixels on a side.
MAX_GALAXY_STAMP = 401


def draw_galaxies(image: np.ndarray, x: ArrayLike, y: ArrayLike, flux_e: ArrayLike,
                  half_light_radius: ArrayLike, sersic_n: ArrayLike, e1: ArrayLike, e2: ArrayLike,
                  psf: Psf) -> None:
    """Add Sérsic galaxies convolved with the PSF (and the pixel) to ``image`` in place.

    Parameters
    ----------
    image : numpy.ndarray
        2-D float32 image, electrons per pixel.
    x, y : array_like
        0-based pixel position of each galaxy centre.
    flux_e : array_like
        Total electrons of each galaxy.
    half_light_radius : array_like
        Half-light radius, arcsec (of the profile truncated at
        ``SERSIC_TRUNCATION`` half-light radii).
    sersic_n : array_like
        Sérsic index (1 exponential disc, 4 de Vaucouleurs); GalSim accepts 0.3-6.2.
    e1, e2 : array_like
        Ellipticity (a² - b²)/(a² + b²) along the pixel x axis and the diagonal x = y.
    psf : Psf
        The PSF, evaluated at each galaxy's position.
    """
    columns = np.broadcast_arrays(*(np.atleast_1d(np.asarray(v, dtype=float))
                                    for v in (x, y, flux_e, half_light_radius, sersic_n, e1, e2)))
    rows, cols = image.shape
    scale = psf.pixel_scale
    for gx, gy, flux, hlr, n, g1, g2 in zip(*columns, strict=True):
        if flux == 0:
            continue
        fwhm = float(psf.at(gx, gy, image.shape)[0])
        half = min(galaxy_stamp_half_size(hlr, n, fwhm, scale, SERSIC_TRUNCATION * hlr),
                   MAX_GALAXY_STAMP // 2)
        centre_x, centre_y = int(np.rint(gx)), int(np.rint(gy))
        if (centre_x + half < 0 or centre_x - half >= cols or centre_y + half < 0
                or centre_y - half >= rows):
            continue
        galaxy = galsim.Sersic(n=float(n), half_light_radius=float(hlr), flux=float(flux),
                               trunc=SERSIC_TRUNCATION * float(hlr))
        if g1 or g2:
            galaxy = galaxy.shear(e1=float(g1), e2=float(g2))
        profile = galsim.Convolve(galaxy, psf.galsim_profile(gx, gy, image.shape))
        stamp = profile.drawImage(nx=2 * half + 1, ny=2 * half + 1, scale=scale,
                                  offset=(gx - centre_x, gy - centre_y)).array
        _add_stamp(image, stamp.astype(np.float32), centre_x - half, centre_y - half)


@dataclass(frozen=True)
class CosmicRays:
    """Truth of the cosmic-ray tracks added to an image.

    Attributes
    ----------
    x0, y0, x1, y1 : numpy.ndarray
        Ends of each track, pixels (may extend off the image).
    charge_e : numpy.ndarray
        Electrons deposited on the image by each track.
    """

    x0: NDArray[np.float64]
    y0: NDArray[np.float64]
    x1: NDArray[np.float64]
    y1: NDArray[np.float64]
    charge_e: NDArray[np.float64]

    @property
    def length(self) -> NDArray[np.float64]:
        """Projected length of each track, pixels."""
        return np.hypot(self.x1 - self.x0, self.y1 - self.y0)

    def __len__(self) -> int:
        return self.x0.size


#: Most probable energy loss of a minimum-ionising particle in silicon, e⁻ per µm.
MIP_ELECTRONS_PER_UM = 80.0


def add_cosmic_rays(image: np.ndarray, rate: float, rng: np.random.Generator, duration: float = 30.0,
                    pixel_size_um: float = 10.0, thickness_um: float = 100.0) -> CosmicRays:
    """Add cosmic-ray tracks to ``image`` in place and return their truth.

    Muons arrive with a zenith angle θ drawn from the cos²θ distribution of
    sea-level muons, so the projected track is thickness·tanθ long: mostly a few
    pixels, sometimes tens.  The charge is ``MIP_ELECTRONS_PER_UM`` along the
    path in silicon with a log-normal spread (a crude stand-in for the Landau
    tail), laid along the track without diffusion, so tracks are sharper than
    the PSF, as real ones are.

    Parameters
    ----------
    image : numpy.ndarray
        2-D float32 image, electrons per pixel.
    rate : float
        Events per cm² of sensor per second (of order 0.02-0.05 at the summit).
    rng : numpy.random.Generator
        Source of randomness.
    duration : float
        Time the sensor integrates, s (the dark time).
    pixel_size_um, thickness_um : float
        Pixel pitch and depleted thickness of the sensor, µm.

    Returns
    -------
    CosmicRays
        The tracks, with the charge that landed on the image.
    """
    rows, cols = image.shape
    area_cm2 = rows * cols * (pixel_size_um * 1e-4) ** 2
    count = rng.poisson(rate * area_cm2 * duration)
    # cos²θ on the upper hemisphere: cos θ = u^(1/3) for u uniform; cut grazing tracks.
    cos_theta = np.maximum(rng.uniform(0.0, 1.0, count) ** (1.0 / 3.0), 0.05)
    length = thickness_um * np.sqrt(1.0 - cos_theta**2) / cos_theta / pixel_size_um
    azimuth = rng.uniform(0.0, 2.0 * np.pi, count)
    xc, yc = rng.uniform(-0.5, cols - 0.5, count), rng.uniform(-0.5, rows - 0.5, count)
    half_dx, half_dy = 0.5 * length * np.cos(azimuth), 0.5 * length * np.sin(azimuth)
    charge = MIP_ELECTRONS_PER_UM * thickness_um / cos_theta * rng.lognormal(0.0, 0.3, count)
    x0, y0, x1, y1 = xc - half_dx, yc - half_dy, xc + half_dx, yc + half_dy
    px, py, pflux, index = trail_samples(x0, y0, x1, y1, charge, spacing=0.25)
    base_x, base_y = np.floor(px).astype(np.intp), np.floor(py).astype(np.intp)
    frac_x, frac_y = px - base_x, py - base_y
    landed = np.zeros(count)
    for a in (0, 1):
        for b in (0, 1):
            weight = pflux * (frac_x if a else 1 - frac_x) * (frac_y if b else 1 - frac_y)
            cx, cy = base_x + a, base_y + b
            inside = (cx >= 0) & (cx < cols) & (cy >= 0) & (cy < rows)
            np.add.at(image, (cy[inside], cx[inside]), weight[inside].astype(image.dtype))
            landed += np.bincount(index[inside], weights=weight[inside], minlength=count)
    return CosmicRays(x0, y0, x1, y1, landed)
