"""Stage ``qc``: per-sample quality control and doublet detection.

Per sample (never across samples, whose depths differ):

* metrics: total counts, genes detected, % mitochondrial counts (``MT-`` for human,
  ``mt-`` for mouse);
* outliers: more than ``nmads_*`` median absolute deviations from the sample's median of
  log1p total counts, log1p genes (both sides) or % mito (upper side only);
* hard floors / ceilings: ``min_genes``, ``min_counts``, ``max_pct_mito``;
* doublets: ``scanpy.pp.scrublet`` on the raw counts of the sample's cells that are not
  low-quality (fixed random state; exact kNN; 5 simulated doublets per cell below 5,000
  cells, scrublet's default 2 from there). The expected rate follows the cells recovered
  in the sample (``doublet_rate_per_1k`` percent per 1,000 cells, 10x loading; or a fixed
  ``doublet_rate``); the threshold comes from the score distributions
  (:func:`doublet_threshold`: estimated FDR from the expected rate and from the singlets'
  own null, :func:`singlet_null_sf`), not a fixed fraction.

Flags are kept in ``.obs`` (:data:`~atlas.schema.OBS_QC_OUTLIER`,
:data:`~atlas.schema.OBS_QC_REASON`, :data:`~atlas.schema.OBS_DOUBLET_SCORE`,
:data:`~atlas.schema.OBS_PREDICTED_DOUBLET`, :data:`~atlas.schema.OBS_QC_PASS`); failing
cells are removed unless ``keep_all``. A sample left without cells is an
:class:`~atlas.errors.InputError` naming it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlas import schema
from atlas.errors import InputError
from atlas.params import record_params
from atlas.tables import put_table

from .log import get_logger
from .parallel import current_client, map_tasks

log = get_logger("qc")

MITO_PREFIX = {"human": "MT-", "mouse": "mt-"}
REASONS = (
    "low_counts",
    "high_counts",
    "low_genes",
    "high_genes",
    "high_mito",
    "doublet",
)
MAD_SCALE = 1.4826
SCRUBLET_N_PCS = 10
SCRUBLET_SIM_RATIO = 5.0  # small samples: more simulated doublets, a denser neighbourhood
# from this many cells a sample simulates scrublet's default 2 doublets per cell: the exact kNN
# is O(((1 + ratio) n)^2); on planted doublets (6k and 18k-cell samples, 5 samples) recall,
# precision and AUC were equal within 0.01 and scoring took a quarter of the time
SCRUBLET_LARGE_SAMPLE = 5000
SCRUBLET_SIM_RATIO_LARGE = 2.0
MIN_CELLS_SCRUBLET = 30  # scrublet needs a neighbourhood; smaller samples are not scored
PARAMS_KEY = schema.params_key("qc")


def _qc_config(config):
    from atlas.config import Config, QCConfig

    if config is None:
        return QCConfig()
    if isinstance(config, Config):
        return config.qc
    if isinstance(config, QCConfig):
        return config
    raise TypeError(f"config must be Config or QCConfig, not {type(config).__name__}")


def mito_mask(var_names, species: str) -> np.ndarray:
    """Mitochondrial genes: ``MT-`` (human) / ``mt-`` (mouse); falls back to either case."""
    names = pd.Index(var_names).astype(str)
    prefix = MITO_PREFIX.get(species, "MT-")
    mask = names.str.startswith(prefix)
    if not mask.any():
        mask = names.str.upper().str.startswith("MT-")
        if mask.any():
            log.warning(
                "no %s genes for species %s; using %d genes matching MT-/mt- in any case",
                prefix,
                species,
                int(mask.sum()),
            )
    return np.asarray(mask)


def compute_metrics(adata, species: str, counts_layer: str | None = schema.LAYER_COUNTS) -> None:
    """Add total counts, genes detected and % mito to ``adata.obs`` (from raw counts)."""
    X = adata.layers[counts_layer] if counts_layer and counts_layer in adata.layers else adata.X
    X = sp.csr_matrix(X)
    total = np.asarray(X.sum(axis=1)).ravel()
    n_genes = np.asarray((X > 0).sum(axis=1)).ravel()
    mt = mito_mask(adata.var_names, species)
    mt_counts = np.asarray(X[:, mt].sum(axis=1)).ravel() if mt.any() else np.zeros_like(total)
    with np.errstate(invalid="ignore", divide="ignore"):
        pct = np.where(total > 0, 100.0 * mt_counts / np.maximum(total, 1e-12), 0.0)
    adata.obs[schema.OBS_TOTAL_COUNTS] = total.astype(np.float64)
    adata.obs[schema.OBS_N_GENES] = np.asarray(n_genes, dtype=np.int64)
    adata.obs[schema.OBS_PCT_MITO] = pct.astype(np.float64)


def mad_bounds(values: np.ndarray, nmads: float) -> tuple[float, float]:
    """``median -/+ nmads * MAD``; the MAD is scaled by 1.4826 to estimate the standard
    deviation of normal data (as ``scater::isOutlier``). A zero MAD gives no bound."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return -np.inf, np.inf
    med = float(np.median(v))
    mad = MAD_SCALE * float(np.median(np.abs(v - med)))
    if mad == 0:
        return -np.inf, np.inf
    return med - nmads * mad, med + nmads * mad


