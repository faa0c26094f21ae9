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


def test_explorer_opens_atlases_in_one_place_and_reads_no_anndata():
    """The explorer reads atlases only through the typed store (``atlas.open``), opened in
    ``app/data.py`` alone (the factory and the registry call ``open_store``/``open_view``),
    and never imports AnnData or the file libraries under it."""
    raw = ("anndata", "h5py", "zarr", "scanpy")
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {mod}"
        for name, path in modules("app").items()
        for mod, line in imports(name, path)
        if mod.split(".")[0] in raw
    ]
    for path in modules("app").values():
        if path.name == "data.py":
            continue
        for i, text in enumerate(path.read_text().splitlines(), start=1):
            if "atlas.open(" in text or "AtlasStore(" in text:
                bad.append(f"{path.relative_to(REPO)}:{i} opens an atlas outside app/data.py")
    assert not bad, "\n".join(bad)


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


# ----------------------------------------------------------------------------- schema keys
# data keys the explorer must spell through atlas.schema (obs/obsm/uns/layers/var keys,
# table names and table columns)
_KEY_PREFIXES = ("OBS_", "OBSM_", "UNS_", "LAYER_", "VAR_", "COL_", "TABLE_")
# receivers whose .get() reads a URL parameter (the URL's vocabulary, not a data key)
_URL_RECEIVERS = {"params", "args", "query"}
_FRAME_METHODS = {
    "get", "pop", "sort_values", "groupby", "drop", "rename", "pivot", "pivot_table",
    "set_index", "astype", "merge",
}  # fmt: skip
# (file, literal) -> why a literal key is allowed there; empty: none is
KEY_LITERAL_ALLOWED: dict[tuple[str, str], str] = {
    ("app/pages/overview.py", "source"): "the b_clones table's own 'source' column (contigs or "
    "expression), listed literally in schema.TABLE_COLUMNS[TABLE_CLONES]; not COL_SOURCE",
}


def schema_key_values() -> dict[str, list[str]]:
    from atlas import schema

    out: dict[str, list[str]] = {}
    for name, value in vars(schema).items():
        if name.isupper() and isinstance(value, str) and name.startswith(_KEY_PREFIXES):
            out.setdefault(value, []).append(name)
    return out


def key_literals(tree: ast.AST, keys) -> list[ast.Constant]:
    """String literals equal to a schema key, used as one: a subscript (``df["x"]``), the
    left of ``in``, the first/keyword argument of a DataFrame method (``.get``,
    ``.groupby``, ``.pivot_table``, ...; not ``params.get``: URL parameters), or a
    function's default (``lfc="log2fc"``)."""
    found = []
    for node in ast.walk(tree):
        cands: list[ast.AST] = []
        if isinstance(node, ast.Subscript):
            cands.append(node.slice)
        elif isinstance(node, ast.Compare) and any(
            isinstance(o, (ast.In, ast.NotIn)) for o in node.ops
        ):
            cands.append(node.left)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _FRAME_METHODS
        ):
            recv = node.func.value
            if isinstance(recv, ast.Name) and recv.id in _URL_RECEIVERS:
                continue
            cands.extend(node.args[:1])
            cands.extend(k.value for k in node.keywords)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            # one string default names a column; a tuple default lists values (groups)
            defaults = [*node.args.defaults, *(d for d in node.args.kw_defaults if d)]
            cands.extend(d for d in defaults if isinstance(d, ast.Constant))
        for c in cands:
            for e in c.elts if isinstance(c, (ast.List, ast.Tuple)) else [c]:
                if isinstance(e, ast.Constant) and isinstance(e.value, str) and e.value in keys:
                    found.append(e)
    return found


def test_explorer_spells_data_keys_through_the_schema():
    keys = schema_key_values()
    assert keys["cell_type"] and keys["log2fc"]  # the registry was read
    files = sorted((REPO / "app").glob("*.py")) + sorted((REPO / "app" / "pages").glob("*.py"))
    bad = []
    for path in files:
        rel = str(path.relative_to(REPO))
        for e in key_literals(ast.parse(path.read_text()), keys):
            if (rel, e.value) not in KEY_LITERAL_ALLOWED:
                bad.append(f"{rel}:{e.lineno}: {e.value!r} -> schema.{keys[e.value][0]}")
    assert not bad, "literal data keys in the explorer (use atlas.schema):\n" + "\n".join(bad)


def test_key_literal_scanner_finds_planted_keys():
    keys = schema_key_values()
    planted = (
        "def f(df, lfc='log2fc', params=None, groups=('malignant', 'reference')):\n"
        "    a = df['cell_type']\n"
        "    b = 'condition' in df.columns\n"
        "    c = df.groupby(['sample_id', 'n'])\n"
        "    d = params.get('condition')\n"  # a URL parameter: allowed
        "    return df.get('padj'), 'cell_type'\n"  # a bare literal (e.g. a label): allowed
    )
    found = sorted(e.value for e in key_literals(ast.parse(planted), keys))
    assert found == ["cell_type", "condition", "log2fc", "padj", "sample_id"]


def test_explorer_reads_de_columns_from_the_schema():
    import pandas as pd

    from app.pages.genes import de_columns
    from atlas import schema

    cols = schema.TABLE_COLUMNS[schema.TABLE_DE]
    assert de_columns(pd.DataFrame(columns=cols)) == (
        schema.COL_CONDITION,
        schema.COL_LOG2FC,
        schema.COL_PADJ,
    )
    # no guessing: other spellings (and a raw p-value standing in for padj) are not read
    guess = pd.DataFrame(columns=["contrast", "log2FoldChange", "lfc", "fdr", "qvalue", "pvalue"])
    assert de_columns(guess) == (None, None, None)
