"""Agents that follow the observatory control system's events."""

from __future__ import annotations

from dmstream import channels
from dmstream.app import app
from dmstream.logs import get_logger
from dmstream.tables.visits import announced_visits

log = get_logger(__name__)


@app.agent(channels.next_visit)
async def record_next_visit(visits):
    """Record each announced visit in :data:`announced_visits` (keyed by groupId)."""
    async for visit in visits:
        announced_visits[visit.groupId] = visit
        log.info("visit announced", group_id=visit.groupId, band=visit.band,
                 nimages=visit.nimages, ra=visit.position[0], dec=visit.position[1])
        yield visit.groupId
