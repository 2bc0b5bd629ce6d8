"""Rubin's alert schemas, as the ``lsst-alert-packet`` package ships them, and alert messages on Kafka.

Alerts are records of the official schema, not of one of ours: every version
the installed ``lsst-alert-packet`` holds (3.0 to 11.1 at the time of writing)
is served under Rubin's id for it, major * 100 + minor (11.1 -> 1101, what
``lsst.alert.packet.Schema.get_schema_id`` computes).  Those ids lie below the
10000 where ours start (``index.json``), so one schema registry can hold both.

A message is in the Confluent wire format of :mod:`dmstream.schemas`: byte 0 is
0, bytes 1-4 the big-endian schema id, then the schemaless Avro body.  We write
the newest version only; a message of any shipped version is read with the
schema its id names, because brokers replay old alerts and old versions are not
resolvable into the newest (fields were renamed and removed between them).
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import fastavro
from lsst.alert.packet import Schema, get_latest_schema_version, get_schema_path, get_schema_root

from dmstream.schemas import SchemaError, ShippedSchema, decode, encode

#: Subject of the alert schemas in Rubin's schema registry.
ALERT_SUBJECT = "alert-packet"

__all__ = ["ALERT_SCHEMA_ID", "ALERT_SUBJECT", "SchemaError", "alert_schema", "all_alert_schemas",
           "decode_alert", "encode_alert"]


def _schema_file(major: int, minor: int) -> str:
    return os.path.join(get_schema_path(major, minor), f"lsst.v{major}_{minor}.alert.avsc")


def _load(major: int, minor: int) -> ShippedSchema:
    official = Schema.from_file(_schema_file(major, minor))
    schema_id = official.get_schema_id()
    return ShippedSchema(id=schema_id, subject=ALERT_SUBJECT, version=schema_id,
                         file=f"{major}/{minor}/lsst.v{major}_{minor}.alert.avsc",
                         parsed=fastavro.parse_schema(official.definition))


@cache
def _shipped() -> dict[int, ShippedSchema]:
    versions = []
    for major_dir in get_schema_root().iterdir():
        if major_dir.is_dir() and major_dir.name.isdigit():
            versions += [(int(major_dir.name), int(minor_dir.name)) for minor_dir in major_dir.iterdir()
                         if minor_dir.is_dir() and minor_dir.name.isdigit()
                         and os.path.exists(_schema_file(int(major_dir.name), int(minor_dir.name)))]
    loaded = [_load(major, minor) for major, minor in sorted(versions)]
    return {schema.id: schema for schema in loaded}


@cache
def _latest() -> ShippedSchema:
    return _load(*get_latest_schema_version())


#: Id of the alert schema we write (Rubin's for the newest version shipped: 1101 for 11.1).
ALERT_SCHEMA_ID: int = _latest().id


def alert_schema() -> dict[str, Any]:
    """The newest shipped alert schema, parsed by fastavro (``lsst.v11_1.alert`` for id 1101)."""
    return _latest().parsed


def all_alert_schemas() -> dict[int, ShippedSchema]:
    """Every shipped alert schema version by its id, oldest first.

    ``file`` of each is its path under ``lsst.alert.packet``'s schema root, and
    ``version`` repeats the id (Rubin numbers versions major * 100 + minor).
    """
    return dict(_shipped())


def _writer(schema_id: int) -> ShippedSchema:
    found = _shipped().get(schema_id)
    if found is None:
        raise SchemaError(f"no alert schema has id {schema_id}; lsst-alert-packet ships "
                          f"{', '.join(str(i) for i in _shipped())}")
    return found


def encode_alert(record: dict[str, Any]) -> bytes:
    """An alert record as a Kafka message: wire-format header with :data:`ALERT_SCHEMA_ID`, Avro body.

    Raises
    ------
    SchemaError
        If the record does not fit the newest alert schema.
    """
    return encode(_latest(), record)


def decode_alert(message: bytes) -> dict[str, Any]:
    """An alert message read with the shipped schema version its header names.

    Raises
    ------
    SchemaError
        If the header is not the wire format's, its id is not a shipped alert
        schema, or the body does not decode (truncated or corrupt).
    """
    return decode(message, writers=_writer)
