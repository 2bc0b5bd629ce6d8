"""DiaObjects, the association state, in a changelogged table keyed by sky pixel.

Two HEALPix grids are at work.  DiaObjects are stored by their fine pixel
(HEALPix order 10, 3.4 arcmin), so a DiaSource
finds its candidates in the few values its 1″ match circle touches.
DiaSources travel keyed by their *association region*, the coarse pixel
(order :data:`REGION_ORDER`, 1.8°) that holds those fine pixels: Faust writes a
table's changelog to the partition of the event being processed, so every
fine pixel of a region lives on the region's partition, and a source near a
fine-pixel boundary finds its neighbour's objects in the same worker.
Objects within 1″ of a region's own boundary (a few in ten thousand) are the
case this leaves open: they are matched only within their region.
"""

from __future__ import annotations

import faust
import hpgeom
import numpy as np
from numpy.typing import ArrayLike, NDArray

from dmstream.app import app
from dmstream.topics import DIA_SOURCES

#: HEALPix order of the association regions that key the DiaSource stream.
REGION_ORDER = 5

#: Per fine sky pixel, the DiaObjects stored there, as an Arrow IPC stream of association state rows.
dia_objects = app.Table(
    "dia-objects",
    schema=faust.Schema(key_type=str, value_type=bytes, key_serializer="raw", value_serializer="raw"),
    partitions=DIA_SOURCES.partitions,
    help="DiaObject association state by fine sky pixel (Arrow IPC)",
)


def association_region(ra: ArrayLike, dec: ArrayLike) -> NDArray[np.int64]:
    """The association region (coarse nested HEALPix pixel) of each position, deg."""
    return hpgeom.angle_to_pixel(2**REGION_ORDER, np.asarray(ra, float), np.asarray(dec, float),
                                 nest=True).astype(np.int64)
