"""A stand-in for the observatory control system's announcements.

Until the scheduler of the simulated summit exists, visits are drawn at random
over the southern sky with the cadence of LSST (a visit every ~37 s).
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from dmstream.models import NextVisit
from dmstream.streams.producer import SummitProducer
from dmstream.topics import NEXT_VISIT

#: TAI - UTC in seconds since 2017.
TAI_MINUS_UTC = 37.0
#: Physical filters of LSSTCam by band.
LSSTCAM_FILTERS = {"u": "u_24", "g": "g_6", "r": "r_57", "i": "i_39", "z": "z_20", "y": "y_10"}
BANDS = tuple(LSSTCAM_FILTERS)
#: Lead time of an announcement before the exposure starts, s.
ANNOUNCE_LEAD = 25.0
VISIT_CADENCE = 37.0


def random_visits(count: int, start_utc: float, seed: int = 0,
                  instrument: str = "LSSTCam") -> list[NextVisit]:
    """``count`` announcements, one every :data:`VISIT_CADENCE` s from ``start_utc``.

    Parameters
    ----------
    start_utc : float
        UTC unix time of the first announcement, s.
    """
    rng = np.random.default_rng(seed)
    visits = []
    for i in range(count):
        sent_utc = start_utc + i * VISIT_CADENCE
        start_tai = sent_utc + ANNOUNCE_LEAD + TAI_MINUS_UTC
        group_id = datetime.fromtimestamp(start_tai - TAI_MINUS_UTC, UTC).strftime(
            "%Y-%m-%dT%H:%M:%S.%f")[:-3]
        band = BANDS[int(rng.integers(len(BANDS)))]
        nimages = int(rng.choice([1, 2]))
        visits.append(NextVisit(
            private_sndStamp=sent_utc + TAI_MINUS_UTC,
            private_efdStamp=sent_utc,
            private_seqNum=i + 1,
            instrument=instrument,
            groupId=group_id,
            coordinateSystem=2,
            position=[float(rng.uniform(0, 360)), float(np.degrees(np.arcsin(rng.uniform(-1, 0.3))))],
            startTime=start_tai,
            rotationSystem=2,
            cameraAngle=float(rng.uniform(-90, 90)),
            filters=LSSTCAM_FILTERS[band],
            dome=2,
            duration=32.0 if nimages == 1 else 34.0,
            nimages=nimages,
            survey="BLOCK-365",
        ))
    return visits


async def announce(producer: SummitProducer, visits: list[NextVisit]) -> None:
    """Send each announcement keyed by its groupId, then flush."""
    for visit in visits:
        await producer.send(NEXT_VISIT, visit.groupId, visit.asdict())
    await producer.flush()
