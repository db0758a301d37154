"""docker/docker-compose.yml, checked without a Docker engine: it parses, it has the services the original
describes, and every command it names is one the image's entry point accepts."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from .conftest import ROOT, parses_as_nova_email_command
from .test_dockerfile import dockerfile_instructions

WORKERS = {"webhooks", "backfill", "threads", "completion"}
SERVICE_IMAGE_SERVICES = {"migrate", "webhooks-http", *WORKERS}


def _entrypoint() -> list[str]:
    (entrypoint,) = [args for op, args in dockerfile_instructions() if op == "ENTRYPOINT"]
    parsed: list[str] = json.loads(entrypoint)
    return parsed


def _python_snippets(test: list[str]) -> list[str]:
    return [test[i + 1] for i, arg in enumerate(test) if arg == "-c" and test[i - 1] == "python"]


def test_compose_has_postgres_migrate_the_receiver_and_the_four_processors(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"postgres", *SERVICE_IMAGE_SERVICES}
    assert compose["services"]["postgres"]["image"].startswith("postgres:")


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


def test_the_services_build_the_repository_with_its_dockerfile(compose: dict[str, Any]) -> None:
    compose_dir = ROOT / "docker"
    for name in SERVICE_IMAGE_SERVICES:
        build = compose["services"][name]["build"]
        assert (compose_dir / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).is_file()
        assert compose["services"][name]["env_file"] == "../.env"
        assert (compose_dir / "../.env.example").is_file()


def test_migrate_runs_once_after_postgres_is_healthy_and_everything_else_waits_for_it(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
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
        service = services[name]
        (probe,) = _python_snippets(service["healthcheck"]["test"])
        assert f"http://127.0.0.1:{service['environment']['METRICS_PORT']}/metrics" in probe
        assert "nova_database_up 1.0" in probe
        assert service["environment"]["METRICS_HOST"] == "0.0.0.0"
    for service in services.values():
        for snippet in _python_snippets(service.get("healthcheck", {}).get("test", [])):
            compile(snippet, "<healthcheck>", "exec")


def test_no_secret_is_written_in_the_compose_file(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in ("PASSWORD", "SECRET", "KEY")):
                assert str(value).startswith("${"), (name, key)
        url = (service.get("environment") or {}).get("DATABASE_URL")
        if url is not None:
            password = url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
            assert password.startswith("${POSTGRES_PASSWORD"), name


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
