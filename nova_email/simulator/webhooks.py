"""Nylas webhook notifications built by the simulator, and the pluggable emitters that deliver them.

Envelopes follow docs/nylas-v3.md (c.1/c.2): CloudEvents-style ``specversion/type/source/id/time/
webhook_delivery_attempt/data``. Emitters:

- ``SqlIntakeEmitter``: calls the service's intake, ``queue_nylas_webhook_notification(...)``, on a database URL.
- ``HttpIntakeEmitter``: POSTs the raw JSON to an HTTP intake with ``X-Nylas-Signature`` (hex HMAC-SHA256 of the
  exact body bytes, keyed with the webhook secret), as Nylas does.
- ``RecordingEmitter``: keeps them in memory, for tests.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from typing import Any, Protocol

import attrs
import psycopg
import requests
from loguru import logger
from psycopg.types.json import Jsonb

from nova_email.simulator.queries import QUEUE_WEBHOOK

__all__ = [
    "TRUNCATE_OVER_BYTES",
    "HttpIntakeEmitter",
    "Notification",
    "RecordingEmitter",
    "SqlIntakeEmitter",
    "WebhookDeliveryError",
    "WebhookEmitter",
    "grant_expired",
    "message_event",
    "sign",
    "thread_replied",
]

log = logger.bind(component="FakeNylasWebhooks")

#: Nylas drops large fields and adds ``.truncated`` when the object would exceed about 1 MB.
TRUNCATE_OVER_BYTES = 1_000_000
#: The ``application_id`` the simulator puts in every envelope.
APPLICATION_ID = "app-sim"


class WebhookDeliveryError(Exception):
    """An emitter could not hand a notification to the intake; the message says which and why."""


@attrs.frozen(kw_only=True)
class Notification:
    """One webhook delivery: the envelope ``payload`` plus the fields the intake takes separately."""

    id: str
    type: str
    grant_id: str
    payload: dict[str, Any]

    def redelivered(self) -> Notification:
        """The same notification delivered again (same envelope id, next ``webhook_delivery_attempt``)."""
        payload = dict(self.payload)
        payload["webhook_delivery_attempt"] = int(payload.get("webhook_delivery_attempt", 1)) + 1
        return attrs.evolve(self, payload=payload)


class WebhookEmitter(Protocol):
    """Delivers notifications to the service under test."""

    def emit(self, notification: Notification) -> None:
        """Deliver one notification; raise ``WebhookDeliveryError`` when the intake refused it."""


def _envelope(type_: str, source: str, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    notification_id = f"ntf_{uuid.uuid4().hex}"
    return notification_id, {
        "specversion": "1.0",
        "type": type_,
        "source": source,
        "id": notification_id,
        "time": int(time.time()),
        "webhook_delivery_attempt": 1,
        "data": data,
    }


def message_event(base_type: str, message: dict[str, Any], *, provider: str = "google") -> Notification:
    """``message.created``/``message.updated``; ``.truncated`` (body dropped) when the message is over ~1 MB."""
    obj = dict(message)
    type_ = base_type
    if len(json.dumps(obj).encode()) > TRUNCATE_OVER_BYTES:
        obj.pop("body", None)
        type_ = f"{base_type}.truncated"
    notification_id, payload = _envelope(
        type_, f"/{provider}/emails/realtime", {"application_id": APPLICATION_ID, "object": obj}
    )
    return Notification(id=notification_id, type=type_, grant_id=str(obj.get("grant_id", "")), payload=payload)


def thread_replied(
    *, grant_id: str, thread_id: str, reply_id: str, root_message_id: str, reply_count: int
) -> Notification:
    """``thread.replied`` (message tracking): names the thread and the reply, not a thread object (docs c.2)."""
    obj = {
        "object": "thread",
        "grant_id": grant_id,
        "message_id": reply_id,
        "root_message_id": root_message_id,
        "thread_id": thread_id,
        "label": "sim-tracking",
        "reply_data": {"count": reply_count},
        "sender_app_id": APPLICATION_ID,
        "timestamp": int(time.time()),
        "from_self": False,
    }
    data = {"application_id": APPLICATION_ID, "grant_id": grant_id, "object": obj}
    notification_id, payload = _envelope("thread.replied", "/com/nylas/tracking", data)
    return Notification(id=notification_id, type="thread.replied", grant_id=grant_id, payload=payload)


def grant_expired(*, grant_id: str, email: str, provider: str = "google") -> Notification:
    """``grant.expired`` with code 25009 (docs c.2)."""
    obj = {
        "code": 25009,
        "grant_id": grant_id,
        "integration_id": "int-sim",
        "provider": provider,
        "email": email,
        "grant_updated_at": int(time.time()),
    }
    notification_id, payload = _envelope(
        "grant.expired", "/nylas/system", {"application_id": APPLICATION_ID, "object": obj}
    )
    return Notification(id=notification_id, type="grant.expired", grant_id=grant_id, payload=payload)


def sign(body: bytes, secret: str) -> str:
    """``X-Nylas-Signature``: lowercase hex HMAC-SHA256 of the raw body bytes keyed with the webhook secret."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class SqlIntakeEmitter:
    """Calls ``queue_nylas_webhook_notification`` on the service's database, one connection per emit."""

    def __init__(self, database_url: str) -> None:
        self._database_url = database_url

    def emit(self, notification: Notification) -> None:
        """Record and queue the notification; a duplicate envelope id is the intake's business (it dedups)."""
        params = {
            "webhook_id": notification.id,
            "notification_type": notification.type,
            "grant_id": notification.grant_id,
            "payload": Jsonb(notification.payload),
        }
        try:
            with psycopg.connect(self._database_url, autocommit=True) as conn:
                conn.execute(QUEUE_WEBHOOK, params)
        except psycopg.Error as exc:
            msg = f"the SQL intake refused webhook {notification.id} ({notification.type}): {exc}"
            raise WebhookDeliveryError(msg) from exc


class HttpIntakeEmitter:
    """POSTs notifications to an HTTP intake, signed like Nylas signs them."""

    def __init__(
        self, url: str, *, secret: str, timeout_s: float = 10.0, session: requests.Session | None = None
    ) -> None:
        self._url = url
        self._secret = secret
        self._timeout_s = timeout_s
        self._session = session or requests.Session()

    def emit(self, notification: Notification) -> None:
        """POST the envelope; any status other than 2xx is a delivery failure (Nylas would retry it)."""
        body = json.dumps(notification.payload, ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json", "X-Nylas-Signature": sign(body, self._secret)}
        try:
            response = self._session.post(self._url, data=body, headers=headers, timeout=self._timeout_s)
        except requests.RequestException as exc:
            msg = f"the HTTP intake {self._url} did not answer webhook {notification.id}: {exc}"
            raise WebhookDeliveryError(msg) from exc
        if not 200 <= response.status_code < 300:
            msg = f"the HTTP intake {self._url} answered webhook {notification.id} with {response.status_code}"
            raise WebhookDeliveryError(msg)


class RecordingEmitter:
    """Keeps every notification in ``notifications`` (thread-safe); for tests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.notifications: list[Notification] = []

    def emit(self, notification: Notification) -> None:
        """Append the notification."""
        with self._lock:
            self.notifications.append(notification)

    def types(self) -> list[str]:
        """The ``type`` of each notification, in emission order."""
        with self._lock:
            return [n.type for n in self.notifications]
