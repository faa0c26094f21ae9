"""Fixtures for the explorer tests: a small synthetic atlas, the app, a live server and a
headless Chromium driver. Import the fixtures into a test module with
``from app_fixtures import ...`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
CHROMEDRIVER = "/usr/bin/chromedriver"
N_CELLS = 3000


@pytest.fixture(scope="session")
def app_atlas_dir(tmp_path_factory) -> Path:
    """A complete synthetic human atlas of 3,000 cells (session; read-only)."""
    from atlas.testing import make_synthetic_atlas

    out = tmp_path_factory.mktemp("app_atlas") / "atlas"
    make_synthetic_atlas(out, n_cells=N_CELLS, n_genes=600, seed=0, species="human")
    return out


@pytest.fixture(scope="session")
def app_atlas_dir_mouse(tmp_path_factory) -> Path:
    from atlas.testing import make_synthetic_atlas

    out = tmp_path_factory.mktemp("app_atlas_mouse") / "atlas"
    make_synthetic_atlas(out, n_cells=1500, n_genes=400, seed=1, species="mouse")
    return out


@pytest.fixture(scope="session")
def app_atlas_dir_bare(app_atlas_dir, tmp_path_factory) -> Path:
    """The synthetic atlas without interaction and DE tables (optional parts missing)."""
    out = tmp_path_factory.mktemp("app_atlas_bare") / "atlas"
    shutil.copytree(app_atlas_dir, out)
    for name in (
        "interactions",
        "interactions_by_sample",
        "interactions_diff",
        "de",
        "composition",
    ):
        for p in (out / "tables" / f"{name}.csv", out / "store" / "tables" / f"{name}.parquet"):
            p.unlink(missing_ok=True)
    import json

    meta_file = out / "store" / "meta.json"
    meta = json.loads(meta_file.read_text())
    if isinstance(meta.get("tables"), list):
        meta["tables"] = [t for t in meta["tables"] if (out / "tables" / f"{t}.csv").exists()]
    meta_file.write_text(json.dumps(meta))
    return out


# exports of the tests in their own folder (the rate limit and disk bound are per folder)
_EXPORT_DIR = tempfile.mkdtemp(prefix="tme-test-exports-")


def small_config(**limits):
    from atlas.config import load_config

    overrides = {"serve": {"export_dir": _EXPORT_DIR}}
    if limits:
        overrides["limits"] = limits
    return load_config(env={}, overrides=overrides)


@pytest.fixture(scope="session")
def dash_app(app_atlas_dir):
    from app.factory import create_app

    return create_app(app_atlas_dir, small_config())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A werkzeug server running a Dash app in a background thread."""

    def __init__(self, app):
        from werkzeug.serving import make_server

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._srv = make_server("127.0.0.1", self.port, app.server, threaded=True)
        self._thread = threading.Thread(target=self._srv.serve_forever, daemon=True)

    def start(self) -> LiveServer:
        self._thread.start()
        import urllib.request

        for _ in range(100):
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the explorer did not start")

    def stop(self) -> None:
        self._srv.shutdown()
        self._thread.join(timeout=5)


@pytest.fixture(scope="session")
def live_server(dash_app):
    srv = LiveServer(dash_app).start()
    yield srv
    srv.stop()


def chromium_available() -> str | None:
    """Why browser tests cannot run here, or None when they can."""
    if shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        return "chromium is not installed (make browser-deps installs it)"
    if not Path(CHROMEDRIVER).exists():
        return f"{CHROMEDRIVER} is absent (apt-get install chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    return None


@pytest.fixture(scope="session")
def browser():
    reason = chromium_available()
    if reason:
        pytest.skip(reason)
    from benchmarks._util import chromium_driver

    try:
        driver = chromium_driver(log_browser=True)
    except Exception as e:  # noqa: BLE001 - a broken browser install is a skip, not a failure
        pytest.skip(f"cannot start headless chromium: {e.__class__.__name__}: {e}")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


@pytest.fixture(scope="session")
def vocab(app_atlas_dir) -> dict:
    """Names in the synthetic atlas (conditions, a sender, a DE cell type), so the tests do
    not hard-code the generator's vocabulary."""
    import atlas

    store = atlas.open(app_atlas_dir)
    conds = store.categories("condition")
    ref = store.reference or conds[0]
    others = [c for c in conds if c != ref]
    inter = store.table("interactions")
    inter_ref = inter[inter["condition"].astype(str) == ref]
    sender = inter_ref["source"].astype(str).value_counts().index[0]
    de = store.table("de")
    de_type = de["cell_type"].astype(str).value_counts().index[0]
    return {
        "conditions": conds,
        "reference": ref,
        "contrast": others[0],
        "sender": sender,
        "de_cell_type": de_type,
        "n_conditions": len(conds),
    }
