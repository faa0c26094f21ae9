"""QC: planted low-quality cells and doublets of the simulator are found; flags, report."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import shared_file

from atlas import schema
from atlas.errors import InputError

SUMMARY_COLUMNS = [
    "sample_id",
    "n_cells_in",
    "n_cells_out",
    "n_low_quality",
    "n_doublets",
    "median_counts",
    "median_genes",
]


def _raw(adata):
    a = adata.copy()
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    a.layers[schema.LAYER_COUNTS] = a.X.copy()
    a.uns[schema.UNS_SPECIES] = "human"
    return a


@pytest.fixture(scope="module")
def qc_small(small_sim):
    """run_qc on the small simulation, all cells kept (flags only)."""
    from atlas.tables import get_table
    from preprocessing.qc import run_qc

    a = _raw(small_sim.adata)
    out = run_qc(a, keep_all=True, seed=0)
    return out, get_table(out, schema.TABLE_QC_SUMMARY), a.obs


def test_planted_low_quality_cells_removed(qc_small):
    _, _, obs = qc_small
    lq = obs["low_quality"].to_numpy(bool)
    removed = ~obs[schema.OBS_QC_PASS].to_numpy(bool)
    assert lq.sum() >= 50
    recall = (removed & lq).sum() / lq.sum()
    print(f"low-quality removed: {recall:.3f} ({lq.sum()} planted)")
    assert recall >= 0.9
    # most good cells survive
    good = ~lq & ~obs["is_doublet"].to_numpy(bool)
    assert (removed & good).sum() / good.sum() < 0.1


@pytest.mark.parametrize(
    ("n_cells", "n_samples"),
    [
        (1000, 3),
        (5000, 1),
        (15000, 1),
    ],
)
def test_planted_doublets_at_10x_loading(n_cells, n_samples):
    """Doublets planted at 10x loading (0.8% per 1,000 cells: 0.8%, 4%, 12%), QC at its
    defaults: precision >= 0.7 on all calls; recall >= 0.7 on the doublets of two
    lineages. Doublets of one lineage (mostly CLL resting + activated, the same clone) are
    expression-homotypic, which no expression-based caller separates; their recall and the
    overall recall are printed. 1,000-cell samples plant ~8 doublets each, so three are
    pooled (each scored on its own)."""
    from preprocessing.qc import run_qc
    from preprocessing.simulate import doublet_kind, simulate

    sim = simulate(
        seed=3,
        n_patients=n_samples,
        conditions=("NAIVE", "IBR_RES"),
        cells_per_sample=n_cells,
        doublet_rate_per_1k=0.8,
    )
    a = _raw(sim.adata[sim.adata.obs["condition"] == "NAIVE"])
    from atlas.tables import get_table

    out = run_qc(a, keep_all=True, seed=0)
    summary, obs = get_table(out, schema.TABLE_QC_SUMMARY), out.obs
    db = obs["is_doublet"].to_numpy(bool)
    pair = obs["doublet_of"].map(doublet_kind).to_numpy()
    called = obs[schema.OBS_PREDICTED_DOUBLET].to_numpy(bool)
    assert db.mean() == pytest.approx(0.008 * n_cells / 1000, rel=0.35)
    assert summary["expected_doublet_rate"].to_numpy() == pytest.approx(0.008 * n_cells / 1000)
    precision = (called & db).sum() / max(called.sum(), 1)
    cross = pair == "cross"
    recall_cross = (called & cross).sum() / cross.sum()
    recall = (called & db).sum() / db.sum()
    same = pair == "same"
    recall_same = (called & same).sum() / max(same.sum(), 1)
    print(
        f"{n_cells} cells: {db.sum()} planted ({cross.sum()} two-lineage), {called.sum()} "
        f"called; precision {precision:.2f}, recall two-lineage {recall_cross:.2f}, "
        f"one-lineage {recall_same:.2f}, all {recall:.2f}"
    )
    assert precision >= 0.7
    assert recall_cross >= 0.7


@pytest.mark.realdata
def test_doublets_on_real_pbmc_are_few_and_mixed():
    """Kang 2018 PBMC (two 1,000-cell samples, demultiplexed): few calls (<= 2% of
    cells), and the called cells co-express a second lineage's markers (a heterotypic
    doublet's signature, which the caller does not read) far more than the rest."""
    import anndata as ad
    from scipy.stats import mannwhitneyu

    from preprocessing.qc import run_qc

    a = ad.read_h5ad(shared_file("kang2018_pbmc_ifnb_9kgenes.h5ad"))
    for key in (schema.OBS_SAMPLE, schema.OBS_PATIENT, schema.OBS_CONDITION):
        a.obs[key] = a.obs["condition"].astype(str)
    a = _raw(a)
    run_qc(a, keep_all=True, seed=0)
    called = a.obs[schema.OBS_PREDICTED_DOUBLET].to_numpy(bool)
    x = a.layers[schema.LAYER_COUNTS]
    lognorm = sp.diags(1e4 / np.asarray(x.sum(1)).ravel()) @ x
    lognorm = lognorm.log1p()
    lineages = {
        "T": ["CD3E", "CD3D", "CD2"],
        "monocyte": ["LYZ", "CD14", "FCGR3A", "S100A8"],
        "B": ["MS4A1", "CD79A", "CD19"],
        "NK": ["NKG7", "GNLY"],
    }
    score = np.column_stack(
        [
            np.asarray(lognorm[:, a.var_names.get_indexer(g)].mean(1)).ravel()
            for g in lineages.values()
        ]
    )
    q90 = np.quantile(score, 0.9, axis=0)
    second = np.sort(score / np.where(q90 > 0, q90, 1), axis=1)[:, -2]
    print(
        f"{called.sum()} of {called.size} called; second-lineage score median "
        f"{np.median(second[called]):.2f} vs {np.median(second[~called]):.2f}"
    )
    assert 1 <= called.sum() <= 0.02 * called.size
    assert np.median(second[called]) > np.quantile(second[~called], 0.75)
    assert mannwhitneyu(second[called], second[~called], alternative="greater").pvalue < 1e-3


