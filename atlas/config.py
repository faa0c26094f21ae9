"""One validated configuration model for build, analyses, crosstalk and the explorer.

Precedence: defaults < config file (YAML/JSON/TOML) < environment < CLI flags.

Environment variables: ``TME_ATLAS__<SECTION>__<FIELD>`` (double underscores separate
levels), e.g. ``TME_ATLAS__SERVE__PORT=8080`` or ``TME_ATLAS__SCVI__MAX_STEPS=2000``.
The file can be named with ``--config FILE`` or ``TME_ATLAS_CONFIG``.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError  # raised here; importable as atlas.config.ConfigError

ENV_PREFIX = "TME_ATLAS__"
ENV_CONFIG_FILE = "TME_ATLAS_CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class QCConfig(_Section):
    """Per-sample quality control (stage ``qc``)."""

    min_genes: int = Field(200, ge=0, description="hard floor: genes per cell")
    min_counts: int = Field(500, ge=0, description="hard floor: UMIs per cell")
    nmads_counts: float = Field(5.0, gt=0, description="MADs for log total counts")
    nmads_genes: float = Field(5.0, gt=0, description="MADs for log genes")
    nmads_mito: float = Field(3.0, gt=0, description="MADs for % mito (upper only)")
    max_pct_mito: float = Field(25.0, gt=0, le=100, description="hard ceiling on % mito")
    min_cells_gene: int = Field(3, ge=0, description="drop genes seen in fewer cells")
    doublets: bool = Field(True, description="run scrublet per sample")
    doublet_rate_per_1k: float = Field(
        0.8,
        gt=0,
        le=10,
        description="expected doublets, percent per 1,000 cells recovered (10x: ~0.8)",
    )
    doublet_rate: float | None = Field(
        None, gt=0, lt=1, description="fixed expected doublet rate (overrides the per-1k rate)"
    )
    doublet_fdr: float = Field(
        0.2, gt=0, lt=1, description="doublet threshold: estimated false-discovery rate"
    )
    remove_doublets: bool = True


class HVGConfig(_Section):
    n_top_genes: int = Field(2000, ge=50)
    flavor: Literal["seurat_v3", "seurat", "cell_ranger"] = "seurat_v3"
    exclude_patterns: bool = Field(True, description="exclude IG/TCR/mito/ribo/Hb genes")


class ScviConfig(_Section):
    """scVI integration, budgeted by gradient steps with early stopping."""

    batch_key: str = "sample_id"
    categorical_covariates: list[str] = Field(default_factory=list)
    n_latent: int = Field(20, ge=2)
    n_layers: int = Field(1, ge=1)
    n_hidden: int = Field(128, ge=8)
    gene_likelihood: Literal["nb", "zinb", "poisson"] = "nb"
    max_steps: int = Field(
        1500, ge=10, description="gradient-step budget (1,500 integrated as well as 3,500)"
    )
    min_steps: int = Field(
        1000, ge=0, description="no early stopping before this many gradient steps"
    )
    max_epochs: int | None = Field(None, description="override the step budget")
    budget_by_batch_strength: bool = Field(
        True,
        description="grow max_steps with the number and strength of batches (measured on the "
        "uncorrected PCA before training)",
    )
    max_budget_factor: float = Field(
        6.0, ge=1, description="the grown budget is at most this many times max_steps"
    )
    kl_warmup_steps: int | None = Field(
        None,
        ge=0,
        description="steps to ramp the KL weight to 1 (default: min_steps; scvi-tools' own "
        "default, 400 epochs, leaves a short run at a fraction of the KL weight)",
    )
    batch_size: int = Field(512, ge=16)
    learning_rate: float = Field(2e-3, gt=0)
    early_stopping: bool = True
    early_stopping_patience: int = Field(15, ge=1)
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    torch_threads: int | None = Field(None, ge=1, description="default: 1 under CI, else cores")
    seed: int = 0

    @field_validator("categorical_covariates")
    @classmethod
    def _no_condition(cls, v: list[str]) -> list[str]:
        if "condition" in v:
            raise ValueError("the resistance state is biology, never a batch covariate")
        return v


class ScanviConfig(_Section):
    """scANVI from the scVI model on the atlas labels (stage ``scanvi``; used by ``map``)."""

    max_steps: int = Field(
        200, ge=10, description="gradient-step budget (the scVI weights are its start)"
    )
    # each scANVI step also draws a labelled batch (~2x an scVI step): 256 halves the stage
    # (demo: 40 -> ~20 s) at equal mapping accuracy (held-out demo patient 0.970 vs 0.965)
    batch_size: int = Field(256, ge=16)
    learning_rate: float = Field(1e-3, gt=0)
    n_samples_per_label: int | None = Field(
        None, ge=1, description="labelled cells drawn per label and epoch (default: all)"
    )


class MappingConfig(_Section):
    """``tme-atlas map``: scArches surgery of the atlas's scANVI model on new samples."""

    max_steps: int = Field(
        200, ge=10, description="gradient-step budget of the query training (weight decay 0)"
    )
    batch_size: int = Field(512, ge=16)
    learning_rate: float = Field(1e-3, gt=0)
    unknown_threshold: float = Field(
        0.4,
        gt=0,
        le=1,
        description="label uncertainty (1 - scANVI's probability) above which a query cell is "
        "'Unknown'",
    )
    novelty_quantile: float = Field(
        0.99,
        gt=0,
        le=1,
        description="a query cell farther from its nearest reference cells (scANVI latent) "
        "than this quantile of the reference cells' own distances is 'Unknown' too "
        "(1 turns it off)",
    )
    n_neighbors: int = Field(15, ge=2, description="kNN for the novelty distance and UMAP")
    min_gene_overlap: float = Field(
        0.5, gt=0, le=1, description="share of the model's genes the query must measure"
    )
    query_only: bool = Field(
        False, description="write the query cells only (default: reference + query)"
    )