def _flag_sample(obs: pd.DataFrame, cfg) -> pd.DataFrame:
    """Boolean reason columns for one sample's cells."""
    lc = np.log1p(obs[schema.OBS_TOTAL_COUNTS].to_numpy(dtype=float))
    lg = np.log1p(obs[schema.OBS_N_GENES].to_numpy(dtype=float))
    mt = obs[schema.OBS_PCT_MITO].to_numpy(dtype=float)
    lo_c, hi_c = mad_bounds(lc, cfg.nmads_counts)
    lo_g, hi_g = mad_bounds(lg, cfg.nmads_genes)
    _, hi_m = mad_bounds(mt, cfg.nmads_mito)
    flags = pd.DataFrame(index=obs.index)
    flags["low_counts"] = (lc < lo_c) | (obs[schema.OBS_TOTAL_COUNTS].to_numpy() < cfg.min_counts)
    flags["high_counts"] = lc > hi_c
    flags["low_genes"] = (lg < lo_g) | (obs[schema.OBS_N_GENES].to_numpy() < cfg.min_genes)
    flags["high_genes"] = lg > hi_g
    flags["high_mito"] = (mt > hi_m) | (mt > cfg.max_pct_mito)
    return flags


def scrublet_sim_ratio(n_cells: int) -> float:
    """Simulated doublets per observed cell for a sample of ``n_cells``."""
    return SCRUBLET_SIM_RATIO if n_cells < SCRUBLET_LARGE_SAMPLE else SCRUBLET_SIM_RATIO_LARGE


def expected_doublet_rate(n_cells: int, cfg) -> float:
    """Expected doublet fraction of a sample of ``n_cells`` recovered cells: the config's
    fixed ``doublet_rate`` or ``doublet_rate_per_1k`` percent per 1,000 cells (10x
    Chromium: ~0.8%), between 0.1% and 50%."""
    if cfg.doublet_rate is not None:
        return float(cfg.doublet_rate)
    return float(np.clip(cfg.doublet_rate_per_1k / 100.0 * n_cells / 1000.0, 0.001, 0.5))


