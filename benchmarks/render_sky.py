"""How long the sky simulator takes to render one full-size CCD exposure, on one core.

Run as ``python -m dmstream.benchmarks.render_sky``.  Prints the unit of speed
of ARCHITECTURE.md (one ``scipy.fft.rfft2`` of a 4096 x 4096 float32 array,
``workers=1``), then the median time of
:func:`~dmstream.streams.sky.render_exposure` for an ITL detector (4000 x 4072)
at the default density and in a dense field (each exposure with its own PSF,
so the stamp tables are rebuilt every time), in seconds and in rfft2 units.
"""

import os

# Pin BLAS/OpenMP pools to one core before numpy loads them.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import statistics  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import scipy.fft  # noqa: E402

from dmstream.payloads.camera import detector_wcs, get_detector  # noqa: E402
from dmstream.streams.sky import Observation, Sky, SkyConfig, render_exposure  # noqa: E402

REPEATS = 5
NIGHT = (61000.0, 61000.4)
BORESIGHT = (150.0, 2.0)
#: A crowded field: ~20x the default stars, 10x the galaxies.
DENSE = {"star_density": 40_000.0, "galaxy_density": 10_000.0}


def _times(action: Callable[[], object], repeats: int = REPEATS) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return times


def rfft2_unit() -> float:
    """Best of a few single-core rfft2 of a 4096 x 4096 float32 array, s."""
    image = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    return min(_times(lambda: scipy.fft.rfft2(image, workers=1)))


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
    seconds = statistics.median(_times(render))
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