class ClusterConfig(_Section):
    n_neighbors: int = Field(15, ge=2)
    resolutions: list[float] = Field(default_factory=lambda: [0.3, 0.5, 1.0, 2.0])
    default_resolution: float = 1.0
    umap_min_dist: float = 0.3
    # exact kNN (scikit-learn, brute force) up to this many cells: faster than pynndescent's
    # approximate search there, since it skips pynndescent's ~35 s numba compilation
    exact_knn_max_cells: int = Field(100_000, ge=0)
    # neighbours / UMAP / Leiden on the GPU with rapids-singlecell (`pip install .[gpu]`):
    # auto = when rapids-singlecell is installed and a CUDA device is visible, else scanpy
    backend: Literal["auto", "cpu", "gpu"] = "auto"
    seed: int = 0


class AnnotateConfig(_Section):
    min_confidence: float = Field(0.1, ge=0, le=1, description="below: Unassigned")
    resolution: float | None = Field(None, description="Leiden resolution to label")


class MalignantConfig(_Section):
    """The malignant (CLL) call: clonality, copy number, programme (preprocessing.malignant)."""

    min_clone_fraction: float = Field(
        0.2, gt=0, le=1, description="dominant clone's share of a patient's typed B cells"
    )
    min_clone_cells: int = Field(10, ge=1, description="cells in the dominant clone, at least")
    min_lesion_effect: float = Field(
        0.65, gt=0, description="lesion call: clone vs reference, in reference-cell SDs"
    )
    min_lesion_carrier_excess: float = Field(
        0.15,
        ge=0,
        le=1,
        description="lesion call: share of clone cells carrying it minus reference's",
    )
    min_lesion_cells: int = Field(10, ge=1, description="B cells needed to call a lesion")
    cnv: bool = Field(True, description="infer copy number (infercnvpy)")


