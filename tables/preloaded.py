"""What Prompt Processing loads before the pixels arrive: calibrations, reference catalog, templates.

On ``nextVisit`` the preload agent fills this worker's cache for the visit's
band and day, so that a detector's first step finds everything in memory; a
step that finds nothing here loads it itself (a visit announced before the
worker started, a detector that moved here in a rebalance).  Read-mostly and
rebuilt from the Data Backbone at will, so not a changelogged table.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any, TypeVar

import pyarrow as pa

from dmstream.backbone import Backbone
from dmstream.backbone.apdb import Apdb
from dmstream.batch import single_frame
from dmstream.batch.calibrations import isr_calibrations
from dmstream.logs import get_logger
from dmstream.payloads.isr import IsrCalibrations

log = get_logger(__name__)

T = TypeVar("T")

@cache
def backbone() -> Backbone:
    """This worker's Data Backbone (from the settings)."""
    opened = Backbone.from_settings()
    single_frame.register_types(opened)
    return opened


@cache
def apdb() -> Apdb:
    """This worker's APDB (from the settings)."""
    return Apdb.from_settings()


class Preloaded:
    """A small keyed cache that loads what it lacks.

    Parameters
    ----------
    capacity : int
        Entries kept per kind; the oldest go first.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._held: dict[tuple[Any, ...], Any] = {}

    def get(self, key: tuple[Any, ...], load: Callable[[], T]) -> T:
        if key not in self._held:
            self._held[key] = load()
            log.debug("preloaded", key=key)
            while len(self._held) > self.capacity:
                self._held.pop(next(iter(self._held)))
        return self._held[key]

    def __contains__(self, key: tuple[Any, ...]) -> bool:
        return key in self._held


preloaded = Preloaded()


def calibrations(instrument: str, day_obs: int, detector: int, band: str) -> IsrCalibrations:
    """ISR calibrations of a detector for a day and band (raises MissingCalibrationError)."""
    return preloaded.get(("calibrations", instrument, day_obs, detector, band),
                         lambda: isr_calibrations(backbone(), instrument, day_obs, detector, band))


def reference_catalog(instrument: str, day_obs: int) -> pa.Table:
    """The night's reference catalog."""
    return preloaded.get(("refcat", instrument, day_obs),
                         lambda: single_frame.reference_catalog(backbone(), instrument, day_obs))
