"""Record live summit topics into a recorded night (``docs/recorded-night.md``).

Messages are decoded with the schema their wire-format id names and written to
the event log at their send time; amplifier readouts are gathered per detector
and written as raw files.  Lines are sorted by time when the recording ends,
because topics interleave in arrival order, not in send order.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from dmstream import schemas, topics
from dmstream.logs import get_logger
from dmstream.streams.night import EventLogWriter, Manifest, raw_path
from dmstream.streams.rawfits import write_readout
from dmstream.streams.readout import ReadoutCollector, ReadoutError
from dmstream.topics import MAX_MESSAGE_BYTES, TopicSpec

log = get_logger(__name__)


@dataclass
class RecordStats:
    messages: int = 0
    readouts: int = 0
    rejected: int = 0
    incomplete_readouts: int = 0
    detectors: set[str] = field(default_factory=set)


@dataclass(order=True)
class _Line:
    time: float
    order: int
    kind: str = field(compare=False)
    payload: dict[str, Any] = field(compare=False)


async def record(out: Path, bootstrap: str, specs: tuple[TopicSpec, ...] | None = None,
                 from_beginning: bool = False, idle_seconds: float = 30.0,
                 duration: float | None = None, instrument: str = "LSSTCam") -> RecordStats:
    """Record ``specs`` (default: every summit topic and the readout) until idle or ``duration``.

    Parameters
    ----------
    from_beginning : bool
        Start at the earliest retained offsets instead of the live end.
    idle_seconds : float
        Stop once nothing has arrived for this long after the first message.
    """
    specs = specs or (*topics.SUMMIT_TOPICS, topics.CAMERA_READOUT)
    out = Path(out)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False,
        fetch_max_bytes=MAX_MESSAGE_BYTES, max_partition_fetch_bytes=MAX_MESSAGE_BYTES,
    )
    stats = RecordStats()
    collector = ReadoutCollector()
    lines: list[_Line] = []
    day_obs = 0
    await consumer.start()
    try:
        partitions = [TopicPartition(s.name, p) for s in specs for p in range(s.partitions)]
        consumer.assign(partitions)
        if from_beginning:
            await consumer.seek_to_beginning(*partitions)
        else:
            await consumer.seek_to_end(*partitions)
        started = last_message = time.monotonic()
        while True:
            batches = await consumer.getmany(timeout_ms=500, max_records=200)
            now = time.monotonic()
            for messages in batches.values():
                for message in messages:
                    last_message = now
                    try:
                        value = schemas.decode(message.value)
                    except schemas.SchemaError as exc:
                        stats.rejected += 1
                        log.warning("undecodable message not recorded", topic=message.topic,
                                    offset=message.offset, reason=str(exc))
                        continue
                    key = message.key.decode() if message.key else ""
                    if message.topic == topics.CAMERA_READOUT.name:
                        try:
                            readout = collector.add(value)
                        except ReadoutError as exc:
                            stats.rejected += 1
                            log.warning("readout message not recorded", reason=str(exc))
                            continue
                        if readout is None:
                            continue
                        header = readout.primary
                        day_obs = day_obs or int(header.get("DAYOBS", 0))
                        path = raw_path(out, int(header.get("DAYOBS", 0)), int(header.get("SEQNUM", 0)),
                                        readout.obs_id, readout.detector_name)
                        await asyncio.to_thread(write_readout, path, readout)
                        stats.readouts += 1
                        stats.detectors.add(readout.detector_name)
                        lines.append(_Line(value["private_sndStamp"], len(lines), "readout",
                                           {"path": path, "key": key}))
                    else:
                        sent = float(value.get("private_sndStamp", message.timestamp / 1000.0))
                        lines.append(_Line(sent, len(lines), "message",
                                           {"topic": message.topic, "key": key, "value": value,
                                            "schema_id": schemas.schema_id(message.value)}))
                        stats.messages += 1
            if duration is not None and now - started >= duration:
                break
            if lines and now - last_message >= idle_seconds:
                break
    finally:
        await consumer.stop()
    stats.incomplete_readouts = len(collector.incomplete)
    for readout in collector.incomplete:
        log.warning("readout incomplete at the end of the recording", obs_id=readout.obs_id,
                    detector=readout.detector_name, amplifiers=len(readout.amps))
    with EventLogWriter(out) as writer:
        for line in sorted(lines):
            if line.kind == "readout":
                writer.readout(line.time, line.payload["path"], line.payload["key"])
            else:
                writer.message(line.time, **line.payload)
    Manifest(instrument=instrument, day_obs=day_obs, detectors=sorted(stats.detectors),
             description=f"recorded from {bootstrap}").write(out)
    log.info("night recorded", out=str(out), messages=stats.messages, readouts=stats.readouts,
             rejected=stats.rejected, incomplete=stats.incomplete_readouts)
    return stats
