""".env.example: every variable the service reads is listed (set or commented out), nothing else is, and the file
loads as it is."""

from __future__ import annotations

import re

from nova_email.config import VARIABLES, load_settings

from .conftest import ROOT

ENV_EXAMPLE = ROOT / ".env.example"
#: Read by docker/docker-compose.yml (interpolation), not by the service.
COMPOSE_ONLY = {
    "POSTGRES_PASSWORD",
    "NOVA_APP_PASSWORD",
    "NOVA_RECEIVER_PASSWORD",
    "RECEIVER_DATABASE_URL",
    "MIGRATE_DATABASE_URL",
}


def _listed() -> set[str]:
    return set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE))


def test_every_variable_the_service_reads_is_listed() -> None:
    assert set(VARIABLES) - _listed() == set()


def test_every_listed_variable_is_read_by_the_service_or_the_compose_file() -> None:
    assert _listed() - set(VARIABLES) == COMPOSE_ONLY
    compose = (ROOT / "docker" / "docker-compose.yml").read_text()
    for variable in COMPOSE_ONLY:
        assert f"${{{variable}" in compose, variable


def test_the_example_loads_with_the_services_defaults() -> None:
    settings = load_settings({}, env_file=ENV_EXAMPLE)
    defaults = load_settings({}, env_file=None)
    assert settings == defaults
