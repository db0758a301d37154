"""`make demo`'s path, end to end: the real command, real workers, the simulator, a summary at the end."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from nova_email.db import with_database
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
                "--threads",
                "120",
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
            r"Demo completed in [\d.]+ s: (\d+) threads and (\d+) messages synced, (\d+) Nylas API calls .*"
            r"(\d+) webhooks processed",
            output,
        )
        assert summary is not None, output[-3000:]
        threads, messages, calls, webhooks = (int(g) for g in summary.groups())
        assert threads >= 60 and messages > threads and calls > 0 and webhooks >= 3
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
