"""Ligand-receptor crosstalk between CLL cells and their microenvironment (stage ``crosstalk``).

What it computes, on the atlas grouped by ``config.crosstalk.groupby`` (the cell type):

1. **Interactions per condition** -- LIANA+ ``rank_aggregate`` (consensus of CellPhoneDB,
   Connectome, log2FC, NATMI and SingleCellSignalR) on the log-normalised ``X``
   (``use_raw=False``), one run per resistance state. The LR resource ships inside liana
   (``consensus`` for human, ``mouseconsensus`` for mouse) and is passed explicitly as a
   DataFrame, so nothing is fetched. Table ``interactions``: per condition the ``top_n``
   interactions by ``magnitude_rank`` plus every curated CLL interaction.
2. **Interactions per sample** -- the same consensus run by sample
   (``rank_aggregate.by_sample``), restricted to the interactions kept in (1); table
   ``interactions_by_sample`` (every kept interaction gets a score in every sample where both
   partners are expressed).
3. **Differential interactions** (each condition vs the reference), paired design aware:

   * rows: every LR pair of the resource and every sender -> receiver pair of cell types in
     which both partners are expressed (fraction of cells with non-zero expression
     >= ``expr_prop`` in the condition *or* the reference; for complexes every subunit);
   * **primary evidence, per sample**: the row's score in each sample is liana's
     ``lr_means`` (mean of the ligand's mean log-normalised expression in the sender and the
     receptor's in the receiver; complexes: lowest subunit; both cell types with
     ``min_cells`` cells in the sample). Per row ``lr_means ~ condition`` plus the patient
     block when a patient is seen in both states (:func:`preprocessing.analyses._design`),
     residual variances moderated across the contrast's rows (limma eBayes): ``score`` =
     the condition coefficient (paired change), ``t``, ``pvalue``; ``padj``: BH over the
     rows of the contrast (unit: one sender-receiver-ligand-receptor row; rows sharing a
     partner are positively dependent, for which BH holds);
   * **partners' evidence**: the pseudobulk DE (table ``de``; a complex by its *limiting
     subunit*, the smallest |shrunk log2FC|; log2FCs shrunk towards 0 with DESeq2's
     betaPrior rule, raw ones alongside). A partner without a DE test has *no evidence*
     (NaN), never ``p = 1``. ``ligand_padj`` / ``receptor_padj``: BH over the distinct
     (cell type, gene) DE tests that the contrast's rows use, each counted once however
     many rows reuse it. ``driver``: ``both`` (both partners change at ``diff_alpha``, same
     direction), ``ligand`` / ``receptor`` (only that one), ``opposing``, ``none``;
   * ``called``: ``padj <= diff_alpha`` and ``driver == both`` in the direction of the
     score -- one DE ligand no longer makes every receptor in every receiver significant;
     ``pvalue_both``: the intersection-union p of the three (per-sample test and the two
     partners in the direction of the score; NaN when a partner is untested), for ranking;
   * abundance beside, not in the score: mean per-sample fraction of the sender and the
     receiver among usable cells in both states and the log2 ratio.

   Table ``interactions_diff``: rows called or with ``padj <= diff_max_padj``, plus the
   ``top_n`` by |score| per condition, plus every curated interaction.
4. **Independent check** with ``squidpy.gr.ligrec`` (CellPhoneDB-style permutation test,
   same resource passed explicitly, single-gene pairs, ``use_raw=False``, same seed) on the
   reference condition (every condition with ``ligrec_all_conditions``), compared with liana's CellPhoneDB component: Jaccard / overlap of the
   significant interactions (p <= ``alpha``) and Spearman correlation of the LR means;
   table ``ligrec_agreement`` and one log line per condition.

Every result carries ``curated`` (bool) and ``curated_source`` (literature) from
``references/lr_curated.csv``.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlas import schema
from atlas.params import record_params
from atlas.species import species_of
from atlas.stats import bh_adjust
from atlas.tables import get_table, put_table
from preprocessing.log import get_logger
from references import path as reference_path

log = get_logger("crosstalk")

DEFAULT_RESOURCE = {"human": "consensus", "mouse": "mouseconsensus"}
CURATED_FILE = "lr_curated.csv"
COMPLEX_SEP = "_"
PARAMS_KEY = schema.params_key("crosstalk")
XSUM = "_tme_xsum"  # working AnnData: row sums of the full log-normalised X
N_GENES_FULL = "_tme_n_genes_full"

LIANA_SCORES = schema.LIANA_SCORE_COLUMNS
KEY_COLS = schema.LR_KEY_COLUMNS
INTERACTIONS_COLUMNS = schema.TABLE_COLUMNS[schema.TABLE_INTERACTIONS]
BY_SAMPLE_COLUMNS = schema.TABLE_COLUMNS[schema.TABLE_INTERACTIONS_BY_SAMPLE]
DIFF_COLUMNS = schema.TABLE_COLUMNS[schema.TABLE_INTERACTIONS_DIFF]
AGREEMENT_COLUMNS = schema.TABLE_COLUMNS[schema.TABLE_LIGREC_AGREEMENT]


# ----------------------------------------------------------------------------- inputs
def _crosstalk_config(config):
    from atlas.config import Config, CrosstalkConfig

    if config is None:
        return CrosstalkConfig()
    if isinstance(config, CrosstalkConfig):
        return config
    if isinstance(config, Config):
        return config.crosstalk
    raise TypeError(f"config must be a Config or CrosstalkConfig, not {type(config).__name__}")


def load_resource(species: str = "human", name: str | None = None) -> pd.DataFrame:
    """The ligand-receptor resource as a ``ligand, receptor`` DataFrame (complexes ``A_B``).

    ``name``: one of liana's shipped resources (default ``consensus`` for human,
    ``mouseconsensus`` for mouse) or the path of a CSV/TSV with ``ligand`` and ``receptor``
    columns. Read from files inside the installed packages; never from the network.
    """
    from atlas.config import ConfigError

    name = name or DEFAULT_RESOURCE[species]
    path = Path(name)
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        if not path.is_file():
            raise ConfigError(f"config crosstalk.resource: file not found: {path}")
        df = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str)
        missing = {"ligand", "receptor"} - set(df.columns)
        if missing:
            raise ConfigError(
                f"config crosstalk.resource: {path} lacks column(s) {', '.join(sorted(missing))}"
            )
    else:
        import liana as li

        available = li.rs.show_resources()
        if name.lower() not in available:
            raise ConfigError(
                f"config crosstalk.resource: unknown resource {name!r}; "
                f"use one of {', '.join(available)} or a CSV with ligand,receptor columns"
            )
        df = li.rs.select_resource(name.lower())
    df = df[["ligand", "receptor"]].dropna().astype(str)
    return df.drop_duplicates().reset_index(drop=True)


def load_curated(species: str = "human") -> pd.DataFrame:
    """Curated CLL interactions (``references/lr_curated.csv``) in the species' symbols.

    Columns: ligand, receptor, sender, receiver, axis, pmid, source, curated_source.
    """
    df = pd.read_csv(reference_path(CURATED_FILE), dtype=str).fillna("")
    if species == "mouse":
        df = df.assign(ligand=df["ligand_mouse"], receptor=df["receptor_mouse"])
    df = df[(df["ligand"] != "") & (df["receptor"] != "")].copy()
    df["curated_source"] = [
        f"{src} (PMID {pmid})" if pmid else src for src, pmid in zip(df["source"], df["pmid"])
    ]
    cols = ["ligand", "receptor", "sender", "receiver", "axis", "pmid", "source", "curated_source"]
    return df[cols].drop_duplicates(["ligand", "receptor"]).reset_index(drop=True)


def annotate_curated(df: pd.DataFrame, curated: pd.DataFrame) -> pd.DataFrame:
    """Add ``curated`` (bool) and ``curated_source`` (str) by (ligand, receptor)."""
    out = df.drop(columns=[c for c in ("curated", "curated_source") if c in df.columns])
    cur = curated[["ligand", "receptor", "curated_source"]]
    out = out.merge(cur, on=["ligand", "receptor"], how="left")
    out["curated"] = out["curated_source"].notna()
    out["curated_source"] = out["curated_source"].fillna("").astype(str)
    return out


def _resource_genes(resource: pd.DataFrame) -> set[str]:
    genes: set[str] = set()
    for col in ("ligand", "receptor"):
        for name in resource[col].unique():
            genes.update(name.split(COMPLEX_SEP))
    return genes


def _usable_cells(adata, groupby: str) -> np.ndarray:
    """Cells with a real label (not Unassigned / doublet-like / QC-failed)."""
    obs = adata.obs
    labels = obs[groupby].astype(str)
    mask = obs[groupby].notna().to_numpy() & ~labels.isin(["", "nan", schema.UNASSIGNED]).to_numpy()
    if schema.OBS_DOUBLET_CLUSTER in obs:
        mask &= ~schema.flag_column(obs, schema.OBS_DOUBLET_CLUSTER)
    if schema.OBS_QC_PASS in obs:
        mask &= schema.flag_column(obs, schema.OBS_QC_PASS)
    return mask


def _looks_like_counts(X) -> bool:
    data = X.data if sp.issparse(X) else np.asarray(X).ravel()
    sample = np.asarray(data[: min(data.size, 200_000)], dtype=np.float64)
    if sample.size == 0:
        return False
    return bool(sample.max() > 30 and np.all(np.mod(sample, 1) == 0))


def working_adata(adata, genes: set[str], groupby: str):
    """A small AnnData for the LR tools: usable cells x resource genes, X log-normalised.

    X must be log1p(normalize_total 1e4) (the atlas contract); if it holds raw counts it is
    normalised here (totals over all genes).
    """
    import anndata as ad

    mask = _usable_cells(adata, groupby)
    keep = [g for g in adata.var_names if g in genes]
    if not keep:
        raise ValueError("no gene of the ligand-receptor resource is in the atlas")
    gidx = adata.var_names.get_indexer(keep)
    X = adata.X
    if _looks_like_counts(X):
        log.warning("crosstalk: atlas X looks like raw counts; log-normalising (1e4) here")
        Xm = sp.csr_matrix(X[mask], dtype=np.float32)
        totals = np.asarray(Xm.sum(axis=1)).ravel()
        totals[totals == 0] = 1
        Xm = sp.diags((1e4 / totals).astype(np.float32)) @ Xm
        Xm.data = np.log1p(Xm.data)
        xsum = np.asarray(Xm.sum(axis=1), dtype=np.float64).ravel()
        Xs = sp.csr_matrix(Xm[:, gidx], dtype=np.float32)
    else:
        # the resource's genes first, then the cells: no copy of the whole matrix (1.4 GB
        # at 300k cells); row sums over *all* genes (liana's SingleCellSignalR score uses
        # the matrix mean)
        xsum = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()[mask]
        Xs = sp.csr_matrix(X[:, gidx][mask], dtype=np.float32)
    Xs.eliminate_zeros()
    cols = [
        c
        for c in (groupby, schema.OBS_CONDITION, schema.OBS_SAMPLE, schema.OBS_PATIENT)
        if c in adata.obs
    ]
    obs = adata.obs.loc[mask, cols].copy()
    for c in cols:
        obs[c] = pd.Categorical(obs[c].astype(str))
    obs[XSUM] = xsum
    w = ad.AnnData(X=Xs, obs=obs, var=pd.DataFrame(index=pd.Index(keep, dtype=str)))
    w.uns[N_GENES_FULL] = int(adata.n_vars)
    return w


def _correct_lrscore(res: pd.DataFrame, w, cfg) -> pd.DataFrame:
    """Rescale liana's ``lrscore`` to the mean of the *whole* log-normalised matrix.

    SingleCellSignalR's score is ``s = sqrt(LR) / (sqrt(LR) + mu)`` with ``mu`` the mean of
    the matrix liana receives; we pass only the expressed resource genes, so liana used
    ``mu'``. ``sqrt(LR) = s mu' / (1 - s)`` gives back the score with the atlas-wide ``mu``
    (same cells: those of cell types with >= ``min_cells`` cells). Ranks are unchanged.
    """
    if "lrscore" not in res or res.empty:
        return res
    counts = w.obs[cfg.groupby].value_counts()
    cells = w.obs[cfg.groupby].isin(counts.index[counts >= cfg.min_cells]).to_numpy()
    mu_used = float(w.X[cells].mean(dtype=np.float64))
    mu_true = float(w.obs[XSUM].to_numpy()[cells].sum() / (cells.sum() * w.uns[N_GENES_FULL]))
    s = res["lrscore"].to_numpy(dtype=np.float64)
    x = s * mu_used / np.clip(1 - s, 1e-12, None)
    res = res.copy()
    res["lrscore"] = x / (x + mu_true)
    return res


def condition_order(adata, conditions) -> list[str]:
    present = [str(c) for c in pd.unique(pd.Series(conditions).astype(str))]
    order = adata.uns.get(schema.UNS_CONDITION_ORDER)
    if order is not None:
        order = [str(c) for c in list(order)]
        return [c for c in order if c in present] + [c for c in present if c not in order]
    return sorted(present)


# ----------------------------------------------------------------------------- liana
def _groups_ok(obs: pd.DataFrame, groupby: str, min_cells: int) -> int:
    counts = obs[groupby].value_counts()
    return int((counts >= min_cells).sum())


def _liana_kwargs(cfg, resource: pd.DataFrame) -> dict[str, Any]:
    return dict(
        groupby=cfg.groupby,
        resource=resource,
        use_raw=False,
        expr_prop=cfg.expr_prop,
        min_cells=cfg.min_cells,
        n_perms=cfg.n_perms if cfg.n_perms > 0 else None,
        seed=cfg.seed,
        verbose=False,
    )


def _tidy_liana(res: pd.DataFrame) -> pd.DataFrame:
    res = res.rename(columns={"ligand_complex": "ligand", "receptor_complex": "receptor"})
    res = res.loc[:, ~res.columns.duplicated()]
    for c in ("source", "target", "ligand", "receptor"):
        res[c] = res[c].astype(str)
    return res


def expressed_resource(w, resource: pd.DataFrame, cfg, by: str | None = None):
    """The resource pairs liana can keep on ``w``, and ``w`` restricted to their genes.

    A pair survives liana's ``expr_prop`` filter only if, in some cell type (of some
    ``by`` group) with >= ``min_cells`` cells, every ligand subunit is expressed in >=
    ``expr_prop`` of the cells, and likewise the receptor in some cell type. Dropping the
    other pairs first gives the same result (liana drops them anyway) but keeps liana's
    per-interaction pandas work small: ~10x faster on 16 cell types.
    """
    keys = [by, cfg.groupby] if by else [cfg.groupby]
    obs = w.obs[keys].astype(str)
    key = obs.agg("\x1f".join, axis=1) if by else obs[cfg.groupby]
    codes, uniques = pd.factorize(key)
    n = np.bincount(codes, minlength=len(uniques))
    ok = n >= cfg.min_cells
    G = sp.csr_matrix(
        (np.ones(len(codes), dtype=np.float32), (codes, np.arange(len(codes)))),
        shape=(len(uniques), len(codes)),
    )
    B = w.X.copy()
    B.data = (B.data > 0).astype(np.float32)
    props = np.asarray((G @ B).todense())[ok] / n[ok][:, None]
    expressed = props >= cfg.expr_prop  # groups x genes
    gpos = {g: i for i, g in enumerate(w.var_names)}

    def complex_ok(name: str) -> bool:
        idx = [gpos.get(g) for g in name.split(COMPLEX_SEP)]
        if any(i is None for i in idx):
            return False
        return bool(expressed[:, idx].all(axis=1).any())

    lig_ok = {x: complex_ok(x) for x in resource["ligand"].unique()}
    rec_ok = {x: complex_ok(x) for x in resource["receptor"].unique()}
    keep = resource["ligand"].map(lig_ok) & resource["receptor"].map(rec_ok)
    res = resource[keep.to_numpy()].reset_index(drop=True)
    genes = _resource_genes(res)
    return res, w[:, [g in genes for g in w.var_names]]


def _fast_join_stats():
    """A drop-in for liana's ``_join_stats`` that indexes arrays instead of merging frames.

    liana 1.10 joins the ligand-receptor table to the sender's and the receiver's per-gene
    statistics with two ``DataFrame.merge`` per (sender, receiver) pair: ~5 ms each, over
    half of the stage at 16 cell types x 16 samples. Within one liana call the resource and
    the per-label statistics do not change, so the gene positions of every row are looked
    up once and each pair is a gather of numpy columns. Same rows, order (the resource's),
    columns, dtypes and index as the merges (``test_fast_liana_join_is_liana``).
    """
    keep_alive: list = []  # ids stay unique while the objects are cached
    rows: dict[int, tuple] = {}
    cols: dict[int, tuple] = {}

    def resource_rows(resource: pd.DataFrame, names: pd.Index):
        key = id(resource)
        if key not in rows:
            lig = names.get_indexer(resource["ligand"])
            rec = names.get_indexer(resource["receptor"])
            ok = (lig >= 0) & (rec >= 0)
            base = {c: resource[c].to_numpy()[ok] for c in resource.columns}
            keep_alive.append(resource)
            rows[key] = (base, lig[ok], rec[ok])
        return rows[key]

    def stats_cols(stats: pd.DataFrame):
        key = id(stats)
        if key not in cols:
            keep_alive.append(stats)
            cols[key] = (
                pd.Index(stats["names"]),
                {c: stats[c].to_numpy() for c in stats.columns if c != "names"},
            )
        return cols[key]

    def join(source, target, dedict, resource):
        names, src = stats_cols(dedict[source])
        target_names, tgt = stats_cols(dedict[target])
        if names.has_duplicates or not names.equals(target_names):
            raise AssertionError("per-label statistics are not on one gene order")
        base, lig, rec = resource_rows(resource, names)
        out = dict(base)
        for prefix, idx, stats, label_col in (
            ("ligand_", lig, src, "source"),
            ("receptor_", rec, tgt, "target"),
        ):
            for c, v in stats.items():
                out[label_col if c == "label" else prefix + c] = v[idx]
        return pd.DataFrame(out)

    return join


@contextlib.contextmanager
def _fast_liana():
    """Within the block, liana looks up gene positions with an index instead of a scan and
    joins statistics by array indexing (:func:`_fast_join_stats`).

    liana 1.10's ``_get_positions`` runs ``np.where(var_names == g)`` once per *row* of the
    interaction table (O(rows x genes); a quarter of the run time at 16 cell types). The
    replacement returns the same dictionaries (first position of each name) in O(rows).
    """
    from liana.method._pipe_utils import _get_mean_perms as gmp
    from liana.method.sc import _liana_pipe as pipe

    original = gmp._get_positions, pipe._join_stats

    def positions(adata, lr_res):
        labels = adata.obs["@label"].cat.categories
        names = pd.Index(adata.var_names)
        first = ~names.duplicated()
        lookup = pd.Series(np.flatnonzero(first), index=names[first])
        ligand_pos = {g: int(lookup[g]) for g in pd.unique(lr_res["ligand"])}
        receptor_pos = {g: int(lookup[g]) for g in pd.unique(lr_res["receptor"])}
        labels_pos = {labels[i]: i for i in range(labels.shape[0])}
        return ligand_pos, receptor_pos, labels_pos

    gmp._get_positions = positions
    pipe._join_stats = _fast_join_stats()
    try:
        yield
    finally:
        gmp._get_positions, pipe._join_stats = original


def liana_by_condition(w, resource: pd.DataFrame, cfg, conditions: list[str]) -> pd.DataFrame:
    """``rank_aggregate`` per condition on the working AnnData; long table with ``condition``."""
    import liana as li

    out = []
    for cond in conditions:
        sub = w[(w.obs[schema.OBS_CONDITION] == cond).to_numpy()].copy()
        if _groups_ok(sub.obs, cfg.groupby, cfg.min_cells) < 2:
            log.warning(
                "crosstalk: condition %s has < 2 cell types with >= %d cells; skipped",
                cond,
                cfg.min_cells,
            )
            continue
        sub.obs[cfg.groupby] = sub.obs[cfg.groupby].cat.remove_unused_categories()
        res_c, sub = expressed_resource(sub, resource, cfg)
        if res_c.empty:
            log.warning("crosstalk: condition %s: no expressed ligand-receptor pair", cond)
            continue
        with _fast_liana():
            res = li.mt.rank_aggregate(sub.copy(), inplace=False, **_liana_kwargs(cfg, res_c))
        res = _tidy_liana(_correct_lrscore(res, sub, cfg))
        res.insert(0, "condition", cond)
        out.append(res)
    if not out:
        return pd.DataFrame(columns=["condition", *KEY_COLS, "magnitude_rank"])
    return pd.concat(out, ignore_index=True)


def liana_by_sample(w, resource: pd.DataFrame, cfg) -> pd.DataFrame:
    """``rank_aggregate.by_sample`` over the samples with >= 2 usable cell types."""
    import liana as li

    obs = w.obs
    ok = [
        s
        for s, grp in obs.groupby(schema.OBS_SAMPLE, observed=True)
        if _groups_ok(grp, cfg.groupby, cfg.min_cells) >= 2
    ]
    skipped = sorted(set(obs[schema.OBS_SAMPLE].astype(str)) - set(ok))
    if skipped:
        log.warning(
            "crosstalk: samples without 2 cell types of >= %d cells skipped: %s",
            cfg.min_cells,
            ", ".join(skipped),
        )
    if not ok:
        return pd.DataFrame(columns=[schema.OBS_SAMPLE, *KEY_COLS, "magnitude_rank"])
    sub = w[obs[schema.OBS_SAMPLE].isin(ok).to_numpy()].copy()
    sub.obs[schema.OBS_SAMPLE] = sub.obs[schema.OBS_SAMPLE].cat.remove_unused_categories()
    resource, sub = expressed_resource(sub, resource, cfg, by=schema.OBS_SAMPLE)
    sub = sub.copy()
    with _fast_liana():
        res = li.mt.rank_aggregate.by_sample(
            sub,
            sample_key=schema.OBS_SAMPLE,
            key_added="_tme_liana_by_sample",
            inplace=False,
            **_liana_kwargs(cfg, resource),
        )
    res[schema.OBS_SAMPLE] = res[schema.OBS_SAMPLE].astype(str)
    parts = []
    for sample, part in res.groupby(schema.OBS_SAMPLE, sort=False):
        ws = sub[(sub.obs[schema.OBS_SAMPLE] == sample).to_numpy()]
        parts.append(_correct_lrscore(part, ws, cfg))
    res = _tidy_liana(pd.concat(parts, ignore_index=True))
    meta_cols = [c for c in (schema.OBS_PATIENT, schema.OBS_CONDITION) if c in obs]
    meta = obs.drop_duplicates(schema.OBS_SAMPLE)[[schema.OBS_SAMPLE, *meta_cols]].astype(str)
    return res.merge(meta, on=schema.OBS_SAMPLE, how="left")


def keep_top(res: pd.DataFrame, top_n: int, by: str, *, ascending: bool = True) -> pd.DataFrame:
    """Per condition the ``top_n`` rows by ``by`` plus every curated row."""
    if res.empty:
        return res
    key = res[by].abs() if not ascending else res[by]
    order = res.assign(_k=key).sort_values(["condition", "_k"], ascending=[True, ascending])
    rank = order.groupby("condition", sort=False).cumcount()
    keep = (rank < top_n) | order["curated"]
    return order.loc[keep].drop(columns="_k").reset_index(drop=True)


# ----------------------------------------------------------------------------- differential
def expression_props(w, groupby: str) -> pd.DataFrame:
    """Fraction of cells expressing each gene per (condition, cell type): long table."""
    obs = w.obs
    key = obs[schema.OBS_CONDITION].astype(str) + "\x1f" + obs[groupby].astype(str)
    codes, uniques = pd.factorize(key)
    G = sp.csr_matrix(
        (np.ones(len(codes), dtype=np.float32), (codes, np.arange(len(codes)))),
        shape=(len(uniques), len(codes)),
    )
    B = w.X.copy()
    B.data = (B.data > 0).astype(np.float32)
    n = np.asarray(G.sum(axis=1)).ravel()
    props = np.asarray((G @ B).todense()) / n[:, None]
    cond = [u.split("\x1f")[0] for u in uniques]
    ctype = [u.split("\x1f")[1] for u in uniques]
    df = pd.DataFrame(props, columns=w.var_names)
    df["condition"] = cond
    df["cell_type"] = ctype
    return df.melt(id_vars=["condition", "cell_type"], var_name="gene", value_name="prop")


@dataclass
class SampleMeans:
    """Per sample x cell type: mean log-normalised expression of every gene, whether the
    cell type has ``min_cells`` usable cells there, and its fraction of the sample's usable
    cells (the inputs of liana's per-sample ``lr_means`` and of the abundance columns)."""

    meta: pd.DataFrame  # index sample_id; columns patient, condition
    types: list[str]
    genes: pd.Index
    mean: np.ndarray  # samples x types x genes
    ok: np.ndarray  # samples x types (>= min_cells cells)
    frac: np.ndarray  # samples x types (fraction of the sample's usable cells)

    @classmethod
    def from_adata(cls, w, groupby: str, min_cells: int) -> SampleMeans:
        obs = w.obs
        samples = pd.Index(pd.unique(obs[schema.OBS_SAMPLE].astype(str)))
        types = sorted(pd.unique(obs[groupby].astype(str)))
        si = samples.get_indexer(obs[schema.OBS_SAMPLE].astype(str))
        ti = pd.Index(types).get_indexer(obs[groupby].astype(str))
        codes = si * len(types) + ti
        n_grp = len(samples) * len(types)
        G = sp.csr_matrix(
            (np.ones(len(codes), dtype=np.float64), (codes, np.arange(len(codes)))),
            shape=(n_grp, len(codes)),
        )
        n = np.bincount(codes, minlength=n_grp).astype(float)
        X = w.X if sp.issparse(w.X) else sp.csr_matrix(w.X)
        sums = np.asarray((G @ X).todense(), dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = sums / n[:, None]
        n = n.reshape(len(samples), len(types))
        meta_cols = [schema.OBS_PATIENT, schema.OBS_CONDITION]
        meta = (
            obs[[schema.OBS_SAMPLE, *meta_cols]]
            .astype(str)
            .drop_duplicates(schema.OBS_SAMPLE)
            .set_index(schema.OBS_SAMPLE)
            .loc[samples]
        )
        return cls(
            meta=meta,
            types=list(types),
            genes=pd.Index(w.var_names),
            mean=mean.reshape(len(samples), len(types), -1),
            ok=n >= min_cells,
            frac=n / np.maximum(n.sum(axis=1, keepdims=True), 1),
        )

    def entity_means(self, names) -> tuple[dict[str, int], np.ndarray]:
        """liana's complex rule: the mean of a complex is its lowest subunit mean.
        Returns ``(name -> row, entities x samples x types)``; NaN when a gene is absent."""
        names = list(pd.unique(np.asarray(names, dtype=object)))
        out = np.full((len(names), *self.mean.shape[:2]), np.nan)
        for k, name in enumerate(names):
            idx = self.genes.get_indexer(str(name).split(COMPLEX_SEP))
            if (idx >= 0).all():
                out[k] = self.mean[:, :, idx].min(axis=2)
        return {n: k for k, n in enumerate(names)}, out


def sample_score_test(
    res: pd.DataFrame, sm: SampleMeans, cond: str, ref: str
) -> dict[str, np.ndarray]:
    """Per-sample interaction scores tested between ``cond`` and ``ref`` (primary evidence).

    The score of a row (sender, receiver, ligand, receptor) in a sample is liana's
    ``lr_means``: the mean of the ligand's mean log-normalised expression in the sender and
    the receptor's in the receiver (complexes: lowest subunit), where both cell types have
    ``min_cells`` cells in the sample. Model per row ``score ~ condition`` plus the patient
    block when a patient is seen in both states (:func:`preprocessing.analyses._design`),
    residual variances moderated across the rows of the contrast (limma eBayes), moderated
    t. Returns arrays over the rows of ``res``.
    """
    from scipy import stats

    from preprocessing.analyses import _design, squeeze_var

    keep = sm.meta[schema.OBS_CONDITION].isin([cond, ref]).to_numpy()
    meta = sm.meta[keep]
    lmap, L = sm.entity_means(res["ligand"])
    rmap, R = sm.entity_means(res["receptor"])
    tpos = {t: i for i, t in enumerate(sm.types)}
    si = res["source"].map(tpos).to_numpy()
    ti = res["target"].map(tpos).to_numpy()
    li = res["ligand"].map(lmap).to_numpy()
    ri = res["receptor"].map(rmap).to_numpy()
    ks = np.flatnonzero(keep)[None, :]
    lv = L[li[:, None], ks, si[:, None]]  # rows x samples, without a rows x samples x types copy
    rv = R[ri[:, None], ks, ti[:, None]]
    Y = (lv + rv) / 2
    avail = sm.ok[keep][:, si].T & sm.ok[keep][:, ti].T & np.isfinite(Y)
    is_c = (meta[schema.OBS_CONDITION] == cond).to_numpy()
    n = len(res)
    est, s2, dfr, unsc = (np.full(n, np.nan) for _ in range(4))
    n_samples = avail.sum(axis=1)
    paired = np.zeros(n, dtype=bool)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows without samples: NaN
        lr_c = np.nanmean(np.where(avail & is_c, Y, np.nan), axis=1) if n else np.zeros(0)
        lr_r = np.nanmean(np.where(avail & ~is_c, Y, np.nan), axis=1) if n else np.zeros(0)
    patterns, inverse = np.unique(avail, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).ravel()
    for k, pat in enumerate(patterns):
        rows = np.flatnonzero(inverse == k)
        if not (pat & is_c).any() or not (pat & ~is_c).any():
            continue
        X, blk = _design(meta[pat], ref, [ref, cond])
        dof = X.shape[0] - X.shape[1]
        if dof < 1:
            continue
        Xv = X.to_numpy(float)
        u = np.linalg.pinv(Xv.T @ Xv)
        y = Y[np.ix_(rows, np.flatnonzero(pat))].T  # samples x rows
        beta = u @ Xv.T @ y
        j = list(X.columns).index(f"cond_{cond}")
        est[rows] = beta[j]
        s2[rows] = ((y - Xv @ beta) ** 2).sum(axis=0) / dof
        dfr[rows] = dof
        unsc[rows] = u[j, j]
        paired[rows] = blk
    ok = np.isfinite(est)
    t = np.full(n, np.nan)
    p = np.full(n, np.nan)
    if ok.any():
        post, d0, _ = squeeze_var(s2[ok], dfr[ok])
        df_tot = dfr[ok] + (d0 if np.isfinite(d0) else 1e6)
        se = np.sqrt(post * unsc[ok])
        with np.errstate(divide="ignore", invalid="ignore"):
            tt = np.where(se > 0, est[ok] / se, 0.0)
        t[ok] = tt
        p[ok] = 2 * stats.t.sf(np.abs(tt), df_tot)
    return {
        "score": est,
        "t": t,
        "pvalue": p,
        "lr_means": lr_c,
        "lr_means_ref": lr_r,
        "n_samples": n_samples,
        "paired": paired,
    }


def _abundance(res: pd.DataFrame, sm: SampleMeans, cond: str, ref: str) -> dict[str, np.ndarray]:
    """Mean per-sample fraction of the sender / receiver (among usable cells) in ``cond`` and
    ``ref`` and the log2 ratio (shown beside the interaction; not part of its score)."""
    c = (sm.meta[schema.OBS_CONDITION] == cond).to_numpy()
    r = (sm.meta[schema.OBS_CONDITION] == ref).to_numpy()
    tpos = {t: i for i, t in enumerate(sm.types)}
    fc, fr = sm.frac[c].mean(axis=0), sm.frac[r].mean(axis=0)
    out = {}
    for side in ("source", "target"):
        idx = res[side].map(tpos).to_numpy()
        out[f"{side}_frac"] = fc[idx]
        out[f"{side}_frac_ref"] = fr[idx]
        out[f"{side}_frac_log2fc"] = np.log2((fc[idx] + 1e-4) / (fr[idx] + 1e-4))
    return out


def side_evidence(res: pd.DataFrame, alpha: float) -> dict[str, np.ndarray]:
    """Which partner's DE supports the change, without imputing missing p-values.

    Multiple-testing unit: the (cell type, gene) pseudobulk DE test. The ligand tests
    (sender, ligand gene) and receptor tests (receiver, receptor gene) used by the contrast's
    interactions are BH-adjusted together, each test counted once however many rows reuse
    it. A side *changes* when its padj <= ``alpha``; a side without a DE test (gene not
    tested) has no evidence (NaN), never p = 1. ``driver``: ``both`` (both sides change in
    the same direction), ``ligand`` / ``receptor`` (only that side), ``opposing``, ``none``.
    """
    units = pd.concat(
        [
            res[["source", "ligand_gene", "ligand_pvalue"]].set_axis(["ct", "g", "p"], axis=1),
            res[["target", "receptor_gene", "receptor_pvalue"]].set_axis(["ct", "g", "p"], axis=1),
        ],
        ignore_index=True,
    ).dropna(subset=["p"])
    units = units.drop_duplicates(["ct", "g"])
    units["padj"] = bh_adjust(units["p"].to_numpy(float))
    lookup = units.set_index(["ct", "g"])["padj"]

    def padj(ct_col, g_col):
        key = pd.MultiIndex.from_arrays([res[ct_col].astype(str), res[g_col].astype(str)])
        return lookup.reindex(key).to_numpy(float)

    lpadj = padj("source", "ligand_gene")
    rpadj = padj("target", "receptor_gene")
    sl = np.sign(res["ligand_log2fc"].to_numpy(float))
    sr = np.sign(res["receptor_log2fc"].to_numpy(float))
    ch_l = np.nan_to_num(lpadj, nan=1.0) <= alpha
    ch_r = np.nan_to_num(rpadj, nan=1.0) <= alpha
    driver = np.select(
        [ch_l & ch_r & (sl == sr), ch_l & ch_r, ch_l, ch_r],
        ["both", "opposing", "ligand", "receptor"],
        default="none",
    )
    return {"ligand_padj": lpadj, "receptor_padj": rpadj, "driver": driver}


def intersection_union_p(score, pvalue, lfc_l, p_l, lfc_r, p_r) -> np.ndarray:
    """p of "the interaction score and both partners change, all in the direction of the
    score": the largest of the per-sample p and the two DE p-values, a DE p counting as
    ``2 - p`` (clipped to 1) when its log2FC points the other way. NaN when a partner was not
    tested (no evidence is not imputed)."""
    s = np.sign(np.asarray(score, float))

    def directional(lfc, p):
        p = np.asarray(p, float)
        agree = np.sign(np.asarray(lfc, float)) == s
        return np.where(agree, p, np.minimum(2 - p, 1.0))

    out = np.maximum.reduce(
        [np.asarray(pvalue, float), directional(lfc_l, p_l), directional(lfc_r, p_r)]
    )
    return np.where(s == 0, 1.0, out)


def _side(names, de_ct: pd.DataFrame, expr_prop: float, prefix: str, group_col: str):
    """Per (cell type, complex) where every subunit is expressed: the limiting subunit's DE
    stats (smallest |shrunk log2FC|); NaN DE stats when a subunit has no DE test."""
    ex = pd.DataFrame({prefix: pd.unique(np.asarray(names, dtype=object))})
    ex["gene"] = ex[prefix].str.split(COMPLEX_SEP)
    ex = ex.explode("gene")
    n_sub = ex.groupby(prefix)["gene"].nunique()
    m = ex.merge(de_ct, on="gene", how="inner")
    if m.empty:
        return pd.DataFrame(columns=[group_col, prefix])
    grp = m.groupby(["cell_type", prefix])
    m = m[grp["gene"].transform("nunique").to_numpy() == n_sub.loc[m[prefix]].to_numpy()]
    m = m[m.groupby(["cell_type", prefix])["prop"].transform("min") >= expr_prop]
    # a subunit without a DE test sorts first: the side then has no DE evidence
    m = m.assign(_abs=m["lfc_shrunk"].abs().fillna(-1.0)).sort_values("_abs", kind="mergesort")
    m = m.groupby(["cell_type", prefix], sort=False).head(1)
    return m.rename(
        columns={
            "cell_type": group_col,
            "gene": f"{prefix}_gene",
            "log2fc": f"{prefix}_log2fc",
            "lfc_shrunk": f"{prefix}_log2fc_shrunk",
            "pvalue": f"{prefix}_pvalue",
            "prop": f"{prefix}_prop",
        }
    )[
        [
            group_col,
            prefix,
            f"{prefix}_gene",
            f"{prefix}_log2fc",
            f"{prefix}_log2fc_shrunk",
            f"{prefix}_pvalue",
            f"{prefix}_prop",
        ]
    ]


def prior_sd(log2fc) -> float:
    """Sd of the zero-centred normal prior on the log2FCs of one contrast (DESeq2's
    betaPrior rule: the 95% quantile of |MLE log2FC| matched to a normal's; Love 2014)."""
    from scipy.stats import norm

    lfc = np.abs(np.asarray(log2fc, dtype=float))
    lfc = lfc[np.isfinite(lfc)]
    if lfc.size == 0:
        return float("nan")
    return float(max(np.quantile(lfc, 0.95), 1e-3) / norm.isf(0.025))


def shrink_log2fc(d: pd.DataFrame, *, shrink: bool = True) -> np.ndarray:
    """Posterior-mean log2FCs of one contrast under the prior of :func:`prior_sd`:
    ``lfc * tau^2 / (tau^2 + lfcse^2)``, so noisy fold changes of weakly expressed genes go
    towards 0 (as DESeq2 ``lfcShrink(type="normal")``). Without an ``lfcse`` column (or with
    ``shrink=False``) the MLE log2FCs; a missing ``lfcse`` value gives 0 (no evidence)."""
    lfc = pd.to_numeric(d["log2fc"], errors="coerce").to_numpy(dtype=float)
    if not shrink or "lfcse" not in d:
        return lfc
    se = pd.to_numeric(d["lfcse"], errors="coerce").to_numpy(dtype=float)
    tau2 = prior_sd(lfc) ** 2
    out = lfc * tau2 / (tau2 + se**2)
    return np.where(np.isfinite(out), out, 0.0)


def differential_interactions(
    de: pd.DataFrame,
    resource: pd.DataFrame,
    props: pd.DataFrame,
    *,
    samples: SampleMeans,
    expr_prop: float = 0.1,
    alpha: float = 0.05,
    curated: pd.DataFrame | None = None,
    shrink: bool = True,
) -> pd.DataFrame:
    """Differential LR interactions of every (condition, reference) contrast of ``de``.

    ``de``: the analyses stage's pseudobulk table (cell_type, gene, condition, reference,
    log2fc, pvalue, ...). ``props``: :func:`expression_props` (condition, cell_type, gene,
    prop). ``samples``: :class:`SampleMeans` of the working AnnData (per-sample scores and
    abundances). Rows: every sender -> receiver pair of cell types in which both partners
    are expressed (``expr_prop`` in the condition or the reference). See the module
    docstring for the test, the partners' evidence and the call. Returns every tested row
    (no filtering), columns :data:`DIFF_COLUMNS`.
    """
    need = {"cell_type", "gene", "condition", "reference", "log2fc", "pvalue"}
    missing = need - set(de.columns)
    if missing:
        raise ValueError(f"DE table lacks column(s): {', '.join(sorted(missing))}")
    de = de.copy()
    for c in ("cell_type", "gene", "condition", "reference"):
        de[c] = de[c].astype(str)
    de = de[np.isfinite(pd.to_numeric(de["log2fc"], errors="coerce"))]
    props = props.copy()
    for c in ("cell_type", "gene", "condition"):
        props[c] = props[c].astype(str)
    out = []
    contrasts = de[["condition", "reference"]].drop_duplicates().itertuples(index=False)
    for cond, ref in contrasts:
        d = de[(de["condition"] == cond) & (de["reference"] == ref)]
        d = d.assign(lfc_shrunk=shrink_log2fc(d, shrink=shrink))
        d = d[["cell_type", "gene", "log2fc", "lfc_shrunk", "pvalue"]].astype(
            {"log2fc": float, "lfc_shrunk": float, "pvalue": float}
        )
        pc = props[props["condition"] == cond][["cell_type", "gene", "prop"]]
        pr = props[props["condition"] == ref][["cell_type", "gene", "prop"]]
        p = pc.merge(pr, on=["cell_type", "gene"], how="outer", suffixes=("_c", "_r"))
        p["prop"] = p[["prop_c", "prop_r"]].max(axis=1)
        # every expressed gene is a candidate; its DE stats where the DE table has them
        d = p[["cell_type", "gene", "prop"]].merge(d, on=["cell_type", "gene"], how="left")
        L = _side(resource["ligand"], d, expr_prop, "ligand", "source")
        R = _side(resource["receptor"], d, expr_prop, "receptor", "target")
        res = resource.merge(L, on="ligand").merge(R, on="receptor")
        known = set(samples.types)
        res = res[res["source"].isin(known) & res["target"].isin(known)].reset_index(drop=True)
        if res.empty:
            continue
        primary = sample_score_test(res, samples, cond, ref)
        for k, v in primary.items():
            res[k] = v
        for k, v in _abundance(res, samples, cond, ref).items():
            res[k] = v
        res["padj"] = bh_adjust(res["pvalue"].to_numpy(float))
        for k, v in side_evidence(res, alpha).items():
            res[k] = v
        res["pvalue_both"] = intersection_union_p(
            res["score"],
            res["pvalue"],
            res["ligand_log2fc"],
            res["ligand_pvalue"],
            res["receptor_log2fc"],
            res["receptor_pvalue"],
        )
        sgn = np.sign(res["score"].to_numpy(float))
        res["direction"] = np.where(sgn > 0, "up", np.where(sgn < 0, "down", "none"))
        res["called"] = (
            (res["padj"].fillna(1.0) <= alpha)
            & (res["driver"] == "both")
            & (np.sign(res["ligand_log2fc"].to_numpy(float)) == sgn)
        )
        res.insert(0, "reference", ref)
        res.insert(0, "condition", cond)
        out.append(res)
    if not out:
        res = pd.DataFrame(columns=DIFF_COLUMNS)
        res["curated"] = res["curated"].astype(bool)
        res["called"] = res["called"].astype(bool)
        return res
    res = pd.concat(out, ignore_index=True)
    res = annotate_curated(res, curated if curated is not None else _no_curated())
    return res[DIFF_COLUMNS].sort_values(["condition", "pvalue"], ignore_index=True)


def _no_curated() -> pd.DataFrame:
    return pd.DataFrame(columns=["ligand", "receptor", "curated_source"])


# ----------------------------------------------------------------------------- squidpy check
def ligrec_agreement(
    w, resource: pd.DataFrame, liana_res: pd.DataFrame, cfg, conditions: list[str], alpha=0.05
) -> pd.DataFrame:
    """squidpy ``ligrec`` per condition vs liana's CellPhoneDB component (single-gene pairs)."""
    import squidpy as sq
    from scipy.stats import spearmanr

    simple = resource[
        ~resource["ligand"].str.contains(COMPLEX_SEP)
        & ~resource["receptor"].str.contains(COMPLEX_SEP)
    ]
    simple = simple[simple["ligand"].isin(w.var_names) & simple["receptor"].isin(w.var_names)]
    interactions = simple.rename(columns={"ligand": "source", "receptor": "target"})
    n_perms = cfg.n_perms if cfg.n_perms > 0 else 100
    rows = []
    for cond in conditions:
        sub = w[(w.obs[schema.OBS_CONDITION] == cond).to_numpy()]
        counts = sub.obs[cfg.groupby].value_counts()
        types = counts.index[counts >= cfg.min_cells]
        if len(types) < 2 or interactions.empty:
            continue
        sub = sub[sub.obs[cfg.groupby].isin(types).to_numpy()].copy()
        sub.obs[cfg.groupby] = sub.obs[cfg.groupby].cat.remove_unused_categories()
        r = sq.gr.ligrec(
            sub,
            cluster_key=cfg.groupby,
            interactions=interactions,
            use_raw=False,
            n_perms=n_perms,
            seed=cfg.seed,
            threshold=cfg.expr_prop,
            corr_method=None,
            copy=True,
            n_jobs=1,
            show_progress_bar=False,
        )
        means = r["means"].stack([0, 1], future_stack=True).rename("sq_means")
        pvals = r["pvalues"].stack([0, 1], future_stack=True).rename("sq_pvals")
        sqd = pd.concat([means, pvals], axis=1).reset_index()
        sqd.columns = ["ligand", "receptor", "source", "target", "sq_means", "sq_pvals"]
        for c in KEY_COLS:
            sqd[c] = sqd[c].astype(str)
        lr = liana_res[liana_res["condition"] == cond]
        lr = lr[~lr["ligand"].str.contains(COMPLEX_SEP) & ~lr["receptor"].str.contains(COMPLEX_SEP)]
        merged = lr.merge(sqd, on=KEY_COLS, how="inner")
        tested = sqd[sqd["sq_pvals"].notna()]
        sig_s = set(map(tuple, tested.loc[tested["sq_pvals"] <= alpha, KEY_COLS].to_numpy()))
        if "cellphone_pvals" in lr:
            sig_l = set(map(tuple, lr.loc[lr["cellphone_pvals"] <= alpha, KEY_COLS].to_numpy()))
        else:  # no permutations: liana has no CellPhoneDB p-values
            sig_l = set()
        both = len(sig_l & sig_s)
        union = len(sig_l | sig_s)
        rho = np.nan
        if len(merged) > 2:
            rho = float(spearmanr(merged["lr_means"], merged["sq_means"]).statistic)
        rows.append(
            dict(
                condition=cond,
                n_compared=int(len(merged)),
                n_sig_liana=len(sig_l),
                n_sig_squidpy=len(sig_s),
                n_sig_both=both,
                jaccard=both / union if union else np.nan,
                spearman_means=rho,
                alpha=float(alpha),
                n_perms=int(n_perms),
            )
        )
        log.info(
            "crosstalk: ligrec check %s: liana/squidpy significant %d/%d, both %d "
            "(Jaccard %.2f), Spearman of means %.3f over %d interactions",
            cond,
            len(sig_l),
            len(sig_s),
            both,
            rows[-1]["jaccard"],
            rho,
            len(merged),
        )
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


# ----------------------------------------------------------------------------- stage
def run_crosstalk(adata, *, config=None, keep_all_diff: bool = False):
    """Run the crosstalk stage on an annotated atlas with the ``de`` table; returns ``adata``.

    With ``keep_all_diff`` every tested differential interaction (before the cut-offs) is
    stored too, as the table ``interactions_diff_all`` (``TABLE_INTERACTIONS_DIFF_ALL``;
    for scoring against planted truth; a build does not keep it).

    Writes
    ------
    The tables ``interactions`` (``TABLE_INTERACTIONS``), ``interactions_by_sample``
    (``TABLE_INTERACTIONS_BY_SAMPLE``), ``interactions_diff`` (``TABLE_INTERACTIONS_DIFF``),
    ``ligrec_agreement`` (``TABLE_LIGREC_AGREEMENT``) in ``uns[UNS_TABLES]`` (h5ad-safe)
    and the parameters in ``uns[params_key("crosstalk")]``.
    """
    cfg = _crosstalk_config(config)
    schema.require_obs(adata, cfg.groupby, schema.OBS_CONDITION, schema.OBS_SAMPLE)
    schema.require_table(adata, schema.TABLE_DE)
    timings: dict[str, float] = {}
    t0 = t = time.perf_counter()

    species = species_of(adata, from_genes=True)
    resource = load_resource(species, cfg.resource)
    resource_name = cfg.resource or DEFAULT_RESOURCE[species]
    curated = load_curated(species)
    w = working_adata(adata, _resource_genes(resource), cfg.groupby)
    conditions = condition_order(adata, w.obs[schema.OBS_CONDITION])
    log.info(
        "crosstalk: %d cells, %d cell types, %d conditions, resource %s (%d pairs, %d genes "
        "in atlas), %d permutations",
        w.n_obs,
        w.obs[cfg.groupby].nunique(),
        len(conditions),
        resource_name,
        len(resource),
        w.n_vars,
        cfg.n_perms,
    )
    timings["prepare"] = time.perf_counter() - t

    # 1. per condition
    t = time.perf_counter()
    liana_all = annotate_curated(liana_by_condition(w, resource, cfg, conditions), curated)
    interactions = keep_top(liana_all, cfg.top_n, "magnitude_rank")
    interactions = _select(interactions, INTERACTIONS_COLUMNS)
    timings["liana_conditions"] = time.perf_counter() - t
    log.info(
        "crosstalk: liana rank_aggregate: %d interactions over %d conditions, kept %d "
        "(top %d per condition by magnitude_rank + curated) in %.1fs",
        len(liana_all),
        len(conditions),
        len(interactions),
        cfg.top_n,
        timings["liana_conditions"],
    )

    # 2. per sample
    t = time.perf_counter()
    if cfg.by_sample:
        # only the LR pairs of the kept interactions: their scores per sample are what the
        # table stores; liana's cost grows with the number of pairs
        kept_pairs = interactions[["ligand", "receptor"]].drop_duplicates()
        by_sample = liana_by_sample(w, kept_pairs.reset_index(drop=True), cfg)
        kept = interactions[KEY_COLS].drop_duplicates()
        by_sample = by_sample.merge(kept, on=KEY_COLS, how="inner")
        by_sample = annotate_curated(by_sample, curated)
        by_sample = _select(by_sample, BY_SAMPLE_COLUMNS)
    else:
        by_sample = _select(pd.DataFrame(), BY_SAMPLE_COLUMNS)
    timings["liana_samples"] = time.perf_counter() - t
    log.info(
        "crosstalk: liana by sample: %d rows in %.1fs", len(by_sample), timings["liana_samples"]
    )

    # 3. differential
    t = time.perf_counter()
    de = get_table(adata, schema.TABLE_DE)
    props = expression_props(w, cfg.groupby)
    samples = SampleMeans.from_adata(w, cfg.groupby, cfg.min_cells)
    diff_all = differential_interactions(
        de,
        resource,
        props,
        samples=samples,
        expr_prop=cfg.expr_prop,
        alpha=cfg.diff_alpha,
        curated=curated,
    )
    diff = _keep_diff(diff_all, cfg)
    taus = {
        f"{c} vs {r}": round(prior_sd(g["log2fc"]), 4)
        for (c, r), g in de.groupby(["condition", "reference"], observed=True)
    }
    timings["differential"] = time.perf_counter() - t
    n_called = int(diff_all["called"].sum()) if len(diff_all) else 0
    drivers = diff_all.loc[diff_all["padj"] <= cfg.diff_alpha, "driver"].value_counts()
    log.info(
        "crosstalk: differential: %d interactions tested, %d with per-sample padj <= %.2f "
        "(driver: %s), %d called (both partners change), kept %d in %.1fs",
        len(diff_all),
        int(drivers.sum()),
        cfg.diff_alpha,
        ", ".join(f"{k} {v}" for k, v in drivers.items()) or "-",
        n_called,
        len(diff),
        timings["differential"],
    )

    # 4. squidpy check
    t = time.perf_counter()
    if cfg.ligrec_check:
        ref = _reference(adata, de, conditions)
        check = conditions if cfg.ligrec_all_conditions or ref is None else [ref]
        agreement = ligrec_agreement(w, resource, liana_all, cfg, check, alpha=cfg.alpha)
    else:
        agreement = pd.DataFrame(columns=AGREEMENT_COLUMNS)
    timings["ligrec_check"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    tables = {
        schema.TABLE_INTERACTIONS: interactions,
        schema.TABLE_INTERACTIONS_BY_SAMPLE: by_sample,
        schema.TABLE_INTERACTIONS_DIFF: diff,
        schema.TABLE_LIGREC_AGREEMENT: agreement,
    }
    if keep_all_diff:
        tables[schema.TABLE_INTERACTIONS_DIFF_ALL] = diff_all
    for name, df in tables.items():
        put_table(adata, name, df)
    record_params(
        adata,
        "crosstalk",
        {
            "species": species,
            "resource": str(resource_name),
            "n_resource_pairs": int(len(resource)),
            "groupby": cfg.groupby,
            "methods": "rank_aggregate: CellPhoneDB, Connectome, log2FC, NATMI, SingleCellSignalR",
            "n_perms": int(cfg.n_perms),
            "expr_prop": float(cfg.expr_prop),
            "min_cells": int(cfg.min_cells),
            "seed": int(cfg.seed),
            "conditions": list(conditions),
            "interactions_cutoff": f"top {cfg.top_n} per condition by magnitude_rank, plus curated",
            "by_sample_scope": (
                "rank_aggregate per sample on the ligand-receptor pairs of the kept interactions "
                "(ranks are relative to those pairs; lr_means / lrscore are per-pair values)"
            ),
            "top_n": int(cfg.top_n),
            "n_interactions_total": int(len(liana_all)),
            "diff_method": (
                "primary: per-sample lr_means (mean of the ligand's mean log-normalised "
                "expression in the sender and the receptor's in the receiver; complexes: "
                "lowest subunit), lr_means ~ condition + patient block (when a patient is seen "
                "in both states), limma-eBayes moderated t; score = condition coefficient; "
                "padj: BH over the rows of a contrast. Partners: pseudobulk DE p-values, "
                "never imputed; ligand_padj / receptor_padj: BH over the distinct (cell type, "
                "gene) DE tests the contrast's rows use, each once; driver = which partner "
                "changes (padj <= diff_alpha); called = padj <= diff_alpha and driver both in "
                "the direction of the score; pvalue_both = intersection-union p of the three. "
                "Abundance (per-sample fractions of sender / receiver) shown beside, not in "
                "the score"
            ),
            "diff_alpha": float(cfg.diff_alpha),
            "diff_units": {
                "pvalue/padj": "row = (sender, receiver, ligand, receptor) per contrast",
                "ligand_padj/receptor_padj": "(cell type, gene) DE test, each counted once",
            },
            "diff_paired": bool(diff_all["paired"].any()) if len(diff_all) else False,
            "n_diff_called": n_called,
            "diff_cutoff": (
                f"called, padj <= {cfg.diff_max_padj} or top {cfg.top_n} by |score| per "
                "condition, plus curated"
            ),
            "diff_max_padj": float(cfg.diff_max_padj),
            "diff_prior_sd": taus,
            "n_diff_total": int(len(diff_all)),
            "ligrec_alpha": float(cfg.alpha),
            "ligrec_conditions": list(agreement["condition"].astype(str)),
            "timings_s": {k: round(float(v), 3) for k, v in timings.items()},
        },
    )
    log.info(
        "crosstalk: done in %.1fs (prepare %.1f, liana conditions %.1f, liana samples %.1f, "
        "differential %.1f, ligrec %.1f)",
        timings["total"],
        timings["prepare"],
        timings["liana_conditions"],
        timings["liana_samples"],
        timings["differential"],
        timings["ligrec_check"],
    )
    return adata


def _reference(adata, de: pd.DataFrame, conditions: list[str]) -> str | None:
    ref = adata.uns.get(schema.UNS_REFERENCE_CONDITION)
    if ref is None and "reference" in de and len(de):
        ref = str(de["reference"].iloc[0])
    return str(ref) if ref is not None and str(ref) in conditions else None


def _select(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``df`` with exactly ``columns`` (missing ones added empty), rows kept."""
    out = df.copy()
    for c in columns:
        if c not in out.columns:
            out[c] = False if c == "curated" else ("" if c in KEY_COLS else np.nan)
    return out[columns].reset_index(drop=True)


def _keep_diff(diff: pd.DataFrame, cfg) -> pd.DataFrame:
    if diff.empty:
        return diff
    top = keep_top(diff, cfg.top_n, "score", ascending=False)
    sig = diff[(diff["padj"] <= cfg.diff_max_padj) | diff["called"]]
    out = pd.concat([top, sig], ignore_index=True).drop_duplicates(
        ["condition", "reference", *KEY_COLS]
    )
    return out[DIFF_COLUMNS].sort_values(["condition", "pvalue"], ignore_index=True)


# ----------------------------------------------------------------------------- directory
def _read_atlas(atlas_dir: Path):
    try:
        from atlas.store import read_atlas_adata
    except ImportError:
        read_atlas_adata = None
    if read_atlas_adata is not None:
        return read_atlas_adata(atlas_dir)
    import anndata as ad

    path = atlas_dir / schema.ATLAS_FILE
    if not path.is_file():
        raise FileNotFoundError(2, "no atlas here (run tme-atlas build first)", str(path))
    return ad.read_h5ad(path)


def _write_atlas(adata, atlas_dir: Path) -> None:
    try:
        from atlas.store import write_atlas
    except ImportError:
        write_atlas = None
    if write_atlas is not None:
        write_atlas(adata, atlas_dir)
        return
    from atlas.io import write_h5ad_atomic
    from atlas.tables import write_tables_csv

    write_h5ad_atomic(adata, atlas_dir / schema.ATLAS_FILE)
    write_tables_csv(adata, atlas_dir / schema.TABLES_DIR)


CROSSTALK_TABLES = (
    schema.TABLE_INTERACTIONS,
    schema.TABLE_INTERACTIONS_BY_SAMPLE,
    schema.TABLE_INTERACTIONS_DIFF,
    schema.TABLE_INTERACTIONS_DIFF_ALL,
    schema.TABLE_LIGREC_AGREEMENT,
)


def run_crosstalk_dir(atlas_dir, *, config=None, labels: str | None = None):
    """``tme-atlas crosstalk DIR``: run :func:`run_crosstalk` on the atlas in ``DIR``.

    Needs the ``de`` table (``tme-atlas analyse DIR``). Rewrites ``DIR/atlas.h5ad`` (and the
    read store) and writes ``DIR/tables/*.csv``.

    With ``labels`` (``--labels NAME``): the latest version of that curated label set stands
    in for ``obs["cell_type"]``, with the ``de`` table of ``tme-atlas analyse DIR --labels
    NAME`` for that version; the tables go to ``DIR/annotations/NAME/tables/v<N>/`` and the
    atlas is left as it is.
    """
    atlas_dir = Path(atlas_dir)
    cfg = _crosstalk_config(config)
    if labels is not None:
        from atlas.curation import check_version, parse_labels_arg, read_table

        labels, version = parse_labels_arg(labels)  # NAME or NAME@VERSION
        version = check_version(atlas_dir, labels, version)
        read_table(atlas_dir, labels, version, schema.TABLE_DE)  # analysed? before reading
    adata = _read_atlas(atlas_dir)
    if labels is not None:
        from preprocessing.curated import (
            load_curated_table,
            save_curated_tables,
            use_curated_labels,
        )

        if cfg.groupby != schema.OBS_CELL_TYPE:
            from atlas.errors import InputError

            raise InputError(f"crosstalk --labels: groupby must be {schema.OBS_CELL_TYPE!r}")
        version = use_curated_labels(adata, atlas_dir=atlas_dir, name=labels, version=version)
        load_curated_table(
            adata, atlas_dir=atlas_dir, name=labels, version=version, table=schema.TABLE_DE
        )
        run_crosstalk(adata, config=config)
        save_curated_tables(
            adata,
            atlas_dir=atlas_dir,
            name=labels,
            version=version,
            step="crosstalk",
            names=CROSSTALK_TABLES,
        )
        return adata
    schema.require_obs(adata, cfg.groupby)
    schema.require_table(adata, schema.TABLE_DE)
    run_crosstalk(adata, config=config)
    _write_atlas(adata, atlas_dir)
    return adata
