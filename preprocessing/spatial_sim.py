"""Simulated lymph-node sections with planted spatial truth (``tme-atlas simulate-spatial``).

One section per patient x resistance state, imaged with a small gene panel (a few hundred
genes, like Xenium) whose expression comes from the scRNA simulator's cell-type profiles
(:func:`preprocessing.simulate._base_profiles`, same seed = same profiles as
``tme-atlas simulate --seed``, so an atlas built from that cohort types these cells).

What is planted, and where (never in anything a method reads directly):

* **positions**: cells are a Poisson process over a square section (~1 cell / 100 µm²);
  discs of four *regions* are laid over it (``t_zone``, ``proliferation_centre``,
  ``myeloid_contact``, the rest ``background``). A cell's type is drawn from its region's
  composition (:data:`REGION_COMPOSITION`). Types of :data:`NULL_TYPES` have the same
  probability in every region, so their placement is independent of everything else: every
  pair involving one is a **null** pair for neighbourhood enrichment. The expected
  co-location of two region-bound types follows from the region compositions and areas
  (truth ``nhood.csv``: ``positive`` / ``negative`` / ``weak`` / ``null``).
* **niche changes across states**: the number of discs of a region scales with the
  condition (:data:`REGION_AREA_MULT`: proliferation centres expand under ibrutinib and
  venetoclax resistance and shrink early on ibrutinib; macrophage–CLL contact niches
  triple under venetoclax resistance; the T zone does not change). Truth ``niches.csv``.
* **spatial ligand–receptor co-expression**: for planted pairs (truth ``spatial_lr.csv``,
  kind ``planted``), a sender cell expresses the ligand, and a receiver cell the receptor,
  only when it touches a cell of the partner type (one of its 6 nearest neighbours). Null
  pairs get the same expression in the same cell types and in the same share of cells,
  chosen at random (no contact dependence). Both use genes that are otherwise low
  everywhere. Two planted pairs (``state_up``) depend on the state: under venetoclax
  resistance every touching cell expresses them, in the other states 40% of them.

Written: ``samplesheet.csv`` (``sample_id,path,patient,condition,tissue,species``),
``sections/<id>.h5ad`` (``layers["counts"]``, ``obsm["spatial"]`` in µm) and, for the first
section (``xenium=True``), a Xenium-like folder (``cell_feature_matrix.h5`` +
``cells.csv.gz`` with ``cell_id,x_centroid,y_centroid``) instead; ``truth/`` tables
(``cells.csv`` with the region and true type of every cell, ``nhood.csv``, ``niches.csv``,
``spatial_lr.csv``).
"""

from __future__ import annotations

import gzip
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlas import schema
from atlas.tables import csv_text

from . import simulate as S
from .log import get_logger

log = get_logger("spatial_sim")

CONDITIONS: tuple[str, ...] = ("NAIVE", "IBR_EARLY", "IBR_RES", "VEN_RES")
DEFAULT_CONDITIONS: tuple[str, ...] = ("NAIVE", "IBR_RES", "VEN_RES")
DENSITY = 0.01  # cells per µm² (one cell per 100 µm²)
LIB_MEDIAN = 180.0  # panel counts per cell (Xenium-like)

BACKGROUND = "background"
T_ZONE = "t_zone"
PROLIFERATION_CENTRE = "proliferation_centre"
MYELOID_CONTACT = "myeloid_contact"
REGIONS: tuple[str, ...] = (BACKGROUND, T_ZONE, PROLIFERATION_CENTRE, MYELOID_CONTACT)

SPATIAL_TYPES: tuple[str, ...] = (
    S.CLL_RESTING,
    S.CLL_ACTIVATED,
    S.CLL_PROLIFERATING,
    S.NORMAL_B,
    S.CD4_NAIVE,
    S.CD4_TFH,
    S.CD4_TREG,
    S.CD8_EFFECTOR,
    S.CD8_EXHAUSTED,
    S.NK,
    S.MONO_CLASSICAL,
    S.NLC,
    S.CDC,
    S.PDC,
)
# same share in every region: placement independent of everything (null pairs)
NULL_TYPES: dict[str, float] = {S.NK: 0.04, S.NORMAL_B: 0.03, S.PDC: 0.02}

