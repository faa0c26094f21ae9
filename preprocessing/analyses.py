"""Stage ``analyses``: composition, pseudobulk differential expression and programmes.

What the labs ask first: which cell types expand or shrink when resistance appears, and
which genes move in which cell type. Every condition is compared with a *reference*
condition (default: the sample sheet's first condition, ``uns[UNS_REFERENCE_CONDITION]``
or ``uns[UNS_CONDITION_ORDER][0]``).

Methods
-------
Composition (table ``composition``; per-sample table ``proportions``)
    propeller-style test (Phipson et al. 2022, *Bioinformatics* 38:4720): per-sample
    cell-type proportions with a pseudocount of 0.5 cells, logit transform, one linear
    model per cell type over all samples, ``~ patient + condition`` when patients are
    sampled in more than one condition (paired / repeated-measures design; the patient
    is a fixed block), else ``~ condition``; the residual variances are moderated across
    cell types with limma's empirical-Bayes prior (``squeezeVar``), giving moderated
    t-statistics (non-robust eBayes without trend; propeller defaults to robust). BH across
    cell types per contrast. ``log2fc`` is the log2 ratio of the mean proportions.
    ``Unassigned`` cells count in the totals but are not tested. Why not scCODA: it needs
    a tensorflow/numpyro stack that is not installed offline, takes minutes per model and
    reports credible effects, not p-values; propeller is an established frequentist
    method, takes milliseconds and handles the paired design as a block in its linear
    model. Being proportion-based, a large shift of one type moves the others slightly
    (compositional spill-over), which can occasionally be called for an abundant or
    low-variance type.

Pseudobulk differential expression (table ``de``)
    raw counts (``layers["counts"]``) summed per sample x cell type; groups with fewer
    than ``min_cells`` cells are skipped (logged and recorded in ``uns`` params); a cell
    type is tested in a contrast only with at least ``min_samples`` samples in both
    conditions. DESeq2 (``pydeseq2``): one ``DeseqDataSet`` per cell type over all the
    samples of that type with the design ``~ patient + condition`` when paired (a patient
    seen in more than one condition) else ``~ condition``, plus the sample-sheet columns
    listed in ``analyses.de_covariates`` (categorical; e.g. IGHV status, sex, lane) as
    ``~ patient + <covariates> + condition``; then one Wald test (``DeseqStats``) per
    condition vs reference. Covariates are validated over the compared samples (absent,
    empty, varying within a sample, single-valued or confounded with the condition:
    :class:`InputError`), and left out of one cell type's design (recorded) where they
    are constant among its samples, nested in the patients of a paired design (the
    patient block already removes them) or confounded there. Genes with fewer than
    ``min_gene_counts`` (10) total counts over the cell type's samples are not tested.
    ``log2fc`` is DESeq2's unshrunken MLE; ``padj`` BH with DESeq2's independent
    filtering (NaN for filtered-out genes / Cooks outliers, as in DESeq2). The GLM and
    dispersion fits run through :class:`preprocessing.deseq_fast.FastInference`, which
    runs stock pydeseq2's algorithms (its L-BFGS-B dispersion fits, IRLS, Wald test) for
    all genes at once and gives the same numbers as the stock per-gene backend on every
    gene (tested, low counts included) for ~1/13 of the CPU; ``engine="pydeseq2"`` uses
    the stock backend. With ``n_cpus`` > 1 cell types are fitted in parallel.
    ``Unassigned`` cells and cells of doublet-like clusters are left out.

Programmes (table ``programs``)
    the per-cell programme scores (``obs["score_*"]``) averaged per sample x cell type
    (groups with at least ``min_cells`` cells), then per cell type one linear model
    ``score ~ patient + condition`` (paired) or ``~ condition`` over all its samples,
    variances moderated across cell types x programmes (limma eBayes), moderated t per
    condition vs reference; BH across cell types x programmes per contrast.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import special, stats

from atlas import schema
from atlas.errors import InputError
from atlas.params import record_params
from atlas.stats import bh_adjust
from atlas.tables import put_table

from .log import get_logger

log = get_logger("analyses")

STAGE = "analyses"
PARAMS_KEY = schema.params_key(STAGE)
PSEUDOCOUNT = 0.5  # cells added per sample x cell type before the logit (propeller)
MIN_GENE_COUNTS = 10  # pseudobulk: genes with fewer total counts are not tested

COMPOSITION_COLUMNS = schema.TABLE_COLUMNS[schema.TABLE_COMPOSITION]
PROPORTIONS_COLUMNS = schema.TABLE_COLUMNS[schema.TABLE_PROPORTIONS]
DE_COLUMNS = schema.TABLE_COLUMNS[schema.TABLE_DE]
PROGRAMS_COLUMNS = schema.TABLE_COLUMNS[schema.TABLE_PROGRAMS]


# ======================================================================================
# helpers
# ======================================================================================
def _trigamma_inverse(x: float) -> float:
    """Inverse of the trigamma function (limma's Newton iteration)."""
    if x > 1e7:
        return 1.0 / np.sqrt(x)
    if x < 1e-6:
        return 1.0 / x
    y = 0.5 + 1.0 / x
    for _ in range(50):
        tri = special.polygamma(1, y)
        dif = tri * (1 - tri / x) / special.polygamma(2, y)
        y += dif
        if -dif / y < 1e-8:
            break
    return float(y)


def squeeze_var(s2: np.ndarray, df: np.ndarray) -> tuple[np.ndarray, float, float]:
    """limma's empirical-Bayes variance moderation (``fitFDist`` + ``squeezeVar``).

    Returns ``(posterior variances, prior df d0, prior variance s0^2)``; ``d0`` may be
    ``inf`` (all variances equal to the prior).
    """
    s2 = np.asarray(s2, float)
    df = np.asarray(df, float)
    ok = np.isfinite(s2) & (df > 0)
    if ok.sum() < 3:
        return s2.copy(), 0.0, float(np.nanmean(s2)) if ok.any() else np.nan
    s2o = np.maximum(s2[ok], 1e-5 * np.median(s2[ok][s2[ok] > 0]) if (s2[ok] > 0).any() else 1e-12)
    d = df[ok]
    z = np.log(s2o)
    e = z - special.digamma(d / 2) + np.log(d / 2)
    emean = float(e.mean())
    evar = float(((e - emean) ** 2).sum() / (len(e) - 1) - np.mean(special.polygamma(1, d / 2)))
    if evar > 0:
        d0 = 2 * _trigamma_inverse(evar)
        s0 = float(np.exp(emean + special.digamma(d0 / 2) - np.log(d0 / 2)))
    else:
        d0 = np.inf
        s0 = float(np.exp(emean))
    post = s2.copy()
    if np.isinf(d0):
        post[ok] = s0
    else:
        post[ok] = (d0 * s0 + df[ok] * s2[ok]) / (d0 + df[ok])
    return post, float(d0), s0


def _obs_str(adata, key: str) -> pd.Series:
    return adata.obs[key].astype(str)


def reference_condition(adata, reference: str | None = None) -> str:
    """The reference condition: ``reference`` if given, else the sheet's first condition."""
    available = available_conditions(adata)
    if reference is not None:
        if reference not in available:
            raise InputError(
                f"analyses: unknown reference condition {reference!r}; "
                f"available conditions: {', '.join(available)}"
            )
        return reference
    ref = adata.uns.get(schema.UNS_REFERENCE_CONDITION)
    if isinstance(ref, str) and ref in available:
        return ref
    return available[0]


def available_conditions(adata) -> list[str]:
    """Conditions present in ``adata``, in sample-sheet order where recorded."""
    schema.require_obs(adata, schema.OBS_CONDITION)
    cond = adata.obs[schema.OBS_CONDITION]
    present = list(pd.unique(cond.astype(str)))
    order = adata.uns.get(schema.UNS_CONDITION_ORDER)
    if order is not None:
        order = [str(c) for c in np.atleast_1d(order)]
        head = [c for c in order if c in present]
        return head + sorted(c for c in present if c not in head)
    if isinstance(cond.dtype, pd.CategoricalDtype):
        return [str(c) for c in cond.cat.categories if str(c) in present]
    return sorted(present)


def contrast_conditions(adata, reference: str, contrasts: Sequence[str] | None) -> list[str]:
    """Conditions to compare with ``reference`` (default: every other condition)."""
    available = available_conditions(adata)
    if contrasts is None or len(contrasts) == 0:
        return [c for c in available if c != reference]
    bad = [c for c in contrasts if c not in available]
    if bad:
        raise InputError(
            [
                f"analyses: unknown contrast condition {c!r}; "
                f"available conditions: {', '.join(available)}"
                for c in bad
            ]
        )
    out = []
    for c in contrasts:
        if c == reference:
            raise InputError(
                f"analyses: contrast condition {c!r} is the reference; "
                f"choose among: {', '.join(a for a in available if a != reference)}"
            )
        if c not in out:
            out.append(c)
    return out


def _sample_table(adata) -> pd.DataFrame:
    """One row per sample: sample_id, patient, condition."""
    schema.require_obs(adata, schema.OBS_SAMPLE, schema.OBS_CONDITION)
    cols = {
        schema.OBS_SAMPLE: _obs_str(adata, schema.OBS_SAMPLE).to_numpy(),
        schema.OBS_CONDITION: _obs_str(adata, schema.OBS_CONDITION).to_numpy(),
    }
    if schema.OBS_PATIENT in adata.obs:
        cols[schema.OBS_PATIENT] = _obs_str(adata, schema.OBS_PATIENT).to_numpy()
    else:  # every sample its own patient: unpaired
        cols[schema.OBS_PATIENT] = cols[schema.OBS_SAMPLE]
    df = pd.DataFrame(cols).drop_duplicates(schema.OBS_SAMPLE).set_index(schema.OBS_SAMPLE)
    return df[[schema.OBS_PATIENT, schema.OBS_CONDITION]]


def _design(
    meta: pd.DataFrame, reference: str, conditions: Sequence[str], *, block: bool | None = None
) -> tuple[pd.DataFrame, bool]:
    """Design matrix: intercept, one column per non-reference condition, patient block.

    The patient block is used when some patient is sampled in more than one of the
    conditions and the design stays full rank with >= 1 residual df (``block=None``),
    or as forced by ``block``.
    """
    cond = meta[schema.OBS_CONDITION].astype(str)
    cols = {"Intercept": np.ones(len(meta))}
    for c in conditions:
        if c != reference:
            cols[f"cond_{c}"] = (cond == c).to_numpy(float)
    base = pd.DataFrame(cols, index=meta.index)
    pat = meta[schema.OBS_PATIENT].astype(str)
    if block is None:
        block = bool((meta.groupby(pat)[schema.OBS_CONDITION].nunique() > 1).any())
    if not block:
        return base, False
    patients = sorted(pd.unique(pat))
    blk = pd.DataFrame(
        {f"patient_{p}": (pat == p).to_numpy(float) for p in patients[1:]}, index=meta.index
    )
    X = pd.concat([base, blk], axis=1)
    rank = np.linalg.matrix_rank(X.to_numpy())
    if rank < X.shape[1] or X.shape[0] - X.shape[1] < 1:
        return base, False
    return X, True


def _sample_level_columns(adata) -> list[str]:
    """obs columns holding one value per sample (the sample sheet's, among others)."""
    sm = _obs_str(adata, schema.OBS_SAMPLE)
    out = []
    for c in adata.obs.columns:
        if c == schema.OBS_SAMPLE or not (
            isinstance(adata.obs[c].dtype, pd.CategoricalDtype) or adata.obs[c].dtype == object
        ):
            continue
        if (adata.obs[c].astype(str).groupby(sm.to_numpy()).nunique() <= 1).all():
            out.append(str(c))
    return out


def sample_covariates(
    adata, names: Sequence[str], reference: str, conditions: Sequence[str]
) -> pd.DataFrame:
    """Per-sample values of the sample-sheet columns ``names`` (DE covariates), validated.

    One row per sample (index ``sample_id``), one string column per covariate. Raises
    :class:`InputError`, one line per problem, when a column is not in ``obs`` (the
    sheet's columns are carried there), is part of the design already, is empty for
    some sample or varies within a sample, takes one value over the samples of
    ``conditions``, or is confounded with the condition over those samples (intercept +
    condition + covariate indicators not of full rank).
    """
    names = list(names)
    if not names:
        return pd.DataFrame(index=_sample_table(adata).index)
    samples = _sample_table(adata)
    problems: list[str] = []
    sm = _obs_str(adata, schema.OBS_SAMPLE).to_numpy()
    cols: dict[str, pd.Series] = {}
    for name in names:
        where = f"analyses.de_covariates: sample-sheet column {name!r}"
        if name in (schema.OBS_SAMPLE, schema.OBS_PATIENT, schema.OBS_CONDITION):
            problems.append(f"{where} is already in the design; list other columns")
            continue
        if name not in adata.obs:
            have = _sample_level_columns(adata)
            problems.append(
                f"{where} is not in the sample sheet (sample-level columns: "
                f"{', '.join(have) if have else 'none'})"
            )
            continue
        raw = adata.obs[name]
        vals = raw.astype(str).where(raw.notna(), "")
        vals = vals.str.strip()
        empty = sorted(set(sm[(vals == "").to_numpy() | (vals == "nan").to_numpy()]))
        if empty:
            problems.append(f"{where} is empty for sample(s) {', '.join(empty[:5])}")
            continue
        per = vals.groupby(sm).nunique()
        mixed = sorted(per.index[per > 1])
        if mixed:
            problems.append(
                f"{where} varies within sample(s) {', '.join(mixed[:5])}; a covariate is "
                "one value per sample"
            )
            continue
        cols[name] = vals.groupby(sm).first().reindex(samples.index)
    cov = pd.DataFrame(cols, index=samples.index)
    used = samples[samples[schema.OBS_CONDITION].isin(conditions)]
    if len(cols) and len(used):
        base, _ = _design(used, reference, conditions, block=False)
        for name in cols:
            v = cov.loc[used.index, name]
            levels = sorted(pd.unique(v))
            where = f"analyses.de_covariates: sample-sheet column {name!r}"
            if len(levels) < 2:
                problems.append(
                    f"{where} takes the single value {levels[0]!r} over the samples "
                    f"compared; nothing to adjust for"
                )
                continue
            X = base.assign(
                **{f"_{i}": (v == lvl).to_numpy(float) for i, lvl in enumerate(levels[1:])}
            )
            if np.linalg.matrix_rank(X.to_numpy()) < X.shape[1]:
                by = used.assign(_v=v.to_numpy()).groupby("_v")[schema.OBS_CONDITION]
                detail = "; ".join(f"{lvl}: {', '.join(sorted(pd.unique(c)))}" for lvl, c in by)
                problems.append(
                    f"{where} is confounded with the condition ({detail}); its effect "
                    "cannot be told from the condition's"
                )
    if problems:
        raise InputError(problems)
    return cov


def _add_covariates(
    design: pd.DataFrame, meta: pd.DataFrame, cov: pd.DataFrame | None, paired: bool
) -> tuple[pd.DataFrame, list[str], dict[str, str]]:
    """Append covariate indicator columns (``cov_<name>_<level>``) to one cell type's design.

    A covariate is left out of this cell type's design (reason returned) when its
    samples show a single level, when it is nested in the patients of a paired design
    (the patient block already removes it), when it is confounded with the rest of the
    design or when no residual df would remain.
    """
    used: list[str] = []
    dropped: dict[str, str] = {}
    if cov is None or cov.shape[1] == 0:
        return design, used, dropped
    X = design
    sids = meta[schema.OBS_SAMPLE].astype(str).to_numpy()
    for name in cov.columns:
        v = pd.Series(cov[name].reindex(sids).to_numpy(), index=meta.index).astype(str)
        levels = sorted(pd.unique(v))
        if len(levels) < 2:
            dropped[name] = f"one level ({levels[0]}) among these samples"
            continue
        if paired and (v.groupby(meta[schema.OBS_PATIENT].astype(str)).nunique() <= 1).all():
            dropped[name] = "constant within each patient: absorbed by the patient block"
            continue
        X2 = X.assign(**{f"cov_{name}_{lvl}": (v == lvl).to_numpy(float) for lvl in levels[1:]})
        if np.linalg.matrix_rank(X2.to_numpy()) < X2.shape[1]:
            dropped[name] = "confounded with condition/patient among these samples"
            continue
        if X2.shape[0] - X2.shape[1] < 1:
            dropped[name] = "no residual degree of freedom left"
            continue
        X = X2
        used.append(name)
    return X, used, dropped


def _formula(paired: bool, covariates: Sequence[str]) -> str:
    return "~" + " + ".join([*(["patient"] if paired else []), *covariates, "condition"])


def is_paired(meta: pd.DataFrame, reference: str, conditions: Sequence[str]) -> bool:
    """Whether the design over ``meta``'s samples uses the patient block."""
    return _design(meta, reference, conditions)[1]


@dataclass
class LinearFit:
    """Least-squares fit of every column of ``Y`` on one design (limma ``lmFit`` style)."""

    beta: np.ndarray  # k x G
    s2: np.ndarray  # residual (or moderated) variance per column
    df: float  # degrees of freedom of the t statistics
    unscaled: np.ndarray  # (X'X)^-1
    columns: list[str]
    prior_df: float = 0.0

    def t_test(self, coef: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(estimate, t, two-sided p)`` of coefficient ``coef`` for every column."""
        j = self.columns.index(coef)
        est = self.beta[j]
        se = np.sqrt(self.s2 * self.unscaled[j, j])
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(se > 0, est / se, np.where(est == 0, 0.0, np.inf * np.sign(est)))
        return est, t, 2 * stats.t.sf(np.abs(t), self.df)


def linear_fit(X: pd.DataFrame, Y: np.ndarray, *, moderate: bool = False) -> LinearFit:
    """OLS of each column of ``Y`` (n x G) on ``X``; ``moderate``: limma's eBayes variances."""
    Xv = X.to_numpy(float)
    Y = np.asarray(Y, float).reshape(len(Xv), -1)
    dfres = Xv.shape[0] - Xv.shape[1]
    unscaled = np.linalg.pinv(Xv.T @ Xv)
    beta = unscaled @ Xv.T @ Y
    s2 = ((Y - Xv @ beta) ** 2).sum(axis=0) / dfres
    if not moderate:
        return LinearFit(beta, s2, float(dfres), unscaled, list(X.columns))
    post, d0, _ = squeeze_var(s2, np.full(len(s2), float(dfres)))
    pooled = float(dfres * len(s2))
    df = min(dfres + d0, pooled) if np.isfinite(d0) else pooled
    return LinearFit(beta, post, float(df), unscaled, list(X.columns), prior_df=float(d0))


# ======================================================================================
# composition
# ======================================================================================
def sample_proportions(adata, groupby: str = schema.OBS_CELL_TYPE) -> pd.DataFrame:
    """Per-sample counts and proportions of each cell type (table ``proportions``).

    Every sample x cell-type pair appears (``n = 0`` where absent).
    """
    schema.require_obs(adata, groupby)
    samples = _sample_table(adata)
    ct = _obs_str(adata, groupby)
    tab = pd.crosstab(_obs_str(adata, schema.OBS_SAMPLE), ct)
    tab = tab.reindex(index=samples.index, fill_value=0)
    long = tab.stack().rename("n_cells").reset_index()
    long.columns = [schema.OBS_SAMPLE, schema.COL_CELL_TYPE, "n_cells"]
    totals = tab.sum(axis=1)
    long["n_total"] = long[schema.OBS_SAMPLE].map(totals).astype(np.int64)
    long["n_cells"] = long["n_cells"].astype(np.int64)
    long["prop"] = long["n_cells"] / long["n_total"].clip(lower=1)
    long[schema.OBS_PATIENT] = long[schema.OBS_SAMPLE].map(samples[schema.OBS_PATIENT])
    long[schema.OBS_CONDITION] = long[schema.OBS_SAMPLE].map(samples[schema.OBS_CONDITION])
    return long[PROPORTIONS_COLUMNS]


def malignant_mask(adata, groupby: str = schema.OBS_CELL_TYPE) -> np.ndarray:
    """Boolean mask of malignant cells: the per-cell call ``obs["malignant"]``
    (:data:`~atlas.schema.OBS_MALIGNANT`) when present, else the CLL labels of the
    annotation (``groupby`` values starting with ``CLL``)."""
    if schema.OBS_MALIGNANT in adata.obs:
        return schema.flag_column(adata, schema.OBS_MALIGNANT)
    lab = _obs_str(adata, groupby)
    return lab.str.startswith(schema.CLL_LABEL_PREFIX).to_numpy()


def compare_tme_composition(
    adata,
    reference: str,
    contrasts: Sequence[str],
    *,
    groupby: str = schema.OBS_CELL_TYPE,
    moderate: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Composition of the microenvironment among NON-malignant cells, plus the malignant
    fraction of all cells as its own row (:data:`~atlas.schema.MALIGNANT_ROW`).

    In CLL blood 50-99% of cells are leukaemic: proportions over all cells move with the
    tumour burden alone. Both parts use the propeller-style test of
    :func:`compare_composition` (paired when patients are sampled in several conditions;
    the sample's ``tissue`` as a covariate when the samples span several tissues).
    Column ``compartment``: ``tme`` or ``malignant``. Returns ``(composition,
    proportions, info)``; the proportions are over non-malignant cells, the malignant row
    over all cells.
    """
    mal = malignant_mask(adata, groupby)
    props_tme = sample_proportions(adata[~mal], groupby)
    # samples without non-malignant cells still count (all zero)
    props_all = sample_proportions(adata, groupby)
    samples = props_all.drop_duplicates(schema.OBS_SAMPLE).set_index(schema.OBS_SAMPLE)
    mal_by_sample = (
        pd.Series(mal, index=_obs_str(adata, schema.OBS_SAMPLE).to_numpy())
        .groupby(level=0)
        .sum()
        .reindex(samples.index, fill_value=0)
    )
    rows = []
    for sid, r in samples.iterrows():
        n_mal = int(mal_by_sample[sid])
        for name, n in ((schema.MALIGNANT_ROW, n_mal), ("_rest", int(r["n_total"]) - n_mal)):
            rows.append(
                {
                    schema.OBS_SAMPLE: sid,
                    schema.COL_CELL_TYPE: name,
                    "n_cells": n,
                    "n_total": int(r["n_total"]),
                    "prop": n / max(int(r["n_total"]), 1),
                    schema.OBS_PATIENT: r[schema.OBS_PATIENT],
                    schema.OBS_CONDITION: r[schema.OBS_CONDITION],
                }
            )
    props_mal = pd.DataFrame(rows)[PROPORTIONS_COLUMNS]
    tissue = _sample_tissue(adata)
    comp_tme, info = compare_composition(
        props_tme, reference, contrasts, moderate=moderate, covariates=tissue
    )
    comp_mal, _ = compare_composition(
        props_mal, reference, contrasts, exclude=("_rest",), moderate=False, covariates=tissue
    )
    comp_tme["compartment"] = "tme"
    comp_mal["compartment"] = "malignant"
    comp = pd.concat([comp_mal, comp_tme], ignore_index=True)[COMPOSITION_COLUMNS]
    info["n_malignant"] = int(mal.sum())
    info["malignant_source"] = (
        schema.OBS_MALIGNANT if schema.OBS_MALIGNANT in adata.obs else f"{groupby} CLL labels"
    )
    return comp, props_tme, info


def _sample_tissue(adata) -> pd.Series | None:
    """Per-sample tissue when the samples span more than one (a composition covariate)."""
    if schema.OBS_TISSUE not in adata.obs:
        return None
    t = (
        pd.DataFrame(
            {
                "s": _obs_str(adata, schema.OBS_SAMPLE).to_numpy(),
                "t": _obs_str(adata, schema.OBS_TISSUE).to_numpy(),
            }
        )
        .drop_duplicates("s")
        .set_index("s")["t"]
    )
    return t if t.nunique() > 1 else None


def compare_composition(
    props: pd.DataFrame,
    reference: str,
    contrasts: Sequence[str],
    *,
    exclude: Sequence[str] = (schema.UNASSIGNED,),
    moderate: bool = True,
    covariates: pd.Series | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """propeller-style composition test on a ``proportions`` table.

    ``covariates``: a per-sample categorical (e.g. tissue) added to the design as
    indicator columns. Returns ``(composition table, info)``; ``info`` says whether the
    patient block was used.
    """
    conds = [reference, *contrasts]
    sub = props[props[schema.OBS_CONDITION].isin(conds)]
    counts = sub.pivot_table(
        index=schema.OBS_SAMPLE, columns=schema.COL_CELL_TYPE, values="n_cells", aggfunc="sum"
    ).fillna(0)
    meta = (
        sub.drop_duplicates(schema.OBS_SAMPLE)
        .set_index(schema.OBS_SAMPLE)[[schema.OBS_PATIENT, schema.OBS_CONDITION]]
        .loc[counts.index]
    )
    info: dict[str, Any] = {"paired": False, "prior_df": np.nan, "n_samples": int(len(meta))}
    cell_types = [c for c in counts.columns if c not in set(exclude)]
    empty = pd.DataFrame(columns=COMPOSITION_COLUMNS)
    if counts.empty or not cell_types:
        return empty, info
    total = counts.sum(axis=1).to_numpy(float)
    raw = counts.to_numpy(float) / np.maximum(total, 1)[:, None]
    pseudo = (counts.to_numpy(float) + PSEUDOCOUNT) / (total + PSEUDOCOUNT * counts.shape[1])[
        :, None
    ]
    y_all = np.log(pseudo / (1 - pseudo))
    X, paired = _design(meta, reference, conds)
    if covariates is not None:
        cov = covariates.reindex(meta.index).astype(str)
        for lvl in sorted(pd.unique(cov))[1:]:
            col = (cov == lvl).to_numpy(float)
            X2 = X.assign(**{f"cov_{lvl}": col})
            if np.linalg.matrix_rank(X2.to_numpy()) == X2.shape[1]:
                X = X2
        info["covariates"] = [c for c in X.columns if c.startswith("cov_")]
    info["paired"] = paired
    n, k = X.shape
    dfres = n - k
    present = [c for c in contrasts if (meta[schema.OBS_CONDITION] == c).any()]
    if dfres < 1 or not (meta[schema.OBS_CONDITION] == reference).any() or not present:
        log.warning("composition: too few samples for a test (%d samples, %d parameters)", n, k)
        return empty, info
    idx = [list(counts.columns).index(c) for c in cell_types]
    fit = linear_fit(X, y_all[:, idx], moderate=moderate)
    info["prior_df"] = fit.prior_df
    info["df_total"] = fit.df
    cond = meta[schema.OBS_CONDITION].to_numpy()
    rows = []
    for c in present:
        _, t, p = fit.t_test(f"cond_{c}")
        padj = bh_adjust(p)
        in_c, in_r = cond == c, cond == reference
        for g, ctype in enumerate(cell_types):
            col = idx[g]
            m, mr = raw[in_c, col].mean(), raw[in_r, col].mean()
            eps = 1e-6
            rows.append(
                {
                    schema.COL_CELL_TYPE: ctype,
                    schema.COL_CONDITION: c,
                    schema.COL_REFERENCE: reference,
                    "mean_prop": m,
                    "mean_prop_ref": mr,
                    schema.COL_LOG2FC: float(np.log2((m + eps) / (mr + eps))),
                    schema.COL_PVALUE: float(p[g]),
                    schema.COL_PADJ: float(padj[g]),
                    "n_samples": int(in_c.sum() + in_r.sum()),
                    "n_samples_cond": int(in_c.sum()),
                    "n_samples_ref": int(in_r.sum()),
                    "t": float(t[g]),
                    "paired": bool(paired),
                }
            )
    return pd.DataFrame(rows, columns=COMPOSITION_COLUMNS), info


# ======================================================================================
# pseudobulk
# ======================================================================================
@dataclass
class Pseudobulk:
    """Summed raw counts per sample x cell type (groups with >= ``min_cells`` cells)."""

    counts: pd.DataFrame  # rows: "<cell_type>|<sample>", columns: genes (int64)
    meta: pd.DataFrame  # same rows: cell_type, sample_id, patient, condition, n_cells
    skipped: pd.DataFrame = field(default_factory=pd.DataFrame)  # groups under min_cells


def _counts_matrix(adata):
    if schema.LAYER_COUNTS in adata.layers:
        return adata.layers[schema.LAYER_COUNTS]
    raise schema.MissingKeyError("layers", schema.LAYER_COUNTS)


def pseudobulk(
    adata,
    groupby: str = schema.OBS_CELL_TYPE,
    *,
    min_cells: int = 10,
    exclude: Sequence[str] = (schema.UNASSIGNED,),
) -> Pseudobulk:
    """Sum ``layers["counts"]`` per sample x ``groupby`` group."""
    schema.require_obs(adata, groupby)
    X = _counts_matrix(adata)
    samples = _sample_table(adata)
    ct = _obs_str(adata, groupby).to_numpy()
    sm = _obs_str(adata, schema.OBS_SAMPLE).to_numpy()
    keep = ~np.isin(ct, list(exclude))
    key = pd.Series(ct, dtype=object) + "|" + pd.Series(sm, dtype=object)
    codes, uniq = pd.factorize(key)
    codes = np.where(keep, codes, -1)
    rows = np.flatnonzero(codes >= 0)
    ind = sp.csr_matrix((np.ones(len(rows)), (codes[rows], rows)), shape=(len(uniq), adata.n_obs))
    summed = ind @ (X if sp.issparse(X) else np.asarray(X))
    summed = summed.toarray() if sp.issparse(summed) else np.asarray(summed)
    n_cells = np.asarray(ind.sum(axis=1)).ravel().astype(np.int64)
    parts = [u.split("|", 1) if isinstance(u, str) else ["", ""] for u in uniq]
    meta = pd.DataFrame(
        {
            schema.COL_CELL_TYPE: [p[0] for p in parts],
            schema.OBS_SAMPLE: [p[1] for p in parts],
            "n_cells": n_cells,
        },
        index=pd.Index([str(u) for u in uniq], name="group"),
    )
    meta[schema.OBS_PATIENT] = meta[schema.OBS_SAMPLE].map(samples[schema.OBS_PATIENT])
    meta[schema.OBS_CONDITION] = meta[schema.OBS_SAMPLE].map(samples[schema.OBS_CONDITION])
    used = meta["n_cells"] > 0
    ok = used & (meta["n_cells"] >= min_cells)
    skipped = meta[used & ~ok].reset_index(drop=True)
    if len(skipped):
        log.info(
            "pseudobulk: %d sample x cell-type groups under %d cells skipped: %s",
            len(skipped),
            min_cells,
            "; ".join(f"{r.cell_type}/{r.sample_id} ({r.n_cells})" for r in skipped.itertuples())[
                :2000
            ],
        )
    counts = pd.DataFrame(
        np.rint(summed[ok.to_numpy()]).astype(np.int64),
        index=meta.index[ok.to_numpy()],
        columns=adata.var_names.astype(str),
    )
    return Pseudobulk(counts=counts, meta=meta[ok], skipped=skipped)


def _run_deseq(
    counts: pd.DataFrame,
    design: pd.DataFrame,
    contrast_cols: dict[str, str],
    n_cpus: int = 1,
    engine: str = "fast",
) -> dict[str, pd.DataFrame]:
    """One DESeq2 fit, one Wald test per contrast column; results per contrast key.

    ``engine``: ``"fast"`` (:class:`preprocessing.deseq_fast.FastInference`: stock
    pydeseq2's algorithms run for all genes at once, same results, ~10x less CPU) or
    ``"pydeseq2"`` (``DefaultInference``, one scipy fit per gene).
    """
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.default_inference import DefaultInference
    from pydeseq2.ds import DeseqStats

    if engine == "fast":
        from .deseq_fast import FastInference

        inference = FastInference(n_cpus=n_cpus)
    elif engine == "pydeseq2":
        inference = DefaultInference(n_cpus=n_cpus)
    else:
        raise ValueError(f"unknown DESeq2 engine {engine!r}; use 'fast' or 'pydeseq2'")
    meta = pd.DataFrame(index=counts.index)
    meta["_"] = "x"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dds = DeseqDataSet(
            counts=counts,
            metadata=meta,
            design=design,
            refit_cooks=True,
            inference=inference,
            quiet=True,
        )
        dds.deseq2()
        out = {}
        for name, col in contrast_cols.items():
            vec = np.zeros(design.shape[1])
            vec[list(design.columns).index(col)] = 1.0
            ds = DeseqStats(dds, contrast=vec, inference=inference, quiet=True)
            ds.summary()
            out[name] = ds.results_df.copy()
    return out


def _deseq_job(ctype, cnt, design, contrast_cols, engine):
    """One cell type's fit (a joblib task): ``(ctype, results | None, error | None, s)``."""
    t0 = time.perf_counter()
    try:
        res = _run_deseq(cnt, design, contrast_cols, n_cpus=1, engine=engine)
    except Exception as e:  # one failing cell type must not sink the stage
        return ctype, None, f"{type(e).__name__}: {e}", time.perf_counter() - t0
    return ctype, res, None, time.perf_counter() - t0


def pseudobulk_de(
    adata,
    reference: str,
    contrasts: Sequence[str],
    *,
    groupby: str = schema.OBS_CELL_TYPE,
    min_cells: int = 10,
    min_samples: int = 2,
    min_gene_counts: int = MIN_GENE_COUNTS,
    n_cpus: int = 1,
    engine: str = "fast",
    cell_types: Sequence[str] | None = None,
    pb: Pseudobulk | None = None,
    covariates: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """DESeq2 on pseudobulks: every contrast condition vs ``reference``, per cell type.

    ``covariates``: per-sample categorical covariates (index ``sample_id``, one column
    each; :func:`sample_covariates`) added to every cell type's design where estimable
    (see :func:`_add_covariates`). ``n_cpus`` > 1 fits cell types in parallel (joblib).

    Returns ``(de table, info)``; ``info`` records skipped groups / contrasts, the design
    used per cell type, covariates left out per cell type, and fit seconds per type.
    """
    if pb is None:
        pb = pseudobulk(adata, groupby, min_cells=min_cells)
    conds = [reference, *contrasts]
    info: dict[str, Any] = {
        "skipped_groups": [
            f"{r.cell_type}|{r.sample_id}|{r.n_cells}" for r in pb.skipped.itertuples()
        ],
        "skipped_contrasts": [],
        "designs": {},
        "covariates_dropped": [],
        "n_genes_tested": {},
        "fit_seconds": {},
    }
    types = list(pd.unique(pb.meta[schema.COL_CELL_TYPE]))
    if len(pb.skipped):  # types with no group passing min_cells are reported as untested
        types += [t for t in pd.unique(pb.skipped[schema.COL_CELL_TYPE]) if t not in types]
    if cell_types is not None:
        types = [t for t in types if t in set(cell_types)]
    jobs = []
    setup: dict[str, tuple] = {}
    for ctype in sorted(types):
        m = pb.meta[
            (pb.meta[schema.COL_CELL_TYPE] == ctype) & pb.meta[schema.OBS_CONDITION].isin(conds)
        ]
        n_per = m[schema.OBS_CONDITION].value_counts()
        n_ref = int(n_per.get(reference, 0))
        testable = [c for c in contrasts if int(n_per.get(c, 0)) >= min_samples]
        for c in contrasts:
            if c not in testable or n_ref < min_samples:
                why = (
                    f"{ctype}: {c} vs {reference} not tested ({int(n_per.get(c, 0))} vs "
                    f"{n_ref} samples with >= {min_cells} cells; need {min_samples} each)"
                )
                info["skipped_contrasts"].append(why)
                log.info("pseudobulk DE: %s", why)
        if n_ref < min_samples or not testable:
            continue
        used = [reference, *testable]
        m = m[m[schema.OBS_CONDITION].isin(used)]
        design, paired = _design(m, reference, used)
        if design.shape[0] - design.shape[1] < 1:
            for c in testable:
                info["skipped_contrasts"].append(f"{ctype}: {c} vs {reference}: no residual df")
            continue
        design, cov_used, cov_dropped = _add_covariates(design, m, covariates, paired)
        for name, why in cov_dropped.items():
            info["covariates_dropped"].append(f"{ctype}: {name} ({why})")
            log.info("pseudobulk DE: %s: covariate %s left out (%s)", ctype, name, why)
        cnt = pb.counts.loc[m.index]
        genes = cnt.columns[cnt.sum(axis=0).to_numpy() >= min_gene_counts]
        if len(genes) == 0:
            continue
        cnt = cnt[genes]
        info["designs"][ctype] = _formula(paired, cov_used)
        info["n_genes_tested"][ctype] = int(len(genes))
        setup[ctype] = (m, testable, n_per, n_ref, paired)
        jobs.append((ctype, cnt, design, {c: f"cond_{c}" for c in testable}, engine))
    if n_cpus > 1 and len(jobs) > 1:
        from joblib import Parallel, delayed

        results = Parallel(n_jobs=min(n_cpus, len(jobs)))(delayed(_deseq_job)(*j) for j in jobs)
    else:
        results = [_deseq_job(*j) for j in jobs]
    frames = []
    for ctype, res, err, secs in results:
        m, testable, n_per, n_ref, paired = setup[ctype]
        info["fit_seconds"][ctype] = round(float(secs), 3)
        if res is None:
            log.warning("pseudobulk DE: %s failed (%s); skipped", ctype, err)
            info["skipped_contrasts"].append(f"{ctype}: DESeq2 failed ({err.split(':')[0]})")
            continue
        log.debug(
            "pseudobulk DE: %s, %d samples, %d genes, %s: %.1fs",
            ctype,
            len(m),
            info["n_genes_tested"][ctype],
            info["designs"][ctype],
            secs,
        )
        for c, r in res.items():
            frames.append(
                pd.DataFrame(
                    {
                        schema.COL_CELL_TYPE: ctype,
                        schema.COL_GENE: r.index.astype(str),
                        schema.COL_CONDITION: c,
                        schema.COL_REFERENCE: reference,
                        schema.COL_LOG2FC: r["log2FoldChange"].to_numpy(float),
                        "lfcse": r["lfcSE"].to_numpy(float),
                        schema.COL_PVALUE: r["pvalue"].to_numpy(float),
                        schema.COL_PADJ: r["padj"].to_numpy(float),
                        "base_mean": r["baseMean"].to_numpy(float),
                        "n_samples_cond": int(n_per.get(c, 0)),
                        "n_samples_ref": n_ref,
                        "paired": bool(paired),
                    }
                )
            )
    de = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=DE_COLUMNS)
    return de[DE_COLUMNS], info


# ======================================================================================
# programmes
# ======================================================================================
def compare_programs(
    adata,
    reference: str,
    contrasts: Sequence[str],
    *,
    groupby: str = schema.OBS_CELL_TYPE,
    min_cells: int = 10,
    min_samples: int = 2,
    exclude: Sequence[str] = (schema.UNASSIGNED,),
) -> pd.DataFrame | None:
    """Programme scores compared per cell type on sample means; ``None`` without scores.

    Sample means of each ``obs["score_*"]`` per sample x cell type (groups with at least
    ``min_cells`` cells); per cell type one linear model ``~ patient + condition``
    (paired) or ``~ condition`` over the reference and every condition with at least
    ``min_samples`` samples; residual variances moderated across all cell type x
    programme fits (limma eBayes); BH per contrast.
    """
    scores = schema.score_columns(adata.obs.columns)
    if not scores:
        log.info(
            "programmes: no %s* columns in the atlas; comparison skipped", schema.OBS_SCORE_PREFIX
        )
        return None
    samples = _sample_table(adata)
    df = adata.obs[scores].astype(float).copy()
    df["_ct"] = _obs_str(adata, groupby).to_numpy()
    df["_s"] = _obs_str(adata, schema.OBS_SAMPLE).to_numpy()
    df = df[~df["_ct"].isin(list(exclude))]
    g = df.groupby(["_ct", "_s"], observed=True)
    means = g[scores].mean()
    sizes = g.size()
    means = means[sizes >= min_cells].reset_index()
    means[schema.OBS_PATIENT] = means["_s"].map(samples[schema.OBS_PATIENT])
    means[schema.OBS_CONDITION] = means["_s"].map(samples[schema.OBS_CONDITION])
    # one linear model per cell type over the reference and every testable condition
    fits = []
    for ctype, sub in means.groupby("_ct", observed=True):
        n_per = sub[schema.OBS_CONDITION].value_counts()
        testable = [c for c in contrasts if int(n_per.get(c, 0)) >= min_samples]
        if int(n_per.get(reference, 0)) < min_samples or not testable:
            continue
        m = sub[sub[schema.OBS_CONDITION].isin([reference, *testable])].set_index("_s")
        X, paired = _design(m, reference, [reference, *testable])
        if X.shape[0] - X.shape[1] < 1:
            continue
        Y = m[scores].to_numpy(float)
        fits.append((ctype, m, Y, testable, paired, linear_fit(X, Y)))
    if not fits:
        return pd.DataFrame(columns=PROGRAMS_COLUMNS)
    # limma eBayes: residual variances moderated across all cell type x programme fits
    s2 = np.concatenate([f[-1].s2 for f in fits])
    dfs = np.concatenate([np.full(len(scores), f[-1].df) for f in fits])
    post, d0, _ = squeeze_var(s2, dfs)
    pooled = float(dfs.sum())
    rows = []
    for n, (ctype, m, Y, testable, paired, fit) in enumerate(fits):
        sl = slice(n * len(scores), (n + 1) * len(scores))
        df_total = min(fit.df + d0, pooled) if np.isfinite(d0) else pooled
        fit = LinearFit(fit.beta, post[sl], df_total, fit.unscaled, fit.columns, d0)
        cond = m[schema.OBS_CONDITION].to_numpy()
        for c in testable:
            est, _, pvals = fit.t_test(f"cond_{c}")
            in_c, in_r = cond == c, cond == reference
            for k, sc in enumerate(scores):
                rows.append(
                    {
                        schema.COL_CELL_TYPE: ctype,
                        "program": sc[len(schema.OBS_SCORE_PREFIX) :],
                        schema.COL_CONDITION: c,
                        schema.COL_REFERENCE: reference,
                        "mean": float(Y[in_c, k].mean()),
                        "mean_ref": float(Y[in_r, k].mean()),
                        "diff": float(est[k]),
                        schema.COL_PVALUE: float(pvals[k]),
                        schema.COL_PADJ: np.nan,
                        "n_samples": int(in_c.sum() + in_r.sum()),
                        "n_samples_cond": int(in_c.sum()),
                        "n_samples_ref": int(in_r.sum()),
                        "paired": bool(paired),
                    }
                )
    out = pd.DataFrame(rows, columns=PROGRAMS_COLUMNS)
    for c in contrasts:
        sel = out[schema.COL_CONDITION] == c
        out.loc[sel, schema.COL_PADJ] = bh_adjust(out.loc[sel, schema.COL_PVALUE].to_numpy())
    return out


# ======================================================================================
# the stage
# ======================================================================================
def _as_config(config):
    from atlas.config import AnalysesConfig, Config

    if config is None:
        return AnalysesConfig()
    if isinstance(config, Config):
        return config.analyses
    if isinstance(config, AnalysesConfig):
        return config
    raise TypeError(f"config must be Config or AnalysesConfig, not {type(config).__name__}")


def run_analyses(
    adata,
    *,
    config=None,
    reference: str | None = None,
    contrasts: Sequence[str] | None = None,
    groupby: str = schema.OBS_CELL_TYPE,
    de_engine: str | None = None,
):
    """Run composition, pseudobulk DE and programme comparisons on an annotated atlas.

    Parameters
    ----------
    adata
        Annotated atlas: ``obs`` ``sample_id``, ``patient``, ``condition``, ``cell_type``
        (or ``groupby``), ``layers["counts"]`` raw counts, optional ``obs["score_*"]``
        and ``obs["doublet_like_cluster"]`` (those cells are left out).
    config
        :class:`~atlas.config.Config` or its ``analyses`` section (reference, contrasts,
        min_cells, min_samples, n_cpus, de_covariates, de_engine); default
        ``AnalysesConfig()``. ``de_covariates`` are validated before anything runs
        (:func:`sample_covariates`; :class:`InputError` naming the column).
    reference, contrasts
        Override ``config``; default reference: ``uns["tme_reference_condition"]``, else
        the sheet's first condition (``uns["tme_condition_order"][0]``); default
        contrasts: every other condition. Unknown names raise :class:`InputError`.
    groupby
        ``obs`` column of cell labels (``"cell_type"``; the truth tests pass another).
    de_engine
        Overrides ``config.de_engine``: ``"fast"`` (vectorised backend, same results as
        stock pydeseq2) or ``"pydeseq2"`` (stock per-gene backend).

    Returns
    -------
    AnnData
        ``adata``, with the tables and parameters below (read them back with
        :func:`atlas.tables.get_table`).

    Writes
    ------
    The tables ``proportions`` (``TABLE_PROPORTIONS``), ``composition``
    (``TABLE_COMPOSITION``), ``de`` (``TABLE_DE``) and ``programs`` (``TABLE_PROGRAMS``,
    only with score columns) in ``uns[UNS_TABLES]`` (h5ad-safe, via
    :func:`atlas.tables.put_table`) and ``uns[params_key("analyses")]``: reference,
    contrasts, thresholds, methods, the design per cell type, skipped sample x cell-type
    groups and untested contrasts, timings.
    """
    cfg = _as_config(config)
    if groupby == schema.OBS_CELL_TYPE:
        schema.require_obs(adata, groupby)
    elif groupby not in adata.obs:
        raise InputError(f"analyses: no obs column {groupby!r} to group cells by")
    schema.require_obs(adata, schema.OBS_SAMPLE, schema.OBS_CONDITION)
    ref = reference_condition(adata, reference if reference is not None else cfg.reference)
    cons = contrast_conditions(adata, ref, contrasts if contrasts is not None else cfg.contrasts)
    full = adata
    if schema.OBS_DOUBLET_CLUSTER in adata.obs:
        flagged = schema.flag_column(adata, schema.OBS_DOUBLET_CLUSTER)
        if flagged.any():
            log.info("analyses: %d cells of doublet-like clusters left out", int(flagged.sum()))
            adata = adata[~flagged]
    if not cons:
        raise InputError(
            f"analyses: only one condition ({ref!r}); nothing to compare with the reference"
        )
    de_engine = de_engine if de_engine is not None else cfg.de_engine
    covariates = sample_covariates(adata, cfg.de_covariates, ref, [ref, *cons])
    log.info("analyses: reference %s; contrasts %s", ref, ", ".join(cons))
    if cfg.de_covariates:
        log.info("analyses: DE covariates %s", ", ".join(cfg.de_covariates))
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    comp, props, comp_info = compare_tme_composition(adata, ref, cons, groupby=groupby)
    timings["composition"] = time.perf_counter() - t0
    n_sig = int((comp[schema.COL_PADJ] < 0.1).sum()) if len(comp) else 0
    log.info(
        "composition: %d cell types x %d contrasts, %s design, %d at FDR 10%%",
        comp[schema.COL_CELL_TYPE].nunique() if len(comp) else 0,
        len(cons),
        "paired" if comp_info["paired"] else "unpaired",
        n_sig,
    )

    t0 = time.perf_counter()
    de, de_info = pseudobulk_de(
        adata,
        ref,
        cons,
        groupby=groupby,
        min_cells=cfg.min_cells,
        min_samples=cfg.min_samples,
        n_cpus=cfg.n_cpus,
        engine=de_engine,
        covariates=covariates if cfg.de_covariates else None,
    )
    timings["de"] = time.perf_counter() - t0
    log.info(
        "pseudobulk DE: %d cell types, %d tests, %d at padj < 0.05 (%.1fs)",
        len(de_info["designs"]),
        len(de),
        int((de[schema.COL_PADJ] < 0.05).sum()) if len(de) else 0,
        timings["de"],
    )

    t0 = time.perf_counter()
    progs = compare_programs(
        adata, ref, cons, groupby=groupby, min_cells=cfg.min_cells, min_samples=cfg.min_samples
    )
    timings["programs"] = time.perf_counter() - t0

    tables = {schema.TABLE_PROPORTIONS: props, schema.TABLE_COMPOSITION: comp, schema.TABLE_DE: de}
    if progs is not None:
        tables[schema.TABLE_PROGRAMS] = progs
    for name, df in tables.items():
        put_table(full, name, df)
    record_params(
        full,
        STAGE,
        {
            "reference": ref,
            "contrasts": list(cons),
            "groupby": groupby,
            "min_cells": int(cfg.min_cells),
            "min_samples": int(cfg.min_samples),
            "min_gene_counts": int(MIN_GENE_COUNTS),
            "composition_method": (
                "propeller-style: logit(proportion, pseudocount 0.5 cells), linear model "
                + ("~ patient + condition" if comp_info["paired"] else "~ condition")
                + ", limma empirical-Bayes moderated t across cell types, BH per contrast"
            ),
            "composition_paired": bool(comp_info["paired"]),
            "composition_prior_df": float(comp_info.get("prior_df", np.nan)),
            "de_method": (
                "pseudobulk (sum of raw counts per sample x cell type), pydeseq2 Wald test, "
                "one fit per cell type, BH with independent filtering per contrast"
            ),
            "de_engine": de_engine,
            "de_covariates": list(cfg.de_covariates),
            "de_covariate_levels": {c: sorted(pd.unique(covariates[c])) for c in cfg.de_covariates},
            "de_covariates_dropped": list(de_info["covariates_dropped"]),
            "de_designs": [f"{k}: {v}" for k, v in de_info["designs"].items()],
            "de_skipped_groups": list(de_info["skipped_groups"]),
            "de_skipped_contrasts": list(de_info["skipped_contrasts"]),
            "programs_method": (
                "sample-mean score per cell type, linear model ~ patient + condition (paired) "
                "or ~ condition, limma empirical-Bayes moderated t, BH per contrast"
            ),
            "programs_skipped": progs is None,
            "timings_s": {k: float(v) for k, v in timings.items()},
        },
    )
    return full


ANALYSES_TABLES = (
    schema.TABLE_PROPORTIONS,
    schema.TABLE_COMPOSITION,
    schema.TABLE_DE,
    schema.TABLE_PROGRAMS,
)


def run_analyse_dir(atlas_dir: str | Path, *, config=None, labels: str | None = None):
    """``tme-atlas analyse DIR``: read ``DIR/atlas.h5ad``, run :func:`run_analyses`,
    write ``DIR/tables/*.csv``, the read store and ``DIR/atlas.h5ad`` atomically
    (:func:`atlas.store.write_atlas`). Raises :class:`~atlas.schema.MissingKeyError` for
    an atlas without ``obs["cell_type"]`` and :class:`InputError` for unknown conditions;
    nothing is rewritten then. Returns the AnnData written.

    With ``labels`` (``--labels NAME``, or ``NAME@N`` for version N): the latest version of
    that curated label set
    (:mod:`atlas.curation`) stands in for ``obs["cell_type"]`` and the tables go to
    ``DIR/annotations/NAME/tables/v<N>/`` (:mod:`preprocessing.curated`); the atlas, its
    store and ``DIR/tables/`` are left as they are.
    """
    from atlas.store import read_atlas_adata, write_atlas

    atlas_dir = Path(atlas_dir)
    if labels is not None:  # NAME or NAME@VERSION; unknown: before the atlas is read
        from atlas.curation import check_version, parse_labels_arg

        labels, version = parse_labels_arg(labels)
        version = check_version(atlas_dir, labels, version)
    adata = read_atlas_adata(atlas_dir)
    schema.require_obs(adata, schema.OBS_CELL_TYPE)
    if labels is not None:
        from preprocessing.curated import save_curated_tables, use_curated_labels

        version = use_curated_labels(adata, atlas_dir=atlas_dir, name=labels, version=version)
        run_analyses(adata, config=config)
        save_curated_tables(
            adata,
            atlas_dir=atlas_dir,
            name=labels,
            version=version,
            step="analyses",
            names=ANALYSES_TABLES,
        )
        return adata
    run_analyses(adata, config=config)
    write_atlas(adata, atlas_dir)
    log.info("analyses: wrote %s", atlas_dir / schema.TABLES_DIR)
    return adata


# ======================================================================================
# scoring against planted truth (simulator; tests and benchmarks)
# ======================================================================================
def _tme_truth(tc: pd.DataFrame, min_abs_log2: float = 0.3) -> pd.DataFrame:
    """The planted composition re-expressed among non-malignant types (what the
    composition table tests): direction from the change of each type's share of the
    non-malignant cells (``|log2| >= min_abs_log2``), CLL states dropped."""
    tc = tc[~tc["cell_type"].astype(str).str.startswith(schema.CLL_LABEL_PREFIX)].copy()
    share = tc["proportion"] / tc.groupby("condition")["proportion"].transform("sum")
    ref = tc.assign(_s=share)
    base = ref[ref["condition"] == ref["reference"]].set_index("cell_type")["_s"]
    lfc = np.log2(share.to_numpy() / base.reindex(tc["cell_type"]).to_numpy())
    tc["direction"] = np.where(np.abs(lfc) < min_abs_log2, "none", np.where(lfc > 0, "up", "down"))
    return tc


def score_against_truth(
    tables: dict[str, pd.DataFrame],
    truth: dict[str, pd.DataFrame],
    *,
    alpha_de: float = 0.05,
    alpha_comp: float = 0.1,
    min_abs_log2fc: float = 1.0,
    min_fraction: float = 0.5,
    min_samples: int = 3,
) -> dict[str, Any]:
    """Recovery of the simulator's planted truth (``preprocessing.simulate``).

    DE: planted rows with ``|log2fc| >= min_abs_log2fc`` in ``>= min_fraction`` of the
    type's cells whose cell type has ``>= min_samples`` samples per condition in the ``de``
    table (``n_samples_cond``/``n_samples_ref``) -- ``de_eligible``; ``de_recovered`` of them
    have the right sign and ``padj < alpha_de``. Nulls: planted null rows with
    ``padj < alpha_de`` (``de_null_fp`` / ``de_null_n``; untested = not called).
    Composition: ``comp_sign_ok`` / ``comp_shifted`` planted shifts with the right sign and
    ``padj < alpha_comp``; ``comp_stable_ok`` / ``comp_stable`` stable types not called.
    """
    out: dict[str, Any] = {}
    de = tables.get(schema.TABLE_DE)
    tde = truth.get("de")
    if de is not None and tde is not None:
        out.update(_score_de(de, tde, alpha_de, min_abs_log2fc, min_fraction, min_samples))
    comp = tables.get(schema.TABLE_COMPOSITION)
    tc = truth.get("composition")
    if comp is not None and tc is not None and len(comp):
        tc = _tme_truth(tc)
        tc = tc[tc["condition"] != tc["reference"]]
        mc = tc.merge(comp, on=[schema.COL_CELL_TYPE, schema.COL_CONDITION], how="inner")
        shifted = mc[mc["direction"] != "none"]
        stable = mc[mc["direction"] == "none"]
        sign = np.where(shifted["direction"] == "up", 1, -1)
        ok = (np.sign(shifted[schema.COL_LOG2FC]) == sign) & (shifted[schema.COL_PADJ] < alpha_comp)
        out.update(
            {
                "comp_shifted": int(len(shifted)),
                "comp_sign_ok": int(ok.sum()),
                "comp_sign_correct": int((np.sign(shifted[schema.COL_LOG2FC]) == sign).sum()),
                "comp_missed": [
                    f"{r.cell_type}|{r.condition}"
                    for r, h in zip(shifted.itertuples(), ok)
                    if not h
                ],
                "comp_stable": int(len(stable)),
                "comp_stable_ok": int((~(stable[schema.COL_PADJ] < alpha_comp)).sum()),
                "comp_stable_called": [
                    f"{r.cell_type}|{r.condition}"
                    for r in stable.itertuples()
                    if r.padj < alpha_comp
                ],
            }
        )
    return out


def _score_de(de, tde, alpha_de, min_abs_log2fc, min_fraction, min_samples) -> dict[str, Any]:
    key = [schema.COL_CELL_TYPE, schema.COL_GENE, schema.COL_CONDITION]
    m = tde.merge(de, on=key, how="left", suffixes=("_true", ""))
    pos = m[
        (m["kind"] == "planted")
        & (m["log2fc_true"].abs() >= min_abs_log2fc)
        & (m["fraction_affected"] >= min_fraction)
    ]
    types_ok = de[(de["n_samples_cond"] >= min_samples) & (de["n_samples_ref"] >= min_samples)]
    ok_pairs = set(zip(types_ok[schema.COL_CELL_TYPE], types_ok[schema.COL_CONDITION]))
    elig = pos[[(t, c) in ok_pairs for t, c in zip(pos[schema.COL_CELL_TYPE], pos["condition"])]]
    hit = (elig[schema.COL_PADJ] < alpha_de) & (
        np.sign(elig[schema.COL_LOG2FC]) == np.sign(elig["log2fc_true"])
    )
    nulls = m[m["kind"] == "null"]
    null_fp = nulls[schema.COL_PADJ] < alpha_de
    return {
        "de_eligible": int(len(elig)),
        "de_recovered": int(hit.sum()),
        "de_recovery": float(hit.mean()) if len(elig) else float("nan"),
        "de_missed": [
            f"{r.cell_type}|{r.gene}|{r.condition}" for r, h in zip(elig.itertuples(), hit) if not h
        ],
        "de_null_n": int(len(nulls)),
        "de_null_tested": int(nulls[schema.COL_PVALUE].notna().sum()),
        "de_null_fp": int(null_fp.sum()),
        "de_null_fp_rate": float(null_fp.mean()) if len(nulls) else float("nan"),
    }


def recovery_vs_ceiling(
    de: pd.DataFrame,
    de_ceiling: pd.DataFrame,
    truth_de: pd.DataFrame,
    *,
    alpha: float = 0.05,
    min_abs_log2fc: float = 1.0,
    min_fraction: float = 0.5,
    min_samples: int = 3,
) -> dict[str, Any]:
    """Planted DE recovered by ``de`` relative to a ceiling run (e.g. the true labels).

    The eligible effects are those of the ceiling run: ``|log2fc| >= min_abs_log2fc`` in
    ``>= min_fraction`` of the cells of a type tested there with ``>= min_samples``
    samples per condition. ``ratio`` = effects recovered by ``de`` (right sign,
    ``padj < alpha``; untested = missed) / effects recovered by the ceiling.
    """
    key = [schema.COL_CELL_TYPE, schema.COL_GENE, schema.COL_CONDITION]
    planted = truth_de[
        (truth_de["kind"] == "planted")
        & (truth_de[schema.COL_LOG2FC].abs() >= min_abs_log2fc)
        & (truth_de["fraction_affected"] >= min_fraction)
    ][[*key, schema.COL_LOG2FC]].rename(columns={schema.COL_LOG2FC: "log2fc_true"})

    def hits(table: pd.DataFrame) -> pd.DataFrame:
        m = planted.merge(table, on=key, how="left")
        m["hit"] = (m[schema.COL_PADJ] < alpha) & (
            np.sign(m[schema.COL_LOG2FC]) == np.sign(m["log2fc_true"])
        )
        return m

    ceil = hits(de_ceiling)
    ceil = ceil[(ceil["n_samples_cond"] >= min_samples) & (ceil["n_samples_ref"] >= min_samples)]
    own = hits(de).set_index(key)["hit"].reindex(pd.MultiIndex.from_frame(ceil[key]))
    own = own.fillna(False).to_numpy(bool)
    n_ceil = int(ceil["hit"].sum())
    lost = ceil["hit"].to_numpy() & ~own
    return {
        "eligible": int(len(ceil)),
        "recovered_ceiling": n_ceil,
        "recovered": int(own.sum()),
        "ratio": float(own.sum() / n_ceil) if n_ceil else float("nan"),
        "lost": [
            f"{r.cell_type}|{r.gene}|{r.condition}" for r, x in zip(ceil.itertuples(), lost) if x
        ],
    }
