"""Serving the intake: gunicorn with gevent workers, and a helper that runs it in a child process for tests.

Why gevent workers with read deadlines: the receiver faces the internet, where a client may send its request one
byte a second. Each connection is a greenlet, so a slow one holds no thread and costs the others nothing, and
`DeadlineWorker` closes a connection whose headers, or whose body, take longer than `REQUEST_READ_TIMEOUT_S`.
The app sees a body only once it has fully arrived. The work per request is a few microseconds of Python (HMAC,
JSON) around one Postgres round trip; one process per core gets past the GIL. Each worker process has its own
connection pool (`nova_email.db.get_pool`, created after the fork). psycopg and its pool wait cooperatively only
if gevent patched the standard library before they were imported: run `main` from `nova_email.serve_webhooks`,
the process entry that patches first (``nova-email serve-webhooks`` does).

`serve_in_background` starts the same server in a child
process on an ephemeral port and yields its URL: gunicorn's master needs the main thread for its signals, and a
child process is also exactly what production runs.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import attrs
import gevent
import gevent.monkey
from gunicorn import glogging, util
from gunicorn.app.base import BaseApplication
from gunicorn.http.body import Body
from gunicorn.http.errors import (
    ExpectationFailed,
    ForbiddenProxyRequest,
    InvalidResponseHeader,
    InvalidResponseHeaderName,
    LimitRequestHeaders,
    LimitRequestLine,
    ParseException,
    UnsupportedTransferCoding,
)
from gunicorn.workers.ggevent import GeventWorker
from loguru import logger
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client import multiprocess as prometheus_multiprocess

from .. import db
from ..config import Settings
from ..errors import ConfigError, NovaError
from ..log import InterceptHandler
from .app import DEFAULT_MAX_BODY_BYTES, DEFAULT_POOL_TIMEOUT_S, WEBHOOK_PATH, create_app
from .metrics import enable_multiprocess, forget_process
from .refusals import RefusalLog

__all__ = [
    "ALL_INTERFACES",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_THREADS",
    "DEFAULT_WORKERS",
    "REQUEST_READ_TIMEOUT_S",
    "DeadlineWorker",
    "RunningIntake",
    "add_arguments",
    "main",
    "run_from_arguments",
    "serve_in_background",
]

log = logger.bind(component="Intake")

#: Loopback by default; a container passes ``--host 0.0.0.0`` to be reachable.
DEFAULT_HOST = "127.0.0.1"
#: Where the receiver listens when PORT is set and ``--host`` is not given, as gunicorn does.
ALL_INTERFACES = "0.0.0.0"
#: Port of ``nova-email serve-webhooks`` when none is given.
DEFAULT_PORT = 8000
#: Worker processes: one per core on the 2-core machines we run on.
DEFAULT_WORKERS = 2
#: Database connections per worker process: at most this many requests wait on Postgres at once, the others wait
#: for a connection (up to the pool timeout). The name is gunicorn's (``--threads``), kept for the command line.
DEFAULT_THREADS = 8
#: Seconds a client gets to send a request's headers, and again its body; a slower one is closed.
REQUEST_READ_TIMEOUT_S = 5
#: Seconds `serve_in_background` waits for the server to listen.
DEFAULT_STARTUP_TIMEOUT_S = 30.0

_GUNICORN_LEVELS = {"trace": "debug", "success": "info"}


def _name_gunicorn(record: logging.LogRecord) -> bool:
    # InterceptHandler takes the component from the logger name; "gunicorn.error" also carries info lines.
    record.name = "Gunicorn"
    return True


class _GunicornLogger(glogging.Logger):  # type: ignore[misc]
    """gunicorn's own lines (start, workers, errors) go through loguru like every other line."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for handler in list(self.error_log.handlers):
            self.error_log.removeHandler(handler)
        handler = InterceptHandler()
        handler.addFilter(_name_gunicorn)
        self.error_log.addHandler(handler)


#: gunicorn's parse errors about the app's answer, not the client's request: left to gunicorn, which answers 500.
_SERVER_SIDE_PARSE_ERRORS = (InvalidResponseHeader, InvalidResponseHeaderName)

