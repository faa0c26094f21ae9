"""Stage ``annotate``: cell types from curated markers (``references/markers_<species>.csv``).

Method (deterministic, no reference atlas needed):

1. per-cell marker scores: every marker gene's log-normalised expression is scaled to
   [0, 1] by a robust upper level (90th percentile among expressing cells); a type's score
   is the mean over its positive markers minus the mean over its negative markers, times
   ``n / (n + 1)`` for the ``n`` positive markers measured, so that a type seen through one
   or two of its genes (a panel or a pre-filtered matrix) weighs less than one seen through
   all of them (``obs["marker_<type>"]``);
2. in the B lineage, light-chain restriction adds evidence: per patient the dominant light
   chain (IGKC vs IGLC*) of the leukaemic clone is found, and cells whose light-chain UMIs
   come from the dominant chain score towards CLL, polyclonal ones towards normal B;
3. scores are smoothed over the kNN graph (the cell and its neighbours);
4. Leiden clusters at a fine resolution get the type with the best mean smoothed score;
   the CLL states compete there as one family, scored half on the CLL programme they share
   and half on the best state (a state's activation or cell-cycle genes are not B-cell
   specific and alone would pull activated T cells or monocytes towards CLL); the margin to
   the best type of another lineage gives the cluster's confidence, and a cluster with no
   convincing type is ``Unassigned``; outside the B/CLL lineage this call drops a type's
   negative markers that are positive markers of a sibling type (FCGR3A against classical
   monocytes): they separate subtypes (step 5), not lineages;
5. within a lineage, types are then chosen *relative to the lineage's other clusters*
   (each marker scaled by its highest cluster mean in the lineage), so that a shift of a
   whole lineage (interferon lowering CD14 in every monocyte) does not turn one subtype
   into another; types with under ``MIN_COVERAGE`` of their positive markers measured are
   not called there (a warning names them). Each cell then takes the type with its best
   kNN-smoothed relative score among the types that label a cluster (CD4 / CD8 or monocyte
   subsets need not form separate clusters). In the B lineage CLL vs normal B uses the
   contrast of their programmes plus light-chain restriction, and the CLL states the genes
   each state adds to the resting state;
6. clusters co-expressing B markers with myeloid or T-cell markers are flagged
   doublet-like (``obs[OBS_DOUBLET_CLUSTER]``).

A cluster marker table (``tables["cluster_markers"]``) lists the top genes per Leiden
cluster of the default resolution.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlas import schema
from atlas.params import record_params
from atlas.species import species_of
from atlas.tables import put_table
from references import path as reference_path

from .integrate import add_integration_metrics
from .log import get_logger

log = get_logger("annotate")

MARKER_COLUMNS = ("cell_type", "lineage", "gene", "direction", "source")
NEG_WEIGHT = 1.0
LIGHT_CHAIN_WEIGHT = 0.4
MIN_SCORE = 0.1  # best cluster score below this: Unassigned
COVERAGE_PSEUDOCOUNT = 1.0  # a type's score x n / (n + this), n = positive markers measured
MIN_COVERAGE = 0.25  # a subtype needs this fraction of its positive markers in the data
RELATIVE_FLOOR = 0.25  # relative scores: a marker's scale is at least this (scaled units)
FINE_RESOLUTION = 2.0
CLL_PREFIX = "CLL"
NORMAL_B = "Normal B"

# doublet-like clusters: B-cell genes together with myeloid or T-cell genes
DOUBLET_GENES = {
    "human": {
        "B": ["CD79A", "CD79B", "MS4A1", "CD19"],
        "Myeloid": ["LYZ", "CD14", "S100A9", "CST3"],
        "T": ["CD3E", "CD3D", "CD3G"],
    },
    "mouse": {
        "B": ["Cd79a", "Cd79b", "Ms4a1", "Cd19"],
        "Myeloid": ["Lyz2", "Cd14", "S100a9", "Cst3"],
        "T": ["Cd3e", "Cd3d", "Cd3g"],
    },
}
DOUBLET_PAIRS = (("B", "Myeloid"), ("B", "T"))
DOUBLET_FRACTION = 0.35  # both lineage levels >= this fraction of their highest cluster level

LIGHT_CHAINS = {
    "human": ("^IGKC$", "^IGLC\\d+$"),
    "mouse": ("^Igkc$", "^Iglc\\d+$"),
}


# ======================================================================================
# references
# ======================================================================================
@lru_cache(maxsize=4)
def _load_markers_cached(species: str) -> pd.DataFrame:
    path = reference_path(f"markers_{species}.csv")
    df = pd.read_csv(path, dtype=str).fillna("")
    missing = [c for c in MARKER_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path.name}: missing columns {missing}")
    bad = ~df["direction"].isin(["up", "down"])
    if bad.any():
        raise ValueError(f"{path.name}: direction must be up/down (rows {list(df.index[bad])})")
    return df


def load_markers(species: str = "human") -> pd.DataFrame:
    """The curated marker table: cell_type, lineage, gene, direction (up/down), source."""
    return _load_markers_cached(species).copy()


def lineage_map(markers: pd.DataFrame) -> dict[str, str]:
    return dict(zip(markers["cell_type"], markers["lineage"]))


def marker_key(cell_type: str) -> str:
    """``.obs`` column of a cell type's per-cell marker score."""
    return f"{schema.OBS_MARKER_SCORE_PREFIX}{cell_type}"


