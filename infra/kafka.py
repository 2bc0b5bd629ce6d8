"""Apache Kafka in KRaft mode, one node on loopback, with jars from Maven Central.

The broker's classpath is resolved once by Maven (``kafka_2.13`` and its
transitive dependencies, plus the SLF4J binding for Log4j 2) into
``<cache_dir>/kafka-<version>/libs``; the storage is formatted with
``kafka.tools.StorageTool`` and the broker runs as ``java kafka.Kafka``.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord

from dmstream import schemas, topics
from dmstream.infra.process import StackError, run_checked
from dmstream.infra.service import Service, render_template
from dmstream.logs import get_logger
from dmstream.topics import MAX_MESSAGE_BYTES, TopicSpec

log = get_logger(__name__)

KAFKA_VERSION = "4.1.1"
LOG4J_VERSION = "2.24.3"


class Kafka(Service):
    name = "kafka"
    start_timeout = 90.0

    @property
    def ports(self) -> dict[str, int]:
        return {
            "kafka_port": self.settings.kafka_port,
            "kafka_controller_port": self.settings.kafka_controller_port,
        }

    @property
    def libs_dir(self) -> Path:
        return self.settings.cache_dir / f"kafka-{KAFKA_VERSION}" / "libs"

    @property
    def _installed_stamp(self) -> Path:
        return self.libs_dir.parent / "resolved"

    def is_installed(self) -> bool:
        return self._installed_stamp.exists()

    def install(self) -> None:
        if self.is_installed():
            return
        for tool in ("java", "mvn"):
            if shutil.which(tool) is None:
                raise StackError(f"kafka: `{tool}` is not on PATH; install Java 17+ and Maven")
        work = self.libs_dir.parent
        pom = render_template("kafka-pom.xml", work / "pom.xml",
                              kafka_version=KAFKA_VERSION, log4j_version=LOG4J_VERSION)
        log.info("resolving Kafka broker jars with Maven", version=KAFKA_VERSION, into=str(work))
        if self.libs_dir.exists():
            shutil.rmtree(self.libs_dir)
        run_checked(
            ["mvn", "-B", "-q", "-f", str(pom), "dependency:copy-dependencies",
             "-DincludeScope=runtime", f"-DoutputDirectory={self.libs_dir}"],
            "resolving Kafka jars with Maven", work / "mvn.log",
        )
        if not any(self.libs_dir.glob(f"kafka_2.13-{KAFKA_VERSION}.jar")):
            raise StackError(f"kafka: Maven ran but {self.libs_dir} lacks kafka_2.13-{KAFKA_VERSION}.jar")
        self._installed_stamp.write_text(KAFKA_VERSION + "\n")

    def _java(self, main_class: str, *args: str, heap: str = "256m") -> list[str]:
        return [
            "java", f"-Xmx{heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.state_dir / 'log4j2.properties'}",
            "-cp", f"{self.libs_dir}/*", main_class, *args,
        ]

    def command(self) -> list[str]:
        s = self.settings
        log_dirs = self.state_dir / "data"
        config = render_template(
            "kafka-server.properties", self.state_dir / "server.properties",
            host=s.host, port=s.kafka_port, controller_port=s.kafka_controller_port,
            log_dirs=log_dirs, max_message_bytes=MAX_MESSAGE_BYTES,
            max_request_bytes=2 * MAX_MESSAGE_BYTES,
        )
        render_template("kafka-log4j2.properties", self.state_dir / "log4j2.properties")
        if not (log_dirs / "meta.properties").exists():
            cluster_id = subprocess.run(
                self._java("kafka.tools.StorageTool", "random-uuid"),
                capture_output=True, text=True, check=True,
            ).stdout.strip().splitlines()[-1]
            run_checked(
                self._java("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config)),
                "formatting Kafka storage", self.state_dir / "format.log",
            )
            log.info("formatted Kafka storage", cluster_id=cluster_id, log_dirs=str(log_dirs))
        cmd = self._java("kafka.Kafka", str(config), heap=s.kafka_heap)
        cmd.insert(1, "-Xms256m")
        return cmd

    def after_start(self) -> None:
        asyncio.run(ensure_topics(self.settings.kafka_bootstrap, topics.ALL_TOPICS))

    def check(self) -> str:
        seconds = asyncio.run(round_trip(self.settings.kafka_bootstrap))
        return f"produced and consumed a probe on {topics.HEALTH.name} in {seconds * 1000:.0f} ms"


async def ensure_topics(bootstrap: str, specs: Iterable[TopicSpec], timeout: float = 60.0) -> None:
    """Create every topic of ``specs`` that is missing; refuse a partition-count mismatch."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        specs = list(specs)
        missing = [s for s in specs if s.name not in existing]
        if missing:
            await admin.create_topics(
                [NewTopic(s.name, s.partitions, 1,
                          topic_configs={"max.message.bytes": str(MAX_MESSAGE_BYTES), **s.config})
                 for s in missing],
                timeout_ms=int(timeout * 1000),
            )
            log.info("created topics", topics=[s.name for s in missing])
        present = [s for s in specs if s.name in existing]
        if present:
            for description in await admin.describe_topics([s.name for s in present]):
                spec = next(s for s in present if s.name == description["topic"])
                found = len(description["partitions"])
                if found != spec.partitions:
                    raise StackError(
                        f"topic {spec.name} has {found} partitions but dmstream declares "
                        f"{spec.partitions}; delete it (or the stack's data directory) to recreate it"
                    )
    finally:
        await admin.close()


async def round_trip(bootstrap: str, timeout: float = 30.0) -> float:
    """Produce one health probe and read it back; return the seconds it took."""
    schema = schemas.latest(topics.HEALTH.subject)
    token = uuid.uuid4().hex
    started = time.monotonic()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        sent = await producer.send_and_wait(
            topics.HEALTH.name, schemas.encode(schema, {"token": token, "sentAt": time.time()})
        )
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partition = TopicPartition(sent.topic, sent.partition)
        consumer.assign([partition])
        consumer.seek(partition, sent.offset)
        async with asyncio.timeout(timeout):
            while True:
                batch = await consumer.getmany(partition, timeout_ms=1000)
                for message in batch.get(partition, []):
                    if schemas.decode(message.value)["token"] == token:
                        return time.monotonic() - started
    finally:
        await consumer.stop()


async def read_topics(bootstrap: str, specs: Iterable[TopicSpec]) -> dict[str, list[ConsumerRecord]]:
    """Every message on ``specs`` from the beginning to their current end, by topic (no consumer group).

    What a consumer that knows only the topic names sees; committed and uncommitted alike.
    """
    specs = list(specs)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                fetch_max_bytes=MAX_MESSAGE_BYTES,
                                max_partition_fetch_bytes=MAX_MESSAGE_BYTES)
    await consumer.start()
    try:
        partitions = [TopicPartition(spec.name, p) for spec in specs for p in range(spec.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        seen: dict[str, list[ConsumerRecord]] = {spec.name: [] for spec in specs}
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            for tp, messages in (await consumer.getmany(timeout_ms=1000)).items():
                seen[tp.topic].extend(m for m in messages if m.offset < ends[tp])
        return seen
    finally:
        await consumer.stop()
