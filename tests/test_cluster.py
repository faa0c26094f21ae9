"""Neighbours, UMAP and Leiden at several resolutions on the integrated latent."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from atlas import schema
from atlas.config import ClusterConfig
from preprocessing.cluster import run_clustering


def _latent(n_per=150, k=4, seed=0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(k), n_per)
    centres = rng.normal(0, 12, (k, 10))
    z = centres[truth] + rng.normal(0, 1, (len(truth), 10))
    a = ad.AnnData(np.zeros((len(truth), 3), np.float32))
    a.obsm[schema.OBSM_SCVI] = z.astype(np.float32)
    a.obs["truth"] = truth.astype(str)
    return a


def test_run_clustering_writes_resolutions_default_and_umap():
    a = _latent()
    cfg = ClusterConfig(resolutions=[0.3, 1.0], default_resolution=0.5, seed=1)
    run_clustering(a, config=cfg)
    for r in (0.3, 0.5, 1.0):
        key = schema.leiden_key(r)
        assert key in a.obs and a.obs[key].dtype.name == "category"
    assert a.uns[schema.UNS_LEIDEN_RESOLUTIONS] == [0.3, 0.5, 1.0]
    assert (a.obs[schema.OBS_LEIDEN] == a.obs[schema.leiden_key(0.5)]).all()
    assert a.obsm[schema.OBSM_UMAP].shape == (a.n_obs, 2)
    assert adjusted_rand_score(a.obs["truth"], a.obs[schema.OBS_LEIDEN]) > 0.95
    # finer resolution -> at least as many clusters
    assert a.obs[schema.leiden_key(1.0)].nunique() >= a.obs[schema.leiden_key(0.3)].nunique()
    p = a.uns[schema.UNS_PARAMS_PREFIX + "cluster"]
    assert p["use_rep"] == schema.OBSM_SCVI and p["default_resolution"] == 0.5


def test_run_clustering_is_deterministic():
    a, b = _latent(), _latent()
    run_clustering(a, umap=False)
    run_clustering(b, umap=False)
    for r in ClusterConfig().resolutions:
        key = schema.leiden_key(r)
        assert (a.obs[key] == b.obs[key]).all()


def test_run_clustering_needs_the_latent():
    a = _latent()
    del a.obsm[schema.OBSM_SCVI]
    with pytest.raises(schema.MissingKeyError, match="integrate"):
        run_clustering(a)


def test_leiden_key_names():
    assert schema.leiden_key(2.0) == "leiden_r2"
    assert schema.leiden_key(0.5) == "leiden_r0.5"


def test_exact_knn_up_to_the_threshold_then_pynndescent():
    """Exact kNN (scikit-learn) on small atlases, pynndescent above the threshold; both find
    the same clusters on well-separated data."""
    a, b = _latent(), _latent()
    run_clustering(a, umap=False)
    run_clustering(b, config=ClusterConfig(exact_knn_max_cells=100), umap=False)
    assert a.uns[schema.UNS_PARAMS_PREFIX + "cluster"]["knn"].startswith("exact")
    assert b.uns[schema.UNS_PARAMS_PREFIX + "cluster"]["knn"].startswith("approximate")
    for x in (a, b):
        assert adjusted_rand_score(x.obs["truth"], x.obs[schema.leiden_key(0.3)]) > 0.95
    # exact neighbours: every cell's kNN are its true nearest cells
    z = a.obsm[schema.OBSM_SCVI]
    d = ((z[:5, None, :] - z[None, :, :]) ** 2).sum(-1)
    dist = a.obsp["distances"]
    for i in range(5):
        nearest = set(np.argsort(d[i])[1:15])
        assert set(dist[i].indices) == nearest


# ----------------------------------------------------------------------------- GPU backend
def test_cpu_backend_without_rapids(caplog):
    """Here (no rapids-singlecell, no CUDA): auto is the CPU, an explicit ``gpu`` says why
    and falls back; the atlas records which backend ran."""
    from preprocessing.cluster import gpu_available, graph_backend

    if gpu_available() is None:
        pytest.skip("rapids-singlecell and a CUDA device are present here")
    assert graph_backend("auto") == "cpu"
    with caplog.at_level("WARNING"):
        assert graph_backend("gpu") == "cpu"
    assert "backend 'gpu' requested but" in caplog.text
    a = _latent()
    run_clustering(a, config=ClusterConfig(backend="gpu"), umap=False)
    assert a.uns[schema.UNS_PARAMS_PREFIX + "cluster"]["backend"] == "scanpy (CPU)"


def _fake_gpu_stack(monkeypatch, calls: list):
    """rapids-singlecell and cupy stand-ins (no GPU here): same API as rsc.pp.neighbors /
    rsc.tl.umap / rsc.tl.leiden, computed by scanpy, recording what they were asked."""
    import importlib.machinery
    import sys
    import types

    import scanpy as sc

    def module(name):
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, m)
        return m

    cupy = module("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
    rsc = module("rapids_singlecell")

    def neighbors(adata, *, use_rep, n_neighbors, random_state, algorithm):
        calls.append(("neighbors", use_rep, n_neighbors, random_state, algorithm))
        sc.pp.neighbors(adata, use_rep=use_rep, n_neighbors=n_neighbors, transformer="sklearn")

    def umap(adata, *, min_dist, random_state):
        calls.append(("umap", min_dist, random_state))
        sc.tl.umap(adata, min_dist=min_dist, random_state=random_state)

    def leiden(adata, *, resolution, random_state, key_added):
        calls.append(("leiden", resolution, random_state, key_added))
        sc.tl.leiden(adata, resolution=resolution, flavor="igraph", n_iterations=2,
                     directed=False, random_state=random_state, key_added=key_added)  # fmt: skip

    rsc.pp = types.SimpleNamespace(neighbors=neighbors)
    rsc.tl = types.SimpleNamespace(umap=umap, leiden=leiden)


def test_gpu_backend_is_chosen_automatically_and_writes_the_same_keys(monkeypatch):
    """With rapids-singlecell and a CUDA device present, ``auto`` runs the three steps
    there (exact kNN, UMAP, Leiden per resolution, the config's seed and neighbours) and the
    atlas has the same keys as the CPU path. Timed on a GPU only when one is lent
    (benchmarks/RESULTS.md says so)."""
    from preprocessing.cluster import graph_backend

    calls: list = []
    _fake_gpu_stack(monkeypatch, calls)
    assert graph_backend("auto") == "gpu"
    assert graph_backend("cpu") == "cpu"
    a, b = _latent(), _latent()
    cfg = ClusterConfig(resolutions=[0.3, 1.0], default_resolution=0.5, seed=3, n_neighbors=12)
    run_clustering(a, config=cfg)
    assert calls[0] == ("neighbors", schema.OBSM_SCVI, 12, 3, "brute")
    assert calls[1] == ("umap", cfg.umap_min_dist, 3)
    assert [c[1] for c in calls[2:]] == [0.3, 0.5, 1.0]
    p = a.uns[schema.UNS_PARAMS_PREFIX + "cluster"]
    assert p["backend"].startswith("rapids-singlecell") and p["knn"].startswith("exact")
    run_clustering(b, config=cfg.model_copy(update={"backend": "cpu"}))
    for key in (schema.OBS_LEIDEN, *(schema.leiden_key(r) for r in (0.3, 0.5, 1.0))):
        assert key in a.obs and a.obs[key].dtype.name == "category"
        assert adjusted_rand_score(a.obs[key], b.obs[key]) > 0.95
    assert a.obsm[schema.OBSM_UMAP].dtype == np.float32
    assert a.uns[schema.UNS_LEIDEN_RESOLUTIONS] == b.uns[schema.UNS_LEIDEN_RESOLUTIONS]
    assert "leiden" not in a.uns
