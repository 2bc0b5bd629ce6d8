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

# Prompt Processing.  Its per-detector topics share the readout's partition count and its
# detector-name keys: Faust assigns partition p of every topic with the same count to the
# same worker (co-partitioning), so a detector's steps run in one process and hand their
# pixels over in memory, with the Data Backbone behind them after a rebalance.
DETECTOR_PARTITIONS = CAMERA_READOUT.partitions
_HOURS = 3600 * 1000


def _detector_step(name: str, subject: str, description: str) -> TopicSpec:
    return TopicSpec(name=name, partitions=DETECTOR_PARTITIONS, subject=subject, description=description,
                     config={"retention.ms": str(48 * _HOURS)})


RAWS = _detector_step("dmstream.archive.raws", "dmstream.archive.RawArchived",
                      "The archiver's notice that a raw is in the Data Backbone, keyed by detector name.")
POST_ISR = _detector_step("dmstream.prompt.postIsr", "dmstream.prompt.DetectorProduct",
                          "A snap of a detector is through ISR, keyed by detector name.")
VISIT_IMAGES = _detector_step("dmstream.prompt.visitImage", "dmstream.prompt.DetectorProduct",
                              "A detector's snaps are combined into its visit image, keyed by detector name.")
CALEXPS = _detector_step("dmstream.prompt.calexp", "dmstream.prompt.DetectorProduct",
                         "A detector's visit image is calibrated, keyed by detector name.")
DIFFERENCES = _detector_step("dmstream.prompt.difference", "dmstream.prompt.DetectorProduct",
                             "A detector's template is subtracted, keyed by detector name.")
DEFERRED = _detector_step("dmstream.prompt.deferred", "dmstream.prompt.DetectorProduct",
                          "Detector-visits given up over budget, for Offline Processing to redo.")
PROMPT_STEPS: tuple[TopicSpec, ...] = (RAWS, POST_ISR, VISIT_IMAGES, CALEXPS, DIFFERENCES, DEFERRED)

#: DiaSources are regrouped by sky pixel for association, whose state is keyed by sky pixel.
DIA_SOURCES = TopicSpec(
    name="dmstream.prompt.diaSources",
    partitions=16,
    subject="dmstream.prompt.DiaSourceBatch",
    description="DiaSources and their cutouts of one detector-visit and one sky pixel, keyed by the pixel.",
    config={"retention.ms": str(48 * _HOURS)},
)

#: The alert stream brokers read: Rubin's alert schema (Confluent wire format under Rubin's schema id),
#: keyed by alertId, retained a week.
ALERTS = TopicSpec(
    name="dmstream.alerts",
    partitions=8,
    subject="alert-packet",
    description="Alerts in the latest lsst-alert-packet schema, one per DiaSource, keyed by alertId.",
    config={"retention.ms": str(7 * 24 * _HOURS)},
)

DEAD_LETTERS = TopicSpec(
    name="dmstream.deadLetters",
    partitions=1,
    subject="dmstream.DeadLetter",
    description="Messages a step could not process, with the reason; kept a month for replay.",
    config={"retention.ms": str(30 * 24 * _HOURS)},
)

ALL_TOPICS: tuple[TopicSpec, ...] = (NEXT_VISIT, HEALTH, *CAMERA_EVENTS, *TELEMETRY, CAMERA_READOUT,
                                     *PROMPT_STEPS, DIA_SOURCES, ALERTS, DEAD_LETTERS)


def by_name(name: str) -> TopicSpec:
    for spec in ALL_TOPICS:
        if spec.name == name:
            return spec
    raise KeyError(f"topic {name!r} is not declared in dmstream.topics")