def test_singlet_null_lets_a_small_sample_hold_more_doublets_than_expected():
    """A 1,000-cell sample with 10 saturated doublets where its rate expects 4: the
    expected-count estimate alone calls (almost) none, since it counts the excess as false;
    the singlet null (beta-binomial of the simulated-neighbour counts, read back from the
    scores) calls them, and no singlet."""
    from scipy import stats

    from preprocessing.qc import doublet_threshold, scrublet_neighbours, singlet_null_sf

    rng = np.random.default_rng(1)
    n, ratio, rate = 1000, 5.0, 0.004
    k = scrublet_neighbours(n)
    k_adj = round(k * (1 + ratio))
    m = k_adj - 1

    def score(d):  # scrublet's formula
        q = (d + 1) / (k_adj + 2)
        return q * rate / ratio / (1 - rate - q * (1 - rate - rate / ratio))

    singlets = stats.betabinom.rvs(m, 2.0, 6.0, size=n - 10, random_state=rng)
    d = np.r_[singlets, np.full(10, m)]
    scores = score(d.astype(float))
    # simulated doublets: a third at saturation (the detectable share), the rest singlet-like
    sim = score(
        np.r_[np.full(1700, m), stats.betabinom.rvs(m, 2.0, 6.0, size=3300, random_state=rng)]
    )
    sf = singlet_null_sf(scores, n_sim=sim.size, rate=rate, n_neighbors=k)
    assert sf is not None
    assert sf(np.array([scores.min()]))[0] == pytest.approx(1.0)
    alone = scores >= doublet_threshold(scores, sim, rate, 0.2)
    both = scores >= doublet_threshold(scores, sim, rate, 0.2, singlet_sf=sf)
    assert alone[-10:].sum() == 0
    assert both[-10:].all() and not both[:-10].any()
    # scores that are not scrublet's formula of whole counts: no null, the rate alone decides
    assert singlet_null_sf(scores + 1e-3, n_sim=sim.size, rate=rate, n_neighbors=k) is None


def test_doublet_threshold_follows_the_score_distributions():
    """The FDR rule calls the high-score mode and nothing when the rate supports nothing."""
    from preprocessing.qc import doublet_threshold, expected_doublet_rate

    rng = np.random.default_rng(0)
    singlets = rng.beta(1, 30, 950)
    doublets = rng.beta(20, 5, 50)
    sim = np.r_[rng.beta(1, 30, 3000), rng.beta(20, 5, 3000)]  # half detectable
    scores = np.r_[singlets, doublets]
    t = doublet_threshold(scores, sim, rate=0.1, fdr=0.2)
    called = scores >= t
    assert called[950:].mean() > 0.9 and called[:950].sum() <= 0.25 * called.sum()
    # a rate of 0.1% supports no 50 calls
    assert (scores >= doublet_threshold(scores, sim, rate=0.001, fdr=0.2)).sum() <= 2
    from atlas.config import QCConfig

    assert expected_doublet_rate(5000, QCConfig()) == pytest.approx(0.04)
    assert expected_doublet_rate(5000, QCConfig(doublet_rate=0.1)) == 0.1


