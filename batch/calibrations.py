"""Calibration products for Prompt Processing: curated calibrations and the day's master bias, dark and flats.

Two paths lead into the Data Backbone, as in Rubin:

- **curated calibrations**, measured by the camera team in the lab and shipped
  with the camera (Rubin's ``obs_lsst_data``): gains, read noise, saturation
  and suspect levels, linearity, crosstalk and defects.  :func:`ingest_curated`
  takes them from a recorded night's ``calib/curated/`` (the format is in
  ``docs/recorded-night.md``);
- **master bias, dark and flats**, built like Rubin's ``cp_pipe`` from the
  afternoon's calibration exposures (:func:`build_masters`, with the payloads
  of :mod:`dmstream.payloads.calibration`).

:func:`isr_calibrations` assembles what ISR needs for one detector, day and
band from the latest products made for that day or before, and names whatever
is missing in a :class:`MissingCalibrationError`.

Dataset types (instrument, day_obs, detector; flats also band): ``camera_constants``
(registered here; JSON with per-amplifier lists in raw-file order: ``amplifiers``
names, ``gain`` e⁻/ADU, ``read_noise`` e⁻, ``saturation`` and ``suspect`` ADU,
``linearity`` 1/ADU), ``crosstalk`` (16 x 16 array ``[victim, source]``), ``defects``
(boolean map of the assembled detector), and ``bias`` (e⁻), ``dark`` (e⁻/s),
``flat`` (relative response), each stored as ``{"image": ..., "variance": ...}``.
A curated calibration's day_obs is the first day it is valid for; a master's,
the day its exposures were taken.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from dmstream.backbone import Backbone, DatasetNotFoundError, DatasetRef, UnknownDatasetTypeError
from dmstream.logs import get_logger
from dmstream.payloads.calibration import MasterBias, MasterDark, MasterFlat, RawFrame
from dmstream.payloads.camera import AMPLIFIERS_PER_DETECTOR, DetectorGeometry, get_detector
from dmstream.payloads.isr import IsrCalibrations
from dmstream.streams.night import MANIFEST, Manifest, NightFormatError
from dmstream.streams.rawfits import read_raw
from dmstream.streams.simulate import CURATED_FORMAT, CURATED_VERSION

log = get_logger(__name__)

CAMERA_CONSTANTS_TYPE = "camera_constants"
#: Keys of the arrays of a bias, dark or flat dataset.
IMAGE, VARIANCE = "image", "variance"
#: Per-amplifier values of a curated calibration, in the order of the JSON.
AMPLIFIER_VALUES = ("gain", "read_noise", "saturation", "suspect", "linearity")
#: Exposures of each kind a master needs (the read noise of a master bias comes from bias differences).
MINIMUM_FRAMES = {"BIAS": 2, "DARK": 1, "FLAT": 1}


class MissingCalibrationError(ValueError):
    """A calibration product, or the exposures to build it from, is not in the Data Backbone."""


@dataclass(frozen=True)
class StoredProduct:
    """A calibration product in the Data Backbone: ``new`` if this run put it, else it was there already."""

    ref: DatasetRef
    new: bool

    def describe(self) -> str:
        data_id = " ".join(f"{key}={value}" for key, value in self.ref.data_id.items())
        return f"{'new ' if self.new else 'kept'}  {self.ref.dataset_type:<16} {data_id}  {self.ref.path}"


@dataclass
class CalibrationRun:
    """What :func:`ingest_curated` or :func:`build_masters` did, product by product."""

    products: list[StoredProduct] = field(default_factory=list)

    @property
    def new(self) -> list[StoredProduct]:
        return [product for product in self.products if product.new]

    @property
    def kept(self) -> list[StoredProduct]:
        return [product for product in self.products if not product.new]


def register_types(backbone: Backbone) -> None:
    """Register the dataset types of this module that the backbone does not know by default."""
    backbone.register_type(CAMERA_CONSTANTS_TYPE, ("instrument", "day_obs", "detector"), "json",
                           description="Curated per-amplifier gain, read noise, saturation, suspect level "
                                       "and linearity of a detector (lists in raw-file order).")


def _store(backbone: Backbone, run: CalibrationRun, obj: Any, dataset_type: str, provenance: str,
           **data_id: Any) -> None:
    new = not backbone.exists(dataset_type, **data_id)
    ref = backbone.put(obj, dataset_type, provenance=provenance, **data_id)
    run.products.append(StoredProduct(ref, new))
    log.info("calibration stored" if new else "calibration already in the backbone",
             dataset_type=dataset_type, **ref.data_id)


# --- curated calibrations ---------------------------------------------------------------------------------


@dataclass
class CuratedCalibration:
    """A detector's curated calibrations as read from a night; per-amplifier arrays in raw-file order."""

    instrument: str
    detector: DetectorGeometry
    valid_from: int
    constants: dict[str, np.ndarray]
    crosstalk: np.ndarray
    defects: np.ndarray


