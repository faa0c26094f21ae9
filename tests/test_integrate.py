"""Normalisation, HVG selection (gene exclusions, degenerate batches), scVI training and the
integration metrics."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from atlas import schema
from atlas.config import HVGConfig, ScviConfig
from preprocessing import integrate as I


def _toy_counts(n_cells=300, seed=0, batches=("s1", "s2", "s3")) -> ad.AnnData:
    """Poisson counts with two cell groups, excluded-gene look-alikes and batches."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(200)] + [
        "IGKC", "IGLC2", "IGHV3-23", "IGHM", "JCHAIN", "TRAC", "TRBV20-1", "MT-CO1", "RPL13A",
        "RPS4X", "HBB", "TRADD", "IGHMBP2", "CD79A",
    ]  # fmt: skip
    mu = rng.gamma(1.0, 1.0, size=(2, len(genes)))
    mu[1, :30] *= 8  # group-specific genes
    group = rng.integers(0, 2, n_cells)
    X = rng.poisson(mu[group] * rng.uniform(0.5, 2.0, (n_cells, 1)))
    X[:, genes.index("IGKC")] = rng.poisson(20, n_cells) * (group == 1)  # clonal IG
    a = ad.AnnData(sp.csr_matrix(X.astype(np.float32)))
    a.var_names = genes
    a.obs_names = [f"c{i}" for i in range(n_cells)]
    a.obs[schema.OBS_SAMPLE] = pd.Categorical(rng.choice(batches, n_cells))
    a.obs["group"] = pd.Categorical(group.astype(str))
    return a


def test_normalize_keeps_counts_and_logs():
    a = _toy_counts()
    raw = a.X.copy()
    I.normalize(a)
    assert (a.layers[schema.LAYER_COUNTS] != raw).nnz == 0
    tot = np.expm1(a.X.toarray()).sum(axis=1)
    np.testing.assert_allclose(tot, 1e4, rtol=1e-3)
    assert a.uns[schema.UNS_PARAMS_PREFIX + "normalize"]["target_sum"] == 1e4


def test_normalize_uses_existing_counts_layer():
    a = _toy_counts()
    a.layers[schema.LAYER_COUNTS] = a.X.copy()
    a.X = a.X * 0  # X may hold anything when the counts layer exists
    I.normalize(a)
    assert a.X.sum() > 0


def test_hvg_excludes_ig_tcr_mito_ribo_hb():
    a = _toy_counts()
    I.normalize(a)
    I.select_hvg(a, n_top_genes=50, batch_key=schema.OBS_SAMPLE, species="human")
    hv = a.var[schema.VAR_HVG]
    ex = a.var[schema.VAR_EXCLUDED_HVG]
    assert hv.sum() == 50
    assert not (hv & ex).any()
    for g in ("IGKC", "IGLC2", "IGHV3-23", "IGHM", "JCHAIN", "TRAC", "TRBV20-1", "MT-CO1",
              "RPL13A", "RPS4X", "HBB"):  # fmt: skip
        assert ex[g] and not hv[g], g
    for g in ("TRADD", "IGHMBP2", "CD79A"):
        assert not ex[g], g
    params = a.uns[schema.UNS_PARAMS_PREFIX + "hvg"]
    assert params["flavor"] == "seurat_v3" and params["n_hvg"] == 50


def test_hvg_without_exclusion_keeps_the_clonal_ig_gene():
    a = _toy_counts()
    I.normalize(a)
    I.select_hvg(a, config=HVGConfig(n_top_genes=100, exclude_patterns=False), batch_key=None)
    assert a.var.loc["IGKC", schema.VAR_HVG]
    assert not a.var[schema.VAR_EXCLUDED_HVG].any()


def test_hvg_robust_to_degenerate_batches():
    a = _toy_counts(n_cells=300)
    # one batch with 5 cells, and genes that are all-zero in a whole batch
    b = np.array(a.obs[schema.OBS_SAMPLE].astype(str))
    b[:5] = "tiny"
    a.obs[schema.OBS_SAMPLE] = pd.Categorical(b)
    X = a.X.tolil()
    s1 = np.flatnonzero(b == "s1")
    for j in range(10):
        X[s1, j] = 0
    a.X = X.tocsr()
    I.normalize(a)
    I.select_hvg(a, n_top_genes=40)
    assert a.var[schema.VAR_HVG].sum() == 40
    # a single batch: falls back to no batch key
    a.obs[schema.OBS_SAMPLE] = "only"
    I.select_hvg(a, n_top_genes=40)
    assert a.var[schema.VAR_HVG].sum() == 40


