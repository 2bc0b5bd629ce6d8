"""The summit's events and telemetry of a simulated night."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import numpy as np
import pytest

from dmstream import schemas, topics
from dmstream.streams.efd import EfdConfig, SummitEvent, summit_events
from dmstream.streams.observatory import NightConfig, NightPlan, plan_night

CONFIG = NightConfig(seed=3, day_obs=20261125, n_visits=30, snaps="mixed")


@pytest.fixture(scope="module")
def plan() -> NightPlan:
    return plan_night(CONFIG)


@pytest.fixture(scope="module")
def events(plan: NightPlan) -> list[SummitEvent]:
    return list(summit_events(plan))


def test_every_summit_topic_is_sent_and_declared(events: list[SummitEvent]) -> None:
    sent = {e.topic.name for e in events}
    assert sent == {t.name for t in topics.SUMMIT_TOPICS}
    assert sent <= {t.name for t in topics.ALL_TOPICS}


def test_events_are_time_ordered(events: list[SummitEvent]) -> None:
    times = [e.time_tai for e in events]
    assert times == sorted(times)
    assert all(e.record["private_sndStamp"] == e.time_tai for e in events)


def test_every_record_fits_its_schema_and_round_trips(events: list[SummitEvent]) -> None:
    for event in events:
        message = schemas.encode(schemas.latest(event.topic.subject), event.record)
        decoded = schemas.decode(message)
        assert decoded.keys() == event.record.keys()
        assert decoded["private_sndStamp"] == event.record["private_sndStamp"]
        assert decoded["private_seqNum"] == event.record["private_seqNum"]


def test_private_fields_as_salobj_writes_them(events: list[SummitEvent]) -> None:
    seq = defaultdict(list)
    for event in events:
        record = event.record
        assert record["private_efdStamp"] == pytest.approx(record["private_sndStamp"] - 37.0)
        seq[event.topic.name].append(record["private_seqNum"])
        csc = event.topic.name.split(".")[2]
        indexed = csc in ("ScriptQueue", "DIMM", "ESS")
        assert ("salIndex" in record) == indexed
        assert record["private_identity"] == (f"{csc}:{record['salIndex']}" if indexed else csc)
    for numbers in seq.values():
        assert numbers == list(range(1, len(numbers) + 1))


def test_next_visit_is_announced_early_enough(plan: NightPlan, events: list[SummitEvent]) -> None:
    announced = {e.key: e for e in events if e.topic == topics.NEXT_VISIT}
    first_integration = {e.record["imageName"]: e.time_tai for e in events
                         if e.topic == topics.START_INTEGRATION}
    assert announced.keys() == {v.group_id for v in plan.visits}
    for visit in plan.visits:
        start = first_integration[visit.exposures[0].obs_id]
        announcement = announced[visit.group_id]
        assert start - announcement.time_tai >= 20.0
        assert announcement.record["startTime"] == pytest.approx(start)
        assert announcement.record["nimages"] == visit.nimages
        assert announcement.record["filters"] == visit.physical_filter


def test_camera_events_of_each_exposure(plan: NightPlan, events: list[SummitEvent]) -> None:
    by_image = defaultdict(list)
    for e in events:
        if e.topic in topics.CAMERA_EVENTS:
            assert e.key == e.record["imageName"]
            by_image[e.key].append(e)
    assert by_image.keys() == {x.obs_id for x in plan.exposures}
    order = [t.name for t in topics.CAMERA_EVENTS]
    for exposure in plan.exposures:
        sequence = by_image[exposure.obs_id]
        assert [e.topic.name for e in sequence] == order
        start, readout, end, telemetry = (e.record for e in sequence)
        assert start["imageNumber"] == exposure.seq_num and start["imageDate"] == "20261125"
        assert start["imageIndex"] == exposure.snap + 1 and start["imagesInSequence"] == exposure.nimages
        assert readout["timestampStartOfReadout"] - start["timestampAcquisitionStart"] == \
            pytest.approx(exposure.exptime)
        assert end["timestampEndOfReadout"] - readout["timestampStartOfReadout"] == pytest.approx(2.0)
        assert telemetry["darkTime"] == exposure.darktime


def test_telemetry_rates_and_ranges(plan: NightPlan, events: list[SummitEvent]) -> None:
    counts = Counter(e.topic.name for e in events)
    span = plan.exposures[-1].tai_readout_end - plan.exposures[0].tai_start + 120.0
    assert counts[topics.MOUNT_AZIMUTH.name] == pytest.approx(span, rel=0.01)
    assert counts[topics.ESS_TEMPERATURE.name] == pytest.approx(span / 10, rel=0.01)
    dimm = [e.record["fwhm"] for e in events if e.topic == topics.DIMM_MEASUREMENT]
    assert dimm and 0.3 < np.median(dimm) < 2.0
    azimuth = [e.record["actualPosition"] for e in events if e.topic == topics.MOUNT_AZIMUTH]
    assert max(abs(a) for a in azimuth) <= 270.0
    assert all(e.key == "ESS:301" for e in events if e.topic == topics.ESS_AIR_FLOW)


def test_mount_tracks_the_visits(plan: NightPlan, events: list[SummitEvent]) -> None:
    elevation = {round(e.time_tai, 3): e.record["demandPosition"]
                 for e in events if e.topic == topics.MOUNT_ELEVATION}
    times = np.array(sorted(elevation))
    values = np.array([elevation[t] for t in times])
    for exposure in plan.exposures:
        if exposure.can_see_sky:
            mid = exposure.tai_start + exposure.exptime / 2
            assert np.interp(mid, times, values) == pytest.approx(exposure.alt, abs=0.05)


def test_same_plan_same_events(plan: NightPlan, events: list[SummitEvent]) -> None:
    assert repr(list(summit_events(plan))) == repr(events)
    fewer = list(summit_events(plan, EfdConfig(telemetry=False)))
    assert {e.topic.name for e in fewer} == {t.name for t in (topics.NEXT_VISIT, *topics.CAMERA_EVENTS)}


def test_records_are_strict_json(events: list[SummitEvent]) -> None:
    """The recorded-night event log is strict JSON: no NaN or infinity anywhere."""
    for event in events:
        json.dumps(event.record, allow_nan=False)
