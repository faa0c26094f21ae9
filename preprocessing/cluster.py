"""Stage ``cluster``: neighbours, UMAP and Leiden (several resolutions) on the scVI latent."""

from __future__ import annotations

import numpy as np

from atlas import schema
from atlas.params import record_params

from .log import get_logger

log = get_logger("cluster")


def knn_method(n_obs: int, exact_max: int | None = None) -> str:
    """scanpy's kNN ``transformer``: exact (``"sklearn"``) up to ``exact_max`` cells (default
    ``ClusterConfig.exact_knn_max_cells``), else approximate (``"pynndescent"``)."""
    from atlas.config import ClusterConfig

    if exact_max is None:
        exact_max = ClusterConfig().exact_knn_max_cells
    return "sklearn" if n_obs <= exact_max else "pynndescent"


def leiden(adata, resolution: float, *, seed: int, key_added: str) -> None:
    """Leiden (igraph, 2 iterations, undirected) on ``adata``'s kNN graph into
    ``obs[key_added]``."""
    import scanpy as sc

    sc.tl.leiden(
        adata,
        resolution=resolution,
        flavor="igraph",
        n_iterations=2,
        directed=False,
        random_state=seed,
        key_added=key_added,
    )


def run_clustering(
    adata,
    *,
    config=None,
    use_rep: str = schema.OBSM_SCVI,
    umap: bool = True,
    **overrides,
):
    """kNN graph, UMAP and Leiden clusterings on ``obsm[use_rep]``.

    The kNN graph is exact (scikit-learn) up to ``config.exact_knn_max_cells`` cells and
    approximate (pynndescent) above.

    ``config``: an :class:`atlas.config.ClusterConfig`.

    Writes
    ------
    ``obs[leiden_key(r)]`` (``OBS_LEIDEN_PREFIX`` + resolution) for every resolution of
    ``config.resolutions`` (plus the default resolution), ``obs[OBS_LEIDEN]`` (= the
    default resolution), ``obsm[OBSM_UMAP]``, ``uns[UNS_LEIDEN_RESOLUTIONS]`` and
    ``uns[params_key("cluster")]``.
    """
    import scanpy as sc

    from atlas.config import ClusterConfig

    cfg = config if config is not None else ClusterConfig()
    if overrides:
        cfg = cfg.model_copy(update=overrides)
    schema.require_obsm(adata, use_rep)
    resolutions = sorted({float(r) for r in [*cfg.resolutions, cfg.default_resolution]})
    n_neighbors = int(max(2, min(cfg.n_neighbors, adata.n_obs - 1)))
    knn = knn_method(adata.n_obs, cfg.exact_knn_max_cells)
    sc.pp.neighbors(
        adata,
        use_rep=use_rep,
        n_neighbors=n_neighbors,
        random_state=cfg.seed,
        transformer=knn,
    )
    if umap:
        sc.tl.umap(adata, min_dist=cfg.umap_min_dist, random_state=cfg.seed)
        adata.obsm[schema.OBSM_UMAP] = np.asarray(adata.obsm[schema.OBSM_UMAP], dtype=np.float32)
    for res in resolutions:
        key = schema.leiden_key(res)
        leiden(adata, res, seed=cfg.seed, key_added=key)
        log.info("leiden r=%g: %d clusters", res, adata.obs[key].nunique())
    adata.obs[schema.OBS_LEIDEN] = adata.obs[schema.leiden_key(cfg.default_resolution)].copy()
    adata.uns[schema.UNS_LEIDEN_RESOLUTIONS] = [float(r) for r in resolutions]
    adata.uns.pop("leiden", None)
    for r in resolutions:
        adata.uns.pop(schema.leiden_key(r), None)
    record_params(
        adata,
        "cluster",
        {
            "use_rep": use_rep,
            "n_neighbors": n_neighbors,
            "knn": "exact (scikit-learn)" if knn == "sklearn" else "approximate (pynndescent)",
            "resolutions": [float(r) for r in resolutions],
            "default_resolution": float(cfg.default_resolution),
            "umap_min_dist": float(cfg.umap_min_dist),
            "seed": int(cfg.seed),
            "leiden": "igraph, n_iterations=2, undirected",
        },
    )
    return adata