def test_flags_in_obs_and_summary(qc_small, small_sim):
    out, summary, obs = qc_small
    for key in (
        schema.OBS_TOTAL_COUNTS,
        schema.OBS_N_GENES,
        schema.OBS_PCT_MITO,
        schema.OBS_QC_OUTLIER,
        schema.OBS_QC_REASON,
        schema.OBS_DOUBLET_SCORE,
        schema.OBS_PREDICTED_DOUBLET,
        schema.OBS_QC_PASS,
    ):
        assert key in out.obs, key
    assert out.n_obs == small_sim.adata.n_obs  # keep_all
    passed = obs[schema.OBS_QC_PASS].to_numpy(bool)
    reasons = obs[schema.OBS_QC_REASON].astype(str)
    assert (reasons[passed] == "").all()
    assert (reasons[~passed] != "").all()
    assert list(summary.columns[: len(SUMMARY_COLUMNS)]) == SUMMARY_COLUMNS
    assert summary["n_cells_in"].sum() == small_sim.adata.n_obs
    assert summary["n_cells_out"].sum() == passed.sum()
    from atlas.tables import get_table

    t = get_table(out, schema.TABLE_QC_SUMMARY)
    assert list(t.columns[: len(SUMMARY_COLUMNS)]) == SUMMARY_COLUMNS
    assert schema.UNS_PARAMS_PREFIX + "qc" in out.uns


def test_failing_cells_removed_by_default(small_sim):
    from preprocessing.qc import run_qc

    a = _raw(small_sim.adata[small_sim.adata.obs[schema.OBS_SAMPLE].isin(["P01_NAIVE"])])
    out = run_qc(a, config=doublet_free_config(), keep_all=False)
    obs = a.obs  # the flags of every cell, removed ones included
    assert out.n_obs == int(obs[schema.OBS_QC_PASS].sum()) < a.n_obs
    assert out.obs[schema.OBS_QC_PASS].all()
    assert out.obs["low_quality"].sum() == 0


def doublet_free_config(**kw):
    from atlas.config import QCConfig

    return QCConfig(doublets=False, **kw)


