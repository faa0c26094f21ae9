"""``tme-atlas simulate``: a CLL tumour-microenvironment cohort with planted, written-down truth.

The simulator is the demo dataset and the ground truth of every scientific test. It writes
what a user would bring: one Cell Ranger v3 folder per sample (``matrix.mtx.gz``,
``barcodes.tsv.gz``, ``features.tsv.gz``), a ``samplesheet.csv`` and ``truth/`` tables of
everything that was planted.

Design (paired): ``n_patients`` patients, each sampled in every resistance state of
:data:`CONDITIONS`; a sample is patient x state; the reference state is ``NAIVE``.

Generative model, per sample:

* every cell type has a log-mean profile over all genes (housekeeping, ribosomal and mito
  genes at realistic levels; lineage-shared and type-specific marker programmes; a seeded
  log-normal background with lineage- and type-level deviations);
* per patient a gene-wise log-normal batch (sd 0.2) and a clonal immunoglobulin of the
  leukaemia (one IGHV + one light chain, 3-8% of CLL UMIs); per sample another gene-wise
  batch (sd 0.1) -- both applied to every cell type and every state alike, so nulls stay null;
* planted condition effects (``truth/de.csv``) multiply the mean of a gene in a cell type,
  in a ``fraction_affected`` of that type's cells;
* composition: baseline proportions with planted log2 shifts per state
  (``truth/composition.csv``) and log-normal noise per sample and type;
* library size per cell log-normal around a per-type median; counts are negative binomial
  (gamma-Poisson) with gene-wise dispersion;
* nuisance: heterotypic doublets (sum of two cells of different types) at 10x loading rates
  (0.8% per 1,000 cells of the sample, :func:`doublet_rate_for`), ~5% low-quality
  cells (1/4 of the UMIs, 20-60% mito), 2-5% ambient RNA from the sample's pooled profile.

Ligand-receptor truth (``truth/lr.csv``) follows from the planted ligand / receptor changes:
``kind`` ``planted`` when both partners change in the same direction, ``ligand_only`` when
only the ligand does (column ``driver``); null pairs (expressed, unchanged) have direction
``none``. Only pairs present in LIANA's
``consensus`` (human) / ``mouseconsensus`` (mouse) resource are listed.
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .log import get_logger, progress

log = get_logger("simulate")

# ======================================================================================
# public constants
# ======================================================================================
CONDITIONS: tuple[str, ...] = ("NAIVE", "IBR_EARLY", "IBR_RES", "VEN_RES")
REFERENCE: str = "NAIVE"
CONDITION_LABELS = {
    "NAIVE": "treatment-naive",
    "IBR_EARLY": "responding on ibrutinib",
    "IBR_RES": "ibrutinib-resistant",
    "VEN_RES": "venetoclax-resistant",
}
DEFAULT_PATIENTS = 4
DEFAULT_CELLS_PER_SAMPLE = 1100
DEFAULT_TISSUE = "PB"
SPECIES = ("human", "mouse")

CLL_RESTING = "CLL resting"
CLL_ACTIVATED = "CLL activated"
CLL_PROLIFERATING = "CLL proliferating"
NORMAL_B = "Normal B"
CD4_NAIVE = "CD4 naive"
CD4_TFH = "CD4 Tfh"
CD4_TREG = "CD4 Treg"
CD8_EFFECTOR = "CD8 effector"
CD8_EXHAUSTED = "CD8 exhausted"
NK = "NK"
MONO_CLASSICAL = "Classical monocyte"
MONO_NONCLASSICAL = "Non-classical monocyte"
NLC = "NLC"
CDC = "cDC"
PDC = "pDC"
PLATELET = "Platelet"
DOUBLET = "Doublet"

CELL_TYPES: tuple[str, ...] = (
    CLL_RESTING,
    CLL_ACTIVATED,
    CLL_PROLIFERATING,
    NORMAL_B,
    CD4_NAIVE,
    CD4_TFH,
    CD4_TREG,
    CD8_EFFECTOR,
    CD8_EXHAUSTED,
    NK,
    MONO_CLASSICAL,
    MONO_NONCLASSICAL,
    NLC,
    CDC,
    PDC,
    PLATELET,
)
CLL_TYPES = (CLL_RESTING, CLL_ACTIVATED, CLL_PROLIFERATING)

LINEAGE: dict[str, str] = {
    CLL_RESTING: "B/CLL",
    CLL_ACTIVATED: "B/CLL",
    CLL_PROLIFERATING: "B/CLL",
    NORMAL_B: "B/CLL",
    CD4_NAIVE: "T/NK",
    CD4_TFH: "T/NK",
    CD4_TREG: "T/NK",
    CD8_EFFECTOR: "T/NK",
    CD8_EXHAUSTED: "T/NK",
    NK: "T/NK",
    MONO_CLASSICAL: "Myeloid",
    MONO_NONCLASSICAL: "Myeloid",
    NLC: "Myeloid",
    CDC: "Myeloid",
    PDC: "pDC",
    PLATELET: "Platelet",
}

# baseline (NAIVE) proportions in blood; renormalised
BASE_PROPORTIONS: dict[str, float] = {
    CLL_RESTING: 0.46,
    CLL_ACTIVATED: 0.08,
    CLL_PROLIFERATING: 0.02,
    NORMAL_B: 0.02,
    CD4_NAIVE: 0.08,
    CD4_TFH: 0.025,
    CD4_TREG: 0.02,
    CD8_EFFECTOR: 0.06,
    CD8_EXHAUSTED: 0.02,
    NK: 0.04,
    MONO_CLASSICAL: 0.06,
    MONO_NONCLASSICAL: 0.015,
    NLC: 0.025,
    CDC: 0.008,
    PDC: 0.006,
    PLATELET: 0.012,
}

# planted composition shifts: log2 fold change of the (pre-normalisation) proportion
COMPOSITION_SHIFTS: dict[str, dict[str, float]] = {
    "IBR_EARLY": {CLL_ACTIVATED: -1.8, CLL_PROLIFERATING: -1.2},
    "IBR_RES": {NLC: 1.6, CD8_EXHAUSTED: 1.2, CLL_PROLIFERATING: 1.0},
    "VEN_RES": {NLC: 1.5, CD8_EXHAUSTED: 1.2, CD4_TFH: 1.2},
}

# median UMIs per cell type
LIBRARY_MEDIAN: dict[str, float] = {
    CLL_RESTING: 3000,
    CLL_ACTIVATED: 4200,
    CLL_PROLIFERATING: 5500,
    NORMAL_B: 3000,
    CD4_NAIVE: 2500,
    CD4_TFH: 2700,
    CD4_TREG: 2700,
    CD8_EFFECTOR: 2800,
    CD8_EXHAUSTED: 2800,
    NK: 2600,
    MONO_CLASSICAL: 6500,
    MONO_NONCLASSICAL: 6000,
    NLC: 8000,
    CDC: 5000,
    PDC: 3000,
    PLATELET: 800,
}

# continua between related states: (state A, state B) -> (Beta of A's cells, Beta of B's
# cells) for the position w on the path A (w=0) -> B (w=1)
GRADIENTS: dict[tuple[str, str], tuple[tuple[float, float], tuple[float, float]]] = {
    (CLL_RESTING, CLL_ACTIVATED): ((1.0, 12.0), (8.0, 2.5)),
    (CD8_EFFECTOR, CD8_EXHAUSTED): ((1.0, 10.0), (8.0, 2.5)),
    (CD4_NAIVE, CD4_TFH): ((1.0, 14.0), (9.0, 2.0)),
}
_GRADIENT_IDX = [
    ((CELL_TYPES.index(a), CELL_TYPES.index(b)), betas) for (a, b), betas in GRADIENTS.items()
]

DOUBLET_RATE = 0.05  # fixed rate of ``simulate(doublet_rate_per_1k=None)``
LOW_QUALITY_RATE = 0.05
# 10x Chromium: ~0.8% multiplets per 1,000 cells recovered (Chromium Single Cell 3' v3 user
# guide, multiplet rate table); ``simulate(doublet_rate_per_1k=...)`` plants at this kind of rate
DOUBLET_RATE_PER_1K_10X = 0.8


def doublet_kind(doublet_of: str) -> str:
    """``"cross"`` for a planted doublet of two lineages, ``"same"`` for one of a single
    lineage (expression-homotypic, e.g. two cells of one CLL clone), ``""`` for a singlet
    (``obs["doublet_of"]`` of a simulation)."""
    if not isinstance(doublet_of, str) or not doublet_of:
        return ""
    return "same" if len({LINEAGE[t] for t in doublet_of.split("+")}) == 1 else "cross"


def doublet_rate_for(n_cells: int, per_1k: float | None = None) -> float:
    """Planted doublet fraction of a sample of ``n_cells``: ``per_1k`` percent per 1,000
    cells recovered (10x loading), capped at 50%; ``None``: the fixed :data:`DOUBLET_RATE`."""
    if per_1k is None:
        return DOUBLET_RATE
    return float(min(0.5, per_1k / 100.0 * n_cells / 1000.0))


# ======================================================================================
# gene sets (human symbols; mouse symbols are derived at the end)
# ======================================================================================
MITO = [
    "MT-ND1", "MT-ND2", "MT-CO1", "MT-CO2", "MT-ATP8", "MT-ATP6", "MT-CO3",
    "MT-ND3", "MT-ND4L", "MT-ND4", "MT-ND5", "MT-ND6", "MT-CYB",
]  # fmt: skip
RIBO = [f"RPL{i}" for i in (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17, 18, 19, 21)] + [
    "RPL7A", "RPL10A", "RPL13A", "RPL18A", "RPL22", "RPL23", "RPL23A", "RPL24", "RPL26",
    "RPL27", "RPL27A", "RPL28", "RPL29", "RPL30", "RPL31", "RPL32", "RPL34", "RPL35",
    "RPL35A", "RPL36", "RPL37", "RPL37A", "RPL38", "RPL39", "RPL41", "RPLP0", "RPLP1",
    "RPLP2", "RPS2", "RPS3", "RPS3A", "RPS4X", "RPS5", "RPS6", "RPS7", "RPS8", "RPS9",
    "RPS10", "RPS11", "RPS12", "RPS13", "RPS14", "RPS15", "RPS15A", "RPS16", "RPS18",
    "RPS19", "RPS20", "RPS21", "RPS23", "RPS24", "RPS25", "RPS26", "RPS27", "RPS27A",
    "RPS28", "RPS29",
]  # fmt: skip
HAEMOGLOBIN = ["HBA1", "HBA2", "HBB"]
# per-cell nuisance programmes (same in every state): dissociation stress, interferon
STRESS = [
    "HSPA1A", "HSPA1B", "DNAJB1", "ZFP36", "DUSP1", "JUNB", "JUND", "KLF6", "PPP1R15A",
    "HSPA8", "HSPE1", "HSPD1", "CEBPD", "SOCS3",
]  # fmt: skip
INTERFERON = ["IFI6", "ISG15", "MX1", "IFITM1", "STAT1", "IFI44L"]
IGHV = [
    "IGHV1-2", "IGHV1-69", "IGHV3-7", "IGHV3-21", "IGHV3-23", "IGHV3-30", "IGHV3-33",
    "IGHV3-48", "IGHV4-34", "IGHV4-39", "IGHV4-59", "IGHV5-51",
]  # fmt: skip
IGKV = ["IGKV1-5", "IGKV1-39", "IGKV3-11", "IGKV3-15", "IGKV3-20", "IGKV4-1"]
IGLV = ["IGLV1-44", "IGLV2-14", "IGLV3-1", "IGLV3-21"]
IG_CONST_HEAVY = ["IGHM", "IGHD", "IGHG1", "IGHG2", "IGHG3", "IGHG4", "IGHA1"]
IGK_CONST = ["IGKC"]
IGL_CONST = ["IGLC1", "IGLC2", "IGLC3"]
IG_GENES = IG_CONST_HEAVY + IGK_CONST + IGL_CONST + ["JCHAIN"] + IGHV + IGKV + IGLV
TCR_GENES = [
    "TRAC", "TRBC1", "TRBC2", "TRDC", "TRGC1",
    "TRAV1-2", "TRAV12-1", "TRAV21", "TRBV5-1", "TRBV20-1", "TRBV28",
]  # fmt: skip
PROTEASOME = (
    [f"PSMA{i}" for i in range(1, 8)]
    + [f"PSMB{i}" for i in range(1, 11)]
    + ["PSMC1", "PSMC2", "PSMC3", "PSMC4", "PSMD1", "PSMD2", "PSMD4", "PSMD11", "PSMD14"]
)
BCL2_FAMILY = [
    "BCL2", "BCL2L1", "BCL2A1", "MCL1", "BAX", "BAK1", "BCL2L11", "PMAIP1", "BBC3", "BAD",
]  # fmt: skip
NFKB_BCR = [
    "NFKBIA", "NFKB1", "NFKB2", "RELB", "TNFAIP3", "EGR1", "EGR2", "EGR3", "MYC", "NR4A1",
    "CD83", "CD69", "IER2", "FOS", "JUN", "DUSP2", "NFKBID", "MIR155HG", "BTK", "SYK", "LYN",
    "BLNK", "PLCG2",
]  # fmt: skip
PROLIFERATION = [
    "MKI67", "TOP2A", "CDK1", "CCNB1", "CCNB2", "CCNA2", "BIRC5", "TYMS", "UBE2C", "CENPF",
    "STMN1", "HMGB2", "H2AZ1", "MCM2", "MCM7", "PCNA", "NUSAP1", "TPX2", "PCLAF", "CDC20",
    "AURKB", "RRM2", "ZWINT", "CKS1B", "CKS2", "TUBB",
]  # fmt: skip
OXPHOS = [
    "NDUFA4", "NDUFB8", "NDUFS5", "COX4I1", "COX5A", "COX6C", "COX7C", "ATP5F1A", "ATP5F1B",
    "ATP5MC2", "UQCRH", "UQCRB", "UQCRQ", "CYCS", "SDHB",
]  # fmt: skip
# housekeeping: log2 counts per 10k
HOUSEKEEPING: dict[str, float] = {
    "MALAT1": 8.6, "TMSB4X": 8.8, "B2M": 8.8, "ACTB": 8.0, "FTL": 7.2, "FTH1": 7.3,
    "EEF1A1": 8.0, "TPT1": 7.3, "GAPDH": 6.2, "ACTG1": 6.3, "PFN1": 6.0, "CFL1": 5.8,
    "MYL6": 6.2, "UBC": 5.3, "UBB": 5.6, "HSP90AB1": 5.4, "PPIA": 5.6, "NACA": 5.4,
    "EIF1": 6.2, "SRGN": 5.5, "ARHGDIB": 5.5, "LAPTM5": 5.2, "PTPRC": 5.0, "CORO1A": 5.0,
    "NEAT1": 4.8, "FAU": 6.2, "UBA52": 6.0, "TXNIP": 5.3, "TMSB10": 7.2, "EEF1D": 5.0,
    "EEF2": 5.6, "HNRNPA1": 5.4, "SERF2": 5.4, "OAZ1": 5.5, "ZFP36L2": 4.8, "H3-3B": 5.0,
    "SH3BGRL3": 5.2, "S100A4": 4.5, "VIM": 5.4, "CD52": 5.5, "CD37": 4.5, "HLA-A": 5.6,
    "HLA-B": 6.0, "HLA-C": 5.6, "HLA-E": 5.0, "BTG1": 5.4, "DDX5": 5.0, "EIF4A1": 4.8,
    "GNAS": 4.6, "CALM2": 4.6, "PABPC1": 5.0, "NPM1": 4.8, "SELENOP": 1.0,
}  # fmt: skip

# marker programmes: cell type -> {gene: log2 counts per 10k}. Lineage programmes first.
B_LINEAGE = {
    "CD19": 3.5, "CD79A": 6.3, "CD79B": 5.6, "MS4A1": 5.8, "CD22": 3.5, "PAX5": 3.2,
    "BANK1": 4.0, "CD74": 8.3, "HLA-DRA": 7.2, "HLA-DRB1": 6.4, "HLA-DPA1": 5.5,
    "HLA-DPB1": 5.8, "HLA-DQA1": 4.2, "HLA-DQB1": 4.2, "CXCR4": 6.0, "CXCR5": 3.6,
    "TNFRSF13C": 3.8, "TNFRSF13B": 3.0, "CD40": 3.4, "FCMR": 4.0, "BLK": 3.6, "POU2AF1": 3.5,
    "VPREB3": 3.6, "CD37": 6.0, "CD72": 3.0, "TCL1A": 4.5, "FCRLA": 3.0, "CD24": 2.8,
    "CIITA": 2.6, "BTK": 3.2, "SYK": 3.4, "LYN": 3.6, "BLNK": 3.2, "PLCG2": 3.0,
}  # fmt: skip
CLL_PROGRAMME = {
    "CD5": 3.8, "ROR1": 3.4, "LEF1": 4.2, "TCL1A": 6.6, "FMOD": 3.8, "CD200": 4.4,
    "FCER2": 4.4, "CLLU1": 3.2, "ABCA6": 2.6, "ZAP70": 2.0, "MS4A1": 4.6, "TNFRSF17": 1.8,
    "BCL2": 5.6, "MCL1": 5.0, "BCL2L1": 1.8, "BCL2A1": 1.6, "BAX": 3.0, "PMAIP1": 3.0,
    "NFKBIA": 5.0, "CD69": 3.2, "CD83": 2.8, "EGR1": 3.0, "EGR2": 2.2, "EGR3": 1.8,
    "MYC": 2.6, "NR4A1": 2.4, "CCL3": 2.4, "CCL4": 2.8, "TNFAIP3": 3.4, "DUSP2": 3.2,
    "NFKB2": 3.0, "RELB": 2.8, "IER2": 4.0, "FOS": 4.2, "JUN": 4.0, "CD27": 3.0,
    "PTPN6": 3.4, "CTLA4": 1.5, "LGALS1": 2.0,
}  # fmt: skip
CLL_ACTIVATED_PROGRAMME = {
    "CD69": 6.0, "CD83": 5.6, "NR4A1": 5.4, "EGR1": 6.0, "EGR2": 5.0, "EGR3": 4.6,
    "MYC": 5.0, "CCL3": 5.6, "CCL4": 6.0, "IER2": 5.8, "FOS": 6.0, "JUN": 5.6, "NFKBIA": 6.8,
    "DUSP2": 5.0, "MIR155HG": 4.2, "NFKBID": 3.8, "CXCR4": 4.2, "CD86": 3.0, "TNFAIP3": 5.0,
    "NFKB1": 4.0, "NFKB2": 4.4, "RELB": 4.2, "PLEK": 3.6,
}  # fmt: skip
CLL_PROLIFERATING_PROGRAMME = {
    "MKI67": 5.0, "TOP2A": 5.6, "CDK1": 4.6, "CCNB1": 4.4, "CCNB2": 4.2, "CCNA2": 4.0,
    "BIRC5": 4.4, "TYMS": 4.4, "UBE2C": 5.0, "CENPF": 4.6, "STMN1": 6.0, "HMGB2": 6.4,
    "H2AZ1": 6.0, "MCM2": 3.6, "MCM7": 3.8, "PCNA": 4.4, "NUSAP1": 4.4, "TPX2": 4.0,
    "PCLAF": 4.8, "CDC20": 4.0, "AURKB": 3.8, "RRM2": 4.4, "ZWINT": 4.2, "CKS1B": 4.4,
    "CKS2": 4.6, "TUBB": 6.0, "MYC": 4.0, "CXCR4": 4.6,
}  # fmt: skip
NORMAL_B_PROGRAMME = {
    "MS4A1": 6.6, "SPIB": 4.0, "FCRL1": 3.4, "FCRL2": 3.0, "CD24": 4.0, "CD27": 3.0,
    "TNFRSF13B": 3.6, "FCER2": 3.0, "TCL1A": 4.0, "IGHD": 7.0, "IGHM": 7.4, "BCL2": 4.0,
    "MCL1": 4.6, "CD5": -2.0, "ROR1": -3.0, "LEF1": -1.0, "FMOD": -3.0, "CD200": 2.5,
}  # fmt: skip
T_LINEAGE = {
    "CD3D": 6.0, "CD3E": 5.6, "CD3G": 4.8, "CD2": 4.6, "CD247": 4.0, "LCK": 4.6,
    "TRAC": 6.0, "TRBC1": 5.2, "TRBC2": 5.8, "CD5": 3.6, "CD6": 3.4, "CD7": 4.0,
    "IL32": 5.6, "CD27": 4.0, "GZMM": 2.4, "BCL11B": 3.2, "CD96": 3.0, "TRAV1-2": 1.2,
    "TRAV12-1": 1.2, "TRAV21": 1.2, "TRBV5-1": 1.2, "TRBV20-1": 1.4, "TRBV28": 1.2,
    "IL2RG": 4.0, "CD28": 3.2, "ITK": 3.0,
}  # fmt: skip
CD4_NAIVE_PROGRAMME = {
    "CD4": 3.6, "CCR7": 5.0, "SELL": 4.6, "TCF7": 4.6, "LEF1": 4.6, "IL7R": 5.4, "MAL": 4.2,
    "LDHB": 5.4, "NOSIP": 4.0, "CD40LG": 2.4, "PIK3IP1": 4.0, "TRABD2A": 3.0,
}  # fmt: skip
CD4_TFH_PROGRAMME = {
    "CD4": 3.6, "CXCR5": 4.4, "PDCD1": 4.4, "ICOS": 5.0, "CD40LG": 4.2, "IL21": 3.6,
    "BCL6": 3.4, "MAF": 4.4, "TOX2": 3.6, "SH2D1A": 4.6, "CD200": 3.8, "TIGIT": 3.6,
    "IL7R": 3.6, "CXCR4": 4.6, "POU2AF1": 2.6, "BTLA": 3.6,
}  # fmt: skip
CD4_TREG_PROGRAMME = {
    "CD4": 3.6, "FOXP3": 4.6, "IL2RA": 4.8, "CTLA4": 5.0, "IKZF2": 3.8, "TNFRSF4": 4.0,
    "TNFRSF18": 3.6, "TIGIT": 4.4, "BATF": 4.6, "RTKN2": 3.6, "IL7R": 2.4, "LAYN": 2.0,
}  # fmt: skip
CD8_EFFECTOR_PROGRAMME = {
    "CD8A": 5.4, "CD8B": 5.0, "GZMK": 4.6, "GZMA": 5.6, "GZMH": 5.6, "GZMB": 4.4,
    "PRF1": 4.6, "NKG7": 6.6, "CCL5": 7.4, "CST7": 5.2, "KLRG1": 4.2, "CX3CR1": 3.8,
    "GNLY": 5.6, "CCR5": 3.6, "FGFBP2": 4.0, "CCL4": 4.4, "HLA-DRA": 2.0,
}  # fmt: skip
CD8_EXHAUSTED_PROGRAMME = {
    "CD8A": 5.4, "CD8B": 5.0, "PDCD1": 4.0, "HAVCR2": 3.6, "LAG3": 4.0, "TOX": 4.0,
    "TIGIT": 4.2, "ENTPD1": 3.4, "LAYN": 3.0, "GZMK": 5.4, "CCL5": 6.4, "NKG7": 5.4,
    "CTLA4": 3.0, "CXCL13": 1.6, "CCR5": 3.6, "CD27": 4.4, "EOMES": 3.6,
}  # fmt: skip
NK_PROGRAMME = {
    "NKG7": 7.4, "GNLY": 8.6, "KLRD1": 5.6, "KLRF1": 4.6, "NCAM1": 3.8, "FCGR3A": 5.2,
    "PRF1": 5.6, "GZMB": 6.0, "GZMA": 5.0, "TYROBP": 6.0, "FCER1G": 5.0, "KLRC1": 3.6,
    "NCR1": 3.4, "TRDC": 3.0, "SH2D1B": 3.4, "CD247": 4.6, "CD7": 4.6, "CCL5": 5.6,
    "CST7": 5.0, "SPON2": 4.4, "IL2RB": 4.2, "CD2": 3.4, "KLRB1C": 5.0,
}  # fmt: skip
MYELOID_LINEAGE = {
    "LYZ": 8.0, "TYROBP": 6.6, "FCER1G": 6.2, "CST3": 7.2, "AIF1": 6.0, "LST1": 5.6,
    "SPI1": 4.6, "CD68": 4.6, "HLA-DRA": 7.4, "HLA-DRB1": 6.6, "HLA-DPA1": 5.8,
    "HLA-DPB1": 6.0, "CD74": 8.4, "FTL": 9.2, "FTH1": 8.6, "CTSS": 5.6, "PSAP": 6.0,
    "TYMP": 5.0, "SERPINA1": 5.0, "CSF1R": 4.2, "CCR1": 2.0, "LGALS9": 2.8, "LGALS1": 4.0,
}  # fmt: skip
CLASSICAL_MONO_PROGRAMME = {
    "CD14": 6.0, "LYZ": 9.6, "S100A8": 9.0, "S100A9": 9.6, "S100A12": 6.8, "VCAN": 6.0,
    "FCN1": 6.8, "CSF3R": 5.0, "SELL": 4.4, "CCR2": 4.0, "CD36": 4.6, "ITGAM": 3.6,
    "LY6C2": 6.4, "CCR1": 4.0, "MNDA": 5.6, "CSF1R": 3.0,
}  # fmt: skip
NONCLASSICAL_MONO_PROGRAMME = {
    "FCGR3A": 6.4, "MS4A7": 5.6, "CDKN1C": 5.2, "LST1": 6.6, "AIF1": 6.8, "IFITM2": 6.0,
    "RHOC": 5.0, "CX3CR1": 4.6, "HES4": 4.0, "LYPD2": 3.6, "FCGR4": 6.4, "CSF1R": 5.2,
    "LYZ": 6.8, "S100A9": 6.4, "S100A8": 5.0, "ADGRE1": 2.6,
}  # fmt: skip
NLC_PROGRAMME = {
    "CD68": 6.6, "CD163": 6.0, "MRC1": 5.4, "C1QA": 7.6, "C1QB": 7.8, "C1QC": 7.4,
    "APOE": 8.0, "SPP1": 7.0, "CXCL12": 4.2, "CXCL13": 4.0, "TNFSF13B": 4.6, "TNFSF13": 4.0,
    "CD14": 4.6, "FOLR2": 4.4, "SELENOP": 6.0, "LGMN": 5.4, "CTSB": 6.6, "CTSD": 6.6,
    "MSR1": 4.6, "VSIG4": 4.8, "STAB1": 4.0, "CD274": 3.4, "LGALS9": 4.4, "MARCO": 3.6,
    "ADGRE1": 4.6, "CCR1": 3.6, "CCR5": 4.0, "APOC1": 6.6, "GPNMB": 5.6, "LYZ": 6.0,
    "FTL": 10.0, "IL10": 2.0, "CSF1R": 5.0,
}  # fmt: skip
CDC_PROGRAMME = {
    "FCER1A": 5.6, "CD1C": 5.2, "CLEC10A": 5.4, "HLA-DQA1": 6.4, "HLA-DQB1": 6.0,
    "CLEC9A": 3.0, "HLA-DRA": 8.6, "CD74": 9.4, "ENHO": 4.0, "PKIB": 4.0, "CCR7": 2.0,
    "ITGAX": 4.0, "FLT3": 3.6, "LYZ": 6.6,
}  # fmt: skip
PDC_PROGRAMME = {
    "LILRA4": 5.6, "IL3RA": 5.0, "CLEC4C": 4.6, "TCF4": 5.8, "IRF7": 5.4, "IRF8": 5.6,
    "GZMB": 6.4, "PLD4": 5.6, "SERPINF1": 5.0, "JCHAIN": 6.4, "ITM2C": 6.0, "MZB1": 5.0,
    "HLA-DRA": 6.6, "CD74": 8.4, "PTPRS": 4.0, "NRP1": 3.0,
}  # fmt: skip
PLATELET_PROGRAMME = {
    "PPBP": 11.0, "PF4": 10.4, "GP9": 6.4, "ITGA2B": 6.0, "GNG11": 7.4, "TUBB1": 7.0,
    "CAVIN2": 7.0, "SPARC": 6.4, "TREML1": 5.6, "CLU": 6.6, "NRGN": 7.4, "GP1BB": 7.6,
    "PTPRC": 1.0, "B2M": 8.0, "MALAT1": 6.0, "TMSB4X": 10.0,
}  # fmt: skip

TYPE_PROGRAMMES: dict[str, list[dict[str, float]]] = {
    CLL_RESTING: [B_LINEAGE, CLL_PROGRAMME],
    CLL_ACTIVATED: [B_LINEAGE, CLL_PROGRAMME, CLL_ACTIVATED_PROGRAMME],
    CLL_PROLIFERATING: [B_LINEAGE, CLL_PROGRAMME, CLL_PROLIFERATING_PROGRAMME],
    NORMAL_B: [B_LINEAGE, NORMAL_B_PROGRAMME],
    CD4_NAIVE: [T_LINEAGE, CD4_NAIVE_PROGRAMME],
    CD4_TFH: [T_LINEAGE, CD4_TFH_PROGRAMME],
    CD4_TREG: [T_LINEAGE, CD4_TREG_PROGRAMME],
    CD8_EFFECTOR: [T_LINEAGE, CD8_EFFECTOR_PROGRAMME],
    CD8_EXHAUSTED: [T_LINEAGE, CD8_EXHAUSTED_PROGRAMME],
    NK: [NK_PROGRAMME],
    MONO_CLASSICAL: [MYELOID_LINEAGE, CLASSICAL_MONO_PROGRAMME],
    MONO_NONCLASSICAL: [MYELOID_LINEAGE, NONCLASSICAL_MONO_PROGRAMME],
    NLC: [MYELOID_LINEAGE, NLC_PROGRAMME],
    CDC: [MYELOID_LINEAGE, CDC_PROGRAMME],
    PDC: [PDC_PROGRAMME],
    PLATELET: [PLATELET_PROGRAMME],
}

# canonical markers per type (exported for the annotation step / documentation)
MARKERS: dict[str, list[str]] = {
    CLL_RESTING: ["CD19", "CD5", "ROR1", "LEF1", "TCL1A", "FMOD", "CD200", "CXCR4"],
    CLL_ACTIVATED: ["CD5", "TCL1A", "CD69", "CD83", "NR4A1", "EGR1", "MYC", "CCL3", "CCL4"],
    CLL_PROLIFERATING: ["CD5", "TCL1A", "MKI67", "TOP2A", "CDK1", "CCNB1", "UBE2C"],
    NORMAL_B: ["MS4A1", "CD79A", "SPIB", "FCRL1", "IGHD", "IGKC", "IGLC2"],
    CD4_NAIVE: ["CD3E", "CD4", "CCR7", "SELL", "TCF7", "IL7R"],
    CD4_TFH: ["CD3E", "CD4", "CXCR5", "PDCD1", "ICOS", "CD40LG", "IL21", "MAF"],
    CD4_TREG: ["CD3E", "CD4", "FOXP3", "IL2RA", "CTLA4", "IKZF2"],
    CD8_EFFECTOR: ["CD3E", "CD8A", "GZMH", "GZMB", "PRF1", "NKG7", "CCL5"],
    CD8_EXHAUSTED: ["CD3E", "CD8A", "PDCD1", "HAVCR2", "LAG3", "TOX", "TIGIT"],
    NK: ["NKG7", "GNLY", "KLRD1", "KLRF1", "NCAM1", "FCGR3A"],
    MONO_CLASSICAL: ["CD14", "LYZ", "S100A8", "S100A9", "VCAN", "FCN1"],
    MONO_NONCLASSICAL: ["FCGR3A", "MS4A7", "CDKN1C", "LST1", "CX3CR1"],
    NLC: ["CD68", "CD163", "MRC1", "C1QA", "C1QB", "C1QC", "APOE", "SPP1", "CXCL12"],
    CDC: ["FCER1A", "CD1C", "CLEC10A", "HLA-DQA1"],
    PDC: ["LILRA4", "IL3RA", "CLEC4C", "TCF4", "IRF7"],
    PLATELET: ["PPBP", "PF4", "GP9", "ITGA2B", "TUBB1"],
}
MOUSE_MARKER_OVERRIDES: dict[str, list[str]] = {
    NK: ["Nkg7", "Klrd1", "Ncr1", "Klrb1c", "Prf1", "Gzma"],
    MONO_CLASSICAL: ["Cd14", "Lyz2", "S100a8", "S100a9", "Ly6c2", "Ccr2"],
    MONO_NONCLASSICAL: ["Fcgr4", "Ms4a7", "Cdkn1c", "Cx3cr1", "Adgre1"],
    NLC: ["Cd68", "Adgre1", "Cd163", "Mrc1", "C1qa", "C1qb", "C1qc", "Apoe", "Cxcl12"],
}

# genes that exist only in human / only in mouse in this universe
HUMAN_ONLY = {"GNLY", "FCGR3A", "HLA-DPA1", "HLA-DPB1", "HLA-DRB5", "LYPD2", "CLLU1"}
MOUSE_ONLY = {"FCGR4", "LY6C2", "KLRB1C"}

# ---------------------------------------------------------------------------- planted DE
# (cell types, gene, condition, log2fc, fraction_affected, programme)
_CLL = CLL_TYPES
PLANTED_DE: list[tuple[tuple[str, ...], str, str, float, float, str]] = []


def _plant(types, genes, condition, lfc, frac=1.0, programme=""):
    if isinstance(genes, str):
        genes = [genes]
    for g in genes:
        PLANTED_DE.append((tuple(types), g, condition, float(lfc), float(frac), programme))


# CLL, ibrutinib-resistant: proteasome up (PSMB5 headline)
_plant(_CLL, "PSMB5", "IBR_RES", 1.8, programme="proteasome")
_plant(_CLL, ["PSMB6", "PSMB7", "PSMA1", "PSMA3", "PSMA5", "PSMD4", "PSMC3"], "IBR_RES", 1.0,
       programme="proteasome")  # fmt: skip
_plant(_CLL, ["PSMB2", "PSMD11"], "IBR_RES", 1.8, 0.5, programme="proteasome")
# CLL, venetoclax-resistant: anti-apoptotic BCL2 family up
_plant(_CLL, "BCL2L1", "VEN_RES", 1.6, programme="bcl2_family")
_plant(_CLL, "BCL2A1", "VEN_RES", 2.4, 0.5, programme="bcl2_family")
_plant(_CLL, "MCL1", "VEN_RES", 1.2, programme="bcl2_family")
# CLL, responding on ibrutinib: BCR / NF-kB targets and CCL3/CCL4 down; CD20 down
_plant(_CLL, ["CCL3", "CCL4"], "IBR_EARLY", -2.0, programme="bcr_nfkb")
_plant(_CLL, ["EGR1", "EGR2", "NR4A1", "MYC", "CD83"], "IBR_EARLY", -1.5, programme="bcr_nfkb")
_plant(_CLL, ["NFKBIA", "EGR3", "CD69", "DUSP2", "TNFAIP3"], "IBR_EARLY", -1.0,
       programme="bcr_nfkb")  # fmt: skip
_plant(_CLL, ["NFKB2", "RELB"], "IBR_EARLY", -2.0, 0.7, programme="bcr_nfkb")
_plant(_CLL, "MS4A1", "IBR_EARLY", -1.0, programme="cd20")
_plant(_CLL, "MS4A1", "IBR_RES", -1.0, programme="cd20")
# NLC: niche factors up in resistance
for _c in ("IBR_RES", "VEN_RES"):
    _plant([NLC], "CXCL12", _c, 1.5, programme="nlc_niche")
    _plant([NLC], "CXCL13", _c, 2.0, programme="nlc_niche")
    _plant([NLC], "TNFSF13B", _c, 1.3, programme="nlc_niche")
    _plant([NLC], "TNFSF13", _c, 1.0, programme="nlc_niche")
    _plant([NLC], ["CD274", "LGALS9"], _c, 1.2, programme="nlc_checkpoint")
    # exhaustion up in CD8 exhausted
    _plant([CD8_EXHAUSTED], ["PDCD1", "HAVCR2"], _c, 1.2, programme="exhaustion")
    _plant([CD8_EXHAUSTED], ["LAG3", "TOX"], _c, 1.3, programme="exhaustion")
# Tfh: CD40LG and IL21 up under venetoclax resistance
_plant([CD4_TFH], "CD40LG", "VEN_RES", 1.5, programme="tfh_help")
_plant([CD4_TFH], "IL21", "VEN_RES", 1.3, programme="tfh_help")
# CLL receptors of the niche axes (both partners change: two-sided interactions):
# CD40 with CD40L help under venetoclax resistance, BAFF-R and CXCR5 in resistance
_plant(_CLL, "CD40", "VEN_RES", 1.2, programme="niche_receptors")
for _c in ("IBR_RES", "VEN_RES"):
    _plant(_CLL, ["TNFRSF13C", "CXCR5"], _c, 1.0, programme="niche_receptors")

# planted LR axes (human symbols, resource receptor strings): ligand, receptor, sources, targets
LR_AXES: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = [
    ("CXCL12", "CXCR4", (NLC,), (CLL_RESTING, CLL_ACTIVATED)),
    ("CXCL13", "CXCR5", (NLC,), (CLL_RESTING, CLL_ACTIVATED)),
    ("TNFSF13B", "TNFRSF13C", (NLC,), (CLL_RESTING, CLL_ACTIVATED)),
    ("TNFSF13B", "TNFRSF13B", (NLC,), (CLL_RESTING, CLL_ACTIVATED)),
    ("TNFSF13B", "TNFRSF17", (NLC,), (CLL_RESTING, CLL_ACTIVATED)),
    ("TNFSF13", "TNFRSF13B", (NLC,), (CLL_RESTING, CLL_ACTIVATED)),
    ("TNFSF13", "TNFRSF17", (NLC,), (CLL_RESTING, CLL_ACTIVATED)),
    ("CD40LG", "CD40", (CD4_TFH,), (CLL_RESTING, CLL_ACTIVATED)),
    ("CCL3", "CCR1", (CLL_RESTING, CLL_ACTIVATED), (MONO_CLASSICAL, NLC)),
    ("CCL3", "CCR5", (CLL_RESTING, CLL_ACTIVATED), (NLC, CD8_EFFECTOR)),
    ("CCL4", "CCR1", (CLL_RESTING, CLL_ACTIVATED), (MONO_CLASSICAL, NLC)),
    ("CCL4", "CCR5", (CLL_RESTING, CLL_ACTIVATED), (NLC, CD8_EFFECTOR)),
    ("LGALS9", "HAVCR2", (NLC,), (CD8_EXHAUSTED,)),
    ("CD274", "PDCD1", (NLC,), (CD8_EXHAUSTED,)),
]
N_NULL_LR = 40
N_LIGAND_ONLY_LR = 40  # ligand-only pairs: ligand planted in the sender, receptor unchanged
LR_SIDE_EFFECT = 0.3  # |expected log2FC| above which a partner counts as changed
N_NULL_DE = 30
NULL_DE_MIN_PROPORTION = 0.015  # types with at least this base proportion get null DE rows

# a fixed list of additional real gene symbols (broadly expressed background)
FILLER = """
AAK1 ABHD17A ABI1 ACAP1 ACLY ACO2 ACSL4 ACTR2 ACTR3 ADAR ADD3 AHNAK AKAP13 AKT1 ALDOA
ANKRD12 ANXA1 ANXA2 ANXA5 ANXA6 AP1S2 APRT ARF1 ARF6 ARHGAP15 ARHGAP30 ARHGEF2 ARID1A
ARID4B ARL4C ARPC1B ARPC2 ARPC3 ARPC4 ARPC5 ASH1L ATF4 ATG7 ATM ATP1B3 ATP2B1 ATRX AXL
BAZ1A BCL6 BCLAF1 BIN1 BIRC3 BRD2 BRD4 BST2 BTF3 BTG2 C12orf75 CALR CAPZB CARD11 CASP8
CBX3 CCDC88A CCND2 CCND3 CCNL1 CD164 CD300A CD38 CD44 CD46 CD48 CD53 CD55 CD59 CD63
CD81 CD82 CD84 CD99 CDC42 CDK6 CEBPB CEBPD CHD4 CHD9 CHMP4B CHST2 CIRBP CLIC1 CMTM6 CNBP
COTL1 CREBBP CRIP1 CSNK1D CTNNB1 CTSC CTSH CTSW CXXC5 CYBA CYTIP DAZAP2 DBI DDIT4 DDX17
DDX3X DDX6 DEK DHX9 DNAJA1 DNAJB1 DNAJB6 DNMT1 DOCK2 DOCK8 DSTN DUSP1 DYNLL1 EEF1B2 EEF1G
EIF3E EIF3H EIF3L EIF4B EIF4G2 ELF1 EMP3 ENO1 EPSTI1 ERP29 ETS1 EVL EZR FCHSD2 FKBP1A FLNA
FNBP1 FOXO1 FOXP1 FUS FXYD5 FYN G3BP1 GABARAP GIMAP4 GIMAP5 GIMAP7 GLIPR1 GLUL GMFG GNB1
GNB2 GNG2 GNLY GOLGA4 GPSM3 GRB2 GRN GSTP1 GTF2I H1-10 H2AZ2 HCLS1 HCST HDAC1 HERPUD1
HIF1A HINT1 HMGB1 HMGN1 HMGN2 HNRNPC HNRNPDL HNRNPH1 HNRNPK HNRNPU HSPA1A HSPA1B HSPA5
HSPA8 HSPB1 HSPD1 HSPE1 ID2 ID3 IFI16 IFI44L IFI6 IFITM1 IFITM3 IFNGR1 IKZF1 IKZF3 IL16
IRF1 IRF2 IRF4 ISG15 ISG20 ITGB2 ITGB7 ITM2A ITM2B JAK1 JUNB JUND KDM5C KLF2 KLF6 KMT2A
KMT2C KRAS LAMTOR4 LBH LCP1 LCP2 LIMD2 LITAF LMNA LRRFIP1 LSP1 LTB LY6E LY9 LYL1 MAP3K1
MAP3K8 MAP4K1 MARCKS MBNL1 MCM3 MDM2 METTL14 MIF MKNK2 MORF4L1 MSN MT2A MX1 MYH9 MYL12A
MYL12B NAP1L1 NCL NDFIP1 NEDD8 NFATC1 NFATC2 NFE2L2 NKTR NME2 NOP53 NR3C1 NUCB2 OSTF1
PAG1 PARP1 PCBP1 PCBP2 PDE4B PDE4D PELI1 PFDN5 PGK1 PIK3CD PIM1 PIM2 PIM3 PKM PLAC8 PLP2
POLR2A PPP1CA PPP1R15A PPP2CA PRDM1 PRDX1 PRDX2 PRKCB PRMT1 PSME1 PSME2 PTMA PTPN1 PTPN22
PTPN7 PTPRCAP RAB7A RAC1 RAC2 RAN RAP1B RASA3 RASGRP2 RBM3 RBM39 RBMS1 REL RGS1 RGS2 RHOA
RHOB RHOH RIPOR2 RNF213 RORA RPS6KA1 RUNX1 RUNX3 S100A10 S100A11 S100A6 SAMHD1 SARAF
SASH3 SATB1 SBDS SEC61B SELPLG SEPTIN1 SEPTIN6 SEPTIN7 SEPTIN9 SET SF3B1 SH2D3C SKAP1
SLA SLC2A3 SMAP2 SMCHD1 SNRPD2 SOCS1 SOCS3 SOD1 SOD2 SON SP100 SP110 SRSF2 SRSF3 SRSF5
SRSF7 SSR4 STAT1 STAT3 STAT4 STAT5A STK17A STK17B SUB1 SUMO2 SYNE2 TAGLN2 TAOK3 TBC1D10C
TCF25 TET2 TGFB1 TLN1 TMA7 TMC8 TNFRSF1B TNIP1 TOB1 TOMM7 TP53 TPM3 TPM4 TRAF3IP3 TRIB2
TSC22D3 TUBA1A TUBA1B TUBB4B TXN TYK2 UBE2D3 UCP2 USP15 VAMP8 VAV1 VMP1 WAS WDR1 XBP1
YBX1 YBX3 YPEL3 YWHAB YWHAQ YWHAZ ZBTB16 ZC3H12A ZEB2 ZFP36 ZFP36L1 ZNF331 ZNFX1
"""


# ======================================================================================
# results container
# ======================================================================================
@dataclass
class Simulation:
    """An in-memory simulated cohort.

    ``adata``: raw counts (CSR int32, cells x genes); ``obs_names`` are
    ``"<sample_id>:<barcode>"``; ``obs`` holds sample_id, patient, condition, tissue,
    species, barcode, true_cell_type, is_doublet, low_quality; ``var_names`` are symbols,
    ``var["gene_ids"]`` Ensembl-like ids. ``truth``: name -> DataFrame (cells, de, lr,
    composition, clones). ``samplesheet``: one row per sample with the relative path its
    10x folder gets when written.
    """

    adata: object
    truth: dict[str, pd.DataFrame]
    samplesheet: pd.DataFrame
    params: dict = field(default_factory=dict)
    # sample_id -> Cell Ranger filtered_contig_annotations.csv rows (see add_vdj)
    vdj: dict[str, pd.DataFrame] = field(default_factory=dict)


# ======================================================================================
# gene universe
# ======================================================================================
@functools.lru_cache(maxsize=4)
def _lr_resource(species: str) -> pd.DataFrame:
    import liana as li  # slow import (~5-10 s): only here

    name = "consensus" if species == "human" else "mouseconsensus"
    res = li.rs.select_resource(name)
    return res[["ligand", "receptor"]].drop_duplicates().reset_index(drop=True)


def _resource_genes(res: pd.DataFrame) -> list[str]:
    genes: list[str] = []
    seen: set[str] = set()
    for col in ("ligand", "receptor"):
        for entry in res[col]:
            for g in str(entry).split("_"):
                if g not in seen:
                    seen.add(g)
                    genes.append(g)
    return genes


def _programme_genes() -> list[str]:
    genes: list[str] = []
    for progs in TYPE_PROGRAMMES.values():
        for prog in progs:
            genes.extend(prog)
    genes += list(HOUSEKEEPING) + MITO + RIBO + HAEMOGLOBIN + IG_GENES + TCR_GENES
    genes += PROTEASOME + BCL2_FAMILY + NFKB_BCR + PROLIFERATION + OXPHOS + STRESS + INTERFERON
    for ax in LR_AXES:
        genes += [ax[0], *ax[1].split("_")]
    genes += [d[1] for d in PLANTED_DE]
    return genes


def _background_genes() -> list[str]:
    """Real symbols expressed in blood (from scanpy's pbmc68k_reduced; shipped in
    ``references/simulation_background_genes.csv`` so the universe never depends on scanpy)."""
    path = Path(__file__).resolve().parents[1] / "references" / "simulation_background_genes.csv"
    return pd.read_csv(path)["gene"].astype(str).tolist()


@functools.lru_cache(maxsize=2)
def human_gene_universe() -> tuple[str, ...]:
    """Internal (human-symbol) gene universe: programmes, LR resource genes, background."""
    genes = _programme_genes() + _resource_genes(_lr_resource("human"))
    genes += _background_genes() + FILLER.split()
    out: list[str] = []
    seen: set[str] = set()
    for g in genes:
        if g not in seen:
            seen.add(g)
            out.append(g)
    return tuple(out)


# ---------------------------------------------------------------------------- mouse
_MOUSE_EXPLICIT = {
    "HLA-DRA": "H2-Ea",
    "HLA-DRB1": "H2-Eb1",
    "HLA-DQA1": "H2-Aa",
    "HLA-DQB1": "H2-Ab1",
    "HLA-DMA": "H2-DMa",
    "HLA-DMB": "H2-DMb1",
    "HLA-DOB": "H2-Ob",
    "HLA-A": "H2-K1",
    "HLA-B": "H2-D1",
    "HLA-C": "H2-Q7",
    "HLA-E": "H2-T23",
    "HBA1": "Hba-a1",
    "HBA2": "Hba-a2",
    "HBB": "Hbb-bs",
    "IGHG1": "Ighg1",
    "IGHG2": "Ighg2b",
    "IGHG3": "Ighg3",
    "IGHG4": "Ighg2c",
    "IGHA1": "Igha",
    "TRGC1": "Tcrg-C1",
    "LYZ": "Lyz2",
    "TCL1A": "TCL1A",  # the Emu-TCL1 transgene keeps its human symbol
    "CD1C": "Cd1d1",
    "H3-3B": "H3f3b",
    "H2AZ1": "H2az1",
    "FCGR4": "Fcgr4",
    "LY6C2": "Ly6c2",
    "KLRB1C": "Klrb1c",
    "SELENOP": "Selenop",
    "CLEC4C": "Siglech",
    "LILRA4": "Ccr9",
    "MIR155HG": "Mir155hg",
}
_MOUSE_V = {
    **{
        h: m
        for h, m in zip(
            IGHV,
            [
                "Ighv1-72",
                "Ighv1-82",
                "Ighv1-26",
                "Ighv1-53",
                "Ighv1-64",
                "Ighv5-17",
                "Ighv5-4",
                "Ighv14-2",
                "Ighv9-3",
                "Ighv2-2",
                "Ighv3-6",
                "Ighv11-2",
            ],
        )
    },  # fmt: skip
    **{
        h: m
        for h, m in zip(
            IGKV, ["Igkv3-2", "Igkv4-91", "Igkv6-23", "Igkv8-30", "Igkv10-96", "Igkv14-111"]
        )
    },
    **{h: m for h, m in zip(IGLV, ["Iglv1", "Iglv2", "Iglv3"])},
    **{
        h: m
        for h, m in zip(
            ["TRAV1-2", "TRAV12-1", "TRAV21", "TRBV5-1", "TRBV20-1", "TRBV28"],
            ["Trav6-7-dv9", "Trav12-2", "Trav14-1", "Trbv13-2", "Trbv19", "Trbv29"],
        )
    },
}


@functools.lru_cache(maxsize=2)
def _mouse_symbol_map() -> dict[str, str]:
    """Internal (human) symbol -> mouse symbol (None-free; unmapped genes are dropped)."""
    res_genes = _resource_genes(_lr_resource("mouse"))
    by_upper = {g.upper(): g for g in res_genes}
    out: dict[str, str] = {}
    used: set[str] = set()
    for g in human_gene_universe():
        if g in HUMAN_ONLY:
            continue
        if g in _MOUSE_EXPLICIT:
            m = _MOUSE_EXPLICIT[g]
        elif g in _MOUSE_V:
            m = _MOUSE_V[g]
        elif g in IGHV or g in IGKV or g in IGLV or g in TCR_GENES[5:]:
            continue  # V segments without a mouse counterpart here
        elif g.startswith("MT-"):
            m = "mt-" + g[3:].capitalize()
        elif g.startswith("HLA-") or g.startswith("KIR"):
            continue
        elif g.upper() in by_upper:
            m = by_upper[g.upper()]
        else:
            m = g[0] + g[1:].lower()
        if m in used:
            continue
        used.add(m)
        out[g] = m
    return out


def gene_universe(species: str = "human") -> tuple[list[str], list[str]]:
    """``(internal_symbols, species_symbols)`` of the simulated features, in order."""
    _check_species(species)
    internal = [g for g in human_gene_universe() if g not in MOUSE_ONLY]
    if species == "human":
        return internal, list(internal)
    mmap = _mouse_symbol_map()
    internal = [g for g in human_gene_universe() if g in mmap]
    return internal, [mmap[g] for g in internal]


def _check_species(species: str) -> None:
    if species not in SPECIES:
        raise ValueError(f"species must be one of {SPECIES}, not {species!r}")


def _gene_ids(symbols: list[str], species: str) -> list[str]:
    prefix = "ENSG" if species == "human" else "ENSMUSG"
    used: set[int] = set()
    ids = []
    for s in symbols:
        n = zlib.crc32(s.encode()) % 90_000_000_000 + 10_000_000_000
        while n in used:
            n += 1
        used.add(n)
        ids.append(f"{prefix}{n:011d}")
    return ids


# ======================================================================================
# profiles
# ======================================================================================
def _base_profiles(genes: list[str], species: str, rng: np.random.Generator) -> np.ndarray:
    """Log2 counts-per-10k per cell type (K x G), before normalisation."""
    G = len(genes)
    K = len(CELL_TYPES)
    gidx = {g: i for i, g in enumerate(genes)}
    lr_genes = set(_resource_genes(_lr_resource("human")))
    # background: most LR-resource genes are tissue-restricted (rare in blood)
    bg = rng.normal(-0.6, 1.5, G)
    is_lr = np.array([g in lr_genes for g in genes])
    bg[is_lr] = rng.normal(-2.8, 1.8, is_lr.sum())
    lineages = sorted(set(LINEAGE.values()))
    lin_dev = {lin: rng.normal(0, 0.6, G) for lin in lineages}
    L = np.empty((K, G))
    for k, t in enumerate(CELL_TYPES):
        L[k] = bg + lin_dev[LINEAGE[t]] + rng.normal(0, 0.12, G)
    # marker-ish genes start low everywhere, programmes then set them
    prog_genes = set()
    for progs in TYPE_PROGRAMMES.values():
        for prog in progs:
            prog_genes.update(prog)
    for g in sorted(prog_genes):
        if g in gidx and g not in HOUSEKEEPING:
            i = gidx[g]
            L[:, i] = np.minimum(L[:, i], rng.normal(-3.0, 0.8, K))
    # housekeeping-ish sets
    for g, v in HOUSEKEEPING.items():
        if g in gidx:
            L[:, gidx[g]] = v + rng.normal(0, 0.25, K)
    ribo_level = {"Myeloid": 4.5, "Platelet": 3.0, "pDC": 5.0, "B/CLL": 5.4, "T/NK": 5.6}
    for g in RIBO:
        if g in gidx:
            base = rng.normal(0, 0.5)
            for k, t in enumerate(CELL_TYPES):
                L[k, gidx[g]] = ribo_level[LINEAGE[t]] + base + rng.normal(0, 0.15)
    mito_level = {"Myeloid": 5.4, "Platelet": 5.6, "pDC": 4.8, "B/CLL": 4.6, "T/NK": 4.6}
    mt_shape = {"MT-CO1": 1.5, "MT-CO3": 1.0, "MT-ATP6": 1.0, "MT-CYB": 0.8, "MT-ND4": 0.6,
                "MT-CO2": 1.2, "MT-ND1": 0.4, "MT-ND2": 0.3, "MT-ND3": 0.3, "MT-ND5": -0.6,
                "MT-ND6": -1.5, "MT-ATP8": -0.5, "MT-ND4L": -0.8}  # fmt: skip
    for g in MITO:
        for k, t in enumerate(CELL_TYPES):
            L[k, gidx[g]] = mito_level[LINEAGE[t]] + mt_shape[g] + rng.normal(0, 0.1)
    for g in PROTEASOME:
        if g in gidx:
            L[:, gidx[g]] = rng.normal(3.4, 0.5) + rng.normal(0, 0.2, K)
    for g in OXPHOS:
        if g in gidx:
            L[:, gidx[g]] = rng.normal(4.2, 0.4) + rng.normal(0, 0.2, K)
    for g in BCL2_FAMILY + NFKB_BCR:
        if g in gidx:
            L[:, gidx[g]] = np.maximum(L[:, gidx[g]], rng.normal(1.5, 0.5, K))
    for g in HAEMOGLOBIN:
        L[:, gidx[g]] = rng.normal(-1.0, 0.3, K)
    for g in STRESS:
        if g in gidx:
            L[:, gidx[g]] = rng.normal(3.6, 0.6) + rng.normal(0, 0.3, K)
    for g in INTERFERON:
        if g in gidx:
            L[:, gidx[g]] = rng.normal(2.6, 0.5) + rng.normal(0, 0.3, K)
    # IG / TCR: off unless programmed
    for g in IG_GENES + TCR_GENES:
        if g in gidx:
            L[:, gidx[g]] = -7.0
    # programmes (later programmes override earlier ones)
    for k, t in enumerate(CELL_TYPES):
        for prog in TYPE_PROGRAMMES[t]:
            for g, v in prog.items():
                if g in gidx:
                    L[k, gidx[g]] = v + rng.normal(0, 0.15)
    # immunoglobulin constant genes in B cells (variable genes per patient / per cell)
    for t in (NORMAL_B,):
        k = CELL_TYPES.index(t)
        for g, v in {"IGHM": 7.4, "IGHD": 6.8, "IGKC": 8.0, "IGLC2": 7.2, "IGLC3": 6.0,
                     "IGLC1": 4.0, "IGHG1": 4.0, "IGHA1": 3.6, "IGHG2": 3.0}.items():  # fmt: skip
            L[k, gidx[g]] = v
        for vs, lvl in ((IGHV, 6.6), (IGKV, 7.0), (IGLV, 6.6)):
            present = [g for g in vs if g in gidx]
            for g in present:
                L[k, gidx[g]] = lvl - np.log2(len(present))
    k = CELL_TYPES.index(PDC)
    L[k, gidx["JCHAIN"]] = 6.4
    # NK: a little TCR delta; T cells: a few TRAV/TRBV
    return L


def _to_fraction(logcp: np.ndarray) -> np.ndarray:
    w = np.exp2(logcp)
    return w / w.sum(axis=1, keepdims=True)


# ======================================================================================
# condition effects and truth
# ======================================================================================
def _composition_shifts(
    tme_shifts: bool, burden_log2: dict[str, float] | None
) -> dict[str, dict[str, float]]:
    """Planted log2 shifts per condition: the TME shifts of :data:`COMPOSITION_SHIFTS`
    (or none), and a tumour-burden change that scales every CLL state alike."""
    out: dict[str, dict[str, float]] = {}
    for c in CONDITIONS:
        sh = dict(COMPOSITION_SHIFTS.get(c, {})) if tme_shifts else {}
        b = (burden_log2 or {}).get(c, 0.0)
        if b:
            for t in CLL_TYPES:
                sh[t] = sh.get(t, 0.0) + b
        out[c] = sh
    return out


def _composition_table(
    conditions: tuple[str, ...], shifts: dict[str, dict[str, float]] | None = None
) -> pd.DataFrame:
    base = np.array([BASE_PROPORTIONS[t] for t in CELL_TYPES])
    base = base / base.sum()
    shifts = COMPOSITION_SHIFTS if shifts is None else shifts
    rows = []
    for c in conditions:
        shift = shifts.get(c, {})
        p = base * np.exp2([shift.get(t, 0.0) for t in CELL_TYPES])
        p = p / p.sum()
        for t, pt, b in zip(CELL_TYPES, p, base):
            s = shift.get(t, 0.0)
            rows.append(
                {
                    "cell_type": t,
                    "condition": c,
                    "reference": REFERENCE,
                    "proportion": round(float(pt), 6),
                    "log2fc_vs_reference": 0.0
                    if c == REFERENCE
                    else round(float(np.log2(pt / b)), 6),
                    "planted_log2_shift": float(s),
                    "direction": "up" if s > 0 else ("down" if s < 0 else "none"),
                }
            )
    return pd.DataFrame(rows)


def _planted_de_table(genes_set: set[str], conditions: tuple[str, ...]) -> pd.DataFrame:
    rows = []
    for types, g, c, lfc, frac, prog in PLANTED_DE:
        if c not in conditions or g not in genes_set:
            continue
        for t in types:
            rows.append(
                {
                    "cell_type": t,
                    "gene": g,
                    "condition": c,
                    "reference": REFERENCE,
                    "log2fc": lfc,
                    "fraction_affected": frac,
                    "expected_log2fc": round(float(np.log2(1 - frac + frac * 2.0**lfc)), 6),
                    "programme": prog,
                    "kind": "planted",
                }
            )
    return pd.DataFrame(rows)


def _excluded_gene(g: str) -> bool:
    return (
        g in IG_GENES
        or g in TCR_GENES
        or g in MITO
        or g in HAEMOGLOBIN
        or g in STRESS
        or g in INTERFERON
        or g.startswith(("RPL", "RPS", "HLA-"))
    )


def _null_de_table(
    genes: list[str], frac: np.ndarray, planted: pd.DataFrame, conditions, rng
) -> pd.DataFrame:
    """Expressed genes per (major) cell type that carry no planted change."""
    rows = []
    planted_pairs = set(zip(planted["cell_type"], planted["gene"]))
    pooled = frac.mean(axis=0)
    for k, t in enumerate(CELL_TYPES):
        if BASE_PROPORTIONS[t] < NULL_DE_MIN_PROPORTION:
            continue
        cp10k = frac[k] * 1e4
        ok = [
            i
            for i, g in enumerate(genes)
            if cp10k[i] >= 3.0
            and cp10k[i] <= 300
            and frac[k, i] >= 0.75 * pooled[i]
            and (t, g) not in planted_pairs
            and not _excluded_gene(g)
        ]
        pick = rng.choice(ok, size=min(N_NULL_DE, len(ok)), replace=False)
        for i in sorted(pick):
            for c in conditions:
                if c == REFERENCE:
                    continue
                rows.append(
                    {
                        "cell_type": t,
                        "gene": genes[i],
                        "condition": c,
                        "reference": REFERENCE,
                        "log2fc": 0.0,
                        "fraction_affected": 0.0,
                        "expected_log2fc": 0.0,
                        "programme": "null",
                        "kind": "null",
                    }
                )
    return pd.DataFrame(rows)


def _lr_truth_row(
    ligand: str,
    receptor: str,
    source: str,
    target: str,
    condition: str,
    *,
    direction: str,
    log2fc: float,
    kind: str,
    driver: str,
) -> dict:
    """One row of the interaction truth table (``truth/lr.csv``)."""
    return {
        "ligand": ligand,
        "receptor": receptor,
        "source": source,
        "target": target,
        "condition": condition,
        "reference": REFERENCE,
        "direction": direction,
        "expected_log2fc": round(float(log2fc), 6),
        "kind": kind,
        "driver": driver,
    }


def _lr_table(
    species: str,
    genes: list[str],
    frac: np.ndarray,
    de: pd.DataFrame,
    conditions: tuple[str, ...],
    to_species: dict[str, str],
    rng: np.random.Generator,
) -> pd.DataFrame:
    """Planted ligand-receptor changes (up/down) and null pairs (none)."""
    res = _lr_resource(species)
    from_species = {v: k for k, v in to_species.items()}
    res_pairs = set(zip(res["ligand"], res["receptor"]))
    gidx = {g: i for i, g in enumerate(genes)}
    planted = de[de["kind"] == "planted"]
    eff = {(r.cell_type, r.gene, r.condition): r.expected_log2fc for r in planted.itertuples()}
    touched = {(r.cell_type, r.gene) for r in planted.itertuples()}
    rows = []
    conds = [c for c in conditions if c != REFERENCE]

    def sym(g: str) -> str:
        return to_species.get(g, g)

    def side_kind(e_l: float, e_r: float) -> tuple[str, str]:
        ch_l, ch_r = abs(e_l) > LR_SIDE_EFFECT, abs(e_r) > LR_SIDE_EFFECT
        if ch_l and ch_r:
            same = np.sign(e_l) == np.sign(e_r)
            return ("both", "planted") if same else ("opposing", "unchanged_axis")
        if ch_l:
            return "ligand", "ligand_only"
        if ch_r:
            return "receptor", "receptor_only"
        return "none", "unchanged_axis"

    axis_keys = set()
    for lig, rec, sources, targets in LR_AXES:
        s_lig, s_rec = sym(lig), "_".join(sym(r) for r in rec.split("_"))
        if (s_lig, s_rec) not in res_pairs:
            # species resource lacks the pair: it is not part of the truth
            continue
        for s in sources:
            for t in targets:
                axis_keys.add((s_lig, s_rec, s, t))
                for c in conds:
                    e_l = eff.get((s, lig, c), 0.0)
                    e_r = float(np.mean([eff.get((t, r, c), 0.0) for r in rec.split("_")]))
                    e = e_l + e_r
                    d = "up" if e > 0.3 else ("down" if e < -0.3 else "none")
                    driver, kind = side_kind(e_l, e_r)
                    rows.append(
                        _lr_truth_row(
                            s_lig,
                            s_rec,
                            s,
                            t,
                            c,
                            direction=d,
                            log2fc=e,
                            kind=kind if d != "none" else "unchanged_axis",
                            driver=driver if d != "none" else "none",
                        )
                    )
    # null pairs: expressed in source / target, no planted change in any of their genes
    major = [t for t in CELL_TYPES if BASE_PROPORTIONS[t] >= 0.02]
    cand = []
    for lig_s, rec_s in res.itertuples(index=False):
        lig = from_species.get(lig_s)
        recs = [from_species.get(r) for r in rec_s.split("_")]
        if lig is None or any(r is None for r in recs):
            continue
        if lig not in gidx or any(r not in gidx for r in recs):
            continue
        if _excluded_gene(lig) or any(_excluded_gene(r) for r in recs):
            continue
        cand.append((lig_s, rec_s, lig, recs))
    order = rng.permutation(len(cand))
    n_null = 0
    used_pairs = set()
    for j in order:
        if n_null >= N_NULL_LR:
            break
        lig_s, rec_s, lig, recs = cand[j]
        if (lig_s, rec_s) in used_pairs:
            continue
        srcs = [
            t
            for t in major
            if frac[CELL_TYPES.index(t), gidx[lig]] * 1e4 >= 3.0 and (t, lig) not in touched
        ]
        tgts = [
            t
            for t in major
            if all(frac[CELL_TYPES.index(t), gidx[r]] * 1e4 >= 3.0 for r in recs)
            and not any((t, r) in touched for r in recs)
        ]
        if not srcs or not tgts:
            continue
        s = srcs[rng.integers(len(srcs))]
        t = tgts[rng.integers(len(tgts))]
        used_pairs.add((lig_s, rec_s))
        n_null += 1
        for c in conds:
            rows.append(
                _lr_truth_row(
                    lig_s, rec_s, s, t, c, direction="none", log2fc=0.0, kind="null", driver="none"
                )
            )
    rows += _ligand_only_rows(
        res, genes, frac, eff, conds, from_species, axis_keys, major, gidx, rng
    )
    return pd.DataFrame(rows)


def _ligand_only_rows(res, genes, frac, eff, conds, from_species, axis_keys, major, gidx, rng):
    """Ligand-only pairs (kind ``ligand_only``, driver ``ligand``): the ligand carries a
    planted change in the sender, the receptor is well expressed in the receiver and its
    gene(s) carry no planted change in any cell type. One DE ligand must not make such a
    pair a (two-sided) differential interaction."""
    touched_genes = {g for (_, g, _) in eff}
    lig_changes: dict[tuple[str, str], dict[str, float]] = {}
    for (t, g, c), e in eff.items():
        if abs(e) > LR_SIDE_EFFECT:
            lig_changes.setdefault((t, g), {})[c] = e
    cand = []
    for lig_s, rec_s in res.itertuples(index=False):
        lig = from_species.get(lig_s)
        recs = [from_species.get(r) for r in rec_s.split("_")]
        if lig is None or any(r is None or r not in gidx for r in recs) or lig not in gidx:
            continue
        if any(r in touched_genes or _excluded_gene(r) for r in recs):
            continue
        for s in CELL_TYPES:
            changes = lig_changes.get((s, lig))
            if not changes or frac[CELL_TYPES.index(s), gidx[lig]] * 1e4 < 3.0:
                continue
            for t in major:
                if (lig_s, rec_s, s, t) in axis_keys:
                    continue
                if all(frac[CELL_TYPES.index(t), gidx[r]] * 1e4 >= 10.0 for r in recs):
                    cand.append((lig_s, rec_s, s, t, changes))
    rows = []
    if not cand:
        return rows
    pick = rng.choice(len(cand), size=min(N_LIGAND_ONLY_LR, len(cand)), replace=False)
    for j in sorted(pick):
        lig_s, rec_s, s, t, changes = cand[j]
        for c in conds:
            if c not in changes:
                continue
            e = changes[c]
            rows.append(
                _lr_truth_row(
                    lig_s,
                    rec_s,
                    s,
                    t,
                    c,
                    direction="up" if e > 0 else "down",
                    log2fc=e,
                    kind="ligand_only",
                    driver="ligand",
                )
            )
    return rows


# ======================================================================================
# simulation
# ======================================================================================
_ACGT = np.frombuffer(b"ACGT", dtype=np.uint8)


def _barcodes(n: int, rng: np.random.Generator) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        m = n - len(out)
        codes = _ACGT[rng.integers(0, 4, size=(m, 16))]
        for row in codes:
            b = row.tobytes().decode() + "-1"
            if b not in seen:
                seen.add(b)
                out.append(b)
    return out


CHUNK_CELLS = 2048  # cells per dense block (bounds memory at any cohort size)


@dataclass
class _Ctx:
    """Per-sample quantities shared by its chunks."""

    f: np.ndarray  # K x G profile with condition effects
    f_base: np.ndarray  # K x G profile before condition effects
    mult: np.ndarray  # K x G condition multipliers
    partial: list  # (type, gene, multiplier, fraction) effects on a fraction of cells
    amb: np.ndarray  # G, ambient profile
    amb_frac: float
    ifn_rate: float


@dataclass
class _Idx:
    """Gene index sets used per cell."""

    mt: np.ndarray
    non_mt: np.ndarray
    stress: np.ndarray
    ifn: np.ndarray
    normal_b: int
    light_k: np.ndarray
    light_l: np.ndarray
    v_segments: list


def _chunk_counts(r, ctx: _Ctx, idx: _Idx, theta, types, t2, is_dbl, is_lq, lib, lib2):
    """Counts (CSR int32) of one block of cells of a sample."""
    n = types.size
    f = ctx.f
    mu = f[types] * lib[:, None]
    # continua between related states (resting -> activated CLL, effector -> exhausted
    # CD8, naive -> Tfh CD4): each cell sits somewhere on the path; labels stay discrete
    for (ka, kb), (ba, bb) in _GRADIENT_IDX:
        cells = np.flatnonzero(((types == ka) | (types == kb)) & ~is_dbl)
        if cells.size == 0:
            continue
        in_b = types[cells] == kb
        w = np.where(in_b, r.beta(*bb, size=cells.size), r.beta(*ba, size=cells.size))
        la, lb = np.log(ctx.f_base[ka]), np.log(ctx.f_base[kb])
        prof = np.exp(la[None, :] + w[:, None] * (lb - la)[None, :])
        prof /= prof.sum(axis=1, keepdims=True)
        prof *= ctx.mult[types[cells]]
        mu[cells] = prof * lib[cells, None]
    if is_dbl.any():
        d = np.flatnonzero(is_dbl)
        mu[d] += f[t2[d]] * lib2[d, None]
    # partial condition effects: a random fraction of the type's cells
    for k, i, mult, fa in ctx.partial:
        cells = np.flatnonzero(types == k)
        hit = cells[r.random(cells.size) < fa]
        mu[hit, i] *= mult
    # normal B: one IGHV and one light chain (kappa or lambda) per cell
    nb = np.flatnonzero((types == idx.normal_b) & ~is_dbl)
    if nb.size:
        kappa = r.random(nb.size) < 0.6
        mu[np.ix_(nb[kappa], idx.light_l)] *= 0.002
        mu[np.ix_(nb[~kappa], idx.light_k)] *= 0.002
        for vi in idx.v_segments:
            chosen = r.integers(vi.size, size=nb.size)
            keep = np.full((nb.size, vi.size), 0.002)
            keep[np.arange(nb.size), chosen] = vi.size
            mu[np.ix_(nb, vi)] *= keep
    # per-cell nuisance: dissociation stress (continuous), interferon (a few cells)
    mu[:, idx.stress] *= np.exp(r.normal(0, 0.5, n))[:, None]
    ifn = np.flatnonzero(r.random(n) < ctx.ifn_rate)
    mu[np.ix_(ifn, idx.ifn)] *= 4.0
    # low-quality cells: 1/4 of the UMIs, 20-60% mito
    if is_lq.any():
        q = np.flatnonzero(is_lq)
        m = r.uniform(0.2, 0.6, q.size)
        tot = mu[q].sum(axis=1) * 0.25
        mt_sum = mu[np.ix_(q, idx.mt)].sum(axis=1)
        nuc_sum = tot * 4 - mt_sum
        mu[np.ix_(q, idx.mt)] *= (tot * m / mt_sum)[:, None]
        mu[np.ix_(q, idx.non_mt)] *= (tot * (1 - m) / nuc_sum)[:, None]
    # ambient RNA
    mu += (ctx.amb_frac * mu.sum(axis=1))[:, None] * ctx.amb[None, :]
    # gamma-Poisson counts
    mu *= r.gamma(theta, 1.0 / theta, size=mu.shape)
    return sp.csr_matrix(r.poisson(mu).astype(np.int32))


def simulate(
    *,
    seed: int = 0,
    n_patients: int | None = None,
    cells_per_sample: int | None = None,
    species: str = "human",
    conditions: tuple[str, ...] | list[str] = CONDITIONS,
    tissue: str = DEFAULT_TISSUE,
    doublet_rate_per_1k: float | None = DOUBLET_RATE_PER_1K_10X,
    tme_shifts: bool = True,
    tumour_burden_log2: dict[str, float] | None = None,
    healthy: bool = False,
    lesions: bool = False,
    vdj: bool = False,
) -> Simulation:
    """Simulate a paired CLL TME cohort (``n_patients`` x ``conditions`` samples).

    Parameters
    ----------
    seed
        Seed of everything (profiles, patients, cells); the same seed gives identical
        counts and truth tables.
    n_patients, cells_per_sample
        Cohort size; ``None`` takes the defaults (4 patients, 1,100 cells per sample).
    species
        ``"human"`` or ``"mouse"`` (mouse symbols, Emu-TCL1 ``TCL1A`` transgene).
    conditions
        Resistance states to sample, drawn from :data:`CONDITIONS`; must include ``NAIVE``.
    tissue
        Value of the samplesheet / obs ``tissue`` column.
    doublet_rate_per_1k
        Plant doublets at this many percent per 1,000 cells of the sample (10x loading;
        default :data:`DOUBLET_RATE_PER_1K_10X`, ~0.9% of a 1,100-cell sample, 12% of a
        15,000-cell one); ``None``: a fixed :data:`DOUBLET_RATE` whatever the size.
    tme_shifts
        Plant the microenvironment shifts of :data:`COMPOSITION_SHIFTS` (``False``: none).
    tumour_burden_log2
        Condition -> log2 change of every CLL state's share (a tumour-burden change that
        leaves the non-malignant composition as it is); in ``truth/composition.csv``.
    healthy
        Healthy donors: no leukaemia (CLL proportions 0; the B cells are polyclonal normal B).
    lesions
        Plant copy-number lesions in each patient's CLL clone (:func:`plant_lesions`;
        ``truth["lesions"]``, ``truth["cells"]["lesions"]``).
    vdj
        Also simulate Cell Ranger V(D)J contigs of the B cells (:func:`add_vdj`).

    Returns
    -------
    Simulation
        ``.adata``: raw counts (CSR int32), obs ``sample_id, patient, condition, tissue,
        species, barcode, true_cell_type, is_doublet, low_quality, doublet_of``, var
        ``gene_ids, feature_types``, uns ``simulation`` (parameters); ``.truth``: DataFrames
        ``cells, de, lr, composition, clones``; ``.samplesheet``.

    Raises
    ------
    ValueError
        Unknown species / condition, no ``NAIVE``, fewer than 1 patient or 10 cells.
    """
    import anndata as ad

    _check_species(species)
    n_patients = DEFAULT_PATIENTS if n_patients is None else int(n_patients)
    cells_per_sample = (
        DEFAULT_CELLS_PER_SAMPLE if cells_per_sample is None else int(cells_per_sample)
    )
    conditions = tuple(conditions)
    if n_patients < 1 or cells_per_sample < 10:
        raise ValueError("need at least 1 patient and 10 cells per sample")
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown or REFERENCE not in conditions:
        raise ValueError(f"conditions must be drawn from {CONDITIONS} and include {REFERENCE}")

    internal, symbols = gene_universe(species)
    to_species = dict(zip(internal, symbols))
    G = len(internal)
    gidx = {g: i for i, g in enumerate(internal)}
    ss = np.random.SeedSequence(seed)
    s_global, s_truth, s_samples = ss.spawn(3)
    rng = np.random.default_rng(s_global)

    log.info(
        "simulating %d patients x %d conditions, ~%d cells/sample, %d genes (%s, seed %d)",
        n_patients, len(conditions), cells_per_sample, G, species, seed,
    )  # fmt: skip

    logcp = _base_profiles(internal, species, rng)
    frac0 = _to_fraction(logcp)  # K x G, rows sum to 1
    theta = np.exp(rng.normal(np.log(4.0), 0.5, G))  # NB size per gene
    K = len(CELL_TYPES)

    # ------------------------------------------------------------------- truth tables
    gset = set(internal)
    comp = _composition_table(conditions, _composition_shifts(tme_shifts, tumour_burden_log2))
    planted = _planted_de_table(gset, conditions)
    trng = np.random.default_rng(s_truth)
    nulls = _null_de_table(internal, frac0, planted, conditions, trng)
    de = pd.concat([planted, nulls], ignore_index=True)
    lr = _lr_table(species, internal, frac0, de, conditions, to_species, trng)

    # condition multipliers (full-fraction) and partial effects
    cond_mult = {c: np.ones((K, G)) for c in conditions}
    partial: dict[str, list[tuple[int, int, float, float]]] = {c: [] for c in conditions}
    for r in planted.itertuples():
        k, i = CELL_TYPES.index(r.cell_type), gidx[r.gene]
        if r.fraction_affected >= 1.0:
            cond_mult[r.condition][k, i] *= 2.0**r.log2fc
        else:
            partial[r.condition].append((k, i, 2.0**r.log2fc, r.fraction_affected))

    # ------------------------------------------------------------------- patients
    patients = [f"P{p + 1:02d}" for p in range(n_patients)]
    clones = []
    patient_frac = {}
    ighv = [g for g in IGHV if g in gidx]
    igkv = [g for g in IGKV if g in gidx]
    iglv = [g for g in IGLV if g in gidx]
    ig_idx = {
        "IGHV": np.array([gidx[g] for g in ighv]),
        "IGKV": np.array([gidx[g] for g in igkv]),
        "IGLV": np.array([gidx[g] for g in iglv]),
    }
    for p in patients:
        batch = np.exp(rng.normal(0, 0.2, G))
        lc = "IGKC" if rng.random() < 0.6 else ("IGLC2" if rng.random() < 0.7 else "IGLC3")
        hv = ighv[rng.integers(len(ighv))]
        lv = igkv[rng.integers(len(igkv))] if lc == "IGKC" else iglv[rng.integers(len(iglv))]
        scale = rng.uniform(0.6, 1.25)
        lc_cp = logcp.copy()
        for t in CLL_TYPES:
            k = CELL_TYPES.index(t)
            for g, v in {"IGHM": 150, "IGHD": 50, hv: 110, lc: 220, lv: 110}.items():
                lc_cp[k, gidx[g]] = np.log2(v * scale)
        f = _to_fraction(lc_cp) * batch
        patient_frac[p] = f / f.sum(axis=1, keepdims=True)
        ig_fraction = float(
            patient_frac[p][
                CELL_TYPES.index(CLL_RESTING), [gidx[g] for g in IG_GENES if g in gidx]
            ].sum()
        )
        clones.append(
            {
                "patient": p,
                "ighv": to_species.get(hv, hv),
                "light_chain": to_species.get(lc, lc),
                "light_v": to_species.get(lv, lv),
                "isotype": to_species.get("IGHM", "IGHM"),
                "ig_fraction_cll": round(ig_fraction, 6),
            }
        )

    # ------------------------------------------------------------------- samples
    sample_rows = []
    for p in patients:
        for c in conditions:
            sample_rows.append((f"{p}_{c}", p, c))
    child = s_samples.spawn(len(sample_rows))
    mt_idx = np.array([gidx[g] for g in MITO])
    stress_idx = np.array([gidx[g] for g in STRESS if g in gidx])
    ifn_idx = np.array([gidx[g] for g in INTERFERON if g in gidx])
    non_mt = np.ones(G, bool)
    non_mt[mt_idx] = False
    comp_p = {
        c: comp[comp["condition"] == c]
        .set_index("cell_type")
        .loc[list(CELL_TYPES), "proportion"]
        .to_numpy()
        for c in conditions
    }
    if healthy:
        comp_p = _healthy_proportions(comp_p)
        clones = []
    lib_med = np.array([LIBRARY_MEDIAN[t] for t in CELL_TYPES], float)
    normal_b = CELL_TYPES.index(NORMAL_B)
    light_k = np.array([gidx["IGKC"], *ig_idx["IGKV"]])
    light_l = np.array([gidx[g] for g in IGL_CONST if g in gidx] + list(ig_idx["IGLV"]))

    idx = _Idx(
        mt=mt_idx,
        non_mt=np.flatnonzero(non_mt),
        stress=stress_idx,
        ifn=ifn_idx,
        normal_b=normal_b,
        light_k=light_k,
        light_l=light_l,
        v_segments=list(ig_idx.values()),
    )
    mats, obs_parts = [], []
    for (sid, p, c), sseq in progress(
        list(zip(sample_rows, child)), desc="simulate", unit="sample"
    ):
        r = np.random.default_rng(sseq)
        n = cells_per_sample
        # per-sample profile: patient profile x sample batch; condition effects on top
        f = patient_frac[p] * np.exp(r.normal(0, 0.1, G))
        f_base = f / f.sum(axis=1, keepdims=True)
        f = f_base * cond_mult[c]
        lib_factor = np.exp(r.normal(0, 0.1))
        # per-sample composition noise: log-normal on every type's share (sd 0.15)
        props = comp_p[c] * np.exp(r.normal(0, 0.15, K))
        props /= props.sum()
        types = r.choice(K, size=n, p=props)
        d_rate = doublet_rate_for(n, doublet_rate_per_1k)
        is_dbl = r.random(n) < d_rate
        is_lq = (~is_dbl) & (r.random(n) < LOW_QUALITY_RATE / (1 - d_rate))
        t2 = np.where(is_dbl, r.choice(K, size=n, p=props), -1)
        for _ in range(50):
            same = is_dbl & (t2 == types)
            if not same.any():
                break
            t2[same] = r.choice(K, size=int(same.sum()), p=props)
        same = is_dbl & (t2 == types)
        t2[same] = (types[same] + 1) % K
        lib = lib_med[types] * lib_factor * np.exp(r.normal(0, 0.35, n))
        lib2 = np.where(
            is_dbl, lib_med[np.maximum(t2, 0)] * lib_factor * np.exp(r.normal(0, 0.35, n)), 0
        )
        # ambient RNA: the sample's expected pooled profile (soup)
        w_amb = np.bincount(types, weights=lib, minlength=K)
        w_amb += np.bincount(np.maximum(t2, 0), weights=lib2, minlength=K)
        amb = w_amb @ f
        amb /= amb.sum()
        amb_frac = r.uniform(0.02, 0.05)
        ifn_rate = r.uniform(0.02, 0.1)
        ctx = _Ctx(f=f, f_base=f_base, mult=cond_mult[c], partial=partial[c], amb=amb,
                   amb_frac=amb_frac, ifn_rate=ifn_rate)  # fmt: skip
        for lo in range(0, n, CHUNK_CELLS):
            sl = slice(lo, min(n, lo + CHUNK_CELLS))
            mats.append(
                _chunk_counts(
                    r, ctx, idx, theta, types[sl], t2[sl], is_dbl[sl], is_lq[sl], lib[sl], lib2[sl]
                )  # fmt: skip
            )
        bcs = _barcodes(n, r)
        cell_type = np.array(CELL_TYPES, dtype=object)[types]
        cell_type[is_dbl] = DOUBLET
        doublet_of = np.array([""] * n, dtype=object)
        if is_dbl.any():
            d = np.flatnonzero(is_dbl)
            doublet_of[d] = [
                "+".join(sorted((CELL_TYPES[a1], CELL_TYPES[a2])))
                for a1, a2 in zip(types[d], t2[d])
            ]
        obs_parts.append(
            pd.DataFrame(
                {
                    "sample_id": sid,
                    "patient": p,
                    "condition": c,
                    "tissue": tissue,
                    "species": species,
                    "barcode": bcs,
                    "true_cell_type": cell_type,
                    "is_doublet": is_dbl,
                    "low_quality": is_lq,
                    "doublet_of": doublet_of,
                },
                index=[f"{sid}:{b}" for b in bcs],
            )
        )

    X = sp.vstack(mats, format="csr")
    obs = pd.concat(obs_parts)
    obs.index.name = None
    var = pd.DataFrame(
        {"gene_ids": _gene_ids(symbols, species), "feature_types": "Gene Expression"},
        index=pd.Index(symbols),
    )
    adata = ad.AnnData(X=X, obs=obs, var=var)
    for col in ("sample_id", "patient", "condition", "tissue", "species", "true_cell_type"):
        adata.obs[col] = adata.obs[col].astype("category")
    adata.uns["simulation"] = {
        "seed": int(seed),
        "species": species,
        "n_patients": n_patients,
        "cells_per_sample": cells_per_sample,
        "reference": REFERENCE,
        "conditions": list(conditions),
    }
    if doublet_rate_per_1k is not None:
        adata.uns["simulation"]["doublet_rate_per_1k"] = float(doublet_rate_per_1k)

    # ------------------------------------------------------------------- truth in species symbols
    def to_sp(df: pd.DataFrame, cols) -> pd.DataFrame:
        df = df.copy()
        for col in cols:
            df[col] = df[col].map(lambda g: to_species.get(g, g))
        return df

    cells = obs.reset_index(names="cell_id")[
        ["cell_id", "sample_id", "patient", "condition", "barcode", "true_cell_type",
         "is_doublet", "low_quality", "doublet_of"]
    ].rename(columns={"true_cell_type": "cell_type"})  # fmt: skip
    truth = {
        "cells": cells.astype({"cell_type": str}),
        "de": to_sp(de, ["gene"]),
        "lr": lr,
        "composition": comp,
        "clones": pd.DataFrame(clones),
    }
    sheet = pd.DataFrame(
        [
            {
                "sample_id": sid,
                "path": f"samples/{sid}",
                "patient": p,
                "condition": c,
                "tissue": tissue,
                "species": species,
            }
            for sid, p, c in sample_rows
        ]
    )
    log.info(
        "simulated %d cells x %d genes (%d doublets, %d low-quality)",
        adata.n_obs, adata.n_vars, int(obs["is_doublet"].sum()), int(obs["low_quality"].sum()),
    )  # fmt: skip
    sim = Simulation(
        adata=adata, truth=truth, samplesheet=sheet, params=dict(adata.uns["simulation"])
    )
    adata.uns["simulation"]["healthy"] = bool(healthy)
    _malignant_truth(sim)
    if lesions and not healthy:
        plant_lesions(sim, seed=seed)
    if vdj:
        add_vdj(sim, seed=seed)
    return sim


# ======================================================================================
# leukaemia truth: healthy donors, copy-number lesions, V(D)J contigs
# ======================================================================================
# Copy-number lesions planted in the CLL clone: name -> (chromosome, start, end, kind,
# expression factor). Human (hg38): the recurrent CLL lesions of Doehner et al. NEJM 2000
# (trisomy 12, del(13q14), del(11q22-q23), del(17p13)); the 13q deletion is planted as a large
# ("type II", RB1-spanning) deletion and the 11q / 17p deletions at their usual size.
# Mouse (GRCm38): Emu-TCL1 leukaemias, illustrative (trisomy 15; a chr14 deletion syntenic to
# human 13q14 around Dleu2).
SIM_LESIONS: dict[str, dict[str, tuple[str, int, int, str, float]]] = {
    "human": {
        "trisomy 12": ("12", 0, 134_000_000, "gain", 1.5),
        "del(13q14)": ("13", 40_000_000, 80_000_000, "loss", 0.5),
        "del(11q22)": ("11", 95_000_000, 125_000_000, "loss", 0.5),
        "del(17p13)": ("17", 0, 22_000_000, "loss", 0.5),
    },
    "mouse": {
        "trisomy 15": ("15", 0, 104_100_000, "gain", 1.5),
        "del(14qC)": ("14", 45_000_000, 80_000_000, "loss", 0.5),
    },
}
# which lesions each patient's clone carries (cycled over patients; "" = none), and the
# fraction of the clone carrying each (del(17p) subclonal)
_LESION_PLAN = {
    "human": [("trisomy 12", "del(13q14)"), ("del(13q14)", "del(11q22)"), (), ("del(17p13)",)],
    "mouse": [("trisomy 15",), (), ("del(14qC)",)],
}
_LESION_FRACTION = {"del(17p13)": 0.7}
VDJ_RECOVERY = 0.85  # fraction of B cells with contigs (Cell Ranger V(D)J typically 60-90%)
_CELLRANGER_COLS = [
    "barcode", "is_cell", "contig_id", "high_confidence", "length", "chain", "v_gene",
    "d_gene", "j_gene", "c_gene", "full_length", "productive", "cdr3", "cdr3_nt", "reads",
    "umis", "raw_clonotype_id", "raw_consensus_id",
]  # fmt: skip


def _healthy_proportions(comp_p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Composition without leukaemia: CLL states at 0, the rest renormalised."""
    cll = [CELL_TYPES.index(t) for t in CLL_TYPES]
    out = {}
    for c, p in comp_p.items():
        q = p.copy()
        q[cll] = 0.0
        out[c] = q / q.sum()
    return out


