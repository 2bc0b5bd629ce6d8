"""How long the sky simulator takes to render one full-size CCD exposure, on one core.

Run as ``python -m dmstream.benchmarks.render_sky``.  Prints the unit of speed
of ARCHITECTURE.md (one ``scipy.fft.rfft2`` of a 4096 x 4096 float32 array,
``workers=1``), then the median time of
:func:`~dmstream.streams.sky.render_exposure` for an ITL detector (4000 x 4072)
at the default density and in a dense field (each exposure with its own PSF,
so the stamp tables are rebuilt every time), in seconds and in rfft2 units.
"""

import statistics
from collections import Counter

import numpy as np
import pyarrow as pa

from dmstream.benchmarks.timing import rfft2_unit, times
from dmstream.payloads.camera import detector_wcs, get_detector
from dmstream.streams.sky import Observation, Sky, SkyConfig, render_exposure

REPEATS = 5
NIGHT = (61000.0, 61000.4)
BORESIGHT = (150.0, 2.0)
#: A crowded field: ~20x the default stars, 10x the galaxies.
DENSE = {"star_density": 40_000.0, "galaxy_density": 10_000.0}




def bench_render(label: str, config: SkyConfig, unit: float) -> None:
    """Time render_exposure on one ITL detector and print the figures."""
    detector = get_detector("R01_S00")
    sky = Sky.generate([BORESIGHT], config, mjd_range=NIGHT)
    wcs = detector_wcs(detector, *BORESIGHT, 0.0)
    rng = np.random.default_rng(1)
    starts = iter(61000.2 + np.arange(REPEATS + 1) * 40.0 / 86400.0)

    def render() -> pa.Table:
        # A new start time per call gives a new PSF (built afresh, as for every real exposure).
        observation = Observation(band="r", mjd_start=next(starts), exptime=30.0, airmass=1.2, fwhm_geom=0.8,
                                  ra=BORESIGHT[0], dec=BORESIGHT[1])
        return render_exposure(sky, observation, wcs, detector.shape, rng)[1]

    truth = render()  # fill the tile cache, as a worker has after its first exposure of a field
    seconds = statistics.median(times(render))
    kinds = Counter(truth["kind"].to_pylist())
    drawn = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
    rows, cols = detector.shape
    print(f"{label:<16} {rows}x{cols}  {seconds:6.3f} s  {seconds / unit:6.1f} rfft2   ({drawn})")


def main() -> None:
    unit = rfft2_unit()
    print(f"unit: scipy.fft.rfft2 of 4096x4096 float32, workers=1: {unit:.4f} s")
    bench_render("default density", SkyConfig(seed=1), unit)
    bench_render("dense field", SkyConfig(seed=1, **DENSE), unit)


if __name__ == "__main__":
    main()
