"""The same build in process and through a dask scheduler address: ``python -m benchmarks.bench_dask``.

Simulates a cohort, builds it twice with the default config (``tme-atlas build``): once in
process, once with ``compute.scheduler`` set to the address of a separately started
2-worker ``distributed.LocalCluster`` (the build connects to it as to a remote scheduler; its
per-sample QC runs on the workers). Compares the atlases: cells kept, doublet calls, cell-type
labels (identical fraction, ARI), Leiden clusters (ARI); wall time and per-stage seconds of
both. Results: ``benchmarks/results/dask.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from benchmarks._util import WORK, save


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells-per-sample", type=int, default=300)
    p.add_argument("--patients", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", type=Path, default=WORK / "dask")
    args = p.parse_args(argv)

    import anndata as ad
    import numpy as np
    from distributed import LocalCluster
    from sklearn.metrics import adjusted_rand_score

    from atlas import schema
    from atlas.config import load_config
    from preprocessing.pipeline import run_build
    from preprocessing.simulate import simulate, write_dataset

    shutil.rmtree(args.work, ignore_errors=True)
    data = args.work / "data"
    write_dataset(
        data,
        sim=simulate(seed=0, n_patients=args.patients, cells_per_sample=args.cells_per_sample),
    )
    sheet = data / "samplesheet.csv"
    runs = {}
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None)
    try:
        for name, scheduler in (("in_process", ""), ("dask_address", cluster.scheduler_address)):
            cfg = load_config(
                env={},
                overrides={"compute": {"scheduler": scheduler}, "scvi": {"torch_threads": 1}},
            )
            t0 = time.perf_counter()
            run_build(samplesheet=sheet, out=args.work / name, config=cfg)
            prov = json.loads((args.work / name / schema.PROVENANCE_FILE).read_text())
            runs[name] = {
                "seconds": round(time.perf_counter() - t0, 1),
                "stages": {k: v.get("seconds") for k, v in prov["stages"].items()},
            }
    finally:
        cluster.close()
    a, b = (ad.read_h5ad(args.work / n / schema.ATLAS_FILE) for n in runs)
    same_cells = list(a.obs_names) == list(b.obs_names)
    cmp = {"same_cells": same_cells, "n_cells": [int(a.n_obs), int(b.n_obs)]}
    if same_cells:
        ct_a, ct_b = (x.obs[schema.OBS_CELL_TYPE].astype(str).to_numpy() for x in (a, b))
        cmp["cell_type_identical"] = float(np.mean(ct_a == ct_b))
        cmp["cell_type_ari"] = round(float(adjusted_rand_score(ct_a, ct_b)), 4)
        leiden = [k for k in a.obs if k.startswith("leiden")]
        cmp["leiden_ari"] = {
            k: round(float(adjusted_rand_score(a.obs[k], b.obs[k])), 4)
            for k in leiden
            if k in b.obs
        }
        cmp["doublet_calls_equal"] = bool(
            (a.obs[schema.OBS_PREDICTED_DOUBLET] == b.obs[schema.OBS_PREDICTED_DOUBLET]).all()
        )
    result = {
        "command": "python -m benchmarks.bench_dask " + " ".join(argv or []),
        "n_cells_in": args.patients * 4 * args.cells_per_sample,
        "workers": args.workers,
        "runs": runs,
        "compare": cmp,
    }
    print(json.dumps(result, indent=2))
    print("wrote", save("dask", result))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