def _malignant_truth(sim: Simulation) -> None:
    """``truth["cells"]["malignant"]`` (singlet CLL cells) and a typed empty clones table."""
    cells = sim.truth["cells"]
    cells["malignant"] = cells["cell_type"].isin(CLL_TYPES).to_numpy()
    cells["lesions"] = ""
    if sim.truth["clones"].empty:
        sim.truth["clones"] = pd.DataFrame(
            columns=["patient", "ighv", "light_chain", "light_v", "isotype", "ig_fraction_cll"]
        )


def _segment_genes(var_names, species: str, chrom: str, start: int, end: int) -> np.ndarray:
    from references import gene_positions

    pos = gene_positions(species).set_index("symbol")
    pos = pos[pos["chromosome"] == chrom]
    inside = pos.index[(pos["start"] >= start) & (pos["end"] <= end)]
    return np.flatnonzero(pd.Index(var_names).isin(inside))


def plant_lesions(sim: Simulation, *, seed: int = 0) -> None:
    """Scale the counts of a segment's genes in each patient's CLL clone (copy number).

    Losses thin every count of the segment's genes binomially (factor 0.5: one copy lost),
    gains add a binomial share (factor 1.5: a third copy), in the CLL cells that carry the
    lesion (all of the clone, or a subclone). Writes ``truth["lesions"]`` (patient, lesion,
    chromosome, start, end, kind, fraction) and ``truth["cells"]["lesions"]`` (``;``-joined).
    """
    adata = sim.adata
    species = sim.params.get("species", "human")
    r = np.random.default_rng([seed, 14_001])
    X = adata.X.tocsr()
    obs = adata.obs
    cell_type = obs["true_cell_type"].astype(str).to_numpy()
    patient = obs["patient"].astype(str).to_numpy()
    plan = _LESION_PLAN[species]
    carried = np.full(adata.n_obs, "", dtype=object)
    rows = []
    for i, p in enumerate(sorted(set(patient))):
        clone = np.flatnonzero((patient == p) & np.isin(cell_type, CLL_TYPES))
        for name in plan[i % len(plan)]:
            chrom, start, end, kind, factor = SIM_LESIONS[species][name]
            frac = _LESION_FRACTION.get(name, 1.0)
            cells = clone[r.random(clone.size) < frac] if frac < 1 else clone
            genes = _segment_genes(adata.var_names, species, chrom, start, end)
            rows.append(
                {
                    "patient": p,
                    "lesion": name,
                    "chromosome": chrom,
                    "start": start,
                    "end": end,
                    "kind": kind,
                    "fraction": frac,
                    "n_genes": int(genes.size),
                }  # fmt: skip
            )
            carried[cells] = [f"{c};{name}" if c else name for c in carried[cells]]
            gmask = np.zeros(adata.n_vars, bool)
            gmask[genes] = True
            for c in cells:
                lo, hi = X.indptr[c], X.indptr[c + 1]
                hit = lo + np.flatnonzero(gmask[X.indices[lo:hi]])
                d = X.data[hit]
                if factor < 1:
                    X.data[hit] = r.binomial(d, factor)
                else:
                    X.data[hit] = d + r.binomial(d, factor - 1.0)
    X.eliminate_zeros()
    adata.X = X
    sim.truth["lesions"] = pd.DataFrame(
        rows,
        columns=["patient", "lesion", "chromosome", "start", "end", "kind", "fraction", "n_genes"],
    )
    ids = sim.truth["cells"]["cell_id"].to_numpy()
    pos = pd.Index(adata.obs_names).get_indexer(ids)
    sim.truth["cells"]["lesions"] = carried[pos]


