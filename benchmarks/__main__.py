"""Benchmark harness: ``python -m benchmarks [--quick | --smoke] [--sizes N ...]``.

Runs, on one machine in one run:

* ``build``: ``tme-atlas build`` on simulated cohorts of the given sizes (per-stage wall time
  and peak memory from the build's provenance, whole-process peak RSS sampled here), and the
  textbook baseline (:mod:`benchmarks.baseline_textbook`) on the same data beside it, with the
  integration quality of both (same metrics, simulator's true labels);
* ``store``: :mod:`benchmarks.bench_store` (atlas open time, resident memory and per-gene
  reads at 100k and 1M cells; 20k with ``--quick``);
* ``load``: :mod:`benchmarks.bench_load` (20 concurrent clients against gunicorn; 10 s with
  ``--quick``);
* ``callbacks``: :mod:`benchmarks.bench_callbacks` (server time and bytes per explorer action
  at 100k and 1M cells);
* ``browser``: :mod:`benchmarks.bench_browser` (headless Chromium: first load, gene choice to
  repaint; skipped when Chromium is missing);
* ``cellxgene``: :mod:`benchmarks.bench_cellxgene` (``cellxgene launch`` on the same atlas,
  in its own virtualenv: ready time, memory, gene fetch; as a ratio).

Results go to ``benchmarks/results/*.json``; ``benchmarks/RESULTS.md`` quotes them with the
command that produced them. ``--quick`` keeps everything under ~10 minutes; ``--smoke`` is the
seconds-long variant the test suite runs so the harness cannot rot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

from benchmarks._util import RESULTS, WORK, machine, run_measured, save

TRUE_LABEL = "true_cell_type"
SUBS = ("build", "store", "load", "callbacks", "browser", "cellxgene")


def _simulate(n_cells: int, out: Path, *, seed: int = 0) -> Path:
    """Simulate a cohort of about ``n_cells`` cells (4 patients x 4 states) into ``out``."""
    from preprocessing.simulate import write_dataset

    sheet = out / "samplesheet.csv"
    if sheet.is_file():
        return sheet
    n_patients = 4 if n_cells >= 4000 else 2
    per_sample = max(50, math.ceil(n_cells / (n_patients * 4)))
    write_dataset(out, seed=seed, n_patients=n_patients, cells_per_sample=per_sample)
    return sheet


def _stage_table(provenance: dict) -> dict:
    """Per-stage timings from a build's provenance (``{stage: {seconds, peak_mb}}``)."""
    raw = provenance.get("timings") or provenance.get("stages") or {}
    out = {}
    for stage, val in raw.items():
        if isinstance(val, dict):
            out[stage] = {"seconds": val.get("seconds")}
            peak = val.get("peak_mb", val.get("peak_rss_mb"))
            if peak is not None:
                out[stage]["peak_mb"] = peak
        else:
            out[stage] = {"seconds": float(val)}
    return out


def _quality(atlas_dir: Path, truth_dir: Path) -> dict:
    import anndata as ad
    import pandas as pd

    from atlas import schema
    from preprocessing.integrate import integration_metrics

    adata = ad.read_h5ad(atlas_dir / schema.ATLAS_FILE)
    truth = pd.read_csv(truth_dir / "cells.csv", index_col=0)
    adata.obs[TRUE_LABEL] = truth["cell_type"].reindex(adata.obs_names).astype(str).values
    keep = adata.obs[TRUE_LABEL] != "Doublet"
    metrics = integration_metrics(
        adata[keep].copy(), batch_key=schema.OBS_SAMPLE, label_key=TRUE_LABEL
    )
    return {f"{r.embedding}:{r.metric}": float(r.value) for r in metrics.itertuples()}


def _save_merged(name: str, results: dict) -> Path:
    """Save ``results`` (per size) into ``RESULTS/<name>.json``, keeping the other sizes an
    earlier run of the same name recorded (each size says when and how it was measured)."""
    path = RESULTS / f"{name}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    sizes = {**old.get("sizes", {}), **results}
    return save(name, {"command": " ".join(sys.argv), "sizes": sizes})


