"""The benchmark harness runs end to end on tiny data (so it cannot rot); no timings asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# not `from tests.conftest import REPO`: some wheels install a top-level `tests` package
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_harness_smoke(tmp_path):
    env = {
        **os.environ,
        "TME_BENCH_WORK": str(tmp_path / "work"),
        "TME_BENCH_RESULTS": str(tmp_path / "results"),
        "TME_BENCH_THREADS": "1",
    }
    subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--only", "build"],
        cwd=REPO,
        env=env,
        check=True,
        timeout=1200,
    )
    result = json.loads((tmp_path / "results" / "build_smoke.json").read_text())
    entry = result["sizes"]["1600"]
    ours, base = entry["ours"], entry["baseline"]
    assert ours["rc"] == 0 and base["rc"] == 0
    # per-stage timings and quality metrics of both runs are recorded
    assert {"qc", "integrate", "crosstalk"} <= set(ours["stages"])
    assert {"read", "scvi", "liana"} <= set(base["stages"])
    for run in (ours, base):
        assert any(k.endswith("batch_entropy") for k in run["quality"])
    assert entry["ratio_total"] > 0


def _explorer_bench(module: str, tmp_path, cells: int = 3000) -> dict:
    """Run ``benchmarks.<module>`` on a synthetic atlas of ``cells``; its result for that size."""
    out = tmp_path / f"{module}.json"
    subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--sizes", str(cells), "--repeats", "2",
         "--work", str(tmp_path / "work"), "--out", str(out)],
        cwd=REPO, check=True, timeout=600,
    )  # fmt: skip
    return json.loads(out.read_text())["sizes"][str(cells)]


@pytest.mark.slow
def test_callbacks_harness_smoke(tmp_path):
    """bench_callbacks on a 3,000-cell synthetic atlas: every action answers, bytes recorded."""
    res = _explorer_bench("bench_callbacks", tmp_path)
    for kind in ("gene_switch", "metadata_colour", "violin", "dot_plot", "interaction_filter"):
        assert res[kind]["median_ms"] > 0 and res[kind]["bytes"] > 0, kind
    assert res["errors"] == []
    # the gene switch sends x, y as base64 float32 (~11 B per cell), not JSON lists (~40)
    assert res["gene_switch"]["bytes_per_cell"] < 20


@pytest.mark.slow
@pytest.mark.browser
def test_browser_harness_smoke(tmp_path):
    import shutil

    if shutil.which("chromium") is None or not os.path.exists("/usr/bin/chromedriver"):
        pytest.skip("chromium / chromedriver missing")
    res = _explorer_bench("bench_browser", tmp_path)
    assert res["first_load_s"] > 0 and res["gene_repaint_ms"] > 0
    assert res["points_drawn"] == 3000


def test_curation_harness_smoke(tmp_path):
    """bench_curation on 2,000 cells: every timing recorded, the version file written."""
    from benchmarks.bench_curation import main

    out = tmp_path / "curation.json"
    assert main(["--cells", "2000", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["command"].startswith("python -m benchmarks.bench_curation")
    (row,) = res["results"]
    assert row["n_cells"] == 2000 and row["version_file_mb"] > 0
    assert all(row[k] >= 0 for k in ("first_edit_s", "rename_s", "relabel_5pct_s"))


@pytest.mark.slow
def test_spatial_harness_smoke(tmp_path, small_atlas_dir_session):
    """bench_spatial on 2,400 cells against the small atlas: time, peak memory, accuracy."""
    env = {
        **os.environ,
        "TME_BENCH_WORK": str(tmp_path / "work"),
        "TME_BENCH_RESULTS": str(tmp_path / "results"),
    }
    subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_spatial", "--atlas",
         str(small_atlas_dir_session), "--cells", "2400", "--patients", "2"],
        cwd=REPO, env=env, check=True, timeout=600,
    )  # fmt: skip
    res = json.loads((tmp_path / "results" / "spatial.json").read_text())
    assert res["rc"] == 0 and res["peak_mb"] > 0 and res["seconds"] > 0
    assert res["n_cells"] > 2000 and res["typing_accuracy"] > 0.8
    assert {"ingest", "nhood_enrichment", "spatial_lr"} <= set(res["timings_s"])
