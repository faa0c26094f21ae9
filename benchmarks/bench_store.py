"""Read-store benchmark: ``python -m benchmarks.bench_store [--sizes 100000 1000000]``.

For each size a synthetic atlas (``atlas.testing.make_synthetic_atlas``, 2,000 genes) is
generated once into ``benchmarks/_work/store_<cells>x<genes>/`` (git-ignored; reused by
later runs) and then measured in a fresh subprocess, so that open time and resident memory
are those of a new server worker:

* ``open_s`` / ``rss_open_mb``: ``atlas.open(DIR)`` (imports excluded) and the RSS after it;
* ``gene_cold_ms``: one gene for all cells, read right after the expression file was
  evicted from the page cache (``posix_fadvise(DONTNEED)``), median over ``--reads`` genes;
* ``gene_warm_ms``: the same genes again from the page cache (store's LRU cleared);
* ``gene_cached_ms``: an LRU hit;
* ``obs_column_ms``, ``umap_ms``, ``summary_first_ms`` / ``summary_ms``: first load of the
  ``cell_type`` column, of the UMAP coordinates, and a 5-gene dot-plot summary;
* ``obs_all_s``, ``rss_obs_all_mb`` / ``uss_obs_all_mb``: loading every obs column (what
  the explorer keeps per worker) and the resident / private memory after it;
* beside them, the row-oriented alternative: ``anndata.read_h5ad(atlas.h5ad, backed="r")``
  (``csr_open_s``, ``csr_rss_open_mb``) and ``X[:, j]`` (``csr_gene_cold_ms``,
  ``csr_gene_ms``) on a few genes.

Results go to ``benchmarks/results/store.json`` (``--out`` to change) and a table is
printed. Not a timed test; ``tests/test_store.py`` runs a tiny smoke version.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
RESULTS = HERE / "results"


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _uss_mb() -> float:
    """Memory private to this process (not shared page cache / file maps)."""
    import psutil

    try:
        return psutil.Process().memory_full_info().uss / 2**20
    except (psutil.Error, AttributeError):  # pragma: no cover
        return float("nan")


def _evict(path: Path) -> bool:
    """Drop ``path`` from the page cache (clean pages only); False where unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    finally:
        os.close(fd)


def _ms(seconds: list[float]) -> float:
    return round(1000 * statistics.median(seconds), 3) if seconds else float("nan")


# ----------------------------------------------------------------------------- children
def _generate(out: Path, n_cells: int, n_genes: int, seed: int) -> dict:
    from atlas.store import write_atlas
    from atlas.testing import make_synthetic_adata

    c0 = time.process_time()
    t0 = time.perf_counter()
    adata = make_synthetic_adata(n_cells=n_cells, n_genes=n_genes, seed=seed)
    t1, c1 = time.perf_counter(), time.process_time()
    write_atlas(adata, out)
    t2, c2 = time.perf_counter(), time.process_time()
    return {
        "generate_s": round(t1 - t0, 2),
        "generate_cpu_s": round(c1 - c0, 2),
        "write_atlas_s": round(t2 - t1, 2),
        "write_atlas_cpu_s": round(c2 - c1, 2),
        "nnz": int(adata.X.nnz),
    }


