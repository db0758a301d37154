"""Dramatiq's own middleware, unchanged, on the PGMQ broker: time and age limits, callbacks, pipelines,
groups, CurrentMessage, shutdown notifications and Prometheus."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import dramatiq
import pytest
from dramatiq import Worker, group, pipeline
from dramatiq.middleware import CurrentMessage, Shutdown, ShutdownNotifications, TimeLimitExceeded
from dramatiq.middleware import prometheus as dramatiq_prometheus

from brokers import PGMQBroker

from .conftest import wait_until


def test_time_limited_actors_are_interrupted_and_dead_lettered(broker: PGMQBroker, worker: Worker) -> None:
    @dramatiq.actor(queue_name="time_limited", time_limit=200, max_retries=0)
    def too_slow() -> None:
        for _ in range(100):
            time.sleep(0.05)

    too_slow.send()

    wait_until(lambda: broker.count_dead_letters("time_limited") == 1, what="a dead letter")
    [letter] = broker.dead_letters("time_limited")
    assert letter.error_type == TimeLimitExceeded.__name__


def test_messages_older_than_their_age_limit_are_dead_lettered_unrun(broker: PGMQBroker, worker: Worker) -> None:
    ran: list[str] = []

    @dramatiq.actor(queue_name="aged")
    def perishable(tag: str) -> None:
        ran.append(tag)

    perishable.send_with_options(args=("expired",), max_age=50, delay=200)
    perishable.send("fresh")

    wait_until(lambda: ran == ["fresh"], what="the fresh message")
    broker.join("aged", timeout=5_000)
    assert ran == ["fresh"]
    [letter] = broker.dead_letters("aged")
    assert (letter.reason, letter.error_type) == ("failed", "SkipMessage")


def test_success_and_failure_callbacks_run(broker: PGMQBroker, worker: Worker) -> None:
    outcomes: list[tuple[str, Any]] = []

    @dramatiq.actor(queue_name="callbacks", max_retries=0)
    def divide(a: int, b: int) -> float:
        return a / b

    @dramatiq.actor(queue_name="callbacks")
    def on_success(message: dict[str, Any], result: float) -> None:
        outcomes.append(("success", result))

    @dramatiq.actor(queue_name="callbacks")
    def on_failure(message: dict[str, Any], exception: dict[str, Any]) -> None:
        outcomes.append(("failure", exception["type"]))

    divide.send_with_options(args=(6, 3), on_success=on_success, on_failure=on_failure)
    divide.send_with_options(args=(1, 0), on_success=on_success, on_failure=on_failure)

    wait_until(lambda: len(outcomes) == 2, what="both callbacks")
    assert sorted(outcomes) == [("failure", "ZeroDivisionError"), ("success", 2.0)]


def test_pipelines_and_groups_run_every_step(broker: PGMQBroker, worker: Worker) -> None:
    results: list[int] = []
    lock = threading.Lock()

    @dramatiq.actor(queue_name="composition")
    def add(x: int, y: int) -> int:
        return x + y

    @dramatiq.actor(queue_name="composition")
    def keep(x: int) -> None:
        with lock:
            results.append(x)

    pipeline([add.message(1, 2), add.message(3), keep.message()]).run()
    group([keep.message(10), keep.message(20), keep.message(30)]).run()

    wait_until(lambda: len(results) == 4, what="the pipeline and the group")
    assert sorted(results) == [6, 10, 20, 30]


def test_current_message_is_the_delivered_message(make_broker: Callable[..., PGMQBroker], make_worker: Any) -> None:
    broker = make_broker()
    broker.add_middleware(CurrentMessage())
    seen: list[str] = []

    @dramatiq.actor(queue_name="current")
    def who() -> None:
        current = CurrentMessage.get_current_message()
        assert current is not None
        seen.append(current.message_id)

    sent = who.send()
    make_worker(broker)

    wait_until(lambda: seen == [sent.message_id], what="the message to see itself")


def test_shutdown_notifications_interrupt_actors_that_ask_for_them(
    make_broker: Callable[..., PGMQBroker], make_worker: Any
) -> None:
    # Given an actor that asks to be told of a shutdown, and runs long
    broker = make_broker()
    assert any(isinstance(m, ShutdownNotifications) for m in broker.middleware)
    started, interrupted = threading.Event(), threading.Event()

    @dramatiq.actor(queue_name="notify_shutdown", max_retries=0, notify_shutdown=True)
    def long_job() -> None:
        started.set()
        try:
            for _ in range(200):
                time.sleep(0.05)
        except Shutdown:
            interrupted.set()
            raise

    long_job.send()
    worker = make_worker(broker)
    assert started.wait(5)

    # When the worker stops, the actor is interrupted rather than waited for
    worker.stop(timeout=5_000)
    assert interrupted.is_set()


def test_prometheus_counts_messages_processed_through_the_broker(
    make_broker: Callable[..., PGMQBroker], make_worker: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whether prometheus_client writes multiprocess files is fixed when it is first imported, which another test
    # module may already have done at collection; the counters themselves are what this test checks.
    monkeypatch.setattr(dramatiq_prometheus, "DB_PATH", str(tmp_path))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    broker = make_broker()
    prometheus = dramatiq_prometheus.Prometheus()
    broker.add_middleware(prometheus)
    broker.emit_after("process_boot")  # what the dramatiq CLI does in each worker process

    @dramatiq.actor(queue_name="metered_prom")
    def counted() -> None:
        pass

    for _ in range(3):
        counted.send()
    make_worker(broker)
    broker.join("metered_prom", timeout=5_000)

    wait_until(
        lambda: prometheus.total_messages.labels("metered_prom", "counted")._value.get() == 3,
        what="three messages counted",
    )
