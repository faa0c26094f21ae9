"""Doublet calling on planted doublets: ``python -m benchmarks.bench_doublets``.

Simulated cohorts at 10x loading (0.8% doublets per 1,000 cells recovered), QC at its
defaults (``run_qc``), NAIVE samples only; per sample size and simulator seed: planted
doublets (two-lineage / one-lineage), calls, precision on all calls, recall of two-lineage
doublets (one-lineage doublets, e.g. two cells of the same CLL clone, are
expression-homotypic). Issue 15's target: precision and two-lineage recall each >= 0.7 at
1k, 5k and 15k cells per sample. Results: ``benchmarks/results/doublets.json``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks._util import save

DEFAULT = ((1000, 3, (3, 1, 2, 5)), (5000, 3, (3, 1)), (15000, 1, (3, 1)))


def one(n_cells: int, n_samples: int, seed: int) -> dict:
    import scipy.sparse as sp

    from atlas import schema
    from preprocessing.qc import run_qc
    from preprocessing.simulate import doublet_kind, simulate

    sim = simulate(
        seed=seed,
        n_patients=n_samples,
        conditions=("NAIVE", "IBR_RES"),
        cells_per_sample=n_cells,
        doublet_rate_per_1k=0.8,
    )
    a = sim.adata[sim.adata.obs[schema.OBS_CONDITION] == "NAIVE"].copy()
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    a.layers[schema.LAYER_COUNTS] = a.X.copy()
    a.uns[schema.UNS_SPECIES] = "human"
    t0 = time.perf_counter()
    run_qc(a, keep_all=True, seed=0)
    secs = time.perf_counter() - t0
    obs = a.obs
    db = obs["is_doublet"].to_numpy(bool)
    pair = obs["doublet_of"].map(doublet_kind).to_numpy()
    called = obs[schema.OBS_PREDICTED_DOUBLET].to_numpy(bool)
    cross = pair == "cross"
    return {
        "n_cells": n_cells,
        "n_samples": n_samples,
        "seed": seed,
        "planted": int(db.sum()),
        "two_lineage": int(cross.sum()),
        "called": int(called.sum()),
        "true_calls": int((called & db).sum()),
        "precision": round(float((called & db).sum() / max(called.sum(), 1)), 3),
        "recall_two_lineage": round(float((called & cross).sum() / max(cross.sum(), 1)), 3),
        "recall_all": round(float((called & db).sum() / max(db.sum(), 1)), 3),
        "qc_seconds": round(secs, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1k and 5k cells, one seed each")
    args = p.parse_args(argv)
    plan = ((1000, 3, (3,)), (5000, 1, (3,))) if args.quick else DEFAULT
    rows = []
    for n_cells, n_samples, seeds in plan:
        for seed in seeds:
            r = one(n_cells, n_samples, seed)
            rows.append(r)
            print(r, flush=True)
    summary = {}
    for n_cells in sorted({r["n_cells"] for r in rows}):
        rs = [r for r in rows if r["n_cells"] == n_cells]
        tp = sum(r["true_calls"] for r in rs)
        called = sum(r["called"] for r in rs)
        summary[n_cells] = {
            "precision": round(tp / max(called, 1), 3),
            "min_precision": min(r["precision"] for r in rs),
            "min_recall_two_lineage": min(r["recall_two_lineage"] for r in rs),
        }
    print(summary)
    cmd = "python -m benchmarks.bench_doublets" + (" --quick" if args.quick else "")
    print("wrote", save("doublets", {"command": cmd, "runs": rows, "summary": summary}))


if __name__ == "__main__":
    main()
