"""Package layering, read from the sources.

* ``preprocessing``, ``atlas`` and ``references`` (the offline build) import no web code:
  no Dash, Flask, werkzeug, gunicorn, ``app`` or ``tme_atlas``, not even inside a function;
  and importing every one of their modules leaves none of those in ``sys.modules``.
* ``app`` (the explorer) imports nothing from ``preprocessing``; only ``tme_atlas`` (the
  command line) wires the two.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tme_atlas", "preprocessing", "atlas", "app", "references")
OFFLINE = ("preprocessing", "atlas", "references")
# plotly is a plotting library (the QC report uses it), not the web stack
WEB = ("dash", "dash_auth", "flask", "werkzeug", "gunicorn", "app", "tme_atlas")


def modules(package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of ``package``."""
    root = REPO / package
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _run_time_nodes(tree: ast.AST):
    """Every node except the bodies of ``if TYPE_CHECKING:`` (never executed)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def imports(name: str, path: Path) -> list[tuple[str, int]]:
    """Every module ``name`` imports at run time, at any depth (function-level imports
    included; ``if TYPE_CHECKING:`` blocks left out), as absolute dotted names with their
    line numbers; ``from x import y`` gives ``x.y`` too (``y`` may be a submodule)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out: list[tuple[str, int]] = []
    for node in _run_time_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
            out.extend((f"{mod}.{a.name}", node.lineno) for a in node.names if a.name != "*")
    return out


def test_offline_packages_import_no_web_code_in_source():
    bad = []
    for pkg in OFFLINE:
        for name, path in modules(pkg).items():
            for mod, line in imports(name, path):
                if mod.split(".")[0] in WEB:
                    bad.append(f"{path.relative_to(REPO)}:{line} imports {mod}")
    assert not bad, "the offline build must not import web code:\n" + "\n".join(bad)


def test_app_imports_no_build_code():
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {mod}"
        for name, path in modules("app").items()
        for mod, line in imports(name, path)
        if mod.split(".")[0] in ("preprocessing", "tme_atlas")
    ]
    assert not bad, "the explorer reads atlases through atlas/, never the build:\n" + "\n".join(bad)


def test_offline_packages_import_no_web_code_at_run_time():
    names = [m for pkg in OFFLINE for m in modules(pkg) if not m.endswith("__main__")]
    code = (
        "import importlib, sys\n"
        f"for m in {names!r}:\n"
        "    importlib.import_module(m)\n"
        f"web = sorted(k for k in sys.modules if k.split('.')[0] in {WEB!r})\n"
        "print(','.join(web))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(names) > 20  # the walk found the packages
    assert r.stdout.strip() == "", f"importing the offline packages loaded {r.stdout.strip()}"


def test_tme_atlas_is_the_command():
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"tme-atlas": "tme_atlas.cli:main"}
    r = subprocess.run(
        [sys.executable, "-m", "tme_atlas", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for cmd in ("simulate", "build", "analyse", "crosstalk", "export", "serve"):
        assert cmd in r.stdout


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (one per strongly connected component, Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (at any depth in the file,
    function-level imports included: they hide a loop, they do not remove it). A package's
    ``__init__`` is left out as a target (``from . import x`` names the submodule)."""
    mods = modules(package)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for mod, _ in imports(name, path):
            if mod in mods and mod != name and mod != package:
                graph[name].add(mod)
    return graph


def test_no_import_cycles_within_a_package():
    found = {pkg: _cycles(import_graph(pkg)) for pkg in PACKAGES}
    assert sum(len(g) for g in map(import_graph, PACKAGES)) > 40  # every package was read
    assert not any(found.values()), f"import cycles: {found}"


def test_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(g) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
