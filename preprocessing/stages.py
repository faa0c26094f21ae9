"""The build's stage registry: the one place that says which stages ``tme-atlas build`` runs.

Everything else is derived from :data:`STAGES`: the run order, the checkpoints and the
``--resume`` hashes (:mod:`preprocessing.pipeline`), skips and the CLI's ``--skip``
choices, the "run stage X first" hints of :class:`atlas.schema.MissingKeyError`
(:func:`stage_of`, :func:`run_hint`), the per-stage timings in the provenance and the
``.obs`` columns an input h5ad may not bring (:func:`derived_obs`).

The stage contract
------------------
A stage is a function of the module that does the science::

    def my_stage(adata: AnnData, *, option: int = 3, ...) -> AnnData:
        '''One line.

        Writes
        ------
        ``obs[schema.OBS_MY_KEY]``, ``uns[schema.params_key("my_stage")]``
        '''
        ...
        record_params(adata, "my_stage", {"option": option})   # atlas.params
        return adata

``adata`` first, options keyword-only, the (possibly new) AnnData returned; tables go to
``adata.uns[schema.UNS_TABLES]`` through :func:`atlas.tables.put_table`, parameters through
:func:`atlas.params.record_params`; the docstring lists the keys written.
``tests/test_stages.py`` checks all of that for every registered stage.

Adding a stage
--------------
1. Name its keys in :mod:`atlas.schema` (every key is a constant there) and, when it has
   settings, add a config section in :mod:`atlas.config`.
2. Write the stage function in its own module (``preprocessing/<name>.py``).
3. Add ONE :class:`Stage` entry to :data:`STAGES` below, in run order: the function, how
   its options come from the build (:class:`~preprocessing.pipeline.BuildContext`), the
   config sections that change its result (for ``--resume``) and the keys it writes.

Nothing else: checkpoints, resume, skips, hints, provenance and the CLI follow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from atlas import schema

from .analyses import run_analyses
from .annotate import annotate
from .cluster import run_clustering
from .crosstalk import run_crosstalk
from .integrate import normalize, run_scvi, select_hvg
from .malignant import run_malignant
from .programs import score_programs
from .qc import run_qc
from .scanvi_model import train_scanvi

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import BuildContext


@dataclass(frozen=True)
class Writes:
    """The keys a stage writes, by container (all constants of :mod:`atlas.schema`)."""

    obs: tuple[str, ...] = ()
    obs_prefixes: tuple[str, ...] = ()  # key families, e.g. leiden_r<resolution>
    obsm: tuple[str, ...] = ()
    var: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()
    uns: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()  # names in uns[UNS_TABLES]

    def keys(self) -> tuple[str, ...]:
        return (*self.obs, *self.obsm, *self.var, *self.layers, *self.uns, *self.tables)


def _no_options(ctx: BuildContext) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Stage:
    """One build stage (see the module docstring).

    Attributes
    ----------
    name
        Stage name: checkpoint file, provenance entry, log lines, ``--skip`` choice.
    run
        ``run(adata, **options(ctx)) -> AnnData``; ``None`` for the two stages the driver
        does itself (``ingest``: validation; ``write``: the outputs).
    options
        The keyword options of ``run`` from the build context.
    sections
        Configuration sections (and top-level fields) that change the stage's result;
        with every upstream stage they make its ``--resume`` hash.
    context
        :class:`~preprocessing.pipeline.BuildContext` attributes that change the result
        (hashed like ``sections``), e.g. ``keep_all``.
    writes
        The keys it writes: the hints of :class:`atlas.schema.MissingKeyError` and the
        structure test read them.
    checkpoint
        Leave ``.work/<name>.h5ad`` for ``--resume``.
    products
        Paths under ``.work`` the stage writes beside the AnnData (the scVI model, the QC
        report): emptied before it runs, required for its checkpoint to count.
    skippable
        ``tme-atlas build --skip <name>`` may leave it out.
    needs
        Skippable stages whose skip skips this one too.
    min_conditions
        Skipped when the input has fewer conditions.
    command
        The command that runs the stage on a finished atlas (for hints); default
        ``tme-atlas build (stage '<name>')``.
    """

    name: str
    run: Callable[..., Any] | None
    options: Callable[[BuildContext], dict[str, Any]] = _no_options
    sections: tuple[str, ...] = ()
    context: tuple[str, ...] = ()
    writes: Writes = field(default_factory=Writes)
    checkpoint: bool = True
    products: tuple[str, ...] = ()
    skippable: bool = False
    needs: tuple[str, ...] = ()
    min_conditions: int = 0
    command: str | None = None

    def skip_reason(self, ctx: BuildContext) -> str | None:
        """Why the stage is skipped in this build (``None``: it runs)."""
        for name in (self.name, *self.needs):
            if name in ctx.skip:
                return f"--skip {name}"
        if len(ctx.conditions) < self.min_conditions:
            return "only one condition" if len(ctx.conditions) == 1 else "too few conditions"
        return None

    @property
    def hint(self) -> str:
        return self.command or f"tme-atlas build (stage '{self.name}')"


def _params(*stages: str) -> tuple[str, ...]:
    return tuple(schema.params_key(s) for s in stages)


# ======================================================================================
# the registry, in run order
# ======================================================================================
STAGES: tuple[Stage, ...] = (
    Stage(
        "ingest",
        None,  # the driver validates every input first (preprocessing.ingest)
        context=("reference",),
        checkpoint=False,
        writes=Writes(
            obs=(
                schema.OBS_SAMPLE,
                schema.OBS_PATIENT,
                schema.OBS_CONDITION,
                schema.OBS_TISSUE,
                schema.OBS_SPECIES,
                schema.OBS_BARCODE,
            ),
            layers=(schema.LAYER_COUNTS,),
            uns=(schema.UNS_SPECIES, schema.UNS_CONDITION_ORDER, schema.UNS_REFERENCE_CONDITION),
        ),
    ),
    Stage(
        "qc",
        run_qc,
        options=lambda ctx: {
            "config": ctx.config.qc,
            "species": ctx.species,
            "keep_all": ctx.keep_all,
            "seed": ctx.config.seed,
            "report_dir": ctx.qc_dir,
        },
        sections=("qc", "seed"),
        context=("keep_all",),
        products=(schema.QC_REPORT_FILE,),
        writes=Writes(
            obs=(
                schema.OBS_TOTAL_COUNTS,
                schema.OBS_N_GENES,
                schema.OBS_PCT_MITO,
                schema.OBS_QC_OUTLIER,
                schema.OBS_QC_REASON,
                schema.OBS_DOUBLET_SCORE,
                schema.OBS_PREDICTED_DOUBLET,
                schema.OBS_QC_PASS,
            ),
            uns=_params("qc"),
            tables=(schema.TABLE_QC_SUMMARY,),
        ),
    ),
    Stage("normalize", normalize, writes=Writes(uns=_params("normalize"))),
    Stage(
        "hvg",
        select_hvg,
        options=lambda ctx: {
            "config": ctx.config.hvg,
            "batch_key": schema.OBS_SAMPLE,
            "species": ctx.species,
        },
        sections=("hvg",),
        writes=Writes(var=(schema.VAR_HVG, schema.VAR_EXCLUDED_HVG), uns=_params("hvg")),
    ),
    Stage(
        "integrate",
        run_scvi,
        options=lambda ctx: {"config": ctx.config.scvi, "model_dir": ctx.model_dir},
        sections=("scvi",),
        products=(schema.MODEL_DIR,),
        writes=Writes(obsm=(schema.OBSM_SCVI, schema.OBSM_PCA), uns=_params("integrate")),
    ),
    Stage(
        "cluster",
        run_clustering,
        options=lambda ctx: {"config": ctx.config.cluster},
        sections=("cluster",),
        writes=Writes(
            obs=(schema.OBS_LEIDEN,),
            obs_prefixes=(schema.OBS_LEIDEN_PREFIX,),
            obsm=(schema.OBSM_UMAP,),
            uns=(schema.UNS_LEIDEN_RESOLUTIONS, *_params("cluster")),
        ),
    ),
    Stage(
        "annotate",
        annotate,
        options=lambda ctx: {
            "config": ctx.config.annotate,
            "species": ctx.species,
            # integration metrics need labels; at build time those are the annotation's
            "metrics_batch_key": ctx.config.scvi.batch_key,
            "seed": ctx.config.seed,
        },
        sections=("annotate", "seed"),
        writes=Writes(
            obs=(
                schema.OBS_CELL_TYPE,
                schema.OBS_CELL_TYPE_CONFIDENCE,
                schema.OBS_LINEAGE,
                schema.OBS_DOUBLET_CLUSTER,
            ),
            obs_prefixes=(schema.OBS_MARKER_SCORE_PREFIX,),
            uns=_params("annotate"),
            tables=(schema.TABLE_MARKERS, schema.TABLE_INTEGRATION_METRICS),
        ),
    ),
    Stage(
        "malignant",
        run_malignant,
        options=lambda ctx: {"species": ctx.species, "config": ctx.config.malignant},
        sections=("malignant",),
        writes=Writes(
            obs=(
                schema.OBS_MALIGNANT,
                schema.OBS_MALIGNANT_CONFIDENCE,
                schema.OBS_MALIGNANT_EVIDENCE,
                schema.OBS_CNV_SCORE,
                schema.OBS_CLONOTYPE,
                schema.OBS_CLONOTYPE_SOURCE,
                schema.OBS_IN_DOMINANT_CLONE,
                schema.OBS_CLL_PROGRAMME,
            ),
            uns=(schema.UNS_MALIGNANT, schema.UNS_CNV, *_params("malignant")),
            tables=(schema.TABLE_LESIONS, schema.TABLE_CNV_PROFILE, schema.TABLE_CLONES),
        ),
    ),
    Stage(
        "scanvi",
        train_scanvi,
        options=lambda ctx: {
            "scvi_model_dir": ctx.model_dir,
            "model_dir": ctx.scanvi_model_dir,
            "config": ctx.config.scanvi,
            "scvi_config": ctx.config.scvi,
        },
        sections=("scanvi",),
        products=(schema.SCANVI_MODEL_DIR,),
        skippable=True,
        command="tme-atlas build (stage 'scanvi')",
        writes=Writes(obsm=(schema.OBSM_SCANVI,), uns=_params("scanvi")),
    ),
    Stage(
        "programs",
        score_programs,
        options=lambda ctx: {"species": ctx.species, "seed": ctx.config.seed},
        sections=("seed",),
        writes=Writes(
            obs_prefixes=(schema.OBS_SCORE_PREFIX,),
            uns=(schema.UNS_PROGRAMS, *_params("programs")),
        ),
    ),
    Stage(
        "analyses",
        run_analyses,
        options=lambda ctx: {"config": ctx.config},
        sections=("analyses",),
        skippable=True,
        min_conditions=2,
        command="tme-atlas analyse DIR",
        writes=Writes(
            uns=_params("analyses"),
            tables=(
                schema.TABLE_PROPORTIONS,
                schema.TABLE_COMPOSITION,
                schema.TABLE_DE,
                schema.TABLE_PROGRAMS,
            ),
        ),
    ),
    Stage(
        "crosstalk",
        run_crosstalk,
        options=lambda ctx: {"config": ctx.config},
        sections=("crosstalk",),
        skippable=True,
        needs=("analyses",),
        min_conditions=2,
        command="tme-atlas crosstalk DIR",
        writes=Writes(
            uns=_params("crosstalk"),
            tables=(
                schema.TABLE_INTERACTIONS,
                schema.TABLE_INTERACTIONS_BY_SAMPLE,
                schema.TABLE_INTERACTIONS_DIFF,
                schema.TABLE_LIGREC_AGREEMENT,
            ),
        ),
    ),
    Stage("write", None, checkpoint=False, writes=Writes(uns=(schema.UNS_PROVENANCE,))),
)


# ======================================================================================
# derived views
# ======================================================================================
def names() -> tuple[str, ...]:
    """Stage names in run order."""
    return tuple(s.name for s in STAGES)


def get(name: str) -> Stage:
    """The stage called ``name`` (``KeyError`` when there is none)."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no build stage {name!r} (stages: {', '.join(names())})")


def skippable() -> tuple[str, ...]:
    """Stages ``tme-atlas build --skip`` accepts."""
    return tuple(s.name for s in STAGES if s.skippable)


def stage_of(key: str) -> str | None:
    """The stage that writes ``key`` (an ``.obs``/``.obsm``/... key or a table name)."""
    for s in STAGES:
        if key in s.writes.keys() or any(key.startswith(p) for p in s.writes.obs_prefixes):
            return s.name
    return None


def run_hint(key: str) -> str:
    """The command that produces ``key`` (``tme-atlas build`` when no stage declares it)."""
    name = stage_of(key)
    return get(name).hint if name is not None else "tme-atlas build"


def derived_obs() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``.obs`` columns (and column prefixes) a build writes after ingest: an input h5ad
    that brings its own is renamed ``input_<name>`` (:mod:`preprocessing.ingest`)."""
    later = [s for s in STAGES if s.name != "ingest"]
    return (
        tuple(k for s in later for k in s.writes.obs),
        tuple(p for s in later for p in s.writes.obs_prefixes),
    )
