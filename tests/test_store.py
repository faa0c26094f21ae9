"""atlas.store: write_atlas layout and order, AtlasStore reads, errors, thread safety."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import atlas
from atlas import schema
from atlas.errors import InputError
from atlas.store import (
    AtlasStore,
    NotAnAtlasError,
    UnknownGeneError,
    compute_summary,
    h5ad_safe_frame,
    read_atlas_adata,
    write_atlas,
)
from atlas.testing import TABLE_COLUMNS, make_synthetic_adata, make_synthetic_atlas

N_CELLS, N_GENES = 3000, 300


@pytest.fixture(scope="module")
def synth():
    return make_synthetic_adata(n_cells=N_CELLS, n_genes=N_GENES, n_patients=2, seed=3)


@pytest.fixture(scope="module")
def atlas_dir(synth, tmp_path_factory) -> Path:
    return write_atlas(synth, tmp_path_factory.mktemp("store") / "atlas")


@pytest.fixture
def store(atlas_dir):
    s = atlas.open(atlas_dir)
    yield s
    s.close()


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_atlas_is_schema_complete(synth):
    obs_keys = [
        schema.OBS_SAMPLE, schema.OBS_PATIENT, schema.OBS_CONDITION, schema.OBS_TISSUE,
        schema.OBS_SPECIES, schema.OBS_BARCODE, schema.OBS_TOTAL_COUNTS, schema.OBS_N_GENES,
        schema.OBS_PCT_MITO, schema.OBS_QC_OUTLIER, schema.OBS_QC_REASON,
        schema.OBS_DOUBLET_SCORE, schema.OBS_PREDICTED_DOUBLET, schema.OBS_QC_PASS,
        schema.OBS_LEIDEN, schema.OBS_CELL_TYPE, schema.OBS_CELL_TYPE_CONFIDENCE,
        schema.OBS_LINEAGE,
    ]  # fmt: skip
    schema.require_obs(synth, *obs_keys)
    assert schema.score_columns(synth.obs.columns)
    schema.require_obsm(synth, schema.OBSM_UMAP, schema.OBSM_SCVI, schema.OBSM_PCA)
    schema.require_layer(synth, schema.LAYER_COUNTS)
    schema.require_uns(
        synth, schema.UNS_CONDITION_ORDER, schema.UNS_REFERENCE_CONDITION, schema.UNS_SPECIES,
        schema.UNS_PROGRAMS, schema.UNS_PROVENANCE,
    )  # fmt: skip
    for name, cols in TABLE_COLUMNS.items():
        schema.require_table(synth, name)
        assert list(synth.uns[schema.UNS_TABLES][name].columns) == cols, name
    for g in ("CD5", "CXCL12", "CXCR4", "PSMB5", "BCL2", "MKI67", "LYZ", "CD3E"):
        assert g in synth.var_names
    counts = synth.layers[schema.LAYER_COUNTS]
    assert sparse.issparse(counts) and sparse.issparse(synth.X)
    assert np.all(counts.data >= 1) and np.allclose(counts.data, np.round(counts.data))
    # X is log1p(normalize_total 1e4) of the counts
    row = 7
    c = counts[row].toarray().ravel()
    assert np.allclose(synth.X[row].toarray().ravel(), np.log1p(c / c.sum() * 1e4), atol=1e-5)
    assert synth.obs_names.is_unique and synth.var_names.is_unique


def test_synthetic_tables_match_builders():
    """Builders and the synthetic atlas write the column lists defined once in the schema."""
    from preprocessing import analyses, crosstalk

    assert TABLE_COLUMNS is schema.TABLE_COLUMNS
    assert analyses.DE_COLUMNS == schema.TABLE_COLUMNS[schema.TABLE_DE]
    assert crosstalk.DIFF_COLUMNS == schema.TABLE_COLUMNS[schema.TABLE_INTERACTIONS_DIFF]
    synth = make_synthetic_adata(n_cells=300, n_genes=200, seed=0)
    for name, cols in schema.TABLE_COLUMNS.items():
        assert list(synth.uns[schema.UNS_TABLES][name].columns) == cols, name


CONTRACT_COLUMNS = {  # the team contract's minimum columns per table
    schema.TABLE_COMPOSITION: "cell_type condition reference mean_prop mean_prop_ref log2fc "
    "pvalue padj n_samples",
    schema.TABLE_PROPORTIONS: "sample_id patient condition cell_type n_cells n_total prop",
    schema.TABLE_DE: "cell_type gene condition reference log2fc lfcse pvalue padj base_mean "
    "n_samples_cond n_samples_ref",
    schema.TABLE_PROGRAMS: "cell_type program condition reference mean mean_ref diff pvalue "
    "padj n_samples",
    schema.TABLE_INTERACTIONS: "condition source target ligand receptor magnitude_rank "
    "specificity_rank curated curated_source",
    schema.TABLE_INTERACTIONS_BY_SAMPLE: "sample_id condition source target ligand receptor "
    "magnitude_rank lr_means",
    schema.TABLE_INTERACTIONS_DIFF: "condition reference source target ligand receptor "
    "ligand_log2fc receptor_log2fc score pvalue padj curated",
    schema.TABLE_QC_SUMMARY: "sample_id n_cells_in n_cells_out n_low_quality n_doublets "
    "median_counts median_genes",
    schema.TABLE_INTEGRATION_METRICS: "embedding metric value",
}


def test_synthetic_tables_have_contract_columns(synth):
    for name, cols in CONTRACT_COLUMNS.items():
        have = list(synth.uns[schema.UNS_TABLES][name].columns)
        missing = [c for c in cols.split() if c not in have]
        assert not missing, (name, missing)


def test_synthetic_mouse_and_reproducible():
    a = make_synthetic_adata(n_cells=500, n_genes=200, species="mouse", seed=1)
    b = make_synthetic_adata(n_cells=500, n_genes=200, species="mouse", seed=1)
    assert "Cd5" in a.var_names and "Cxcl12" in a.var_names
    assert a.uns[schema.UNS_SPECIES] == "mouse"
    assert (a.X != b.X).nnz == 0
    assert a.obs_names.equals(b.obs_names)


# ----------------------------------------------------------------------------- layout
def test_layout_files(atlas_dir, synth):
    store = atlas_dir / schema.STORE_DIR
    for f in (
        schema.STORE_META_FILE, schema.STORE_EXPR_FILE, schema.STORE_OBS_FILE,
        schema.STORE_VAR_FILE, schema.STORE_SUMMARY_FILE,
    ):  # fmt: skip
        assert (store / f).is_file(), f
    for key in (schema.OBSM_UMAP, schema.OBSM_SCVI, schema.OBSM_PCA):
        assert (store / schema.STORE_EMBEDDINGS_DIR / f"{key}.npy").is_file()
    assert (atlas_dir / schema.ATLAS_FILE).is_file()
    for name in synth.uns[schema.UNS_TABLES]:
        assert (atlas_dir / schema.TABLES_DIR / f"{name}.csv").is_file()
        assert (store / schema.STORE_TABLES_DIR / f"{name}.parquet").is_file()
    meta = json.loads((store / schema.STORE_META_FILE).read_text())
    assert meta["format_version"] == schema.STORE_FORMAT_VERSION
    assert meta["n_cells"] == N_CELLS and meta["n_genes"] == N_GENES
    leftovers = [p.name for p in atlas_dir.iterdir() if p.name.startswith(".")]
    assert not leftovers


def test_expression_file_is_contiguous_csc(atlas_dir, synth):
    import h5py

    with h5py.File(atlas_dir / schema.STORE_DIR / schema.STORE_EXPR_FILE, "r") as f:
        for name in ("data", "indices", "indptr"):
            d = f[name]
            assert d.chunks is None and d.compression is None, name
        assert f["data"].dtype == np.float32
        assert f["indices"].dtype == np.int32
        assert f["indptr"].dtype == np.int64
        csc = sparse.csc_matrix(
            (f["data"][:], f["indices"][:], f["indptr"][:]), shape=tuple(f.attrs["shape"])
        )
    assert (csc != synth.X).nnz == 0


def test_write_order_atlas_file_last(synth, tmp_path, monkeypatch):
    import atlas.store as st

    seen = {}
    real = st.write_h5ad_atomic

    def spy(adata, path, **kw):
        out = Path(path).parent
        seen["store"] = (out / schema.STORE_DIR / schema.STORE_META_FILE).is_file()
        seen["tables"] = (out / schema.TABLES_DIR / f"{schema.TABLE_DE}.csv").is_file()
        seen["atlas_before"] = (out / schema.ATLAS_FILE).exists()
        return real(adata, path, **kw)

    monkeypatch.setattr(st, "write_h5ad_atomic", spy)
    write_atlas(synth[:300].copy(), tmp_path / "a")
    assert seen == {"store": True, "tables": True, "atlas_before": False}


def test_failed_store_write_leaves_previous_atlas(synth, tmp_path, monkeypatch):
    import atlas.store as st

    out = write_atlas(synth[:300].copy(), tmp_path / "a")
    before = (out / schema.STORE_DIR / schema.STORE_META_FILE).read_text()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(st, "_write_store_parts", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_atlas(synth[:200].copy(), out)
    assert (out / schema.STORE_DIR / schema.STORE_META_FILE).read_text() == before
    assert atlas.open(out).n_cells == 300
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_write_does_not_modify_input_and_is_h5ad_safe(tmp_path):
    import anndata as ad

    obs = pd.DataFrame(
        {
            schema.OBS_SAMPLE: ["s1", "s1", "s2", "s2"],
            schema.OBS_CONDITION: ["b", "a", "b", "a"],
            "flag": [True, False, True, True],
            "objflag": np.array([True, False, True, False], dtype=object),
            "mixed": np.array([1, "x", None, 2.5], dtype=object),
            "intcat": pd.Categorical([1, 2, 1, 2]),
            "nullable": pd.array([1, None, 3, 4], dtype="Int64"),
        },
        index=["c1", "c2", "c3", "c4"],
    )
    X = np.array([[0, 1, 2], [3, 0, 0], [0, 0, 1], [1, 1, 1]], dtype=np.float64)
    a = ad.AnnData(X=X, obs=obs.copy())
    a.layers[schema.LAYER_COUNTS] = sparse.csc_matrix(X)
    a.uns[schema.UNS_CONDITION_ORDER] = ["b", "a"]
    a.uns[schema.UNS_PROVENANCE] = {"none": None, "tuple": (1, 2), "nested": {"p": Path("/x")}}
    out = write_atlas(a, tmp_path / "a")
    pd.testing.assert_frame_equal(a.obs, obs)  # caller's object untouched
    assert isinstance(a.X, np.ndarray)
    back = read_atlas_adata(out)
    o = back.obs
    assert o["flag"].dtype == bool and o["objflag"].dtype == bool
    assert isinstance(o["mixed"].dtype, pd.CategoricalDtype)
    assert list(o["mixed"].astype(object).where(o["mixed"].notna(), None)) == [
        "1",
        "x",
        None,
        "2.5",
    ]
    assert list(o["intcat"].cat.categories) == ["1", "2"]
    assert o["nullable"].dtype == np.float64 and np.isnan(o["nullable"].iloc[1])
    assert list(o[schema.OBS_CONDITION].cat.categories) == ["b", "a"]  # sheet order
    assert sparse.isspmatrix_csr(back.X) or back.X.format == "csr"
    assert back.X.dtype == np.float32
    assert back.layers[schema.LAYER_COUNTS].format == "csr"
    assert back.uns[schema.UNS_PROVENANCE]["none"] == ""
    s = atlas.open(out)
    assert s.conditions == ["b", "a"] and s.reference == "b"
    assert s.provenance["nested"]["p"] == "/x"
    assert np.allclose(s.expression_matrix(list(back.var_names)).to_numpy(), X)


def test_h5ad_safe_frame_types():
    df = pd.DataFrame({"a": ["x", None], "b": [True, False], "c": [1.5, 2.0]}, index=[1, 2])
    out = h5ad_safe_frame(df)
    assert list(out.index) == ["1", "2"]
    assert isinstance(out["a"].dtype, pd.CategoricalDtype)
    assert out["b"].dtype == bool and out["c"].dtype == np.float64


def test_duplicate_names_rejected(tmp_path):
    import anndata as ad

    a = ad.AnnData(X=np.ones((2, 2), dtype=np.float32))
    a.var_names = ["G", "G"]
    with pytest.raises(ValueError, match="var_names are not unique"):
        write_atlas(a, tmp_path / "a")


# ----------------------------------------------------------------------------- reading
def test_open_metadata(store, synth):
    assert isinstance(store, AtlasStore)
    assert store.shape == synth.shape
    assert store.n_cells == N_CELLS and store.n_genes == N_GENES
    assert store.genes == list(synth.var_names)
    assert store.species == "human"
    assert store.conditions == list(synth.uns[schema.UNS_CONDITION_ORDER])
    assert store.reference == synth.uns[schema.UNS_REFERENCE_CONDITION]
    assert set(store.programs) == set(synth.uns[schema.UNS_PROGRAMS])
    assert store.provenance["tool"] == "atlas.testing.make_synthetic_adata"
    assert store.format_version == schema.STORE_FORMAT_VERSION
    assert "AtlasStore(" in repr(store)
    assert atlas.open(store.path / schema.ATLAS_FILE).n_cells == N_CELLS


def test_expression_matches_x(store, synth):
    X = synth.X.tocsc()
    for gene in ("CD5", "CXCR4", "LYZ", synth.var_names[-1]):
        j = synth.var_names.get_loc(gene)
        expected = X[:, j].toarray().ravel()
        got = store.expression(gene)
        assert got.dtype == np.float32 and got.shape == (N_CELLS,)
        assert np.array_equal(got, expected)
        assert np.array_equal(store.expression(gene), expected)  # cached read
        cells = np.array([5, 0, 17, 2999])
        assert np.array_equal(store.expression(gene, cells), expected[cells])
        mask = np.zeros(N_CELLS, bool)
        mask[::7] = True
        assert np.array_equal(store.expression(gene, mask), expected[mask])
        idx, val = store.gene_sparse(gene)
        assert np.array_equal(idx, np.flatnonzero(expected))
        assert np.array_equal(val, expected[expected != 0])


def test_expression_matrix(store, synth):
    genes = ["CD5", "bcl2", "CD5", "MKI67"]
    m = store.expression_matrix(genes)
    assert list(m.columns) == ["CD5", "BCL2", "MKI67"]
    ref = synth[:, ["CD5", "BCL2", "MKI67"]].X.toarray()
    assert np.array_equal(m.to_numpy(), ref)
    sub = store.expression_matrix(["CD5"], cells=[3, 1])
    assert list(sub.index) == [3, 1]
    assert np.array_equal(sub["CD5"].to_numpy(), ref[[3, 1], 0])


def test_gene_lookup(store):
    assert store.resolve_gene("cd5") == "CD5"
    assert store.has_gene("Cxcr4") and not store.has_gene("NOPE1")
    with pytest.raises(UnknownGeneError, match="did you mean") as e:
        store.expression("CD5X")
    assert isinstance(e.value, InputError) and isinstance(e.value, KeyError)
    assert "CD5" in str(e.value)
    assert store.search_genes("cxc")[:1] and all(
        g.lower().startswith("cxc") for g in store.search_genes("cxc")
    )


def test_obs_columns(store, synth):
    assert store.obs_columns == list(synth.obs.columns)
    obs = store.obs()
    assert isinstance(obs.index, pd.RangeIndex) and len(obs) == N_CELLS
    for col in synth.obs.columns:
        a, b = obs[col], synth.obs[col]
        if isinstance(b.dtype, pd.CategoricalDtype):
            assert isinstance(a.dtype, pd.CategoricalDtype), col
            assert list(a.astype(str)) == list(b.astype(str)), col
        else:
            assert a.dtype == b.dtype, col
            nan_ok = np.issubdtype(b.dtype, np.floating)  # NaN = not a B cell, etc.
            assert np.array_equal(a.to_numpy(), b.to_numpy(), equal_nan=nan_ok), col
    assert list(store.obs_names) == list(synth.obs_names)
    ct = store.column(schema.OBS_CELL_TYPE, cells=[0, 1])
    assert list(ct.astype(str)) == list(synth.obs[schema.OBS_CELL_TYPE].iloc[:2].astype(str))
    assert store.categories(schema.OBS_CONDITION) == store.conditions
    mask = store.cell_mask(cell_type=["CLL resting"], condition=store.reference)
    ref = (synth.obs[schema.OBS_CELL_TYPE] == "CLL resting") & (
        synth.obs[schema.OBS_CONDITION] == store.reference
    )
    assert np.array_equal(mask, ref.to_numpy())
    with pytest.raises(schema.MissingKeyError, match="obs"):
        store.column("nope")
    assert store.var().index.tolist() == list(synth.var_names)


def test_embeddings_and_scores(store, synth):
    assert set(store.embedding_names) == {schema.OBSM_UMAP, schema.OBSM_SCVI, schema.OBSM_PCA}
    u = store.embedding()
    assert u.dtype == np.float32 and u.shape == (N_CELLS, 2)
    assert np.array_equal(np.asarray(u), synth.obsm[schema.OBSM_UMAP])
    assert not u.flags.writeable
    assert np.array_equal(
        store.embedding(schema.OBSM_SCVI, cells=[4, 2]), synth.obsm[schema.OBSM_SCVI][[4, 2]]
    )
    with pytest.raises(schema.MissingKeyError, match=r"obsm\['X_tsne'\]"):
        store.embedding("X_tsne")
    scores = store.scores()
    assert list(scores.columns) == schema.score_columns(synth.obs.columns)
    one = store.scores(["nfkb"])
    assert list(one.columns) == ["score_nfkb"]


def test_summary_matches_direct_computation(store, synth):
    genes = ["CD5", "CXCR4"]
    s = store.summary(genes, groupby=[schema.OBS_CELL_TYPE, schema.OBS_CONDITION])
    assert list(s.columns[:3]) == [schema.COL_GENE, schema.OBS_CELL_TYPE, schema.OBS_CONDITION]
    assert list(dict.fromkeys(s[schema.COL_GENE])) == genes  # requested order
    obs = synth.obs
    for gene in genes:
        x = synth[:, gene].X.toarray().ravel()
        for (ct, cond), idx in obs.groupby(
            [schema.OBS_CELL_TYPE, schema.OBS_CONDITION], observed=True
        ).indices.items():
            row = s[(s.gene == gene) & (s.cell_type == ct) & (s.condition == cond)]
            assert len(row) == 1
            r = row.iloc[0]
            assert r[schema.SUMMARY_N_CELLS] == len(idx)
            assert r[schema.SUMMARY_MEAN] == pytest.approx(x[idx].mean(), rel=1e-5, abs=1e-6)
            assert r[schema.SUMMARY_FRAC] == pytest.approx((x[idx] > 0).mean(), rel=1e-5)
            if (x[idx] > 0).any():
                assert r[schema.SUMMARY_MEAN_EXPRESSING] == pytest.approx(
                    x[idx][x[idx] > 0].mean(), rel=1e-4
                )
    by_sample = store.summary("CD5", groupby=schema.OBS_SAMPLE, cell_types=["CLL resting"])
    x = synth[:, "CD5"].X.toarray().ravel()
    for sid, grp in by_sample.groupby(schema.OBS_SAMPLE):
        m = (
            (obs[schema.OBS_SAMPLE] == sid) & (obs[schema.OBS_CELL_TYPE] == "CLL resting")
        ).to_numpy()
        assert grp[schema.SUMMARY_MEAN].iloc[0] == pytest.approx(x[m].mean(), rel=1e-5)
    ct_only = store.summary(["CD5"], groupby=schema.OBS_CELL_TYPE, conditions=[store.reference])
    assert set(ct_only.columns) >= {"n_samples", schema.SUMMARY_FRAC}
    with pytest.raises(ValueError, match="summary groupby"):
        store.summary(["CD5"], groupby=["lineage"])


def test_compute_summary_dense_and_unassigned_groups():
    X = np.array([[1.0, 0.0], [3.0, 2.0], [0.0, 0.0]])
    obs = pd.DataFrame({"g": pd.Categorical(["a", "a", "b"], categories=["a", "b", "c"])})
    s = compute_summary(X, obs, ["G1", "G2"], ["g"], chunk=2)
    assert len(s) == 4  # empty category "c" dropped
    a = s[(s.gene == "G1") & (s.g == "a")].iloc[0]
    assert (a["mean"], a["frac"], a["n_cells"]) == (2.0, 1.0, 2)
    s2 = compute_summary(sparse.csc_matrix(X), obs, ["G1", "G2"], ["g"])
    pd.testing.assert_frame_equal(s, s2)


def test_tables(store, synth, atlas_dir):
    assert set(store.table_names) == set(synth.uns[schema.UNS_TABLES])
    for name, df in synth.uns[schema.UNS_TABLES].items():
        got = store.table(name)
        pd.testing.assert_frame_equal(
            got.reset_index(drop=True), df.reset_index(drop=True), check_dtype=False
        )
    assert store.has_table(schema.TABLE_DE)
    assert len(store.de()) and len(store.composition()) and len(store.proportions())
    assert len(store.programs_table())
    for kind in ("consensus", "by_sample", "diff"):
        assert len(store.interactions(kind))
    with pytest.raises(ValueError):
        store.interactions("nope")
    t = store.table(schema.TABLE_DE)
    t.iloc[0, 0] = "changed"
    assert store.table(schema.TABLE_DE).iloc[0, 0] != "changed"  # copies


def test_missing_table_names_the_command(synth, tmp_path):
    a = synth[:200].copy()
    tables = dict(a.uns[schema.UNS_TABLES])
    del tables[schema.TABLE_DE], tables[schema.TABLE_INTERACTIONS]
    a.uns[schema.UNS_TABLES] = tables
    s = atlas.open(write_atlas(a, tmp_path / "a"))
    with pytest.raises(schema.MissingKeyError, match="tme-atlas analyse DIR"):
        s.de()
    with pytest.raises(schema.MissingKeyError, match="tme-atlas crosstalk DIR"):
        s.interactions()
    assert not s.has_table(schema.TABLE_DE)


def test_tables_fall_back_to_csv(atlas_dir, tmp_path):
    d = tmp_path / "a"
    shutil.copytree(atlas_dir, d)
    shutil.rmtree(d / schema.STORE_DIR / schema.STORE_TABLES_DIR)
    s = atlas.open(d)
    assert s.has_table(schema.TABLE_COMPOSITION)
    assert len(s.composition()) > 0


def test_no_summary_without_cell_types(synth, tmp_path):
    a = synth[:200].copy()
    del a.obs[schema.OBS_CELL_TYPE]
    s = atlas.open(write_atlas(a, tmp_path / "a"))
    assert not s.has_summary
    with pytest.raises(schema.MissingKeyError, match="stage 'annotate'"):
        s.summary(["CD5"])


def test_open_never_reads_the_h5ad(atlas_dir, monkeypatch):
    import anndata

    def forbidden(*a, **k):
        raise AssertionError("the store must not read atlas.h5ad")

    monkeypatch.setattr(anndata, "read_h5ad", forbidden)
    s = atlas.open(atlas_dir)
    s.expression("CD5")
    s.obs()
    s.embedding()
    s.summary(["CD5"])
    s.table(schema.TABLE_DE)


# ----------------------------------------------------------------------------- errors
def test_open_errors(atlas_dir, tmp_path):
    with pytest.raises(NotAnAtlasError, match="does not exist"):
        atlas.open(tmp_path / "nothing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotAnAtlasError, match="not a directory"):
        atlas.open(tmp_path / "file.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotAnAtlasError, match="run tme-atlas build first"):
        atlas.open(empty)

    no_store = tmp_path / "no_store"
    shutil.copytree(atlas_dir, no_store)
    shutil.rmtree(no_store / schema.STORE_DIR)
    with pytest.raises(NotAnAtlasError, match="no read store"):
        atlas.open(no_store)

    unfinished = tmp_path / "unfinished"
    shutil.copytree(atlas_dir, unfinished)
    (unfinished / schema.ATLAS_FILE).unlink()
    with pytest.raises(NotAnAtlasError, match=r"not an atlas: .*has no atlas\.h5ad"):
        atlas.open(unfinished)

    old = tmp_path / "old"
    shutil.copytree(atlas_dir, old)
    meta_file = old / schema.STORE_DIR / schema.STORE_META_FILE
    meta = json.loads(meta_file.read_text())
    meta["format_version"] = 0
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(NotAnAtlasError, match="format version 0") as e:
        atlas.open(old)
    assert "python -m atlas.store" in str(e.value)
    meta_file.write_text("{not json")
    with pytest.raises(NotAnAtlasError, match="unreadable"):
        atlas.open(old)
    with pytest.raises(NotAnAtlasError, match="run tme-atlas build first"):
        read_atlas_adata(empty)


def test_rebuild_store_cli(atlas_dir, tmp_path, capsys):
    from atlas.store import main

    d = tmp_path / "a"
    shutil.copytree(atlas_dir, d)
    meta_file = d / schema.STORE_DIR / schema.STORE_META_FILE
    meta = json.loads(meta_file.read_text())
    meta["format_version"] = 0
    meta_file.write_text(json.dumps(meta))
    assert main([str(d)]) == 0
    assert atlas.open(d).format_version == schema.STORE_FORMAT_VERSION
    assert main([str(tmp_path / "missing")]) == 2
    assert "not an atlas" in capsys.readouterr().err
    assert main([]) == 2


def test_thread_safe_reads(store, synth):
    genes = list(synth.var_names[:40])
    X = synth.X.tocsc()
    expected = {g: X[:, j].toarray().ravel() for j, g in enumerate(genes)}
    errors = []
    barrier = threading.Barrier(8)

    def work(k):
        barrier.wait()
        for i in range(60):
            g = genes[(k * 7 + i) % len(genes)]
            if not np.array_equal(store.expression(g), expected[g]):
                errors.append(g)
            if i % 20 == 0:
                store.obs([schema.OBS_CELL_TYPE])
                store.summary([g])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    assert not errors


def test_make_synthetic_atlas_writes_an_atlas(tmp_path):
    out = make_synthetic_atlas(tmp_path / "syn", n_cells=400, n_genes=120, seed=2)
    s = atlas.open(out)
    assert s.shape == (400, 120)
    assert s.has_summary and s.table_names


def test_bench_store_smoke(tmp_path):
    from benchmarks.bench_store import main

    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "--sizes",
                "1500",
                "--genes",
                "150",
                "--work",
                str(tmp_path / "w"),
                "--reads",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    r = res["sizes"]["1500"]
    for key in ("open_s", "rss_open_mb", "gene_cold_ms", "gene_warm_ms", "csr_gene_ms"):
        assert key in r, key


def test_write_atlas_from_backed_adata(atlas_dir, synth, tmp_path):
    backed = read_atlas_adata(atlas_dir, backed="r")
    out = write_atlas(backed, tmp_path / "copy")
    backed.file.close()
    s = atlas.open(out)
    assert s.shape == synth.shape
    j = synth.var_names.get_loc("CD5")
    assert np.array_equal(s.expression("CD5"), synth.X[:, j].toarray().ravel())


def test_summary_orders_and_sample_counts(store, synth):
    s = store.summary(["MKI67", "CD5"], groupby=schema.OBS_CONDITION)
    assert list(s[schema.COL_GENE]) == ["MKI67"] * 4 + ["CD5"] * 4
    assert list(s[schema.OBS_CONDITION][:4]) == store.conditions  # sheet order
    per_cond = synth.obs.groupby(schema.OBS_CONDITION, observed=True)[schema.OBS_SAMPLE].nunique()
    assert list(s["n_samples"][:4]) == [per_cond[c] for c in store.conditions]
    assert list(s[schema.SUMMARY_N_CELLS][:4]) == [
        int((synth.obs[schema.OBS_CONDITION] == c).sum()) for c in store.conditions
    ]
    everything = store.summary(groupby=[])
    assert len(everything) == store.n_genes
    x = synth.X.toarray()
    assert np.allclose(everything[schema.SUMMARY_MEAN], x.mean(axis=0), rtol=1e-4, atol=1e-6)
    assert np.allclose(everything[schema.SUMMARY_FRAC], (x > 0).mean(axis=0), rtol=1e-5)


def test_summary_of_a_non_dense_table(atlas_dir, synth, tmp_path):
    """A long summary table in another row order / with missing rows still aggregates."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "a"
    shutil.copytree(atlas_dir, d)
    f = d / schema.STORE_DIR / schema.STORE_SUMMARY_FILE
    df = pq.read_table(f).to_pandas()
    df = df.sample(frac=1.0, random_state=0)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), f)
    a, b = atlas.open(atlas_dir), atlas.open(d)
    pd.testing.assert_frame_equal(a.summary(["CD5", "BCL2"]), b.summary(["CD5", "BCL2"]))


@pytest.mark.parametrize("block_nnz", [1, 97, 10**9])
def test_csc_blocks_equal_scipy_tocsc(tmp_path, block_nnz):
    """The blockwise CSC writer gives exactly scipy's ``tocsc()`` (sorted indices), with
    blocks of one gene, of a few genes, and one block; empty genes and cells included."""
    import h5py

    from atlas.store import write_csc_blocks

    X = sparse.random(400, 60, density=0.08, format="csr", random_state=3, dtype=np.float32)
    X = X.tolil()
    X[:, 7] = 0  # an empty gene
    X[11, :] = 0  # an empty cell
    X = X.tocsr()
    with h5py.File(tmp_path / "x.h5", "w") as f:
        nnz = write_csc_blocks(X, f, block_nnz=block_nnz)
    ref = X.tocsc()
    ref.sort_indices()
    with h5py.File(tmp_path / "x.h5") as f:
        assert nnz == ref.nnz
        np.testing.assert_array_equal(f["indptr"][:], ref.indptr)
        np.testing.assert_array_equal(f["indices"][:], ref.indices)
        np.testing.assert_array_equal(f["data"][:], ref.data)
