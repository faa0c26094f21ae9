"""The build orchestrator: checkpoints, --resume, atomic outputs, provenance, skips.

Orchestration tests replace the heavy stages after ``hvg`` by small deterministic stand-ins
(ingest, qc, normalize and hvg are real); the ``slow`` tests run every real stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_ingest import barcodes, sheet, write_10x

from atlas import schema
from atlas.errors import InputError
from preprocessing.stages import names

STAGE_NAMES = names()

N_GENES = 300


def _sample_counts(seed: int, n_cells: int = 120) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lam = rng.gamma(0.6, 1.5, size=N_GENES)
    return rng.poisson(lam * 4, size=(n_cells, N_GENES)).astype(np.int64)


def _genes() -> list[str]:
    return ["MT-CO1", "MT-ND1"] + [f"G{i}" for i in range(N_GENES - 2)]


@pytest.fixture
def tiny(tmp_path) -> Path:
    """Four samples, two conditions (sheet order: B_first, A_second)."""
    root = tmp_path / "data"
    rows = []
    for i, (sid, cond, pat) in enumerate(
        [
            ("S1", "B_first", "P1"),
            ("S2", "A_second", "P1"),
            ("S3", "B_first", "P2"),
            ("S4", "A_second", "P2"),
        ]  # fmt: skip
    ):
        write_10x(root / sid, _sample_counts(i), _genes(), barcodes(120, tag=sid))
        rows.append(f"{sid},{sid},{pat},{cond},PB,human,{'F' if i % 2 else 'M'}")
    sheet(root, rows, header="sample_id,path,patient,condition,tissue,species,sex")
    return root


def tiny_config(**sections):
    from atlas.config import load_config

    over = {
        "qc": {"doublets": False, "min_genes": 50, "min_counts": 100},
        "hvg": {"n_top_genes": 100},
    }
    for k, v in sections.items():
        over.setdefault(k, {}).update(v)
    return load_config(env={}, overrides=over)


class StandIns:
    """Deterministic stand-ins for the heavy stages; records the stages that ran."""

    def __init__(self):
        self.calls: list[str] = []
        self.fail_at: str | None = None

    def make(self, stage):
        def run(adata, ctx):
            self.calls.append(stage)
            if stage == self.fail_at:
                raise RuntimeError(f"killed in {stage}")
            if stage == "integrate":
                X = adata.X[:, adata.var[schema.VAR_HVG].to_numpy()].toarray()
                X = X - X.mean(0)
                u, s, _ = np.linalg.svd(X, full_matrices=False)
                adata.obsm[schema.OBSM_SCVI] = (u[:, :5] * s[:5]).astype(np.float32)
                adata.obsm[schema.OBSM_PCA] = adata.obsm[schema.OBSM_SCVI].copy()
                ctx.model_dir.mkdir(parents=True, exist_ok=True)
                (ctx.model_dir / "model.pt").write_bytes(b"stand-in")
            elif stage == "cluster":
                n = ctx.config.cluster.n_neighbors
                lab = (adata.obsm[schema.OBSM_SCVI][:, 0] > 0).astype(int) + (n % 3)
                adata.obs[schema.OBS_LEIDEN] = pd.Categorical(lab.astype(str))
                adata.obsm[schema.OBSM_UMAP] = adata.obsm[schema.OBSM_SCVI][:, :2]
            elif stage == "annotate":
                adata.obs[schema.OBS_CELL_TYPE] = pd.Categorical(
                    "T" + adata.obs[schema.OBS_LEIDEN].astype(str)
                )
                from atlas.tables import put_table

                put_table(
                    adata,
                    schema.TABLE_INTEGRATION_METRICS,
                    pd.DataFrame({"embedding": ["X_scVI"], "metric": ["m"], "value": [0.5]}),
                )
            return adata

        return run

    def install(self, monkeypatch):
        for stage in (
            "integrate",
            "cluster",
            "annotate",
            "malignant",
            "scanvi",
            "programs",
            "analyses",
            "crosstalk",
        ):
            patch_stage(monkeypatch, stage, self.make(stage))
        return self


def patch_stage(monkeypatch, name: str, func) -> None:
    """Replace the registry entry ``name`` by one running ``func(adata, ctx)``."""
    import dataclasses

    from preprocessing import stages

    def options(ctx):
        return {"ctx": ctx}

    def run(adata, *, ctx):
        return func(adata, ctx)

    new = tuple(
        dataclasses.replace(s, run=run, options=options) if s.name == name else s
        for s in stages.STAGES
    )
    monkeypatch.setattr(stages, "STAGES", new)


@pytest.fixture
def stand_ins(monkeypatch):
    return StandIns().install(monkeypatch)


def _build(tiny, out, **kw):
    from preprocessing.pipeline import run_build

    kw.setdefault("config", tiny_config())
    return run_build(samplesheet=tiny / "samplesheet.csv", out=out, **kw)


def _read(out):
    import anndata as ad

    return ad.read_h5ad(out / schema.ATLAS_FILE)


def _same_atlas(a, b):
    assert a.shape == b.shape
    assert list(a.obs_names) == list(b.obs_names)
    assert list(a.var_names) == list(b.var_names)
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    cols = [c for c in a.obs.columns]
    assert cols == list(b.obs.columns)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    for k in a.obsm:
        np.testing.assert_allclose(a.obsm[k], b.obsm[k], rtol=1e-5, atol=1e-5)
    assert set(a.uns[schema.UNS_TABLES]) == set(b.uns[schema.UNS_TABLES])
    for name in a.uns[schema.UNS_TABLES]:
        pd.testing.assert_frame_equal(
            pd.DataFrame(a.uns[schema.UNS_TABLES][name]),
            pd.DataFrame(b.uns[schema.UNS_TABLES][name]),
        )


# ----------------------------------------------------------------------------- outputs
def test_build_outputs_and_provenance(tiny, tmp_path, stand_ins, capsys):
    out = _build(tiny, tmp_path / "atlas")
    for f in (
        schema.ATLAS_FILE,
        schema.PROVENANCE_FILE,
        schema.LOG_FILE,
        schema.QC_REPORT_FILE,
        schema.QC_SUMMARY_FILE,
        schema.INTEGRATION_METRICS_FILE,
        f"{schema.MODEL_DIR}/model.pt",
    ):
        assert (out / f).is_file(), f
    assert (out / schema.STORE_DIR).is_dir() and (out / schema.TABLES_DIR).is_dir()
    assert not (out / schema.WORK_DIR).exists()
    assert stand_ins.calls == [
        "integrate", "cluster", "annotate", "malignant", "scanvi", "programs", "analyses",
        "crosstalk",
    ]  # fmt: skip

    prov = json.loads((out / schema.PROVENANCE_FILE).read_text())
    for pkg in ("python", "scanpy", "anndata", "scvi-tools", "liana", "squidpy", "torch",
                "numpy", "cll-tme-atlas"):  # fmt: skip
        assert prov["versions"][pkg], pkg
    assert prov["config"]["hvg"]["n_top_genes"] == 100
    assert "samplesheet.csv" in prov["input_checksums"]
    assert sum(k.startswith("S1/") for k in prov["input_checksums"]) == 3
    for stage in STAGE_NAMES:
        t = prov["stages"][stage]
        assert t["status"] == "done", stage
        assert t["seconds"] >= 0 and t["peak_rss_mb"] > 0
    assert prov["cells_in"] == 480
    assert prov["cells_out"] <= 480
    assert set(prov["cells_per_sample"]) == {"S1", "S2", "S3", "S4"}

    a = _read(out)
    up = a.uns[schema.UNS_PROVENANCE]
    assert isinstance(up["config"], str) and json.loads(up["config"])["hvg"]["n_top_genes"] == 100
    assert up["versions"]["scanpy"] == prov["versions"]["scanpy"]
    assert a.uns[schema.UNS_SPECIES] == "human"
    assert list(a.uns[schema.UNS_CONDITION_ORDER]) == ["B_first", "A_second"]
    assert a.uns[schema.UNS_REFERENCE_CONDITION] == "B_first"
    assert list(a.obs[schema.OBS_CONDITION].cat.categories) == ["B_first", "A_second"]
    assert "sex" in a.obs  # extra sheet columns carried
    assert schema.LAYER_COUNTS in a.layers

    printed = capsys.readouterr().out
    assert "cells in" in printed and "S4" in printed and "qc" in printed
    log = (out / schema.LOG_FILE).read_text()
    assert "stage qc done" in log and "MiB at start, peak" in log


def test_reference_from_config(tiny, tmp_path, stand_ins):
    out = _build(tiny, tmp_path / "atlas", config=tiny_config(analyses={"reference": "A_second"}))
    assert _read(out).uns[schema.UNS_REFERENCE_CONDITION] == "A_second"


def test_reference_not_a_condition_is_input_error(tiny, tmp_path, stand_ins):
    with pytest.raises(InputError, match="analyses.reference.*nope"):
        _build(tiny, tmp_path / "atlas", config=tiny_config(analyses={"reference": "nope"}))
    assert sorted(p.name for p in (tmp_path / "atlas").iterdir()) == [schema.LOG_FILE]
    assert stand_ins.calls == []


def test_de_covariate_not_in_sheet_is_input_error_before_compute(tiny, tmp_path, stand_ins):
    cfg = tiny_config(analyses={"de_covariates": ["ighv_status"]})
    with pytest.raises(InputError, match="de_covariates.*'ighv_status' is not in the sample sheet"):
        _build(tiny, tmp_path / "atlas", config=cfg)
    assert sorted(p.name for p in (tmp_path / "atlas").iterdir()) == [schema.LOG_FILE]
    assert stand_ins.calls == []


def test_keep_all_keeps_failing_cells(tiny, tmp_path, stand_ins):
    cfg = tiny_config(qc={"nmads_counts": 0.5})  # about half the cells fail
    a = _read(_build(tiny, tmp_path / "keep", config=cfg, keep_all=True))
    b = _read(_build(tiny, tmp_path / "drop", config=cfg))
    assert a.n_obs == 480
    assert (~a.obs[schema.OBS_QC_PASS]).sum() > 0
    assert b.n_obs == int(a.obs[schema.OBS_QC_PASS].sum())
    assert b.obs[schema.OBS_QC_PASS].all()


@pytest.mark.parametrize(
    "skip, expected",
    [(("analyses",), []), (("crosstalk",), ["analyses"]), ((), ["analyses", "crosstalk"])],
)
def test_skip(tiny, tmp_path, stand_ins, skip, expected):
    out = _build(tiny, tmp_path / "atlas", skip=skip)
    assert [c for c in stand_ins.calls if c in ("analyses", "crosstalk")] == expected
    prov = json.loads((out / schema.PROVENANCE_FILE).read_text())
    for stage in ("analyses", "crosstalk"):
        assert prov["stages"][stage]["status"].startswith(
            "done" if stage in expected else "skipped"
        )


# ----------------------------------------------------------------------------- resume
def test_resume_after_a_crash_gives_the_same_atlas(tiny, tmp_path, stand_ins):
    ref = _read(_build(tiny, tmp_path / "ref"))
    stand_ins.calls.clear()

    out = tmp_path / "atlas"
    stand_ins.fail_at = "annotate"
    with pytest.raises(RuntimeError, match="killed in annotate"):
        _build(tiny, out)
    assert not (out / schema.ATLAS_FILE).exists()  # never a half-written atlas
    work = out / schema.WORK_DIR
    assert {p.stem for p in work.glob("*.json")} == {
        "qc", "normalize", "hvg", "integrate", "cluster"
    }  # fmt: skip

    stand_ins.fail_at = None
    stand_ins.calls.clear()
    _build(tiny, out, resume=True)
    assert stand_ins.calls == [
        "annotate", "malignant", "scanvi", "programs", "analyses", "crosstalk"
    ]  # fmt: skip
    assert not work.exists()
    got = _read(out)
    _same_atlas(got, ref)
    prov = json.loads((out / schema.PROVENANCE_FILE).read_text())
    assert prov["stages"]["cluster"]["status"] == "resumed"
    assert prov["stages"]["annotate"]["status"] == "done"
    assert (out / schema.QC_REPORT_FILE).is_file() and (out / "model" / "model.pt").is_file()


def _crash(tiny, out, stand_ins, stage):
    """A build that dies in ``stage``; the stand-ins are reset for the next build."""
    stand_ins.fail_at = stage
    with pytest.raises(RuntimeError, match=f"killed in {stage}"):
        _build(tiny, out)
    assert not (out / schema.ATLAS_FILE).exists()  # never a half-written atlas
    stand_ins.fail_at = None
    stand_ins.calls.clear()
    return out


def test_resume_redoes_a_stage_whose_config_changed(tiny, tmp_path, stand_ins):
    out = _crash(tiny, tmp_path / "atlas", stand_ins, "programs")
    cfg = tiny_config(cluster={"n_neighbors": 16})
    _build(tiny, out, resume=True, config=cfg)
    # integrate is upstream of cluster and kept; cluster and everything after are redone
    assert stand_ins.calls == [
        "cluster", "annotate", "malignant", "scanvi", "programs", "analyses", "crosstalk"
    ]  # fmt: skip


def test_resume_redoes_everything_when_an_input_changed(tiny, tmp_path, stand_ins):
    out = _crash(tiny, tmp_path / "atlas", stand_ins, "programs")
    write_10x(tiny / "S2", _sample_counts(99), _genes(), barcodes(120, tag="S2"))
    _build(tiny, out, resume=True)
    assert stand_ins.calls[0] == "integrate"  # qc.. were redone too (not stand-ins)
    prov = json.loads((out / schema.PROVENANCE_FILE).read_text())
    assert prov["stages"]["qc"]["status"] == "done"


def test_without_resume_checkpoints_are_discarded(tiny, tmp_path, stand_ins):
    out = _crash(tiny, tmp_path / "atlas", stand_ins, "programs")
    _build(tiny, out)
    assert stand_ins.calls[0] == "integrate"


def test_a_failed_rebuild_keeps_the_previous_atlas(tiny, tmp_path, stand_ins, monkeypatch):
    out = _build(tiny, tmp_path / "atlas")
    before = (out / schema.ATLAS_FILE).read_bytes()

    import atlas.store

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(atlas.store, "write_atlas", boom)
    with pytest.raises(OSError, match="disk full"):
        _build(tiny, out, config=tiny_config(cluster={"n_neighbors": 20}))
    assert (out / schema.ATLAS_FILE).read_bytes() == before
    assert not list(out.glob(".atlas.h5ad*"))


def test_validation_failure_writes_only_the_log(tiny, tmp_path, stand_ins):
    (tiny / "S3" / "matrix.mtx.gz").unlink()
    out = tmp_path / "atlas"
    with pytest.raises(InputError, match="S3"):
        _build(tiny, out)
    assert sorted(p.name for p in out.iterdir()) == [schema.LOG_FILE]
    assert "S3" in (out / schema.LOG_FILE).read_text()
    assert stand_ins.calls == []


def test_h5ad_input(tiny, tmp_path, stand_ins):
    from preprocessing.ingest import ingest
    from preprocessing.pipeline import run_build

    merged = ingest(tiny / "samplesheet.csv").adata
    merged.obs_names = merged.obs[schema.OBS_BARCODE].astype(str)  # plain barcodes
    merged.obs_names_make_unique()
    merged.write_h5ad(tmp_path / "merged.h5ad")
    out = run_build(h5ad=tmp_path / "merged.h5ad", out=tmp_path / "atlas", config=tiny_config())
    a = _read(out)
    assert a.obs_names[0].startswith("S1:")
    assert list(a.uns[schema.UNS_CONDITION_ORDER]) == ["B_first", "A_second"]
    prov = json.loads((out / schema.PROVENANCE_FILE).read_text())
    assert prov["mode"] == "h5ad" and list(prov["input_checksums"]) == ["merged.h5ad"]


def test_stage_hashes_chain():
    from atlas.config import load_config
    from preprocessing.pipeline import BuildContext, stage_hashes

    base = BuildContext(out=Path("x"), config=load_config(env={}), conditions=["a", "b"])
    h0 = stage_hashes(base)
    changed = BuildContext(
        out=Path("x"),
        config=load_config(env={}, overrides={"cluster": {"n_neighbors": 30}}),
        conditions=["a", "b"],
    )
    h1 = stage_hashes(changed)
    i = STAGE_NAMES.index("cluster")
    assert all(h0[s] == h1[s] for s in STAGE_NAMES[:i])
    assert all(h0[s] != h1[s] for s in STAGE_NAMES[i:])
    kept = BuildContext(out=Path("x"), config=load_config(env={}), conditions=["a", "b"],
                        keep_all=True)  # fmt: skip
    h2 = stage_hashes(kept)
    assert h2["ingest"] == h0["ingest"] and h2["qc"] != h0["qc"]


# ----------------------------------------------------------------------------- real stages
@pytest.mark.slow
def test_resume_with_real_stages(small_sim_dir, small_atlas_dir_session, tmp_path, monkeypatch):
    """Kill a real build in ``programs``; ``--resume`` skips the finished stages and gives
    the same atlas as an uninterrupted build (``small_atlas_dir_session``)."""
    from conftest import fast_config

    from preprocessing import pipeline, stages

    real = {s.name: s for s in stages.STAGES if s.run is not None}
    ran: list[str] = []

    def wrap(stage, fail):
        def run(adata, ctx):
            ran.append(stage)
            if fail:
                raise KeyboardInterrupt  # as if killed
            return pipeline.run_stage(adata, real[stage], ctx)

        return run

    for s in real:
        patch_stage(monkeypatch, s, wrap(s, s == "programs"))
    out = tmp_path / "atlas"
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_build(
            samplesheet=small_sim_dir / "samplesheet.csv", out=out, config=fast_config()
        )
    assert not (out / schema.ATLAS_FILE).exists()
    for s in real:
        patch_stage(monkeypatch, s, wrap(s, False))
    ran.clear()
    pipeline.run_build(
        samplesheet=small_sim_dir / "samplesheet.csv", out=out, config=fast_config(), resume=True
    )
    assert ran == ["programs", "analyses", "crosstalk"]
    _same_atlas(_read(out), _read(small_atlas_dir_session))


def test_resume_of_a_finished_atlas_does_nothing(tiny, tmp_path, stand_ins):
    """``make demo`` runs ``build --resume`` each time: an up-to-date atlas is kept."""
    out = _build(tiny, tmp_path / "atlas")
    mtime = (out / schema.ATLAS_FILE).stat().st_mtime_ns
    stand_ins.calls.clear()
    _build(tiny, out, resume=True)
    assert stand_ins.calls == []
    assert (out / schema.ATLAS_FILE).stat().st_mtime_ns == mtime
    # a changed config rebuilds
    _build(tiny, out, resume=True, config=tiny_config(cluster={"n_neighbors": 9}))
    assert stand_ins.calls[0] == "integrate"
    assert (out / schema.ATLAS_FILE).stat().st_mtime_ns != mtime


def test_the_ingested_matrix_does_not_outlive_qc(tiny, tmp_path, monkeypatch):
    """The build context keeps what provenance needs, not the ingested AnnData: once QC has
    made its copy, the raw matrix of every cell and gene is freed (it was held for the whole
    build: 4.5 GB at 300k cells)."""
    import gc
    import weakref

    from preprocessing import pipeline

    seen: dict = {}
    original = pipeline.validate_inputs

    def validate(*args, **kwargs):
        out = original(*args, **kwargs)
        seen["ingested"] = weakref.ref(out[0].adata)
        return out

    monkeypatch.setattr(pipeline, "validate_inputs", validate)
    stand_ins = StandIns().install(monkeypatch)
    integrate = stand_ins.make("integrate")

    def check_then_integrate(adata, ctx):
        gc.collect()
        seen["alive_after_qc"] = seen["ingested"]() is not None
        seen["held_by_context"] = ctx.ingest.adata is not None
        return integrate(adata, ctx)

    patch_stage(monkeypatch, "integrate", check_then_integrate)
    _build(tiny, tmp_path / "atlas")
    assert seen == {
        "ingested": seen["ingested"],
        "alive_after_qc": False,
        "held_by_context": False,
    }
