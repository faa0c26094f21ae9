"""Self-contained exports of an atlas for collaborators (``tme-atlas export``).

The exported ``.h5ad`` holds, for the selected cells and genes: raw counts
(``layers["counts"]``, identical to the source), log-normalised ``X``, all ``.obs`` metadata
(categories pruned to the values present), ``.var``, every embedding (``X_scVI``,
``X_umap``, ``X_pca``), the result tables under ``.uns["tme_tables"]`` as plain
DataFrames, the provenance, and ``.uns["tme_export"]`` describing the selection. It opens
with ``anndata.read_h5ad`` / scanpy, with ``cellxgene launch`` as is (``X_umap`` in obsm,
unique obs/var names) and from R (zellkonverter; no object columns, string categories, no
pickles). Tables are those of the whole atlas (they are not recomputed for a subset).

Only the selected rows are read from the source (``anndata.io.sparse_dataset``), so a small
subset of a large atlas needs little memory. The output is written atomically; the source
atlas is never overwritten.
"""

from __future__ import annotations

import difflib
import json
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import schema
from .errors import InputError
from .io import atomic_path, atomic_write_text, write_h5ad_atomic

UNS_EXPORT = schema.UNS_EXPORT
MODEL_SUFFIX = "_scvi_model"
SCANVI_MODEL_SUFFIX = "_scanvi_model"
README_SUFFIX = "_README.md"

# CLI flag -> obs column it filters
FILTERS: tuple[tuple[str, str, str], ...] = (
    ("cell_types", "--cell-types", schema.OBS_CELL_TYPE),
    ("conditions", "--conditions", schema.OBS_CONDITION),
    ("samples", "--samples", schema.OBS_SAMPLE),
    ("patients", "--patients", schema.OBS_PATIENT),
)


def _atlas_file(atlas_dir: str | Path) -> Path:
    from .store import NotAnAtlasError

    atlas_dir = Path(atlas_dir)
    if atlas_dir.is_file() and atlas_dir.suffix == ".h5ad":
        return atlas_dir
    if not atlas_dir.exists():
        raise NotAnAtlasError(f"not an atlas: {atlas_dir} does not exist")
    file = atlas_dir / schema.ATLAS_FILE
    if not file.is_file():
        raise NotAnAtlasError(
            f"not an atlas: {atlas_dir} has no {schema.ATLAS_FILE}; run tme-atlas build first"
        )
    return file


def _as_list(values: Iterable[str] | str | None) -> list[str] | None:
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    out = [str(v) for v in values]
    return out or None


def _fmt_values(values: Sequence[str], limit: int = 30) -> str:
    vals = [repr(v) for v in values]
    more = f", ... ({len(vals) - limit} more)" if len(vals) > limit else ""
    return ", ".join(vals[:limit]) + more


def select_cells(obs: pd.DataFrame, **filters: Iterable[str] | None) -> np.ndarray:
    """Boolean mask of the cells passing every filter (``cell_types=[...]``, ...).

    Raises :class:`InputError` for unknown values (listing the valid ones), for a filter on
    a column the atlas lacks, and when a filter empties the selection (naming it).
    """
    known = {name for name, _, _ in FILTERS}
    unknown_kw = set(filters) - known
    if unknown_kw:
        raise TypeError(f"unknown filters {sorted(unknown_kw)}; use {sorted(known)}")
    mask = np.ones(len(obs), dtype=bool)
    applied: list[str] = []
    problems: list[str] = []
    for name, flag, col in FILTERS:
        values = _as_list(filters.get(name))
        if values is None:
            continue
        if col not in obs.columns:
            raise schema.MissingKeyError("obs", col)
        s = obs[col]
        valid = (
            [str(c) for c in s.cat.categories]
            if isinstance(s.dtype, pd.CategoricalDtype)
            else sorted({str(v) for v in s.dropna().unique()})
        )
        bad = [v for v in values if v not in set(valid)]
        if bad:
            problems.append(
                f"{flag}: unknown value(s) {_fmt_values(bad)}; valid: {_fmt_values(valid)}"
            )
            continue
        mask &= (
            s.astype(str).isin(values).to_numpy()
            if not isinstance(s.dtype, pd.CategoricalDtype)
            else s.isin(values).to_numpy()
        )
        applied.append(f"{flag} {' '.join(values)}")
        if not mask.any() and not problems:
            before = f" (after {'; '.join(applied[:-1])})" if len(applied) > 1 else ""
            raise InputError(
                f"the selection is empty: no cells left after {flag} {' '.join(values)}"
                f"{before}; nothing to export"
            )
    if problems:
        raise InputError(problems)
    return mask


