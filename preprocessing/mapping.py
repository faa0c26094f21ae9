"""``tme-atlas map``: place new samples on a built atlas (scArches surgery with scvi-tools).

1. The query is validated like ``build`` (:func:`preprocessing.pipeline.validate_inputs`:
   sample sheet or ``--h5ad``) and goes through the build's own ``qc`` and ``normalize``
   stages (:func:`preprocessing.pipeline.run_stage`); its species and genes are checked
   against the atlas's scANVI model (one line per problem, exit 2, before any training).
2. Surgery: ``SCANVI.prepare_query_anndata`` (model genes, missing ones as zeros) and
   ``SCANVI.load_query_data`` on the atlas's ``model_scanvi/`` (the query's samples are new
   batches), trained a short step budget with weight decay 0 (scArches' recipe).
3. Labels: ``predict(soft=True)``; the most probable reference label, its uncertainty
   ``1 - probability``, and ``Unknown`` when the uncertainty exceeds
   ``mapping.unknown_threshold`` or the cell lies farther from the reference cells in the
   scANVI latent than ``mapping.novelty_quantile`` of the reference cells' own kNN
   distances (a cell type the atlas lacks).
4. UMAP: the query cells are placed on the atlas's UMAP by umap-learn's ``transform``
   through scanpy's ``sc.tl.ingest`` (kNN to the reference cells in the scANVI latent).
5. The query atlas (``--out``): reference and query cells (``obs["origin"]``; query only
   with ``mapping.query_only``) in the atlas layout, whose tables are computed by the
   build's own functions (QC summary, programme scores, composition, pseudobulk DE and
   programmes against the reference's conditions where there are two conditions), plus
   the mixing of query and reference cells per label (``integration_metrics``).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlas import schema
from atlas.errors import InputError
from atlas.params import record_params

from .integrate import forget_models
from .log import FILE_ONLY, get_logger, setup_logging
from .scanvi_model import LABELS_KEY, model_anndata

log = get_logger("map")

# reference obs columns carried to the query atlas for query cells (where they make sense)
_QUERY_TABLES_DROPPED = (
    schema.TABLE_INTERACTIONS,
    schema.TABLE_INTERACTIONS_BY_SAMPLE,
    schema.TABLE_INTERACTIONS_DIFF,
    schema.TABLE_INTERACTIONS_DIFF_ALL,
    schema.TABLE_LIGREC_AGREEMENT,
    schema.TABLE_MARKERS,
)


@dataclass(frozen=True)
class Reference:
    """Where a reference atlas and its scANVI model are."""

    atlas_file: Path
    model_dir: Path


def reference_paths(atlas: str | Path) -> Reference:
    """The atlas file and scANVI model of ``--atlas``: an atlas directory (``atlas.h5ad``,
    ``model_scanvi/``) or an export ``FILE.h5ad`` with ``FILE_scanvi_model/`` beside it.

    Raises :class:`~atlas.errors.InputError` (one line) when either is missing.
    """
    from atlas.export import SCANVI_MODEL_SUFFIX

    atlas = Path(atlas)
    if atlas.is_file() and atlas.suffix == ".h5ad":
        file, model = atlas, atlas.with_name(f"{atlas.stem}{SCANVI_MODEL_SUFFIX}")
        where = f"{model.name}/ beside it"
    else:
        file, model = atlas / schema.ATLAS_FILE, atlas / schema.SCANVI_MODEL_DIR
        where = f"{schema.SCANVI_MODEL_DIR}/"
    if not file.is_file():
        raise InputError(
            f"--atlas {atlas}: not an atlas (no {schema.ATLAS_FILE}); run tme-atlas build"
        )
    if not (model / "model.pt").is_file():
        raise InputError(
            f"--atlas {atlas}: has no scANVI model ({where}); rebuild it with tme-atlas build "
            "(stage 'scanvi') or export it with tme-atlas export --with-model"
        )
    return Reference(atlas_file=file, model_dir=model)


def gene_problems(query_genes, model_genes, *, min_overlap: float, label: str) -> list[str]:
    """The query must measure at least ``min_overlap`` of the model's genes."""
    model_genes = pd.Index(model_genes)
    n = int(model_genes.isin(pd.Index(query_genes)).sum())
    frac = n / max(1, len(model_genes))
    if frac >= min_overlap:
        return []
    upper = int(model_genes.str.upper().isin(pd.Index(query_genes).str.upper()).sum())
    hint = (
        " (they match only ignoring case: another species?)"
        if upper / max(1, len(model_genes)) >= min_overlap
        else ""
    )
    return [
        f"{label}: measures {n} of the reference model's {len(model_genes)} genes "
        f"({frac:.0%}; mapping.min_gene_overlap {min_overlap:.0%}): other genes or species "
        f"than the reference{hint}"
    ]