# composition of the region-bound part of each region (renormalised to 1 - sum(NULL_TYPES))
REGION_COMPOSITION: dict[str, dict[str, float]] = {
    BACKGROUND: {
        S.CLL_RESTING: 0.78, S.CLL_ACTIVATED: 0.05, S.CD4_NAIVE: 0.04, S.CD8_EFFECTOR: 0.02,
        S.CD4_TREG: 0.03, S.CD8_EXHAUSTED: 0.03, S.MONO_CLASSICAL: 0.02, S.NLC: 0.01,
        S.CD4_TFH: 0.01, S.CLL_PROLIFERATING: 0.005, S.CDC: 0.005,
    },
    T_ZONE: {
        S.CD4_NAIVE: 0.36, S.CD8_EFFECTOR: 0.26, S.CDC: 0.12, S.CD4_TREG: 0.08,
        S.CD8_EXHAUSTED: 0.06, S.CLL_RESTING: 0.10, S.MONO_CLASSICAL: 0.02,
    },
    PROLIFERATION_CENTRE: {
        S.CLL_PROLIFERATING: 0.28, S.CLL_ACTIVATED: 0.30, S.CD4_TFH: 0.16, S.NLC: 0.12,
        S.CLL_RESTING: 0.10, S.CD4_TREG: 0.02, S.CD8_EXHAUSTED: 0.02,
    },
    MYELOID_CONTACT: {
        S.MONO_CLASSICAL: 0.34, S.NLC: 0.14, S.CLL_ACTIVATED: 0.26, S.CLL_RESTING: 0.24,
        S.CD8_EXHAUSTED: 0.02,
    },
}  # fmt: skip
# baseline area fraction and disc radius range (µm) per region
REGION_AREA: dict[str, float] = {T_ZONE: 0.14, PROLIFERATION_CENTRE: 0.08, MYELOID_CONTACT: 0.04}
REGION_RADIUS: dict[str, tuple[float, float]] = {
    T_ZONE: (60.0, 110.0),
    PROLIFERATION_CENTRE: (25.0, 45.0),
    MYELOID_CONTACT: (20.0, 35.0),
}
# area multiplier per condition (planted niche changes; 1 = unchanged)
REGION_AREA_MULT: dict[str, dict[str, float]] = {
    T_ZONE: {},
    PROLIFERATION_CENTRE: {"IBR_EARLY": 0.5, "IBR_RES": 2.0, "VEN_RES": 2.0},
    MYELOID_CONTACT: {"VEN_RES": 3.0},
}
PAINT_ORDER = (T_ZONE, PROLIFERATION_CENTRE, MYELOID_CONTACT)  # later discs cover earlier

# planted contact-dependent LR expression: (sender, receiver) type pairs that touch
LR_SENDER_RECEIVER: list[tuple[str, str]] = [
    (S.NLC, S.CLL_PROLIFERATING),
    (S.CD4_TFH, S.CLL_ACTIVATED),
    (S.MONO_CLASSICAL, S.CLL_ACTIVATED),
    (S.CDC, S.CD4_NAIVE),
    (S.NLC, S.CLL_ACTIVATED),
    (S.CD4_TFH, S.CLL_PROLIFERATING),
]
N_PLANTED_LR = 6
# planted pairs (by index) whose contact-dependent expression changes with the state: in
# LR_STATE every touching cell expresses, elsewhere only a share LR_STATE_OTHER of them
LR_STATE_PAIRS = (1, 4)
LR_STATE = "VEN_RES"
LR_STATE_OTHER = 0.4
N_NULL_LR = 12
LR_COUNTS = 4.0  # expected extra counts of a ligand / receptor in an expressing cell
LR_BASE = 0.03  # expected counts of these genes elsewhere
CONTACT_K = 6  # "touching" = among the 6 nearest neighbours
N_MARKERS_PER_TYPE = 14
N_FILLER = 120

