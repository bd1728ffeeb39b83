"""The package's layers: imports go to the same or a lower layer, and no import cycle.

Every import counts: module level, under ``if TYPE_CHECKING:``, and the lazy
ones inside functions (which must obey the same rule).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rbd2qcow2"
LAYERS = ("core", "store", "adapters", "transfer", "ops", "cli")
# The facade (rbd2qcow2/__init__.py, __main__.py) is above every layer; layers
# may read only the version string from it.
FACADE_NAMES = {"__version__"}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["rbd2qcow2", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import of the package in a module."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: list[tuple[str, list[str], int]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "rbd2qcow2"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "rbd2qcow2":
                continue
            for a in node.names:
                sub = f"{module}.{a.name}"
                if sub in known:
                    found.append((sub, [], node.lineno))
                else:
                    found.append((module, [a.name], node.lineno))
    return found


def layer(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return LAYERS.index(parts[1])


def test_every_module_is_in_a_layer() -> None:
    stray = [n for n in modules() if n not in ("rbd2qcow2", "rbd2qcow2.__main__") and layer(n) is None]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


def test_imports_go_down_or_sideways() -> None:
    mods = modules()
    bad = []
    for name, path in mods.items():
        own = layer(name)
        if own is None:
            continue
        for target, names, line in imports(name, path, set(mods)):
            assert target in mods, f"{path.name}:{line} imports {target}, which does not exist"
            other = layer(target)
            if other is None:
                if not set(names) <= FACADE_NAMES or not names:
                    bad.append(f"{name}:{line} imports {names or target} from the facade")
            elif other > own:
                bad.append(f"{name}:{line} ({LAYERS[own]}) imports {target} ({LAYERS[other]})")
    assert not bad, "imports going up a layer:\n" + "\n".join(bad)


def test_no_import_cycle() -> None:
    mods = modules()
    graph = {n: sorted({t for t, _, _ in imports(n, p, set(mods)) if t in mods and t != n}) for n, p in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in graph[n]:
            if state.get(m) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(m) :], m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n)


def test_the_rules_see_imports() -> None:
    """The parser resolves relative, package and lazy imports (else the tests above prove nothing)."""
    mods = modules()
    seen = {t for n, p in mods.items() for t, _, _ in imports(n, p, set(mods))}
    assert len(seen) > len(LAYERS)


MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
DESIGN = PACKAGE.parent / "docs" / "design.md"


def test_modules_and_functions_stay_small() -> None:
    """A module a reader can hold in mind, a function that fits on a screen."""
    long = []
    for path in modules().values():
        text = path.read_text()
        where = path.relative_to(PACKAGE)
        if text.count("\n") > MAX_MODULE_LINES:
            long.append(f"{where}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    long.append(f"{where}:{node.lineno} {node.name}: {size} lines")
    assert not long, "\n".join(long)


def test_the_design_map_names_every_module() -> None:
    rows = set(re.findall(r"^\| `([\w/]+\.py)` \|", DESIGN.read_text(), re.MULTILINE))
    # A layer's own __init__.py has the layer's bold row instead.
    layer_inits = {f"{name}/__init__.py" for name in LAYERS}
    files = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")} - layer_inits
    assert files - rows == set(), "modules missing from docs/design.md's map"
    assert rows - files == set(), "docs/design.md's map names modules that do not exist"