def select_genes(var_names: Sequence[str], genes: Iterable[str] | None) -> np.ndarray | None:
    """Positions of ``genes`` in ``var_names`` (atlas order); ``None`` means all genes.

    Exact symbols first, then case-insensitive; unknown genes raise :class:`InputError`
    listing close matches.
    """
    genes = _as_list(genes)
    if genes is None:
        return None
    names = [str(g) for g in var_names]
    pos = {g: i for i, g in enumerate(names)}
    lower: dict[str, int] = {}
    for i, g in enumerate(names):
        lower.setdefault(g.lower(), i)
    found, problems = [], []
    for g in genes:
        j = pos.get(g, lower.get(g.lower()))
        if j is None:
            close = difflib.get_close_matches(g, names, n=3, cutoff=0.75)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"--genes: {g!r} is not in the atlas{hint}")
        else:
            found.append(j)
    if problems:
        raise InputError(problems)
    return np.array(sorted(set(found)), dtype=np.int64)


def _read_rows(elem, rows: np.ndarray | None, cols: np.ndarray | None):
    """Rows (and columns) of an on-disk matrix: sparse via sparse_dataset, dense via h5py."""
    import anndata as ad
    import h5py
    from scipy import sparse

    if isinstance(elem, h5py.Dataset):
        m = elem[:] if rows is None else elem[np.sort(rows)]
        m = np.asarray(m)
        return m if cols is None else m[:, cols]
    enc = elem.attrs.get("encoding-type", "")
    if enc in ("csr_matrix", "csc_matrix"):
        ds = ad.io.sparse_dataset(elem)
        m = ds.to_memory() if rows is None else ds[rows]
        if not sparse.issparse(m):  # pragma: no cover
            m = sparse.csr_matrix(m)
        m = m.tocsr() if m.format != "csr" else m
        return m if cols is None else m[:, cols]
    m = ad.io.read_elem(elem)
    if rows is not None:
        m = m[rows]
    return m if cols is None else m[:, cols]


def _prune_categories(obs: pd.DataFrame, uns: dict[str, Any]) -> pd.DataFrame:
    """Drop unused categories; keep ``uns["<col>_colors"]`` aligned with the categories."""
    obs = obs.copy()
    for col in obs.columns:
        s = obs[col]
        if not isinstance(s.dtype, pd.CategoricalDtype):
            continue
        before = list(s.cat.categories)
        s = s.cat.remove_unused_categories()
        obs[col] = s
        key = f"{col}_colors"
        colors = uns.get(key)
        if colors is not None and len(np.asarray(colors)) == len(before):
            keep = [before.index(c) for c in s.cat.categories]
            uns[key] = np.asarray(colors)[keep]
    return obs


