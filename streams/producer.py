"""One Kafka producer for everything the summit side sends."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaProducer

from dmstream import schemas
from dmstream.topics import MAX_MESSAGE_BYTES, TopicSpec


class SummitProducer:
    """Send records to declared topics, Avro-encoded in the Confluent wire format.

    Use as ``async with SummitProducer(bootstrap) as producer: ...``; leaving
    the block flushes what is still batched.
    """

    def __init__(self, bootstrap: str, linger_ms: int = 5) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            max_request_size=MAX_MESSAGE_BYTES,
            linger_ms=linger_ms,
            acks="all",
            enable_idempotence=True,
        )
        self.sent = 0

    async def __aenter__(self) -> SummitProducer:
        await self._producer.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._producer.stop()

    async def send(self, spec: TopicSpec, key: str, record: dict[str, Any]) -> None:
        """Queue one record; it is on the broker when the returned batch is flushed."""
        value = schemas.encode(schemas.latest(spec.subject), record)
        await self._producer.send(spec.name, value=value, key=key.encode())
        self.sent += 1

    async def flush(self) -> None:
        await self._producer.flush()
