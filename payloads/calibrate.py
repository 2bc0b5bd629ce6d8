"""Calibrate one CCD: background, bright-star catalogue, PSF, WCS, zero point and image quality.

The steps follow Rubin's ``calibrateImage`` (pipe_tasks) in spirit, on numpy
arrays:

1. subtract a mesh background (:mod:`~dmstream.payloads.background`);
2. detect bright sources with ``sep`` at a high threshold (deblended, with a
   segmentation map that sets the DETECTED mask plane) and measure them on
   stamps: Gaussian adaptive centroids with errors, second moments,
   aperture fluxes with errors and flags;
3. select isolated, unsaturated, star-sized sources and fit a spatially
   varying pixel PSF (:mod:`~dmstream.payloads.psf`);
4. match to the reference catalogue at the exposure's epoch and fit a
   TAN-SIP WCS (:mod:`~dmstream.payloads.astrometry`);
5. correct the calibration aperture to a large one with the PSF stars and fit
   the zero point against the band's reference magnitudes;
6. summarise the image quality (PSF size and shape across the CCD, zero
   point, sky, astrometric scatter, effective exposure time).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import sep
from astropy.wcs import WCS
from numpy.typing import NDArray
from scipy.spatial import cKDTree

from dmstream.payloads import photometry
from dmstream.payloads.astrometry import (
    AstrometryConfig,
    AstrometryResult,
    reference_positions,
    solve_astrometry,
)
from dmstream.payloads.background import Background, BackgroundConfig, subtract_background
from dmstream.payloads.conditions import DARK_SKY_MAG
from dmstream.payloads.image import CcdImage
from dmstream.payloads.masks import MaskPlane
from dmstream.payloads.psf import SIGMA_TO_FWHM, PixelPsf, PsfConfig, adaptive_moments, cutouts, fit_psf

#: Mask planes that make a pixel unusable for measurement.
UNUSABLE = MaskPlane.BAD | MaskPlane.SAT | MaskPlane.CR | MaskPlane.NO_DATA
#: Fiducial PSF FWHM of the effective-time scale, arcsec (the SRD's design seeing at zenith).
FIDUCIAL_FWHM = 0.7

# Bits of the catalogue's ``flags`` column.
FLAG_EDGE = 1  #: stamp runs off the detector
FLAG_SATURATED = 2  #: a SAT pixel within the stamp
FLAG_BAD_CENTRE = 4  #: a BAD, CR or NO_DATA pixel near the centre
FLAG_BLENDED = 8  #: sep deblended it from a neighbour, or its aperture overlaps another source
FLAG_MOMENTS = 16  #: adaptive moments did not converge


@dataclass(frozen=True)
class DetectionConfig:
    """How bright sources are detected and measured.

    Attributes
    ----------
    threshold : float
        Detection threshold, sky sigmas per pixel (after sep's 3x3 filter); 10
        finds every point source of flux S/N ≳ 50 at LSST sampling.
    min_area : int
        Fewest pixels above threshold.
    deblend_thresholds : int
    deblend_contrast : float
        sep's deblending settings.
    stamp_half : int
        Half-width of the measurement stamps, pixels.
    aperture_radius : float
        Radius of the calibration aperture, pixels (12 px = 2.4″ as Rubin's
        ``base_CircularApertureFlux_12_0``).
    """

    threshold: float = 7.0
    min_area: int = 5
    deblend_thresholds: int = 32
    deblend_contrast: float = 0.005
    stamp_half: int = 10
    aperture_radius: float = 12.0


@dataclass(frozen=True)
class PhotometryConfig:
    """How the zero point is fitted.

    Attributes
    ----------
    large_radius : float
        Aperture the calibration flux is corrected to, pixels (6″ holds
        ≈99.7 % of a 0.8″ Kolmogorov PSF).
    min_snr : float
        Faintest matched star used, S/N of its calibration flux.
    clip : float
        Stars further than this many robust sigmas from the median are dropped.
    """

    large_radius: float = 30.0
    min_snr: float = 20.0
    clip: float = 3.0


@dataclass(frozen=True)
class CalibrateConfig:
    """Configuration of :class:`Calibrate`."""

    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    psf: PsfConfig = field(default_factory=PsfConfig)
    astrometry: AstrometryConfig = field(default_factory=AstrometryConfig)
    photometry: PhotometryConfig = field(default_factory=PhotometryConfig)
    #: Largest fractional departure of a PSF candidate's size from the stellar locus.
    star_size_tolerance: float = 0.15
    #: Points per axis of the grid on which the PSF is summarised.
    quality_grid: int = 5


@dataclass(frozen=True)
class ImageQuality:
    """Image-quality summary of one calibrated CCD.

    Attributes
    ----------
    psf_fwhm : float
        Median PSF FWHM over the CCD, arcsec (pixel response included).
    psf_fwhm_min, psf_fwhm_max : float
        Its extremes over a grid across the CCD, arcsec.
    psf_e1, psf_e2 : float
        Median PSF ellipticity components, (a² - b²)/(a² + b²) along x and x = y.
    psf_e : float
        Median |e| over the grid.
    psf_stars : int
        Stars in the PSF model.
    zero_point : float
        AB mag of 1 e⁻ in the whole exposure.
    zero_point_err : float
        Its 1-sigma error, mag.
    zero_point_stars : int
    aperture_correction : float
        Large-aperture over calibration-aperture flux.
    sky_level : float
        Median sky, e⁻ per pixel.
    sky_mag : float
        Sky brightness, AB mag/arcsec², calibrated with ``zero_point`` (so
        corrected for extinction and clouds like the stars).
    sky_noise : float
        Median sky rms, e⁻ per pixel.
    astrometric_scatter : float
        RMS distance between matched stars and references, mas.
    astrometry_matches : int
    effective_time : float
        Rubin's t_eff, s: ``exptime`` · (FWHM_ref / FWHM)² · 10^(0.8 (ZP - ZP_ref)) · (sky_ref / sky)
        with FWHM_ref = 0.7″, ZP_ref the airmass-1 clear-sky zero point of the
        band for ``exptime`` and sky_ref the band's dark zenith sky, e⁻/pixel.
    effective_time_psf_scale, effective_time_zero_point_scale, effective_time_sky_scale : float
        The three factors of ``effective_time``.
    """

    psf_fwhm: float
    psf_fwhm_min: float
    psf_fwhm_max: float
    psf_e1: float
    psf_e2: float
    psf_e: float
    psf_stars: int
    zero_point: float
    zero_point_err: float
    zero_point_stars: int
    aperture_correction: float
    sky_level: float
    sky_mag: float
    sky_noise: float
    astrometric_scatter: float
    astrometry_matches: int
    effective_time: float
    effective_time_psf_scale: float
    effective_time_zero_point_scale: float
    effective_time_sky_scale: float


@dataclass(frozen=True)
class CalibrateResult:
    """What :meth:`Calibrate.run` returns.

    Attributes
    ----------
    image : CcdImage
        Background-subtracted, DETECTED plane set, with ``wcs``, ``psf`` and ``zero_point``.
    background : Background
        The subtracted model and its rms.
    catalog : pyarrow.Table
        The bright sources (see :func:`catalog_table`).
    astrometry : AstrometryResult
    quality : ImageQuality
    """

    image: CcdImage
    background: Background
    catalog: pa.Table
    astrometry: AstrometryResult
    quality: ImageQuality


# --- detection and measurement ------------------------------------------------------------------------------

def detect_sources(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, noise: float,
                   config: DetectionConfig | None = None) -> tuple[dict[str, NDArray], NDArray[np.int32]]:
    """Detect and measure bright sources of a background-subtracted image.

    Parameters
    ----------
    image : numpy.ndarray
        float32, background-subtracted, e⁻ per pixel.
    variance : numpy.ndarray
        Pixel variance, e⁻².
    mask : numpy.ndarray
        uint32 mask planes.
    noise : float
        Sky rms, e⁻ per pixel (sets the threshold).
    config : DetectionConfig, optional

    Returns
    -------
    sources : dict of numpy.ndarray
        Columns ``x``, ``y`` (adaptive centroids, 0-based pixels), ``x_err``,
        ``y_err`` (pixels), ``ixx``, ``iyy``, ``ixy`` (pixels²), ``flux``,
        ``flux_err`` (calibration aperture, e⁻), ``snr``, ``peak`` (e⁻),
        ``npix``, ``flags`` (``FLAG_*`` bits).
    segmentation : numpy.ndarray
        int32 map of the pixels of each source (1-based row, 0 for sky).
    """
    config = config or DetectionConfig()
    unusable = (mask & np.uint32(UNUSABLE)) != 0
    objects, segmentation = sep.extract(image, config.threshold, err=noise, mask=unusable,
                                        minarea=config.min_area, deblend_nthresh=config.deblend_thresholds,
                                        deblend_cont=config.deblend_contrast, segmentation_map=True)
    half = config.stamp_half
    xi, yi = np.rint(objects["x"]).astype(np.intp), np.rint(objects["y"]).astype(np.intp)
    stamps, inside = cutouts(image, xi, yi, half)
    variances, _ = cutouts(variance, xi, yi, half, fill=np.inf)
    bits, _ = cutouts(mask, xi, yi, half)
    own, _ = cutouts(segmentation, xi, yi, half)
    # Neighbours' pixels would drag the moments: zero them (their own segments, not the sky).
    ids = np.arange(1, len(objects) + 1, dtype=np.int32)[:, None, None]
    foreign = (own != 0) & (own != ids)
    moments = adaptive_moments(np.where(foreign, 0.0, stamps), variances)
    x, y = xi + moments.dx, yi + moments.dy
    flux, flux_err, aperture_flags = sep.sum_circle(image, x, y, config.aperture_radius, var=variance,
                                                    mask=unusable, segmap=segmentation, seg_id=ids.ravel())
    centre = slice(half - 2, half + 3)
    flags = np.zeros(len(objects), dtype=np.int32)
    flags |= np.where(inside & ((aperture_flags & sep.APER_TRUNC) == 0), 0, FLAG_EDGE)
    flags |= np.where(((bits & np.uint32(MaskPlane.SAT)) != 0).any(axis=(1, 2)), FLAG_SATURATED, 0)
    bad_centre = ((bits[:, centre, centre] & np.uint32(UNUSABLE)) != 0).any(axis=(1, 2))
    flags |= np.where(bad_centre, FLAG_BAD_CENTRE, 0)
    flags |= np.where(((objects["flag"] & sep.OBJ_MERGED) != 0) | foreign.any(axis=(1, 2)), FLAG_BLENDED, 0)
    flags |= np.where(moments.converged, 0, FLAG_MOMENTS)
    snr = np.divide(flux, flux_err, out=np.zeros_like(flux), where=flux_err > 0)
    sources = {"x": x, "y": y, "x_err": moments.dx_err, "y_err": moments.dy_err, "ixx": moments.ixx,
               "iyy": moments.iyy, "ixy": moments.ixy, "flux": flux, "flux_err": flux_err, "snr": snr,
               "peak": objects["peak"].astype(float), "npix": objects["npix"].astype(np.int32),
               "flags": flags}
    return sources, segmentation


def select_psf_stars(sources: dict[str, NDArray], size_tolerance: float, isolation: float
                     ) -> tuple[NDArray[np.intp], float]:
    """Rows of isolated, clean, star-sized sources, and the stellar locus's moment sigma (pixels).

    The stellar locus is the median determinant radius of the clean sources
    in the most populated bin of size: at the bright end stars outnumber
    galaxies, and galaxies are larger.
    """
    clean = (sources["flags"] == 0) & (sources["snr"] > 0)
    sigma = np.maximum(sources["ixx"] * sources["iyy"] - sources["ixy"] ** 2, 0.0) ** 0.25
    candidates = np.flatnonzero(clean)
    if candidates.size == 0:
        return candidates, float("nan")
    log_sigma = np.log(sigma[candidates])
    histogram, edges = np.histogram(log_sigma, bins=np.arange(log_sigma.min(), log_sigma.max() + 0.1, 0.05))
    mode = np.argmax(histogram)
    in_peak = (log_sigma >= edges[max(mode - 1, 0)]) & (log_sigma <= edges[min(mode + 2, edges.size - 1)])
    locus = float(np.median(sigma[candidates][in_peak]))
    tree = cKDTree(np.stack([sources["x"], sources["y"]], axis=1))
    neighbours = tree.query(np.stack([sources["x"], sources["y"]], axis=1), k=2)[0][:, 1] \
        if sources["x"].size > 1 else np.full(sources["x"].size, np.inf)
    star_like = np.abs(sigma / locus - 1.0) <= size_tolerance
    chosen = np.flatnonzero(clean & star_like & (neighbours > isolation))
    return chosen, locus


def aperture_correction(image: np.ndarray, variance: np.ndarray, unusable: np.ndarray, x: NDArray,
                        y: NDArray, small_flux: NDArray, small_radius: float, large_radius: float,
                        clip: float = 3.0) -> tuple[float, float]:
    """Ratio of large-aperture to calibration-aperture flux of stars, and its error.

    A weighted mean of the ratios after clipping (neighbours inside the large
    aperture only ever raise it).
    """
    large, large_err, _ = sep.sum_circle(image, x, y, large_radius, var=variance, mask=unusable)
    ratio = large / small_flux
    # The small aperture's noise is mostly shared with the large one: the annulus carries the error.
    ring_var = np.maximum(large_err**2 - sep.sum_circle(image, x, y, small_radius, var=variance,
                                                        mask=unusable)[1] ** 2, 0.0)
    err = np.sqrt(ring_var) / small_flux
    good = np.isfinite(ratio) & (small_flux > 0) & (err > 0)
    if not good.any():
        return 1.0, float("inf")
    ratio, err = ratio[good], err[good]
    keep = np.ones(ratio.size, dtype=bool)
    for _ in range(3):
        median = np.median(ratio[keep])
        spread = 1.4826 * np.median(np.abs(ratio[keep] - median))
        keep = np.abs(ratio - median) <= clip * np.maximum(np.hypot(spread, err), 1e-6)
    weight = 1.0 / err[keep] ** 2
    return float(np.sum(weight * ratio[keep]) / weight.sum()), float(1.0 / np.sqrt(weight.sum()))


def fit_zero_point(flux: NDArray, flux_err: NDArray, ref_mag: NDArray, clip: float = 3.0
                   ) -> tuple[float, float, NDArray[np.bool_]]:
    """Zero point (mag of 1 flux unit) from fluxes and reference magnitudes: clipped weighted mean.

    Returns
    -------
    zero_point, error : float
        mag; the error grows by the reduced chi when the stars scatter more than their errors.
    used : numpy.ndarray of bool
    """
    zp = ref_mag + 2.5 * np.log10(flux)
    err = np.hypot(1.0857 * flux_err / flux, 0.002)  # a floor for the reference catalogue's own errors
    keep = np.isfinite(zp)
    for _ in range(5):
        median = np.median(zp[keep])
        spread = 1.4826 * np.median(np.abs(zp[keep] - median))
        new_keep = np.isfinite(zp) & (np.abs(zp - median) <= clip * np.hypot(spread, err))
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    weight = 1.0 / err[keep] ** 2
    mean = float(np.sum(weight * zp[keep]) / weight.sum())
    chi2 = float(np.sum(weight * (zp[keep] - mean) ** 2)) / max(int(keep.sum()) - 1, 1)
    return mean, float(np.sqrt(max(chi2, 1.0) / weight.sum())), keep


def effective_time(band: str, exptime: float, fwhm: float, zero_point: float, sky_level: float,
                   pixel_scale: float = photometry.PIXEL_SCALE) -> tuple[float, float, float, float]:
    """Rubin's effective exposure time and its PSF, zero-point and sky factors.

    Parameters
    ----------
    band : str
    exptime : float
        s.
    fwhm : float
        PSF FWHM, arcsec.
    zero_point : float
        Measured zero point of the exposure (mag of 1 e⁻).
    sky_level : float
        Sky, e⁻ per pixel.
    pixel_scale : float
        Arcsec per pixel.

    Returns
    -------
    t_eff, psf_scale, zero_point_scale, sky_scale : float
    """
    reference_zp = photometry.exposure_zero_point(band, exptime)
    reference_sky = float(photometry.sky_electrons_per_pixel(DARK_SKY_MAG[band], band, exptime, pixel_scale))
    psf_scale = (FIDUCIAL_FWHM / fwhm) ** 2
    zp_scale = 10.0 ** (0.8 * (zero_point - reference_zp))
    sky_scale = reference_sky / sky_level if sky_level > 0 else float("nan")
    return exptime * psf_scale * zp_scale * sky_scale, psf_scale, zp_scale, sky_scale


def catalog_table(sources: dict[str, NDArray], wcs: WCS, zero_point: float, apcorr: float,
                  psf_star: NDArray[np.bool_], ref_id: NDArray[np.int64], ref_mag: NDArray) -> pa.Table:
    """The bright-source catalogue as a table with units in the field metadata."""
    ra, dec = wcs.pixel_to_world_values(sources["x"], sources["y"])
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(sources["flux"] > 0, zero_point - 2.5 * np.log10(sources["flux"] * apcorr), np.nan)
        mag_err = 1.0857 * sources["flux_err"] / sources["flux"]
    trace = sources["ixx"] + sources["iyy"]
    columns = [
        ("id", pa.int32(), np.arange(1, sources["x"].size + 1), ""),
        ("x", pa.float64(), sources["x"], "pixel"), ("y", pa.float64(), sources["y"], "pixel"),
        ("x_err", pa.float32(), sources["x_err"], "pixel"),
        ("y_err", pa.float32(), sources["y_err"], "pixel"),
        ("ra", pa.float64(), ra, "deg"), ("dec", pa.float64(), dec, "deg"),
        ("ixx", pa.float32(), sources["ixx"], "pixel2"), ("iyy", pa.float32(), sources["iyy"], "pixel2"),
        ("ixy", pa.float32(), sources["ixy"], "pixel2"),
        ("e1", pa.float32(), (sources["ixx"] - sources["iyy"]) / trace, ""),
        ("e2", pa.float32(), 2 * sources["ixy"] / trace, ""),
        ("ap_flux", pa.float64(), sources["flux"], "electron"),
        ("ap_flux_err", pa.float64(), sources["flux_err"], "electron"),
        ("snr", pa.float32(), sources["snr"], ""),
        ("mag", pa.float32(), mag, "mag"), ("mag_err", pa.float32(), mag_err, "mag"),
        ("peak", pa.float32(), sources["peak"], "electron"), ("npix", pa.int32(), sources["npix"], "pixel"),
        ("flags", pa.int32(), sources["flags"], ""), ("psf_star", pa.bool_(), psf_star, ""),
        ("ref_id", pa.int64(), ref_id, ""), ("ref_mag", pa.float32(), ref_mag, "mag"),
    ]
    fields = [pa.field(name, kind, metadata={"unit": unit} if unit else None)
              for name, kind, _, unit in columns]
    arrays = [pa.array(np.asarray(values), kind) for _, kind, values, _ in columns]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


# --- the task -----------------------------------------------------------------------------------------------

class Calibrate:
    """Single-CCD calibration (background, PSF, astrometry, photometry), as Rubin's calibrateImage."""

    def __init__(self, config: CalibrateConfig | None = None) -> None:
        self.config = config or CalibrateConfig()

    def run(self, ccd_image: CcdImage, approx_wcs: WCS, refcat: pa.Table, epoch_mjd: float
            ) -> CalibrateResult:
        """Calibrate a post-ISR CCD.

        Parameters
        ----------
        ccd_image : CcdImage
            Post-ISR image in e⁻ with its sky, variance (e⁻²) and mask; ``band``
            and ``exptime`` set.
        approx_wcs : astropy.wcs.WCS
            Starting WCS (e.g. the raw header's), good to ~10″ and ~1° at the
            detector centre; its CRVAL is taken as the tangent point of the
            fit (the boresight in a raw header).
        refcat : pyarrow.Table
            Gaia-like reference catalogue: ``source_id``, ``ra``, ``dec``,
            ``pmra``, ``pmdec``, ``ref_epoch`` and a column of AB magnitudes
            named after the band.
        epoch_mjd : float
            Epoch of the exposure (mid-exposure), MJD.

        Returns
        -------
        CalibrateResult
        """
        config = self.config
        band, exptime = ccd_image.band, float(ccd_image.exptime)
        if band not in refcat.column_names:
            raise ValueError(f"reference catalogue has no {band!r} magnitudes")
        mask = ccd_image.mask.copy()
        unusable = (mask & np.uint32(UNUSABLE)) != 0

        image, background = subtract_background(ccd_image.image, mask, config.background)
        sources, segmentation = detect_sources(image, ccd_image.variance, mask, background.noise,
                                               config.detection)
        mask[segmentation > 0] |= np.uint32(MaskPlane.DETECTED)

        isolation = config.detection.stamp_half + 5.0
        candidates, locus_sigma = select_psf_stars(sources, config.star_size_tolerance, isolation)
        fit = fit_psf(image, ccd_image.variance, unusable, sources["x"][candidates], sources["y"][candidates],
                      sources["snr"][candidates], SIGMA_TO_FWHM * locus_sigma, config.psf)
        psf_rows = candidates[fit.used]

        ref_ra, ref_dec = reference_positions(refcat, epoch_mjd)
        ref_mag = refcat[band].to_numpy(zero_copy_only=False).astype(float)
        usable = np.flatnonzero((sources["flags"] & (FLAG_EDGE | FLAG_MOMENTS | FLAG_BAD_CENTRE)) == 0)
        astrometry = solve_astrometry(sources["x"][usable], sources["y"][usable], sources["flux"][usable],
                                      np.hypot(sources["x_err"][usable], sources["y_err"][usable]),
                                      approx_wcs, ref_ra, ref_dec, ref_mag, ccd_image.shape,
                                      config.astrometry)
        matched_rows = usable[astrometry.detection_index]

        large = config.photometry.large_radius
        apcorr, _ = aperture_correction(image, ccd_image.variance, unusable, sources["x"][psf_rows],
                                        sources["y"][psf_rows], sources["flux"][psf_rows],
                                        config.detection.aperture_radius, large)
        good = ((sources["flags"][matched_rows] & ~FLAG_BLENDED) == 0) \
            & (sources["snr"][matched_rows] >= config.photometry.min_snr)
        rows, refs = matched_rows[good], astrometry.reference_index[good]
        if rows.size == 0:
            raise ValueError("no matched stars for the zero point")
        zero_point, zp_err, zp_used = fit_zero_point(sources["flux"][rows] * apcorr,
                                                     sources["flux_err"][rows] * apcorr, ref_mag[refs],
                                                     config.photometry.clip)

        quality = self._quality(fit.psf, astrometry, background, band, exptime, zero_point, zp_err,
                                int(zp_used.sum()), apcorr, psf_rows.size, ccd_image.shape)
        ref_id = np.full(sources["x"].size, -1, dtype=np.int64)
        matched_mag = np.full(sources["x"].size, np.nan)
        ref_id[matched_rows] = refcat["source_id"].to_numpy()[astrometry.reference_index]
        matched_mag[matched_rows] = ref_mag[astrometry.reference_index]
        psf_star = np.zeros(sources["x"].size, dtype=bool)
        psf_star[psf_rows] = True
        catalog = catalog_table(sources, astrometry.wcs, zero_point, apcorr, psf_star, ref_id, matched_mag)
        calibrated = replace(ccd_image, image=image, mask=mask, wcs=astrometry.wcs, psf=fit.psf,
                             zero_point=zero_point, metadata=dict(ccd_image.metadata))
        return CalibrateResult(calibrated, background, catalog, astrometry, quality)

    def _quality(self, psf: PixelPsf, astrometry: AstrometryResult, background: Background, band: str,
                 exptime: float, zero_point: float, zp_err: float, zp_stars: int, apcorr: float,
                 psf_stars: int, shape: tuple[int, int]) -> ImageQuality:
        rows, cols = shape
        n = self.config.quality_grid
        gx, gy = (g.ravel() for g in np.meshgrid(np.linspace(0, cols - 1, n), np.linspace(0, rows - 1, n)))
        pixel_scale = float(np.sqrt(abs(np.linalg.det(astrometry.wcs.pixel_scale_matrix)))) * 3600.0
        fwhm = np.array([psf.fwhm(x, y) for x, y in zip(gx, gy, strict=True)]) * pixel_scale
        e1, e2 = psf.ellipticity(gx, gy)
        sky = background.level
        sky_mag = zero_point - 2.5 * np.log10(sky / pixel_scale**2) if sky > 0 else float("nan")
        median_fwhm = float(np.median(fwhm))
        t_eff, psf_scale, zp_scale, sky_scale = effective_time(band, exptime, median_fwhm, zero_point, sky,
                                                               pixel_scale)
        return ImageQuality(
            psf_fwhm=median_fwhm, psf_fwhm_min=float(fwhm.min()), psf_fwhm_max=float(fwhm.max()),
            psf_e1=float(np.median(e1)), psf_e2=float(np.median(e2)),
            psf_e=float(np.median(np.hypot(e1, e2))),
            psf_stars=psf_stars, zero_point=zero_point, zero_point_err=zp_err, zero_point_stars=zp_stars,
            aperture_correction=apcorr, sky_level=sky, sky_mag=float(sky_mag), sky_noise=background.noise,
            astrometric_scatter=astrometry.scatter_mas, astrometry_matches=astrometry.matched,
            effective_time=t_eff, effective_time_psf_scale=psf_scale,
            effective_time_zero_point_scale=zp_scale, effective_time_sky_scale=sky_scale)
