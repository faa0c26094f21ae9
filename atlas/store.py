"""The on-disk layout of an atlas, its writer and its lean, read-only reader.

This module is the one place that knows how an atlas is laid out on disk. The build
writes through :func:`write_atlas`; the explorer reads only through :func:`open`
(:class:`AtlasStore`); analyses, crosstalk and exports read the full AnnData with
:func:`read_atlas_adata`.

Layout of an atlas directory ``DIR``
------------------------------------
::

    DIR/tables/<name>.csv         result tables (from .uns[UNS_TABLES]); written FIRST
    DIR/store/                    column-oriented read store for the explorer; written SECOND
        meta.json                 format_version, n_cells, n_genes, species, conditions (order),
                                  reference, programs, provenance, obs/var columns + dtypes,
                                  embeddings (name -> shape), summary group columns
        expr_csc.h5               HDF5, X (log-normalised) in CSC: ``data`` float32,
                                  ``indices`` int32 (cell index), ``indptr`` int64
                                  (n_genes + 1), ``genes`` (utf-8). Uncompressed and
                                  contiguous: the reader memory-maps ``data`` / ``indices``
                                  at their file offsets, so one gene is the slice
                                  ``indptr[j]:indptr[j+1]`` (two small page-cache reads),
                                  lock-free and shared between server worker processes.
        obs.parquet               all .obs columns (categoricals as dictionary columns) and
                                  obs_names as column ``_obs_names``; read column by column
        var.parquet               all .var columns, var_names as column ``_var_names``
        embeddings/<key>.npy      every .obsm matrix, float32 (np.load(mmap_mode="r"))
        summary.parquet           long format, one row per gene x (cell_type, condition,
                                  sample_id): n_cells, mean (mean log-normalised expression
                                  over all cells of the group) and frac (fraction of cells
                                  with expression > 0); rows gene-major, every group present
                                  for every gene. Dot plots and violin summaries at any
                                  coarser grouping are n_cells-weighted sums of these rows.
        tables/<name>.parquet     exact-dtype copy of the result tables
    DIR/atlas.h5ad                the full AnnData (X CSR log-normalised, layers["counts"],
                                  obsm, all uns; h5ad-safe, no pickles); written LAST: its
                                  presence marks a finished atlas.

Every part is written atomically (temporary file or directory + rename, :mod:`atlas.io`).

Reading
-------
``atlas.open(DIR)`` never loads ``atlas.h5ad``: it reads ``meta.json`` and the gene names,
memory-maps the expression, and loads obs columns, embeddings, the summary and tables
lazily, on first use. Reads are thread-safe (memory maps are lock-free; caches are guarded
by a lock). A small LRU cache keeps the most recently read genes.

Scale (1M cells x 2,000 genes)
------------------------------
``write_atlas`` converts CSR to CSC in blocks of genes (:func:`write_csc_blocks`: ~50M
non-zeros at a time, 0.4 GB) written at their offsets, instead of a second copy of ``data``
+ ``indices`` (8 bytes x nnz: 3.6 GB at 300k cells); the summary is accumulated in row chunks with ``np.bincount`` (no dense
matrix is formed). Measured with ``python -m benchmarks.bench_store`` on a synthetic
1M x 2,000 atlas (167M non-zeros; 2 shared cores): ``write_atlas`` 17 s CPU, peak RSS of
generate + write 5.1 GB; ``expr_csc.h5`` 1.3 GB, ``atlas.h5ad`` 2.9 GB; open 0.15 s at
119 MB RSS (imports included); one gene for all cells 0.4 ms from the page cache, 18-30 ms
after eviction (backed-CSR ``X[:, j]`` on the h5ad: 2.4 s warm, open 25 s / 2.2 GB).
``DIR/tables`` is replaced as a whole by ``write_atlas`` (CSV of every ``uns`` table).
"""

from __future__ import annotations

import collections
import difflib
import json
import re
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import schema
from .errors import InputError, NotAnAtlasError, StoreCorruptError, UnknownGeneError, clip
from .io import atomic_path, write_h5ad_atomic

FORMAT_VERSION = schema.STORE_FORMAT_VERSION
SUMMARY_GROUPS = (schema.OBS_CELL_TYPE, schema.OBS_CONDITION, schema.OBS_SAMPLE)
_GENE_CACHE_SIZE = 16
_ROW_CHUNK = 100_000


