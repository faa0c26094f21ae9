"""Malignant-cell call (clonality + copy number + programme) against the simulator's truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_annotate import _clean, _pca_build

from atlas import schema
from atlas.tables import get_table, put_table
from preprocessing import annotate as A
from preprocessing.malignant import call_malignant
from preprocessing.simulate import CLL_TYPES, simulate
from preprocessing.vdj import contigs_table, read_contigs

B_TYPES = (*CLL_TYPES, "Normal B")


@pytest.fixture(scope="module")
def cll_cohort():
    sim = simulate(seed=3, n_patients=4, cells_per_sample=300, lesions=True, vdj=True)
    a = _pca_build(_clean(sim))
    A.annotate(a, species="human")
    return sim, a


def _scores(a):
    t = a.obs["true_cell_type"].astype(str).to_numpy()
    truth = np.isin(t, CLL_TYPES)
    tb = np.isin(t, B_TYPES)
    pred = a.obs[schema.OBS_MALIGNANT].to_numpy(dtype=bool)
    normal = tb & ~truth
    return (pred[tb] == truth[tb]).mean(), (~pred[normal]).mean()


def _with_contigs(sim, a, tmp_path):
    parts = {}
    for sid, df in sim.vdj.items():
        f = tmp_path / f"{sid}.csv"
        df.to_csv(f, index=False)
        bcs = sim.adata.obs.loc[sim.adata.obs["sample_id"] == sid, "barcode"].astype(str)
        parts[sid] = read_contigs(f, bcs, label=f"sample '{sid}'")
    put_table(a, schema.TABLE_VDJ_CONTIGS, contigs_table(parts))
    return a


def test_call_without_vdj_and_lesions(cll_cohort):
    sim, a = cll_cohort
    a = call_malignant(a.copy(), species="human")
    acc, spec = _scores(a)
    assert acc >= 0.95, acc
    assert spec >= 0.8, spec
    # planted lesions recovered per patient; none called where none was planted
    les = get_table(a, schema.TABLE_LESIONS)
    called = {(r.patient, r.lesion) for r in les[les["called"]].itertuples()}
    planted = {(r.patient, r.lesion) for r in sim.truth["lesions"].itertuples()}
    planted = {(p, "del(13q14)" if x.startswith("del(13q") else x) for p, x in planted}
    sens = len(called & planted) / len(planted)
    assert sens >= 0.9, (called, planted)
    assert not (called - planted), called - planted
    # labels follow the call
    ct = a.obs[schema.OBS_CELL_TYPE].astype(str)
    mal = a.obs[schema.OBS_MALIGNANT].to_numpy(dtype=bool)
    assert not ct[~mal].str.startswith("CLL").any()
    assert (a.obs[schema.OBS_MALIGNANT_CONFIDENCE][mal] > 0.5).mean() > 0.9


def test_call_with_vdj(cll_cohort, tmp_path):
    sim, a = cll_cohort
    a = call_malignant(_with_contigs(sim, a.copy(), tmp_path), species="human")
    acc, spec = _scores(a)
    assert acc >= 0.98, acc
    assert spec >= 0.9, spec
    clones = get_table(a, schema.TABLE_CLONES)
    truth = sim.truth["clones"].set_index("patient")
    for r in clones.itertuples():
        assert r.clonal and r.source == "vdj"
        assert r.ighv == truth.loc[r.patient, "ighv"]


def test_healthy_donors_have_no_cll():
    sim = simulate(seed=4, n_patients=2, cells_per_sample=250, healthy=True)
    a = _pca_build(_clean(sim))
    A.annotate(a, species="human")
    a = call_malignant(a, species="human")
    assert int(a.obs[schema.OBS_MALIGNANT].sum()) == 0
    assert not a.obs[schema.OBS_CELL_TYPE].astype(str).str.startswith("CLL").any()
    assert not get_table(a, schema.TABLE_LESIONS)["called"].any()


def test_bad_vdj_files(tmp_path, cll_cohort):
    sim, _ = cll_cohort
    sid = next(iter(sim.vdj))
    other = list(sim.vdj)[-1]
    f = tmp_path / "x.csv"
    sim.vdj[other].to_csv(f, index=False)
    bcs = sim.adata.obs.loc[sim.adata.obs["sample_id"] == sid, "barcode"].astype(str)
    with pytest.raises(ValueError, match="cell barcodes"):
        read_contigs(f, bcs, label=f"sample '{sid}'")
    f.write_text("this,is\nnot,contigs\n")
    with pytest.raises(ValueError, match="missing column"):
        read_contigs(f, bcs, label=f"sample '{sid}'")


def test_mouse_cohort():
    sim = simulate(seed=5, n_patients=3, cells_per_sample=250, species="mouse", lesions=True)
    a = _pca_build(_clean(sim))
    A.annotate(a, species="mouse")
    a = call_malignant(a, species="mouse")
    acc, spec = _scores(a)
    assert acc >= 0.95, acc


@pytest.mark.realdata
def test_kang_healthy_pbmc_has_no_cll():
    """Real healthy-donor PBMC: at most 2% of B cells called CLL (even if every B cell
    arrives labelled CLL)."""
    import anndata as ad
    import scanpy as sc
    from conftest import shared_file

    a = ad.read_h5ad(shared_file("kang2018_pbmc_ifnb_labelled.h5ad"))
    a.layers[schema.LAYER_COUNTS] = a.X.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    a.obs[schema.OBS_PATIENT] = a.obs["sample_id"].astype(str).str[-3:]
    lab = a.obs["cluster_id"].astype(str)
    is_b = (lab == "B cells").to_numpy()
    a.obs[schema.OBS_LINEAGE] = np.where(
        is_b, "B/CLL", np.where(lab.str.contains("T cells"), "T/NK", "Myeloid")
    )
    a.obs[schema.OBS_CELL_TYPE] = pd.Categorical(np.where(is_b, "CLL resting", lab))
    a.obs[schema.OBS_CELL_TYPE_CONFIDENCE] = 1.0
    a = call_malignant(a, species="human")
    frac = a.obs.loc[is_b, schema.OBS_MALIGNANT].mean()
    assert frac <= 0.02, frac
    assert (a.obs.loc[is_b, schema.OBS_CELL_TYPE].astype(str) == "Normal B").all()


def test_build_stage_on_the_small_atlas(small_atlas_dir_session, small_sim_dir):
    """The build's ``malignant`` stage (after scVI, clustering, annotation) against the
    simulator's truth: B-lineage call accuracy, CLL labels only on malignant cells, and no
    lesion called (the small cohort has none planted)."""
    import anndata as ad

    from preprocessing.simulate import load_truth

    a = ad.read_h5ad(small_atlas_dir_session / schema.ATLAS_FILE)
    cells = load_truth(small_sim_dir)["cells"].set_index("cell_id").reindex(a.obs_names)
    clean = ~(cells["is_doublet"].astype(bool) | cells["low_quality"].astype(bool)).to_numpy()
    a = a[clean].copy()
    a.obs["true_cell_type"] = cells.loc[clean, "cell_type"].astype(str).to_numpy()
    acc, spec = _scores(a)
    assert acc >= 0.95, acc
    mal = a.obs[schema.OBS_MALIGNANT].to_numpy(dtype=bool)
    assert not a.obs[schema.OBS_CELL_TYPE].astype(str)[~mal].str.startswith("CLL").any()
    assert not get_table(a, schema.TABLE_LESIONS)["called"].any()
    assert get_table(a, schema.TABLE_CLONES)["clonal"].all()
    assert a.uns[schema.params_key("malignant")]["min_clone_fraction"] == 0.2
