"""A guard, not the proof: no module of ours hands SQL built from strings at run time to psycopg.

The proof is that every statement is a ``LiteralString`` constant with placeholders (mypy --strict checks the
``Query`` type) and that names reach SQL through ``psycopg.sql.Identifier`` or SQL functions that check them
against ``pgmq.meta`` (tests/security/test_identifiers.py). This scan catches the usual slip early: an f-string,
``%`` or ``+`` formatting, or ``.format()`` as the first argument of ``execute``/``executemany``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: The shipped packages (bench/ and tests/ create scratch databases from names they generate themselves).
PACKAGES = ("nova_email", "brokers")
EXECUTORS = {"execute", "executemany", "copy", "stream"}


def _built_from_strings(node: ast.expr) -> bool:
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(part, ast.FormattedValue) for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
        return True
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format"
        and isinstance(node.func.value, ast.Constant)
    )


def string_built_sql(source: str, filename: str) -> list[str]:
    """``file:line`` of every execute-like call whose statement is built from strings at run time."""
    findings = []
    for node in ast.walk(ast.parse(source, filename)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in EXECUTORS
            and node.args
            and _built_from_strings(node.args[0])
        ):
            findings.append(f"{filename}:{node.lineno}")
    return findings


def _modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_executes_sql_built_from_strings(path: Path) -> None:
    assert string_built_sql(path.read_text(), str(path.relative_to(ROOT))) == []


@pytest.mark.parametrize(
    "statement",
    [
        'conn.execute(f"select * from {table}")',
        'cur.execute("select * from t where a = %s" % value)',
        'conn.execute("select * from " + table)',
        'conn.executemany("insert into {} values (%s)".format(table), rows)',
    ],
    ids=["f-string", "percent", "concatenation", "format"],
)
def test_the_guard_flags_each_way_of_building_sql_from_strings(statement: str) -> None:
    assert string_built_sql(statement, "example.py") == ["example.py:1"]


@pytest.mark.parametrize(
    "statement",
    [
        'conn.execute("select * from t where a = %(a)s", {"a": value})',
        "conn.execute(queries.READ, params)",
        'conn.execute(sql.SQL("select count(*) from {}").format(sql.Identifier("pgmq", name)))',
        'conn.execute(f"select 1")',
    ],
    ids=["placeholder", "named-constant", "sql-identifier", "constant-f-string"],
)
def test_the_guard_accepts_parameterised_statements(statement: str) -> None:
    assert string_built_sql(statement, "example.py") == []
