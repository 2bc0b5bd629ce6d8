"""Avro schemas and the Confluent wire format of our messages."""

from __future__ import annotations

import io
import json
import struct
from importlib import resources

import fastavro
import pytest

from dmstream import schemas, topics
from dmstream.schemas import alerts


def test_every_declared_topic_has_a_shipped_schema() -> None:
    for spec in topics.ALL_TOPICS:
        if spec.subject == alerts.ALERT_SUBJECT:
            assert alerts.all_alert_schemas()[alerts.ALERT_SCHEMA_ID].subject == spec.subject
        else:
            assert schemas.latest(spec.subject).subject == spec.subject


def test_schema_ids_are_unique() -> None:
    ids = [s.id for s in schemas.all_schemas()]
    assert len(ids) == len(set(ids))


def test_wire_format_is_readable_without_dmstream(announcements) -> None:
    """A foreign consumer needs only the header layout and the .avsc file of the id."""
    visit = announcements(2, 3)[0]
    schema = schemas.latest(topics.NEXT_VISIT.subject)
    message = schemas.encode(schema, visit.asdict())

    magic, schema_id = struct.unpack(">bI", message[:5])
    assert magic == 0 and schema_id == schema.id
    avsc = json.loads(resources.files("dmstream.schemas").joinpath(schema.file).read_text())
    record = fastavro.schemaless_reader(io.BytesIO(message[5:]), fastavro.parse_schema(avsc))
    assert record["groupId"] == visit.groupId
    assert record["position"] == pytest.approx(visit.position)
    assert record["nimages"] == visit.nimages


def test_round_trip(announcements) -> None:
    visit = announcements(2, 4)[0]
    schema = schemas.latest(topics.NEXT_VISIT.subject)
    assert schemas.decode(schemas.encode(schema, visit.asdict())) == visit.asdict()


@pytest.mark.parametrize(
    ("message", "complaint"),
    [
        (b"\x00\x00", "shorter than"),
        (b"\x01\x00\x00\x27\x74abc", "magic byte"),
        (b"\x00\x00\x00\x99\x99abc", "no shipped schema has id"),
        (b"\x00\x00\x00\x27\x74\x02", "does not decode"),
    ],
)
def test_malformed_messages_get_a_clear_error(message: bytes, complaint: str) -> None:
    with pytest.raises(schemas.SchemaError, match=complaint):
        schemas.decode(message)


def test_record_that_does_not_fit_is_refused() -> None:
    schema = schemas.latest(topics.NEXT_VISIT.subject)
    with pytest.raises(schemas.SchemaError, match="does not fit"):
        schemas.encode(schema, {"groupId": "x"})
