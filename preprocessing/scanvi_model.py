"""Stage ``scanvi``: scANVI initialised from the build's scVI model and trained on the atlas
labels (after annotation and the malignant call), saved beside it in ``DIR/model_scanvi`` so
that ``tme-atlas map`` can place new samples on the atlas with scArches surgery
(:mod:`preprocessing.mapping`).

scvi-tools does the work (``SCANVI.from_scvi_model``, ``train``); this module prepares the
AnnData it is set up on (the scVI model's genes and batches, ``Unassigned`` cells as the
unlabeled category) and budgets training by gradient steps like :func:`run_scvi`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from atlas import schema
from atlas.params import record_params

from .integrate import (
    _quiet_lightning,
    _safe_batch_size,
    default_torch_threads,
    epochs_for_steps,
    forget_models,
    resolve_accelerator,
)
from .log import get_logger, progress_enabled

log = get_logger("scanvi")

LABELS_KEY = schema.OBS_CELL_TYPE  # scANVI's labels_key, in the model's AnnData and a query's


def model_anndata(adata, *, genes, batch_key: str, covariates=(), labels=None):
    """A lean AnnData for scvi-tools: raw counts of ``genes`` (``layers["counts"]``), the
    batch and covariate columns as string categories and the labels column (``Unknown``
    where ``labels`` is ``None``)."""
    import anndata as ad

    schema.require_layer(adata, schema.LAYER_COUNTS)
    idx = adata.var_names.get_indexer(pd.Index(genes))
    if (idx < 0).any():
        raise ValueError(f"{int((idx < 0).sum())} model genes missing from the AnnData")
    counts = adata.layers[schema.LAYER_COUNTS][:, idx]
    obs = pd.DataFrame(index=adata.obs_names.copy())
    for key in (batch_key, *covariates):
        obs[key] = pd.Categorical(adata.obs[key].astype(str).to_numpy())
    lab = (
        np.full(adata.n_obs, schema.UNKNOWN, dtype=object)
        if labels is None
        else np.asarray(labels, dtype=object)
    )
    obs[LABELS_KEY] = pd.Categorical(lab)
    sub = ad.AnnData(X=counts.copy(), obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    sub.layers[schema.LAYER_COUNTS] = sub.X
    return sub


def atlas_labels(adata, labels_key: str = schema.OBS_CELL_TYPE) -> np.ndarray:
    """The atlas labels for scANVI: ``Unassigned`` (and missing) cells are unlabeled."""
    schema.require_obs(adata, labels_key)
    lab = adata.obs[labels_key].astype(str).to_numpy().astype(object)
    lab[(lab == schema.UNASSIGNED) | (lab == "nan")] = schema.UNKNOWN
    return lab


def train_scanvi(
    adata,
    *,
    scvi_model_dir: str | Path,
    model_dir: str | Path | None = None,
    config=None,
    scvi_config=None,
    labels_key: str = schema.OBS_CELL_TYPE,
    hvg_key: str = schema.VAR_HVG,
):
    """scANVI from the scVI model in ``scvi_model_dir`` on ``obs[labels_key]``, saved in
    ``model_dir`` (when given).

    ``config``: an :class:`atlas.config.ScanviConfig`; ``scvi_config``: the
    :class:`atlas.config.ScviConfig` the scVI model was trained with (batch key, covariates,
    accelerator, threads). Cells labelled ``Unassigned`` are the unlabeled category
    (``Unknown``).

    Writes
    ------
    ``obsm[OBSM_SCANVI]`` (the scANVI latent) and ``uns[params_key("scanvi")]`` (training
    statistics, the labels and how often scANVI's prediction agrees with them).
    """
    import scvi
    import torch

    from atlas.config import ScanviConfig, ScviConfig

    cfg = config if config is not None else ScanviConfig()
    scfg = scvi_config if scvi_config is not None else ScviConfig()
    schema.require_obs(adata, labels_key)
    if hvg_key not in adata.var:
        raise schema.MissingKeyError("var", hvg_key)
    scvi_model_dir = Path(scvi_model_dir)
    # scVI's loader unpickles (torch.load): only the build's own model folder is read
    if scvi_model_dir.name != schema.MODEL_DIR:
        raise ValueError(
            f"scanvi: reads the build's scVI model folder '{schema.MODEL_DIR}', not {scvi_model_dir}"
        )
    if not (scvi_model_dir / "model.pt").is_file():
        raise ValueError(f"scanvi: no scVI model in {scvi_model_dir} (stage 'integrate')")
    genes = adata.var_names[adata.var[hvg_key].to_numpy().astype(bool)]  # as run_scvi
    labels = atlas_labels(adata, labels_key)
    sub = model_anndata(
        adata,
        genes=list(genes),
        batch_key=scfg.batch_key,
        covariates=scfg.categorical_covariates,
        labels=labels,
    )
    n_labelled = int((labels != schema.UNKNOWN).sum())
    classes = sorted({str(v) for v in labels if v != schema.UNKNOWN})
    if len(classes) < 2:
        raise ValueError(f"scanvi: needs at least two labels in obs[{labels_key!r}]")

    threads = scfg.torch_threads or default_torch_threads()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    scvi.settings.seed = scfg.seed
    scvi.settings.dl_num_workers = 0
    accelerator = resolve_accelerator(scfg.accelerator)
    batch_size = _safe_batch_size(sub.n_obs, cfg.batch_size, 1.0)
    max_epochs, steps_per_epoch = epochs_for_steps(cfg.max_steps, sub.n_obs, batch_size, 1.0)
    # the step budget itself: scVI's 10-epoch floor would raise 200 steps to 340 on the demo;
    # whole epochs while an epoch is shorter than the budget, else stop at the budget (one
    # epoch of 232k cells is 908 steps: 3.6x the budget and ~6 min more at 300k cells)
    max_epochs = max(1, math.ceil(cfg.max_steps / steps_per_epoch))
    stop_at = int(cfg.max_steps) if steps_per_epoch > cfg.max_steps else None
    show = progress_enabled()
    t0 = time.perf_counter()
    try:
        with _quiet_lightning(show):
            vae = scvi.model.SCVI.load(str(scvi_model_dir), adata=sub, accelerator=accelerator)
            model = scvi.model.SCANVI.from_scvi_model(
                vae, unlabeled_category=schema.UNKNOWN, labels_key=LABELS_KEY
            )
            model.train(
                max_epochs=max_epochs,
                n_samples_per_label=cfg.n_samples_per_label,
                train_size=1.0,
                batch_size=batch_size,
                accelerator=accelerator,
                devices=1,
                plan_kwargs={"lr": cfg.learning_rate},
                enable_progress_bar=show,
                enable_model_summary=False,
                enable_checkpointing=False,
                **({"max_steps": stop_at} if stop_at else {}),
            )
            steps_trained = int(model.trainer.global_step)  # scvi-tools keeps its trainer
            latent = model.get_latent_representation(batch_size=max(batch_size, 1024))
            pred = np.asarray(model.predict(batch_size=max(batch_size, 1024))).astype(str)
    finally:
        torch.set_num_threads(old_threads)
    seconds = time.perf_counter() - t0
    adata.obsm[schema.OBSM_SCANVI] = np.asarray(latent, dtype=np.float32)
    labelled = labels != schema.UNKNOWN
    agreement = float((pred[labelled] == labels[labelled].astype(str)).mean())
    if model_dir is not None:
        model_dir = Path(model_dir)
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        model.save(str(model_dir), overwrite=True, save_anndata=False)
    forget_models(vae, model)
    log.info(
        "scanvi: %d epochs (%d steps) in %.1f s on %d labelled cells (%d labels); "
        "agrees with the atlas labels on %.3f",
        max_epochs, steps_trained, seconds, n_labelled, len(classes), agreement,
    )  # fmt: skip
    record_params(
        adata,
        "scanvi",
        {
            "method": "scANVI (SCANVI.from_scvi_model)",
            "scvi_version": scvi.__version__,
            "labels_key": labels_key,
            "unlabeled_category": schema.UNKNOWN,
            "labels": classes,
            "n_labelled": n_labelled,
            "n_genes": int(sub.n_vars),
            "batch_key": scfg.batch_key,
            "max_steps": int(cfg.max_steps),
            "max_epochs": int(max_epochs),
            "steps_trained": int(steps_trained),
            "batch_size": int(batch_size),
            "learning_rate": float(cfg.learning_rate),
            "accelerator": accelerator,
            "torch_threads": int(threads),
            "train_seconds": round(float(seconds), 2),
            "agreement_with_labels": agreement,
            "model_dir": str(model_dir) if model_dir is not None else "",
        },
    )
    return adata
