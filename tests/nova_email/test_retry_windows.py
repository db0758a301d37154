"""Retry windows: a job's attempts are spread over at least its processor's window (2 minutes by default).

Checked from the actors' own options and Dramatiq's backoff function, so no test waits two minutes; the worker
processes honour a shortened window in ``test_workers.py``.
"""

from __future__ import annotations

import random

import pytest
from dramatiq.common import compute_backoff

from nova_email import actors
from nova_email.config import load_settings

#: Attempts per processor, as the original had them (3 webhook, 3 backfill, 5 thread).
ATTEMPTS = {"process_webhook": 3, "run_backfill": 3, "sync_thread": 5}


def spans_ms(min_backoff: int, max_backoff: int, retries: int, rng: random.Random, runs: int = 500) -> list[int]:
    """Time from the first attempt to the last, as Dramatiq's jittered backoff draws it, for `runs` jobs."""
    random.seed(rng.random())  # compute_backoff draws its jitter from the random module
    return [
        sum(compute_backoff(k, factor=min_backoff, max_backoff=max_backoff)[1] for k in range(retries))
        for _ in range(runs)
    ]


@pytest.mark.parametrize("name", list(ATTEMPTS))
def test_by_default_the_last_attempt_comes_at_least_two_minutes_after_the_first(name: str) -> None:
    options = actors.broker.get_actor(name).options
    retries = options["max_retries"]
    assert retries + 1 == ATTEMPTS[name]

    spans = spans_ms(options["min_backoff"], options.get("max_backoff", 7 * 86_400_000), retries, random.Random(name))

    assert min(spans) >= 120_000
    # and not far beyond: jitter at most doubles it
    assert max(spans) <= 240_000 + options["min_backoff"] * 2


@pytest.mark.parametrize("window_ms", [1_000, 3_000, 120_000, 600_000])
@pytest.mark.parametrize("attempts", [2, 3, 5])
def test_a_configured_window_is_the_shortest_span_of_the_attempts(window_ms: int, attempts: int) -> None:
    min_backoff = actors.retry_backoff_ms(window_ms, attempts)
    # Without jitter the attempts span exactly min_backoff * (2**(attempts - 1) - 1): the window, rounded up
    shortest = min_backoff * (2 ** (attempts - 1) - 1)
    assert window_ms <= shortest < window_ms + 2 ** (attempts - 1)
    spans = spans_ms(min_backoff, 7 * 86_400_000, attempts - 1, random.Random(window_ms * attempts))
    assert shortest <= min(spans) and max(spans) <= 2 * shortest


def test_each_processor_has_its_own_window_setting() -> None:
    settings = load_settings(
        {"WEBHOOK_RETRY_WINDOW_MS": "3000", "BACKFILL_RETRY_WINDOW_MS": "60000", "THREAD_RETRY_WINDOW_MS": "300000"},
        env_file=None,
    )
    assert (settings.webhook_retry_window_ms, settings.backfill_retry_window_ms, settings.thread_retry_window_ms) == (
        3_000,
        60_000,
        300_000,
    )
    defaults = load_settings({}, env_file=None)
    assert {defaults.webhook_retry_window_ms, defaults.backfill_retry_window_ms, defaults.thread_retry_window_ms} == {
        120_000
    }
