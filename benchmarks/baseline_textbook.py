"""The textbook baseline a lab would otherwise run: scanpy + scvi-tools + LIANA defaults.

Same input as ``tme-atlas build`` (a samplesheet of 10x folders). Stages follow the scverse
tutorials: read + concat, QC thresholds, scrublet, normalise/log1p, seurat_v3 HVGs with a batch
key, PCA, ``SCVI(...).train()`` with scvi-tools' default epoch heuristic and batch size 128,
neighbours/UMAP/Leiden on ``X_scVI``, LIANA ``rank_aggregate`` with its defaults (1,000
permutations) per condition. The baseline has no annotation step; LIANA groups by the simulator's
true labels (given to it for free, so its timing is a lower bound).

Usage::

    python -m benchmarks.baseline_textbook SAMPLESHEET.csv --truth DIR/truth --out RESULT.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks._util import StageTimer

TRUE_LABEL = "true_cell_type"


def run(
    samplesheet: Path,
    *,
    truth_dir: Path | None,
    n_perms: int = 1000,
    threads: int | None = None,
    max_epochs: int | None = None,
    progress: Path | None = None,
) -> dict:
    import anndata as ad
    import pandas as pd
    import scanpy as sc
    import scvi
    import torch

    if threads:
        torch.set_num_threads(threads)
    scvi.settings.seed = 0
    timer = StageTimer(progress)
    sheet = pd.read_csv(samplesheet)
    base = Path(samplesheet).parent

    with timer.stage("read"):
        parts = []
        for row in sheet.itertuples(index=False):
            a = sc.read_10x_mtx(base / row.path, var_names="gene_symbols", make_unique=True)
            a.obs_names = [f"{row.sample_id}:{b}" for b in a.obs_names]
            for col in ("sample_id", "patient", "condition"):
                a.obs[col] = getattr(row, col)
            parts.append(a)
        adata = ad.concat(parts, join="outer", merge="same")
        adata.obs_names_make_unique()
    n_in = adata.n_obs

    with timer.stage("qc"):
        adata.var["mt"] = adata.var_names.str.upper().str.startswith("MT-")
        sc.pp.calculate_qc_metrics(adata, qc_vars=["mt"], inplace=True, percent_top=None)
        sc.pp.filter_cells(adata, min_genes=200)
        sc.pp.filter_genes(adata, min_cells=3)
        adata = adata[adata.obs["pct_counts_mt"] < 20].copy()

    with timer.stage("doublets"):
        sc.pp.scrublet(adata, batch_key="sample_id")
        adata = adata[~adata.obs["predicted_doublet"].astype(bool)].copy()

    with timer.stage("normalize_hvg_pca"):
        adata.layers["counts"] = adata.X.copy()
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        sc.pp.highly_variable_genes(
            adata, flavor="seurat_v3", n_top_genes=2000, batch_key="sample_id", layer="counts"
        )
        sc.pp.pca(adata, mask_var="highly_variable")

    with timer.stage("scvi"):
        hv = adata[:, adata.var["highly_variable"]].copy()
        scvi.model.SCVI.setup_anndata(hv, layer="counts", batch_key="sample_id")
        model = scvi.model.SCVI(hv)
        train_kwargs = {"enable_progress_bar": False}
        if max_epochs is not None:  # only for the harness smoke test on tiny data
            train_kwargs["max_epochs"] = max_epochs
        model.train(**train_kwargs)
        adata.obsm["X_scVI"] = model.get_latent_representation()
        epochs = int(model.history["elbo_train"].shape[0])

    with timer.stage("neighbors_umap_leiden"):
        sc.pp.neighbors(adata, use_rep="X_scVI")
        sc.tl.umap(adata)
        sc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False)

    label_key = None
    if truth_dir is not None:
        truth = pd.read_csv(Path(truth_dir) / "cells.csv", index_col=0)
        adata.obs[TRUE_LABEL] = truth["cell_type"].reindex(adata.obs_names).astype(str).values
        label_key = TRUE_LABEL

    n_interactions = 0
    if label_key is not None:
        import liana as li

        with timer.stage("liana"):
            for cond in adata.obs["condition"].unique():
                sub = adata[
                    (adata.obs["condition"] == cond) & (adata.obs[label_key] != "Doublet")
                ].copy()
                li.mt.rank_aggregate(
                    sub,
                    groupby=label_key,
                    resource_name="consensus",
                    use_raw=False,
                    n_perms=n_perms,
                    verbose=False,
                )
                n_interactions += len(sub.uns["liana_res"])

    quality = {}
    if label_key is not None:
        from preprocessing.integrate import integration_metrics

        keep = adata.obs[label_key] != "Doublet"
        metrics = integration_metrics(
            adata[keep].copy(), batch_key="sample_id", label_key=label_key
        )
        quality = {f"{r.embedding}:{r.metric}": float(r.value) for r in metrics.itertuples()}

    return {
        "pipeline": "textbook",
        "n_cells_in": int(n_in),
        "n_cells_out": int(adata.n_obs),
        "scvi_epochs": epochs,
        "n_interactions": n_interactions,
        "stages": timer.stages,
        "total_seconds": timer.total(),
        "quality": quality,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("samplesheet", type=Path)
    p.add_argument("--truth", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-perms", type=int, default=1000)
    p.add_argument("--threads", type=int, default=int(os.environ.get("TME_BENCH_THREADS", 0)))
    p.add_argument("--max-epochs", type=int, default=None)
    args = p.parse_args(argv)
    result = run(
        args.samplesheet,
        truth_dir=args.truth,
        n_perms=args.n_perms,
        threads=args.threads or None,
        max_epochs=args.max_epochs,
        progress=args.out,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "quality"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