def _random_nt(r: np.random.Generator, n: int) -> str:
    return "TGT" + _ACGT[r.integers(4, size=n)].tobytes().decode() + "TGG"


_AA = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)


def _aa(nt: str) -> str:
    # a stable pseudo-translation (a real translation is not needed for clonotyping)
    h = zlib.crc32(nt.encode())
    r = np.random.default_rng(h)
    return "C" + _AA[r.integers(20, size=max(3, len(nt) // 3 - 2))].tobytes().decode() + "W"


def add_vdj(sim: Simulation, *, seed: int = 0) -> None:
    """Cell Ranger V(D)J contigs (``filtered_contig_annotations.csv`` rows) of the B cells.

    Each patient's CLL clone shares one heavy and one light CDR3 (its IGHV / light V from
    ``truth["clones"]``); every normal B cell has its own CDR3s and the V genes it expresses
    most (polyclonal). :data:`VDJ_RECOVERY` of the B cells get contigs; doublets with a B
    partner get that partner's contigs. Fills ``sim.vdj`` (sample_id -> DataFrame) and
    ``sim.samplesheet["vdj"]``; IGHV identity to germline goes in ``truth["clones"]``.
    """
    adata = sim.adata
    r = np.random.default_rng([seed, 14_002])
    obs = adata.obs
    species = sim.params.get("species", "human")
    names = list(adata.var_names)
    internal, symbols = gene_universe(species)
    to_sp = dict(zip(internal, symbols))
    vsets = {
        "IGH": [to_sp[g] for g in IGHV if g in to_sp],
        "IGK": [to_sp[g] for g in IGKV if g in to_sp],
        "IGL": [to_sp[g] for g in IGLV if g in to_sp],
    }
    vidx = {k: np.array([names.index(g) for g in v]) for k, v in vsets.items()}
    c_gene = {"IGH": to_sp.get("IGHM", "IGHM"), "IGK": "IGKC" if species == "human" else "Igkc",
              "IGL": to_sp.get("IGLC2", "IGLC2")}  # fmt: skip
    clones = sim.truth["clones"].set_index("patient") if len(sim.truth["clones"]) else None
    clone_seq = {}
    if clones is not None:
        for p in clones.index:
            light = "IGK" if str(clones.loc[p, "light_chain"]).upper().startswith("IGK") else "IGL"
            clone_seq[p] = {
                "IGH": (clones.loc[p, "ighv"], _random_nt(r, 48)),
                light: (clones.loc[p, "light_v"], _random_nt(r, 30)),
            }
        ident = r.choice([99.6, 100.0, 95.1, 93.4], size=len(clones))
        sim.truth["clones"]["ighv_identity"] = ident
    X = adata.X.tocsr()
    tct = obs["true_cell_type"].astype(str).to_numpy()
    dbl = obs["doublet_of"].astype(str).to_numpy()
    b_types = (*CLL_TYPES, NORMAL_B)
    rows_by_sample: dict[str, list] = {}
    for i in range(adata.n_obs):
        t = tct[i]
        if t == DOUBLET:
            parts = [x for x in dbl[i].split("+") if x in b_types]
            if not parts:
                continue
            t = parts[0]
        elif t not in b_types:
            continue
        if r.random() > VDJ_RECOVERY:
            continue
        sid, bc, p = (
            str(obs["sample_id"].iat[i]),
            str(obs["barcode"].iat[i]),
            str(obs["patient"].iat[i]),
        )
        if t in CLL_TYPES and p in clone_seq:
            chains = clone_seq[p]
        else:
            row = X[i]
            chains = {}
            for ch in ("IGH", "IGK" if r.random() < 0.6 else "IGL"):
                # the V gene the cell expresses most (the simulated cell's own choice)
                counts = row[:, vidx[ch]].toarray().ravel() if vidx[ch].size else np.zeros(0)
                if counts.size == 0:
                    continue
                v = (
                    vsets[ch][int(counts.argmax())]
                    if counts.max() > 0
                    else vsets[ch][int(r.integers(len(vsets[ch])))]
                )
                chains[ch] = (v, _random_nt(r, 48 if ch == "IGH" else 30))
        rows = rows_by_sample.setdefault(sid, [])
        for j, (ch, (v, nt)) in enumerate(chains.items()):
            umis = int(r.integers(2, 30))
            rows.append(
                {
                    "barcode": bc,
                    "is_cell": "True",
                    "contig_id": f"{bc}_contig_{j + 1}",
                    "high_confidence": "True",
                    "length": 550,
                    "chain": ch,
                    "v_gene": v,
                    "d_gene": "",
                    "j_gene": "",
                    "c_gene": c_gene[ch],
                    "full_length": "True",
                    "productive": "True",
                    "cdr3": _aa(nt),
                    "cdr3_nt": nt,
                    "reads": umis * 40,
                    "umis": umis,
                    "raw_clonotype_id": "",
                    "raw_consensus_id": "",
                }  # fmt: skip
            )
    sim.vdj = {
        sid: pd.DataFrame(rows_by_sample.get(sid, []), columns=_CELLRANGER_COLS)
        for sid in sim.samplesheet["sample_id"]
    }
    sim.samplesheet["vdj"] = [
        f"vdj/{sid}_filtered_contig_annotations.csv" for sid in sim.samplesheet["sample_id"]
    ]


# ======================================================================================
# strong per-sample batch effect (an option on top of a simulation)
# ======================================================================================
def add_sample_batch_effect(sim: Simulation, *, sd: float = 0.6, seed: int = 0) -> Simulation:
    """A strong technical batch effect per sample, on top of a simulated cohort.

    Every sample gets its own gene-wise log-normal multiplier ``exp(N(0, sd))`` (mitochondrial
    genes exempt, so QC truth is unchanged), applied to the counts of every cell type and
    every state alike: counts are thinned binomially where the multiplier is < 1 and topped
    up with Poisson counts where it is > 1. The cohort's own batch (patient sd 0.2, sample
    sd 0.1) stays; ``sd`` 0.5-0.8 makes samples separate in an uncorrected PCA within every
    cell type. Cell types, doublets and planted effects (truth tables) are unchanged, so the
    simulator's labels score integration independently of any embedding.

    Parameters
    ----------
    sim
        A :class:`Simulation` (from :func:`simulate`); not modified.
    sd
        Standard deviation of the per-sample log multiplier per gene.
    seed
        Seed of the multipliers and the resampling.

    Returns
    -------
    Simulation
        A copy with new counts and ``uns["simulation"]["sample_batch_sd"]``.
    """
    from atlas import schema

    if sd < 0:
        raise ValueError("sd must be >= 0")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5BA7C4]))
    adata = sim.adata.copy()
    X = sp.csr_matrix(adata.X, copy=True)
    is_mt = np.asarray(adata.var_names.str.upper().str.startswith("MT-"))
    samples = adata.obs[schema.OBS_SAMPLE].astype(str).to_numpy()
    uniq = pd.unique(samples)
    mult = np.exp(rng.normal(0.0, sd, (len(uniq), adata.n_vars)))
    mult[:, is_mt] = 1.0
    codes = pd.Categorical(samples, categories=uniq).codes
    row_of = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    m = mult[codes[row_of], X.indices]
    c = X.data.astype(np.int64)
    new = rng.binomial(c, np.minimum(m, 1.0)) + rng.poisson(c * np.maximum(m - 1.0, 0.0))
    X.data = new.astype(X.dtype)
    X.eliminate_zeros()
    adata.X = X
    adata.uns["simulation"] = {**dict(adata.uns.get("simulation", {})), "sample_batch_sd": sd}
    return Simulation(
        adata=adata,
        truth=sim.truth,
        samplesheet=sim.samplesheet,
        params={**sim.params, "sample_batch_sd": float(sd)},
    )


