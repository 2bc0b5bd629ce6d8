"""Kafka as the pipeline uses it: declared topics and CCD-sized messages."""

from __future__ import annotations

import hashlib
import os

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from dmstream import topics
from dmstream.infra.kafka import ensure_topics
from dmstream.infra.process import StackError
from dmstream.infra.stack import Stack
from dmstream.topics import MAX_MESSAGE_BYTES, TopicSpec

pytestmark = pytest.mark.integration


async def test_declared_topics_exist_with_their_partitions(stack: Stack) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.settings.kafka_bootstrap)
    await admin.start()
    try:
        described = {d["topic"]: len(d["partitions"])
                     for d in await admin.describe_topics([t.name for t in topics.ALL_TOPICS])}
    finally:
        await admin.close()
    assert described == {t.name: t.partitions for t in topics.ALL_TOPICS}


async def test_partition_mismatch_is_refused(stack: Stack) -> None:
    wrong = TopicSpec(topics.NEXT_VISIT.name, topics.NEXT_VISIT.partitions + 1, "x", "wrong")
    with pytest.raises(StackError, match="partitions"):
        await ensure_topics(stack.settings.kafka_bootstrap, [wrong])


async def test_unknown_topic_is_not_created_by_producing(stack: Stack) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap,
                                request_timeout_ms=3000)
    await producer.start()
    try:
        with pytest.raises(Exception):  # noqa: B017 - aiokafka raises a timeout or an unknown-topic error
            await producer.send_and_wait("dmstream.not-declared", b"x")
    finally:
        await producer.stop()


async def test_a_40_mb_message_goes_through(stack: Stack) -> None:
    bootstrap = stack.settings.kafka_bootstrap
    spec = TopicSpec("dmstream.test.large", 1, "none", "40 MB round trip")
    await ensure_topics(bootstrap, [spec])
    payload = os.urandom(40 * 1024 * 1024)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=MAX_MESSAGE_BYTES)
    await producer.start()
    try:
        sent = await producer.send_and_wait(spec.name, payload, key=b"R22_S11")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(spec.name, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                fetch_max_bytes=MAX_MESSAGE_BYTES,
                                max_partition_fetch_bytes=MAX_MESSAGE_BYTES)
    await consumer.start()
    try:
        message = await consumer.getone()
    finally:
        await consumer.stop()
    assert message.offset == sent.offset and message.key == b"R22_S11"
    assert hashlib.sha256(message.value).digest() == hashlib.sha256(payload).digest()