def _train_query(lean, ref: Reference, cfg, scfg):
    """scArches surgery on ``lean`` (model genes, batches, labels all Unknown)."""
    import scvi
    import torch

    from .integrate import (
        _quiet_lightning,
        _safe_batch_size,
        default_torch_threads,
        epochs_for_steps,
        resolve_accelerator,
    )
    from .log import progress_enabled

    threads = scfg.torch_threads or default_torch_threads()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    scvi.settings.seed = scfg.seed
    scvi.settings.dl_num_workers = 0
    accelerator = resolve_accelerator(scfg.accelerator)
    batch_size = _safe_batch_size(lean.n_obs, cfg.batch_size, 1.0)
    max_epochs, steps_per_epoch = epochs_for_steps(cfg.max_steps, lean.n_obs, batch_size, 1.0)
    show = progress_enabled()
    t0 = time.perf_counter()
    try:
        with _quiet_lightning(show):
            model = scvi.model.SCANVI.load_query_data(
                lean, str(ref.model_dir), accelerator=accelerator
            )
            model.train(
                max_epochs=max_epochs,
                train_size=1.0,
                batch_size=batch_size,
                accelerator=accelerator,
                devices=1,
                plan_kwargs={"lr": cfg.learning_rate, "weight_decay": 0.0},
                enable_progress_bar=show,
                enable_model_summary=False,
                enable_checkpointing=False,
            )
            bs = max(batch_size, 1024)
            probs = model.predict(soft=True, batch_size=bs)
            latent = np.asarray(model.get_latent_representation(batch_size=bs), np.float32)
    finally:
        torch.set_num_threads(old)
    info = {
        "max_steps": int(cfg.max_steps),
        "max_epochs": int(max_epochs),
        "steps_trained": int(max_epochs * steps_per_epoch),
        "batch_size": int(batch_size),
        "learning_rate": float(cfg.learning_rate),
        "weight_decay": 0.0,
        "accelerator": accelerator,
        "torch_threads": int(threads),
        "train_seconds": round(time.perf_counter() - t0, 2),
    }
    return model, probs, latent, info


def novelty_distance(ref_latent, query_latent, *, k: int, quantile: float):
    """Mean distance of each query cell to its ``k`` nearest reference cells (scANVI
    latent) and the threshold above which it is novel: the ``quantile`` of the reference
    cells' own mean kNN distance (themselves left out). Returns ``(distance, threshold)``."""
    from sklearn.neighbors import NearestNeighbors

    k = int(min(k, ref_latent.shape[0] - 1))
    nn = NearestNeighbors(n_neighbors=k + 1).fit(ref_latent)
    d_ref, _ = nn.kneighbors(ref_latent)
    own = d_ref[:, 1:].mean(axis=1)
    d_q, _ = nn.kneighbors(query_latent, n_neighbors=k)
    dist = d_q.mean(axis=1)
    thr = float(np.quantile(own, quantile)) if quantile < 1 else float("inf")
    return dist, thr