# ======================================================================================
# writing
# ======================================================================================
def _format_int_columns(cols: list[np.ndarray]) -> bytes:
    """Lines of space-separated non-negative ints (vectorised, no Python loop per line)."""
    n = cols[0].size
    if n == 0:
        return b""
    cols = [np.asarray(c, dtype=np.int64) for c in cols]
    ndig = []
    for c in cols:
        d = np.ones(n, dtype=np.int64)
        v = c.copy()
        v //= 10
        while v.any():
            d += v > 0
            v //= 10
        ndig.append(d)
    line_len = sum(ndig) + len(cols)  # separators + newline
    ends = np.cumsum(line_len)
    starts = ends - line_len
    buf = np.full(int(ends[-1]), ord(" "), dtype=np.uint8)
    buf[ends - 1] = ord("\n")
    pos = starts.copy()
    for c, d in zip(cols, ndig):
        maxd = int(d.max())
        v = c.copy()
        # write digits from the least significant end
        for j in range(maxd):
            m = d > j
            idx = pos[m] + d[m] - 1 - j
            buf[idx] = (v[m] % 10 + 48).astype(np.uint8)
            v //= 10
        pos = pos + d + 1
    return buf.tobytes()


def _gzip_bytes(path: Path, data: bytes, level: int = 4) -> None:
    with open(path, "wb") as fh:
        with gzip.GzipFile(filename="", mode="wb", fileobj=fh, compresslevel=level, mtime=0) as gz:
            gz.write(data)


