"""One daemon thread of the broker per process (the lease keeper, the listener), started and stopped the same way."""

from __future__ import annotations

import abc
import threading


class BackgroundThread(abc.ABC):
    """A restartable daemon thread running :meth:`_run` until :meth:`stop`; subclasses poll ``self._stop``."""

    #: The thread's name, shown in tracebacks and ``py-spy dump``.
    thread_name = "pgmq-background"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (idempotent; a thread that ended is started again)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end and wait for it (up to 5 s; never from the thread itself)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    @abc.abstractmethod
    def _run(self) -> None:
        """The thread's body; return when ``self._stop`` is set."""
