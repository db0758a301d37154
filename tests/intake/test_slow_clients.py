"""Slow clients against the real server: 40 connections that trickle one byte a second must neither freeze the
receiver nor stay open past the read deadline.

The slow clients are plain sockets on loopback, driven by one thread; each test starts its own server with the
production shape (2 worker processes), so nothing they do lingers into other tests.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import psycopg
import pytest
import requests

from nova_email.config import Settings
from nova_email.intake import RunningIntake, serve_in_background
from nova_email.intake.server import REQUEST_READ_TIMEOUT_S
from tests.processes import wait_for

from .conftest import SECRET, envelope, post_signed

SLOW_CONNECTIONS = 40
#: What a responsive receiver answers within, per the issue; compared with the median of several probes so one
#: scheduling hiccup on a loaded machine does not decide it (a frozen receiver answers none of them).
ANSWER_WITHIN_S = 1.0
PROBES = 5
#: Extra time, past the read deadline, that the server gets to close every slow connection.
CLOSE_MARGIN_S = 10.0


class _Tricklers:
    """Sockets that each send one more byte every second; notices when the server closes them."""

    def __init__(self, address: tuple[str, int], openings: list[bytes]) -> None:
        self.opened_at = time.monotonic()
        self._sockets: dict[socket.socket, bool] = {}
        for opening in openings:
            sock = socket.create_connection(address, timeout=5)
            sock.sendall(opening)
            sock.setblocking(False)
            self._sockets[sock] = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tricklers", daemon=True)
        self._thread.start()

    def _still_open(self, sock: socket.socket) -> bool:
        try:
            while data := sock.recv(4096):  # an answer (408) before the close is fine
                del data
            return False
        except BlockingIOError:
            pass
        except OSError:
            return False
        try:
            sock.send(b"a")
        except BlockingIOError:
            pass
        except OSError:
            return False
        return True

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for sock, is_open in list(self._sockets.items()):
                if is_open:
                    self._sockets[sock] = self._still_open(sock)

    def open_count(self) -> int:
        return sum(self._sockets.values())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in self._sockets:
            sock.close()


def _openings(host: str, kind: str) -> list[bytes]:
    if kind == "header":
        # The request line and a header that never ends.
        return [f"POST /webhooks/nylas HTTP/1.1\r\nHost: {host}\r\nX-Slow: ".encode()] * SLOW_CONNECTIONS
    # Complete headers, then a body that arrives one byte a second.
    head = (
        f"POST /webhooks/nylas HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"X-Nylas-Signature: {'0' * 64}\r\nContent-Length: 5000\r\n\r\n{{"
    )
    return [head.encode()] * SLOW_CONNECTIONS


def _wait_until_served(server: RunningIntake, workers: int) -> None:
    """Wait for every worker to be forked and /healthz to answer: the server is ready before its workers exist."""
    master = psutil.Process(server.pid)
    wait_for(lambda: len(master.children()) == workers, timeout_s=60, what=f"{workers} worker process(es)")
    wait_for(
        lambda: _timed(lambda: requests.get(f"{server.url}/healthz", timeout=5)) < float("inf"),
        timeout_s=60,
        what="/healthz to answer 200",
    )


@contextmanager
def _server(db_url: str, tmp_path: Path) -> Iterator[RunningIntake]:
    settings = Settings(database_url=db_url, nylas_webhook_secret=SECRET, data_dir=tmp_path, log_level="error")
    with serve_in_background(settings, workers=2) as server:
        _wait_until_served(server, workers=2)
        yield server


def _timed(call: object) -> float:
    started = time.monotonic()
    try:
        answer = call()  # type: ignore[operator]
    except requests.RequestException:
        return float("inf")
    return time.monotonic() - started if answer.status_code == 200 else float("inf")


def _waiting_on_the_audit_table(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "select count(*) from pg_locks where not granted and relation = 'flux_webhook_notifications'::regclass"
    ).fetchone()
    return row is not None and row[0] > 0


@pytest.mark.processes
@pytest.mark.parametrize("kind", ["header", "body"])
def test_forty_slow_clients_neither_freeze_the_receiver_nor_stay_open(db_url: str, tmp_path: Path, kind: str) -> None:
    with _server(db_url, tmp_path) as server:
        address = urlsplit(server.url)
        assert address.hostname == "127.0.0.1" and address.port is not None
        # Given 40 connections each sending one more byte of their headers (or body) every second
        tricklers = _Tricklers((address.hostname, address.port), _openings(address.hostname, kind))
        try:
            time.sleep(2.0)  # every connection accepted and part-way through its request
            assert tricklers.open_count() == SLOW_CONNECTIONS
            # When health checks and signed deliveries arrive meanwhile
            health, deliveries = [], []
            with requests.Session() as http:
                for _ in range(PROBES):
                    health.append(_timed(lambda: http.get(f"{server.url}/healthz", timeout=5)))
                    body = envelope(f"ntf_slow_{uuid.uuid4().hex}")
                    deliveries.append(_timed(lambda body=body: post_signed(http, server, body)))
            # Then they are answered promptly
            assert statistics.median(health) < ANSWER_WITHIN_S, health
            assert statistics.median(deliveries) < ANSWER_WITHIN_S, deliveries
            # And every slow connection is closed once the read deadline has passed
            give_up = tricklers.opened_at + REQUEST_READ_TIMEOUT_S + CLOSE_MARGIN_S
            while tricklers.open_count() and time.monotonic() < give_up:
                time.sleep(0.2)  # polling the tricklers' view of their sockets against the bound above
            assert tricklers.open_count() == 0
        finally:
            tricklers.close()


@pytest.mark.processes
def test_a_delivery_waiting_on_the_database_does_not_hold_up_the_others(db_url: str, tmp_path: Path) -> None:
    settings = Settings(database_url=db_url, nylas_webhook_secret=SECRET, data_dir=tmp_path, log_level="error")
    # Given one worker process, and a delivery stuck on a lock of the audit table held by another session
    with (
        serve_in_background(settings, workers=1) as server,
        psycopg.connect(db_url) as locker,
        psycopg.connect(db_url, autocommit=True) as watcher,
    ):
        _wait_until_served(server, workers=1)
        locker.execute("lock table flux_webhook_notifications in access exclusive mode")
        stuck: list[int] = []
        body = envelope(f"ntf_locked_{uuid.uuid4().hex}")
        delivery = threading.Thread(
            target=lambda: stuck.append(post_signed(requests.Session(), server, body).status_code), daemon=True
        )
        delivery.start()
        try:
            wait_for(
                lambda: _waiting_on_the_audit_table(watcher), timeout_s=30, what="the delivery to wait on the lock"
            )
            # When health checks arrive meanwhile
            health = [_timed(lambda: requests.get(f"{server.url}/healthz", timeout=5)) for _ in range(PROBES)]
        finally:
            locker.rollback()
        delivery.join(timeout=30)
    # Then they are answered while the delivery waits, and the delivery completes once the lock is gone
    assert statistics.median(health) < ANSWER_WITHIN_S, health
    assert stuck == [200]
