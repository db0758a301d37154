"""Helpers for the deployment tests: the repository's files, and the ``nova-email`` parser that the image's
entry point runs."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from nova_email.cli import build_parser
from nova_email.intake.server import add_arguments as add_intake_arguments

ROOT = Path(__file__).resolve().parents[2]


def parses_as_nova_email_command(argv: list[str]) -> bool:
    """Whether `argv` (without the program name) is a command the ``nova-email`` script accepts."""
    parser = build_parser()
    if argv[:1] == ["serve-webhooks"]:
        # The receiver parses its own options, in a process of its own (nova_email.serve_webhooks).
        parser = argparse.ArgumentParser(prog="nova-email serve-webhooks")
        add_intake_arguments(parser)
        argv = argv[1:]
    try:
        parser.parse_args(argv)
    except SystemExit:
        return False
    return True


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="session")
def console_scripts() -> dict[str, str]:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        scripts: dict[str, str] = tomllib.load(fh)["project"]["scripts"]
    return scripts
