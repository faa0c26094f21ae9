"""Spatial sections: ingest, cell types mapped onto the atlas, squidpy neighbourhoods, niches
and LIANA+ bivariate ligand–receptor scores (``tme-atlas spatial SHEET.csv --atlas DIR``).

Input: a sample sheet with the build's columns (``sample_id,path,patient,condition,tissue,
species``), one row per section; ``path`` is an ``.h5ad`` with cell x gene counts
(``layers["counts"]``, ``raw.X`` or ``X``) and ``obsm["spatial"]``, or a Xenium output folder
(``cell_feature_matrix.h5`` + ``cells.csv.gz`` / ``cells.parquet`` with ``cell_id,
x_centroid, y_centroid``; read directly, spatialdata-io is not needed). Every section is
checked before anything is computed; each problem is one line naming the section and file
(missing or NaN coordinates, cells without counts, coordinates without cells, too few panel
genes measured by the atlas, counts that are not counts).

Cell typing (the documented fallback for small panels; no scANVI surgery): a multinomial
naive-Bayes classifier on the panel counts, whose class profiles are the atlas's mean
expression (counts per 10k) per cell type restricted to the panel genes; confidence = the
maximum posterior, ``Unknown`` below ``spatial.min_confidence``.

Analyses: squidpy's Delaunay graph per section (``library_key``), neighbourhood enrichment
(permutation z-scores) and co-occurrence per section; z-scores combined over sections with
Stouffer's method (the section is the unit), BH over the type pairs. Niches: each cell's
neighbourhood composition (its ``niche_k`` nearest cells in its section) clustered with
k-means over all sections, so a niche means the same in every section; niche proportions per
section are compared across resistance states with the atlas's propeller-style composition
test (:func:`preprocessing.analyses.compare_composition`, ``~ patient + condition`` when
paired). LIANA+ bivariate local scores (``li.mt.bivariate``, resource passed explicitly) on
the spatial graph for the atlas's differential interactions whose genes are on the panel;
their per-section means compared across states like the niches (section as unit, paired).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlas import schema
from atlas.errors import InputError
from atlas.io import atomic_write_text
from atlas.params import record_params
from atlas.stats import bh_adjust

from .log import get_logger

log = get_logger("spatial")

_NORM_TARGET = 100.0  # normalize_total target for panel data (~100-300 counts per cell)


# ======================================================================================
# ingest
# ======================================================================================
def _find_xenium_cells(folder: Path) -> Path | None:
    for name in schema.XENIUM_CELLS_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def _read_xenium(folder: Path, label: str):
    """(counts CSR, cell ids, genes, xy) of a Xenium output folder, or raise InputError."""
    from .ingest import _read_10x_h5

    mfile = folder / schema.XENIUM_MATRIX_FILE
    cfile = _find_xenium_cells(folder)
    if cfile is None:
        raise InputError(
            f"{label}: missing coordinates: no {' / '.join(schema.XENIUM_CELLS_FILES)} in {folder}"
        )
    try:
        raw = _read_10x_h5(mfile)
    except ValueError as e:
        raise InputError(f"{label}: {mfile}: {e}") from None
    if raw.feature_types is not None:
        keep = np.array([t == "Gene Expression" for t in raw.feature_types])
        raw.X = raw.X[:, np.flatnonzero(keep)]
        raw.symbols = [s for s, k in zip(raw.symbols, keep) if k]
    try:
        if cfile.suffix == ".parquet":
            cells = pd.read_parquet(cfile)
        else:
            cells = pd.read_csv(cfile)
    except Exception as e:  # pandas / pyarrow raise many kinds on broken files
        raise InputError(f"{label}: {cfile}: cannot read ({e.__class__.__name__})") from None
    need = [schema.XENIUM_CELL_ID, schema.XENIUM_X, schema.XENIUM_Y]
    missing = [c for c in need if c not in cells.columns]
    if missing:
        raise InputError(
            f"{label}: missing coordinates: {cfile} lacks column(s) {', '.join(missing)}"
        )
    cells[schema.XENIUM_CELL_ID] = cells[schema.XENIUM_CELL_ID].astype(str)
    pos = pd.Index(cells[schema.XENIUM_CELL_ID])
    ids = pd.Index(raw.barcodes)
    no_xy = ids.difference(pos)
    if len(no_xy):
        raise InputError(
            f"{label}: missing coordinates: {len(no_xy)} of {len(ids)} cells of {mfile.name} "
            f"are not in {cfile.name} (e.g. {no_xy[0]})"
        )
    no_counts = pos.difference(ids)
    if len(no_counts):
        raise InputError(
            f"{label}: cells without counts: {len(no_counts)} of {len(pos)} cells of "
            f"{cfile.name} are not in {mfile.name} (e.g. {no_counts[0]})"
        )
    xy = cells.set_index(schema.XENIUM_CELL_ID).loc[ids, [schema.XENIUM_X, schema.XENIUM_Y]]
    return sp.csr_matrix(raw.X), list(ids), list(raw.symbols), xy.to_numpy(float)


def _read_h5ad_section(path: Path, label: str):
    from .ingest import _read_h5ad_file, counts_of_anndata

    try:
        a = _read_h5ad_file(path)
    except ValueError as e:
        raise InputError(f"{label}: {path}: {e}") from None
    if schema.OBSM_SPATIAL not in a.obsm:
        raise InputError(
            f"{label}: missing coordinates: {path} has no obsm['{schema.OBSM_SPATIAL}'] "
            "(cell centroids, n_cells x 2)"
        )
    xy = np.asarray(a.obsm[schema.OBSM_SPATIAL])
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise InputError(
            f"{label}: {path}: obsm['{schema.OBSM_SPATIAL}'] has shape {xy.shape}, "
            "expected n_cells x 2"
        )
    try:
        X, var, _ = counts_of_anndata(a)
    except ValueError as e:
        raise InputError(f"{label}: {path}: {e}") from None
    return sp.csr_matrix(X), list(a.obs_names.astype(str)), list(var.index.astype(str)), xy[:, :2]


def read_section(path: Path, label: str):
    """One section as an AnnData (counts in ``X`` and ``layers["counts"]``, ``obsm["spatial"]``,
    obs names ``<section>:<cell id>``); every problem raises InputError naming it."""
    import anndata as ad

    from .ingest import count_problems

    if not path.exists():
        raise InputError(f"{label}: file not found: {path}")
    if path.is_dir():
        if not (path / schema.XENIUM_MATRIX_FILE).is_file():
            raise InputError(
                f"{label}: {path}: not a Xenium output folder (no {schema.XENIUM_MATRIX_FILE})"
            )
        X, ids, genes, xy = _read_xenium(path, label)
    elif path.suffix == ".h5ad":
        X, ids, genes, xy = _read_h5ad_section(path, label)
    else:
        raise InputError(
            f"{label}: {path}: unknown spatial format (give an .h5ad with obsm['spatial'] or a "
            "Xenium output folder)"
        )
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        raise InputError(
            f"{label}: missing coordinates: {int(bad.sum())} of {len(ids)} cells have NaN or "
            f"infinite coordinates in {path.name}"
        )
    probs = count_problems(X, f"{label}: {path.name}")
    if probs:
        raise InputError(probs[0])
    total = np.asarray(X.sum(axis=1)).ravel()
    empty = int((total == 0).sum())
    if len(ids) == 0 or empty > 0.5 * len(ids):
        raise InputError(
            f"{label}: cells without counts: {empty} of {len(ids)} cells of {path.name} have no "
            "counts; is it the cell x gene count matrix of the section?"
        )
    a = ad.AnnData(X=X.astype(np.float32), obs=pd.DataFrame(index=[f"{label}:{i}" for i in ids]))
    a.var_names = genes
    a.var_names_make_unique()
    a.obsm[schema.OBSM_SPATIAL] = xy.astype(np.float32)
    return a


def read_sections(samplesheet: str | Path, *, allow_outside_paths: bool = False):
    """All sections of the sheet, checked, concatenated (obs: the sheet's columns)."""
    import anndata as ad

    from .ingest import read_samplesheet

    samples, problems = read_samplesheet(samplesheet, allow_outside_paths=allow_outside_paths)
    parts = []
    for s in samples:
        try:
            a = read_section(s.path, s.sample_id)
        except InputError as e:
            problems.extend(e.problems)
            continue
        for k, v in s.meta.items():
            a.obs[k] = v
        parts.append(a)
    if problems:
        raise InputError(problems)
    genes = parts[0].var_names
    for s, a in zip(samples[1:], parts[1:]):
        if not a.var_names.equals(genes):
            common = genes.intersection(a.var_names)
            if len(common) < 0.5 * len(genes):
                problems.append(
                    f"section '{s.sample_id}': its panel shares {len(common)} of {len(genes)} "
                    f"genes with section '{samples[0].sample_id}'; one panel per run"
                )
    if problems:
        raise InputError(problems)
    adata = ad.concat(parts, join="inner", merge="same")
    adata.layers[schema.LAYER_COUNTS] = adata.X.copy()
    for c in (schema.OBS_SAMPLE, schema.OBS_PATIENT, schema.OBS_CONDITION):
        order = list(dict.fromkeys(adata.obs[c].astype(str)))
        adata.obs[c] = pd.Categorical(adata.obs[c].astype(str), categories=order)
    return adata


# ======================================================================================
# cell types: mapping onto the atlas
# ======================================================================================
def atlas_reference(
    atlas_dir: str | Path, genes, *, max_cells_per_type: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Cell type x gene mean expression (counts per 10k, from the atlas's log-normalised
    values) over the panel genes the atlas measures; Unassigned cells are left out."""
    import atlas as atlas_pkg

    store = atlas_pkg.open(atlas_dir)
    shared = [g for g in genes if store.has_gene(g)]
    ct = store.column(schema.OBS_CELL_TYPE).astype(str).to_numpy()
    rng = np.random.default_rng(seed)
    pos = []
    for t in pd.unique(ct):
        if t == schema.UNASSIGNED:
            continue
        idx = np.flatnonzero(ct == t)
        if len(idx) > max_cells_per_type:
            idx = np.sort(rng.choice(idx, max_cells_per_type, replace=False))
        pos.append(idx)
    if not pos or not shared:
        return pd.DataFrame(columns=shared)
    cells = np.sort(np.concatenate(pos))
    expr = store.expression_matrix(shared, cells=cells)
    cp10k = np.expm1(expr.to_numpy(np.float64))
    return pd.DataFrame(cp10k, columns=shared).groupby(ct[cells]).mean()


def reference_from_counts(adata, groupby: str, *, layer: str = schema.LAYER_COUNTS):
    """The same reference from a counts AnnData with labels (tests, or a user's own)."""
    X = sp.csr_matrix(adata.layers[layer] if layer else adata.X).astype(np.float64)
    tot = np.asarray(X.sum(axis=1)).ravel()
    cp = sp.diags(1e4 / np.maximum(tot, 1)) @ X
    lab = adata.obs[groupby].astype(str).to_numpy()
    rows = {t: np.asarray(cp[lab == t].mean(axis=0)).ravel() for t in pd.unique(lab)}
    return pd.DataFrame(rows, index=adata.var_names).T


def map_cell_types(
    adata,
    reference: pd.DataFrame,
    *,
    min_confidence: float = 0.5,
    layer: str = schema.LAYER_COUNTS,
    pseudocount: float = 0.5,
):
    """Type each cell by a multinomial naive-Bayes classifier on its panel counts, the class
    profiles being ``reference`` (cell type x gene, counts per 10k) renormalised over the
    shared genes.

    Writes
    ------
    ``obs[schema.OBS_CELL_TYPE]`` (``Unknown`` below ``min_confidence``),
    ``obs[schema.OBS_CELL_TYPE_CONFIDENCE]`` (max posterior), ``uns[params_key("spatial_typing")]``
    """
    genes = [g for g in reference.columns if g in adata.var_names]
    ref = reference[genes].to_numpy(np.float64) + pseudocount
    logf = np.log(ref / ref.sum(axis=1, keepdims=True))  # K x G
    X = sp.csr_matrix(adata[:, genes].layers[layer] if layer else adata[:, genes].X)
    ll = np.asarray(X.astype(np.float64) @ logf.T)  # n x K
    ll -= ll.max(axis=1, keepdims=True)
    post = np.exp(ll)
    post /= post.sum(axis=1, keepdims=True)
    best = post.argmax(axis=1)
    conf = post[np.arange(len(best)), best]
    types = np.asarray(reference.index.astype(str))[best].astype(object)
    types[conf < min_confidence] = schema.SPATIAL_UNKNOWN
    cats = [*reference.index.astype(str), schema.SPATIAL_UNKNOWN]
    adata.obs[schema.OBS_CELL_TYPE] = pd.Categorical(types, categories=cats)
    adata.obs[schema.OBS_CELL_TYPE_CONFIDENCE] = conf.astype(np.float32)
    record_params(
        adata,
        "spatial_typing",
        {
            "method": "multinomial naive Bayes on atlas cell-type profiles",
            "n_genes": len(genes),
            "min_confidence": min_confidence,
            "pseudocount": pseudocount,
        },
    )
    return adata


# ======================================================================================
# squidpy: graph, neighbourhood enrichment, co-occurrence
# ======================================================================================
def _categorical(adata, key: str) -> None:
    if not isinstance(adata.obs[key].dtype, pd.CategoricalDtype):
        adata.obs[key] = adata.obs[key].astype("category")


def spatial_graph(adata, *, library_key: str = schema.OBS_SAMPLE):
    """Delaunay neighbour graph per section (``squidpy.gr.spatial_neighbors_delaunay``).

    Writes
    ------
    ``obsp[schema.OBSP_SPATIAL_CONNECTIVITIES]``, ``obsp["spatial_distances"]``
    """
    import squidpy as sq

    _categorical(adata, library_key)
    sq.gr.spatial_neighbors_delaunay(
        adata, spatial_key=schema.OBSM_SPATIAL, library_key=library_key
    )
    return adata


def _section_views(adata, cluster_key: str):
    """(section, sub-AnnData with its graph and all categories) per section."""
    for sid in adata.obs[schema.OBS_SAMPLE].cat.categories:
        m = (adata.obs[schema.OBS_SAMPLE] == sid).to_numpy()
        if m.sum() < 10:
            continue
        sub = adata[m].copy()
        yield sid, sub


def nhood_enrichment(adata, *, cluster_key: str = schema.OBS_CELL_TYPE, n_perms: int = 200,
                     seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """squidpy's neighbourhood enrichment z-scores per section (long table, upper triangle
    with the diagonal; types absent from a section are left out)."""
    import squidpy as sq

    _categorical(adata, cluster_key)
    rows = []
    meta = adata.obs.drop_duplicates(schema.OBS_SAMPLE).set_index(schema.OBS_SAMPLE)
    for sid, sub in _section_views(adata, cluster_key):
        sub.obs[cluster_key] = sub.obs[cluster_key].cat.remove_unused_categories()
        cats = list(sub.obs[cluster_key].cat.categories)
        if len(cats) < 2:
            continue
        res = sq.gr.nhood_enrichment(
            sub,
            cluster_key=cluster_key,
            connectivity_key="spatial",
            n_perms=n_perms,
            seed=seed,
            copy=True,
            show_progress_bar=False,
        )
        z, count = np.asarray(res[0]), np.asarray(res[1])  # (zscore, count)
        for i, a in enumerate(cats):
            for j in range(i, len(cats)):
                rows.append(
                    {
                        schema.OBS_SAMPLE: sid,
                        schema.OBS_PATIENT: meta.loc[sid, schema.OBS_PATIENT],
                        schema.OBS_CONDITION: meta.loc[sid, schema.OBS_CONDITION],
                        schema.COL_TYPE_A: a,
                        schema.COL_TYPE_B: cats[j],
                        schema.COL_ZSCORE: float(z[i, j]),
                        "count": float(count[i, j]),
                    }
                )
    cols = schema.SPATIAL_TABLE_COLUMNS[schema.TABLE_NHOOD_BY_SECTION]
    return pd.DataFrame(rows, columns=cols)


ALL_CONDITIONS = "all"


def holm_adjust(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error)."""
    p = np.asarray(p, float)
    m = len(p)
    order = np.argsort(p)
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out


def combine_nhood(by_section: pd.DataFrame) -> pd.DataFrame:
    """Per type pair, overall (condition ``all``) and per condition: Stouffer's z over the
    sections (``zscore``, for display), the mean z, and a one-sample t-test of the sections'
    z-scores against 0 (``pvalue``; the section is the unit), Holm over the pairs of each
    condition (``padj``, family-wise). squidpy's z comes from permuting *all* labels, which
    understates the variance of a random type's contacts with a clustered one (null z-scores
    had SD 1.3 on the simulation, so Stouffer's p called 11% of null pairs); the t-test across
    sections uses the sections' own spread instead. Some null pairs still show a small
    consistent bias on the simulation (CLL resting - NK, mean z 1.2 over 12 sections, not
    explained); with BH 8% of the null pairs were called, hence Holm."""
    from scipy import stats

    out = []
    groups = [(ALL_CONDITIONS, by_section)] + list(
        by_section.groupby(schema.OBS_CONDITION, observed=True, sort=False)
    )
    for cond, df in groups:
        df = df[np.isfinite(df[schema.COL_ZSCORE])]
        if df.empty:
            continue
        g = df.groupby([schema.COL_TYPE_A, schema.COL_TYPE_B], observed=True)[schema.COL_ZSCORE]
        agg = g.agg(["sum", "mean", "std", "size"]).reset_index()
        n = agg["size"].to_numpy(float)
        sd = agg["std"].to_numpy(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = agg["mean"].to_numpy(float) / (sd / np.sqrt(n))
        p = np.where(n >= 2, 2 * stats.t.sf(np.abs(t), np.maximum(n - 1, 1)), np.nan)
        p = np.where(np.isfinite(p), p, np.where(n >= 2, 1.0, np.nan))
        padj = np.full(len(p), np.nan)
        ok = np.isfinite(p)
        if ok.any():
            padj[ok] = holm_adjust(p[ok])
        out.append(
            pd.DataFrame(
                {
                    schema.COL_CONDITION: str(cond),
                    schema.COL_TYPE_A: agg[schema.COL_TYPE_A],
                    schema.COL_TYPE_B: agg[schema.COL_TYPE_B],
                    schema.COL_ZSCORE: agg["sum"] / np.sqrt(n),
                    "mean_zscore": agg["mean"],
                    "n_sections": agg["size"],
                    schema.COL_PVALUE: p,
                    schema.COL_PADJ: padj,
                }
            )
        )
    cols = schema.SPATIAL_TABLE_COLUMNS[schema.TABLE_NHOOD]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def co_occurrence(adata, *, cluster_key: str = schema.OBS_CELL_TYPE, max_cells: int = 5000,
                  interval=(10, 25, 50, 100, 200), seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """squidpy's co-occurrence ratio p(b | a within d) / p(b) per section, on at most
    ``max_cells`` random cells of each section (its cost grows with cells squared)."""
    import squidpy as sq

    rng = np.random.default_rng(seed)
    rows = []
    edges = np.asarray(interval, float)
    for sid, sub in _section_views(adata, cluster_key):
        if sub.n_obs > max_cells:
            sub = sub[np.sort(rng.choice(sub.n_obs, max_cells, replace=False))].copy()
        sub.obs[cluster_key] = sub.obs[cluster_key].cat.remove_unused_categories()
        cats = list(sub.obs[cluster_key].cat.categories)
        if len(cats) < 2:
            continue
        res = sq.gr.co_occurrence(
            sub, cluster_key=cluster_key, spatial_key=schema.OBSM_SPATIAL, interval=edges,
            copy=True,
        )  # fmt: skip
        occ = res[0] if isinstance(res, tuple) else res.occ
        cond = str(sub.obs[schema.OBS_CONDITION].iloc[0])
        for i, a in enumerate(cats):
            for j, b in enumerate(cats):
                for k in range(occ.shape[2]):
                    rows.append((sid, cond, a, b, float(edges[k + 1]), float(occ[i, j, k])))
    return pd.DataFrame(rows, columns=schema.SPATIAL_TABLE_COLUMNS[schema.TABLE_CO_OCCURRENCE])


# ======================================================================================
# niches
# ======================================================================================
def find_niches(adata, *, cluster_key: str = schema.OBS_CELL_TYPE, k: int = 20,
                n_niches: int = 8, seed: int = 0):  # fmt: skip
    """Cellular neighbourhoods: each cell's composition of its ``k`` nearest cells (itself
    included) in its section, clustered with k-means over all sections (niches ``N1`` ...,
    largest first).

    Writes
    ------
    ``obs[schema.OBS_NICHE]``, ``uns[params_key("spatial_niches")]``
    """
    from scipy.spatial import cKDTree
    from sklearn.cluster import MiniBatchKMeans

    _categorical(adata, cluster_key)
    codes = adata.obs[cluster_key].cat.codes.to_numpy()
    T = len(adata.obs[cluster_key].cat.categories)
    comp = np.zeros((adata.n_obs, T), dtype=np.float32)
    xy = np.asarray(adata.obsm[schema.OBSM_SPATIAL])
    for sid in adata.obs[schema.OBS_SAMPLE].cat.categories:
        idx = np.flatnonzero((adata.obs[schema.OBS_SAMPLE] == sid).to_numpy())
        if len(idx) == 0:
            continue
        kk = min(k, len(idx))
        _, nn = cKDTree(xy[idx]).query(xy[idx], k=kk)
        nn = nn.reshape(len(idx), kk)
        nb = codes[idx][nn]
        sub = np.zeros((len(idx), T), dtype=np.float32)
        for t in range(T):
            sub[:, t] = (nb == t).mean(axis=1)
        comp[idx] = sub
    km = MiniBatchKMeans(n_clusters=n_niches, random_state=seed, n_init=3, batch_size=4096)
    lab = km.fit_predict(comp)
    order = np.argsort(-np.bincount(lab, minlength=n_niches))
    rename = {int(old): f"N{new + 1}" for new, old in enumerate(order)}
    names = [f"N{i + 1}" for i in range(n_niches)]
    adata.obs[schema.OBS_NICHE] = pd.Categorical([rename[x] for x in lab], categories=names)
    record_params(adata, "spatial_niches", {"k": k, "n_niches": n_niches, "seed": seed})
    return adata


def niche_tables(adata, *, reference: str, cluster_key: str = schema.OBS_CELL_TYPE):
    """(composition of each niche, niche proportions per section, composition test of the
    niche proportions across resistance states with the section as unit)."""
    from .analyses import compare_composition

    obs = adata.obs
    ct = pd.crosstab(obs[schema.OBS_NICHE], obs[cluster_key])
    comp = ct.div(ct.sum(axis=1), axis=0).stack().rename(schema.COL_FRACTION).reset_index()
    comp.columns = [schema.COL_NICHE, schema.COL_CELL_TYPE, schema.COL_FRACTION]
    comp["n_cells"] = ct.stack().to_numpy()
    counts = (
        obs.groupby([schema.OBS_SAMPLE, schema.OBS_NICHE], observed=False)
        .size()
        .rename("n_cells")
        .reset_index()
    )
    meta = obs.drop_duplicates(schema.OBS_SAMPLE).set_index(schema.OBS_SAMPLE)
    counts[schema.OBS_PATIENT] = meta.loc[counts[schema.OBS_SAMPLE], schema.OBS_PATIENT].to_numpy()
    counts[schema.OBS_CONDITION] = meta.loc[
        counts[schema.OBS_SAMPLE], schema.OBS_CONDITION
    ].to_numpy()
    tot = counts.groupby(schema.OBS_SAMPLE, observed=True)["n_cells"].transform("sum")
    counts["proportion"] = counts["n_cells"] / tot.clip(lower=1)
    props = counts[schema.SPATIAL_TABLE_COLUMNS[schema.TABLE_NICHE_PROPORTIONS]]
    conds = [str(c) for c in obs[schema.OBS_CONDITION].cat.categories]
    contrasts = [c for c in conds if c != reference]
    test_in = props.rename(columns={schema.COL_NICHE: schema.COL_CELL_TYPE}).astype(
        {schema.OBS_SAMPLE: str, schema.OBS_PATIENT: str, schema.OBS_CONDITION: str}
    )
    test, _info = compare_composition(test_in, reference, contrasts, exclude=())
    test = test.rename(columns={schema.COL_CELL_TYPE: schema.COL_NICHE})
    test = test[schema.SPATIAL_TABLE_COLUMNS[schema.TABLE_NICHE_TEST]]
    return comp, props.reset_index(drop=True), test


# ======================================================================================
# LIANA+ bivariate spatial LR scores
# ======================================================================================
def lr_pairs_from_atlas(atlas_dir: str | Path, genes, *, max_pairs: int = 50) -> pd.DataFrame:
    """Distinct (ligand, receptor) of the atlas's differential interactions (called first,
    then by p-value) whose genes (complex subunits included) are all on the panel."""
    import atlas as atlas_pkg

    store = atlas_pkg.open(atlas_dir)
    if not store.has_table(schema.TABLE_INTERACTIONS_DIFF):
        log.warning("atlas has no %s table: no spatial LR scores", schema.TABLE_INTERACTIONS_DIFF)
        return pd.DataFrame(columns=[schema.COL_LIGAND, schema.COL_RECEPTOR, "source_table"])
    d = store.interactions("diff")
    gset = set(genes)
    ok = d.apply(
        lambda r: all(g in gset for g in f"{r[schema.COL_LIGAND]}_{r[schema.COL_RECEPTOR]}".split("_")),
        axis=1,
    )  # fmt: skip
    d = d[ok]
    sort = [c for c in ("called", schema.COL_PVALUE) if c in d.columns]
    if sort:
        d = d.sort_values(sort, ascending=[False, True][: len(sort)])
    pairs = d[[schema.COL_LIGAND, schema.COL_RECEPTOR]].drop_duplicates().head(max_pairs)
    return pairs.assign(source_table=schema.TABLE_INTERACTIONS_DIFF).reset_index(drop=True)


def spatial_lr(adata, pairs: pd.DataFrame, *, local_score: str = "product"):
    """LIANA+ bivariate local scores of ``pairs`` on the spatial graph (X log-normalised).

    Returns ``(table, by_section, local)``: per pair the mean local score over all cells and
    liana's global bivariate Moran's R; the mean local score per section; the cells x pairs
    local scores (float32, columns as the table's rows).
    """
    import liana as li

    cols = schema.SPATIAL_TABLE_COLUMNS[schema.TABLE_SPATIAL_LR]
    bcols = schema.SPATIAL_TABLE_COLUMNS[schema.TABLE_SPATIAL_LR_BY_SECTION]
    if pairs.empty:
        return pd.DataFrame(columns=cols), pd.DataFrame(columns=bcols), np.zeros((adata.n_obs, 0))
    res = li.mt.bivariate(
        adata,
        resource=pairs[[schema.COL_LIGAND, schema.COL_RECEPTOR]],
        local_name=local_score,
        global_name="morans",
        connectivity_key=schema.OBSP_SPATIAL_CONNECTIVITIES,
        use_raw=False,
        layer=None,
        n_perms=None,
        mask_negatives=False,
        nz_prop=0.0,
        verbose=False,
    )
    local = np.asarray(res.X.toarray() if sp.issparse(res.X) else res.X, dtype=np.float32)
    var = res.var
    src = pairs.set_index([schema.COL_LIGAND, schema.COL_RECEPTOR])["source_table"]
    table = pd.DataFrame(
        {
            schema.COL_INTERACTION: var.index.astype(str),
            schema.COL_LIGAND: var["ligand"].astype(str).to_numpy(),
            schema.COL_RECEPTOR: var["receptor"].astype(str).to_numpy(),
            schema.COL_LOCAL_MEAN: local.mean(axis=0),
            schema.COL_GLOBAL_MORANS: pd.to_numeric(var.get("morans"), errors="coerce"),
            "ligand_props": var["ligand_props"].to_numpy(),
            "receptor_props": var["receptor_props"].to_numpy(),
        }
    )
    table["source_table"] = [
        src.get((lig, rec), "") for lig, rec in zip(table[schema.COL_LIGAND], table[schema.COL_RECEPTOR])
    ]  # fmt: skip
    sec = adata.obs[schema.OBS_SAMPLE].astype(str).to_numpy()
    cond = adata.obs[schema.OBS_CONDITION].astype(str).to_numpy()
    brows = []
    for s in pd.unique(sec):
        m = sec == s
        means = local[m].mean(axis=0)
        for name, v in zip(table[schema.COL_INTERACTION], means):
            brows.append((s, cond[m][0], name, float(v)))
    return table[cols], pd.DataFrame(brows, columns=bcols), local


def compare_lr_states(by_section: pd.DataFrame, sections: pd.DataFrame, *, reference: str):
    """Per-section mean local score of each LR pair, each state vs ``reference``: the
    section is the unit, ``score ~ patient + condition`` when patients are seen in several
    states (else ``~ condition``), limma-moderated t, BH over the pairs of a contrast.
    ``sections``: one row per section (index sample_id; patient, condition)."""
    from .analyses import _design, linear_fit

    cols = schema.SPATIAL_TABLE_COLUMNS[schema.TABLE_SPATIAL_LR_DIFF]
    if by_section.empty:
        return pd.DataFrame(columns=cols)
    Y = by_section.pivot_table(
        index=schema.OBS_SAMPLE, columns=schema.COL_INTERACTION, values=schema.COL_LOCAL_MEAN
    )
    meta = sections.loc[Y.index]
    conds = [c for c in dict.fromkeys(meta[schema.OBS_CONDITION].astype(str))]
    if reference not in conds:
        return pd.DataFrame(columns=cols)
    conds = [reference] + [c for c in conds if c != reference]
    X, paired = _design(meta, reference, conds)
    if X.shape[0] - X.shape[1] < 1:
        log.warning("spatial LR by state: too few sections for a test")
        return pd.DataFrame(columns=cols)
    fit = linear_fit(X, Y.to_numpy(float), moderate=True)
    cond = meta[schema.OBS_CONDITION].astype(str).to_numpy()
    rows = []
    for c in conds[1:]:
        est, t, p = fit.t_test(f"cond_{c}")
        padj = bh_adjust(p)
        for j, name in enumerate(Y.columns):
            rows.append(
                (name, c, reference, float(Y.iloc[cond == c, j].mean()),
                 float(Y.iloc[cond == reference, j].mean()), float(est[j]), float(t[j]),
                 float(p[j]), float(padj[j]), int(((cond == c) | (cond == reference)).sum()),
                 bool(paired))
            )  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


# ======================================================================================
# the command
# ======================================================================================
def _normalise(adata) -> None:
    import scanpy as sc

    adata.X = adata.layers[schema.LAYER_COUNTS].copy()
    sc.pp.normalize_total(adata, target_sum=_NORM_TARGET)
    sc.pp.log1p(adata)


def _interactions_file(path: str | Path) -> pd.DataFrame:
    p = Path(path)
    try:
        df = pd.read_csv(p)
    except Exception as e:  # pandas raises many kinds
        raise InputError(f"interactions file {p}: cannot read ({e.__class__.__name__})") from None
    miss = [c for c in (schema.COL_LIGAND, schema.COL_RECEPTOR) if c not in df.columns]
    if miss:
        raise InputError(f"interactions file {p}: missing column(s) {', '.join(miss)}")
    out = df[[schema.COL_LIGAND, schema.COL_RECEPTOR]].astype(str).drop_duplicates()
    return out.assign(source_table=p.name).reset_index(drop=True)


def run_spatial(
    samplesheet: str | Path,
    *,
    atlas_dir: str | Path,
    out: str | Path | None = None,
    config=None,
    interactions: str | Path | None = None,
    reference: pd.DataFrame | None = None,
    allow_outside_paths: bool = False,
) -> Path:
    """``tme-atlas spatial``: read and check the sections, map cell types onto the atlas,
    run the neighbourhood analyses, niches and spatial LR scores; write ``out`` (default
    ``ATLAS/spatial``) atomically. ``reference`` replaces the atlas's cell-type profiles
    (tests); ``interactions``: a CSV with ``ligand,receptor`` scored besides the atlas's
    differential interactions. Returns ``out``."""
    import shutil

    import atlas as atlas_pkg
    from atlas.config import load_config

    cfg = (config or load_config(env={})).spatial
    atlas_dir = Path(atlas_dir)
    out = Path(out) if out is not None else atlas_dir / schema.SPATIAL_DIR
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    store = atlas_pkg.open(atlas_dir)  # not an atlas -> one line, exit 2
    extra = _interactions_file(interactions) if interactions else None
    adata = read_sections(samplesheet, allow_outside_paths=allow_outside_paths)
    shared = [g for g in adata.var_names if store.has_gene(g)]
    if len(shared) < cfg.min_shared_genes:
        raise InputError(
            f"sample sheet {samplesheet}: {len(shared)} of the panel's {adata.n_vars} genes are "
            f"measured by the atlas {atlas_dir} (need {cfg.min_shared_genes}); same species "
            "and gene symbols?"
        )
    n0 = adata.n_obs
    tot = np.asarray(adata.layers[schema.LAYER_COUNTS].sum(axis=1)).ravel()
    adata = adata[tot >= cfg.min_counts].copy()
    log.info("%d sections, %d cells (%d below %d counts dropped), %d panel genes (%d in atlas)",
             adata.obs[schema.OBS_SAMPLE].nunique(), adata.n_obs, n0 - adata.n_obs,
             cfg.min_counts, adata.n_vars, len(shared))  # fmt: skip
    timings["ingest"] = time.perf_counter() - t0

    t = time.perf_counter()
    if reference is None:
        reference = atlas_reference(
            atlas_dir, shared, max_cells_per_type=cfg.max_ref_cells_per_type, seed=cfg.seed
        )
    map_cell_types(adata, reference, min_confidence=cfg.min_confidence)
    timings["typing"] = time.perf_counter() - t

    t = time.perf_counter()
    _normalise(adata)
    spatial_graph(adata)
    timings["graph"] = time.perf_counter() - t
    t = time.perf_counter()
    by_section = nhood_enrichment(adata, n_perms=cfg.n_perms, seed=cfg.seed)
    nhood = combine_nhood(by_section)
    timings["nhood_enrichment"] = time.perf_counter() - t
    t = time.perf_counter()
    cooc = co_occurrence(adata, max_cells=cfg.co_occurrence_max_cells, seed=cfg.seed)
    timings["co_occurrence"] = time.perf_counter() - t
    t = time.perf_counter()
    find_niches(adata, k=cfg.niche_k, n_niches=cfg.n_niches, seed=cfg.seed)
    ref_cond = store.reference or str(adata.obs[schema.OBS_CONDITION].cat.categories[0])
    if ref_cond not in set(adata.obs[schema.OBS_CONDITION].astype(str)):
        ref_cond = str(adata.obs[schema.OBS_CONDITION].cat.categories[0])
    ncomp, nprops, ntest = niche_tables(adata, reference=ref_cond)
    timings["niches"] = time.perf_counter() - t

    t = time.perf_counter()
    pairs = lr_pairs_from_atlas(atlas_dir, adata.var_names, max_pairs=cfg.max_lr_pairs)
    if extra is not None:
        pairs = pd.concat([extra, pairs], ignore_index=True).drop_duplicates(
            [schema.COL_LIGAND, schema.COL_RECEPTOR]
        )
    lr_table, lr_sec, local = spatial_lr(adata, pairs, local_score=cfg.local_score)
    sec_meta = adata.obs.drop_duplicates(schema.OBS_SAMPLE).set_index(schema.OBS_SAMPLE)[
        [schema.OBS_PATIENT, schema.OBS_CONDITION]
    ]
    sec_meta.index = sec_meta.index.astype(str)
    lr_diff = compare_lr_states(lr_sec, sec_meta.astype(str), reference=ref_cond)
    timings["spatial_lr"] = time.perf_counter() - t

    t = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / schema.TABLES_DIR).mkdir(parents=True)
    tables = {
        schema.TABLE_NHOOD_BY_SECTION: by_section,
        schema.TABLE_NHOOD: nhood,
        schema.TABLE_CO_OCCURRENCE: cooc,
        schema.TABLE_NICHE_COMPOSITION: ncomp,
        schema.TABLE_NICHE_PROPORTIONS: nprops,
        schema.TABLE_NICHE_TEST: ntest,
        schema.TABLE_SPATIAL_LR: lr_table,
        schema.TABLE_SPATIAL_LR_BY_SECTION: lr_sec,
        schema.TABLE_SPATIAL_LR_DIFF: lr_diff,
    }
    from atlas.tables import csv_text

    for name, df in tables.items():
        (tmp / schema.TABLES_DIR / f"{name}.csv").write_text(csv_text(df, index=False), "utf-8")
    xy = np.asarray(adata.obsm[schema.OBSM_SPATIAL])
    cells = pd.DataFrame(
        {
            schema.OBS_SAMPLE: adata.obs[schema.OBS_SAMPLE].astype(str).to_numpy(),
            schema.OBS_CONDITION: adata.obs[schema.OBS_CONDITION].astype(str).to_numpy(),
            schema.OBS_SPATIAL_X: xy[:, 0],
            schema.OBS_SPATIAL_Y: xy[:, 1],
            schema.OBS_CELL_TYPE: adata.obs[schema.OBS_CELL_TYPE].astype(str).to_numpy(),
            schema.OBS_CELL_TYPE_CONFIDENCE: adata.obs[schema.OBS_CELL_TYPE_CONFIDENCE].to_numpy(),
            schema.OBS_NICHE: adata.obs[schema.OBS_NICHE].astype(str).to_numpy(),
        },
        index=pd.Index(adata.obs_names.astype(str), name="cell_id"),
    )
    for c in (schema.OBS_SAMPLE, schema.OBS_CONDITION, schema.OBS_CELL_TYPE, schema.OBS_NICHE):
        cells[c] = cells[c].astype("category")
    cells.to_parquet(tmp / schema.SPATIAL_CELLS_FILE)
    np.save(tmp / schema.SPATIAL_LR_LOCAL_FILE, local)
    csc = sp.csc_matrix(adata.X, dtype=np.float32)
    for name, arr in zip(
        schema.SPATIAL_EXPR_FILES,
        (csc.data, csc.indices.astype(np.int32), csc.indptr.astype(np.int64)),
    ):
        np.save(tmp / name, arr)
    adata.obs = adata.obs.astype(
        {c: str for c in adata.obs.columns if adata.obs[c].dtype == object}
    )
    for k in list(adata.obsp):
        del adata.obsp[k]
    adata.uns.pop("spatial_neighbors", None)
    adata.write_h5ad(tmp / schema.SPATIAL_H5AD_FILE, compression="gzip")
    timings["write"] = time.perf_counter() - t
    meta = {
        "sections": [str(s) for s in adata.obs[schema.OBS_SAMPLE].cat.categories],
        "conditions": [str(c) for c in adata.obs[schema.OBS_CONDITION].cat.categories],
        "reference": ref_cond,
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "genes": [str(g) for g in adata.var_names],
        "interactions": list(lr_table[schema.COL_INTERACTION]),
        "cell_types": [str(c) for c in adata.obs[schema.OBS_CELL_TYPE].cat.categories],
        "niches": [str(c) for c in adata.obs[schema.OBS_NICHE].cat.categories],
        "config": cfg.model_dump(),
        "atlas": str(atlas_dir.resolve()),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    atomic_write_text(tmp / schema.SPATIAL_META_FILE, json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("wrote %s (%.1f s)", out, time.perf_counter() - t0)
    return out
