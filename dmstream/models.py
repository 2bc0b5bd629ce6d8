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
