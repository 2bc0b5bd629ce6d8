"""Faust codecs that put our records on Kafka in the Confluent Avro wire format."""

from __future__ import annotations

from typing import Any

from faust.serializers.codecs import Codec

from dmstream import schemas


class AvroCodec(Codec):
    """Encode with the newest shipped schema of ``subject``; decode any shipped version of it.

    Old messages resolve to the newest schema (Avro schema evolution), so a
    consumer never sees two shapes of one topic.
    """

    def __init__(self, subject: str, **kwargs: Any) -> None:
        self.schema = schemas.latest(subject)
        super().__init__(subject=subject, **kwargs)

    def _dumps(self, obj: Any) -> bytes:
        return schemas.encode(self.schema, obj)

    def _loads(self, s: bytes) -> Any:
        return schemas.decode(s, reader=self.schema)
