"""Ligand-receptor crosstalk (preprocessing.crosstalk): schemas, curated flags, the
differential score, no network, and recovery of the simulator's planted LR changes."""

from __future__ import annotations

import socket

import numpy as np
import pandas as pd
import pytest
from conftest import fast_config

import references
from atlas import schema
from atlas.tables import get_table, get_tables
from preprocessing import crosstalk as ct

# ----------------------------------------------------------------------------- helpers
COARSE = {
    "CLL resting": "CLL",
    "CLL activated": "CLL",
    "CLL proliferating": "CLL",
    "CD4 naive": "CD4 T",
    "CD4 Tfh": "CD4 T",
    "CD4 Treg": "CD4 T",
    "CD8 effector": "CD8 T",
    "CD8 exhausted": "CD8 T",
    "Classical monocyte": "Myeloid",
    "Non-classical monocyte": "Myeloid",
    "cDC": "Myeloid",
    "pDC": schema.UNASSIGNED,
    "Platelet": schema.UNASSIGNED,
}


def true_label_atlas(sim, coarse: bool = False):
    """The simulation as an annotated atlas: singlets of good quality, true labels, X lognorm.

    ``coarse``: 7 broad types (+ Unassigned) instead of 16, for fast tests.
    """
    import scanpy as sc

    a = sim.adata
    keep = (
        ~a.obs["is_doublet"].astype(bool).to_numpy() & ~a.obs["low_quality"].astype(bool).to_numpy()
    )
    a = a[keep].copy()
    labels = a.obs["true_cell_type"].astype(str)
    if coarse:
        labels = labels.map(lambda t: COARSE.get(t, t))
    a.obs[schema.OBS_CELL_TYPE] = labels.astype("category")
    a.layers[schema.LAYER_COUNTS] = a.X.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    from preprocessing.simulate import CONDITIONS, REFERENCE

    conds = [c for c in CONDITIONS if c in set(a.obs[schema.OBS_CONDITION].astype(str))]
    a.uns[schema.UNS_CONDITION_ORDER] = conds
    a.uns[schema.UNS_REFERENCE_CONDITION] = REFERENCE
    a.uns[schema.UNS_SPECIES] = (
        str(a.obs[schema.OBS_SPECIES].iloc[0]) if schema.OBS_SPECIES in a.obs else "human"
    )
    return a


class _NoNetwork:
    """Any attempt to open a network connection fails the test."""

    def __enter__(self):
        self.mp = pytest.MonkeyPatch()

        def refuse(*args, **kwargs):
            raise AssertionError(f"crosstalk tried to reach the network: {args[1:]!r}")

        self.mp.setattr(socket.socket, "connect", refuse)
        self.mp.setattr(socket.socket, "connect_ex", refuse)
        self.mp.setattr(socket, "create_connection", refuse)
        return self

    def __exit__(self, *exc):
        self.mp.undo()


@pytest.fixture(scope="session")
def small_crosstalk(small_sim):
    """Small sim with true labels, DE from the analyses stage, crosstalk run offline."""
    from preprocessing.analyses import run_analyses

    a = true_label_atlas(small_sim, coarse=True)
    cfg = fast_config()
    run_analyses(a, config=cfg)
    with _NoNetwork():
        tables = get_tables(ct.run_crosstalk(a, config=cfg, keep_all_diff=True))
    return a, tables