# ======================================================================================
# scores
# ======================================================================================
def _dense_columns(X, cols: np.ndarray) -> np.ndarray:
    sub = X[:, cols]
    return np.asarray(sub.toarray() if sp.issparse(sub) else sub, dtype=np.float32)


def _scaled_expression(adata, genes: list[str]) -> pd.DataFrame:
    """Log-normalised expression of ``genes`` scaled to [0, 1] per gene."""
    idx = adata.var_names.get_indexer(genes)
    E = _dense_columns(adata.X, idx)
    scale = np.ones(E.shape[1], dtype=np.float32)
    for j in range(E.shape[1]):
        pos = E[:, j][E[:, j] > 0]
        if pos.size:
            scale[j] = max(float(np.quantile(pos, 0.9)), 1e-3)
    return pd.DataFrame(np.minimum(E / scale, 1.0), index=adata.obs_names, columns=genes)


def _type_score(S: pd.DataFrame, up: list[str], down: list[str]) -> np.ndarray:
    """Mean of the ``up`` columns of ``S`` minus the mean of its ``down`` columns, times the
    coverage weight ``n / (n + COVERAGE_PSEUDOCOUNT)`` for ``n = len(up)``."""
    score = S[up].to_numpy().mean(axis=1)
    if down:
        score = score - NEG_WEIGHT * S[down].to_numpy().mean(axis=1)
    return (score * (len(up) / (len(up) + COVERAGE_PSEUDOCOUNT))).astype(np.float32)


