"""The fake Nylas HTTP server (stdlib ``ThreadingHTTPServer``), its control API, and its entry points.

API (docs/nylas-v3.md b.2), with faults applied:
    GET /v3/grants/{grant_id}/threads[/{thread_id}]     GET /v3/grants/{grant_id}/messages[/{message_id}]

Control API (no API key, no faults), for tests and benchmarks in other processes:
    GET  /_sim/health                              GET  /_sim/stats         (API calls per endpoint and status)
    GET  /_sim/grants                              GET  /_sim/grants/{gid}/export[?bodies=0]
    POST /_sim/grants/{gid}/messages               {"thread_id"?, "sender_email"?, "subject"?, "body"?, "unread"?}
    POST /_sim/grants/{gid}/messages/{mid}         {"unread"?, "starred"?, "folders"?}   (emits message.updated)
    DELETE /_sim/grants/{gid}/messages/{mid}       POST /_sim/grants/{gid}/expire | /restore
    GET|POST /_sim/faults                          (read or change FaultConfig fields)
    POST /_sim/webhooks/flush                      (deliver a webhook held back by out_of_order_webhook_rate)

The stdlib server is enough: it is threaded, speaks HTTP/1.1 keep-alive (so client pooling is exercised) and adds
no dependency.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs
from loguru import logger

from nova_email.nylas.metrics import NO_RESPONSE, endpoint_of
from nova_email.simulator.export import export_grant, write_exports
from nova_email.simulator.faults import FaultConfig
from nova_email.simulator.state import ApiError, Simulator, new_request_id
from nova_email.simulator.webhooks import HttpIntakeEmitter, SqlIntakeEmitter, WebhookEmitter

__all__ = ["SimulatorHandle", "SimulatorServer", "main", "serve_in_thread", "start_in_thread"]

log = logger.bind(component="FakeNylas")

_API = re.compile(r"^/v3/grants/(?P<grant>[^/]+)/(?P<kind>threads|messages)(?:/(?P<object>[^/]+))?/?$")
_CONTROL_MESSAGE = re.compile(r"^/_sim/grants/(?P<grant>[^/]+)/messages(?:/(?P<object>[^/]+))?/?$")
_CONTROL_GRANT = re.compile(r"^/_sim/grants/(?P<grant>[^/]+)/(?P<action>export|expire|restore)/?$")
#: Bodies shorter than this are sent uncompressed, as Nylas does for tiny bodies.
GZIP_OVER_BYTES = 1024


class SimulatorServer(ThreadingHTTPServer):
    """A threaded HTTP server bound to one ``Simulator``."""

    daemon_threads = True
    allow_reuse_address = True
    #: Connections the kernel queues before they are accepted. The standard library's 5 drops the rest of a burst
    #: (a worker fleet starting), and each dropped connection waits a second for the client's TCP retry.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], simulator: Simulator) -> None:
        super().__init__(address, _Handler)
        self.simulator = simulator

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the listening socket."""
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, keep-alive clients wait ~40 ms on each answer.
    disable_nagle_algorithm = True
    server: SimulatorServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.trace(format, *args)

    # -- dispatch ------------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        try:
            if path.startswith("/_sim/"):
                status, body = self._control(method, path, query)
                self._send_json(status, body)
            elif method == "GET" and (match := _API.match(path)):
                self._api(match, query, path)
            else:
                self._send_json(
                    404, ApiError(404, "not_found_error", f"No route for {method} {path}").body(new_request_id())
                )
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            # Never let a bug kill the connection silently: answer 500 and keep serving.
            log.opt(exception=True).error("Request {} {} failed", method, path)
            self._send_json(500, ApiError(500, "internal_error", "Simulator bug; see its log.").body(new_request_id()))

    def _api(self, match: re.Match[str], query: dict[str, str], path: str) -> None:
        simulator = self.server.simulator
        endpoint = endpoint_of(path)
        grant_id = unquote(match["grant"])
        object_id = unquote(match["object"]) if match["object"] else None
        fault = simulator.injector.choose_fault(grant_id)
        if fault is not None and fault.kind in ("reset", "stall"):
            if fault.kind == "stall":
                time.sleep(simulator.faults.stall_ms / 1000)  # a hung upstream: the stall is the fault
            simulator.calls.record(endpoint, NO_RESPONSE)
            self._reset_connection()
            return
        request_id = new_request_id()
        try:
            if fault is not None and fault.kind == "rate_limited":
                headers = {"Retry-After": str(fault.retry_after_s)} if fault.retry_after_s is not None else {}
                raise ApiError(429, "nylas_rate_limit_exceeded", "Too many requests for this grant.", headers=headers)
            if fault is not None:
                raise ApiError(fault.status, "internal_error" if fault.status == 500 else "provider_error", "Injected.")
            simulator.check_api_key(self.headers.get("Authorization"))
            if match["kind"] == "threads":
                if object_id is None:
                    body = simulator.list_threads(grant_id, query)
                else:
                    body = simulator.get_thread(grant_id, object_id, query)
            elif object_id is None:
                body = simulator.list_messages(grant_id, query)
            else:
                body = simulator.get_message(grant_id, object_id, query)
        except ApiError as exc:
            simulator.calls.record(endpoint, exc.status)
            self._send_json(exc.status, exc.body(request_id), headers={**exc.headers, "x-request-id": request_id})
            return
        simulator.calls.record(endpoint, 200)
        self._send_json(200, body, headers={"x-request-id": str(body.get("request_id", request_id))})

    def _control(self, method: str, path: str, query: dict[str, str]) -> tuple[int, Any]:
        simulator = self.server.simulator
        try:
            payload = self._read_json() if method == "POST" else {}
            if path == "/_sim/health":
                return 200, {"status": "ok", "grants": len(simulator.grants)}
            if path == "/_sim/stats":
                calls = simulator.calls.snapshot()
                rows = [{"endpoint": e, "status": s, "count": n} for (e, s), n in sorted(calls.items())]
                return 200, {"calls": rows, "total": sum(calls.values())}
            if path == "/_sim/webhooks/flush" and method == "POST":
                simulator.flush_webhooks()
                return 200, {"flushed": True}
            if path == "/_sim/faults":
                if method == "POST":
                    simulator.faults.update(payload)
                return 200, attrs.asdict(simulator.faults)
            if path == "/_sim/grants":
                grants = simulator.grants.values()
                return 200, [
                    {"grant_id": g.id, "email": g.email, "status": g.status, "threads": len(g.threads),
                     "messages": len(g.messages)}
                    for g in grants
                ]  # fmt: skip
            if match := _CONTROL_GRANT.match(path):
                grant_id, action = unquote(match["grant"]), match["action"]
                if action == "export":
                    return 200, export_grant(simulator, grant_id, with_bodies=query.get("bodies", "1") != "0")
                if method != "POST":
                    return 405, {"error": f"use POST for {action}"}
                (simulator.expire_grant if action == "expire" else simulator.restore_grant)(grant_id)
                return 200, {"grant_id": grant_id, "status": simulator.grants[grant_id].status}
            if match := _CONTROL_MESSAGE.match(path):
                grant_id = unquote(match["grant"])
                message_id = unquote(match["object"]) if match["object"] else None
                if method == "POST" and message_id is None:
                    return 201, simulator.add_message(grant_id, **_pick(payload, _ADD_FIELDS))
                if method == "POST" and message_id is not None:
                    return 200, simulator.update_message(grant_id, message_id, **_pick(payload, _UPDATE_FIELDS))
                if method == "DELETE" and message_id is not None:
                    simulator.delete_message(grant_id, message_id)
                    return 200, {"deleted": message_id}
        except KeyError as exc:
            return 404, {"error": str(exc.args[0]) if exc.args else "not found"}
        except (TypeError, ValueError) as exc:
            return 400, {"error": str(exc)}
        return 404, {"error": f"no control route for {method} {path}"}

    # -- I/O -----------------------------------------------------------------------------------------------------

    def _read_json(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        value = json.loads(raw)
        if not isinstance(value, dict):
            msg = "the request body must be a JSON object"
            raise ValueError(msg)
        return value

    def _send_json(self, status: int, body: Any, *, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        encoding = None
        if len(data) > GZIP_OVER_BYTES and "gzip" in (self.headers.get("Accept-Encoding") or ""):
            data = gzip.compress(data, compresslevel=1)
            encoding = "gzip"
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if encoding:
            self.send_header("Content-Encoding", encoding)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _reset_connection(self) -> None:
        # SO_LINGER 0 + close sends a TCP RST instead of a FIN: the client sees "connection reset by peer".
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        # rfile holds a reference to the socket; close it first so connection.close() really closes (wfile does not).
        self.rfile.close()
        self.connection.close()


_ADD_FIELDS = ("thread_id", "sender_email", "subject", "body", "unread", "date", "emit")
_UPDATE_FIELDS = ("unread", "starred", "folders", "emit")


def _pick(payload: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    unknown = sorted(set(payload) - set(names))
    if unknown:
        msg = f"unknown fields {unknown!r}; allowed: {list(names)!r}"
        raise ValueError(msg)
    return dict(payload)


@attrs.define
class SimulatorHandle:
    """A running simulator: its ``base_url`` (give it to ``NylasClient(api_uri=...)``) and its state to mutate."""

    base_url: str
    simulator: Simulator
    server: SimulatorServer
    thread: threading.Thread

    @property
    def faults(self) -> FaultConfig:
        """The live fault config; change fields to change behaviour."""
        return self.simulator.faults

    def calls_by_endpoint(self) -> dict[str, int]:
        """API calls answered so far per endpoint (``threads.list``, ``messages.list``...), whatever their status."""
        calls: dict[str, int] = {}
        for (endpoint, _status), count in self.simulator.calls.snapshot().items():
            calls[endpoint] = calls.get(endpoint, 0) + count
        return calls

    def export(self, grant_id: str, *, with_bodies: bool = True) -> dict[str, Any]:
        """Ground truth of one grant (see ``export.export_grant``)."""
        return export_grant(self.simulator, grant_id, with_bodies=with_bodies)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def start_in_thread(
    simulator: Simulator | None = None, *, host: str = "127.0.0.1", port: int = 0, **kwargs: Any
) -> SimulatorHandle:
    """Start a simulator on ``host`` (port 0: any free port) in a daemon thread; call ``handle.stop()`` after.

    ``kwargs`` go to ``Simulator(...)`` when no simulator is given (seed, grants, threads_per_grant, faults...).
    """
    sim = simulator or Simulator(**kwargs)
    server = SimulatorServer((host, port), sim)
    # A short poll interval makes stop() quick; an idle server costs almost nothing either way.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="fake-nylas", daemon=True)
    thread.start()
    return SimulatorHandle(base_url=server.base_url, simulator=sim, server=server, thread=thread)


@contextmanager
def serve_in_thread(simulator: Simulator | None = None, **kwargs: Any) -> Iterator[SimulatorHandle]:
    """Context manager around ``start_in_thread``: the simulator is stopped on exit."""
    handle = start_in_thread(simulator, **kwargs)
    try:
        yield handle
    finally:
        handle.stop()


def _grant_ids(value: str) -> list[str]:
    # "--grants 3" makes grant-1..grant-3; "--grants a,b" uses the ids given.
    if value.isdigit():
        return [f"grant-{i}" for i in range(1, int(value) + 1)]
    return [g for g in value.split(",") if g]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nova-email fake-nylas", description="Run a local Nylas v3 simulator.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8787, help="0 picks a free port (printed at start)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grants", default="1", help="a count (grant-1..grant-N) or comma-separated grant ids")
    p.add_argument("--threads", type=int, default=100, help="threads per grant")
    p.add_argument("--anchor", type=int, default=None, help="unix seconds of 'now' for generated dates")
    p.add_argument("--api-key", default=None, help="require this Bearer key (default: accept any)")
    p.add_argument("--large-body-share", type=float, default=0.01)
    faults = p.add_argument_group("faults")
    faults.add_argument("--rate-limit-per-s", type=float, default=None, help="per-grant requests/s before 429")
    faults.add_argument("--rate-limit-burst", type=int, default=1)
    faults.add_argument("--no-retry-after", action="store_true", help="send 429s without Retry-After")
    faults.add_argument("--error-rate", type=float, default=0.0, help="share of requests answered 5xx")
    faults.add_argument("--reset-rate", type=float, default=0.0, help="share of connections reset")
    faults.add_argument("--stall-rate", type=float, default=0.0, help="share of requests left unanswered")
    faults.add_argument("--stall-ms", type=float, default=2000.0, help="how long a stalled request hangs")
    faults.add_argument("--latency-ms", type=float, default=0.0)
    faults.add_argument("--latency-jitter-ms", type=float, default=0.0)
    faults.add_argument("--changing-pages-rate", type=float, default=0.0)
    faults.add_argument("--unordered-threads", action="store_true", help="Google-like thread order")
    faults.add_argument("--vanish-rate", type=float, default=0.0, help="messages deleted just before a get")
    faults.add_argument("--duplicate-webhook-rate", type=float, default=0.0)
    faults.add_argument("--out-of-order-webhook-rate", type=float, default=0.0)
    hooks = p.add_argument_group("webhooks of mutations")
    hooks.add_argument("--webhook-database-url", default=None, help="call queue_nylas_webhook_notification here")
    hooks.add_argument("--webhook-url", default=None, help="POST signed webhooks to this HTTP intake")
    hooks.add_argument("--webhook-secret", default=None, help="HMAC key for X-Nylas-Signature")
    p.add_argument("--export", type=Path, default=None, help="write <grant>.json ground truth here and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the simulator until interrupted (or write the ground truth with ``--export``); returns an exit code."""
    args = _parser().parse_args(argv)
    faults = FaultConfig(
        rate_limit_per_s=args.rate_limit_per_s,
        rate_limit_burst=args.rate_limit_burst,
        retry_after=not args.no_retry_after,
        error_rate=args.error_rate,
        reset_rate=args.reset_rate,
        stall_rate=args.stall_rate,
        stall_ms=args.stall_ms,
        latency_ms=args.latency_ms,
        latency_jitter_ms=args.latency_jitter_ms,
        changing_pages_rate=args.changing_pages_rate,
        unordered_threads=args.unordered_threads,
        vanish_rate=args.vanish_rate,
        duplicate_webhook_rate=args.duplicate_webhook_rate,
        out_of_order_webhook_rate=args.out_of_order_webhook_rate,
        seed=args.seed,
    )
    emitter: WebhookEmitter | None = None
    if args.webhook_url:
        if not args.webhook_secret:
            _parser().error("--webhook-url needs --webhook-secret (the HMAC key of X-Nylas-Signature)")
        emitter = HttpIntakeEmitter(args.webhook_url, secret=args.webhook_secret)
    elif args.webhook_database_url:
        emitter = SqlIntakeEmitter(args.webhook_database_url)
    simulator = Simulator(
        seed=args.seed,
        grants=_grant_ids(args.grants),
        threads_per_grant=args.threads,
        anchor=args.anchor,
        api_key=args.api_key,
        faults=faults,
        emitter=emitter,
        large_body_share=args.large_body_share,
    )
    if args.export is not None:
        for path in write_exports(simulator, args.export):
            print(path)
        return 0
    server = SimulatorServer((args.host, args.port), simulator)
    messages = sum(len(g.messages) for g in simulator.grants.values())
    log.info("Serving {} grants, {} messages on {}", len(simulator.grants), messages, server.base_url)
    print(f"fake-nylas listening on {server.base_url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("Stopped")
    finally:
        server.server_close()
    return 0
