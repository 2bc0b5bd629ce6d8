"""The observatory control system's side of the summit: announcing visits.

The announcements themselves come from the night's plan
(:func:`dmstream.streams.efd.summit_events`); this module holds the facts the
OCS side shares and sends announcements on their own.
"""

from __future__ import annotations

from collections.abc import Iterable

from dmstream.models import NextVisit
from dmstream.streams.producer import SummitProducer
from dmstream.topics import NEXT_VISIT

#: TAI - UTC in seconds since 2017.
TAI_MINUS_UTC = 37.0
#: Physical filters of LSSTCam by band.
LSSTCAM_FILTERS = {"u": "u_24", "g": "g_6", "r": "r_57", "i": "i_39", "z": "z_20", "y": "y_10"}


async def announce(producer: SummitProducer, visits: Iterable[NextVisit]) -> None:
    """Send each announcement keyed by its groupId, then flush."""
    for visit in visits:
        await producer.send(NEXT_VISIT, visit.groupId, visit.asdict())
    await producer.flush()