NHOOD_POSITIVE = 1.5  # expected co-location ratio above which a pair is planted positive
NHOOD_NEGATIVE = 0.6  # ... below which planted negative


@dataclass
class SpatialSimulation:
    """Sections (one AnnData: counts in ``X`` and ``layers["counts"]``, ``obsm["spatial"]``,
    obs ``sample_id, patient, condition, true_cell_type, region``) and truth tables."""

    adata: object
    truth: dict[str, pd.DataFrame]
    samplesheet: pd.DataFrame
    params: dict = field(default_factory=dict)


def _profiles(seed: int, species: str):
    internal, symbols = S.gene_universe(species)
    ss = np.random.SeedSequence(seed)
    rng = np.random.default_rng(ss.spawn(3)[0])
    logcp = S._base_profiles(internal, species, rng)
    return internal, symbols, logcp


def _lr_candidates(internal: list[str], used: set[str], rng) -> list[tuple[str, str]]:
    """Single-gene LR pairs of LIANA's resource with both genes in the gene universe, not in
    any programme or curated axis (so that their expression is only what is planted here)."""
    res = S._lr_resource("human")
    gset = set(internal)
    prog = set(S._programme_genes())
    out, seen = [], set()
    for lig, rec in res[["ligand", "receptor"]].itertuples(index=False):
        if "_" in lig or "_" in rec or lig == rec:
            continue
        if lig not in gset or rec not in gset or lig in prog or rec in prog:
            continue
        if lig in seen or rec in seen or lig in used or rec in used:
            continue
        if S._excluded_gene(lig) or S._excluded_gene(rec):
            continue
        seen.update((lig, rec))
        out.append((lig, rec))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def _panel(internal, logcp, lr_genes: list[str], rng) -> list[str]:
    types = [S.CELL_TYPES.index(t) for t in SPATIAL_TYPES]
    L = logcp[types]
    genes: list[str] = []
    ok = np.array([not S._excluded_gene(g) for g in internal])
    for i in range(len(types)):
        spec = L[i] - np.delete(L, i, axis=0).max(axis=0)
        spec[~ok] = -np.inf
        spec[L[i] < 1.0] = -np.inf
        for j in np.argsort(-spec)[:N_MARKERS_PER_TYPE]:
            if np.isfinite(spec[j]) and internal[j] not in genes:
                genes.append(internal[j])
    expressed = np.flatnonzero(ok & (L.max(axis=0) > 0.5))
    for j in rng.permutation(expressed):
        if len(genes) >= len(types) * N_MARKERS_PER_TYPE + N_FILLER:
            break
        if internal[j] not in genes and internal[j] not in lr_genes:
            genes.append(internal[j])
    return [g for g in genes if g not in lr_genes] + lr_genes


def _region_probs() -> np.ndarray:
    """R x T type probabilities per region."""
    null_total = sum(NULL_TYPES.values())
    P = np.zeros((len(REGIONS), len(SPATIAL_TYPES)))
    for r, reg in enumerate(REGIONS):
        comp = REGION_COMPOSITION[reg]
        tot = sum(comp.values())
        for t, v in comp.items():
            P[r, SPATIAL_TYPES.index(t)] = v / tot * (1 - null_total)
        for t, v in NULL_TYPES.items():
            P[r, SPATIAL_TYPES.index(t)] = v
    return P


def nhood_truth(area: dict[str, float] | None = None) -> pd.DataFrame:
    """Expected co-location of every type pair under the baseline areas: the ratio of the
    expected share of a-b neighbour pairs to its value under random placement
    (sum_r w_r p_ra p_rb / (p_a p_b)); ``null`` for pairs with a :data:`NULL_TYPES` member."""
    P = _region_probs()
    a = area or REGION_AREA
    w = np.array([1 - sum(a.values())] + [a[r] for r in REGIONS[1:]])
    pa = w @ P
    rows = []
    for i, ta in enumerate(SPATIAL_TYPES):
        for j, tb in enumerate(SPATIAL_TYPES):
            if j <= i:
                continue
            ratio = float((w * P[:, i] * P[:, j]).sum() / (pa[i] * pa[j]))
            if ta in NULL_TYPES or tb in NULL_TYPES:
                kind = "null"
            elif ratio >= NHOOD_POSITIVE:
                kind = "positive"
            elif ratio <= NHOOD_NEGATIVE:
                kind = "negative"
            else:
                kind = "weak"
            rows.append({"type_a": ta, "type_b": tb, "expected_ratio": ratio, "kind": kind})
    return pd.DataFrame(rows)


