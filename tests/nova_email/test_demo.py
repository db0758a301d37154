"""`make demo`'s path, end to end: the real command, real workers, the simulator, a summary at the end."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import psycopg
import pytest

from nova_email.db import with_database
from nova_email.embedded import embedded_server_running, stop_embedded_server
from tests.conftest import ROOT, server_url


@pytest.mark.processes
def test_the_demo_backfills_the_generated_mailbox_and_stops_everything(tmp_path: Path) -> None:
    name = f"nova_demo_{secrets.token_hex(3)}"
    env = {**os.environ, "NOVA_DATA_DIR": str(tmp_path / ".nova")}
    env.pop("DATABASE_URL", None)
    try:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "nova_email.cli",
                "demo",
                "--server-url",
                server_url(),
                "--database",
                name,
                "--timeout",
                "120",
            ],  # fmt: skip
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-3000:]
        summary = re.search(
            r"Demo completed in ([\d.]+) s: (\d+) threads and (\d+) messages synced, (\d+) Nylas API calls .*"
            r"(\d+) webhooks processed",
            output,
        )
        assert summary is not None, output[-3000:]
        seconds = float(summary.group(1))
        threads, messages, calls, webhooks = (int(g) for g in summary.groups()[1:])
        # The default mailbox, in under the minute the README promises, with its progress bar drawn to the end
        assert threads >= 600 and messages > threads and calls > 0 and webhooks >= 3
        assert seconds < 60, output[-3000:]
        assert re.search(r"\[#+\] 100\.0%  threads [\d,]+/[\d,]+", output), output[-3000:]
        with psycopg.connect(with_database(server_url(), name)) as conn:
            status = conn.execute("select backfill_status from flux_inbox_configurations").fetchone()
            # Then the worker processes it started are gone: nobody else is connected to its database
            others = conn.execute(
                "select count(*) from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid()"
            ).fetchone()
        assert status == ("completed",)
        assert others == (0,)
    finally:
        with psycopg.connect(server_url(), autocommit=True) as admin:
            admin.execute(f'drop database if exists "{name}" with (force)')


@pytest.mark.processes
def test_ctrl_c_mid_demo_on_the_embedded_defaults_stops_workers_and_the_server_it_started() -> None:
    # Given the demo on the embedded defaults (no server configured) in a data folder of its own. Not under
    # pytest's tmp_path: as root the server runs as another user, which must be able to reach the folder.
    data_dir = Path(tempfile.mkdtemp(prefix="nova-demo-"))
    env = {**os.environ, "NOVA_DATA_DIR": str(data_dir)}
    env.pop("DATABASE_URL", None)
    demo = subprocess.Popen(
        [sys.executable, "-m", "nova_email.cli", "demo", "--threads", "3000", "--timeout", "120"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert demo.stdout is not None
        output = []
        # When Ctrl-C arrives while the progress bar is drawn (the workers are syncing)
        for line in demo.stdout:
            output.append(line)
            done = re.search(r"threads ([\d,]+)/", line)
            if done and int(done.group(1).replace(",", "")) > 0:
                break
        assert demo.poll() is None, "".join(output)[-3000:]
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=60)
        output.append(rest)

        # Then it stops at once with 130, its workers are gone, and so is the server it started
        assert demo.returncode == 130, "".join(output)[-3000:]
        assert "Stopped the embedded PostgreSQL the demo started" in "".join(output)
        assert not embedded_server_running(data_dir)
        assert not _processes_with_data_dir(data_dir)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        stop_embedded_server(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)


def _processes_with_data_dir(data_dir: Path) -> list[int]:
    """Pids of live processes started with NOVA_DATA_DIR=data_dir (the demo's workers inherit its environment)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("NOVA_DATA_DIR") == str(data_dir):
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found
