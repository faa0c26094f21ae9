"""Ingestion: formats, merging, unique names, validation (one problem per line, all at once)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from atlas import schema
from atlas.errors import InputError

HEADER = "sample_id,path,patient,condition,tissue,species"
N_GENES, N_CELLS = 30, 25


def genes(prefix: str = "MT-") -> list[str]:
    return [f"{prefix}CO1", f"{prefix}ND1"] + [f"G{i}" for i in range(N_GENES - 2)]


def counts(seed: int, n_genes: int = N_GENES, n_cells: int = N_CELLS) -> np.ndarray:
    """cells x genes integer counts."""
    return np.random.default_rng(seed).poisson(1.5, size=(n_cells, n_genes)).astype(np.int64)


def barcodes(n: int = N_CELLS, tag: str = "A") -> list[str]:
    return [f"{tag}{i:06d}-1" for i in range(n)]


def write_10x(folder: Path, X, genes_, bcs, *, v2: bool = False, gz: bool | None = None) -> Path:
    """10x folder from a cells x genes matrix (v3: gzipped features.tsv; v2: genes.tsv)."""
    folder.mkdir(parents=True, exist_ok=True)
    gz = (not v2) if gz is None else gz
    m = sp.coo_matrix(np.asarray(X).T)
    field = "integer" if np.issubdtype(m.dtype, np.integer) else "real"
    scipy.io.mmwrite(str(folder / "matrix.mtx"), m, field=field)
    ids = [f"ENSG{i:011d}" for i in range(len(genes_))]
    if v2:
        (folder / "genes.tsv").write_text("".join(f"{i}\t{g}\n" for i, g in zip(ids, genes_)))
        names = ("matrix.mtx", "genes.tsv", "barcodes.tsv")
    else:
        (folder / "features.tsv").write_text(
            "".join(f"{i}\t{g}\tGene Expression\n" for i, g in zip(ids, genes_))
        )
        names = ("matrix.mtx", "features.tsv", "barcodes.tsv")
    (folder / "barcodes.tsv").write_text("".join(f"{b}\n" for b in bcs))
    if gz:
        for n in names:
            p = folder / n
            with open(p, "rb") as src, gzip.open(f"{p}.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            p.unlink()
    return folder


def sheet(root: Path, rows: list[str], header: str = HEADER) -> Path:
    p = root / "samplesheet.csv"
    p.write_text("\n".join([header, *rows]) + "\n")
    return p


@pytest.fixture
def two_samples(tmp_path) -> Path:
    root = tmp_path / "data"
    write_10x(root / "S1", counts(0), genes(), barcodes())
    write_10x(root / "S2", counts(1), genes(), barcodes())
    sheet(root, ["S1,S1,P1,NAIVE,PB,human", "S2,S2,P1,IBR_RES,PB,human"])
    return root


def problems_of(fn, *a, **k) -> list[str]:
    with pytest.raises(InputError) as ei:
        fn(*a, **k)
    return ei.value.problems


# ----------------------------------------------------------------------------- happy paths
def test_merge_two_10x_samples(two_samples):
    from preprocessing.ingest import ingest

    res = ingest(two_samples / "samplesheet.csv")
    a = res.adata
    assert a.shape == (2 * N_CELLS, N_GENES)
    assert a.obs_names[0] == f"S1:{barcodes()[0]}"
    assert a.obs_names.is_unique and a.var_names.is_unique
    assert list(a.obs[schema.OBS_BARCODE][:2]) == barcodes()[:2]
    assert a.var[schema.VAR_GENE_ID].iloc[0] == "ENSG00000000000"
    assert list(a.obs[schema.OBS_CONDITION].cat.categories) == ["NAIVE", "IBR_RES"]
    assert res.conditions == ["NAIVE", "IBR_RES"] and res.species == "human"
    np.testing.assert_array_equal(a.layers[schema.LAYER_COUNTS][:N_CELLS].toarray(), counts(0))
    np.testing.assert_array_equal(a.X[N_CELLS:].toarray(), counts(1))
    assert a.uns[schema.UNS_CONDITION_ORDER] == ["NAIVE", "IBR_RES"]
    assert a.uns[schema.UNS_SPECIES] == "human"
    # checksums of the sheet and of every file of each sample
    assert "samplesheet.csv" in res.checksums
    assert any(k.startswith("S1/") for k in res.checksums)
    assert all(len(v) == 64 for v in res.checksums.values())


def test_all_formats_and_extra_columns(tmp_path):
    """10x v3, 10x v2 (plain), 10x .h5, .h5ad (layers / raw / X), gzip CSV, TSV."""
    import anndata as ad
    import h5py

    from preprocessing.ingest import ingest

    root = tmp_path / "d"
    g = genes()
    write_10x(root / "v3", counts(0), g, barcodes())
    write_10x(root / "v2", counts(1), g, barcodes(), v2=True)
    # 10x HDF5 (v3 layout)
    m = sp.csc_matrix(counts(2).T)
    with h5py.File(root / "s.h5", "w") as f:
        grp = f.create_group("matrix")
        grp["barcodes"] = np.array(barcodes(), dtype="S")
        grp["data"] = m.data.astype(np.int32)
        grp["indices"] = m.indices.astype(np.int64)
        grp["indptr"] = m.indptr.astype(np.int64)
        grp["shape"] = np.array(m.shape, dtype=np.int32)
        ft = grp.create_group("features")
        ft["id"] = np.array([f"ENSG{i:011d}" for i in range(N_GENES)], dtype="S")
        ft["name"] = np.array(g, dtype="S")
        ft["feature_type"] = np.array(["Gene Expression"] * N_GENES, dtype="S")
        ft["genome"] = np.array(["GRCh38"] * N_GENES, dtype="S")
    # h5ad with counts in layers, X normalised
    a = ad.AnnData(X=np.log1p(counts(3)).astype(np.float32))
    a.layers["counts"] = sp.csr_matrix(counts(3).astype(np.float32))
    a.var_names, a.obs_names = g, barcodes()
    a.write_h5ad(root / "layers.h5ad")
    # h5ad with counts in raw
    b = ad.AnnData(X=sp.csr_matrix(counts(4).astype(np.float32)))
    b.var_names, b.obs_names = g, barcodes()
    b.raw = b.copy()
    b.X = b.X * 0.5
    b.write_h5ad(root / "raw.h5ad")
    # gzip CSV genes x cells, and TSV cells x genes
    df = pd.DataFrame(counts(5).T, index=g, columns=barcodes())
    with gzip.open(root / "m.csv.gz", "wt") as fh:
        df.to_csv(fh)
    dft = pd.DataFrame(counts(6), index=pd.Index(barcodes(), name="barcode"), columns=g)
    dft.to_csv(root / "m.tsv", sep="\t")
    rows = [
        "A,v3,P1,NAIVE,PB,human,d0",
        "B,v2,P1,NAIVE,PB,human,d0",
        "C,s.h5,P2,NAIVE,PB,human,d7",
        "D,layers.h5ad,P2,IBR,PB,human,d7",
        "E,raw.h5ad,P3,IBR,PB,human,d7",
        "F,m.csv.gz,P3,IBR,PB,human,d7",
        "G,m.tsv,P3,VEN,BM,human,d14",
    ]
    sheet(root, rows, header=HEADER + ",timepoint")
    res = ingest(root / "samplesheet.csv")
    a = res.adata
    assert a.n_obs == 7 * N_CELLS and a.n_vars == N_GENES
    assert a.obs["timepoint"].tolist()[::N_CELLS] == ["d0", "d0", "d7", "d7", "d7", "d7", "d14"]
    X = a.layers[schema.LAYER_COUNTS]
    for k, seed in enumerate(range(7)):
        np.testing.assert_array_equal(
            X[k * N_CELLS : (k + 1) * N_CELLS].toarray(), counts(seed), err_msg=rows[k]
        )
    assert res.conditions == ["NAIVE", "IBR", "VEN"]


def test_duplicate_symbols_made_unique_with_warning(tmp_path, caplog):
    from preprocessing.ingest import ingest

    g = genes()
    g[5] = g[4]  # same symbol, different Ensembl id
    write_10x(tmp_path / "S1", counts(0), g, barcodes())
    sheet(tmp_path, ["S1,S1,P1,NAIVE,PB,human"])
    with caplog.at_level("WARNING", logger="tme_atlas"):
        a = ingest(tmp_path / "samplesheet.csv").adata
    assert a.var_names.is_unique
    assert g[4] in a.var_names and f"{g[4]}-1" in a.var_names
    assert a.var[schema.VAR_GENE_ID].is_unique  # Ensembl ids kept
    assert "made unique" in caplog.text


def test_different_gene_sets_keep_shared(tmp_path, caplog):
    from preprocessing.ingest import ingest

    write_10x(tmp_path / "S1", counts(0), genes(), barcodes())
    write_10x(tmp_path / "S2", counts(1, n_genes=N_GENES - 5), genes()[:-5], barcodes())
    sheet(tmp_path, ["S1,S1,P1,NAIVE,PB,human", "S2,S2,P1,IBR,PB,human"])
    with caplog.at_level("WARNING", logger="tme_atlas"):
        a = ingest(tmp_path / "samplesheet.csv").adata
    assert a.n_vars == N_GENES - 5
    assert "shared by all" in caplog.text


def test_allow_outside_paths(tmp_path):
    from preprocessing.ingest import ingest

    write_10x(tmp_path / "elsewhere" / "S1", counts(0), genes(), barcodes())
    (tmp_path / "sheetdir").mkdir()
    sheet(tmp_path / "sheetdir", ["S1,../elsewhere/S1,P1,NAIVE,PB,human"])
    p = problems_of(ingest, tmp_path / "sheetdir" / "samplesheet.csv")
    assert len(p) == 1 and "outside" in p[0] and "S1" in p[0]
    res = ingest(tmp_path / "sheetdir" / "samplesheet.csv", allow_outside_paths=True)
    assert res.adata.n_obs == N_CELLS


def test_symlink_escaping_the_folder_is_refused(tmp_path):
    from preprocessing.ingest import ingest

    write_10x(tmp_path / "secret", counts(0), genes(), barcodes())
    root = tmp_path / "sheetdir"
    root.mkdir()
    (root / "S1").symlink_to(tmp_path / "secret")
    sheet(root, ["S1,S1,P1,NAIVE,PB,human"])
    p = problems_of(ingest, root / "samplesheet.csv")
    assert "outside" in p[0]


def test_all_problems_reported_at_once(two_samples):
    """Several independent problems -> one InputError listing each, one line per problem."""
    from preprocessing.ingest import ingest

    shutil.rmtree(two_samples / "S2")
    write_10x(two_samples / "S3", -counts(3), genes(), barcodes())
    sheet(
        two_samples,
        [
            "S1,S1,P1,NAIVE,PB,human",
            "S2,S2,P1,IBR,PB,human",
            "S3,S3,P1,,PB,human",
            "S1,S1,P2,VEN,PB,human",
        ],
    )
    p = problems_of(ingest, two_samples / "samplesheet.csv")
    text = "\n".join(p)
    assert len(p) == 4, text
    assert "S2" in text and "not found" in text
    assert "S3" in text and "empty condition" in text
    assert "negative" in text
    assert "duplicate sample_id" in text
    assert all("\n" not in line for line in p)


def test_h5ad_merged_input(tmp_path):
    import anndata as ad

    from preprocessing.ingest import ingest_h5ad

    X = sp.csr_matrix(np.vstack([counts(0), counts(1)]).astype(np.float32))
    obs = pd.DataFrame(
        {
            "sample_id": ["S1"] * N_CELLS + ["S2"] * N_CELLS,
            "patient": "P1",
            "condition": pd.Categorical(
                ["IBR"] * N_CELLS + ["NAIVE"] * N_CELLS, categories=["NAIVE", "IBR"]
            ),
            "tissue": "PB",
            "species": "Human",
            "sex": "F",
        },
        index=barcodes() + barcodes(),
    )
    a = ad.AnnData(X=X * 0.1, obs=obs)
    a.layers["counts"] = X
    a.var_names = genes()
    a.write_h5ad(tmp_path / "m.h5ad")
    res = ingest_h5ad(tmp_path / "m.h5ad")
    b = res.adata
    assert b.obs_names.is_unique and b.obs_names[0] == f"S1:{barcodes()[0]}"
    assert res.conditions == ["NAIVE", "IBR"]  # categorical order kept
    assert res.species == "human"
    assert "sex" in b.obs
    np.testing.assert_array_equal(b.layers[schema.LAYER_COUNTS].toarray(), X.toarray())


def test_h5ad_float_counts_refused(tmp_path):
    import anndata as ad

    from preprocessing.ingest import ingest_h5ad

    obs = pd.DataFrame(
        {
            "sample_id": "S1",
            "patient": "P1",
            "condition": "NAIVE",
            "tissue": "PB",
            "species": "human",
        },
        index=barcodes(),
    )
    a = ad.AnnData(X=np.log1p(counts(0)).astype(np.float32), obs=obs)
    a.var_names = genes()
    a.write_h5ad(tmp_path / "m.h5ad")
    p = problems_of(ingest_h5ad, tmp_path / "m.h5ad")
    assert len(p) == 1 and "non-integer" in p[0] and "X" in p[0]


def test_detect_format(tmp_path):
    from preprocessing.ingest import detect_format

    write_10x(tmp_path / "v3", counts(0), genes(), barcodes())
    write_10x(tmp_path / "v2", counts(0), genes(), barcodes(), v2=True)
    assert detect_format(tmp_path / "v3") == "10x_v3"
    assert detect_format(tmp_path / "v2") == "10x_v2"
    for name, fmt in (("a.h5", "10x_h5"), ("a.h5ad", "h5ad"), ("a.csv.gz", "text")):
        assert detect_format(tmp_path / name) == fmt
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="matrix.mtx"):
        detect_format(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown format"):
        detect_format(tmp_path / "a.loom")


def test_count_problems():
    from preprocessing.ingest import count_problems

    assert count_problems(sp.csr_matrix(np.array([[1, 2], [0, 3]])), "x") == []
    assert count_problems(sp.csr_matrix(np.array([[1.0, 2.0]])), "x") == []
    m = sp.csr_matrix(np.array([[np.nan, -1.0, 0.5, np.inf]]))
    text = " ".join(count_problems(m, "x"))
    for word in ("NaN", "negative", "non-integer", "infinite"):
        assert word in text


def test_h5ad_derived_columns_renamed(tmp_path):
    """An atlas fed back as input: columns the build writes are kept as input_<name>."""
    import anndata as ad

    from preprocessing.ingest import ingest_h5ad

    obs = pd.DataFrame(
        {
            "sample_id": "S1",
            "patient": "P1",
            "condition": "NAIVE",
            "tissue": "PB",
            "species": "human",
            "cell_type": "NK",
            "leiden_r0.5": "3",
        },
        index=barcodes(),
    )
    a = ad.AnnData(X=sp.csr_matrix(counts(0).astype(np.float32)), obs=obs)
    a.var_names = genes()
    a.write_h5ad(tmp_path / "m.h5ad")
    b = ingest_h5ad(tmp_path / "m.h5ad").adata
    assert "cell_type" not in b.obs and "leiden_r0.5" not in b.obs
    assert (b.obs["input_cell_type"] == "NK").all()


def test_antibody_features_dropped(tmp_path):
    from preprocessing.ingest import ingest

    folder = write_10x(tmp_path / "S1", counts(0), genes(), barcodes(), gz=False)
    lines = (folder / "features.tsv").read_text().splitlines()
    lines[-3:] = [ln.replace("Gene Expression", "Antibody Capture") for ln in lines[-3:]]
    (folder / "features.tsv").write_text("\n".join(lines) + "\n")
    sheet(tmp_path, ["S1,S1,P1,NAIVE,PB,human"])
    a = ingest(tmp_path / "samplesheet.csv").adata
    assert a.n_vars == N_GENES - 3
    assert (a.var[schema.VAR_FEATURE_TYPE] == "Gene Expression").all()


def test_extra_sheet_columns_are_logged(tmp_path, caplog):
    from preprocessing.ingest import ingest

    write_10x(tmp_path / "S1", counts(0), genes(), barcodes())
    sheet(tmp_path, ["S1,S1,P1,NAIVE,PB,human,d0,F"], header=HEADER + ",timepoint,sex")
    with caplog.at_level("INFO", logger="tme_atlas"):
        a = ingest(tmp_path / "samplesheet.csv").adata
    assert a.obs["sex"].iloc[0] == "F"
    assert "2 extra column(s) carried into .obs as given: timepoint, sex" in caplog.text


@pytest.mark.parametrize(
    "names, expected",
    [
        (
            ["CD3E", "MS4A1", "MT-CO1", "LYZ", "CD14", "GNLY", "NKG7", "CD79A", "FCGR3A", "IL7R"],
            "human",
        ),
        (
            ["Cd3e", "Ms4a1", "mt-Co1", "Lyz2", "Cd14", "Gzma", "Nkg7", "Cd79a", "Fcgr3", "Il7r"],
            "mouse",
        ),
        ([f"ENSMUSG{i:011d}" for i in range(20)], "mouse"),
        ([f"ENSG{i:011d}" for i in range(20)], "human"),
        ([f"G{i}" for i in range(50)], None),  # not telling
        (["CD3E", "Cd3e"] * 10, None),  # no majority
    ],
)
def test_symbol_species(names, expected):
    from preprocessing.ingest import symbol_species

    assert symbol_species(names)[0] == expected


@pytest.mark.parametrize("species", ["human", "mouse"])
def test_ensembl_only_features_mapped_to_symbols(tmp_path, caplog, species):
    """Features given as Ensembl ids only (both 10x columns) get their symbols from the shipped
    gene table; ids stay in var['gene_ids']; ids the table lacks are kept as they are."""
    import references
    from preprocessing.ingest import ingest

    table = references.gene_positions(species)
    table = table[table["ensembl_id"].ne("")].drop_duplicates("ensembl_id").iloc[: N_GENES - 1]
    ids = table["ensembl_id"].tolist() + [
        "ENSG99999999999" if species == "human" else "ENSMUSG99999999999"
    ]
    folder = write_10x(tmp_path / "S1", counts(0), ids, barcodes())
    feats = "".join(f"{i}\t{i}\tGene Expression\n" for i in ids)
    with gzip.open(folder / "features.tsv.gz", "wt") as fh:
        fh.write(feats)
    sheet(tmp_path, [f"S1,S1,P1,NAIVE,PB,{species}"])
    with caplog.at_level("INFO", logger="tme_atlas"):
        a = ingest(tmp_path / "samplesheet.csv").adata
    assert a.var_names[: N_GENES - 1].tolist() == table["symbol"].tolist()
    assert a.var_names[-1] == ids[-1]
    assert a.var[schema.VAR_GENE_ID].tolist() == ids
    assert f"{N_GENES - 1} of {N_GENES} mapped to gene symbols" in caplog.text


def test_ensembl_only_without_a_gene_table(monkeypatch):
    import references
    from preprocessing import ingest as I

    def missing(species):
        raise FileNotFoundError(species)

    monkeypatch.setattr(references, "gene_positions", missing)
    I._ensembl_to_symbol.cache_clear()
    try:
        out, problem = I.ensembl_symbols(
            [f"ENSG{i:011d}" for i in range(20)], "human", "sample 'S1'"
        )
    finally:
        I._ensembl_to_symbol.cache_clear()
    assert out is None
    assert problem.startswith("sample 'S1': the features are Ensembl ids only")
    assert "no gene table ships for human; give gene symbols" in problem