def _curated_error(path: Path, problem: str) -> NightFormatError:
    return NightFormatError(f"{path}: not a curated calibration of format {CURATED_FORMAT}: {problem}")


def read_curated(night: Path, constants_path: str, defects_path: str) -> CuratedCalibration:
    """Read one detector's curated calibration files (``docs/recorded-night.md``).

    Raises
    ------
    NightFormatError
        If a file is missing or does not follow the format.
    """
    path = night / constants_path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _curated_error(path, "no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _curated_error(path, f"unreadable: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != CURATED_FORMAT:
        raise _curated_error(path, "no 'format' key of that value")
    if not isinstance(data.get("version"), int) or data["version"] > CURATED_VERSION:
        raise _curated_error(path, f"version {data.get('version')!r}; this reader knows {CURATED_VERSION}")
    try:
        detector = get_detector(data["detector"])
        detector_id = int(data.get("detector_id", detector.id))
        by_name = {amp["name"]: amp for amp in data["amplifiers"]}
        amplifiers = [by_name[amp.name] for amp in detector.amplifiers]
        constants = {name: np.array([float(amp[name]) for amp in amplifiers]) for name in AMPLIFIER_VALUES}
        # Crosstalk rows and columns follow the file's amplifier order, which need not be raw-file order.
        order = [list(by_name).index(amp.name) for amp in detector.amplifiers]
        crosstalk = np.asarray(data["crosstalk"], dtype=np.float64)
        instrument, valid_from = str(data["instrument"]), int(data["valid_from"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _curated_error(path, f"{type(exc).__name__}: {exc}") from None
    if detector_id != detector.id:
        raise _curated_error(path, f"detector_id {detector_id} is not that of {detector.name}")
    if len(by_name) != AMPLIFIERS_PER_DETECTOR or crosstalk.shape != (AMPLIFIERS_PER_DETECTOR,) * 2:
        raise _curated_error(path, f"{len(by_name)} amplifiers and a {crosstalk.shape} crosstalk matrix, "
                                   f"expected {AMPLIFIERS_PER_DETECTOR} and 16 x 16")
    if not all(np.isfinite(values).all() for values in (*constants.values(), crosstalk)):
        raise _curated_error(path, "values must be finite numbers")
    return CuratedCalibration(instrument, detector, valid_from, constants, crosstalk[np.ix_(order, order)],
                              _read_defects(night / defects_path, detector))


def _read_defects(path: Path, detector: DetectorGeometry) -> np.ndarray:
    """The defect map of the assembled detector from a table of boxes (x0, y0, width, height)."""
    try:
        with fits.open(path, memmap=False) as hdus:
            if hdus[0].header.get("DETNAME") != detector.name:
                raise _curated_error(path, f"DETNAME {hdus[0].header.get('DETNAME')!r}, "
                                           f"expected {detector.name}")
            boxes = hdus["DEFECTS"].data
            x0, y0, width, height = (np.asarray(boxes[name], dtype=np.int64)
                                     for name in ("x0", "y0", "width", "height"))
    except FileNotFoundError:
        raise _curated_error(path, "no such file") from None
    except (OSError, KeyError, TypeError) as exc:
        raise _curated_error(path, f"no DEFECTS table of x0, y0, width, height: {exc}") from None
    rows, cols = detector.shape
    outside = (x0 < 0) | (y0 < 0) | (width < 1) | (height < 1) | (x0 + width > cols) | (y0 + height > rows)
    if outside.any():
        raise _curated_error(path, f"{int(outside.sum())} defect boxes are empty or outside the "
                                   f"{cols} x {rows} detector")
    defects = np.zeros(detector.shape, dtype=bool)
    for x, y, w, h in zip(x0, y0, width, height, strict=True):
        defects[y:y + h, x:x + w] = True
    return defects


def ingest_curated(night_dir: str | Path, backbone: Backbone) -> CalibrationRun:
    """Put the curated calibrations a recorded night lists into the Data Backbone.

    Each detector's constants go to ``camera_constants``, its crosstalk matrix
    to ``crosstalk`` and its defects to ``defects``, under the day_obs they are
    valid from.  Running it again is a no-op.

    Parameters
    ----------
    night_dir : path-like
        A recorded night whose ``night.json`` has ``curated_calibrations``.
    backbone : Backbone

    Raises
    ------
    NightFormatError
        If the directory is not a recorded night, lists no curated calibrations, or a file is malformed.
    DatasetConflictError
        If other calibrations are already in the backbone under the same data id.
    """
    night = Path(night_dir)
    Manifest.read(night)  # a recorded night of a format this reader knows, or a clear error
    listing = json.loads((night / MANIFEST).read_text()).get("curated_calibrations")
    if not isinstance(listing, dict) or not listing:
        raise NightFormatError(f"{night / MANIFEST} lists no curated_calibrations")
    register_types(backbone)
    run = CalibrationRun()
    for name, paths in sorted(listing.items()):
        if not isinstance(paths, dict) or not {"constants", "defects"} <= set(paths):
            raise NightFormatError(f"{night / MANIFEST}: curated_calibrations of {name} needs 'constants' "
                                   f"and 'defects' paths")
        curated = read_curated(night, paths["constants"], paths["defects"])
        data_id = {"instrument": curated.instrument, "day_obs": curated.valid_from,
                   "detector": curated.detector.id}
        constants = {"amplifiers": [amp.name for amp in curated.detector.amplifiers],
                     **{key: values.tolist() for key, values in curated.constants.items()}}
        provenance = f"curated calibration {paths['constants']}"
        _store(backbone, run, constants, CAMERA_CONSTANTS_TYPE, provenance, **data_id)
        _store(backbone, run, curated.crosstalk, "crosstalk", provenance, **data_id)
        _store(backbone, run, curated.defects, "defects", f"curated calibration {paths['defects']}",
               **data_id)
    return run


# --- masters from the day's calibration exposures ---------------------------------------------------------


@dataclass(frozen=True)
class _CalibrationExposure:
    ref: DatasetRef
    img_type: str
    band: str
    darktime: float


def _calibration_exposures(backbone: Backbone, refs: Iterable[DatasetRef]) -> list[_CalibrationExposure]:
    """The BIAS, DARK and FLAT raws among ``refs`` (the registry does not know image types: headers do)."""
    found = []
    for ref in refs:
        header = fits.getheader(backbone.path("raw", **ref.data_id), 0)
        img_type = str(header.get("IMGTYPE", "")).upper()
        if img_type in MINIMUM_FRAMES:
            found.append(_CalibrationExposure(ref, img_type, str(header["FILTBAND"]),
                                              float(header["DARKTIME"])))
    return found


def build_masters(backbone: Backbone, day_obs: int, detectors: Sequence[int | str] | None = None,
                  instrument: str | None = None) -> CalibrationRun:
    """Build the day's master bias, dark and flats (one per band) from its calibration exposures.

    The bias is built first, the dark from bias-subtracted darks, each flat
    from bias- and dark-subtracted flats, every frame through the same ISR as
    science data with the detector's curated gain, linearity and crosstalk.
    Products already in the backbone are kept and not rebuilt, so a second run
    is a no-op.

    Parameters
    ----------
    backbone : Backbone
        Holds the day's raws and the detectors' curated calibrations.
    day_obs : int
    detectors : sequence of int or str, optional
        Detector ids or names; default every detector with raws that day.
    instrument : str, optional
        Default every instrument with raws that day.

    Raises
    ------
    MissingCalibrationError
        If a product to build lacks its exposures (fewer than 2 biases, no dark, no flat at all)
        or the detector has no curated calibrations; nothing is built for that detector.
    KeyError
        If a detector is not an LSSTCam science detector.
    """
    where: dict[str, Any] = {"day_obs": day_obs}
    if instrument is not None:
        where["instrument"] = instrument
    raws = backbone.query("raw", **where)
    if not raws:
        raise MissingCalibrationError(f"no raw exposures of day_obs {day_obs} in the Data Backbone")
    present = sorted({(ref.data_id["instrument"], ref.data_id["detector"]) for ref in raws})
    if detectors is not None:
        wanted = {get_detector(key).id for key in detectors}
        absent = wanted - {detector for _, detector in present}
        if absent:
            raise MissingCalibrationError(
                f"no raw exposures of day_obs {day_obs} for detector(s) "
                f"{', '.join(get_detector(d).name for d in sorted(absent))} in the Data Backbone")
        present = [(name, detector) for name, detector in present if detector in wanted]
    run = CalibrationRun()
    for instrument_name, detector_id in present:
        refs = [ref for ref in raws
                if (ref.data_id["instrument"], ref.data_id["detector"]) == (instrument_name, detector_id)]
        _build_detector(backbone, run, instrument_name, day_obs, get_detector(detector_id),
                        _calibration_exposures(backbone, refs))
    return run


def _build_detector(backbone: Backbone, run: CalibrationRun, instrument: str, day_obs: int,
                    detector: DetectorGeometry, exposures: list[_CalibrationExposure]) -> None:
    data_id = {"instrument": instrument, "day_obs": day_obs, "detector": detector.id}
    by_kind = {kind: [e for e in exposures if e.img_type == kind] for kind in MINIMUM_FRAMES}
    flat_bands = sorted({e.band for e in by_kind["FLAT"]})
    products = [("bias", data_id, "BIAS"), ("dark", data_id, "DARK"),
                *(("flat", {**data_id, "band": band}, "FLAT") for band in flat_bands)]
    to_build = [kind for dataset_type, product_id, kind in products
                if not backbone.exists(dataset_type, **product_id)]
    if not flat_bands and not backbone.query("flat", **data_id):
        to_build.append("FLAT")
    short = [f"{kind} ({len(by_kind[kind])} of at least {MINIMUM_FRAMES[kind]})"
             for kind in dict.fromkeys(to_build) if len(by_kind[kind]) < MINIMUM_FRAMES[kind]]
    if short:
        raise MissingCalibrationError(
            f"{instrument} detector {detector.name} ({detector.id}), day_obs {day_obs}: too few calibration "
            f"exposures in the Data Backbone to build the masters: {', '.join(short)}")
    if not to_build:
        run.products += [StoredProduct(backbone.ref(dataset_type, **product_id), new=False)
                         for dataset_type, product_id, _ in products]
        log.info("masters already in the backbone", instrument=instrument, detector=detector.name,
                 day_obs=day_obs, flat_bands=flat_bands)
        return
    calibs = isr_calibrations(backbone, instrument, day_obs, detector.id, band=None)
    log.info("building masters", instrument=instrument, detector=detector.name, day_obs=day_obs,
             flat_bands=flat_bands, **{kind.lower(): len(found) for kind, found in by_kind.items()})

    def bias(frames: list[RawFrame], _: list[float]) -> tuple[np.ndarray, np.ndarray]:
        result = MasterBias().run(frames, detector, calibs)
        log.info("read noise from bias differences", detector=detector.name,
                 measured_over_curated=round(float(np.median(result.read_noise / calibs.read_noise)), 4))
        return result.bias, result.variance

    master = _master(backbone, run, "bias", data_id, by_kind["BIAS"], detector, bias)
    calibs = replace(calibs, bias=master[IMAGE], bias_variance=master[VARIANCE])

    def dark(frames: list[RawFrame], darktimes: list[float]) -> tuple[np.ndarray, np.ndarray]:
        result = MasterDark().run(frames, darktimes, detector, calibs)
        return result.dark, result.variance

    master = _master(backbone, run, "dark", data_id, by_kind["DARK"], detector, dark)
    calibs = replace(calibs, dark=master[IMAGE], dark_variance=master[VARIANCE])
    for band in flat_bands:
        def flat(frames: list[RawFrame], darktimes: list[float], band: str = band
                 ) -> tuple[np.ndarray, np.ndarray]:
            result = MasterFlat().run(frames, darktimes, band, detector, calibs)
            return result.flat, result.variance

        flats = [e for e in by_kind["FLAT"] if e.band == band]
        physical_filter = flats[0].ref.data_id.get("physical_filter")
        implied = {"physical_filter": physical_filter} if physical_filter else {}
        _master(backbone, run, "flat", {**data_id, "band": band}, flats, detector, flat, implied)


def _master(backbone: Backbone, run: CalibrationRun, dataset_type: str, data_id: dict[str, Any],
            exposures: list[_CalibrationExposure], detector: DetectorGeometry,
            build: Callable[[list[RawFrame], list[float]], tuple[np.ndarray, np.ndarray]],
            implied: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The master of ``data_id``: read from the backbone if there, else built from ``exposures`` and put."""
    if backbone.exists(dataset_type, **data_id):
        run.products.append(StoredProduct(backbone.ref(dataset_type, **data_id), new=False))
        log.info("master already in the backbone", dataset_type=dataset_type, **data_id)
        return backbone.get(dataset_type, **data_id)
    started = time.perf_counter()
    frames = [read_raw(backbone.path("raw", **e.ref.data_id)).amps for e in exposures]
    image, variance = build(frames, [e.darktime for e in exposures])
    del frames
    product = {IMAGE: image, VARIANCE: variance}
    exposure_ids = " ".join(str(e.ref.data_id["exposure"]) for e in exposures)
    _store(backbone, run, product, dataset_type, f"build_masters from exposures {exposure_ids}",
           **data_id, **(implied or {}))
    log.info("master built", dataset_type=dataset_type, detector=detector.name, frames=len(exposures),
             seconds=round(time.perf_counter() - started, 2))
    return product


# --- what ISR needs ---------------------------------------------------------------------------------------


def isr_calibrations(backbone: Backbone, instrument: str, day_obs: int, detector: int | str,
                     band: str | None) -> IsrCalibrations:
    """Everything ISR needs for one detector on one day in one band, from the Data Backbone.

    Each product is the latest made for ``day_obs`` or before
    (:meth:`Backbone.find_calibration`).

    Parameters
    ----------
    backbone : Backbone
    instrument : str
    day_obs : int
    detector : int or str
        Detector id or name.
    band : str or None
        Band of the flat; None leaves out the bias, dark and flat (the curated products only).

    Returns
    -------
    IsrCalibrations
        Curated values exactly as ingested; masters with their variances.

    Raises
    ------
    MissingCalibrationError
        Naming every missing product.
    """
    geometry = get_detector(detector)
    wanted: list[tuple[str, str, dict[str, Any]]] = [
        ("camera constants", CAMERA_CONSTANTS_TYPE, {}), ("crosstalk", "crosstalk", {}),
        ("defects", "defects", {})]
    if band is not None:
        wanted += [("bias", "bias", {}), ("dark", "dark", {}),
                   (f"flat of band {band}", "flat", {"band": band})]
    found, missing = {}, []
    for label, dataset_type, extra in wanted:
        try:
            ref = backbone.find_calibration(dataset_type, day_obs, instrument=instrument,
                                            detector=geometry.id, **extra)
        except (DatasetNotFoundError, UnknownDatasetTypeError):  # camera_constants: no ingest yet
            missing.append(label)
            continue
        found[dataset_type] = backbone.get(dataset_type, **ref.data_id)
    if missing:
        raise MissingCalibrationError(
            f"{instrument} detector {geometry.name} ({geometry.id}): no {', '.join(missing)} made for "
            f"day_obs {day_obs} or before in the Data Backbone")
    constants = found[CAMERA_CONSTANTS_TYPE]
    values = {name: np.asarray(constants[name], dtype=np.float64) for name in AMPLIFIER_VALUES}
    masters: dict[str, np.ndarray] = {}
    if band is not None:
        for name in ("bias", "dark", "flat"):
            masters[name], masters[f"{name}_variance"] = found[name][IMAGE], found[name][VARIANCE]
    return IsrCalibrations(crosstalk=found["crosstalk"], defects=found["defects"], **values, **masters)