def niche_truth(conditions) -> pd.DataFrame:
    rows = []
    for reg in PAINT_ORDER:
        for c in conditions:
            if c == conditions[0]:
                continue
            m = REGION_AREA_MULT[reg].get(c, 1.0) / REGION_AREA_MULT[reg].get(conditions[0], 1.0)
            rows.append(
                {
                    "region": reg,
                    "condition": c,
                    "reference": conditions[0],
                    "area_log2fc": float(np.log2(m)),
                    "direction": "up" if m > 1 else ("down" if m < 1 else "none"),
                }
            )
    return pd.DataFrame(rows)


def _paint(side: float, cond: str, rng, pixel: float = 10.0):
    """Region raster (pixel size ``pixel`` µm) of one section."""
    n_pix = int(np.ceil(side / pixel))
    raster = np.zeros((n_pix, n_pix), dtype=np.int8)
    yy, xx = np.mgrid[0:n_pix, 0:n_pix]
    for reg in PAINT_ORDER:
        lo, hi = REGION_RADIUS[reg]
        mean_area = np.pi * (lo**2 + lo * hi + hi**2) / 3
        frac = REGION_AREA[reg] * REGION_AREA_MULT[reg].get(cond, 1.0)
        n = rng.poisson(frac * side * side / mean_area)
        code = REGIONS.index(reg)
        for _ in range(n):
            cx, cy = rng.uniform(0, side, 2) / pixel
            rad = rng.uniform(lo, hi) / pixel
            x0, x1 = max(int(cx - rad), 0), min(int(cx + rad) + 2, n_pix)
            y0, y1 = max(int(cy - rad), 0), min(int(cy + rad) + 2, n_pix)
            sub = (xx[y0:y1, x0:x1] + 0.5 - cx) ** 2 + (yy[y0:y1, x0:x1] + 0.5 - cy) ** 2
            raster[y0:y1, x0:x1][sub <= rad * rad] = code
    return raster


