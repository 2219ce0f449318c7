"""When the jobs fire: 08:00 New York time on weekdays, across both DST changes, and the
slot arithmetic that lets several schedulers agree on a run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from core.checklists import load_checklists
from core.jobs import job_specs, last_slot, next_runs

NY = ZoneInfo("America/New_York")


def _spec(job_id: str):  # type: ignore[no-untyped-def]
    return next(s for s in job_specs(NY, load_checklists()) if s.id == job_id)


@pytest.mark.parametrize(
    ("after", "expected_utc"),
    [
        # Spring forward 2026-03-08 (Sunday): Friday before at 08:00 EST, Monday after at EDT.
        (
            datetime(2026, 3, 5, 13, 30, tzinfo=UTC),
            [datetime(2026, 3, 6, 13, 0, tzinfo=UTC), datetime(2026, 3, 9, 12, 0, tzinfo=UTC)],
        ),
        # Fall back 2026-11-01 (Sunday): Friday before at EDT, Monday after at EST.
        (
            datetime(2026, 10, 29, 12, 30, tzinfo=UTC),
            [datetime(2026, 10, 30, 12, 0, tzinfo=UTC), datetime(2026, 11, 2, 13, 0, tzinfo=UTC)],
        ),
    ],
)
def test_morning_report_is_8am_new_york_on_weekdays_across_dst(
    after: datetime, expected_utc: list[datetime]
) -> None:
    runs = next_runs(_spec("morning_report").trigger, after, 2)
    assert [r.astimezone(UTC) for r in runs] == expected_utc
    for r in runs:
        local = r.astimezone(NY)
        assert (local.hour, local.minute) == (8, 0)
        assert local.weekday() < 5


def test_morning_report_never_fires_on_a_weekend_all_year() -> None:
    runs = next_runs(_spec("morning_report").trigger, datetime(2026, 1, 1, tzinfo=UTC), 261)
    assert len(runs) == 261
    for r in runs:
        local = r.astimezone(NY)
        assert local.weekday() < 5 and (local.hour, local.minute) == (8, 0)
    assert len({r.date() for r in runs}) == 261


def test_weekly_checklists_fire_on_the_manuals_days() -> None:
    start = datetime(2026, 11, 22, 12, tzinfo=UTC)  # a Sunday
    weekly = {
        "checklist:weekly-maintenance": (6, 2),
        "checklist:security-review": (0, 10),
        "checklist:performance-review": (2, 14),
    }
    for job_id, (weekday, hour) in weekly.items():
        (run,) = next_runs(_spec(job_id).trigger, start, 1)
        local = run.astimezone(NY)
        assert (local.weekday(), local.hour, local.minute) == (weekday, hour, 0), job_id


def test_monthly_checklists_fire_on_the_first_monday_tuesday_wednesday() -> None:
    start = datetime(2026, 11, 22, tzinfo=UTC)
    firsts = {
        "checklist:monthly-maintenance": 0,
        "checklist:billing-reconciliation": 1,
        "checklist:capacity-review": 2,
    }
    for job_id, weekday in firsts.items():
        runs = next_runs(_spec(job_id).trigger, start, 3)
        for run in runs:
            local = run.astimezone(NY)
            assert local.weekday() == weekday and local.day <= 7, (job_id, local)
        assert [r.astimezone(NY).month for r in runs] == [12, 1, 2]


def test_quarterly_disaster_recovery_test() -> None:
    runs = next_runs(
        _spec("checklist:disaster-recovery").trigger, datetime(2026, 11, 22, tzinfo=UTC), 4
    )
    assert [(r.astimezone(NY).year, r.astimezone(NY).month) for r in runs] == [
        (2027, 1),
        (2027, 4),
        (2027, 7),
        (2027, 10),
    ]


def test_last_slot_is_the_scheduled_time_not_the_start_time() -> None:
    trigger = _spec("morning_report").trigger
    monday_8 = datetime(2026, 11, 23, 13, 0, tzinfo=UTC)
    # Started an hour late: still the 08:00 slot (within the 4 h grace).
    assert last_slot(trigger, monday_8 + timedelta(hours=1), 4 * 3600) == monday_8
    # Five hours late: outside the grace, no slot.
    assert last_slot(trigger, monday_8 + timedelta(hours=5), 4 * 3600) is None


def test_interval_slots_agree_whenever_the_process_started() -> None:
    sweep = _spec("health_sweep")
    now = datetime(2026, 11, 23, 13, 0, 42, tzinfo=UTC)
    assert last_slot(sweep.trigger, now, sweep.misfire_grace_s) is None  # 42 s late: skipped
    now = datetime(2026, 11, 23, 13, 0, 7, tzinfo=UTC)
    assert last_slot(sweep.trigger, now, sweep.misfire_grace_s) == now.replace(second=0)