#: The answer to a request gunicorn's parser refuses, by the error's kind, as gunicorn gives it; others get 400. A
#: path outside a SCRIPT_NAME (a header any local proxy may pass) is the client's request too: 400, not gunicorn's 500.
_MALFORMED_ANSWERS: tuple[tuple[type[ParseException], int, str], ...] = (
    (LimitRequestLine, 414, "URI Too Long"),
    (LimitRequestHeaders, 431, "Request Header Fields Too Large"),
    (UnsupportedTransferCoding, 501, "Not Implemented"),
    (ExpectationFailed, 417, "Expectation Failed"),
    (ForbiddenProxyRequest, 403, "Forbidden"),
)


def _refused_as_malformed(exc: BaseException) -> bool:
    """Whether gunicorn's HTTP parser raised `exc` for a request it cannot read: the client's fault."""
    return isinstance(exc, ParseException) and not isinstance(exc, _SERVER_SIDE_PARSE_ERRORS)


def _malformed_answer(exc: BaseException) -> tuple[int, str]:
    """The status and reason a request refused by gunicorn's parser with `exc` gets."""
    for kind, status, reason in _MALFORMED_ANSWERS:
        if isinstance(exc, kind):
            return status, reason
    return 400, "Bad Request"


_REQUEST_TIMEOUT_ANSWER = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


#: The interim answer to a request sent with ``Expect: 100-continue``.
CONTINUE_ANSWER = b"HTTP/1.1 100 Continue\r\n\r\n"


def expects_100_continue(version: tuple[int, int], headers: Sequence[tuple[str, str]]) -> bool:
    """Whether a request (its HTTP version, its header fields as gunicorn lists them) waits for 100 Continue before
    sending its body; HTTP/1.0 clients' expectation is ignored (RFC 9110 10.1.1)."""
    return version >= (1, 1) and any(
        name.upper() == "EXPECT" and value.strip().lower() == "100-continue" for name, value in headers
    )


class DeadlineWorker(GeventWorker):  # type: ignore[misc]
    """gunicorn's gevent worker with a deadline on reading each request.

    The headers must arrive within ``keepalive`` seconds (gunicorn's gevent worker already bounds the wait for the
    next request by it; the server sets it to `REQUEST_READ_TIMEOUT_S`), and the body, up to the app's limit, within
    another `REQUEST_READ_TIMEOUT_S`: it is read here, before the app runs, and a client that is too slow gets 408 and
    is disconnected. A body over the limit is not read past it, and its connection is closed after the answer.

    A request gunicorn's parser refuses (a bad request line, a bad header name...) gets 400 (or the status gunicorn
    gives its kind: 414, 431, 417...) and goes to the app's
    `RefusalLog`, rate-limited with the app's own refusals and named by its kind only; gunicorn would log one
    warning per request quoting the client's text.
    """

    def patch(self) -> None:
        # nova_email.serve_webhooks patched the master (all but os, signal and subprocess) before importing psycopg;
        # gunicorn patches everything here, and gevent's warning that patching twice patches the union is noise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gevent.monkey.MonkeyPatchWarning)
            super().patch()

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        limit: int = self.app.max_body_bytes
        if expects_100_continue(req.version, req.headers):
            # The client sends the body only after this; gunicorn would send it after the app got the body, too
            # late. gunicorn sends its own later, a second interim answer that HTTP/1.1 clients must accept.
            util.write(sock, CONTINUE_ANSWER)
        try:
            with gevent.Timeout(REQUEST_READ_TIMEOUT_S):
                body: bytes = req.body.read(limit + 1)
        except gevent.Timeout:
            log.bind(event="slow_client").debug("Closed a connection whose body took over {} s", REQUEST_READ_TIMEOUT_S)
            util.write(sock, _REQUEST_TIMEOUT_ANSWER)
            raise StopIteration from None  # gunicorn's signal to close the connection
        if len(body) > limit:
            req.must_close = True  # the rest of the body is still on the socket
        req.body = Body(io.BytesIO(body))
        return super().handle_request(listener_name, req, sock, addr)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        if not _refused_as_malformed(exc):
            super().handle_error(req, client, addr, exc)
            return
        refusals: RefusalLog = self.app.refusals
        refusals.refused(addr[0] if addr else None, f"a malformed request ({type(exc).__name__})")
        try:
            util.write_error(client, *_malformed_answer(exc), "")
        except OSError:
            log.debug("Could not answer a malformed request: the client is gone")


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _write_ready_file(path: Path, host: str, port: int, metrics_port: int | None) -> None:
    # Written whole then renamed, so a reader never sees half a line.
    partial = path.with_suffix(".partial")
    partial.write_text(f"{host} {port} {'-' if metrics_port is None else metrics_port}\n")
    partial.replace(path)


