"""preprocessing.analyses: composition, pseudobulk DE and programmes, against planted truth.

Fast tests use the ``small_sim`` fixture (3 patients x 4 conditions, ~200 cells/sample)
with the simulator's true labels. Slow tests: the default demo cohort with true labels
(the ceiling), and the full build's own annotation compared with that ceiling.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import ARTIFACTS, shared_file

from atlas import schema
from atlas.errors import InputError
from atlas.tables import get_tables
from preprocessing import analyses as A

REF = "NAIVE"


def analysable(adata, *, label: str = "true_cell_type"):
    """Raw-count simulation -> what the build hands to ``analyses``.

    Doublets and low-quality cells removed, ``layers["counts"]`` raw, ``X`` =
    log1p(normalize_total 1e4), ``obs["cell_type"]`` = the simulator's true label.
    """
    import scanpy as sc

    keep = ~(adata.obs["is_doublet"].to_numpy() | adata.obs["low_quality"].to_numpy())
    a = adata[keep].copy()
    a.layers[schema.LAYER_COUNTS] = a.X.copy()
    sc.pp.normalize_total(a, target_sum=1e4, layer=None)
    sc.pp.log1p(a, layer=None)
    a.obs[schema.OBS_CELL_TYPE] = a.obs[label].astype(str).astype("category")
    conds = [
        c for c in ("NAIVE", "IBR_EARLY", "IBR_RES", "VEN_RES") if c in set(a.obs["condition"])
    ]
    a.uns[schema.UNS_CONDITION_ORDER] = conds
    a.uns[schema.UNS_REFERENCE_CONDITION] = REF
    return a


@pytest.fixture(scope="module")
def small(small_sim):
    return analysable(small_sim.adata)


@pytest.fixture(scope="module")
def small_run(small):
    a = small.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tables = get_tables(A.run_analyses(a))
    return a, tables


# ----------------------------------------------------------------------------- helpers
def test_bh_matches_scipy():
    from scipy.stats import false_discovery_control

    rng = np.random.default_rng(0)
    p = rng.uniform(size=200) ** 3
    np.testing.assert_allclose(A.bh_adjust(p), false_discovery_control(p), rtol=1e-12)
    q = A.bh_adjust(np.array([0.01, np.nan, 0.04]))
    assert np.isnan(q[1]) and q[0] == pytest.approx(0.02) and q[2] == pytest.approx(0.04)


def test_squeeze_var_shrinks_towards_common_value():
    rng = np.random.default_rng(1)
    s2 = rng.chisquare(4, size=50) / 4  # true variance 1, 4 df
    post, d0, s0 = A.squeeze_var(s2, np.full(50, 4.0))
    assert d0 > 4 and 0.6 < s0 < 1.5
    assert post.var() < s2.var()
    assert np.all((post - s0) * (s2 - s0) >= -1e-12)  # moves each towards the prior


def test_design_selection_paired_and_unpaired():
    paired = pd.DataFrame(
        {
            schema.OBS_PATIENT: ["p1", "p1", "p2", "p2", "p3", "p3"],
            schema.OBS_CONDITION: ["A", "B"] * 3,
        },
        index=[f"s{i}" for i in range(6)],
    )
    X, is_paired = A._design(paired, "A", ["A", "B"])
    assert is_paired and list(X.columns) == ["Intercept", "cond_B", "patient_p2", "patient_p3"]
    unpaired = paired.assign(**{schema.OBS_PATIENT: [f"q{i}" for i in range(6)]})
    X, is_paired = A._design(unpaired, "A", ["A", "B"])
    assert not is_paired and list(X.columns) == ["Intercept", "cond_B"]
    # paired but no residual df left with the block (2 patients x 2 conditions -> 1 df: ok)
    two = paired.iloc[:4]
    assert A.is_paired(two, "A", ["A", "B"])
    one_each = paired.iloc[[0, 3]]  # p1 in A, p2 in B: nothing to pair
    assert not A.is_paired(one_each, "A", ["A", "B"])


# ----------------------------------------------------------------------------- tables
def test_tables_have_contract_columns_and_are_stored(small_run, tmp_path):
    import anndata as ad

    from atlas.tables import get_table

    a, tables = small_run
    contract = {
        schema.TABLE_COMPOSITION: "cell_type condition reference mean_prop mean_prop_ref "
        "log2fc pvalue padj n_samples",
        schema.TABLE_PROPORTIONS: "sample_id patient condition cell_type n_cells n_total prop",
        schema.TABLE_DE: "cell_type gene condition reference log2fc lfcse pvalue padj "
        "base_mean n_samples_cond n_samples_ref",
    }
    for name, cols in contract.items():
        cols = cols.split()
        assert list(tables[name].columns[: len(cols)]) == cols, name
        assert len(tables[name]) > 0, name
    from atlas.testing import TABLE_COLUMNS

    for name in (schema.TABLE_COMPOSITION, schema.TABLE_PROPORTIONS, schema.TABLE_DE):
        assert list(tables[name].columns) == TABLE_COLUMNS[name], name
    # no score columns in a bare simulation: programmes skipped, and said so
    assert schema.TABLE_PROGRAMS not in tables
    params = a.uns[A.PARAMS_KEY]
    assert params["programs_skipped"] is True
    assert params["reference"] == REF
    assert params["contrasts"] == ["IBR_EARLY", "IBR_RES", "VEN_RES"]
    # proportions sum to one per sample; composition reference is NAIVE everywhere
    props = tables[schema.TABLE_PROPORTIONS]
    np.testing.assert_allclose(props.groupby(schema.OBS_SAMPLE)["prop"].sum(), 1.0)
    comp = tables[schema.TABLE_COMPOSITION]
    assert set(comp[schema.COL_REFERENCE]) == {REF}
    assert set(comp[schema.COL_CONDITION]) == {"IBR_EARLY", "IBR_RES", "VEN_RES"}
    assert comp[schema.COL_PADJ].between(0, 1).all()
    de = tables[schema.TABLE_DE]
    assert de[schema.COL_PVALUE].dropna().between(0, 1).all()
    assert de["paired"].all()  # every patient sampled in every condition
    # stored h5ad-safe: round trip through h5ad gives the same tables
    path = tmp_path / "a.h5ad"
    a.write_h5ad(path)
    b = ad.read_h5ad(path)
    for name in tables:
        got = get_table(b, name)
        pd.testing.assert_frame_equal(
            got.reset_index(drop=True),
            get_table(a, name).reset_index(drop=True),
            check_dtype=False,
        )
    assert b.uns[A.PARAMS_KEY]["composition_paired"]


def test_small_groups_are_skipped_and_recorded(small):
    a = small.copy()
    pb = A.pseudobulk(a, min_cells=10)
    n = a.obs.groupby([schema.OBS_CELL_TYPE, schema.OBS_SAMPLE], observed=True).size()
    small_groups = {f"{t}|{s}" for (t, s), k in n.items() if 0 < k < 10}
    assert small_groups, "the small simulation should have rare types under 10 cells"
    assert set(pb.meta.index).isdisjoint(small_groups)
    assert {f"{r.cell_type}|{r.sample_id}" for r in pb.skipped.itertuples()} == small_groups
    assert (pb.meta["n_cells"] >= 10).all()
    # pseudobulk sums are the raw counts
    t, s = pb.meta.iloc[0][[schema.COL_CELL_TYPE, schema.OBS_SAMPLE]]
    m = (a.obs[schema.OBS_CELL_TYPE] == t).to_numpy() & (a.obs[schema.OBS_SAMPLE] == s).to_numpy()
    want = np.asarray(a.layers[schema.LAYER_COUNTS][m].sum(axis=0)).ravel()
    np.testing.assert_array_equal(pb.counts.iloc[0].to_numpy(), want.astype(np.int64))
    # a cell type with too few samples per condition is not tested, and that is recorded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        de, info = A.pseudobulk_de(
            a, REF, ["IBR_RES"], min_cells=10, min_samples=3, cell_types=["pDC", "CLL resting"]
        )
    tested = set(de[schema.COL_CELL_TYPE])
    assert "CLL resting" in tested
    assert "pDC" not in tested
    assert any(s.startswith("pDC: IBR_RES vs NAIVE not tested") for s in info["skipped_contrasts"])
    assert info["skipped_groups"] and all(g.count("|") == 2 for g in info["skipped_groups"])


def test_unpaired_design_when_patients_not_repeated(small):
    a = small.copy()
    a.obs[schema.OBS_PATIENT] = a.obs[schema.OBS_SAMPLE].astype(str)  # each sample its own donor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        de, info = A.pseudobulk_de(a, REF, ["IBR_RES"], cell_types=["CLL resting"])
    assert info["designs"] == {"CLL resting": "~condition"}
    assert not de["paired"].any()
    props = A.sample_proportions(a)
    comp, cinfo = A.compare_composition(props, REF, ["IBR_RES"])
    assert not cinfo["paired"] and not comp["paired"].any()


def test_planted_de_found_in_small_sim(small_run, small_sim):
    _, tables = small_run
    de = tables[schema.TABLE_DE].set_index([schema.COL_CELL_TYPE, schema.COL_GENE, "condition"])
    # headline effects: PSMB5 up in resting CLL under ibrutinib resistance, CCL3 down early
    psmb5 = de.loc[("CLL resting", "PSMB5", "IBR_RES")]
    assert psmb5[schema.COL_LOG2FC] > 1 and psmb5[schema.COL_PADJ] < 0.05
    ccl3 = de.loc[("CLL resting", "CCL3", "IBR_EARLY")]
    assert ccl3[schema.COL_LOG2FC] < -1 and ccl3[schema.COL_PADJ] < 0.05
    score = A.score_against_truth(tables, small_sim.truth)
    assert score["de_null_n"] > 100
    assert score["de_null_fp_rate"] <= 0.05


def test_recovery_vs_ceiling_counts_untested_as_missed():
    truth = pd.DataFrame(
        {
            "cell_type": ["T", "T", "T", "U"],
            "gene": ["a", "b", "c", "a"],
            "condition": "X",
            "log2fc": [1.5, -2.0, 0.0, 1.2],
            "fraction_affected": [1.0, 1.0, 0.0, 0.5],
            "kind": ["planted", "planted", "null", "planted"],
        }
    )

    def table(rows):
        df = pd.DataFrame(rows, columns=["cell_type", "gene", "log2fc", "padj", "n"])
        return df.assign(condition="X", n_samples_cond=df["n"], n_samples_ref=df["n"])

    ceiling = table([("T", "a", 1.4, 0.01, 4), ("T", "b", -1.9, 0.01, 4), ("U", "a", 1, 0.01, 4)])
    own = table([("T", "a", 1.3, 0.02, 4), ("T", "b", 1.0, 0.01, 4)])  # b: wrong sign; U untested
    r = A.recovery_vs_ceiling(own, ceiling, truth)
    assert (r["eligible"], r["recovered_ceiling"], r["recovered"]) == (3, 3, 1)
    assert r["ratio"] == pytest.approx(1 / 3)
    assert sorted(r["lost"]) == ["T|b|X", "U|a|X"]


# ----------------------------------------------------------------------------- errors
def test_bad_reference_and_contrast_name_the_choices(small):
    a = small.copy()
    with pytest.raises(InputError) as e:
        A.run_analyses(a, reference="UNTREATED")
    msg = str(e.value)
    assert "UNTREATED" in msg and "NAIVE" in msg and "VEN_RES" in msg
    with pytest.raises(InputError) as e:
        A.run_analyses(a, contrasts=["IBR_RES", "CAR_T"])
    assert "CAR_T" in str(e.value) and "IBR_EARLY" in str(e.value)
    with pytest.raises(InputError, match="is the reference"):
        A.run_analyses(a, contrasts=[REF])
    b = a.copy()
    del b.obs[schema.OBS_CELL_TYPE]
    with pytest.raises(schema.MissingKeyError, match="run tme-atlas build"):
        A.run_analyses(b)


def test_reference_and_contrasts_from_config(small):
    from atlas.config import load_config

    a = small[small.obs[schema.OBS_CELL_TYPE].isin(["CLL resting", "CD4 naive"])].copy()
    cfg = load_config(
        env={}, overrides={"analyses": {"reference": "IBR_EARLY", "contrasts": ["VEN_RES"]}}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tables = get_tables(A.run_analyses(a, config=cfg))
    for name in (schema.TABLE_COMPOSITION, schema.TABLE_DE):
        t = tables[name]
        assert set(t[schema.COL_REFERENCE]) == {"IBR_EARLY"}
        assert set(t[schema.COL_CONDITION]) == {"VEN_RES"}
    # the reference defaults to the sheet's first condition
    a.uns[schema.UNS_CONDITION_ORDER] = ["IBR_RES", "NAIVE", "IBR_EARLY", "VEN_RES"]
    del a.uns[schema.UNS_REFERENCE_CONDITION]
    assert A.reference_condition(a) == "IBR_RES"


# ----------------------------------------------------------------------------- programmes
def test_programme_scores_compared_on_sample_means(small):
    a = small.copy()
    rng = np.random.default_rng(0)
    shift = (a.obs[schema.OBS_CELL_TYPE] == "CLL resting").to_numpy() & (
        a.obs[schema.OBS_CONDITION] == "IBR_RES"
    ).to_numpy()
    a.obs[schema.score_key("proteasome")] = rng.normal(0, 0.3, a.n_obs) + 0.8 * shift
    a.obs[schema.score_key("noise")] = rng.normal(0, 0.3, a.n_obs)
    progs = A.compare_programs(a, REF, ["IBR_EARLY", "IBR_RES", "VEN_RES"])
    assert list(progs.columns[:10]) == [
        "cell_type", "program", "condition", "reference", "mean", "mean_ref", "diff",
        "pvalue", "padj", "n_samples",
    ]  # fmt: skip
    hit = progs.set_index(["cell_type", "program", "condition"]).loc[
        ("CLL resting", "proteasome", "IBR_RES")
    ]
    assert hit["diff"] == pytest.approx(0.8, abs=0.15) and hit[schema.COL_PADJ] < 0.05
    noise = progs[progs["program"] == "noise"]
    assert (noise[schema.COL_PADJ] < 0.05).mean() <= 0.1
    assert progs.loc[progs[schema.COL_CELL_TYPE] == "CLL resting", "paired"].all()


# ----------------------------------------------------------------------------- DESeq2 backend
def _deseq_fit(counts, design, col, inference):
    """pydeseq2 fit + Wald test of ``col``: (dds.var, results_df)."""
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.ds import DeseqStats

    meta = pd.DataFrame({"_": "x"}, index=counts.index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dds = DeseqDataSet(
            counts=counts, metadata=meta, design=design, refit_cooks=True,
            inference=inference, quiet=True,
        )  # fmt: skip
        dds.deseq2()
        vec = (design.columns == col).astype(float)
        ds = DeseqStats(dds, contrast=vec, inference=inference, quiet=True)
        ds.summary()
    return dds.var.copy(), ds.results_df.copy()


# The fast backend's tolerances against stock pydeseq2, on every gene of the fit:
DESEQ_RTOL = 1e-6  # dispersions (gene-wise, trend, MAP, final), log2FC, lfcSE, p, padj
DESEQ_ATOL = 1e-9  # for values at or near 0 (log2FC, p)
# calls at padj < 0.05 identical, except genes whose stock padj is within 1% of 0.05
DESEQ_CALL_MARGIN = 0.01


def test_fast_inference_reproduces_stock_pydeseq2_on_all_genes(small):
    """Every gene, low counts included: the vectorised backend gives stock pydeseq2's
    dispersions, trend, MAP dispersions, LFCs, SEs, p-values, independent filtering
    (which genes get a padj) and calls, within the tolerances above. A paired design
    (IRLS start for the gene-wise fit) and an unpaired one (linear-model start)."""
    from pydeseq2.default_inference import DefaultInference

    from preprocessing.deseq_fast import FastInference

    pb = A.pseudobulk(small, min_cells=10)
    conds = ["NAIVE", "IBR_EARLY", "IBR_RES", "VEN_RES"]
    cases = []
    rng = np.random.default_rng(0)
    for ctype, paired in (("CD4 naive", True), ("CD4 naive", False)):
        m = pb.meta[pb.meta[schema.COL_CELL_TYPE] == ctype]
        if not paired:
            m = m.assign(**{schema.OBS_PATIENT: m[schema.OBS_SAMPLE]})
        X, is_paired = A._design(m, REF, conds)
        assert is_paired == paired
        cnt = pb.counts.loc[m.index]
        cnt = cnt.loc[:, cnt.sum(axis=0) >= A.MIN_GENE_COUNTS]  # what the stage tests
        # plant a IBR_RES effect on a quarter of the genes (x4 up / x0.25 down), so that
        # hundreds of genes are called and independent filtering has a threshold to pick
        v = cnt.to_numpy().copy()
        rows = np.flatnonzero((m[schema.OBS_CONDITION] == "IBR_RES").to_numpy())
        g = rng.choice(v.shape[1], v.shape[1] // 4, replace=False)
        up, dn = np.ix_(rows, g[::2]), np.ix_(rows, g[1::2])
        v[up] += rng.poisson(3 * v[up])
        v[dn] = rng.binomial(v[dn], 0.25)
        cases.append((ctype, pd.DataFrame(v, index=cnt.index, columns=cnt.columns), X))
    filtered = 0
    for ctype, cnt, X in cases:
        var_f, res_f = _deseq_fit(cnt, X, "cond_IBR_RES", FastInference())
        var_s, res_s = _deseq_fit(cnt, X, "cond_IBR_RES", DefaultInference(n_cpus=1))
        # mostly low-count genes (over half under 5 counts per sample on average),
        # many on the flat likelihood near min_disp, where a global optimiser and stock
        # L-BFGS-B stop at different dispersions
        assert (res_s["baseMean"] < 5).mean() > 0.5, ctype
        assert (var_s["genewise_dispersions"] < 1e-4).sum() >= 20, ctype
        for col in ("genewise_dispersions", "fitted_dispersions", "MAP_dispersions", "dispersions"):
            np.testing.assert_allclose(
                var_f[col], var_s[col], rtol=DESEQ_RTOL, atol=0, err_msg=f"{ctype} {col}"
            )
        np.testing.assert_array_equal(var_f["_outlier_genes"], var_s["_outlier_genes"])
        for col in ("log2FoldChange", "lfcSE", "stat", "pvalue", "padj"):
            np.testing.assert_allclose(
                res_f[col], res_s[col], rtol=DESEQ_RTOL, atol=DESEQ_ATOL, err_msg=f"{ctype} {col}"
            )  # NaNs in the same places: independent filtering and Cook's outliers agree
        filtered += int(res_s["pvalue"].notna().sum() - res_s["padj"].notna().sum())
        assert (res_s["padj"] < 0.05).sum() >= 50, ctype
        sig_f, sig_s = res_f["padj"] < 0.05, res_s["padj"] < 0.05
        near = np.abs(res_s["padj"] / 0.05 - 1) < DESEQ_CALL_MARGIN
        assert not ((sig_f != sig_s) & ~near).any(), ctype
    assert filtered > 100  # independent filtering chose a threshold, the same one


def test_lockstep_lbfgsb_is_scipys_minimize_and_fallback_is_stock(small, monkeypatch):
    """The lockstep driver takes scipy.minimize(L-BFGS-B)'s path per problem (non-convex
    toy problems, several local minima); without scipy's kernel the stock fit is used."""
    from pydeseq2.default_inference import DefaultInference
    from scipy.optimize import minimize

    from preprocessing import deseq_fast

    rng = np.random.default_rng(0)
    a, b, x0 = rng.uniform(0.5, 3, 60), rng.normal(0, 2, 60), rng.normal(0, 3, 60)

    def fg(idx, x):
        return (
            a[idx] * (x - b[idx]) ** 2 + np.sin(3 * x),
            2 * a[idx] * (x - b[idx]) + 3 * np.cos(3 * x),
        )

    xs, ok = deseq_fast.lbfgsb_lockstep(x0, -4.0, 4.0, fg)
    for i in range(60):
        r = minimize(
            lambda v, i=i: fg(np.array([i]), v)[0][0],
            np.array([x0[i]]),
            jac=lambda v, i=i: fg(np.array([i]), v)[1],
            method="L-BFGS-B",
            bounds=[(-4.0, 4.0)],
        )
        assert xs[i] == r.x[0] and ok[i] == r.success
    # dispersion fits on 300 low-count genes: fast == stock, and == stock without the kernel
    pb = A.pseudobulk(small, min_cells=10)
    m = pb.meta[pb.meta[schema.COL_CELL_TYPE] == "CD4 naive"]
    X, _ = A._design(m, REF, ["NAIVE", "IBR_EARLY", "IBR_RES", "VEN_RES"])
    cnt = pb.counts.loc[m.index]
    cnt = cnt.loc[:, cnt.sum(axis=0) >= A.MIN_GENE_COUNTS].iloc[:, :300].to_numpy()
    mu = np.maximum(cnt.mean(axis=0, keepdims=True) * np.ones_like(cnt, dtype=float), 0.5)
    args = (cnt, X.to_numpy(), mu, np.full(cnt.shape[1], 0.1), 1e-8, 12.0)
    ref = DefaultInference(n_cpus=1).alpha_mle(*args)
    fast = deseq_fast.FastInference().alpha_mle(*args)
    monkeypatch.setattr(deseq_fast, "_HAVE_SETULB", False)
    fallback = deseq_fast.FastInference().alpha_mle(*args)
    for got in (fast, fallback):
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])


