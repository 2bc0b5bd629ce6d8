"""Structured logs: our records and the standard library's come out alike."""

from __future__ import annotations

import json
import logging

from dmstream import logs


def test_json_logs_carry_event_and_fields(capsys) -> None:
    logs.configure("json", "INFO")
    logs.get_logger("dmstream.test").info("visit announced", group_id="g1", nimages=2)
    logging.getLogger("faust.worker").warning("plain stdlib record")
    lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    ours, theirs = lines[-2], lines[-1]
    assert ours["event"] == "visit announced" and ours["group_id"] == "g1" and ours["nimages"] == 2
    assert ours["level"] == "info" and "timestamp" in ours
    assert theirs["event"] == "plain stdlib record" and theirs["logger"] == "faust.worker"
    logs.configure("console", "INFO")


def test_unknown_format_is_refused() -> None:
    try:
        logs.logging_config("xml")
    except ValueError as exc:
        assert "xml" in str(exc)
    else:
        raise AssertionError("an unknown log format was accepted")