def simulate_spatial(
    *,
    seed: int = 0,
    n_patients: int = 4,
    cells_per_section: int = 4000,
    conditions: tuple[str, ...] | list[str] = DEFAULT_CONDITIONS,
    species: str = "human",
) -> SpatialSimulation:
    """Simulate ``n_patients`` x ``conditions`` sections (see the module docstring).

    ``seed`` also selects the expression profiles: the same seed as ``tme-atlas simulate``
    gives the profiles of that cohort, so its atlas can type these cells.
    """
    import anndata as ad
    from scipy.spatial import cKDTree

    if species != "human":
        raise ValueError("simulate_spatial: only human panels are simulated")
    conditions = tuple(conditions)
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown or not conditions or conditions[0] != "NAIVE":
        raise ValueError(f"conditions must be drawn from {CONDITIONS} and start with NAIVE")
    internal, symbols, logcp = _profiles(seed, species)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 17]))

    # LR pairs: planted contact-dependent and null (same types, random cells)
    cands = _lr_candidates(internal, set(), rng)
    n_lr = N_PLANTED_LR + N_NULL_LR
    if len(cands) < n_lr:  # pragma: no cover - the resource has hundreds
        raise RuntimeError("too few ligand-receptor candidates for the spatial simulation")
    lr_rows = []
    for i, (lig, rec) in enumerate(cands[:n_lr]):
        snd, rcv = LR_SENDER_RECEIVER[i % len(LR_SENDER_RECEIVER)]
        kind = "planted" if i < N_PLANTED_LR else "null"
        state = LR_STATE if (kind == "planted" and i in LR_STATE_PAIRS) else ""
        lr_rows.append(
            {"ligand": lig, "receptor": rec, "sender": snd, "receiver": rcv, "kind": kind,
             "state_up": state}
        )  # fmt: skip
    lr = pd.DataFrame(lr_rows)
    lr_genes = list(lr["ligand"]) + list(lr["receptor"])
    panel = _panel(internal, logcp, lr_genes, rng)
    gidx = {g: i for i, g in enumerate(internal)}
    pcols = np.array([gidx[g] for g in panel])
    tk = np.array([S.CELL_TYPES.index(t) for t in SPATIAL_TYPES])
    frac = S._to_fraction(logcp[tk][:, pcols])  # T x panel
    is_lr = np.isin(panel, lr_genes)
    frac[:, is_lr] = 0.0
    frac /= frac.sum(axis=1, keepdims=True)
    lr_col = {g: panel.index(g) for g in lr_genes}
    P = _region_probs()
    theta = 6.0

    patients = [f"P{p + 1:02d}" for p in range(n_patients)]
    mats, obs_parts, xy_parts, sheet = [], [], [], []
    for p in patients:
        for c in conditions:
            sid = f"{p}_{c}"
            r = np.random.default_rng(np.random.SeedSequence([seed, 17, len(sheet) + 1]))
            n = int(r.poisson(cells_per_section))
            side = float(np.sqrt(cells_per_section / DENSITY))
            xy = r.uniform(0, side, (n, 2))
            raster = _paint(side, c, r)
            pix = np.minimum((xy / 10.0).astype(int), raster.shape[0] - 1)
            region = raster[pix[:, 1], pix[:, 0]]
            # types: inverse-CDF per region
            cum = np.cumsum(P[region], axis=1)
            u = r.random(n)[:, None]
            types = np.minimum((u > cum).sum(axis=1), len(SPATIAL_TYPES) - 1)
            lib = LIB_MEDIAN * np.exp(r.normal(0, 0.35, n))
            mu = frac[types] * lib[:, None]
            mu[:, is_lr] = LR_BASE
            # contact: partner types among the CONTACT_K nearest neighbours
            tree = cKDTree(xy)
            _, nn = tree.query(xy, k=CONTACT_K + 1)
            nn_types = types[nn[:, 1:]]
            for row in lr.itertuples():
                s, t = SPATIAL_TYPES.index(row.sender), SPATIAL_TYPES.index(row.receiver)
                is_s, is_t = types == s, types == t
                s_on = is_s & (nn_types == t).any(axis=1)
                t_on = is_t & (nn_types == s).any(axis=1)
                if row.kind == "null":  # same share of the same types, random cells
                    s_on = is_s & (r.random(n) < s_on.sum() / max(is_s.sum(), 1))
                    t_on = is_t & (r.random(n) < t_on.sum() / max(is_t.sum(), 1))
                elif row.state_up and c != row.state_up:  # fewer touching cells express
                    s_on &= r.random(n) < LR_STATE_OTHER
                    t_on &= r.random(n) < LR_STATE_OTHER
                mu[s_on, lr_col[row.ligand]] += LR_COUNTS
                mu[t_on, lr_col[row.receptor]] += LR_COUNTS
            counts = r.negative_binomial(theta, theta / (theta + mu)).astype(np.int32)
            mats.append(sp.csr_matrix(counts))
            xy_parts.append(xy)
            obs_parts.append(
                pd.DataFrame(
                    {
                        "sample_id": sid,
                        "patient": p,
                        "condition": c,
                        "true_cell_type": np.asarray(SPATIAL_TYPES)[types],
                        "region": np.asarray(REGIONS)[region],
                    },
                    index=[f"{sid}:cell{i:06d}" for i in range(n)],
                )
            )
            sheet.append((sid, p, c))
    X = sp.vstack(mats).tocsr()
    obs = pd.concat(obs_parts)
    to_sym = dict(zip(internal, symbols))
    var = pd.DataFrame(index=pd.Index([to_sym.get(g, g) for g in panel]))
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.layers[schema.LAYER_COUNTS] = X.copy()
    adata.obsm[schema.OBSM_SPATIAL] = np.vstack(xy_parts).astype(np.float32)
    cells = obs.reset_index(names="cell_id")
    truth = {
        "cells": cells,
        "nhood": nhood_truth(),
        "niches": niche_truth(conditions),
        "spatial_lr": lr,
    }
    samplesheet = pd.DataFrame(
        [
            {
                "sample_id": sid,
                "path": f"sections/{sid}.h5ad",
                "patient": p,
                "condition": c,
                "tissue": "LN",
                "species": species,
            }
            for sid, p, c in sheet
        ]
    )
    params = {"seed": seed, "n_patients": n_patients, "cells_per_section": cells_per_section}
    return SpatialSimulation(adata=adata, truth=truth, samplesheet=samplesheet, params=params)