# ----------------------------------------------------------------------------- curated table
def test_curated_table_shipped_and_in_resources():
    cur = pd.read_csv(references.path(ct.CURATED_FILE), dtype=str).fillna("")
    for col in (
        "ligand",
        "receptor",
        "ligand_mouse",
        "receptor_mouse",
        "sender",
        "receiver",
        "pmid",
        "source",
    ):
        assert col in cur.columns
    assert (cur["source"] != "").all() and cur["pmid"].str.fullmatch(r"\d+").all()
    human = ct.load_resource("human")
    pairs = set(zip(human["ligand"], human["receptor"]))
    assert set(zip(cur["ligand"], cur["receptor"])) <= pairs
    for need in [
        ("CXCL12", "CXCR4"),
        ("CXCL13", "CXCR5"),
        ("TNFSF13B", "TNFRSF13C"),
        ("CD40LG", "CD40"),
        ("CD274", "PDCD1"),
    ]:
        assert need in set(zip(cur["ligand"], cur["receptor"]))
    mouse = ct.load_resource("mouse")
    mpairs = set(zip(mouse["ligand"], mouse["receptor"]))
    in_mouse = [p in mpairs for p in zip(cur["ligand_mouse"], cur["receptor_mouse"])]
    assert np.mean(in_mouse) >= 0.75
    m = ct.load_curated("mouse")
    assert "Cxcl12" in set(m["ligand"]) and m["curated_source"].str.contains("PMID").all()


def test_resources_ship_inside_liana_and_unknown_name_fails():
    from atlas.config import ConfigError

    with _NoNetwork():
        h = ct.load_resource("human")
        m = ct.load_resource("mouse")
    assert list(h.columns) == ["ligand", "receptor"] and len(h) > 1000
    assert len(m) > 1000 and m["ligand"].str.match(r"^[A-Z][a-z0-9]").mean() > 0.9
    with pytest.raises(ConfigError, match="unknown resource"):
        ct.load_resource("human", "no_such_resource")


# ----------------------------------------------------------------------------- differential math
def _toy_de():
    rows = [
        # cell_type, gene, lfc, p
        ("A", "LIG", 2.0, 1e-6),
        ("A", "X", 0.0, 0.9),
        ("B", "REC", 0.1, 0.8),  # expressed, unchanged
        ("B", "REC2", 1.5, 1e-5),  # changes with the ligand
        ("B", "R1", 1.0, 0.01),
        ("B", "R2", -0.2, 0.5),
        ("B", "LIG", -3.0, 1e-8),  # B expresses LIG but too rarely (see props)
        # NOREC: expressed in B but absent from the DE table (not tested)
    ]
    de = pd.DataFrame(rows, columns=["cell_type", "gene", "log2fc", "pvalue"])
    de["condition"], de["reference"] = "RES", "NAIVE"
    return de


TOY_GENES = ["LIG", "X", "REC", "REC2", "R1", "R2", "NOREC"]


def _toy_props(lig_in_b=0.01):
    rows = []
    for cond in ("RES", "NAIVE"):
        for ctype, gene, p in [
            ("A", "LIG", 0.5),
            ("A", "X", 0.5),
            ("B", "REC", 0.3),
            ("B", "REC2", 0.3),
            ("B", "R1", 0.4),
            ("B", "R2", 0.2),
            ("B", "NOREC", 0.3),
            ("B", "LIG", lig_in_b),
        ]:
            rows.append((cond, ctype, gene, p))
    return pd.DataFrame(rows, columns=["condition", "cell_type", "gene", "prop"])


def _toy_samples(n_patients=3, seed=0):
    """Per-sample means: LIG up by 1 in A and REC2 up by 0.8 in B in every patient; the
    other genes carry a patient effect only."""
    rng = np.random.default_rng(seed)
    pats = [f"P{i}" for i in range(n_patients)]
    meta = pd.DataFrame(
        [(f"{p}_{c}", p, c) for p in pats for c in ("NAIVE", "RES")],
        columns=[schema.OBS_SAMPLE, schema.OBS_PATIENT, schema.OBS_CONDITION],
    ).set_index(schema.OBS_SAMPLE)
    base = rng.uniform(0.5, 1.5, (n_patients, 2, len(TOY_GENES)))  # patient x type x gene
    mean = np.repeat(base, 2, axis=0) + rng.normal(0, 0.02, (2 * n_patients, 2, len(TOY_GENES)))
    res_rows = (meta[schema.OBS_CONDITION] == "RES").to_numpy()
    mean[res_rows, 0, TOY_GENES.index("LIG")] += 1.0
    mean[res_rows, 1, TOY_GENES.index("REC2")] += 0.8
    n = len(meta)
    return ct.SampleMeans(
        meta=meta,
        types=["A", "B"],
        genes=pd.Index(TOY_GENES),
        mean=mean,
        ok=np.ones((n, 2), dtype=bool),
        frac=np.tile([0.25, 0.75], (n, 1)),
    )


