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


def gpu_available() -> str | None:
    """Why the GPU backend cannot run here (``None`` when it can): rapids-singlecell and
    cupy installed (``pip install .[gpu]``) and a CUDA device visible."""
    import importlib.util

    for module in ("rapids_singlecell", "cupy"):
        if importlib.util.find_spec(module) is None:
            return f"{module.replace('_', '-')} is not installed (pip install .[gpu])"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device is visible"
    except Exception as e:  # noqa: BLE001 - a broken CUDA setup is a reason, not a crash
        return f"CUDA is not usable ({e.__class__.__name__}: {e})"
    return None


def graph_backend(requested: str = "auto") -> str:
    """``"gpu"`` (rapids-singlecell) or ``"cpu"`` (scanpy) for neighbours / UMAP / Leiden.

    ``auto`` takes the GPU when :func:`gpu_available`; ``gpu`` without one logs why and
    uses the CPU (the atlas is the same kind either way)."""
    if requested == "cpu":
        return "cpu"
    why = gpu_available()
    if why is None:
        return "gpu"
    if requested == "gpu":
        log.warning("cluster: backend 'gpu' requested but %s; using scanpy on the CPU", why)
    return "cpu"


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


KNN_LABELS = {
    "sklearn": "exact (scikit-learn)",
    "pynndescent": "approximate (pynndescent)",
    "brute": "exact (rapids-singlecell brute force, GPU)",
}


def _gpu_graph(adata, cfg, *, use_rep: str, n_neighbors: int, umap: bool, resolutions) -> None:
    """rapids-singlecell's neighbours (exact, brute force), UMAP and Leiden (cuGraph): the
    same keys as scanpy's (``obsp`` graph, ``obsm[OBSM_UMAP]``, ``obs[leiden_key(r)]``)."""
    import rapids_singlecell as rsc

    rsc.pp.neighbors(
        adata, use_rep=use_rep, n_neighbors=n_neighbors, random_state=cfg.seed, algorithm="brute"
    )
    if umap:
        rsc.tl.umap(adata, min_dist=cfg.umap_min_dist, random_state=cfg.seed)
    for res in resolutions:
        rsc.tl.leiden(
            adata, resolution=res, random_state=cfg.seed, key_added=schema.leiden_key(res)
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
    approximate (pynndescent) above. With ``config.backend`` ``auto`` (default) and
    rapids-singlecell on a CUDA device (``pip install .[gpu]``) the three steps run there
    instead (:func:`graph_backend`): exact brute-force kNN, cuML UMAP, cuGraph Leiden.

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
    backend = graph_backend(cfg.backend)
    log.info(
        "cluster: %d cells, neighbours / UMAP / Leiden with %s",
        adata.n_obs,
        "rapids-singlecell on the GPU" if backend == "gpu" else "scanpy on the CPU",
    )
    if backend == "gpu":
        knn = "brute"
        _gpu_graph(adata, cfg, use_rep=use_rep, n_neighbors=n_neighbors, umap=umap,
                   resolutions=resolutions)  # fmt: skip
    else:
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
        for res in resolutions:
            leiden(adata, res, seed=cfg.seed, key_added=schema.leiden_key(res))
    if umap:
        adata.obsm[schema.OBSM_UMAP] = np.asarray(adata.obsm[schema.OBSM_UMAP], dtype=np.float32)
    for res in resolutions:
        log.info("leiden r=%g: %d clusters", res, adata.obs[schema.leiden_key(res)].nunique())
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
            "backend": "rapids-singlecell (GPU)" if backend == "gpu" else "scanpy (CPU)",
            "knn": KNN_LABELS[knn],
            "resolutions": [float(r) for r in resolutions],
            "default_resolution": float(cfg.default_resolution),
            "umap_min_dist": float(cfg.umap_min_dist),
            "seed": int(cfg.seed),
            "leiden": "cuGraph" if backend == "gpu" else "igraph, n_iterations=2, undirected",
        },
    )
    return adata