def _measure(atlas_dir: Path, reads: int, csr_reads: int, seed: int) -> dict:
    import numpy as np

    import atlas
    import atlas.store  # noqa: F401 - imports outside the timed region
    from atlas import schema

    rng = np.random.default_rng(seed)
    expr = atlas_dir / schema.STORE_DIR / schema.STORE_EXPR_FILE
    h5ad = atlas_dir / schema.ATLAS_FILE
    out: dict = {"evicted": _evict(expr) and _evict(h5ad)}
    out["rss_start_mb"] = round(_rss_mb(), 1)

    t = time.perf_counter()
    store = atlas.open(atlas_dir)
    out["open_s"] = round(time.perf_counter() - t, 4)
    out["rss_open_mb"] = round(_rss_mb(), 1)
    out["n_cells"], out["n_genes"] = store.shape
    out["nnz"] = int(store.meta.get("nnz", 0))
    out["expr_file_mb"] = round(expr.stat().st_size / 2**20, 1)
    out["atlas_h5ad_mb"] = round(h5ad.stat().st_size / 2**20, 1)

    genes = [
        store.genes[j] for j in rng.choice(store.n_genes, min(reads, store.n_genes), replace=False)
    ]
    cold, warm, cached = [], [], []
    for g in genes:  # each gene's pages were evicted above: first touch is cold
        t = time.perf_counter()
        store.expression(g)
        cold.append(time.perf_counter() - t)
    for g in genes:
        store._gene_cache.clear()
        t = time.perf_counter()
        store.expression(g)
        warm.append(time.perf_counter() - t)
    for g in genes:
        t = time.perf_counter()
        store.expression(g)
        cached.append(time.perf_counter() - t)
    out["gene_cold_ms"] = _ms(cold)
    out["gene_cold_max_ms"] = round(1000 * max(cold), 3)
    out["gene_warm_ms"] = _ms(warm)
    out["gene_warm_max_ms"] = round(1000 * max(warm), 3)
    out["gene_cached_ms"] = _ms(cached)

    t = time.perf_counter()
    store.column(schema.OBS_CELL_TYPE)
    out["obs_column_ms"] = round(1000 * (time.perf_counter() - t), 2)
    t = time.perf_counter()
    np.asarray(store.embedding(schema.OBSM_UMAP)).sum()
    out["umap_ms"] = round(1000 * (time.perf_counter() - t), 2)
    if store.has_summary:
        five = genes[:5]
        t = time.perf_counter()
        store.summary(five)
        out["summary_first_ms"] = round(1000 * (time.perf_counter() - t), 2)
        t = time.perf_counter()
        store.summary(five)
        out["summary_ms"] = round(1000 * (time.perf_counter() - t), 2)
    out["rss_after_reads_mb"] = round(_rss_mb(), 1)
    t = time.perf_counter()
    store.obs()  # every obs column, as the explorer loads them once per worker
    out["obs_all_s"] = round(time.perf_counter() - t, 3)
    out["rss_obs_all_mb"] = round(_rss_mb(), 1)
    out["uss_obs_all_mb"] = round(_uss_mb(), 1)
    store.close()

    # ---- the row-oriented alternative: anndata backed h5ad, X[:, j]
    if csr_reads > 0:
        import anndata as ad

        _evict(h5ad)
        rss0 = _rss_mb()
        t = time.perf_counter()
        backed = ad.read_h5ad(h5ad, backed="r")
        out["csr_open_s"] = round(time.perf_counter() - t, 3)
        out["csr_rss_open_mb"] = round(_rss_mb(), 1)
        out["csr_rss_added_mb"] = round(_rss_mb() - rss0, 1)
        idx = [backed.var_names.get_loc(g) for g in genes[:csr_reads]]
        cold_csr, warm_csr = [], []
        for j in idx:
            _evict(h5ad)
            t = time.perf_counter()
            backed.X[:, j]
            cold_csr.append(time.perf_counter() - t)
            t = time.perf_counter()
            backed.X[:, j]
            warm_csr.append(time.perf_counter() - t)
        out["csr_gene_cold_ms"] = _ms(cold_csr)
        out["csr_gene_ms"] = _ms(warm_csr)
        backed.file.close()
    return out


# ----------------------------------------------------------------------------- driver
def _child(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_store", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TME_ATLAS_NO_PROGRESS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE.parent, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _peak_child(args: list[str]) -> dict:
    """Run a child and sample its peak RSS."""
    try:
        from benchmarks._util import _Sampler
    except ImportError:  # pragma: no cover
        return _child(args)
    import threading

    cmd = [sys.executable, "-m", "benchmarks.bench_store", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TME_ATLAS_NO_PROGRESS": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=HERE.parent
    )
    sampler = _Sampler(proc.pid, interval=0.2)
    sampler.start()
    out_holder: dict = {}

    def reader():
        out_holder["out"], out_holder["err"] = proc.communicate()

    th = threading.Thread(target=reader)
    th.start()
    th.join()
    peak = sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out_holder['err'][-3000:]}")
    res = json.loads(out_holder["out"].strip().splitlines()[-1])
    res["generate_peak_mb"] = round(peak / 2**20)
    return res