def doublet_threshold(
    scores: np.ndarray,
    sim_scores: np.ndarray,
    rate: float,
    fdr: float,
    *,
    singlet_sf=None,
) -> float:
    """Lowest score threshold whose estimated false-discovery rate is at most ``fdr``.

    Two estimates of the false discoveries above a threshold ``t``, each conservative
    where the other is not; the smaller is used:

    * from the expected rate: the sample is expected to hold ``n * rate * S(t)`` true
      doublets above ``t``, where ``S(t)`` is the fraction of scrublet's simulated doublets
      scoring at least ``t`` (the detectable share); the observed cells above ``t``,
      ``N(t)``, exceed it by the false discoveries: ``max(0, N(t) - n rate S(t))``. Exact
      when many doublets are expected, but a small sample holding more doublets than its
      expectation (8 +- 3 at 1,000 cells) has its excess counted as false;
    * from the singlets' own distribution (``singlet_sf``, see
      :func:`singlet_null_sf`): ``n * P(singlet score >= t)``. Needs no rate, but the
      doublets themselves widen the fitted null, so it is conservative when they are many.

    ``FDR(t) = min(both) / N(t)``. The expected rate sets how many calls the distribution
    can support, the two score distributions where they lie (a fixed fraction ignores both;
    scrublet's histogram-valley threshold needs a bimodal distribution, absent in small
    samples). ``inf`` when no threshold qualifies.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    sim = np.sort(np.asarray(sim_scores, dtype=np.float64))
    n = s.size
    if n == 0 or sim.size == 0:
        return float("inf")
    cand = np.unique(s)
    n_above = n - np.searchsorted(s, cand, side="left")
    s_above = 1.0 - np.searchsorted(sim, cand, side="left") / sim.size
    false = np.maximum(0.0, n_above - n * rate * s_above)
    if singlet_sf is not None:
        false = np.minimum(false, n * singlet_sf(cand))
    est_fdr = false / n_above
    ok = np.flatnonzero(est_fdr <= fdr)
    return float(cand[ok[0]]) if ok.size else float("inf")


def scrublet_neighbours(n_cells: int) -> int:
    """scrublet's default neighbourhood size for ``n_cells`` observed cells (passed
    explicitly, so the score can be read back as a neighbour count)."""
    return max(1, round(0.5 * np.sqrt(n_cells)))


def singlet_null_sf(scores: np.ndarray, *, n_sim: int, rate: float, n_neighbors: int):
    """``P(singlet score >= t)`` from the simulated-neighbour counts of the observed cells.

    scrublet's score is a monotone function of ``d``, the number of simulated doublets among
    a cell's ``k_adj = round(n_neighbors (1 + r))`` neighbours (``r = n_sim / n``); inverted
    here, exactly. Almost all observed cells are singlets, so a beta-binomial fitted to their
    ``d`` by moments (over-dispersed: cell types differ in how many simulated doublets lie
    near them) is the singlets' null; its upper tail gives the expected singlets above a
    threshold. ``None`` when the scores are not scrublet's formula of whole counts.
    """
    from scipy import stats

    s = np.asarray(scores, dtype=np.float64)
    n = s.size
    if n < MIN_CELLS_SCRUBLET or n_sim <= 0 or not 0 < rate < 1:
        return None
    r = n_sim / n
    k_adj = round(n_neighbors * (1 + r))
    m = k_adj - 1  # the cell itself is not among its neighbours

    def counts(x):
        x = np.asarray(x, dtype=np.float64)
        q = x * (1 - rate) / (rate / r + x * (1 - rate - rate / r))
        return q * (k_adj + 2) - 1

    d = counts(s)
    if not np.all(np.isfinite(d)) or np.abs(d - np.round(d)).max() > 1e-3:
        return None
    d = np.clip(np.round(d), 0, m)
    mu, var = d.mean() / m, d.var()
    if not 0 < mu < 1 or m < 2:
        return None
    rho = float(np.clip((var / (m * mu * (1 - mu)) - 1) / (m - 1), 1e-6, 1 - 1e-6))
    ab = (1 - rho) / rho
    a, b = mu * ab, (1 - mu) * ab

    def sf(t):
        dt = np.clip(np.round(counts(t)), 0, m)
        return stats.betabinom.sf(dt - 1, m, a, b)

    return sf


def _scrublet_sample(
    counts, cfg, seed: int, n_recovered: int | None = None
) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Doublet scores / calls of one sample's cells (raw counts, cells x genes).

    Scores: ``scanpy.pp.scrublet`` on log-transformed counts with few principal components
    (more sensitive than the defaults on small samples), with the expected rate of a sample
    of ``n_recovered`` cells (default: the rows of ``counts``). Calls: scores at or above
    :func:`doublet_threshold` (estimated FDR ``doublet_fdr``).
    """
    import anndata as ad
    import scanpy as sc

    n = counts.shape[0]
    rate = expected_doublet_rate(n if n_recovered is None else n_recovered, cfg)
    a = ad.AnnData(X=sp.csr_matrix(counts, dtype=np.float32))
    a.obs_names = [str(i) for i in range(n)]
    a.var_names = [str(j) for j in range(counts.shape[1])]
    n_pcs = int(max(2, min(SCRUBLET_N_PCS, n - 1, counts.shape[1] - 1)))
    k = scrublet_neighbours(n)
    verbosity = sc.settings.verbosity
    try:
        sc.settings.verbosity = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.pp.scrublet(
                a,
                expected_doublet_rate=rate,
                sim_doublet_ratio=scrublet_sim_ratio(n),
                n_prin_comps=n_pcs,
                n_neighbors=k,
                log_transform=True,
                mean_center=True,
                normalize_variance=True,
                knn_dist_metric="euclidean",
                # exact kNN: pynndescent took ~50 s per 6k-cell sample (100k-cell build: QC
                # 14 min); a k-d tree in n_pcs dimensions takes seconds
                use_approx_neighbors=False,
                threshold=None,
                random_state=seed,
                verbose=False,
                copy=False,
            )
    finally:
        sc.settings.verbosity = verbosity
    score = a.obs[schema.OBS_DOUBLET_SCORE].to_numpy(dtype=np.float64)
    score = np.where(np.isfinite(score), score, 0.0)
    sim = np.asarray(a.uns["scrublet"]["doublet_scores_sim"], dtype=np.float64)
    null = singlet_null_sf(score, n_sim=sim.size, rate=rate, n_neighbors=k)
    thr = doublet_threshold(score, sim, rate, cfg.doublet_fdr, singlet_sf=null)
    called = score >= thr
    return score, called, (thr if np.isfinite(thr) else None)


