"""Smoke tests of the two ways in: ``nova_email.start_backfill`` from Python, and ``nova-email run`` as a process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row

import nova_email
from nova_email.config import Settings
from tests.processes import Workers


def test_start_backfill_returns_the_config_id_and_queues_one_backfill_job(
    conn: psycopg.Connection, settings: Settings
) -> None:
    # Given an inbox
    row = conn.execute(
        "insert into flux_inboxes (nylas_grant_id, email) values ('grant-entry', 'a@b.example') returning id"
    ).fetchone()
    assert row is not None
    inbox_id: uuid.UUID = row[0]
    end = datetime(2025, 6, 1, tzinfo=UTC)

    # When another program starts its backfill through the package's public function
    config_id, msg_id = nova_email.start_backfill(str(inbox_id), end_date=end, settings=settings)

    # Then the inbox's configuration is that id, waiting for the job that now sits on the backfill queue
    with conn.cursor(row_factory=dict_row) as cur:
        config = cur.execute(
            "select id, inbox_id, backfill_status, backfill_msg_id from flux_inbox_configurations where id = %s",
            [config_id],
        ).fetchone()
        jobs = cur.execute("select msg_id, message from pgmq.q_inbox_backfill_jobs").fetchall()
    assert config == {"id": config_id, "inbox_id": inbox_id, "backfill_status": "pending", "backfill_msg_id": msg_id}
    assert [job["msg_id"] for job in jobs] == [msg_id]
    # (a bare payload, as any SQL producer sends it; the broker hands it to the queue's actor)
    payload = jobs[0]["message"]
    assert {k: payload[k] for k in ("inbox_id", "config_id", "grant_id")} == {
        "inbox_id": str(inbox_id),
        "config_id": str(config_id),
        "grant_id": "grant-entry",
    }
    # with the default window: the year before the end date
    assert datetime.fromisoformat(payload["end_date"]) == end
    assert datetime.fromisoformat(payload["start_date"]) == end - timedelta(days=365)


def _script() -> list[str]:
    """The installed ``nova-email`` console script, as a user runs it."""
    script = Path(sys.executable).with_name("nova-email")
    if not script.exists():
        pytest.fail(f"{script} is missing; install the project (pip install -e .) so its console script exists")
    return [str(script)]


@pytest.mark.processes
@pytest.mark.slow
def test_nova_email_run_completion_starts_workers_and_exits_0_on_sigterm(db_url: str, tmp_path: Path) -> None:
    # Given the completion processor started as an operator would
    env = {"DATABASE_URL": db_url, "NYLAS_API_KEY": "entry-points", "LOG_LEVEL": "info"}
    args = ["run", "completion", "--processes", "1", "--threads", "1"]
    workers = Workers(env, tmp_path / "run.log", args, command=_script())
    try:
        workers.wait_ready(1)

        # When it is asked to stop
        workers.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = workers.process.wait(timeout=15)
        stopped_after_s = time.monotonic() - started
    finally:
        workers.stop()

    # Then it stopped cleanly within a few seconds, having consumed only the completion queue
    log = workers.log()
    assert code == 0, log[-3000:]
    assert stopped_after_s < 10, log[-3000:]
    assert "--queues completion_monitor" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


#: Another application importing the actors to send a job: its own loguru sink and stdlib handler are in place.
_HOST_APPLICATION = """
import logging
from loguru import logger

logger.remove()
lines = []
logger.add(lines.append, format="{message}")
logging.basicConfig(handlers=[logging.StreamHandler()], level=logging.INFO)
handlers = list(logging.getLogger().handlers)

import dramatiq
import nova_email.actors as actors

logger.info("the application logs on")
assert [line.strip() for line in lines] == ["the application logs on"], lines
assert logging.getLogger().handlers == handlers, logging.getLogger().handlers
assert dramatiq.get_broker() is actors.broker
print("imported")
"""


def _environment_without(*names: str, **values: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in names}, **values}


def test_importing_the_actors_sets_up_the_broker_and_nothing_else(tmp_path: Path) -> None:
    # Given a database nothing listens on: importing must not connect (nor start anything, nor log)
    env = _environment_without("NYLAS_API_KEY", "LOG_LEVEL", DATABASE_URL="postgresql://app@127.0.0.1:9/none")

    result = subprocess.run(
        [sys.executable, "-c", _HOST_APPLICATION], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == "imported\n"
    assert result.stderr == ""


#: Another application importing the actors, then sending a job. Its directory holds a `.env` that no settings could
#: be read from, so reading it at import would fail; before sending, the `.env` names the database to use.
_IMPORT_THEN_SEND = """
import sys
from pathlib import Path