def _toy(species: str = "human", n: int = 300, seed: int = 0):
    """A toy sample: good cells plus a few dying cells (high mito, low counts)."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    mt = "MT-" if species == "human" else "mt-"
    genes = [f"{mt}CO{i}" for i in range(5)] + [f"G{i}" for i in range(995)]
    lam = rng.gamma(0.5, 2.0, size=1000)
    lam[:5] = 0.5
    X = rng.poisson(lam, size=(n, 1000)).astype(np.float32)
    bad = np.arange(10)
    X[bad, 5:] = rng.poisson(lam[5:] * 0.1, size=(10, 995))
    X[bad, :5] = rng.poisson(60, size=(10, 5))
    a = ad.AnnData(X=sp.csr_matrix(X))
    a.var_names = genes
    a.obs_names = [f"c{i}" for i in range(n)]
    a.obs[schema.OBS_SAMPLE] = "S1"
    a.obs[schema.OBS_PATIENT] = "P1"
    a.obs[schema.OBS_CONDITION] = "NAIVE"
    a.layers[schema.LAYER_COUNTS] = a.X.copy()
    return a, bad


@pytest.mark.parametrize("species", ["human", "mouse"])
def test_mito_prefix_is_species_aware(species):
    from preprocessing.qc import run_qc

    a, bad = _toy(species)
    out = run_qc(
        a, config=doublet_free_config(min_genes=0, min_counts=0), species=species, keep_all=True
    )
    obs = a.obs
    assert obs[schema.OBS_PCT_MITO].iloc[bad].min() > 20
    assert obs[schema.OBS_PCT_MITO].iloc[20:].median() < 5
    hm = obs[schema.OBS_QC_REASON].str.contains("high_mito").to_numpy()
    assert hm[bad].all()
    assert out.uns[schema.params_key("qc")]["mito_prefix"] == (
        "MT-" if species == "human" else "mt-"
    )


def test_hard_floors_are_configurable():
    from preprocessing.qc import run_qc

    a, _ = _toy()
    med_genes = float(np.median(np.asarray((a.X > 0).sum(1)).ravel()))
    obs = run_qc(
        a.copy(), config=doublet_free_config(min_genes=int(med_genes) + 1), keep_all=True
    ).obs
    low = obs[schema.OBS_QC_REASON].str.contains("low_genes")
    assert low.mean() >= 0.5
    obs = run_qc(a.copy(), config=doublet_free_config(min_genes=0, min_counts=0), keep_all=True).obs
    assert obs[schema.OBS_QC_REASON].str.contains("low_genes").mean() < 0.1


def test_sample_with_no_cells_left_is_an_error(tmp_path):
    import anndata as ad

    from preprocessing.qc import run_qc

    a, _ = _toy()
    b, _ = _toy(seed=1)
    b.obs[schema.OBS_SAMPLE] = "EMPTY"
    b.obs_names = [f"e{i}" for i in range(b.n_obs)]
    both = ad.concat([a, b])
    both.layers[schema.LAYER_COUNTS] = both.X.copy()
    # a floor only sample EMPTY misses: give sample S1 many more counts
    s1 = both.obs[schema.OBS_SAMPLE].to_numpy() == "S1"
    both.X = sp.csr_matrix(both.X.multiply(np.where(s1, 20, 1)[:, None]))
    both.layers[schema.LAYER_COUNTS] = both.X.copy()
    total_empty = float(np.asarray(both.X[~s1].sum(1)).max())
    cfg = doublet_free_config(min_counts=int(total_empty) + 1, min_genes=0)
    with pytest.raises(InputError) as ei:
        run_qc(both.copy(), config=cfg, report_dir=tmp_path / "qc")
    assert len(ei.value.problems) == 1
    assert "EMPTY" in ei.value.problems[0] and "no cells left" in ei.value.problems[0]
    assert (tmp_path / "qc" / "report.html").is_file()  # the report explains why
    out = run_qc(both.copy(), config=cfg, keep_all=True)  # --keep-all: a warning only
    assert out.n_obs == both.n_obs


def test_mad_bounds():
    from preprocessing.qc import mad_bounds

    v = np.array([1.0, 2, 3, 4, 5, 100])
    lo, hi = mad_bounds(v, 3)
    assert lo < 1 and 5 < hi < 100
    assert mad_bounds(np.ones(10), 3) == (-np.inf, np.inf)


def test_report_is_self_contained(qc_small, tmp_path):
    from preprocessing.qc import write_qc_report

    _, summary, obs = qc_small
    path = write_qc_report(obs, summary, tmp_path / "qc")
    html = path.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*src=", html)  # plotly.js inline: works offline
    assert html.count("Plotly.newPlot") >= 3
    # plotly.js is inlined once, not per figure
    assert html.count("plotly.js v") <= 2 and len(html) > 3_000_000 // 2
    for sid in summary[schema.OBS_SAMPLE]:
        assert sid in html
    csv = pd.read_csv(tmp_path / "qc" / "summary.csv")
    assert list(csv.columns[: len(SUMMARY_COLUMNS)]) == SUMMARY_COLUMNS
    assert len(csv) == len(summary)


def test_scrublet_simulates_fewer_doublets_in_large_samples(monkeypatch):
    """Exact kNN over (1 + ratio) x n points: large samples use scrublet's default ratio."""
    import scanpy as sc

    from atlas.config import QCConfig
    from preprocessing import qc

    seen = []

    def fake_scrublet(a, **kw):
        seen.append((a.n_obs, kw["sim_doublet_ratio"], kw["use_approx_neighbors"]))
        a.obs[schema.OBS_DOUBLET_SCORE] = np.linspace(0, 1, a.n_obs)
        a.uns["scrublet"] = {"doublet_scores_sim": np.linspace(0, 1, a.n_obs)}

    monkeypatch.setattr(sc.pp, "scrublet", fake_scrublet)
    for n in (200, qc.SCRUBLET_LARGE_SAMPLE):
        counts = sp.random(n, 50, density=0.2, format="csr", random_state=0) * 10
        qc._scrublet_sample(counts, QCConfig(), 0)
    assert seen == [
        (200, qc.SCRUBLET_SIM_RATIO, False),
        (qc.SCRUBLET_LARGE_SAMPLE, qc.SCRUBLET_SIM_RATIO_LARGE, False),
    ]
    assert qc.SCRUBLET_SIM_RATIO_LARGE < qc.SCRUBLET_SIM_RATIO


def test_genes_detected_counts_kept_cells_in_blocks():
    """Cells per gene among the kept cells, counted in blocks of rows: equal to counting on
    a copy of the kept cells, stored zeros not counted, any block size."""
    import scipy.sparse as sp

    from preprocessing.qc import genes_detected

    X = sp.random(230, 40, density=0.2, format="csr", random_state=0, dtype=np.float32)
    X.data[::7] = 0.0  # stored zeros
    keep = np.random.default_rng(1).random(230) < 0.6
    sub = X[keep].copy()
    sub.eliminate_zeros()
    want = np.bincount(sub.indices, minlength=40)
    for block in (1, 17, 1000):
        np.testing.assert_array_equal(genes_detected(X, keep, block=block), want)
