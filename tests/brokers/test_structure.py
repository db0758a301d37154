"""The shape of `brokers`: no import cycle, no private name reached across modules, no module too long to read."""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "brokers"
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__")
#: Longest module of `brokers`, in lines: past it, a module holds more than one concept.
MAX_MODULE_LINES = 450


def sibling_imports(module: str) -> set[str]:
    """The modules of `brokers` that `module` imports, anywhere in it (also under ``TYPE_CHECKING``)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("brokers."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("brokers."))
    return found & set(MODULES)


def test_the_modules_of_brokers_import_each_other_without_a_cycle() -> None:
    graph = {module: sibling_imports(module) for module in MODULES}
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        pytest.fail(f"import cycle in brokers/: {' -> '.join(exc.args[1])}")


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone_in_a_fresh_interpreter(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", f"import brokers.{module}"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("module", MODULES)
def test_no_module_of_brokers_is_too_long_to_hold_one_concept(module: str) -> None:
    lines = len((PACKAGE / f"{module}.py").read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"brokers/{module}.py has {lines} lines"


def private_reaches(path: Path) -> list[str]:
    """Private names imported from another module, and private attributes read off anything but self or cls."""
    tree = ast.parse(path.read_text())
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("brokers")):
            found += [f"imports {alias.name}" for alias in node.names if _private(alias.name)]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in {"self", "cls"}):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


#: Underscored names that are public API: a namedtuple's documented methods.
PUBLIC_UNDERSCORED = {"_replace", "_asdict", "_fields", "_make"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in PUBLIC_UNDERSCORED


@pytest.mark.parametrize(
    "path",
    [*sorted(PACKAGE.glob("*.py")), ROOT / "nova_email" / "worker.py", ROOT / "nova_email" / "db.py"],
    ids=lambda path: f"{path.parent.name}/{path.name}",
)
def test_no_private_name_of_another_object_or_module_is_reached(path: Path) -> None:
    assert private_reaches(path) == []