def _serve_metrics(host: str, port: int, directory: Path) -> WSGIServer:
    """Serve every worker's metrics (summed from `directory`) on their own port, from a thread of this process."""
    registry = CollectorRegistry()
    prometheus_multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


#: gunicorn settings the environment cannot change, by name, with their option: the deadline worker and its header
#: deadline (gunicorn's keepalive; 0 would disable it).
PINNED_SETTINGS = {"worker_class": "--worker-class", "keepalive": "--keep-alive"}


class _IntakeApplication(BaseApplication):  # type: ignore[misc]
    """gunicorn's settings in gunicorn's order: ours, then GUNICORN_CMD_ARGS, then the options given explicitly."""

    def __init__(
        self,
        settings: Settings,
        defaults: Mapping[str, Any],
        explicit: Mapping[str, Any],
        *,
        threads: int,
        max_body_bytes: int,
        pool_timeout_s: float,
    ) -> None:
        self._settings = settings
        self._defaults = dict(defaults)
        self._explicit = dict(explicit)
        self._threads = threads
        #: Read by `DeadlineWorker`, which buffers each body up to this many bytes (and one more) for the app.
        self.max_body_bytes = max_body_bytes
        #: The log of refused requests that the app and `DeadlineWorker` share; each worker process has its own copy.
        self.refusals = RefusalLog()
        self._pool_timeout_s = pool_timeout_s
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._defaults.items():
            self.cfg.set(key, value)
        from_environment = self.cfg.parser().parse_args(list(self._settings.gunicorn_cmd_args))
        for key, value in vars(from_environment).items():
            if value is not None and key in PINNED_SETTINGS:
                msg = (
                    f"GUNICORN_CMD_ARGS may not set {PINNED_SETTINGS[key]}: the receiver's read deadline depends on it"
                )
                raise ConfigError(msg)
            if value is not None and key != "args":
                self.cfg.set(key.lower(), value)
        for key, value in self._explicit.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        # Runs in each worker after the fork, so each worker gets its own pool and its own sockets.
        pool = db.get_pool(self._settings, max_size=self._threads)
        return create_app(
            pool=pool,
            secret=self._settings.nylas_webhook_secret,
            max_body_bytes=self.max_body_bytes,
            pool_timeout_s=self._pool_timeout_s,
            refusals=self.refusals,
        )


