"""Dramatiq's middleware signals, sent only to the middleware that define the hook.

Dramatiq's ``emit_before``/``emit_after`` call every middleware's hook by name, most of them the base class's
no-op: per message of a fan-out that was a fifth of the enqueue time. :class:`MiddlewareHooks` keeps, per signal,
the hooks that do something, and behaves otherwise as Dramatiq does (a ``MiddlewareError`` from a before-hook is
raised, anything else is logged at critical with its traceback).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware, MiddlewareError

__all__ = ["MiddlewareHooks"]


class MiddlewareHooks:
    """The hooks of a broker's middleware that override Dramatiq's no-op, per signal, in middleware order.

    Kept per middleware list, so a middleware added or removed later takes part from the next signal on.
    """

    def __init__(self) -> None:
        self._cache: tuple[tuple[Middleware, ...], dict[str, list[Any]]] = ((), {})

    def emit_before(self, broker: dramatiq.Broker, signal: str, *args: Any, **kwargs: Any) -> None:
        """Call the ``before_<signal>`` hooks in middleware order."""
        name = "before_" + signal
        for hook in self.bound(broker.middleware, name):
            try:
                hook(broker, *args, **kwargs)
            except MiddlewareError:
                raise
            except Exception:
                _critical(broker, name, hook)

    def emit_after(self, broker: dramatiq.Broker, signal: str, *args: Any, **kwargs: Any) -> None:
        """Call the ``after_<signal>`` hooks in reverse middleware order."""
        name = "after_" + signal
        for hook in reversed(self.bound(broker.middleware, name)):
            try:
                hook(broker, *args, **kwargs)
            except Exception:
                _critical(broker, name, hook)

    def bound(self, middleware: Sequence[Middleware], name: str) -> list[Any]:
        """The bound `name` hooks of `middleware` that are not Dramatiq's no-op."""
        current = tuple(middleware)
        known, hooks = self._cache
        if known != current:
            hooks = {}
            self._cache = (current, hooks)
        found = hooks.get(name)
        if found is None:
            base = getattr(Middleware, name, None)
            found = hooks[name] = [
                hook
                for hook in (getattr(m, name, None) for m in current)
                if hook is not None and getattr(hook, "__func__", None) is not base
            ]
        return found


def _critical(broker: dramatiq.Broker, name: str, hook: Any) -> None:
    broker.logger.critical("Unexpected failure in %s of %r.", name, getattr(hook, "__self__", hook), exc_info=True)