from loguru import logger

import nova_email.actors as actors

logger.remove()
lines = []
logger.add(lines.append, format="{message}", level="DEBUG")
assert not Path("data").exists(), "the embedded server was started at import"
Path(".env").write_text(f"DATABASE_URL={sys.argv[1]}\\n")
actors.sync_thread.send({"thread_id": "t-lazy", "inbox_id": "i", "grant_id": "g", "config_id": None})
assert lines == [], lines
print("sent")
"""


def test_importing_the_actors_reads_no_setting_and_the_first_send_resolves_the_database(
    conn: psycopg.Connection, db_url: str, tmp_path: Path
) -> None:
    # Given a directory whose .env cannot be read as settings, no DATABASE_URL, and an embedded server's data dir
    (tmp_path / ".env").write_text("VISIBILITY_TIMEOUT=soon\nDATABASE_URL=mysql://nowhere/db\n")
    env = _environment_without("DATABASE_URL", "NYLAS_API_KEY", NOVA_DATA_DIR=str(tmp_path / "data"))

    # When another application imports the actors there, then sends a job
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_THEN_SEND, db_url],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    # Then the import read neither the .env nor a database (nor started one), and the send used the .env's database
    # without writing to the application's log
    assert result.returncode == 0, result.stderr
    assert result.stdout == "sent\n"
    row = conn.execute("select count(*) from pgmq.q_thread_sync_jobs where message::text like '%t-lazy%'").fetchone()
    assert row == (1,)


#: What a worker of every queue says without NYLAS_API_KEY.
_NO_KEY_LINE = (
    "NYLAS_API_KEY is not set; the workers of inbox_backfill_jobs, nylas_webhook_notifications, thread_sync_jobs"
    " call Nylas with it. Set it in the environment or in .env"
)


def _assert_stopped_with_one_line(result: subprocess.CompletedProcess[str], line: str) -> None:
    """The dramatiq command stopped with status 2, printing `line` once, before any worker was ready."""
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines().count(line) == 1, result.stderr
    assert "Worker process is ready" not in result.stderr
    assert "exited unexpectedly" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.processes
def test_a_worker_without_nylas_api_key_stops_at_once_with_one_line_naming_it(db_url: str, tmp_path: Path) -> None:
    env = _environment_without("NYLAS_API_KEY", DATABASE_URL=db_url)
    # Two worker processes, each of which finds the key missing: the command still says it once
    command = [sys.executable, "-m", "dramatiq", "nova_email.actors", "--processes", "2", "--threads", "1"]

    dramatiq_run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    nova_run = subprocess.run(
        [*_script(), "run", "threads"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )

    _assert_stopped_with_one_line(dramatiq_run, _NO_KEY_LINE)
    assert nova_run.returncode == 2
    assert nova_run.stderr.splitlines() == [
        "nova-email: NYLAS_API_KEY is not set; the workers of thread_sync_jobs call Nylas with it. "
        "Set it in the environment or in .env"
    ]


#: ``dramatiq nova_email.actors`` with worker processes started by the method in argv[1] (forkserver is Dramatiq's
#: default from Python 3.14: a worker's parent process is then the fork server, not the command).
_DRAMATIQ_STARTING = """
import multiprocessing
import sys

import dramatiq.cli

multiprocessing.set_start_method(sys.argv[1])
arguments = dramatiq.cli.make_argument_parser().parse_args(["nova_email.actors", "--processes", "2", "--threads", "1"])
sys.exit(dramatiq.cli.main(arguments))
"""


@pytest.mark.processes
@pytest.mark.parametrize(
    "command",
    [
        ["-m", "dramatiq", "nova_email.actors", "--processes", "2", "--threads", "1", "--use-spawn"],
        ["-c", _DRAMATIQ_STARTING, "forkserver"],
    ],
    ids=["spawn", "forkserver"],
)
def test_a_refused_worker_stops_the_command_whatever_starts_its_processes(
    db_url: str, tmp_path: Path, command: list[str]
) -> None:
    env = _environment_without("NYLAS_API_KEY", DATABASE_URL=db_url)

    result = subprocess.run(
        [sys.executable, *command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )

    _assert_stopped_with_one_line(result, _NO_KEY_LINE)


#: ``nova-email run completion`` as an installed package runs it (no embedded server to fall back on); reaching
#: Dramatiq's main (which forks the workers) ends the process with status 3.
_INSTALLED_RUN = """
import sys

