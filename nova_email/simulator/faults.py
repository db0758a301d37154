"""Fault and limit injection for the simulator: each fault is one field of ``FaultConfig``, off by default.

The config is mutable while the server runs (``handle.faults.error_rate = 0.2`` or ``POST /_sim/faults``), so a test
can turn a fault on for one phase and off for the next.
"""

from __future__ import annotations

import math
import random
import threading
import time
from typing import Any

import attrs

__all__ = ["Fault", "FaultConfig", "FaultInjector"]


@attrs.define(kw_only=True)
class FaultConfig:
    """What to break, and how often.

    Attributes:
        rate_limit_per_s: per-grant requests per second before 429s (``None``: no limit). Nylas allows 200.
        rate_limit_burst: requests a rested grant may send at once.
        retry_after: send ``Retry-After`` (whole seconds) with 429s; ``False`` models providers that omit it.
        error_rate: share of API requests answered with a random status of ``error_statuses``.
        error_statuses: the 5xx statuses ``error_rate`` picks from (default 500/502/503/504). One the client does
            not retry inside a call, e.g. ``(501,)``, makes every attempt of a job fail at once.
        reset_rate: share of API requests whose connection is reset without an answer.
        stall_rate: share of API requests that hang for ``stall_ms`` and then close without an answer: a client
            whose timeout is shorter sees a read timeout.
        latency_ms: added to every API request; ``latency_jitter_ms`` adds a uniform random part.
        changing_pages_rate: chance, on each thread-list page after the first, that a listed thread gains a new
            message before the page is served (a mailbox that changes mid-backfill; its webhook is emitted too).
        unordered_threads: list threads in a stable but not date order, as Google does.
        vanish_rate: chance that a message fetched by id is deleted just before (404 after a webhook/list).
        duplicate_webhook_rate: chance that an emitted webhook is delivered a second time (same envelope id).
        out_of_order_webhook_rate: chance that an emitted webhook is held back and delivered after the next one
            (or by ``Simulator.flush_webhooks()``).
        seed: seeds the fault dice, so a run's fault sequence is reproducible for a given request order.
    """

    rate_limit_per_s: float | None = None
    rate_limit_burst: int = 1
    retry_after: bool = True
    error_rate: float = 0.0
    error_statuses: tuple[int, ...] = (500, 502, 503, 504)
    reset_rate: float = 0.0
    stall_rate: float = 0.0
    stall_ms: float = 2000.0
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    changing_pages_rate: float = 0.0
    unordered_threads: bool = False
    vanish_rate: float = 0.0
    duplicate_webhook_rate: float = 0.0
    out_of_order_webhook_rate: float = 0.0
    seed: int = 0

    def update(self, changes: dict[str, Any]) -> None:
        """Apply ``{field: value}`` changes (from the control API); unknown fields raise ``ValueError``."""
        names = {f.name for f in attrs.fields(FaultConfig)}
        unknown = sorted(set(changes) - names)
        if unknown:
            msg = f"unknown fault settings {unknown!r}; known: {sorted(names)!r}"
            raise ValueError(msg)
        for name, value in changes.items():
            setattr(self, name, value)


@attrs.frozen
class Fault:
    """The fault chosen for one request: ``kind`` is ``reset``, ``stall``, ``error`` or ``rate_limited``."""

    kind: str
    status: int = 0
    retry_after_s: int | None = None


class FaultInjector:
    """Rolls the dice for each API request and keeps the per-grant rate-limit buckets."""

    def __init__(self, config: FaultConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._lock = threading.Lock()
        # Per grant: (tokens, last refill time) of the rate-limit bucket.
        self._buckets: dict[str, tuple[float, float]] = {}
        #: Requests stalled so far (their connections were closed unanswered after ``stall_ms``).
        self.stalled = 0

    def roll(self, probability: float) -> bool:
        """True with ``probability`` (thread-safe)."""
        if probability <= 0:
            return False
        with self._lock:
            return self._rng.random() < probability

    def choose_fault(self, grant_id: str | None) -> Fault | None:
        """The fault for an API request, or ``None``. Also sleeps the configured latency."""
        config = self.config
        if config.latency_ms or config.latency_jitter_ms:
            with self._lock:
                jitter = self._rng.random() * config.latency_jitter_ms
            time.sleep((config.latency_ms + jitter) / 1000.0)  # the latency is the fault being simulated
        if grant_id is not None and config.rate_limit_per_s:
            wait_s = self._take_token(grant_id, config.rate_limit_per_s, config.rate_limit_burst)
            if wait_s is not None:
                return Fault("rate_limited", 429, max(1, math.ceil(wait_s)) if config.retry_after else None)
        if self.roll(config.reset_rate):
            return Fault("reset")
        if self.roll(config.stall_rate):
            with self._lock:
                self.stalled += 1
            return Fault("stall")
        if self.roll(config.error_rate):
            with self._lock:
                status = self._rng.choice(tuple(config.error_statuses))
            return Fault("error", status)
        return None

    def _take_token(self, grant_id: str, rate: float, burst: int) -> float | None:
        """Take a token; ``None`` when one was available, else the seconds until the next one."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(grant_id, (float(burst), now))
            tokens = min(float(burst), tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[grant_id] = (tokens - 1.0, now)
                return None
            self._buckets[grant_id] = (tokens, now)
            return (1.0 - tokens) / rate
