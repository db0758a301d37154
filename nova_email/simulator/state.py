"""The simulator's state and behaviour, without HTTP: grants, list/get semantics, pagination, mutations.

``Simulator`` answers API calls as envelopes (``{"request_id", "data", "next_cursor"}``) or raises ``ApiError`` with
the documented error body; the HTTP layer (``server.py``) only routes and serialises. One re-entrant lock guards all
state: requests are cheap, and a consistent view matters more than parallel reads on two cores.

Where docs/nylas-v3.md is unsure, the choices are marked "unconfirmed" below.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from loguru import logger

from nova_email.nylas.metrics import ApiCallCounter
from nova_email.simulator import webhooks
from nova_email.simulator.faults import FaultConfig, FaultInjector
from nova_email.simulator.mailbox import (
    DAY_S,
    LARGE_BODY_SHARE,
    Grant,
    SimMessage,
    SimThread,
    build_message,
    generate_grant,
    message_json,
    thread_json,
)
from nova_email.simulator.webhooks import Notification, WebhookEmitter

__all__ = ["DEFAULT_PAGE_LIMIT", "MAX_PAGE_LIMIT", "ApiError", "Simulator"]

log = logger.bind(component="FakeNylas")

#: Documented list defaults: ``limit`` 50, at most 200.
DEFAULT_PAGE_LIMIT = 50
MAX_PAGE_LIMIT = 200
#: Notifications kept in ``Simulator.emitted`` for inspection.
EMITTED_KEPT = 10_000


class ApiError(Exception):
    """An API error answer: status, Nylas ``error.type`` and message, optional extra headers."""

    def __init__(self, status: int, error_type: str, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = dict(headers or {})

    def body(self, request_id: str) -> dict[str, Any]:
        """The documented error envelope (docs d.1)."""
        return {"request_id": request_id, "error": {"type": self.error_type, "message": self.message}}


def new_request_id() -> str:
    """A fresh Nylas-style request id."""
    return f"req-{uuid.uuid4().hex[:12]}"


def _int_param(query: Mapping[str, str], name: str) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, "invalid_request_error", f"{name} must be an integer, got {raw!r}") from None


def _bool_param(query: Mapping[str, str], name: str) -> bool | None:
    raw = query.get(name)
    if raw is None:
        return None
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise ApiError(400, "invalid_request_error", f"{name} must be true or false, got {raw!r}")


def _select(obj: dict[str, Any], fields: set[str] | None) -> dict[str, Any]:
    # Unconfirmed: whether Nylas always returns id/object with select; we keep id so objects stay addressable.
    if fields is None:
        return obj
    return {k: v for k, v in obj.items() if k in fields or k == "id"}


def _select_fields(query: Mapping[str, str]) -> set[str] | None:
    raw = query.get("select")
    if not raw:
        return None
    return {f.strip() for f in raw.split(",") if f.strip()}


class Simulator:
    """A set of generated mailboxes that answers Nylas API calls and accepts mutations.

    Parameters:
        seed: makes every mailbox reproducible.
        grants: grant ids to create.
        threads_per_grant: threads generated per grant (about 5.8 messages each on average).
        anchor: unix seconds of "now" for the generated dates; default: today at 00:00 UTC.
        api_key: when set, API calls must carry ``Authorization: Bearer <api_key>``.
        faults: the fault config (mutable while running).
        emitter: where webhooks of mutations go; ``None`` keeps them only in ``emitted``.
        large_body_share: share of messages with a 100-400 kB body.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        grants: Sequence[str] = ("grant-1",),
        threads_per_grant: int = 50,
        anchor: int | None = None,
        api_key: str | None = None,
        faults: FaultConfig | None = None,
        emitter: WebhookEmitter | None = None,
        large_body_share: float = LARGE_BODY_SHARE,
    ) -> None:
        self.seed = seed
        self.anchor = anchor if anchor is not None else int(time.time()) // DAY_S * DAY_S
        self.api_key = api_key
        self.faults = faults or FaultConfig()
        self.injector = FaultInjector(self.faults)
        self.emitter = emitter
        self.calls = ApiCallCounter()
        self.emitted: collections.deque[Notification] = collections.deque(maxlen=EMITTED_KEPT)
        self._lock = threading.RLock()
        self._version = 0
        self._mutations = 0
        self._order_cache: dict[tuple[str, str], tuple[int, list[Any]]] = {}
        self._held: Notification | None = None
        self.grants: dict[str, Grant] = {
            gid: generate_grant(
                seed=seed,
                grant_id=gid,
                threads=threads_per_grant,
                anchor=self.anchor,
                large_body_share=large_body_share,
            )
            for gid in grants
        }

    # -- API -----------------------------------------------------------------------------------------------------

    def check_api_key(self, authorization: str | None) -> None:
        """Refuse a missing or wrong API key as docs d.1 lists it (400 ``token.unauthorized_access``)."""
        if self.api_key is None:
            return
        if authorization != f"Bearer {self.api_key}":
            raise ApiError(400, "token.unauthorized_access", "Unauthorized: the API key is missing or invalid.")

    def grant_for_api(self, grant_id: str) -> Grant:
        """The grant, or 404 (unknown) / 401 (expired)."""
        grant = self.grants.get(grant_id)
        if grant is None:
            raise ApiError(404, "not_found_error", f"Grant {grant_id} not found.")
        if grant.status != "valid":
            raise ApiError(401, "authentication_error", f"Grant {grant_id} is expired; re-authenticate it.")
        return grant

    def list_threads(self, grant_id: str, query: Mapping[str, str]) -> dict[str, Any]:
        """``GET /threads``: filter on latest received date (bounds inclusive), paginate, select."""
        with self._lock:
            grant = self.grant_for_api(grant_id)
            limit, offset, fingerprint = self._page_args("threads", grant_id, query)
            if offset and self.injector.roll(self.faults.changing_pages_rate):
                self._grow_random_thread(grant)
            after = _int_param(query, "latest_message_after")
            before = _int_param(query, "latest_message_before")
            unread, starred, folder = _bool_param(query, "unread"), _bool_param(query, "starred"), query.get("in")
            matches: list[SimThread] = []
            for thread in self._ordered_threads(grant):
                latest = thread.latest_received
                if after is not None and (latest is None or latest < after):
                    continue
                if before is not None and (latest is None or latest > before):
                    continue
                if unread is not None and any(m.unread for m in thread.messages) != unread:
                    continue
                if starred is not None and any(m.starred for m in thread.messages) != starred:
                    continue
                if folder is not None and not any(folder in m.folders for m in thread.messages):
                    continue
                matches.append(thread)
            fields = _select_fields(query)
            with_body = fields is None or "latest_draft_or_message" in fields
            page = [
                _select(thread_json(t, with_latest_body=with_body), fields) for t in matches[offset : offset + limit]
            ]
            return self._envelope(page, offset + limit, len(matches), fingerprint)

    def get_thread(self, grant_id: str, thread_id: str, query: Mapping[str, str]) -> dict[str, Any]:
        """``GET /threads/{id}``."""
        with self._lock:
            thread = self.grant_for_api(grant_id).threads.get(thread_id)
            if thread is None:
                raise ApiError(404, "not_found_error", f"Thread {thread_id} not found.")
            fields = _select_fields(query)
            data = _select(thread_json(thread, with_latest_body=fields is None), fields)
            return {"request_id": new_request_id(), "data": data}

    def list_messages(self, grant_id: str, query: Mapping[str, str]) -> dict[str, Any]:
        """``GET /messages``: newest first; ``thread_id``, ``received_after/before`` (inclusive), flags, ``in``."""
        with self._lock:
            grant = self.grant_for_api(grant_id)
            limit, offset, fingerprint = self._page_args("messages", grant_id, query)
            thread_id = query.get("thread_id")
            if thread_id is not None:
                thread = grant.threads.get(thread_id)
                candidates = list(reversed(thread.messages)) if thread else []
            else:
                candidates = self._ordered_messages(grant)
            after, before = _int_param(query, "received_after"), _int_param(query, "received_before")
            unread, starred, folder = _bool_param(query, "unread"), _bool_param(query, "starred"), query.get("in")
            matches = [
                m
                for m in candidates
                if (after is None or m.date >= after)
                and (before is None or m.date <= before)
                and (unread is None or m.unread == unread)
                and (starred is None or m.starred == starred)
                and (folder is None or folder in m.folders)
            ]
            fields = _select_fields(query)
            headers = query.get("fields") in ("include_headers", "include_basic_headers")
            page = [self._message_out(grant, m, fields, headers) for m in matches[offset : offset + limit]]
            return self._envelope(page, offset + limit, len(matches), fingerprint)

    def get_message(self, grant_id: str, message_id: str, query: Mapping[str, str]) -> dict[str, Any]:
        """``GET /messages/{id}``; with ``vanish_rate`` the message may be deleted just before (a 404)."""
        with self._lock:
            grant = self.grant_for_api(grant_id)
            message = grant.messages.get(message_id)
            if message is not None and self.injector.roll(self.faults.vanish_rate):
                self.delete_message(grant_id, message_id)
                message = None
            if message is None:
                raise ApiError(404, "not_found_error", f"Message {message_id} not found.")
            headers = query.get("fields") in ("include_headers", "include_basic_headers")
            data = self._message_out(grant, message, _select_fields(query), headers)
            return {"request_id": new_request_id(), "data": data}

    def _message_out(self, grant: Grant, message: SimMessage, fields: set[str] | None, headers: bool) -> dict[str, Any]:
        data = message_json(message, with_body=fields is None or "body" in fields)
        if headers:
            thread = grant.threads[message.thread_id]
            position = thread.messages.index(message)
            previous = [f"<{m.id}@sim.example>" for m in thread.messages[:position]]
            data["headers"] = [{"name": "Message-ID", "value": f"<{message.id}@sim.example>"}]
            if previous:
                data["headers"].append({"name": "In-Reply-To", "value": previous[-1]})
                data["headers"].append({"name": "References", "value": " ".join(previous)})
        return _select(data, fields)

    # -- pagination ----------------------------------------------------------------------------------------------

    def _page_args(self, endpoint: str, grant_id: str, query: Mapping[str, str]) -> tuple[int, int, str]:
        limit = _int_param(query, "limit") or DEFAULT_PAGE_LIMIT
        if not 1 <= limit <= MAX_PAGE_LIMIT:
            # Unconfirmed whether Nylas clamps or refuses; refusing makes a client bug visible.
            raise ApiError(400, "invalid_request_error", f"limit must be between 1 and {MAX_PAGE_LIMIT}, got {limit}")
        filters = sorted((k, v) for k, v in query.items() if k not in ("page_token", "limit"))
        fingerprint = hashlib.blake2b(
            json.dumps([self.seed, endpoint, grant_id, filters]).encode(), digest_size=8
        ).hexdigest()
        token = query.get("page_token")
        offset = 0
        if token:
            try:
                decoded = base64.urlsafe_b64decode(token.encode() + b"==").decode()
                token_fingerprint, raw_offset = decoded.split(":", 1)
                offset = int(raw_offset)
            except (ValueError, UnicodeDecodeError, binascii.Error):
                raise ApiError(400, "invalid_request_error", "page_token is not a valid cursor.") from None
            if token_fingerprint != fingerprint or offset < 0:
                raise ApiError(400, "invalid_request_error", "page_token does not belong to this query.")
        return limit, offset, fingerprint

    def _envelope(self, page: list[dict[str, Any]], next_offset: int, total: int, fingerprint: str) -> dict[str, Any]:
        body: dict[str, Any] = {"request_id": new_request_id(), "data": page}
        if next_offset < total:
            body["next_cursor"] = base64.urlsafe_b64encode(f"{fingerprint}:{next_offset}".encode()).decode().rstrip("=")
        return body

    def _ordered_threads(self, grant: Grant) -> list[SimThread]:
        unordered = self.faults.unordered_threads
        key = (grant.id, "threads-unordered" if unordered else "threads")
        cached = self._order_cache.get(key)
        if cached and cached[0] == self._version:
            return cached[1]
        threads = list(grant.threads.values())
        if unordered:
            # Google: a stable order that is not by date (docs b.2).
            threads.sort(key=lambda t: hashlib.blake2b(t.id.encode(), digest_size=4).digest())
        else:
            threads.sort(key=lambda t: (t.latest_received or 0, t.id), reverse=True)
        self._order_cache[key] = (self._version, threads)
        return threads

    def _ordered_messages(self, grant: Grant) -> list[SimMessage]:
        key = (grant.id, "messages")
        cached = self._order_cache.get(key)
        if cached and cached[0] == self._version:
            return cached[1]
        messages = sorted(grant.messages.values(), key=lambda m: (m.date, m.id), reverse=True)
        self._order_cache[key] = (self._version, messages)
        return messages

    # -- mutations -----------------------------------------------------------------------------------------------

    def _grant(self, grant_id: str) -> Grant:
        grant = self.grants.get(grant_id)
        if grant is None:
            msg = f"unknown grant {grant_id!r}; known: {sorted(self.grants)!r}"
            raise KeyError(msg)
        return grant

    def add_message(
        self,
        grant_id: str,
        *,
        thread_id: str | None = None,
        sender_email: str | None = None,
        subject: str | None = None,
        body: str | None = None,
        unread: bool = True,
        date: int | None = None,
        emit: bool = True,
    ) -> dict[str, Any]:
        """Add a message (to ``thread_id``, or to a new thread) and emit ``message.created``.

        A received reply in a thread where the owner has written also emits ``thread.replied``. Returns the
        message JSON.
        """
        with self._lock:
            grant, thread, rng = self._mutation_target(grant_id, thread_id, new_prefix="thr_new")
            latest = max((m.date for m in thread.messages), default=0)
            when = date if date is not None else max(int(time.time()), latest + 1)
            sender = self._sender(grant, thread, rng, sender_email)
            people = tuple(
                dict.fromkeys(p for m in thread.messages for p in (*m.from_, *m.to) if p[1] != grant.email)
            ) or (rng.choice(grant.contacts),)
            topic = thread.messages[0].subject if thread.messages else (subject or "New conversation")
            message = build_message(
                rng,
                grant,
                thread.id,
                message_id=f"msg_new{self._mutations}_{uuid.uuid4().hex[:10]}",
                subject=subject or (f"Re: {topic}" if thread.messages else topic),
                sender=sender,
                recipients=people,
                date=when,
                anchor=max(self.anchor, when),
            )
            message.body = body
            if not message.sent:
                message.unread = unread
                message.folders = ("INBOX", "UNREAD") if unread else ("INBOX",)
            owner_wrote = any(m.sent for m in thread.messages)
            thread.messages.append(message)
            thread.messages.sort(key=lambda m: (m.date, m.id))
            grant.messages[message.id] = message
            self._version += 1
            data = message_json(message)
            notes = [webhooks.message_event("message.created", data, provider=grant.provider)]
            if owner_wrote and not message.sent:
                root = next(m for m in thread.messages if m.sent)
                replies = sum(1 for m in thread.messages if not m.sent and m.date > root.date)
                notes.append(
                    webhooks.thread_replied(
                        grant_id=grant_id,
                        thread_id=thread.id,
                        reply_id=message.id,
                        root_message_id=root.id,
                        reply_count=replies,
                    )
                )
        if emit:
            self._deliver(notes)
        return data

    def _mutation_target(
        self, grant_id: str, thread_id: str | None, *, new_prefix: str
    ) -> tuple[Grant, SimThread, random.Random]:
        """The grant, the thread a mutation writes to (a new one when `thread_id` is None) and its random source.

        Call with the lock held. Raises KeyError for an unknown grant or thread.
        """
        grant = self._grant(grant_id)
        self._mutations += 1
        rng = random.Random(f"{self.seed}:{grant_id}:mutation:{self._mutations}")
        if thread_id is None:
            thread = SimThread(id=f"{new_prefix}{self._mutations}_{uuid.uuid4().hex[:10]}", grant_id=grant_id)
            grant.threads[thread.id] = thread
        elif thread_id in grant.threads:
            thread = grant.threads[thread_id]
        else:
            msg = f"unknown thread {thread_id!r} in grant {grant_id!r}"
            raise KeyError(msg)
        return grant, thread, rng

    def add_draft(
        self,
        grant_id: str,
        *,
        thread_id: str | None = None,
        subject: str | None = None,
        body: str | None = None,
        date: int | None = None,
    ) -> dict[str, Any]:
        """Save an unsent draft in ``thread_id``, or in a new thread, which then has no messages at all.

        A draft shows in its thread's ``draft_ids``, ``has_drafts`` and ``latest_draft_or_message``, never in
        ``/messages``. No webhook is emitted. Returns the draft JSON (``object: "draft"``).
        """
        with self._lock:
            grant, thread, rng = self._mutation_target(grant_id, thread_id, new_prefix="thr_draft")
            topic = thread.messages[0].subject if thread.messages else (subject or "Draft")
            when = date if date is not None else int(time.time())
            draft = build_message(
                rng,
                grant,
                thread.id,
                message_id=f"drf_new{self._mutations}_{uuid.uuid4().hex[:10]}",
                subject=subject or (f"Re: {topic}" if thread.messages else topic),
                sender=(grant.id, grant.email),
                recipients=(rng.choice(grant.contacts),) if grant.contacts else (),
                date=when,
                anchor=max(self.anchor, when),
            )
            draft.body = body
            draft.folders = ("DRAFT",)
            thread.drafts.append(draft)
            self._version += 1
            return message_json(draft)

    def update_message(
        self,
        grant_id: str,
        message_id: str,
        *,
        unread: bool | None = None,
        starred: bool | None = None,
        folders: Sequence[str] | None = None,
        emit: bool = True,
    ) -> dict[str, Any]:
        """Change flags or folders of a message and emit ``message.updated``; returns the message JSON."""
        with self._lock:
            grant = self._grant(grant_id)
            message = grant.messages.get(message_id)
            if message is None:
                msg = f"unknown message {message_id!r} in grant {grant_id!r}"
                raise KeyError(msg)
            if folders is not None:
                message.folders = tuple(folders)
            if unread is not None:
                message.unread = unread
                labels = [f for f in message.folders if f != "UNREAD"]
                message.folders = tuple(labels + ["UNREAD"] if unread else labels)
            if starred is not None:
                message.starred = starred
            self._version += 1
            data = message_json(message)
            note = webhooks.message_event("message.updated", data, provider=grant.provider)
        if emit:
            self._deliver([note])
        return data

    def mark_read(self, grant_id: str, message_id: str, *, emit: bool = True) -> dict[str, Any]:
        """Mark a message read (and emit ``message.updated``)."""
        return self.update_message(grant_id, message_id, unread=False, emit=emit)

    def delete_message(self, grant_id: str, message_id: str, *, emit: bool = True) -> None:
        """Delete a message (its thread too when nothing, not even a draft, is left) and emit ``message.deleted``."""
        with self._lock:
            grant = self._grant(grant_id)
            message = grant.messages.pop(message_id, None)
            if message is None:
                return
            thread = grant.threads[message.thread_id]
            thread.messages.remove(message)
            if not thread.messages and not thread.drafts:
                del grant.threads[thread.id]
            self._version += 1
            obj = {"object": "message", "id": message_id, "grant_id": grant_id, "thread_id": message.thread_id}
            note = webhooks.message_event("message.deleted", obj, provider=grant.provider)
        if emit:
            self._deliver([note])

    def expire_grant(self, grant_id: str, *, emit: bool = True) -> None:
        """Expire a grant: API calls for it answer 401 from now on; emits ``grant.expired``."""
        with self._lock:
            grant = self._grant(grant_id)
            grant.status = "expired"
            note = webhooks.grant_expired(grant_id=grant_id, email=grant.email, provider=grant.provider)
        if emit:
            self._deliver([note])

    def restore_grant(self, grant_id: str) -> None:
        """Make an expired grant valid again (as after re-authentication)."""
        with self._lock:
            self._grant(grant_id).status = "valid"

    def _sender(self, grant: Grant, thread: SimThread, rng: random.Random, email: str | None) -> tuple[str, str]:
        if email == grant.email:
            return (grant.id, grant.email)
        if email is not None:
            known = {p[1]: p for m in thread.messages for p in m.from_}
            return known.get(email, (email.split("@", 1)[0], email))
        others = [p for m in thread.messages for p in m.from_ if p[1] != grant.email]
        return rng.choice(others) if others else rng.choice(grant.contacts)

    def _grow_random_thread(self, grant: Grant) -> None:
        # Called under the lock while a page is being served: the listing then sees the changed mailbox.
        if not grant.threads:
            return
        rng = random.Random(f"{self.seed}:{grant.id}:grow:{self._mutations}")
        thread_id = rng.choice(sorted(grant.threads))
        log.debug("Thread {} of grant {} gains a message mid-listing", thread_id, grant.id)
        self.add_message(grant.id, thread_id=thread_id)

    def flush_webhooks(self) -> None:
        """Deliver the notification held back by ``out_of_order_webhook_rate``, if any."""
        with self._lock:
            held, self._held = self._held, None
            if held is not None:
                self._send(held)

    def _deliver(self, notes: list[Notification]) -> None:
        with self._lock:
            for note in notes:
                self.emitted.append(note)
                if self._held is None and self.injector.roll(self.faults.out_of_order_webhook_rate):
                    self._held = note  # goes out after the next one: delivery order is not guaranteed (docs c.5)
                    continue
                self._send(note)
                if self._held is not None and self._held is not note:
                    self.flush_webhooks()
                if self.injector.roll(self.faults.duplicate_webhook_rate):
                    again = note.redelivered()
                    self.emitted.append(again)
                    self._send(again)

    def _send(self, note: Notification) -> None:
        if self.emitter is None:
            return
        try:
            self.emitter.emit(note)
        except webhooks.WebhookDeliveryError as exc:
            # A mutation still happened; the lost webhook is what a real outage looks like. Say it once per event.
            log.warning("Webhook {} ({}) was not delivered: {}", note.id, note.type, exc)

    # -- inspection ----------------------------------------------------------------------------------------------

    def locked(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` under the state lock (for consistent exports)."""
        with self._lock:
            return fn()
