"""Analyses-stage benchmark: ``python -m benchmarks.bench_analyses [--atlas DIR] [--stock]``.

Runs :func:`preprocessing.analyses.run_analyses` (composition, pseudobulk DESeq2,
programmes) on the default demo cohort (``simulate(seed=0)``: 4 patients x 4 states,
16 cell types, ~3,100 genes) with the simulator's true labels -- and, with ``--atlas``
(and ``--truth`` the simulated cohort it was built from), on a built atlas with its own
annotation -- and records wall and CPU seconds, peak RSS
and the recovery of the planted truth. ``--stock`` also times pydeseq2's stock per-gene
backend (``de_engine="pydeseq2"``) on the same data. Target: the stage under 1 minute on
2 cores. Results: ``benchmarks/results/analyses.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from benchmarks._util import StageTimer, save


def _prepare(sim):
    """Simulation -> what the build hands to ``analyses`` (true labels, QC-clean cells)."""
    import scanpy as sc

    from atlas import schema

    obs = sim.adata.obs
    a = sim.adata[~(obs["is_doublet"].to_numpy() | obs["low_quality"].to_numpy())].copy()
    a.layers[schema.LAYER_COUNTS] = a.X.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    a.obs[schema.OBS_CELL_TYPE] = a.obs["true_cell_type"].astype(str).astype("category")
    a.uns[schema.UNS_CONDITION_ORDER] = list(sim.params["conditions"])
    a.uns[schema.UNS_REFERENCE_CONDITION] = sim.params["reference"]
    return a


def _timed(timer: StageTimer, name: str, adata, truth, **kw) -> dict:
    from atlas.tables import get_tables
    from preprocessing.analyses import run_analyses, score_against_truth

    c0 = time.process_time()
    with timer.stage(name), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tables = get_tables(run_analyses(adata, **kw))
    cpu = time.process_time() - c0
    score = score_against_truth(tables, truth)
    entry = {
        **timer.stages[name],
        "cpu_seconds": round(cpu, 2),
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "n_de_rows": int(len(tables["de"])),
        **{k: v for k, v in score.items() if not isinstance(v, list)},
    }
    print(name, entry, flush=True)
    return entry


def run(*, atlas: str | None = None, truth: str | None = None, stock: bool = False) -> dict:
    from preprocessing.simulate import load_truth, simulate

    timer = StageTimer()
    sim = simulate(seed=0)
    adata = _prepare(sim)
    res = {"true_labels": _timed(timer, "true_labels", adata, sim.truth)}
    if stock:
        res["true_labels_stock_pydeseq2"] = _timed(
            timer, "stock", adata, sim.truth, de_engine="pydeseq2"
        )
    if atlas:
        from atlas.store import read_atlas_adata

        a = read_atlas_adata(atlas)
        # the atlas must be built from the seed-0 demo cohort (``--truth`` its folder)
        t = load_truth(truth) if truth else sim.truth
        res["own_annotation"] = _timed(timer, "own_annotation", a, t)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_analyses")
    p.add_argument("--atlas", metavar="DIR", help="also run on a built demo atlas")
    p.add_argument(
        "--truth", metavar="SIMDIR", help="the simulated cohort the atlas was built from"
    )
    p.add_argument("--stock", action="store_true", help="also time pydeseq2's stock backend")
    args = p.parse_args(argv)
    res = run(atlas=args.atlas, truth=args.truth, stock=args.stock)
    print(f"wrote {save('analyses', {'command': ' '.join(sys.argv), 'runs': res})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
