"""``nova-email healthcheck`` and ``nova-email migrate --check``: one line and an exit status a probe or a deploy
script can act on, against real databases (empty, migrated, unreachable, with a queue gone) and real workers."""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil
import psycopg
import pytest
from dramatiq.brokers.stub import StubBroker
from loguru import logger
from psycopg import sql

from nova_email.migrate import migrate
from nova_email.ops.health import WorkerHeartbeat, container_runs_workers, worker_heartbeats
from tests.processes import ROOT, running_workers, wait_for


def _nova_email(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the console script as an operator or a probe would, with `env` over a clean environment."""
    return subprocess.run(
        [sys.executable, "-m", "nova_email.cli", *args],
        env={"PATH": os.environ["PATH"], **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_migrate_check_fails_while_migrations_are_pending_and_passes_once_applied(empty_db_url: str) -> None:
    env = {"DATABASE_URL": empty_db_url}

    pending = _nova_email("migrate", "--check", env=env)
    assert pending.returncode == 1
    assert "migration(s) pending: pgmq, brokers/000_schema" in _one_line(pending)
    # --check applied nothing
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("select to_regclass('pgmq_broker.schema_migrations')").fetchone() == (None,)
    assert _nova_email("healthcheck", env=env).returncode == 1

    assert _nova_email("migrate", env=env).returncode == 0

    current = _nova_email("migrate", "--check", env=env)
    assert (current.returncode, _one_line(current)) == (0, "Database schema is current")


def test_healthcheck_reports_healthy_on_a_migrated_database_in_one_line(db_url: str) -> None:
    result = _nova_email("healthcheck", env={"DATABASE_URL": db_url})

    assert result.returncode == 0, result
    assert _one_line(result) == "healthy: database reachable, schema current, 4 queues present"
    assert result.stderr == ""


def test_healthcheck_is_unhealthy_when_the_database_is_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = _nova_email("healthcheck", env={"DATABASE_URL": f"postgresql://nova:pw@127.0.0.1:{port}/x"})

    assert result.returncode == 1
    line = _one_line(result)
    assert line.startswith("unhealthy: database unreachable")
    assert "pw" not in line.replace("unreachable", "")


@pytest.mark.parametrize(
    "variable, value", [("LOG_LEVEL", "bogus"), ("DATABASE_URL", "mysql://x@y/z")], ids=["log-level", "mysql-url"]
)
def test_healthcheck_is_unhealthy_in_one_line_on_a_malformed_setting(variable: str, value: str) -> None:
    # Given a setting the service refuses
    env = {"DATABASE_URL": "postgresql://nova@127.0.0.1:1/x", variable: value}

    # When the probe runs
    result = _nova_email("healthcheck", env=env)

    # Then it is unhealthy (1: Docker reserves 2) in one line that names the setting
    assert result.returncode == 1, result
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 1 and variable in lines[0], result


def test_healthcheck_given_an_option_it_does_not_know_is_unhealthy_in_one_line() -> None:
    # When the probe is configured with a mistyped option
    result = _nova_email("healthcheck", "--wroker", env={"DATABASE_URL": "postgresql://nova@127.0.0.1:1/x"})

    # Then it fails as a probe does (1: Docker reserves 2), in one line naming the option
    assert result.returncode == 1, result
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 1 and "--wroker" in lines[0], result


def test_healthcheck_masks_a_configured_secret_in_the_databases_error(db_url: str) -> None:
    # Given a DATABASE_URL whose password also names its database, which does not exist (a server that checks
    # passwords, such as the embedded one over its socket, gets its own, which then names the database)
    parts = urlsplit(db_url)
    secret = parts.password or "Hunter2" + secrets.token_hex(6)
    address = f"{parts.hostname}:{parts.port}" if parts.hostname else ""
    broken = urlunsplit((parts.scheme, f"{parts.username}:{secret}@{address}", secret, parts.query, ""))

    # When the probe runs
    result = _nova_email("healthcheck", env={"DATABASE_URL": broken})

    # Then the server's answer is shown, the password masked
    assert result.returncode == 1
    line = _one_line(result)
    assert line.startswith("unhealthy: database unreachable or refusing") and "***" in line, line
    assert secret not in line


def test_healthcheck_is_unhealthy_when_a_migration_is_pending_or_a_queue_is_missing(empty_db_url: str) -> None:
    env = {"DATABASE_URL": empty_db_url}
    with psycopg.connect(empty_db_url) as conn:
        migrate(conn)
        conn.execute("delete from pgmq_broker.schema_migrations where namespace = 'nova_email' and version = 70")
    assert "1 migration(s) pending (nova_email/070_migrations_readable first)" in _one_line(
        _nova_email("healthcheck", env=env)
    )

    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        migrate(conn)
        conn.execute("select pgmq.drop_queue('inbox_backfill_jobs')")
    result = _nova_email("healthcheck", env=env)
    assert result.returncode == 1
    assert _one_line(result) == "unhealthy: queue(s) missing: inbox_backfill_jobs; run nova-email migrate"


def test_healthcheck_needs_no_more_than_the_least_privilege_worker_role(db_url: str) -> None:
    user, password = f"nova_probe_{secrets.token_hex(4)}", secrets.token_hex(12)
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("create role {} login password {} in role nova_worker").format(
                sql.Identifier(user), sql.Literal(password)
            )
        )
    try:
        scheme, rest = db_url.split("://", 1)
        worker_url = f"{scheme}://{user}:{password}@{rest.rsplit('@', 1)[-1]}"
        result = _nova_email("healthcheck", env={"DATABASE_URL": worker_url})
        assert (result.returncode, _one_line(result)) == (
            0,
            "healthy: database reachable, schema current, 4 queues present",
        )
        assert _nova_email("migrate", "--check", env={"DATABASE_URL": worker_url}).returncode == 0
    finally:
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute(sql.SQL("drop role {}").format(sql.Identifier(user)))


def test_a_heartbeat_that_cannot_be_written_is_logged_once_and_its_recovery_once(tmp_path: Path) -> None:
    # Given a heartbeat directory that cannot be created (its parent is a file)
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    heartbeat = WorkerHeartbeat(blocker / "heartbeats", interval_s=0.02)
    lines: list[str] = []
    sink = logger.add(lines.append, format="{level} {message}", level="INFO")
    try:
        # When the worker runs for a while, then the directory becomes writable
        heartbeat.after_worker_boot(StubBroker(), None)
        wait_for(lambda: len(lines) >= 1, timeout_s=5, what="the warning")
        time.sleep(0.2)
        blocker.unlink()
        wait_for(lambda: heartbeat.path.exists(), timeout_s=5, what="the heartbeat file")
        heartbeat.after_worker_shutdown(StubBroker(), None)
    finally:
        logger.remove(sink)

    # Then the outage was logged once and the recovery once, and shutdown removed the file
    assert [line.split(" ", 1)[0] for line in lines] == ["WARNING", "INFO"], lines
    assert "Cannot write the heartbeat file" in lines[0]
    assert not heartbeat.path.exists()


def test_a_draining_worker_keeps_heartbeating_until_it_has_shut_down(tmp_path: Path) -> None:
    heartbeat = WorkerHeartbeat(tmp_path, interval_s=0.02)
    heartbeat.after_worker_boot(StubBroker(), None)
    try:
        wait_for(heartbeat.path.exists, timeout_s=5, what="the heartbeat file")
        # When shutdown starts, running jobs may take minutes to finish: the worker still counts as healthy
        heartbeat.before_worker_shutdown(StubBroker(), None)
        beat = heartbeat.path.stat().st_mtime_ns
        wait_for(lambda: heartbeat.path.stat().st_mtime_ns > beat, timeout_s=5, what="a heartbeat while draining")
        assert list(worker_heartbeats(tmp_path)) == [os.getpid()]
    finally:
        heartbeat.after_worker_shutdown(StubBroker(), None)
    # Then the file goes once the worker has shut down
    assert not heartbeat.path.exists()


def test_a_heartbeat_file_whose_pid_now_names_another_process_is_stale(tmp_path: Path) -> None:
    # Given a live process (standing in for a process that reused a killed worker's pid)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            started_at = psutil.Process(other.pid).create_time()
            # A file the killed worker left: the same pid, another start time
            left = tmp_path / str(other.pid)
            left.write_text(repr(started_at - 3600))
            assert worker_heartbeats(tmp_path) == {}
            assert not left.exists()
            # while the process's own heartbeat counts
            left.write_text(repr(started_at))
            assert list(worker_heartbeats(tmp_path)) == [other.pid]
        finally:
            other.kill()


@pytest.mark.parametrize(
    ("command", "runs_workers"),
    [
        (["/opt/venv/bin/nova-email", "run", "all"], True),
        (["/opt/venv/bin/nova-email", "run", "threads", "--processes", "2"], True),
        (["/opt/venv/bin/dramatiq", "nova_email.actors"], True),
        (["/opt/venv/bin/nova-email", "serve-webhooks", "--port", "8000"], False),
        (["/opt/venv/bin/nova-email", "migrate"], False),
        # docker run --init: the init process's command line names the container's command
        (["/sbin/docker-init", "--", "nova-email", "run", "all"], True),
        (["/sbin/docker-init", "--", "nova-email", "serve-webhooks"], False),
    ],
)
def test_the_container_probe_checks_workers_only_where_the_container_runs_them(
    command: list[str], runs_workers: bool
) -> None:
    # A real process whose command line is the container's main command (Python ignores the arguments after -c's)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *command]) as main:
        try:
            wait_for(lambda: command[-1] in psutil.Process(main.pid).cmdline(), timeout_s=10, what="the process")
            assert container_runs_workers(main.pid) is runs_workers
        finally:
            main.kill()


@pytest.mark.processes
@pytest.mark.slow
def test_healthcheck_worker_follows_this_hosts_worker_processes(db_url: str, tmp_path: Path) -> None:
    # Heartbeats live under the temporary directory; a private one keeps other runs' workers out of this test.
    env = {"DATABASE_URL": db_url, "NYLAS_API_KEY": "health", "TMPDIR": str(tmp_path), "LOG_LEVEL": "info"}

    def probe(*args: str) -> subprocess.CompletedProcess[str]:
        return _nova_email("healthcheck", "--worker", *args, env=env)

    # Given no worker running, the worker probe fails
    assert "no worker process is heartbeating" in _one_line(probe())

    with running_workers(env, tmp_path / "workers.log", processes=2, threads=1) as workers:
        # When two worker processes run, the probe passes
        wait_for(lambda: probe().returncode == 0, timeout_s=30, what="the worker probe to pass")
        assert _one_line(probe()).endswith("2 worker process(es) heartbeating")

        # When one of them freezes, the probe fails once its heartbeat is older than --max-age, and recovers
        frozen = psutil.Process(workers.process.pid).children()[0]
        frozen.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: probe("--max-age", "3").returncode == 1, timeout_s=30, what="the frozen worker")
            # On a loaded machine the other worker's beat (every 2 s) may be late too: only the frozen one must be
            # named
            silent = re.search(r"silent for more than 3 s \(pid ([\d, ]+)\)$", _one_line(probe("--max-age", "3")))
            assert silent is not None and str(frozen.pid) in silent.group(1).split(", ")
        finally:
            frozen.send_signal(signal.SIGCONT)
        wait_for(lambda: probe("--max-age", "3").returncode == 0, timeout_s=30, what="the thawed worker")

    # Then stopped workers leave no heartbeat behind
    assert "no worker process is heartbeating" in _one_line(probe())
