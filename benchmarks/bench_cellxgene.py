"""Our explorer beside ``cellxgene launch`` on the same atlas:
``python -m benchmarks.bench_cellxgene [--sizes 100000 1000000]``.

cellxgene (1.3.0, PyPI) is installed once into its own virtual environment
(``benchmarks/_work/cellxgene-venv``; its pins, e.g. numpy 2.0.1, clash with ours). For each
size the synthetic atlas of :mod:`benchmarks.bench_store` is served

* by ours: the production command (``gunicorn -c app/gunicorn_conf.py app.wsgi:server``)
  with **one** worker (cellxgene is one process), and
* by cellxgene: ``cellxgene launch DIR/atlas.h5ad`` on the same file (row-oriented CSR, as
  ``tme-atlas export`` writes it), and on a column-oriented (CSC) copy, the layout cellxgene
  asks for.

Measured for each: ``ready_s`` (process start to a healthy HTTP answer), ``rss_mb`` (resident
memory of the server process(es) after the gene reads), and the gene-fetch latency over HTTP
from a client on loopback, median over ``--repeats`` genes: for cellxgene one
``GET /api/v0.2/data/var?var:name_0=GENE`` (what its front end asks for a gene colour), for
ours every callback that a gene choice on the Cells page fires (replayed with the Dash
client of :mod:`benchmarks.bench_load`). ``ratio`` = ours / cellxgene.

Results: ``benchmarks/results/cellxgene.json``. Not a timed test.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._util import RESULTS, explorer_parser, explorer_sizes, tree_rss, write_results
from benchmarks.bench_browser import _ensure_atlas, _genes
from benchmarks.bench_load import AppModel, Server, Tab, free_port

CELLXGENE = "cellxgene==1.3.0"


def ensure_cellxgene(work: Path) -> Path:
    """The ``cellxgene`` executable of a private virtual environment (created once)."""
    venv = work / "cellxgene-venv"
    exe = venv / "bin" / "cellxgene"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", CELLXGENE], check=True
        )
    return exe


def _tree_rss_mb(pid: int) -> float:
    return round(tree_rss(pid) / 2**20, 1)


def _csc_copy(atlas_dir: Path, work: Path) -> Path:
    import anndata as ad
    import scipy.sparse as sp

    out = work / f"{atlas_dir.name}_csc.h5ad"
    if not out.exists():
        a = ad.read_h5ad(atlas_dir / "atlas.h5ad")
        a.X = sp.csc_matrix(a.X)
        a.layers.clear()
        a.uns.clear()
        a.write_h5ad(out)
    return out


def bench_cellxgene(exe: Path, h5ad: Path, genes: list[str], log: Path) -> dict:
    import requests

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(exe), "launch", str(h5ad), "--host", "127.0.0.1", "--port", str(port),
           "--disable-diffexp", "--disable-annotations", "--disable-gene-sets-save"]  # fmt: skip
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    try:
        ready = None
        while time.perf_counter() - t0 < 1800:
            if proc.poll() is not None:
                raise RuntimeError(f"cellxgene exited {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if requests.get(url + "/api/v0.2/schema", timeout=5).status_code == 200:
                    ready = time.perf_counter() - t0
                    break
            except requests.RequestException:
                pass
            time.sleep(0.25)
        if ready is None:
            raise TimeoutError("cellxgene did not answer")
        s = requests.Session()
        times, nbytes = [], []
        for g in genes:
            t = time.perf_counter()
            r = s.get(
                url + "/api/v0.2/data/var",
                params={"var:name_0": g},
                headers={"Accept": "application/octet-stream"},
                timeout=600,
            )
            r.raise_for_status()
            times.append(time.perf_counter() - t)
            nbytes.append(len(r.content))
        return {
            "ready_s": round(ready, 2),
            "gene_first_ms": round(1000 * times[0], 1),
            "gene_ms": round(1000 * statistics.median(times[1:]), 1),
            "gene_bytes": int(statistics.median(nbytes)),
            "rss_mb": _tree_rss_mb(proc.pid),
        }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


class _Rec:
    def __init__(self):
        self.times: list[float] = []

    def __call__(self, kind, seconds, status):
        if kind == "gene_switch":
            self.times.append(seconds)

    def fired(self, output, kind):
        pass


def bench_ours(atlas_dir: Path, genes: list[str], log: Path) -> dict:
    import random

    import requests

    t0 = time.perf_counter()
    with Server(atlas_dir, workers=1, threads=4, log_path=log) as srv:
        ready = time.perf_counter() - t0
        s = requests.Session()
        rec = _Rec()
        tab = Tab(AppModel(s, srv.url), s, random.Random(0), rec)
        tab.load_page("/cells")
        if "cells-gene" not in tab.props:
            raise RuntimeError("the Cells page has no gene dropdown")
        per_gene = []
        for g in genes:
            rec.times.clear()
            tab.props["cells-gene"]["value"] = g
            t = time.perf_counter()
            tab._cascade({("cells-gene", "value")}, "gene_switch")
            per_gene.append(time.perf_counter() - t)
            if not rec.times:
                raise RuntimeError("a gene choice fired no callback")
        rss = srv.worker_rss_mb()
        return {
            "ready_s": round(ready, 2),
            "gene_first_ms": round(1000 * per_gene[0], 1),
            "gene_ms": round(1000 * statistics.median(per_gene[1:]), 1),
            "rss_mb": round(sum(rss.values()), 1),
        }


def main(argv: list[str] | None = None) -> int:
    p = explorer_parser(__doc__, repeats=11)
    p.add_argument("--no-csc", action="store_true", help="skip the CSC copy for cellxgene")
    args = p.parse_args(argv)
    sizes, repeats = explorer_sizes(args)
    exe = ensure_cellxgene(args.work)
    results = {}
    for n in sizes:
        atlas_dir = _ensure_atlas(n, args.work)
        genes = _genes(atlas_dir, repeats)
        res = {"ours": bench_ours(atlas_dir, genes, args.work / f"cxg_ours_{n}.log")}
        res["cellxgene_csr"] = bench_cellxgene(
            exe, atlas_dir / "atlas.h5ad", genes, args.work / f"cxg_{n}.log"
        )
        if not args.no_csc:
            res["cellxgene_csc"] = bench_cellxgene(
                exe, _csc_copy(atlas_dir, args.work), genes, args.work / f"cxg_csc_{n}.log"
            )
        for k in ("cellxgene_csr", "cellxgene_csc"):
            if k in res:
                res[f"ratio_vs_{k}"] = {
                    m: round(res["ours"][m] / res[k][m], 3)
                    for m in ("ready_s", "gene_ms", "rss_mb")
                    if res[k][m]
                }
        results[str(n)] = res
        print(json.dumps({n: res}))
    out = args.out or RESULTS / ("cellxgene_quick.json" if args.quick else "cellxgene.json")
    write_results("benchmarks.bench_cellxgene", out, results, argv, cellxgene=CELLXGENE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
