"""Templates from sky tiles at full size, on one core: building tile coadds, cutting a CCD's template.

Run as ``python -m dmstream.benchmarks.templates``.  Three calibrated visits
(4000 x 4072 pixels, 0.2″/px, 3000 stars each, seeing 0.7″, 0.8″, 0.9″),
dithered by a few arcminutes and rotated by up to 3° about a science
pointing, stand for the template visits of one field.  Timed: building the
coadds of the default skymap's tiles that a science CCD at that pointing
needs (each visit warped onto the part of each tile it covers), then making
the science CCD's template from those tiles (each tile resampled onto the
science pixels it owns), for a CCD aligned with the tiles and one rotated
by 30°.  The template replaces the 'template warp' step of
:mod:`dmstream.benchmarks.raw_to_diasources`, which warps one visit straight
onto the science grid; that warp is timed here too, at both rotations, for
comparison.  Figures in seconds and in units of one 4096 x 4096
``scipy.fft.rfft2``, with the peak resident memory of each step (what stays
resident, such as the tiles while the template is made, counts).
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import numpy as np

from dmstream.benchmarks.timing import peak_memory_mib, reset_peak_memory, rfft2_unit, times
from dmstream.payloads import coadd, warp
from dmstream.payloads.image import CcdImage
from dmstream.payloads.masks import empty_mask
from dmstream.payloads.render import Psf, draw_point_sources
from dmstream.payloads.tiles import DEFAULT_SKYMAP
from dmstream.streams.scenes import RenderPsfModel, observe, tan_wcs

SHAPE = (4000, 4072)
#: Not on a tile corner: a typical CCD, whose template spans several tiles all the same.
POINTING = (150.07, 2.13)
#: Per visit: seeing (arcsec), rotation (deg), offset of the centre from the pointing (arcmin), sky (e-).
VISITS = ((0.7, 0.0, (2.0, -1.5), 1000.0), (0.8, 1.5, (-2.5, 1.0), 1100.0), (0.9, -3.0, (0.5, 3.0), 900.0))
#: Rotations of the science CCD on the sky, deg.
SCIENCE_ROTATIONS = (0.0, 30.0)
STARS = 3000
REPEATS = 3


def _visits(rng: np.random.Generator) -> list[CcdImage]:
    """The calibrated template visits: the same stars through each visit's WCS and PSF, with noise."""
    science = tan_wcs(SHAPE, *POINTING)
    # Stars over an area wider than any visit, so that every visit is full of them.
    x = rng.uniform(-800, SHAPE[1] + 800, STARS)
    y = rng.uniform(-800, SHAPE[0] + 800, STARS)
    ra, dec = science.pixel_to_world_values(x, y)
    flux = 10 ** rng.uniform(3.0, 5.5, STARS)
    visits = []
    for seeing, rotation, (east, north), sky in VISITS:
        centre_dec = POINTING[1] + north / 60
        centre_ra = POINTING[0] + east / 60 / np.cos(np.radians(centre_dec))
        wcs = tan_wcs(SHAPE, centre_ra, centre_dec, rotation)
        psf = Psf(fwhm=seeing)
        signal = np.zeros(SHAPE, np.float32)
        draw_point_sources(signal, *wcs.world_to_pixel_values(ra, dec), flux, psf)
        image, variance = observe(signal, rng, sky)
        del signal
        visits.append(CcdImage(image, variance, empty_mask(SHAPE), wcs, RenderPsfModel(psf, SHAPE), 31.0, "r",
                               30.0))
    return visits


def main() -> None:
    unit = rfft2_unit()
    print(f"unit: scipy.fft.rfft2 of 4096x4096 float32, workers=1: {unit:.4f} s")
    visits = _visits(np.random.default_rng(2))
    sciences = {rotation: tan_wcs(SHAPE, *POINTING, rotation) for rotation in SCIENCE_ROTATIONS}
    needed = sorted({int(tile_id) for wcs in sciences.values() for tile_id in np.unique(
        DEFAULT_SKYMAP.owners(wcs, SHAPE))})
    tiles = [DEFAULT_SKYMAP.tile(tile_id) for tile_id in needed]
    for rotation, wcs in sciences.items():
        owners = np.unique(DEFAULT_SKYMAP.owners(wcs, SHAPE)).size
        overlapping = len(DEFAULT_SKYMAP.tiles_overlapping(wcs, SHAPE))
        print(f"science CCD {SHAPE[1]}x{SHAPE[0]} at RA {POINTING[0]}, Dec {POINTING[1]}, rotated "
              f"{rotation:g} deg: its pixels lie in {owners} tiles; {overlapping} tiles' grids overlap it")

    results: dict[str, object] = {}

    def step(name: str, action: Callable[[], object], repeats: int) -> tuple[float, float]:
        def run_once() -> None:
            results.pop(name, None)  # the previous repeat's result goes first
            gc.collect()
            results[name] = action()

        reset_peak_memory()
        seconds = statistics.median(times(run_once, repeats))
        return seconds, peak_memory_mib()

    figures = {f"build {len(tiles)} tiles from 3 visits": step(
        "tiles", lambda: [coadd.build_tile(visits, tile) for tile in tiles], 1)}
    tile_coadds: list[coadd.CoaddResult] = results["tiles"]  # type: ignore[assignment]
    area = sum(int(np.count_nonzero(result.depth)) for result in tile_coadds) / 1e6
    notes = {next(iter(figures)): f"{area:.0f} Mpx of tile with data"}
    # As raw_to_diasources does: a template visit at the science pointing (0.4 deg and a few pixels
    # off), warped straight onto the CCD.  Only its WCS matters for the time.
    direct = replace(visits[0], wcs=tan_wcs(SHAPE, *POINTING, 0.4, offset=(3.3, -2.6)))
    visits.clear()
    coverages = {}
    for rotation, wcs in sciences.items():
        for name, action in ((f"one visit warped onto it, {rotation:g} deg", partial(
                warp.warp_image, direct, wcs, SHAPE)), (f"template from tiles, {rotation:g} deg", partial(
                coadd.template_for, tile_coadds, wcs, SHAPE))):
            figures[name] = step(name, action, REPEATS)
            coverages[name] = results.pop(name).coverage  # type: ignore[attr-defined]
            notes[name] = f"coverage {coverages[name]:.3f}"
    for name, (seconds, peak) in figures.items():
        print(f"{name:<34} {seconds:7.3f} s  {seconds / unit:6.1f} rfft2  peak {peak:5.0f} MiB  "
              f"{notes.get(name, '')}")
    per_tile = figures[next(iter(figures))][0] / len(tiles)
    print(f"per tile built: {per_tile:.2f} s, {per_tile / unit:.1f} rfft2")
    for rotation in sciences:
        warped, made = f"one visit warped onto it, {rotation:g} deg", f"template from tiles, {rotation:g} deg"
        ratio = (figures[made][0] / coverages[made]) / (figures[warped][0] / coverages[warped])
        print(f"{rotation:g} deg: template / direct warp, per pixel with data: {ratio:.2f}")


if __name__ == "__main__":
    main()
