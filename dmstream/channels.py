"""The Faust topic of every declared topic an agent reads or writes, with its record type, in one place."""

from __future__ import annotations

from dmstream.app import topic
from dmstream.models import (
    AmplifierReadout,
    DeadLetter,
    DetectorProduct,
    DiaSourceBatch,
    NextVisit,
    RawArchived,
)
from dmstream.topics import (
    CALEXPS,
    CAMERA_READOUT,
    DEAD_LETTERS,
    DEFERRED,
    DIA_SOURCES,
    DIFFERENCES,
    NEXT_VISIT,
    POST_ISR,
    RAWS,
    VISIT_IMAGES,
)

next_visit = topic(NEXT_VISIT, NextVisit)
camera_readout = topic(CAMERA_READOUT, AmplifierReadout)
raws = topic(RAWS, RawArchived)
post_isr = topic(POST_ISR, DetectorProduct)
visit_images = topic(VISIT_IMAGES, DetectorProduct)
calexps = topic(CALEXPS, DetectorProduct)
differences = topic(DIFFERENCES, DetectorProduct)
deferred = topic(DEFERRED, DetectorProduct)
dia_sources = topic(DIA_SOURCES, DiaSourceBatch)
dead_letters = topic(DEAD_LETTERS, DeadLetter)