def run(
    sizes: list[int],
    n_genes: int,
    work: Path,
    reads: int,
    csr_reads: int,
    seed: int = 0,
    regenerate: bool = False,
) -> dict:
    from atlas import schema

    results: dict = {"n_genes": n_genes, "reads": reads, "sizes": {}}
    for n in sizes:
        d = work / f"store_{n}x{n_genes}"
        entry: dict = {}
        marker = d / "generation.json"
        if regenerate or not (d / schema.ATLAS_FILE).is_file() or not marker.is_file():
            import shutil

            shutil.rmtree(d, ignore_errors=True)
            gen = _peak_child(
                [
                    "--generate",
                    str(d),
                    "--n-cells",
                    str(n),
                    "--n-genes",
                    str(n_genes),
                    "--seed",
                    str(seed),
                ]
            )
            marker.write_text(json.dumps(gen))
        entry.update(json.loads(marker.read_text()))
        entry.update(
            _child(
                [
                    "--measure",
                    str(d),
                    "--reads",
                    str(reads),
                    "--csr-reads",
                    str(csr_reads),
                    "--seed",
                    str(seed),
                ]
            )
        )
        results["sizes"][str(n)] = entry
        print(f"measured {n} cells", file=sys.stderr)
    return results


def table(results: dict) -> str:
    rows = [
        ("cells", lambda r: f"{r['n_cells']:,}"),
        ("non-zeros", lambda r: f"{r['nnz']:,}"),
        ("generate (s)", lambda r: r.get("generate_s")),
        ("generate, CPU (s)", lambda r: r.get("generate_cpu_s")),
        ("write_atlas (s)", lambda r: r.get("write_atlas_s")),
        ("write_atlas, CPU (s)", lambda r: r.get("write_atlas_cpu_s")),
        ("generate+write peak RSS (MB)", lambda r: r.get("generate_peak_mb")),
        ("store expr_csc.h5 (MB)", lambda r: r.get("expr_file_mb")),
        ("atlas.h5ad (MB)", lambda r: r.get("atlas_h5ad_mb")),
        ("open (s)", lambda r: r.get("open_s")),
        ("RSS after open (MB)", lambda r: r.get("rss_open_mb")),
        ("one gene, cold (ms, median)", lambda r: r.get("gene_cold_ms")),
        ("one gene, warm page cache (ms, median)", lambda r: r.get("gene_warm_ms")),
        ("one gene, LRU hit (ms)", lambda r: r.get("gene_cached_ms")),
        ("obs column cell_type, first load (ms)", lambda r: r.get("obs_column_ms")),
        ("UMAP, first load (ms)", lambda r: r.get("umap_ms")),
        (
            "summary 5 genes, first / later (ms)",
            lambda r: f"{r.get('summary_first_ms')} / {r.get('summary_ms')}",
        ),
        ("RSS after reads (MB)", lambda r: r.get("rss_after_reads_mb")),
        ("all obs columns, first load (s)", lambda r: r.get("obs_all_s")),
        (
            "RSS / private (USS) after all obs (MB)",
            lambda r: f"{r.get('rss_obs_all_mb')} / {r.get('uss_obs_all_mb')}",
        ),
        ("CSR backed h5ad: open (s)", lambda r: r.get("csr_open_s")),
        ("CSR backed h5ad: RSS after open (MB)", lambda r: r.get("csr_rss_open_mb")),
        ("CSR backed h5ad: X[:, j] cold (ms)", lambda r: r.get("csr_gene_cold_ms")),
        ("CSR backed h5ad: X[:, j] warm (ms)", lambda r: r.get("csr_gene_ms")),
    ]
    sizes = list(results["sizes"])
    lines = [
        "| | " + " | ".join(f"{int(s):,} cells" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for label, fn in rows:
        vals = []
        for s in sizes:
            try:
                vals.append(str(fn(results["sizes"][s])))
            except (KeyError, TypeError):
                vals.append("")
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--reads", type=int, default=20, help="genes read per measurement")
    p.add_argument("--csr-reads", type=int, default=3, help="genes read from backed CSR")
    p.add_argument("--out", type=Path, default=RESULTS / "store.json")
    p.add_argument("--regenerate", action="store_true")
    p.add_argument("--quick", action="store_true", help="20k cells only")
    p.add_argument("--seed", type=int, default=0)
    # internal: child processes
    p.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--n-cells", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n-genes", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.generate:
        print(json.dumps(_generate(a.generate, a.n_cells, a.n_genes, a.seed)))
        return 0
    if a.measure:
        print(json.dumps(_measure(a.measure, a.reads, a.csr_reads, a.seed)))
        return 0

    sizes = [20_000] if a.quick else a.sizes
    results = run(sizes, a.genes, a.work, a.reads, a.csr_reads, a.seed, a.regenerate)
    try:
        from benchmarks._util import machine

        results["machine"] = machine()
    except ImportError:  # pragma: no cover
        pass
    try:
        results["load_average"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\nwritten {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