# ----------------------------------------------------------------------------- DE covariates
LANE_L2 = ("P01_IBR_RES", "P02_IBR_RES", "P03_IBR_RES", "P02_VEN_RES", "P03_VEN_RES")


@pytest.fixture(scope="module")
def lane_effect(small, small_sim):
    """``small`` with a technical lane: lane L2 (all IBR_RES samples and two VEN_RES ones)
    multiplies 40 genes by 4 in every cell (count + Poisson(3 x count)). The 40 genes
    have no planted biology in resting CLL, so any IBR_RES call on them is the lane's."""
    a = small.copy()
    sid = a.obs[schema.OBS_SAMPLE].astype(str).to_numpy()
    a.obs["lane"] = np.where(np.isin(sid, LANE_L2), "L2", "L1")
    a.obs["sex"] = a.obs[schema.OBS_PATIENT].astype(str).map({"P01": "F", "P02": "M", "P03": "F"})
    tde = small_sim.truth["de"]
    biology = set(tde.loc[(tde["kind"] == "planted") & (tde["cell_type"] == "CLL resting"), "gene"])
    pb = A.pseudobulk(a, min_cells=10)
    mean = pb.counts.loc[pb.meta[schema.COL_CELL_TYPE] == "CLL resting"].mean(axis=0)
    cand = [g for g in mean.index[mean > 30] if g not in biology]
    rng = np.random.default_rng(7)
    genes = sorted(rng.choice(cand, 40, replace=False))
    counts = a.layers[schema.LAYER_COUNTS]
    C = counts.toarray() if sp.issparse(counts) else np.array(counts)
    rows = np.flatnonzero(a.obs["lane"].to_numpy() == "L2")
    idx = np.ix_(rows, np.flatnonzero(np.isin(a.var_names, genes)))
    C[idx] = C[idx] + rng.poisson(3 * C[idx])
    a.layers[schema.LAYER_COUNTS] = sp.csr_matrix(C.astype(np.float32))
    return a, genes


