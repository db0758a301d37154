"""Fairness keys at the SQL level: the order of pgmq_broker.fair_read, its per-key cap and rate, and how keys are
stored, migrated, put to sleep and woken (brokers/sql/060_fairness.sql)."""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections import Counter
from datetime import datetime
from importlib.resources import files
from typing import Any

import dramatiq
import psycopg
import pytest
from dramatiq import Worker
from psycopg import sql
from psycopg.rows import scalar_row
from psycopg.types.json import Jsonb

from brokers import PGMQBroker
from brokers.fairness import (
    disable_fairness,
    enable_fairness,
    fair_fetch_query,
    fair_queue,
    is_fair,
    set_fairness_weight,
)
from brokers.schema import apply_migrations, install_pgmq, load_migrations
from brokers.settlement import FAIRNESS_RECHECK_S

from .conftest import wait_until

#: Send plain JSON messages in one statement, visible after %(delay_s)s seconds.
SEND_BATCH = "select pgmq.send_batch(%(queue)s, %(messages)s::jsonb[], %(delay_s)s::integer)"
#: How many messages of each key are leased right now.
LEASED_BY_KEY = (
    "select fairness_key, count(*) from pgmq.{table} where last_read_at is not null and vt > clock_timestamp()"
    " group by fairness_key"
)
#: The key rows of a queue with the time of their next turn.
KEYS_DUE = "select key, due_at from pgmq_broker.fair_keys where queue_name = %(queue)s order by key"


def send(conn: psycopg.Connection, queue: str, messages: list[dict[str, Any]], delay_s: int = 0) -> None:
    conn.execute(SEND_BATCH, {"queue": queue, "messages": [Jsonb(m) for m in messages], "delay_s": delay_s})


def fetch_keys(conn: psycopg.Connection, queue: str, qty: int) -> list[str]:
    rows = conn.execute(
        "select fairness_key from pgmq_broker.fair_read(%(queue)s, %(qty)s, 30000)", {"queue": queue, "qty": qty}
    ).fetchall()
    return [str(row[0]) for row in rows]


def database_now(conn: psycopg.Connection) -> datetime:
    with conn.cursor(row_factory=scalar_row) as cursor:
        now = cursor.execute("select clock_timestamp()").fetchone()
    assert isinstance(now, datetime)
    return now


def tenants(*counts: tuple[str, int]) -> list[dict[str, Any]]:
    return [{"tenant": key, "n": i} for key, count in counts for i in range(count)]


@pytest.fixture
def fair_queue_name(conn: psycopg.Connection, request: pytest.FixtureRequest) -> str:
    name = "fair_" + str(request.node.name).removeprefix("test_")[:40].lower()
    conn.execute(
        "select pgmq.drop_queue(%(q)s) where exists (select from pgmq.meta where queue_name = %(q)s)", {"q": name}
    )
    enable_fairness(conn, name, key_path=["tenant"])
    return name


def test_the_first_three_fetched_hold_all_three_keys(conn: psycopg.Connection, fair_queue_name: str) -> None:
    send(conn, fair_queue_name, tenants(("big", 100), ("mid", 10), ("small", 1)))

    assert sorted(fetch_keys(conn, fair_queue_name, 3)) == ["big", "mid", "small"]


def test_fetches_of_one_rotate_across_keys(conn: psycopg.Connection, fair_queue_name: str) -> None:
    send(conn, fair_queue_name, tenants(("big", 100), ("mid", 10), ("small", 1)))

    first_nine = [key for _ in range(9) for key in fetch_keys(conn, fair_queue_name, 1)]

    assert first_nine[:3] == ["big", "mid", "small"]
    assert first_nine[3:] == ["big", "mid", "big", "mid", "big", "mid"]


def test_a_lone_key_fills_the_batch_in_fifo_order(conn: psycopg.Connection, fair_queue_name: str) -> None:
    send(conn, fair_queue_name, tenants(("only", 20)))

    rows = conn.execute(
        "select (message->>'n')::int from pgmq_broker.fair_read(%(q)s, 10, 30000)", {"q": fair_queue_name}
    ).fetchall()

    assert [row[0] for row in rows] == list(range(10))


def test_the_key_comes_from_the_option_then_the_path_else_the_unkeyed_group(
    conn: psycopg.Connection, fair_queue_name: str
) -> None:
    send(
        conn,
        fair_queue_name,
        [
            {"tenant": "from-path"},
            {
                "actor_name": "a",
                "args": [],
                "kwargs": {},
                "message_id": "m",
                "options": {"fairness_key": "from-option"},
            },
            {"something": "else"},
        ],
    )

    stored = conn.execute(f"select fairness_key from pgmq.q_{fair_queue_name} order by msg_id").fetchall()

    assert [row[0] for row in stored] == ["from-path", "from-option", ""]
    assert sorted(fetch_keys(conn, fair_queue_name, 3)) == ["", "from-option", "from-path"]


