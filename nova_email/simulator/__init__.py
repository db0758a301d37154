"""A local Nylas v3 simulator: generated mailboxes over HTTP, fault injection, mutations with webhooks, ground truth.

Use ``serve_in_thread()`` in tests (``with serve_in_thread(seed=1, threads_per_grant=20) as sim: ...``), or run
``nova-email fake-nylas`` (``server.main``) as a process.
"""

from __future__ import annotations

from nova_email.simulator.export import export_grant, write_exports
from nova_email.simulator.faults import FaultConfig
from nova_email.simulator.server import SimulatorHandle, main, serve_in_thread, start_in_thread
from nova_email.simulator.state import ApiError, Simulator
from nova_email.simulator.webhooks import (
    HttpIntakeEmitter,
    Notification,
    RecordingEmitter,
    SqlIntakeEmitter,
    WebhookDeliveryError,
    WebhookEmitter,
    sign,
)

__all__ = [
    # Running it
    "Simulator",
    "SimulatorHandle",
    "main",
    "serve_in_thread",
    "start_in_thread",
    # Faults
    "ApiError",
    "FaultConfig",
    # Webhooks
    "HttpIntakeEmitter",
    "Notification",
    "RecordingEmitter",
    "SqlIntakeEmitter",
    "WebhookDeliveryError",
    "WebhookEmitter",
    "sign",
    # Ground truth
    "export_grant",
    "write_exports",
]
