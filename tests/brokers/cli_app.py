"""The module ``dramatiq tests.brokers.cli_app`` loads in the process tests: a PGMQBroker and a few actors.

Settings come from the environment the test sets: BROKER_TEST_DATABASE_URL, BROKER_TEST_VT_S (visibility
timeout), BROKER_TEST_MAX_DELIVERIES, BROKER_TEST_SLEEP_S (how long `record_slowly` and `settle_slowly` sleep),
BROKER_TEST_GO_KEY (`settle_slowly` waits for a row with this key instead of sleeping) and BROKER_TEST_OUTCOME (``raise`` makes `settle_slowly` fail in this process). Each run writes a row with its key
and the worker process's pid to public.broker_test_runs.
"""

from __future__ import annotations

import os
import signal
import time

import dramatiq

from brokers import PGMQBroker

URL = os.environ["BROKER_TEST_DATABASE_URL"]

broker = PGMQBroker(
    url=URL,
    visibility_timeout_s=float(os.environ.get("BROKER_TEST_VT_S", "30")),
    max_deliveries=int(os.environ.get("BROKER_TEST_MAX_DELIVERIES", "5")),
    poll_interval_ms=100,
)
dramatiq.set_broker(broker)

_INSERT = "insert into public.broker_test_runs (key, pid) values (%s, %s)"


def _record(key: str) -> None:
    with broker.database.connection() as conn:
        conn.execute(_INSERT, [key, os.getpid()])


@dramatiq.actor(queue_name="cli_fast", max_retries=0)
def record(key: str) -> None:
    """Write one row per run."""
    _record(key)


@dramatiq.actor(queue_name="cli_slow", max_retries=0)
def record_slowly(key: str) -> None:
    """Write a 'start:' row, sleep, then write the key."""
    _record(f"start:{key}")
    time.sleep(float(os.environ.get("BROKER_TEST_SLEEP_S", "5")))
    _record(key)


@dramatiq.actor(queue_name="cli_settle", max_retries=0, min_backoff=10, max_backoff=10)
def settle_slowly(key: str) -> None:
    """Write a 'start:' row, sleep, then fail (BROKER_TEST_OUTCOME=raise) or write the key."""
    _record(f"start:{key}")
    go_key = os.environ.get("BROKER_TEST_GO_KEY")
    if go_key:
        _wait_for_row(go_key)
    else:
        time.sleep(float(os.environ.get("BROKER_TEST_SLEEP_S", "5")))
    if os.environ.get("BROKER_TEST_OUTCOME") == "raise":
        msg = f"{key} fails in this process"
        raise RuntimeError(msg)
    _record(key)


def _wait_for_row(key: str) -> None:
    """Wait until the test writes a row with `key` (at most 5 minutes, so that a lost test cannot hang a worker)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with broker.database.connection() as conn:
            if conn.execute("select 1 from public.broker_test_runs where key = %s", [key]).fetchone():
                return
        time.sleep(0.05)


@dramatiq.actor(queue_name="cli_crash", max_retries=0)
def record_or_crash(key: str) -> None:
    """Kill this worker process outright (an OOM kill, a segfault) for a key starting with 'crash', else record it."""
    if key.startswith("crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    _record(key)


@dramatiq.actor(queue_name="cli_foreign", queue_handler=True, max_retries=0)
def handle_foreign(payload: dict[str, object]) -> None:
    """Take the plain JSON objects SQL producers put on cli_foreign."""
    _record(f"foreign:{payload['n']}")


__all__ = ["broker", "handle_foreign", "record", "record_or_crash", "record_slowly", "settle_slowly"]
