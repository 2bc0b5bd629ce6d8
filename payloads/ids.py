"""Integer ids of Level 1 records, packed so that the same inputs always give the same id.

A replay or a restarted worker must name a DiaSource exactly as the first run
did, or a broker would see two alerts for one detection.  Ids are therefore
bit-packed from what identifies a record rather than drawn from a counter:

- ``ccdVisitId`` = visit * 256 + detector (LSSTCam has 205 detectors, < 2⁸);
- ``diaSourceId`` = ccdVisitId * 2¹⁴ + the source's index on that detector-visit.

Visit ids follow Rubin's exposure ids (day_obs * 10⁵ + sequence number, below
2⁴¹), so a diaSourceId stays below 2⁶³ and fits Avro's and SQL's signed long.
A DiaObject takes the diaSourceId of the DiaSource that created it, as in
Rubin's association.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

DETECTOR_BITS = 8
SOURCE_BITS = 14
#: Most DiaSources one detector-visit can number.
MAX_SOURCES_PER_CCD = 1 << SOURCE_BITS
MAX_VISIT = 1 << (63 - DETECTOR_BITS - SOURCE_BITS)


class IdOverflowError(ValueError):
    """A visit, detector or source index does not fit its bits."""


def ccd_visit_id(visit: int, detector: int) -> int:
    """The id of one detector in one visit."""
    if not 0 <= visit < MAX_VISIT:
        raise IdOverflowError(f"visit {visit} is outside [0, 2^{63 - DETECTOR_BITS - SOURCE_BITS})")
    if not 0 <= detector < 1 << DETECTOR_BITS:
        raise IdOverflowError(f"detector {detector} is outside [0, {1 << DETECTOR_BITS})")
    return (visit << DETECTOR_BITS) | detector


def dia_source_ids(visit: int, detector: int, count: int) -> NDArray[np.int64]:
    """The diaSourceIds of the first ``count`` DiaSources of a detector-visit."""
    if count > MAX_SOURCES_PER_CCD:
        raise IdOverflowError(f"{count} DiaSources on one detector-visit; at most {MAX_SOURCES_PER_CCD} "
                              "can be numbered")
    return (np.int64(ccd_visit_id(visit, detector)) << SOURCE_BITS) + np.arange(count, dtype=np.int64)


def split_dia_source_id(dia_source_id: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.int64],
                                                          NDArray[np.int64]]:
    """Visit, detector and source index packed into diaSourceIds."""
    ids = np.asarray(dia_source_id, dtype=np.int64)
    index = ids & (MAX_SOURCES_PER_CCD - 1)
    ccd_visit = ids >> SOURCE_BITS
    return ccd_visit >> DETECTOR_BITS, ccd_visit & ((1 << DETECTOR_BITS) - 1), index
