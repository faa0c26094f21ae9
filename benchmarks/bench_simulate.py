"""Simulator benchmark: ``python -m benchmarks.bench_simulate [--sizes N ...]``.

For each size (total cells; 4 patients x 4 states), runs ``simulate`` + ``write_dataset`` in a
fresh subprocess and records wall time (split into simulate / write), peak RSS of the process
(sampled, MB) and the size on disk. Targets: default demo size (~17.6k cells) under 1 minute,
100k cells under 5 minutes, peak memory under 4 GB. Results: ``benchmarks/results/simulate.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from benchmarks._util import WORK, run_measured, save

DEFAULT_SIZES = (17_600, 100_000)


def _one(n_cells: int, out: Path, seed: int = 0) -> dict:
    """Simulate and write one cohort in this process (called in the child)."""
    import resource

    from preprocessing.simulate import simulate, write_dataset

    per_sample = max(10, math.ceil(n_cells / 16))
    t0 = time.perf_counter()
    sim = simulate(seed=seed, n_patients=4, cells_per_sample=per_sample)
    t1 = time.perf_counter()
    write_dataset(out, sim=sim)
    t2 = time.perf_counter()
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "n_cells": int(sim.adata.n_obs),
        "n_genes": int(sim.adata.n_vars),
        "nnz": int(sim.adata.X.nnz),
        "simulate_seconds": round(t1 - t0, 2),
        "write_seconds": round(t2 - t1, 2),
        "disk_mb": round(size / 2**20, 1),
        "ru_maxrss_mb": round(ru.ru_maxrss / 1024),
        # CPU seconds of the whole child (import included): wall time on a shared machine
        # overstates the cost, CPU time does not
        "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 2),
    }


def run(n_cells_list=DEFAULT_SIZES, *, keep: bool = False) -> dict:
    """Benchmark each size in a subprocess; returns ``{size: {seconds, peak_mb, ...}}``."""
    results = {}
    WORK.mkdir(parents=True, exist_ok=True)
    for n in n_cells_list:
        out = WORK / f"simbench_{n}"
        info = WORK / f"simbench_{n}.json"
        shutil.rmtree(out, ignore_errors=True)
        m = run_measured(
            [
                sys.executable,
                "-m",
                "benchmarks.bench_simulate",
                "--child",
                str(n),
                str(out),
                str(info),
            ],  # fmt: skip
            env={"OMP_NUM_THREADS": "1", "TME_ATLAS_NO_PROGRESS": "1"},
        )
        entry = {"seconds": m["seconds"], "peak_mb": m["peak_mb"], "rc": m["rc"]}
        # a shared machine inflates wall time: record how busy it was
        entry["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
        if m["rc"] == 0:
            entry.update(json.loads(info.read_text()))
        results[str(n)] = entry
        print(json.dumps({n: entry}), flush=True)
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_simulate")
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    p.add_argument("--keep", action="store_true", help="keep the written cohorts")
    p.add_argument("--child", nargs=3, metavar=("N", "OUT", "INFO"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        n, out, info = args.child
        Path(info).write_text(json.dumps(_one(int(n), Path(out))))
        return 0
    res = run(args.sizes, keep=args.keep)
    print(f"wrote {save('simulate', {'command': ' '.join(sys.argv), 'sizes': res})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
