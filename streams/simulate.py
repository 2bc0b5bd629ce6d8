"""Simulate a recorded night: plan, sky, pixels and events into a night directory.

The observatory plans the night, the sky is laid over its fields, and every
detector of every exposure is rendered and read out through the electronics
model into a raw file, while the summit's events and telemetry go to the event
log with a readout line at each detector's end of readout.  Detector-exposures
are independent and seeded by (seed, exposure, detector), so they run in
parallel processes and the bytes do not depend on the number of jobs.  Each
detector's curated calibrations (what the camera team measured in the lab: here
the electronics' truth) go to ``calib/curated/``.  A night's reference night
(the same fields days earlier in good seeing, for templates) is written by
:func:`simulate_reference_night` under the same sky and with the same camera.
"""

from __future__ import annotations

import heapq
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits

from dmstream.logs import get_logger
from dmstream.payloads.camera import detector_wcs, get_detector
from dmstream.payloads.isr import IsrConfig
from dmstream.streams.camera import DetectorElectronics, simulate_raw, truth_calibrations
from dmstream.streams.efd import EfdConfig, summit_events
from dmstream.streams.night import MANIFEST, EventLogWriter, Manifest, raw_path
from dmstream.streams.observatory import (
    Exposure,
    NightConfig,
    NightPlan,
    ReferenceConfig,
    plan_night,
    plan_reference_night,
)
from dmstream.streams.rawfits import INSTRUMENT, write_raw
from dmstream.streams.sky import Sky, SkyConfig, render_exposure

log = get_logger(__name__)

