"""Gene-programme scores: keys, used genes, missing genes and planted effects."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from atlas import schema
from preprocessing import integrate as I
from preprocessing.programs import programme_genes, score_programs


@pytest.fixture(scope="module")
def sim_scored(small_sim):
    a = small_sim.adata
    a = a[~(a.obs.is_doublet | a.obs.low_quality)].copy()
    I.normalize(a)
    score_programs(a, species="human")
    return a


def test_scores_and_used_genes(sim_scored):
    a = sim_scored
    used = a.uns[schema.UNS_PROGRAMS]
    for name in programme_genes("human"):
        if name in used:
            key = schema.score_key(name)
            assert key in a.obs and np.isfinite(a.obs[key]).all()
            assert set(used[name]) <= set(a.var_names)
    for name in ("proteasome", "bcl2_antiapoptotic", "bcr_early", "nfkb_ln", "proliferation"):
        assert name in used and len(used[name]) >= 3
    assert a.uns[schema.UNS_PARAMS_PREFIX + "programs"]["method"].startswith("scanpy")


def _cll_means(a, name):
    cll = a.obs.true_cell_type.astype(str).str.startswith("CLL")
    s = a.obs.loc[cll, schema.score_key(name)]
    return s.groupby(a.obs.loc[cll, "condition"].astype(str)).mean()


def test_planted_programme_shifts(sim_scored):
    """The simulator plants proteasome up (IBR_RES), anti-apoptotic BCL2 family up (VEN_RES)
    and BCR / NF-kB targets down (IBR_EARLY) in CLL cells."""
    a = sim_scored
    prot = _cll_means(a, "proteasome")
    assert prot["IBR_RES"] > prot["NAIVE"] + 0.05
    bcl2 = _cll_means(a, "bcl2_antiapoptotic")
    assert bcl2["VEN_RES"] > bcl2["NAIVE"] + 0.1
    bcr = _cll_means(a, "bcr_early")
    assert bcr["IBR_EARLY"] < bcr["NAIVE"] - 0.1
    # a proliferation score separates proliferating CLL cells
    prolif = a.obs[schema.score_key("proliferation")]
    t = a.obs.true_cell_type.astype(str)
    assert prolif[t == "CLL proliferating"].mean() > prolif[t == "CLL resting"].mean() + 0.5


def test_missing_genes_dropped_and_small_programmes_skipped():
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(100)] + ["PSMA1", "PSMA2", "PSMB5", "BCL2"]
    a = ad.AnnData(sp.csr_matrix(rng.poisson(1.0, (80, len(genes))).astype(np.float32)))
    a.var_names = genes
    I.normalize(a)
    score_programs(
        a,
        species="human",
        programs={"proteasome": ["PSMA1", "PSMA2", "PSMB5", "NOTAGENE"], "tiny": ["BCL2", "X"]},
    )
    assert a.uns[schema.UNS_PROGRAMS] == {"proteasome": ["PSMA1", "PSMA2", "PSMB5"]}
    assert schema.score_key("proteasome") in a.obs
    assert schema.score_key("tiny") not in a.obs
    assert "tiny" in a.uns[schema.UNS_PARAMS_PREFIX + "programs"]["skipped"]


def test_deterministic(sim_scored):
    b = sim_scored.copy()
    before = b.obs[schema.score_key("proteasome")].copy()
    score_programs(b, species="human")
    pd.testing.assert_series_equal(before, b.obs[schema.score_key("proteasome")])
