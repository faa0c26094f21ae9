"""The benchmark harness runs end to end on tiny data (so it cannot rot); no timings asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


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
