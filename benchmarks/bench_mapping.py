"""Held-out patient: ``tme-atlas map`` onto an atlas of the other patients vs a full rebuild.

``python -m benchmarks.bench_mapping [--patients 4] [--cells-per-sample 1100] [--absent TYPE]``

Simulates the cohort as ``tme-atlas simulate --seed 0`` does (the demo by default), then, each
as its own process (``python -m tme_atlas ...``, wall time and peak RSS of the process tree):

* ``rebuild``: ``tme-atlas build`` on every sample (what a new patient costs without mapping);
* ``reference``: ``tme-atlas build`` on all samples but the last patient's;
* ``map``: ``tme-atlas map`` of the held-out patient's samples onto that reference.

Scored against the simulator's truth on the held-out patient's cells that are neither planted
doublets nor low-quality: label accuracy of the map and of the rebuild (same cells), mixing of
query and reference cells (the query atlas's ``integration_metrics``: kNN ``origin`` entropy
within labels in the scANVI latent), kNN agreement of query labels with the reference cells
around them on the UMAP, and the time ratio map / rebuild.

``--absent TYPE`` also builds a reference without the cells of ``TYPE`` (all patients but the
held-out one) and maps the held-out patient onto it: the fraction of its ``TYPE`` cells called
``Unknown``. Writes ``benchmarks/results/mapping.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._util import WORK, run_measured, save


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tme_atlas", *args]


def _clean(truth: pd.DataFrame, names) -> pd.DataFrame:
    t = truth.reindex(names)
    t = t[t["cell_type"].notna().to_numpy()]
    return t[~(t["is_doublet"].astype(bool) | t["low_quality"].astype(bool)).to_numpy()]


def _score_query(q_dir: Path, truth: pd.DataFrame, absent: str | None) -> dict:
    import anndata as ad
    from sklearn.neighbors import KNeighborsClassifier

    from atlas import schema

    a = ad.read_h5ad(q_dir / schema.ATLAS_FILE)
    origin = a.obs[schema.OBS_ORIGIN].astype(str)
    q = a[origin.eq(schema.ORIGIN_QUERY).to_numpy()]
    r = a[origin.eq(schema.ORIGIN_REFERENCE).to_numpy()]
    t = _clean(truth, q.obs_names)
    pred = q.obs.loc[t.index, schema.OBS_CELL_TYPE].astype(str)
    known = t["cell_type"].ne(absent).to_numpy() if absent else np.ones(len(t), bool)
    out = {
        "n_query_cells": int(q.n_obs),
        "accuracy": float((pred[known] == t.loc[known, "cell_type"]).mean()),
        "accuracy_transferred": float(
            (
                q.obs.loc[t.index, schema.OBS_TRANSFERRED_LABEL].astype(str)[known]
                == t.loc[known, "cell_type"]
            ).mean()
        ),  # fmt: skip
        "unknown_fraction": float(pred[known].eq(schema.UNKNOWN).mean()),
        "median_uncertainty": float(np.median(q.obs[schema.OBS_LABEL_UNCERTAINTY])),
    }
    if absent:
        m = t["cell_type"].eq(absent).to_numpy()
        out["absent_type"] = absent
        out["absent_n"] = int(m.sum())
        out["absent_unknown_fraction"] = float(pred[m].eq(schema.UNKNOWN).mean())
        out["absent_called_as"] = {str(k): int(v) for k, v in pred[m].value_counts().items()}
    metrics = pd.DataFrame(a.uns[schema.UNS_TABLES][schema.TABLE_INTEGRATION_METRICS])
    out["mixing"] = {str(k): float(v) for k, v in metrics.set_index("metric")["value"].items()}
    ok = pred.ne(schema.UNKNOWN).to_numpy()
    knn = KNeighborsClassifier(15).fit(r.obsm[schema.OBSM_UMAP], r.obs[schema.OBS_CELL_TYPE])
    xy = q[t.index].obsm[schema.OBSM_UMAP][ok]
    out["umap_knn_agreement"] = float((knn.predict(xy) == pred[ok].to_numpy()).mean())
    out["mapping_json"] = json.loads((q_dir / schema.MAPPING_FILE).read_text())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=4)
    p.add_argument("--cells-per-sample", type=int, default=1100)
    p.add_argument("--absent", default=None, metavar="TYPE")
    p.add_argument("--skip-rebuild", action="store_true", help="reuse an earlier rebuild")
    p.add_argument("--out", default="mapping")
    args = p.parse_args(argv)

    import anndata as ad

    from atlas import schema
    from preprocessing.ingest import ingest
    from preprocessing.simulate import load_truth, write_dataset

    work = WORK / "mapping"
    data = work / "data"
    if not (data / "samplesheet.csv").is_file():
        shutil.rmtree(data, ignore_errors=True)
        write_dataset(
            data,
            seed=0,
            n_patients=args.patients,
            cells_per_sample=args.cells_per_sample,
            vdj=True,
            lesions=True,
        )
    sheet = pd.read_csv(data / "samplesheet.csv", keep_default_na=False)
    held = sorted(sheet[schema.SHEET_PATIENT].unique())[-1]
    sheet[sheet[schema.SHEET_PATIENT] != held].to_csv(data / "reference.csv", index=False)
    sheet[sheet[schema.SHEET_PATIENT] == held].to_csv(data / "query.csv", index=False)
    truth = load_truth(data)["cells"].set_index("cell_id")
    res: dict = {"held_out_patient": held, "patients": args.patients,
                 "cells_per_sample": args.cells_per_sample}  # fmt: skip

    rebuild = work / "rebuild"
    if not (args.skip_rebuild and (rebuild / schema.ATLAS_FILE).is_file()):
        shutil.rmtree(rebuild, ignore_errors=True)
        res["rebuild"] = run_measured(
            _cli("build", str(data / "samplesheet.csv"), "--out", str(rebuild))
        )
    full = ad.read_h5ad(rebuild / schema.ATLAS_FILE, backed="r")
    obs = full.obs[full.obs[schema.OBS_PATIENT].astype(str) == held]
    tf = _clean(truth, obs.index)
    res["rebuild_accuracy"] = float((obs.loc[tf.index, schema.OBS_CELL_TYPE].astype(str)
                                     == tf["cell_type"]).mean())  # fmt: skip
    if args.absent:
        m = tf["cell_type"].ne(args.absent).to_numpy()
        res["rebuild_accuracy_without_absent"] = float(
            (obs.loc[tf.index[m], schema.OBS_CELL_TYPE].astype(str) == tf["cell_type"][m]).mean()
        )
    res["rebuild_seconds"] = json.loads((rebuild / schema.PROVENANCE_FILE).read_text())[
        "total_seconds"
    ]

    ref = work / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    res["reference"] = run_measured(_cli("build", str(data / "reference.csv"), "--out", str(ref)))
    q_dir = work / "query"
    shutil.rmtree(q_dir, ignore_errors=True)
    res["map"] = run_measured(
        _cli("map", str(data / "query.csv"), "--atlas", str(ref), "--out", str(q_dir))
    )
    res["held_out"] = _score_query(q_dir, truth, None)
    res["accuracy_ratio"] = res["held_out"]["accuracy"] / res["rebuild_accuracy"]
    if "rebuild" in res:
        res["time_ratio"] = res["map"]["seconds"] / res["rebuild"]["seconds"]

    save(args.out, res)  # the held-out part, in case the rest is interrupted
    print(json.dumps({k: v for k, v in res.items() if k != "held_out"}, indent=1), flush=True)
    print(json.dumps(res["held_out"], indent=1, default=str)[:3000], flush=True)
    if args.absent:
        refa = work / "reference_absent"
        shutil.rmtree(refa, ignore_errors=True)
        a = ingest(data / "reference.csv").adata
        drop = truth.reindex(a.obs_names)["cell_type"].astype(str).eq(args.absent).to_numpy()
        a = a[~drop].copy()
        a.uns.pop(schema.UNS_TABLES, None)
        a.write_h5ad(work / "reference_absent.h5ad")
        res["reference_absent"] = run_measured(
            _cli("build", "--h5ad", str(work / "reference_absent.h5ad"), "--out", str(refa))
        )
        qa = work / "query_absent"
        shutil.rmtree(qa, ignore_errors=True)
        res["map_absent"] = run_measured(
            _cli("map", str(data / "query.csv"), "--atlas", str(refa), "--out", str(qa))
        )
        res["absent"] = _score_query(qa, truth, args.absent)
    path = save(args.out, res)
    print(json.dumps({k: v for k, v in res.items() if k not in ("held_out", "absent")}, indent=1))
    print(json.dumps(res["held_out"], indent=1, default=str)[:3000])
    if "absent" in res:
        print(json.dumps(res["absent"], indent=1, default=str)[:3000])
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
