"""A fleet of ``dramatiq nova_email.actors`` commands under a tiny supervisor, for fault tests.

Dramatiq 2.2 stops a whole command when one of its worker processes dies (``Worker with PID ... exited
unexpectedly. Shutting down...``: the siblings get SIGTERM and finish their in-flight work). In production a
supervisor (systemd, Kubernetes) starts the command again; `Fleet.restart_exited` plays that part, so a
``kill -9`` of one worker process costs one command a restart while the other commands keep working.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import psutil
from dramatiq.cli import RET_KILLED

from tests.processes import Workers

#: The main process's exit status after one of its worker processes died of a signal (the kills here). Dramatiq's
#: "exited unexpectedly" log line is no proof of that: its log watcher thread may stop before it copies a stopping
#: main process's last line.
WORKER_KILLED = RET_KILLED


class Fleet:
    """`commands` independent dramatiq commands of `processes` x `threads` each, restarted whenever one exits."""

    def __init__(
        self, env: dict[str, str], log_dir: Path, *, commands: int = 2, processes: int = 1, threads: int = 8
    ) -> None:
        self.env = env
        self.log_dir = log_dir
        self.args = ["--processes", str(processes), "--threads", str(threads)]
        self.processes = processes
        self.commands: list[Workers] = []
        #: Where each command's current run starts in its (appended) log file.
        self._offsets: list[int] = []
        self.restarts = 0
        #: The exit status of every main process that exited, in order: `WORKER_KILLED` when it stopped because
        #: one of its worker processes was killed with SIGKILL.
        self.exit_codes: list[int] = []
        for i in range(commands):
            self._offsets.append(0)
            self.commands.append(Workers(env, self._log_path(i), self.args))

    def _log_path(self, index: int) -> Path:
        return self.log_dir / f"workers-{index}.log"

    def wait_ready(self, timeout_s: float = 60) -> None:
        """Wait until every command's worker processes are ready."""
        for workers in self.commands:
            workers.wait_ready(self.processes, timeout_s)

    def restart_exited(self) -> int:
        """Start again every command whose main process exited; the number restarted."""
        restarted = 0
        for i, workers in enumerate(self.commands):
            if workers.process.poll() is not None:
                self.exit_codes.append(workers.process.returncode)
                workers.stop()
                self._offsets[i] = self._log_path(i).stat().st_size
                self.commands[i] = Workers(self.env, self._log_path(i), self.args)
                restarted += 1
        self.restarts += restarted
        return restarted

    def _ready(self, index: int) -> bool:
        with self._log_path(index).open("rb") as log:
            log.seek(self._offsets[index])
            return log.read().count(b"Worker process is ready") >= self.processes

    def worker_pids(self) -> list[int]:
        """PIDs of the worker processes of running commands that are ready for work.

        A command still booting is left alone: Dramatiq's main process waits ``--worker-fork-timeout`` (30 s)
        for a worker that died before it was ready, which would only measure that timeout.
        """
        pids = []
        for i, workers in enumerate(self.commands):
            if workers.process.poll() is not None or not self._ready(i):
                continue
            try:
                children = psutil.Process(workers.process.pid).children()
            except psutil.NoSuchProcess:
                continue
            pids += [c.pid for c in children if c.status() != psutil.STATUS_ZOMBIE]
        return pids

    def kill_random_worker(self, rng: random.Random) -> int | None:
        """``kill -9`` one live worker process chosen at random; its PID, or None when none was running."""
        pids = self.worker_pids()
        if not pids:
            return None
        pid = rng.choice(pids)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        return pid

    def log(self) -> str:
        """Every command's log, concatenated."""
        return "".join(self._log_path(i).read_text(errors="replace") for i in range(len(self.commands)))

    def stop(self) -> None:
        """Stop every command (SIGTERM, then SIGKILL of its group after 30 s)."""
        for workers in self.commands:
            workers.stop()
