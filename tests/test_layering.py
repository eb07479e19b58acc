"""The layering is checked: the import-linter contracts in pyproject.toml hold, and can fail.

Also: no kdq module reaches into another's private names (a leading underscore means "mine").
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
CONFIG = ROOT / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")  # installed by the dev extra


def lint_imports(src: Path, cwd: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    """Run lint-imports with the kdq package found under `src` and the repository's contracts."""
    if not LINT_IMPORTS.is_file() and sys.version_info < (3, 11):
        pytest.skip("import-linter needs Python 3.11+; the dev extra leaves it out here")
    assert LINT_IMPORTS.is_file(), f"{LINT_IMPORTS} missing: install the dev extra (make install)"
    env = {**os.environ, "PYTHONPATH": str(src)}
    args = [str(LINT_IMPORTS), "--no-cache", "--no-logo", str(CONFIG)]
    for contract in contracts:
        args += ["--contract", contract]
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_contracts_hold_on_the_tree() -> None:
    result = lint_imports(SRC, ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract", "expected"),
    [
        # a lower layer importing an upper one (which also closes a cycle through cli -> engine)
        ("engine/device.py", "import kdq.cli", "layers", "kdq.engine.device -> kdq.cli"),
        # a cycle inside one package, invisible to the layers contract
        ("deploy/metadata.py", "import kdq.deploy.ort", "acyclic", "No cycles are allowed in kdq.deploy"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(tmp_path: Path, module: str, line: str, contract: str, expected: str) -> None:
    src = tmp_path / "src"
    shutil.copytree(SRC / "kdq", src / "kdq", ignore=shutil.ignore_patterns("__pycache__"))
    target = src / "kdq" / module
    target.write_text(target.read_text() + f"\n{line}  # added by the test\n")
    result = lint_imports(src, tmp_path, contract)
    # the expected line names an import that exists only in the copy, so the copy was the one checked
    assert result.returncode != 0, result.stdout + result.stderr
    assert "BROKEN" in result.stdout and expected in result.stdout, result.stdout + result.stderr


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, src: Path) -> bool:
    base = src.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def private_imports(src: Path) -> list[str]:
    """Every use of another kdq module's private name: `from kdq.a import _x` or `kdq.a._x` / `a._x`."""
    found = []
    for path in sorted((src / "kdq").rglob("*.py")):
        here = _module_name(path, src)
        package = here if path.name == "__init__.py" else here.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        modules: dict[str, str] = {}  # local name -> the kdq module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this file's package
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                if base != "kdq" and not base.startswith("kdq."):
                    continue
                for alias in node.names:
                    if _is_module(f"{base}.{alias.name}", src):
                        modules[alias.asname or alias.name] = f"{base}.{alias.name}"
                    elif _private(alias.name) and base != here:
                        found.append(f"{path.relative_to(src)}:{node.lineno}: from {base} import {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "kdq" or alias.name.startswith("kdq."):
                        if alias.asname:
                            modules[alias.asname] = alias.name
                        else:
                            modules["kdq"] = "kdq"
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            owner = _dotted(node.value)
            if owner is None or owner.split(".")[0] not in modules:
                continue
            head, _, rest = owner.partition(".")
            owner = f"{modules[head]}.{rest}" if rest else modules[head]
            if owner != here and _is_module(owner, src):
                found.append(f"{path.relative_to(src)}:{node.lineno}: {owner}.{node.attr}")
    return found


def test_the_private_name_scan_finds_each_form(tmp_path: Path) -> None:
    pkg = tmp_path / "kdq"
    (pkg / "sub").mkdir(parents=True)
    for name in ("__init__.py", "sub/__init__.py", "sub/b.py"):
        (pkg / name).write_text("")
    (pkg / "sub" / "a.py").write_text(
        "from kdq.sub.b import _hidden, public\n"
        "from . import b\n"
        "import kdq.sub.b\n"
        "import kdq.sub.b as bb\n"
        "from kdq.sub.a import _mine  # its own name: allowed\n"
        "b._hidden(); kdq.sub.b._hidden(); bb._hidden(); b.__name__\n"
    )
    assert private_imports(tmp_path) == [
        "kdq/sub/a.py:1: from kdq.sub.b import _hidden",
        "kdq/sub/a.py:6: kdq.sub.b._hidden",
        "kdq/sub/a.py:6: kdq.sub.b._hidden",
        "kdq/sub/a.py:6: kdq.sub.b._hidden",
    ]


def test_no_private_name_is_imported_from_another_module() -> None:
    offenders = private_imports(SRC)
    assert not offenders, "private names used across modules (make them public or move them):\n" + "\n".join(offenders)


def import_cycles(edges: dict[str, list[str]]) -> list[list[str]]:
    """The groups of modules that import one another in a circle (strongly connected, more than one)."""
    order, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        order[v] = low[v] = len(order)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, []):
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for v in list(edges):
        if v not in order:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert import_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert import_cycles({"a": ["b"], "b": [], "p": ["p.x"], "p.x": []}) == []


def test_no_module_imports_itself_in_a_circle() -> None:
    """Module by module, package __init__ files included (the contracts see packages as units)."""
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (Python 3.11+)")
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    code = ("import grimp, json; g = grimp.build_graph('kdq'); "
            "print(json.dumps({m: sorted(g.find_modules_directly_imported_by(m)) for m in g.modules}))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(SRC)},
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert grimp is not None and import_cycles(json.loads(out)) == []