def main(
    settings: Settings,
    host: str | None = None,
    port: int | None = None,
    *,
    workers: int | None = None,
    threads: int = DEFAULT_THREADS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
    metrics_port: int | None = None,
    metrics_host: str = DEFAULT_HOST,
    ready_file: Path | None = None,
) -> int:
    """Serve the intake until SIGTERM/SIGINT; returns the exit status. Blocks; call from the main thread.

    gunicorn's conventions hold: `host`, `port` and `workers` given here win over ``GUNICORN_CMD_ARGS``, which wins
    over the defaults: port ``$PORT`` on every interface (`ALL_INTERFACES`, as gunicorn binds it: the platform that
    set it must reach it), else `DEFAULT_PORT` on `DEFAULT_HOST`; workers ``$WEB_CONCURRENCY`` or `DEFAULT_WORKERS`.
    Those variables come from `settings` (the environment over ``.env``).

    Parameters:
        port: 0 picks a free port; the chosen one is logged and written to `ready_file`.
        metrics_port: serve Prometheus metrics there (on `metrics_host`), never on the public port; None: not at all.
        ready_file: if given, ``"<host> <port> <metrics port or ->"`` is written there once the server listens.
    """
    if (workers is not None and workers < 1) or threads < 1:
        msg = f"workers={workers!r} and threads={threads!r} must both be at least 1, e.g. workers=2 threads=8"
        raise ConfigError(msg)
    if not settings.nylas_webhook_secret:
        log.bind(event="secret_missing").warning(
            "NYLAS_WEBHOOK_SECRET is not set: answering Nylas's challenge only, every delivery gets 503 until it is"
        )
    default_host = host or (DEFAULT_HOST if settings.port is None else ALL_INTERFACES)
    default_bind = _bind_address(default_host, (settings.port or DEFAULT_PORT) if port is None else port)
    default_workers = settings.web_concurrency or DEFAULT_WORKERS
    # Resolve the database once in the parent: starting the embedded server from several workers would race.
    settings = attrs.evolve(settings, database_url=db.database_url(settings))
    own_metrics_dir = settings.prometheus_multiproc_dir is None
    metrics_dir = settings.prometheus_multiproc_dir or Path(tempfile.mkdtemp(prefix="nova-intake-metrics-"))
    enable_multiprocess(metrics_dir)

    #: The metrics server, once the master started it (in when_ready).
    metrics_servers: list[WSGIServer] = []

    def post_fork(server: Any, worker: Any) -> None:
        # A worker inherits the master's metrics socket with the fork; only the master serves it.
        for metrics_server in metrics_servers:
            metrics_server.server_close()

    def when_ready(server: Any) -> None:
        bound_host, bound_port = server.LISTENERS[0].sock.getsockname()[:2]
        log.bind(event="listening").info(
            "Listening on http://{}{} with {} workers x {} database connections",
            _bind_address(bound_host, bound_port),
            WEBHOOK_PATH,
            server.cfg.workers,
            threads,
        )
        bound_metrics_port = None
        if metrics_port is not None:
            metrics_servers.append(_serve_metrics(metrics_host, metrics_port, metrics_dir))
            bound_metrics_port = metrics_servers[0].server_port
            log.info("Serving metrics on http://{}/metrics", _bind_address(metrics_host, bound_metrics_port))
        if ready_file is not None:
            _write_ready_file(ready_file, bound_host, bound_port, bound_metrics_port)

    defaults: dict[str, Any] = {
        "bind": [default_bind],
        "workers": default_workers,
        "worker_class": DeadlineWorker,
        # Nylas waits 10 s for an answer; a worker stuck longer than this is restarted.
        "timeout": 30,
        "graceful_timeout": 10,
        # Under gevent this also bounds the wait for a request's headers (see DeadlineWorker).
        "keepalive": REQUEST_READ_TIMEOUT_S,
        "proc_name": "nova-email-intake",
        "control_socket_disable": True,
        "logger_class": _GunicornLogger,
        "loglevel": _GUNICORN_LEVELS.get(settings.log_level, settings.log_level),
        "errorlog": "-",
        "accesslog": None,
        "when_ready": when_ready,
        "post_fork": post_fork,
        "child_exit": lambda server, worker: forget_process(worker.pid),
        "worker_exit": lambda server, worker: db.close_pool(),
    }
    explicit: dict[str, Any] = {"workers": workers} if workers is not None else {}
    if host is not None or port is not None:
        explicit["bind"] = [default_bind]
    application = _IntakeApplication(
        settings, defaults, explicit, threads=threads, max_body_bytes=max_body_bytes, pool_timeout_s=pool_timeout_s
    )
    try:
        application.run()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        if own_metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's options (``nova-email serve-webhooks``, run by `nova_email.serve_webhooks`)."""
    parser.add_argument(
        "--host",
        default=None,
        help=f"address to listen on (default {DEFAULT_HOST}, or {ALL_INTERFACES} when $PORT is set, as gunicorn does; "
        "a container passes 0.0.0.0); overrides --bind in GUNICORN_CMD_ARGS",
    )
    parser.add_argument(
        "--port", type=int, default=None, help=f"port to listen on (default $PORT, else {DEFAULT_PORT}; 0 picks one)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"worker processes (default $WEB_CONCURRENCY, else {DEFAULT_WORKERS}: one per core)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help=f"database connections per worker process (default {DEFAULT_THREADS})",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest delivery accepted, after gzip inflation too (default {DEFAULT_MAX_BODY_BYTES}); larger: 413",
    )
    parser.add_argument(
        "--pool-timeout-s",
        type=float,
        default=DEFAULT_POOL_TIMEOUT_S,
        help=f"seconds a request waits for a database connection before answering 503 (default "
        f"{DEFAULT_POOL_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on this port (never on the public one); default: not served",
    )
    parser.add_argument(
        "--metrics-host", default=DEFAULT_HOST, help=f"address of the metrics port (default {DEFAULT_HOST})"
    )
    parser.add_argument(
        "--ready-file", type=Path, default=None, help='write "<host> <port> <metrics port or ->" here once listening'
    )
    parser.epilog = (
        "Other gunicorn settings come from GUNICORN_CMD_ARGS (the environment or .env), as with gunicorn itself "
        '(e.g. GUNICORN_CMD_ARGS="--backlog 4096"); options given here win over it. --keep-alive and --worker-class '
        "are refused there: the read deadline depends on them."
    )


