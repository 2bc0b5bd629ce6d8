"""How long single-CCD calibration takes on a full ITL CCD at the default sky density, on one core.

Run as ``python -m dmstream.benchmarks.calibrate``.  A "perfect ISR" image (the
simulator's expected electrons plus Gaussian noise of variance signal + read
noise²) is calibrated from a WCS 2″ and 0.3° off; each step is timed on its own
(median of repeats, after one warm-up run), then the whole
:meth:`~dmstream.payloads.calibrate.Calibrate.run`, in seconds and in rfft2
units, with how far the results are from the truth.
"""

import statistics

import numpy as np

from dmstream.benchmarks.timing import rfft2_unit, times
from dmstream.payloads import photometry
from dmstream.payloads.astrometry import gnomonic, reference_positions, solve_astrometry
from dmstream.payloads.background import subtract_background
from dmstream.payloads.calibrate import (
    FLAG_BAD_CENTRE,
    FLAG_EDGE,
    FLAG_MOMENTS,
    SIGMA_TO_FWHM,
    UNUSABLE,
    Calibrate,
    aperture_correction,
    detect_sources,
    fit_zero_point,
    select_psf_stars,
)
from dmstream.payloads.camera import detector_wcs, get_detector
from dmstream.payloads.image import CcdImage
from dmstream.payloads.masks import empty_mask
from dmstream.payloads.psf import fit_psf
from dmstream.streams.sky import Observation, Sky, SkyConfig, render_exposure

REPEATS = 5
BORESIGHT = (150.0, 2.0)
READ_NOISE = 6.0


def _inputs() -> tuple[CcdImage, object, object, float, Observation, object]:
    detector = get_detector("R01_S00")
    sky = Sky.generate([BORESIGHT], SkyConfig(seed=1), mjd_range=(61000.0, 61000.4))
    wcs = detector_wcs(detector, *BORESIGHT, 0.0)
    observation = Observation(band="r", mjd_start=61000.2, exptime=30.0, airmass=1.2, fwhm_geom=0.8,
                              ra=BORESIGHT[0], dec=BORESIGHT[1])
    rng = np.random.default_rng(1)
    expected, truth = render_exposure(sky, observation, wcs, detector.shape, rng)
    variance = (expected + READ_NOISE**2).astype(np.float32)
    noise = rng.standard_normal(expected.shape, dtype=np.float32) * np.sqrt(variance)
    image = (expected + noise).astype(np.float32)
    ccd = CcdImage(image, variance, empty_mask(detector.shape), band="r", exptime=30.0)
    # The header WCS off by 2″ and turned by 0.3° about the detector centre, tangent point kept.
    rows, cols = detector.shape
    centre = np.array([(cols - 1) / 2, (rows - 1) / 2])
    ra, dec = (float(v) for v in wcs.pixel_to_world_values(*centre))
    angle = np.radians(0.3)
    approx = wcs.deepcopy()
    approx.wcs.cd = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ wcs.wcs.cd
    target = gnomonic(ra + 1.6 / 3600 / np.cos(np.radians(dec)), dec - 1.2 / 3600, *wcs.wcs.crval)
    approx.wcs.crpix = centre + 1.0 - np.linalg.solve(approx.wcs.cd, target)
    approx.wcs.set()
    mid = observation.mjd_start + observation.exptime / 2 / 86400
    return ccd, approx, sky.reference_catalog(), mid, observation, truth


def main() -> None:
    unit = rfft2_unit()
    print(f"unit: scipy.fft.rfft2 of 4096x4096 float32, workers=1: {unit:.4f} s")
    ccd, approx, refcat, mid, observation, truth = _inputs()
    task = Calibrate()
    config = task.config
    result = task.run(ccd, approx, refcat, mid)  # warm-up: first touches of the big arrays

    unusable = (ccd.mask & np.uint32(UNUSABLE)) != 0
    image, background = subtract_background(ccd.image, ccd.mask, config.background)
    sources, _ = detect_sources(image, ccd.variance, ccd.mask, background.noise, config.detection)
    rows, locus = select_psf_stars(sources, config.star_size_tolerance, config.detection.stamp_half + 5.0)
    ref_ra, ref_dec = reference_positions(refcat, mid)
    ref_mag = refcat["r"].to_numpy().astype(float)
    usable = np.flatnonzero((sources["flags"] & (FLAG_EDGE | FLAG_MOMENTS | FLAG_BAD_CENTRE)) == 0)
    solution = result.astrometry
    matched = usable[solution.detection_index]

    def psf() -> object:
        return fit_psf(image, ccd.variance, unusable, sources["x"][rows], sources["y"][rows],
                       sources["snr"][rows], SIGMA_TO_FWHM * locus, config.psf)

    def astrometry() -> object:
        return solve_astrometry(sources["x"][usable], sources["y"][usable], sources["flux"][usable],
                                np.hypot(sources["x_err"][usable], sources["y_err"][usable]), approx,
                                ref_ra, ref_dec, ref_mag, ccd.shape, config.astrometry)

    def zero_point() -> object:
        apcorr, _ = aperture_correction(image, ccd.variance, unusable, sources["x"][rows], sources["y"][rows],
                                        sources["flux"][rows], config.detection.aperture_radius,
                                        config.photometry.large_radius)
        return fit_zero_point(sources["flux"][matched] * apcorr, sources["flux_err"][matched] * apcorr,
                              ref_mag[solution.reference_index])

    steps = {
        "background": lambda: subtract_background(ccd.image, ccd.mask, config.background),
        "detect+measure": lambda: detect_sources(image, ccd.variance, ccd.mask, background.noise,
                                                 config.detection),
        "psf": psf,
        "astrometry": astrometry,
        "zero point": zero_point,
        "calibrate.run": lambda: task.run(ccd, approx, refcat, mid),
    }
    print(f"ITL CCD {ccd.shape[0]}x{ccd.shape[1]}, default density: {sources['x'].size} detections, "
          f"{result.quality.psf_stars} PSF stars, {result.quality.astrometry_matches} matches")
    for name, action in steps.items():
        seconds = statistics.median(times(action, REPEATS))
        print(f"{name:<16} {seconds:6.3f} s  {seconds / unit:6.1f} rfft2")

    q = result.quality
    truth_zp = photometry.exposure_zero_point(observation.band, observation.exptime, observation.airmass,
                                              observation.transparency)
    kind = np.asarray(truth["kind"].to_pylist())
    stars = kind == "star"
    x, y = truth["x"].to_numpy()[stars], truth["y"].to_numpy()[stars]
    ra, dec = result.image.wcs.pixel_to_world_values(x, y)
    d_ra = (ra - truth["ra"].to_numpy()[stars]) * np.cos(np.radians(dec)) * 3.6e6
    d_dec = (dec - truth["dec"].to_numpy()[stars]) * 3.6e6
    wcs_error = np.sqrt(np.mean(d_ra**2 + d_dec**2))
    print(f"PSF FWHM {q.psf_fwhm:.3f}″ ({q.psf_fwhm_min:.3f}-{q.psf_fwhm_max:.3f}), e1 {q.psf_e1:+.3f} "
          f"e2 {q.psf_e2:+.3f}; ZP {q.zero_point:.4f} ± {q.zero_point_err:.4f} (truth {truth_zp:.4f}); "
          f"WCS vs truth {wcs_error:.1f} mas, scatter {q.astrometric_scatter:.1f} mas; "
          f"sky {q.sky_level:.0f} e-/px = {q.sky_mag:.2f} mag/arcsec²; t_eff {q.effective_time:.1f} s")


if __name__ == "__main__":
    main()
