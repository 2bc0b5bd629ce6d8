"""The one Faust application of dmstream.

Everything is configured from :mod:`dmstream.settings` (``DMSTREAM_*``
environment variables) with defaults that point at the local stack.  Agents,
tables and web views register themselves on ``app`` from their own modules,
which Faust imports on start (``autodiscover``).
"""

from __future__ import annotations

import faust

from dmstream import logs, settings
from dmstream.codecs import AvroCodec
from dmstream.topics import MAX_MESSAGE_BYTES, TopicSpec

SETTINGS = settings.load()


def create_app(config: settings.Settings = SETTINGS) -> faust.App:
    return faust.App(
        "dmstream",
        broker=f"kafka://{config.kafka_bootstrap}",
        # Tables are rebuilt from their changelog topics when a worker starts.
        store="memory://",
        datadir=str(config.data_dir / "faust" / config.worker_id),
        autodiscover=["dmstream.agents", "dmstream.web"],
        origin="dmstream",
        topic_replication_factor=1,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        producer_max_request_size=MAX_MESSAGE_BYTES,
        consumer_max_fetch_size=MAX_MESSAGE_BYTES,
        producer_linger_ms=5,
        web_enabled=True,
        web_bind=config.host,
        web_host=config.host,
        web_port=config.web_port,
        logging_config=logs.logging_config(config.log_format, config.log_level),
    )


app = create_app()


def topic(spec: TopicSpec, value_type: type[faust.Record]) -> faust.TopicT:
    """The Faust topic of a declared :class:`~dmstream.topics.TopicSpec`, Avro-encoded."""
    return app.topic(
        spec.name,
        value_type=value_type,
        key_type=str,
        value_serializer=AvroCodec(spec.subject),
        key_serializer="raw",
        partitions=spec.partitions,
        config=spec.config or None,
    )
