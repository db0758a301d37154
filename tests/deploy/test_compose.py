"""docker/docker-compose.yml, checked without a Docker engine: it parses, it has the services the original
describes, every command it names is one the image's entry point accepts, DATABASE_URL from .env wins, only
migrate connects as the owner, each worker service names its processes and may finish its jobs on stop.

Compose interpolates ``${VAR}``, ``${VAR:-default}``, ``${VAR:+alternative}`` and ``${VAR:?message}`` (nested) from
the --env-file;
`interpolate` does the same so the tests can read each container's environment for a given .env."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from dramatiq.middleware.time_limit import TimeLimit

from nova_email import actors
from nova_email.config import VARIABLES

from .conftest import ROOT, parses_as_nova_email_command
from .test_dockerfile import dockerfile_instructions

WORKERS = {"webhooks", "backfill", "threads", "completion"}
SERVICE_IMAGE_SERVICES = {"migrate", "webhooks-http", *WORKERS}
#: A .env for the bundled postgres, as .env.example asks for.
BUNDLED_ENV = {"POSTGRES_PASSWORD": "owner-pw", "NOVA_APP_PASSWORD": "app-pw", "NOVA_RECEIVER_PASSWORD": "rcv-pw"}
INIT_SCRIPT = ROOT / "docker" / "postgres-init" / "10-nova-roles.sh"


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution (innermost first), raising MissingVariable for ``${VAR:?message}``."""
    pattern = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?|:\+)([^${}]*))?\}")
    while True:
        match = pattern.search(text)
        if match is None:
            return text
        name, operator, argument = match.groups()
        value = env.get(name, "")
        if not value and operator == ":-":
            value = argument
        elif not value and operator == ":?":
            raise MissingVariable(argument)
        elif operator == ":+":
            value = argument if value else ""
        text = text[: match.start()] + value + text[match.end() :]


def environment(compose: dict[str, Any], service: str, env: dict[str, str]) -> dict[str, str]:
    return {k: interpolate(str(v), env) for k, v in (compose["services"][service].get("environment") or {}).items()}


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration))


def _entrypoint() -> list[str]:
    (entrypoint,) = [args for op, args in dockerfile_instructions() if op == "ENTRYPOINT"]
    parsed: list[str] = json.loads(entrypoint)
    return parsed


def _python_snippets(test: list[str]) -> list[str]:
    return [test[i + 1] for i, arg in enumerate(test) if arg == "-c" and test[i - 1] == "python"]


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_compose_has_postgres_migrate_the_receiver_and_the_four_processors(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"postgres", "roles", *SERVICE_IMAGE_SERVICES}
    assert re.fullmatch(r"postgres:\d+\.\d+", compose["services"]["postgres"]["image"])
    assert compose["services"]["roles"]["image"] == compose["services"]["postgres"]["image"]


def test_every_service_command_is_a_nova_email_subcommand_of_the_image(
    compose: dict[str, Any], console_scripts: dict[str, str]
) -> None:
    entrypoint = _entrypoint()
    assert entrypoint == ["nova-email"]
    assert console_scripts["nova-email"] == "nova_email.cli:main"
    for name in SERVICE_IMAGE_SERVICES:
        command = compose["services"][name]["command"]
        assert parses_as_nova_email_command(command), (name, command)
    assert {compose["services"][w]["command"][1] for w in WORKERS} == WORKERS
    assert compose["services"]["migrate"]["command"] == ["migrate"]


def test_every_worker_service_names_its_processes_and_threads(compose: dict[str, Any]) -> None:
    for name in WORKERS:
        command = compose["services"][name]["command"]
        assert int(_option(command, "--processes")) >= 1, name
        assert int(_option(command, "--threads")) >= 1, name


def _longest_time_limit_ms() -> int:
    """The longest time limit of any of our actors at the default settings (Dramatiq's own unless it sets one)."""
    default_ms: int = TimeLimit().time_limit
    declared = [actors.broker.get_actor(name) for name in actors.broker.get_declared_actors()]
    return max(int(actor.options.get("time_limit", default_ms)) for actor in declared)


