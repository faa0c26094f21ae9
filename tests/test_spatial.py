"""Spatial sections (preprocessing.spatial, preprocessing.spatial_sim) against planted truth.

Small sections (4 patients x 3 states x 2,500 cells); the typing reference comes from the
scRNA simulator with the same seed (the atlas path is exercised by the command test).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from atlas import schema

SEED = 1


@pytest.fixture(scope="module")
def analysed():
    from preprocessing import spatial as SP
    from preprocessing.simulate import simulate
    from preprocessing.spatial_sim import simulate_spatial

    sim = simulate_spatial(seed=SEED, n_patients=4, cells_per_section=6000)
    sc_sim = simulate(
        seed=SEED, n_patients=2, cells_per_sample=300, conditions=("NAIVE", "IBR_RES")
    )
    ref_ad = sc_sim.adata
    keep = ~(ref_ad.obs["is_doublet"].astype(bool) | ref_ad.obs["low_quality"].astype(bool))
    ref_ad = ref_ad[keep.to_numpy()].copy()
    ref_ad.layers[schema.LAYER_COUNTS] = ref_ad.X
    ref = SP.reference_from_counts(ref_ad, "true_cell_type")
    a = sim.adata
    for c in (schema.OBS_SAMPLE, schema.OBS_CONDITION, schema.OBS_PATIENT):
        a.obs[c] = pd.Categorical(a.obs[c], categories=list(dict.fromkeys(a.obs[c])))
    SP.map_cell_types(a, ref, min_confidence=0.5)
    SP._normalise(a)
    SP.spatial_graph(a)
    by_section = SP.nhood_enrichment(a, n_perms=200)
    nhood = SP.combine_nhood(by_section)
    SP.find_niches(a, k=20, n_niches=8)
    comp, props, test = SP.niche_tables(a, reference="NAIVE")
    lr = sim.truth["spatial_lr"]
    table, by_sec, local = SP.spatial_lr(a, lr.assign(source_table="truth"))
    meta = a.obs.drop_duplicates(schema.OBS_SAMPLE).set_index(schema.OBS_SAMPLE)
    meta = meta[[schema.OBS_PATIENT, schema.OBS_CONDITION]].astype(str)
    meta.index = meta.index.astype(str)
    lr_diff = SP.compare_lr_states(by_sec, meta, reference="NAIVE")
    return {"lr_diff": lr_diff,"sim": sim, "adata": a, "nhood": nhood, "by_section": by_section, "niche_test": test,
            "lr": table, "local": local}  # fmt: skip


def test_typing_accuracy(analysed):
    obs = analysed["adata"].obs
    pred = obs[schema.OBS_CELL_TYPE].astype(str)
    true = obs["true_cell_type"].astype(str)
    typed = pred != schema.SPATIAL_UNKNOWN
    assert typed.mean() >= 0.95
    assert (pred[typed] == true[typed]).mean() >= 0.95
    conf = obs[schema.OBS_CELL_TYPE_CONFIDENCE].to_numpy()
    right = (pred == true).to_numpy()
    assert conf[right].mean() > conf[~right].mean()  # uncertainty means something


def _lookup(nhood: pd.DataFrame) -> dict:
    d = {}
    for r in nhood[nhood[schema.COL_CONDITION] == "all"].itertuples():
        d[(r.cell_type_a, r.cell_type_b)] = r
        d[(r.cell_type_b, r.cell_type_a)] = r
    return d


def test_nhood_enrichment_recovers_planted_pairs(analysed):
    truth = analysed["sim"].truth["nhood"]
    d = _lookup(analysed["nhood"])
    planted = truth[truth.kind.isin(["positive", "negative"])]
    sign = np.where(planted.kind == "positive", 1, -1)
    rows = [d[(a, b)] for a, b in planted[["type_a", "type_b"]].values]
    assert len(rows) >= 30
    correct = np.array([np.sign(r.zscore) for r in rows]) == sign
    assert correct.mean() >= 0.9, correct.mean()
    called = np.array([r.padj < 0.05 for r in rows]) & correct
    assert called.mean() >= 0.8, called.mean()
    nulls = [d[(a, b)] for a, b in truth.loc[truth.kind == "null", ["type_a", "type_b"]].values]
    frac_sig = np.mean([r.padj < 0.05 for r in nulls])
    assert len(nulls) >= 30
    assert frac_sig <= 0.05, frac_sig


def test_niche_changes_across_states(analysed):
    a = analysed["adata"]
    truth = analysed["sim"].truth["niches"]
    test = analysed["niche_test"]
    tab = pd.crosstab(a.obs[schema.OBS_NICHE], a.obs["region"])
    share = tab.div(tab.sum(axis=1), axis=0)
    checked = 0
    for niche, row in share.iterrows():
        region = row.idxmax()
        if row.max() < 0.6 or region == "background":
            continue
        for t in truth[(truth.region == region) & (truth.direction != "none")].itertuples():
            r = test[
                (test[schema.COL_NICHE] == niche) & (test[schema.COL_CONDITION] == t.condition)
            ]
            assert len(r) == 1
            assert np.sign(r[schema.COL_LOG2FC].iloc[0]) == np.sign(t.area_log2fc), (niche, t)
            checked += 1
    assert checked >= 3
    # the largest planted change (macrophage-CLL contact x3 under venetoclax) is called
    myeloid = share["myeloid_contact"].idxmax()
    r = test[(test[schema.COL_NICHE] == myeloid) & (test[schema.COL_CONDITION] == "VEN_RES")]
    assert r[schema.COL_PVALUE].iloc[0] < 0.05


def test_spatial_lr_ranks_planted_pairs(analysed):
    from sklearn.metrics import roc_auc_score

    truth = analysed["sim"].truth["spatial_lr"]
    table = analysed["lr"]
    assert len(table) == len(truth)
    merged = truth.merge(table, on=[schema.COL_LIGAND, schema.COL_RECEPTOR])
    y = (merged["kind"] == "planted").to_numpy()
    assert roc_auc_score(y, merged[schema.COL_LOCAL_MEAN]) >= 0.9
    assert analysed["local"].shape == (analysed["adata"].n_obs, len(table))


def test_spatial_lr_change_across_states(analysed):
    """Pairs whose contact-dependent expression rises under venetoclax resistance: higher
    per-section local scores in VEN_RES (paired test, section as unit), above every null
    pair of the same sender and receiver types (which change only with the niches)."""
    truth = analysed["sim"].truth["spatial_lr"]
    d = analysed["lr_diff"]
    d = d[d[schema.COL_CONDITION] == "VEN_RES"].set_index(schema.COL_INTERACTION)
    assert d["paired"].all()
    state = truth[truth["state_up"].fillna("") == "VEN_RES"]
    assert len(state) == 2
    for r in state.itertuples():
        row = d.loc[f"{r.ligand}^{r.receptor}"]
        assert row["change"] > 0 and row[schema.COL_PADJ] < 0.05, row
        same = truth[(truth.kind == "null") & (truth.sender == r.sender)
                     & (truth.receiver == r.receiver)]  # fmt: skip
        t_null = [d.loc[f"{x.ligand}^{x.receptor}", "t"] for x in same.itertuples()]
        assert len(t_null) >= 1 and row["t"] > max(t_null), (row["t"], t_null)


# ----------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def spatial_input(tmp_path_factory):
    from preprocessing.spatial_sim import write_spatial_dataset

    out = tmp_path_factory.mktemp("spatial_sim") / "sim"
    # seed 1: the profiles of small_sim_dir, whose atlas types these cells
    write_spatial_dataset(out, seed=1, n_patients=2, cells_per_section=1500)
    return out


def test_spatial_command(spatial_input, small_atlas_dir_session, tmp_path):
    from tme_atlas.cli import main

    out = tmp_path / "spatial"
    rc = main([
        "spatial", str(spatial_input / "samplesheet.csv"), "--atlas",
        str(small_atlas_dir_session), "--out", str(out),
        "--interactions", str(spatial_input / "truth" / "spatial_lr.csv"),
    ])  # fmt: skip
    assert rc == 0
    for name in schema.SPATIAL_TABLE_COLUMNS:
        df = pd.read_csv(out / schema.TABLES_DIR / f"{name}.csv")
        assert list(df.columns) == schema.SPATIAL_TABLE_COLUMNS[name], name
        assert len(df), name
    cells = pd.read_parquet(out / schema.SPATIAL_CELLS_FILE)
    truth = pd.read_csv(spatial_input / "truth" / "cells.csv").set_index("cell_id")
    assert set(cells.index) <= set(truth.index)  # Xenium and h5ad sections alike
    true = truth.loc[cells.index, "true_cell_type"]
    pred = cells[schema.OBS_CELL_TYPE]
    labels = set(pred.unique())
    in_atlas = true.isin(labels).to_numpy()
    assert in_atlas.mean() > 0.8
    acc = (pred.to_numpy() == true.to_numpy())[in_atlas].mean()
    assert acc >= 0.8, acc
    local = np.load(out / schema.SPATIAL_LR_LOCAL_FILE)
    assert local.shape[0] == len(cells)
    from atlas.spatial import SpatialResults

    res = SpatialResults(out)
    g = res.genes[0]
    expr = res.expression(g)
    assert expr.shape == (len(cells),) and np.isfinite(expr).all() and (expr > 0).any()


def _write_bad(spatial_input, tmp_path, kind: str):
    import shutil

    import anndata as ad

    d = tmp_path / "bad"
    shutil.copytree(spatial_input, d)
    sheet = pd.read_csv(d / "samplesheet.csv")
    h5 = d / sheet.loc[1, "path"]
    xen = d / sheet.loc[0, "path"]
    if kind == "no_coordinates":
        a = ad.read_h5ad(h5)
        del a.obsm["spatial"]
        a.write_h5ad(h5)
    elif kind == "nan_coordinates":
        a = ad.read_h5ad(h5)
        a.obsm["spatial"][:5] = np.nan
        a.write_h5ad(h5)
    elif kind == "cells_without_counts":
        cells = pd.read_csv(xen / "cells.csv.gz")
        extra = cells.head(3).assign(cell_id=["ghost1", "ghost2", "ghost3"])
        pd.concat([cells, extra]).to_csv(xen / "cells.csv.gz", index=False)
    elif kind == "empty_cells":
        a = ad.read_h5ad(h5)
        a.layers["counts"] = a.layers["counts"] * 0
        a.X = a.layers["counts"]
        a.write_h5ad(h5)
    return d / "samplesheet.csv"


@pytest.mark.parametrize(
    "kind,needle",
    [
        ("no_coordinates", "missing coordinates"),
        ("nan_coordinates", "NaN"),
        ("cells_without_counts", "cells without counts"),
        ("empty_cells", "cells without counts"),
    ],
)
def test_bad_spatial_inputs(spatial_input, tmp_path, kind, needle):
    from atlas.errors import InputError
    from preprocessing.spatial import read_sections

    sheet = _write_bad(spatial_input, tmp_path, kind)
    with pytest.raises(InputError) as e:
        read_sections(sheet)
    assert len(e.value.problems) == 1
    assert needle in e.value.problems[0]
    assert "P0" in e.value.problems[0]  # names the section


def test_bad_spatial_input_cli(spatial_input, small_atlas_dir_session, tmp_path, capsys):
    from tme_atlas.cli import main

    sheet = _write_bad(spatial_input, tmp_path, "no_coordinates")
    out = tmp_path / "out"
    rc = main(["spatial", str(sheet), "--atlas", str(small_atlas_dir_session), "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing coordinates" in err[0]
    assert not out.exists()


def test_simulate_spatial_command(tmp_path):
    from tme_atlas.cli import main

    out = tmp_path / "sim"
    rc = main(["simulate-spatial", "--out", str(out), "--patients", "1",
               "--cells-per-section", "300"])  # fmt: skip
    assert rc == 0
    sheet = pd.read_csv(out / "samplesheet.csv")
    assert list(sheet.columns) == list(schema.SHEET_REQUIRED)
    assert len(sheet) == 3 and (out / sheet.loc[0, "path"] / schema.XENIUM_MATRIX_FILE).is_file()
    for name in ("cells", "nhood", "niches", "spatial_lr"):
        assert (out / "truth" / f"{name}.csv").is_file()


def test_panel_not_in_the_atlas_is_one_line(spatial_input, small_atlas_dir_session, tmp_path,
                                            capsys):  # fmt: skip
    import shutil

    import anndata as ad

    from tme_atlas.cli import main

    d = tmp_path / "bad"
    shutil.copytree(spatial_input, d)
    sheet = pd.read_csv(d / "samplesheet.csv")
    sheet = sheet.iloc[1:2]  # one h5ad section, its genes renamed
    sheet.to_csv(d / "samplesheet.csv", index=False)
    h5 = d / sheet["path"].iloc[0]
    a = ad.read_h5ad(h5)
    a.var_names = [f"NOTAGENE{i}" for i in range(a.n_vars)]
    a.write_h5ad(h5)
    out = tmp_path / "out"
    rc = main(["spatial", str(d / "samplesheet.csv"), "--atlas", str(small_atlas_dir_session),
               "--out", str(out)])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "measured by the atlas" in err[0]
    assert not out.exists()
