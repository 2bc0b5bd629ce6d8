"""Prompt Processing: one agent per step, from an archived raw to DiaSources grouped by sky pixel.

::

    raws ─ isr ─▶ postIsr ─ combine_snaps ─▶ visitImage ─ calibrate ─▶ calexp
         ─ subtract ─▶ difference ─ measure ─▶ diaSources (keyed by sky pixel)

Every step reads its input from this worker's in-flight products (its topics
are co-partitioned with the raw notifications, so a detector's steps run
here), falls back to the Data Backbone or to the archived raws when the input
is not here, calls its payload off the event loop, and passes a
:class:`~dmstream.models.DetectorProduct` on.  Failures go to the dead-letter
topic and detectors over budget to the deferred topic (:mod:`dmstream.steps`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa

from dmstream import channels
from dmstream.app import app
from dmstream.batch import single_frame, templates
from dmstream.logs import get_logger
from dmstream.models import DetectorProduct, DiaSourceBatch, RawArchived
from dmstream.payloads import coadd, cutouts, diasource, forced, snaps, subtract
from dmstream.payloads.ids import dia_source_ids
from dmstream.payloads.image import CcdImage
from dmstream.payloads.isr import IsrConfig
from dmstream.steps import StepRun, compute, over_budget, step
from dmstream.tables.dia_objects import association_region
from dmstream.tables.preloaded import apdb, backbone, calibrations, reference_catalog
from dmstream.tables.products import ProductKey, in_flight

log = get_logger(__name__)

POST_ISR_TYPE, VISIT_IMAGE_TYPE = "postIsr", "visitImage"
CALEXP_TYPE, DIFFERENCE_TYPE = "calexp", "difference"


def _product(raw: RawArchived) -> DetectorProduct:
    return DetectorProduct(
        instrument=raw.instrument, dayObs=raw.dayObs, visitId=raw.visitId, groupId=raw.groupId,
        snap=raw.snap, snapCount=raw.snapCount, detector=raw.detector, detectorName=raw.detectorName,
        band=raw.band, datasetType=POST_ISR_TYPE, readoutEnd=raw.readoutEnd, stepSeconds={})


def _next(product: DetectorProduct, dataset_type: str, run: StepRun, snap: int | None = None
          ) -> DetectorProduct:
    """The message that hands ``product``'s detector to the next step."""
    return product.derive(datasetType=dataset_type, snap=product.snap if snap is None else snap,
                          stepSeconds={**product.stepSeconds, run.name: run.seconds})


def _key(product: DetectorProduct, dataset_type: str, snap: int = -1) -> ProductKey:
    return ProductKey(dataset_type, product.visitId, product.detector, snap)


# --- the work of each step: I/O and one payload, run off the event loop -------------------------------------


#: Snaps leave their cosmic rays to the snap combination, which finds them in the snaps' difference.
SNAP_ISR = IsrConfig(do_cosmic_rays=False)


def post_isr_image(product: DetectorProduct, snap: int) -> CcdImage:
    """ISR of one snap of a detector from its archived raw, with the preloaded calibrations."""
    return single_frame.post_isr_image(
        backbone(), product.instrument, product.dayObs, _snap_exposure(product, snap), product.detector,
        product.band, calibrations(product.instrument, product.dayObs, product.detector, product.band),
        SNAP_ISR if product.snapCount > 1 else None)


def _snap_exposure(product: DetectorProduct, snap: int) -> int:
    # A visit's snaps are consecutive exposures and the visit id is the first one's exposure id.
    return product.visitId + snap


def visit_image(product: DetectorProduct) -> CcdImage:
    """The visit image of a detector, from its post-ISR snaps (here, or rebuilt from the raws)."""
    images = []
    for snap in range(product.snapCount):
        image = in_flight.take(_key(product, POST_ISR_TYPE, snap))
        if image is None:
            log.info("post-ISR snap not in flight here; rebuilding it from the raw", visit=product.visitId,
                     detector=product.detectorName, snap=snap)
            image = post_isr_image(product, snap)
        images.append(image)
    return snaps.run(images).exposure


