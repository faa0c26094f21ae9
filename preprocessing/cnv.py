"""Copy-number inference from expression with infercnvpy, per patient.

Each patient's cells are compared with that patient's confidently non-B cells (T/NK,
myeloid, ... of annotation confidence >= ``min_reference_confidence``), one reference
category per cell type (infercnvpy bounds each gene by the range of the reference types'
means, so a gene that differs between T cells and monocytes is not a copy-number change).
Gene positions come from ``references/genes_<species>.tsv.gz`` (shipped; nothing is
downloaded). Immunoglobulin, TCR, HLA, mitochondrial and sex-chromosome genes are left out
(clonal IG genes and HLA class II of B cells would look like focal gains).

Lesions are scored per cell as the mean copy-number signal over the windows overlapping a
region of ``references/cll_lesions.csv`` (trisomy 12, del(13q14), del(11q22), del(17p13) and
further recurrent CLL lesions; mouse: Emu-TCL1). A cell carries a lesion when its score
is beyond ``z`` standard deviations of the patient's reference cells in the lesion's direction.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlas import schema

from .log import get_logger

log = get_logger("cnv")

B_LINEAGE = "B/CLL"
EXCLUDED_CATEGORIES = ("immunoglobulin", "tcr", "mitochondrial", "haemoglobin")
SEX_CHROMOSOMES = ("X", "Y", "MT")


def load_lesions(species: str) -> pd.DataFrame:
    """Recurrent lesions of ``species`` from ``references/cll_lesions.csv``."""
    from references import path

    df = pd.read_csv(path("cll_lesions.csv"), dtype={"chromosome": str})
    return df[df["species"] == species].reset_index(drop=True)


def gene_positions_var(adata, species: str) -> pd.DataFrame:
    """``chromosome`` (``chr``-prefixed, None when unplaced or excluded), ``start``, ``end``
    for ``adata.var_names`` (infercnvpy's expected columns)."""
    from references import gene_positions

    from .integrate import excluded_gene_categories

    pos = gene_positions(species).set_index("symbol")
    names = pd.Index(adata.var_names.astype(str))
    p = pos.reindex(names)
    # Ensembl-id feature names: map through the table's ensembl_id column
    if schema.VAR_GENE_ID in adata.var:
        by_id = pos.reset_index().set_index("ensembl_id")
        by_id = by_id[~by_id.index.duplicated() & (by_id.index != "")]
        ids = adata.var[schema.VAR_GENE_ID].astype(str).to_numpy()
        miss = p["chromosome"].isna().to_numpy() | (p["chromosome"] == "").to_numpy()
        alt = by_id.reindex(ids)
        for c in ("chromosome", "start", "end"):
            p.loc[miss, c] = alt[c].to_numpy()[miss]
    chrom = p["chromosome"].astype(object)
    cats = excluded_gene_categories(names, species).to_numpy()
    keep = chrom.notna().to_numpy() & (chrom != "").to_numpy()
    keep &= ~np.isin(cats, EXCLUDED_CATEGORIES) & ~chrom.isin(SEX_CHROMOSOMES).to_numpy()
    keep &= ~names.str.upper().str.startswith(("HLA-", "H2-"))
    out = pd.DataFrame(index=adata.var_names)
    out["chromosome"] = np.where(keep, "chr" + chrom.astype(str), None)
    out["start"] = pd.to_numeric(p["start"], errors="coerce").to_numpy()
    out["end"] = pd.to_numeric(p["end"], errors="coerce").to_numpy()
    out.loc[~keep, ["start", "end"]] = np.nan
    return out


def default_window(n_placed: int) -> tuple[int, int]:
    """(window, step): ~100 genes on a full transcriptome, fewer on small gene panels."""
    w = int(np.clip(n_placed // 120, 15, 100))
    return w, max(1, w // 5)


def window_positions(var: pd.DataFrame, window: int, step: int) -> pd.DataFrame:
    """Genomic span of each column of infercnvpy's output (same order and windowing)."""
    from infercnvpy.tl._infercnv import _natural_sort

    placed = var[var["chromosome"].notna()]
    rows = []
    for ch in _natural_sort([c for c in placed["chromosome"].unique() if c != "chrM"]):
        v = placed[placed["chromosome"] == ch].sort_values("start")
        n = len(v)
        if window < n:
            starts = np.arange(0, n - window + 1)[::step]
            spans = [(v["start"].iat[i], v["end"].iat[i + window - 1]) for i in starts]
        else:
            spans = [(v["start"].iat[0], v["end"].iat[-1])]
        for s, e in spans:
            rows.append((ch.removeprefix("chr"), int(s), int(e)))
    return pd.DataFrame(rows, columns=["chromosome", "start", "end"])


def infer_cnv(
    adata,
    *,
    species: str = "human",
    min_reference_confidence: float = 0.5,
    min_reference_cells: int = 20,
    window: int | None = None,
    step: int | None = None,
    dynamic_threshold: float | None = 1.5,
    b_reference: np.ndarray | None = None,
    min_b_reference_cells: int = 10,
    lfc_clip: float = 1.0,
):
    """infercnvpy per patient against the patient's confident non-B cells.

    Reads ``X`` (log-normalised), ``obs`` patient, lineage, cell type and its confidence.
    Writes ``obsm[OBSM_CNV]`` (cells x windows, float32; zeros for patients without enough
    reference cells), ``obs[OBS_CNV_SCORE]`` (mean absolute signal; NaN where not inferred)
    and ``uns[UNS_CNV]`` (``windows``: chromosome/start/end per column, ``window``, ``step``,
    ``patients_skipped``). Returns ``adata``.

    ``b_reference``: boolean mask of B cells known not to belong to a clone (polyclonal
    normal B cells of any patient); with at least ``min_b_reference_cells`` of them their
    pooled mean is one more reference category, so B-cell-specific genes (CD19, CD79A, ...)
    are not read as focal gains.
    """
    import anndata as ad
    import infercnvpy as cnv

    var = gene_positions_var(adata, species)
    n_placed = int(var["chromosome"].notna().sum())
    w0, s0 = default_window(n_placed)
    window = window or w0
    step = step or s0
    windows = window_positions(var, window, step)
    n_win = len(windows)
    M = np.zeros((adata.n_obs, n_win), dtype=np.float32)
    score = np.full(adata.n_obs, np.nan, dtype=np.float32)
    patients = adata.obs[schema.OBS_PATIENT].astype(str).to_numpy()
    lineage = adata.obs[schema.OBS_LINEAGE].astype(str).to_numpy()
    ctype = adata.obs[schema.OBS_CELL_TYPE].astype(str).to_numpy()
    conf = adata.obs[schema.OBS_CELL_TYPE_CONFIDENCE].to_numpy(dtype=float)
    is_ref = (
        (lineage != B_LINEAGE)
        & (ctype != schema.UNASSIGNED)
        & (conf >= min_reference_confidence)
        & ~np.char.startswith(ctype.astype(str), "CLL")
    )
    if schema.OBS_DOUBLET_CLUSTER in adata.obs:
        is_ref &= ~adata.obs[schema.OBS_DOUBLET_CLUSTER].to_numpy(dtype=bool)
    b_ref_mean = None
    if b_reference is not None and int(np.sum(b_reference)) >= min_b_reference_cells:
        Xb = adata.X[np.flatnonzero(b_reference)]
        b_ref_mean = np.asarray(Xb.mean(axis=0)).ravel()
    skipped = []
    if n_placed < 5 * window:
        log.warning(
            "malignant: only %d genes with a genomic position (%s); copy-number inference skipped",
            n_placed,
            species,
        )
        skipped = sorted(set(patients))
    for p in sorted(set(patients)) if not skipped else []:
        cells = np.flatnonzero(patients == p)
        ref = cells[is_ref[cells]]
        types, counts = np.unique(ctype[ref], return_counts=True)
        ref_types = [t for t, n in zip(types, counts) if n >= 5]
        if len(ref) < min_reference_cells or not ref_types:
            log.warning(
                "malignant: patient %s has %d confident non-B cells (< %d); "
                "no copy-number inference for it",
                p,
                len(ref),
                min_reference_cells,
            )
            skipped.append(p)
            continue
        # a lean AnnData (X and the gene positions): not a copy of the patient's counts
        # layer, embeddings and graphs
        X = adata.X[cells]
        sub = ad.AnnData(
            X=X, obs=pd.DataFrame(index=adata.obs_names[cells]), var=var.loc[adata.var_names]
        )
        rows = [
            np.asarray(X[np.flatnonzero(is_ref[cells] & (ctype[cells] == t))].mean(axis=0)).ravel()
            for t in ref_types
        ]
        if b_ref_mean is not None:
            rows.append(b_ref_mean)
        _, res, _ = cnv.tl.infercnv(
            sub,
            reference=np.vstack(rows),
            window_size=window,
            step=step,
            exclude_chromosomes=None,
            dynamic_threshold=dynamic_threshold,
            lfc_clip=lfc_clip,
            n_jobs=1,
            inplace=False,
        )
        R = res.toarray() if sp.issparse(res) else np.asarray(res)
        if R.shape[1] != n_win:  # pragma: no cover - windowing mirrors infercnvpy
            raise RuntimeError(f"infercnvpy returned {R.shape[1]} windows, expected {n_win}")
        M[cells] = R.astype(np.float32)
        score[cells] = np.abs(R).mean(axis=1)
    adata.obsm[schema.OBSM_CNV] = M
    adata.obs[schema.OBS_CNV_SCORE] = score
    adata.uns[schema.UNS_CNV] = {
        "windows": windows,
        "window": int(window),
        "step": int(step),
        "n_genes_placed": n_placed,
        "patients_skipped": list(skipped),
    }
    return adata


def lesion_scores(adata, lesions: pd.DataFrame) -> np.ndarray:
    """Cells x lesions: mean of ``obsm[OBSM_CNV]`` over the windows overlapping each lesion."""
    win = adata.uns[schema.UNS_CNV]["windows"]
    if not isinstance(win, pd.DataFrame):
        win = pd.DataFrame(dict(win))
    M = adata.obsm[schema.OBSM_CNV]
    out = np.zeros((adata.n_obs, len(lesions)), dtype=np.float32)
    for j, r in enumerate(lesions.itertuples()):
        sel = (
            (win["chromosome"].astype(str) == str(r.chromosome))
            & (win["end"] >= r.start)
            & (win["start"] <= r.end)
        ).to_numpy()
        if sel.any():
            out[:, j] = np.asarray(M[:, sel]).mean(axis=1)
    return out


def lesion_carriers(
    scores: np.ndarray,
    lesions: pd.DataFrame,
    ref_mask: np.ndarray,
    *,
    z: float = 1.645,
    min_shift: float = 0.0,
) -> np.ndarray:
    """Cells x lesions (bool): beyond ``z`` SDs of the reference cells in the lesion's
    direction (default: the reference's one-sided 95th percentile, so ~5% of cells without
    the lesion count as carriers; a per-cell indication, the patient-level call is in
    :func:`preprocessing.malignant.call_malignant`)."""
    ref = scores[ref_mask]
    mu = ref.mean(axis=0) if len(ref) else np.zeros(scores.shape[1])
    sd = ref.std(axis=0) if len(ref) > 1 else np.full(scores.shape[1], np.inf)
    sign = np.where(lesions["kind"].to_numpy() == "gain", 1.0, -1.0)
    d = (scores - mu) * sign
    return (d > z * np.maximum(sd, 1e-6)) & (d > min_shift)