TOY_RESOURCE = pd.DataFrame(
    {
        "ligand": ["LIG", "LIG", "LIG", "LIG"],
        "receptor": ["REC", "R1_R2", "REC2", "NOREC"],
    }
)


def test_differential_per_sample_test_and_complexes():
    cur = pd.DataFrame({"ligand": ["LIG"], "receptor": ["REC"], "curated_source": ["paper"]})
    sm = _toy_samples()
    d = ct.differential_interactions(
        _toy_de(), TOY_RESOURCE, _toy_props(), samples=sm, expr_prop=0.1, curated=cur
    )
    assert list(d.columns) == ct.DIFF_COLUMNS
    # B's LIG is below expr_prop: only A is a sender; A has no receptor -> only A -> B
    assert set(zip(d["source"], d["target"])) == {("A", "B")}
    assert set(d["receptor"]) == {"REC", "R1_R2", "REC2", "NOREC"}
    # per-sample score = liana lr_means: (ligand mean in A + receptor mean in B) / 2;
    # with the patient block the estimate is the mean paired difference
    g = {x: i for i, x in enumerate(TOY_GENES)}
    res_s = (sm.meta[schema.OBS_CONDITION] == "RES").to_numpy()
    for rec in ("REC", "REC2"):
        lr = (sm.mean[:, 0, g["LIG"]] + sm.mean[:, 1, g[rec]]) / 2
        row = d[d["receptor"] == rec].iloc[0]
        assert row["score"] == pytest.approx(np.mean(lr[res_s] - lr[~res_s]))
        assert row["lr_means"] == pytest.approx(lr[res_s].mean())
        assert row["lr_means_ref"] == pytest.approx(lr[~res_s].mean())
        assert row["paired"] and row["n_samples"] == 6 and row["direction"] == "up"
        assert row["source_frac"] == pytest.approx(0.25) and row["target_frac_log2fc"] == 0
    cplx = d[d["receptor"] == "R1_R2"].iloc[0]  # DE: limiting subunit, smallest |log2fc|
    assert cplx["receptor_gene"] == "R2" and cplx["receptor_log2fc"] == pytest.approx(-0.2)
    assert cplx["receptor_prop"] == pytest.approx(0.2) and not cplx["curated"]
    # complex mean for the per-sample score: the lowest subunit (liana)
    rmin = np.minimum(sm.mean[:, 1, g["R1"]], sm.mean[:, 1, g["R2"]])
    lr = (sm.mean[:, 0, g["LIG"]] + rmin) / 2
    assert cplx["lr_means"] == pytest.approx(lr[res_s].mean())
    simple = d[d["receptor"] == "REC"].iloc[0]
    assert simple["curated"] and simple["curated_source"] == "paper"
    assert (d["padj"] >= d["pvalue"]).all() and d["padj"].le(1).all()


def test_one_de_ligand_does_not_make_every_receptor_significant():
    """The issue: Stouffer with a missing / null receptor p counted as p = 1 called every
    receptor of a DE ligand. Now both partners need evidence; the table says which drives."""
    d = ct.differential_interactions(
        _toy_de(), TOY_RESOURCE, _toy_props(), samples=_toy_samples(), expr_prop=0.1
    ).set_index("receptor")
    # both partners change (LIG up in A, REC2 up in B): called, driver both
    assert d.loc["REC2", "called"] and d.loc["REC2", "driver"] == "both"
    assert d.loc["REC2", "pvalue_both"] == pytest.approx(max(d.loc["REC2", "pvalue"], 1e-6, 1e-5))
    # the per-sample score moves with the ligand alone, but the receptor does not change
    assert d.loc["REC", "padj"] <= 0.05
    assert not d.loc["REC", "called"] and d.loc["REC", "driver"] == "ligand"
    # a receptor without a DE test: no evidence (NaN), never p = 1
    assert np.isnan(d.loc["NOREC", "receptor_pvalue"]) and np.isnan(d.loc["NOREC", "pvalue_both"])
    assert not d.loc["NOREC", "called"] and d.loc["NOREC", "driver"] == "ligand"
    # opposite partner directions: not both
    assert d.loc["R1_R2", "driver"] in ("ligand", "opposing") and not d.loc["R1_R2", "called"]


