"""Replay recorded nights onto the same Kafka topics the live summit uses.

Events go out in the order of the log, paced at ``speed`` times real time, or as
fast as Kafka takes them (``speed=None``).  Two things hold a fast replay back:
the producer's in-flight bytes (so memory stays bounded), and optionally the
pipeline itself: with ``max_lag`` set, replay waits while the consumer group
``lag_group`` is more than that many readout messages behind.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from dmstream import schemas, topics
from dmstream.logs import get_logger
from dmstream.streams.night import Event, MessageEvent, NightReader, ReadoutEvent
from dmstream.streams.rawfits import RawFileError, read_raw
from dmstream.streams.readout import amplifier_messages
from dmstream.topics import MAX_MESSAGE_BYTES

log = get_logger(__name__)


@dataclass
class ReplayConfig:
    """How a replay is paced.

    Attributes
    ----------
    speed : float or None
        Multiple of real time (1.0 = as the night happened); None = as fast as
        Kafka and ``max_lag`` allow.
    max_in_flight_bytes : int
        Bytes handed to the producer but not yet acknowledged by the broker.
    max_lag : int or None
        Largest number of readout messages the pipeline may be behind.
    lag_group : str
        Consumer group whose lag ``max_lag`` bounds.
    progress_interval : float
        Seconds between progress lines.
    """

    speed: float | None = None
    max_in_flight_bytes: int = 256 * 1024 * 1024
    max_lag: int | None = None
    lag_group: str = "dmstream"
    progress_interval: float = 5.0


@dataclass
class ReplayStats:
    nights: int = 0
    messages: int = 0
    readouts: int = 0
    amplifier_messages: int = 0
    bytes_sent: int = 0
    rejected_events: int = 0
    malformed_lines: int = 0
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes_sent / 1e6 / self.seconds if self.seconds else 0.0


def _encode_message(event: MessageEvent) -> bytes:
    spec = topics.by_name(event.topic)
    schema = schemas.by_id(event.schema_id) if event.schema_id is not None else schemas.latest(spec.subject)
    if schema.subject != spec.subject:
        raise schemas.SchemaError(f"schema {schema.id} is {schema.subject}, not the schema of {event.topic}")
    return schemas.encode(schema, event.value)


def _load_readout(event: ReadoutEvent) -> list[bytes]:
    """Read a raw file and encode it as the detector's amplifier messages."""
    raw = read_raw(event.path)
    amp_schema = schemas.latest(topics.CAMERA_READOUT.subject)
    return [schemas.encode(amp_schema, message)
            for message in amplifier_messages(raw.primary_header, raw.amplifiers(), event.time)]


class _LagGate:
    """Wait while the pipeline's consumer group is too far behind on the readout topic."""

    def __init__(self, bootstrap: str, group: str, max_lag: int) -> None:
        self.bootstrap, self.group, self.max_lag = bootstrap, group, max_lag
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self._partitions = [TopicPartition(topics.CAMERA_READOUT.name, p)
                            for p in range(topics.CAMERA_READOUT.partitions)]

    async def start(self) -> None:
        await self._admin.start()
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()
        await self._admin.close()

    async def lag(self) -> int:
        committed = await self._admin.list_consumer_group_offsets(self.group, partitions=self._partitions)
        ends = await self._consumer.end_offsets(self._partitions)
        return sum(ends[tp] - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0)
                   for tp in self._partitions)

    async def wait(self) -> None:
        waited = False
        while (lag := await self.lag()) > self.max_lag:
            if not waited:
                log.info("pipeline behind, replay waits", lag=lag, max_lag=self.max_lag, group=self.group)
                waited = True
            await asyncio.sleep(0.5)


async def _prepare(events: Iterator[Event], queue: asyncio.Queue[tuple[Event, list[bytes]] | None],
                   stats: ReplayStats) -> None:
    """Encode events ahead of the sender; raw files are read in a thread meanwhile."""
    try:
        for event in events:
            try:
                if isinstance(event, MessageEvent):
                    encoded = [_encode_message(event)]
                else:
                    encoded = await asyncio.to_thread(_load_readout, event)
            except (KeyError, schemas.SchemaError) as exc:
                stats.rejected_events += 1
                log.warning("event rejected", key=event.key, reason=str(exc))
                continue
            except (RawFileError, OSError) as exc:
                stats.skipped_files.append((str(event.path), str(exc)))
                log.warning("raw file skipped", path=str(event.path), reason=str(exc))
                continue
            await queue.put((event, encoded))
    finally:
        await queue.put(None)