def calibrate_visit(product: DetectorProduct, image: CcdImage) -> CcdImage:
    """Calibrate a visit image against the night's reference catalog; the calexp goes to the backbone."""
    result = single_frame.calibrate(image, reference_catalog(product.instrument, product.dayObs))
    backbone().put(result.image, CALEXP_TYPE, provenance="prompt calibrate", instrument=product.instrument,
                   day_obs=product.dayObs, visit=product.visitId, detector=product.detector)
    return result.image


def _data_id(product: DetectorProduct) -> dict[str, object]:
    return {"instrument": product.instrument, "day_obs": product.dayObs, "visit": product.visitId,
            "detector": product.detector}


def stored_calexp(product: DetectorProduct) -> CcdImage:
    return backbone().get(CALEXP_TYPE, **_data_id(product))


def difference_image(product: DetectorProduct, calexp: CcdImage) -> subtract.SubtractResult:
    """Cut the template from the sky tiles, subtract it; the difference image goes to the backbone."""
    load = partial(templates.stored_tile, backbone())
    tiles = templates.templates_for(calexp.wcs, calexp.shape, product.band, load)
    template = coadd.template_for(tiles, calexp.wcs, calexp.shape).template
    result = subtract.run(calexp, template)
    backbone().put(result.difference, DIFFERENCE_TYPE, provenance="prompt subtract", **_data_id(product))
    return result


@dataclass
class Measured:
    """A detector-visit's DiaSources with their cutouts, and its forced photometry of known DiaObjects."""

    dia_sources: pa.Table
    cutouts: pa.Table
    forced_sources: pa.Table
    midpoint: float


def _footprint_objects(calexp: CcdImage) -> pa.Table:
    """DiaObjects the APDB knows within a detector's footprint (its corners' RA/Dec box)."""
    rows, cols = calexp.shape
    ra, dec = calexp.wcs.pixel_to_world_values(np.array([0, cols - 1, 0, cols - 1]),
                                               np.array([0, 0, rows - 1, rows - 1]))
    return apdb().dia_objects_in_box(float(np.min(ra)), float(np.max(ra)), float(np.min(dec)),
                                     float(np.max(dec)))


def measure_detector(product: DetectorProduct, calexp: CcdImage,
                     subtraction: subtract.SubtractResult) -> Measured:
    """Detect and measure DiaSources, cut their stamps, force-photometer known DiaObjects; store both."""
    first_id = int(dia_source_ids(product.visitId, product.detector, 1)[0])
    table = diasource.run(subtraction, calexp, visit=product.visitId, detector=product.detector,
                          id_offset=first_id).table
    stamps = cutouts.make_cutouts(calexp, subtraction.template, subtraction.difference,
                                  table["x"].to_numpy(), table["y"].to_numpy())
    cutout_table = pa.table({
        "diaSourceId": table["diaSourceId"],
        **{name: pa.array([getattr(stamp, name) for stamp in stamps], pa.binary())
           for name in ("cutoutScience", "cutoutTemplate", "cutoutDifference")}})
    midpoint = float(table["midpointMjdTai"][0].as_py()) if table.num_rows else float(
        calexp.metadata["MJD-OBS"]) + calexp.exptime / 2 / 86400
    forced_sources = forced.run(subtraction.difference, calexp, _footprint_objects(calexp),
                                visit=product.visitId, detector=product.detector,
                                midpoint_mjd_tai=midpoint).table
    data_id = _data_id(product)
    backbone().put(table, "diaSource", provenance="prompt measure", **data_id)
    backbone().put(forced_sources, "diaForcedSource", provenance="prompt measure", **data_id)
    return Measured(table, cutout_table, forced_sources, midpoint)


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def batches_by_sky_pixel(product: DetectorProduct, measured: Measured, run: StepRun
                         ) -> list[tuple[str, DiaSourceBatch]]:
    """The DiaSources of a detector-visit grouped by association region, keyed by it."""
    table = measured.dia_sources
    if table.num_rows == 0:
        return []
    regions = association_region(table["ra"].to_numpy(), table["dec"].to_numpy())
    batches = []
    for region in np.unique(regions):
        rows = pa.array(np.flatnonzero(regions == region))
        batches.append((str(region), DiaSourceBatch(
            instrument=product.instrument, visitId=product.visitId, detector=product.detector,
            skyPixel=int(region), band=product.band, midpointMjdTai=measured.midpoint,
            readoutEnd=product.readoutEnd, stepSeconds={**product.stepSeconds, run.name: run.seconds},
            diaSources=_ipc(table.take(rows)), cutouts=_ipc(measured.cutouts.take(rows)))))
    return batches


