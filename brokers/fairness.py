"""Fairness keys: fetches rotate across the keys (tenants) that have visible messages on a queue.

A queue in fairness mode (``brokers/sql/060_fairness.sql``) serves its keys in turn, least recently served first,
oldest message first within a key, with an optional per-key cap on messages in flight and a per-key rate, both
shared by every process and machine. Messages without a key form one group of their own (the key ``''``).

Put a queue in fairness mode from a migration, once::

    select pgmq_broker.enable_fairness('thread_sync_jobs', key_path => '{grant_id}');

``key_path`` is where plain JSON messages (from SQL functions, other services) keep their key, so those producers
change nothing. Dramatiq messages carry their key as the message option ``fairness_key``: per send
(``actor.send_with_options(args=..., fairness_key="tenant-1")``), or derived from the arguments by the actor option
of the same name, a callable that receives the actor's arguments::

    @dramatiq.actor(queue_name="thread_sync_jobs", fairness_key=lambda payload: payload["grant_id"])
    def sync_thread(payload): ...

:class:`FairnessKeys` (added by ``PGMQBroker``) applies that actor option on every enqueue, retries included, so a
retried or delayed message keeps its key; a foreign message retried as a Dramatiq envelope gets its key back from
its payload the same way.

A key longer than 1,024 bytes is stored as its digest, ``sha256:<hex>`` (``pgmq_broker.fair_key_of``, the one
definition). A key may be given a weight (:func:`set_fairness_weight`). Weights shape the order of keys across
consecutive fetches (a key of weight 3 keeps its turn for 3 messages) and the shares within one fetch's batch (rooms
in proportion to the weights): while both have visible messages, successive fetches serve a key of weight 3 about
three times as often as a key of weight 1, one message or a batch at a time. Fetches running at the same time skip
the keys another fetch is serving, so concurrent fetches that each take one message spread over distinct keys: with
few keys and many concurrent single-message fetches (many worker threads each asking for one), the shares even out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import dramatiq
import psycopg
from dramatiq.errors import ActorNotFound
from dramatiq.middleware import Middleware
from loguru import logger
from psycopg import sql
from psycopg.rows import class_row

from . import queries
from .database import fetch_scalar

__all__ = [
    "FAIRNESS_KEY_OPTION",
    "FairQueue",
    "FairnessKeys",
    "disable_fairness",
    "enable_fairness",
    "fair_fetch_query",
    "is_fair",
    "set_fairness_weight",
]

log = logger.bind(component="PGMQBroker")

#: Message option and actor option naming a message's fairness key (see the module's docstring).
FAIRNESS_KEY_OPTION = "fairness_key"

#: How an actor derives a message's key from its arguments (``None``: the message has no key).
KeyFunction = Callable[..., object]


@attrs.frozen(kw_only=True)
class FairQueue:
    """A queue in fairness mode: where plain JSON messages keep their key, and the per-key limits."""

    queue_name: str
    key_path: list[str] | None
    max_in_flight: int | None
    rate_per_s: float | None
    burst: int


def fair_fetch_query(queue_name: str) -> bytes:
    """The fetch statement of `queue_name` (a valid queue name) in fairness mode, ready to prepare."""
    return queries.FAIR_FETCH_OF_QUEUE.format(function=sql.Identifier(f"fair_fetch_{queue_name}")).as_bytes(None)


def enable_fairness(
    conn: psycopg.Connection[Any],
    queue_name: str,
    *,
    key_path: Sequence[str] | None = None,
    max_in_flight: int | None = None,
    rate_per_s: float | None = None,
    burst: int = 1,
) -> FairQueue:
    """Put `queue_name` in fairness mode (creating it when missing); for migrations and set-up code.

    Parameters:
        key_path: the JSON path of a plain JSON message's key, e.g. ``["grant_id"]``.
        max_in_flight: per key, messages leased at once (``None``: no cap).
        rate_per_s: per key, messages served per second (``None``: unpaced); `burst` for a rested key.
    """
    conn.execute(
        queries.ENABLE_FAIRNESS,
        {
            "queue": queue_name,
            "key_path": list(key_path) if key_path is not None else None,
            "max_in_flight": max_in_flight,
            "rate_per_s": rate_per_s,
            "burst": burst,
        },
    )
    found = fair_queue(conn, queue_name)
    assert found is not None  # written just above
    return found


def disable_fairness(conn: psycopg.Connection[Any], queue_name: str) -> None:
    """Take `queue_name` out of fairness mode: fetches take its oldest messages again."""
    conn.execute(queries.DISABLE_FAIRNESS, {"queue": queue_name})


def set_fairness_weight(conn: psycopg.Connection[Any], queue_name: str, key: str, weight: int) -> None:
    """Give `key` of `queue_name` (in fairness mode) `weight`: about `weight` times the share of a key of weight 1
    across consecutive fetches (see the module's docstring for concurrent ones), from the key's next turn at the latest.

    Kept whether or not the key has messages, until changed (1 is the default) or the queue leaves fairness mode.

    Raises:
        ValueError: `weight` is not a whole number of at least 1.
    """
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        msg = (
            f"fairness weight {weight!r} of key {key[:100]!r} on queue {queue_name!r} refused:"
            " a weight is a whole number of at least 1"
        )
        raise ValueError(msg)
    conn.execute(queries.SET_FAIRNESS_WEIGHT, {"queue": queue_name, "key": key, "weight": weight})


def is_fair(conn: psycopg.Connection[Any], queue_name: str) -> bool:
    """Whether `queue_name` is in fairness mode."""
    return fetch_scalar(conn, queries.IS_FAIR, {"queue": queue_name}) is True


def fair_queue(conn: psycopg.Connection[Any], queue_name: str) -> FairQueue | None:
    """The fairness settings of `queue_name`, or ``None`` when it is not in fairness mode."""
    with conn.cursor(row_factory=class_row(FairQueue)) as cursor:
        return cursor.execute(queries.FAIR_QUEUE, {"queue": queue_name}).fetchone()


class FairnessKeys(Middleware):
    """Registers the ``fairness_key`` actor option and sets the message option it derives on every enqueue.

    A message that already carries the option (given per send, or kept from an earlier delivery) keeps it. A key
    function that fails on a message's arguments leaves the message without a key, with a debug line: bad input
    is the actor's to reject, and never stops the message from being enqueued.
    """

    @property
    def actor_options(self) -> set[str]:
        return {FAIRNESS_KEY_OPTION}

    def before_enqueue(self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None) -> None:
        if message.options.get(FAIRNESS_KEY_OPTION) is not None:
            return
        try:
            actor = broker.get_actor(message.actor_name)
        except ActorNotFound:
            return
        derive: KeyFunction | None = actor.options.get(FAIRNESS_KEY_OPTION)
        if derive is None:
            return
        try:
            key = derive(*message.args, **message.kwargs)
        except Exception as exc:  # any key function, on any arguments
            log.debug("No fairness key for message {} of {}: {!r}", message.message_id, message.actor_name, exc)
            return
        if key is not None:
            message.options[FAIRNESS_KEY_OPTION] = str(key)
