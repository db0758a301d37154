"""The visibility heartbeat: long jobs are never run twice by live workers; given-up leases lapse."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import dramatiq
import psycopg
import pytest
from dramatiq import Worker

from brokers import PGMQBroker
from brokers.lease import Lease, LeaseKeeper

from .conftest import first_delivery, wait_until, warnings_of


@pytest.fixture
def lost_lease_warnings() -> Iterator[list[str]]:
    """The keeper's "Lost the lease" warnings logged during the test."""
    with warnings_of("lease_lost") as lines:
        yield lines


@pytest.mark.slow
def test_a_job_three_times_longer_than_the_visibility_timeout_runs_once(
    make_broker: Callable[..., PGMQBroker], make_worker: Callable[..., Worker]
) -> None:
    # Given two workers (two brokers, as two processes would have) with one thread each, so each prefetches
    # two messages and keeps one buffered while the other runs, and a visibility timeout of 0.6 s
    runs = Counter[int]()

    def slow(n: int) -> None:
        runs[n] += 1
        time.sleep(1.8)

    first = make_broker(visibility_timeout_s=0.6, poll_interval_ms=50)
    dramatiq.actor(slow, queue_name="long_jobs", broker=first)
    second = make_broker(visibility_timeout_s=0.6, poll_interval_ms=50)
    dramatiq.actor(slow, queue_name="long_jobs", broker=second)

    first.enqueue_many([first.get_actor("slow").message(n) for n in range(3)])
    make_worker(first, threads=1)
    wait_until(lambda: len(runs) >= 1, what="the first job to start")
    make_worker(second, threads=1)

    # When every job has finished
    first.join("long_jobs", timeout=15_000)

    # Then each ran exactly once, although each sat or ran for longer than the visibility timeout
    assert runs == {0: 1, 1: 1, 2: 1}


def test_the_keeper_extends_held_leases_and_forgets_lost_ones(
    broker: PGMQBroker, conn: psycopg.Connection, lost_lease_warnings: list[str]
) -> None:
    conn.execute("select pgmq.create('leases')")
    conn.execute("select pgmq.send_batch('leases', array['{}'::jsonb, '{}'::jsonb])")
    rows = conn.execute("select msg_id, last_read_at, read_ct from pgmq.read('leases', 1, 2)").fetchall()
    leases = [Lease("leases", msg_id, token, read_ct) for msg_id, token, read_ct in rows]
    keeper = LeaseKeeper(database=broker.database, visibility_timeout_ms=60_000, max_lease_s=3600)
    keeper.track(leases)

    # A lease re-read elsewhere (its token changed) is lost, the other is pushed a minute ahead
    conn.execute("update pgmq.q_leases set last_read_at = clock_timestamp() where msg_id = %s", [leases[1].msg_id])
    assert keeper.extend_all() == 1
    assert keeper.tracked_count() == 1
    vt_in_s = conn.execute(
        "select extract(epoch from vt - clock_timestamp()) from pgmq.q_leases where msg_id = %s", [leases[0].msg_id]
    ).fetchone()[0]  # type: ignore[index]
    assert 50 < vt_in_s <= 60
    assert lost_lease_warnings == [
        f"Lost the lease of 1 messages of queue 'leases' (settled or re-read elsewhere): {leases[1].msg_id}"
    ]


@pytest.mark.parametrize("settle", ["ack", "nack", "resend"])
def test_a_heartbeat_between_a_settlements_delete_and_its_forget_reports_no_lost_lease(
    broker: PGMQBroker, monkeypatch: pytest.MonkeyPatch, lost_lease_warnings: list[str], settle: str
) -> None:
    # Given a message this process holds, its lease tracked by the keeper
    @dramatiq.actor(queue_name="settling", broker=broker)
    def job() -> None: ...

    job.send()
    consumer, message = first_delivery(broker, "settling")
    keeper = broker.settlement.keeper
    assert keeper is not None and keeper.tracked_count() == 1

    # When a heartbeat runs after the settlement deleted the message and before it forgets the lease
    heartbeats: list[int] = []
    forget = keeper.forget

    def heartbeat_then_forget(leases: Iterable[Lease]) -> None:
        leases = list(leases)
        if leases and not heartbeats:
            heartbeats.append(-1)
            heartbeats[0] = keeper.extend_all()
        forget(leases)

    monkeypatch.setattr(keeper, "forget", heartbeat_then_forget)
    if settle == "ack":
        consumer.ack(message)
    elif settle == "nack":
        message.fail()
        consumer.nack(message)
    else:
        broker.enqueue(message)  # what Retries does: the new message replaces the delivery

    # Then the heartbeat found the message gone and took it for the settlement, not for a lost lease
    assert heartbeats == [0]
    assert keeper.tracked_count() == 0
    assert lost_lease_warnings == []
    metrics = broker.metrics("settling")
    assert (metrics.queued, metrics.dead_lettered) == {"ack": (0, 0), "nack": (0, 1), "resend": (1, 0)}[settle]
    consumer.close()


def test_the_keeper_gives_up_after_the_maximum_lease(broker: PGMQBroker, conn: psycopg.Connection) -> None:
    conn.execute("select pgmq.create('given_up')")
    conn.execute("select pgmq.send('given_up', '{}'::jsonb)")
    msg_id, token, read_ct = conn.execute(
        "select msg_id, last_read_at, read_ct from pgmq.read('given_up', 1, 1)"
    ).fetchone()  # type: ignore[misc]
    keeper = LeaseKeeper(database=broker.database, visibility_timeout_ms=60_000, max_lease_s=0.0)
    keeper.track([Lease("given_up", msg_id, token, read_ct, fetched_at=time.monotonic() - 1)])

    assert keeper.extend_all() == 0
    assert keeper.tracked_count() == 0
    # Not extended: it still becomes visible when its first lease ends
    assert conn.execute("select vt < clock_timestamp() + interval '2 seconds' from pgmq.q_given_up").fetchone()  # type: ignore[misc] == (True,)


def test_a_requeued_message_cannot_be_hidden_again_by_a_heartbeat_in_flight(
    broker: PGMQBroker, conn: psycopg.Connection
) -> None:
    # Given a lease the keeper still holds in its snapshot
    conn.execute("select pgmq.create('released')")
    conn.execute("select pgmq.send('released', '{}'::jsonb)")
    msg_id, token, read_ct = conn.execute(
        "select msg_id, last_read_at, read_ct from pgmq.read('released', 30, 1)"
    ).fetchone()  # type: ignore[misc]
    lease = Lease("released", msg_id, token, read_ct)
    keeper = LeaseKeeper(database=broker.database, visibility_timeout_ms=60_000, max_lease_s=3600)
    keeper.track([lease])

    # When the message is released (requeued) and only then the heartbeat runs
    broker.settlement.release([lease], uncount=True)
    keeper.extend_all()

    # Then it stays visible
    assert conn.execute("select vt <= clock_timestamp() from pgmq.q_released").fetchone() == (True,)
