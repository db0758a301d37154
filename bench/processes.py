"""The benchmarks' worker commands: their processes, and stopping them (SIGTERM, then SIGKILL for one that stays)."""

from __future__ import annotations

import os
import signal
import subprocess

import psutil


def stop(*processes: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Send SIGTERM to every process, then wait for each, killing one that has not exited within `timeout_s`."""
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def stop_groups(*processes: subprocess.Popen[bytes], timeout_s: float) -> None:
    """The same for commands started in sessions of their own (``start_new_session=True``): their whole groups."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def worker_processes(command: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The processes a running command started (none once it is gone)."""
    try:
        return psutil.Process(command.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