def write_10x(X: sp.csr_matrix, barcodes, gene_ids, symbols, folder: str | Path) -> None:
    """Write a Cell Ranger v3 folder (genes x cells ``matrix.mtx.gz``) from cells x genes CSR."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    X = sp.csr_matrix(X)
    X.sort_indices()
    n_cells, n_genes = X.shape
    header = (
        "%%MatrixMarket matrix coordinate integer general\n"
        '%metadata_json: {"software_version": "tme-atlas-simulate", "format_version": 2}\n'
        f"{n_genes} {n_cells} {X.nnz}\n"
    ).encode()
    cell = np.repeat(np.arange(1, n_cells + 1), np.diff(X.indptr))
    body = _format_int_columns([X.indices + 1, cell, X.data])
    _gzip_bytes(folder / "matrix.mtx.gz", header + body)
    _gzip_bytes(folder / "barcodes.tsv.gz", ("\n".join(barcodes) + "\n").encode())
    feats = "".join(f"{i}\t{s}\tGene Expression\n" for i, s in zip(gene_ids, symbols))
    _gzip_bytes(folder / "features.tsv.gz", feats.encode())


def _csv(df: pd.DataFrame) -> str:
    from atlas.tables import csv_text

    return csv_text(df, lineterminator="\n", float_format="%.6g")


def write_dataset(
    out: str | Path,
    *,
    seed: int = 0,
    cells_per_sample: int | None = None,
    n_patients: int | None = None,
    species: str = "human",
    sim: Simulation | None = None,
    healthy: bool = False,
    vdj: bool = False,
    lesions: bool = False,
) -> Path:
    """Simulate and write the cohort as a user's input.

    Writes ``out/samplesheet.csv`` (``sample_id,path,patient,condition,tissue,species``,
    paths relative to the sheet), ``out/samples/<sample_id>/{matrix.mtx.gz,
    barcodes.tsv.gz, features.tsv.gz}`` (Cell Ranger v3) and
    ``out/truth/{cells,de,lr,composition,clones}.csv`` + ``README.md``. Everything is
    written to a temporary folder beside ``out`` and renamed at the end. An existing
    ``out`` is replaced only when empty or an earlier simulation.

    Parameters
    ----------
    out
        Output folder.
    seed, cells_per_sample, n_patients, species, healthy, vdj, lesions
        As for :func:`simulate` (``vdj``: also ``out/vdj/<sample>_filtered_contig_annotations.csv``
        and the sample sheet's ``vdj`` column; ``lesions``: copy-number lesions in the CLL
        clones, ``truth/lesions.csv``). ``tme-atlas simulate`` (the demo) turns both on.
    sim
        Write this simulation instead of simulating (the other arguments are ignored).

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    InputError
        ``out`` is a file or a non-empty folder that is not a simulation; bad sizes.
    """
    from atlas import schema
    from atlas.errors import InputError
    from atlas.io import atomic_path

    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out}: exists and is not a folder")
        entries = [e.name for e in out.iterdir()]
        if entries and not ((out / "samplesheet.csv").is_file() and (out / "truth").is_dir()):
            raise InputError(
                f"--out {out}: folder is not empty and is not an earlier simulation; "
                "choose a new or empty folder"
            )
    if sim is None:
        try:
            sim = simulate(
                seed=seed,
                n_patients=n_patients,
                cells_per_sample=cells_per_sample,
                species=species,
                healthy=healthy,
                vdj=vdj,
                lesions=lesions,
            )
        except ValueError as e:
            raise InputError(f"simulate: {e}") from None
    adata = sim.adata
    X = adata.X.tocsr()
    gene_ids = list(adata.var[schema.VAR_GENE_ID])
    symbols = list(adata.var_names)
    sample_codes = adata.obs[schema.OBS_SAMPLE].astype(str).to_numpy()
    barcodes = adata.obs[schema.OBS_BARCODE].astype(str).to_numpy()
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for row in progress(list(sim.samplesheet.itertuples()), desc="write", unit="sample"):
            m = np.flatnonzero(sample_codes == row.sample_id)
            write_10x(X[m], list(barcodes[m]), gene_ids, symbols, tmp / row.path)
        (tmp / "samplesheet.csv").write_text(_csv(sim.samplesheet))
        if sim.vdj:
            (tmp / "vdj").mkdir()
            for sid, rel in zip(sim.samplesheet["sample_id"], sim.samplesheet["vdj"]):
                (tmp / rel).write_text(_csv(sim.vdj[sid]))
        (tmp / "truth").mkdir()
        for name, df in sim.truth.items():
            (tmp / "truth" / f"{name}.csv").write_text(_csv(df))
        (tmp / "truth" / "README.md").write_text(_TRUTH_README)
    log.info("wrote %d samples to %s", len(sim.samplesheet), out)
    return out


def load_truth(path: str | Path) -> dict[str, pd.DataFrame]:
    """The truth tables of a written simulation (``path`` = dataset folder or its ``truth/``)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if (path / "truth").is_dir():
        path = path / "truth"
    if not path.is_dir():
        raise FileNotFoundError(str(path))
    out = {}
    for f in sorted(path.glob("*.csv")):
        df = pd.read_csv(f, keep_default_na=False, na_values=[])
        if f.stem == "cells":
            for col in ("is_doublet", "low_quality", "malignant"):
                if col in df:
                    df[col] = df[col].astype(str).str.lower().eq("true")
        for col in df.columns:
            if col in ("log2fc", "fraction_affected", "expected_log2fc", "proportion",
                       "log2fc_vs_reference", "planted_log2_shift"):  # fmt: skip
                df[col] = pd.to_numeric(df[col])
        out[f.stem] = df
    return out


