"""How long ISR and snap combination take for one full CCD on one core, and how much memory they need.

Run as ``python -m dmstream.benchmarks.isr``.  For an ITL and an e2v detector,
simulates a 30 s exposure (sky ~1000 e-/px, stars, two saturated stars, cosmic
rays), builds the calibrations from the electronics' truth (ISR's cost does
not depend on where they come from) and prints the best of ``REPEATS`` timings
of each step of :class:`~dmstream.payloads.isr.Isr` and of the whole, in
seconds and rfft2 units (the best, like the unit itself: the machine is shared
and the best run is the least disturbed one).

Each detector gets one untimed run first, and the runs keep only their
timings.  On this virtual machine the first touch of memory the process has
never used costs 1-4 ms per MiB (0.3 ms for memory it used before), which
would be charged to whichever detector comes first: keeping five results of
the first detector alive made the ITL detector, measured first, look twice as
slow as the e2v one (in CPU time the two are within a few per cent).

Memory: the peak of what ISR allocates (tracemalloc, the three returned
planes included) and the growth of the peak resident set over the call
(``VmHWM`` reset before it).

Snaps: two 15 s snaps of the e2v detector (seeing 0.70″ then 0.75″, 3000
stars, cosmic rays at the summit rate) through ISR without cosmic-ray repair,
then :func:`dmstream.payloads.snaps.run`: its time, memory and the fraction of
the injected cosmic-ray pixels above 5 sigma it found.
"""

import tracemalloc
from dataclasses import replace

import numpy as np

from dmstream.benchmarks.timing import peak_memory_mib, reset_peak_memory, rfft2_unit, times
from dmstream.payloads import snaps
from dmstream.payloads.camera import get_detector
from dmstream.payloads.isr import Isr, IsrCalibrations, IsrConfig
from dmstream.payloads.masks import MaskPlane
from dmstream.payloads.render import Psf, add_cosmic_rays, draw_point_sources
from dmstream.streams.camera import DetectorElectronics, simulate_raw, truth_calibrations

REPEATS = 5


def _scene(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    signal = np.full(shape, 1000.0, dtype=np.float32)
    yy, xx = np.mgrid[-12:13, -12:13]
    profile = np.exp(-(yy**2 + xx**2) / (2 * 1.7**2)) / (2 * np.pi * 1.7**2)
    for flux in np.concatenate([10 ** rng.uniform(3.5, 5.5, 300), [3e7, 3e7]]):
        y, x = rng.integers(20, shape[0] - 20), rng.integers(20, shape[1] - 20)
        signal[y - 12:y + 13, x - 12:x + 13] += (flux * profile).astype(np.float32)
    for _ in range(30):
        y, x = rng.integers(5, shape[0] - 5), rng.integers(5, shape[1] - 5)
        signal[y, x:x + 3] += 4000.0
    return signal


def _calibrations(electronics: DetectorElectronics) -> IsrCalibrations:
    """The truth, with a flat bias: the benchmark times ISR, not the calibration products."""
    zeros = np.zeros(electronics.detector.shape, dtype=np.float32)
    return replace(truth_calibrations(electronics), bias=zeros, bias_variance=zeros + 1.0,
                   dark_variance=zeros + 1e-4)


def bench_detector(name: str, unit: float) -> None:
    """Time every step of ISR on one detector, measure its memory and print the figures."""
    detector = get_detector(name)
    electronics = DetectorElectronics.draw(detector, seed=1)
    rng = np.random.default_rng(2)
    raw = simulate_raw(_scene(detector.shape, rng), 30.0, 30.0, electronics, rng)
    calibs = _calibrations(electronics)
    isr = Isr()
    first = isr.run(raw, detector, calibs, 30.0, 30.0)
    n_saturated, n_cosmic_rays = first.n_saturated, first.n_cosmic_rays
    del first
    # Only the timings are kept, so that every run reuses the memory the previous one freed.
    timings = [isr.run(raw, detector, calibs, 30.0, 30.0).timings for _ in range(REPEATS)]

    reset_peak_memory()
    resident = peak_memory_mib()
    tracemalloc.start()
    result = isr.run(raw, detector, calibs, 30.0, 30.0)
    _, allocated = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    grown = peak_memory_mib() - resident
    exposure = result.exposure
    planes = (exposure.image.nbytes + exposure.variance.nbytes + exposure.mask.nbytes) / 2**20
    del result, exposure

    whole = min(sum(run.values()) for run in timings)
    print(f"{detector.vendor:3s} {name} {detector.shape[0]}x{detector.shape[1]}: ISR {whole:.3f} s ="
          f" {whole / unit:.1f} units; {n_saturated} SAT px, {n_cosmic_rays} CR px")
    print(f"    memory: ISR allocates at most {allocated / 2**20:.0f} MiB (of which {planes:.0f} MiB are the"
          f" returned image, variance and mask); peak RSS grows by {grown:.0f} MiB")
    for step in timings[0]:
        seconds = min(run[step] for run in timings)
        print(f"    {step:15s} {seconds:.3f} s = {seconds / unit:5.2f} units")


def bench_snaps(name: str, unit: float) -> None:
    """Time ISR of two snaps and their combination; print memory and cosmic-ray recovery."""
    detector = get_detector(name)
    electronics = DetectorElectronics.draw(detector, seed=1)
    calibs = _calibrations(electronics)
    rng = np.random.default_rng(3)
    stars = (rng.uniform(0, detector.shape[1], 3000), rng.uniform(0, detector.shape[0], 3000),
             10 ** rng.uniform(3.0, 6.5, 3000))
    isr = Isr(IsrConfig(do_cosmic_rays=False))
    exposures, cosmic_rays, isr_seconds = [], [], []
    for fwhm in (0.70, 0.75):
        signal = np.full(detector.shape, 500.0, dtype=np.float32)
        draw_point_sources(signal, *stars, Psf(fwhm=fwhm))
        charge = np.zeros(detector.shape, dtype=np.float32)
        add_cosmic_rays(charge, 0.03, rng, duration=17.0)
        raw = simulate_raw(signal + charge, 15.0, 17.0, electronics, rng)
        del signal
        result = isr.run(raw, detector, calibs, 15.0, 17.0)
        isr_seconds.append(sum(result.timings.values()))
        exposures.append(result.exposure)
        cosmic_rays.append(charge * electronics.flat)

    seconds = min(times(lambda: snaps.run(exposures), repeats=REPEATS))
    tracemalloc.start()
    combined = snaps.run(exposures)
    _, allocated = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    flagged = (combined.exposure.mask & MaskPlane.CR) != 0
    found = [flagged[charge > 5 * np.sqrt(2 * other.variance)].mean()
             for charge, other in zip(cosmic_rays, exposures[::-1], strict=True)]
    print(f"{detector.vendor:3s} {name} two 15 s snaps: ISR without cosmic rays {min(isr_seconds):.3f} s ="
          f" {min(isr_seconds) / unit:.1f} units per snap; combination {seconds:.3f} s ="
          f" {seconds / unit:.2f} units, allocates at most {allocated / 2**20:.0f} MiB;"
          f" cosmic-ray pixels above 5 sigma found: {found[0]:.1%} and {found[1]:.1%};"
          f" {combined.n_cosmic_rays} px repaired, {combined.n_kept_changes} changes kept")


def main() -> None:
    unit = rfft2_unit()
    print(f"reference: scipy.fft.rfft2 4096x4096 float32, workers=1: {unit:.3f} s (= 1 unit)")
    for name in ("R01_S01", "R22_S11"):
        bench_detector(name, unit)
    bench_snaps("R22_S11", unit)


if __name__ == "__main__":
    main()
