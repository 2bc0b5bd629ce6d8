"""Archiving: every detector image the camera reads out goes into the Data Backbone, then is announced.

Amplifiers of one detector arrive in order on one partition; the archiver
gathers them and, once a detector is complete, writes its raw file into the
Data Backbone (ingest is idempotent: a redelivered detector is a no-op) and
announces it on the raws topic, where Prompt Processing picks it up.  The
amplifier messages are acknowledged only when their detector is archived, so
a worker that dies with a detector half-gathered leaves its offsets
uncommitted and the amplifiers are read again on restart.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import faust
import numpy as np

from dmstream import channels
from dmstream.app import app
from dmstream.backbone import DatasetConflictError
from dmstream.logs import get_logger
from dmstream.models import RawArchived
from dmstream.steps import compute, step, tai_now
from dmstream.streams.observatory import exposure_id_of
from dmstream.streams.rawfits import read_raw
from dmstream.streams.readout import DetectorReadout, ReadoutCollector
from dmstream.tables.preloaded import backbone

log = get_logger(__name__)


def archive_readout(readout: DetectorReadout) -> tuple[str, str]:
    """Write a gathered detector into the Data Backbone; its datastore path and checksum."""
    store = backbone()
    staging = store.datastore.root / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=staging) as scratch:
        path = Path(scratch) / f"{readout.obs_id}_{readout.detector_name}.fits"
        readout.hdu_list().writeto(path)
        try:
            ref = store.ingest_raw(path, provenance=f"archiver {readout.obs_id}")
        except DatasetConflictError:
            header = readout.primary
            ref = store.ref("raw", instrument=header["INSTRUME"], day_obs=int(header["DAYOBS"]),
                            exposure=exposure_id_of(int(header["DAYOBS"]), int(header["SEQNUM"])),
                            detector=int(header["DETECTOR"]))
            # Catch-up Archiving may have got there first, from the camera's buffer with EFD keywords
            # added to the header: the same pixels.  Other pixels under this data id are an error.
            stored = read_raw(store.datastore.absolute(ref.path)).amps
            if not all(np.array_equal(stored[index], pixels) for index, (_, pixels) in readout.amps.items()):
                raise
    return ref.path, ref.checksum


def notice(readout: DetectorReadout, path: str, checksum: str) -> RawArchived:
    """The raws-topic message announcing an archived detector, from its primary header."""
    header = readout.primary
    exposure = exposure_id_of(int(header["DAYOBS"]), int(header["SEQNUM"]))
    snap = int(header.get("SNAP", 0))
    return RawArchived(
        instrument=header["INSTRUME"], dayObs=int(header["DAYOBS"]), exposureId=exposure,
        visitId=exposure - snap, groupId=str(header["GROUPID"]), snap=snap,
        snapCount=int(header.get("NIMAGES", 1)), imgType=str(header["IMGTYPE"]),
        detector=int(header["DETECTOR"]), detectorName=readout.detector_name, band=str(header["FILTBAND"]),
        physicalFilter=str(header["FILTER"]), exposureTime=float(header["EXPTIME"]),
        darkTime=float(header["DARKTIME"]), mjdStart=float(header["MJD-BEG"]),
        boresightRa=float(header["RA"]), boresightDec=float(header["DEC"]),
        rotationAngle=float(header["ROTPA"]), readoutEnd=tai_now(), path=path, checksum=checksum)


@app.agent(channels.camera_readout)
async def archive(readouts):
    """Gather each detector's amplifiers, archive the raw, announce it."""
    collector = ReadoutCollector()
    waiting: dict[tuple[str, str], list[faust.EventT]] = {}
    async for event in readouts.noack().events():
        amplifier = event.value
        key = (amplifier.obsId, amplifier.detectorName)
        waiting.setdefault(key, []).append(event)
        readout = None
        async with step("archive", event) as run:
            readout = collector.add(amplifier.asdict())
            if readout is not None:
                path, checksum = await compute(archive_readout, readout)
                await channels.raws.send(key=readout.detector_name, value=notice(readout, path, checksum))
                log.info("raw archived", obs_id=readout.obs_id, detector=readout.detector_name, path=path)
        if run.failed:
            # The bad amplifier is kept on the dead-letter topic; the detector cannot be completed.
            collector.discard(*key)
        if run.failed or readout is not None:
            for done in waiting.pop(key):
                await readouts.ack(done)