def export_adata(
    atlas_dir: str | Path,
    *,
    cell_types: Iterable[str] | None = None,
    conditions: Iterable[str] | None = None,
    samples: Iterable[str] | None = None,
    patients: Iterable[str] | None = None,
    genes: Iterable[str] | None = None,
):
    """The selection as an in-memory, h5ad-safe AnnData (what :func:`export_atlas` writes)."""
    import anndata as ad
    import h5py

    from .store import NotAnAtlasError, h5ad_safe_uns, prepare_adata

    src = _atlas_file(atlas_dir)
    read_elem = ad.io.read_elem
    try:  # a corrupt or truncated atlas.h5ad: one clear line, not a traceback
        f = h5py.File(src, "r")
    except OSError as e:
        raise NotAnAtlasError(f"not an atlas: {src} cannot be read ({e})") from None
    with f:
        obs = read_elem(f["obs"])
        var = read_elem(f["var"])
        mask = select_cells(
            obs, cell_types=cell_types, conditions=conditions, samples=samples, patients=patients
        )
        gene_idx = select_genes(var.index, genes)
        rows = None if mask.all() else np.flatnonzero(mask)
        X = _read_rows(f["X"], rows, gene_idx)
        layers = {}
        if "layers" in f:
            for k in f["layers"]:
                layers[k] = _read_rows(f["layers"][k], rows, gene_idx)
        if schema.LAYER_COUNTS not in layers:
            raise schema.MissingKeyError("layers", schema.LAYER_COUNTS)
        obsm = {}
        if "obsm" in f:
            for k in f["obsm"]:
                m = read_elem(f["obsm"][k])
                obsm[k] = m if rows is None else (m.iloc[rows] if hasattr(m, "iloc") else m[rows])
        varm = {}
        if "varm" in f and gene_idx is not None:
            for k in f["varm"]:
                varm[k] = read_elem(f["varm"][k])[gene_idx]
        elif "varm" in f:
            varm = {k: read_elem(f["varm"][k]) for k in f["varm"]}
        obsp = {}
        if "obsp" in f:
            for k in f["obsp"]:
                m = _read_rows(f["obsp"][k], rows, None)
                obsp[k] = m if rows is None else m[:, rows]
        uns = dict(read_elem(f["uns"])) if "uns" in f else {}

    if rows is not None:
        obs = obs.iloc[rows]
    if gene_idx is not None:
        var = var.iloc[gene_idx]
    uns = h5ad_safe_uns(uns)
    obs = _prune_categories(obs, uns)
    filters = {
        name: _as_list(v)
        for name, v in (
            ("cell_types", cell_types),
            ("conditions", conditions),
            ("samples", samples),
            ("patients", patients),
            ("genes", genes),
        )
        if _as_list(v) is not None
    }
    uns[UNS_EXPORT] = {
        "source": str(src.resolve()),
        "filters_json": json.dumps(filters),
        "n_cells": int(len(obs)),
        "n_genes": int(len(var)),
        "n_cells_source": int(len(mask)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": "X: log1p(normalize_total 1e4) of the full atlas; layers['counts']: raw "
        "counts; tables in uns['tme_tables'] were computed on the whole atlas",
    }
    adata = ad.AnnData(
        X=X, obs=obs, var=var, obsm=obsm, varm=varm, obsp=obsp, layers=layers, uns=uns
    )
    return prepare_adata(adata)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:  # pragma: no cover
        return False


def export_atlas(
    atlas_dir: str | Path,
    out: str | Path,
    *,
    cell_types: Iterable[str] | None = None,
    conditions: Iterable[str] | None = None,
    samples: Iterable[str] | None = None,
    patients: Iterable[str] | None = None,
    genes: Iterable[str] | None = None,
    tables_dir: str | Path | None = None,
    with_model: bool = False,
) -> Path:
    """Write the selection to ``out`` (``.h5ad``, atomically); returns ``out``.

    ``tables_dir``: also write every table as ``<name>.csv`` there. ``with_model``: copy the
    trained scVI model (``DIR/model``) to ``<out stem>_scvi_model/`` and the scANVI model
    (``DIR/model_scanvi``, when the atlas has one) to ``<out stem>_scanvi_model/`` beside
    ``out``, with ``<out stem>_README.md`` saying how to map new samples onto them.
    Raises :class:`InputError` for a bad selection, a bad output path or a missing model.
    """
    from .tables import write_tables_csv

    src = _atlas_file(atlas_dir)
    atlas_root = src.parent
    out = Path(out)
    if out.suffix != ".h5ad":
        raise InputError(f"--out {out}: the output must be a .h5ad file")
    if out.resolve() == src.resolve() or _same_file(out, src):
        raise InputError(f"--out {out} is the source atlas; refusing to overwrite it")
    if out.is_dir():
        raise InputError(f"--out {out} is a directory; give a .h5ad file name")
    model_src = atlas_root / schema.MODEL_DIR
    if with_model and not model_src.is_dir():
        raise InputError(
            f"--with-model: {atlas_root} has no trained model ({schema.MODEL_DIR}/); "
            "it is written by tme-atlas build (stage 'integrate')"
        )
    if tables_dir is not None:
        tdir = Path(tables_dir).resolve()
        if tdir == (atlas_root / schema.TABLES_DIR).resolve() or tdir == atlas_root.resolve():
            raise InputError(f"--tables {tables_dir} is inside the source atlas; choose another")
    adata = export_adata(
        atlas_root if src.name == schema.ATLAS_FILE else src,
        cell_types=cell_types,
        conditions=conditions,
        samples=samples,
        patients=patients,
        genes=genes,
    )
    write_h5ad_atomic(adata, out)
    if tables_dir is not None:
        write_tables_csv(adata, tables_dir)
    if with_model:
        dst = out.with_name(f"{out.stem}{MODEL_SUFFIX}")
        with atomic_path(dst) as tmp:
            shutil.copytree(model_src, tmp)
        scanvi_src = atlas_root / schema.SCANVI_MODEL_DIR
        scanvi_dst = out.with_name(f"{out.stem}{SCANVI_MODEL_SUFFIX}")
        if scanvi_src.is_dir():
            with atomic_path(scanvi_dst) as tmp:
                shutil.copytree(scanvi_src, tmp)
        readme = model_readme(out, adata, has_scanvi=scanvi_src.is_dir())
        atomic_write_text(out.with_name(f"{out.stem}{README_SUFFIX}"), readme)
    return out


def model_readme(out: Path, adata, *, has_scanvi: bool) -> str:
    """The README written beside an export ``--with-model``: what the files are and how to
    map new samples onto the atlas (``tme-atlas map`` or scvi-tools directly)."""
    params = adata.uns.get(schema.params_key("scanvi"), {}) or {}
    iparams = adata.uns.get(schema.params_key("integrate"), {}) or {}
    labels = params.get("labels", [])
    labels = ", ".join(str(v) for v in np.asarray(labels).ravel()) if len(labels) else "-"
    species = adata.uns.get(schema.UNS_SPECIES, "")
    batch_key = iparams.get("batch_key", schema.OBS_SAMPLE)
    stem = out.stem
    lines = [
        f"# {out.name}: atlas export with its models",
        "",
        "| file | what |",
        "|---|---|",
        f"| `{out.name}` | the atlas cells (raw counts in `layers['{schema.LAYER_COUNTS}']`, "
        f"`obsm['{schema.OBSM_SCVI}']`, `obsm['{schema.OBSM_SCANVI}']`, "
        f"`obsm['{schema.OBSM_UMAP}']`, labels in `obs['{schema.OBS_CELL_TYPE}']`) |",
        f"| `{stem}{MODEL_SUFFIX}/` | the trained scVI model (scvi-tools "
        f"{iparams.get('scvi_version', '')}), batch = `obs['{batch_key}']` |",
    ]
    if has_scanvi:
        lines.append(
            f"| `{stem}{SCANVI_MODEL_SUFFIX}/` | scANVI trained from it on the atlas labels "
            f"(`obs['{schema.OBS_CELL_TYPE}']`; unlabeled category `{schema.UNKNOWN}`) |"
        )
    lines += [
        "",
        f"Species: {species or 'see obs'}. Labels the model knows: {labels}.",
        "",
        "## Map your own samples onto this atlas",
        "",
    ]
    if not has_scanvi:
        lines += [
            "This atlas was built without the scANVI stage: rebuild it with the current "
            "`tme-atlas build` to get a model that maps new samples.",
            "",
        ]
        return "\n".join(lines)
    lines += [
        "With the project's command line (same validation and QC as `tme-atlas build`; "
        "scArches surgery; label transfer with an uncertainty and an `Unknown` call; "
        "cells placed on this atlas's UMAP; a query atlas the explorer opens):",
        "",
        "```bash",
        f"tme-atlas map SAMPLESHEET.csv --atlas {out.name} --out QUERY_ATLAS/",
        f"tme-atlas map --h5ad MERGED.h5ad --atlas {out.name} --out QUERY_ATLAS/",
        "tme-atlas serve QUERY_ATLAS/",
        "```",
        "",
        f"(`--atlas` takes this file when `{stem}{SCANVI_MODEL_SUFFIX}/` lies beside it.)",
        "",
        "With scvi-tools only (raw counts, gene symbols as `var_names`, one batch per sample):",
        "",
        "```python",
        "import scvi",
        f'query.obs["{batch_key}"] = ...   # your sample ids (new batches)',
        f'query.obs["{schema.OBS_CELL_TYPE}"] = "{schema.UNKNOWN}"',
        f'query.layers["{schema.LAYER_COUNTS}"] = query.X  # raw counts',
        f'scvi.model.SCANVI.prepare_query_anndata(query, "{stem}{SCANVI_MODEL_SUFFIX}")',
        f'model = scvi.model.SCANVI.load_query_data(query, "{stem}{SCANVI_MODEL_SUFFIX}")',
        'model.train(max_epochs=20, plan_kwargs={"weight_decay": 0.0})',
        "probs = model.predict(soft=True)          # per-cell label probabilities",
        'query.obs["label"] = probs.idxmax(axis=1)',
        'query.obs["uncertainty"] = 1 - probs.max(axis=1)',
        f'query.obsm["{schema.OBSM_SCANVI}"] = model.get_latent_representation()',
        "```",
        "",
        "Genes the model uses that your data lack are filled with zeros by "
        "`prepare_query_anndata`; map only data of the same species with most of the "
        "model's genes measured.",
        "",
    ]
    return "\n".join(lines)


__all__ = ["export_adata", "export_atlas", "select_cells", "select_genes", "UNS_EXPORT"]
