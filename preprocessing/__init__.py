"""The offline build: ingest -> QC -> scVI integration -> clusters -> annotation -> analyses."""

from . import numba_cache as _numba_cache

_numba_cache.enable()  # before scanpy / umap define their kernels (see the module)
