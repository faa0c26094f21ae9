"""Label-curation benchmark: ``python -m benchmarks.bench_curation [--cells 1000000]``.

Times the writes and reads of :mod:`atlas.curation` on ``--cells`` cells with 30 labels
(pure storage; no atlas is built): the first edit (a new set from the atlas's labels), a
rename, a relabel of 5% of the cells (a lasso), reading the latest labels aligned to the
atlas's cell order (what the explorer does when a user switches version), and the size of
one version file. Results go to ``benchmarks/results/curation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from atlas import curation
from benchmarks._util import machine


def run(n_cells: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = np.array([f"S{i % 16:02d}_{i:08d}-1" for i in range(n_cells)], dtype=object)
    labels = pd.Series(
        np.array([f"type {k}" for k in range(30)], dtype=object)[rng.integers(0, 30, n_cells)],
        index=ids,
    )
    out: dict = {"n_cells": n_cells, "n_labels": 30}
    with tempfile.TemporaryDirectory() as d:

        def timed(key, fn):
            t = time.perf_counter()
            res = fn()
            out[key] = round(time.perf_counter() - t, 3)
            return res

        timed(
            "first_edit_s",
            lambda: curation.edit_labels(
                d,
                "bench",
                {"op": "rename", "from": "type 0", "to": "renamed 0"},
                user="bench",
                base_labels=labels,
                expected_version=0,
            ),
        )
        timed(
            "rename_s",
            lambda: curation.edit_labels(
                d, "bench", {"op": "rename", "from": "type 1", "to": "renamed 1"}, user="bench"
            ),
        )
        lasso = ids[rng.choice(n_cells, size=n_cells // 20, replace=False)]
        timed(
            "relabel_5pct_s",
            lambda: curation.edit_labels(
                d, "bench", {"op": "relabel", "cells": list(lasso), "to": "lasso"}, user="bench"
            ),
        )
        order = ids[rng.permutation(n_cells)]
        timed("read_aligned_s", lambda: curation.aligned_labels(d, "bench", None, ids))
        timed("read_aligned_shuffled_s", lambda: curation.aligned_labels(d, "bench", None, order))
        f = curation.set_dir(d, "bench") / curation.VERSION_FILE.format(3)
        out["version_file_mb"] = round(f.stat().st_size / 1e6, 2)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_curation")
    p.add_argument("--cells", type=int, nargs="+", default=[1_000_000])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results/curation.json"))
    args = p.parse_args(argv)
    cmd = "python -m benchmarks.bench_curation --cells " + " ".join(map(str, args.cells))
    load = round(os.getloadavg()[0], 1)
    res = {"machine": machine(), "command": cmd, "load_average_1m": load}
    res["results"] = [run(n) for n in args.cells]
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
