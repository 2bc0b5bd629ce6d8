"""Every Kafka topic dmstream reads or writes, with its partition count.

Automatic topic creation is off on our broker, so a topic exists only when it
is declared here.  ``dmstream stack up`` creates them all (producers on the
summit side may start before any worker), and the Faust app builds its topic
objects from the same specs, so the two can never disagree on partitions.
A Faust table must have as many partitions as the topic that feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Largest message we accept anywhere: a raw e2v CCD as int32 is ~75 MB.
MAX_MESSAGE_BYTES = 128 * 1024 * 1024


@dataclass(frozen=True)
class TopicSpec:
    """A Kafka topic and how it is created.

    Attributes
    ----------
    name : str
        Topic name; summit topics keep their SAL names (``lsst.sal.<CSC>.<topic>``).
    partitions : int
        Partition count; records are keyed so that what must stay in order
        (one detector, one sky pixel) lands on one partition.
    subject : str
        Avro subject of its values in :mod:`dmstream.schemas`.
    config : dict
        Topic-level broker configuration.
    """

    name: str
    partitions: int
    subject: str
    description: str
    config: dict[str, str] = field(default_factory=dict)


NEXT_VISIT = TopicSpec(
    name="lsst.sal.ScriptQueue.logevent_nextVisit",
    partitions=4,
    subject="lsst.sal.ScriptQueue.logevent_nextVisit",
    description="OCS announcements of upcoming visits, keyed by groupId.",
)

HEALTH = TopicSpec(
    name="dmstream.health",
    partitions=1,
    subject="dmstream.infra.HealthProbe",
    description="Round-trip probes of the stack's health check.",
    config={"retention.ms": str(3600 * 1000)},
)

ALL_TOPICS: tuple[TopicSpec, ...] = (NEXT_VISIT, HEALTH)


def by_name(name: str) -> TopicSpec:
    for spec in ALL_TOPICS:
        if spec.name == name:
            return spec
    raise KeyError(f"topic {name!r} is not declared in dmstream.topics")
