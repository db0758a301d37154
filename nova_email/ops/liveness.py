"""Whether a process named by a pid in a file (a heartbeat, a metrics count file) is still the one that wrote it.

Pids are reused, within seconds in a container whose pid namespace starts small: a file left by a killed process
may name a pid that now belongs to another process. The start time of the process tells them apart.
"""

from __future__ import annotations

import psutil

__all__ = ["is_running", "process_start_time"]

#: Seconds two readings of one process's start time may differ by (psutil derives it from clock ticks).
_START_TIME_TOLERANCE_S = 0.01


def process_start_time(pid: int | None = None) -> float:
    """When process `pid` (default: this one) started, in seconds since the epoch.

    Raises:
        psutil.NoSuchProcess: no process `pid` runs.
    """
    return float(psutil.Process(pid).create_time())


def is_running(pid: int, started_at: float | None = None) -> bool:
    """Whether `pid` runs, and, when `started_at` is given, is the process that started then (not a reuse of its pid).

    A process of another user whose start time cannot be read counts as running.
    """
    try:
        actual = process_start_time(pid)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    return started_at is None or abs(actual - started_at) <= _START_TIME_TOLERANCE_S
