"""Avro schemas of dmstream's own topics, and the wire format of their messages.

``index.json`` lists every schema we have ever shipped under a numeric id that
is never reused.  A message on Kafka is in the Confluent wire format: byte 0 is
0, bytes 1-4 the big-endian schema id, then the schemaless Avro body, so that a
consumer outside dmstream needs only the ``.avsc`` file of that id to read it.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import fastavro

MAGIC_BYTE = 0
_HEADER = struct.Struct(">bI")


class SchemaError(ValueError):
    """A message does not carry a schema we know, or does not match it."""


@dataclass(frozen=True)
class ShippedSchema:
    """One version of one subject: ours as listed in ``index.json``, or Rubin's alert schemas."""

    id: int
    subject: str
    version: int
    file: str
    parsed: dict[str, Any]


@cache
def _index() -> tuple[ShippedSchema, ...]:
    root = resources.files(__name__)
    entries = json.loads(root.joinpath("index.json").read_text())["schemas"]
    shipped = []
    for entry in entries:
        raw = json.loads(root.joinpath(entry["file"]).read_text())
        shipped.append(
            ShippedSchema(
                id=entry["id"], subject=entry["subject"], version=entry["version"],
                file=entry["file"], parsed=fastavro.parse_schema(raw),
            )
        )
    return tuple(shipped)


def by_id(schema_id: int) -> ShippedSchema:
    for shipped in _index():
        if shipped.id == schema_id:
            return shipped
    raise SchemaError(f"no shipped schema has id {schema_id}")


def latest(subject: str) -> ShippedSchema:
    """The newest version of ``subject``."""
    versions = [s for s in _index() if s.subject == subject]
    if not versions:
        raise SchemaError(f"no shipped schema for subject {subject!r}")
    return max(versions, key=lambda s: s.version)


def all_schemas() -> tuple[ShippedSchema, ...]:
    return _index()


def encode(schema: ShippedSchema, record: dict[str, Any]) -> bytes:
    """Serialise ``record`` in the Confluent wire format under ``schema``'s id."""
    out = io.BytesIO()
    out.write(_HEADER.pack(MAGIC_BYTE, schema.id))
    try:
        fastavro.schemaless_writer(out, schema.parsed, record)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SchemaError(f"record does not fit {schema.subject} v{schema.version}: {exc}") from exc
    return out.getvalue()


def schema_id(message: bytes) -> int:
    """The schema id a Confluent wire-format message carries."""
    if len(message) < _HEADER.size:
        raise SchemaError(f"message of {len(message)} bytes is shorter than the wire-format header")
    magic, found = _HEADER.unpack_from(message)
    if magic != MAGIC_BYTE:
        raise SchemaError(f"message does not start with the wire-format magic byte (got {magic})")
    return found


def decode(message: bytes, reader: ShippedSchema | None = None,
           writers: Callable[[int], ShippedSchema] = by_id) -> dict[str, Any]:
    """Read a Confluent wire-format message with the writer schema its id names.

    With ``reader`` given, the record is resolved to that schema (Avro schema
    evolution), so old messages read as the current version.  ``writers``
    finds the schema of an id (default: ours; Rubin's alert schemas use
    :mod:`dmstream.schemas.alerts`) and raises :class:`SchemaError` for an unknown one.
    """
    writer = writers(schema_id(message))
    try:
        return fastavro.schemaless_reader(
            io.BytesIO(message[_HEADER.size:]), writer.parsed,
            reader.parsed if reader is not None else None,
        )
    except (EOFError, ValueError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise SchemaError(f"message does not decode as {writer.subject} v{writer.version}: {exc}") \
            from exc
