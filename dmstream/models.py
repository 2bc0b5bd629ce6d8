"""Typed Faust records of the messages on our topics.

Field names follow the Avro schemas in ``schemas/`` (which follow SAL and the
Science Data Model), so a record serialises to its schema unchanged.
"""

from __future__ import annotations

import faust


class NextVisit(faust.Record, include_metadata=False):
    """ScriptQueue ``nextVisit``: the OCS announces a visit before it starts.

    Times are TAI unix seconds except ``private_efdStamp`` (UTC unix seconds);
    angles in degrees; ``duration`` in seconds.
    """

    private_sndStamp: float
    private_efdStamp: float
    instrument: str
    groupId: str
    coordinateSystem: int
    position: list[float]
    startTime: float
    rotationSystem: int
    cameraAngle: float
    filters: str
    dome: int
    duration: float
    nimages: int
    survey: str
    private_seqNum: int = 0
    private_origin: int = 0
    private_identity: str = "ScriptQueue:1"
    salIndex: int = 1
    scriptSalIndex: int = 0
    totalCheckpoints: int = 0

    @property
    def band(self) -> str:
        """The band of the physical filter (``r_57`` → ``r``)."""
        return self.filters[:1]


class AmplifierReadout(faust.Record, include_metadata=False):
    """The pixels and headers of one amplifier of one detector of one exposure (docs/raw-format.md)."""

    instrument: str
    obsId: str
    exposureId: int
    dayObs: int
    seqNum: int
    groupId: str
    imgType: str
    detector: int
    detectorName: str
    ampIndex: int
    ampName: str
    ampCount: int
    rows: int
    cols: int
    dtype: str
    compression: str
    pixels: bytes
    primaryHeader: str
    ampHeader: str
    private_sndStamp: float


class RawArchived(faust.Record, include_metadata=False):
    """The archiver's notice that a raw detector image is in the Data Backbone.

    Times: ``mjdStart`` MJD TAI, ``readoutEnd`` TAI unix seconds; angles in
    degrees; exposure and dark time in seconds.
    """

    instrument: str
    dayObs: int
    exposureId: int
    visitId: int
    groupId: str
    snap: int
    snapCount: int
    imgType: str
    detector: int
    detectorName: str
    band: str
    physicalFilter: str
    exposureTime: float
    darkTime: float
    mjdStart: float
    boresightRa: float
    boresightDec: float
    rotationAngle: float
    readoutEnd: float
    path: str
    checksum: str


class DetectorProduct(faust.Record, include_metadata=False):
    """A Prompt Processing step's product for one detector of one visit (``snap`` -1) or one snap."""

    instrument: str
    dayObs: int
    visitId: int
    groupId: str
    snap: int
    snapCount: int
    detector: int
    detectorName: str
    band: str
    datasetType: str
    readoutEnd: float
    stepSeconds: dict[str, float]


class DiaSourceBatch(faust.Record, include_metadata=False):
    """DiaSources of one detector-visit in one sky pixel, as Arrow IPC streams, with their cutouts."""

    instrument: str
    visitId: int
    detector: int
    skyPixel: int
    band: str
    midpointMjdTai: float
    readoutEnd: float
    stepSeconds: dict[str, float]
    diaSources: bytes
    cutouts: bytes


class DeadLetter(faust.Record, include_metadata=False):
    """A message a step gave up on, kept byte for byte with the reason."""

    step: str
    topic: str
    partition: int
    offset: int
    reason: str
    errorType: str
    time: float
    key: bytes | None = None
    value: bytes | None = None