def _scrublet_task(counts, cfg, seed: int, n_recovered: int, rows=None):
    """:func:`_scrublet_sample`, or the error's text (a task on a worker or here). With
    ``rows`` the sample's cells are sliced here, when the task runs (in this process only one
    sample's copy exists at a time; a worker gets its sample already sliced)."""
    try:
        if rows is not None:
            counts = counts[rows]
        return _scrublet_sample(counts, cfg, seed, n_recovered=n_recovered)
    except Exception as e:  # noqa: BLE001 - reported per sample by the caller
        return f"{e.__class__.__name__}: {e}"


def genes_detected(counts, rows: np.ndarray, *, block: int = 50_000) -> np.ndarray:
    """Per gene, the number of cells among ``rows`` (bool mask) with a non-zero count, in
    blocks of cells (no copy of the matrix; stored zeros do not count)."""
    counts = sp.csr_matrix(counts)
    out = np.zeros(counts.shape[1], dtype=np.int64)
    for a in range(0, counts.shape[0], block):
        b = min(a + block, counts.shape[0])
        sel = np.flatnonzero(rows[a:b]) + a
        if sel.size == 0:
            continue
        part = counts[sel]
        out += np.bincount(part.indices[part.data != 0], minlength=counts.shape[1])
    return out


def run_qc(
    adata,
    *,
    config=None,
    species: str | None = None,
    keep_all: bool = False,
    seed: int = 0,
    report_dir: str | Path | None = None,
):
    """QC ``adata`` (raw counts in ``layers["counts"]`` or ``X``) per sample.

    Returns the filtered AnnData (``adata`` itself with ``keep_all``). The flags of every
    cell, removed ones included, are written into ``adata.obs`` in place (the input keeps
    them for the report and for callers). With ``report_dir`` the QC report is written
    there (also when a sample has no cells left). Raises :class:`InputError` when a
    sample has no cells left.

    Writes
    ------
    ``obs``: ``total_counts``, ``n_genes_by_counts``, ``pct_counts_mt``, ``qc_outlier``,
    ``qc_reason``, ``doublet_score``, ``predicted_doublet``, ``qc_pass`` (schema
    ``OBS_TOTAL_COUNTS`` ... ``OBS_QC_PASS``); the table ``qc_summary``
    (``TABLE_QC_SUMMARY``) and ``uns[params_key("qc")]`` on the returned AnnData.
    """
    cfg = _qc_config(config)
    species = species or str(adata.uns.get(schema.UNS_SPECIES, "human"))
    compute_metrics(adata, species)
    counts = adata.layers[schema.LAYER_COUNTS] if schema.LAYER_COUNTS in adata.layers else adata.X
    counts = sp.csr_matrix(counts)
    samples = adata.obs[schema.OBS_SAMPLE].astype(str).to_numpy()
    order = list(dict.fromkeys(samples))
    flags = pd.DataFrame(False, index=adata.obs_names, columns=list(REASONS))
    score = np.full(adata.n_obs, np.nan)
    thresholds: dict[str, float | None] = {}
    tasks, task_idx = [], []
    local = current_client() is None
    for i, sid in enumerate(order):
        idx = np.flatnonzero(samples == sid)
        f = _flag_sample(adata.obs.iloc[idx], cfg)
        for c in f.columns:
            flags.iloc[idx, flags.columns.get_loc(c)] = f[c].to_numpy()
        if not cfg.doublets:
            continue
        low = (f["low_counts"] | f["low_genes"] | f["high_mito"]).to_numpy()
        cand = idx[~low]
        if cand.size < MIN_CELLS_SCRUBLET:
            log.warning(
                "sample '%s': %d good cells, too few for doublet detection (need %d)",
                sid,
                cand.size,
                MIN_CELLS_SCRUBLET,
            )
            continue
        if local:  # the whole matrix is shared; each task slices its sample when it runs
            tasks.append((counts, cfg, seed + i, idx.size, cand))
        else:
            tasks.append((counts[cand], cfg, seed + i, idx.size))
        task_idx.append((sid, cand))
    # scrublet per sample: on the build's dask workers when it has a cluster
    for (sid, cand), res in zip(task_idx, map_tasks(_scrublet_task, tasks, desc="qc")):
        if isinstance(res, str):  # a scrublet failure must not end a long build
            log.warning("sample '%s': doublet detection failed (%s); skipped", sid, res)
            continue
        s, called, thr = res
        score[cand] = s
        flags.iloc[cand, flags.columns.get_loc("doublet")] = called
        thresholds[sid] = thr

    outlier = flags[[c for c in REASONS if c != "doublet"]].any(axis=1).to_numpy()
    doublet = flags["doublet"].to_numpy()
    reason = [
        ";".join(c for c, v in zip(REASONS, row) if v) for row in flags[list(REASONS)].to_numpy()
    ]
    adata.obs[schema.OBS_QC_OUTLIER] = outlier
    adata.obs[schema.OBS_QC_REASON] = reason
    adata.obs[schema.OBS_DOUBLET_SCORE] = score
    adata.obs[schema.OBS_PREDICTED_DOUBLET] = doublet
    fail = outlier | (doublet & cfg.remove_doublets)
    adata.obs[schema.OBS_QC_PASS] = ~fail

    summary = qc_summary(adata.obs, flags, order, thresholds, cfg)
    empty = summary.loc[summary["n_cells_out"] == 0, schema.OBS_SAMPLE].tolist()
    obs_all = adata.obs.copy()
    report = None
    if report_dir is not None:
        report = write_qc_report(obs_all, summary, report_dir)
    if empty and not keep_all:
        raise InputError(
            [
                f"sample '{sid}': no cells left after QC (all {n} cells failed; "
                + (f"see {report}; " if report is not None else "")
                + "relax the qc settings or drop the sample)"
                for sid, n in zip(
                    empty, summary.set_index(schema.OBS_SAMPLE).loc[empty, "n_cells_in"]
                )
            ]
        )
    if empty:
        log.warning("samples with no cells passing QC (kept by --keep-all): %s", ", ".join(empty))

    keep = np.ones(adata.n_obs, dtype=bool) if keep_all else ~fail
    # genes seen in too few (kept) cells; counted in blocks of rows, then one copy of the
    # kept cells x genes (not a copy of the cells and then another of their genes)
    genes = np.ones(adata.n_vars, dtype=bool)
    if cfg.min_cells_gene > 0:
        genes = genes_detected(counts, keep) >= cfg.min_cells_gene
        if not genes.all():
            log.info(
                "dropping %d genes detected in fewer than %d cells",
                int((~genes).sum()),
                cfg.min_cells_gene,
            )
    out = adata if (keep.all() and genes.all()) else adata[keep, genes].copy()
    record_params(
        out,
        "qc",
        {
            "config": json.dumps(cfg.model_dump(mode="json"), sort_keys=True),
            "species": species,
            "mito_prefix": MITO_PREFIX.get(species, "MT-"),
            "keep_all": bool(keep_all),
            "doublet_method": (
                "scanpy.pp.scrublet per sample on raw counts of non-low-quality cells "
                f"(log_transform, {SCRUBLET_N_PCS} PCs, sim_doublet_ratio {SCRUBLET_SIM_RATIO}, "
                f"{SCRUBLET_SIM_RATIO_LARGE} from {SCRUBLET_LARGE_SAMPLE} cells; exact kNN); "
                "expected rate doublet_rate_per_1k percent per 1,000 cells of the sample "
                "(or a fixed doublet_rate); called: scores above the lowest threshold of "
                "estimated FDR <= doublet_fdr; false discoveries: the smaller of N(t) - n rate "
                "S(t) (S: simulated-doublet scores) and the beta-binomial singlet null of the "
                "simulated-neighbour counts"
            ),
            "mad": "median absolute deviation (x1.4826) of log1p counts, log1p genes, % mito",
            "scrublet_thresholds": json.dumps(thresholds, sort_keys=True),
        },
    )
    put_table(out, schema.TABLE_QC_SUMMARY, summary)
    n_in, n_out = adata.n_obs, int((~fail).sum())
    log.info(
        "QC: %d of %d cells pass (%.1f%%); %d outliers, %d predicted doublets%s",
        n_out,
        n_in,
        100.0 * n_out / max(n_in, 1),
        int(outlier.sum()),
        int(doublet.sum()),
        " (all kept: --keep-all)" if keep_all else "",
    )
    return out


