"""Strong per-sample batch effect: our scVI budget vs the textbook scVI run, in one run.

``python -m benchmarks.bench_strong_batch [--patients 4] [--cells-per-sample 150] [--sd 0.6]``

Simulates a cohort (:func:`preprocessing.simulate.simulate`) with a strong per-sample batch
effect on top (:func:`preprocessing.simulate.add_sample_batch_effect`), drops planted doublets
and low-quality cells, normalises and selects HVGs once, then trains on the same cells and
HVGs (one after the other, same torch threads):

* ``ours``: :func:`preprocessing.integrate.run_scvi` with the default config (budget grown
  with batch strength, KL warm-up within the budget, validation-ELBO plateau stopping);
* ``textbook``: ``scvi.model.SCVI(hv).train()`` with scvi-tools' defaults (epoch heuristic,
  batch 128, KL warm-up over 400 epochs).

Quality with scib-metrics (:func:`preprocessing.integrate.scib_integration_metrics`) and the
simulator's true labels (never read by either model): mixing of *patients* within
non-malignant types (``ilisi_within_label``), kNN purity of the true labels, and the rest of
the table. Wall and CPU seconds of the training. Writes ``benchmarks/results/strong_batch.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from benchmarks._util import RESULTS, machine, save


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=4)
    p.add_argument("--cells-per-sample", type=int, default=150)
    p.add_argument("--sd", type=float, default=0.6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--textbook-max-epochs", type=int, default=None, help="smoke tests only")
    p.add_argument("--ours-max-steps", type=int, default=None, help="smoke tests only")
    p.add_argument("--ours-min-steps", type=int, default=None, help="override scvi.min_steps")
    p.add_argument(
        "--reuse-textbook",
        default=None,
        help="results name of an earlier run on the same cohort: reuse its textbook embedding "
        "and timings instead of training it again",
    )
    p.add_argument("--out", default="strong_batch")
    args = p.parse_args(argv)

    import scvi
    import torch

    from atlas import schema
    from preprocessing.integrate import (
        batch_strength,
        compute_pca,
        normalize,
        run_scvi,
        scib_integration_metrics,
        select_hvg,
    )
    from preprocessing.simulate import CLL_TYPES, add_sample_batch_effect, simulate

    sim = add_sample_batch_effect(
        simulate(seed=0, n_patients=args.patients, cells_per_sample=args.cells_per_sample),
        sd=args.sd,
    )
    a = sim.adata
    a = a[~a.obs["is_doublet"].astype(bool) & ~a.obs["low_quality"].astype(bool)].copy()
    normalize(a)
    select_hvg(a, species="human")
    compute_pca(a)
    strength = batch_strength(a, batch_key=schema.OBS_SAMPLE)

    result: dict = {
        "command": "python -m benchmarks.bench_strong_batch " + " ".join(argv or sys.argv[1:]),
        "machine": machine(),
        "n_cells": int(a.n_obs),
        "n_samples": int(a.obs[schema.OBS_SAMPLE].nunique()),
        "sample_batch_sd": args.sd,
        "batch_strength_pca": round(strength, 4),
    }

    def timed(fn):
        t, c = time.perf_counter(), time.process_time()
        fn()
        return round(time.perf_counter() - t, 1), round(time.process_time() - c, 1)

    # ours
    over = {"torch_threads": args.threads}
    if args.ours_max_steps:
        over.update(max_steps=args.ours_max_steps, min_steps=0)
    if args.ours_min_steps is not None:
        over.update(min_steps=args.ours_min_steps)
    wall, cpu = timed(lambda: run_scvi(a, **over))
    prm = a.uns[schema.params_key("integrate")]
    result["ours"] = {
        "train_wall_s": wall,
        "train_cpu_s": cpu,
        **{k: prm[k] for k in ("budget_steps", "budget_factor", "steps_trained", "epochs_trained",
                               "early_stopped", "batch_size", "kl_warmup_steps")},
    }  # fmt: skip
    a.obsm["X_ours"] = a.obsm[schema.OBSM_SCVI]

    if args.reuse_textbook:
        prev = json.loads((RESULTS / f"{args.reuse_textbook}.json").read_text())
        emb = np.load(RESULTS / f"{args.reuse_textbook}_embeddings.npz", allow_pickle=False)
        if list(emb["obs_names"]) != list(a.obs_names):
            raise SystemExit("--reuse-textbook: the earlier run was on other cells")
        a.obsm["X_textbook"] = emb["textbook"]
        result["textbook"] = {**prev["textbook"], "reused_from": args.reuse_textbook}
        wall, cpu = prev["textbook"]["train_wall_s"], prev["textbook"]["train_cpu_s"]
    else:
        # textbook: scvi-tools defaults on the same cells and HVGs
        torch.set_num_threads(args.threads)
        scvi.settings.seed = 0
        hv = a[:, a.var[schema.VAR_HVG].to_numpy(bool)].copy()
        scvi.model.SCVI.setup_anndata(hv, layer=schema.LAYER_COUNTS, batch_key=schema.OBS_SAMPLE)
        model = scvi.model.SCVI(hv)
        kw = {"enable_progress_bar": False}
        if args.textbook_max_epochs:
            kw["max_epochs"] = args.textbook_max_epochs
        wall, cpu = timed(lambda: model.train(**kw))
        a.obsm["X_textbook"] = model.get_latent_representation()
        result["textbook"] = {
            "train_wall_s": wall,
            "train_cpu_s": cpu,
            "epochs_trained": int(model.history["elbo_train"].shape[0]),
        }
    result["ratio_train_wall"] = round(result["ours"]["train_wall_s"] / wall, 3)
    result["ratio_train_cpu"] = round(result["ours"]["train_cpu_s"] / cpu, 3)

    np.savez_compressed(  # to re-score without retraining
        RESULTS / f"{args.out}_embeddings.npz",
        ours=a.obsm["X_ours"],
        textbook=a.obsm["X_textbook"],
        pca=a.obsm[schema.OBSM_PCA],
        obs_names=a.obs_names.to_numpy(str),
    )
    # quality: simulator truth labels; mixing of patients within non-malignant types
    truth = a.obs["true_cell_type"].astype(str).to_numpy()
    nonmal = ~np.isin(truth, list(CLL_TYPES))
    embs = [schema.OBSM_PCA, "X_ours", "X_textbook"]
    allm = scib_integration_metrics(
        a, batch_key=schema.OBS_SAMPLE, label_key="true_cell_type", embeddings=embs
    )
    nm = scib_integration_metrics(
        a[nonmal].copy(), batch_key="patient", label_key="true_cell_type", embeddings=embs
    )
    for name, key in (("pca", schema.OBSM_PCA), ("ours", "X_ours"), ("textbook", "X_textbook")):
        q = {
            f"{r.metric}": round(float(r.value), 4)
            for r in allm[allm.embedding == key].itertuples()
        }
        q["patient_mixing_nonmalignant"] = round(
            float(nm[(nm.embedding == key) & (nm.metric == "ilisi_within_label")].value.iloc[0]), 4
        )
        result.setdefault("quality", {})[name] = q
    qo, qt = result["quality"]["ours"], result["quality"]["textbook"]
    result["done_when"] = {
        "mixing_gap": round(qt["patient_mixing_nonmalignant"] - qo["patient_mixing_nonmalignant"], 4),
        "purity_gap": round(qt["knn_purity"] - qo["knn_purity"], 4),
        "mixing_within_0.05": bool(qt["patient_mixing_nonmalignant"] - qo["patient_mixing_nonmalignant"] <= 0.05),
        "purity_within_0.01": bool(qt["knn_purity"] - qo["knn_purity"] <= 0.01),
        "wall_le_0.3x": bool(result["ratio_train_wall"] <= 0.3),
    }  # fmt: skip
    path = save(args.out, result)
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