# --- the agents ---------------------------------------------------------------------------------------------


@app.agent(channels.raws)
async def isr(raws):
    """Instrument signature removal of every science raw, as soon as it is archived."""
    async for event in raws.events():
        raw: RawArchived = event.value
        if raw.imgType != "OBJECT":
            continue
        product = _product(raw)
        if await over_budget("isr", product):
            continue
        async with step("isr", event) as run:
            image = await compute(post_isr_image, product, raw.snap)
            in_flight.put(_key(product, POST_ISR_TYPE, raw.snap), image)
            await channels.post_isr.send(key=raw.detectorName, value=_next(product, POST_ISR_TYPE, run))


@app.agent(channels.post_isr)
async def combine_snaps(post_isr_products):
    """Once a detector's last snap is through ISR, combine its snaps into the visit image."""
    async for event in post_isr_products.events():
        product: DetectorProduct = event.value
        # A detector's snaps arrive in order on one partition: the last one finds the others here.
        if product.snap < product.snapCount - 1 or await over_budget("snaps", product):
            continue
        async with step("snaps", event) as run:
            image = await compute(visit_image, product)
            in_flight.put(_key(product, VISIT_IMAGE_TYPE), image)
            await channels.visit_images.send(key=product.detectorName,
                                         value=_next(product, VISIT_IMAGE_TYPE, run, snap=-1))


@app.agent(channels.visit_images)
async def calibrate(visit_images):
    """Background, PSF, astrometry and photometry of each visit image: the calexp."""
    async for event in visit_images.events():
        product: DetectorProduct = event.value
        if await over_budget("calibrate", product):
            continue
        async with step("calibrate", event) as run:
            image = in_flight.take(_key(product, VISIT_IMAGE_TYPE))
            if image is None:
                image = await compute(visit_image, product)
            calexp = await compute(calibrate_visit, product, image)
            in_flight.put(_key(product, CALEXP_TYPE), calexp)
            await channels.calexps.send(key=product.detectorName, value=_next(product, CALEXP_TYPE, run))


@app.agent(channels.calexps)
async def subtract_template(calexps):
    """Template from the sky tiles, PSF matching and subtraction (ZOGY): the difference image."""
    async for event in calexps.events():
        product: DetectorProduct = event.value
        if await over_budget("subtract", product):
            continue
        async with step("subtract", event) as run:
            calexp = in_flight.peek(_key(product, CALEXP_TYPE))
            if calexp is None:
                calexp = await compute(stored_calexp, product)
                in_flight.put(_key(product, CALEXP_TYPE), calexp)
            subtraction = await compute(difference_image, product, calexp)
            in_flight.put(_key(product, DIFFERENCE_TYPE), subtraction)
            await channels.differences.send(key=product.detectorName,
                                            value=_next(product, DIFFERENCE_TYPE, run))


@app.agent(channels.differences)
async def measure(differences):
    """DiaSources of each difference image, with cutouts and forced photometry, sent on by sky region."""
    async for event in differences.events():
        product: DetectorProduct = event.value
        if await over_budget("measure", product):
            continue
        async with step("measure", event) as run:
            calexp = in_flight.take(_key(product, CALEXP_TYPE))
            subtraction = in_flight.take(_key(product, DIFFERENCE_TYPE))
            if calexp is None or subtraction is None:
                calexp = await compute(stored_calexp, product)
                subtraction = await compute(difference_image, product, calexp)
            measured = await compute(measure_detector, product, calexp, subtraction)
            for key, batch in batches_by_sky_pixel(product, measured, run):
                await channels.dia_sources.send(key=key, value=batch)
            await compute(apdb().store, "DiaForcedSource", measured.forced_sources)
