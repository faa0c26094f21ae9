"""Numba's on-disk cache for the scverse kernels the build compiles in every process.

umap-learn, pynndescent and scanpy define their numba kernels without ``cache=True``, so
every process compiles them again: importing umap costs ~8.5 s (pynndescent compiles its
distances eagerly at import) and the first neighbours / UMAP / Leiden of a build another
~15-20 s, on 2 cores. :func:`enable` makes ``numba.jit`` / ``numba.njit`` default to
``cache=True`` for functions of those packages only (a user's own numba code is left as it
is) and switches caching on for the ones already compiled; a later process then loads the
machine code from numba's cache (``__pycache__`` next to the package, else numba's user-wide
cache or ``NUMBA_CACHE_DIR``) instead of compiling it. Results are the same (numba keys the
cache on the source file, the signature and the CPU); where no cache directory is writable
the function is compiled as before. ``TME_ATLAS_NUMBA_CACHE=0`` turns it off.
"""

from __future__ import annotations

import functools
import os
import sys

PACKAGES = ("umap", "pynndescent", "scanpy", "squidpy", "infercnvpy", "scib_metrics")
ENV_OFF = "TME_ATLAS_NUMBA_CACHE"
_MARK = "_tme_atlas_cache_default"


def _wants_cache(fn) -> bool:
    module = getattr(fn, "__module__", None) or ""
    if module.split(".")[0] not in PACKAGES:
        return False
    from numba.core.caching import FunctionCache

    try:  # raises where no cache directory can be used for the function's file
        FunctionCache(fn)
    except Exception:  # noqa: BLE001 - compile without a cache, as the package asked
        return False
    return True


def _enable_existing() -> int:
    """Caching on for the dispatchers the packages made before :func:`enable` ran."""
    from numba.core.caching import NullCache
    from numba.core.registry import CPUDispatcher

    n = 0
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in PACKAGES:
            continue
        for value in list(vars(module).values()):
            if (
                isinstance(value, CPUDispatcher)
                and isinstance(getattr(value, "_cache", None), NullCache)
                and _wants_cache(value.py_func)
            ):
                value.enable_caching()
                n += 1
    return n


def enable() -> bool:
    """Default ``cache=True`` for numba kernels of :data:`PACKAGES`; idempotent.

    Returns whether the cache default is active (False when numba is missing or the
    ``TME_ATLAS_NUMBA_CACHE=0`` environment variable turns it off).
    """
    if os.environ.get(ENV_OFF, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        import numba
        from numba.core import decorators, sigutils
    except ImportError:  # pragma: no cover - numba comes with scanpy
        return False
    if getattr(decorators.jit, _MARK, False):
        return True
    original = decorators.jit

    @functools.wraps(original)
    def jit(signature_or_function=None, *args, **kws):
        if "cache" in kws:  # the package decided
            return original(signature_or_function, *args, **kws)
        target = signature_or_function
        if (
            target is not None
            and not isinstance(target, list)
            and not sigutils.is_signature(target)
        ):
            return original(target, *args, cache=_wants_cache(target), **kws)

        def decorate(fn):
            return original(target, *args, cache=_wants_cache(fn), **kws)(fn)

        return decorate

    setattr(jit, _MARK, True)
    decorators.jit = jit  # numba.njit calls decorators.jit
    numba.jit = jit
    _enable_existing()
    return True
