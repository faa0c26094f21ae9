"""B-cell receptor V(D)J data: Cell Ranger ``filtered_contig_annotations.csv`` and clonotypes.

The sample sheet's optional column ``vdj`` (:data:`atlas.schema.SHEET_VDJ`) names a Cell
Ranger V(D)J ``filtered_contig_annotations.csv`` per sample (path relative to the sheet).
:func:`read_contigs` validates one file against the sample's expression barcodes at ingest
(before any heavy compute); :func:`bcr_clonotypes` calls clonotypes with scirpy (identical
CDR3 nucleotide sequences of heavy and light chains, the receptor arms of the cell's primary
chains) over all samples at once, so one clone keeps one id across a patient's samples.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from atlas import schema

from .log import get_logger

log = get_logger("vdj")

# columns a filtered_contig_annotations.csv must have (Cell Ranger >= 3)
REQUIRED_COLUMNS = ("barcode", "contig_id", "chain", "v_gene", "cdr3_nt", "productive", "umis")
# columns kept in the build's contig table (optional ones are filled when absent)
KEPT_COLUMNS = (
    "barcode", "is_cell", "contig_id", "high_confidence", "length", "chain", "v_gene", "d_gene",
    "j_gene", "c_gene", "full_length", "productive", "cdr3", "cdr3_nt", "reads", "umis",
)  # fmt: skip
# IgBLAST / AIRR-annotated files may carry the V-gene identity to germline (percent)
IDENTITY_COLUMNS = ("v_identity", "v_identity_pct", "ighv_identity")
IG_CHAINS = ("IGH", "IGK", "IGL")
MIN_BARCODE_MATCH = 0.5  # a file whose cell barcodes mostly miss the sample is the wrong file
M_CLL_IDENTITY = 98.0  # < 98% identity to germline: IGHV-mutated (iwCLL; Hallek 2018)


def read_contigs(path: str | Path, barcodes, *, label: str) -> pd.DataFrame:
    """Read and check one ``filtered_contig_annotations.csv`` against the sample's barcodes.

    Returns the contigs of cells (``is_cell``, productive, immunoglobulin chains) with the
    columns of :data:`KEPT_COLUMNS` (+ ``v_identity`` when the file has an identity column).
    Raises ``ValueError`` with one line naming the file when it cannot be read, lacks a
    required column, holds no contigs, or when fewer than half of its cell barcodes are
    barcodes of the sample's expression matrix.
    """
    path = Path(path)
    where = f"{label}: V(D)J file {path.name}"
    if not path.is_file():
        raise ValueError(f"{where}: file not found ({path})")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise ValueError(f"{where}: not a readable CSV ({type(e).__name__})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"{where}: not a Cell Ranger filtered_contig_annotations.csv "
            f"(missing column(s) {', '.join(missing)})"
        )
    if df.empty:
        raise ValueError(f"{where}: has no contigs")
    umis = pd.to_numeric(df["umis"], errors="coerce")
    if umis.isna().any() or (umis < 0).any():
        bad = int((umis.isna() | (umis < 0)).sum())
        raise ValueError(f"{where}: {bad} row(s) with a non-numeric or negative 'umis' value")
    for c in KEPT_COLUMNS:
        if c not in df.columns:
            df[c] = "True" if c in ("is_cell", "high_confidence", "full_length") else ""
    ident = next((c for c in IDENTITY_COLUMNS if c in df.columns), None)
    keep = list(KEPT_COLUMNS) + ([ident] if ident else [])
    df = df[keep].rename(columns={ident: "v_identity"} if ident else {})
    truthy = {"true", "t", "1", "yes"}
    df = df[df["is_cell"].str.lower().isin(truthy)]
    df = df[df["productive"].str.lower().isin(truthy)]
    bcs = set(map(str, barcodes))
    cell_bcs = pd.unique(df["barcode"])
    if len(cell_bcs) == 0:
        raise ValueError(f"{where}: has no productive contigs of cells")
    hit = np.fromiter((b in bcs for b in cell_bcs), bool, len(cell_bcs))
    if hit.mean() < MIN_BARCODE_MATCH:
        raise ValueError(
            f"{where}: only {int(hit.sum())} of {len(cell_bcs)} cell barcodes "
            f"({hit.mean():.0%}) are barcodes of the sample's expression data "
            "(another sample's file, or a different barcode suffix?)"
        )
    df = df[df["barcode"].isin(bcs) & df["chain"].isin(IG_CHAINS)]
    return df.reset_index(drop=True)


def contigs_table(parts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One table of all samples' contigs; ``barcode`` becomes the cell id ``sample:barcode``."""
    rows = []
    for sid, df in parts.items():
        d = df.copy()
        d["barcode"] = sid + ":" + d["barcode"].astype(str)
        d["contig_id"] = sid + ":" + d["contig_id"].astype(str)
        rows.append(d)
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=KEPT_COLUMNS)


def bcr_clonotypes(contigs: pd.DataFrame) -> pd.DataFrame:
    """Clonotype per cell from contigs (cell ids in ``barcode``) with scirpy.

    Returns a DataFrame indexed by cell id with ``clonotype`` (scirpy ``clone_id``, identical
    CDR3 nucleotide sequences of the primary heavy and light chains), ``ighv``, ``light_v``
    and ``v_identity`` (NaN when the file has none).
    """
    import scirpy as ir

    cols = [c for c in KEPT_COLUMNS]
    with tempfile.TemporaryDirectory(prefix="tme_vdj_") as tmp:
        f = Path(tmp) / "filtered_contig_annotations.csv"
        # csv-ok: a private temp file read back by scirpy at once; escaping would alter contigs
        contigs[cols].to_csv(f, index=False)
        vdj = ir.io.read_10x_vdj(str(f))
    ir.pp.index_chains(vdj)
    ir.tl.chain_qc(vdj)
    ir.pp.ir_dist(vdj, metric="identity", sequence="nt")
    ir.tl.define_clonotypes(vdj, receptor_arms="all", dual_ir="primary_only")
    chains = ir.get.airr(vdj, ["v_call"], ["VDJ_1", "VJ_1"])
    out = pd.DataFrame(index=vdj.obs_names.astype(str))
    out[schema.OBS_CLONOTYPE] = vdj.obs["clone_id"].astype(str).to_numpy()
    out["ighv"] = chains["VDJ_1_v_call"].astype(object).fillna("").astype(str).to_numpy()
    out["light_v"] = chains["VJ_1_v_call"].astype(object).fillna("").astype(str).to_numpy()
    # cells without a heavy or a light chain: no clonotype (scirpy gives them their own id)
    lacking = (out["ighv"] == "") & (out["light_v"] == "")
    out.loc[lacking, schema.OBS_CLONOTYPE] = ""
    if "v_identity" in contigs.columns:
        heavy = contigs[contigs["chain"] == "IGH"].copy()
        heavy["umis_n"] = pd.to_numeric(heavy["umis"], errors="coerce")
        heavy["v_identity"] = pd.to_numeric(heavy["v_identity"], errors="coerce")
        top = heavy.sort_values("umis_n", ascending=False).drop_duplicates("barcode")
        out["v_identity"] = top.set_index("barcode")["v_identity"].reindex(out.index)
    else:
        out["v_identity"] = np.nan
    return out


def ighv_status(identity: float) -> str:
    """``"M-CLL"`` (< 98% identity), ``"U-CLL"`` (>= 98%) or ``""`` (unknown)."""
    if identity is None or not np.isfinite(identity):
        return ""
    return "M-CLL" if identity < M_CLL_IDENTITY else "U-CLL"
