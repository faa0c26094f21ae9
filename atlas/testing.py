"""Synthetic, schema-complete atlases for tests, the explorer and benchmarks.

``make_synthetic_adata`` builds, in cell chunks and without any dense cells x genes
matrix, an AnnData that has every key the build writes (see :mod:`atlas.schema`): obs
sample/patient/condition/tissue/species, QC columns, leiden, cell_type (+ confidence,
lineage), programme scores; obsm X_umap / X_scVI / X_pca; layers["counts"]; uns condition
order, reference, species, programmes, provenance and every result table with the
contract's columns. ``make_synthetic_atlas`` writes it with :func:`atlas.store.write_atlas`.

The numbers are plausible, not biology: marker genes are detected mostly in their cell
type, conditions shift a few genes (CXCR4, BCL2, MCL1, MS4A1, ...) in CLL cells, tables are
derived from the cell counts where that is cheap and drawn at random otherwise.

1M cells x 2,000 genes (about 160M non-zeros) generate in ~20 s; writing the atlas takes
longer (the h5ad holds X and counts; the store a CSC copy).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from . import schema
from .stats import bh_adjust

# ----------------------------------------------------------------------------- vocabulary
DEFAULT_CONDITIONS = ("NAIVE", "IBR_EARLY", "IBR_RES", "VEN_RES")  # simulator's; NAIVE first

# cell type -> (lineage, share of cells, marker genes); names as in the team contract
CELL_TYPES: dict[str, tuple[str, float, tuple[str, ...]]] = {
    "CLL resting": (
        "B/CLL",
        0.36,
        (
            "CD19",
            "MS4A1",
            "CD79A",
            "CD79B",
            "CD5",
            "ROR1",
            "FCER2",
            "BCL2",
            "CD27",
            "CXCR4",
            "IGHM",
            "TCL1A",
            "LEF1",
            "BTK",
        ),
    ),
    "CLL activated": (
        "B/CLL",
        0.08,
        (
            "CD19",
            "CD79A",
            "CD5",
            "ROR1",
            "BCL2",
            "CD83",
            "CD69",
            "EGR1",
            "NFKBIA",
            "MYC",
            "CCL3",
            "CCL4",
        ),
    ),
    "CLL proliferating": (
        "B/CLL",
        0.02,
        ("CD19", "CD79A", "CD5", "MKI67", "TOP2A", "PCNA", "TYMS", "CCNB1"),
    ),
    "Normal B": (
        "B/CLL",
        0.03,
        ("CD19", "MS4A1", "CD79A", "CD79B", "CD22", "PAX5", "BANK1", "IGHD"),
    ),
    "Plasma cell": ("B/CLL", 0.01, ("MZB1", "JCHAIN", "XBP1", "SDC1", "PRDM1", "IGHG1")),
    "CD4 naive": ("T/NK", 0.08, ("CD3E", "CD3D", "CD4", "CCR7", "SELL", "LEF1", "TCF7", "IL7R")),
    "CD4 Tfh": (
        "T/NK",
        0.04,
        ("CD3E", "CD3D", "CD4", "CXCR5", "PDCD1", "ICOS", "CD40LG", "CXCL13"),
    ),
    "CD4 Treg": ("T/NK", 0.025, ("CD3E", "CD4", "FOXP3", "IL2RA", "CTLA4", "IKZF2", "TIGIT")),
    "CD8 effector": (
        "T/NK",
        0.05,
        ("CD3E", "CD3D", "CD8A", "CD8B", "GZMB", "GZMK", "PRF1", "NKG7", "CCL5"),
    ),
    "CD8 exhausted": (
        "T/NK",
        0.03,
        ("CD3E", "CD8A", "PDCD1", "HAVCR2", "LAG3", "TOX", "TIGIT", "CXCL13"),
    ),
    "NK": ("T/NK", 0.04, ("NKG7", "GNLY", "KLRD1", "NCAM1", "FCGR3A", "PRF1", "KLRF1")),
    "Classical monocyte": (
        "Myeloid",
        0.07,
        ("LYZ", "CD14", "S100A8", "S100A9", "VCAN", "FCN1", "CSF1R"),
    ),
    "Non-classical monocyte": ("Myeloid", 0.02, ("FCGR3A", "MS4A7", "CDKN1C", "LYZ", "CX3CR1")),
    "NLC": (
        "Myeloid",
        0.02,
        ("CD68", "CD163", "MRC1", "APOE", "C1QA", "C1QB", "CXCL12", "CD14", "LYZ", "TNFSF13B"),
    ),
    "cDC": ("Myeloid", 0.01, ("CLEC10A", "CD1C", "FCER1A", "ITGAX", "HLA-DQA1")),
    "pDC": ("Myeloid", 0.005, ("LILRA4", "IL3RA", "CLEC4C", "IRF7", "TCF4")),
    "Platelet": ("Other", 0.01, ("PPBP", "PF4", "GP9", "ITGA2B", "TUBB1")),
    "Stromal": ("Stromal", 0.005, ("COL1A1", "COL1A2", "PDGFRB", "CXCL12", "VCAM1", "LEPR")),
    "Endothelial": ("Stromal", 0.005, ("PECAM1", "VWF", "CDH5", "KDR", "CLDN5")),
}
CLL_TYPES = ("CLL resting", "CLL activated", "CLL proliferating")
UNASSIGNED_SHARE = 0.01

PROGRAMS: dict[str, tuple[str, ...]] = {
    "bcr_signaling": ("CD79A", "CD79B", "BTK", "SYK", "LYN", "BLK", "PLCG2", "CD19"),
    "nfkb": ("NFKBIA", "REL", "RELB", "NFKB1", "NFKB2", "TNFAIP3", "BIRC3", "CD83"),
    "bcl2_family": ("BCL2", "MCL1", "BCL2L1", "BCL2A1", "BAX", "BAK1"),
    "proliferation": ("MKI67", "TOP2A", "PCNA", "MCM2", "TYMS", "CCNB1"),
    "exhaustion": ("PDCD1", "HAVCR2", "LAG3", "TOX", "TIGIT", "CTLA4"),
    "proteasome": ("PSMB5", "PSMB8", "PSMB9", "PSMA1", "PSMD1"),
    "chemokine_homing": ("CXCR4", "CXCR5", "CCR7", "CXCL12", "CXCL13", "CCL3", "CCL4"),
    "interferon": ("ISG15", "IFI6", "IFIT1", "IFIT3", "MX1", "STAT1"),
}

# condition -> gene -> detection-rate multiplier in CLL cells
CONDITION_EFFECTS: dict[str, dict[str, float]] = {
    "IBR_EARLY": {"CXCR4": 1.8, "CD69": 0.6, "EGR1": 0.6, "MKI67": 0.5},
    "IBR_RES": {"CXCR4": 2.5, "PLCG2": 2.0, "BTK": 1.8, "CD5": 0.7, "MKI67": 2.5},
    "VEN_RES": {
        "MCL1": 3.0,
        "BCL2L1": 3.0,
        "BCL2A1": 2.5,
        "BCL2": 0.6,
        "NFKBIA": 2.0,
        "PSMB5": 1.8,
    },
}

EXTRA_GENES = (
    "PTPRC",
    "B2M",
    "ACTB",
    "GAPDH",
    "MALAT1",
    "HLA-A",
    "HLA-B",
    "HLA-DRA",
    "HLA-DRB1",
    "CD74",
    "CD44",
    "CD40",
    "CD40LG",
    "CD38",
    "CD69",
    "CD86",
    "CD80",
    "CD83",
    "ITGA4",
    "SYK",
    "LYN",
    "BLK",
    "PLCG2",
    "NFKBIA",
    "REL",
    "RELB",
    "NFKB1",
    "NFKB2",
    "TNFAIP3",
    "BIRC3",
    "MCL1",
    "BCL2L1",
    "BCL2A1",
    "BAX",
    "BAK1",
    "MKI67",
    "TOP2A",
    "PCNA",
    "MCM2",
    "TYMS",
    "CCNB1",
    "PSMB5",
    "PSMB8",
    "PSMB9",
    "PSMA1",
    "PSMD1",
    "CXCR5",
    "CCL3",
    "CCL4",
    "CCL19",
    "CCL21",
    "ISG15",
    "IFI6",
    "IFIT1",
    "IFIT3",
    "MX1",
    "STAT1",
    "CD59",
    "CD55",
    "MIF",
    "TNFSF13",
    "TNFRSF13B",
    "TNFRSF13C",
    "TNFRSF17",
    "IL10",
    "IL6",
    "TGFB1",
    "IFNG",
    "TNF",
    "ZAP70",
    "MYC",
    "TP53",
    "ATM",
    "SF3B1",
    "NOTCH1",
    "EGR1",
    "EGR2",
    "FOS",
    "JUN",
    "JUNB",
    "DUSP1",
    "KLF2",
    "S1PR1",
    "ENTPD1",
    "NT5E",
    "CD274",
    "PDCD1LG2",
    "SPP1",
    "MT-CO1",
    "MT-CO2",
    "MT-ND1",
    "MT-ND4",
    "MT-CYB",
    "MT-ATP6",
    "RPL13",
    "RPS27",
)


def human_genes(n_genes: int) -> list[str]:
    """``n_genes`` unique, real human gene symbols (markers first), padded if needed."""
    seen: dict[str, None] = {}
    for _, _, markers in CELL_TYPES.values():
        seen.update(dict.fromkeys(markers))
    for genes in PROGRAMS.values():
        seen.update(dict.fromkeys(genes))
    for genes in CONDITION_EFFECTS.values():
        seen.update(dict.fromkeys(genes))
    seen.update(dict.fromkeys(EXTRA_GENES))
    for a, b in _lr_pairs():
        seen.update(dict.fromkeys(a.split("_") + b.split("_")))
    genes = list(seen)[:n_genes]
    k = 0
    while len(genes) < n_genes:
        name = f"LOC{100000 + k}"
        k += 1
        if name not in seen:
            genes.append(name)
    return genes


def mouse_symbol(gene: str) -> str:
    """Human symbol -> mouse-style symbol (``CD5`` -> ``Cd5``, ``MT-CO1`` -> ``mt-Co1``)."""
    if gene.startswith("MT-"):
        return "mt-" + gene[3:].capitalize()
    return gene[:1] + gene[1:].lower()


_LR_CACHE: list[tuple[str, str]] | None = None
_FALLBACK_LR = (
    ("CXCL12", "CXCR4"),
    ("CD40LG", "CD40"),
    ("TNFSF13B", "TNFRSF13C"),
    ("TNFSF13B", "TNFRSF13B"),
    ("TNFSF13", "TNFRSF17"),
    ("MIF", "CD74"),
    ("MIF", "CXCR4"),
    ("CCL3", "CCR1"),
    ("CCL4", "CCR5"),
    ("CXCL13", "CXCR5"),
    ("CCL19", "CCR7"),
    ("CCL21", "CCR7"),
    ("CD274", "PDCD1"),
    ("IL10", "IL10RA"),
    ("TGFB1", "TGFBR2"),
    ("SPP1", "CD44"),
    ("VCAM1", "ITGA4"),
    ("CD86", "CTLA4"),
    ("CD80", "CD28"),
    ("IFNG", "IFNGR1"),
    ("TNF", "TNFRSF1A"),
    ("IL6", "IL6R"),
)


def _lr_pairs() -> list[tuple[str, str]]:
    """Ligand-receptor pairs: liana's shipped consensus resource, else a curated few."""
    global _LR_CACHE
    if _LR_CACHE is None:
        pairs = list(_FALLBACK_LR)
        try:
            import importlib.util

            spec = importlib.util.find_spec("liana")  # locates, does not import, liana
            f = Path(list(spec.submodule_search_locations)[0]) / "resource/omni_resource.csv"
            df = pd.read_csv(f, usecols=["source_genesymbol", "target_genesymbol", "resource"])
            df = df[df["resource"] == "consensus"]
            seen = set(pairs)
            for a, b in zip(df["source_genesymbol"], df["target_genesymbol"]):
                if (a, b) not in seen:
                    seen.add((a, b))
                    pairs.append((str(a), str(b)))
        except Exception:  # noqa: BLE001 - liana absent or its layout changed
            pass
        _LR_CACHE = pairs
    return _LR_CACHE


