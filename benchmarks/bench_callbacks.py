"""Server time and response size of the explorer's callbacks:
``python -m benchmarks.bench_callbacks [--sizes 100000 1000000]``.

For each size the synthetic atlas of :mod:`benchmarks.bench_store` is served by the
production command with one worker, and the Dash client of :mod:`benchmarks.bench_load`
replays what a user does (every callback a change fires, in the browser's order) on loopback:

* ``gene_switch``: a gene on the Cells page (recolour the UMAP),
* ``metadata_colour``: colour the UMAP by another ``.obs`` column,
* ``violin``: a gene on the Genes page (feature plot, violins, DE table),
* ``dot_plot``: five genes in the dot plot,
* ``interaction_filter``: a sender cell type on the Interactions page.

Per action: median wall time of the whole cascade over ``--repeats`` values (the first,
cold, reported apart), and bytes sent back (total and per cell). Results:
``benchmarks/results/callbacks.json``. Not a timed test.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from benchmarks._util import RESULTS, explorer_parser, explorer_sizes, write_results
from benchmarks.bench_browser import _ensure_atlas, _genes
from benchmarks.bench_load import AppModel, Server, Tab, choice_values


class _Rec:
    def __init__(self):
        self.bytes: dict[str, int] = defaultdict(int)
        self.errors: list[str] = []

    def __call__(self, kind, seconds, status):
        if status != 200 and status != 204:
            self.errors.append(f"{kind}: {status}")

    def nbytes(self, kind, n):
        self.bytes[kind] += n

    def fired(self, output, kind):
        pass


def _action(tab: Tab, rec: _Rec, cid: str, value) -> tuple[float, int]:
    rec.bytes.clear()
    tab.props[cid]["value"] = value
    t = time.perf_counter()
    tab._cascade({(cid, "value")}, "action")
    return time.perf_counter() - t, rec.bytes["action"]


def measure(atlas_dir: Path, *, repeats: int, log: Path) -> dict:
    import requests

    import atlas

    store = atlas.open(atlas_dir)
    n_cells = store.shape[0]
    genes = _genes(atlas_dir, repeats + 1)
    out: dict = {}
    with Server(atlas_dir, workers=1, threads=4, log_path=log) as srv:
        s = requests.Session()
        rec = _Rec()
        tab = Tab(AppModel(s, srv.url), s, random.Random(0), rec)

        def run(kind: str, page: str, cid: str, values: list) -> None:
            tab.load_page(page)
            if cid not in tab.props:
                raise RuntimeError(f"{page} has no {cid}")
            times, sizes = [], []
            for v in values:
                t, b = _action(tab, rec, cid, v)
                times.append(t)
                sizes.append(b)
            later = times[1:] or times
            out[kind] = {
                "first_ms": round(1000 * times[0], 1),
                "median_ms": round(1000 * statistics.median(later), 1),
                "bytes": int(statistics.median(sizes[1:] or sizes)),
                "bytes_per_cell": round(statistics.median(sizes[1:] or sizes) / n_cells, 2),
            }
            print(json.dumps({kind: out[kind]}), flush=True)

        run("gene_switch", "/cells", "cells-gene", genes)
        tab.load_page("/cells")
        colours = [v for v in choice_values(tab.props["cells-colour"]) if v][: repeats + 1]
        run("metadata_colour", "/cells", "cells-colour", colours)
        run("violin", "/genes", "genes-gene", genes)
        dots = [genes[i : i + 5] for i in range(0, len(genes))][: repeats + 1]
        run("dot_plot", "/genes", "genes-dot-genes", [d for d in dots if d])
        tab.load_page("/interactions")
        senders = choice_values(tab.props.get("ia-sender", {}))
        if senders:
            run("interaction_filter", "/interactions", "ia-sender",
                [[x] for x in (senders * (repeats + 1))[: repeats + 1]])  # fmt: skip
        out["worker_rss_mb"] = srv.worker_rss_mb()
        out["errors"] = rec.errors[:10]
    out["n_cells"] = n_cells
    return out


def main(argv: list[str] | None = None) -> int:
    p = explorer_parser(__doc__, repeats=7)
    args = p.parse_args(argv)
    sizes, repeats = explorer_sizes(args)
    results = {}
    for n in sizes:
        atlas_dir = _ensure_atlas(n, args.work)
        results[str(n)] = measure(atlas_dir, repeats=repeats, log=args.work / f"cb_{n}.log")
    out = args.out or RESULTS / ("callbacks_quick.json" if args.quick else "callbacks.json")
    write_results("benchmarks.bench_callbacks", out, results, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
