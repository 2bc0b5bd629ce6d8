"""The worker's HTTP endpoint: health, metrics, and what the tables hold.

Served by Faust's own web server on ``DMSTREAM_WEB_PORT``.  Table views show
the partitions this worker holds; ``/visits/{group_id}/`` is routed to the
worker that owns the key, so any worker answers for any visit.
"""

from __future__ import annotations

import time
from typing import Any

from faust import web

from dmstream.app import SETTINGS, app
from dmstream.steps import COUNTERS
from dmstream.tables.visits import announced_visits

_STARTED = time.time()


def _assignment() -> list[str]:
    return sorted(f"{tp.topic}:{tp.partition}" for tp in app.consumer.assignment())


@app.page("/health/")
async def health(self: web.View, request: web.Request) -> web.Response:
    """``ok`` once the worker has partitions and its tables are recovered."""
    recovered = app.tables.recovery.completed.is_set()
    ready = recovered and not app.rebalancing
    body = {
        "status": "ok" if ready else "starting",
        "worker": SETTINGS.worker_id,
        "uptime_s": round(time.time() - _STARTED, 1),
        "rebalancing": app.rebalancing,
        "tables_recovered": recovered,
        "assignment": _assignment(),
    }
    return self.json(body, status=200 if ready else 503)


@app.page("/metrics/")
async def metrics(self: web.View, request: web.Request) -> web.Response:
    """Message counts and rates from Faust's monitor; what each step did (done, dead letters, deferred)."""
    monitor = app.monitor
    body: dict[str, Any] = {
        "worker": SETTINGS.worker_id,
        "messages_received_total": monitor.messages_received_total,
        "messages_received_by_topic": dict(monitor.messages_received_by_topic),
        "messages_sent": monitor.messages_sent,
        "messages_sent_by_topic": dict(monitor.messages_sent_by_topic),
        "messages_per_s": monitor.messages_s,
        "events_active": monitor.events_active,
        "events_per_s": monitor.events_s,
        "events_runtime_avg_s": monitor.events_runtime_avg,
        "tables": {name: dict(state.asdict()) for name, state in monitor.tables.items()},
        "steps": dict(sorted(COUNTERS.items())),
    }
    return self.json(body)


@app.page("/visits/")
async def visits(self: web.View, request: web.Request) -> web.Response:
    """Announced visits held by this worker, newest start first."""
    rows = sorted(
        (visit.asdict() for visit in announced_visits.values()),
        key=lambda row: row["startTime"], reverse=True,
    )
    return self.json({"worker": SETTINGS.worker_id, "count": len(rows), "visits": rows})


@app.page("/visits/{group_id}/")
@app.table_route(table=announced_visits, match_info="group_id")
async def visit(self: web.View, request: web.Request, group_id: str) -> web.Response:
    found = announced_visits.get(group_id)
    if found is None:
        return self.json({"error": f"no visit {group_id!r} announced"}, status=404)
    return self.json(found.asdict())