#: Mean level of a dome flat, e⁻ per pixel (about a third of full well).
FLAT_LEVEL_E = 30000.0
#: Where a night keeps its detectors' curated calibrations, and the format of their files.
CURATED_DIR = "calib/curated"
CURATED_FORMAT = "dmstream-curated-calibration"
CURATED_VERSION = 1


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate.

    Attributes
    ----------
    night : NightConfig
        The observatory's plan (date, visits, bands, snaps, calibrations).
    detectors : tuple of str
        Detectors to read out (names such as ``R22_S11``); the focal plane has 189.
    sky : SkyConfig
        Densities of stars, galaxies, transients and movers.
    efd : EfdConfig
        Telemetry rates.
    compress : bool
        Write raw files RICE_1-compressed (~4x smaller, slower to write).
    jobs : int
        Parallel processes.
    """

    night: NightConfig = field(default_factory=NightConfig)
    detectors: tuple[str, ...] = ("R22_S11",)
    sky: SkyConfig = field(default_factory=SkyConfig)
    efd: EfdConfig = field(default_factory=EfdConfig)
    compress: bool = True
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)


@dataclass
class SimulationSummary:
    exposures: int
    raw_files: int
    events: int
    seconds: float
    sources_drawn: int


@dataclass(frozen=True)
class _Task:
    exposure: Exposure
    detector: str
    path: Path


# Each worker process keeps the sky and the electronics it was given, so they are
# pickled once per process, not once per detector-exposure.
_WORKER: dict[str, Any] = {}


def _init_worker(sky: Sky, seed: int, compress: bool) -> None:
    _WORKER.update(sky=sky, seed=seed, compress=compress)


@cache
def _electronics(detector: str, seed: int) -> DetectorElectronics:
    return DetectorElectronics.draw(get_detector(detector), seed)


def _simulate_one(task: _Task) -> pa.Table | None:
    """Render, read out and write one detector of one exposure; return the sources drawn."""
    exposure, detector = task.exposure, get_detector(task.detector)
    seed = _WORKER["seed"]
    rng = np.random.default_rng([seed, exposure.exposure_id, detector.id])
    truth = None
    if exposure.img_type == "OBJECT":
        wcs = detector_wcs(detector, exposure.ra, exposure.dec, exposure.rot_sky_pos)
        signal, truth = render_exposure(_WORKER["sky"], exposure, wcs, detector.shape, rng)
    elif exposure.img_type == "FLAT":
        signal = np.full(detector.shape, FLAT_LEVEL_E, dtype=np.float32)
    else:
        signal = None
    amps = simulate_raw(signal, exposure.exptime, exposure.darktime, _electronics(task.detector, seed), rng)
    write_raw(task.path, _header_values(exposure), amps, detector, compress=_WORKER["compress"])
    if truth is not None:
        truth = truth.append_column("exposure_id", pa.array([exposure.exposure_id] * len(truth), pa.int64()))
        truth = truth.append_column("detector", pa.array([detector.id] * len(truth), pa.int32()))
    return truth


def _header_values(exposure: Exposure) -> dict[str, Any]:
    return {
        "OBSID": exposure.obs_id, "DAYOBS": exposure.day_obs, "SEQNUM": exposure.seq_num,
        "GROUPID": exposure.group_id, "IMGTYPE": exposure.img_type, "EXPTIME": exposure.exptime,
        "DARKTIME": exposure.darktime, "MJD-OBS": exposure.mjd_start, "MJD-END": exposure.mjd_end,
        "FILTBAND": exposure.band, "FILTER": exposure.physical_filter, "RA": exposure.ra,
        "DEC": exposure.dec, "ROTPA": exposure.rot_sky_pos, "AIRMASS": exposure.airmass,
        "ALTITUDE": exposure.alt, "AZIMUTH": exposure.az, "SNAP": exposure.snap,
        "NIMAGES": exposure.nimages, "SURVEY": exposure.survey,
    }


def defect_boxes(defects: np.ndarray) -> np.ndarray:
    """A defect map as boxes one column wide: the runs of defective pixels down each column.

    Parameters
    ----------
    defects : numpy.ndarray
        Boolean map of the assembled detector, True = defective.

    Returns
    -------
    numpy.ndarray
        Structured array (``x0``, ``y0``, ``width``, ``height``), int32, 0-based pixels, sorted by x then y.
    """
    boxes = []
    for x in np.flatnonzero(defects.any(axis=0)):
        edges = np.flatnonzero(np.diff(np.concatenate(([0], defects[:, x].astype(np.int8), [0]))))
        boxes.extend((x, start, 1, stop - start) for start, stop in zip(edges[::2], edges[1::2], strict=True))
    return np.array(boxes, dtype=[("x0", np.int32), ("y0", np.int32), ("width", np.int32),
                                  ("height", np.int32)])


def write_curated_calibrations(night: Path, detector_name: str, seed: int, day_obs: int) -> dict[str, str]:
    """Write one detector's curated calibrations into a night (format in ``docs/recorded-night.md``).

    They are what the camera team measured in the lab, which for a simulated
    camera is the truth of its electronics: gains, read noise, saturation,
    linearity, crosstalk and defects (dead columns and hot pixels).  The
    electronics have no separate suspect regime, so the suspect level is ISR's
    default fraction of saturation.

    Parameters
    ----------
    night : pathlib.Path
    detector_name : str
    seed : int
        The night's seed, from which the detector's electronics are drawn.
    day_obs : int
        First observing day the calibrations are valid for.

    Returns
    -------
    dict of str to str
        ``constants`` and ``defects``: the paths of the two files, relative to the night.
    """
    electronics = _electronics(detector_name, seed)
    detector = electronics.detector
    truth = truth_calibrations(electronics)
    suspect = IsrConfig().suspect_fraction * truth.saturation
    paths = {"constants": f"{CURATED_DIR}/{detector.name}.json",
             "defects": f"{CURATED_DIR}/{detector.name}_defects.fits"}
    amplifiers = [{"name": amp.name, "gain": float(truth.gain[amp.index]),
                   "read_noise": float(truth.read_noise[amp.index]),
                   "saturation": float(truth.saturation[amp.index]), "suspect": float(suspect[amp.index]),
                   "linearity": float(truth.linearity[amp.index])} for amp in detector.amplifiers]
    constants = {"format": CURATED_FORMAT, "version": CURATED_VERSION, "instrument": INSTRUMENT,
                 "detector": detector.name, "detector_id": detector.id, "valid_from": int(day_obs),
                 "amplifiers": amplifiers, "crosstalk": truth.crosstalk.tolist()}
    (night / CURATED_DIR).mkdir(parents=True, exist_ok=True)
    (night / paths["constants"]).write_text(json.dumps(constants, indent=1, allow_nan=False) + "\n")
    primary = fits.PrimaryHDU()
    for keyword, value, comment in (
            ("OBSTYPE", "defects", "curated calibration"), ("INSTRUME", INSTRUMENT, "instrument"),
            ("DETNAME", detector.name, "raft and sensor"), ("DETECTOR", detector.id, "detector id"),
            ("DETSIZE", detector.detsize, "assembled detector"), ("VALIDFRM", int(day_obs), "first day_obs")):
        primary.header[keyword] = (value, comment)
    table = fits.BinTableHDU(defect_boxes(truth.defects), name="DEFECTS")
    fits.HDUList([primary, table]).writeto(night / paths["defects"], overwrite=True)
    return paths


def _write_events(out: Path, plan: NightPlan, tasks: list[_Task], config: SimulationConfig) -> int:
    """The event log: summit messages and readout lines merged in time order."""
    summit = ((e.time_tai, 0, e) for e in summit_events(plan, config.efd))
    # Tasks are in exposure order, so their readouts are already in time order.
    readouts = ((task.exposure.tai_readout_end, 1, task) for task in tasks)
    with EventLogWriter(out) as writer:
        for when, kind, item in heapq.merge(summit, readouts, key=lambda line: (line[0], line[1])):
            if kind == 0:
                writer.message(when, item.topic.name, item.key, item.record)
            else:
                writer.readout(when, item.path, item.detector)
        return writer.written


def _exposure_table(plan: NightPlan) -> pa.Table:
    rows = [asdict(exposure) for exposure in plan.exposures]
    return pa.Table.from_pylist(rows)


def _add_to_manifest(out: Path, key: str, value: Any) -> None:
    # Manifest has no field for the curated calibrations yet, and its reader keeps known keys only.
    path = out / MANIFEST
    manifest = json.loads(path.read_text())
    manifest[key] = value
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _night_sky(plan: NightPlan, config: SimulationConfig) -> Sky:
    """The sky of a night: static sources of the seed, transients over the night's dates and fields."""
    exposures = plan.exposures
    return Sky.generate([(v.ra, v.dec) for v in plan.visits], replace(config.sky, seed=config.night.seed),
                        mjd_range=(exposures[0].mjd_start, exposures[-1].mjd_end))


