"""What numba's disk cache for the scverse kernels saves a process (``preprocessing.numba_cache``).

``python -m benchmarks.bench_numba_cache --atlas DIR [--repeats 2]``

Each measurement is a fresh ``python`` process (the cost is per process), with the cache
default on and off (``TME_ATLAS_NUMBA_CACHE=0``), each ``--repeats`` times after one warm-up
run that fills the cache:

* ``import``: ``import preprocessing, umap`` (pynndescent compiles its distances at import);
* ``cluster``: the build's cluster stage (``run_clustering``: kNN graph, UMAP, Leiden at the
  configured resolutions) on ``DIR/atlas.h5ad``, import included.

Writes ``benchmarks/results/numba_cache.json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._util import save

IMPORT = "import preprocessing, umap"
CLUSTER = (
    "import preprocessing, anndata as ad\n"
    "from atlas.config import Config\n"
    "from preprocessing.cluster import run_clustering\n"
    "a = ad.read_h5ad({path!r})\n"
    "run_clustering(a, config=Config().cluster)\n"
)


def _time(code: str, cache: bool) -> float:
    env = {**os.environ, "TME_ATLAS_NUMBA_CACHE": "1" if cache else "0"}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return round(time.perf_counter() - t, 2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--atlas", type=Path, required=True, help="a built atlas directory")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    jobs = {"import": IMPORT, "cluster": CLUSTER.format(path=str(args.atlas / "atlas.h5ad"))}
    argv = sys.argv[1:] if argv is None else argv
    result: dict = {"command": " ".join(["python -m benchmarks.bench_numba_cache", *argv])}
    result["seconds"] = {}
    for name, code in jobs.items():
        _time(code, cache=True)  # fills the cache
        for cache in (True, False):
            key = f"{name}_{'cache' if cache else 'no_cache'}"
            result["seconds"][key] = [_time(code, cache) for _ in range(args.repeats)]
            print(key, result["seconds"][key], flush=True)
    print(save("numba_cache", result))


if __name__ == "__main__":
    main()