import dramatiq.cli
import nova_email.db
from nova_email.cli import main

nova_email.db.embedded_server_is_default = lambda: False


def forks_workers(args):
    print("dramatiq main reached", file=sys.stderr)
    return 3


dramatiq.cli.main = forks_workers
sys.exit(main(["run", "completion", "--processes", "1", "--threads", "1"]))
"""


def test_run_without_database_url_in_an_installed_package_stops_with_one_line_before_forking(tmp_path: Path) -> None:
    env = _environment_without("DATABASE_URL", "NOVA_DATA_DIR", LOG_LEVEL="info")

    result = subprocess.run(
        [sys.executable, "-c", _INSTALLED_RUN], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "nova-email: DATABASE_URL is not set; set it to postgresql://user:password@host:5432/db"
    ]
    assert not (tmp_path / ".nova").exists()


#: ``dramatiq nova_email.actors`` as an installed package runs it (no embedded server to fall back on).
_INSTALLED_DRAMATIQ = """
import sys

import dramatiq.cli
import nova_email.db

nova_email.db.embedded_server_is_default = lambda: False
arguments = dramatiq.cli.make_argument_parser().parse_args(["nova_email.actors", "--processes", "2", "--threads", "1"])
sys.exit(dramatiq.cli.main(arguments))
"""


@pytest.mark.processes
def test_dramatiq_workers_without_database_url_in_an_installed_package_stop_with_one_line(tmp_path: Path) -> None:
    env = _environment_without("DATABASE_URL", "NOVA_DATA_DIR", NYLAS_API_KEY="nyk_test")

    result = subprocess.run(
        [sys.executable, "-c", _INSTALLED_DRAMATIQ], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )

    _assert_stopped_with_one_line(result, "DATABASE_URL is not set; set it to postgresql://user:password@host:5432/db")
    assert not (tmp_path / ".nova").exists()


@pytest.mark.processes
def test_dramatiq_workers_whose_configuration_fails_unexpectedly_stop_with_one_line_naming_the_error(
    tmp_path: Path,
) -> None:
    # Given no DATABASE_URL and an embedded server's data directory that cannot be made (its parent is a file)
    (tmp_path / "file").write_text("not a directory\n")
    data_dir = tmp_path / "file" / "data"
    env = _environment_without("DATABASE_URL", NYLAS_API_KEY="nyk_test", NOVA_DATA_DIR=str(data_dir))
    command = [sys.executable, "-m", "dramatiq", "nova_email.actors", "--processes", "1", "--threads", "1"]

    # When the worker processes boot
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    # Then they refuse to start, with one line naming the error, rather than run on the defaults
    line = f"The worker could not configure itself: NotADirectoryError: [Errno 20] Not a directory: '{data_dir}'"
    _assert_stopped_with_one_line(result, line)


#: A worker process's boot, then what the broker and the scheduler took from its settings.
_BOOTED = """
from brokers import PeriodicScheduler
from nova_email import actors

before = (actors.broker.settlement.visibility_timeout_ms, actors.broker.threads.listen)
actors.broker.emit_after("process_boot")
scheduler = next(m for m in actors.broker.middleware if isinstance(m, PeriodicScheduler))
print(before)
print((actors.broker.settlement.visibility_timeout_ms, actors.broker.threads.visibility_timeout_ms))
print((actors.broker.settlement.poll_interval_ms, actors.broker.threads.listen))
print(sorted((s.name, s.interval_ms) for s in scheduler.schedules.values()))
"""


def test_a_booting_worker_process_applies_its_settings_read_from_env_file(db_url: str, tmp_path: Path) -> None:
    # Given settings in the worker's .env only
    (tmp_path / ".env").write_text(
        f"DATABASE_URL={db_url}\nVISIBILITY_TIMEOUT=7\nPOLL_INTERVAL_MS=123\nDATABASE_TRANSACTION_POOLER=true\n"
        "COMPLETION_CHECK_INTERVAL_MS=2500\nENABLE_AUTO_RECOVERY=false\nLOG_LEVEL=warning\n"
    )
    env = _environment_without(
        "DATABASE_URL", "VISIBILITY_TIMEOUT", "POLL_INTERVAL_MS", "DATABASE_TRANSACTION_POOLER", "LOG_LEVEL"
    )

    shown = subprocess.run(
        [sys.executable, "-c", _BOOTED], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )

    # Then the import used the defaults, and the boot the .env's settings
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [
        "(300000, True)",
        "(7000, 7000)",
        "(123, False)",
        "[('check_completion', 2500)]",
    ]
