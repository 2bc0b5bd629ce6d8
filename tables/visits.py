"""Visits the observatory has announced, keyed by groupId."""

from __future__ import annotations

from dmstream.app import app
from dmstream.models import NextVisit
from dmstream.topics import NEXT_VISIT

#: The latest ``nextVisit`` announcement of each visit, by groupId.
announced_visits = app.Table(
    "announced-visits",
    key_type=str,
    value_type=NextVisit,
    partitions=NEXT_VISIT.partitions,
    help="nextVisit announcements by groupId",
)