def run_from_arguments(settings: Settings, args: argparse.Namespace, ready_file: Path | None = None) -> int:
    """`main` with the options that `add_arguments` parsed."""
    return main(
        settings,
        args.host,
        args.port,
        workers=args.workers,
        threads=args.threads,
        max_body_bytes=args.max_body_bytes,
        pool_timeout_s=args.pool_timeout_s,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        ready_file=ready_file,
    )


@attrs.frozen(kw_only=True)
class RunningIntake:
    """A server started by `serve_in_background`."""

    url: str
    pid: int
    #: Where the metrics are served, when `serve_in_background` was given a metrics port.
    metrics_url: str | None = None

    @property
    def webhook_url(self) -> str:
        """Where to POST deliveries and GET challenges."""
        return self.url + WEBHOOK_PATH


def _child_environment(settings: Settings) -> dict[str, str]:
    environment = dict(os.environ)
    environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
    environment.update(
        {
            "DATABASE_URL": db.database_url(settings),
            # Set even when empty, so a secret in this process's environment cannot leak into the child.
            "NYLAS_WEBHOOK_SECRET": settings.nylas_webhook_secret,
            "LOG_LEVEL": settings.log_level,
            "LOG_FORMAT": settings.log_format,
            "NOVA_DATA_DIR": str(settings.data_dir.resolve()),
        }
    )
    return environment


@contextmanager
def serve_in_background(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    workers: int = 1,
    threads: int = DEFAULT_THREADS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
    metrics_port: int | None = None,
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
) -> Iterator[RunningIntake]:
    """Run the real server (gunicorn) in a child process until the block ends; use it in tests and benchmarks.

    Yields once the server listens (port 0 picks a free one). On exit the server gets SIGINT, then SIGKILL if
    it has not stopped within 15 s.
    """
    with tempfile.TemporaryDirectory(prefix="nova-intake-") as scratch:
        ready_file = Path(scratch) / "ready"
        command = [
            sys.executable, "-m", "nova_email.serve_webhooks",
            "--host", host, "--port", str(port), "--workers", str(workers), "--threads", str(threads),
            "--max-body-bytes", str(max_body_bytes), "--pool-timeout-s", str(pool_timeout_s),
            "--ready-file", str(ready_file),
            *([] if metrics_port is None else ["--metrics-port", str(metrics_port)]),
        ]  # fmt: skip
        process = subprocess.Popen(command, env=_child_environment(settings), cwd=scratch)
        try:
            deadline = time.monotonic() + startup_timeout_s
            while not ready_file.exists():
                if process.poll() is not None:
                    msg = f"The intake server exited with status {process.returncode} before listening; see its log"
                    raise NovaError(msg)
                if time.monotonic() > deadline:
                    msg = f"The intake server did not listen within {startup_timeout_s} s; see its log"
                    raise NovaError(msg)
                time.sleep(0.02)  # polling the ready file against the deadline above
            bound_host, bound_port, bound_metrics_port = ready_file.read_text().split()
            metrics_url = (
                None
                if bound_metrics_port == "-"
                else f"http://{_bind_address(DEFAULT_HOST, int(bound_metrics_port))}/metrics"
            )
            yield RunningIntake(
                url=f"http://{_bind_address(bound_host, int(bound_port))}", pid=process.pid, metrics_url=metrics_url
            )
        finally:
            # SIGINT is gunicorn's quick shutdown: the block is over, so no request of ours is in flight, and the
            # graceful SIGTERM would hold kept-alive connections open for another 2 s.
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
