"""Analyses-stage benchmark: ``python -m benchmarks.bench_analyses [--atlas DIR] [--stock]
[--n-cpus N]``.

Runs :func:`preprocessing.analyses.run_analyses` (composition, pseudobulk DESeq2,
programmes) on the default demo cohort (``simulate(seed=0)``: 4 patients x 4 states,
16 cell types, ~3,100 genes) with the simulator's true labels -- and, with ``--atlas``
(and ``--truth`` the simulated cohort it was built from), on a built atlas with its own
annotation -- and records wall and CPU seconds, peak RSS
and the recovery of the planted truth. ``--stock`` also runs pydeseq2's stock per-gene
backend (``de_engine="pydeseq2"``) on the same data and compares the two DE tables on
every tested gene (identical calls at padj < 0.05, same genes filtered, largest
relative differences of log2FC / lfcSE / p / padj). ``--n-cpus N`` repeats the DE with
cell types fitted in N parallel processes (wall seconds; CPU of the workers is not in
``cpu_seconds``). Target: the stage under 1 minute on 2 cores. Results:
``benchmarks/results/analyses.json``.
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


def _timed(timer: StageTimer, name: str, adata, truth, *, tables_out=None, **kw) -> dict:
    from atlas.tables import get_tables
    from preprocessing.analyses import PARAMS_KEY, run_analyses, score_against_truth

    c0 = time.process_time()
    with timer.stage(name), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tables = get_tables(run_analyses(adata, **kw))
    cpu = time.process_time() - c0
    if tables_out is not None:
        tables_out[name] = tables
    score = score_against_truth(tables, truth)
    entry = {
        **timer.stages[name],
        "cpu_seconds": round(cpu, 2),
        "de_wall_seconds": round(float(adata.uns[PARAMS_KEY]["timings_s"]["de"]), 2),
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "n_de_rows": int(len(tables["de"])),
        **{k: v for k, v in score.items() if not isinstance(v, list)},
    }
    print(name, entry, flush=True)
    return entry


def compare_de(fast, stock) -> dict:
    """Fast vs stock DE tables on every tested (cell type, gene, condition)."""
    import numpy as np

    key = ["cell_type", "gene", "condition"]
    m = fast.merge(stock, on=key, suffixes=("_f", "_s"), how="outer", indicator=True)
    out = {"rows": int(len(m)), "rows_in_one_only": int((m["_merge"] != "both").sum())}
    for col in ("log2fc", "lfcse", "pvalue", "padj"):
        a, b = m[f"{col}_f"].to_numpy(float), m[f"{col}_s"].to_numpy(float)
        out[f"{col}_nan_mismatch"] = int((np.isnan(a) != np.isnan(b)).sum())
        ok = np.isfinite(a) & np.isfinite(b)
        rel = np.abs(a[ok] - b[ok]) / np.maximum(np.abs(b[ok]), 1e-300)
        out[f"{col}_max_rel_diff"] = float(rel.max()) if ok.any() else 0.0
        out[f"{col}_bit_identical"] = float(np.mean(a[ok] == b[ok])) if ok.any() else 1.0
    sf, ss = m["padj_f"] < 0.05, m["padj_s"] < 0.05
    out["calls_fast"], out["calls_stock"] = int(sf.sum()), int(ss.sum())
    out["calls_differing"] = int((sf != ss).sum())
    return out


def run(
    *,
    atlas: str | None = None,
    truth: str | None = None,
    stock: bool = False,
    n_cpus: int = 1,
) -> dict:
    from atlas.config import AnalysesConfig
    from preprocessing.simulate import load_truth, simulate

    timer = StageTimer()
    sim = simulate(seed=0)
    adata = _prepare(sim)
    tabs: dict = {}
    res = {"true_labels": _timed(timer, "true_labels", adata, sim.truth, tables_out=tabs)}
    if stock:
        res["true_labels_stock_pydeseq2"] = _timed(
            timer, "stock", adata, sim.truth, de_engine="pydeseq2", tables_out=tabs
        )
        res["fast_vs_stock_de"] = compare_de(tabs["true_labels"]["de"], tabs["stock"]["de"])
        print("fast vs stock DE", res["fast_vs_stock_de"], flush=True)
    if n_cpus > 1:
        cfg = AnalysesConfig(n_cpus=n_cpus)
        res[f"true_labels_n_cpus_{n_cpus}"] = _timed(
            timer, f"fast_n{n_cpus}", adata, sim.truth, config=cfg
        )
        if stock:
            res[f"true_labels_stock_pydeseq2_n_cpus_{n_cpus}"] = _timed(
                timer, f"stock_n{n_cpus}", adata, sim.truth, config=cfg, de_engine="pydeseq2"
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
    p.add_argument("--n-cpus", type=int, default=1, help="also time N parallel cell-type fits")
    args = p.parse_args(argv)
    res = run(atlas=args.atlas, truth=args.truth, stock=args.stock, n_cpus=args.n_cpus)
    print(f"wrote {save('analyses', {'command': ' '.join(sys.argv), 'runs': res})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
