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
