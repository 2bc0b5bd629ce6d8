"""Single-frame processing of archived raws: ISR and calibration against the reference catalog.

Prompt Processing's agents and the batch jobs (templates, reprocessing) make
post-ISR and calibrated images the same way, from what the Data Backbone
holds: the raw, the calibration products of its day (:mod:`.calibrations`)
and the night's reference catalog.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dmstream.backbone import Backbone, DatasetRef
from dmstream.batch.calibrations import isr_calibrations
from dmstream.payloads.calibrate import Calibrate, CalibrateResult
from dmstream.payloads.image import CcdImage
from dmstream.payloads.isr import Isr, IsrCalibrations, IsrConfig
from dmstream.streams.night import Manifest, NightFormatError
from dmstream.streams.rawfits import read_raw

#: Reference catalogs are stored per instrument and night, covering the night's fields.
REFCAT_TYPE = "refcat"


def register_types(backbone: Backbone) -> None:
    """Register the dataset types this module stores (a no-op when they exist)."""
    backbone.register_type(REFCAT_TYPE, ("instrument", "day_obs"), "parquet",
                           description="Gaia-like reference catalog covering a night's fields")


def ingest_reference_catalog(night_dir: str | Path, backbone: Backbone) -> DatasetRef:
    """Put a recorded night's reference catalog into the backbone (a no-op if it is there).

    Raises
    ------
    NightFormatError
        If the night has no reference catalog.
    """
    night = Path(night_dir)
    manifest = Manifest.read(night)
    if not manifest.reference_catalog:
        raise NightFormatError(f"{night}: the night has no reference catalog")
    register_types(backbone)
    catalog = pq.read_table(night / manifest.reference_catalog)
    return backbone.put(catalog, REFCAT_TYPE, provenance=f"recorded night {night.name}",
                        instrument=manifest.instrument, day_obs=manifest.day_obs)


def reference_catalog(backbone: Backbone, instrument: str, day_obs: int) -> pa.Table:
    """The reference catalog of a night."""
    register_types(backbone)
    return backbone.get(REFCAT_TYPE, instrument=instrument, day_obs=day_obs)


def post_isr_image(backbone: Backbone, instrument: str, day_obs: int, exposure: int, detector: int,
                   band: str, calibs: IsrCalibrations | None = None, config: IsrConfig | None = None
                   ) -> CcdImage:
    """ISR of one archived raw, with the header's approximate WCS, band and start time attached.

    Parameters
    ----------
    calibs : IsrCalibrations, optional
        Default: assembled from the backbone for the raw's day and band.
    config : IsrConfig, optional
        Snaps that are combined later leave their cosmic rays to the combination.

    Raises
    ------
    DatasetNotFoundError
        If the raw is not in the backbone.
    MissingCalibrationError
        If a calibration product is.
    """
    raw = read_raw(backbone.path("raw", instrument=instrument, day_obs=day_obs, exposure=exposure,
                                 detector=detector))
    header = raw.primary_header
    calibs = calibs or isr_calibrations(backbone, instrument, day_obs, detector, band)
    result = Isr(config).run(raw.amps, raw.detector, calibs, float(header["EXPTIME"]),
                             float(header["DARKTIME"]))
    return replace(result.exposure, wcs=raw.wcs(), band=band,
                   metadata={**result.exposure.metadata, "OBSID": str(header["OBSID"]),
                             "MJD-OBS": float(header["MJD-OBS"]), "DETECTOR": detector})


def calibrate(image: CcdImage, refcat: pa.Table) -> CalibrateResult:
    """Calibrate a post-ISR visit image, starting from its header WCS, at its epoch."""
    return Calibrate().run(image, image.wcs, refcat, float(image.metadata["MJD-OBS"]))