def test_hvg_more_requested_than_genes():
    a = _toy_counts()
    I.normalize(a)
    I.select_hvg(a, n_top_genes=5000)
    n_ok = int((~a.var[schema.VAR_EXCLUDED_HVG]).sum())
    assert 0 < a.var[schema.VAR_HVG].sum() <= n_ok


def test_epochs_for_steps():
    # 17,000 cells, 90% train, batch 512 -> 30 steps/epoch -> 3500 steps = 117 epochs
    epochs, spe = I.epochs_for_steps(3500, 17000, 512)
    assert spe == 30 and epochs == 117
    assert I.epochs_for_steps(10, 17000, 512)[0] == 10  # floor
    assert I.epochs_for_steps(10**6, 500, 512)[0] == 400  # ceiling


def test_safe_batch_size_avoids_tiny_last_batch():
    for n in (513, 1025, 1000, 2400):
        bs = I._safe_batch_size(n, 512, 0.9)
        n_train = int(np.ceil(0.9 * n))
        assert n_train % bs == 0 or n_train % bs >= 3
        assert (n - n_train) % bs == 0 or (n - n_train) % bs >= 3


def test_default_threads(monkeypatch):
    monkeypatch.setenv("CI", "1")
    assert I.default_torch_threads() == 1
    monkeypatch.delenv("CI")
    assert I.default_torch_threads() >= 1


def test_condition_is_never_a_batch_covariate():
    with pytest.raises(ValueError, match="biology"):
        ScviConfig(categorical_covariates=["condition"])
    a = _toy_counts()
    I.normalize(a)
    I.select_hvg(a, n_top_genes=50)
    a.obs["condition"] = "A"
    cfg = ScviConfig()
    object.__setattr__(cfg, "categorical_covariates", ["condition"])  # bypass validation
    with pytest.raises(ValueError, match="biology"):
        I.run_scvi(a, config=cfg)


def test_run_scvi_small(tmp_path):
    a = _toy_counts(n_cells=400)
    I.normalize(a)
    I.select_hvg(a, n_top_genes=100)
    cfg = ScviConfig(max_steps=40, batch_size=128, n_latent=5, torch_threads=1, seed=3)
    I.run_scvi(a, config=cfg, model_dir=tmp_path / "model")
    z = a.obsm[schema.OBSM_SCVI]
    assert z.shape == (400, 5) and np.isfinite(z).all()
    assert a.obsm[schema.OBSM_PCA].shape[0] == 400
    assert (tmp_path / "model" / "model.pt").is_file()
    p = a.uns[schema.UNS_PARAMS_PREFIX + "integrate"]
    assert p["batch_key"] == schema.OBS_SAMPLE and p["n_hvg"] == 100
    assert p["epochs_trained"] >= 10 and p["steps_trained"] >= 40
    assert p["accelerator"] in ("cpu", "gpu") and p["torch_threads"] == 1
    assert p["train_seconds"] > 0
    # deterministic for a seed
    b = _toy_counts(n_cells=400)
    I.normalize(b)
    I.select_hvg(b, n_top_genes=100)
    I.run_scvi(b, config=cfg)
    np.testing.assert_allclose(b.obsm[schema.OBSM_SCVI], z, atol=1e-4)


def test_run_scvi_leaves_no_anndata_in_scvi_stores():
    """scvi-tools' class-level stores no longer hold the HVG copy a build trained on (it
    outlived the stage: ~1 GB at 232k cells in every later stage); the copy is freed."""
    import gc
    import weakref

    import scvi

    from preprocessing.integrate import forget_models

    a = _toy_counts(n_cells=300)
    I.normalize(a)
    I.select_hvg(a, n_top_genes=80)
    before = set(scvi.model.SCVI._setup_adata_manager_store)
    I.run_scvi(a, config=ScviConfig(max_steps=10, batch_size=128, n_latent=4, torch_threads=1))
    assert set(scvi.model.SCVI._setup_adata_manager_store) == before
    # the helper itself: a registered AnnData is released and collected
    sub = a[:, a.var["highly_variable"].to_numpy()].copy()
    sub.layers[schema.LAYER_COUNTS] = sub.layers[schema.LAYER_COUNTS].copy()
    scvi.model.SCVI.setup_anndata(sub, layer=schema.LAYER_COUNTS, batch_key=schema.OBS_SAMPLE)
    model = scvi.model.SCVI(sub, n_latent=2)
    ref = weakref.ref(sub)
    assert len(scvi.model.SCVI._setup_adata_manager_store) == len(before) + 1
    forget_models(model)
    del model, sub
    gc.collect()
    assert ref() is None
    assert set(scvi.model.SCVI._setup_adata_manager_store) == before


