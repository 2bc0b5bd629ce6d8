"""The reference night of a night: its fields and bands again, days earlier, in good seeing, same sky."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dmstream import topics
from dmstream.streams.night import MessageEvent, NightReader, ReadoutEvent
from dmstream.streams.observatory import (
    ROTATOR_LIMIT,
    NightConfig,
    NightPlan,
    ReferenceConfig,
    ReferenceNightError,
    day_obs_of,
    exposure_id_of,
    obs_id_of,
    plan_night,
    plan_reference_night,
)
from dmstream.streams.rawfits import read_raw
from dmstream.streams.simulate import SimulationConfig, simulate_night, simulate_reference_night

# Small blobs and free filter changes, so that a short night has several fields in several bands.
NIGHT = NightConfig(seed=5, day_obs=20261209, n_visits=16, bands=("g", "r", "i"), snaps="mixed",
                    blob_fields=2, max_filter_changes=100)
REFERENCE = ReferenceConfig()  # 3 visits per field and band, 21 days earlier, 0.6" seeing
REFERENCE_DAY = 20261118


@pytest.fixture(scope="module")
def night() -> NightPlan:
    return plan_night(NIGHT)


@pytest.fixture(scope="module")
def reference(night: NightPlan) -> NightPlan:
    return plan_reference_night(night, REFERENCE)


def test_every_field_and_band_of_the_night_gets_its_visits(night: NightPlan, reference: NightPlan) -> None:
    pairs = {(v.field_id, v.band) for v in night.visits}
    assert len({band for _, band in pairs}) >= 2 and len(pairs) > len({f for f, _ in pairs})
    assert Counter((v.field_id, v.band) for v in reference.visits) == dict.fromkeys(pairs, 3)
    centres = {v.field_id: (v.ra, v.dec) for v in night.visits}
    for visit in reference.visits:
        assert (visit.ra, visit.dec) == centres[visit.field_id]
        assert visit.nimages == 1 and visit.exptime == 30.0
        assert [(e.img_type, e.exptime, e.band) for e in visit.exposures] == [("OBJECT", 30.0, visit.band)]


def test_reference_night_is_days_earlier_with_its_own_identifiers(night: NightPlan,
                                                                  reference: NightPlan) -> None:
    assert reference.day_obs == REFERENCE_DAY
    exposures = reference.exposures
    assert [e.seq_num for e in exposures] == list(range(1, len(exposures) + 1))
    assert all(a.tai_readout_end <= b.tai_start for a, b in itertools.pairwise(exposures))
    for e in exposures:
        assert e.day_obs == REFERENCE_DAY == day_obs_of(e.tai_start)
        assert e.exposure_id == exposure_id_of(REFERENCE_DAY, e.seq_num)
        assert e.obs_id == obs_id_of(REFERENCE_DAY, e.seq_num)
    assert len({v.visit_id for v in reference.visits}) == len({v.group_id for v in reference.visits}) \
        == len(reference.visits)
    for visit in reference.visits:
        assert visit.visit_id == visit.exposures[0].exposure_id
        days = (night.visits[0].tai_start - visit.tai_start) / 86400.0
        assert 20.5 < days < 21.5


def test_reference_night_keeps_the_nights_calibrations(night: NightPlan, reference: NightPlan) -> None:
    def sequence(plan: NightPlan) -> list[tuple[str, str, float]]:
        return [(e.img_type, e.band, e.exptime) for e in plan.calibrations]

    assert sequence(reference) == sequence(night)
    assert {t for t, _, _ in sequence(reference)} == {"BIAS", "DARK", "FLAT"}
    assert reference.calibrations[-1].tai_end < reference.twilight_evening_tai


def test_visits_are_up_in_the_dark_and_within_the_rotators_reach(reference: NightPlan) -> None:
    config = reference.config
    for visit in reference.visits:
        assert reference.twilight_evening_tai <= visit.tai_start
        assert visit.tai_end <= reference.twilight_morning_tai
        exposure = visit.exposures[0]
        assert exposure.airmass <= config.max_airmass
        assert exposure.alt < 90.0 - config.zenith_avoidance + 0.5
        assert abs(exposure.rot_tel_pos) <= ROTATOR_LIMIT + 1.0
    # Each field is observed near its best (its transit, or the darkest edge of the night).
    assert np.median([v.exposures[0].airmass for v in reference.visits]) < 1.1


def test_reference_seeing_is_good_and_can_be_chosen(night: NightPlan, reference: NightPlan) -> None:
    night_median = np.median([e.fwhm_500 for v in night.visits for e in v.exposures])
    seeing = np.array([v.exposures[0].fwhm_500 for v in reference.visits])
    assert seeing.max() < night_median
    assert 0.5 < np.median(seeing) < 0.7
    poor = plan_reference_night(night, replace(REFERENCE, seeing_median=1.3))
    assert np.median([v.exposures[0].fwhm_500 for v in poor.visits]) > 1.1


def test_same_night_same_reference_plan(night: NightPlan, reference: NightPlan) -> None:
    again = plan_reference_night(plan_night(NIGHT), REFERENCE)
    assert again.visits == reference.visits
    assert [(e.obs_id, e.tai_start) for e in again.calibrations] == \
        [(e.obs_id, e.tai_start) for e in reference.calibrations]


def test_impossible_reference_nights_are_refused(night: NightPlan) -> None:
    with pytest.raises(ReferenceNightError, match="visits_per_field"):
        ReferenceConfig(visits_per_field=1)
    with pytest.raises(ReferenceNightError, match="do not fit"):
        plan_reference_night(night, ReferenceConfig(visits_per_field=100))
    with pytest.raises(ReferenceNightError, match="no science visits"):
        plan_reference_night(plan_night(replace(NIGHT, n_visits=0)))


# --- simulated: a one-field night and its reference night, one detector ----------------------------------

SIMULATION = SimulationConfig(
    night=NightConfig(seed=3, day_obs=20261209, n_visits=2, bands=("r",), snaps="1x30", n_bias=1, n_dark=0,
                      n_flat=0),
    detectors=("R22_S11",), compress=False, jobs=2,
)


@pytest.fixture(scope="module")
def nights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("reference")
    simulate_night(root / "night", SIMULATION)
    simulate_reference_night(root / "reference", SIMULATION, ReferenceConfig(visits_per_field=2))
    return root / "night", root / "reference"


def _truth(night: Path, name: str) -> dict[str, np.ndarray]:
    table = pq.read_table(night / "truth" / f"{name}.parquet")
    return {column: table[column].to_numpy(zero_copy_only=False) for column in table.column_names}


def _first_sighting(sources: dict[str, np.ndarray], kind: str) -> dict[int, int]:
    rows = {}
    for row in np.flatnonzero(sources["kind"] == kind):
        rows.setdefault(int(sources["id"][row]), row)
    return rows


def test_static_sky_is_the_same_in_both_nights(nights: tuple[Path, Path]) -> None:
    night, reference = nights
    seen = _truth(night, "sources"), _truth(reference, "sources")
    stars = _truth(night, "stars")
    pm_mas_per_year = dict(zip(stars["id"], np.hypot(stars["pmra"], stars["pmdec"]), strict=True))
    variables = set(_truth(night, "variables")["id"])

    night_stars, reference_stars = (_first_sighting(s, "star") for s in seen)
    common = sorted((set(night_stars) & set(reference_stars)) - variables)
    assert len(common) > 50
    # Stars move by their proper motion between the two nights, and by nothing else.
    gap_years = (_truth(night, "exposures")["tai_start"].max()
                 - _truth(reference, "exposures")["tai_start"].min()) / (365.25 * 86400.0)
    for star in common:
        a, b = night_stars[star], reference_stars[star]
        assert seen[0]["flux_njy"][a] == pytest.approx(seen[1]["flux_njy"][b], rel=1e-12)
        east = (seen[0]["ra"][a] - seen[1]["ra"][b]) * np.cos(np.radians(seen[0]["dec"][a]))
        moved_mas = 3.6e6 * np.hypot(east, seen[0]["dec"][a] - seen[1]["dec"][b])
        assert moved_mas <= pm_mas_per_year[star] * gap_years + 1e-3

    night_galaxies, reference_galaxies = (_first_sighting(s, "galaxy") for s in seen)
    shared = sorted(set(night_galaxies) & set(reference_galaxies))
    assert len(shared) > 50
    for galaxy in shared:
        a, b = night_galaxies[galaxy], reference_galaxies[galaxy]
        for column in ("ra", "dec", "flux_njy"):
            assert seen[0][column][a] == seen[1][column][b]

    assert pq.read_table(night / "refcat" / "reference_catalog.parquet").equals(
        pq.read_table(reference / "refcat" / "reference_catalog.parquet"))


def test_same_camera_in_both_nights(nights: tuple[Path, Path]) -> None:
    constants = [json.loads((n / "calib" / "curated" / "R22_S11.json").read_text()) for n in nights]
    assert [c.pop("valid_from") for c in constants] == [20261209, REFERENCE_DAY]
    assert constants[0] == constants[1]


def test_reference_night_reads_back_as_a_recorded_night(nights: tuple[Path, Path]) -> None:
    _, reference = nights
    reader = NightReader(reference)
    assert reader.manifest.day_obs == REFERENCE_DAY and reader.manifest.detectors == ["R22_S11"]
    assert reader.manifest.simulation["reference_of"] == 20261209
    assert reader.manifest.simulation["visits_per_field"] == 2
    events = list(reader.events())
    assert reader.stats.malformed == 0 and reader.stats.out_of_order == 0
    readouts = [e for e in events if isinstance(e, ReadoutEvent)]
    headers = [read_raw(e.path).primary_header for e in readouts]
    assert [h["IMGTYPE"] for h in headers] == ["BIAS", "OBJECT", "OBJECT"]
    assert {h["DAYOBS"] for h in headers} == {REFERENCE_DAY}
    assert [h["EXPTIME"] for h in headers if h["IMGTYPE"] == "OBJECT"] == [30.0, 30.0]
    announced = [e for e in events if isinstance(e, MessageEvent) and e.topic == topics.NEXT_VISIT.name]
    assert sorted(e.value["groupId"] for e in announced) == \
        sorted({h["GROUPID"] for h in headers if h["IMGTYPE"] == "OBJECT"})
    manifest = json.loads((reference / "night.json").read_text())
    assert all((reference / path).exists() for path in manifest["curated_calibrations"]["R22_S11"].values())
    assert (reference / manifest["truth"]["sources"]).exists()