# ======================================================================================
# helpers: h5ad-safe frames and uns
# ======================================================================================
def h5ad_safe_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of an obs/var frame that h5ad, R (zellkonverter) and cellxgene read as is.

    Object / string columns become categoricals of ``str`` (missing values stay missing);
    an object column holding only booleans becomes ``bool``; categoricals get ``str``
    categories; booleans stay ``bool``; the index becomes ``str``.
    """
    out = df.copy()
    out.index = out.index.astype(str)
    out.index.name = None
    out.columns = [str(c) for c in out.columns]
    for col in out.columns:
        s = out[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            cats = s.cat.categories
            if not all(isinstance(c, str) for c in cats):
                new = [str(c) for c in cats]
                if len(set(new)) != len(new):  # e.g. 1 and "1": rebuild from values
                    out[col] = pd.Categorical(
                        s.astype(object)
                        .where(s.notna(), None)
                        .map(lambda v: v if v is None else str(v))
                    )
                else:
                    out[col] = s.cat.rename_categories(new)
        elif pd.api.types.is_bool_dtype(s.dtype):
            if s.isna().any():  # nullable boolean with missing values
                out[col] = pd.Categorical(
                    s.astype(object).map(lambda v: None if pd.isna(v) else str(bool(v)))
                )
            else:
                out[col] = s.astype(bool)
        elif s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
            nonnull = s.dropna()
            if (
                len(nonnull)
                and len(nonnull) == len(s)
                and all(isinstance(v, bool | np.bool_) for v in nonnull)
            ):
                out[col] = s.astype(bool)
            else:
                vals = s.astype(object).map(lambda v: None if _isna(v) else str(v))
                out[col] = pd.Categorical(vals)
        elif pd.api.types.is_integer_dtype(s.dtype) and s.isna().any():
            out[col] = s.astype(np.float64)
        elif isinstance(s.dtype, pd.api.extensions.ExtensionDtype):
            out[col] = (
                s.to_numpy(dtype=np.float64, na_value=np.nan)
                if pd.api.types.is_numeric_dtype(s.dtype)
                else s.astype(object).map(lambda v: None if _isna(v) else str(v)).astype("category")
            )
    return out


def _isna(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def h5ad_safe_uns(value: Any) -> Any:
    """A copy of an ``.uns`` value that anndata writes without pickles and R reads.

    Dicts recurse (keys become ``str``); DataFrames go through
    :func:`atlas.tables.h5ad_safe`; ``None`` becomes ``""``; tuples/lists/sets become
    arrays (strings when mixed); numpy scalars and arrays are kept.
    """
    from .tables import h5ad_safe

    if isinstance(value, dict) or (
        hasattr(value, "keys") and hasattr(value, "items") and not isinstance(value, pd.DataFrame)
    ):
        return {str(k): h5ad_safe_uns(v) for k, v in value.items()}
    if isinstance(value, pd.DataFrame):
        return h5ad_safe(value)
    if isinstance(value, pd.Series):
        return h5ad_safe_uns(value.to_numpy())
    if value is None:
        return ""
    if isinstance(value, bool | int | float | str | np.generic):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple | set | frozenset):
        items = list(value)
        if not items:
            return np.array([], dtype=str)
        if all(isinstance(v, str) for v in items):
            return np.array(items, dtype=object).astype(str)
        if all(isinstance(v, bool | np.bool_) for v in items):
            return np.array(items, dtype=bool)
        if all(isinstance(v, int | float | np.number) and not isinstance(v, bool) for v in items):
            return np.asarray(items)
        if all(isinstance(v, dict) for v in items):
            return {str(i): h5ad_safe_uns(v) for i, v in enumerate(items)}
        return np.array(["" if v is None else str(v) for v in items], dtype=object).astype(str)
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return (
                np.array(["" if v is None else str(v) for v in value.ravel()], dtype=object)
                .astype(str)
                .reshape(value.shape)
            )
        return value
    try:  # sparse matrices and other anndata-writable arrays
        from scipy import sparse

        if sparse.issparse(value):
            return value
    except ImportError:  # pragma: no cover
        pass
    return str(value)


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, dict) or (
        hasattr(value, "keys") and hasattr(value, "items") and not isinstance(value, pd.DataFrame)
    ):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, pd.DataFrame):
        return None
    if isinstance(value, np.ndarray):
        return [_to_jsonable(v) for v in value.tolist()]
    if isinstance(value, list | tuple | set):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        f = float(value)
        return f if np.isfinite(f) else None
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# ======================================================================================
# writing
# ======================================================================================
def prepare_adata(adata):
    """A shallow, h5ad-safe view of ``adata`` for writing (the caller's object is untouched).

    Arrays are shared, not copied, except where a conversion is needed (X / layers to CSR,
    obs / var to h5ad-safe dtypes, uns sanitised).
    """
    import anndata as ad
    from scipy import sparse

    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()][:5].tolist()
        raise ValueError(f"obs_names are not unique (e.g. {dup}); make them unique first")
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()][:5].tolist()
        raise ValueError(f"var_names are not unique (e.g. {dup}); make them unique first")

    def as_csr(m):
        if m is None:
            return None
        if not sparse.issparse(m) and hasattr(m, "to_memory"):  # backed (on-disk) matrix
            m = m.to_memory()
        if sparse.issparse(m):
            m = m if m.format == "csr" else m.tocsr()
            return sparse.csr_matrix(m) if not isinstance(m, sparse.csr_matrix) else m
        return sparse.csr_matrix(np.asarray(m))

    X = as_csr(adata.X)
    if X is not None and X.dtype != np.float32:
        X = X.astype(np.float32)
    layers = {str(k): as_csr(v) for k, v in adata.layers.items()}
    obsm = {}
    for k, v in adata.obsm.items():
        if isinstance(v, pd.DataFrame):
            v = v.to_numpy(dtype=np.float32)
        obsm[str(k)] = v
    out = ad.AnnData(
        X=X,
        obs=h5ad_safe_frame(adata.obs),
        var=h5ad_safe_frame(adata.var),
        obsm=obsm,
        varm=dict(adata.varm.items()),
        obsp=dict(adata.obsp.items()),
        layers=layers,
        uns=h5ad_safe_uns(dict(adata.uns)),
    )
    _order_conditions(out)
    return out


def _order_conditions(adata) -> None:
    """Condition categories in the sheet's order (``uns[UNS_CONDITION_ORDER]``)."""
    col = schema.OBS_CONDITION
    order = adata.uns.get(schema.UNS_CONDITION_ORDER)
    if col not in adata.obs.columns or order is None:
        return
    order = [str(c) for c in np.asarray(order).ravel().tolist()]
    s = adata.obs[col]
    present = list(s.cat.categories) if isinstance(s.dtype, pd.CategoricalDtype) else []
    cats = [c for c in order if c in present] + [c for c in present if c not in order]
    if isinstance(s.dtype, pd.CategoricalDtype) and cats != present:
        adata.obs[col] = s.cat.reorder_categories(cats)


def write_atlas(adata, out_dir: str | Path, *, store: bool = True) -> Path:
    """Write an atlas directory: tables CSV, the read store, then ``atlas.h5ad`` LAST.

    ``adata`` is not modified. Returns ``out_dir`` as a :class:`~pathlib.Path`.
    ``store=False`` skips the read store (intermediate writes); the explorer needs it.
    """
    from .tables import write_tables_csv

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    safe = prepare_adata(adata)
    with atomic_path(out_dir / schema.TABLES_DIR) as tmp:
        tmp.mkdir()
        write_tables_csv(safe, tmp)
    if store:
        write_store(safe, out_dir, prepared=True)
    write_h5ad_atomic(safe, out_dir / schema.ATLAS_FILE)
    return out_dir


def read_atlas_adata(path: str | Path, *, backed: str | None = None):
    """The full AnnData of an atlas (``DIR`` or ``DIR/atlas.h5ad``)."""
    import anndata as ad

    path = Path(path)
    file = path / schema.ATLAS_FILE if path.is_dir() else path
    if not file.is_file():
        if path.suffix == ".h5ad" and not path.exists():
            raise NotAnAtlasError(f"not an atlas: {path} does not exist")
        raise NotAnAtlasError(
            f"not an atlas: {path} has no {schema.ATLAS_FILE}; run tme-atlas build first"
        )
    return ad.read_h5ad(file, backed=backed)


def write_store(adata, out_dir: str | Path, *, prepared: bool = False) -> Path:
    """(Re)write ``out_dir/store`` from ``adata`` atomically; returns the store path."""
    out_dir = Path(out_dir)
    safe = adata if prepared else prepare_adata(adata)
    target = out_dir / schema.STORE_DIR
    t0 = time.perf_counter()
    with atomic_path(target) as tmp:
        tmp.mkdir()
        meta = _write_store_parts(safe, tmp)
        meta["write_seconds"] = round(time.perf_counter() - t0, 3)
        (tmp / schema.STORE_META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return target


def rebuild_store(atlas_dir: str | Path) -> Path:
    """Rewrite ``DIR/store`` from ``DIR/atlas.h5ad`` (e.g. after a store format change)."""
    return write_store(read_atlas_adata(atlas_dir), atlas_dir)


def write_csc_blocks(X, f, *, block_nnz: int = 50_000_000) -> int:
    """Write ``X`` (cells x genes) column-major into the open h5py file ``f`` as the
    datasets ``data`` (float32), ``indices`` (int32, sorted within a gene) and ``indptr``
    (int64): contiguous and uncompressed, so readers can memory-map them.

    A CSR matrix is converted in blocks of genes holding about ``block_nnz`` non-zeros,
    each written at its offset: the extra memory is one block (8 bytes x ``block_nnz``,
    twice during the conversion), not a second copy of the whole matrix as with
    ``X.tocsc()`` (3.6 GB at 300k cells). Returns the number of non-zeros.
    """
    from scipy import sparse

    if not sparse.issparse(X):
        X = sparse.csr_matrix(np.asarray(X))
    n_cells, n_genes = X.shape
    if X.format != "csr":
        csc = X.tocsc()
        csc.sort_indices()
        f.create_dataset("data", data=csc.data.astype(np.float32, copy=False))
        f.create_dataset("indices", data=csc.indices.astype(np.int32, copy=False))
        f.create_dataset("indptr", data=csc.indptr.astype(np.int64, copy=False))
        return int(csc.nnz)
    X = sparse.csr_matrix(X)
    X.sum_duplicates()  # a column count must equal what the block conversion keeps
    per_gene = np.bincount(X.indices, minlength=n_genes).astype(np.int64)
    indptr = np.concatenate([[0], np.cumsum(per_gene)])
    nnz = int(indptr[-1])
    data = f.create_dataset("data", shape=(nnz,), dtype=np.float32)
    indices = f.create_dataset("indices", shape=(nnz,), dtype=np.int32)
    f.create_dataset("indptr", data=indptr)
    g0 = 0
    while g0 < n_genes:
        # the next block: as many genes as fit in block_nnz (at least one)
        g1 = int(np.searchsorted(indptr, indptr[g0] + block_nnz, side="right")) - 1
        g1 = min(max(g1, g0 + 1), n_genes)
        block = X[:, g0:g1].tocsc()
        block.sort_indices()
        lo, hi = int(indptr[g0]), int(indptr[g1])
        if hi > lo:
            data[lo:hi] = block.data.astype(np.float32, copy=False)
            indices[lo:hi] = block.indices.astype(np.int32, copy=False)
        del block
        g0 = g1
    return nnz


def _write_store_parts(adata, tmp: Path) -> dict[str, Any]:
    import h5py
    import pyarrow as pa
    import pyarrow.parquet as pq
    from scipy import sparse

    from .tables import h5ad_safe

    n_cells, n_genes = adata.shape
    genes = adata.var_names.astype(str).tolist()

    # ---- expression, CSC
    X = adata.X
    if X is None:
        raise ValueError("adata.X is empty: nothing to store")
    with h5py.File(tmp / schema.STORE_EXPR_FILE, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["encoding"] = "csc"
        f.attrs["shape"] = np.array([n_cells, n_genes], dtype=np.int64)
        nnz = write_csc_blocks(X, f)
        f.create_dataset(
            "genes", data=np.array(genes, dtype=object), dtype=h5py.string_dtype("utf-8")
        )

    # ---- obs / var
    obs = adata.obs.copy()
    obs.insert(0, schema.STORE_OBS_NAMES_COL, adata.obs_names.astype(str))
    pq.write_table(
        pa.Table.from_pandas(obs, preserve_index=False),
        tmp / schema.STORE_OBS_FILE,
        row_group_size=1 << 20,
    )
    var = adata.var.copy()
    var.insert(0, schema.STORE_VAR_NAMES_COL, adata.var_names.astype(str))
    pq.write_table(pa.Table.from_pandas(var, preserve_index=False), tmp / schema.STORE_VAR_FILE)

    # ---- embeddings
    emb_dir = tmp / schema.STORE_EMBEDDINGS_DIR
    emb_dir.mkdir()
    embeddings: dict[str, list[int]] = {}
    for key, value in adata.obsm.items():
        if sparse.issparse(value):
            continue
        arr = np.asarray(value)
        if arr.ndim != 2 or arr.shape[0] != n_cells or not np.issubdtype(arr.dtype, np.number):
            continue
        np.save(emb_dir / f"{_safe_name(key)}.npy", np.ascontiguousarray(arr, dtype=np.float32))
        embeddings[key] = [int(s) for s in arr.shape]

    # ---- summary
    summary_groups = [c for c in SUMMARY_GROUPS if c in adata.obs.columns]
    has_summary = schema.OBS_CELL_TYPE in summary_groups
    if has_summary:
        summary = compute_summary(X, adata.obs, genes, summary_groups)
        pq.write_table(
            pa.Table.from_pandas(summary, preserve_index=False),
            tmp / schema.STORE_SUMMARY_FILE,
            row_group_size=1 << 18,
        )

    # ---- tables
    tables = adata.uns.get(schema.UNS_TABLES, {}) or {}
    table_names = []
    if tables:
        tdir = tmp / schema.STORE_TABLES_DIR
        tdir.mkdir()
        for name, df in tables.items():
            if not isinstance(df, pd.DataFrame):
                df = pd.DataFrame(dict(df))
            pq.write_table(
                pa.Table.from_pandas(h5ad_safe(df), preserve_index=False),
                tdir / f"{_safe_name(name)}.parquet",
            )
            table_names.append(str(name))

    uns = adata.uns
    conditions = _conditions(adata)
    reference = uns.get(schema.UNS_REFERENCE_CONDITION)
    reference = (
        str(reference) if reference not in (None, "") else (conditions[0] if conditions else None)
    )
    programs = {
        str(k): [str(g) for g in np.asarray(v).ravel().tolist()]
        for k, v in (uns.get(schema.UNS_PROGRAMS) or {}).items()
    }
    species = uns.get(schema.UNS_SPECIES)
    if species in (None, "") and schema.OBS_SPECIES in adata.obs.columns and n_cells:
        species = str(adata.obs[schema.OBS_SPECIES].iloc[0])
    return {
        "format_version": FORMAT_VERSION,
        "n_cells": int(n_cells),
        "n_genes": int(n_genes),
        "nnz": nnz,
        "species": None if species in (None, "") else str(species),
        "conditions": conditions,
        "reference": reference,
        "programs": programs,
        "provenance": _to_jsonable(uns.get(schema.UNS_PROVENANCE, {})),
        "obs_columns": {c: str(adata.obs[c].dtype) for c in adata.obs.columns},
        "var_columns": {c: str(adata.var[c].dtype) for c in adata.var.columns},
        "embeddings": embeddings,
        "summary_groups": summary_groups if has_summary else [],
        "tables": table_names,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _conditions(adata) -> list[str]:
    order = adata.uns.get(schema.UNS_CONDITION_ORDER)
    if order is not None and len(np.asarray(order).ravel()):
        return [str(c) for c in np.asarray(order).ravel().tolist()]
    col = schema.OBS_CONDITION
    if col in adata.obs.columns:
        s = adata.obs[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            return [str(c) for c in s.cat.categories]
        return sorted({str(v) for v in s.dropna().unique()})
    return []


def compute_summary(
    X, obs: pd.DataFrame, genes: Sequence[str], groups: Sequence[str], *, chunk: int = _ROW_CHUNK
) -> pd.DataFrame:
    """Mean and fraction expressing per gene x group (long format, gene-major, dense).

    ``X`` is a cells x genes matrix (CSR, CSC or dense; read in row chunks). Groups with
    no cells are left out; every gene has a row for every present group.
    """
    from scipy import sparse

    n_cells, n_genes = X.shape
    frame = obs[list(groups)].copy()
    for g in groups:
        if not isinstance(frame[g].dtype, pd.CategoricalDtype):
            frame[g] = frame[g].astype(str).astype("category")
    codes = frame.groupby(list(groups), observed=True, sort=True).ngroup().to_numpy()
    keys = frame.groupby(list(groups), observed=True, sort=True).size().reset_index(name="n")
    n_groups = len(keys)
    valid = codes >= 0
    sums = np.zeros(n_groups * n_genes, dtype=np.float64)
    pos = np.zeros(n_groups * n_genes, dtype=np.float64)
    if sparse.issparse(X) and X.format != "csr":
        X = X.tocsr()
    for a in range(0, n_cells, chunk):
        b = min(a + chunk, n_cells)
        sub = X[a:b]
        if sparse.issparse(sub):
            sub = sub.tocsr() if sub.format != "csr" else sub
            rows = np.repeat(np.arange(b - a), np.diff(sub.indptr))
            cols = sub.indices
            vals = np.asarray(sub.data, dtype=np.float64)
        else:
            sub = np.asarray(sub)
            rows, cols = np.nonzero(sub)
            vals = sub[rows, cols].astype(np.float64)
        c = codes[a:b][rows]
        keep = valid[a:b][rows]
        if not keep.all():
            c, cols, vals = c[keep], cols[keep], vals[keep]
        key = c.astype(np.int64) * n_genes + cols
        sums += np.bincount(key, weights=vals, minlength=n_groups * n_genes)
        pos += np.bincount(key, weights=(vals > 0).astype(np.float64), minlength=n_groups * n_genes)
    n = keys["n"].to_numpy().astype(np.float64)
    mean = (sums.reshape(n_groups, n_genes) / n[:, None]).T.ravel()  # gene-major
    frac = (pos.reshape(n_groups, n_genes) / n[:, None]).T.ravel()
    out = {
        schema.COL_GENE: pd.Categorical.from_codes(
            np.repeat(np.arange(n_genes), n_groups), categories=pd.Index(list(genes))
        )
    }
    for g in groups:
        col = keys[g]
        cats = col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else None
        values = np.tile(col.to_numpy(), n_genes)
        out[g] = pd.Categorical(values, categories=cats)
    out[schema.SUMMARY_N_CELLS] = np.tile(keys["n"].to_numpy().astype(np.int64), n_genes)
    out[schema.SUMMARY_MEAN] = mean.astype(np.float32)
    out[schema.SUMMARY_FRAC] = frac.astype(np.float32)
    return pd.DataFrame(out)


# ======================================================================================
# reading
# ======================================================================================
def open(path: str | Path) -> AtlasStore:  # noqa: A001 - ``atlas.open`` by design
    """Open the atlas at ``path`` read-only (see :class:`AtlasStore`)."""
    return AtlasStore(path)


def _check_atlas_dir(path: Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.is_file() and path.name == schema.ATLAS_FILE:
        path = path.parent
    if not path.exists():
        raise NotAnAtlasError(f"not an atlas: {path} does not exist")
    if not path.is_dir():
        raise NotAnAtlasError(f"not an atlas: {path} is not a directory")
    store = path / schema.STORE_DIR
    if not (path / schema.ATLAS_FILE).is_file():
        raise NotAnAtlasError(
            f"not an atlas: {path} has no {schema.ATLAS_FILE} (an unfinished or missing "
            "build); run tme-atlas build first"
        )
    if (
        not (store / schema.STORE_META_FILE).is_file()
        or not (store / schema.STORE_EXPR_FILE).is_file()
    ):
        raise NotAnAtlasError(
            f"not an atlas: {path} has no read store ({schema.STORE_DIR}/); run tme-atlas "
            f"build first (or python -m atlas.store {path} to rewrite it from "
            f"{schema.ATLAS_FILE})"
        )
    return path, store


class AtlasStore:
    """A read-only, lazily loaded view of an atlas directory (see the module docstring).

    Cheap to open (metadata and gene names only); safe to share between threads.
    Cells are addressed by position (``int`` array or boolean mask of length
    ``n_cells``), genes by symbol.
    """

    def __init__(self, path: str | Path):
        self.path, self.store_path = _check_atlas_dir(Path(path))
        try:
            meta = json.loads((self.store_path / schema.STORE_META_FILE).read_text("utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise NotAnAtlasError(
                f"not an atlas: {self.store_path / schema.STORE_META_FILE} is unreadable "
                f"({e.__class__.__name__}); run tme-atlas build first"
            ) from None
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise NotAnAtlasError(
                f"atlas {self.path}: its store has format version {version}, this version of "
                f"tme-atlas reads version {FORMAT_VERSION}; rewrite it with "
                f"python -m atlas.store {self.path} (or rebuild with tme-atlas build)"
            )
        self.meta: dict[str, Any] = meta
        self._lock = threading.RLock()
        self._obs_cache: dict[str, pd.Series] = {}
        self._emb_cache: dict[str, np.ndarray] = {}
        self._table_cache: dict[str, pd.DataFrame] = {}
        self._gene_cache: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = (
            collections.OrderedDict()
        )
        self._summary: dict[str, Any] | None = None
        self._obs_names: pd.Index | None = None
        self._var: pd.DataFrame | None = None
        try:
            self._open_expression()
        except (OSError, KeyError, ValueError) as e:
            raise StoreCorruptError(
                f"atlas {self.path}: {schema.STORE_DIR}/{schema.STORE_EXPR_FILE} is unreadable "
                f"({e.__class__.__name__}); rebuild the store with python -m atlas.store "
                f"{self.path}"
            ) from None
        problems = self.verify()
        if problems:
            raise StoreCorruptError(
                [
                    f"atlas {self.path}: {p}; rebuild the store with python -m atlas.store "
                    f"{self.path}"
                    for p in problems
                ]
            )

    def verify(self) -> list[str]:
        """Problems with the store's files, without reading their data: every memory-mapped
        array lies within its file (a truncated file would kill the reader with SIGBUS),
        every parquet file has its footer and the row counts of the metadata. Cheap
        (file sizes and parquet footers); run on every open, so also when a replaced or
        truncated store is reopened by the explorer."""
        import pyarrow.parquet as pq

        problems = []
        expr = self.store_path / schema.STORE_EXPR_FILE
        size = expr.stat().st_size
        for name, arr in (("data", self._data), ("indices", self._indices)):
            if isinstance(arr, np.memmap) and arr.offset + arr.nbytes > size:
                problems.append(
                    f"{schema.STORE_DIR}/{schema.STORE_EXPR_FILE} is truncated ({name} ends at "
                    f"byte {arr.offset + arr.nbytes:,}, the file has {size:,})"
                )
        parquets = {
            schema.STORE_OBS_FILE: self.n_cells,
            schema.STORE_VAR_FILE: self.n_genes,
        }
        if self.has_summary:
            parquets[schema.STORE_SUMMARY_FILE] = None
        for name in self.meta.get("tables", []):
            parquets[f"{schema.STORE_TABLES_DIR}/{_safe_name(name)}.parquet"] = None
        for rel, rows in parquets.items():
            file = self.store_path / rel
            if not file.exists() and rel.startswith(schema.STORE_TABLES_DIR):
                continue  # tables may live in atlas.h5ad only
            try:
                md = pq.read_metadata(file)
            except Exception as e:  # noqa: BLE001 - arrow raises several kinds
                problems.append(f"{schema.STORE_DIR}/{rel} is unreadable ({e.__class__.__name__})")
                continue
            if rows is not None and md.num_rows != rows:
                problems.append(
                    f"{schema.STORE_DIR}/{rel} has {md.num_rows:,} rows, expected {rows:,}"
                )
        for name in self.meta.get("embeddings", {}):
            file = self.store_path / schema.STORE_EMBEDDINGS_DIR / f"{_safe_name(name)}.npy"
            try:
                with file.open("rb") as fh:
                    version = np.lib.format.read_magic(fh)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read(fh)
                    need = fh.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize
                if file.stat().st_size < need:
                    raise ValueError("truncated")
            except (OSError, ValueError) as e:
                problems.append(
                    f"{schema.STORE_DIR}/{schema.STORE_EMBEDDINGS_DIR}/{file.name} is "
                    f"unreadable or truncated ({e.__class__.__name__})"
                )
        return problems

    # ------------------------------------------------------------------ basics
    def _open_expression(self) -> None:
        import h5py

        file = self.store_path / schema.STORE_EXPR_FILE
        with h5py.File(file, "r") as f:
            self._indptr = np.asarray(f["indptr"][:], dtype=np.int64)
            genes = f["genes"].asstr()[:]
            self.genes: list[str] = [str(g) for g in genes]
            shape = tuple(int(s) for s in f.attrs["shape"])
            offsets = {}
            for name in ("data", "indices"):
                d = f[name]
                off = d.id.get_offset() if d.size else None
                offsets[name] = (off, d.dtype, d.shape)
        nnz = int(self._indptr[-1]) if len(self._indptr) else 0
        if nnz == 0:
            self._data = np.zeros(0, np.float32)
            self._indices = np.zeros(0, np.int32)
        elif all(off is not None for off, _, _ in offsets.values()):
            maps = {
                name: np.memmap(file, mode="r", dtype=dtype, offset=off, shape=shape)
                for name, (off, dtype, shape) in offsets.items()
            }
            self._data, self._indices = maps["data"], maps["indices"]
        else:  # pragma: no cover - chunked/compressed store from another writer
            self._h5_local = threading.local()
            self._data = None
            self._indices = None
        self.n_cells, self.n_genes = shape
        self._gene_index = {g: i for i, g in enumerate(self.genes)}
        lower: dict[str, int] = {}
        for i, g in enumerate(self.genes):
            lower.setdefault(g.lower(), i)
        self._gene_lower = lower

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_cells, self.n_genes)

    @property
    def species(self) -> str | None:
        return self.meta.get("species")

    @property
    def conditions(self) -> list[str]:
        """Conditions in the samplesheet's order (the reference first, usually)."""
        return list(self.meta.get("conditions") or [])

    @property
    def reference(self) -> str | None:
        return self.meta.get("reference")

    @property
    def programs(self) -> dict[str, list[str]]:
        """Gene programme -> genes used to score it (``score_<programme>`` in obs)."""
        return {k: list(v) for k, v in (self.meta.get("programs") or {}).items()}

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.meta.get("provenance") or {})

    @property
    def format_version(self) -> int:
        return int(self.meta["format_version"])

    def close(self) -> None:
        """Drop memory maps and caches (the object is unusable afterwards)."""
        with self._lock:
            self._data = self._indices = None
            self._gene_cache.clear()
            self._obs_cache.clear()
            self._emb_cache.clear()
            self._table_cache.clear()
            self._summary = None

    def __enter__(self) -> AtlasStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"AtlasStore({str(self.path)!r}, n_cells={self.n_cells}, "
            f"n_genes={self.n_genes}, species={self.species!r})"
        )

    # ------------------------------------------------------------------ cells (obs)
    @property
    def obs_columns(self) -> list[str]:
        return list(self.meta.get("obs_columns", {}))

    def has_obs(self, column: str) -> bool:
        return column in self.meta.get("obs_columns", {})

    @property
    def obs_names(self) -> pd.Index:
        with self._lock:
            if self._obs_names is None:
                self._obs_names = pd.Index(
                    self._read_obs_column(schema.STORE_OBS_NAMES_COL).astype(str), name=None
                )
            return self._obs_names

    def _read_obs_column(self, column: str) -> pd.Series:
        return self._read_obs_columns([column])[column]

    def _read_obs_columns(self, columns: list[str]) -> dict[str, pd.Series]:
        import pyarrow.parquet as pq

        table = pq.read_table(
            self.store_path / schema.STORE_OBS_FILE, columns=columns, memory_map=True
        )
        out = {}
        for c in columns:
            s = table.column(c).to_pandas()
            s.name = c
            out[c] = s
        return out

    def _load_obs(self, names: list[str]) -> dict[str, pd.Series]:
        for name in names:
            if not self.has_obs(name):
                raise schema.MissingKeyError("obs", name)
        with self._lock:  # one parquet read for every column not cached yet
            missing = [c for c in dict.fromkeys(names) if c not in self._obs_cache]
            if missing:
                self._obs_cache.update(self._read_obs_columns(missing))
            return {c: self._obs_cache[c] for c in names}

    def column(self, name: str, cells=None) -> pd.Series:
        """One ``.obs`` column (a Series on a RangeIndex of cell positions)."""
        s = self._load_obs([name])[name]
        if cells is None:
            return s
        idx = self._cell_positions(cells)
        return s.iloc[idx]

    def obs(self, columns: Iterable[str] | None = None, cells=None) -> pd.DataFrame:
        """Several ``.obs`` columns (all when ``columns`` is None); index = cell position."""
        if isinstance(columns, str):
            columns = [columns]
        cols = self.obs_columns if columns is None else list(columns)
        data = self._load_obs(cols)
        df = pd.DataFrame({c: data[c] for c in cols}, index=pd.RangeIndex(self.n_cells))
        if cells is None:
            return df
        return df.iloc[self._cell_positions(cells)]

    def categories(self, name: str) -> list[str]:
        """Categories of a categorical ``.obs`` column, in stored order (observed only)."""
        s = self.column(name)
        if isinstance(s.dtype, pd.CategoricalDtype):
            if name == schema.OBS_CONDITION and self.conditions:
                present = set(s.cat.categories)
                return [c for c in self.conditions if c in present]
            return [str(c) for c in s.cat.categories]
        return sorted({str(v) for v in s.dropna().unique()})

    def cell_mask(self, **filters: Iterable[str] | None) -> np.ndarray:
        """Boolean mask of cells whose obs columns take the given values.

        ``store.cell_mask(cell_type=["CLL"], condition=["ibrutinib_resistant"])``;
        ``None`` means no filter on that column.
        """
        mask = np.ones(self.n_cells, dtype=bool)
        for col, values in filters.items():
            if values is None:
                continue
            if isinstance(values, str):
                values = [values]
            s = self.column(col)
            mask &= s.isin(list(values)).to_numpy()
        return mask

    def _cell_positions(self, cells) -> np.ndarray:
        idx = np.asarray(cells)
        if idx.dtype == bool:
            if idx.shape != (self.n_cells,):
                raise ValueError(f"boolean cell mask must have length {self.n_cells}")
            return np.flatnonzero(idx)
        if idx.ndim == 0:
            idx = idx.reshape(1)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise TypeError("cells: give integer positions or a boolean mask")
        return idx.astype(np.int64, copy=False)

    # ------------------------------------------------------------------ genes (var)
    @property
    def var_names(self) -> pd.Index:
        return pd.Index(self.genes)

    def var(self) -> pd.DataFrame:
        """The ``.var`` table (index = gene symbol)."""
        import pyarrow.parquet as pq

        with self._lock:
            if self._var is None:
                df = pq.read_table(self.store_path / schema.STORE_VAR_FILE).to_pandas()
                self._var = df.set_index(schema.STORE_VAR_NAMES_COL)
                self._var.index.name = None
            return self._var

    def has_gene(self, gene: str) -> bool:
        return gene in self._gene_index or str(gene).lower() in self._gene_lower

    def resolve_gene(self, gene: str) -> str:
        """The atlas's spelling of ``gene`` (exact, else case-insensitive).

        Raises :class:`~atlas.errors.UnknownGeneError` (an ``UnknownValue`` and a
        ``KeyError``) listing close matches otherwise.
        """
        return self.genes[self._gene_pos(gene)]

    def _gene_pos(self, gene: str) -> int:
        j = self._gene_index.get(gene)
        if j is None:
            j = self._gene_lower.get(str(gene).lower())
        if j is None:
            close = difflib.get_close_matches(str(gene), self.genes, n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownGeneError(f"gene {clip(gene)!r} is not in the atlas{hint}")
        return j

    def search_genes(self, prefix: str, limit: int = 20) -> list[str]:
        """Genes starting with ``prefix`` (case-insensitive), for autocompletion."""
        p = str(prefix).lower()
        return [g for g in self.genes if g.lower().startswith(p)][:limit]

    # ------------------------------------------------------------------ expression
    def _column_sparse(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            hit = self._gene_cache.get(j)
            if hit is not None:
                self._gene_cache.move_to_end(j)
                return hit
        a, b = int(self._indptr[j]), int(self._indptr[j + 1])
        if self._data is None and hasattr(self, "_h5_local"):  # pragma: no cover
            f = self._h5()
            idx = f["indices"][a:b]
            val = f["data"][a:b]
        else:
            if self._indices is None:
                raise RuntimeError("store is closed")
            idx = np.array(self._indices[a:b], dtype=np.int32)
            val = np.array(self._data[a:b], dtype=np.float32)
        with self._lock:
            self._gene_cache[j] = (idx, val)
            self._gene_cache.move_to_end(j)
            while len(self._gene_cache) > _GENE_CACHE_SIZE:
                self._gene_cache.popitem(last=False)
        return idx, val

    def _h5(self):  # pragma: no cover - only for non-contiguous stores
        import h5py

        f = getattr(self._h5_local, "f", None)
        if f is None:
            f = h5py.File(self.store_path / schema.STORE_EXPR_FILE, "r")
            self._h5_local.f = f
        return f

    def gene_sparse(self, gene: str) -> tuple[np.ndarray, np.ndarray]:
        """(cell positions, values) of the cells expressing ``gene`` (read-only arrays)."""
        idx, val = self._column_sparse(self._gene_pos(gene))
        return idx, val

    def expression(self, gene: str, cells=None) -> np.ndarray:
        """Log-normalised expression of one gene: float32 array (all cells or ``cells``)."""
        idx, val = self._column_sparse(self._gene_pos(gene))
        dense = np.zeros(self.n_cells, dtype=np.float32)
        dense[idx] = val
        if cells is None:
            return dense
        return dense[self._cell_positions(cells)]

    def expression_matrix(self, genes: Sequence[str], cells=None) -> pd.DataFrame:
        """Expression of several genes: DataFrame cells x genes (float32; index = position).

        Columns are the atlas's spelling of each gene, in the order given (duplicates
        dropped).
        """
        if isinstance(genes, str):
            genes = [genes]
        names: list[str] = []
        for g in genes:
            name = self.resolve_gene(g)
            if name not in names:
                names.append(name)
        pos = None if cells is None else self._cell_positions(cells)
        index = pd.RangeIndex(self.n_cells) if pos is None else pd.Index(pos)
        out = np.zeros((len(index), len(names)), dtype=np.float32)
        for k, name in enumerate(names):
            out[:, k] = self.expression(name, pos)
        return pd.DataFrame(out, index=index, columns=names)

    # ------------------------------------------------------------------ programmes
    @property
    def score_columns(self) -> list[str]:
        return schema.score_columns(self.obs_columns)

    def scores(self, programs: Iterable[str] | None = None, cells=None) -> pd.DataFrame:
        """Programme scores: columns ``score_<programme>`` (all when ``programs`` is None)."""
        if programs is None:
            cols = self.score_columns
        else:
            cols = [
                p if p.startswith(schema.OBS_SCORE_PREFIX) else schema.score_key(p)
                for p in ([programs] if isinstance(programs, str) else programs)
            ]
        return self.obs(cols, cells=cells)

    # ------------------------------------------------------------------ embeddings
    @property
    def embedding_names(self) -> list[str]:
        return list(self.meta.get("embeddings", {}))

    def embedding(self, name: str = schema.OBSM_UMAP, cells=None) -> np.ndarray:
        """An ``.obsm`` matrix (float32, memory-mapped, read-only)."""
        if name not in self.meta.get("embeddings", {}):
            raise schema.MissingKeyError("obsm", name)
        with self._lock:
            arr = self._emb_cache.get(name)
            if arr is None:
                file = self.store_path / schema.STORE_EMBEDDINGS_DIR / f"{_safe_name(name)}.npy"
                arr = np.load(file, mmap_mode="r")
                self._emb_cache[name] = arr
        if cells is None:
            return arr
        return np.asarray(arr[self._cell_positions(cells)])

    # ------------------------------------------------------------------ summaries
    @property
    def has_summary(self) -> bool:
        return bool(self.meta.get("summary_groups"))

    def _summary_arrays(self) -> dict[str, Any]:
        """summary.parquet as arrays: groups (frame), n (G,), mean / frac (genes x G)."""
        import pyarrow.parquet as pq

        if not self.has_summary:
            raise schema.MissingKeyError("obs", schema.OBS_CELL_TYPE)
        with self._lock:
            if self._summary is not None:
                return self._summary
            df = pq.read_table(self.store_path / schema.STORE_SUMMARY_FILE).to_pandas()
            gcols = list(self.meta["summary_groups"])
            gene_codes = df[schema.COL_GENE].cat.codes.to_numpy()
            genes = list(df[schema.COL_GENE].cat.categories)
            n_rows, n_genes = len(df), self.n_genes
            G = n_rows // n_genes if n_genes else 0
            dense = (
                genes == self.genes
                and G * n_genes == n_rows
                and np.array_equal(gene_codes, np.repeat(np.arange(n_genes), G))
            )
            if dense:  # as written by compute_summary: gene-major, every group per gene
                groups = df.iloc[:G][gcols].reset_index(drop=True)
                n = df[schema.SUMMARY_N_CELLS].to_numpy()[:G].astype(np.float64)
                mean = df[schema.SUMMARY_MEAN].to_numpy(np.float64).reshape(n_genes, G)
                frac = df[schema.SUMMARY_FRAC].to_numpy(np.float64).reshape(n_genes, G)
            else:  # any long table: pivot (missing gene x group = no cells)
                grouped = df.groupby(gcols, observed=True, sort=False)
                code = grouped.ngroup().to_numpy()
                groups = grouped.size().reset_index()[gcols]
                G = len(groups)
                pos = {g: i for i, g in enumerate(self.genes)}
                rows = np.array([pos.get(g, -1) for g in genes])[gene_codes]
                ok = rows >= 0
                n = np.zeros(G)
                np.maximum.at(n, code, df[schema.SUMMARY_N_CELLS].to_numpy(np.float64))
                mean = np.zeros((n_genes, G))
                frac = np.zeros((n_genes, G))
                mean[rows[ok], code[ok]] = df[schema.SUMMARY_MEAN].to_numpy(np.float64)[ok]
                frac[rows[ok], code[ok]] = df[schema.SUMMARY_FRAC].to_numpy(np.float64)[ok]
            self._summary = {"groups": groups, "n": n, "mean": mean, "frac": frac}
            return self._summary

    def summary(
        self,
        genes: Sequence[str] | str | None = None,
        groupby: Sequence[str] | str = (schema.OBS_CELL_TYPE, schema.OBS_CONDITION),
        *,
        cell_types: Iterable[str] | None = None,
        conditions: Iterable[str] | None = None,
        samples: Iterable[str] | None = None,
    ) -> pd.DataFrame:
        """Mean expression and fraction expressing per gene x group, for dot plots/violins.

        ``groupby`` is any subset of (cell_type, condition, sample_id); values are
        n_cells-weighted over the finer groups (cells of a group, not its samples, weigh).
        ``cell_types`` / ``conditions`` / ``samples`` restrict the cells. Columns: ``gene``,
        the groupby columns, ``n_cells``, ``mean``, ``frac``, ``mean_expressing`` (mean over
        expressing cells; NaN where none) and, unless grouped by sample, ``n_samples``.
        Rows: genes in the order given (all genes when None), groups in category order.
        """
        arrs = self._summary_arrays()
        gcols = list(self.meta["summary_groups"])
        groupby = [groupby] if isinstance(groupby, str) else list(groupby)
        for g in groupby:
            if g not in gcols:
                raise ValueError(f"summary groupby: {g!r} is not one of {gcols}")
        if genes is None:
            js = list(range(self.n_genes))
        else:
            genes = [genes] if isinstance(genes, str) else list(genes)
            js = [self._gene_pos(g) for g in genes]
        groups: pd.DataFrame = arrs["groups"]
        keep = np.ones(len(groups), dtype=bool)
        for col, values in (
            (schema.OBS_CELL_TYPE, cell_types),
            (schema.OBS_CONDITION, conditions),
            (schema.OBS_SAMPLE, samples),
        ):
            if values is not None and col in groups.columns:
                values = [values] if isinstance(values, str) else list(values)
                keep &= groups[col].isin(values).to_numpy()
        sel = np.flatnonzero(keep)
        sub = groups.iloc[sel]
        if groupby:
            grouped = sub.groupby(groupby, observed=True, sort=True)
            code = grouped.ngroup().to_numpy()
            keys = grouped.size().reset_index()[groupby]
        else:
            code = np.zeros(len(sel), dtype=np.int64)
            keys = pd.DataFrame(index=range(1 if len(sel) else 0))
        K = len(keys)
        # aggregate columns by group code with reduceat (no BLAS: no thread pools spun up)
        order = np.argsort(code, kind="stable")
        starts = np.searchsorted(code[order], np.arange(K))
        cols = sel[order]
        n = arrs["n"][cols]

        def agg(m: np.ndarray) -> np.ndarray:
            if K == 0:
                return np.zeros(m.shape[:-1] + (0,))
            return np.add.reduceat(m, starts, axis=-1)

        n_k = agg(n)
        sums = agg(arrs["mean"][np.ix_(js, cols)] * n)  # genes x K
        pos = agg(arrs["frac"][np.ix_(js, cols)] * n)
        n_gene = len(js)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = pd.DataFrame(
                {
                    schema.COL_GENE: np.repeat(np.array([self.genes[j] for j in js]), K),
                    **{g: np.tile(keys[g].astype(str).to_numpy(), n_gene) for g in groupby},
                    schema.SUMMARY_N_CELLS: np.tile(np.rint(n_k).astype(np.int64), n_gene),
                    schema.SUMMARY_MEAN: (sums / n_k).ravel(),
                    schema.SUMMARY_FRAC: (pos / n_k).ravel(),
                    schema.SUMMARY_MEAN_EXPRESSING: np.where(pos > 0, sums / pos, np.nan).ravel(),
                }
            )
        if schema.OBS_SAMPLE not in groupby:
            n_samples = np.ones(K, np.int64)
            if schema.OBS_SAMPLE in gcols:  # distinct samples per group
                pairs = pd.DataFrame(
                    {"k": code, "s": pd.Categorical(sub[schema.OBS_SAMPLE]).codes}
                ).drop_duplicates()
                n_samples = np.bincount(pairs["k"].to_numpy(), minlength=K).astype(np.int64)
            out["n_samples"] = np.tile(n_samples, n_gene)
        return out

    # ------------------------------------------------------------------ tables
    @property
    def table_names(self) -> list[str]:
        names = list(self.meta.get("tables", []))
        csv_dir = self.path / schema.TABLES_DIR
        if csv_dir.is_dir():
            names += [p.stem for p in sorted(csv_dir.glob("*.csv")) if p.stem not in names]
        return names

    def has_table(self, name: str) -> bool:
        return name in self.table_names

    def table(self, name: str) -> pd.DataFrame:
        """A result table (a copy); :class:`~atlas.schema.MissingKeyError` names the stage."""
        import pyarrow.parquet as pq

        with self._lock:
            df = self._table_cache.get(name)
            if df is None:
                pfile = self.store_path / schema.STORE_TABLES_DIR / f"{_safe_name(name)}.parquet"
                cfile = self.path / schema.TABLES_DIR / f"{name}.csv"
                if pfile.is_file():
                    df = pq.read_table(pfile).to_pandas()
                elif cfile.is_file():
                    df = pd.read_csv(cfile, keep_default_na=False, na_values=[""])
                else:
                    raise schema.MissingKeyError(f"uns[{schema.UNS_TABLES!r}]", name)
                self._table_cache[name] = df
        return df.copy()

    def de(self) -> pd.DataFrame:
        return self.table(schema.TABLE_DE)

    def composition(self) -> pd.DataFrame:
        return self.table(schema.TABLE_COMPOSITION)

    def proportions(self) -> pd.DataFrame:
        return self.table(schema.TABLE_PROPORTIONS)

    def programs_table(self) -> pd.DataFrame:
        return self.table(schema.TABLE_PROGRAMS)

    def spatial(self):
        """The atlas's spatial results (:class:`atlas.spatial.SpatialResults`, written by
        ``tme-atlas spatial`` into ``DIR/spatial``), or ``None`` when there are none."""
        from .spatial import open_spatial

        return open_spatial(self.path)

    def interactions(self, kind: str = "consensus") -> pd.DataFrame:
        """Interaction table: ``kind`` = "consensus" | "by_sample" | "diff"."""
        name = {
            "consensus": schema.TABLE_INTERACTIONS,
            "by_sample": schema.TABLE_INTERACTIONS_BY_SAMPLE,
            "diff": schema.TABLE_INTERACTIONS_DIFF,
        }.get(kind)
        if name is None:
            raise ValueError("kind: one of 'consensus', 'by_sample', 'diff'")
        return self.table(name)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m atlas.store DIR``: rewrite DIR/store from DIR/atlas.h5ad."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print(
            "usage: python -m atlas.store DIR   (rewrite DIR/store from DIR/atlas.h5ad)",
            file=sys.stderr,
        )
        return 2
    try:
        path = rebuild_store(args[0])
    except InputError as e:
        for line in e.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = [
    "AtlasStore",
    "NotAnAtlasError",
    "UnknownGeneError",
    "compute_summary",
    "h5ad_safe_frame",
    "h5ad_safe_uns",
    "open",
    "prepare_adata",
    "read_atlas_adata",
    "rebuild_store",
    "write_atlas",
    "write_store",
]