def test_partner_padj_counts_each_de_test_once():
    d = ct.differential_interactions(
        _toy_de(), TOY_RESOURCE, _toy_props(), samples=_toy_samples(), expr_prop=0.1
    )
    # unique (cell type, gene) tests: A/LIG, B/REC, B/R2 (limiting), B/REC2 (NOREC untested)
    units = {("A", "LIG"): 1e-6, ("B", "REC"): 0.8, ("B", "R2"): 0.5, ("B", "REC2"): 1e-5}
    adj = dict(zip(units, ct.bh_adjust(np.array(list(units.values())))))
    assert np.allclose(d["ligand_padj"], adj[("A", "LIG")])
    for r in d.itertuples():
        if (r.target, r.receptor_gene) in adj:
            assert r.receptor_padj == pytest.approx(adj[(r.target, r.receptor_gene)])
        else:
            assert np.isnan(r.receptor_padj)


def test_differential_expression_filter_uses_condition_or_reference():
    resource = pd.DataFrame({"ligand": ["LIG"], "receptor": ["REC2"]})
    props = _toy_props(lig_in_b=0.01)
    # B expresses LIG in the condition only: it becomes a sender (B -> B)
    props.loc[
        (props["condition"] == "RES") & (props["cell_type"] == "B") & (props["gene"] == "LIG"),
        "prop",
    ] = 0.5
    d = ct.differential_interactions(
        _toy_de(), resource, props, samples=_toy_samples(), expr_prop=0.1
    )
    assert set(zip(d["source"], d["target"])) == {("A", "B"), ("B", "B")}
    bb = d[d["source"] == "B"].iloc[0]
    # B's LIG is down in the DE but REC2 up: the partners oppose each other
    assert bb["driver"] == "opposing" and not bb["called"]


def test_shrinkage_pulls_noisy_fold_changes_to_zero():
    rng = np.random.default_rng(0)
    d = pd.DataFrame({"log2fc": rng.normal(0, 1, 1000), "lfcse": 0.5})
    d.loc[0, ["log2fc", "lfcse"]] = [3.0, 0.1]  # precise
    d.loc[1, ["log2fc", "lfcse"]] = [3.0, 3.0]  # noisy
    s = ct.shrink_log2fc(d)
    assert s[0] == pytest.approx(3.0, rel=0.05) and abs(s[1]) < 0.5
    assert np.all(np.abs(s) <= np.abs(d["log2fc"]) + 1e-12)
    assert np.array_equal(ct.shrink_log2fc(d, shrink=False), d["log2fc"].to_numpy())
    assert np.array_equal(ct.shrink_log2fc(d.drop(columns="lfcse")), d["log2fc"].to_numpy())


def test_bh_matches_scipy():
    from scipy.stats import false_discovery_control

    p = np.random.default_rng(0).uniform(size=200) ** 3
    assert np.allclose(ct.bh_adjust(p), false_discovery_control(p))