def digest_of(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def test_a_key_longer_than_an_index_row_is_kept_as_its_digest_from_sql_and_python_producers(
    broker: PGMQBroker, conn: psycopg.Connection, fair_queue_name: str
) -> None:
    # 6 kB that do not compress: more than a btree index row may hold (2,704 bytes). A key of 1,024 bytes is kept as it is.
    huge, largest_kept = secrets.token_hex(3000), "k" * 1024

    @dramatiq.actor(queue_name=fair_queue_name)
    def keyed(n: int) -> None:
        pass

    conn.execute("select pgmq.send(%(q)s, %(m)s)", {"q": fair_queue_name, "m": Jsonb({"tenant": huge})})
    keyed.send_with_options(args=(1,), fairness_key=huge)
    send(conn, fair_queue_name, [{"tenant": largest_kept}])

    assert stored_keys(conn, fair_queue_name) == [digest_of(huge), digest_of(huge), largest_kept]
    assert sorted(fetch_keys(conn, fair_queue_name, 3)) == sorted([digest_of(huge), digest_of(huge), largest_kept])


def test_a_queue_in_fairness_mode_before_keys_were_bounded_is_migrated(empty_db_url: str) -> None:
    migrations = load_migrations(files("brokers").joinpath("sql"))
    huge = secrets.token_hex(3000)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        install_pgmq(conn)
        apply_migrations(conn, namespace="brokers", migrations=[m for m in migrations if m.version < 63])
        enable_fairness(conn, "fair_before", key_path=["tenant"], max_in_flight=2)
        send(conn, "fair_before", tenants(("early", 3)))

        apply_migrations(conn, namespace="brokers", migrations=migrations)
        send(conn, "fair_before", [{"tenant": huge}])

        assert stored_keys(conn, "fair_before") == ["early"] * 3 + [digest_of(huge)]
        assert sorted(fetch_keys(conn, "fair_before", 3)) == sorted(["early", "early", digest_of(huge)])
        # The in-flight cap's index came back with the new column: "early" has 2 leased, its cap.
        assert fetch_keys(conn, "fair_before", 3) == []
        indexes = conn.execute("select indexname from pg_indexes where tablename = 'q_fair_before'").fetchall()
        assert {"q_fair_before_fair_idx", "q_fair_before_fair_leased_idx"} <= {row[0] for row in indexes}


def test_a_role_that_fetched_before_weights_existed_may_read_them(empty_db_url: str) -> None:
    migrations = load_migrations(files("brokers").joinpath("sql"))
    name = f"fair_fetcher_{secrets.token_hex(4)}"
    fetcher = sql.Identifier(name)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        install_pgmq(conn)
        apply_migrations(conn, namespace="brokers", migrations=[m for m in migrations if m.version < 63])
        # Given a role that fetches from fair queues, granted what it needs table by table (it updates the key rows)
        conn.execute(sql.SQL("create role {} nologin").format(fetcher))
        try:
            conn.execute(sql.SQL("grant select, update, delete on pgmq_broker.fair_keys to {}").format(fetcher))

            apply_migrations(conn, namespace="brokers", migrations=migrations)

            # Then it may read the weights its fetches now read
            readable = conn.execute(
                "select has_table_privilege(%s, 'pgmq_broker.fair_weights', 'select')", [name]
            ).fetchone()
            assert readable == (True,)
        finally:
            conn.execute(sql.SQL("drop owned by {}").format(fetcher))
            conn.execute(sql.SQL("drop role {}").format(fetcher))


def test_a_fair_queue_dropped_without_leaving_fairness_mode_does_not_stop_the_migration(empty_db_url: str) -> None:
    migrations = load_migrations(files("brokers").joinpath("sql"))
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        install_pgmq(conn)
        apply_migrations(conn, namespace="brokers", migrations=[m for m in migrations if m.version < 63])
        # Given a queue in fairness mode that was dropped with pgmq.drop_queue, which leaves its fairness rows
        enable_fairness(conn, "fair_gone", key_path=["tenant"])
        send(conn, "fair_gone", tenants(("t", 1)))
        conn.execute("select pgmq.drop_queue('fair_gone')")

        # When the later migrations run, they pass over it and forget it
        apply_migrations(conn, namespace="brokers", migrations=migrations)

        left = conn.execute(
            "select (select count(*) from pgmq_broker.fair_queues), (select count(*) from pgmq_broker.fair_keys),"
            " to_regproc('pgmq_broker.fair_fetch_fair_gone')"
        ).fetchone()
        assert left == (0, 0, None)
        # and the name may be used again
        enable_fairness(conn, "fair_gone", key_path=["tenant"])
        send(conn, "fair_gone", tenants(("again", 1)))
        assert fetch_keys(conn, "fair_gone", 1) == ["again"]


@pytest.mark.parametrize("declared_first", [True, False], ids=["declared-before-any-message", "declared-later"])
@pytest.mark.parametrize("qty", [1, 8])
def test_a_key_of_weight_3_gets_three_times_the_share_of_a_key_of_weight_1(
    conn: psycopg.Connection, fair_queue_name: str, qty: int, declared_first: bool
) -> None:
    # A weight declared before the key has any message is kept; one declared later applies to the key's row.
    if declared_first:
        set_fairness_weight(conn, fair_queue_name, "heavy", 3)
    send(conn, fair_queue_name, tenants(("heavy", 200), ("light", 200)))
    if not declared_first:
        set_fairness_weight(conn, fair_queue_name, "heavy", 3)

    first_forty = Counter(key for _ in range(40 // qty) for key in fetch_keys(conn, fair_queue_name, qty))

    # Equal shares would be 20 and 20.
    assert 27 <= first_forty["heavy"] <= 33
    assert first_forty["heavy"] + first_forty["light"] == 40


def test_a_weight_set_while_a_producer_creates_the_keys_row_takes_effect_by_the_keys_next_turn(
    db_url: str, conn: psycopg.Connection, fair_queue_name: str
) -> None:
    # Given a producer whose transaction created the key's row (weight 1, from fair_weights as it then was) and has
    # not committed while the weight is set
    with psycopg.connect(db_url) as producer:
        send(producer, fair_queue_name, tenants(("heavy", 20)))
        set_fairness_weight(conn, fair_queue_name, "heavy", 3)
        producer.commit()
    send(conn, fair_queue_name, tenants(("light", 20)))

    # When fetches take one message each
    order = [key for _ in range(10) for key in fetch_keys(conn, fair_queue_name, 1)]

    # Then the key's first turn is a weight-1 turn, and every later one serves 3
    assert order == ["heavy", "light"] + ["heavy"] * 3 + ["light"] + ["heavy"] * 3 + ["light"]


def test_a_weight_below_1_is_refused_with_a_clear_error(conn: psycopg.Connection, fair_queue_name: str) -> None:
    for weight in (0, -2):
        with pytest.raises(ValueError, match="a weight is a whole number of at least 1"):
            set_fairness_weight(conn, fair_queue_name, "k", weight)
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="a weight is a whole number of at least 1"):
            conn.execute("select pgmq_broker.set_fairness_weight(%s, 'k', %s)", [fair_queue_name, weight])
    with pytest.raises(psycopg.errors.UndefinedObject, match="not in fairness mode"):
        conn.execute("select pgmq_broker.set_fairness_weight('fair_nowhere', 'k', 2)")


def test_a_capped_key_never_exceeds_its_cap_across_two_concurrent_fetchers(
    db_url: str, conn: psycopg.Connection
) -> None:
    queue = "fair_capped"
    enable_fairness(conn, queue, key_path=["tenant"], max_in_flight=2)
    send(conn, queue, tenants(("hot", 200), ("cold", 200)))
    peaks: Counter[str] = Counter()
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def fetcher() -> None:
        try:
            with psycopg.connect(db_url, autocommit=True) as own:
                start.wait()
                for round_ in range(60):
                    rows = own.execute(
                        "select msg_id from pgmq_broker.fair_read(%(q)s, 5, 30000)", {"q": queue}
                    ).fetchall()
                    leased: dict[str, int] = dict(own.execute(LEASED_BY_KEY.format(table=f"q_{queue}")).fetchall())
                    for key, count in leased.items():
                        peaks[key] = max(peaks[key], count)
                    if round_ % 3 == 2 and rows:
                        # Settle some, so the cap frees room and the fetchers keep competing for it.
                        own.execute(
                            f"delete from pgmq.q_{queue} where msg_id = any(%(ids)s)", {"ids": [r[0] for r in rows]}
                        )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetcher) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not errors
    assert peaks["hot"] == 2
    assert peaks["cold"] == 2


def test_a_rated_key_is_served_no_faster_than_its_rate(conn: psycopg.Connection) -> None:
    queue = "fair_rated"
    rate, burst, wanted = 20, 2, 12
    enable_fairness(conn, queue, key_path=["tenant"], rate_per_s=rate, burst=burst)
    send(conn, queue, tenants(("paced", 200)))

    # A rested key gives its burst at once, however many are asked for
    started = time.monotonic()
    served = len(fetch_keys(conn, queue, 10))
    assert served == burst
    # ... and then keeps being served, one message per interval (a generous deadline, not a speed target)
    deadline = started + 60
    while served < wanted and time.monotonic() < deadline:
        served += len(fetch_keys(conn, queue, 10))
    elapsed = time.monotonic() - started

    assert served >= wanted
    # Every fetch ran between the two readings of the clock, so the bucket could hand out no more than this. A slow
    # machine only lengthens `elapsed`; the one extra message is the token the rounding of a fetch's room can give.
    assert served <= burst + int(elapsed * rate) + 1


def test_messages_queued_before_fairness_mode_get_their_keys(conn: psycopg.Connection) -> None:
    queue = "fair_migrated"
    conn.execute("select pgmq.create(%(q)s)", {"q": queue})
    send(conn, queue, tenants(("early", 5), ("late", 1)))

    enable_fairness(conn, queue, key_path=["tenant"])

    assert sorted(fetch_keys(conn, queue, 2)) == ["early", "late"]


def test_a_key_with_only_delayed_messages_sleeps_and_a_new_visible_message_wakes_it(
    conn: psycopg.Connection, fair_queue_name: str
) -> None:
    send(conn, fair_queue_name, tenants(("later", 1)), delay_s=30)

    before = database_now(conn)
    assert fetch_keys(conn, fair_queue_name, 5) == []
    due: dict[str, datetime] = dict(conn.execute(KEYS_DUE, {"queue": fair_queue_name}).fetchall())
    assert list(due) == ["later"] and due["later"] > before  # asleep: its turn is after the fetch

    send(conn, fair_queue_name, tenants(("later", 1)))

    assert fetch_keys(conn, fair_queue_name, 5) == ["later"]


def test_a_key_without_messages_leaves_the_rotation(conn: psycopg.Connection, fair_queue_name: str) -> None:
    send(conn, fair_queue_name, tenants(("gone", 1), ("stays", 2)))
    conn.execute(f"delete from pgmq.q_{fair_queue_name} where fairness_key = 'gone'")

    assert fetch_keys(conn, fair_queue_name, 5) == ["stays", "stays"]
    before = database_now(conn)
    fetch_keys(conn, fair_queue_name, 5)

    # "gone" was deleted; "stays" (its messages leased) was put to sleep by that fetch: its turn moved past the
    # fetch's start, as the database recorded it, however long the machine took since.
    due: dict[str, datetime] = dict(conn.execute(KEYS_DUE, {"queue": fair_queue_name}).fetchall())
    assert list(due) == ["stays"] and due["stays"] > before


def test_fairness_mode_can_be_left_and_is_reported(conn: psycopg.Connection, fair_queue_name: str) -> None:
    settings = fair_queue(conn, fair_queue_name)
    assert settings is not None and settings.key_path == ["tenant"]
    assert is_fair(conn, fair_queue_name)

    disable_fairness(conn, fair_queue_name)

    assert not is_fair(conn, fair_queue_name)
    columns = conn.execute(
        "select column_name from information_schema.columns where table_schema = 'pgmq' and table_name = %(t)s",
        {"t": f"q_{fair_queue_name}"},
    ).fetchall()
    assert "fairness_key" not in {row[0] for row in columns}


def test_a_queue_not_in_fairness_mode_has_no_fair_fetch(conn: psycopg.Connection) -> None:
    conn.execute("select pgmq.create('fair_never')")

    with pytest.raises(psycopg.errors.UndefinedFunction):
        fetch_keys(conn, "fair_never", 1)


# -- from Python: the message option and the actor option -------------------------------------------------------


def stored_keys(conn: psycopg.Connection, queue: str) -> list[str]:
    return [str(row[0]) for row in conn.execute(f"select fairness_key from pgmq.q_{queue} order by msg_id")]


def test_a_send_may_name_its_key_and_an_actor_may_derive_it_from_its_arguments(
    broker: PGMQBroker, conn: psycopg.Connection
) -> None:
    enable_fairness(conn, "fair_python")

    @dramatiq.actor(queue_name="fair_python", fairness_key=lambda payload: payload["tenant"])
    def keyed(payload: dict[str, Any]) -> None:
        pass

    @dramatiq.actor(queue_name="fair_python")
    def plain(n: int) -> None:
        pass

    keyed.send({"tenant": "derived"})
    keyed.send_with_options(args=({"tenant": "ignored"},), fairness_key="given")
    plain.send(1)
    keyed.send({"no": "tenant"})  # the key function fails: no key, and the message is still sent

    assert stored_keys(conn, "fair_python") == ["derived", "given", "", ""]


@pytest.mark.parametrize(
    ("queue", "key_option"),
    [
        ("fair_retried", {"fairness_key": lambda payload: payload["tenant"]}),
        # The actor derives no key: the retry's envelope carries the key its original was fetched with.
        ("fair_plain_retried", {}),
    ],
)
def test_a_retried_plain_json_message_keeps_its_key(
    broker: PGMQBroker, conn: psycopg.Connection, worker: Worker, queue: str, key_option: dict[str, Any]
) -> None:
    enable_fairness(conn, queue, key_path=["tenant"])
    runs: list[int] = []

    @dramatiq.actor(queue_name=queue, queue_handler=True, min_backoff=60_000, max_retries=3, **key_option)
    def flaky(payload: dict[str, Any]) -> None:
        runs.append(1)
        raise RuntimeError("once")

    # A plain JSON message from SQL, keyed by its path; its retry is a Dramatiq envelope, keyed by an option.
    send(conn, queue, [{"tenant": "t-1"}])

    def retried() -> bool:
        # The original was read before it ran; its retry is a new message, never read.
        fresh = conn.execute(f"select count(*) from pgmq.q_{queue} where read_ct = 0").fetchone()  # a literal name
        return bool(runs) and fresh == (1,)

    wait_until(retried, what="the retry enqueued")
    assert stored_keys(conn, queue) == ["t-1"]


def test_the_brokers_statement_calls_the_queues_own_fetch(conn: psycopg.Connection, fair_queue_name: str) -> None:
    send(conn, fair_queue_name, tenants(("a", 2), ("b", 1)))
    params = {"ack_ids": [], "ack_tokens": [], "archive": False, "qty": 2, "vt_ms": 30_000, "async_commit": False}

    rows = conn.execute(fair_fetch_query(fair_queue_name), params).fetchall()

    assert len(rows) == 2
    assert {json.loads(row[4])["tenant"] for row in rows} == {"a", "b"}


# -- a running consumer follows its queue into and out of fairness mode -------------------------------------------


def test_a_running_consumer_keeps_fetching_after_its_queue_leaves_fairness_mode(
    broker: PGMQBroker, conn: psycopg.Connection, worker: Worker
) -> None:
    queue = "fair_left_while_running"
    enable_fairness(conn, queue, key_path=["tenant"])
    runs: list[str] = []

    @dramatiq.actor(queue_name=queue, queue_handler=True)
    def handle(payload: dict[str, Any]) -> None:
        runs.append(payload["tenant"])

    send(conn, queue, [{"tenant": "before"}])
    wait_until(lambda: runs == ["before"], what="the message sent in fairness mode to run")

    disable_fairness(conn, queue)  # drops the queue's own fetch, which the consumer was using
    send(conn, queue, [{"tenant": "after"}])

    wait_until(lambda: runs == ["before", "after"], what="the message sent after fairness mode was left to run")


def test_a_running_consumer_takes_up_fairness_mode_within_the_recheck_interval(
    broker: PGMQBroker, conn: psycopg.Connection, worker: Worker
) -> None:
    queue = "fair_entered_while_running"
    conn.execute("select pgmq.create(%(q)s)", {"q": queue})
    runs: list[str] = []

    @dramatiq.actor(queue_name=queue, queue_handler=True)
    def handle(payload: dict[str, Any]) -> None:
        runs.append(payload["tenant"])

    send(conn, queue, [{"tenant": "before"}])
    wait_until(lambda: runs == ["before"], what="the message sent to the plain queue to run")
    # Its ack deleted (by the next fetch), so that enabling finds no message to make a key row of.
    wait_until(
        lambda: conn.execute(f"select count(*) from pgmq.q_{queue}").fetchone() == (0,),  # a literal name
        what="the message to be acknowledged",
    )

    enable_fairness(conn, queue, key_path=["tenant"])
    send(conn, queue, [{"tenant": "after"}])
    wait_until(lambda: runs == ["before", "after"], what="the message sent in fairness mode to run")

    # Only the queue's fair fetch maintains its key rows: it deletes the key once it has no message left.
    def keys_left() -> list[str]:
        return [row[0] for row in conn.execute(KEYS_DUE, {"queue": queue}).fetchall()]

    wait_until(lambda: keys_left() == [], timeout_s=FAIRNESS_RECHECK_S + 10, what="the fair fetch to take over")
