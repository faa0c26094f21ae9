"""preprocessing.numba_cache: scverse kernels cached on disk, a user's numba code untouched."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np

import preprocessing  # noqa: F401 - enables the cache default
from preprocessing import numba_cache


def test_scverse_kernels_cache_and_user_code_does_not():
    import numba
    from numba.core.caching import NullCache
    from umap import umap_

    assert numba_cache.enable()
    # a kernel umap defined without cache=True now has a disk cache
    kernel = umap_.smooth_knn_dist
    assert not isinstance(kernel._cache, NullCache)

    @numba.njit
    def user_fn(x):
        return x * 2

    assert isinstance(user_fn._cache, NullCache)  # this module is not a scverse package
    assert user_fn(3) == 6

    # code with no source file (exec, a notebook cell) still compiles
    ns: dict = {}
    exec("import numba\n@numba.njit(fastmath=True)\ndef f(x):\n    return x + 1\n", ns)
    assert ns["f"](np.float64(1.0)) == 2.0
    # an explicit choice is kept
    explicit = numba.njit(cache=False)(lambda x: x)
    assert isinstance(explicit._cache, NullCache)


def test_cache_is_used_by_a_second_process_and_can_be_turned_off(tmp_path):
    """In a fresh process pynndescent's kernels (compiled eagerly at import) get a disk
    cache, and an index file lands in ``NUMBA_CACHE_DIR``; ``TME_ATLAS_NUMBA_CACHE=0``
    leaves numba as it is. (Speed is measured in benchmarks/RESULTS.md, not here.)"""
    code = textwrap.dedent(
        """
        import preprocessing
        from numba.core import decorators
        from preprocessing import numba_cache
        if not getattr(decorators.jit, numba_cache._MARK, False):
            print("plain")
        else:
            from numba.core.caching import NullCache
            import pynndescent.distances as d
            print("cached" if not isinstance(d.euclidean._cache, NullCache) else "not cached")
        """
    )
    env = {"NUMBA_CACHE_DIR": str(tmp_path)}
    import os

    run = lambda extra: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code],
        env={**os.environ, **env, **extra},
        capture_output=True,
        text=True,
        timeout=300,
    )
    on = run({})
    assert on.returncode == 0, on.stderr
    assert on.stdout.strip() == "cached"
    assert list(tmp_path.rglob("*.nbi")), "nothing was written to the cache"
    off = run({numba_cache.ENV_OFF: "0"})
    assert off.returncode == 0, off.stderr
    assert off.stdout.strip() == "plain"
