"""How long association takes for one CCD's DiaSources against neighbourhoods of DiaObjects, on one core.

Run as ``python -m dmstream.benchmarks.association``.  A crowded CCD (0.23° square,
10,000 DiaSources: 7,000 of known DiaObjects, scattered by 0.05-0.2″, and
3,000 new) is associated against the DiaObject state of a neighbourhood of
5·10⁴, 10⁵ and 10⁶ objects at 1.5·10⁵ per deg² (the CCD holds ~8,000 of
them, the rest lies around it, as when a worker passes more state than the
CCD needs), plus 300 solar-system predictions.  Printed: the best of
``REPEATS`` runs of :func:`dmstream.payloads.association.run` (seconds and
rfft2 units) with its parts (the candidate search and the state rows'
update), the sky-pixel look-ups a stream makes for the CCD
(:func:`~dmstream.payloads.skypixels.pixels_touching` of its sources,
:func:`~dmstream.payloads.skypixels.pixels_of_footprint` of its corners),
and the size of a DiaObject state row in Arrow IPC, which sets how many
objects fit in one table value.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dmstream.benchmarks.timing import peak_memory_mib, rfft2_unit, times
from dmstream.payloads import association, skypixels
from dmstream.payloads.association import ARCSEC
from dmstream.payloads.astrometry import inverse_gnomonic
from dmstream.payloads.ids import MAX_SOURCES_PER_CCD, dia_source_ids

CENTRE = (150.0, 2.0)
CCD_HALF_WIDTH = 0.115
DENSITY = 1.5e5
KNOWN, NEW = 7000, 3000
NEIGHBOURHOODS = (50_000, 100_000, 1_000_000)
SS_PREDICTIONS = 300
REPEATS = 3
DAY_OBS = 20260315


def _ids(count: int, first_sequence: int) -> np.ndarray:
    """Distinct diaSourceIds for ``count`` sources, filling detector after detector of successive visits."""
    parts, left, chunk = [], count, 0
    while left > 0:
        take = min(left, MAX_SOURCES_PER_CCD)
        visit, detector = DAY_OBS * 100_000 + first_sequence + chunk // 189, chunk % 189
        parts.append(dia_source_ids(visit, detector, take))
        left, chunk = left - take, chunk + 1
    return np.concatenate(parts)


def _sources(ra: np.ndarray, dec: np.ndarray, ids: np.ndarray, mjd: float, band: str,
             rng: np.random.Generator) -> pa.Table:
    n = ra.size
    ra_err, dec_err = (rng.uniform(0.05, 0.2, n) * ARCSEC for _ in range(2))
    xi, eta = rng.normal(0, ra_err), rng.normal(0, dec_err)
    ra, dec = inverse_gnomonic(xi, eta, ra, dec)
    flux = rng.uniform(500, 20000, n)
    flux_err = 0.05 * flux + 20
    return pa.table({"diaSourceId": ids, "midpointMjdTai": np.full(n, mjd), "band": [band] * n, "ra": ra,
                     "dec": dec, "raErr": ra_err.astype(np.float32), "decErr": dec_err.astype(np.float32),
                     "ra_dec_Cov": np.zeros(n, np.float32),
                     "psfFlux": (flux + rng.normal(0, flux_err)).astype(np.float32),
                     "psfFluxErr": flux_err.astype(np.float32),
                     "scienceFlux": flux.astype(np.float32), "scienceFluxErr": flux_err.astype(np.float32)})


def _state(count: int, rng: np.random.Generator) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """DiaObjects uniformly around the CCD at DENSITY, made by association itself from a first visit."""
    half = np.sqrt(count / DENSITY) / 2
    xi, eta = rng.uniform(-half, half, count), rng.uniform(-half, half, count)
    ra, dec = inverse_gnomonic(xi, eta, *CENTRE)
    first = _sources(ra, dec, _ids(count, 1), 61000.0, "r", rng)
    on_ccd = np.flatnonzero((np.abs(xi) < CCD_HALF_WIDTH) & (np.abs(eta) < CCD_HALF_WIDTH))
    return association.run(first).state, ra[on_ccd], dec[on_ccd]


def bench(count: int, unit: float) -> None:
    rng = np.random.default_rng(count)
    state, ccd_ra, ccd_dec = _state(count, rng)
    known = rng.choice(ccd_ra.size, KNOWN, replace=False)
    new_xi, new_eta = (rng.uniform(-CCD_HALF_WIDTH, CCD_HALF_WIDTH, NEW) for _ in range(2))
    new_ra, new_dec = inverse_gnomonic(new_xi, new_eta, *CENTRE)
    ra, dec = np.concatenate([ccd_ra[known], new_ra]), np.concatenate([ccd_dec[known], new_dec])
    visit_ids = dia_source_ids(DAY_OBS * 100_000 + 900, 94, KNOWN + NEW)
    sources = _sources(ra, dec, visit_ids, 61001.0, "g", rng)
    ss_pick = rng.choice(ra.size, SS_PREDICTIONS, replace=False)
    predictions = pa.table({"ssObjectId": np.arange(SS_PREDICTIONS, dtype=np.int64) + 10**9,
                            "ra": ra[ss_pick] + 0.3 * ARCSEC, "dec": dec[ss_pick]})

    result = association.run(sources, state, predictions)
    seconds = min(times(lambda: association.run(sources, state, predictions), repeats=REPEATS))
    radius = association.AssociationConfig().match_radius * ARCSEC
    object_ra, object_dec = state.column("ra").to_numpy(), state.column("dec").to_numpy()
    search = min(times(lambda: association.candidate_pairs(ra, dec, object_ra, object_dec, radius),
                       repeats=REPEATS))
    changed = state.take(np.arange(KNOWN))
    take = min(times(lambda: state.take(np.arange(KNOWN)), repeats=REPEATS))
    print(f"{KNOWN + NEW} DiaSources vs {count:>9,} DiaObjects: run {seconds:.3f} s ="
          f" {seconds / unit:5.2f} units (candidate search {search:.3f} s, taking {changed.num_rows}"
          f" state rows {take:.3f} s);"
          f" matched {result.matched}, new {result.new}, solar-system {result.solar_system}")


def bench_pixels(unit: float) -> None:
    rng = np.random.default_rng(1)
    xi, eta = (rng.uniform(-CCD_HALF_WIDTH, CCD_HALF_WIDTH, KNOWN + NEW) for _ in range(2))
    ra, dec = inverse_gnomonic(xi, eta, *CENTRE)
    radius = association.AssociationConfig().match_radius * ARCSEC
    touching = skypixels.pixels_touching(ra, dec, radius)
    seconds = min(times(lambda: skypixels.pixels_touching(ra, dec, radius), repeats=REPEATS))
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * CCD_HALF_WIDTH
    corner_ra, corner_dec = inverse_gnomonic(corners[:, 0], corners[:, 1], *CENTRE)
    footprint = skypixels.pixels_of_footprint(corner_ra, corner_dec, radius)
    footprint_seconds = min(times(lambda: skypixels.pixels_of_footprint(corner_ra, corner_dec, radius),
                                  repeats=REPEATS))
    sample = zip(ra[:2000], dec[:2000], strict=True)
    near_edge = np.mean([skypixels.pixels_touching(r, d, radius).size > 1 for r, d in sample])
    print(f"sky pixels (order {skypixels.DEFAULT_SKYPIXELS.order}): pixels_touching of {ra.size} sources"
          f" {seconds * 1e3:.1f} ms = {seconds / unit:.2f} units ({touching.size} pixels,"
          f" {near_edge:.1%} of the circles reach a second pixel); pixels_of_footprint of a CCD"
          f" {footprint_seconds * 1e3:.2f} ms"
          f" ({footprint.size} pixels)")


def bench_row_size() -> None:
    rng = np.random.default_rng(2)
    per_pixel = round(5e4 * skypixels.DEFAULT_SKYPIXELS.pixel_area)
    xi, eta = (rng.uniform(-0.02, 0.02, per_pixel) for _ in range(2))
    ra, dec = inverse_gnomonic(xi, eta, *CENTRE)
    state = association.run(_sources(ra, dec, _ids(per_pixel, 1), 61000.0, "r", rng)).state
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, state.schema) as writer:
        writer.write_table(state)
    size = sink.getvalue().size
    print(f"state: {len(state.schema)} columns, {size / per_pixel:.0f} bytes per DiaObject in Arrow IPC"
          f" (uncompressed); a pixel at 5e4 DiaObjects/deg2 holds {per_pixel}, {size / 2**20:.2f} MiB")


def main() -> None:
    unit = rfft2_unit()
    print(f"reference: scipy.fft.rfft2 4096x4096 float32, workers=1: {unit:.3f} s (= 1 unit)")
    bench_pixels(unit)
    bench_row_size()
    for count in NEIGHBOURHOODS:
        bench(count, unit)
    print(f"peak resident memory {peak_memory_mib():.0f} MiB")


if __name__ == "__main__":
    main()