def test_stopping_a_worker_lets_its_running_jobs_finish(compose: dict[str, Any]) -> None:
    # A job runs at most its actor's time limit (a backfill slice's grows with NYLAS_TIMEOUT_S, unset here); the
    # worker waits that long for running jobs, and Docker waits longer still before SIGKILL (its default is 10 s).
    longest_job_s = _longest_time_limit_ms() / 1000
    for name in WORKERS:
        service = compose["services"][name]
        shutdown_s = int(_option(service["command"], "--worker-shutdown-timeout")) / 1000
        assert shutdown_s >= longest_job_s, name
        assert _seconds(service["stop_grace_period"]) > shutdown_s, name
    assert _seconds(compose["services"]["webhooks-http"]["stop_grace_period"]) >= 30


def test_the_services_build_the_repository_with_its_dockerfile(compose: dict[str, Any]) -> None:
    compose_dir = ROOT / "docker"
    for name in SERVICE_IMAGE_SERVICES:
        build = compose["services"][name]["build"]
        assert (compose_dir / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).is_file()


def test_database_url_from_the_env_file_is_honoured(compose: dict[str, Any]) -> None:
    external = "postgresql://app:pw@db.example:5432/mail"
    env = {**BUNDLED_ENV, "DATABASE_URL": external}
    for name in WORKERS:
        assert environment(compose, name, env)["DATABASE_URL"] == external, name
    receiver = "postgresql://receiver:pw@db.example:5432/mail"
    owner = "postgresql://owner:pw@db.example:5432/mail"
    env |= {"RECEIVER_DATABASE_URL": receiver, "MIGRATE_DATABASE_URL": owner}
    assert environment(compose, "webhooks-http", env)["DATABASE_URL"] == receiver
    assert environment(compose, "migrate", env)["DATABASE_URL"] == owner


def test_only_migrate_connects_as_the_owner_of_the_bundled_database(compose: dict[str, Any]) -> None:
    owner = compose["services"]["postgres"]["environment"]["POSTGRES_USER"]
    users = {name: urlsplit(environment(compose, name, BUNDLED_ENV)["DATABASE_URL"]) for name in SERVICE_IMAGE_SERVICES}
    assert users["migrate"].username == owner and users["migrate"].password == "owner-pw"
    assert users["webhooks-http"].username == "nova_receiver" and users["webhooks-http"].password == "rcv-pw"
    for name in WORKERS:
        assert (users[name].username, users[name].password) == ("nova_app", "app-pw"), name
    assert {u.hostname for u in users.values()} == {"postgres"}


def test_the_roles_service_sets_up_the_login_roles_before_every_migrate(compose: dict[str, Any]) -> None:
    # Not the image's initdb hook, which runs only on an empty volume: an existing deployment gets the roles too.
    roles = compose["services"]["roles"]
    assert "docker-entrypoint-initdb.d" not in str(compose["services"]["postgres"].get("volumes"))
    (mount,) = roles["volumes"]
    source, target, mode = mount.split(":")
    assert (ROOT / "docker" / source).resolve() == INIT_SCRIPT.parent and mode == "ro"
    assert roles["command"] == ["sh", f"{target}/{INIT_SCRIPT.name}"]
    assert roles["restart"] == "no"
    assert roles["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    env = environment(compose, "roles", BUNDLED_ENV)
    owner = compose["services"]["postgres"]["environment"]["POSTGRES_USER"]
    assert (env["PGHOST"], env["PGUSER"], env["PGPASSWORD"]) == ("postgres", owner, "owner-pw")
    assert (env["NOVA_APP_PASSWORD"], env["NOVA_RECEIVER_PASSWORD"]) == ("app-pw", "rcv-pw")
    with pytest.raises(MissingVariable, match="NOVA_APP_PASSWORD"):
        environment(compose, "roles", {"POSTGRES_PASSWORD": "x", "NOVA_RECEIVER_PASSWORD": "y"})


def test_the_roles_service_learns_which_database_urls_are_set_but_never_their_values(
    compose: dict[str, Any],
) -> None:
    flags = ("DATABASE_URL_SET", "RECEIVER_DATABASE_URL_SET", "MIGRATE_DATABASE_URL_SET")
    assert [environment(compose, "roles", BUNDLED_ENV)[flag] for flag in flags] == ["", "", ""]
    external = {"DATABASE_URL": "postgresql://app:secret-pw@db.example/mail"}
    env = environment(compose, "roles", BUNDLED_ENV | external)
    assert [env[flag] for flag in flags] == ["yes", "", ""]
    assert "secret-pw" not in str(env)


def test_each_container_gets_only_the_secrets_it_uses(compose: dict[str, Any]) -> None:
    secrets = {"NYLAS_API_KEY", "NYLAS_WEBHOOK_SECRET", "POSTGRES_PASSWORD", "NOVA_APP_PASSWORD"}
    secrets |= {"NOVA_RECEIVER_PASSWORD"}
    passed = {name: set(compose["services"][name].get("environment") or {}) & secrets for name in compose["services"]}
    assert passed["migrate"] == set()
    assert passed["roles"] == {"NOVA_APP_PASSWORD", "NOVA_RECEIVER_PASSWORD"}  # and the owner's, as PGPASSWORD
    assert passed["webhooks-http"] == {"NYLAS_WEBHOOK_SECRET"}
    assert all(passed[name] == {"NYLAS_API_KEY"} for name in WORKERS)
    for service in compose["services"].values():
        assert "env_file" not in service  # it would hand every variable of .env, the owner's password too, to all
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in ("PASSWORD", "SECRET", "KEY")):
                assert str(value).startswith("${"), key


