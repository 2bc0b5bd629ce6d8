"""How long difference imaging of one full-size CCD takes on one core.

Run as ``python -m dmstream.benchmarks.difference`` (the scene comes from
:mod:`dmstream.streams.scenes`).  On a
4000 x 4072 science/template pair (science PSF 1.0″, template 0.7″ on a
rotated, shifted grid, 3000 static stars, 1000 transients) it times: warping
the template onto the science grid, PSF matching and subtraction (ZOGY),
detection and measurement of DiaSources, and cutouts (per source and for the
first 100), in seconds and in rfft2 units, and reports peak memory (RSS).
"""

import resource
import statistics
from collections.abc import Callable

from dmstream.benchmarks.timing import rfft2_unit, times
from dmstream.payloads import cutouts, diasource, subtract, warp
from dmstream.streams.scenes import make_scene

SHAPE = (4000, 4072)
REPEATS = 3


def main() -> None:
    unit = rfft2_unit()
    print(f"unit: scipy.fft.rfft2 of 4096x4096 float32, workers=1: {unit:.4f} s")
    scene = make_scene(SHAPE, transients=1000, stars=3000, seed=3)
    science = scene.science
    results: dict[str, object] = {}

    def step(name: str, action: Callable[[], object]) -> float:
        return statistics.median(times(lambda: results.__setitem__(name, action()), REPEATS))

    figures = {
        "template warp": step("warp", lambda: warp.warp_image(scene.template, science.wcs, science.shape)),
    }
    template = results["warp"].image  # type: ignore[attr-defined]
    figures["PSF matching + subtraction"] = step("subtract", lambda: subtract.run(science, template))
    subtraction = results["subtract"]
    figures["detection + measurement"] = step("measure", lambda: diasource.run(subtraction, science))
    table = results["measure"].table  # type: ignore[attr-defined]
    x, y = table["x"].to_numpy()[:100], table["y"].to_numpy()[:100]
    figures["cutouts, 100 sources"] = step("cutouts", lambda: cutouts.make_cutouts(
        science, subtraction.template, subtraction.difference, x, y))  # type: ignore[attr-defined]
    for name, seconds in figures.items():
        print(f"{name:<28} {seconds:7.3f} s  {seconds / unit:6.1f} rfft2")
    per_source = figures["cutouts, 100 sources"] / max(x.size, 1)
    print(f"{'cutouts, per source':<28} {per_source * 1e3:7.3f} ms {per_source / unit:6.3f} rfft2")
    print(f"DiaSources: {table.num_rows}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (RSS): {peak:.0f} MiB")


if __name__ == "__main__":
    main()