def marker_scores(
    adata, markers: pd.DataFrame, *, min_genes: int = 1, scaled: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Per-cell score per cell type (cells x types): mean scaled expression of the positive
    markers minus the mean of its negative markers, times ``n / (n + 1)`` for its ``n``
    positive markers in the data (coverage). Types with < ``min_genes`` positive markers in
    the data are left out. ``scaled``: :func:`_scaled_expression` of (at least) the table's
    genes, when the caller scores several tables of the same genes (computed here if not)."""
    present = markers[markers["gene"].isin(adata.var_names)]
    genes = list(dict.fromkeys(present["gene"]))
    if scaled is not None:
        S = scaled[genes]
    else:
        S = _scaled_expression(adata, genes) if genes else pd.DataFrame(index=adata.obs_names)
    out = {}
    for ct in dict.fromkeys(markers["cell_type"]):
        m = present[present["cell_type"] == ct]
        up = list(dict.fromkeys(m.loc[m["direction"] == "up", "gene"]))
        down = list(dict.fromkeys(m.loc[m["direction"] == "down", "gene"]))
        if len(up) < min_genes:
            continue
        out[ct] = _type_score(S, up, down)
    return pd.DataFrame(out, index=adata.obs_names)


def marker_coverage(adata, markers: pd.DataFrame) -> dict[str, float]:
    """Per cell type: the fraction of its positive markers present in ``adata.var_names``."""
    up = markers[markers["direction"] == "up"].drop_duplicates(["cell_type", "gene"])
    frac = up["gene"].isin(adata.var_names).groupby(up["cell_type"], sort=False).mean()
    return {str(k): float(v) for k, v in frac.items()}


def light_chain_restriction(
    adata, species: str, *, patient_key: str, b_cells: np.ndarray
) -> tuple[np.ndarray, dict[str, str]]:
    """Per cell: fraction of light-chain UMIs from its patient's dominant chain (NaN where no
    light-chain UMIs); per patient: the dominant chain (``kappa`` / ``lambda``) among
    ``b_cells``."""
    import re

    kpat, lpat = LIGHT_CHAINS[species]
    names = adata.var_names.astype(str)
    kap = np.array([bool(re.search(kpat, g)) for g in names])
    lam = np.array([bool(re.search(lpat, g)) for g in names])
    frac = np.full(adata.n_obs, np.nan)
    dominant: dict[str, str] = {}
    if not kap.any() or not lam.any():
        return frac, dominant
    counts = adata.layers.get(schema.LAYER_COUNTS, adata.X)
    k = np.asarray(counts[:, kap].sum(axis=1)).ravel().astype(float)
    lm = np.asarray(counts[:, lam].sum(axis=1)).ravel().astype(float)
    tot = k + lm
    patients = adata.obs[patient_key].astype(str).values
    for p in np.unique(patients):
        sel = patients == p
        bsel = sel & b_cells
        if bsel.sum() == 0 or tot[bsel].sum() == 0:
            continue
        is_kappa = k[bsel].sum() >= lm[bsel].sum()
        dominant[p] = "kappa" if is_kappa else "lambda"
        dom = k[sel] if is_kappa else lm[sel]
        with np.errstate(invalid="ignore", divide="ignore"):
            frac[sel] = np.where(tot[sel] > 0, dom / tot[sel], np.nan)
    return frac, dominant


def _smoothing_matrix(adata) -> sp.csr_matrix | None:
    conn = adata.obsp.get("connectivities")
    if conn is None or conn.shape[0] != adata.n_obs:
        return None
    W = sp.csr_matrix(conn, dtype=np.float32)
    W = (W > 0).astype(np.float32) + sp.identity(adata.n_obs, dtype=np.float32, format="csr")
    deg = np.asarray(W.sum(axis=1)).ravel()
    return sp.diags(1.0 / deg) @ W


# ======================================================================================
# annotation
# ======================================================================================
def _fine_cluster_key(adata, resolution: float | None) -> str:
    if resolution is not None:
        key = schema.leiden_key(resolution)
        schema.require_obs(adata, key)
        return key
    res = [float(r) for r in adata.uns.get(schema.UNS_LEIDEN_RESOLUTIONS, [])]
    have = [r for r in res if schema.leiden_key(r) in adata.obs]
    if have:
        best = min(have, key=lambda r: (abs(r - FINE_RESOLUTION), -r))
        return schema.leiden_key(best)
    schema.require_obs(adata, schema.OBS_LEIDEN)
    return schema.OBS_LEIDEN


def _confidence(best: np.ndarray, second: np.ndarray, scale: float = 0.15) -> np.ndarray:
    margin = np.maximum(best - second, 0.0)
    return np.clip(np.tanh(margin / scale), 0.0, 1.0)


def _knn_smooth(adata, sel: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Average ``M`` (rows = cells of ``sel``) over each cell and its kNN within ``sel``."""
    conn = adata.obsp.get("connectivities")
    if conn is None or conn.shape[0] != adata.n_obs:
        return M
    W = sp.csr_matrix(sp.csr_matrix(conn)[sel][:, sel] > 0, dtype=np.float32)
    W = W + sp.identity(W.shape[0], dtype=np.float32, format="csr")
    W = sp.diags(1.0 / np.asarray(W.sum(axis=1)).ravel()) @ W
    return np.asarray(W @ M)


def _two_group_threshold(x: np.ndarray) -> float | None:
    """Threshold between a low and a high mode of ``x`` (2-component Gaussian mixture), or
    ``None`` when ``x`` is not clearly bimodal."""
    from sklearn.mixture import GaussianMixture

    x = np.asarray(x, dtype=np.float64).reshape(-1, 1)
    if x.shape[0] < 20 or np.ptp(x) <= 0:
        return None
    gm = GaussianMixture(2, random_state=0, n_init=2).fit(x)
    mu = gm.means_.ravel()
    sd = np.sqrt(gm.covariances_.ravel())
    lo, hi = np.argsort(mu)
    if mu[hi] - mu[lo] < 1.5 * (sd[lo] + sd[hi]) or gm.weights_[hi] < 0.005:
        return None
    grid = np.linspace(mu[lo], mu[hi], 200).reshape(-1, 1)
    post = gm.predict_proba(grid)[:, hi]
    return float(grid[np.argmax(post >= 0.5), 0])


def _genes(markers: pd.DataFrame, cell_type: str, direction: str = "up") -> list[str]:
    m = markers[(markers["cell_type"] == cell_type) & (markers["direction"] == direction)]
    return list(dict.fromkeys(m["gene"]))