def transfer_labels(probs: pd.DataFrame, *, threshold: float, novel=None) -> pd.DataFrame:
    """Per query cell: the most probable reference label, its uncertainty (1 - probability)
    and the call (``Unknown`` above ``threshold`` or where ``novel``)."""
    cols = [c for c in probs.columns if str(c) != schema.UNKNOWN]
    p = probs[cols].to_numpy(dtype=float)
    best = np.asarray(cols, dtype=object)[p.argmax(axis=1)].astype(str)
    unc = 1.0 - p.max(axis=1)
    call = best.copy().astype(object)
    unknown = unc > threshold
    if novel is not None:
        unknown |= np.asarray(novel, dtype=bool)
    call[unknown] = schema.UNKNOWN
    return pd.DataFrame(
        {
            schema.OBS_TRANSFERRED_LABEL: best,
            schema.OBS_LABEL_UNCERTAINTY: unc.astype(np.float32),
            schema.OBS_CELL_TYPE: call.astype(str),
        },
        index=probs.index,
    )


def fuzzy_memberships(dists: np.ndarray, *, n_iter: int = 64) -> np.ndarray:
    """umap-learn's fuzzy membership of each query cell to its neighbours, as
    ``UMAP.transform`` computes them (``smooth_knn_dist`` with the transform's local
    connectivity 0, so ``rho = 0``; then ``compute_membership_strengths``): per row the
    bandwidth ``sigma`` with ``sum_{j >= 1} exp(-d_j / sigma) = log2(k)`` by bisection,
    floored at 1e-3 x the mean distance; membership ``exp(-d / sigma)`` (1 at ``d = 0``)."""
    d = np.asarray(dists, dtype=np.float64)
    n, k = d.shape
    target = np.log2(k)
    lo = np.zeros(n)
    hi = np.full(n, np.inf)
    mid = np.ones(n)
    rest = d[:, 1:]
    for _ in range(n_iter):
        psum = np.exp(-rest / mid[:, None]).sum(axis=1)
        if np.all(np.abs(psum - target) < 1e-5):
            break
        big = psum > target
        hi = np.where(big, mid, hi)
        lo = np.where(big, lo, mid)
        mid = np.where(big, (lo + hi) / 2.0, np.where(np.isinf(hi), mid * 2, (lo + hi) / 2.0))
    sigma = np.maximum(mid, 1e-3 * d.mean())
    with np.errstate(over="ignore"):
        vals = np.exp(-d / sigma[:, None])
    vals[d <= 0] = 1.0
    return vals.astype(np.float32)


def place_on_umap(ref_latent, ref_umap, query_latent, *, n_neighbors: int, seed: int = 0):
    """Query coordinates on the reference UMAP: the steps of umap-learn's
    ``UMAP.transform`` (fuzzy membership of each query cell to its ``n_neighbors`` nearest
    reference cells in the scANVI latent, start at their membership-weighted mean UMAP
    position, then umap's layout optimisation with the reference fixed), with an exact kNN
    (scikit-learn) instead of pynndescent's index, whose numba compilation alone took
    ~30 s (scanpy's ``sc.tl.ingest`` builds one), and the memberships in numpy
    (:func:`fuzzy_memberships`; umap's numba versions compile for ~8 s per process)."""
    import scipy.sparse
    from sklearn.neighbors import NearestNeighbors
    from sklearn.utils import check_random_state
    from umap.layouts import optimize_layout_euclidean
    from umap.umap_ import find_ab_params, init_graph_transform, make_epochs_per_sample

    from atlas.config import ClusterConfig

    ref_umap = np.ascontiguousarray(ref_umap, dtype=np.float32)
    k = int(min(n_neighbors, ref_latent.shape[0]))
    nn = NearestNeighbors(n_neighbors=k).fit(np.asarray(ref_latent, np.float32))
    dists, indices = nn.kneighbors(np.asarray(query_latent, np.float32))
    dists = dists.astype(np.float32, order="C")
    indices = indices.astype(np.int32, order="C")
    vals = fuzzy_memberships(dists)
    rows = np.repeat(np.arange(indices.shape[0]), k)
    graph = scipy.sparse.coo_matrix(
        (vals.ravel(), (rows, indices.ravel())),
        shape=(query_latent.shape[0], ref_umap.shape[0]),
    )
    csr = graph.tocsr()
    csr.eliminate_zeros()
    embedding = init_graph_transform(csr, ref_umap)
    n_epochs = 100 if graph.shape[0] <= 10000 else 30
    graph.data[graph.data < (graph.data.max() / float(n_epochs))] = 0.0
    graph.eliminate_zeros()
    epochs_per_sample = make_epochs_per_sample(graph.data, n_epochs)
    a, b = find_ab_params(1.0, ClusterConfig().umap_min_dist)
    rng_state = (
        check_random_state(seed)
        .randint(np.iinfo(np.int32).min + 1, np.iinfo(np.int32).max - 1, 3)
        .astype(np.int64)
    )
    embedding = optimize_layout_euclidean(
        np.asarray(embedding, dtype=np.float32),
        ref_umap.copy(),
        graph.row,
        graph.col,
        n_epochs,
        graph.shape[1],
        epochs_per_sample,
        a,
        b,
        rng_state,
        1.0,  # repulsion strength
        1.0 / 4.0,  # initial alpha / 4, as UMAP.transform
        5.0,  # negative sample rate
    )
    return np.asarray(embedding, dtype=np.float32)