# ----------------------------------------------------------------------------- the stage
def test_tables_schema_and_params(small_crosstalk):
    a, tables = small_crosstalk
    inter = get_table(a, schema.TABLE_INTERACTIONS)
    assert list(inter.columns) == ct.INTERACTIONS_COLUMNS and len(inter) > 0
    assert inter["curated"].dtype == bool
    assert set(inter["condition"]) == set(a.obs[schema.OBS_CONDITION].astype(str))
    assert schema.UNASSIGNED not in set(inter["source"]) | set(inter["target"])
    params = a.uns[ct.PARAMS_KEY]
    assert params["resource"] == "consensus" and params["n_perms"] == 20
    per_cond = inter[~inter["curated"]].groupby("condition").size()
    assert (per_cond <= params["top_n"]).all()
    bys = get_table(a, schema.TABLE_INTERACTIONS_BY_SAMPLE)
    assert list(bys.columns) == ct.BY_SAMPLE_COLUMNS and len(bys) > 0
    kept = set(map(tuple, inter[ct.KEY_COLS].to_numpy()))
    assert set(map(tuple, bys[ct.KEY_COLS].to_numpy())) <= kept
    assert bys[schema.OBS_SAMPLE].nunique() > 1
    diff = get_table(a, schema.TABLE_INTERACTIONS_DIFF)
    assert list(diff.columns) == ct.DIFF_COLUMNS and len(diff) > 0
    assert set(diff["reference"]) == {a.uns[schema.UNS_REFERENCE_CONDITION]}
    # rows without samples of both cell types in both states are kept untested (NaN)
    assert diff["padj"].dropna().between(0, 1).all() and diff["padj"].notna().mean() > 0.9
    assert diff["called"].dtype == bool
    # 3 patients x 4 states: paired where patients have both cell types in both states
    # (always for CLL -> CLL; rare types drop out of some samples at 200 cells per sample)
    cll = diff[(diff["source"] == "CLL") & (diff["target"] == "CLL")]
    assert len(cll) > 0 and cll["paired"].all() and (cll["n_samples"] == 6).all()
    assert set(diff["driver"]) <= {"both", "ligand", "receptor", "opposing", "none"}
    called = diff[diff["called"]]
    assert (called["driver"] == "both").all() and (called["padj"] <= 0.05).all()
    assert diff["source_frac"].between(0, 1).all() and diff["target_frac_ref"].between(0, 1).all()
    assert params["diff_alpha"] == 0.05 and "each counted once" in str(params["diff_units"])
    agree = get_table(a, schema.TABLE_LIGREC_AGREEMENT)
    assert list(agree.columns) == ct.AGREEMENT_COLUMNS and len(agree) >= 1
    # both tools implement the CellPhoneDB statistic on the same data: the means agree
    assert (agree["spearman_means"] > 0.95).all()
    assert (agree["jaccard"] > 0.5).all()


def test_per_sample_scores_are_lianas_lr_means(small_crosstalk):
    """The per-sample score the differential test uses is liana's by-sample lr_means."""
    a, _ = small_crosstalk
    cfg = fast_config().crosstalk
    w = ct.working_adata(a, ct._resource_genes(ct.load_resource("human")), cfg.groupby)
    sm = ct.SampleMeans.from_adata(w, cfg.groupby, cfg.min_cells)
    bys = get_table(a, schema.TABLE_INTERACTIONS_BY_SAMPLE).sample(n=400, random_state=0)
    lmap, L = sm.entity_means(bys["ligand"])
    rmap, R = sm.entity_means(bys["receptor"])
    s = sm.meta.index.get_indexer(bys[schema.OBS_SAMPLE].astype(str))
    tpos = {t: i for i, t in enumerate(sm.types)}
    ours = (
        L[bys["ligand"].map(lmap), s, bys["source"].map(tpos)]
        + R[bys["receptor"].map(rmap), s, bys["target"].map(tpos)]
    ) / 2
    assert np.allclose(ours, bys["lr_means"].to_numpy(float), rtol=1e-4, atol=1e-5)


