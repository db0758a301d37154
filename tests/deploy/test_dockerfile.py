"""docker/Dockerfile, checked without a Docker engine: multi-stage on a pinned slim base, the dependencies' layer
before the code, a non-editable install at the pinned versions, a non-root user, a health check, no secrets."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib

from .conftest import ROOT, parses_as_nova_email_command

SECRETS = ("NYLAS_API_KEY", "NYLAS_WEBHOOK_SECRET", "DATABASE_URL", "POSTGRES_PASSWORD")
#: An exact Python release on a named Debian suite, optionally with its digest.
PINNED_BASE = re.compile(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?")


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


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for op, args in dockerfile_instructions():
        if op == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((op, args))
    return stages


def _index(stage: list[tuple[str, str]], op: str, needle: str) -> int:
    (index,) = [i for i, (o, args) in enumerate(stage) if o == op and needle in args]
    return index


def test_two_stages_on_the_same_pinned_slim_base_of_the_supported_python() -> None:
    build, final = _stages()
    build_base, _, name = build[0][1].partition(" AS ")
    assert name == "build"
    assert PINNED_BASE.fullmatch(build_base), build_base
    assert final[0][1] == build_base
    assert 'requires-python = ">=3.11"' in (ROOT / "pyproject.toml").read_text()
    # the final stage takes the virtualenv alone from the build stage: no source tree, compiler or pip cache
    copies = [args for op, args in final if op == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"]


def test_dependencies_are_installed_at_the_pinned_versions_in_a_layer_before_the_code() -> None:
    build, _ = _stages()
    deps_copy = _index(build, "COPY", "constraints.txt")
    deps_install = _index(build, "RUN", "-c constraints.txt")
    code_copies = [
        i for i, (op, args) in enumerate(build) if op == "COPY" and re.search(r"\b(nova_email|brokers)\b", args)
    ]
    assert shlex.split(build[deps_copy][1])[:-1] == ["pyproject.toml", "constraints.txt"]
    assert deps_copy < deps_install < min(code_copies)
    # only the runtime requirements of pyproject.toml: no extras (embedded server, test tools)
    assert "['project']['dependencies']" in build[deps_install][1]
    assert "[embedded" not in build[deps_install][1] and "[test" not in build[deps_install][1]


def test_the_package_is_installed_from_a_built_wheel_not_editable() -> None:
    build, _ = _stages()
    installs = [shlex.split(args) for op, args in build if op == "RUN" and "pip install" in args]
    assert installs[-1][-3:] == ["install", "--no-deps", "."]
    for command in installs:
        assert "-e" not in command and "--editable" not in command


def test_the_image_runs_as_a_non_root_user_after_installing() -> None:
    _, final = _stages()
    users = [args for op, args in final if op == "USER"]
    # Numeric, so that Kubernetes' runAsNonRoot can verify it without reading the image's /etc/passwd
    assert users and re.fullmatch(r"\d+:\d+", users[-1]), users
    uid, gid = (int(part) for part in users[-1].split(":"))
    assert uid != 0 and gid != 0
    last_run = max(i for i, (op, _) in enumerate(final) if op == "RUN")
    assert max(i for i, (op, _) in enumerate(final) if op == "USER") > last_run
    # ...and the user exists with those ids (its home, its name in ps)
    (add_user,) = [shlex.split(args) for op, args in final if op == "RUN" and "useradd" in args]
    assert ["--uid", str(uid)] == add_user[add_user.index("--uid") : add_user.index("--uid") + 2]
    assert ["--gid", str(gid)] == add_user[add_user.index("--gid") : add_user.index("--gid") + 2]
    assert ["groupadd", "--system", "--gid", str(gid)] == add_user[:4]


def test_the_health_check_is_the_console_scripts_probe_that_fits_the_containers_command() -> None:
    _, final = _stages()
    (check,) = [args for op, args in final if op == "HEALTHCHECK"]
    options, _, command = check.partition(" CMD ")
    argv = json.loads(command)
    assert argv[0] == "nova-email" and parses_as_nova_email_command(argv[1:])
    # --container: the worker check under `run ...` (the default command), not under serve-webhooks or migrate
    assert argv[1:] == ["healthcheck", "--container"]
    for option in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert option in options


def test_no_secret_is_baked_in_and_the_context_leaves_env_files_out() -> None:
    for op, args in dockerfile_instructions():
        if op in {"ENV", "ARG"}:
            assert not any(secret in args for secret in SECRETS), args
        if op in {"COPY", "ADD"} and not args.startswith("--from="):
            sources = shlex.split(args)[:-1]
            assert "." not in sources and not any(".env" in s for s in sources), args
            for source in sources:
                assert (ROOT / source).exists(), source
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".env" in ignored and ".venv" in ignored and ".nova" in ignored


def test_the_entry_point_is_the_console_script_and_the_default_runs_everything(
    console_scripts: dict[str, str],
) -> None:
    _, final = _stages()
    ops = dict(final)
    assert json.loads(ops["ENTRYPOINT"]) == ["nova-email"]
    assert "nova-email" in console_scripts
    assert json.loads(ops["CMD"]) == ["run", "all"]
    assert "PATH=/opt/venv/bin:$PATH" in ops["ENV"]


def test_the_requirements_step_lists_exactly_pyprojects_runtime_dependencies() -> None:
    # Run the image's own extraction command (the part before "> requirements.txt") with this interpreter.
    build, _ = _stages()
    (step,) = [args for op, args in build if op == "RUN" and "tomllib" in args]
    command = step.split(">", 1)[0].strip()
    assert command.startswith("python ")
    result = subprocess.run(
        ["sh", "-c", f'"{sys.executable}" {command.removeprefix("python ")}'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    with (ROOT / "pyproject.toml").open("rb") as fh:
        expected = tomllib.load(fh)["project"]["dependencies"]
    assert result.stdout.splitlines() == expected
