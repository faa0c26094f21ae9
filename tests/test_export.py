"""atlas.export: round trips, subsets, refusals, tables, model, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from atlas import schema
from atlas.errors import InputError
from atlas.export import export_adata, export_atlas, select_cells, select_genes
from atlas.store import NotAnAtlasError, write_atlas
from atlas.testing import make_synthetic_adata


@pytest.fixture(scope="module")
def source():
    a = make_synthetic_adata(n_cells=2500, n_genes=250, n_patients=2, seed=5)
    cats = a.obs[schema.OBS_CELL_TYPE].cat.categories
    a.uns[f"{schema.OBS_CELL_TYPE}_colors"] = np.array(
        [f"#{i:02x}{i:02x}{i:02x}" for i in range(len(cats))], dtype=object
    )
    return a


@pytest.fixture(scope="module")
def atlas_dir(source, tmp_path_factory) -> Path:
    d = write_atlas(source, tmp_path_factory.mktemp("exp") / "atlas")
    model = d / schema.MODEL_DIR
    model.mkdir()
    (model / "model.pt").write_bytes(b"weights")
    return d


def _csr_equal(a, b) -> bool:
    return a.shape == b.shape and (a != b).nnz == 0


def test_full_export_round_trip(atlas_dir, source, tmp_path):
    out = export_atlas(atlas_dir, tmp_path / "all.h5ad")
    got = ad.read_h5ad(out)
    assert got.shape == source.shape
    assert list(got.obs_names) == list(source.obs_names)
    assert list(got.var_names) == list(source.var_names)
    assert _csr_equal(got.layers[schema.LAYER_COUNTS], source.layers[schema.LAYER_COUNTS])
    assert _csr_equal(got.X, source.X)
    for col in source.obs.columns:
        assert list(got.obs[col].astype(str)) == list(source.obs[col].astype(str)), col
    for key in (schema.OBSM_UMAP, schema.OBSM_SCVI, schema.OBSM_PCA):
        assert np.array_equal(got.obsm[key], source.obsm[key])
    assert got.uns[schema.UNS_PROVENANCE]["tool"] == "atlas.testing.make_synthetic_adata"
    for name, df in source.uns[schema.UNS_TABLES].items():
        t = got.uns[schema.UNS_TABLES][name]
        assert isinstance(t, pd.DataFrame)
        assert list(t.columns) == list(df.columns)
        assert len(t) == len(df)
    info = got.uns[schema.UNS_EXPORT]
    assert info["n_cells"] == source.n_obs and json.loads(info["filters_json"]) == {}


def test_subset_counts_identical_and_categories_pruned(atlas_dir, source, tmp_path):
    cond = [str(c) for c in source.uns[schema.UNS_CONDITION_ORDER]][1]
    out = export_atlas(
        atlas_dir, tmp_path / "sub.h5ad", cell_types=["CLL resting", "NK"], conditions=[cond]
    )
    got = ad.read_h5ad(out)
    obs = source.obs
    sel = (obs[schema.OBS_CELL_TYPE].isin(["CLL resting", "NK"])) & (
        obs[schema.OBS_CONDITION] == cond
    )
    assert list(got.obs_names) == list(source.obs_names[sel.to_numpy()])
    ref = source[sel.to_numpy()]
    assert _csr_equal(got.layers[schema.LAYER_COUNTS], ref.layers[schema.LAYER_COUNTS])
    assert _csr_equal(got.X, ref.X)
    assert list(got.obs[schema.OBS_CELL_TYPE].cat.categories) == ["CLL resting", "NK"]
    assert list(got.obs[schema.OBS_CONDITION].cat.categories) == [cond]
    for col in got.obs.columns:
        s = got.obs[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            assert set(s.cat.categories) == set(s.astype(str).unique()), col
    # colours follow the pruned categories
    cats = list(source.obs[schema.OBS_CELL_TYPE].cat.categories)
    colors = source.uns[f"{schema.OBS_CELL_TYPE}_colors"]
    assert list(got.uns[f"{schema.OBS_CELL_TYPE}_colors"]) == [
        colors[cats.index("CLL resting")],
        colors[cats.index("NK")],
    ]
    assert np.array_equal(got.obsm[schema.OBSM_UMAP], ref.obsm[schema.OBSM_UMAP])
    info = got.uns[schema.UNS_EXPORT]
    assert json.loads(info["filters_json"]) == {
        "cell_types": ["CLL resting", "NK"],
        "conditions": [cond],
    }


def test_samples_patients_and_genes(atlas_dir, source, tmp_path):
    sample = str(source.obs[schema.OBS_SAMPLE].iloc[0])
    patient = str(source.obs[schema.OBS_PATIENT].iloc[0])
    out = export_atlas(
        atlas_dir, tmp_path / "g.h5ad", samples=[sample], patients=[patient],
        genes=["cd5", "CXCR4", "BCL2", "CD5"],
    )  # fmt: skip
    got = ad.read_h5ad(out)
    assert list(got.var_names) == [g for g in source.var_names if g in {"CD5", "CXCR4", "BCL2"}]
    m = (source.obs[schema.OBS_SAMPLE] == sample).to_numpy()
    ref = source[m, list(got.var_names)]
    assert _csr_equal(got.layers[schema.LAYER_COUNTS], ref.layers[schema.LAYER_COUNTS])
    assert _csr_equal(got.X, ref.X)
    assert got.var[schema.VAR_GENE_ID].tolist() == ref.var[schema.VAR_GENE_ID].tolist()


def test_r_and_cellxgene_friendly(atlas_dir, tmp_path):
    import h5py

    out = export_atlas(atlas_dir, tmp_path / "r.h5ad", cell_types=["CLL resting"])
    got = ad.read_h5ad(out)
    assert got.obs_names.is_unique and got.var_names.is_unique
    assert schema.OBSM_UMAP in got.obsm and got.obsm[schema.OBSM_UMAP].shape[1] == 2
    for frame in (got.obs, got.var):
        for col in frame.columns:
            assert frame[col].dtype != object, col
            if isinstance(frame[col].dtype, pd.CategoricalDtype):
                assert all(isinstance(c, str) for c in frame[col].cat.categories), col

    def no_object_datasets(name, obj):
        if isinstance(obj, h5py.Dataset):
            assert obj.dtype.kind != "O" or h5py.check_string_dtype(obj.dtype), name
            assert "pickle" not in str(obj.attrs.get("encoding-type", "")), name

    with h5py.File(out, "r") as f:
        f.visititems(no_object_datasets)
        assert f["X"].attrs["encoding-type"] == "csr_matrix"
    import scanpy as sc

    s = sc.read_h5ad(out)
    sc.pp.calculate_qc_metrics(s, layer=schema.LAYER_COUNTS, percent_top=None, inplace=True)
    assert (s.obs["total_counts"] > 0).all()


def test_unknown_values_list_valid_ones(atlas_dir, tmp_path):
    with pytest.raises(InputError) as e:
        export_atlas(
            atlas_dir,
            tmp_path / "x.h5ad",
            cell_types=["CLL resting", "Martian"],
            conditions=["nope"],
        )
    lines = e.value.problems
    assert len(lines) == 2
    assert lines[0].startswith("--cell-types: unknown value(s) 'Martian'; valid: 'CLL resting'")
    assert lines[1].startswith("--conditions: unknown value(s) 'nope'; valid:")
    with pytest.raises(InputError, match="--genes: 'CD5Q' is not in the atlas.*CD5"):
        export_atlas(atlas_dir, tmp_path / "x.h5ad", genes=["CD5Q"])
    assert not (tmp_path / "x.h5ad").exists()


def test_empty_selection_names_the_filter(atlas_dir, source, tmp_path):
    conds = [str(c) for c in source.uns[schema.UNS_CONDITION_ORDER]]
    other_sample = str(
        source.obs.loc[source.obs[schema.OBS_CONDITION] == conds[1], schema.OBS_SAMPLE].iloc[0]
    )
    with pytest.raises(InputError, match=r"no cells left after --samples .*after --conditions"):
        export_atlas(atlas_dir, tmp_path / "e.h5ad", conditions=[conds[0]], samples=[other_sample])
    assert not (tmp_path / "e.h5ad").exists()


def test_refusals(atlas_dir, tmp_path):
    with pytest.raises(InputError, match="refusing to overwrite"):
        export_atlas(atlas_dir, atlas_dir / schema.ATLAS_FILE)
    with pytest.raises(InputError, match=r"must be a \.h5ad"):
        export_atlas(atlas_dir, tmp_path / "x.csv")
    with pytest.raises(NotAnAtlasError, match="run tme-atlas build first"):
        export_atlas(tmp_path, tmp_path / "x.h5ad")
    with pytest.raises(InputError, match="inside the source atlas"):
        export_atlas(atlas_dir, tmp_path / "t.h5ad", tables_dir=atlas_dir / schema.TABLES_DIR)


def test_tables_and_model(atlas_dir, source, tmp_path):
    out = export_atlas(
        atlas_dir,
        tmp_path / "o" / "sel.h5ad",
        cell_types=["CLL resting"],
        tables_dir=tmp_path / "tables",
        with_model=True,
    )
    assert out.is_file()
    for name in source.uns[schema.UNS_TABLES]:
        df = pd.read_csv(tmp_path / "tables" / f"{name}.csv")
        assert list(df.columns) == list(source.uns[schema.UNS_TABLES][name].columns)
    model = tmp_path / "o" / "sel_scvi_model"
    assert (model / "model.pt").read_bytes() == b"weights"
    no_model = tmp_path / "nomodel"
    shutil.copytree(atlas_dir, no_model)
    shutil.rmtree(no_model / schema.MODEL_DIR)
    with pytest.raises(InputError, match="--with-model"):
        export_atlas(no_model, tmp_path / "m.h5ad", with_model=True)


def test_overwrite_existing_output_atomically(atlas_dir, tmp_path):
    out = tmp_path / "same.h5ad"
    export_atlas(atlas_dir, out, cell_types=["CLL resting"])
    n1 = ad.read_h5ad(out).n_obs
    export_atlas(atlas_dir, out, cell_types=["NK"])
    assert ad.read_h5ad(out).n_obs != n1
    assert [p.name for p in tmp_path.iterdir()] == ["same.h5ad"]


def test_helpers(source):
    m = select_cells(source.obs, cell_types="CLL resting")
    assert m.sum() == (source.obs[schema.OBS_CELL_TYPE] == "CLL resting").sum()
    assert select_genes(source.var_names, None) is None
    assert list(select_genes(source.var_names, ["BCL2", "CD5"])) == sorted(
        [source.var_names.get_loc("BCL2"), source.var_names.get_loc("CD5")]
    )
    with pytest.raises(TypeError):
        select_cells(source.obs, tissues=["x"])


def test_export_adata_in_memory(atlas_dir):
    a = export_adata(atlas_dir, cell_types=["NK"], genes=["NKG7", "GNLY"])
    assert a.n_vars == 2 and a.n_obs > 0
    assert set(a.obs[schema.OBS_CELL_TYPE].cat.categories) == {"NK"}


def test_cli_export(atlas_dir, tmp_path, capsys):
    from tme_atlas.cli import main

    out = tmp_path / "cli.h5ad"
    rc = main(
        [
            "export",
            str(atlas_dir),
            "--out",
            str(out),
            "--cell-types",
            "CLL resting",
            "--genes",
            "CD5",
            "BCL2",
        ]
    )
    assert rc == 0 and out.is_file()
    assert ad.read_h5ad(out).n_vars == 2
    rc = main(
        ["export", str(atlas_dir), "--out", str(tmp_path / "bad.h5ad"), "--conditions", "nope"]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "error: --conditions: unknown value(s) 'nope'" in err
    rc = main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "m.h5ad")])
    assert rc == 2
    assert "not an atlas" in capsys.readouterr().err