def _align(adata, var_names: pd.Index, layer: str | None):
    """``X`` (or a layer) of ``adata`` on ``var_names`` (missing genes as zeros), CSR."""
    m = adata.X if layer is None else adata.layers[layer]
    m = sp.csr_matrix(m, dtype=np.float32)
    idx = adata.var_names.get_indexer(var_names)
    have = idx >= 0
    cols = m.tocsc()[:, idx[have]]
    perm = np.flatnonzero(have)
    # scatter the measured columns into their reference positions
    scatter = sp.csr_matrix(
        (np.ones(len(perm), np.float32), (np.arange(len(perm)), perm)),
        shape=(len(perm), len(var_names)),
    )
    out = (cols @ scatter).tocsr()
    out.sort_indices()
    return out


def query_atlas(reference, query, *, query_only: bool = False):
    """The query atlas: reference and query cells on the reference's genes
    (``obs[OBS_ORIGIN]``), embeddings ``X_scANVI`` and ``X_umap``; reference tables of the
    whole atlas that the query changes are dropped (they are recomputed)."""
    import anndata as ad

    var = reference.var.copy()
    qX = _align(query, reference.var_names, None)
    qC = _align(query, reference.var_names, schema.LAYER_COUNTS)
    q = ad.AnnData(X=qX, obs=query.obs.copy(), var=var.copy())
    q.layers[schema.LAYER_COUNTS] = qC
    for key in (schema.OBSM_SCANVI, schema.OBSM_UMAP):
        q.obsm[key] = query.obsm[key]
    q.obs[schema.OBS_ORIGIN] = schema.ORIGIN_QUERY
    lineage = (
        reference.obs[[schema.OBS_CELL_TYPE, schema.OBS_LINEAGE]]
        .astype(str)
        .drop_duplicates(schema.OBS_CELL_TYPE)
        .set_index(schema.OBS_CELL_TYPE)[schema.OBS_LINEAGE]
        if schema.OBS_LINEAGE in reference.obs
        else pd.Series(dtype=str)
    )
    ct = q.obs[schema.OBS_CELL_TYPE].astype(str)
    q.obs[schema.OBS_LINEAGE] = ct.map(lineage).fillna(schema.UNKNOWN).to_numpy()
    # malignant cells of the query: its CLL labels (no clonotype / copy-number evidence)
    q.obs[schema.OBS_MALIGNANT] = ct.str.startswith(schema.CLL_LABEL_PREFIX).to_numpy()
    if query_only:
        combined = q
    else:
        r = reference.copy()
        r.obs[schema.OBS_ORIGIN] = schema.ORIGIN_REFERENCE
        r.obs[schema.OBS_TRANSFERRED_LABEL] = r.obs[schema.OBS_CELL_TYPE].astype(str)
        r.obs[schema.OBS_LABEL_UNCERTAINTY] = np.float32(np.nan)
        r.X = sp.csr_matrix(r.X, dtype=np.float32)
        r.layers[schema.LAYER_COUNTS] = sp.csr_matrix(
            r.layers[schema.LAYER_COUNTS], dtype=np.float32
        )
        for key in list(r.obsm):
            if key not in (schema.OBSM_SCANVI, schema.OBSM_UMAP):
                del r.obsm[key]
        combined = ad.concat([r, q], join="outer", merge="first", index_unique=None)
        combined.var = var
    for col in (schema.OBS_ORIGIN, schema.OBS_CELL_TYPE, schema.OBS_LINEAGE):
        combined.obs[col] = pd.Categorical(combined.obs[col].astype(str))
    # flags the reference has and the query lacks (doublet-like cluster, ...) are False for
    # query cells: a bool column stays bool (an object column of bools and NaN is written
    # as a categorical that later readers cannot fill)
    for col in (
        schema.OBS_MALIGNANT,
        *(c for c, t in reference.obs.dtypes.items() if pd.api.types.is_bool_dtype(t)),
    ):
        if col in combined.obs:
            combined.obs[col] = combined.obs[col].astype("boolean").fillna(False).astype(bool)
    uns = dict(reference.uns)
    tables = dict(uns.get(schema.UNS_TABLES, {}) or {})
    for name in (
        *_QUERY_TABLES_DROPPED,
        schema.TABLE_COMPOSITION,
        schema.TABLE_PROPORTIONS,
        schema.TABLE_DE,
        schema.TABLE_PROGRAMS,
        schema.TABLE_QC_SUMMARY,
        schema.TABLE_INTEGRATION_METRICS,
    ):
        tables.pop(name, None)
    uns[schema.UNS_TABLES] = tables
    uns.pop(schema.UNS_PROVENANCE, None)
    order = [str(c) for c in np.asarray(reference.uns.get(schema.UNS_CONDITION_ORDER, []))]
    for c in pd.unique(query.obs[schema.OBS_CONDITION].astype(str)):
        if c not in order:
            order.append(c)
    uns[schema.UNS_CONDITION_ORDER] = order
    if query_only:
        uns[schema.UNS_REFERENCE_CONDITION] = str(
            query.uns.get(schema.UNS_REFERENCE_CONDITION, order[0])
        )
    combined.uns = uns
    return combined


