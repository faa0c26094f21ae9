"""Stages ``normalize``, ``hvg`` and ``integrate``: log-normalisation, highly variable genes
(immunoglobulin / TCR / mito / ribo / haemoglobin genes excluded), scVI integration and
integration metrics (uncorrected PCA vs scVI).

The stage functions (:func:`normalize`, :func:`select_hvg`, :func:`run_scvi`) work in place
on an AnnData and return it. Parameters actually used are recorded in
``.uns[schema.params_key(<stage>)]`` (:func:`atlas.params.record_params`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlas import schema
from atlas.params import record_params
from atlas.species import species_of
from atlas.tables import put_table
from references import path as reference_path

from .log import get_logger, progress_enabled

log = get_logger("integrate")

TARGET_SUM = 1e4
FILTER_CATEGORIES = ("immunoglobulin", "tcr", "mitochondrial", "ribosomal", "haemoglobin")


# ======================================================================================
# normalisation
# ======================================================================================
def normalize(adata, *, target_sum: float = TARGET_SUM):
    """Raw counts to ``layers["counts"]`` (kept if present); ``X`` = log1p(normalize_total).

    ``X`` must hold raw counts when ``layers["counts"]`` is absent.

    Writes
    ------
    ``X``, ``layers[LAYER_COUNTS]`` (float32 CSR) and ``uns[params_key("normalize")]``.
    """
    import scanpy as sc

    if schema.LAYER_COUNTS not in adata.layers:
        adata.layers[schema.LAYER_COUNTS] = adata.X.copy()
    counts = adata.layers[schema.LAYER_COUNTS]
    if not sp.issparse(counts):
        counts = sp.csr_matrix(counts)
    counts = sp.csr_matrix(counts, dtype=np.float32)
    adata.layers[schema.LAYER_COUNTS] = counts
    adata.X = counts.copy()
    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)
    adata.uns.pop("log1p", None)  # scanpy's {"base": None} is not h5ad-safe in every reader
    record_params(adata, "normalize", {"target_sum": float(target_sum), "transform": "log1p"})
    return adata


# ======================================================================================
# gene filters and HVG
# ======================================================================================
@lru_cache(maxsize=4)
def load_gene_filters(species: str = "human") -> dict[str, tuple[str, ...]]:
    """Category -> regexes of genes never used as HVGs (``references/gene_filters.yaml``)."""
    import yaml

    data = yaml.safe_load(reference_path("gene_filters.yaml").read_text(encoding="utf-8"))
    if species not in data:
        raise ValueError(f"gene_filters.yaml has no section for species {species!r}")
    return {cat: tuple(pats) for cat, pats in data[species].items()}


def excluded_gene_categories(genes: Iterable[str], species: str = "human") -> pd.Series:
    """Per gene: the filter category (``immunoglobulin``, ``tcr``, ...) or ``""``."""
    genes = [str(g) for g in genes]
    out = pd.Series("", index=pd.Index(genes), dtype=object)
    for cat, patterns in load_gene_filters(species).items():
        rx = re.compile("|".join(f"(?:{p})" for p in patterns))
        hit = np.array([bool(rx.search(g)) for g in genes])
        out[hit & (out.values == "")] = cat
    return out


def excluded_genes_mask(genes: Iterable[str], species: str = "human") -> np.ndarray:
    """Boolean mask of genes excluded from HVG selection."""
    return (excluded_gene_categories(genes, species).values != "").astype(bool)


def _hvg_seurat_v3(sub, n_top: int, batch_key: str | None):
    """``seurat_v3`` on ``layers["counts"]`` of ``sub``; robust to degenerate batches."""
    import scanpy as sc

    def run(bk):
        return sc.pp.highly_variable_genes(
            sub,
            flavor="seurat_v3",
            n_top_genes=n_top,
            layer=schema.LAYER_COUNTS,
            batch_key=bk,
            inplace=False,
            span=0.3,
        )

    if batch_key is None:
        return run(None), None
    sizes = sub.obs[batch_key].value_counts()
    small = sizes.index[sizes < 20]
    try:
        if len(small):
            raise ValueError(f"batches with < 20 cells: {list(small)}")
        return run(batch_key), batch_key
    except Exception as e:  # loess fails on tiny / degenerate batches
        log.warning("hvg: seurat_v3 per %s failed (%s); merging small batches", batch_key, e)
    # merge small batches into one pseudo-batch and retry, then give up on batches
    tmp = "_hvg_batch"
    b = sub.obs[batch_key].astype(str)
    b[b.isin(set(map(str, small)))] = "_small"
    sub.obs[tmp] = pd.Categorical(b)
    try:
        if sub.obs[tmp].nunique() > 1:
            return run(tmp), batch_key + " (small batches merged)"
    except Exception as e:
        log.warning("hvg: seurat_v3 with merged batches failed (%s); ignoring batches", e)
    finally:
        del sub.obs[tmp]
    return run(None), None


def select_hvg(
    adata,
    *,
    n_top_genes: int = 2000,
    batch_key: str | None = schema.OBS_SAMPLE,
    flavor: str = "seurat_v3",
    exclude_patterns: bool = True,
    species: str | None = None,
    config=None,
):
    """Mark ``var[VAR_HVG]``; ``var[VAR_EXCLUDED_HVG]`` marks genes that never qualify.

    ``config``: an :class:`atlas.config.HVGConfig` (overrides ``n_top_genes``, ``flavor``,
    ``exclude_patterns``). ``seurat_v3`` works on ``layers["counts"]``; the other flavours on
    the log-normalised ``X``.

    Writes
    ------
    ``var[VAR_HVG]``, ``var[VAR_EXCLUDED_HVG]`` and ``uns[params_key("hvg")]``.
    """
    import scanpy as sc

    if config is not None:
        n_top_genes, flavor, exclude_patterns = (
            config.n_top_genes,
            config.flavor,
            config.exclude_patterns,
        )
    species = species_of(adata, species)
    schema.require_layer(adata, schema.LAYER_COUNTS)
    cats = excluded_gene_categories(adata.var_names, species)
    excluded = (cats.values != "") if exclude_patterns else np.zeros(adata.n_vars, bool)
    counts = adata.layers[schema.LAYER_COUNTS]
    n_cells = np.asarray((counts > 0).sum(axis=0)).ravel()
    candidate = ~excluded & (n_cells >= 3)
    if batch_key is not None and batch_key not in adata.obs:
        raise schema.MissingKeyError("obs", batch_key)
    if batch_key is not None and adata.obs[batch_key].nunique() < 2:
        batch_key = None
    n_top = int(min(n_top_genes, candidate.sum()))
    sub = adata[:, candidate].copy()
    if flavor == "seurat_v3":
        res, used_batch = _hvg_seurat_v3(sub, n_top, batch_key)
    else:
        res = sc.pp.highly_variable_genes(
            sub, flavor=flavor, n_top_genes=n_top, batch_key=batch_key, inplace=False
        )
        used_batch = batch_key
    res.index = sub.var_names
    hv = pd.Series(False, index=adata.var_names)
    hv[res.index[res["highly_variable"].values.astype(bool)]] = True
    rank = pd.Series(np.nan, index=adata.var_names)
    if "highly_variable_rank" in res:
        rank[res.index] = res["highly_variable_rank"].values.astype(float)
    adata.var[schema.VAR_HVG] = hv.values.astype(bool)
    adata.var[schema.VAR_EXCLUDED_HVG] = excluded.astype(bool)
    adata.var["hvg_rank"] = rank.values
    adata.var["hvg_filter"] = pd.Categorical(cats.values.astype(str))
    log.info(
        "hvg: %d highly variable genes (%s, batch %s); %d genes excluded (%s)",
        int(hv.sum()), flavor, used_batch, int(excluded.sum()),
        ", ".join(f"{c}: {(cats == c).sum()}" for c in FILTER_CATEGORIES if (cats == c).any()),
    )  # fmt: skip
    record_params(
        adata,
        "hvg",
        {
            "flavor": flavor,
            "n_top_genes": int(n_top_genes),
            "n_hvg": int(hv.sum()),
            "batch_key": used_batch,
            "exclude_patterns": bool(exclude_patterns),
            "n_excluded": int(excluded.sum()),
        },
    )
    return adata


# ======================================================================================
# scVI
# ======================================================================================
def default_torch_threads() -> int:
    """1 under CI (``CI`` set), else the number of cores."""
    if os.environ.get("CI"):
        return 1
    return max(1, os.cpu_count() or 1)


def forget_models(*models) -> None:
    """Drop ``models``' AnnData registrations from scvi-tools' class-level stores.

    scvi-tools keeps every AnnData a model was set up with in
    ``cls._setup_adata_manager_store`` / ``cls._per_instance_manager_store`` for the life of
    the process, so the HVG counts copy a stage trains on outlived the stage (at 232k cells
    ~1 GB through every later stage of a build). A model is unusable afterwards: call this
    once its latent, predictions and files are out.
    """
    for model in models:
        if model is None:
            continue
        for cls in type(model).__mro__:
            per_instance = vars(cls).get("_per_instance_manager_store")
            setup = vars(cls).get("_setup_adata_manager_store")
            if per_instance is None or setup is None:
                continue
            for adata_id in per_instance.pop(model.id, {}):
                setup.pop(adata_id, None)


def resolve_accelerator(requested: str) -> str:
    """``"gpu"`` or ``"cpu"`` for Lightning: ``auto`` is the GPU when CUDA is present."""
    import torch

    if requested == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if requested == "gpu" and not torch.cuda.is_available():
        log.warning("scvi: accelerator 'gpu' requested but CUDA is unavailable; using the CPU")
        return "cpu"
    return requested


def epochs_for_steps(max_steps: int, n_cells: int, batch_size: int, train_size: float = 0.9):
    """``ceil(max_steps / steps_per_epoch)`` clamped to [10, 400]."""
    n_train = max(1, math.ceil(train_size * n_cells))
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
    return int(min(400, max(10, math.ceil(max_steps / steps_per_epoch)))), steps_per_epoch


def batch_strength(
    adata,
    *,
    batch_key: str = schema.OBS_SAMPLE,
    rep: str = schema.OBSM_PCA,
    condition_key: str | None = schema.OBS_CONDITION,
    n_neighbors: int = 30,
    max_cells: int = 5000,
    seed: int = 0,
) -> float:
    """How strongly the batches separate before integration, in [0, 1]: one minus the mean
    normalised kNN batch entropy on ``obsm[rep]`` (the uncorrected PCA). (Not scib-metrics'
    iLISI: its first call compiles for ~40 s, and with 16 batches at k=30 its scaled value
    reads 0.83 on mild and 1.0 on strong batches, too compressed to size a budget.)

    Cheap (a seeded subsample of at most ``max_cells`` cells, exact kNN) and label-free, so
    it can size the training budget before scVI runs. 0: every cell's neighbours are drawn
    from all batches evenly; 1: neighbours come from the cell's own batch only. On the
    simulator's cohorts it reads ~0.13 for its mild patient/sample batches and 0.45-0.7 with
    :func:`preprocessing.simulate.add_sample_batch_effect` (sd 0.4-0.8).

    With ``obs[condition_key]`` present the entropy is measured within each condition (kNN
    among its cells, normalised by its batches; mean weighted by cells): samples that differ
    by biology (a drug, a stimulus) are not a batch effect.
    """
    if rep not in adata.obsm:
        raise schema.MissingKeyError("obsm", rep)
    batch = adata.obs[batch_key].astype(str).to_numpy()
    if len(np.unique(batch)) < 2 or adata.n_obs < 3:
        return 0.0
    rng = np.random.default_rng(seed)
    n = adata.n_obs
    sel = np.sort(rng.choice(n, max_cells, replace=False)) if n > max_cells else np.arange(n)
    emb = np.asarray(adata.obsm[rep], dtype=np.float32)[sel]
    batch = batch[sel]
    groups = np.zeros(len(sel), dtype=int)
    if condition_key is not None and condition_key in adata.obs:
        groups = adata.obs[condition_key].astype(str).to_numpy()[sel]
    vals, weights = [], []
    for lv in pd.unique(groups):
        members = np.flatnonzero(groups == lv)
        if len(members) <= n_neighbors or len(np.unique(batch[members])) < 2:
            continue
        idx = _knn_indices(emb[members], n_neighbors)
        vals.append(knn_batch_entropy(idx, batch[members]))
        weights.append(len(members))
    if not vals:
        return 0.0
    return float(np.clip(1.0 - np.average(vals, weights=weights), 0.0, 1.0))


def step_budget(
    max_steps: int,
    *,
    strength: float,
    n_batches: int,
    max_factor: float = 6.0,
    mild: float = 0.3,
    slope: float = 8.0,
    ref_batches: int = 16,
) -> tuple[int, float]:
    """The gradient-step budget for scVI: ``max_steps`` grown with batch strength and count.

    ``factor = (1 + slope * max(0, strength - mild)) * sqrt(max(1, n_batches / ref_batches))``,
    clamped to ``[1, max_factor]``. Mild batches (``strength <= mild``, e.g. the demo) keep
    ``max_steps``; the budget is a ceiling, training stops earlier on the validation-ELBO
    plateau. Returns ``(steps, factor)``.
    """
    f_strength = 1.0 + slope * max(0.0, float(strength) - mild)
    f_batches = math.sqrt(max(1.0, n_batches / ref_batches))
    factor = float(min(max_factor, max(1.0, f_strength * f_batches)))
    return int(round(max_steps * factor)), factor


def _safe_batch_size(n_cells: int, batch_size: int, train_size: float) -> int:
    """A batch size that leaves no training / validation mini-batch of < 3 cells (BatchNorm)."""
    n_train = math.ceil(train_size * n_cells)
    n_val = n_cells - n_train
    bs = max(2, min(batch_size, n_train))
    for cand in range(bs, bs + 64):
        if all(n <= 0 or n % cand == 0 or n % cand >= 3 for n in (n_train, n_val)):
            return cand
    return bs


@contextlib.contextmanager
def _quiet_lightning(enabled: bool):
    loggers = [
        logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "pytorch_lightning")
    ]
    levels = [lg.level for lg in loggers]
    if not enabled:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def compute_pca(adata, *, n_comps: int = 50, hvg_key: str = schema.VAR_HVG, seed: int = 0):
    """``obsm[OBSM_PCA]``: PCA of the log-normalised HVGs (uncorrected; centred, not scaled,
    so sparse data stay sparse)."""
    import scanpy as sc

    mask = adata.var[hvg_key].values.astype(bool) if hvg_key in adata.var else None
    X = adata.X[:, mask] if mask is not None and mask.sum() >= 10 else adata.X
    n = int(max(2, min(n_comps, X.shape[0] - 1, X.shape[1] - 1)))
    pcs = sc.pp.pca(X.astype(np.float32), n_comps=n, random_state=seed, svd_solver="arpack")
    adata.obsm[schema.OBSM_PCA] = np.asarray(pcs, dtype=np.float32)
    return adata


def run_scvi(
    adata,
    *,
    config=None,
    model_dir: str | Path | None = None,
    hvg_key: str = schema.VAR_HVG,
    **overrides,
):
    """Train scVI on the HVGs (raw counts) and store ``obsm[OBSM_SCVI]`` and ``obsm[OBSM_PCA]``.

    ``config``: an :class:`atlas.config.ScviConfig` (defaults when ``None``); keyword
    ``overrides`` replace its fields (e.g. ``max_steps=300``). The model is saved in
    ``model_dir`` when given.

    Writes
    ------
    ``obsm[OBSM_SCVI]``, ``obsm[OBSM_PCA]`` (uncorrected, for the integration metrics) and
    the training statistics in ``uns[params_key("integrate")]``.
    """
    import torch

    from atlas.config import ScviConfig

    cfg = config if config is not None else ScviConfig()
    if overrides:
        cfg = cfg.model_copy(update=overrides)
    ScviConfig.model_validate(cfg.model_dump())  # re-validate (e.g. condition as covariate)
    schema.require_layer(adata, schema.LAYER_COUNTS)
    if hvg_key not in adata.var:
        raise schema.MissingKeyError("var", hvg_key)
    if cfg.batch_key not in adata.obs:
        raise schema.MissingKeyError("obs", cfg.batch_key)
    for cov in cfg.categorical_covariates:
        if cov == schema.OBS_CONDITION:
            raise ValueError("the resistance state is biology, never a batch covariate")
        if cov not in adata.obs:
            raise schema.MissingKeyError("obs", cov)

    compute_pca(adata, hvg_key=hvg_key, seed=cfg.seed)

    import scvi

    threads = cfg.torch_threads or default_torch_threads()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    scvi.settings.seed = cfg.seed
    scvi.settings.dl_num_workers = 0
    accelerator = resolve_accelerator(cfg.accelerator)

    mask = adata.var[hvg_key].values.astype(bool)
    sub = adata[:, mask].copy()
    for key in [cfg.batch_key, *cfg.categorical_covariates]:
        sub.obs[key] = pd.Categorical(sub.obs[key].astype(str))
    n_batches = int(sub.obs[cfg.batch_key].nunique())
    train_size = 0.9
    batch_size = _safe_batch_size(sub.n_obs, cfg.batch_size, train_size)
    # the budget grows with the number and strength of batches (uncorrected PCA): strong
    # batches need more steps to integrate; the validation-ELBO plateau stops training early
    strength, factor = float("nan"), 1.0
    max_steps = int(cfg.max_steps)
    if cfg.budget_by_batch_strength and cfg.max_epochs is None:
        strength = batch_strength(adata, batch_key=cfg.batch_key, seed=cfg.seed)
        max_steps, factor = step_budget(
            cfg.max_steps, strength=strength, n_batches=n_batches, max_factor=cfg.max_budget_factor
        )
    if cfg.max_epochs is not None:
        max_epochs = int(cfg.max_epochs)
        _, steps_per_epoch = epochs_for_steps(max_steps, sub.n_obs, batch_size, train_size)
    else:
        max_epochs, steps_per_epoch = epochs_for_steps(max_steps, sub.n_obs, batch_size, train_size)

    # early stopping is allowed only after min_steps: on small data (few steps per epoch) a
    # noisy validation ELBO stopped training after ~140 steps, under-integrated
    min_epochs = min(max_epochs, math.ceil(cfg.min_steps / steps_per_epoch))
    kl_warmup_steps = int(cfg.min_steps if cfg.kl_warmup_steps is None else cfg.kl_warmup_steps)

    scvi.model.SCVI.setup_anndata(
        sub,
        layer=schema.LAYER_COUNTS,
        batch_key=cfg.batch_key,
        categorical_covariate_keys=list(cfg.categorical_covariates) or None,
    )
    model = scvi.model.SCVI(
        sub,
        n_latent=cfg.n_latent,
        n_layers=cfg.n_layers,
        n_hidden=cfg.n_hidden,
        gene_likelihood=cfg.gene_likelihood,
    )
    show = progress_enabled()
    log.info(
        "scvi: %d cells x %d HVGs, %d batches (strength %.2f: budget %d steps, x%.2f); "
        "<= %d epochs (%d steps/epoch, batch %d) on %s, %d threads",
        sub.n_obs, sub.n_vars, n_batches, strength, max_steps, factor, max_epochs,
        steps_per_epoch, batch_size, accelerator, threads,
    )  # fmt: skip
    t0 = time.perf_counter()
    c0 = time.process_time()
    try:
        with _quiet_lightning(show):
            model.train(
                max_epochs=max_epochs,
                batch_size=batch_size,
                train_size=train_size,
                accelerator=accelerator,
                devices=1,
                early_stopping=cfg.early_stopping,
                early_stopping_patience=cfg.early_stopping_patience,
                early_stopping_monitor="elbo_validation",
                min_epochs=min_epochs,
                check_val_every_n_epoch=1,
                plan_kwargs={
                    "lr": cfg.learning_rate,
                    "n_epochs_kl_warmup": None,
                    "n_steps_kl_warmup": kl_warmup_steps,
                },
                enable_progress_bar=show,
                enable_model_summary=False,
                enable_checkpointing=False,
            )
    finally:
        torch.set_num_threads(old_threads)
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0
    hist = model.history.get("elbo_train")
    epochs = int(len(hist)) if hist is not None else max_epochs
    latent = model.get_latent_representation(batch_size=max(batch_size, 1024))
    adata.obsm[schema.OBSM_SCVI] = np.asarray(latent, dtype=np.float32)
    val = model.history.get("elbo_validation")
    elbo_val = float(val.iloc[-1, 0]) if val is not None and len(val) else float("nan")
    if model_dir is not None:
        model_dir = Path(model_dir)
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        model.save(str(model_dir), overwrite=True, save_anndata=False)
    forget_models(model)
    log.info(
        "scvi: trained %d epochs (%d steps) in %.1f s; final validation ELBO %.1f",
        epochs, epochs * steps_per_epoch, seconds, elbo_val,
    )  # fmt: skip
    record_params(
        adata,
        "integrate",
        {
            "method": "scVI",
            "scvi_version": scvi.__version__,
            "batch_key": cfg.batch_key,
            "categorical_covariates": list(cfg.categorical_covariates),
            "n_hvg": int(mask.sum()),
            "n_latent": cfg.n_latent,
            "n_layers": cfg.n_layers,
            "n_hidden": cfg.n_hidden,
            "gene_likelihood": cfg.gene_likelihood,
            "batch_size": int(batch_size),
            "max_steps": int(cfg.max_steps),
            "batch_strength": float(strength),
            "budget_factor": float(factor),
            "budget_steps": int(max_steps),
            "min_steps": int(cfg.min_steps),
            "kl_warmup_steps": int(kl_warmup_steps),
            "max_epochs": int(max_epochs),
            "min_epochs": int(min_epochs),
            "epochs_trained": epochs,
            "steps_trained": int(epochs * steps_per_epoch),
            "early_stopped": bool(epochs < max_epochs),
            "early_stopping_patience": int(cfg.early_stopping_patience),
            "learning_rate": float(cfg.learning_rate),
            "accelerator": accelerator,
            "torch_threads": int(threads),
            "train_seconds": round(float(seconds), 2),
            "train_cpu_seconds": round(float(cpu_seconds), 2),
            "final_elbo_validation": elbo_val,
            "seed": int(cfg.seed),
            "model_dir": str(model_dir) if model_dir is not None else "",
        },
    )
    return adata


# ======================================================================================
# integration metrics
# ======================================================================================
def _knn_indices(emb: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    k = int(min(k, emb.shape[0] - 1))
    nn = NearestNeighbors(n_neighbors=k + 1).fit(emb)
    idx = nn.kneighbors(emb, return_distance=False)
    return idx[:, 1:]


def knn_batch_entropy(idx: np.ndarray, batch: np.ndarray, groups: np.ndarray | None = None):
    """Mean per-cell entropy of batch labels among its kNN, normalised to [0, 1].

    The normaliser is log(number of batches) -- or, per cell, log of the number of batches
    present in the cell's ``groups`` level when given (so a cell type found in 2 batches can
    reach 1).
    """
    codes, uniq = pd.factorize(batch)
    nb = len(uniq)
    if nb < 2:
        return float("nan")
    nbr = codes[idx]  # n x k
    counts = np.zeros((idx.shape[0], nb))
    for j in range(nb):
        counts[:, j] = (nbr == j).sum(axis=1)
    p = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    if groups is None:
        return float(np.mean(h / np.log(nb)))
    g = pd.Series(groups)
    n_present = g.map(pd.Series(codes).groupby(g.values).nunique()).values.astype(float)
    n_present = np.minimum(n_present, idx.shape[1])
    ok = n_present >= 2
    if not ok.any():
        return float("nan")
    return float(np.mean(h[ok] / np.log(n_present[ok])))


def _leiden_labels(
    emb: np.ndarray, resolutions: Sequence[float], seed: int, k: int = 15
) -> dict[float, np.ndarray]:
    """Leiden labels of ``emb`` at each resolution, on one kNN graph (exact up to
    ``ClusterConfig.exact_knn_max_cells`` cells, as in the cluster stage)."""
    import anndata as ad
    import scanpy as sc

    from .cluster import knn_method, leiden

    tmp = ad.AnnData(np.zeros((emb.shape[0], 1), dtype=np.float32))
    tmp.obsm["emb"] = emb
    sc.pp.neighbors(
        tmp, use_rep="emb", n_neighbors=k, random_state=seed, transformer=knn_method(emb.shape[0])
    )
    out = {}
    for res in resolutions:
        leiden(tmp, res, seed=seed, key_added=schema.OBS_LEIDEN)
        out[res] = tmp.obs[schema.OBS_LEIDEN].astype(str).values
    return out


def integration_metrics(
    adata,
    *,
    batch_key: str = schema.OBS_SAMPLE,
    label_key: str | None = schema.OBS_CELL_TYPE,
    embeddings: Sequence[str] = (schema.OBSM_PCA, schema.OBSM_SCVI),
    n_neighbors: int = 30,
    max_cells: int = 10000,
    resolutions: Sequence[float] = (0.5, 1.0),
    seed: int = 0,
    cluster_metrics: bool = True,
) -> pd.DataFrame:
    """Batch mixing and label conservation per embedding: a long table
    (``embedding``, ``metric``, ``value``).

    Metrics (all in [0, 1], higher is better):

    * ``batch_entropy``: kNN batch entropy (k=``n_neighbors``) normalised by log(#batches);
    * ``batch_entropy_within_label``: the same normalised by the number of batches in which
      the cell's label occurs (biology that is sample-specific is not penalised);
    * ``label_asw``: cell-type silhouette on the embedding, rescaled (ASW + 1) / 2;
    * ``ari`` / ``nmi``: best over Leiden ``resolutions`` of clusters vs labels;
    * ``graph_connectivity``: per label, fraction of its cells in the largest connected
      component of the kNN graph restricted to the label (mean over labels).

    Cells labelled ``Unassigned`` are left out of the label metrics. Above ``max_cells`` a
    seeded subsample is used. ``cluster_metrics=False`` leaves out ``ari`` / ``nmi`` (their
    Leiden graph needs umap's numba kernels: ~30 s of compilation in a fresh process).
    """
    from scipy.sparse.csgraph import connected_components
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

    if batch_key not in adata.obs:
        raise schema.MissingKeyError("obs", batch_key)
    rng = np.random.default_rng(seed)
    n = adata.n_obs
    sel = np.sort(rng.choice(n, max_cells, replace=False)) if n > max_cells else np.arange(n)
    batch = adata.obs[batch_key].astype(str).values[sel]
    labels = None
    if label_key is not None and label_key in adata.obs:
        labels = adata.obs[label_key].astype(str).values[sel]
    rows: list[tuple[str, str, float]] = []
    for emb_key in embeddings:
        if emb_key not in adata.obsm:
            log.warning("integration metrics: obsm[%r] missing; skipped", emb_key)
            continue
        emb = np.asarray(adata.obsm[emb_key], dtype=np.float64)[sel]
        idx = _knn_indices(emb, n_neighbors)
        rows.append((emb_key, "batch_entropy", knn_batch_entropy(idx, batch)))
        if labels is None:
            continue
        rows.append((emb_key, "batch_entropy_within_label", knn_batch_entropy(idx, batch, labels)))
        ok = labels != schema.UNASSIGNED
        lab = labels[ok]
        if len(np.unique(lab)) < 2:
            continue
        sub = np.flatnonzero(ok)
        if len(sub) > 5000:
            sub = np.sort(rng.choice(sub, 5000, replace=False))
        asw = silhouette_score(emb[sub], labels[sub], random_state=seed)
        rows.append((emb_key, "label_asw", float((asw + 1) / 2)))
        if cluster_metrics:
            best_ari, best_nmi = 0.0, 0.0
            for cl in _leiden_labels(emb, resolutions, seed).values():
                cl = cl[ok]
                best_ari = max(best_ari, adjusted_rand_score(lab, cl))
                best_nmi = max(best_nmi, normalized_mutual_info_score(lab, cl))
            rows.append((emb_key, "ari", float(best_ari)))
            rows.append((emb_key, "nmi", float(best_nmi)))
        # graph connectivity on the (symmetrised) kNN graph
        m = idx.shape[0]
        knn = sp.csr_matrix(
            (np.ones(idx.size), (np.repeat(np.arange(m), idx.shape[1]), idx.ravel())),
            shape=(m, m),
        )
        knn = knn + knn.T
        gc = []
        for lv in np.unique(lab):
            members = np.flatnonzero(labels == lv)
            if len(members) < 2:
                continue
            _, comp = connected_components(knn[members][:, members], directed=False)
            gc.append(np.bincount(comp).max() / len(members))
        rows.append((emb_key, "graph_connectivity", float(np.mean(gc)) if gc else float("nan")))
    return pd.DataFrame(rows, columns=["embedding", "metric", "value"])


def add_integration_metrics(
    adata,
    *,
    batch_key: str = schema.OBS_SAMPLE,
    label_key: str = schema.OBS_CELL_TYPE,
    seed: int = 0,
):
    """Score the integration (:func:`integration_metrics`) against ``obs[label_key]``.

    At build time there is no truth: the labels are the annotation's.

    Writes
    ------
    The table ``integration_metrics`` (``TABLE_INTEGRATION_METRICS``).
    """
    metrics = integration_metrics(adata, batch_key=batch_key, label_key=label_key, seed=seed)
    put_table(adata, schema.TABLE_INTEGRATION_METRICS, metrics)
    return adata


def _neighbors(emb: np.ndarray, k: int):
    """Exact kNN of ``emb`` (self included, as scib-metrics expects) as scib-metrics'
    ``NeighborsResults``."""
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    k = int(min(k + 1, emb.shape[0]))
    dist, idx = NearestNeighbors(n_neighbors=k).fit(emb).kneighbors(emb)
    return NeighborsResults(indices=idx.astype(np.int64), distances=dist.astype(np.float32))


def ilisi_within_labels(
    emb: np.ndarray, batch: np.ndarray, labels: np.ndarray, *, n_neighbors: int = 30
) -> float:
    """Batch mixing within each label: scib-metrics' scaled iLISI on the kNN graph of the
    label's cells, scaled by the batches the label occurs in, mean weighted by cells.

    Labels with fewer than ``n_neighbors + 1`` cells or in one batch only are left out
    (biology found in one sample is not penalised). ``nan`` when no label qualifies.
    """
    from scib_metrics import ilisi_knn

    vals, weights = [], []
    for lv in pd.unique(labels):
        members = np.flatnonzero(labels == lv)
        if len(members) <= n_neighbors or len(np.unique(batch[members])) < 2:
            continue
        nn = _neighbors(emb[members], n_neighbors)
        vals.append(float(ilisi_knn(nn, batch[members], scale=True)))
        weights.append(len(members))
    return float(np.average(vals, weights=weights)) if vals else float("nan")


def scib_integration_metrics(
    adata,
    *,
    batch_key: str = schema.OBS_SAMPLE,
    label_key: str | None = schema.OBS_CELL_TYPE,
    embeddings: Sequence[str] = (schema.OBSM_PCA, schema.OBSM_SCVI),
    n_neighbors: int = 30,
    max_cells: int = 10000,
    seed: int = 0,
    exclude_labels: Sequence[str] = (schema.UNASSIGNED,),
) -> pd.DataFrame:
    """Batch mixing and label conservation per embedding, with scib-metrics (scverse): a long
    table (``embedding``, ``metric``, ``value``).

    The labels must not come from the embedding being scored (the simulator's truth, or
    per-cell calls from expression, not clusters of the embedding). Metrics (all in [0, 1],
    higher is better), on an exact kNN graph (k = ``n_neighbors``):

    * ``ilisi``: scaled iLISI of the batches (``scib_metrics.ilisi_knn``);
    * ``ilisi_within_label``: the same within each label (:func:`ilisi_within_labels`);
    * ``batch_asw``: batch silhouette within labels (``scib_metrics.silhouette_batch``);
    * ``label_asw``: label silhouette, rescaled (``scib_metrics.silhouette_label``);
    * ``clisi``: scaled cLISI of the labels (``scib_metrics.clisi_knn``);
    * ``knn_purity``: mean fraction of a cell's neighbours that share its label;
    * ``graph_connectivity``: ``scib_metrics.graph_connectivity``;
    * ``ari`` / ``nmi``: ``scib_metrics.nmi_ari_cluster_labels_leiden`` (resolution
      optimised by scib-metrics).

    Cells whose label is in ``exclude_labels`` are left out of the label metrics. Above
    ``max_cells`` a seeded subsample is used (``label_asw`` / ``batch_asw`` on at most
    5,000 of those).
    """
    import scib_metrics as sm

    if batch_key not in adata.obs:
        raise schema.MissingKeyError("obs", batch_key)
    rng = np.random.default_rng(seed)
    n = adata.n_obs
    sel = np.sort(rng.choice(n, max_cells, replace=False)) if n > max_cells else np.arange(n)
    batch = adata.obs[batch_key].astype(str).to_numpy()[sel]
    labels = None
    if label_key is not None and label_key in adata.obs:
        labels = adata.obs[label_key].astype(str).to_numpy()[sel]
        ok = ~np.isin(labels, list(exclude_labels))
        if len(np.unique(labels[ok])) < 2:
            labels = None
    rows: list[tuple[str, str, float]] = []
    for emb_key in embeddings:
        if emb_key not in adata.obsm:
            log.warning("integration metrics: obsm[%r] missing; skipped", emb_key)
            continue
        emb = np.asarray(adata.obsm[emb_key], dtype=np.float32)[sel]
        multi = len(np.unique(batch)) > 1
        if multi:
            rows.append(
                (emb_key, "ilisi", float(sm.ilisi_knn(_neighbors(emb, n_neighbors), batch)))
            )
        if labels is None:
            continue
        e, b, lab = emb[ok], batch[ok], labels[ok]
        nn = _neighbors(e, n_neighbors)
        sub = np.arange(len(lab))
        if len(sub) > 5000:
            sub = np.sort(rng.choice(sub, 5000, replace=False))
        if multi:
            rows.append(
                (
                    emb_key,
                    "ilisi_within_label",
                    ilisi_within_labels(e, b, lab, n_neighbors=n_neighbors),
                )
            )
            rows.append(
                (emb_key, "batch_asw", float(sm.silhouette_batch(e[sub], lab[sub], b[sub])))
            )
        rows.append((emb_key, "label_asw", float(sm.silhouette_label(e[sub], lab[sub]))))
        rows.append((emb_key, "clisi", float(sm.clisi_knn(nn, lab))))
        purity = (lab[nn.indices[:, 1:]] == lab[:, None]).mean()
        rows.append((emb_key, "knn_purity", float(purity)))
        rows.append((emb_key, "graph_connectivity", float(sm.graph_connectivity(nn, lab))))
        na = sm.nmi_ari_cluster_labels_leiden(nn, lab, optimize_resolution=True, seed=seed)
        rows.append((emb_key, "ari", float(na["ari"])))
        rows.append((emb_key, "nmi", float(na["nmi"])))
    return pd.DataFrame(rows, columns=["embedding", "metric", "value"])
