"""``tme-atlas build``: the build orchestrator.

It runs the stages of the registry :data:`preprocessing.stages.STAGES` in order (ingest ->
qc -> normalize -> hvg -> integrate -> cluster -> annotate (+ integration metrics) ->
malignant -> scanvi -> programs -> analyses -> crosstalk -> write) and knows nothing
stage-specific: what a stage runs, which config sections it depends on, whether it is checkpointed or skipped and what
it leaves in ``.work`` all come from its registry entry.

* Everything is validated first (:mod:`preprocessing.ingest`); a bad input ends with an
  :class:`~atlas.errors.InputError` (one line per problem) and nothing but ``build.log`` is
  written to the output folder.
* Every finished stage leaves a checkpoint ``DIR/.work/<stage>.h5ad`` and
  ``DIR/.work/<stage>.json`` holding a hash of the inputs, of the configuration sections
  that affect the stage and of every upstream stage. ``--resume`` restarts after the last
  checkpoint whose hash matches; a changed config section redoes its stage and everything
  after it. A killed build resumed gives the same atlas.
* Outputs are written at the end only, each atomically, ``atlas.h5ad`` last; ``DIR/.work``
  is removed after a successful build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from atlas import schema
from atlas.errors import InputError

from . import stages as registry
from .log import FILE_ONLY, get_logger, progress, setup_logging
from .parallel import compute_cluster

log = get_logger("pipeline")

CHECKPOINT_VERSION = 1
VERSION_PACKAGES = (
    ("scanpy", "scanpy"),
    ("anndata", "anndata"),
    ("scvi-tools", "scvi-tools"),
    ("liana", "liana"),
    ("squidpy", "squidpy"),
    ("torch", "torch"),
    ("numpy", "numpy"),
    ("pandas", "pandas"),
    ("scipy", "scipy"),
    ("pydeseq2", "pydeseq2"),
    ("distributed", "distributed"),
    ("cll-tme-atlas", "cll-tme-atlas"),
)


# ----------------------------------------------------------------------------- helpers
def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for label, dist in VERSION_PACKAGES:
        try:
            out[label] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[label] = "not installed"
    return out


def release_memory() -> None:
    """Return freed memory to the system between stages: a garbage collection, then glibc's
    ``malloc_trim`` (freed blocks stay in malloc's arenas otherwise, and the next stage's
    peak sits on top of the last one's). A no-op where there is no glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        pass


class PeakRSS:
    """Peak resident memory of this process while the ``with`` block runs (MiB)."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peak = 0
        self.start = 0  # resident memory when the block began
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss(self) -> int:
        try:
            import psutil

            return int(psutil.Process().memory_info().rss)
        except Exception:  # pragma: no cover
            return 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRSS:
        self.peak = self.start = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)

    @property
    def start_mb(self) -> float:
        return round(self.start / 2**20, 1)


@dataclass
class BuildContext:
    """What the stage functions share."""

    out: Path
    config: object  # atlas.config.Config
    keep_all: bool = False
    skip: tuple[str, ...] = ()
    species: str = "human"
    conditions: list[str] = field(default_factory=list)
    reference: str = ""
    ingest: object = None  # ingest.IngestResult
    timings: dict[str, dict] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        return self.out / schema.WORK_DIR

    @property
    def model_dir(self) -> Path:
        return self.work / schema.MODEL_DIR

    @property
    def scanvi_model_dir(self) -> Path:
        return self.work / schema.SCANVI_MODEL_DIR

    @property
    def qc_dir(self) -> Path:
        return self.work / schema.QC_DIR


def stage_hashes(ctx: BuildContext) -> dict[str, str]:
    """Chained hash per stage: inputs + upstream + the config sections the stage uses."""
    cfg = ctx.config.model_dump(mode="json")
    try:
        version = metadata.version("cll-tme-atlas")
    except metadata.PackageNotFoundError:  # pragma: no cover
        version = "dev"
    prev = json.dumps(
        {
            "checkpoint_version": CHECKPOINT_VERSION,
            "package": version,
            "inputs": ctx.ingest.checksums if ctx.ingest is not None else {},
        },
        sort_keys=True,
    )
    out: dict[str, str] = {}
    for stage in registry.STAGES:
        payload = {
            "upstream": prev,
            "stage": stage.name,
            "config": {s: cfg.get(s) for s in stage.sections},
            "skipped": stage.skip_reason(ctx),
            **{attr: getattr(ctx, attr) for attr in stage.context},
        }
        h = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
        out[stage.name] = h
        prev = h
    return out


def _checkpoint_paths(ctx: BuildContext, stage: str) -> tuple[Path, Path]:
    return ctx.work / f"{stage}.h5ad", ctx.work / f"{stage}.json"


def _valid_checkpoint(ctx: BuildContext, stage: registry.Stage, expected: str) -> dict | None:
    h5, js = _checkpoint_paths(ctx, stage.name)
    if not (h5.is_file() and js.is_file()):
        return None
    try:
        meta = json.loads(js.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("hash") != expected:
        return None
    if not all((ctx.work / p).exists() for p in stage.products):
        return None
    return meta


def _write_checkpoint(adata, ctx: BuildContext, stage: str, h: str, info: dict) -> None:
    from atlas.io import atomic_write_text, write_h5ad_atomic
    from atlas.store import prepare_adata

    h5, js = _checkpoint_paths(ctx, stage)
    js.unlink(missing_ok=True)  # the json marks a finished checkpoint: remove it first
    write_h5ad_atomic(prepare_adata(adata), h5)
    atomic_write_text(js, json.dumps({"stage": stage, "hash": h, **info}, indent=2))


def _read_checkpoint(ctx: BuildContext, stage: str):
    import anndata as ad

    return ad.read_h5ad(_checkpoint_paths(ctx, stage)[0])


# ----------------------------------------------------------------------------- one stage
def run_stage(adata, stage: registry.Stage, ctx: BuildContext):
    """Run ``stage`` on ``adata`` with its options from ``ctx``; returns the AnnData.

    Products it leaves in ``.work`` (the scVI model, the QC report) are removed first.
    """
    for product in stage.products:
        top = ctx.work / Path(product).parts[0]
        if top.is_dir():
            shutil.rmtree(top, ignore_errors=True)
        else:
            top.unlink(missing_ok=True)
    out = stage.run(adata, **stage.options(ctx))
    if out is None:
        raise TypeError(f"stage {stage.name}: {stage.run.__qualname__} returned None")
    return out


# ----------------------------------------------------------------------------- outputs
def _provenance(ctx: BuildContext, adata, started: str, total_s: float) -> dict:
    res = ctx.ingest
    summary = None
    from atlas.tables import get_table, has_table

    if has_table(adata, schema.TABLE_QC_SUMMARY):
        summary = get_table(adata, schema.TABLE_QC_SUMMARY)
    cells = {}
    if summary is not None:
        for row in summary.itertuples(index=False):
            d = row._asdict()
            cells[str(d[schema.OBS_SAMPLE])] = {
                "in": int(d["n_cells_in"]),
                "out": int(d["n_cells_out"]),
            }
    return {
        "tool": "tme-atlas build",
        "started_utc": started,
        "finished_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "total_seconds": round(total_s, 2),
        "source": res.source,
        "mode": "h5ad" if res.source.endswith(".h5ad") else "samplesheet",
        "versions": package_versions(),
        "platform": platform.platform(),
        "config": json.loads(ctx.config.to_json()),
        "keep_all": bool(ctx.keep_all),
        "skip": list(ctx.skip),
        "species": ctx.species,
        "conditions": list(ctx.conditions),
        "reference_condition": ctx.reference,
        "input_checksums": dict(res.checksums),
        "stages": ctx.timings,
        "cells_in": int(sum(v["in"] for v in cells.values())) if cells else None,
        "cells_out": int(adata.n_obs),
        "genes_out": int(adata.n_vars),
        "cells_per_sample": cells,
    }


def _provenance_uns(prov: dict) -> dict:
    """h5ad-safe copy: strings and numbers; nested structures as JSON strings."""
    out: dict = {}
    for k, v in prov.items():
        if isinstance(v, bool | int | float | str):
            out[k] = v
        elif v is None:
            out[k] = ""
        elif k == "versions":
            out[k] = {str(a): str(b) for a, b in v.items()}
        else:
            out[k] = json.dumps(v, sort_keys=True)
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    """Copy ``src`` onto ``dst`` atomically (the old ``dst`` stays until the new is ready)."""
    from atlas.io import atomic_path

    with atomic_path(dst) as tmp:
        shutil.copytree(src, tmp)


def _write_outputs(adata, ctx: BuildContext) -> None:
    from atlas.io import atomic_write_text, sweep_temporaries
    from atlas.tables import csv_text, get_table, has_table

    out = ctx.out
    stale = sweep_temporaries(out)
    if stale:
        log.info(
            "write: removed %d temporaries of a killed earlier write: %s",
            len(stale),
            ", ".join(stale),
        )
    if ctx.model_dir.is_dir():
        _replace_dir(ctx.model_dir, out / schema.MODEL_DIR)
    if ctx.scanvi_model_dir.is_dir():
        _replace_dir(ctx.scanvi_model_dir, out / schema.SCANVI_MODEL_DIR)
    elif (out / schema.SCANVI_MODEL_DIR).is_dir():  # skipped: an earlier model is stale
        shutil.rmtree(out / schema.SCANVI_MODEL_DIR, ignore_errors=True)
    if ctx.qc_dir.is_dir():
        _replace_dir(ctx.qc_dir, out / schema.QC_DIR)
    if has_table(adata, schema.TABLE_INTEGRATION_METRICS):
        atomic_write_text(
            out / schema.INTEGRATION_METRICS_FILE,
            csv_text(get_table(adata, schema.TABLE_INTEGRATION_METRICS)),
        )
    try:
        from atlas.store import write_atlas
    except ImportError:  # pragma: no cover - the store module is part of the package
        from atlas.io import write_h5ad_atomic

        write_h5ad_atomic(adata, out / schema.ATLAS_FILE)
        return
    write_atlas(adata, out)


# ----------------------------------------------------------------------------- driver
def validate_inputs(
    samplesheet, h5ad, config, allow_outside_paths: bool
) -> tuple[object, str, list[str], str]:
    from .ingest import ingest, ingest_h5ad

    if (samplesheet is None) == (h5ad is None):
        raise InputError("build: give either SAMPLESHEET.csv or --h5ad MERGED.h5ad")
    if h5ad is not None:
        res = ingest_h5ad(h5ad)
    else:
        res = ingest(samplesheet, allow_outside_paths=allow_outside_paths)
    reference = config.analyses.reference or res.conditions[0]
    problems = []
    if reference not in res.conditions:
        problems.append(
            f"config analyses.reference: '{reference}' is not a condition of the input "
            f"(conditions: {', '.join(res.conditions)})"
        )
    for c in config.analyses.contrasts or []:
        if c not in res.conditions:
            problems.append(
                f"config analyses.contrasts: '{c}' is not a condition of the input "
                f"(conditions: {', '.join(res.conditions)})"
            )
    for cov in config.scvi.categorical_covariates:
        if cov not in res.adata.obs.columns:
            problems.append(
                f"config scvi.categorical_covariates: '{cov}' is not a sample sheet column"
            )
    if config.scvi.batch_key not in res.adata.obs.columns:
        problems.append(f"config scvi.batch_key: '{config.scvi.batch_key}' is not a column")
    if config.analyses.de_covariates and not problems:  # before any heavy compute
        from .analyses import sample_covariates

        compared = config.analyses.contrasts or [c for c in res.conditions if c != reference]
        try:
            sample_covariates(
                res.adata, config.analyses.de_covariates, reference, [reference, *compared]
            )
        except InputError as e:
            problems.extend(e.problems)
    if problems:
        raise InputError(problems)
    return res, res.species, list(res.conditions), reference


def _up_to_date(out: Path, build_hash: str) -> bool:
    """``out`` holds a finished atlas built from the same inputs with the same config."""
    prov_file = out / schema.PROVENANCE_FILE
    if not ((out / schema.ATLAS_FILE).is_file() and prov_file.is_file()):
        return False
    try:
        prov = json.loads(prov_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return prov.get("build_hash") == build_hash and (out / schema.STORE_DIR).is_dir()


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")


def run_build(
    *,
    samplesheet: str | Path | None = None,
    h5ad: str | Path | None = None,
    out: str | Path,
    config=None,
    resume: bool = False,
    keep_all: bool = False,
    allow_outside_paths: bool = False,
    skip: Sequence[str] = (),
    verbose: bool = False,
) -> Path:
    """Build an atlas in ``out`` from a sample sheet or one pre-merged h5ad.

    Writes ``out/atlas.h5ad`` (via :func:`atlas.store.write_atlas`, with ``store/`` and
    ``tables/``), ``out/qc/report.html``, ``out/qc/summary.csv``, ``out/model/``,
    ``out/integration_metrics.csv``, ``out/provenance.json`` and ``out/build.log``.
    Raises :class:`~atlas.errors.InputError` on bad input (nothing but the log written).
    Returns ``out``.
    """
    from atlas.config import Config

    config = config if config is not None else Config()
    out = Path(out)
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(log_file=out / schema.LOG_FILE, verbose=verbose)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    t_build = time.perf_counter()
    skip = tuple(skip or ())
    unknown_skip = [s for s in skip if s not in registry.skippable()]
    if unknown_skip:
        raise InputError(f"--skip: unknown stage(s) {', '.join(unknown_skip)}")
    log.info(
        "tme-atlas build: %s -> %s%s",
        h5ad or samplesheet,
        out,
        " (resume)" if resume else "",
    )

    ctx = BuildContext(out=out, config=config, keep_all=keep_all, skip=skip)
    # ---- ingest = validation of everything, before any heavy compute
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        try:
            res, species, conditions, reference = validate_inputs(
                samplesheet, h5ad, config, allow_outside_paths
            )
        except InputError as e:
            for line in e.problems:  # the CLI prints them on stderr
                log.error("%s", line, extra=FILE_ONLY)
            raise
    ctx.ingest, ctx.species, ctx.conditions, ctx.reference = res, species, conditions, reference
    # the context keeps what provenance needs, not the ingested matrix: held there, the raw
    # counts of every cell and gene (4.5 GB at 300k cells) outlived QC through every stage
    adata, res.adata = res.adata, None
    adata.uns[schema.UNS_REFERENCE_CONDITION] = reference
    adata.uns[schema.UNS_CONDITION_ORDER] = list(conditions)
    adata.uns[schema.UNS_SPECIES] = species
    ctx.timings["ingest"] = {
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_mb": mem.peak_mb,
        "status": "done",
        "n_obs": int(adata.n_obs),
        "n_vars": int(adata.n_vars),
    }
    cells_in = {str(s): int(n) for s, n in adata.obs[schema.OBS_SAMPLE].value_counts().items()}

    hashes = stage_hashes(ctx)
    if resume and _up_to_date(out, hashes["write"]):
        log.info(
            "resume: %s is up to date (same inputs and config); nothing to do",
            out / schema.ATLAS_FILE,
        )
        shutil.rmtree(ctx.work, ignore_errors=True)
        return out
    stages = [s for s in registry.STAGES if s.checkpoint]
    start_at = 0
    if resume:
        for i in range(len(stages) - 1, -1, -1):
            meta = _valid_checkpoint(ctx, stages[i], hashes[stages[i].name])
            if meta is not None:
                start_at = i + 1
                break
        if start_at:
            last = stages[start_at - 1].name
            log.info("resume: stages up to '%s' are done with this config; loading it", last)
            adata = _read_checkpoint(ctx, last)
            for s in stages[:start_at]:
                meta = _valid_checkpoint(ctx, s, hashes[s.name]) or {}
                t = meta.get("timing", {})
                ctx.timings[s.name] = {**t, "status": "resumed"} if t else {"status": "resumed"}
        else:
            log.info("resume: no usable checkpoint; building from the start")
    else:
        shutil.rmtree(ctx.work, ignore_errors=True)
    ctx.work.mkdir(parents=True, exist_ok=True)
    # checkpoints after the resume point are stale
    for s in stages[start_at:]:
        for p in _checkpoint_paths(ctx, s.name):
            p.unlink(missing_ok=True)

    bar = progress(total=len(stages) + 2, desc="build", unit="stage", initial=start_at + 1)
    cluster = contextlib.ExitStack()
    try:
        # per-sample work of the stages on a dask cluster when config.compute names one
        cluster.enter_context(compute_cluster(config.compute))
        for st in stages[start_at:]:
            stage = st.name
            why = st.skip_reason(ctx)
            if why:
                log.info("stage %s: skipped (%s)", stage, why)
                ctx.timings[stage] = {"status": f"skipped ({why})"}
                bar.update(1)
                continue
            bar.set_postfix_str(stage)
            log.info("stage %s ...", stage)
            t0 = time.perf_counter()
            n_in = int(adata.n_obs)
            with PeakRSS() as mem:
                try:
                    adata = run_stage(adata, st, ctx)
                except InputError as e:
                    for line in e.problems:
                        log.error("stage %s: %s", stage, line, extra=FILE_ONLY)
                    raise
                except KeyboardInterrupt:
                    log.error("stage %s interrupted; run again with --resume to go on", stage)
                    raise
                except Exception:
                    log.exception("stage %s failed; fix and run again with --resume", stage)
                    raise
            secs = time.perf_counter() - t0
            timing = {
                "seconds": round(secs, 2),
                "peak_rss_mb": mem.peak_mb,
                "start_rss_mb": mem.start_mb,
                "status": "done",
                "n_obs_in": n_in,
                "n_obs": int(adata.n_obs),
                "n_vars": int(adata.n_vars),
            }
            ctx.timings[stage] = timing
            log.info(
                "stage %s done in %.1fs (RSS %.0f MiB at start, peak %.0f MiB)",
                stage, secs, mem.start_mb, mem.peak_mb,
            )  # fmt: skip
            _write_checkpoint(adata, ctx, stage, hashes[stage], {"timing": timing})
            # go on from the checkpoint itself: a resumed build sees exactly the same data
            del adata
            release_memory()
            adata = _read_checkpoint(ctx, stage)
            bar.update(1)

        # ---- write
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            prov = _provenance(ctx, adata, started, time.perf_counter() - t_build)
            prov["cells_in"] = int(sum(cells_in.values()))
            prov["build_hash"] = hashes["write"]
            adata.uns[schema.UNS_PROVENANCE] = _provenance_uns(prov)
            _write_outputs(adata, ctx)
        ctx.timings["write"] = {
            "seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_mb": mem.peak_mb,
            "status": "done",
        }
        bar.update(1)
    finally:
        bar.close()
        cluster.close()
    # provenance.json after atlas.h5ad: its build_hash marks a finished, up-to-date atlas
    # (a kill in between leaves a mismatch, and --resume redoes the write stage)
    from atlas.io import atomic_write_text

    prov["stages"] = ctx.timings
    prov["total_seconds"] = round(time.perf_counter() - t_build, 2)
    atomic_write_text(out / schema.PROVENANCE_FILE, json.dumps(prov, indent=2, default=str))
    shutil.rmtree(ctx.work, ignore_errors=True)
    _closing_summary(ctx, adata, cells_in, prov)
    return out


def _closing_summary(ctx: BuildContext, adata, cells_in: dict, prov: dict) -> None:
    out_counts = (
        adata.obs[schema.OBS_SAMPLE].astype(str).value_counts()
        if schema.OBS_QC_PASS not in adata.obs
        else adata.obs.loc[adata.obs[schema.OBS_QC_PASS].astype(bool), schema.OBS_SAMPLE]
        .astype(str)
        .value_counts()
    )
    lines = [f"atlas written to {ctx.out / schema.ATLAS_FILE}"]
    lines.append(f"{'sample':<24}{'cells in':>10}{'cells out':>11}")
    for sid, n in cells_in.items():
        lines.append(f"{sid:<24}{n:>10}{int(out_counts.get(sid, 0)):>11}")
    lines.append(f"{'total':<24}{sum(cells_in.values()):>10}{int(out_counts.sum()):>11}")
    lines.append(f"{'stage':<24}{'seconds':>10}{'peak MiB':>11}{'start MiB':>11}")
    for stage in registry.names():
        t = ctx.timings.get(stage)
        if not t:
            continue
        secs = t.get("seconds")
        status = t.get("status", "")
        col = f"{secs:>10.1f}" if isinstance(secs, int | float) else f"{'-':>10}"
        mem = t.get("peak_rss_mb")
        start = t.get("start_rss_mb")
        memc = "".join(
            f"{v:>11.0f}" if isinstance(v, int | float) else f"{'-':>11}" for v in (mem, start)
        )
        extra = "" if status == "done" else f"  {status}"
        lines.append(f"{stage:<24}{col}{memc}{extra}")
    lines.append(f"total {prov['total_seconds']:.1f}s")
    for ln in lines:
        log.debug("%s", ln)  # the log file; the console gets the print below
    if os.environ.get("TME_ATLAS_QUIET_SUMMARY") is None:
        print("\n".join(lines))