class _Replayer:
    """Sends prepared events with pacing, bounded in-flight bytes and progress lines."""

    def __init__(self, producer: AIOKafkaProducer, config: ReplayConfig, gate: _LagGate | None) -> None:
        self.producer, self.config, self.gate = producer, config, gate
        self.stats = ReplayStats()
        self._in_flight: deque[tuple[asyncio.Future[Any], int]] = deque()
        self._in_flight_bytes = 0
        self._started = time.monotonic()
        self._last_progress = self._started

    async def night(self, night: Path) -> None:
        reader = NightReader(night)
        log.info("replaying night", night=str(night), day_obs=reader.manifest.day_obs,
                 detectors=len(reader.manifest.detectors), speed=self.config.speed or "max")
        queue: asyncio.Queue[tuple[Event, list[bytes]] | None] = asyncio.Queue(maxsize=2)
        preparing = asyncio.create_task(_prepare(reader.events(), queue, self.stats))
        first_time: float | None = None
        night_started = time.monotonic()
        try:
            while (item := await queue.get()) is not None:
                event, encoded = item
                if first_time is None:
                    first_time = event.time
                if self.config.speed:
                    due = night_started + (event.time - first_time) / self.config.speed
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                await self._send(event, encoded)
                self._progress()
            await preparing
        finally:
            preparing.cancel()
        self.stats.malformed_lines += reader.stats.malformed
        self.stats.nights += 1

    async def _send(self, event: Event, encoded: list[bytes]) -> None:
        if isinstance(event, ReadoutEvent):
            if self.gate:
                await self.gate.wait()
            topic = topics.CAMERA_READOUT.name
            self.stats.readouts += 1
            self.stats.amplifier_messages += len(encoded)
        else:
            topic = event.topic
            self.stats.messages += 1
        for value in encoded:
            future = await self.producer.send(topic, value=value, key=event.key.encode())
            self._in_flight.append((future, len(value)))
            self._in_flight_bytes += len(value)
            self.stats.bytes_sent += len(value)
            while self._in_flight_bytes > self.config.max_in_flight_bytes:
                oldest, size = self._in_flight.popleft()
                await oldest
                self._in_flight_bytes -= size

    def _progress(self) -> None:
        now = time.monotonic()
        if now - self._last_progress < self.config.progress_interval:
            return
        self._last_progress = now
        log.info("replay progress", messages=self.stats.messages, readouts=self.stats.readouts,
                 megabytes=round(self.stats.bytes_sent / 1e6, 1),
                 mb_per_s=round(self.stats.bytes_sent / 1e6 / (now - self._started), 1),
                 skipped=len(self.stats.skipped_files), rejected=self.stats.rejected_events)

    async def drain(self) -> ReplayStats:
        await self.producer.flush()
        for future, _ in self._in_flight:
            await future
        self.stats.seconds = time.monotonic() - self._started
        return self.stats


async def replay(nights: Sequence[Path], bootstrap: str, config: ReplayConfig | None = None) -> ReplayStats:
    """Replay ``nights`` in order onto Kafka; return what was sent and what was skipped."""
    config = config or ReplayConfig()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=MAX_MESSAGE_BYTES,
                                acks="all", enable_idempotence=True, linger_ms=5)
    gate = _LagGate(bootstrap, config.lag_group, config.max_lag) if config.max_lag is not None else None
    await producer.start()
    try:
        if gate:
            await gate.start()
        replayer = _Replayer(producer, config, gate)
        for night in nights:
            await replayer.night(Path(night))
        stats = await replayer.drain()
    finally:
        await producer.stop()
        if gate:
            await gate.stop()
    log.info("replay done", nights=stats.nights, messages=stats.messages, readouts=stats.readouts,
             megabytes=round(stats.bytes_sent / 1e6, 1), seconds=round(stats.seconds, 2),
             mb_per_s=round(stats.megabytes_per_second, 1), skipped_files=len(stats.skipped_files),
             rejected_events=stats.rejected_events, malformed_lines=stats.malformed_lines)
    return stats