def test_fast_liana_join_is_liana(small_crosstalk):
    """rank_aggregate with the array join (and indexed positions) = liana's own, exactly:
    same rows, order, columns, dtypes and values, with permutations and a complex pair."""
    import liana as li

    a, _ = small_crosstalk
    cfg = fast_config().crosstalk
    resource = ct.load_resource("human")
    w = ct.working_adata(a, ct._resource_genes(resource), cfg.groupby)
    sub = w[(w.obs[schema.OBS_CONDITION] == w.obs[schema.OBS_CONDITION].iloc[0]).to_numpy()]
    sub = sub.copy()
    res, sub = ct.expressed_resource(sub, resource, cfg)
    assert res["receptor"].str.contains(ct.COMPLEX_SEP).any()  # complexes are exercised
    kwargs = {**ct._liana_kwargs(cfg, res), "n_perms": 20}
    theirs = li.mt.rank_aggregate(sub.copy(), inplace=False, **kwargs)
    with ct._fast_liana():
        ours = li.mt.rank_aggregate(sub.copy(), inplace=False, **kwargs)
    from liana.method.sc import _liana_pipe

    assert not hasattr(_liana_pipe._join_stats, "__wrapped__")  # restored on exit
    assert _liana_pipe._join_stats.__module__.startswith("liana")
    assert len(theirs) > 1000
    pd.testing.assert_frame_equal(ours, theirs)


def test_curated_flags(small_crosstalk):
    a, tables = small_crosstalk
    cur = ct.load_curated("human")
    cpairs = set(zip(cur["ligand"], cur["receptor"]))
    for name in (schema.TABLE_INTERACTIONS, schema.TABLE_INTERACTIONS_DIFF):
        df = get_table(a, name)
        pairs = list(zip(df["ligand"], df["receptor"]))
        assert (df["curated"].to_numpy() == np.array([p in cpairs for p in pairs])).all()
        assert (df.loc[df["curated"], "curated_source"].str.len() > 0).all()
        assert (df.loc[~df["curated"], "curated_source"] == "").all()
    inter = get_table(a, schema.TABLE_INTERACTIONS)
    assert inter["curated"].any(), "no curated CLL interaction found in the small simulation"


def test_h5ad_roundtrip(small_crosstalk, tmp_path):
    import anndata as ad

    a, _ = small_crosstalk
    path = tmp_path / "a.h5ad"
    a.write_h5ad(path)
    b = ad.read_h5ad(path)
    for name in (
        schema.TABLE_INTERACTIONS,
        schema.TABLE_INTERACTIONS_BY_SAMPLE,
        schema.TABLE_INTERACTIONS_DIFF,
        schema.TABLE_LIGREC_AGREEMENT,
    ):
        pd.testing.assert_frame_equal(get_table(a, name), get_table(b, name), check_dtype=False)
    assert b.uns[ct.PARAMS_KEY]["resource"] == "consensus"


def test_missing_de_table_names_the_command(small_sim, tmp_path):
    from atlas.io import write_h5ad_atomic
    from tme_atlas.cli import main

    a = true_label_atlas(small_sim, coarse=True)
    with pytest.raises(schema.MissingKeyError, match="tme-atlas analyse DIR"):
        ct.run_crosstalk(a, config=fast_config())
    write_h5ad_atomic(a, tmp_path / schema.ATLAS_FILE)
    with pytest.raises(schema.MissingKeyError, match="tme-atlas analyse DIR"):
        ct.run_crosstalk_dir(tmp_path, config=fast_config())
    assert main(["crosstalk", str(tmp_path)]) == 2


def test_run_crosstalk_dir_writes_tables(small_crosstalk, tmp_path):
    import anndata as ad

    from atlas.io import write_h5ad_atomic

    a, _ = small_crosstalk
    write_h5ad_atomic(a, tmp_path / schema.ATLAS_FILE)
    cfg = fast_config(crosstalk={"by_sample": False, "ligrec_check": False})
    with _NoNetwork():
        ct.run_crosstalk_dir(tmp_path, config=cfg)
    for name in ("interactions", "interactions_diff"):
        df = pd.read_csv(tmp_path / schema.TABLES_DIR / f"{name}.csv")
        assert len(df) > 0
    b = ad.read_h5ad(tmp_path / schema.ATLAS_FILE)
    assert len(get_table(b, schema.TABLE_INTERACTIONS_BY_SAMPLE)) == 0


