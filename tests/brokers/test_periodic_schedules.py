"""The schedule functions of brokers/sql/051_schedules.sql that PeriodicScheduler relies on, against real Postgres."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest


def upsert(conn: psycopg.Connection, name: str = "tick", *, interval_ms: int = 1_000, lease_ms: int = 30_000) -> None:
    conn.execute("select pgmq_broker.schedule_upsert(%s, 'actor', 'default', %s, %s)", [name, interval_ms, lease_ms])


def claim(conn: psycopg.Connection, *names: str) -> list[tuple[Any, ...]]:
    return conn.execute(
        "select name, slot_ms, slots_missed, lost_state from pgmq_broker.schedule_claim_due(%s)",
        [list(names or ["tick"])],
    ).fetchall()


def start(conn: psycopg.Connection, slot_ms: int, name: str = "tick") -> int | None:
    row = conn.execute("select pgmq_broker.schedule_start(%s, %s)", [name, slot_ms]).fetchone()
    return None if row is None else row[0]


def finish(conn: psycopg.Connection, token: int, name: str = "tick", error: str | None = None) -> bool | None:
    row = conn.execute("select pgmq_broker.schedule_finish(%s, %s, %s)", [name, token, error]).fetchone()
    return None if row is None else row[0]


def make_due(conn: psycopg.Connection, name: str = "tick", *, slots_ago: int = 0) -> None:
    """Pretend time passed: move next_run_at back to the start of the slot `slots_ago` slots before now."""
    conn.execute(
        "update pgmq_broker.schedules set next_run_at = pgmq_broker.periodic_slot_time("
        "  pgmq_broker.periodic_slot(clock_timestamp(), interval_ms) - %s * interval_ms) where name = %s",
        [slots_ago, name],
    )


def schedule(conn: psycopg.Connection, name: str = "tick") -> dict[str, Any]:
    cursor = conn.cursor(row_factory=psycopg.rows.dict_row)
    row = cursor.execute("select * from pgmq_broker.schedules where name = %s", [name]).fetchone()
    assert row is not None
    return row


def wait_until(condition: Callable[[], Any], *, timeout_s: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.01)
    return result


def test_slots_are_aligned_on_the_unix_epoch(conn: psycopg.Connection) -> None:
    row = conn.execute(
        "select pgmq_broker.periodic_slot('1970-01-01 00:00:12.345+00', 5000),"
        " pgmq_broker.periodic_slot_time(15000) = timestamptz '1970-01-01 00:00:15+00'"
    ).fetchone()
    assert row == (10_000, True)


def test_a_new_schedule_is_due_at_once_in_its_current_slot(conn: psycopg.Connection) -> None:
    upsert(conn, interval_ms=60_000)
    [(name, slot_ms, missed, lost)] = claim(conn)
    now_ms = conn.execute("select (extract(epoch from clock_timestamp()) * 1000)::bigint").fetchone()[0]
    assert (name, missed, lost) == ("tick", 0, None)
    assert slot_ms % 60_000 == 0 and slot_ms <= now_ms < slot_ms + 60_000
    assert schedule(conn)["state"] == "sent"
    assert claim(conn) == []


def test_exactly_one_of_many_concurrent_schedulers_claims_a_slot(db_url: str, conn: psycopg.Connection) -> None:
    # Given a due schedule and 6 schedulers, each claiming in a transaction kept open a little while
    upsert(conn)
    start_together = threading.Barrier(6)

    def scheduler(_: int) -> int:
        with psycopg.connect(db_url, autocommit=True) as own, own.transaction():
            start_together.wait(timeout=10)
            rows = claim(own)
            time.sleep(0.05)  # hold the claim open so the others really run concurrently with it
            return len(rows)

    with ThreadPoolExecutor(6) as pool:
        claimed = list(pool.map(scheduler, range(6)))
    # Then exactly one took the slot and one tick was sent
    assert sorted(claimed) == [0, 0, 0, 0, 0, 1]
    assert schedule(conn)["ticks_sent"] == 1


def test_a_backlog_collapses_into_one_tick_for_the_current_slot(conn: psycopg.Connection) -> None:
    # Given a schedule nobody has claimed for 5 slots
    upsert(conn, interval_ms=1_000)
    make_due(conn, slots_ago=5)
    # When a scheduler comes back, it sends one tick, for the current slot, and counts the 5 missed slots
    [(_, slot_ms, missed, _)] = claim(conn)
    assert missed == 5
    assert claim(conn) == []
    row = schedule(conn)
    assert row["slots_missed"] == 5 and row["ticks_sent"] == 1
    assert (
        row["next_run_at"] == conn.execute("select pgmq_broker.periodic_slot_time(%s)", [slot_ms + 1000]).fetchone()[0]
    )


def test_no_tick_is_sent_while_the_previous_one_holds_its_lease(conn: psycopg.Connection) -> None:
    # Given a tick that was sent and then started
    upsert(conn)
    [(_, slot_ms, _, _)] = claim(conn)
    token = start(conn, slot_ms)
    assert token is not None
    # When its next slot is due while it runs (and renews), no tick is sent, and the slot is not started twice
    make_due(conn)
    assert claim(conn) == []
    renewed = conn.execute("select pgmq_broker.schedule_renew(array['tick'], array[%s::bigint])", [token]).fetchone()
    assert renewed == (1,)
    assert claim(conn) == []
    assert start(conn, slot_ms) is None
    # Then once it finishes the due slot is sent, and the error of the run is kept
    assert finish(conn, token, error="ValueError: boom") is True
    assert len(claim(conn)) == 1
    assert schedule(conn)["last_error"] == "ValueError: boom"


def pretend_sent_slots_ago(conn: psycopg.Connection, slots: int, name: str = "tick") -> int:
    """Make the latest tick look as if it had been sent `slots` slots ago; return its slot."""
    row = conn.execute(
        "update pgmq_broker.schedules set slot_ms = slot_ms - %s * interval_ms where name = %s returning slot_ms",
        [slots, name],
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_tick_lost_with_its_worker_frees_the_schedule_when_the_lease_runs_out(conn: psycopg.Connection) -> None:
    # Given a tick of an earlier slot started by a worker that then died (never renews nor finishes), 200 ms lease
    upsert(conn, lease_ms=200)
    claim(conn)
    old_slot = pretend_sent_slots_ago(conn, 3)
    old_token = start(conn, old_slot)
    assert old_token is not None
    make_due(conn)
    # When the lease runs out, the next claim sends a new tick and says the previous one was lost while running
    [(_, new_slot, _, lost)] = wait_until(lambda: claim(conn))
    assert lost == "running" and new_slot > old_slot
    # Then the old run can neither finish nor renew, a redelivery of the old tick is stale, and the new one starts
    assert finish(conn, old_token) is None
    renewed = conn.execute("select pgmq_broker.schedule_renew(array['tick'], array[%s::bigint])", [old_token])
    assert renewed.fetchone() == (0,)
    assert start(conn, old_slot) is None
    assert start(conn, new_slot) == old_token + 1


def test_a_queued_tick_that_waited_past_its_lease_is_replaced_and_then_skipped(conn: psycopg.Connection) -> None:
    # Given a tick of an earlier slot still waiting in a backlogged queue (never started), 200 ms lease
    upsert(conn, lease_ms=200)
    claim(conn)
    old_slot = pretend_sent_slots_ago(conn, 3)
    make_due(conn)
    # When its lease runs out, a fresh tick replaces it
    [(_, new_slot, _, lost)] = wait_until(lambda: claim(conn))
    assert lost == "sent" and new_slot > old_slot
    # Then the old tick, delivered late, is skipped and the fresh one runs
    assert start(conn, old_slot) is None
    assert start(conn, new_slot) is not None


def test_changing_the_interval_takes_effect_by_the_new_intervals_next_slot(conn: psycopg.Connection) -> None:
    upsert(conn, interval_ms=3_600_000)
    claim(conn)
    upsert(conn, interval_ms=1_000)
    row = schedule(conn)
    seconds_away = conn.execute("select extract(epoch from %s - clock_timestamp())", [row["next_run_at"]]).fetchone()[0]
    assert row["interval_ms"] == 1_000
    assert seconds_away <= 1


@pytest.mark.parametrize("interval_ms", [0, -5], ids=["zero", "negative"])
def test_a_schedule_needs_a_positive_interval(conn: psycopg.Connection, interval_ms: int) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="must be positive"):
        upsert(conn, interval_ms=interval_ms)
