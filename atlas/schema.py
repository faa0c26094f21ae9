"""The AnnData key registry of a CLL TME atlas.

Every ``.obs``, ``.obsm``, ``.layers``, ``.uns`` key and every file name that the build
writes and the explorer / exports read is a named constant here, and nowhere else.
Readers call :func:`require_obs`, :func:`require_obsm`, ... which fail with a
:class:`MissingKeyError` that names the stage to run.

Layout of an atlas directory ``DIR`` (written by ``tme-atlas build``)::

    DIR/atlas.h5ad            the atlas (X = log1p(normalize_total 1e4), layers["counts"] raw)
    DIR/store/                column-oriented read store for the explorer (atlas.store)
    DIR/tables/*.csv          result tables (also in .uns, h5ad-safe)
    DIR/qc/report.html        QC report; DIR/qc/summary.csv
    DIR/model/                trained scVI model
    DIR/model_scanvi/         scANVI model trained from it on the atlas labels (tme-atlas map)
    DIR/integration_metrics.csv
    DIR/provenance.json       versions, config, input checksums, timings per stage
    DIR/build.log
    DIR/annotations/<set>/    curated label versions and their tables (atlas.curation; written
                              by the explorer's editors and ``analyse|crosstalk --labels``)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .errors import AtlasError

if TYPE_CHECKING:
    import numpy as np

# --------------------------------------------------------------------------------------
# files in an atlas directory
# --------------------------------------------------------------------------------------
ATLAS_FILE = "atlas.h5ad"
STORE_DIR = "store"
TABLES_DIR = "tables"
QC_DIR = "qc"
QC_REPORT_FILE = "qc/report.html"
QC_SUMMARY_FILE = "qc/summary.csv"
MODEL_DIR = "model"
SCANVI_MODEL_DIR = "model_scanvi"  # scANVI (from the scVI model, on the atlas labels): `map`
MODEL_README_FILE = "README.md"  # beside an exported model: how to map new data onto it
MAPPING_FILE = "mapping.json"  # written by `tme-atlas map`: reference, thresholds, summary
INTEGRATION_METRICS_FILE = "integration_metrics.csv"
PROVENANCE_FILE = "provenance.json"
LOG_FILE = "build.log"
WORK_DIR = ".work"  # stage checkpoints for --resume (removed after a finished build)
# curated labels (atlas.curation): DIR/annotations/<set>/manifest.json, v0001.parquet, ...,
# and the tables recomputed with a version in DIR/annotations/<set>/tables/v0001/
ANNOTATIONS_DIR = "annotations"
ANNOTATION_MANIFEST_FILE = "manifest.json"
ANNOTATION_TABLES_DIR = "tables"
ANNOTATION_PARAMS_FILE = "params.json"
ANNOTATION_COL_CELL = "cell_id"  # columns of a label version file
ANNOTATION_COL_LABEL = "label"

# files inside DIR/store/ (see atlas.store for the layout)
STORE_FORMAT_VERSION = 1
STORE_META_FILE = "meta.json"
STORE_EXPR_FILE = "expr_csc.h5"
STORE_OBS_FILE = "obs.parquet"
STORE_VAR_FILE = "var.parquet"
STORE_EMBEDDINGS_DIR = "embeddings"
STORE_SUMMARY_FILE = "summary.parquet"
STORE_TABLES_DIR = "tables"
STORE_OBS_NAMES_COL = "_obs_names"  # obs_names as a column of obs.parquet
STORE_VAR_NAMES_COL = "_var_names"  # var_names as a column of var.parquet
# columns of the precomputed summary (long format; one row per gene x group)
SUMMARY_N_CELLS = "n_cells"
SUMMARY_MEAN = "mean"  # mean log-normalised expression over all cells of the group
SUMMARY_FRAC = "frac"  # fraction of cells of the group with expression > 0
SUMMARY_MEAN_EXPRESSING = "mean_expressing"  # mean over expressing cells only (NaN if none)

# --------------------------------------------------------------------------------------
# samplesheet columns (carried into .obs)
# --------------------------------------------------------------------------------------
SHEET_SAMPLE = "sample_id"
SHEET_PATH = "path"
SHEET_PATIENT = "patient"
SHEET_CONDITION = "condition"
SHEET_TISSUE = "tissue"
SHEET_SPECIES = "species"
SHEET_VDJ = "vdj"  # optional: Cell Ranger filtered_contig_annotations.csv of the sample
SHEET_REQUIRED = (
    SHEET_SAMPLE,
    SHEET_PATH,
    SHEET_PATIENT,
    SHEET_CONDITION,
    SHEET_TISSUE,
    SHEET_SPECIES,
)
SPECIES = ("human", "mouse")

# --------------------------------------------------------------------------------------
# .obs
# --------------------------------------------------------------------------------------
OBS_SAMPLE = SHEET_SAMPLE
OBS_PATIENT = SHEET_PATIENT
OBS_CONDITION = SHEET_CONDITION
OBS_TISSUE = SHEET_TISSUE
OBS_SPECIES = SHEET_SPECIES
OBS_BARCODE = "barcode"  # original barcode; obs_names are "<sample_id>:<barcode>"

# QC (stage "qc")
OBS_TOTAL_COUNTS = "total_counts"
OBS_N_GENES = "n_genes_by_counts"
OBS_PCT_MITO = "pct_counts_mt"
OBS_QC_OUTLIER = "qc_outlier"  # bool: failed MAD / floor filters
OBS_QC_REASON = "qc_reason"  # "" or ";"-joined reasons (low_counts, low_genes, high_mito, ...)
OBS_DOUBLET_SCORE = "doublet_score"
OBS_PREDICTED_DOUBLET = "predicted_doublet"
OBS_QC_PASS = "qc_pass"  # bool: kept by QC (all False rows removed unless --keep-all)

# clustering (stage "cluster")
OBS_LEIDEN = "leiden"  # the default resolution
OBS_LEIDEN_PREFIX = "leiden_r"  # + resolution, e.g. "leiden_r0.5"

# annotation (stage "annotate")
OBS_CELL_TYPE = "cell_type"
OBS_CELL_TYPE_CONFIDENCE = "cell_type_confidence"  # float in [0, 1]
MALIGNANT_ROW = "Malignant"  # composition: the malignant fraction of all cells
CLL_LABEL_PREFIX = "CLL"  # annotation labels of the leukaemia (CLL resting, ...)
OBS_LINEAGE = "lineage"  # coarse: B/CLL, T/NK, Myeloid, ...
OBS_DOUBLET_CLUSTER = "doublet_like_cluster"  # bool
OBS_MARKER_SCORE_PREFIX = "marker_"  # per-cell marker scores, "marker_<cell type>"
UNASSIGNED = "Unassigned"

# malignant-cell call (stage "malignant": copy number, BCR clonality, CLL programme)
OBS_MALIGNANT = "malignant"  # bool: the one malignant (CLL) call per cell
OBS_MALIGNANT_CONFIDENCE = "malignant_confidence"  # float in [0, 1]
OBS_MALIGNANT_EVIDENCE = "malignant_evidence"  # str: "+"-joined evidence (clonotype, cnv, ...)
OBS_CNV_SCORE = "cnv_score"  # float: mean |inferred copy-number signal| (NaN: not inferred)
OBS_CLONOTYPE = "clonotype"  # str: BCR clonotype (V(D)J) or "<IGHV>|<light V>" from expression
OBS_CLONOTYPE_SOURCE = "clonotype_source"  # "vdj", "expression" or ""
OBS_IN_DOMINANT_CLONE = "in_dominant_clone"  # bool: carries the patient's dominant B clone
OBS_CLL_PROGRAMME = "cll_programme_score"  # float: CLL-vs-normal-B programme (TCL1 excluded)

# reference mapping (stage "scanvi"; command "tme-atlas map")
OBS_ORIGIN = "origin"  # "reference" or "query" in a query atlas written by tme-atlas map
ORIGIN_REFERENCE = "reference"
ORIGIN_QUERY = "query"
ORIGINS = (ORIGIN_REFERENCE, ORIGIN_QUERY)
OBS_TRANSFERRED_LABEL = "transferred_label"  # scANVI's most probable reference label
OBS_LABEL_UNCERTAINTY = "label_uncertainty"  # 1 - scANVI's probability of that label
UNKNOWN = "Unknown"  # scANVI's unlabeled category; a query cell's label above the threshold

# gene programmes (stage "programs")
OBS_SCORE_PREFIX = "score_"  # "score_<programme>"

# --------------------------------------------------------------------------------------
# .obsm / .layers / .var
# --------------------------------------------------------------------------------------
OBSM_SCVI = "X_scVI"
OBSM_PCA = "X_pca"  # uncorrected
OBSM_UMAP = "X_umap"
OBSM_SCANVI = "X_scANVI"  # scANVI latent (stage "scanvi"): query cells are mapped into it
LAYER_COUNTS = "counts"
VAR_GENE_ID = "gene_ids"  # Ensembl ids (or the symbol where none)
VAR_FEATURE_TYPE = "feature_types"
VAR_HVG = "highly_variable"
VAR_EXCLUDED_HVG = "hvg_excluded"  # bool: IG/TCR/mito/ribo/haemoglobin, never an HVG

# --------------------------------------------------------------------------------------
# .uns
# --------------------------------------------------------------------------------------
UNS_PROVENANCE = "tme_provenance"  # dict: versions, config (JSON string), timings
UNS_PARAMS_PREFIX = "tme_params_"  # + stage name, parameters used by that stage
UNS_TABLES = "tme_tables"  # dict: table name -> DataFrame (h5ad-safe columns)
UNS_REFERENCE_CONDITION = "tme_reference_condition"
UNS_CONDITION_ORDER = "tme_condition_order"  # list of conditions in sheet order
UNS_SPECIES = "tme_species"
UNS_PROGRAMS = "tme_programs"  # dict: programme name -> list of genes used
UNS_LEIDEN_RESOLUTIONS = "tme_leiden_resolutions"
UNS_MAPPING = "tme_mapping"  # dict in a query atlas: reference atlas, model, thresholds
UNS_EXPORT = "tme_export"  # dict in an exported h5ad: source, filters (JSON), sizes, time

UNS_MALIGNANT = "tme_malignant"  # dict: parameters, versions, lesion regions used
OBSM_CNV = "X_cnv"  # infercnvpy's smoothed copy-number signal (dropped before the atlas is written)
UNS_CNV = "cnv"  # infercnvpy's chromosome start positions in OBSM_CNV

# table names (in .uns[UNS_TABLES] and as DIR/tables/<name>.csv)
TABLE_QC_SUMMARY = "qc_summary"
TABLE_INTEGRATION_METRICS = "integration_metrics"
TABLE_COMPOSITION = "composition"  # test results: cell_type, condition, reference, ...
TABLE_PROPORTIONS = "proportions"  # per-sample proportions: sample_id, cell_type, n, prop
TABLE_DE = "de"
TABLE_PROGRAMS = "programs"
TABLE_INTERACTIONS = "interactions"
TABLE_INTERACTIONS_BY_SAMPLE = "interactions_by_sample"
TABLE_INTERACTIONS_DIFF = "interactions_diff"
# every tested differential interaction, before the cut-offs (only on request: truth tests)
TABLE_INTERACTIONS_DIFF_ALL = "interactions_diff_all"
TABLE_LIGREC_AGREEMENT = "ligrec_agreement"
TABLE_MARKERS = "cluster_markers"
TABLE_VDJ_CONTIGS = "vdj_contigs"  # parsed contigs of the sample sheet's vdj files (build only)
TABLE_LESIONS = "cnv_lesions"  # per patient x lesion: fraction of B / malignant cells carrying it
TABLE_CNV_PROFILE = "cnv_profile"  # per patient x group x window: mean copy-number signal
TABLE_CLONES = "b_clones"  # per patient: dominant B clone, IGHV, mutation status, fractions
TABLES = (
    TABLE_QC_SUMMARY,
    TABLE_INTEGRATION_METRICS,
    TABLE_COMPOSITION,
    TABLE_PROPORTIONS,
    TABLE_DE,
    TABLE_PROGRAMS,
    TABLE_INTERACTIONS,
    TABLE_INTERACTIONS_BY_SAMPLE,
    TABLE_INTERACTIONS_DIFF,
    TABLE_INTERACTIONS_DIFF_ALL,
    TABLE_LIGREC_AGREEMENT,
    TABLE_MARKERS,
    TABLE_VDJ_CONTIGS,
    TABLE_LESIONS,
    TABLE_CNV_PROFILE,
    TABLE_CLONES,
)

# columns of result tables that several modules share
COL_CELL_TYPE = "cell_type"
COL_CONDITION = "condition"
COL_REFERENCE = "reference"
COL_GENE = "gene"
COL_SOURCE = "source"
COL_TARGET = "target"
COL_LIGAND = "ligand"
COL_RECEPTOR = "receptor"
COL_LOG2FC = "log2fc"
COL_PVALUE = "pvalue"
COL_PADJ = "padj"
COL_CURATED = "curated"


# --------------------------------------------------------------------------------------
# which stage writes what: declared by the build's stage registry (preprocessing.stages)
# --------------------------------------------------------------------------------------
def params_key(stage: str) -> str:
    """``.uns`` key of the parameters a build stage used (see :mod:`atlas.params`)."""
    return f"{UNS_PARAMS_PREFIX}{stage}"


def stage_of(key: str) -> str | None:
    """The build stage that writes ``key`` (``None`` when no stage declares it).

    The answer comes from the stage registry :data:`preprocessing.stages.STAGES`, the one
    place that declares the keys each stage writes. ``preprocessing`` is part of this
    distribution; it is imported here on first use only (it imports this module).
    """
    try:
        from preprocessing.stages import stage_of as _stage_of
    except ImportError:  # pragma: no cover - an atlas reader installed without the builder
        return None
    return _stage_of(key)


def run_hint(key: str) -> str:
    """The command that produces ``key``, e.g. ``tme-atlas build (stage 'annotate')``."""
    try:
        from preprocessing.stages import run_hint as _run_hint
    except ImportError:  # pragma: no cover
        return "tme-atlas build"
    return _run_hint(key)


class MissingKeyError(AtlasError, KeyError):
    """An atlas lacks a key; the message names the stage / command to run."""

    def __init__(self, where: str, key: str):
        self.where = where
        self.key = key
        self.stage = stage_of(key)
        super().__init__(f"atlas has no {where}[{key!r}]: run {run_hint(key)} first")


def _require(container: Iterable[str], where: str, keys: Iterable[str]) -> None:
    have = set(container)
    for key in keys:
        if key not in have:
            raise MissingKeyError(where, key)


def require_obs(adata, *keys: str) -> None:
    """Raise :class:`MissingKeyError` unless every key is an ``.obs`` column."""
    _require(adata.obs.columns, "obs", keys)


def require_obsm(adata, *keys: str) -> None:
    _require(adata.obsm.keys(), "obsm", keys)


def require_layer(adata, *keys: str) -> None:
    _require(adata.layers.keys(), "layers", keys)


def require_uns(adata, *keys: str) -> None:
    _require(adata.uns.keys(), "uns", keys)


def require_table(adata, *names: str) -> None:
    tables = adata.uns.get(UNS_TABLES, {})
    for name in names:
        if name not in tables:
            raise MissingKeyError(f"uns[{UNS_TABLES!r}]", name)


def flag_column(adata, key: str) -> np.ndarray:
    """A boolean ``.obs`` flag as a bool array, missing values False. Reads the forms a
    flag takes after concatenation and an h5ad round trip: bool, nullable boolean, object
    with NaN, and categoricals of ``True``/``False`` strings (``"False"`` is False)."""
    import pandas as pd

    s = getattr(adata, "obs", adata)[key]  # an AnnData or its obs frame
    if s.dtype == bool:
        return s.to_numpy()
    if isinstance(s.dtype, pd.CategoricalDtype):
        s = s.astype(object)
    if pd.api.types.is_numeric_dtype(s.dtype) or pd.api.types.is_bool_dtype(s.dtype):
        return s.astype("float64").fillna(0.0).to_numpy() != 0
    return s.map(
        lambda x: x is True or x == "True" or (not isinstance(x, str) and x == 1)
    ).to_numpy(dtype=bool)


def leiden_key(resolution: float) -> str:
    """``.obs`` key of a Leiden clustering at ``resolution``."""
    return f"{OBS_LEIDEN_PREFIX}{resolution:g}"


def score_key(programme: str) -> str:
    """``.obs`` key of a gene-programme score."""
    return f"{OBS_SCORE_PREFIX}{programme}"


def score_columns(columns: Iterable[str]) -> list[str]:
    """The programme-score columns among ``columns``."""
    return [c for c in columns if c.startswith(OBS_SCORE_PREFIX)]


# --------------------------------------------------------------------------------------
# result-table columns: the one definition the builders (preprocessing.analyses,
# preprocessing.crosstalk, preprocessing.qc, preprocessing.integrate), the synthetic atlas
# (atlas.testing) and the explorer share
# --------------------------------------------------------------------------------------
LR_KEY_COLUMNS = [COL_SOURCE, COL_TARGET, COL_LIGAND, COL_RECEPTOR]
# per-method scores of liana's rank_aggregate (CellPhoneDB, Connectome, log2FC, NATMI, SCA)
LIANA_SCORE_COLUMNS = (
    "lr_means",  # CellPhoneDB magnitude
    "cellphone_pvals",  # CellPhoneDB specificity (permutations)
    "expr_prod",  # NATMI / Connectome magnitude
    "scaled_weight",  # Connectome specificity
    "lr_logfc",  # log2FC specificity
    "spec_weight",  # NATMI specificity
    "lrscore",  # SingleCellSignalR magnitude
)
TABLE_COLUMNS: dict[str, list[str]] = {
    TABLE_COMPOSITION: [
        COL_CELL_TYPE,
        COL_CONDITION,
        COL_REFERENCE,
        "mean_prop",
        "mean_prop_ref",
        COL_LOG2FC,
        COL_PVALUE,
        COL_PADJ,
        "n_samples",
        "n_samples_cond",
        "n_samples_ref",
        "t",
        "paired",
        "compartment",
    ],
    TABLE_PROPORTIONS: [
        OBS_SAMPLE,
        OBS_PATIENT,
        OBS_CONDITION,
        COL_CELL_TYPE,
        "n_cells",
        "n_total",
        "prop",
    ],
    TABLE_DE: [
        COL_CELL_TYPE,
        COL_GENE,
        COL_CONDITION,
        COL_REFERENCE,
        COL_LOG2FC,
        "lfcse",
        COL_PVALUE,
        COL_PADJ,
        "base_mean",
        "n_samples_cond",
        "n_samples_ref",
        "paired",
    ],
    TABLE_PROGRAMS: [
        COL_CELL_TYPE,
        "program",
        COL_CONDITION,
        COL_REFERENCE,
        "mean",
        "mean_ref",
        "diff",
        COL_PVALUE,
        COL_PADJ,
        "n_samples",
        "n_samples_cond",
        "n_samples_ref",
        "paired",
    ],
    TABLE_INTERACTIONS: [
        COL_CONDITION,
        *LR_KEY_COLUMNS,
        "magnitude_rank",
        "specificity_rank",
        *LIANA_SCORE_COLUMNS,
        COL_CURATED,
        "curated_source",
    ],
    TABLE_INTERACTIONS_BY_SAMPLE: [
        OBS_SAMPLE,
        OBS_PATIENT,
        COL_CONDITION,
        *LR_KEY_COLUMNS,
        "magnitude_rank",
        "specificity_rank",
        "lr_means",
        "lrscore",
        COL_CURATED,
    ],
    TABLE_INTERACTIONS_DIFF: [
        COL_CONDITION,
        COL_REFERENCE,
        *LR_KEY_COLUMNS,
        # primary: per-sample lr_means, condition vs reference, patient block
        "score",  # estimated change of the per-sample lr_means
        "t",
        COL_PVALUE,
        COL_PADJ,
        "direction",
        # partners' pseudobulk DE (no imputed p-values) and the call
        "driver",  # both / ligand / receptor / opposing / none
        "called",  # padj <= alpha and both partners change with the score
        "pvalue_both",
        "ligand_log2fc",
        "receptor_log2fc",
        "ligand_log2fc_shrunk",
        "receptor_log2fc_shrunk",
        "ligand_pvalue",
        "receptor_pvalue",
        "ligand_padj",
        "receptor_padj",
        "lr_means",
        "lr_means_ref",
        "n_samples",
        "paired",
        # sender / receiver abundance beside (mean per-sample fraction of usable cells)
        "source_frac",
        "source_frac_ref",
        "source_frac_log2fc",
        "target_frac",
        "target_frac_ref",
        "target_frac_log2fc",
        "ligand_gene",
        "receptor_gene",
        "ligand_prop",
        "receptor_prop",
        COL_CURATED,
        "curated_source",
    ],
    TABLE_LIGREC_AGREEMENT: [
        COL_CONDITION,
        "n_compared",
        "n_sig_liana",
        "n_sig_squidpy",
        "n_sig_both",
        "jaccard",
        "spearman_means",
        "alpha",
        "n_perms",
    ],
    TABLE_QC_SUMMARY: [
        OBS_SAMPLE,
        "n_cells_in",
        "n_cells_out",
        "n_low_quality",
        "n_doublets",
        "median_counts",
        "median_genes",
        OBS_PATIENT,
        OBS_CONDITION,
        "n_removed",
        "n_flag_low_counts",
        "n_flag_high_counts",
        "n_flag_low_genes",
        "n_flag_high_genes",
        "n_flag_high_mito",
        "n_flag_doublet",
        "median_counts_before",
        "median_genes_before",
        "median_pct_mito_before",
        "median_pct_mito",
        "doublet_threshold",
        "expected_doublet_rate",
    ],
    TABLE_INTEGRATION_METRICS: ["embedding", "metric", "value"],
    TABLE_LESIONS: [
        OBS_PATIENT,
        "lesion",
        "chromosome",
        "start",
        "end",
        "kind",
        "called",
        "frac_b_cells",
        "frac_malignant",
        "frac_reference",
        "n_b_cells",
        "recurrent",
    ],
    TABLE_CNV_PROFILE: [OBS_PATIENT, "group", "window", "chromosome", "start", "end", "mean"],
    TABLE_CLONES: [
        OBS_PATIENT,
        "source",
        "clonotype",
        "ighv",
        "light_v",
        "ighv_identity",
        "ighv_status",
        "n_b_cells",
        "n_typed",
        "clone_fraction",
        "clonal",
        "n_malignant",
    ],
}

# --------------------------------------------------------------------------------------
# spatial sections (``tme-atlas spatial``; preprocessing.spatial). Written to
# ATLAS/spatial/ by default, beside the atlas whose cell types they are mapped onto:
#   spatial/spatial.h5ad      cells x panel genes (X log1p(normalize_total 100), counts layer),
#                             obsm["spatial"], obs cell type (+ confidence), niche
#   spatial/cells.parquet     per cell: section, x, y, cell type, confidence, niche (explorer)
#   spatial/lr_local.npy      per cell x scored LR pair: liana's local score (float32)
#   spatial/expr_*.npy        X as CSC (float32 data, int32 indices, int64 indptr), by gene
#   spatial/tables/*.csv      the tables below
#   spatial/meta.json         sections, conditions, LR pairs scored, parameters, versions
# --------------------------------------------------------------------------------------
SPATIAL_DIR = "spatial"
SPATIAL_H5AD_FILE = "spatial.h5ad"
SPATIAL_CELLS_FILE = "cells.parquet"
SPATIAL_LR_LOCAL_FILE = "lr_local.npy"
# log-normalised panel expression, CSC (by gene), for the explorer: data / indices / indptr
SPATIAL_EXPR_FILES = ("expr_data.npy", "expr_indices.npy", "expr_indptr.npy")
SPATIAL_META_FILE = "meta.json"
OBSM_SPATIAL = "spatial"  # (n, 2) cell centroids, µm
OBS_SPATIAL_X = "x_um"
OBS_SPATIAL_Y = "y_um"
OBS_NICHE = "niche"
SPATIAL_UNKNOWN = "Unknown"  # mapping below the confidence threshold
OBSP_SPATIAL_CONNECTIVITIES = "spatial_connectivities"  # squidpy's spatial graph
XENIUM_MATRIX_FILE = "cell_feature_matrix.h5"
XENIUM_CELLS_FILES = ("cells.csv.gz", "cells.csv", "cells.parquet")
XENIUM_CELL_ID = "cell_id"
XENIUM_X = "x_centroid"
XENIUM_Y = "y_centroid"

TABLE_NHOOD_BY_SECTION = "nhood_enrichment_by_section"
TABLE_NHOOD = "nhood_enrichment"
TABLE_CO_OCCURRENCE = "co_occurrence"
TABLE_NICHE_COMPOSITION = "niche_composition"
TABLE_NICHE_PROPORTIONS = "niche_proportions"
TABLE_NICHE_TEST = "niche_test"
TABLE_SPATIAL_LR = "spatial_lr"
TABLE_SPATIAL_LR_BY_SECTION = "spatial_lr_by_section"
TABLE_SPATIAL_LR_DIFF = "spatial_lr_diff"  # per-section mean local score: state vs reference
COL_TYPE_A = "cell_type_a"
COL_TYPE_B = "cell_type_b"
COL_ZSCORE = "zscore"
COL_NICHE = "niche"
COL_DISTANCE = "distance"
COL_RATIO = "ratio"
COL_FRACTION = "fraction"
COL_LOCAL_MEAN = "local_mean"
COL_GLOBAL_MORANS = "morans"
COL_INTERACTION = "interaction"

SPATIAL_TABLE_COLUMNS: dict[str, list[str]] = {
    TABLE_NHOOD_BY_SECTION: [OBS_SAMPLE, OBS_PATIENT, OBS_CONDITION, COL_TYPE_A, COL_TYPE_B,
                             COL_ZSCORE, "count"],
    TABLE_NHOOD: [COL_CONDITION, COL_TYPE_A, COL_TYPE_B, COL_ZSCORE, "mean_zscore",
                  "n_sections", COL_PVALUE, COL_PADJ],
    TABLE_CO_OCCURRENCE: [OBS_SAMPLE, OBS_CONDITION, COL_TYPE_A, COL_TYPE_B, COL_DISTANCE,
                          COL_RATIO],
    TABLE_NICHE_COMPOSITION: [COL_NICHE, COL_CELL_TYPE, COL_FRACTION, "n_cells"],
    TABLE_NICHE_PROPORTIONS: [OBS_SAMPLE, OBS_PATIENT, OBS_CONDITION, COL_NICHE, "n_cells",
                              "proportion"],
    TABLE_NICHE_TEST: [COL_NICHE, COL_CONDITION, COL_REFERENCE, "mean_prop", "mean_prop_ref",
                       COL_LOG2FC, COL_PVALUE, COL_PADJ, "n_samples", "t", "paired"],
    TABLE_SPATIAL_LR: [COL_INTERACTION, COL_LIGAND, COL_RECEPTOR, COL_LOCAL_MEAN,
                       COL_GLOBAL_MORANS, "ligand_props", "receptor_props", "source_table"],
    TABLE_SPATIAL_LR_BY_SECTION: [OBS_SAMPLE, OBS_CONDITION, COL_INTERACTION, COL_LOCAL_MEAN],
    TABLE_SPATIAL_LR_DIFF: [COL_INTERACTION, COL_CONDITION, COL_REFERENCE, "mean", "mean_ref",
                            "change", "t", COL_PVALUE, COL_PADJ, "n_sections", "paired"],
}  # fmt: skip