class AnalysesConfig(_Section):
    reference: str | None = Field(None, description="default: the sheet's first condition")
    contrasts: list[str] | None = Field(None, description="default: every other condition")
    # 5, not 10: ibrutinib switches off the genes that define activated CLL, so few cells per
    # sample keep that label; at 10 the IBR_EARLY contrast of that state was untested on the
    # demo cohort (recovery vs true labels 0.86 -> 0.99 at 5; null false positives 1 -> 2/1,170)
    min_cells: int = Field(5, ge=1, description="pseudobulk: min cells per sample x type")
    min_samples: int = Field(2, ge=1, description="pseudobulk: min samples per condition")
    n_cpus: int = Field(1, ge=1, description="DESeq2: cell types fitted in parallel")
    de_covariates: list[str] = Field(
        default_factory=list,
        description="sample-sheet columns added to the pseudobulk DESeq2 design as categorical "
        "covariates (e.g. ighv_status, sex, lane); a patient-level one is absorbed by the "
        "patient block of a paired design (recorded)",
    )
    de_engine: Literal["fast", "pydeseq2"] = Field(
        "fast",
        description="DESeq2 inference: 'fast' (vectorised, reproduces stock pydeseq2) or "
        "'pydeseq2' (stock per-gene backend)",
    )

    @field_validator("de_covariates")
    @classmethod
    def _covariates_not_design(cls, v: list[str]) -> list[str]:
        taken = {"sample_id", "patient", "condition"} & set(v)
        if taken:
            raise ValueError(
                f"{', '.join(sorted(taken))} is already in the design (condition is tested, "
                "patient is the block); list other sample-sheet columns"
            )
        if len(set(v)) != len(v):
            raise ValueError("a covariate is listed twice")
        return v


class CrosstalkConfig(_Section):
    groupby: str = "cell_type"
    n_perms: int = Field(100, ge=0)
    expr_prop: float = Field(0.1, ge=0, le=1)
    min_cells: int = Field(5, ge=1)
    resource: str | None = Field(None, description="default: consensus / mouseconsensus")
    by_sample: bool = True
    ligrec_check: bool = True
    seed: int = 0
    top_n: int = Field(1000, ge=1, description="interactions kept per condition (plus curated)")
    diff_max_padj: float = Field(0.1, gt=0, le=1, description="differential rows kept: padj")
    diff_alpha: float = Field(
        0.05, gt=0, lt=1, description="differential call: per-sample padj and partners' padj"
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="significance for the ligrec check")
    ligrec_all_conditions: bool = Field(False, description="ligrec check: every condition")


class SpatialConfig(_Section):
    """``tme-atlas spatial``: cell typing, neighbourhoods, niches and spatial LR scores."""

    min_counts: int = Field(10, ge=0, description="cells with fewer panel counts are dropped")
    min_confidence: float = Field(
        0.5, ge=0, le=1, description="mapping posterior below which a cell is 'Unknown'"
    )
    max_ref_cells_per_type: int = Field(2000, ge=10, description="atlas cells per type read")
    min_shared_genes: int = Field(20, ge=1, description="panel genes the atlas must measure")
    n_perms: int = Field(200, ge=10, description="neighbourhood-enrichment permutations")
    co_occurrence_max_cells: int = Field(5000, ge=100, description="cells per section")
    niche_k: int = Field(20, ge=3, description="neighbours defining a cell's neighbourhood")
    n_niches: int = Field(8, ge=2, le=40)
    local_score: Literal[
        "product", "norm_product", "cosine", "pearson", "spearman", "jaccard", "masked_spearman"
    ] = Field("product", description="liana bivariate local score (li.mt.bivariate)")
    max_lr_pairs: int = Field(50, ge=1, description="LR pairs scored (atlas differential)")
    alpha: float = Field(0.05, gt=0, lt=1)
    seed: int = 0


class LimitsConfig(_Section):
    max_genes_per_request: int = Field(50, ge=1)
    max_cells_quick_de: int = Field(20000, ge=100)
    max_export_cells: int = Field(200000, ge=1)
    max_display_points: int = Field(200000, ge=1000, description="scatter downsampling cap")
    # request bodies (Dash callbacks are small JSON; a lasso sends its polygon and points)
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=64 * 1024)
    max_lasso_vertices: int = Field(1000, ge=16, description="longer lassos are thinned")
    # h5ad exports of the explorer (files kept on disk until downloaded or expired)
    max_export_bytes: int = Field(2 * 1024**3, ge=1024 * 1024)
    max_export_disk_bytes: int = Field(8 * 1024**3, ge=1024 * 1024)
    exports_per_hour: int = Field(10, ge=1, description="per user (or client address)")
    export_ttl_s: int = Field(3600, ge=60)
    export_inline_bytes: int = Field(20_000_000, ge=0, description="smaller: sent inline")


