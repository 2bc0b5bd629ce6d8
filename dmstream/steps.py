"""How an agent runs one step of a flow: off the event loop, timed, and never stopping the stream.

The science of a step is CPU-bound for seconds.  Run on the event loop it
would starve Kafka heartbeats and every other agent of the worker, so
payloads run on one thread beside the loop (numpy and the FFTs release the
GIL; a worker is one core of work, and more cores are more workers).

A step that fails sends its message to the dead-letter topic, byte for byte
with the reason, counts it, logs it, and lets the stream go on.  A detector
whose readout ended longer ago than its time budget is not started on: it is
recorded on the deferred topic for Offline Processing to redo, as the seed's
Prompt → Offline interface has it.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import faust

from dmstream import channels
from dmstream.app import SETTINGS, app
from dmstream.logs import get_logger
from dmstream.models import DeadLetter, DetectorProduct
from dmstream.streams.ocs import TAI_MINUS_UTC

log = get_logger(__name__)

T = TypeVar("T")

#: What this worker has counted: ``dead_letters.<step>``, ``deferred.<step>``, ``done.<step>``.
COUNTERS: Counter[str] = Counter()

_PAYLOADS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="payload")


def tai_now() -> float:
    """Now, TAI unix seconds."""
    return time.time() + TAI_MINUS_UTC


async def compute(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a payload on the worker's payload thread and wait for it without blocking the loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_PAYLOADS, functools.partial(function, *args, **kwargs))


@dataclass
class StepRun:
    """One run of a step on one message: its name, the seconds spent so far, whether it failed."""

    name: str
    started: float = field(default_factory=time.perf_counter)
    failed: bool = False

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


async def send_dead_letter(name: str, event: faust.EventT, error: BaseException) -> None:
    """Keep a message a step could not process on the dead-letter topic, with why."""
    message = event.message
    COUNTERS[f"dead_letters.{name}"] += 1
    log.error("step failed; message sent to the dead-letter topic", step=name, topic=message.topic,
              partition=message.partition, offset=message.offset, error=type(error).__name__,
              reason=str(error))
    await channels.dead_letters.send(key=name, value=DeadLetter(
        step=name, topic=message.topic, partition=message.partition, offset=message.offset,
        reason=str(error) or repr(error), errorType=type(error).__name__, time=tai_now(),
        key=_as_bytes(message.key), value=_as_bytes(message.value)))


def _as_bytes(value: Any) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return str(value).encode()


@asynccontextmanager
async def step(name: str, event: faust.EventT) -> AsyncIterator[StepRun]:
    """Run the body as step ``name`` on ``event``; a failure is dead-lettered and the stream goes on."""
    run = StepRun(name)
    try:
        yield run
    except Exception as error:
        run.failed = True
        await send_dead_letter(name, event, error)
    else:
        COUNTERS[f"done.{name}"] += 1


async def over_budget(name: str, product: DetectorProduct) -> bool:
    """Whether the detector of ``product`` is past its time budget; if so it is deferred and recorded."""
    late = tai_now() - product.readoutEnd
    if late <= SETTINGS.detector_budget:
        return False
    COUNTERS[f"deferred.{name}"] += 1
    log.warning("detector over its time budget; deferred to Offline Processing", step=name,
                visit=product.visitId, detector=product.detectorName, seconds_since_readout=round(late, 1),
                budget=SETTINGS.detector_budget)
    await channels.deferred.send(key=product.detectorName, value=product.derive(datasetType=name))
    return True


@app.timer(interval=60.0)
async def report_counters() -> None:
    """A periodic summary line of what this worker has done, for the logs."""
    if COUNTERS:
        log.info("step counters", **dict(sorted(COUNTERS.items())))
