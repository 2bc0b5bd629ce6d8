"""Structured logging: structlog for our code, the same renderer for Faust's and
Kafka clients' standard-library records, so one run writes one consistent log.

``DMSTREAM_LOG_FORMAT=json`` gives one JSON object per line (for log shippers);
the default ``console`` is for people.
"""

from __future__ import annotations

import logging
import logging.config
from typing import Any

import structlog

_SHARED_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
]


def _renderer(log_format: str) -> Any:
    if log_format == "json":
        return structlog.processors.JSONRenderer()
    if log_format == "console":
        return structlog.dev.ConsoleRenderer(colors=False)
    raise ValueError(f"unknown log format {log_format!r}: use 'console' or 'json'")


def logging_config(log_format: str = "console", level: str = "INFO") -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` that renders stdlib records with structlog.

    Faust's worker applies this itself (``App(logging_config=...)``).
    """
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "structlog": {
                "()": structlog.stdlib.ProcessorFormatter,
                "processors": [
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    _renderer(log_format),
                ],
                "foreign_pre_chain": _SHARED_PROCESSORS,
            }
        },
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "structlog",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["default"], "level": level.upper()},
        # aiokafka logs every fetch retry at INFO; keep its warnings only.
        "loggers": {"aiokafka": {"level": "WARNING"}},
    }


def configure(log_format: str = "console", level: str = "INFO") -> None:
    """Route structlog and the standard library through one renderer."""
    structlog.configure(
        processors=[
            *_SHARED_PROCESSORS,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    logging.config.dictConfig(logging_config(log_format, level))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
