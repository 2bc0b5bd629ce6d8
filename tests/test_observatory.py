"""The simulated observatory: a night of calibrations and science visits with their conditions."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace

import numpy as np
import pytest

from dmstream.payloads import conditions
from dmstream.streams.observatory import (
    NightConfig,
    NightPlan,
    day_obs_of,
    exposure_id_of,
    obs_id_of,
    plan_night,
)

CONFIG = NightConfig(seed=7, day_obs=20261125)


@pytest.fixture(scope="module")
def night() -> NightPlan:
    return plan_night(CONFIG)


def test_science_happens_between_the_twilights(night: NightPlan) -> None:
    science = [e for e in night.exposures if e.can_see_sky]
    assert len(night.visits) > 700
    assert all(e.sun_alt < -12.0 for e in science)
    assert night.twilight_evening_tai <= night.visits[0].tai_start
    assert night.visits[-1].tai_end <= night.twilight_morning_tai


def test_calibrations_come_first_with_realistic_exposure_times(night: NightPlan) -> None:
    kinds = Counter(e.img_type for e in night.calibrations)
    assert kinds == {"BIAS": CONFIG.n_bias, "DARK": CONFIG.n_dark, "FLAT": CONFIG.n_flat * len(CONFIG.bands)}
    assert night.calibrations[-1].tai_readout_end < night.visits[0].tai_start
    assert all(e.exptime == 0 for e in night.calibrations if e.img_type == "BIAS")
    assert {e.band for e in night.calibrations if e.img_type == "FLAT"} == set(CONFIG.bands)
    assert all(np.isnan(e.sky_mag) for e in night.calibrations)


def test_identifiers_follow_rubin_conventions(night: NightPlan) -> None:
    exposures = night.exposures
    assert [e.seq_num for e in exposures] == list(range(1, len(exposures) + 1))
    for e in exposures:
        assert e.exposure_id == e.day_obs * 100_000 + e.seq_num
        assert e.obs_id == f"MC_{e.controller}_{e.day_obs}_{e.seq_num:06d}"
        assert e.physical_filter.startswith(e.band + "_")
        assert day_obs_of(e.tai_start) == e.day_obs == 20261125
    assert exposure_id_of(20261125, 123) == 2026112500123
    assert obs_id_of(20261125, 123, "C") == "MC_C_20261125_000123"
    for visit in night.visits:
        assert visit.visit_id == visit.exposures[0].exposure_id
        assert {e.group_id for e in visit.exposures} == {visit.group_id}
        assert all(e.img_type == "OBJECT" for e in visit.exposures)
    assert len({v.group_id for v in night.visits}) == len(night.visits)


def test_day_obs_rolls_over_at_noon_utc() -> None:
    tai = 37.0 + 1795651200.0  # 2026-11-26T00:00:00 UTC
    assert day_obs_of(tai) == 20261125
    assert day_obs_of(tai + 11.9 * 3600) == 20261125
    assert day_obs_of(tai + 12.1 * 3600) == 20261126


def test_airmass_is_consistent_with_altitude(night: NightPlan) -> None:
    science = [e for e in night.exposures if e.can_see_sky]
    alt = np.array([e.alt for e in science])
    airmass = np.array([e.airmass for e in science])
    assert (airmass >= 1.0).all() and (airmass <= CONFIG.max_airmass + 0.2).all()
    assert airmass == pytest.approx(1 / np.sin(np.radians(alt)), rel=3e-3)


def test_every_field_is_visited_at_least_twice_in_pairs(night: NightPlan) -> None:
    starts = defaultdict(list)
    for visit in night.visits:
        starts[visit.field_id].append(visit.tai_start)
    assert min(len(s) for s in starts.values()) >= 2
    gaps = np.array([(s[1] - s[0]) / 60 for s in starts.values()])
    assert 20 <= np.median(gaps) <= 40


def test_band_changes_are_limited(night: NightPlan) -> None:
    assert 1 <= night.band_changes <= CONFIG.max_filter_changes
    for previous, visit in zip(night.visits, night.visits[1:], strict=False):
        if visit.band != previous.band:
            assert visit.filter_change
            assert visit.tai_start - previous.exposures[-1].tai_end >= CONFIG.filter_change_time


@pytest.mark.parametrize(("snaps", "nimages"), [("1x30", {1}), ("2x15", {2}), ("mixed", {1, 2})])
def test_snap_policy_and_cadence(snaps: str, nimages: set[int]) -> None:
    plan = plan_night(replace(CONFIG, snaps=snaps))
    assert {v.nimages for v in plan.visits} == nimages
    for visit in plan.visits:
        assert len(visit.exposures) == visit.nimages
        assert [e.snap for e in visit.exposures] == list(range(visit.nimages))
        assert sum(e.exptime for e in visit.exposures) == pytest.approx(30.0)
        for a, b in zip(visit.exposures, visit.exposures[1:], strict=False):
            assert b.tai_start == pytest.approx(a.tai_readout_end)
    starts = np.array([v.tai_start for v in plan.visits])
    assert 34.0 <= np.diff(starts).mean() <= 39.0
    slews = np.array([v.tai_start - v.slew_start_tai for v in plan.visits[1:] if not v.filter_change])
    assert 4.0 <= np.median(slews) <= 10.0


def test_requested_number_of_visits() -> None:
    plan = plan_night(replace(CONFIG, n_visits=25))
    assert len(plan.visits) == 25
    assert min(Counter(v.field_id for v in plan.visits).values()) >= 2


def test_same_seed_same_plan(night: NightPlan) -> None:
    again = plan_night(CONFIG)
    # repr, because NaN (the sky of calibrations) is not equal to itself.
    assert repr(again.visits) == repr(night.visits)
    assert repr(again.calibrations) == repr(night.calibrations)
    assert plan_night(replace(CONFIG, seed=8)).visits != night.visits


def test_conditions_are_plausible(night: NightPlan) -> None:
    science = [e for e in night.exposures if e.can_see_sky]
    dimm = night.conditions.fwhm_500
    assert 0.4 < np.median(dimm) < 1.2 and dimm.min() >= 0.35 and dimm.max() <= 2.0
    fwhm = np.array([e.fwhm_eff for e in science])
    assert (fwhm > np.array([e.fwhm_500 for e in science]) * 0.8).all() and fwhm.max() < 3.0
    assert all(e.fwhm_geom < e.fwhm_eff for e in science)
    for band in CONFIG.bands:
        sky = np.array([e.sky_mag for e in science if e.band == band])
        if sky.size:
            assert (sky < conditions.DARK_SKY_MAG[band] + 0.1).all() and (sky > 15.0).all()
    transparency = night.conditions.transparency
    assert (transparency > 0).all() and (transparency <= 1).all()


def test_seeing_is_worse_in_blue_and_at_high_airmass() -> None:
    eff, _ = conditions.delivered_fwhm([0.7, 0.7, 0.7], [1.0, 1.0, 1.5], ["g", "z", "z"])
    assert eff[0] > eff[1] and eff[2] > eff[1]


def test_sky_is_brighter_near_a_bright_moon() -> None:
    bands = np.array(["g", "r", "i"])
    zenith = conditions.sky_brightness(bands, 90.0, -20.0, 60.0, 0.0, -30.0)
    assert zenith == pytest.approx([conditions.DARK_SKY_MAG[b] for b in bands], abs=0.01)
    dark = conditions.sky_brightness(bands, 70.0, -20.0, 60.0, 0.0, -30.0)
    assert (dark < zenith).all()
    full_near = conditions.sky_brightness(bands, 70.0, 50.0, 30.0, 0.0, -30.0)
    full_far = conditions.sky_brightness(bands, 70.0, 50.0, 100.0, 0.0, -30.0)
    crescent_near = conditions.sky_brightness(bands, 70.0, 50.0, 30.0, 140.0, -30.0)
    assert (full_near < full_far).all() and (full_far < dark).all()
    assert (full_near < crescent_near).all() and (crescent_near < dark).all()
    assert full_near[0] < dark[0] - 2.0
    twilight = conditions.sky_brightness(bands, 70.0, -20.0, 60.0, 0.0, -12.0)
    assert (twilight < dark - 0.3).all()
