"""``tme-atlas build`` through ``tme_atlas.cli.main``: bad inputs end with one clear
line per problem, exit code 2 and no atlas; a good input builds an atlas.

(``tests/test_bad_inputs.py`` is the full catalogue; these are the build's own cases.)
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from test_ingest import HEADER, barcodes, counts, genes, sheet, write_10x
from test_pipeline import StandIns

from atlas import schema


def run_cli(argv, capsys) -> tuple[int, list[str], str]:
    from tme_atlas.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.startswith("error:")], err


def assert_refused(rc, lines, err, out: Path, *patterns: str):
    assert "Traceback" not in err, err[-2000:]
    assert rc == 2, err[-2000:]
    assert len(lines) == len(patterns), "\n".join(lines)
    for pat in patterns:
        assert any(re.search(pat, ln, re.IGNORECASE) for ln in lines), (pat, lines)
    if out.exists():
        assert not (out / schema.ATLAS_FILE).exists()
        left = [p.name for p in out.iterdir() if p.name != schema.LOG_FILE]
        assert not left, left


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "data"
    write_10x(root / "S1", counts(0), genes(), barcodes())
    write_10x(root / "S2", counts(1), genes(), barcodes())
    sheet(root, ["S1,S1,P1,NAIVE,PB,human", "S2,S2,P1,IBR_RES,PB,human"])
    return root


def _build(data, tmp_path, capsys, *extra, sheet_name="samplesheet.csv"):
    out = tmp_path / "out"
    rc, lines, err = run_cli(["build", data / sheet_name, "--out", out, *extra], capsys)
    return rc, lines, err, out


def _rows(*rows):
    return list(rows)


# ----------------------------------------------------------------------------- bad inputs
def _merged(tmp_path, X=None, drop=(), **cols) -> Path:
    import anndata as ad

    n = 2 * len(barcodes())
    obs = pd.DataFrame(
        {
            "sample_id": ["S1"] * (n // 2) + ["S2"] * (n // 2),
            "patient": "P1",
            "condition": ["NAIVE"] * (n // 2) + ["IBR"] * (n // 2),
            "tissue": "PB",
            "species": "human",
            **cols,
        },
        index=[f"c{i}" for i in range(n)],
    ).drop(columns=list(drop))
    X = sp.csr_matrix(np.vstack([counts(0), counts(1)]).astype(np.float32)) if X is None else X
    a = ad.AnnData(X=X, obs=obs)
    a.var_names = genes()
    path = tmp_path / "merged.h5ad"
    a.write_h5ad(path)
    return path


CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


@case
def missing_file(root):
    shutil.rmtree(root / "S2")
    return [r"S2.*not found"]


@case
def unreadable_file(root):
    p = root / "S1" / "matrix.mtx.gz"
    p.write_bytes(p.read_bytes()[:40])  # truncated gzip
    return [r"S1.*matrix\.mtx\.gz.*(corrupt|truncated)"]


@case
def duplicate_sample_ids(root):
    sheet(root, ["S1,S1,P1,NAIVE,PB,human", "S1,S2,P1,IBR,PB,human"])
    return [r"sample 'S1'.*duplicate sample_id.*lines 2 and 3"]


@case
def missing_columns(root):
    sheet(root, ["S1,S1,NAIVE,PB", "S2,S2,IBR,PB"], header="sample_id,path,condition,tissue")
    return [r"missing required column 'patient'", r"missing required column 'species'"]


@case
def empty_condition(root):
    sheet(root, ["S1,S1,P1,NAIVE,PB,human", "S2,S2,P1, ,PB,human"])
    return [r"sample 'S2'.*empty condition"]


@case
def non_integer_counts(root):
    shutil.rmtree(root / "S1")
    write_10x(root / "S1", counts(0) * 0.37, genes(), barcodes())
    return [r"S1.*non-integer count.*raw UMI"]


@case
def negative_counts(root):
    shutil.rmtree(root / "S2")
    c = counts(1)
    c[0, 0] = -3
    write_10x(root / "S2", c, genes(), barcodes())
    return [r"S2.*1 negative count"]


@case
def nan_counts(root):
    shutil.rmtree(root / "S2")
    c = counts(1).astype(float)
    c[2, 2] = np.nan
    write_10x(root / "S2", c, genes(), barcodes())
    return [r"S2.*NaN"]


@case
def barcode_count_mismatch(root):
    (root / "S1" / "barcodes.tsv.gz").write_bytes(
        gzip.compress("".join(f"{b}\n" for b in barcodes()[:-2]).encode())
    )
    return [r"S1.*barcodes\.tsv\.gz has 23 barcodes but matrix\.mtx\.gz has 25 columns"]


@case
def feature_count_mismatch_v2(root):
    shutil.rmtree(root / "S2")
    write_10x(root / "S2", counts(1), genes(), barcodes(), v2=True)
    p = root / "S2" / "genes.tsv"
    p.write_text(p.read_text() + "ENSG99\tEXTRA\n")
    return [r"S2.*genes\.tsv has 31 features but matrix\.mtx has 30 rows"]


@case
def unknown_species(root):
    sheet(root, ["S1,S1,P1,NAIVE,PB,human", "S2,S2,P1,IBR,PB,Homo sapiens"])
    return [r"S2.*unknown species 'Homo sapiens'"]


@case
def mixed_species(root):
    sheet(root, ["S1,S1,P1,NAIVE,PB,human", "S2,S2,P1,IBR,PB,MOUSE"])
    return [r"mixed species.*human: S1.*mouse: S2"]


@case
def path_outside(root):
    sheet(root, ["S1,S1,P1,NAIVE,PB,human", "S2,../../../../etc,P1,IBR,PB,human"])
    return [r"S2.*outside the sample sheet's folder.*--allow-outside-paths"]


@case
def directory_without_matrix(root):
    (root / "S3").mkdir()
    sheet(root, ["S1,S1,P1,NAIVE,PB,human", "S3,S3,P1,IBR,PB,human"])
    return [r"S3.*no matrix\.mtx"]


@case
def h5ad_sample_without_counts(root):
    import anndata as ad

    a = ad.AnnData(obs=pd.DataFrame(index=barcodes()), var=pd.DataFrame(index=genes()))
    a.write_h5ad(root / "S2.h5ad")
    sheet(root, ["S1,S1,P1,NAIVE,PB,human", "S2,S2.h5ad,P1,IBR,PB,human"])
    return [r"S2.*no counts"]


@case
def corrupt_10x_h5(root):
    (root / "S2.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(500))
    sheet(root, ["S1,S1,P1,NAIVE,PB,human", "S2,S2.h5,P1,IBR,PB,human"])
    return [r"S2.*cannot read 10x HDF5"]


@case
def truncated_gzip_csv(root):
    df = pd.DataFrame(counts(3).T, index=genes(), columns=barcodes())
    data = gzip.compress(df.to_csv().encode())
    (root / "S2.csv.gz").write_bytes(data[: len(data) // 2])
    sheet(root, ["S1,S1,P1,NAIVE,PB,human", "S2,S2.csv.gz,P1,IBR,PB,human"])
    return [r"S2.*(corrupt|truncated)"]


@case
def non_utf8_sheet(root):
    (root / "samplesheet.csv").write_bytes(
        f"{HEADER}\nS1,S1,Patient-Müller,NAIVE,PB,human\n".encode("latin-1")
    )
    return [r"samplesheet\.csv.*not UTF-8"]


@case
def several_problems_at_once(root):
    shutil.rmtree(root / "S2")
    sheet(
        root,
        [
            "S1,S1,P1,NAIVE,PB,human",
            "S2,S2,P1,IBR,PB,human",
            "S3,S1,P1,,PB,human",
            "S4,/etc/passwd,P1,VEN,PB,human",
        ],
    )
    return [r"S2.*not found", r"S3.*empty condition", r"S4.*outside"]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TME_ATLAS__SCVI__MAX_STEPS", "10")
    patterns = CASES[name](data)
    rc, lines, err, out = _build(data, tmp_path, capsys)
    assert_refused(rc, lines, err, out, *patterns)
    if out.exists():  # the log names the problem too
        log = (out / schema.LOG_FILE).read_text()
        assert re.search(patterns[0], log, re.IGNORECASE)


def test_config_reference_not_a_condition(data, tmp_path, capsys):
    (data / "c.yaml").write_text("analyses:\n  reference: VEN_RES\n")
    rc, lines, err, out = _build(data, tmp_path, capsys, "--config", data / "c.yaml")
    assert_refused(rc, lines, err, out, r"analyses\.reference.*'VEN_RES'.*NAIVE, IBR_RES")


def test_out_is_a_file(data, tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    rc, lines, err, out = _build(data, tmp_path, capsys)
    assert rc == 2 and len(lines) == 1 and "not a folder" in lines[0]


@pytest.mark.parametrize(
    "drop, cols, pattern",
    [
        (("condition", "tissue"), {}, [r"no column 'condition'", r"no column 'tissue'"]),
        ((), {"condition": ""}, [r"\d+ cell\(s\) with empty condition"]),
        ((), {"species": ["human"] * 25 + ["mouse"] * 25}, [r"mixed species"]),
    ],
)
def test_bad_merged_h5ad(drop, cols, pattern, tmp_path, capsys):
    src = _merged(tmp_path, drop=drop, **cols)
    out = tmp_path / "out"
    rc, lines, err = run_cli(["build", "--h5ad", src, "--out", out], capsys)
    assert_refused(rc, lines, err, out, *pattern)


def test_merged_h5ad_float_counts(tmp_path, capsys):
    X = sp.csr_matrix(np.log1p(np.vstack([counts(0), counts(1)])).astype(np.float32))
    src = _merged(tmp_path, X=X)
    out = tmp_path / "out"
    rc, lines, err = run_cli(["build", "--h5ad", src, "--out", out], capsys)
    assert_refused(rc, lines, err, out, r"merged\.h5ad X.*non-integer")


def test_neither_or_both_inputs(data, tmp_path, capsys):
    out = tmp_path / "out"
    rc, lines, _ = run_cli(["build", "--out", out], capsys)
    assert rc == 2 and "either" in lines[0]
    src = _merged(tmp_path)
    rc, lines, _ = run_cli(["build", data / "samplesheet.csv", "--h5ad", src, "--out", out], capsys)
    assert rc == 2 and "either" in lines[0]


# ----------------------------------------------------------------------------- success
def test_cli_build_succeeds_and_prints_summary(tmp_path, capsys, monkeypatch):
    """A tiny build through the CLI (heavy stages replaced by stand-ins): exit 0."""
    from test_pipeline import _genes, _sample_counts

    StandIns().install(monkeypatch)
    root = tmp_path / "data"
    for i, sid in enumerate(("S1", "S2")):
        write_10x(root / sid, _sample_counts(i), _genes(), barcodes(120, tag=sid))
    sheet(root, ["S1,S1,P1,NAIVE,PB,human", "S2,S2,P1,IBR,PB,human"])
    (root / "c.yaml").write_text("qc:\n  doublets: false\nhvg:\n  n_top_genes: 100\n")
    out = tmp_path / "atlas"
    capsys.readouterr()
    from tme_atlas.cli import main

    rc = main(["build", str(root / "samplesheet.csv"), "--out", str(out), "--config",
               str(root / "c.yaml"), "--skip", "crosstalk"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0
    assert (out / schema.ATLAS_FILE).is_file()
    assert "S2" in printed and "cells out" in printed
    prov = json.loads((out / schema.PROVENANCE_FILE).read_text())
    assert prov["stages"]["crosstalk"]["status"].startswith("skipped")
    assert prov["config"]["hvg"]["n_top_genes"] == 100


@pytest.mark.slow
def test_build_small_simulation(small_atlas_dir_session, small_sim_dir):
    """``tme-atlas build`` on the small simulator dataset: every output, real stages."""
    import anndata as ad

    out = small_atlas_dir_session
    for f in (
        schema.ATLAS_FILE,
        schema.PROVENANCE_FILE,
        schema.QC_REPORT_FILE,
        schema.QC_SUMMARY_FILE,
        schema.INTEGRATION_METRICS_FILE,
        schema.LOG_FILE,
    ):
        assert (out / f).is_file(), f
    assert (out / schema.MODEL_DIR).is_dir() and (out / schema.STORE_DIR).is_dir()
    assert not (out / schema.WORK_DIR).exists()
    a = ad.read_h5ad(out / schema.ATLAS_FILE)
    schema.require_obs(
        a,
        schema.OBS_QC_PASS,
        schema.OBS_DOUBLET_SCORE,
        schema.OBS_CELL_TYPE,
        schema.OBS_LEIDEN,
    )
    schema.require_obsm(a, schema.OBSM_SCVI, schema.OBSM_UMAP)
    schema.require_table(
        a,
        schema.TABLE_QC_SUMMARY,
        schema.TABLE_INTEGRATION_METRICS,
        schema.TABLE_DE,
        schema.TABLE_COMPOSITION,
        schema.TABLE_INTERACTIONS,
    )
    assert a.uns[schema.UNS_REFERENCE_CONDITION] == "NAIVE"
    # QC removed the planted low-quality cells (doublets at 10x loading are ~0.2% of
    # 200-cell samples; their calling is tested at realistic sizes in test_qc)
    from preprocessing.simulate import load_truth

    cells = load_truth(small_sim_dir)["cells"].set_index("cell_id")
    kept = cells.index.isin(a.obs_names)
    lq = cells["low_quality"].to_numpy(bool)
    assert (~kept & lq).sum() / lq.sum() >= 0.9
    prov = json.loads((out / schema.PROVENANCE_FILE).read_text())
    assert prov["cells_in"] == len(cells) and prov["cells_out"] == a.n_obs
    summary = pd.read_csv(out / schema.QC_SUMMARY_FILE)
    assert summary["n_cells_in"].sum() == len(cells)