def test_run_scvi_trains_at_least_min_steps():
    """Early stopping may not cut training below ``min_steps`` (small data: noisy ELBO)."""
    a = _toy_counts(n_cells=400)
    I.normalize(a)
    I.select_hvg(a, n_top_genes=100)
    cfg = ScviConfig(
        max_steps=200, min_steps=150, early_stopping_patience=1, batch_size=128, n_latent=5,
        torch_threads=1,
    )  # fmt: skip
    I.run_scvi(a, config=cfg)
    p = a.uns[schema.UNS_PARAMS_PREFIX + "integrate"]
    assert p["min_epochs"] * 3 >= 150  # 3 steps per epoch at 360 training cells / 128
    assert p["steps_trained"] >= 150


def test_run_scvi_needs_hvg_and_batch():
    a = _toy_counts()
    I.normalize(a)
    with pytest.raises(schema.MissingKeyError, match="hvg"):
        I.run_scvi(a)
    I.select_hvg(a, n_top_genes=50)
    with pytest.raises(schema.MissingKeyError):
        I.run_scvi(a, config=ScviConfig(batch_key="nope"))


# ----------------------------------------------------------------------------- metrics
def _blobs(mixed: bool, seed=0):
    rng = np.random.default_rng(seed)
    n = 600
    label = np.repeat(["A", "B", "C"], n // 3)
    batch = np.tile(["b1", "b2"], n // 2)
    centre = {"A": 0.0, "B": 10.0, "C": 20.0}
    emb = rng.normal(0, 1, (n, 5))
    emb[:, 0] += [centre[x] for x in label]
    if not mixed:
        emb[:, 1] += np.where(batch == "b1", 0, 8.0)
    a = ad.AnnData(np.zeros((n, 1), np.float32))
    a.obs[schema.OBS_SAMPLE] = batch
    a.obs[schema.OBS_CELL_TYPE] = label
    a.obsm["X_emb"] = emb
    return a


def test_integration_metrics_separate_mixed_from_split():
    good = I.integration_metrics(_blobs(True), embeddings=["X_emb"], n_neighbors=15)
    bad = I.integration_metrics(_blobs(False), embeddings=["X_emb"], n_neighbors=15)
    assert list(good.columns) == ["embedding", "metric", "value"]
    g = good.set_index("metric")["value"]
    b = bad.set_index("metric")["value"]
    assert g["batch_entropy"] > 0.9 and b["batch_entropy"] < 0.1
    assert g["ari"] > 0.95 and g["nmi"] > 0.95
    assert g["graph_connectivity"] == pytest.approx(1.0)
    for metric in ("batch_entropy", "label_asw", "ari", "nmi", "graph_connectivity"):
        assert 0.0 <= g[metric] <= 1.0 and 0.0 <= b[metric] <= 1.0


def test_integration_metrics_without_labels_and_missing_embedding():
    a = _blobs(True)
    out = I.integration_metrics(a, embeddings=["X_emb", "X_missing"], label_key=None)
    assert set(out["metric"]) == {"batch_entropy"}
    assert set(out["embedding"]) == {"X_emb"}


def test_batch_entropy_normaliser():
    idx = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
    assert I.knn_batch_entropy(idx, np.array(["a", "b", "a", "b"])) > 0.9
    assert I.knn_batch_entropy(idx, np.array(["a", "a", "a", "a"])) != I.knn_batch_entropy(
        idx, np.array(["a", "b", "a", "b"])
    )


# ----------------------------------------------------------------------------- budget
def _pca_blobs(strong: bool, seed=0, n=600, n_batches=4):
    rng = np.random.default_rng(seed)
    a = ad.AnnData(np.zeros((n, 1), np.float32))
    batch = np.tile([f"b{i}" for i in range(n_batches)], n // n_batches)
    emb = rng.normal(0, 1, (n, 10))
    emb[:, 0] += np.repeat([0.0, 10.0], n // 2)  # two cell types, every batch in both
    if strong:
        emb[:, 1] += pd.Categorical(batch).codes * 6.0
    a.obs[schema.OBS_SAMPLE] = batch
    a.obsm[schema.OBSM_PCA] = emb.astype(np.float32)
    return a


def test_batch_strength_and_step_budget():
    weak, strong = I.batch_strength(_pca_blobs(False)), I.batch_strength(_pca_blobs(True))
    assert weak < 0.1 and strong > 0.9
    assert I.step_budget(1500, strength=weak, n_batches=16) == (1500, 1.0)  # mild: unchanged
    steps, factor = I.step_budget(1500, strength=strong, n_batches=16, max_factor=6.0)
    assert steps == 9000 and factor == 6.0  # strong: grown, capped
    # samples that differ only by condition (biology) are not a batch effect
    bio = _pca_blobs(True)
    bio.obs[schema.OBS_CONDITION] = bio.obs[schema.OBS_SAMPLE]
    bio.obs[schema.OBS_SAMPLE] = [f"{c}_{i % 3}" for i, c in enumerate(bio.obs[schema.OBS_SAMPLE])]
    assert I.batch_strength(bio) < 0.1
    assert I.batch_strength(bio, condition_key=None) > 0.5
    s4, _ = I.step_budget(1000, strength=0.4, n_batches=16)
    s64, _ = I.step_budget(1000, strength=0.4, n_batches=64)
    assert 1000 < s4 < s64  # grows with strength and with the number of batches


def test_scvi_trains_longer_under_strong_batches():
    """Tiny data: the same config trains more steps where batches separate in the PCA."""

    def steps(strong: bool) -> int:
        a = _toy_counts(n_cells=300, batches=("s1", "s2"))
        if strong:  # a gene-wise multiplier per batch, on every group alike
            rng = np.random.default_rng(1)
            m = np.exp(rng.normal(0, 1.0, (2, a.n_vars)))
            codes = a.obs[schema.OBS_SAMPLE].cat.codes.to_numpy()
            X = a.X.toarray() * m[codes]
            a.X = sp.csr_matrix(np.round(X).astype(np.float32))
        I.normalize(a)
        I.select_hvg(a, n_top_genes=100)
        cfg = ScviConfig(
            max_steps=20, min_steps=10, batch_size=128, n_latent=5, torch_threads=1, n_hidden=32
        )
        I.run_scvi(a, config=cfg)
        p = a.uns[schema.params_key("integrate")]
        assert p["kl_warmup_steps"] == 10
        return p["steps_trained"], p["batch_strength"]

    (weak, s_weak), (strong, s_strong) = steps(False), steps(True)
    assert s_strong > s_weak + 0.3, (s_weak, s_strong)
    assert strong > weak, (weak, strong)


def test_scib_metrics_on_planted_mixing():
    """scib-metrics wrapper: a well-mixed vs a batch-split embedding of the same labels."""
    good = I.scib_integration_metrics(_blobs(True), embeddings=["X_emb"], n_neighbors=15)
    bad = I.scib_integration_metrics(_blobs(False), embeddings=["X_emb"], n_neighbors=15)
    g = good.set_index("metric")["value"]
    b = bad.set_index("metric")["value"]
    # scaled iLISI of 2 randomly mixed batches at perplexity k/3 is ~0.55, split ~0
    assert g["ilisi"] > 0.4 and b["ilisi"] < 0.05
    assert g["ilisi_within_label"] > 0.4 and b["ilisi_within_label"] < 0.05
    assert g["batch_asw"] > b["batch_asw"] + 0.3
    assert g["knn_purity"] > 0.99 and b["knn_purity"] > 0.99  # labels separate in both
    # a label-scrambled embedding loses purity
    s = _blobs(True)
    s.obsm["X_emb"] = s.obsm["X_emb"][np.random.default_rng(0).permutation(s.n_obs)]
    sc = I.scib_integration_metrics(s, embeddings=["X_emb"], n_neighbors=15)
    assert sc.set_index("metric")["value"]["knn_purity"] < 0.5


def test_scanvi_step_budget_whole_epochs_or_the_budget(tmp_path):
    """scANVI trains whole epochs while an epoch is shorter than ``max_steps`` (the demo:
    4 x 63 = 252 steps for 200) and stops at the budget when one epoch is longer (a large
    atlas: one epoch of 232k cells was 908 steps); the steps come from the trainer."""
    import pandas as pd

    from atlas.config import ScanviConfig
    from preprocessing.scanvi_model import train_scanvi

    a = _toy_counts(n_cells=1200)
    I.normalize(a)
    I.select_hvg(a, n_top_genes=60)
    scfg = ScviConfig(max_steps=20, batch_size=64, n_latent=4, torch_threads=1, min_steps=0)
    I.run_scvi(a, config=scfg, model_dir=tmp_path / "model")
    a.obs[schema.OBS_CELL_TYPE] = pd.Categorical(np.where(np.arange(a.n_obs) % 2, "A", "B"))
    # 1,200 cells, batch 64: 19 steps per epoch
    for budget, expected in ((30, 38), (12, 12)):
        train_scanvi(
            a,
            scvi_model_dir=tmp_path / "model",
            config=ScanviConfig(max_steps=budget, batch_size=64),
            scvi_config=scfg,
        )
        p = a.uns[schema.UNS_PARAMS_PREFIX + "scanvi"]
        assert p["steps_trained"] == expected, (budget, p)
