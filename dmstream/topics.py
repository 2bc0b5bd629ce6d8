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



def _summit(name: str, description: str) -> TopicSpec:
    # Summit events and telemetry are low-rate and must stay in time order: one partition.
    return TopicSpec(name=name, partitions=1, subject=name, description=description)


START_INTEGRATION = _summit("lsst.sal.MTCamera.logevent_startIntegration",
                            "LSSTCam starts integrating an image, keyed by obs_id.")
START_READOUT = _summit("lsst.sal.MTCamera.logevent_startReadout",
                        "LSSTCam starts reading an image out, keyed by obs_id.")
END_READOUT = _summit("lsst.sal.MTCamera.logevent_endReadout",
                      "LSSTCam finished reading an image out, keyed by obs_id.")
END_OF_IMAGE_TELEMETRY = _summit("lsst.sal.MTCamera.logevent_endOfImageTelemetry",
                                 "All camera metadata of an image is published, keyed by obs_id.")
CAMERA_EVENTS: tuple[TopicSpec, ...] = (START_INTEGRATION, START_READOUT, END_READOUT, END_OF_IMAGE_TELEMETRY)

MOUNT_AZIMUTH = _summit("lsst.sal.MTMount.azimuth", "Telescope mount azimuth axis, keyed by CSC:salIndex.")
MOUNT_ELEVATION = _summit("lsst.sal.MTMount.elevation", "Mount elevation axis, keyed by CSC:salIndex.")
ROTATOR = _summit("lsst.sal.MTRotator.rotation", "Camera rotator angle, keyed by CSC:salIndex.")
DOME_AZIMUTH = _summit("lsst.sal.MTDome.azimuth", "Dome azimuth, keyed by CSC:salIndex.")
DIMM_MEASUREMENT = _summit("lsst.sal.DIMM.logevent_dimmMeasurement", "DIMM seeing, keyed by CSC:salIndex.")
ESS_TEMPERATURE = _summit("lsst.sal.ESS.temperature", "Weather station temperature, keyed by CSC:salIndex.")
ESS_AIR_FLOW = _summit("lsst.sal.ESS.airFlow", "Weather station wind, keyed by CSC:salIndex.")
ESS_HUMIDITY = _summit("lsst.sal.ESS.relativeHumidity", "Weather station humidity, keyed by CSC:salIndex.")
ESS_PRESSURE = _summit("lsst.sal.ESS.pressure", "Weather station pressure, keyed by CSC:salIndex.")
TELEMETRY: tuple[TopicSpec, ...] = (
    MOUNT_AZIMUTH, MOUNT_ELEVATION, ROTATOR, DOME_AZIMUTH, DIMM_MEASUREMENT,
    ESS_TEMPERATURE, ESS_AIR_FLOW, ESS_HUMIDITY, ESS_PRESSURE,
)

#: Everything the simulated summit sends besides pixels.
SUMMIT_TOPICS: tuple[TopicSpec, ...] = (NEXT_VISIT, *CAMERA_EVENTS, *TELEMETRY)

#: Pixels: one message per amplifier (~1 MB compressed), keyed by detector so that a
#: detector's 16 amplifiers land in order on one partition. Kept a few hours: the
#: archiver has written them to the Data Backbone long before.
CAMERA_READOUT = TopicSpec(
    name="dmstream.camera.readout",
    partitions=8,
    subject="dmstream.camera.AmplifierReadout",
    description="Camera readout, one message per amplifier, keyed by detector name.",
    config={"retention.ms": str(6 * 3600 * 1000), "retention.bytes": str(4 * 1024**3)},
)

ALL_TOPICS: tuple[TopicSpec, ...] = (NEXT_VISIT, HEALTH, *CAMERA_EVENTS, *TELEMETRY, CAMERA_READOUT)


def by_name(name: str) -> TopicSpec:
    for spec in ALL_TOPICS:
        if spec.name == name:
            return spec
    raise KeyError(f"topic {name!r} is not declared in dmstream.topics")
