"""How long the camera simulation takes for one full CCD, on one core.

Run as ``python -m dmstream.benchmarks.simulate_ccd``.  Prints the unit of
speed of ARCHITECTURE.md (one ``scipy.fft.rfft2`` of a 4096 x 4096 float32
array, ``workers=1``), then for an ITL and an e2v detector the median time of
:func:`~dmstream.streams.camera.simulate_raw` with a sky of ~2000 e-/px and of
writing the raw FITS file, in seconds and in rfft2 units.
"""

import statistics
import tempfile
from pathlib import Path

import numpy as np

from dmstream.benchmarks.timing import rfft2_unit, times
from dmstream.payloads.camera import get_detector
from dmstream.streams.camera import DetectorElectronics, simulate_raw
from dmstream.streams.rawfits import write_raw

REPEATS = 5
HEADER = {
    "OBSID": "MC_O_20261125_000001", "DAYOBS": 20261125, "SEQNUM": 1, "GROUPID": "2026-11-25T03:00:00.000",
    "IMGTYPE": "OBJECT", "EXPTIME": 30.0, "DARKTIME": 30.9, "MJD-OBS": 61004.125, "FILTBAND": "r",
    "RA": 342.0, "DEC": -54.0, "ROTPA": 0.0,
}




def bench_detector(name: str, scratch: Path, unit: float) -> None:
    """Time simulate_raw and write_raw for one detector and print the figures."""
    detector = get_detector(name)
    electronics = DetectorElectronics.draw(detector, seed=1)
    rng = np.random.default_rng(2)
    sky = rng.uniform(1000.0, 3000.0)
    signal = np.full(detector.shape, sky, dtype=np.float32)
    amps = simulate_raw(signal, 30.0, 30.9, electronics, rng)
    simulate = statistics.median(times(lambda: simulate_raw(signal, 30.0, 30.9, electronics, rng)))
    path = scratch / f"{name}.fits"
    write = statistics.median(times(lambda: write_raw(path, HEADER, amps, detector)))
    write_rice = statistics.median(times(lambda: write_raw(path, HEADER, amps, detector, compress=True),
                                          repeats=3))
    rows, cols = detector.readout.raw_shape
    print(f"{detector.vendor:3s} {name} ({16 * rows * cols / 1e6:.1f} Mpx raw, sky {sky:.0f} e-/px):"
          f" simulate_raw {simulate:.3f} s = {simulate / unit:.1f} units;"
          f" write FITS {write:.3f} s = {write / unit:.1f} units;"
          f" write RICE_1 {write_rice:.3f} s = {write_rice / unit:.1f} units")


def main() -> None:
    unit = rfft2_unit()
    print(f"reference: scipy.fft.rfft2 4096x4096 float32, workers=1: {unit:.3f} s (= 1 unit)")
    with tempfile.TemporaryDirectory() as scratch:
        for name in ("R01_S01", "R22_S11"):
            bench_detector(name, Path(scratch), unit)


if __name__ == "__main__":
    main()
