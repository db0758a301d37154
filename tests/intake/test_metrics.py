"""Metrics: counted per route, outcome and status code, and summed over worker processes as gunicorn runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest
import requests

from nova_email.config import Settings
from nova_email.intake import IntakeMetrics, serve_in_background
from tests.processes import wait_for

# Run in a fresh interpreter: multiprocess mode changes prometheus-client's process-wide state.
_TWO_WORKERS = """
import os, sys
from pathlib import Path
from nova_email.intake.metrics import IntakeMetrics, enable_multiprocess

enable_multiprocess(Path(sys.argv[1]))
metrics = IntakeMetrics()
children = []
for worker in range(2):
    pid = os.fork()
    if pid == 0:
        for _ in range(3 + worker):
            metrics.observe("/webhooks/nylas", "accepted", 200, 0.002)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
sys.stdout.write(metrics.render()[0].decode())
"""


def test_counts_from_every_worker_process_are_summed(tmp_path: Path) -> None:
    output = subprocess.run(
        [sys.executable, "-c", _TWO_WORKERS, str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout

    assert 'nova_intake_requests_total{code="200",outcome="accepted",route="/webhooks/nylas"} 7.0' in output
    assert 'nova_intake_request_duration_seconds_count{route="/webhooks/nylas"} 7.0' in output
    assert 'nova_intake_request_duration_seconds_bucket{le="0.002",route="/webhooks/nylas"} 7.0' in output


def test_in_a_single_process_the_counts_are_kept_in_memory() -> None:
    metrics = IntakeMetrics()

    metrics.observe("/healthz", "ok", 200, 0.0001)
    metrics.observe("/webhooks/nylas", "unauthorized", 401, 0.02)
    text, content_type = metrics.render()

    assert content_type.startswith("text/plain")
    assert b'nova_intake_requests_total{code="200",outcome="ok",route="/healthz"} 1.0' in text
    assert b'nova_intake_request_duration_seconds_bucket{le="0.01",route="/webhooks/nylas"} 0.0' in text
    assert b'nova_intake_request_duration_seconds_bucket{le="0.025",route="/webhooks/nylas"} 1.0' in text


@pytest.mark.processes
def test_only_the_master_listens_on_the_metrics_port(db_url: str, tmp_path: Path) -> None:
    settings = Settings(database_url=db_url, nylas_webhook_secret="s" * 32, data_dir=tmp_path, log_level="warning")
    with serve_in_background(settings, workers=2, metrics_port=0) as server:
        assert server.metrics_url is not None
        metrics_port = urlsplit(server.metrics_url).port
        master = psutil.Process(server.pid)
        # Given both workers forked and answering
        wait_for(lambda: len(master.children()) == 2, timeout_s=60, what="two workers")
        wait_for(
            lambda: requests.get(server.url + "/healthz", timeout=5).status_code == 200,
            timeout_s=60,
            what="/healthz from the workers",
        )

        def listening(process: psutil.Process) -> bool:
            return any(
                c.status == psutil.CONN_LISTEN and c.laddr.port == metrics_port for c in process.net_connections()
            )

        # Then the master holds the metrics port's socket, and no worker does once it has started (a worker that
        # has just forked still holds it until its post_fork hook ran; before this was fixed, they all kept it)
        assert listening(master)
        wait_for(
            lambda: not any(listening(child) for child in master.children()),
            timeout_s=30,
            what="the workers to let go of the metrics port",
        )
        assert len(master.children()) == 2
        assert requests.get(server.metrics_url, timeout=5).status_code == 200
