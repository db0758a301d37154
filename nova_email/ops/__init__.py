"""Day-two operations: ``nova-email status``, ``backfill``, ``dead-letters``, ``healthcheck`` and the workers'
Prometheus metrics.

Each command is a pair the CLI registers: ``add_<name>_arguments(parser)`` and
``run_<name>(settings, args) -> exit status``. ``add_metrics(broker, settings)`` adds the metrics
middleware to a worker's broker.
"""

from __future__ import annotations

from .backfill import add_backfill_arguments, run_backfill
from .dead_letters import add_dead_letters_arguments, run_dead_letters
from .health import add_healthcheck_arguments, run_healthcheck
from .metrics import add_metrics
from .status import add_status_arguments, run_status

__all__ = [
    "add_backfill_arguments",
    "add_dead_letters_arguments",
    "add_healthcheck_arguments",
    "add_metrics",
    "add_status_arguments",
    "run_backfill",
    "run_dead_letters",
    "run_healthcheck",
    "run_status",
]