def _tables(adata, config, query_qc) -> None:
    """The query atlas's tables, by the build's own functions."""
    from atlas.tables import get_table, has_table, put_table

    from .analyses import run_analyses
    from .integrate import integration_metrics
    from .programs import score_programs

    if has_table(query_qc, schema.TABLE_QC_SUMMARY):
        put_table(adata, schema.TABLE_QC_SUMMARY, get_table(query_qc, schema.TABLE_QC_SUMMARY))
    species = str(adata.uns.get(schema.UNS_SPECIES, "human"))
    score_programs(adata, species=species, seed=config.seed)
    conditions = adata.obs[schema.OBS_CONDITION].astype(str).unique()
    ref = str(adata.uns.get(schema.UNS_REFERENCE_CONDITION, ""))
    if len(conditions) >= 2 and ref in set(conditions):
        run_analyses(adata, config=config)
    else:
        log.info("map: analyses skipped (one condition, or no cells of the reference's %r)", ref)
    if schema.OBS_ORIGIN in adata.obs and adata.obs[schema.OBS_ORIGIN].nunique() > 1:
        metrics = integration_metrics(
            adata,
            batch_key=schema.OBS_ORIGIN,
            label_key=schema.OBS_CELL_TYPE,
            embeddings=(schema.OBSM_SCANVI,),
            seed=config.seed,
            cluster_metrics=False,  # mixing and label metrics; no Leiden graph (umap's numba)
        )
        put_table(adata, schema.TABLE_INTEGRATION_METRICS, metrics)


