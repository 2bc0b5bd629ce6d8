"""Agents without Kafka, through Faust's test context."""

from __future__ import annotations

from dmstream.agents.ocs import record_next_visit
from dmstream.tables.visits import announced_visits


async def test_next_visit_is_recorded_by_group_id(announcements) -> None:
    visits = announcements(3, 7)
    async with record_next_visit.test_context() as agent:
        for visit in visits:
            await agent.put(visit, key=visit.groupId)
        for visit in visits:
            stored = announced_visits[visit.groupId]
            assert stored.position == visit.position
            assert stored.band == visit.filters[0]
            assert stored.nimages == visit.nimages


async def test_a_repeated_announcement_replaces_the_first(announcements) -> None:
    first, second = announcements(2, 8)
    revised = second.derive(groupId=first.groupId, cameraAngle=12.5)
    async with record_next_visit.test_context() as agent:
        await agent.put(first, key=first.groupId)
        await agent.put(revised, key=first.groupId)
        assert announced_visits[first.groupId].cameraAngle == 12.5
