"""Real worker processes for tests: started with a log file, always stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The service's workers, as ``dramatiq`` runs them.
DRAMATIQ_ACTORS = (sys.executable, "-m", "dramatiq", "nova_email.actors")


class Workers:
    """One workers command (a main process and its worker processes): ``dramatiq nova_email.actors`` by default."""

    def __init__(
        self, env: dict[str, str], log_path: Path, args: list[str], *, command: Sequence[str] = DRAMATIQ_ACTORS
    ) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [*command, *args],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, processes: int, timeout_s: float = 30) -> None:
        """Wait until every worker process logged that it is ready."""
        deadline = time.monotonic() + timeout_s
        while self.log().count("Worker process is ready") < processes:
            if self.process.poll() is not None or time.monotonic() > deadline:
                msg = f"workers did not start (exit {self.process.poll()}):\n{self.log()[-3000:]}"
                raise AssertionError(msg)
            time.sleep(0.1)

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM to the main process (graceful), then SIGKILL of the whole group if it does not exit in time.

        Only the main process is signalled: it forwards SIGTERM to its workers, and a worker signalled twice
        gives up its graceful shutdown.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()
        return self.process.returncode


@contextmanager
def running_workers(
    env: dict[str, str], log_path: Path, *, processes: int = 1, threads: int = 4, queues: list[str] | None = None
) -> Iterator[Workers]:
    args = ["--processes", str(processes), "--threads", str(threads)]
    if queues:
        args += ["--queues", *queues]
    workers = Workers(env, log_path, args)
    try:
        workers.wait_ready(processes)
        yield workers
    finally:
        workers.stop()


def wait_for(condition: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.2, what: str = "") -> None:
    """Poll `condition` until it holds; fail after `timeout_s` naming `what`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout_s} s waiting for {what or condition}"
            raise AssertionError(msg)
        time.sleep(interval_s)