def test_de_covariate_removes_a_planted_lane_effect(lane_effect):
    """A lane effect confounded with IBR_RES is called as IBR_RES biology without the
    covariate; with ``lane`` in the design it is removed and the planted biology stays."""
    a, genes = lane_effect
    conds = ["IBR_EARLY", "IBR_RES", "VEN_RES"]
    out = {}
    for covs in ([], ["lane"]):
        cov = A.sample_covariates(a, covs, REF, [REF, *conds]) if covs else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            de, info = A.pseudobulk_de(a, REF, conds, cell_types=["CLL resting"], covariates=cov)
        r = de[de[schema.COL_CONDITION] == "IBR_RES"].set_index(schema.COL_GENE)
        out[bool(covs)] = (r, info)
    r0, info0 = out[False]
    r1, info1 = out[True]
    assert info0["designs"] == {"CLL resting": "~patient + condition"}
    assert info1["designs"] == {"CLL resting": "~patient + lane + condition"}
    lane0, lane1 = r0.loc[genes], r1.loc[genes]
    # without the covariate the lane is read as a treatment effect
    assert (lane0[schema.COL_PADJ] < 0.05).mean() >= 0.5
    assert lane0[schema.COL_LOG2FC].median() > 1.5
    # with it: no lane gene called (<= 5%), their log2FC centred on 0
    assert (lane1[schema.COL_PADJ] < 0.05).mean() <= 0.05
    assert abs(lane1[schema.COL_LOG2FC].median()) < 0.3
    # the planted biology is still found
    psmb5 = r1.loc["PSMB5"]
    assert psmb5[schema.COL_LOG2FC] > 1 and psmb5[schema.COL_PADJ] < 0.05