def run_map(
    *,
    samplesheet: str | Path | None = None,
    h5ad: str | Path | None = None,
    atlas: str | Path,
    out: str | Path,
    config=None,
    allow_outside_paths: bool = False,
    verbose: bool = False,
) -> Path:
    """Map a query (sample sheet or ``--h5ad``) onto the atlas ``atlas``; write the query
    atlas to ``out`` (``atlas.h5ad`` with ``store/`` and ``tables/``, ``qc/``, the
    query-trained scANVI model in ``model_scanvi/``, ``mapping.json``, ``build.log``).

    Bad input (no atlas or model, another species, too few of the model's genes, a bad
    sheet) raises :class:`~atlas.errors.InputError` before any training; nothing but the
    log is written. Returns ``out``.
    """
    import anndata as ad
    import scvi

    from atlas.config import Config
    from atlas.io import atomic_write_text
    from atlas.store import write_atlas

    from . import stages as registry
    from .pipeline import BuildContext, _replace_dir, run_stage, validate_inputs

    config = config if config is not None else Config()
    cfg = config.mapping
    out = Path(out)
    ref = reference_paths(atlas)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    if out.resolve() == ref.atlas_file.parent.resolve():
        raise InputError(f"--out {out} is the reference atlas; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(log_file=out / schema.LOG_FILE, verbose=verbose)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    log.info("tme-atlas map: %s onto %s -> %s", h5ad or samplesheet, ref.atlas_file, out)
    try:
        t0 = time.perf_counter()
        res, species, conditions, _ = validate_inputs(
            samplesheet, h5ad, config, allow_outside_paths
        )
        reference = ad.read_h5ad(ref.atlas_file)
        schema.require_obs(reference, schema.OBS_CELL_TYPE)
        schema.require_obsm(reference, schema.OBSM_SCANVI, schema.OBSM_UMAP)
        ref_species = str(reference.uns.get(schema.UNS_SPECIES, species))
        label = f"query {h5ad or samplesheet}"
        if species != ref_species:  # one line: the gene check would only repeat it
            raise InputError(
                f"{label}: species '{species}' differs from the reference atlas's '{ref_species}'"
            )
        problems = []
        model_genes = scvi.model.SCANVI.prepare_query_anndata(
            res.adata, str(ref.model_dir), return_reference_var_names=True
        )
        problems += gene_problems(
            res.adata.var_names, model_genes, min_overlap=cfg.min_gene_overlap, label=label
        )
        dup = set(res.adata.obs[schema.OBS_SAMPLE].astype(str)) & set(
            reference.obs[schema.OBS_SAMPLE].astype(str)
        )
        if dup and not cfg.query_only:
            problems.append(
                f"{label}: sample_id(s) {', '.join(sorted(dup)[:5])} are already in the "
                "reference atlas; give the query samples other ids"
            )
        if problems:
            raise InputError(problems)
    except InputError as e:
        for line in e.problems:
            log.error("%s", line, extra=FILE_ONLY)
        raise
    timings["validate"] = time.perf_counter() - t0

    # ---- the build's own QC and normalisation
    ctx = BuildContext(out=out, config=config, species=species, conditions=conditions)
    ctx.ingest = res
    shutil.rmtree(ctx.work, ignore_errors=True)
    ctx.work.mkdir(parents=True, exist_ok=True)
    query, res.adata = res.adata, None  # ctx keeps provenance, not the matrix
    n_query_in = int(query.n_obs)
    query.uns[schema.UNS_SPECIES] = species
    query.uns[schema.UNS_CONDITION_ORDER] = list(conditions)
    for name in ("qc", "normalize"):
        t0 = time.perf_counter()
        query = run_stage(query, registry.get(name), ctx)
        timings[name] = time.perf_counter() - t0
    qc_view = query
    query = query[query.obs[schema.OBS_QC_PASS].astype(bool).to_numpy()].copy()

    # ---- scArches surgery and label transfer
    t0 = time.perf_counter()
    scfg = config.scvi
    overlap = [g for g in model_genes if g in set(query.var_names)]
    lean = model_anndata(
        query,
        genes=overlap,
        batch_key=scfg.batch_key,
        covariates=scfg.categorical_covariates,
    )
    scvi.model.SCANVI.prepare_query_anndata(lean, str(ref.model_dir), inplace=True)
    assert lean.obs[LABELS_KEY].astype(str).eq(schema.UNKNOWN).all()
    model, probs, latent, train_info = _train_query(lean, ref, cfg, scfg)
    timings["surgery"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref_latent = np.asarray(reference.obsm[schema.OBSM_SCANVI], np.float32)
    dist, thr = novelty_distance(
        ref_latent, latent, k=cfg.n_neighbors, quantile=cfg.novelty_quantile
    )
    novel = dist > thr
    calls = transfer_labels(probs, threshold=cfg.unknown_threshold, novel=novel)
    for col in calls.columns:
        query.obs[col] = calls[col].to_numpy()
    query.obsm[schema.OBSM_SCANVI] = latent
    timings["labels"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    query.obsm[schema.OBSM_UMAP] = place_on_umap(
        ref_latent,
        reference.obsm[schema.OBSM_UMAP],
        latent,
        n_neighbors=cfg.n_neighbors,
        seed=config.seed,
    )
    timings["umap"] = time.perf_counter() - t0

    # ---- the query atlas and its tables
    t0 = time.perf_counter()
    combined = query_atlas(reference, query, query_only=cfg.query_only)
    del reference
    _tables(combined, config, qc_view)
    timings["tables"] = time.perf_counter() - t0
    n_unknown = int((calls[schema.OBS_CELL_TYPE] == schema.UNKNOWN).sum())
    summary = {
        "tool": "tme-atlas map",
        "started_utc": started,
        "reference_atlas": str(ref.atlas_file.resolve()),
        "reference_model": str(ref.model_dir.resolve()),
        "query": str(h5ad or samplesheet),
        "scvi_version": scvi.__version__,
        "n_query_cells_in": n_query_in,
        "n_query_cells": int(query.n_obs),
        "n_reference_cells": int((combined.obs[schema.OBS_ORIGIN] == "reference").sum()),
        "n_model_genes": int(len(model_genes)),
        "n_model_genes_measured": int(len(overlap)),
        "unknown_threshold": float(cfg.unknown_threshold),
        "novelty_quantile": float(cfg.novelty_quantile),
        "novelty_distance_threshold": float(thr),
        "n_unknown": n_unknown,
        "n_novel": int(novel.sum()),
        "n_uncertain": int((calls[schema.OBS_LABEL_UNCERTAINTY] > cfg.unknown_threshold).sum()),
        "labels": {str(k): int(v) for k, v in calls[schema.OBS_CELL_TYPE].value_counts().items()},
        "query_only": bool(cfg.query_only),
        "training": train_info,
    }
    record_params(combined, "map", {k: v for k, v in summary.items() if k != "labels"})
    combined.uns[schema.UNS_MAPPING] = {
        k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in summary.items()
    }
    t0 = time.perf_counter()
    model.save(str(ctx.work / schema.SCANVI_MODEL_DIR), overwrite=True, save_anndata=False)
    forget_models(model)
    _replace_dir(ctx.work / schema.SCANVI_MODEL_DIR, out / schema.SCANVI_MODEL_DIR)
    if ctx.qc_dir.is_dir():
        _replace_dir(ctx.qc_dir, out / schema.QC_DIR)
    write_atlas(combined, out)
    timings["write"] = time.perf_counter() - t0
    shutil.rmtree(ctx.work, ignore_errors=True)
    summary["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    summary["total_seconds"] = round(time.perf_counter() - t_all, 2)
    atomic_write_text(out / schema.MAPPING_FILE, json.dumps(summary, indent=2))
    log.info(
        "map: %d query cells on %s; %d Unknown (%d uncertain, %d far from the reference) "
        "in %.1f s",
        query.n_obs, ref.atlas_file, n_unknown, summary["n_uncertain"], summary["n_novel"],
        summary["total_seconds"],
    )  # fmt: skip
    return out