def bench_build(
    sizes: list[int], *, baseline_max_cells: int, smoke: bool = False, save_as: str | None = None
) -> dict:
    threads = os.environ.get("TME_BENCH_THREADS", "2")
    env = {
        "TME_ATLAS__SCVI__TORCH_THREADS": threads,
        "OMP_NUM_THREADS": threads,
        "TME_ATLAS_NO_PROGRESS": "1",
    }
    if smoke:
        env.update(
            {
                "TME_ATLAS__SCVI__MAX_STEPS": "50",
                "TME_ATLAS__SCVI__MIN_STEPS": "0",
                "TME_ATLAS__SCANVI__MAX_STEPS": "20",
                "TME_ATLAS__CROSSTALK__N_PERMS": "10",
            }
        )
    results = {}
    for n in sizes:
        data = WORK / f"sim_{n}"
        sheet = _simulate(n, data)
        atlas_dir = WORK / f"atlas_{n}"
        shutil.rmtree(atlas_dir, ignore_errors=True)
        ours = run_measured(
            [
                sys.executable,
                "-m",
                "tme_atlas",
                "build",
                str(sheet),
                "--out",
                str(atlas_dir),
            ],
            env=env,
        )
        entry: dict = {"ours": ours, "command": " ".join(sys.argv), "machine": machine()}
        if ours["rc"] == 0:
            prov = json.loads((atlas_dir / "provenance.json").read_text())
            entry["ours"]["stages"] = _stage_table(prov)
            entry["ours"]["quality"] = _quality(atlas_dir, data / "truth")
        if n <= baseline_max_cells:
            out_json = WORK / f"baseline_{n}.json"
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.baseline_textbook",
                str(sheet),
                "--truth",
                str(data / "truth"),
                "--out",
                str(out_json),
                "--threads",
                threads,
            ]
            if smoke:
                cmd += ["--max-epochs", "2", "--n-perms", "10"]
            out_json.unlink(missing_ok=True)
            base = run_measured(cmd, env=env)
            if out_json.is_file():  # complete, or partial where the run died (e.g. memory)
                base.update(json.loads(out_json.read_text()))
            entry["baseline"] = base
            if base["rc"] == 0 and ours["rc"] == 0:
                entry["ratio_total"] = round(ours["seconds"] / base["seconds"], 3)
        results[str(n)] = entry
        if save_as:  # after every size, merged into earlier sizes of the same tag
            _save_merged(save_as, results)
        print(
            json.dumps(
                {n: {k: entry[k].get("seconds") for k in ("ours", "baseline") if k in entry}}
            )
        )
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes, under ~10 minutes")
    mode.add_argument("--smoke", action="store_true", help="seconds; for the test suite")
    p.add_argument("--sizes", type=int, nargs="+", help="cohort sizes (cells) to build")
    p.add_argument("--baseline-max-cells", type=int, default=25_000)
    p.add_argument("--only", nargs="+", choices=list(SUBS))
    p.add_argument("--tag", help="result name suffix (default: smoke / quick / full)")
    args = p.parse_args(argv)

    if args.smoke:
        sizes = args.sizes or [1600]
    elif args.quick:
        sizes = args.sizes or [3000]
    else:
        sizes = args.sizes or [20_000, 100_000]
    only = set(args.only or SUBS)
    tag = args.tag or ("smoke" if args.smoke else "quick" if args.quick else "full")
    WORK.mkdir(parents=True, exist_ok=True)

    rc = 0
    if "build" in only:
        bench_build(
            sizes,
            baseline_max_cells=args.baseline_max_cells,
            smoke=args.smoke,
            save_as=f"build_{tag}",
        )
        print(f"wrote {RESULTS / f'build_{tag}.json'}")
    # the explorer-side benchmarks run as their own processes (their own peak memory)
    quick = ["--quick"] if (args.quick or args.smoke) else []
    for name in SUBS[1:]:
        if name in only:
            cmd = [sys.executable, "-m", f"benchmarks.bench_{name}", *quick]
            if name == "store" and (args.quick or args.smoke):
                cmd += ["--out", str(RESULTS / "store_quick.json")]
            res = run_measured(cmd, env={})
            print(json.dumps({name: {"rc": res["rc"], "seconds": res.get("seconds")}}))
            if name == "browser" and res["rc"] == 2:
                continue  # no Chromium here: said so, not a failure
            rc = rc or res["rc"]
    return rc


if __name__ == "__main__":
    sys.exit(main())