def _write_xenium(sub, folder: Path) -> None:
    """``cell_feature_matrix.h5`` (10x HDF5, features x cells CSC) + ``cells.csv.gz``."""
    import h5py

    folder.mkdir(parents=True)
    X = sp.csr_matrix(sub.layers[schema.LAYER_COUNTS])
    ids = [f"cell{i:06d}" for i in range(sub.n_obs)]
    m = sp.csc_matrix(X.T)  # genes x cells, compressed by cell
    with h5py.File(folder / "cell_feature_matrix.h5", "w") as f:
        g = f.create_group("matrix")
        g.create_dataset("barcodes", data=np.array(ids, dtype="S"))
        g.create_dataset("data", data=m.data.astype(np.int32))
        g.create_dataset("indices", data=m.indices.astype(np.int64))
        g.create_dataset("indptr", data=m.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array(m.shape, dtype=np.int32))
        ft = g.create_group("features")
        names = np.array(list(sub.var_names), dtype="S")
        ft.create_dataset("name", data=names)
        ft.create_dataset("id", data=names)
        ft.create_dataset("feature_type", data=np.array([b"Gene Expression"] * sub.n_vars))
        ft.create_dataset("genome", data=np.array([b"GRCh38"] * sub.n_vars))
    xy = np.asarray(sub.obsm[schema.OBSM_SPATIAL])
    cells = pd.DataFrame({"cell_id": ids, "x_centroid": xy[:, 0], "y_centroid": xy[:, 1]})
    with gzip.open(folder / "cells.csv.gz", "wt") as fh:
        fh.write(csv_text(cells))


def write_spatial_dataset(
    out: str | Path,
    *,
    sim: SpatialSimulation | None = None,
    xenium: bool = True,
    **kwargs,
) -> Path:
    """Write ``sim`` (or :func:`simulate_spatial` ``(**kwargs)``) as a user's input: see the
    module docstring. Written to a temporary folder beside ``out``, renamed at the end."""
    out = Path(out)
    sim = sim if sim is not None else simulate_spatial(**kwargs)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "sections").mkdir(parents=True)
    (tmp / "truth").mkdir()
    sheet = sim.samplesheet.copy()
    a = sim.adata
    for i, row in enumerate(sheet.itertuples()):
        sub = a[(a.obs[schema.OBS_SAMPLE] == row.sample_id).to_numpy()].copy()
        if xenium and i == 0:
            rel = f"sections/{row.sample_id}_xenium"
            _write_xenium(sub, tmp / rel)
            sheet.loc[row.Index, "path"] = rel
        else:
            sub.obs = sub.obs[["sample_id", "patient", "condition"]].copy()
            sub.obs_names = [n.split(":", 1)[1] for n in sub.obs_names]
            sub.write_h5ad(tmp / row.path)
    (tmp / "samplesheet.csv").write_text(csv_text(sheet), encoding="utf-8")
    for name, df in sim.truth.items():
        (tmp / "truth" / f"{name}.csv").write_text(csv_text(df), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("wrote %d sections (%d cells) to %s", len(sheet), a.n_obs, out)
    return out