def test_de_covariates_validated_and_recorded(lane_effect):
    from atlas.config import ConfigError, load_config

    a, _ = lane_effect
    a = a[a.obs[schema.OBS_CELL_TYPE].isin(["CLL resting", "CD4 naive"])].copy()
    conds = [REF, "IBR_EARLY", "IBR_RES", "VEN_RES"]
    # one clear line per problem, naming the column
    with pytest.raises(InputError, match=r"'ighv_status' is not in the sample sheet.*lane"):
        A.sample_covariates(a, ["ighv_status"], REF, conds)
    b = a.copy()
    b.obs["batch"] = "run1"
    with pytest.raises(InputError, match="'batch' takes the single value 'run1'"):
        A.sample_covariates(b, ["batch"], REF, conds)
    b.obs["batch"] = np.where(b.obs[schema.OBS_CONDITION].astype(str) == "IBR_RES", "B", "A")
    with pytest.raises(InputError, match="'batch' is confounded with the condition"):
        A.sample_covariates(b, ["batch"], REF, conds)
    b.obs["batch"] = np.where(np.arange(b.n_obs) % 2 == 0, "A", "B")
    with pytest.raises(InputError, match="'batch' varies within sample"):
        A.sample_covariates(b, ["batch"], REF, conds)
    with pytest.raises(ConfigError, match="already in the design"):
        load_config(env={}, overrides={"analyses": {"de_covariates": ["condition"]}})
    bad_cfg = load_config(env={}, overrides={"analyses": {"de_covariates": ["ighv_status"]}})
    with pytest.raises(InputError, match="'ighv_status' is not in the sample sheet"):
        A.run_analyses(a.copy(), config=bad_cfg)  # raised before anything is computed
    # a patient-level covariate is absorbed by the patient block; lane is used; recorded
    cfg = load_config(env={}, overrides={"analyses": {"de_covariates": ["lane", "sex"]}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        A.run_analyses(a, config=cfg)
    p = a.uns[A.PARAMS_KEY]
    assert p["de_covariates"] == ["lane", "sex"]
    assert p["de_covariate_levels"] == {"lane": ["L1", "L2"], "sex": ["F", "M"]}
    assert "CLL resting: ~patient + lane + condition" in p["de_designs"]
    assert any(
        s.startswith("CLL resting: sex (constant within each patient: absorbed")
        for s in p["de_covariates_dropped"]
    )


# ----------------------------------------------------------------------------- atlas dir / CLI
def test_run_analyse_dir_writes_tables_and_atlas(small, tmp_path):
    from atlas.store import read_atlas_adata, write_atlas
    from atlas.tables import has_table
    from tme_atlas.cli import main

    a = small[small.obs[schema.OBS_CELL_TYPE].isin(["CLL resting", "CD4 naive", "NK"])].copy()
    write_atlas(a, tmp_path / "atlas", store=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (
            main(["analyse", str(tmp_path / "atlas"), "--reference", REF, "--contrast", "IBR_RES"])
            == 0
        )
    for name in ("composition", "proportions", "de"):
        df = pd.read_csv(tmp_path / "atlas" / schema.TABLES_DIR / f"{name}.csv")
        assert len(df) > 0
    b = read_atlas_adata(tmp_path / "atlas")
    assert has_table(b, schema.TABLE_DE) and has_table(b, schema.TABLE_COMPOSITION)
    assert list(b.uns[A.PARAMS_KEY]["contrasts"]) == ["IBR_RES"]
    # unknown reference: exit code 2, nothing rewritten
    before = (tmp_path / "atlas" / schema.ATLAS_FILE).stat().st_mtime_ns
    assert main(["analyse", str(tmp_path / "atlas"), "--reference", "FOO"]) == 2
    assert (tmp_path / "atlas" / schema.ATLAS_FILE).stat().st_mtime_ns == before
    # an atlas without annotation: MissingKeyError -> exit 2
    del a.obs[schema.OBS_CELL_TYPE]
    write_atlas(a, tmp_path / "bare", store=False)
    with pytest.raises(schema.MissingKeyError, match="tme-atlas build"):
        A.run_analyse_dir(tmp_path / "bare")
    assert main(["analyse", str(tmp_path / "bare")]) == 2


# ----------------------------------------------------------------------------- slow: truth
def _record(name: str, payload: dict) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"analyses_{name}.json").write_text(json.dumps(payload, indent=2, default=str))


@pytest.fixture(scope="module")
def default_sim():
    from preprocessing.simulate import simulate

    return simulate(seed=0)


@pytest.fixture(scope="module")
def true_label_run(default_sim):
    import time

    a = analysable(default_sim.adata)
    t0 = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tables = get_tables(A.run_analyses(a))
    cpu = time.process_time() - t0
    return tables, A.score_against_truth(tables, default_sim.truth), cpu


@pytest.mark.slow
def test_true_label_run_recovers_planted_truth(true_label_run, default_sim):
    tables, score, cpu = true_label_run
    _record("true_labels", {**score, "cpu_s": cpu})
    # DE: the ceiling for the annotation-based run (recorded; ~95% at seed 0)
    assert score["de_eligible"] >= 80
    assert score["de_recovery"] >= 0.85, score["de_missed"]
    # planted nulls: at most 5% called
    assert score["de_null_n"] >= 500
    assert score["de_null_fp_rate"] <= 0.05
    # composition: strong planted shifts (|log2| >= 1.3) found with the right sign,
    # every shift's sign right in >= 75%, stable types not called at FDR 10% in >= 90%
    comp = tables[schema.TABLE_COMPOSITION].set_index([schema.COL_CELL_TYPE, schema.COL_CONDITION])
    for key in [("NLC", "IBR_RES"), ("NLC", "VEN_RES")]:
        assert comp.loc[key, schema.COL_LOG2FC] > 0 and comp.loc[key, schema.COL_PADJ] < 0.1, key
    # CLL states are the malignant compartment: one malignant-fraction row per contrast
    mal = comp.xs(schema.MALIGNANT_ROW, level=0)
    assert len(mal) == 3 and (mal["compartment"] == "malignant").all()
    assert not any(t.startswith("CLL") for t, _ in comp.index)
    assert score["comp_sign_correct"] >= 0.75 * score["comp_shifted"]
    assert score["comp_stable_ok"] >= 0.9 * score["comp_stable"], score["comp_stable_called"]


@pytest.mark.slow
def test_own_annotation_recovers_90pct_of_true_label_ceiling(demo_atlas_dir, demo_sim_dir):
    """The build's own annotation vs the simulator's true labels on the same cells.

    Both runs use the build's analyses settings (min_cells, min_samples); the eligible
    planted effects are those of the true-label run (types with >= 3 samples per
    condition there); an effect untested with the build's labels counts as missed.
    """
    from atlas.config import AnalysesConfig
    from atlas.store import read_atlas_adata
    from atlas.tables import get_table
    from preprocessing.simulate import load_truth

    truth = load_truth(demo_sim_dir)
    adata = read_atlas_adata(demo_atlas_dir)
    own = {n: get_table(adata, n) for n in (schema.TABLE_DE, schema.TABLE_COMPOSITION)}
    params = adata.uns[A.PARAMS_KEY]
    cfg = AnalysesConfig(min_cells=int(params["min_cells"]), min_samples=int(params["min_samples"]))
    # the same cells (kept by the build's QC), labelled with the truth; true doublets out
    label = truth["cells"].set_index("cell_id")["cell_type"].reindex(adata.obs_names.astype(str))
    b = adata[label.notna().to_numpy() & (label != "Doublet").to_numpy()].copy()
    b.obs["true_label"] = label.loc[b.obs_names].astype(str).to_numpy()
    if schema.OBS_DOUBLET_CLUSTER in b.obs:
        b.obs[schema.OBS_DOUBLET_CLUSTER] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        true = get_tables(A.run_analyses(b, config=cfg, groupby="true_label"))
    rec = A.recovery_vs_ceiling(own[schema.TABLE_DE], true[schema.TABLE_DE], truth["de"])
    s_own = A.score_against_truth(own, truth)
    s_true = A.score_against_truth(true, truth)
    _record("annotation_vs_truth", {"recovery": rec, "own": s_own, "true_labels": s_true})
    assert rec["recovered_ceiling"] >= 50
    assert rec["ratio"] >= 0.9, rec["lost"]
    assert s_own["de_null_fp_rate"] <= 0.05
    comp = own[schema.TABLE_COMPOSITION].set_index([schema.COL_CELL_TYPE, schema.COL_CONDITION])
    for key in [("NLC", "IBR_RES"), ("NLC", "VEN_RES")]:
        assert comp.loc[key, schema.COL_LOG2FC] > 0, key
    assert s_own["comp_stable_ok"] >= 0.9 * s_own["comp_stable"], s_own["comp_stable_called"]


# ----------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_kang2018_interferon_genes_up_in_cd14_monocytes():
    import anndata as ad

    a = ad.read_h5ad(shared_file("kang2018_pbmc_ifnb_labelled.h5ad"))
    a.layers[schema.LAYER_COUNTS] = a.X.copy()
    a.obs[schema.OBS_CONDITION] = a.obs["group_id"].astype(str)
    a.obs[schema.OBS_PATIENT] = a.obs[schema.OBS_SAMPLE].astype(str).str.extract(r"(\d+)")[0]
    a.obs[schema.OBS_CELL_TYPE] = a.obs["cluster_id"].astype(str)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tables = get_tables(A.run_analyses(a, reference="ctrl"))
    de = tables[schema.TABLE_DE]
    mono = de[de[schema.COL_CELL_TYPE] == "CD14+ Monocytes"].set_index(schema.COL_GENE)
    assert mono["paired"].all()  # donors 101 and 107 in both arms
    isgs = [g for g in ("ISG15", "IFI6", "IFIT3", "MX1", "IFIT1", "ISG20") if g in mono.index]
    assert len(isgs) >= 4
    for g in isgs:
        assert mono.loc[g, schema.COL_LOG2FC] > 1 and mono.loc[g, schema.COL_PADJ] < 0.05, g


def _true_label_sim(**kw):
    from preprocessing.simulate import simulate

    sim = simulate(
        seed=5, n_patients=4, cells_per_sample=500, conditions=("NAIVE", "IBR_RES"), **kw
    )
    a = sim.adata
    keep = ~(a.obs["is_doublet"].to_numpy() | a.obs["low_quality"].to_numpy())
    a = a[keep].copy()
    a.obs[schema.OBS_CELL_TYPE] = a.obs["true_cell_type"].astype(str)
    return a


def test_tumour_burden_alone_moves_no_tme_type():
    """A planted 4-fold drop of the tumour burden with the microenvironment unchanged:
    among non-malignant cells <= 5% of types at padj < 0.05; the malignant row drops.
    Over all cells (the old composition) every TME type would rise."""
    a = _true_label_sim(tme_shifts=False, tumour_burden_log2={"IBR_RES": -2.0})
    comp, _, info = A.compare_tme_composition(a, "NAIVE", ["IBR_RES"])
    tme = comp[comp["compartment"] == "tme"]
    mal = comp[comp["compartment"] == "malignant"].iloc[0]
    frac_sig = float((tme[schema.COL_PADJ] < 0.05).mean())
    old, _ = A.compare_composition(A.sample_proportions(a), "NAIVE", ["IBR_RES"])
    old_tme = old[~old[schema.COL_CELL_TYPE].str.startswith("CLL")]
    print(
        f"burden only: TME types at padj<0.05 {frac_sig:.2f} of {len(tme)}; malignant "
        f"log2FC {mal[schema.COL_LOG2FC]:.2f} padj {mal[schema.COL_PADJ]:.2g}; over all "
        f"cells {(old_tme[schema.COL_PADJ] < 0.05).mean():.2f}"
    )
    assert info["paired"]
    assert mal[schema.COL_CELL_TYPE] == schema.MALIGNANT_ROW
    assert frac_sig <= 0.05
    assert mal[schema.COL_PADJ] < 0.05 and mal[schema.COL_LOG2FC] < -1
    assert not tme[schema.COL_CELL_TYPE].str.startswith("CLL").any()


def test_planted_tme_shifts_recovered_beside_a_burden_change():
    """Planted NLC and CD8-exhausted expansions (IBR_RES) found among non-malignant cells
    while the burden also drops; a `malignant` obs column takes precedence over labels."""
    a = _true_label_sim(tumour_burden_log2={"IBR_RES": -2.0})
    comp, _, _ = A.compare_tme_composition(a, "NAIVE", ["IBR_RES"])
    tme = comp[comp["compartment"] == "tme"].set_index(schema.COL_CELL_TYPE)
    for t in ("NLC", "CD8 exhausted"):
        print(t, tme.loc[t, schema.COL_LOG2FC], tme.loc[t, schema.COL_PADJ])
        assert tme.loc[t, schema.COL_PADJ] < 0.05 and tme.loc[t, schema.COL_LOG2FC] > 0.5
    a.obs[schema.OBS_MALIGNANT] = False
    assert not A.malignant_mask(a).any()