def family_markers(markers: pd.DataFrame, family: list[str], name: str) -> pd.DataFrame:
    """Marker rows of a pseudo-type ``name``: the genes up in every member of ``family``
    (and down in every member)."""
    rows = []
    for direction in ("up", "down"):
        common = set.intersection(*(set(_genes(markers, t, direction)) for t in family))
        first = markers[(markers["cell_type"] == family[0]) & (markers["direction"] == direction)]
        for r in first[first["gene"].isin(common)].itertuples(index=False):
            rows.append({**r._asdict(), "cell_type": name})
    return pd.DataFrame(rows, columns=markers.columns)


def lineage_markers(markers: pd.DataFrame, *, keep: set[str]) -> pd.DataFrame:
    """The marker table for the cluster-level (lineage) call: a type's negative markers that
    are positive markers of another type of its lineage are dropped (FCGR3A against classical
    monocytes, CD8A against CD4 T cells). They tell subtypes apart, which is done relative to
    the lineage afterwards; as lineage evidence they only punish a cluster in between (IFN-beta
    stimulated monocytes, low in CD14 and up in FCGR3A, fell below ``MIN_SCORE``). Types in
    ``keep`` (the B/CLL family, whose cluster-level call is the CLL vs normal B decision) keep
    every row."""
    up_in = markers[markers["direction"] == "up"].groupby("gene")["cell_type"].agg(set)
    lin_of = lineage_map(markers)

    def sibling_up(r) -> bool:
        others = up_in.get(r.gene, set()) - {r.cell_type}
        return any(lin_of.get(o) == lin_of.get(r.cell_type) for o in others)

    drop = [
        r.direction == "down" and r.cell_type not in keep and sibling_up(r)
        for r in markers.itertuples(index=False)
    ]
    return markers[~np.asarray(drop, dtype=bool)]


def _cluster_means(M, codes: np.ndarray, n_cl: int) -> np.ndarray:
    """Per-cluster means of the rows of ``M`` (cells x k, dense or sparse)."""
    G = sp.csr_matrix(
        (np.ones(len(codes), dtype=np.float64), (codes, np.arange(len(codes)))),
        shape=(n_cl, len(codes)),
    )
    n = np.maximum(np.asarray(G.sum(axis=1)).ravel(), 1.0)
    out = G @ M
    out = out.toarray() if sp.issparse(out) else np.asarray(out)
    return out / n[:, None]


def _relative_scores(
    adata,
    markers: pd.DataFrame,
    types: list[str],
    rows: np.ndarray,
    cl_codes: np.ndarray,
    n_cl: int,
) -> np.ndarray:
    """Per-cell type scores (cells x ``types``) relative to the clusters ``rows`` of one
    lineage: each marker's scaled expression is divided by its highest mean among those
    clusters (at least ``RELATIVE_FLOOR``), then scored as in :func:`marker_scores`."""
    genes = [g for g in dict.fromkeys(markers["gene"]) if g in adata.var_names]
    S = _scaled_expression(adata, genes)
    M = _cluster_means(S.to_numpy(), cl_codes, n_cl)[rows]
    R = S / np.maximum(M.max(axis=0), RELATIVE_FLOOR)
    out = np.full((adata.n_obs, len(types)), np.nan, dtype=np.float32)
    for j, t in enumerate(types):
        up = [g for g in _genes(markers, t) if g in R.columns]
        down = [g for g in _genes(markers, t, "down") if g in R.columns]
        if not up:
            continue
        out[:, j] = _type_score(R, up, down)
    return out


