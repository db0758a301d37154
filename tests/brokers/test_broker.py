"""PGMQBroker through Dramatiq's own Worker, in-process: the contract Dramatiq tests its brokers for, and more."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import dramatiq
import psycopg
import pytest
from dramatiq import Message, QueueJoinTimeout, Worker
from dramatiq.middleware import CurrentMessage

from brokers import InvalidQueueName, PGMQBroker, foreign_message_id
from brokers.database import Outage
from brokers.listener import Listener

from .conftest import first_delivery, wait_until


def test_actors_can_be_sent_messages(broker: PGMQBroker, worker: Worker) -> None:
    # Given an actor that records what it is sent
    database: dict[str, int] = {}

    @dramatiq.actor(queue_name="delivery")
    def put(key: str, value: int) -> None:
        database[key] = value

    # When I send it 100 messages
    for i in range(100):
        assert put.send(f"key-{i}", i)

    # Then all of them run and the queue is empty
    broker.join("delivery", timeout=10_000)
    worker.join()
    assert len(database) == 100
    assert broker.metrics("delivery").queued == 0


def test_enqueue_many_sends_batches_that_are_all_delivered(broker: PGMQBroker, worker: Worker) -> None:
    seen: list[int] = []

    @dramatiq.actor(queue_name="fanout")
    def take(i: int) -> None:
        seen.append(i)

    messages = [take.message(i) for i in range(250)]
    sent = broker.enqueue_many(messages, batch_size=100)

    assert len(sent) == 250
    broker.join("fanout", timeout=10_000)
    worker.join()
    assert sorted(seen) == list(range(250))


def test_delayed_messages_wait_their_delay_and_do_not_block_each_other(broker: PGMQBroker, worker: Worker) -> None:
    # Given an actor that records when it runs
    ran_at: dict[str, float] = {}

    @dramatiq.actor(queue_name="delays")
    def stamp(name: str) -> None:
        ran_at[name] = time.monotonic()

    # When a message delayed by a minute is sent before one delayed by 300 ms
    sent_at = time.monotonic()
    stamp.send_with_options(args=("late",), delay=60_000)
    stamp.send_with_options(args=("soon",), delay=300)

    # Then the short delay runs on time, not before its delay, and the long one is still waiting
    wait_until(lambda: "soon" in ran_at, timeout_s=5, what="the 300 ms message to run")
    assert ran_at["soon"] - sent_at >= 0.3
    assert ran_at["soon"] - sent_at < 1.5
    assert "late" not in ran_at
    assert broker.metrics("delays").delayed == 1


def test_failed_actors_are_retried_with_backoff(broker: PGMQBroker, worker: Worker) -> None:
    attempts: list[float] = []

    @dramatiq.actor(queue_name="retries", min_backoff=100, max_backoff=200)
    def flaky() -> None:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise RuntimeError("not yet")

    flaky.send()

    wait_until(lambda: len(attempts) == 3, what="three attempts")
    broker.join("retries", timeout=5_000)
    assert all(later - earlier >= 0.1 for earlier, later in zip(attempts, attempts[1:], strict=False))
    assert broker.count_dead_letters("retries") == 0


def test_messages_are_dead_lettered_after_max_retries_with_their_reason(broker: PGMQBroker, worker: Worker) -> None:
    @dramatiq.actor(queue_name="doomed", max_retries=2, min_backoff=10, max_backoff=20)
    def doomed(n: int) -> None:
        raise ValueError(f"bad input {n}")

    message = doomed.send(7)

    wait_until(lambda: broker.count_dead_letters("doomed") == 1, what="a dead letter")
    broker.join("doomed", timeout=5_000)
    [letter] = broker.dead_letters("doomed")
    assert letter.message_id == message.message_id
    assert letter.actor_name == "doomed"
    assert letter.reason == "failed"
    assert letter.error_type == "ValueError"
    assert letter.error_message == "bad input 7"
    assert "raise ValueError" in (letter.traceback or "")
    assert letter.attempts == 3
    assert letter.message["options"]["retries"] == 3
    assert broker.metrics("doomed").dead_lettered == 1


def test_throws_dead_letters_at_once_and_replay_runs_the_message_again(broker: PGMQBroker, worker: Worker) -> None:
    calls: list[int] = []
    fixed = threading.Event()

    @dramatiq.actor(queue_name="replayed", throws=(KeyError,))
    def lookup(n: int) -> None:
        calls.append(n)
        if not fixed.is_set():
            raise KeyError(n)

    lookup.send(1)
    wait_until(lambda: broker.count_dead_letters("replayed") == 1, what="a dead letter")
    assert calls == [1]

    # When the cause is fixed and the dead letter replayed
    fixed.set()
    assert broker.replay_dead_letters("replayed") == 1

    # Then it runs once more and the store is empty
    wait_until(lambda: calls == [1, 1], what="the replayed run")
    broker.join("replayed", timeout=5_000)
    assert broker.count_dead_letters("replayed") == 0


def test_messages_for_unknown_actors_are_dead_lettered(broker: PGMQBroker, worker: Worker) -> None:
    @dramatiq.actor(queue_name="unknown")
    def known() -> None:
        pass

    broker.enqueue(Message(queue_name="unknown", actor_name="missing", args=(), kwargs={}, options={}))
    known.send()

    wait_until(lambda: broker.count_dead_letters("unknown") == 1, what="a dead letter")
    broker.join("unknown", timeout=5_000)
    [letter] = broker.dead_letters("unknown")
    assert (letter.reason, letter.actor_name, letter.error_type) == ("unknown_actor", "missing", "ActorNotFound")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("[1, 2, 3]", "undecodable"),
        ('"just a string"', "undecodable"),
        ('{"actor_name": "x", "args": "not-a-list", "kwargs": {}, "options": {}, "message_id": "m"}', "undecodable"),
        ('{"thread_id": "t1"}', "no_handler"),
        (
            '{"actor_name": "missing", "args": [], "kwargs": {}, "options": {"retries": 1e400}, "message_id": "m"}',
            "undecodable",
        ),
        (
            '{"actor_name": "fine", "args": [2], "kwargs": {}, "options": {"time_limit": "soon"}, "message_id": "m"}',
            "undecodable",
        ),
    ],
    ids=["array", "string", "malformed-envelope", "foreign-without-handler", "huge-retries", "text-time-limit"],
)
def test_bodies_that_cannot_run_are_dead_lettered_and_the_queue_moves_on(
    broker: PGMQBroker, worker: Worker, conn: psycopg.Connection, body: str, reason: str
) -> None:
    ran: list[int] = []

    @dramatiq.actor(queue_name="bodies")
    def fine(n: int) -> None:
        ran.append(n)

    conn.execute("select pgmq.create('bodies')")
    conn.execute("select pgmq.send('bodies', %s::jsonb)", [body])
    fine.send(1)

    wait_until(lambda: ran == [1], what="the good message")
    broker.join("bodies", timeout=5_000)
    [letter] = broker.dead_letters("bodies")
    assert letter.reason == reason
    assert letter.error_message
    assert letter.message is not None


def test_foreign_json_goes_to_the_queue_handler_with_a_deterministic_message_id(
    make_broker: Callable[..., PGMQBroker], make_worker: Callable[..., Worker], conn: psycopg.Connection
) -> None:
    # Given a broker with CurrentMessage and an actor that handles its queue's foreign messages
    broker = make_broker()
    broker.add_middleware(CurrentMessage())
    got: list[tuple[dict[str, Any], str]] = []
    attempts = Counter[str]()

    @dramatiq.actor(queue_name="thread_sync_jobs", queue_handler=True, min_backoff=10, max_backoff=20)
    def sync_thread(payload: dict[str, Any]) -> None:
        current = CurrentMessage.get_current_message()
        assert current is not None
        attempts[current.message_id] += 1
        if attempts[current.message_id] == 1:
            raise RuntimeError("first attempt fails")
        got.append((payload, current.message_id))

    make_worker(broker)

    # When a SQL function puts a plain JSON object on the queue
    conn.execute("select pgmq.create('thread_sync_jobs')")
    msg_id = conn.execute(
        "select pgmq.send('thread_sync_jobs', %s::jsonb)", ['{"thread_id": "t1", "grant_id": "g1"}']
    ).fetchone()[0]  # type: ignore[index]

    # Then the handler receives the object, with the same id on the retry as on the first delivery
    wait_until(lambda: len(got) == 1, what="the foreign message to run")
    payload, message_id = got[0]
    assert payload == {"thread_id": "t1", "grant_id": "g1"}
    assert message_id == foreign_message_id("thread_sync_jobs", msg_id)
    assert attempts == {message_id: 2}


def test_the_sql_helper_builds_envelopes_sql_producers_can_send(
    broker: PGMQBroker, worker: Worker, conn: psycopg.Connection
) -> None:
    got: list[Any] = []

    @dramatiq.actor(queue_name="from_sql")
    def greet(name: str, *, punctuation: str) -> None:
        got.append(name + punctuation)

    conn.execute("select pgmq.create('from_sql')")
    conn.execute(
        "select pgmq.send('from_sql', pgmq_broker.dramatiq_message('from_sql', 'greet', %s::jsonb, %s::jsonb))",
        ['["world"]', '{"punctuation": "!"}'],
    )

    wait_until(lambda: got == ["world!"], what="the SQL-built message to run")


def test_transactional_enqueue_is_delivered_only_if_the_transaction_commits(
    broker: PGMQBroker, worker: Worker, db_url: str
) -> None:
    got: list[str] = []

    @dramatiq.actor(queue_name="transactional")
    def note(text: str) -> None:
        got.append(text)

    with psycopg.connect(db_url) as caller:
        # A transaction that rolls back takes its message with it
        with caller.transaction(force_rollback=True):
            broker.enqueue(note.message("rolled back"), connection=caller)
        # One that commits delivers it, and only after the commit
        with caller.transaction():
            broker.enqueue(note.message("committed"), connection=caller)
            broker.enqueue_many([note.message("batched")], connection=caller)
            time.sleep(0.3)  # long enough for an idle worker to poll: it must not see the uncommitted rows
            assert got == []

    wait_until(lambda: sorted(got) == ["batched", "committed"], what="the committed messages")
    broker.join("transactional", timeout=5_000)
    assert "rolled back" not in got


def test_join_times_out_while_messages_remain(broker: PGMQBroker) -> None:
    @dramatiq.actor(queue_name="joining")
    def idle() -> None:
        pass

    idle.send()
    with pytest.raises(QueueJoinTimeout):
        broker.join("joining", timeout=200)


def test_flush_and_flush_all_drop_queued_messages(broker: PGMQBroker) -> None:
    @dramatiq.actor(queue_name="flush_a")
    def a() -> None:
        pass

    @dramatiq.actor(queue_name="flush_b")
    def b() -> None:
        pass

    for _ in range(3):
        a.send()
        b.send_with_options(delay=60_000)

    broker.flush("flush_a")
    assert broker.metrics("flush_a").queued == 0
    assert broker.metrics("flush_b").delayed == 3
    broker.flush_all()
    assert broker.metrics("flush_b").delayed == 0


def test_brokers_connect_lazily() -> None:
    # A broker pointed at a server that does not exist can still be built and have actors declared
    broker = PGMQBroker(url="postgresql://nobody@127.0.0.1:1/none")

    @dramatiq.actor(queue_name="lazy", broker=broker)
    def lazy() -> None:
        pass

    assert broker.get_declared_queues() == {"lazy"}
    assert not broker.database.opened_here()
    broker.close()


@pytest.mark.parametrize("name", ["Emails", "emails.DQ", "with-dash", "x" * 48, "9lives"])
def test_queue_names_pgmq_cannot_hold_are_rejected_with_a_suggestion(name: str) -> None:
    broker = PGMQBroker(url="postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(InvalidQueueName, match="lower-case letters") as info:
        broker.declare_queue(name)
    assert info.value.queue_name == name
    assert isinstance(info.value, ValueError)


def test_only_canonical_queue_names_are_declared(broker: PGMQBroker) -> None:
    @dramatiq.actor(queue_name="canonical")
    def act() -> None:
        pass

    assert broker.get_declared_queues() == {"canonical"}
    assert broker.get_declared_delay_queues() == set()


def test_consumers_return_none_within_their_timeout_when_idle(broker: PGMQBroker) -> None:
    broker.declare_queue("idle")
    consumer = broker.consume("idle", prefetch=2, timeout=200)
    started = time.monotonic()
    assert next(consumer) is None
    assert time.monotonic() - started < 1.0
    consumer.close()


def test_buffered_plus_running_never_exceeds_the_prefetch(broker: PGMQBroker) -> None:
    @dramatiq.actor(queue_name="prefetch")
    def job(n: int) -> None:
        pass

    broker.enqueue_many([job.message(i) for i in range(10)])
    consumer = broker.consume("prefetch", prefetch=3, timeout=100)

    taken = [next(consumer) for _ in range(3)]
    assert all(m is not None for m in taken)
    assert next(consumer) is None  # the prefetch is full: nothing more is leased
    assert broker.metrics("prefetch").in_flight == 3

    consumer.ack(taken[0])  # type: ignore[arg-type]
    assert next(consumer) is not None
    assert broker.metrics("prefetch").in_flight == 3
    consumer.close()


def test_requeue_and_close_make_unrun_messages_visible_at_once(broker: PGMQBroker) -> None:
    @dramatiq.actor(queue_name="requeue")
    def job(n: int) -> None:
        pass

    broker.enqueue_many([job.message(i) for i in range(4)])
    consumer = broker.consume("requeue", prefetch=4, timeout=100)
    first = next(consumer)
    second = next(consumer)
    assert first is not None and second is not None
    assert broker.metrics("requeue").in_flight == 4  # two handed out, two in the consumer's buffer

    consumer.requeue([first])
    consumer.ack(second)
    consumer.close()

    metrics = broker.metrics("requeue")
    assert (metrics.queued, metrics.in_flight) == (3, 0)
    # A requeued delivery is not counted against max_deliveries
    with broker.database.connection() as conn:
        counts = [row[0] for row in conn.execute("select read_ct from pgmq.q_requeue")]
    assert counts == [0, 0, 0]


def test_ack_and_nack_of_messages_already_gone_do_not_raise(broker: PGMQBroker) -> None:
    @dramatiq.actor(queue_name="gone")
    def job(n: int) -> None:
        pass

    broker.enqueue_many([job.message(1), job.message(2)])
    consumer = broker.consume("gone", prefetch=2, timeout=100)
    acked, nacked = next(consumer), next(consumer)
    assert acked is not None and nacked is not None
    broker.flush("gone")

    consumer.ack(acked)
    nacked.fail()
    consumer.nack(nacked)
    consumer.close()
    assert broker.count_dead_letters("gone") == 0


def test_archive_on_ack_keeps_acknowledged_messages_until_purged(make_broker: Callable[..., PGMQBroker]) -> None:
    broker = make_broker(archive_on_ack=True)

    @dramatiq.actor(queue_name="archived")
    def job() -> None:
        pass

    job.send()
    consumer, message = first_delivery(broker, "archived")
    consumer.ack(message)
    consumer.close()

    with broker.database.connection() as conn:
        assert conn.execute("select count(*) from pgmq.a_archived").fetchone() == (1,)
    assert broker.purge_archive("archived", older_than_s=0) == 1


def test_a_message_delivered_too_often_without_an_ack_is_dead_lettered(
    make_broker: Callable[..., PGMQBroker], make_worker: Callable[..., Worker], conn: psycopg.Connection
) -> None:
    # Given a message that three workers already took and never settled (each died while running it)
    broker = make_broker(max_deliveries=3)
    ran: list[int] = []

    @dramatiq.actor(queue_name="poison")
    def poison(n: int) -> None:
        ran.append(n)

    poison.send(1)
    for _ in range(3):
        assert conn.execute("select count(*) from pgmq.read('poison', 0, 1)").fetchone() == (1,)

    # When a worker takes it a fourth time
    make_worker(broker)

    # Then it is dead-lettered instead of run
    wait_until(lambda: broker.count_dead_letters("poison") == 1, what="a dead letter")
    [letter] = broker.dead_letters("poison")
    assert (letter.reason, letter.attempts, letter.message_id) == ("max_deliveries", 3, None)
    assert ran == []


def test_a_dead_letter_the_database_refuses_frees_the_slot_and_the_message_comes_back(
    make_broker: Callable[..., PGMQBroker],
) -> None:
    # Given a worker taking one message at a time, and an actor whose error text PostgreSQL cannot store (a NUL)
    broker = make_broker(max_deliveries=2, visibility_timeout_s=0.5)
    ran: list[int] = []

    @dramatiq.actor(queue_name="unstorable", max_retries=0)
    def unstorable(n: int) -> None:
        ran.append(n)
        if n == 1:
            raise ValueError("a NUL \x00 in the error")

    unstorable.send(1)
    unstorable.send(2)
    worker = Worker(broker, worker_threads=1, worker_timeout=100)
    worker.queue_prefetch = 1
    worker.start()
    try:
        # Then the failed dead letter does not hold the only slot: the next message runs
        wait_until(lambda: 2 in ran, what="the next message")
        # And the message comes back once its lease lapses, until it is dead-lettered as poison
        wait_until(lambda: broker.count_dead_letters("unstorable") == 1, timeout_s=30, what="a dead letter")
    finally:
        worker.stop(timeout=10_000)
    [letter] = broker.dead_letters("unstorable")
    assert letter.reason == "max_deliveries"
    assert ran.count(1) == 2


def test_a_failing_retry_enqueue_loses_nothing(broker: PGMQBroker, worker: Worker, conn: psycopg.Connection) -> None:
    # Given an actor that fails once, and a queue whose first retry insert fails inside the database
    runs: list[int] = []

    @dramatiq.actor(queue_name="retry_fails", min_backoff=10, max_backoff=20)
    def once_flaky(n: int) -> None:
        runs.append(n)
        if len(runs) == 1:
            raise RuntimeError("first run fails")

    conn.execute("select pgmq.create('retry_fails')")
    conn.execute("create table if not exists public.broker_test_failures (n integer)")
    conn.execute(
        """
        create or replace function public.broker_test_fail_first_retry() returns trigger language plpgsql as $$
        begin
            if (new.message -> 'options' ->> 'retries') = '1'
               and not exists (select 1 from public.broker_test_failures) then
                insert into public.broker_test_failures values (1);
                raise exception 'injected failure of the retry insert';
            end if;
            return new;
        end $$;
        create trigger fail_first_retry before insert on pgmq.q_retry_fails
        for each row execute function public.broker_test_fail_first_retry();
        """
    )
    try:
        # When the message fails and its retry cannot be written
        once_flaky.send(1)

        # Then the original delivery runs again, and exactly one more time
        wait_until(lambda: len(runs) >= 2, what="a second run")
        broker.join("retry_fails", timeout=5_000)
        time.sleep(0.2)
        assert runs == [1, 1]
        assert broker.count_dead_letters("retry_fails") == 0
    finally:
        conn.execute("drop trigger fail_first_retry on pgmq.q_retry_fails")


def test_an_idle_worker_wakes_on_insert_notifications(
    make_broker: Callable[..., PGMQBroker], make_worker: Callable[..., Worker]
) -> None:
    # Given notifications enabled and a poll interval far longer than the test
    broker = make_broker(poll_interval_ms=30_000)
    broker.enable_notify("notified")
    ran = threading.Event()

    @dramatiq.actor(queue_name="notified")
    def ping() -> None:
        ran.set()

    make_worker(broker)
    wait_until(
        lambda: broker.threads.listener is not None and broker.threads.listener.connected.is_set(),
        what="the listener to connect",
    )
    time.sleep(0.5)  # let the listener subscribe and the consumer settle into its long wait

    # When a message is sent, it runs long before the next poll
    started = time.monotonic()
    ping.send()
    assert ran.wait(5)
    assert time.monotonic() - started < 2


def test_a_queue_is_looked_at_again_once_its_listen_is_in_place(db_url: str) -> None:
    # Given a listener connected for one queue, whose notifications are recorded
    looked_at: list[str] = []
    listener = Listener(conninfo=db_url, connect_kwargs={}, on_notify=looked_at.append, outage=Outage())
    listener.subscribe("first")
    listener.start()
    try:
        wait_until(lambda: "first" in looked_at, what="the first queue looked at")

        # When a consumer of another queue subscribes (after its first fetch found the queue empty)
        listener.subscribe("second")

        # Then that queue is looked at again once LISTEN is in place, though nothing was inserted: a message sent
        # between the consumer's fetch and the LISTEN is found now, not a poll interval later
        wait_until(lambda: "second" in looked_at, timeout_s=5, what="the second queue looked at")
    finally:
        listener.stop()


def test_polling_alone_delivers_when_listen_is_off(
    make_broker: Callable[..., PGMQBroker], make_worker: Callable[..., Worker]
) -> None:
    broker = make_broker(listen=False, prepare_statements=False, poll_interval_ms=50)
    ran = threading.Event()

    @dramatiq.actor(queue_name="polled")
    def ping() -> None:
        ran.set()

    make_worker(broker)
    ping.send()
    assert ran.wait(5)
    assert broker.threads.listener is None


def test_metrics_report_depth_delay_in_flight_and_age(broker: PGMQBroker) -> None:
    @dramatiq.actor(queue_name="metered")
    def job() -> None:
        pass

    job.send()
    job.send()
    job.send_with_options(delay=60_000)
    consumer = broker.consume("metered", prefetch=1, timeout=100)
    assert next(consumer) is not None

    metrics = broker.metrics("metered")
    assert (metrics.queued, metrics.delayed, metrics.in_flight, metrics.dead_lettered) == (1, 1, 1, 0)
    assert metrics.oldest_age_ms >= 0
    consumer.close()


@pytest.mark.parametrize("async_commit", [True, False], ids=["async-commit", "durable-commit"])
def test_bookkeeping_commits_either_way(
    make_broker: Callable[..., PGMQBroker], make_worker: Callable[..., Worker], async_commit: bool
) -> None:
    broker = make_broker(async_commit=async_commit)
    seen: list[int] = []

    @dramatiq.actor(queue_name="commits")
    def take(n: int) -> None:
        seen.append(n)

    broker.enqueue_many([take.message(i) for i in range(20)])
    make_worker(broker)
    broker.join("commits", timeout=10_000)
    assert sorted(seen) == list(range(20))


def test_a_broker_can_use_a_pool_it_does_not_own(db_url: str) -> None:
    from psycopg_pool import ConnectionPool

    with ConnectionPool(db_url, min_size=1, max_size=4, kwargs={"autocommit": True}, open=True) as pool:
        broker = PGMQBroker(pool=pool, poll_interval_ms=50)
        dramatiq.set_broker(broker)

        @dramatiq.actor(queue_name="given_pool")
        def job() -> None:
            pass

        job.send()
        consumer, message = first_delivery(broker, "given_pool")
        consumer.ack(message)
        broker.close()
        assert not pool.closed
        with pool.connection() as conn:
            assert conn.execute("select count(*) from pgmq.q_given_pool").fetchone() == (0,)


def test_a_broker_needs_exactly_one_of_url_and_pool() -> None:
    with pytest.raises(ValueError, match="exactly one of url"):
        PGMQBroker()


def test_concurrent_processes_declaring_a_new_queue_do_not_collide(
    make_broker: Callable[..., PGMQBroker], conn: psycopg.Connection
) -> None:
    brokers = [make_broker() for _ in range(6)]
    errors: list[BaseException] = []

    def declare(broker: PGMQBroker) -> None:
        try:
            broker.create_queue("raced")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=declare, args=(b,)) for b in brokers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert conn.execute("select count(*) from pgmq.meta where queue_name = 'raced'").fetchone() == (1,)


def test_enable_notify_is_idempotent_and_replaces_pgmq_row_trigger(
    broker: PGMQBroker, conn: psycopg.Connection
) -> None:
    conn.execute("select pgmq.create('notify_twice')")
    conn.execute("select pgmq.enable_notify_insert('notify_twice', 250)")
    broker.enable_notify("notify_twice")
    broker.enable_notify("notify_twice")

    triggers = [
        row[0] for row in conn.execute("select tgname from pg_trigger where tgrelid = 'pgmq.q_notify_twice'::regclass")
    ]
    assert triggers == ["pgmq_broker_notify_insert"]
    throttled = "select count(*) from pgmq.notify_insert_throttle where queue_name = 'notify_twice'"
    assert conn.execute(throttled).fetchone() == (0,)


def test_the_least_privilege_worker_role_can_do_everything_a_worker_does(
    make_broker: Callable[..., PGMQBroker], make_worker: Callable[..., Worker], db_url: str, conn: psycopg.Connection
) -> None:
    # Given a queue created by the owner (a migration) and a broker connected as nova_worker (nova_email/sql/090_worker_role)
    if conn.execute("select count(*) from pg_roles where rolname = 'nova_worker'").fetchone() == (0,):
        pytest.fail("nova_email/sql/090_worker_role.sql should have created the nova_worker role")
    conn.execute("select pgmq_broker.enable_notify('least_privilege')")
    broker = make_broker(url=psycopg.conninfo.make_conninfo(db_url, options="-c role=nova_worker"))
    ran: list[int] = []

    @dramatiq.actor(queue_name="least_privilege", max_retries=1, min_backoff=10, max_backoff=20)
    def job(n: int) -> None:
        ran.append(n)
        if n == 0:
            raise ValueError("always fails")

    # When it sends, consumes, retries, dead-letters and reports (emptying a queue is the owner's: nova_email/sql/091)
    broker.enqueue_many([job.message(i) for i in range(3)])
    make_worker(broker)
    wait_until(lambda: broker.count_dead_letters("least_privilege") == 1, what="a dead letter")
    broker.join("least_privilege", timeout=5_000)
    job.send_with_options(args=(9,), delay=60_000)
    assert broker.metrics("least_privilege").delayed == 1
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        broker.flush("least_privilege")
    conn.execute("select pgmq_broker.flush('least_privilege')")

    # Then all of it worked under the role's privileges
    assert sorted(ran) == [0, 0, 1, 2]
    assert broker.metrics("least_privilege").delayed == 0
    with broker.database.connection() as role_conn:
        assert role_conn.execute("select current_user").fetchone() == ("nova_worker",)


def test_an_open_transaction_that_enqueued_does_not_block_other_producers(
    broker: PGMQBroker, db_url: str, conn: psycopg.Connection
) -> None:
    # PGMQ's own throttled trigger updates one shared row per queue inside the producer's transaction, so a
    # long transaction that enqueued blocks every other producer of the queue until it ends. Ours does not.
    broker.enable_notify("busy_producers")

    @dramatiq.actor(queue_name="busy_producers")
    def job(n: int) -> None:
        pass

    with psycopg.connect(db_url) as long_transaction:
        broker.enqueue(job.message(1), connection=long_transaction)
        time.sleep(0.3)  # longer than any throttle interval
        conn.execute("set statement_timeout = '2s'")
        started = time.monotonic()
        job.send(2)
        conn.execute("select pgmq.send('busy_producers', '{}'::jsonb)")
        assert time.monotonic() - started < 1.0
        long_transaction.rollback()


def test_a_message_kept_on_ack_keeps_coming_back_and_is_never_taken_for_poison(
    make_broker: Callable[..., PGMQBroker], make_worker: Callable[..., Worker]
) -> None:
    from dramatiq.middleware import Middleware

    from brokers import KEEP_ON_ACK_OPTION

    class Keep(Middleware):
        def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
            message.options[KEEP_ON_ACK_OPTION] = True

    # Given kept messages and a max_deliveries that a counted redelivery would exceed at once
    broker = make_broker(visibility_timeout_s=0.3, max_deliveries=1)
    broker.add_middleware(Keep())
    runs: list[float] = []

    @dramatiq.actor(queue_name="kept_forever")
    def dry_run() -> None:
        runs.append(time.monotonic())

    dry_run.send()
    make_worker(broker)

    # Then it runs again and again, about one visibility timeout apart, and is never dead-lettered
    wait_until(lambda: len(runs) >= 3, timeout_s=10, what="three deliveries")
    assert broker.count_dead_letters("kept_forever") == 0
    assert all(later - earlier >= 0.25 for earlier, later in zip(runs, runs[1:], strict=False))
