"""Spatial benchmark: ``python -m benchmarks.bench_spatial --atlas DIR [--cells N]
[--sections N] [--seed S]``.

Simulates ``--sections`` lymph-node sections of ``--cells`` cells in all
(:mod:`preprocessing.spatial_sim`; default 500,000 cells in 12 sections: 4 patients x 3
states), then runs ``tme-atlas spatial`` on them against the atlas ``DIR`` in a subprocess and
records wall seconds, peak RSS of the process tree, the per-step timings of its
``meta.json``, and the typing accuracy against the simulated truth. Results:
``benchmarks/results/spatial.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from benchmarks._util import WORK, run_measured, save


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_spatial")
    p.add_argument("--atlas", required=True, metavar="DIR")
    p.add_argument("--cells", type=int, default=500_000)
    p.add_argument("--patients", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    import pandas as pd

    from atlas import schema
    from preprocessing.spatial_sim import DEFAULT_CONDITIONS, write_spatial_dataset

    n_sections = args.patients * len(DEFAULT_CONDITIONS)
    per = args.cells // n_sections
    data = WORK / f"spatial_{args.cells}"
    t0 = time.perf_counter()
    write_spatial_dataset(data, seed=args.seed, n_patients=args.patients, cells_per_section=per)
    sim_s = time.perf_counter() - t0
    out = WORK / f"spatial_{args.cells}_out"
    cmd = [
        sys.executable, "-m", "tme_atlas", "spatial", str(data / "samplesheet.csv"),
        "--atlas", args.atlas, "--out", str(out),
        "--interactions", str(data / "truth" / "spatial_lr.csv"),
    ]  # fmt: skip
    run = run_measured(cmd)
    result = {
        "cells_requested": args.cells,
        "sections": n_sections,
        "simulate_seconds": round(sim_s, 1),
    }
    result.update(run)
    if run["rc"] == 0:
        meta = json.loads((out / schema.SPATIAL_META_FILE).read_text())
        result["n_cells"] = meta["n_cells"]
        result["n_genes"] = meta["n_genes"]
        result["timings_s"] = meta["timings_s"]
        cells = pd.read_parquet(out / schema.SPATIAL_CELLS_FILE)
        truth = pd.read_csv(data / "truth" / "cells.csv", usecols=["cell_id", "true_cell_type"])
        true = truth.set_index("cell_id").loc[cells.index, "true_cell_type"]
        result["typing_accuracy"] = round(float((cells[schema.OBS_CELL_TYPE] == true).mean()), 4)
    path = save("spatial", {"argv": sys.argv[1:] if argv is None else argv, **result})
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0 if run["rc"] == 0 else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
