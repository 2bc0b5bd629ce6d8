"""Recorded nights on disk: the manifest, the event log and the raw files.

The format is documented in ``docs/recorded-night.md``; this module is one
reader and one writer of it, not its definition.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from dmstream.logs import get_logger

log = get_logger(__name__)

FORMAT = "dmstream-night"
VERSION = 1
MANIFEST = "night.json"
EVENTS = "events.jsonl"


class NightFormatError(ValueError):
    """A directory is not a recorded night, or a line of its log is malformed."""


@dataclass
class Manifest:
    instrument: str
    day_obs: int
    detectors: list[str]
    reference_catalog: str | None = None
    truth: dict[str, str] = field(default_factory=dict)
    description: str = ""
    simulation: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    version: int = VERSION

    @classmethod
    def read(cls, night: Path) -> Manifest:
        path = night / MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise NightFormatError(f"{night} is not a recorded night: no {MANIFEST}") from exc
        except json.JSONDecodeError as exc:
            raise NightFormatError(f"{path} is not valid JSON: {exc}") from exc
        if data.get("format") != FORMAT:
            raise NightFormatError(f"{path}: format is {data.get('format')!r}, expected {FORMAT!r}")
        if int(data.get("version", 0)) > VERSION:
            raise NightFormatError(f"{path}: version {data['version']} is newer than this reader ({VERSION})")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError as exc:
            raise NightFormatError(f"{path}: {exc}") from exc

    def write(self, night: Path) -> None:
        night.mkdir(parents=True, exist_ok=True)
        (night / MANIFEST).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class MessageEvent:
    """A message the summit published: ``value`` goes to ``topic`` under ``key``."""

    time: float
    topic: str
    key: str
    value: dict[str, Any]
    schema_id: int | None = None


@dataclass(frozen=True)
class ReadoutEvent:
    """A detector was read out; its pixels are in the raw file at ``path`` (absolute)."""

    time: float
    path: Path
    key: str


Event = MessageEvent | ReadoutEvent


def _parse_line(night: Path, line: str) -> Event:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise NightFormatError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise NightFormatError("a line must be a JSON object")
    time = data.get("time")
    if not isinstance(time, int | float) or not math.isfinite(time):
        raise NightFormatError("missing or non-numeric 'time'")
    key = data.get("key")
    if not isinstance(key, str):
        raise NightFormatError("missing 'key' string")
    if "readout" in data:
        if not isinstance(data["readout"], str):
            raise NightFormatError("'readout' must be a relative path")
        return ReadoutEvent(float(time), night / data["readout"], key)
    topic, value = data.get("topic"), data.get("value")
    if not isinstance(topic, str) or not isinstance(value, dict):
        raise NightFormatError("a message line needs 'topic' (string) and 'value' (object)")
    schema_id = data.get("schema_id")
    return MessageEvent(float(time), topic, key, value, int(schema_id) if schema_id is not None else None)


@dataclass
class ReadStats:
    lines: int = 0
    malformed: int = 0
    out_of_order: int = 0


class NightReader:
    """Iterate over a recorded night's events, skipping (and counting) malformed lines."""

    def __init__(self, night: Path) -> None:
        self.night = Path(night)
        self.manifest = Manifest.read(self.night)
        self.stats = ReadStats()
        if not (self.night / EVENTS).exists():
            raise NightFormatError(f"{self.night} has no {EVENTS}")

    def events(self) -> Iterator[Event]:
        last_time = -math.inf
        with (self.night / EVENTS).open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                self.stats.lines += 1
                try:
                    event = _parse_line(self.night, line)
                except NightFormatError as exc:
                    self.stats.malformed += 1
                    log.warning("malformed event line skipped", night=str(self.night), line=number,
                                reason=str(exc))
                    continue
                if event.time < last_time:
                    # Sent anyway: dropping it would lose data, and the consumers key on content.
                    self.stats.out_of_order += 1
                    log.warning("event earlier than the one before", night=str(self.night), line=number)
                last_time = max(last_time, event.time)
                yield event


class EventLogWriter:
    """Append events to ``events.jsonl``; the caller writes them in time order."""

    def __init__(self, night: Path) -> None:
        self.night = Path(night)
        self.night.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = (self.night / EVENTS).open("w", encoding="utf-8")
        self.written = 0

    def message(self, time: float, topic: str, key: str, value: dict[str, Any],
                schema_id: int | None = None) -> None:
        line: dict[str, Any] = {"time": time, "topic": topic, "key": key, "value": value}
        if schema_id is not None:
            line["schema_id"] = schema_id
        self._write(line)

    def readout(self, time: float, raw_path: Path, key: str) -> None:
        self._write({"time": time, "readout": raw_path.relative_to(self.night).as_posix(), "key": key})

    def _write(self, line: dict[str, Any]) -> None:
        self._file.write(json.dumps(line, separators=(",", ":"), allow_nan=False) + "\n")
        self.written += 1

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def __enter__(self) -> EventLogWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def raw_path(night: Path, day_obs: int, seq_num: int, obs_id: str, detector_name: str) -> Path:
    """Where the raw file of one detector of one exposure goes in a night."""
    return Path(night) / "raw" / str(day_obs) / f"{seq_num:06d}" / f"{obs_id}_{detector_name}.fits"
