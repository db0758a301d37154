"""``nova-email serve-webhooks`` as an operator starts it: gunicorn's conventions (PORT, WEB_CONCURRENCY,
GUNICORN_CMD_ARGS) and help for every option."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.processes import wait_for

NOVA_EMAIL = str(Path(sys.executable).parent / "nova-email")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_every_option_of_serve_webhooks_has_help() -> None:
    done = subprocess.run([NOVA_EMAIL, "serve-webhooks", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for option in (
        "--host",
        "--port",
        "--workers",
        "--threads",
        "--max-body-bytes",
        "--pool-timeout-s",
        "--metrics-port",
    ):
        [index] = [index for index, line in enumerate(lines) if line.strip().startswith(option + " ")]
        # argparse puts the help after the option, or on the next line when the option is long
        same_line, next_line = lines[index].split(maxsplit=2)[2:], lines[index + 1].strip()
        assert same_line or (next_line and not next_line.startswith("-")), lines[index]
    assert "$PORT" in done.stdout and "$WEB_CONCURRENCY" in done.stdout and "GUNICORN_CMD_ARGS" in done.stdout


#: The variables of gunicorn's conventions, which a test sets itself (here or in a .env file).
GUNICORN_VARIABLES = ("PORT", "WEB_CONCURRENCY", "GUNICORN_CMD_ARGS", "PROMETHEUS_MULTIPROC_DIR")


def _environment(**variables: str) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k not in GUNICORN_VARIABLES}
    return {**environment, "LOG_LEVEL": "debug", **variables}


def _serve_until_listening(args: list[str], env: dict[str, str], cwd: Path) -> tuple[str, int]:
    """Start ``nova-email serve-webhooks`` in `cwd`, answer one /healthz once it listens, stop it; its log and the
    status of that answer."""
    log_path = cwd / "serve.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [NOVA_EMAIL, "serve-webhooks", *args], env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=cwd
        )
    try:
        wait_for(lambda: "Listening on" in log_path.read_text(), timeout_s=60, what="the server to listen")
        (address,) = re.findall(r"Listening on http://(\S+?)/webhooks/nylas", log_path.read_text())
        port = int(address.rsplit(":", 1)[1])
        status = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    return log_path.read_text(), status


@pytest.mark.processes
def test_serve_webhooks_honours_port_web_concurrency_and_gunicorn_cmd_args(db_url: str, tmp_path: Path) -> None:
    # Given the variables a platform sets for a gunicorn app
    port = _free_port()
    env = _environment(DATABASE_URL=db_url, PORT=str(port), WEB_CONCURRENCY="3", GUNICORN_CMD_ARGS="--backlog 37")

    # When it starts without options
    log, status = _serve_until_listening([], env, tmp_path)

    # Then it listens on $PORT of every interface, as gunicorn does (the platform must reach it), with
    # $WEB_CONCURRENCY workers and the settings from GUNICORN_CMD_ARGS
    assert status == 200
    assert f"Listening on http://0.0.0.0:{port}/webhooks/nylas with 3 workers" in log
    assert "backlog: 37" in log


@pytest.mark.processes
def test_serve_webhooks_takes_gunicorns_variables_from_the_env_file_too(db_url: str, tmp_path: Path) -> None:
    # Given gunicorn's variables in .env only, as DATABASE_URL and LOG_FORMAT may be
    port, metrics_dir = _free_port(), tmp_path / "metrics"
    (tmp_path / ".env").write_text(
        f"PORT={port}\nWEB_CONCURRENCY=3\nGUNICORN_CMD_ARGS=--backlog 37\nPROMETHEUS_MULTIPROC_DIR={metrics_dir}\n"
    )

    # When it starts without options
    log, status = _serve_until_listening([], _environment(DATABASE_URL=db_url), tmp_path)

    # Then they are honoured as if set in the environment, the workers' metric counts kept where it says
    assert status == 200
    assert f"Listening on http://0.0.0.0:{port}/webhooks/nylas with 3 workers" in log
    assert "backlog: 37" in log
    assert list(metrics_dir.glob("*.db"))


@pytest.mark.processes
def test_serve_webhooks_listens_on_loopback_unless_port_or_host_says_otherwise(db_url: str, tmp_path: Path) -> None:
    # Given no PORT, when it starts with only a port
    port = _free_port()
    log, status = _serve_until_listening(["--port", str(port)], _environment(DATABASE_URL=db_url), tmp_path)

    # Then it listens on loopback only
    assert status == 200
    assert f"Listening on http://127.0.0.1:{port}/webhooks/nylas" in log


MALFORMED_GUNICORN_VARIABLES = [
    ("PORT", "eighty"),
    ("WEB_CONCURRENCY", "0"),
    ("WEB_CONCURRENCY", "abc"),
    ("GUNICORN_CMD_ARGS", "--backlog '37"),
]


@pytest.mark.parametrize("variable, value", MALFORMED_GUNICORN_VARIABLES)
@pytest.mark.parametrize("command", [["serve-webhooks"], ["migrate", "--check"]])
def test_a_malformed_gunicorn_variable_stops_any_command_in_one_line(
    db_url: str, tmp_path: Path, variable: str, value: str, command: list[str]
) -> None:
    done = subprocess.run(
        [NOVA_EMAIL, *command],
        env=_environment(DATABASE_URL=db_url, NYLAS_WEBHOOK_SECRET="s" * 32, **{variable: value}),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )

    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert variable in line


def test_an_empty_web_concurrency_is_unset(db_url: str, tmp_path: Path) -> None:
    # Given WEB_CONCURRENCY set to nothing, as compose passes a variable that .env leaves out
    env = _environment(DATABASE_URL=db_url, WEB_CONCURRENCY="")

    # When the receiver's help is asked for and another command runs, each succeeds as if it were unset
    for command in (["serve-webhooks", "--help"], ["migrate", "--check"]):
        done = subprocess.run([NOVA_EMAIL, *command], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert done.returncode in (0, 1), done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.parametrize("cmd_args", ["--keep-alive 0", "--keep-alive 300", "--worker-class sync", "-k gthread"])
def test_gunicorn_cmd_args_cannot_undo_the_read_deadline(db_url: str, tmp_path: Path, cmd_args: str) -> None:
    # Given GUNICORN_CMD_ARGS that would disable or stretch the header deadline, or drop the deadline worker
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "NYLAS_WEBHOOK_SECRET": "s" * 32,
        "PORT": str(_free_port()),
        "GUNICORN_CMD_ARGS": cmd_args,
    }

    # When the receiver starts
    done = subprocess.run(
        [NOVA_EMAIL, "serve-webhooks"], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )

    # Then it refuses to, in one line naming the setting
    assert done.returncode != 0, done.stderr
    [line] = done.stderr.strip().splitlines()
    option = cmd_args.split()[0]
    assert "GUNICORN_CMD_ARGS" in line and ("keep-alive" in line if "alive" in option else "worker-class" in line)