def qc_summary(
    obs: pd.DataFrame,
    flags: pd.DataFrame,
    order: list[str],
    thresholds: dict | None = None,
    cfg=None,
) -> pd.DataFrame:
    """One row per sample (table ``qc_summary``).

    Columns: ``sample_id, n_cells_in, n_cells_out, n_low_quality`` (outliers),
    ``n_doublets`` (predicted), ``median_counts, median_genes`` (kept cells), then
    ``patient, condition, n_removed``, ``n_flag_<reason>`` per reason, medians before QC,
    ``median_pct_mito`` before / after, the doublet score threshold and the expected
    doublet rate (from the sample's cells recovered).
    """
    thresholds = thresholds or {}
    rows = []
    samples = obs[schema.OBS_SAMPLE].astype(str).to_numpy()
    passed = obs[schema.OBS_QC_PASS].to_numpy(dtype=bool)
    outlier = obs[schema.OBS_QC_OUTLIER].to_numpy(dtype=bool)
    doublet = obs[schema.OBS_PREDICTED_DOUBLET].to_numpy(dtype=bool)

    def med(values) -> float:
        return float(np.median(values)) if len(values) else float("nan")

    for sid in order:
        m = samples == sid
        o = obs.loc[m]
        kept = o.loc[passed[m]]
        row = {
            schema.OBS_SAMPLE: sid,
            "n_cells_in": int(m.sum()),
            "n_cells_out": int(passed[m].sum()),
            "n_low_quality": int(outlier[m].sum()),
            "n_doublets": int(doublet[m].sum()),
            "median_counts": med(kept[schema.OBS_TOTAL_COUNTS]),
            "median_genes": med(kept[schema.OBS_N_GENES]),
            schema.OBS_PATIENT: str(o[schema.OBS_PATIENT].iloc[0]) if len(o) else "",
            schema.OBS_CONDITION: str(o[schema.OBS_CONDITION].iloc[0]) if len(o) else "",
            "n_removed": int((~passed[m]).sum()),
        }
        f = flags.loc[m]
        for r in REASONS:
            row[f"n_flag_{r}"] = int(f[r].sum())
        row["median_counts_before"] = med(o[schema.OBS_TOTAL_COUNTS])
        row["median_genes_before"] = med(o[schema.OBS_N_GENES])
        row["median_pct_mito_before"] = med(o[schema.OBS_PCT_MITO])
        row["median_pct_mito"] = med(kept[schema.OBS_PCT_MITO])
        thr = thresholds.get(sid)
        row["doublet_threshold"] = float(thr) if thr is not None else float("nan")
        row["expected_doublet_rate"] = (
            expected_doublet_rate(int(m.sum()), cfg) if cfg is not None else float("nan")
        )
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- report
def write_qc_report(obs_all: pd.DataFrame, summary: pd.DataFrame, out_dir: str | Path) -> Path:
    """``out_dir/report.html`` (one self-contained plotly page) and ``out_dir/summary.csv``."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from atlas.io import atomic_write_text
    from atlas.tables import csv_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "summary.csv", csv_text(summary))

    order = summary[schema.OBS_SAMPLE].tolist()
    obs = obs_all.copy()
    obs["_sample"] = obs[schema.OBS_SAMPLE].astype(str)
    passed = obs[schema.OBS_QC_PASS].to_numpy(dtype=bool)
    figs = []

    metrics = [
        (schema.OBS_TOTAL_COUNTS, "total UMI counts (log10)", lambda v: np.log10(v + 1)),
        (schema.OBS_N_GENES, "genes detected (log10)", lambda v: np.log10(v + 1)),
        (schema.OBS_PCT_MITO, "% mitochondrial counts", lambda v: v),
    ]
    fig = make_subplots(
        rows=len(metrics), cols=1, subplot_titles=[m[1] for m in metrics], vertical_spacing=0.08
    )
    for r, (col, _title, tf) in enumerate(metrics, start=1):
        for label, mask, color in (
            ("before QC", np.ones(len(obs), bool), "#9e9e9e"),
            ("after QC", passed, "#1f77b4"),
        ):
            sub = obs.loc[mask]
            fig.add_trace(
                go.Violin(
                    x=sub["_sample"],
                    y=tf(sub[col].to_numpy(dtype=float)),
                    name=label,
                    legendgroup=label,
                    showlegend=(r == 1),
                    side="negative" if label == "before QC" else "positive",
                    line_color=color,
                    points=False,
                    spanmode="hard",
                    scalemode="width",
                    width=0.9,
                ),
                row=r,
                col=1,
            )
        fig.update_xaxes(categoryorder="array", categoryarray=order, row=r, col=1)
    fig.update_layout(
        title="Per-sample QC distributions, before and after filtering",
        violingap=0,
        violinmode="overlay",
        height=300 * len(metrics),
        template="plotly_white",
    )
    figs.append(fig)

    # cells kept / removed per sample, and removal reasons
    fig2 = go.Figure()
    fig2.add_bar(x=order, y=summary["n_cells_out"], name="kept", marker_color="#1f77b4")
    fig2.add_bar(x=order, y=summary["n_removed"], name="removed", marker_color="#d62728")
    fig2.update_layout(
        barmode="stack",
        title="Cells kept and removed per sample",
        yaxis_title="cells",
        template="plotly_white",
    )
    figs.append(fig2)
    fig3 = go.Figure()
    for r in REASONS:
        fig3.add_bar(x=order, y=summary[f"n_flag_{r}"], name=r)
    fig3.update_layout(
        barmode="group",
        title="Cells flagged per sample and reason (a cell can have several reasons)",
        yaxis_title="cells",
        template="plotly_white",
    )
    figs.append(fig3)

    # counts vs genes scatter coloured by status (subsampled)
    rng = np.random.default_rng(0)
    idx = np.arange(len(obs))
    if len(idx) > 20000:
        idx = np.sort(rng.choice(idx, 20000, replace=False))
    sub = obs.iloc[idx]
    status = np.where(
        sub[schema.OBS_QC_PASS].to_numpy(dtype=bool),
        "kept",
        np.where(sub[schema.OBS_PREDICTED_DOUBLET].to_numpy(dtype=bool), "doublet", "outlier"),
    )
    fig4 = go.Figure()
    for st, color in (("kept", "#1f77b4"), ("outlier", "#d62728"), ("doublet", "#ff7f0e")):
        m = status == st
        fig4.add_scattergl(
            x=sub.loc[m, schema.OBS_TOTAL_COUNTS],
            y=sub.loc[m, schema.OBS_N_GENES],
            mode="markers",
            name=st,
            marker={"size": 3, "color": color, "opacity": 0.6},
            text=sub.loc[m, "_sample"],
        )
    fig4.update_layout(
        title="UMI counts vs genes detected (all cells)",
        xaxis_type="log",
        yaxis_type="log",
        xaxis_title="total UMI counts",
        yaxis_title="genes detected",
        template="plotly_white",
    )
    figs.append(fig4)

    total_in = int(summary["n_cells_in"].sum())
    total_out = int(summary["n_cells_out"].sum())
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        "<title>CLL TME Atlas - QC report</title>",
        "<style>body{font-family:sans-serif;margin:2em;}table{border-collapse:collapse;"
        "font-size:0.85em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "</style></head><body>",
        "<h1>QC report</h1>",
        f"<p>{total_out} of {total_in} cells kept "
        f"({100.0 * total_out / max(total_in, 1):.1f}%) across {len(summary)} samples.</p>",
    ]
    for i, f in enumerate(figs):
        parts.append(f.to_html(full_html=False, include_plotlyjs=(i == 0), default_width="100%"))
    parts.append("<h2>Summary per sample</h2>")
    parts.append(summary.to_html(index=False, float_format=lambda v: f"{v:.3g}"))
    parts.append("</body></html>")
    path = out_dir / "report.html"
    atomic_write_text(path, "\n".join(parts))
    return path
