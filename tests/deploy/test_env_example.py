""".env.example: every variable the service reads is listed (set or commented out), nothing else is, and the file
loads as it is. "Reads" covers the settings (`nova_email.config`) and any direct read of the environment in the
source (``os.environ[...]``, ``os.environ.get``, ``os.getenv``, ``... in os.environ``), which the scan below finds."""

from __future__ import annotations

import ast
import re

import pytest

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


#: The packages whose environment reads count.
SOURCE_PACKAGES = ("nova_email", "brokers")


class UnresolvedRead(Exception):
    """A direct read of the environment whose variable name the scan cannot tell."""


def _is_environ(node: ast.AST) -> bool:
    return ast.unparse(node) in {"os.environ", "environ"}


def _constants(tree: ast.Module) -> dict[str, str]:
    """The module's ``NAME = "text"`` constants, which a read may name its variable by."""
    constants = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign | ast.AnnAssign) and isinstance(statement.value, ast.Constant):
            targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            for target in targets:
                if isinstance(target, ast.Name) and isinstance(statement.value.value, str):
                    constants[target.id] = statement.value.value
    return constants


def _read_variables(node: ast.AST) -> list[ast.expr]:
    """The expressions naming the variables that `node` reads from the environment, if it reads any."""
    if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_environ(node.value):
        return [node.slice]
    if isinstance(node, ast.Call) and node.args:
        function = node.func
        if isinstance(function, ast.Attribute) and function.attr == "get" and _is_environ(function.value):
            return [node.args[0]]
        if ast.unparse(function) in {"os.getenv", "getenv"}:
            return [node.args[0]]
    if isinstance(node, ast.Compare) and any(_is_environ(c) for c in node.comparators):
        if all(isinstance(op, ast.In | ast.NotIn) for op in node.ops):
            return [node.left]
    return []


def direct_reads(source: str, where: str) -> set[str]:
    """The environment variables `source` reads directly, not through the settings."""
    tree = ast.parse(source)
    constants = _constants(tree)
    found = set()
    for node in ast.walk(tree):
        for expression in _read_variables(node):
            if isinstance(expression, ast.Constant) and isinstance(expression.value, str):
                found.add(expression.value)
            elif isinstance(expression, ast.Name) and expression.id in constants:
                found.add(constants[expression.id])
            else:
                msg = f"{where}:{node.lineno}: reads the environment variable {ast.unparse(expression)}"
                raise UnresolvedRead(msg)
    return found


def _source_reads() -> dict[str, set[str]]:
    reads = {}
    for package in SOURCE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            where = str(path.relative_to(ROOT))
            reads[where] = direct_reads(path.read_text(), where)
    return reads


def test_the_scan_finds_every_form_of_direct_read() -> None:
    source = """
import os
NAME = "BY_CONSTANT"
a = os.environ["SUBSCRIPT"]
b = os.environ.get("GET", "x")
c = os.getenv("GETENV")
d = "MEMBERSHIP" in os.environ
e = os.environ.get(NAME)
os.environ["WRITTEN"] = "not a read"
copied = dict(os.environ)
"""
    assert direct_reads(source, "x.py") == {"SUBSCRIPT", "GET", "GETENV", "MEMBERSHIP", "BY_CONSTANT"}
    with pytest.raises(UnresolvedRead, match="x.py:3"):
        direct_reads("import os\nfor name in ('A', 'B'):\n    os.getenv(name)\n", "x.py")


def test_every_variable_the_source_reads_directly_is_listed() -> None:
    unlisted = {where: reads - _listed() for where, reads in _source_reads().items() if reads - _listed()}
    assert unlisted == {}


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