def test_mouse_uses_mouseconsensus():
    from preprocessing.analyses import run_analyses
    from preprocessing.simulate import simulate

    sim = simulate(
        seed=2, n_patients=2, cells_per_sample=150, species="mouse", conditions=("NAIVE", "IBR_RES")
    )
    a = true_label_atlas(sim, coarse=True)
    a.uns[schema.UNS_SPECIES] = "mouse"
    cfg = fast_config(crosstalk={"by_sample": False, "ligrec_check": False})
    run_analyses(a, config=cfg)
    with _NoNetwork():
        ct.run_crosstalk(a, config=cfg)
    assert a.uns[ct.PARAMS_KEY]["resource"] == "mouseconsensus"
    inter = get_table(a, schema.TABLE_INTERACTIONS)
    assert len(inter) > 0
    mouse = ct.load_resource("mouse")
    assert set(zip(inter["ligand"], inter["receptor"])) <= set(
        zip(mouse["ligand"], mouse["receptor"])
    )
    assert len(get_table(a, schema.TABLE_INTERACTIONS_DIFF)) > 0


# ----------------------------------------------------------------------------- truth recovery
def score_against_truth(diff_all: pd.DataFrame, lr_truth: pd.DataFrame, seed: int = 0) -> dict:
    """Planted two-sided changes (truth ``kind == planted``: both partners change) against
    every negative: nulls, ligand-only pairs (only the ligand changes), unchanged axes and
    up to 2,000 random tested rows absent from the truth.

    * ``auroc``: ranking by ``pvalue_both`` (smaller = stronger; a row that was not tested,
      or has a partner without a DE test, ranks last: no evidence);
    * ``direction``: sign of ``score`` (per-sample change) vs the planted direction;
    * ``planted_called``, ``ligand_only_called``, ``null_called``: fractions ``called``
      (untested rows count as not called);
    * ``ligand_only_driver``: among ligand-only rows significant on the per-sample test,
      the fraction whose ``driver`` says ``ligand``.
    """
    from sklearn.metrics import roc_auc_score

    key = ["condition", "source", "target", "ligand", "receptor"]
    m = lr_truth.merge(diff_all, on=key, how="left", suffixes=("_truth", ""))
    pos = m[m["kind"] == "planted"]
    neg_truth = m[m["kind"].isin(["null", "ligand_only", "unchanged_axis"])]
    rand = diff_all.merge(lr_truth[key], on=key, how="left", indicator=True)
    rand = rand[rand["_merge"] == "left_only"].sample(n=min(2000, len(rand)), random_state=seed)

    def strength(df):
        return -np.log10(df["pvalue_both"].astype(float).clip(lower=1e-300).fillna(1.0))

    neg = np.r_[strength(neg_truth).to_numpy(), strength(rand).to_numpy()]
    posv = strength(pos).to_numpy()
    y = np.r_[np.ones(len(posv)), np.zeros(len(neg))]
    want = np.where(pos["direction_truth"] == "up", 1, -1)

    def called(df):
        return float(df["called"].fillna(False).astype(bool).mean()) if len(df) else 0.0

    lig = m[m["kind"] == "ligand_only"]
    lig_sig = lig[lig["padj"] <= 0.05]
    ligv = strength(lig).to_numpy()
    return {
        "auroc": float(roc_auc_score(y, np.r_[posv, neg])),
        "auroc_vs_ligand_only": float(
            roc_auc_score(np.r_[np.ones(len(posv)), np.zeros(len(ligv))], np.r_[posv, ligv])
        ),
        "direction": float(np.mean(np.sign(pos["score"].fillna(0)) == want)),
        "planted_called": called(pos),
        "ligand_only_called": called(lig),
        "null_called": called(m[m["kind"] == "null"]),
        "ligand_only_driver": float((lig_sig["driver"] == "ligand").mean())
        if len(lig_sig)
        else float("nan"),
        "n_planted": int(len(pos)),
        "n_planted_tested": int(pos["score"].notna().sum()),
        "n_ligand_only_tested": int(lig["score"].notna().sum()),
        "n_null_tested": int(m.loc[m["kind"] == "null", "score"].notna().sum()),
    }