class AuthConfig(_Section):
    enabled: bool = False
    # username -> password hash (werkzeug.security.generate_password_hash); never plain text
    users: dict[str, str] = Field(default_factory=dict)
    # users who may curate labels in the explorer (rename, merge, relabel a selection);
    # every other user reads only
    editors: list[str] = Field(default_factory=list)
    # without auth nobody can curate, unless this is set (local use only: edits are
    # recorded as user "local")
    curation_without_auth: bool = False

    @field_validator("editors")
    @classmethod
    def _editors_unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("an editor is listed twice")
        return v


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8050, ge=1, le=65535)
    # several atlases served by one instance: display name -> atlas directory
    atlases: dict[str, str] = Field(default_factory=dict)
    debug: bool = False
    url_base_pathname: str = "/"
    # where finished exports wait for their download, shared by every worker and process
    # of one instance ("" = <temp dir>/tme-atlas-exports-<uid>)
    export_dir: str = ""


class ComputeConfig(_Section):
    """Where the per-sample work of a build runs (QC / doublet scoring per sample).

    ``scheduler``: ``""`` = in this process, one sample after the other; ``"local"`` = a
    dask ``distributed.LocalCluster`` of ``workers`` processes (one thread each), started
    and stopped by the build; an address (``tcp://host:8786``, ``tls://...``) = an existing
    dask scheduler whose workers can read the inputs. The result does not depend on it.
    """

    scheduler: str = Field("", description='"" (in process), "local", or a dask scheduler address')
    workers: int = Field(2, ge=1, le=256, description="workers of a local cluster")
    connect_timeout_s: float = Field(10.0, gt=0, le=600, description="to reach a scheduler")

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        v = v.strip()
        if v in ("", "local") or v.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
            return v
        raise ValueError('use "" (in process), "local", or an address such as tcp://host:8786')


class Config(BaseModel):
    """The whole configuration. ``Config()`` gives the defaults."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    qc: QCConfig = Field(default_factory=QCConfig)
    hvg: HVGConfig = Field(default_factory=HVGConfig)
    scvi: ScviConfig = Field(default_factory=ScviConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    annotate: AnnotateConfig = Field(default_factory=AnnotateConfig)
    malignant: MalignantConfig = Field(default_factory=MalignantConfig)
    scanvi: ScanviConfig = Field(default_factory=ScanviConfig)
    mapping: MappingConfig = Field(default_factory=MappingConfig)
    analyses: AnalysesConfig = Field(default_factory=AnalysesConfig)
    crosstalk: CrosstalkConfig = Field(default_factory=CrosstalkConfig)
    spatial: SpatialConfig = Field(default_factory=SpatialConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    seed: int = 0

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def section_hash(self, *sections: str) -> str:
        """A stable hash of some sections (for ``--resume``)."""
        import hashlib

        payload = json.dumps({s: self.model_dump(mode="json")[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise ConfigError(f"config file {path}: use .yaml, .yml, .json or .toml")
    except (yaml.YAMLError, json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config file {path}: cannot parse ({e.__class__.__name__})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not parts:
            continue
        try:
            value: Any = yaml.safe_load(raw)  # "8080" -> 8080, "[0.5, 1]" -> list, "true" -> True
        except yaml.YAMLError:
            value = raw
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(
    file: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the :class:`Config`: defaults < ``file`` < ``env`` < ``overrides``.

    ``overrides`` are nested dicts from CLI flags (``None`` values are ignored).
    Raises :class:`ConfigError` with one line per invalid field.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    file = file or env.get(ENV_CONFIG_FILE)
    if file:
        data = _merge(data, _read_file(Path(file)))
    data = _merge(data, _env_overrides(env))
    if overrides:
        data = _merge(data, _drop_none(overrides))
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = [
            f"config {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        ]
        raise ConfigError("\n".join(lines)) from None


def _drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            sub = _drop_none(v)
            if sub:
                out[k] = sub
        elif v is not None:
            out[k] = v
    return out
