"""Dramatiq's own middleware, unchanged, on the PGMQ broker: retry_when, time and age limits, callbacks, pipelines,
groups, CurrentMessage, shutdown notifications and Prometheus."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import dramatiq
import pytest
from dramatiq import Worker, group, pipeline
from dramatiq.middleware import CurrentMessage, Shutdown, ShutdownNotifications, TimeLimitExceeded
from dramatiq.middleware import prometheus as dramatiq_prometheus

from brokers import PGMQBroker

from .conftest import wait_until


def test_a_retry_when_predicate_decides_which_failures_are_retried(broker: PGMQBroker, worker: Worker) -> None:
    # Given an actor that retries connection errors only, up to three times, whatever max_retries says
    decisions: list[tuple[str, int, str]] = []
    runs: Counter[str] = Counter()
    lock = threading.Lock()

    def transient_only(retries: int, exception: BaseException) -> bool:
        with lock:
            decisions.append((str(exception), retries, type(exception).__name__))
        return isinstance(exception, ConnectionError) and retries < 3

    @dramatiq.actor(queue_name="retry_when", max_retries=0, min_backoff=10, max_backoff=20, retry_when=transient_only)
    def call(kind: str) -> None:
        with lock:
            runs[kind] += 1
            attempt = runs[kind]
        if kind == "recovers" and attempt < 3:
            raise ConnectionError(kind)
        if kind == "always_down":
            raise ConnectionError(kind)
        if kind == "bad_input":
            raise ValueError(kind)

    # When one call recovers on its third attempt, one never does, and one fails on bad input
    for kind in ("recovers", "always_down", "bad_input"):
        call.send(kind)
    wait_until(lambda: broker.count_dead_letters("retry_when") == 2, what="two dead letters")
    broker.join("retry_when", timeout=5_000)

    # Then the predicate saw each failure with the retries so far (carried through the broker's re-enqueues)
    assert sorted(decisions) == [
        ("always_down", 0, "ConnectionError"),
        ("always_down", 1, "ConnectionError"),
        ("always_down", 2, "ConnectionError"),
        ("always_down", 3, "ConnectionError"),
        ("bad_input", 0, "ValueError"),
        ("recovers", 0, "ConnectionError"),
        ("recovers", 1, "ConnectionError"),
    ]
    # The recovered call ran until it succeeded; the others were dead-lettered once the predicate said no
    assert runs == {"recovers": 3, "always_down": 4, "bad_input": 1}
    letters = {letter.error_message: letter for letter in broker.dead_letters("retry_when")}
    assert sorted(letters) == ["always_down", "bad_input"]
    assert (letters["always_down"].error_type, letters["always_down"].attempts) == ("ConnectionError", 4)
    assert (letters["bad_input"].error_type, letters["bad_input"].attempts) == ("ValueError", 1)


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


class _Recorder(dramatiq.Middleware):
    def __init__(self, name: str, calls: list[str], *, fail: bool = False) -> None:
        self.name, self.calls, self.fail = name, calls, fail

    def before_enqueue(self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None) -> None:
        self.calls.append(f"before {self.name} {message.args[0]} {delay}")
        if self.fail:
            raise RuntimeError("a broken hook")

    def after_enqueue(self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None) -> None:
        self.calls.append(f"after {self.name} {message.args[0]} {delay}")


def test_enqueue_hooks_run_as_dramatiq_runs_them_including_middleware_added_later(
    broker: PGMQBroker, caplog: pytest.LogCaptureFixture
) -> None:
    # Given two middleware with enqueue hooks (the first one broken) among Dramatiq's defaults
    calls: list[str] = []
    broker.add_middleware(_Recorder("a", calls, fail=True))
    broker.add_middleware(_Recorder("b", calls))

    @dramatiq.actor(queue_name="enqueue_hooks")
    def job(n: int) -> None: ...

    # When messages are sent one by one and in a batch, and a third middleware arrives between the sends
    job.send_with_options(args=(1,), delay=60_000)
    broker.add_middleware(_Recorder("c", calls))
    broker.enqueue_many([job.message(2)])

    # Then before-hooks run in order and after-hooks in reverse, a failing hook is logged and does not stop the
    # send, and the late middleware takes part from the next send on
    assert calls == [
        "before a 1 60000", "before b 1 60000", "after b 1 60000", "after a 1 60000",
        "before a 2 None", "before b 2 None", "before c 2 None", "after c 2 None", "after b 2 None", "after a 2 None",
    ]  # fmt: skip
    metrics = broker.metrics("enqueue_hooks")
    assert (metrics.queued, metrics.delayed) == (1, 1)
    assert "Unexpected failure in before_enqueue" in caplog.text
