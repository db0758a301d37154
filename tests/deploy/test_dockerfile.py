"""docker/Dockerfile, checked without a Docker engine: slim base, non-root, no secrets, and the same install as
the README's `make install` (virtualenv, pip upgrade, editable install of the repository)."""

from __future__ import annotations

import json
import re
import shlex

from nova_email.migrate import SQL_DIR

from .conftest import ROOT

SECRETS = ("NYLAS_API_KEY", "NYLAS_WEBHOOK_SECRET", "DATABASE_URL", "POSTGRES_PASSWORD")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined and comments dropped."""
    text = (ROOT / "docker" / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    pairs = []
    for line in joined.splitlines():
        if line.strip():
            op, _, args = line.strip().partition(" ")
            pairs.append((op.upper(), args.strip()))
    return pairs


def _install_commands_of_the_makefile() -> list[list[str]]:
    """The recipe of `make install` (the README's install), with make variables expanded."""
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", text, re.MULTILINE)
    assert recipe, "Makefile has no $(STAMP) recipe (the install target)"
    variables = {"$(BIN)": ".venv/bin", "$(VENV)": ".venv", "$(PYTHON)": "python"}
    commands = []
    for line in recipe.group(1).splitlines():
        for name, value in variables.items():
            line = line.replace(name, value)
        command = line.strip().split("||")[-1].strip()  # "test -x X || make X" makes X
        if command.startswith(("touch ", "test ")):
            continue
        commands.append(shlex.split(command))
    return commands


def _normalise(command: list[str]) -> list[str]:
    """Drop what differs on purpose: --quiet, and the test tools' extra (`.[test]` -> `.`)."""
    out = [arg for arg in command if arg != "--quiet"]
    out = [re.sub(r"^\.\[[^\]]*\]$", ".", arg) for arg in out]
    return ["python" if arg == "python3" else arg for arg in out]


def test_the_image_installs_the_package_exactly_as_make_install_does() -> None:
    runs = [shlex.split(args) for op, args in dockerfile_instructions() if op == "RUN"]
    installs = [_normalise(cmd) for cmd in runs if "venv" in cmd or "pip" in cmd]

    assert installs == [_normalise(cmd) for cmd in _install_commands_of_the_makefile()]
    assert installs[-1][-2:] == ["-e", "."]


def test_the_base_is_slim_python_of_the_supported_version() -> None:
    (base,) = [args for op, args in dockerfile_instructions() if op == "FROM"]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    assert 'requires-python = ">=3.11"' in (ROOT / "pyproject.toml").read_text()


def test_the_image_runs_as_a_non_root_user_after_installing() -> None:
    ops = dockerfile_instructions()
    users = [args for op, args in ops if op == "USER"]
    assert users and users[-1] not in {"root", "0"}
    last_run = max(i for i, (op, _) in enumerate(ops) if op == "RUN")
    assert max(i for i, (op, _) in enumerate(ops) if op == "USER") > last_run
    assert any(op == "RUN" and "useradd" in args and users[-1] in args for op, args in ops)


def test_no_secret_is_baked_in_and_the_context_leaves_env_files_out() -> None:
    for op, args in dockerfile_instructions():
        if op in {"ENV", "ARG"}:
            assert not any(secret in args for secret in SECRETS), args
        if op in {"COPY", "ADD"}:
            sources = shlex.split(args)[:-1]
            assert "." not in sources and not any(".env" in s for s in sources), args
            for source in sources:
                assert (ROOT / source).exists(), source
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".env" in ignored and ".venv" in ignored and ".nova" in ignored


def test_migrations_are_copied_next_to_the_package_where_migrate_reads_them() -> None:
    ops = dockerfile_instructions()
    (workdir,) = [args for op, args in ops if op == "WORKDIR"]
    copies = {shlex.split(args)[0]: shlex.split(args)[-1] for op, args in ops if op == "COPY"}
    assert copies["nova_email"] == "./nova_email"
    assert workdir == "/app"
    assert SQL_DIR == ROOT / "nova_email" / "sql"  # shipped inside the package, so any install finds them


def test_the_entry_point_is_the_console_script_and_the_default_runs_everything(
    console_scripts: dict[str, str],
) -> None:
    ops = dict(dockerfile_instructions())
    assert json.loads(ops["ENTRYPOINT"]) == ["nova-email"]
    assert "nova-email" in console_scripts
    assert json.loads(ops["CMD"]) == ["run", "all"]
    env = ops["ENV"]
    assert "PATH=/app/.venv/bin:$PATH" in env
