"""Parameters of a build stage, recorded h5ad-safe in ``.uns`` (provenance).

One helper for every stage: :func:`record_params` writes
``adata.uns[schema.params_key(stage)]``, the way scanpy's tools write
``uns[key]["params"]`` in the function that used them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from . import schema


def _clean(v):
    """An h5ad-safe copy of one parameter value."""
    if v is None:
        return "None"
    if isinstance(v, Mapping):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        out = [x if isinstance(x, int | float) else str(x) for x in v]
        return out if out else "[]"
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    if isinstance(v, str | int | float | bool):
        return v
    return str(v)


def record_params(adata, stage: str, params: Mapping) -> None:
    """Store the parameters ``stage`` used in ``adata.uns[schema.params_key(stage)]``.

    Values are made h5ad-safe: ``None`` -> ``"None"``, numpy scalars -> Python numbers,
    sequences -> lists (non-numbers as strings; an empty one as ``"[]"``), mappings
    recursively, anything else -> ``str``. Replaces an earlier record of the stage.
    """
    adata.uns[schema.params_key(stage)] = {str(k): _clean(v) for k, v in params.items()}
