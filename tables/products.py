"""Pixels in flight on this worker, between the steps of Prompt Processing.

A detector's steps run in one worker (its topics are co-partitioned), so each
step leaves its image here for the next instead of sending ~200 MB through
Kafka.  This is not a changelogged table, on purpose: pixels are too large
for changelogs, and every product can be had again from the Data Backbone
(persisted ones) or rebuilt from the archived raws, which is what a step does
when it does not find its input here (after a restart or a rebalance).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple

from dmstream.logs import get_logger

log = get_logger(__name__)


class ProductKey(NamedTuple):
    """What a product is: its dataset type, visit, detector and snap (-1 for the whole visit)."""

    dataset_type: str
    visit: int
    detector: int
    snap: int = -1


class Products:
    """A bounded store of in-flight products, oldest evicted first.

    Parameters
    ----------
    capacity : int
        Products held at most (a post-ISR full CCD is ~200 MB).
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._held: OrderedDict[ProductKey, Any] = OrderedDict()

    def put(self, key: ProductKey, product: Any) -> None:
        self._held[key] = product
        self._held.move_to_end(key)
        while len(self._held) > self.capacity:
            evicted, _ = self._held.popitem(last=False)
            log.warning("in-flight product evicted; its next step will reload or rebuild it", key=evicted)

    def take(self, key: ProductKey) -> Any | None:
        """The product, removed from the store (each is consumed by one next step), or None."""
        return self._held.pop(key, None)

    def peek(self, key: ProductKey) -> Any | None:
        """The product, left in the store, or None."""
        return self._held.get(key)

    def __len__(self) -> int:
        return len(self._held)


#: This worker's in-flight products.
in_flight = Products()
