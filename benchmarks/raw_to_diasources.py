"""One full-size CCD from raw pixels to DiaSources with cutouts, on one core.

Run as ``python -m dmstream.benchmarks.raw_to_diasources``.  The simulator
renders a field of the default sky onto an e2v detector twice: a template
visit (0.7″ seeing) and a science visit (1.0″, with transients), each read
out through the detector electronics.  Untimed set-up: a master bias from
three biases, the rest of the calibrations from the simulator's truth, and
the template visit through ISR and calibration, coadded onto the sky tiles
the CCD overlaps and stored in a scratch Data Backbone.  Timed, on the
science raw: ISR, calibrate, reading the parts of the tiles the CCD covers
and resampling them onto its grid, ZOGY subtraction,
DiaSource detection and measurement, and cutouts of every DiaSource; each in
seconds and in units of one 4096x4096 ``scipy.fft.rfft2``, with the total
and the peak resident memory while the science CCD is processed (the
untimed set-up's memory is returned first; what stays resident, such as the
template and the calibrations, counts, as it would in a worker).  Issue 5 asks for a total of at most 80
units and 3 GB.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
from dataclasses import replace
from functools import partial

import numpy as np

from dmstream.backbone import Backbone
from dmstream.batch.templates import PSF_STAMP, stored_tile, templates_for
from dmstream.benchmarks.timing import peak_memory_mib, reset_peak_memory, rfft2_unit, times
from dmstream.payloads import coadd, cutouts, diasource, subtract
from dmstream.payloads.calibrate import Calibrate
from dmstream.payloads.calibration import MasterBias
from dmstream.payloads.camera import detector_wcs, get_detector
from dmstream.payloads.image import CcdImage
from dmstream.payloads.isr import Isr
from dmstream.payloads.psf import PixelPsf
from dmstream.payloads.tiles import tiles_overlapping
from dmstream.streams.camera import DetectorElectronics, simulate_raw, truth_calibrations
from dmstream.streams.sky import Observation, Sky, SkyConfig, render_exposure

BORESIGHT = (150.0, 2.0)
MJD = 61018.2
REPEATS = 3


def _with_band(exposure: CcdImage) -> CcdImage:
    """ISR knows pixels and times only; the exposure's band comes from its header."""
    return replace(exposure, band="r")


def main() -> None:
    unit = rfft2_unit()
    print(f"unit: scipy.fft.rfft2 of 4096x4096 float32, workers=1: {unit:.4f} s")
    detector = get_detector("R22_S11")
    electronics = DetectorElectronics.draw(detector, seed=1)
    rng = np.random.default_rng(1)
    truth = truth_calibrations(electronics)
    biases = [simulate_raw(None, 0.0, 0.0, electronics, rng) for _ in range(3)]
    bias = MasterBias().run(biases, detector, truth)
    calibs = replace(truth, bias=bias.bias, bias_variance=bias.variance)
    sky = Sky.generate([BORESIGHT], SkyConfig(seed=1, supernova_density=2000.0),
                       mjd_range=(MJD - 30, MJD + 1))
    refcat = sky.reference_catalog()
    # The header's WCS: the boresight TAN the camera writes, which calibrate refines.
    approx_wcs = detector_wcs(detector, *BORESIGHT, 0.0)

    raws = []
    for seeing, mjd in ((0.7, MJD - 20), (1.0, MJD)):
        observation = Observation(band="r", mjd_start=mjd, fwhm_geom=seeing,
                                  ra=BORESIGHT[0], dec=BORESIGHT[1])
        signal, _ = render_exposure(sky, observation, approx_wcs, detector.shape, rng)
        raws.append(simulate_raw(signal, 30.0, 30.0, electronics, rng))
        del signal

    isr, calibrate = Isr(), Calibrate()
    template_raw, science_raw = raws
    template = calibrate.run(_with_band(isr.run(template_raw, detector, calibs, 30.0, 30.0).exposure),
                             approx_wcs, refcat, MJD - 20).image
    # Templates come from sky tiles kept in a Data Backbone, stored as the template builder stores them
    # (with a PixelPsf fitted to the coadd PSF), and read back a section at a time.
    scratch = tempfile.TemporaryDirectory()
    backbone = Backbone(f"sqlite:///{scratch.name}/registry.sqlite3", f"{scratch.name}/files")
    for tile in tiles_overlapping(approx_wcs, detector.shape):
        built = coadd.build_tile([template], tile).coadd
        backbone.put(replace(built, psf=PixelPsf.approximating(built.psf, built.shape, PSF_STAMP)),
                     "template", skytile=tile.id, band="r")
    load = partial(stored_tile, backbone)
    del raws, template_raw, template, biases, sky
    gc.collect()

    results: dict[str, object] = {}
    peaks: list[float] = []

    def step(name: str, action) -> float:
        def run_once() -> None:
            # The previous repeat's result goes first, so the peak is that of one run.
            results.pop(name, None)
            results[name] = action()

        reset_peak_memory()
        seconds = statistics.median(times(run_once, REPEATS))
        peaks.append(peak_memory_mib())
        return seconds

    figures = {"ISR": step("isr", lambda: isr.run(science_raw, detector, calibs, 30.0, 30.0))}
    post_isr = _with_band(results["isr"].exposure)  # type: ignore[attr-defined]
    figures["calibrate"] = step("calibrate", lambda: calibrate.run(post_isr, approx_wcs, refcat, MJD))
    science: CcdImage = results["calibrate"].image  # type: ignore[attr-defined]
    figures["template from tiles"] = step("template", lambda: coadd.template_for(
        templates_for(science.wcs, science.shape, "r", load), science.wcs, science.shape))
    warped = results["template"].template  # type: ignore[attr-defined]
    figures["ZOGY subtraction"] = step("subtract", lambda: subtract.run(science, warped))
    subtraction = results["subtract"]
    figures["detect + measure"] = step("measure", lambda: diasource.run(subtraction, science))
    table = results["measure"].table  # type: ignore[attr-defined]
    x, y = table["x"].to_numpy(), table["y"].to_numpy()
    figures["cutouts (all)"] = step("cutouts", lambda: cutouts.make_cutouts(
        science, subtraction.template, subtraction.difference, x, y))  # type: ignore[attr-defined]
    total = sum(figures.values())
    for name, seconds in figures.items():
        print(f"{name:<20} {seconds:7.3f} s  {seconds / unit:6.1f} rfft2")
    print(f"{'total':<20} {total:7.3f} s  {total / unit:6.1f} rfft2  (issue 5 asks <= 80)")
    quality = results["calibrate"].quality  # type: ignore[attr-defined]
    print(f"DiaSources: {table.num_rows}; PSF FWHM {quality.psf_fwhm:.2f}\", "
          f"astrometric scatter {quality.astrometric_scatter:.1f} mas")
    print(f"peak memory (RSS) while processing the CCD: {max(peaks):.0f} MiB (issue 5 asks <= 3072); "
          "per step: " + ", ".join(f"{name} {peak:.0f}" for name, peak in zip(figures, peaks, strict=True)))


if __name__ == "__main__":
    main()
