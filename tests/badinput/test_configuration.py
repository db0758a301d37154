"""Malformed configuration stops the service at start-up with one line naming the variable, never a crash later."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nova_email.config import _VARIABLES, Settings, load_settings
from nova_email.errors import ConfigError
from tests.badinput.strategies import hostile_text

ROOT = Path(__file__).resolve().parents[2]
VARIABLES = sorted(_VARIABLES)
#: Values tried across the module's examples.
TRIED = [0]

values = st.one_of(
    hostile_text,
    st.sampled_from(["-1", "0", "1e309", "nan", "inf", "9" * 400, " ", "true", "postgres://", "http://", "ftp://x"]),
    st.integers().map(str),
    st.floats().map(str),
)


@given(environ=st.dictionaries(st.sampled_from(VARIABLES), values, min_size=1, max_size=6))
def test_any_environment_gives_settings_or_a_config_error_naming_the_variable(environ: dict[str, str]) -> None:
    TRIED[0] += len(environ)
    try:
        settings = load_settings(environ, env_file=None)
    except ConfigError as exc:
        message = str(exc)
        assert any(message.startswith(f"{name}=") for name in environ), message
        assert "\n" not in message
    else:
        assert isinstance(settings, Settings)


@given(content=st.text(max_size=300))
def test_any_env_file_gives_settings_or_a_config_error(tmp_path_factory: pytest.TempPathFactory, content: str) -> None:
    path = tmp_path_factory.mktemp("envfile") / ".env"
    path.write_text(content, encoding="utf-8", errors="surrogatepass")
    TRIED[0] += 1
    try:
        load_settings({}, env_file=path)
    except ConfigError as exc:
        assert "=" in str(exc)


@pytest.mark.processes
@pytest.mark.parametrize(
    ("variable", "value"),
    [("VISIBILITY_TIMEOUT", "soon"), ("DATABASE_URL", "mysql://u:hunter2hunter2@h/db"), ("NYLAS_API_URI", "api")],
)
def test_a_worker_with_a_malformed_variable_exits_at_once_naming_it(tmp_path: Path, variable: str, value: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), variable: value}
    done = subprocess.run(
        [sys.executable, "-m", "dramatiq", "nova_email.actors", "--processes", "1", "--threads", "1"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert any(line.startswith(f"{variable}=") for line in output.splitlines()), output[-2000:]
    assert "hunter2hunter2" not in output
    TRIED[0] += 1
    print(f"\n[badinput] configuration values tried: {TRIED[0]}")