# ----------------------------------------------------------------------------- generator
def make_synthetic_adata(
    *,
    n_cells: int = 20_000,
    n_genes: int = 2_000,
    n_patients: int = 4,
    conditions: Sequence[str] = DEFAULT_CONDITIONS,
    species: str = "human",
    density: float = 0.08,
    seed: int = 0,
    chunk_size: int = 10_000,
    tables: bool = True,
):
    """A schema-complete synthetic atlas AnnData (X log-normalised CSR; counts layer).

    Samples are patients x conditions (``P1_NAIVE``, ...). ``density`` is the mean
    fraction of genes detected per cell. X and ``layers["counts"]`` share their sparsity
    structure (the same ``indices`` / ``indptr`` arrays).
    """
    import anndata as ad
    from scipy import sparse

    if n_cells < 1 or n_genes < 10:
        raise ValueError("need n_cells >= 1 and n_genes >= 10")
    if species not in schema.SPECIES:
        raise ValueError(f"species: one of {schema.SPECIES}")
    rng = np.random.default_rng(seed)
    conditions = [str(c) for c in conditions]
    human = human_genes(n_genes)
    gene_names = human if species == "human" else [mouse_symbol(g) for g in human]
    gpos = {g: i for i, g in enumerate(human)}

    # ---- cells: samples, cell types
    patients = [f"P{i + 1}" for i in range(n_patients)]
    samples = [(f"{p}_{c}", p, c) for p in patients for c in conditions]
    n_samples = len(samples)
    sample_code = np.sort(rng.integers(0, n_samples, n_cells)).astype(np.int32)
    types = list(CELL_TYPES) + [schema.UNASSIGNED]
    shares = np.array([v[1] for v in CELL_TYPES.values()] + [UNASSIGNED_SHARE])
    # composition shifts by condition: more CLL under ibrutinib resistance, fewer T cells
    cond_of_sample = np.array([conditions.index(s[2]) for s in samples])
    type_code = np.empty(n_cells, dtype=np.int16)
    for s in range(n_samples):
        idx = np.flatnonzero(sample_code == s)
        p = shares.copy()
        ci = cond_of_sample[s]
        p[0] *= 1.0 + 0.15 * ci
        p[types.index("NLC")] *= 1.0 + 0.5 * (ci == 2)
        p[types.index("CD8 exhausted")] *= 1.0 + 0.8 * (ci == 3)
        p[types.index("CLL proliferating")] *= 1.0 + 1.0 * (ci == 2) - 0.5 * (ci == 1)
        p *= rng.uniform(0.8, 1.25, len(p))
        p /= p.sum()
        type_code[idx] = rng.choice(len(types), size=len(idx), p=p)

    # ---- detection probability per cell type x gene
    n_types = len(types)
    base_mu = rng.lognormal(mean=-3.0, sigma=1.3, size=n_genes)
    q = np.tile(1.0 - np.exp(-base_mu), (n_types, 1))
    for t, name in enumerate(types[:-1]):
        for g in CELL_TYPES[name][2]:
            if g in gpos:
                q[t, gpos[g]] = rng.uniform(0.6, 0.9)
    for g in ("MALAT1", "B2M", "ACTB", "PTPRC"):
        if g in gpos:
            q[:, gpos[g]] = 0.95
    q *= density / q.mean()
    q = np.clip(q, 0.0, 0.97).astype(np.float32)
    # counts given detection: geometric, heavier for abundant genes
    p_geom = np.clip(1.0 / (1.0 + 3.0 * base_mu), 0.15, 0.95)
    cll = [types.index(t) for t in CLL_TYPES]
    effects = np.ones((len(conditions), n_genes), dtype=np.float32)
    for c, cond in enumerate(conditions):
        for g, f in CONDITION_EFFECTS.get(cond, {}).items():
            if g in gpos:
                effects[c, gpos[g]] = f
    # threshold table (uint16) per (cell type, condition, depth bin) x gene: one gather
    # and one comparison with random uint16 per chunk, no float work per matrix element
    n_cond, n_bins = len(conditions), 8
    levels = np.exp(np.linspace(-0.4, 0.4, n_bins))
    thr = q[:, None, None, :] * levels[None, None, :, None]
    thr = np.repeat(thr, n_cond, axis=1)
    thr[cll] = thr[cll] * effects[None, :, None, :]
    thr = np.clip(thr, 0.0, 0.97) * 65536.0
    table = thr.reshape(n_types * n_cond * n_bins, n_genes).astype(np.uint16)
    del thr
    combo = (
        (type_code.astype(np.int64) * n_cond + cond_of_sample[sample_code]) * n_bins
        + rng.integers(0, n_bins, n_cells)
    ).astype(np.int32)
    log1m_p = np.log1p(-p_geom).astype(np.float32)
    fast = np.random.Generator(np.random.SFC64(seed + 1))  # bulk uniform bits

    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    idx_parts: list[np.ndarray] = []
    cnt_parts: list[np.ndarray] = []
    for a in range(0, n_cells, chunk_size):
        b = min(a + chunk_size, n_cells)
        m = b - a
        k = m * n_genes
        u = fast.integers(0, 2**64 - 1, (k + 3) // 4, dtype=np.uint64, endpoint=True)
        u = u.view(np.uint16)[:k]
        flat = np.flatnonzero(u < table[combo[a:b]].ravel())
        del u
        rows = flat // n_genes
        cols = (flat - rows * n_genes).astype(np.int32)
        indptr[a + 1 : b + 1] = np.bincount(rows, minlength=m)
        idx_parts.append(cols)
        # geometric counts (>= 1) by inversion: 1 + floor(log(U) / log(1 - p))
        uu = fast.random(len(cols), dtype=np.float32)
        np.maximum(uu, np.float32(1e-7), out=uu)
        cnt = np.floor(np.log(uu) / log1m_p[cols]) + 1
        cnt_parts.append(cnt.astype(np.float32))
    np.cumsum(indptr, out=indptr)
    indices = np.concatenate(idx_parts)
    counts_data = np.concatenate(cnt_parts)
    del idx_parts, cnt_parts
    row_nnz = np.diff(indptr)
    total = np.add.reduceat(counts_data, indptr[:-1]) if len(counts_data) else np.zeros(n_cells)
    total = np.where(row_nnz > 0, total, 0).astype(np.float64)
    scale = np.repeat((1e4 / np.maximum(total, 1)).astype(np.float32), row_nnz)
    x_data = np.log1p(counts_data * scale).astype(np.float32)
    del scale
    counts = sparse.csr_matrix((counts_data, indices, indptr), shape=(n_cells, n_genes))
    X = sparse.csr_matrix((x_data, indices, indptr), shape=(n_cells, n_genes))

    # ---- obs
    is_cll = np.isin(type_code, cll)
    mito = np.array([g.upper().startswith("MT-") for g in gene_names])
    mt_counts = counts @ mito.astype(np.float32)  # sparse mat-vec, O(nnz)
    sample_ids = pd.Categorical.from_codes(sample_code, categories=[s[0] for s in samples])
    barcodes = _barcodes(n_cells, rng)
    obs_names = np.char.add(np.char.add(np.asarray(sample_ids.astype(str)), ":"), barcodes)
    patient_of = np.array([patients.index(s[1]) for s in samples])
    type_cat = pd.Categorical.from_codes(type_code, categories=types)
    lineage_of = {t: v[0] for t, v in CELL_TYPES.items()} | {schema.UNASSIGNED: "Other"}
    lineages = list(dict.fromkeys(lineage_of.values()))
    lin_code = np.array([lineages.index(lineage_of[t]) for t in types])[type_code]
    n_leiden = np.array([2 if t in CLL_TYPES else 1 for t in types])
    leiden_base = np.concatenate([[0], np.cumsum(n_leiden)[:-1]])
    leiden_code = leiden_base[type_code] + (rng.random(n_cells) * n_leiden[type_code]).astype(int)
    n_clusters = int(n_leiden.sum())
    doublet_score = rng.beta(1.5, 12, n_cells).astype(np.float32)
    tissue_cats = ["PB", "LN"]
    tissue_code = (patient_of[sample_code] % 3 == 2).astype(int)  # every 3rd patient LN
    obs = pd.DataFrame(
        {
            schema.OBS_SAMPLE: sample_ids,
            schema.OBS_PATIENT: pd.Categorical.from_codes(patient_of[sample_code], patients),
            schema.OBS_CONDITION: pd.Categorical.from_codes(
                cond_of_sample[sample_code], conditions
            ),
            schema.OBS_TISSUE: pd.Categorical.from_codes(tissue_code, tissue_cats),
            schema.OBS_SPECIES: pd.Categorical.from_codes(np.zeros(n_cells, int), [species]),
            schema.OBS_BARCODE: pd.Categorical(barcodes),
            schema.OBS_TOTAL_COUNTS: total.astype(np.float32),
            schema.OBS_N_GENES: row_nnz.astype(np.int32),
            schema.OBS_PCT_MITO: (100 * mt_counts / np.maximum(total, 1)).astype(np.float32),
            schema.OBS_QC_OUTLIER: np.zeros(n_cells, dtype=bool),
            schema.OBS_QC_REASON: pd.Categorical.from_codes(np.zeros(n_cells, int), [""]),
            schema.OBS_DOUBLET_SCORE: doublet_score,
            schema.OBS_PREDICTED_DOUBLET: doublet_score > 0.35,
            schema.OBS_QC_PASS: np.ones(n_cells, dtype=bool),
            schema.OBS_LEIDEN: pd.Categorical.from_codes(
                leiden_code, [str(i) for i in range(n_clusters)]
            ),
            schema.leiden_key(0.5): pd.Categorical.from_codes(
                type_code.astype(int), [str(i) for i in range(n_types)]
            ),
            schema.OBS_CELL_TYPE: type_cat,
            schema.OBS_CELL_TYPE_CONFIDENCE: np.where(
                type_code == n_types - 1, rng.uniform(0, 0.1, n_cells), rng.beta(8, 2, n_cells)
            ).astype(np.float32),
            schema.OBS_LINEAGE: pd.Categorical.from_codes(lin_code, lineages),
            schema.OBS_DOUBLET_CLUSTER: np.zeros(n_cells, dtype=bool),
        },
        index=pd.Index(obs_names.astype(object)),
    )
    _add_malignant_obs(obs, is_cll, types, type_code, seed)
    for k, prog in enumerate(PROGRAMS):
        base = rng.normal(0, 0.3, n_types)[type_code]
        cond = cond_of_sample[sample_code]
        shift = 0.25 * (cond == (k % max(len(conditions), 1))) * is_cll
        obs[schema.score_key(prog)] = (base + shift + rng.normal(0, 0.15, n_cells)).astype(
            np.float32
        )

    # ---- var
    var = pd.DataFrame(
        {
            schema.VAR_GENE_ID: [
                f"ENS{'MUS' if species == 'mouse' else ''}G{i:011d}" for i in range(n_genes)
            ],
            schema.VAR_FEATURE_TYPE: pd.Categorical(["Gene Expression"] * n_genes),
            schema.VAR_HVG: rng.random(n_genes) < 0.5,
            schema.VAR_EXCLUDED_HVG: mito,
        },
        index=pd.Index(gene_names),
    )

    # ---- embeddings: type centres + condition shifts + noise
    ang = 2 * np.pi * np.arange(n_types) / n_types
    centres = np.c_[8 * np.cos(ang), 8 * np.sin(ang)]
    umap = centres[type_code] + rng.normal(0, 0.9, (n_cells, 2))
    umap[:, 0] += 0.4 * cond_of_sample[sample_code] * is_cll
    latent_centres = rng.normal(0, 2, (n_types, 10))
    scvi = latent_centres[type_code] + rng.normal(0, 0.5, (n_cells, 10))
    pca = np.c_[scvi, rng.normal(0, 0.5, (n_cells, 10))]
    pca[:, :3] += rng.normal(0, 1.5, (n_samples, 3))[sample_code]  # uncorrected batch
    obsm = {
        schema.OBSM_UMAP: umap.astype(np.float32),
        schema.OBSM_SCVI: scvi.astype(np.float32),
        schema.OBSM_PCA: pca.astype(np.float32),
    }

    programs = {
        p: np.array(
            [g if species == "human" else mouse_symbol(g) for g in genes if g in gpos], dtype=object
        )
        for p, genes in PROGRAMS.items()
    }
    uns = {
        schema.UNS_CONDITION_ORDER: np.array(conditions, dtype=object),
        schema.UNS_REFERENCE_CONDITION: conditions[0],
        schema.UNS_SPECIES: species,
        schema.UNS_PROGRAMS: programs,
        schema.UNS_LEIDEN_RESOLUTIONS: np.array([0.5, 1.0]),
        schema.UNS_PROVENANCE: {
            "tool": "atlas.testing.make_synthetic_adata",
            "seed": int(seed),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": _versions(),
            "config": "{}",
        },
    }
    adata = ad.AnnData(
        X=X, obs=obs, var=var, obsm=obsm, layers={schema.LAYER_COUNTS: counts}, uns=uns
    )
    if tables:
        add_synthetic_tables(adata, rng=rng)
    return adata


def _barcodes(n: int, rng) -> np.ndarray:
    """10x-style barcodes ``ACGT...-1``, unique within the atlas (index-derived)."""
    alphabet = np.array(list("ACGT"))
    i = np.arange(n, dtype=np.int64)
    digits = [(i >> (2 * k)) & 3 for k in range(16)]
    letters = np.stack([alphabet[d] for d in digits[::-1]], axis=1)
    return np.char.add(letters.view("<U16").ravel(), "-1") if n else np.array([], dtype="<U18")


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("anndata", "scanpy", "numpy", "pandas", "scipy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:  # pragma: no cover
            out[pkg] = ""
    return out


# ----------------------------------------------------------------------------- tables
# Column lists of the result tables: the one definition in atlas.schema.
KEY_COLS = schema.LR_KEY_COLUMNS
LIANA_SCORES = schema.LIANA_SCORE_COLUMNS
TABLE_COLUMNS = schema.TABLE_COLUMNS
CURATED_PAIRS = {
    ("CXCL12", "CXCR4"): "Burger et al. 2000, nurse-like cells (PMID 10720094)",
    ("CD40LG", "CD40"): "Granziero et al. 2001 (PMID 11157488)",
    ("TNFSF13B", "TNFRSF13C"): "Nishio et al. 2005, BAFF from NLC (PMID 15827137)",
    ("MIF", "CD74"): "Binsky et al. 2007 (PMID 17709442)",
    ("CD274", "PDCD1"): "Brusa et al. 2013 (PMID 22960575)",
    ("CCL3", "CCR1"): "Burger et al. 2009 (PMID 19168783)",
}


def _frame(name: str, data: dict) -> pd.DataFrame:
    return pd.DataFrame(data)[TABLE_COLUMNS[name]]


SYNTHETIC_IGHV = ("IGHV1-69", "IGHV3-23", "IGHV4-34", "IGHV3-21", "IGHV1-2")
SYNTHETIC_LESIONS = (  # lesion, chromosome, start, end, kind (hg38, references/cll_lesions.csv)
    ("del(13q14)", "13", 48_300_000, 51_600_000, "loss"),
    ("trisomy 12", "12", 1, 133_275_309, "gain"),
    ("del(11q22)", "11", 102_000_000, 112_000_000, "loss"),
    ("del(17p13)", "17", 1, 10_700_000, "loss"),
)


def _add_malignant_obs(obs: pd.DataFrame, is_cll, types, type_code, seed: int) -> None:
    """The malignant stage's columns: CLL cells malignant, in their patient's clone; other B
    cells polyclonal (random V genes); CNV score higher in malignant cells. Its own
    random stream, so the other columns do not change."""
    rng = np.random.default_rng(seed + 7919)
    n = len(obs)
    is_b = np.isin(np.asarray(types)[type_code], ["Normal B", "Plasma cell"]) | is_cll
    pat = obs[schema.OBS_PATIENT].astype(str).to_numpy()
    pats = sorted(set(pat))
    dom = {p: f"{SYNTHETIC_IGHV[i % len(SYNTHETIC_IGHV)]}|IGKV1-5" for i, p in enumerate(pats)}
    clon = np.full(n, "", dtype=object)
    clon[is_cll] = [dom[p] for p in pat[is_cll]]
    poly = is_b & ~is_cll
    clon[poly] = [f"IGHV{rng.integers(1, 7)}-{rng.integers(1, 70)}|IGLV{rng.integers(1, 9)}-{rng.integers(1, 50)}" for _ in range(int(poly.sum()))]  # fmt: skip
    obs[schema.OBS_MALIGNANT] = is_cll.copy()
    conf = np.where(is_b, rng.beta(9, 1.5, n), np.nan)
    obs[schema.OBS_MALIGNANT_CONFIDENCE] = conf.astype(np.float32)
    ev = np.where(
        is_cll, "v_genes+;programme+", np.where(is_b, "v_genes-;programme-", "not B lineage")
    )
    obs[schema.OBS_MALIGNANT_EVIDENCE] = pd.Categorical(ev)
    cnv = np.abs(rng.normal(0.02, 0.008, n)) + 0.03 * is_cll
    obs[schema.OBS_CNV_SCORE] = cnv.astype(np.float32)
    obs[schema.OBS_CLONOTYPE] = pd.Categorical(clon.astype(str))
    src = np.where(clon != "", "expression", "")
    obs[schema.OBS_CLONOTYPE_SOURCE] = pd.Categorical(src)
    obs[schema.OBS_IN_DOMINANT_CLONE] = is_cll.copy()
    prog = np.where(is_b, rng.normal(0, 0.3, n) + 0.8 * is_cll, np.nan)
    obs[schema.OBS_CLL_PROGRAMME] = prog.astype(np.float32)


def _malignant_tables(adata, rng) -> dict[str, pd.DataFrame]:
    """Lesion, clone and CNV-profile tables consistent with :func:`_add_malignant_obs`."""
    obs = adata.obs
    pat = obs[schema.OBS_PATIENT].astype(str).to_numpy()
    mal = obs[schema.OBS_MALIGNANT].to_numpy(dtype=bool)
    is_b = obs[schema.OBS_CLONOTYPE].astype(str).to_numpy() != ""
    pats = sorted(set(pat))
    lesion_rows, clone_rows, prof = [], [], []
    windows = []
    for chrom in [str(c) for c in range(1, 23)]:
        for k in range(8):
            windows.append((chrom, k * 10_000_000 + 1, (k + 1) * 10_000_000))
    for i, p in enumerate(pats):
        n_b = int((is_b & (pat == p)).sum())
        n_mal = int((mal & (pat == p)).sum())
        carried = {SYNTHETIC_LESIONS[i % len(SYNTHETIC_LESIONS)][0]} if i % 3 != 2 else set()
        for name, chrom, start, end, kind in SYNTHETIC_LESIONS:
            called = name in carried
            fm = float(rng.uniform(0.6, 0.95)) if called else float(rng.uniform(0, 0.05))
            lesion_rows.append(
                {schema.OBS_PATIENT: p, "lesion": name, "chromosome": chrom, "start": start,
                 "end": end, "kind": kind, "called": called, "frac_b_cells": fm * 0.8,
                 "frac_malignant": fm, "frac_reference": float(rng.uniform(0, 0.05)),
                 "n_b_cells": n_b, "recurrent": True}
            )  # fmt: skip
        ighv = SYNTHETIC_IGHV[i % len(SYNTHETIC_IGHV)]
        ident = float(rng.uniform(90, 100))
        clone_rows.append(
            {schema.OBS_PATIENT: p, "source": "expression", "clonotype": f"{ighv}|IGKV1-5",
             "ighv": ighv, "light_v": "IGKV1-5", "ighv_identity": ident,
             "ighv_status": "M-CLL" if ident < 98 else "U-CLL", "n_b_cells": n_b,
             "n_typed": n_b, "clone_fraction": n_mal / max(n_b, 1), "clonal": n_mal > 0,
             "n_malignant": n_mal}
        )  # fmt: skip
        for group, shift in (("malignant", 1.0), ("normal B", 0.0), ("reference", 0.0)):
            mean = rng.normal(0, 0.01, len(windows))
            for name, chrom, start, end, kind in SYNTHETIC_LESIONS:
                if name in carried:
                    hit = [w[0] == chrom and w[2] >= start and w[1] <= end for w in windows]
                    mean[np.asarray(hit)] += shift * (0.08 if kind == "gain" else -0.08)
            prof.append(
                pd.DataFrame(
                    {schema.OBS_PATIENT: p, "group": group, "window": np.arange(len(windows)),
                     "chromosome": [w[0] for w in windows], "start": [w[1] for w in windows],
                     "end": [w[2] for w in windows], "mean": mean}
                )
            )  # fmt: skip
    return {
        schema.TABLE_LESIONS: pd.DataFrame(lesion_rows)[TABLE_COLUMNS[schema.TABLE_LESIONS]],
        schema.TABLE_CLONES: pd.DataFrame(clone_rows)[TABLE_COLUMNS[schema.TABLE_CLONES]],
        schema.TABLE_CNV_PROFILE: pd.concat(prof, ignore_index=True)[
            TABLE_COLUMNS[schema.TABLE_CNV_PROFILE]
        ],
    }


def add_synthetic_tables(adata, *, rng=None) -> None:
    """Every result table the build writes, with the builders' columns and plausible values."""
    from .tables import put_table

    rng = np.random.default_rng(0) if rng is None else rng
    obs = adata.obs
    conditions = [str(c) for c in adata.uns[schema.UNS_CONDITION_ORDER]]
    reference = str(adata.uns[schema.UNS_REFERENCE_CONDITION])
    contrasts = [c for c in conditions if c != reference]
    genes = adata.var_names.tolist()
    types = [str(t) for t in obs[schema.OBS_CELL_TYPE].cat.categories]
    samples = (
        obs[[schema.OBS_SAMPLE, schema.OBS_PATIENT, schema.OBS_CONDITION]]
        .drop_duplicates(schema.OBS_SAMPLE)
        .astype(str)
        .reset_index(drop=True)
    )
    n_samples_of = samples[schema.OBS_CONDITION].value_counts()
    n_ref = int(n_samples_of.get(reference, 0))

    def n_cond(c):
        return int(n_samples_of.get(c, 0))

    # proportions (observed counts)
    counts = (
        obs.groupby([schema.OBS_SAMPLE, schema.OBS_CELL_TYPE], observed=False)
        .size()
        .rename("n")
        .reset_index()
    )
    counts[schema.OBS_SAMPLE] = counts[schema.OBS_SAMPLE].astype(str)
    counts[schema.OBS_CELL_TYPE] = counts[schema.OBS_CELL_TYPE].astype(str)
    counts["n_total"] = counts.groupby(schema.OBS_SAMPLE)["n"].transform("sum").astype(np.int64)
    counts["prop"] = counts["n"] / counts["n_total"].clip(lower=1)
    counts = counts.merge(samples, on=schema.OBS_SAMPLE, how="inner")
    counts["n"] = counts["n"].astype(np.int64)
    counts = counts.rename(columns={"n": "n_cells"})
    proportions = counts[TABLE_COLUMNS[schema.TABLE_PROPORTIONS]]
    put_table(adata, schema.TABLE_PROPORTIONS, proportions)

    # composition: condition vs reference on mean proportions
    mean_prop = proportions.groupby([schema.OBS_CONDITION, schema.OBS_CELL_TYPE])["prop"].mean()
    ct, cc = np.meshgrid(np.arange(len(types)), np.arange(len(contrasts)), indexing="ij")
    ct, cc = ct.ravel(), cc.ravel()
    mp = np.array([mean_prop.get((contrasts[c], types[t]), 0.0) for t, c in zip(ct, cc)])
    mr = np.array([mean_prop.get((reference, types[t]), 0.0) for t in ct])
    lfc = np.log2((mp + 1e-3) / (mr + 1e-3))
    pval = np.clip(np.exp(-np.abs(lfc) * 3) * rng.uniform(0.5, 1, len(lfc)), 1e-12, 1)
    comp = _frame(
        schema.TABLE_COMPOSITION,
        {
            schema.COL_CELL_TYPE: [types[t] for t in ct],
            schema.COL_CONDITION: [contrasts[c] for c in cc],
            schema.COL_REFERENCE: reference,
            "mean_prop": mp,
            "mean_prop_ref": mr,
            schema.COL_LOG2FC: lfc,
            schema.COL_PVALUE: pval,
            schema.COL_PADJ: bh_adjust(pval),
            "n_samples": [n_cond(contrasts[c]) + n_ref for c in cc],
            "n_samples_cond": [n_cond(contrasts[c]) for c in cc],
            "n_samples_ref": n_ref,
            "t": lfc * 2.0,
            "paired": True,
            "compartment": [
                "malignant" if types[t].startswith(schema.CLL_LABEL_PREFIX) else "tme" for t in ct
            ],
        },
    )
    put_table(adata, schema.TABLE_COMPOSITION, comp)

    # DE (pseudobulk-like): 200 genes per cell type x contrast for 8 cell types
    frames = []
    n_de = min(200, len(genes))
    for t in [t for t in types if t != schema.UNASSIGNED][:8]:
        for c in contrasts:
            pick = rng.choice(len(genes), n_de, replace=False)
            lfc = rng.normal(0, 0.8, n_de)
            pval = np.clip(np.exp(-np.abs(lfc) * 4) * rng.uniform(0.2, 1, n_de), 1e-30, 1)
            frames.append(
                _frame(
                    schema.TABLE_DE,
                    {
                        schema.COL_CELL_TYPE: t,
                        schema.COL_GENE: [genes[i] for i in pick],
                        schema.COL_CONDITION: c,
                        schema.COL_REFERENCE: reference,
                        schema.COL_LOG2FC: lfc,
                        "lfcse": rng.uniform(0.1, 0.5, n_de),
                        schema.COL_PVALUE: pval,
                        schema.COL_PADJ: bh_adjust(pval),
                        "base_mean": rng.lognormal(3, 1, n_de),
                        "n_samples_cond": n_cond(c),
                        "n_samples_ref": n_ref,
                        "paired": True,
                    },
                )
            )
    put_table(adata, schema.TABLE_DE, pd.concat(frames, ignore_index=True))

    # programmes: mean score per cell type x condition vs reference
    frames = []
    for p in adata.uns.get(schema.UNS_PROGRAMS, {}):
        col = schema.score_key(p)
        if col not in obs.columns:
            continue
        means = obs.groupby([schema.OBS_CELL_TYPE, schema.OBS_CONDITION], observed=True)[col].mean()
        m = np.array([means.get((types[t], contrasts[c]), np.nan) for t, c in zip(ct, cc)])
        r = np.array([means.get((types[t], reference), np.nan) for t in ct])
        diff = m - r
        pval = np.clip(np.nan_to_num(np.exp(-np.abs(diff) * 20), nan=1.0), 1e-12, 1)
        frames.append(
            _frame(
                schema.TABLE_PROGRAMS,
                {
                    schema.COL_CELL_TYPE: [types[t] for t in ct],
                    "program": p,
                    schema.COL_CONDITION: [contrasts[c] for c in cc],
                    schema.COL_REFERENCE: reference,
                    "mean": m,
                    "mean_ref": r,
                    "diff": diff,
                    schema.COL_PVALUE: pval,
                    schema.COL_PADJ: pval,
                    "n_samples": [n_cond(contrasts[c]) + n_ref for c in cc],
                    "n_samples_cond": [n_cond(contrasts[c]) for c in cc],
                    "n_samples_ref": n_ref,
                    "paired": True,
                },
            )
        )
    prog = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=TABLE_COLUMNS[schema.TABLE_PROGRAMS])
    )
    if len(prog):
        prog[schema.COL_PADJ] = bh_adjust(prog[schema.COL_PVALUE].to_numpy())
    put_table(adata, schema.TABLE_PROGRAMS, prog)

    # interactions: 60 LR pairs x senders x receivers x conditions
    species = str(adata.uns.get(schema.UNS_SPECIES, "human"))
    conv = (lambda g: g) if species == "human" else mouse_symbol
    gene_set = set(genes)
    pairs = []
    for a, b in _lr_pairs():
        la, lb = "_".join(conv(x) for x in a.split("_")), "_".join(conv(x) for x in b.split("_"))
        if set(la.split("_")) | set(lb.split("_")) <= gene_set:
            pairs.append((la, lb, CURATED_PAIRS.get((a, b), "")))
        if len(pairs) >= 60:
            break
    senders = [t for t in types if t != schema.UNASSIGNED][:6]
    for t in ("NLC", "Stromal"):
        if t in types and t not in senders:
            senders.append(t)
    receivers = senders[:4]
    grid = [
        (c, s, r, lig, rec, src)
        for c in conditions
        for s in senders
        for r in receivers
        for lig, rec, src in pairs
    ]
    n = len(grid)
    cur_src = [g[5] for g in grid]
    lr_means = rng.lognormal(-1, 0.6, n)
    inter = _frame(
        schema.TABLE_INTERACTIONS,
        {
            schema.COL_CONDITION: [g[0] for g in grid],
            schema.COL_SOURCE: [g[1] for g in grid],
            schema.COL_TARGET: [g[2] for g in grid],
            schema.COL_LIGAND: [g[3] for g in grid],
            schema.COL_RECEPTOR: [g[4] for g in grid],
            "magnitude_rank": rng.uniform(0, 1, n),
            "specificity_rank": rng.uniform(0, 1, n),
            "lr_means": lr_means,
            "cellphone_pvals": rng.uniform(0, 1, n),
            "expr_prod": lr_means**2,
            "scaled_weight": rng.normal(0, 1, n),
            "lr_logfc": rng.normal(0, 1, n),
            "spec_weight": rng.uniform(0, 1, n),
            "lrscore": rng.uniform(0.3, 0.9, n),
            schema.COL_CURATED: [bool(x) for x in cur_src],
            "curated_source": cur_src,
        },
    )
    put_table(adata, schema.TABLE_INTERACTIONS, inter)

    top = inter[inter[schema.COL_CONDITION] == reference].nsmallest(100, "magnitude_rank")
    frames = []
    for _, srow in samples.iterrows():
        k = len(top)
        frames.append(
            _frame(
                schema.TABLE_INTERACTIONS_BY_SAMPLE,
                {
                    schema.OBS_SAMPLE: srow[schema.OBS_SAMPLE],
                    schema.OBS_PATIENT: srow[schema.OBS_PATIENT],
                    schema.COL_CONDITION: srow[schema.OBS_CONDITION],
                    **{c: top[c].to_numpy() for c in KEY_COLS},
                    "magnitude_rank": np.clip(
                        top["magnitude_rank"].to_numpy() * rng.uniform(0.5, 1.5, k), 0, 1
                    ),
                    "specificity_rank": rng.uniform(0, 1, k),
                    "lr_means": top["lr_means"].to_numpy() * rng.uniform(0.5, 1.5, k),
                    "lrscore": rng.uniform(0.3, 0.9, k),
                    schema.COL_CURATED: top[schema.COL_CURATED].to_numpy(),
                },
            )
        )
    put_table(adata, schema.TABLE_INTERACTIONS_BY_SAMPLE, pd.concat(frames, ignore_index=True))

    diff_src = inter[inter[schema.COL_CONDITION] != reference].reset_index(drop=True)
    k = len(diff_src)
    score = rng.normal(0, 1, k)
    pval = np.clip(2 * np.exp(-np.abs(score) * 1.5), 1e-12, 1)
    lig_lfc, rec_lfc = rng.normal(0, 0.7, k), rng.normal(0, 0.7, k)
    diff = _frame(
        schema.TABLE_INTERACTIONS_DIFF,
        {
            schema.COL_CONDITION: diff_src[schema.COL_CONDITION].to_numpy(),
            schema.COL_REFERENCE: reference,
            **{c: diff_src[c].to_numpy() for c in KEY_COLS},
            "ligand_log2fc": lig_lfc,
            "receptor_log2fc": rec_lfc,
            "ligand_log2fc_shrunk": 0.8 * lig_lfc,
            "receptor_log2fc_shrunk": 0.8 * rec_lfc,
            "score": score,
            "t": score * 2,
            schema.COL_PVALUE: pval,
            schema.COL_PADJ: bh_adjust(pval),
            "direction": np.where(score > 0, "up", np.where(score < 0, "down", "none")),
            "driver": rng.choice(["both", "ligand", "receptor", "none"], k),
            "called": (bh_adjust(pval) <= 0.05) & (np.abs(score) > 1),
            "pvalue_both": np.clip(pval * 3, 0, 1),
            "ligand_pvalue": rng.uniform(0, 1, k),
            "receptor_pvalue": rng.uniform(0, 1, k),
            "ligand_padj": rng.uniform(0, 1, k),
            "receptor_padj": rng.uniform(0, 1, k),
            "lr_means": rng.uniform(0.2, 2, k),
            "lr_means_ref": rng.uniform(0.2, 2, k),
            "n_samples": np.full(k, 8, dtype=np.int64),
            "paired": np.ones(k, dtype=bool),
            "source_frac": rng.uniform(0, 0.5, k),
            "source_frac_ref": rng.uniform(0, 0.5, k),
            "source_frac_log2fc": rng.normal(0, 0.5, k),
            "target_frac": rng.uniform(0, 0.5, k),
            "target_frac_ref": rng.uniform(0, 0.5, k),
            "target_frac_log2fc": rng.normal(0, 0.5, k),
            "ligand_gene": [g.split("_")[0] for g in diff_src[schema.COL_LIGAND]],
            "receptor_gene": [g.split("_")[0] for g in diff_src[schema.COL_RECEPTOR]],
            "ligand_prop": rng.uniform(0, 1, k),
            "receptor_prop": rng.uniform(0, 1, k),
            schema.COL_CURATED: diff_src[schema.COL_CURATED].to_numpy(),
            "curated_source": diff_src["curated_source"].to_numpy(),
        },
    )
    put_table(adata, schema.TABLE_INTERACTIONS_DIFF, diff)
    n_cond = len(conditions)
    agreement = _frame(
        schema.TABLE_LIGREC_AGREEMENT,
        {
            schema.COL_CONDITION: list(conditions),
            "n_compared": np.full(n_cond, len(inter) // max(n_cond, 1), dtype=np.int64),
            "n_sig_liana": rng.integers(50, 100, n_cond),
            "n_sig_squidpy": rng.integers(50, 100, n_cond),
            "n_sig_both": rng.integers(30, 50, n_cond),
            "jaccard": rng.uniform(0.6, 0.9, n_cond),
            "spearman_means": rng.uniform(0.9, 1.0, n_cond),
            "alpha": 0.05,
            "n_perms": 100,
        },
    )
    put_table(adata, schema.TABLE_LIGREC_AGREEMENT, agreement)

    # QC summary per sample (columns of preprocessing.qc.qc_summary)
    g = obs.groupby(obs[schema.OBS_SAMPLE].astype(str))
    med = g[[schema.OBS_TOTAL_COUNTS, schema.OBS_N_GENES, schema.OBS_PCT_MITO]].median()
    sid = samples[schema.OBS_SAMPLE]
    n_out = g.size().reindex(sid).to_numpy().astype(np.int64)
    flags = {
        r: rng.integers(0, 30, len(sid))
        for r in ("low_counts", "high_counts", "low_genes", "high_genes", "high_mito", "doublet")
    }
    n_low = flags["low_counts"] + flags["low_genes"] + flags["high_mito"]
    n_dbl = flags["doublet"]
    qc = _frame(
        schema.TABLE_QC_SUMMARY,
        {
            schema.OBS_SAMPLE: sid,
            "n_cells_in": n_out + n_low + n_dbl,
            "n_cells_out": n_out,
            "n_low_quality": n_low,
            "n_doublets": n_dbl,
            "median_counts": med[schema.OBS_TOTAL_COUNTS].reindex(sid).to_numpy(),
            "median_genes": med[schema.OBS_N_GENES].reindex(sid).to_numpy(),
            schema.OBS_PATIENT: samples[schema.OBS_PATIENT],
            schema.OBS_CONDITION: samples[schema.OBS_CONDITION],
            "n_removed": n_low + n_dbl,
            **{f"n_flag_{r}": v for r, v in flags.items()},
            "median_counts_before": med[schema.OBS_TOTAL_COUNTS].reindex(sid).to_numpy() * 0.97,
            "median_genes_before": med[schema.OBS_N_GENES].reindex(sid).to_numpy() * 0.97,
            "median_pct_mito_before": med[schema.OBS_PCT_MITO].reindex(sid).to_numpy() * 1.1,
            "median_pct_mito": med[schema.OBS_PCT_MITO].reindex(sid).to_numpy(),
            "doublet_threshold": 0.35,
            "expected_doublet_rate": 0.008,
        },
    )
    put_table(adata, schema.TABLE_QC_SUMMARY, qc)

    # integration metrics
    metrics = pd.DataFrame(
        [
            {"embedding": e, "metric": m, "value": v}
            for e, vals in (
                (schema.OBSM_PCA, (0.35, 0.82, 0.41)),
                (schema.OBSM_SCVI, (0.78, 0.85, 0.55)),
            )
            for m, v in zip(("ilisi_sample", "clisi_cell_type", "asw_cell_type"), vals)
        ]
    )
    put_table(adata, schema.TABLE_INTEGRATION_METRICS, metrics)

    # malignant call (own random stream: the tables above do not change)
    if schema.OBS_MALIGNANT in obs.columns:
        for name, df in _malignant_tables(adata, np.random.default_rng(7919)).items():
            put_table(adata, name, df)


def make_synthetic_atlas(
    out_dir: str | Path,
    *,
    n_cells: int = 20_000,
    n_genes: int = 2_000,
    seed: int = 0,
    species: str = "human",
    **kwargs,
) -> Path:
    """Write a synthetic atlas directory (``write_atlas``) and return its path.

    Keyword arguments go to :func:`make_synthetic_adata` (``seed``, ``species``,
    ``n_patients``, ``conditions``, ``density``, ...).
    """
    from .store import write_atlas

    adata = make_synthetic_adata(
        n_cells=n_cells, n_genes=n_genes, seed=seed, species=species, **kwargs
    )
    return write_atlas(adata, out_dir)


def make_synthetic_spatial(
    atlas_dir: str | Path,
    *,
    sections: dict[str, int] | None = None,
    conditions: Sequence[str] = ("NAIVE", "IBR_RES"),
    cell_types: Sequence[str] = (
        "CLL resting",
        "CLL proliferating",
        "CD4 Tfh",
        "NLC",
        "CD8 effector",
        "Classical monocyte",
    ),
    n_niches: int = 5,
    interactions: Sequence[str] = ("CXCL12^CXCR4", "CD40LG^CD40", "TNFSF13B^TNFRSF13C"),
    seed: int = 0,
) -> Path:
    """Synthetic results of ``tme-atlas spatial`` in ``atlas_dir/spatial`` (for the explorer's
    tests and benchmarks; the analysis itself is tested in ``tests/test_spatial.py``):
    ``sections`` maps section -> cells (sections alternate over ``conditions``). Returns the
    folder."""
    import json

    from .tables import csv_text

    rng = np.random.default_rng(seed)
    sections = sections or {"S1": 2000, "S2": 2000}
    out = Path(atlas_dir) / schema.SPATIAL_DIR
    (out / schema.TABLES_DIR).mkdir(parents=True, exist_ok=True)
    niches = [f"N{i + 1}" for i in range(n_niches)]
    parts, meta_rows = [], []
    for k, (sid, n) in enumerate(sections.items()):
        cond = conditions[k % len(conditions)]
        side = float(np.sqrt(n / 0.01))
        xy = rng.uniform(0, side, (n, 2)).astype(np.float32)
        niche = (np.floor(xy[:, 0] / side * n_niches)).astype(int).clip(0, n_niches - 1)
        t = (niche + rng.integers(0, 2, n)) % len(cell_types)
        parts.append(
            pd.DataFrame(
                {
                    schema.OBS_SAMPLE: sid,
                    schema.OBS_CONDITION: cond,
                    schema.OBS_SPATIAL_X: xy[:, 0],
                    schema.OBS_SPATIAL_Y: xy[:, 1],
                    schema.OBS_CELL_TYPE: np.asarray(cell_types)[t],
                    schema.OBS_CELL_TYPE_CONFIDENCE: rng.uniform(0.5, 1, n).astype(np.float32),
                    schema.OBS_NICHE: np.asarray(niches)[niche],
                }
            )
        )
        meta_rows.append((sid, f"P{k // len(conditions) + 1:02d}", cond))
    cells = pd.concat(parts, ignore_index=True)
    cells.index = pd.Index([f"{s}:{i}" for i, s in enumerate(cells[schema.OBS_SAMPLE])],
                           name="cell_id")  # fmt: skip
    for c in (schema.OBS_SAMPLE, schema.OBS_CONDITION, schema.OBS_CELL_TYPE, schema.OBS_NICHE):
        cells[c] = cells[c].astype("category")
    cells.to_parquet(out / schema.SPATIAL_CELLS_FILE)
    import scipy.sparse as sp

    genes = ["CXCL12", "CXCR4", "CD40"]
    expr = sp.random(len(cells), len(genes), density=0.3, format="csc", dtype=np.float32,
                     random_state=seed)  # fmt: skip
    expr.data *= 3
    for name, arr in zip(
        schema.SPATIAL_EXPR_FILES,
        (expr.data, expr.indices.astype(np.int32), expr.indptr.astype(np.int64)),
    ):
        np.save(out / name, arr)
    np.save(out / schema.SPATIAL_LR_LOCAL_FILE,
            rng.gamma(1.0, 0.1, (len(cells), len(interactions))).astype(np.float32))  # fmt: skip
    nh, props, comp = [], [], []
    for cond in ["all", *conditions]:
        for i, a in enumerate(cell_types):
            for b in cell_types[i:]:
                z = float(rng.normal(0, 3))
                nh.append((cond, a, b, z, z, len(sections), 0.01 if abs(z) > 4 else 0.5,
                           0.02 if abs(z) > 4 else 0.8))  # fmt: skip
    for sid, pat, cond in meta_rows:
        sub = cells[cells[schema.OBS_SAMPLE] == sid]
        vc = sub[schema.OBS_NICHE].value_counts()
        for nn in niches:
            props.append((sid, pat, cond, nn, int(vc.get(nn, 0)), vc.get(nn, 0) / len(sub)))
    ct = pd.crosstab(cells[schema.OBS_NICHE], cells[schema.OBS_CELL_TYPE])
    for nn in ct.index:
        for t in ct.columns:
            comp.append((nn, t, ct.loc[nn, t] / ct.loc[nn].sum(), int(ct.loc[nn, t])))
    cols = schema.SPATIAL_TABLE_COLUMNS
    tables = {
        schema.TABLE_NHOOD: pd.DataFrame(nh, columns=cols[schema.TABLE_NHOOD]),
        schema.TABLE_NICHE_PROPORTIONS: pd.DataFrame(
            props, columns=cols[schema.TABLE_NICHE_PROPORTIONS]
        ),
        schema.TABLE_NICHE_COMPOSITION: pd.DataFrame(
            comp, columns=cols[schema.TABLE_NICHE_COMPOSITION]
        ),
    }
    diff = [
        (lr, c, conditions[0], 0.2, 0.1, 0.1, 2.0, 0.04, 0.08, len(sections), True)
        for lr in interactions
        for c in conditions[1:]
    ]
    tables[schema.TABLE_SPATIAL_LR_DIFF] = pd.DataFrame(
        diff, columns=cols[schema.TABLE_SPATIAL_LR_DIFF]
    )
    for name, df in tables.items():
        (out / schema.TABLES_DIR / f"{name}.csv").write_text(csv_text(df), "utf-8")
    meta = {
        "sections": list(sections),
        "conditions": list(conditions),
        "reference": conditions[0],
        "n_cells": len(cells),
        "n_genes": len(genes),
        "genes": genes,
        "interactions": list(interactions),
        "cell_types": list(cell_types),
        "niches": niches,
    }
    (out / schema.SPATIAL_META_FILE).write_text(json.dumps(meta))
    return out