def test_every_setting_of_the_service_reaches_the_processes_that_read_it(compose: dict[str, Any]) -> None:
    only_elsewhere = {"NOVA_DATA_DIR"}  # the embedded server's folder: never in a container
    # The receiver's: PORT is moot beside its explicit --port, and its metric counts stay in its own container.
    receivers = {"PORT", "WEB_CONCURRENCY", "GUNICORN_CMD_ARGS", "PROMETHEUS_MULTIPROC_DIR", "NYLAS_WEBHOOK_SECRET"}
    for name in WORKERS:
        assert set(VARIABLES) - only_elsewhere - receivers <= set(environment(compose, name, {}))
    receiver = set(environment(compose, "webhooks-http", {}))
    assert {"DATABASE_URL", "NYLAS_WEBHOOK_SECRET", "LOG_LEVEL", "LOG_FORMAT"} <= receiver
    assert {"WEB_CONCURRENCY", "GUNICORN_CMD_ARGS"} <= receiver
    assert "--port" in compose["services"]["webhooks-http"]["command"]
    # An unset variable is passed empty, which the service reads as unset (its default).
    assert environment(compose, "threads", BUNDLED_ENV)["POLL_INTERVAL_MS"] == ""


def test_migrate_runs_once_after_postgres_is_healthy_and_everything_else_waits_for_it(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert services["migrate"]["depends_on"] == {"roles": {"condition": "service_completed_successfully"}}
    assert services["migrate"]["restart"] == "no"
    for name in {"webhooks-http", *WORKERS}:
        assert services[name]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
        assert services[name]["restart"] == "unless-stopped"
    assert services["postgres"]["restart"] == "unless-stopped"


def test_threads_run_twice_and_can_be_scaled(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["threads"]["deploy"]["replicas"] == 2
    assert all(services[w].get("deploy", {}).get("replicas", 1) == 1 for w in WORKERS - {"threads"})
    # --scale needs containers without fixed names or host ports.
    for name, service in services.items():
        assert "container_name" not in service, name
    assert "ports" not in services["threads"]


def test_health_checks_probe_what_each_service_serves(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["migrate"]["healthcheck"] == {"disable": True}
    receiver = services["webhooks-http"]
    port = receiver["command"][receiver["command"].index("--port") + 1]
    (probe,) = _python_snippets(receiver["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}/readyz" in probe
    assert receiver["ports"] == [f"{port}:{port}"]
    for name in WORKERS:
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1] == "nova-email", name
        assert test[2:] == ["healthcheck", "--worker"] and parses_as_nova_email_command(test[2:]), name
    for service in services.values():
        for snippet in _python_snippets(service.get("healthcheck", {}).get("test", [])):
            compile(snippet, "<healthcheck>", "exec")


def test_the_compose_usage_comment_names_real_files() -> None:
    header = [
        line for line in (ROOT / "docker" / "docker-compose.yml").read_text().splitlines() if "docker compose" in line
    ]
    assert header
    for line in header:
        args = shlex.split(line.lstrip("# ").split("#")[0])
        for flag in ("--env-file", "-f"):
            if flag in args:
                assert Path(ROOT / args[args.index(flag) + 1]).exists() or args[args.index(flag) + 1] == ".env"