def simulate_night(out: Path, config: SimulationConfig | None = None) -> SimulationSummary:
    """Write a complete recorded night to ``out`` (see ``docs/recorded-night.md``)."""
    config = config or SimulationConfig()
    started = time.monotonic()
    plan = plan_night(config.night)
    description = f"simulated by dmstream: {len(plan.visits)} visits, {len(plan.exposures)} exposures"
    return _write_night(Path(out), plan, _night_sky(plan, config), config, started, description)


def simulate_reference_night(out: Path, config: SimulationConfig | None = None,
                             reference: ReferenceConfig | None = None) -> SimulationSummary:
    """Write the reference night of ``config``'s night to ``out``, a complete recorded night of its own.

    The night is planned as :func:`simulate_night` plans it, then its
    reference night (:func:`~dmstream.streams.observatory.plan_reference_night`)
    is simulated under the night's sky and with the night's camera: the same
    stars and galaxies (drawn from the seed, tile by tile), the same
    transients (supernovae, flares and solar-system objects drawn over the
    night's dates, seen as they were ``days_before`` earlier, so that a
    supernova rising at the night is fainter or absent in its template), and
    the same electronics and curated calibrations.  The manifest's
    ``simulation`` says which night it is the reference of.
    """
    config = config or SimulationConfig()
    reference = reference or ReferenceConfig()
    started = time.monotonic()
    night = plan_night(config.night)
    plan = plan_reference_night(night, reference)
    fields = len({(v.field_id, v.band) for v in night.visits})
    description = (f"simulated by dmstream: reference night of {night.day_obs}, {reference.visits_per_field} "
                   f"visits of each of its {fields} field-bands, {len(plan.exposures)} exposures")
    return _write_night(Path(out), plan, _night_sky(night, config), config, started, description,
                        {"reference_of": night.day_obs, "visits_per_field": reference.visits_per_field,
                         "days_before": reference.days_before, "seeing_median": reference.seeing_median})


def _write_night(out: Path, plan: NightPlan, sky: Sky, config: SimulationConfig, started: float,
                 description: str, simulation: dict[str, Any] | None = None) -> SimulationSummary:
    exposures = plan.exposures
    log.info("night planned", day_obs=plan.day_obs, visits=len(plan.visits), exposures=len(exposures),
             calibrations=len(plan.calibrations), detectors=len(config.detectors))
    tasks = [_Task(e, name, raw_path(out, e.day_obs, e.seq_num, e.obs_id, name))
             for e in exposures for name in config.detectors]
    truths: list[pa.Table] = []
    with ProcessPoolExecutor(config.jobs, initializer=_init_worker,
                             initargs=(sky, config.night.seed, config.compress)) as pool:
        curated = dict(zip(config.detectors, pool.map(
            partial(write_curated_calibrations, out, seed=config.night.seed, day_obs=plan.day_obs),
            config.detectors), strict=True))
        last_report = time.monotonic()
        for done, truth in enumerate(pool.map(_simulate_one, tasks), start=1):
            if truth is not None and len(truth):
                truths.append(truth)
            now = time.monotonic()
            if now - last_report >= 5 or done == len(tasks):
                last_report = now
                rate = done / (now - started)
                log.info("simulating detectors", done=done, total=len(tasks), per_s=round(rate, 2),
                         eta_s=round((len(tasks) - done) / rate, 1))
    events = _write_events(out, plan, tasks, config)
    truth_dir = out / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    sources = pa.concat_tables(truths) if truths else pa.table({})
    truth_files = {"sources": "truth/sources.parquet", "exposures": "truth/exposures.parquet"}
    pq.write_table(sources, out / truth_files["sources"])
    pq.write_table(_exposure_table(plan), out / truth_files["exposures"])
    for name, table in sky.truth_tables().items():
        truth_files[name] = f"truth/{name}.parquet"
        pq.write_table(table, out / truth_files[name])
    refcat = "refcat/reference_catalog.parquet"
    (out / "refcat").mkdir(parents=True, exist_ok=True)
    pq.write_table(sky.reference_catalog(), out / refcat)
    Manifest(
        instrument="LSSTCam", day_obs=plan.day_obs, detectors=list(config.detectors),
        reference_catalog=refcat, truth=truth_files,
        description=description,
        simulation={"seed": config.night.seed, "visits": len(plan.visits), "compress": config.compress,
                    **(simulation or {})},
    ).write(out)
    _add_to_manifest(out, "curated_calibrations", curated)
    summary = SimulationSummary(exposures=len(exposures), raw_files=len(tasks), events=events,
                                seconds=time.monotonic() - started, sources_drawn=sum(len(t) for t in truths))
    log.info("night simulated", out=str(out), **asdict(summary))
    return summary