_TRUTH_README = """# Simulation truth

* `cells.csv`: cell_id (`<sample_id>:<barcode>`), sample_id, patient, condition, barcode,
  cell_type (`Doublet` for doublets), is_doublet, low_quality (cell_type keeps the
  underlying type), doublet_of (the two types of a doublet).
* `de.csv`: cell_type, gene, condition, reference, log2fc (in affected cells),
  fraction_affected, expected_log2fc (pseudobulk: log2(1 - f + f 2^log2fc)), programme,
  kind (`planted` or `null`: expressed gene that must not change).
* `lr.csv`: ligand, receptor (LIANA resource strings), source, target, condition, reference,
  direction (up/down/none: of the ligand-receptor co-expression), expected_log2fc,
  kind, driver (which partner carries a planted change: ligand / receptor / both / opposing
  / none). kind: `planted` (both partners change in the same direction: a two-sided
  differential interaction), `ligand_only` (only the ligand changes in the sender; the
  receptor is unchanged -- a null for a two-sided call, driver `ligand`; planted axes whose
  receptor does not change and extra pairs of a changed ligand with an untouched,
  well-expressed receptor), `receptor_only`, `unchanged_axis`, `null` (expressed, no
  planted change in either partner).
* `composition.csv`: cell_type, condition, reference, proportion (expected, among singlets),
  log2fc_vs_reference, planted_log2_shift, direction (up/down/none). `none` means no planted
  shift; by closure (proportions sum to 1) such types still move a little
  (`log2fc_vs_reference` ~ -0.3..+0.2), which is the exact expected value.
* `clones.csv`: the clonal immunoglobulin of each patient's leukaemia (empty for healthy
  donors); `ighv_identity` (percent identity to germline) when V(D)J contigs were simulated.
* `cells.csv` also holds `malignant` (singlet CLL cell) and `lesions` (`;`-joined copy-number
  lesions the cell carries).
* `lesions.csv`: patient, lesion, chromosome, start, end, kind (gain/loss), fraction (of the
  clone carrying it), n_genes (simulated genes in the segment). A patient absent here has no
  lesion.
* `vdj/<sample>_filtered_contig_annotations.csv` (beside `truth/`, named by the sample
  sheet's `vdj` column, with `--vdj`): Cell Ranger V(D)J contigs of the B cells.
"""


def cell_id(sample_id: str, barcode: str) -> str:
    return f"{sample_id}:{barcode}"


if __name__ == "__main__":  # pragma: no cover
    import sys

    write_dataset(sys.argv[1] if len(sys.argv) > 1 else "sim_out", seed=0)
    os._exit(0)
