"""Serving the intake: gunicorn with threaded workers, and a helper that runs it in a child process for tests.

Why gunicorn's ``gthread`` workers: the work per request is a few microseconds of Python (HMAC, JSON) around one
Postgres round trip, so threads overlap the round trips, and one process per core gets past the GIL. Each
worker process has its own connection pool (`nova_email.db.get_pool`, created after the fork).

`main` is what ``nova-email serve-webhooks`` runs. `serve_in_background` starts the same server in a child
process on an ephemeral port and yields its URL: gunicorn's master needs the main thread for its signals, and a
child process is also exactly what production runs.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
from gunicorn import glogging
from gunicorn.app.base import BaseApplication
from loguru import logger

from .. import db
from ..config import Settings
from ..errors import ConfigError, NovaError
from ..log import InterceptHandler
from .app import DEFAULT_MAX_BODY_BYTES, DEFAULT_POOL_TIMEOUT_S, WEBHOOK_PATH, create_app
from .metrics import enable_multiprocess, forget_process

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_THREADS",
    "DEFAULT_WORKERS",
    "RunningIntake",
    "main",
    "serve_in_background",
]

log = logger.bind(component="Intake")

#: Loopback by default; a container passes ``--host 0.0.0.0`` to be reachable.
DEFAULT_HOST = "127.0.0.1"
#: Port of ``nova-email serve-webhooks`` when none is given.
DEFAULT_PORT = 8000
#: Worker processes: one per core on the 2-core machines we run on.
DEFAULT_WORKERS = 2
#: Threads per worker, each able to hold one pooled connection while its request waits on Postgres.
DEFAULT_THREADS = 8
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


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _write_ready_file(path: Path, host: str, port: int) -> None:
    # Written whole then renamed, so a reader never sees half a line.
    partial = path.with_suffix(".partial")
    partial.write_text(f"{host} {port}\n")
    partial.replace(path)


class _IntakeApplication(BaseApplication):  # type: ignore[misc]
    def __init__(
        self,
        settings: Settings,
        options: Mapping[str, Any],
        *,
        threads: int,
        max_body_bytes: int,
        pool_timeout_s: float,
    ) -> None:
        self._settings = settings
        self._options = dict(options)
        self._threads = threads
        self._max_body_bytes = max_body_bytes
        self._pool_timeout_s = pool_timeout_s
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        # Runs in each worker after the fork, so each worker gets its own pool and its own sockets.
        pool = db.get_pool(self._settings, max_size=self._threads)
        return create_app(
            pool=pool,
            secret=self._settings.nylas_webhook_secret,
            max_body_bytes=self._max_body_bytes,
            pool_timeout_s=self._pool_timeout_s,
        )


def main(
    settings: Settings,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    workers: int = DEFAULT_WORKERS,
    threads: int = DEFAULT_THREADS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
    ready_file: Path | None = None,
) -> int:
    """Serve the intake until SIGTERM/SIGINT; returns the exit status. Blocks; call from the main thread.

    Parameters:
        port: 0 picks a free port; the chosen one is logged and written to `ready_file`.
        ready_file: if given, ``"<host> <port>"`` is written there once the server listens.
    """
    if workers < 1 or threads < 1:
        msg = f"workers={workers!r} and threads={threads!r} must both be at least 1, e.g. workers=2 threads=8"
        raise ConfigError(msg)
    if not settings.nylas_webhook_secret:
        log.bind(event="secret_missing").warning(
            "NYLAS_WEBHOOK_SECRET is not set: answering Nylas's challenge only, every delivery gets 503 until it is"
        )
    # Resolve the database once in the parent: starting the embedded server from several workers would race.
    settings = attrs.evolve(settings, database_url=db.database_url(settings))
    own_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    metrics_dir = (
        Path(tempfile.mkdtemp(prefix="nova-intake-metrics-"))
        if own_metrics_dir
        else Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    )
    enable_multiprocess(metrics_dir)

    def when_ready(server: Any) -> None:
        bound_host, bound_port = server.LISTENERS[0].sock.getsockname()[:2]
        log.bind(event="listening").info(
            "Listening on http://{}{} with {} workers x {} threads",
            _bind_address(bound_host, bound_port),
            WEBHOOK_PATH,
            workers,
            threads,
        )
        if ready_file is not None:
            _write_ready_file(ready_file, bound_host, bound_port)

    options: dict[str, Any] = {
        "bind": [_bind_address(host, port)],
        "workers": workers,
        "worker_class": "gthread",
        "threads": threads,
        # Nylas waits 10 s for an answer; a worker stuck longer than this is restarted.
        "timeout": 30,
        "graceful_timeout": 10,
        "keepalive": 5,
        "proc_name": "nova-email-intake",
        "control_socket_disable": True,
        "logger_class": _GunicornLogger,
        "loglevel": _GUNICORN_LEVELS.get(settings.log_level, settings.log_level),
        "errorlog": "-",
        "accesslog": None,
        "when_ready": when_ready,
        "child_exit": lambda server, worker: forget_process(worker.pid),
        "worker_exit": lambda server, worker: db.close_pool(),
    }
    application = _IntakeApplication(
        settings, options, threads=threads, max_body_bytes=max_body_bytes, pool_timeout_s=pool_timeout_s
    )
    try:
        application.run()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        if own_metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


@attrs.frozen(kw_only=True)
class RunningIntake:
    """A server started by `serve_in_background`."""

    url: str
    pid: int

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
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
) -> Iterator[RunningIntake]:
    """Run the real server (gunicorn) in a child process until the block ends; use it in tests and benchmarks.

    Yields once the server listens (port 0 picks a free one). On exit the server gets SIGINT, then SIGKILL if
    it has not stopped within 15 s.
    """
    with tempfile.TemporaryDirectory(prefix="nova-intake-") as scratch:
        ready_file = Path(scratch) / "ready"
        command = [
            sys.executable, "-m", "nova_email.intake",
            "--host", host, "--port", str(port), "--workers", str(workers), "--threads", str(threads),
            "--max-body-bytes", str(max_body_bytes), "--pool-timeout-s", str(pool_timeout_s),
            "--ready-file", str(ready_file),
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
            bound_host, bound_port = ready_file.read_text().split()
            yield RunningIntake(url=f"http://{_bind_address(bound_host, int(bound_port))}", pid=process.pid)
        finally:
            # SIGINT is gunicorn's quick shutdown: the block is over, so no request of ours is in flight, and the
            # graceful SIGTERM would hold kept-alive connections open for another 2 s.
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
