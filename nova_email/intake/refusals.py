"""Refused requests are logged as at most one warning a minute per worker process, so a flood cannot flood the log.

Both kinds go through the same `RefusalLog`: the requests the app refuses (bad signature, body too large) and the
ones gunicorn's HTTP parser refuses as malformed (`nova_email.intake.server.DeadlineWorker`). A reason names what was
wrong, never text the client sent.
"""

from __future__ import annotations

import threading
import time

from loguru import logger

__all__ = ["REFUSAL_LOG_INTERVAL_S", "RefusalLog"]

log = logger.bind(component="Intake")

#: Refused requests are logged as at most one warning per this many seconds.
REFUSAL_LOG_INTERVAL_S = 60.0


class RefusalLog:
    """Logs refused requests as one warning per `REFUSAL_LOG_INTERVAL_S` at most, saying how many there were.

    The limit holds per instance; the server makes one per worker process (each has its own), so a server of N
    workers logs at most N such warnings per interval: still bounded whatever the request rate, without workers
    sharing state.
    """

    def __init__(self, interval_s: float = REFUSAL_LOG_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._last_warning = -interval_s
        self._unlogged = 0

    def refused(self, remote: str | None, reason: str) -> None:
        """Count a refused request from `remote` (an address); `reason` must not quote what the client sent."""
        now = time.monotonic()
        with self._lock:
            self._unlogged += 1
            if now - self._last_warning < self._interval_s:
                due, count = False, 0
            else:
                due, count, self._last_warning, self._unlogged = True, self._unlogged, now, 0
        if due:
            log.bind(event="refused").warning(
                "Refused {} request(s) since the last such warning; latest from {}: {}", count, remote, reason
            )
        else:
            log.debug("Refused a request from {}: {}", remote, reason)
