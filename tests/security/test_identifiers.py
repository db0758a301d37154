"""Queue and identifier names are checked before they reach SQL, for any text an attacker or a typo may supply."""

from __future__ import annotations

import re
from typing import Any

import dramatiq
import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from psycopg import errors

from brokers import PGMQBroker
from brokers.errors import InvalidQueueName
from brokers.queues import MAX_QUEUE_NAME_LENGTH, validate_queue_name

#: Names that would break out of an identifier or a string if they were pasted into SQL.
HOSTILE = [
    "x'; drop table flux_inboxes; --",
    'q"; drop schema pgmq cascade; --',
    "Thread_Sync_Jobs",
    "../etc/passwd",
    "a" * (MAX_QUEUE_NAME_LENGTH + 1),
    "",
    "q\x00",
    "q\u202e",
    "1queue",
]


def _tables(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "select count(*) from pg_tables where schemaname in ('public', 'pgmq', 'pgmq_broker')"
    ).fetchone()
    assert row is not None
    return int(row[0])


@given(st.text(max_size=80))
@example("x'; drop table flux_inboxes; --")
@example("q" * MAX_QUEUE_NAME_LENGTH)
def test_a_queue_name_is_accepted_only_in_the_form_pgmq_can_hold(name: str) -> None:
    try:
        assert validate_queue_name(name) == name
    except InvalidQueueName as exc:
        assert exc.queue_name == name
        assert "lower-case letters, digits and underscores" in str(exc)
        assert not re.fullmatch(r"[a-z_][a-z0-9_]{0,46}", name)
    else:
        assert re.fullmatch(r"[a-z_][a-z0-9_]{0,46}", name)


@pytest.mark.parametrize("name", HOSTILE, ids=range(len(HOSTILE)))
def test_the_broker_refuses_a_hostile_queue_name_before_any_sql(name: str) -> None:
    # url points nowhere: a name that reached SQL would fail with a connection error instead
    broker = PGMQBroker(url="postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(InvalidQueueName):
        broker.declare_queue(name)
    # Dramatiq checks actor queue names itself (a ValueError); anything it lets through meets ours
    with pytest.raises(ValueError, match="[Qq]ueue name"):
        dramatiq.actor(queue_name=name, broker=broker)(lambda: None)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=40)
@given(name=st.one_of(st.sampled_from(HOSTILE[:-3] + ["q\u202e", "1queue"]), st.text(max_size=60)))
def test_the_sql_queue_api_refuses_any_name_that_is_not_a_queue(conn: psycopg.Connection[Any], name: str) -> None:
    name = name.replace("\x00", "")  # Postgres text cannot hold NUL; psycopg refuses it before sending
    known = {row[0] for row in conn.execute("select queue_name from pgmq.meta")}
    tables = _tables(conn)
    if name in known:
        return
    for statement in (
        "select flux_pgmq_send(%s, '{}'::jsonb)",
        "select * from flux_pgmq_read(%s, 1, 1)",
        "select flux_pgmq_delete(%s, 1)",
        "select * from flux_pgmq_metrics(%s)",
    ):
        with pytest.raises(errors.InvalidParameterValue, match="Unknown queue"):
            conn.execute(statement, [name])
    assert _tables(conn) == tables