def _subtypes_within_lineages(
    adata,
    markers: pd.DataFrame,
    cl_label: np.ndarray,
    cl_type_mean: np.ndarray,
    cl_codes: np.ndarray,
    types: list[str],
    lin_of: dict[str, str],
    *,
    skip: set[str],
    refine_cells: bool,
    coverage: dict[str, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Within each lineage, the type of each cluster (and, with ``refine_cells``, of each cell)
    is chosen *relative to the lineage's other clusters*: a shift that moves a whole lineage
    (an interferon response lowering CD14 in every monocyte, a treatment switching genes off)
    then does not move its subtypes into one another. Candidates are the lineage's types whose
    absolute cluster score reaches ``MIN_SCORE`` in at least one of its clusters (present in
    the data) and with at least ``MIN_COVERAGE`` of their positive markers measured (with two
    of its fourteen markers in a pre-filtered matrix, a nurse-like cell cannot be told from a
    monocyte, so it is not called); cells choose among the types that label a cluster, on kNN-smoothed scores, and
    their confidence is capped by the margin to the second type.

    Returns the cluster labels, the per-cell labels and a per-cell confidence cap."""
    cl_label = cl_label.copy()
    n_cl = len(cl_label)
    label = cl_label[cl_codes].astype(object)
    cap = np.ones(len(cl_codes))
    lab_lin = np.array([lin_of.get(str(t), "") for t in cl_label])
    for lin in dict.fromkeys(lin_of.get(t) for t in types if t not in skip):
        cand = [i for i, t in enumerate(types) if lin_of.get(t) == lin and t not in skip]
        rows = np.flatnonzero(
            (lab_lin == lin) & np.isin(cl_label.astype(str), [types[i] for i in cand])
        )
        called = set(cl_label[rows].astype(str))  # the lineage-level call found it
        cand = [
            i
            for i in cand
            if ((cl_type_mean[rows, i] >= MIN_SCORE).any() or types[i] in called)
            and coverage[types[i]] >= MIN_COVERAGE
        ]
        if len(cand) == 1:  # one credible type: the lineage's clusters take it
            cl_label[rows] = types[cand[0]]
            cells = np.isin(cl_codes, rows)
            label[cells] = types[cand[0]]
        if len(cand) < 2 or len(rows) < 2:
            continue
        R = _relative_scores(adata, markers, [types[i] for i in cand], rows, cl_codes, n_cl)
        cmean = _cluster_means(np.nan_to_num(R, nan=-np.inf), cl_codes, n_cl)[rows]
        pick = np.argmax(cmean, axis=1)
        cl_label[rows] = np.array([types[cand[k]] for k in pick], dtype=object)
        cells = np.isin(cl_codes, rows)
        label[cells] = cl_label[cl_codes[cells]]
        present = sorted(set(pick.tolist()))
        if not refine_cells or len(present) < 2:
            continue
        Rs = _knn_smooth(adata, cells, np.nan_to_num(R[cells][:, present], nan=-1.0))
        order = np.argsort(-Rs, axis=1)
        r = np.arange(Rs.shape[0])
        label[np.flatnonzero(cells)] = np.array(
            [types[cand[present[k]]] for k in order[:, 0]], dtype=object
        )
        cap[cells] = _confidence(Rs[r, order[:, 0]], Rs[r, order[:, 1]])
    return cl_label, label, cap


def _mean_expr(adata, sel: np.ndarray, genes: list[str]) -> np.ndarray:
    genes = [g for g in genes if g in adata.var_names]
    if not genes:
        return np.zeros(int(sel.sum()))
    E = _dense_columns(adata.X[sel], adata.var_names.get_indexer(genes))
    return E.mean(axis=1)


def _refine_b_lineage(adata, markers, label, conf, *, lc_shift, cll_types):
    """Cells of CLL / normal-B clusters: CLL vs normal B per cell (CLL programme vs normal-B
    programme, z-scored among these cells, plus light-chain restriction; kNN-smoothed);
    then CLL sub-states from the activation / proliferation programmes (the genes that the
    sub-state adds to the resting state), thresholded between their two modes."""
    label = label.copy()
    conf = conf.copy()
    info: dict[str, float] = {}
    lab = label.astype(str)
    sel = np.isin(lab, [*cll_types, NORMAL_B])
    if sel.sum() < 3 or not cll_types:
        return label, conf, info
    base = next((t for t in cll_types if t.endswith("resting")), cll_types[0])
    cll_up = set(_genes(markers, base)) - set(_genes(markers, NORMAL_B))
    nb_up = set(_genes(markers, NORMAL_B)) - set(_genes(markers, base))
    cll_up = [g for g in cll_up if g in adata.var_names]
    nb_up = [g for g in nb_up if g in adata.var_names]
    if NORMAL_B in markers["cell_type"].values and cll_up and nb_up:
        genes = cll_up + nb_up
        E = _dense_columns(adata.X[sel], adata.var_names.get_indexer(genes))
        Z = np.clip((E - E.mean(axis=0)) / np.maximum(E.std(axis=0), 0.05), -3, 3)
        d = Z[:, : len(cll_up)].mean(axis=1) - Z[:, len(cll_up) :].mean(axis=1)
        d = d + LIGHT_CHAIN_WEIGHT * 2 * lc_shift[sel]
        d = _knn_smooth(adata, sel, d[:, None])[:, 0]
        is_cll = d >= 0
        idx = np.flatnonzero(sel)
        label[idx[~is_cll]] = NORMAL_B
        label[idx[is_cll & (lab[idx] == NORMAL_B)]] = base
        label[idx[is_cll & np.isin(lab[idx], cll_types)]] = base
        conf[idx] = np.minimum(conf[idx], _confidence(np.abs(d), 0.0, scale=0.5))
    else:
        idx = np.flatnonzero(sel)
        label[idx[np.isin(lab[idx], cll_types)]] = base
    # sub-states of CLL
    csel = label.astype(str) == base
    if csel.sum() < 20:
        return label, conf, info
    base_genes = set(_genes(markers, base))
    cidx = np.flatnonzero(csel)
    assigned = np.zeros(len(cidx), dtype=bool)
    # proliferating first (a cycling activated cell is counted as proliferating)
    states = sorted(
        [t for t in cll_types if t != base], key=lambda t: 0 if "prolif" in t.lower() else 1
    )
    for t in states:
        extra = [g for g in _genes(markers, t) if g not in base_genes]
        x = _mean_expr(adata, csel, extra)
        xs = _knn_smooth(adata, csel, x[:, None])[:, 0]
        thr = _two_group_threshold(xs)
        info[f"threshold_{t}"] = float("nan") if thr is None else thr
        if thr is None:
            continue
        hit = (xs >= thr) & ~assigned
        label[cidx[hit]] = t
        assigned |= hit
        spread = max(float(np.std(xs)), 1e-6)
        conf[cidx[hit]] = np.minimum(conf[cidx[hit]], _confidence(xs[hit], thr, scale=spread))
    return label, conf, info


def doublet_like_clusters(adata, clusters: pd.Series, species: str) -> pd.Series:
    """Per cluster: True where B-cell genes co-occur with myeloid or T-cell genes."""
    sets = DOUBLET_GENES[species]
    genes = [g for gs in sets.values() for g in gs if g in adata.var_names]
    if not genes:
        return pd.Series(False, index=clusters.cat.categories)
    S = _scaled_expression(adata, genes)
    lvl = pd.DataFrame(
        {
            lin: S[[g for g in gs if g in S.columns]].mean(axis=1)
            if any(g in S.columns for g in gs)
            else 0.0
            for lin, gs in sets.items()
        }
    )
    means = lvl.groupby(clusters.values, observed=True).mean()
    flags = pd.Series(False, index=means.index)
    for a, b in DOUBLET_PAIRS:
        top_a, top_b = means[a].max(), means[b].max()
        if top_a <= 0 or top_b <= 0:
            continue
        flags |= (means[a] >= DOUBLET_FRACTION * top_a) & (means[b] >= DOUBLET_FRACTION * top_b)
    return flags


def annotate(
    adata,
    *,
    config=None,
    species: str | None = None,
    cluster_key: str | None = None,
    patient_key: str = schema.OBS_PATIENT,
    marker_table: bool = True,
    refine_cells: bool = True,
    metrics_batch_key: str | None = None,
    seed: int = 0,
    **overrides,
):
    """Cell types, confidence, lineage and doublet-like flags (see the module docstring).

    ``config``: an :class:`atlas.config.AnnotateConfig`. With ``metrics_batch_key`` the
    integration is scored against the labels just made
    (:func:`preprocessing.integrate.add_integration_metrics`, seeded with ``seed``).

    Writes
    ------
    ``obs``: ``cell_type`` (``OBS_CELL_TYPE``, categorical), ``cell_type_confidence``
    (``OBS_CELL_TYPE_CONFIDENCE``), ``lineage`` (``OBS_LINEAGE``), ``doublet_like_cluster``
    (``OBS_DOUBLET_CLUSTER``), ``marker_<type>`` (``OBS_MARKER_SCORE_PREFIX``); the tables
    ``cluster_markers`` (``TABLE_MARKERS``, with ``marker_table``) and
    ``integration_metrics`` (``TABLE_INTEGRATION_METRICS``, with ``metrics_batch_key``);
    ``uns[params_key("annotate")]``.
    """
    from atlas.config import AnnotateConfig

    cfg = config if config is not None else AnnotateConfig()
    if overrides:
        cfg = cfg.model_copy(update=overrides)
    species = species_of(adata, species)
    markers = load_markers(species)
    lin_of = lineage_map(markers)
    ckey = cluster_key or _fine_cluster_key(adata, cfg.resolution)
    clusters = adata.obs[ckey].astype("category")

    # every table scored below is a subset of these genes: scale their expression once
    marker_genes = [g for g in dict.fromkeys(markers["gene"]) if g in adata.var_names]
    scaled = _scaled_expression(adata, marker_genes) if marker_genes else None
    scores = marker_scores(adata, markers, scaled=scaled)
    if scores.shape[1] == 0:
        from atlas.errors import InputError

        raise InputError(
            f"no marker gene of references/markers_{species}.csv is in the data (genes such as "
            f"{', '.join(map(str, adata.var_names[:3]))}); give {species} gene symbols as the "
            "features (10x features.tsv: id<TAB>symbol<TAB>Gene Expression)"
        )
    for ct in scores.columns:
        adata.obs[marker_key(ct)] = scores[ct].values
    types = list(scores.columns)
    cll_types = [t for t in types if t.startswith(CLL_PREFIX) and lin_of.get(t) == "B/CLL"]
    # the CLL family at cluster level: the programme its states share (last column)
    n_types = len(types)
    core = None
    if cll_types:
        fam_m = family_markers(markers, cll_types, "_cll_core")
        core = marker_scores(adata, fam_m, scaled=scaled).get("_cll_core")
    b_family = {*cll_types, NORMAL_B} if cll_types else set()
    b_lineage = {t for t in types if cll_types and lin_of.get(t) == lin_of.get(cll_types[0])}
    lin_scores = marker_scores(adata, lineage_markers(markers, keep=b_lineage), scaled=scaled)
    S = lin_scores[types].values.astype(np.float32)
    if core is not None:
        S = np.column_stack([S, core.values.astype(np.float32)])

    # light-chain restriction (B lineage)
    dominant: dict[str, str] = {}
    lc = np.zeros(adata.n_obs)
    pkey = patient_key if patient_key in adata.obs else schema.OBS_SAMPLE
    if cll_types and NORMAL_B in types and pkey in adata.obs:
        b_types = [t for t in types if lin_of.get(t) == "B/CLL"]
        b_cells = scores[b_types].max(axis=1).values >= scores.max(axis=1).values - 1e-6
        frac, dominant = light_chain_restriction(adata, species, patient_key=pkey, b_cells=b_cells)
        lc = np.nan_to_num(frac - 0.5, nan=0.0) * 2.0  # -1 (other chain) .. +1 (dominant)
        lc = np.where(b_cells, lc, 0.0)
        cll_cols = [types.index(t) for t in cll_types] + ([n_types] if core is not None else [])
        S[:, cll_cols] += LIGHT_CHAIN_WEIGHT * 0.5 * lc[:, None]
        S[:, types.index(NORMAL_B)] -= LIGHT_CHAIN_WEIGHT * 0.5 * lc

    W = _smoothing_matrix(adata)
    Ss = np.asarray(W @ S) if W is not None else S
    if not cll_types:
        cll_types = []

    # cluster level: the CLL states compete as one family, scored half on the programme they
    # share and half on the best state (a state's activation or cell-cycle genes alone do not
    # make a T cell or a monocyte CLL)
    fam = np.array([cll_types[0] if t in cll_types else t for t in types], dtype=object)
    fam_names = list(dict.fromkeys(fam))
    F = np.column_stack(
        [
            0.5 * (Ss[:, n_types] + Ss[:, :n_types][:, fam == f].max(axis=1))
            if (core is not None and f in cll_types)
            else Ss[:, :n_types][:, fam == f].max(axis=1)
            for f in fam_names
        ]
    )
    cl_codes = clusters.cat.codes.values
    n_cl = len(clusters.cat.categories)
    cl_mean = np.zeros((n_cl, len(fam_names)), dtype=np.float64)
    for c in range(n_cl):
        sel = cl_codes == c
        if sel.any():
            cl_mean[c] = F[sel].mean(axis=0)
    best = np.argmax(cl_mean, axis=1)
    rows = np.arange(n_cl)
    lin_arr = np.array([lin_of.get(t, "") for t in fam_names])
    other = np.where(lin_arr[None, :] == lin_arr[best][:, None], -np.inf, cl_mean)
    second = other.max(axis=1)
    second = np.where(np.isfinite(second), second, 0.0)
    cl_conf = _confidence(cl_mean[rows, best], second)
    cl_label = np.array([fam_names[i] for i in best], dtype=object)
    unassigned = (cl_mean[rows, best] < MIN_SCORE) | (cl_conf < cfg.min_confidence)
    cl_label[unassigned] = schema.UNASSIGNED
    coverage = marker_coverage(adata, markers)
    low = [
        f"{t} ({coverage[t]:.0%})"
        for t in types
        if coverage[t] < MIN_COVERAGE and t not in b_family
    ]
    if low:
        log.warning(
            "annotate: under %.0f%% of the positive markers measured, not called within their "
            "lineage: %s", 100 * MIN_COVERAGE, ", ".join(low),
        )  # fmt: skip
    full = scores.values.astype(np.float32)
    cl_type_mean = _cluster_means(np.asarray(W @ full) if W is not None else full, cl_codes, n_cl)
    cl_label, label, cap = _subtypes_within_lineages(
        adata, markers, cl_label, cl_type_mean, cl_codes, types, lin_of,
        skip=b_family, refine_cells=refine_cells, coverage=coverage,
    )  # fmt: skip
    conf = np.minimum(cl_conf[cl_codes].astype(np.float64), cap)
    substate_info: dict[str, float] = {}
    if refine_cells and cll_types:
        label, conf, substate_info = _refine_b_lineage(
            adata, markers, label, conf, lc_shift=lc, cll_types=cll_types
        )
    conf[label == schema.UNASSIGNED] = 0.0

    cats = [t for t in dict.fromkeys(markers["cell_type"]) if t in set(label)]
    if schema.UNASSIGNED in set(label):
        cats.append(schema.UNASSIGNED)
    adata.obs[schema.OBS_CELL_TYPE] = pd.Categorical(label, categories=cats)
    adata.obs[schema.OBS_CELL_TYPE_CONFIDENCE] = conf.astype(np.float32)
    lineage = [lin_of.get(t, schema.UNASSIGNED) for t in label]
    lin_cats = list(dict.fromkeys(lin_of.get(t, schema.UNASSIGNED) for t in cats))
    adata.obs[schema.OBS_LINEAGE] = pd.Categorical(lineage, categories=lin_cats)
    flags = doublet_like_clusters(adata, clusters, species)
    adata.obs[schema.OBS_DOUBLET_CLUSTER] = clusters.map(flags.to_dict()).astype(bool).values
    n_flag = int(flags.sum())
    log.info(
        "annotate: %d cell types over %d clusters (%s); %d unassigned cells; %d doublet-like "
        "clusters",
        len(cats), n_cl, ckey, int((label == schema.UNASSIGNED).sum()), n_flag,
    )  # fmt: skip
    record_params(
        adata,
        "annotate",
        {
            "method": "curated markers, kNN-smoothed, cluster then within-lineage cell level",
            "markers": f"references/markers_{species}.csv",
            "cluster_key": ckey,
            "min_confidence": float(cfg.min_confidence),
            "min_score": MIN_SCORE,
            "light_chain_dominant": ";".join(f"{p}:{c}" for p, c in sorted(dominant.items())),
            "doublet_like_clusters": ";".join(map(str, flags.index[flags.values])),
            "refine_cells": bool(refine_cells),
            **{k: float(v) for k, v in substate_info.items()},
        },
    )
    if marker_table:
        cluster_markers(adata)
    if metrics_batch_key is not None:
        add_integration_metrics(
            adata, batch_key=metrics_batch_key, label_key=schema.OBS_CELL_TYPE, seed=seed
        )
    return adata


def cluster_markers(adata, *, groupby: str = schema.OBS_LEIDEN, n_genes: int = 20) -> pd.DataFrame:
    """Top ``n_genes`` per cluster (Wilcoxon on log-normalised X) as ``tables["cluster_markers"]``:
    cluster, gene, score, logfc, pval_adj."""
    import scanpy as sc

    schema.require_obs(adata, groupby)
    groups = adata.obs[groupby].astype("category")
    sizes = groups.value_counts()
    ok = sizes.index[sizes >= 2]
    cols = ["cluster", "gene", "score", "logfc", "pval_adj"]
    if len(ok) < 2:
        df = pd.DataFrame(columns=cols)
        put_table(adata, schema.TABLE_MARKERS, df)
        return df
    key = "_tme_rank_genes"
    sc.tl.rank_genes_groups(
        adata,
        groupby,
        groups=[str(g) for g in ok],
        method="wilcoxon" if adata.n_obs <= 60000 else "t-test_overestim_var",
        use_raw=False,
        layer=None,
        n_genes=n_genes,
        key_added=key,
        pts=False,
    )
    df = sc.get.rank_genes_groups_df(adata, group=None, key=key)
    del adata.uns[key]
    df = df.rename(
        columns={
            "group": "cluster",
            "names": "gene",
            "scores": "score",
            "logfoldchanges": "logfc",
            "pvals_adj": "pval_adj",
        }  # fmt: skip
    )
    df = df[cols].copy()
    df["cluster"] = df["cluster"].astype(str)
    df = df.groupby("cluster", sort=False, observed=True).head(n_genes).reset_index(drop=True)
    put_table(adata, schema.TABLE_MARKERS, df)
    return df
