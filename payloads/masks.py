"""Mask planes: one bit per condition of a pixel, as in Rubin's afw mask planes."""

from __future__ import annotations

from enum import IntFlag

import numpy as np

MASK_DTYPE = np.uint32


class MaskPlane(IntFlag):
    """Bit flags of the mask plane of a :class:`~dmstream.payloads.image.CcdImage`.

    The names are those of Rubin's mask planes, so that cutouts and flags read
    the same to people who know the LSST pipelines.
    """

    BAD = 1 << 0  #: defect (dead or hot column/pixel) from the defect map
    SAT = 1 << 1  #: at or above the saturation level, or in its bleed trail
    INTRP = 1 << 2  #: value interpolated over a BAD, SAT or CR pixel
    CR = 1 << 3  #: cosmic ray
    EDGE = 1 << 4  #: too close to the detector edge for detection
    DETECTED = 1 << 5  #: part of a positive detection footprint
    DETECTED_NEGATIVE = 1 << 6  #: part of a negative detection footprint
    SUSPECT = 1 << 7  #: in the non-linear regime below saturation
    NO_DATA = 1 << 8  #: no valid data (e.g. outside a warped template)
    CROSSTALK = 1 << 9  #: crosstalk correction from a saturated source was large
    INJECTED = 1 << 10  #: a synthetic source was added here (never alerted on)
    STREAK = 1 << 11  #: part of a satellite or fast-mover trail

    @classmethod
    def names(cls, bits: int) -> list[str]:
        """The names of the planes set in ``bits``."""
        return [plane.name for plane in cls if bits & plane and plane.name]


def empty_mask(shape: tuple[int, int]) -> np.ndarray:
    return np.zeros(shape, dtype=MASK_DTYPE)