def coarse_truth(lr: pd.DataFrame) -> pd.DataFrame:
    """The LR truth on the coarse labels of :func:`true_label_atlas`; keys that merge rows
    of different kinds are dropped."""
    key = ["condition", "source", "target", "ligand", "receptor"]
    t = lr.assign(
        source=lr["source"].map(lambda x: COARSE.get(x, x)),
        target=lr["target"].map(lambda x: COARSE.get(x, x)),
    )
    t = t[(t["source"] != schema.UNASSIGNED) & (t["target"] != schema.UNASSIGNED)]
    one_kind = t.groupby(key)["kind"].transform("nunique") == 1
    return t[one_kind].drop_duplicates(key).reset_index(drop=True)


def test_small_sim_ligand_only_pairs_not_called(small_crosstalk, small_sim):
    """Cheap check on the session fixture (3 patients, coarse true labels): planted
    two-sided changes ranked first and called; ligand-only pairs and nulls not called."""
    _, tables = small_crosstalk
    res = score_against_truth(tables["interactions_diff_all"], coarse_truth(small_sim.truth["lr"]))
    print(res)
    assert res["n_planted_tested"] >= 4 and res["n_ligand_only_tested"] >= 20, res
    assert res["auroc"] >= 0.9 and res["direction"] >= 0.9, res
    assert res["auroc_vs_ligand_only"] >= 0.9, res
    assert res["ligand_only_called"] <= 0.05 and res["null_called"] <= 0.05, res


@pytest.mark.slow
def test_recovers_planted_lr_changes_default_sim():
    """Default demo simulation, true labels, analyses' pseudobulk DE, default config."""
    import time

    from atlas.config import load_config
    from preprocessing.analyses import run_analyses
    from preprocessing.simulate import simulate

    sim = simulate(seed=0)
    a = true_label_atlas(sim)
    cfg = load_config(env={})
    run_analyses(a, config=cfg)
    t = time.perf_counter()
    with _NoNetwork():
        tables = get_tables(ct.run_crosstalk(a, config=cfg, keep_all_diff=True))
    elapsed = time.perf_counter() - t
    res = score_against_truth(tables["interactions_diff_all"], sim.truth["lr"])
    print(f"crosstalk on the default sim: {elapsed:.0f}s; {res}")
    assert res["auroc"] >= 0.95 and res["auroc_vs_ligand_only"] >= 0.95, res
    assert res["direction"] >= 0.95, res
    assert res["planted_called"] >= 0.8, res
    assert res["ligand_only_called"] <= 0.05, res
    assert res["null_called"] <= 0.05, res
    assert res["n_ligand_only_tested"] >= 20, res
    assert elapsed < 600  # 2 min target on a quiet machine; CI runners are shared


@pytest.mark.slow
def test_demo_atlas_crosstalk(demo_atlas_dir, demo_sim_dir):
    """The full build (own annotation): tables present; planted changes still recovered."""
    import anndata as ad

    b = ad.read_h5ad(demo_atlas_dir / schema.ATLAS_FILE)
    for name in (
        schema.TABLE_INTERACTIONS,
        schema.TABLE_INTERACTIONS_BY_SAMPLE,
        schema.TABLE_INTERACTIONS_DIFF,
        schema.TABLE_LIGREC_AGREEMENT,
    ):
        assert len(get_table(b, name)) > 0, name
        assert (demo_atlas_dir / schema.TABLES_DIR / f"{name}.csv").is_file()
    lr = pd.read_csv(demo_sim_dir / "truth" / "lr.csv")
    cfg_types = set(b.obs[schema.OBS_CELL_TYPE].astype(str))
    lr = lr[lr["source"].isin(cfg_types) & lr["target"].isin(cfg_types)]
    if lr["kind"].eq("planted").sum() < 10:
        pytest.skip("annotation labels do not match the simulator's cell types")
    diff = get_table(b, schema.TABLE_INTERACTIONS_DIFF)
    res = score_against_truth(diff, lr)
    print(f"demo atlas (stored rows only): {res}")
    assert res["direction"] >= 0.7, res
