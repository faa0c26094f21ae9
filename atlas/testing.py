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

# ----------------------------------------------------------------------------- vocabulary
DEFAULT_CONDITIONS = (
    "untreated",
    "ibrutinib_resistant",
    "venetoclax_resistant",
    "anti_CD20_resistant",
)

# cell type -> (lineage, share of cells, marker genes)
CELL_TYPES: dict[str, tuple[str, float, tuple[str, ...]]] = {
    "CLL": (
        "B/CLL",
        0.46,
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
    "Normal B": (
        "B/CLL",
        0.03,
        ("CD19", "MS4A1", "CD79A", "CD79B", "CD22", "PAX5", "BANK1", "IGHD"),
    ),
    "Plasma cell": ("B/CLL", 0.01, ("MZB1", "JCHAIN", "XBP1", "SDC1", "PRDM1", "IGHG1")),
    "CD4 T naive": ("T/NK", 0.08, ("CD3E", "CD3D", "CD4", "CCR7", "SELL", "LEF1", "TCF7", "IL7R")),
    "CD4 T memory": ("T/NK", 0.07, ("CD3E", "CD3D", "CD4", "IL7R", "CD40LG", "ANXA1", "CXCR4")),
    "Treg": ("T/NK", 0.025, ("CD3E", "CD4", "FOXP3", "IL2RA", "CTLA4", "IKZF2", "TIGIT")),
    "CD8 T effector": (
        "T/NK",
        0.05,
        ("CD3E", "CD3D", "CD8A", "CD8B", "GZMB", "GZMK", "PRF1", "NKG7", "CCL5"),
    ),
    "CD8 T exhausted": (
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
    "Nurse-like cell": (
        "Myeloid",
        0.02,
        ("CD68", "CD163", "MRC1", "APOE", "C1QA", "C1QB", "CXCL12", "CD14", "LYZ", "TNFSF13B"),
    ),
    "cDC": ("Myeloid", 0.01, ("CLEC10A", "CD1C", "FCER1A", "ITGAX", "HLA-DQA1")),
    "pDC": ("Myeloid", 0.005, ("LILRA4", "IL3RA", "CLEC4C", "IRF7", "TCF4")),
    "Stromal": ("Stromal", 0.005, ("COL1A1", "COL1A2", "PDGFRB", "CXCL12", "VCAM1", "LEPR")),
    "Endothelial": ("Stromal", 0.005, ("PECAM1", "VWF", "CDH5", "KDR", "CLDN5")),
}
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
    "ibrutinib_resistant": {"CXCR4": 2.5, "PLCG2": 2.0, "BTK": 1.8, "CD5": 0.7, "MKI67": 2.5},
    "venetoclax_resistant": {"MCL1": 3.0, "BCL2L1": 3.0, "BCL2A1": 2.5, "BCL2": 0.6, "NFKBIA": 2.0},
    "anti_CD20_resistant": {"MS4A1": 0.3, "CD59": 2.5, "CD55": 2.0, "PSMB5": 1.8},
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
    n_cells: int = 20_000,
    n_genes: int = 2_000,
    *,
    n_patients: int = 4,
    conditions: Sequence[str] = DEFAULT_CONDITIONS,
    species: str = "human",
    density: float = 0.08,
    seed: int = 0,
    chunk_size: int = 10_000,
    tables: bool = True,
):
    """A schema-complete synthetic atlas AnnData (X log-normalised CSR; counts layer).

    Samples are patients x conditions (``P1_untreated``, ...). ``density`` is the mean
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
        p[types.index("Nurse-like cell")] *= 1.0 + 0.5 * (ci == 1)
        p[types.index("CD8 T exhausted")] *= 1.0 + 0.8 * (ci == 2)
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
    cll = types.index("CLL")
    effects = np.ones((len(conditions), n_genes), dtype=np.float32)
    for c, cond in enumerate(conditions):
        for g, f in CONDITION_EFFECTS.get(cond, {}).items():
            if g in gpos:
                effects[c, gpos[g]] = f
    depth = rng.lognormal(0.0, 0.25, n_cells).astype(np.float32)

    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    idx_parts: list[np.ndarray] = []
    cnt_parts: list[np.ndarray] = []
    for a in range(0, n_cells, chunk_size):
        b = min(a + chunk_size, n_cells)
        thr = q[type_code[a:b]]
        is_cll = type_code[a:b] == cll
        if is_cll.any():
            eff = effects[cond_of_sample[sample_code[a:b][is_cll]]]
            thr[is_cll] = np.clip(thr[is_cll] * eff, 0, 0.97)
        thr *= depth[a:b, None]
        u = rng.random(thr.shape, dtype=np.float32)
        rows, cols = np.nonzero(u < thr)
        del u, thr
        indptr[a + 1 : b + 1] = np.bincount(rows, minlength=b - a)
        idx_parts.append(cols.astype(np.int32))
        cnt_parts.append(rng.geometric(p_geom[cols]).astype(np.float32))
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
    mito = np.array([g.upper().startswith("MT-") for g in gene_names])
    mt_counts = np.bincount(
        np.repeat(np.arange(n_cells), row_nnz)[mito[indices]],
        weights=counts_data[mito[indices]],
        minlength=n_cells,
    )
    sample_ids = pd.Categorical.from_codes(sample_code, categories=[s[0] for s in samples])
    barcodes = _barcodes(n_cells, rng)
    obs_names = np.char.add(np.char.add(np.asarray(sample_ids.astype(str)), ":"), barcodes)
    patient_of = np.array([patients.index(s[1]) for s in samples])
    type_cat = pd.Categorical.from_codes(type_code, categories=types)
    lineage_of = {t: v[0] for t, v in CELL_TYPES.items()} | {schema.UNASSIGNED: "Other"}
    lineages = list(dict.fromkeys(lineage_of.values()))
    lin_code = np.array([lineages.index(lineage_of[t]) for t in types])[type_code]
    n_leiden = np.array([3 if t == "CLL" else 1 for t in types])
    leiden_base = np.concatenate([[0], np.cumsum(n_leiden)[:-1]])
    leiden_code = leiden_base[type_code] + (rng.random(n_cells) * n_leiden[type_code]).astype(int)
    n_clusters = int(n_leiden.sum())
    doublet_score = rng.beta(1.5, 12, n_cells).astype(np.float32)
    tissue_cats = ["peripheral_blood", "lymph_node"]
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
    for k, prog in enumerate(PROGRAMS):
        base = rng.normal(0, 0.3, n_types)[type_code]
        cond = cond_of_sample[sample_code]
        shift = 0.25 * (cond == (k % max(len(conditions), 1))) * (type_code == cll)
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
    umap[:, 0] += 0.4 * cond_of_sample[sample_code] * (type_code == cll)
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
def add_synthetic_tables(adata, *, rng=None) -> None:
    """Every result table of :data:`atlas.schema.TABLES`, with plausible values."""
    from .tables import put_table

    rng = np.random.default_rng(0) if rng is None else rng
    obs = adata.obs
    conditions = [str(c) for c in adata.uns[schema.UNS_CONDITION_ORDER]]
    reference = str(adata.uns[schema.UNS_REFERENCE_CONDITION])
    contrasts = [c for c in conditions if c != reference]
    genes = adata.var_names.tolist()
    types = [t for t in obs[schema.OBS_CELL_TYPE].cat.categories if t != schema.UNASSIGNED]
    samples = (
        obs[[schema.OBS_SAMPLE, schema.OBS_PATIENT, schema.OBS_CONDITION]]
        .drop_duplicates(schema.OBS_SAMPLE)
        .reset_index(drop=True)
    )

    # proportions (observed counts)
    counts = (
        obs.groupby([schema.OBS_SAMPLE, schema.OBS_CELL_TYPE], observed=False)
        .size()
        .rename("n")
        .reset_index()
    )
    totals = counts.groupby(schema.OBS_SAMPLE, observed=False)["n"].transform("sum")
    counts["prop"] = counts["n"] / totals.clip(lower=1)
    counts = counts.merge(samples, on=schema.OBS_SAMPLE, how="left")
    proportions = counts[
        [
            schema.OBS_SAMPLE,
            schema.OBS_PATIENT,
            schema.OBS_CONDITION,
            schema.OBS_CELL_TYPE,
            "n",
            "prop",
        ]
    ].copy()
    proportions["n"] = proportions["n"].astype(np.int64)
    put_table(adata, schema.TABLE_PROPORTIONS, proportions)

    # composition (condition vs reference; log2 fold change of mean proportions)
    mean_prop = proportions.groupby([schema.OBS_CONDITION, schema.OBS_CELL_TYPE], observed=True)[
        "prop"
    ].mean()
    rows = []
    for c in contrasts:
        for t in types + [schema.UNASSIGNED]:
            pc = float(mean_prop.get((c, t), 0.0))
            pr = float(mean_prop.get((reference, t), 0.0))
            lfc = float(np.log2((pc + 1e-4) / (pr + 1e-4)))
            pval = float(np.clip(np.exp(-abs(lfc) * 3) * rng.uniform(0.5, 1), 1e-12, 1))
            rows.append(
                {
                    schema.COL_CELL_TYPE: t,
                    schema.COL_CONDITION: c,
                    schema.COL_REFERENCE: reference,
                    "prop_condition": pc,
                    "prop_reference": pr,
                    schema.COL_LOG2FC: lfc,
                    schema.COL_PVALUE: pval,
                    "method": "sccoda_like",
                }
            )
    comp = pd.DataFrame(rows)
    comp[schema.COL_PADJ] = _bh(comp[schema.COL_PVALUE].to_numpy())
    comp["significant"] = comp[schema.COL_PADJ] < 0.05
    put_table(adata, schema.TABLE_COMPOSITION, comp)

    # DE (pseudobulk-like): 200 genes per cell type x contrast
    de_rows = []
    n_de = min(200, len(genes))
    for t in types[:8]:
        for c in contrasts:
            pick = rng.choice(len(genes), n_de, replace=False)
            lfc = rng.normal(0, 0.8, n_de)
            pval = np.clip(np.exp(-np.abs(lfc) * 4) * rng.uniform(0.2, 1, n_de), 1e-30, 1)
            de_rows.append(
                pd.DataFrame(
                    {
                        schema.COL_CELL_TYPE: t,
                        schema.COL_CONDITION: c,
                        schema.COL_REFERENCE: reference,
                        schema.COL_GENE: [genes[i] for i in pick],
                        "base_mean": rng.lognormal(3, 1, n_de),
                        schema.COL_LOG2FC: lfc,
                        "lfc_se": rng.uniform(0.1, 0.5, n_de),
                        "stat": lfc / 0.3,
                        schema.COL_PVALUE: pval,
                        schema.COL_PADJ: _bh(pval),
                        "n_samples_condition": int((samples[schema.OBS_CONDITION] == c).sum()),
                        "n_samples_reference": int(
                            (samples[schema.OBS_CONDITION] == reference).sum()
                        ),
                    }
                )
            )
    put_table(adata, schema.TABLE_DE, pd.concat(de_rows, ignore_index=True))

    # programmes
    prog_rows = []
    for p in adata.uns.get(schema.UNS_PROGRAMS, {}):
        col = schema.score_key(p)
        if col not in obs.columns:
            continue
        means = obs.groupby([schema.OBS_CELL_TYPE, schema.OBS_CONDITION], observed=True)[col].mean()
        for t in types:
            for c in contrasts:
                mc, mr = means.get((t, c), np.nan), means.get((t, reference), np.nan)
                delta = float(mc - mr)
                prog_rows.append(
                    {
                        "program": p,
                        schema.COL_CELL_TYPE: t,
                        schema.COL_CONDITION: c,
                        schema.COL_REFERENCE: reference,
                        "mean_condition": float(mc),
                        "mean_reference": float(mr),
                        "delta": delta,
                        schema.COL_PVALUE: float(np.clip(np.exp(-abs(delta) * 20), 1e-12, 1)),
                    }
                )
    prog = pd.DataFrame(prog_rows)
    if len(prog):
        prog[schema.COL_PADJ] = _bh(prog[schema.COL_PVALUE].to_numpy())
    put_table(adata, schema.TABLE_PROGRAMS, prog)

    # interactions (consensus per condition), by sample, differential
    gene_set = set(genes)
    pairs = [(a, b) for a, b in _lr_pairs() if set(a.split("_")) | set(b.split("_")) <= gene_set]
    pairs = pairs[:150]
    inter_rows, by_sample_rows, diff_rows = [], [], []
    crosstalk_types = types[: min(6, len(types))] + [
        t for t in ("Nurse-like cell", "Stromal") if t in types and t not in types[:6]
    ]
    curated = {
        ("CXCL12", "CXCR4"),
        ("CD40LG", "CD40"),
        ("TNFSF13B", "TNFRSF13C"),
        ("MIF", "CD74"),
        ("CCL3", "CCR1"),
        ("CD274", "PDCD1"),
    }
    for lig, rec in pairs[:60]:
        for src in crosstalk_types:
            for tgt in crosstalk_types[:4]:
                base = rng.lognormal(-1, 0.6)
                for c in conditions:
                    mag = base * rng.uniform(0.6, 1.6)
                    inter_rows.append(
                        {
                            schema.COL_CONDITION: c,
                            schema.COL_SOURCE: src,
                            schema.COL_TARGET: tgt,
                            schema.COL_LIGAND: lig,
                            schema.COL_RECEPTOR: rec,
                            "magnitude": mag,
                            "specificity": float(rng.uniform(0, 1)),
                            "magnitude_rank": float(rng.uniform(0, 1)),
                            "specificity_rank": float(rng.uniform(0, 1)),
                            schema.COL_CURATED: (lig, rec) in curated,
                        }
                    )
    inter = pd.DataFrame(inter_rows)
    put_table(adata, schema.TABLE_INTERACTIONS, inter)
    if len(inter):
        top = inter[inter[schema.COL_CONDITION] == conditions[0]].head(200)
        for _, s in samples.iterrows():
            for _, r in top.iterrows():
                by_sample_rows.append(
                    {
                        schema.OBS_SAMPLE: s[schema.OBS_SAMPLE],
                        schema.OBS_PATIENT: s[schema.OBS_PATIENT],
                        schema.COL_CONDITION: s[schema.OBS_CONDITION],
                        schema.COL_SOURCE: r[schema.COL_SOURCE],
                        schema.COL_TARGET: r[schema.COL_TARGET],
                        schema.COL_LIGAND: r[schema.COL_LIGAND],
                        schema.COL_RECEPTOR: r[schema.COL_RECEPTOR],
                        "magnitude": float(r["magnitude"] * rng.uniform(0.5, 1.5)),
                        "specificity": float(rng.uniform(0, 1)),
                    }
                )
        key = [schema.COL_SOURCE, schema.COL_TARGET, schema.COL_LIGAND, schema.COL_RECEPTOR]
        ref = inter[inter[schema.COL_CONDITION] == reference].set_index(key)["magnitude"]
        for c in contrasts:
            cur = inter[inter[schema.COL_CONDITION] == c].set_index(key)
            for k, r in cur.iterrows():
                lfc = float(np.log2((r["magnitude"] + 1e-3) / (ref.get(k, 0) + 1e-3)))
                diff_rows.append(
                    {
                        schema.COL_CONDITION: c,
                        schema.COL_REFERENCE: reference,
                        schema.COL_SOURCE: k[0],
                        schema.COL_TARGET: k[1],
                        schema.COL_LIGAND: k[2],
                        schema.COL_RECEPTOR: k[3],
                        schema.COL_LOG2FC: lfc,
                        schema.COL_PVALUE: float(np.clip(np.exp(-abs(lfc) * 2), 1e-12, 1)),
                        schema.COL_CURATED: bool(r[schema.COL_CURATED]),
                    }
                )
    put_table(adata, schema.TABLE_INTERACTIONS_BY_SAMPLE, pd.DataFrame(by_sample_rows))
    diff = pd.DataFrame(diff_rows)
    if len(diff):
        diff[schema.COL_PADJ] = _bh(diff[schema.COL_PVALUE].to_numpy())
    put_table(adata, schema.TABLE_INTERACTIONS_DIFF, diff)

    # QC summary per sample
    g = obs.groupby(schema.OBS_SAMPLE, observed=True)
    qc = (
        pd.DataFrame(
            {
                "n_cells_raw": g.size() + rng.integers(0, 50, g.ngroups),
                "n_cells_pass": g[schema.OBS_QC_PASS].sum().astype(np.int64),
                "median_counts": g[schema.OBS_TOTAL_COUNTS].median(),
                "median_genes": g[schema.OBS_N_GENES].median(),
                "median_pct_mt": g[schema.OBS_PCT_MITO].median(),
                "doublet_rate": g[schema.OBS_PREDICTED_DOUBLET].mean(),
            }
        )
        .reset_index()
        .merge(samples, on=schema.OBS_SAMPLE, how="left")
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


def _bh(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=float)
    n = len(p)
    if n == 0:
        return p
    order = np.argsort(p)
    ranked = p[order] * n / np.arange(1, n + 1)
    adj = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(n)
    out[order] = np.clip(adj, 0, 1)
    return out


def make_synthetic_atlas(
    out_dir: str | Path,
    n_cells: int = 20_000,
    n_genes: int = 2_000,
    **kwargs,
) -> Path:
    """Write a synthetic atlas directory (``write_atlas``) and return its path.

    Keyword arguments go to :func:`make_synthetic_adata` (``seed``, ``species``,
    ``n_patients``, ``conditions``, ``density``, ...).
    """
    from .store import write_atlas

    adata = make_synthetic_adata(n_cells, n_genes, **kwargs)
    return write_atlas(adata, out_dir)
