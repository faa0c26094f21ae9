"""One malignant (CLL) call per cell: BCR clonality, copy number and the CLL programme.

Markers alone cannot tell a leukaemia from normal B cells (every B cell expresses a light
chain; Emu-TCL1 mice express TCL1 in all B cells). A CLL is a clone, so the call rests on
clonality first, per patient, within the B lineage of the annotation:

1. **Clonotype** per cell: from V(D)J contigs when the sample sheet gives them (scirpy,
   :mod:`preprocessing.vdj`), otherwise from the immunoglobulin V genes the cell expresses
   most (``IGHV*`` and ``IGKV*``/``IGLV*`` counts; ``<IGHV>|<light V>``).
2. **Dominant clone**: the most frequent clonotype among the patient's typed B cells. The
   patient has a clonal B population when it holds >= ``min_clone_fraction`` of them (and
   >= ``min_clone_cells`` cells); a polyclonal repertoire spreads over dozens of V genes.
   Without clonotype information, a recurrent copy-number lesion of the B cells stands in
   as the clonal marker.
3. **Copy number** (:mod:`preprocessing.cnv`): infercnvpy against the patient's own non-B cells
   (plus the polyclonal B cells of the cohort); a lesion is called in a patient when the
   clone's mean signal over the lesion is >= ``min_lesion_effect`` reference-cell SDs away
   from the patient's reference cells in the lesion's direction and the share of clone cells
   carrying it exceeds that of the reference cells by >= ``min_lesion_carrier_excess``
   (a narrow region read through few genes can shift the mean without being carried);
   per-patient lesion table
   (trisomy 12, del(13q14), del(11q22), del(17p13), others).
4. **Call**: a patient without a clonal B population has **no** CLL cells. Otherwise a B
   cell is malignant when it carries the dominant clonotype; a B cell without clonotype
   information follows its typed neighbours in the kNN graph, else the lesions it carries,
   else the CLL-vs-normal-B programme (CD5, ROR1, LEF1, FMOD, CD200, ... ; TCL1 is never
   evidence). The confidence is the weighted agreement of the evidence available for the
   cell (clonotype 2, copy number 1, programme 1).

The CLL labels follow the call: B-lineage cells not called malignant become ``Normal B``;
malignant cells labelled ``Normal B`` become the resting CLL state.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlas import schema

from .cnv import B_LINEAGE, infer_cnv, lesion_carriers, lesion_scores, load_lesions
from .log import get_logger

log = get_logger("malignant")

NORMAL_B = "Normal B"
CLL_RESTING = "CLL resting"
TCL1 = ("TCL1A", "Tcl1", "Tcl1a", "TCL1B")  # Emu-TCL1: transgene in every B cell
V_GENE_PATTERNS = {
    "heavy": re.compile(r"^IGHV\d", re.IGNORECASE),
    "light": re.compile(r"^IG[KL]V\d", re.IGNORECASE),
}
WEIGHTS = {"clonotype": 2.0, "cnv": 1.0, "programme": 1.0}


# ----------------------------------------------------------------------------- evidence
def cll_programme_score(adata, *, species: str = "human") -> np.ndarray:
    """CLL-vs-normal-B programme per cell (NaN outside the B lineage).

    Mean z-score (within the B lineage, clipped at +-3) of the genes the CLL resting type adds
    to normal B in ``references/markers_<species>.csv`` minus that of the normal-B genes; TCL1
    genes are left out.
    """
    from .annotate import load_markers

    m = load_markers(species)
    up = lambda t: set(m.loc[(m.cell_type == t) & (m.direction == "up"), "gene"])  # noqa: E731
    cll = sorted(up(CLL_RESTING) - up(NORMAL_B) - set(TCL1))
    nb = sorted(up(NORMAL_B) - up(CLL_RESTING) - set(TCL1))
    cll = [g for g in cll if g in adata.var_names]
    nb = [g for g in nb if g in adata.var_names]
    out = np.full(adata.n_obs, np.nan)
    b = adata.obs[schema.OBS_LINEAGE].astype(str).to_numpy() == B_LINEAGE
    if b.sum() < 3 or not cll:
        return out
    genes = cll + nb
    E = adata[b][:, genes].X
    E = E.toarray() if sp.issparse(E) else np.asarray(E)
    Z = np.clip((E - E.mean(0)) / np.maximum(E.std(0), 0.05), -3, 3)
    s = Z[:, : len(cll)].mean(1) - (Z[:, len(cll) :].mean(1) if nb else 0.0)
    out[b] = s
    return out


def expression_clonotypes(adata) -> pd.DataFrame:
    """Per cell: the IGHV and light-chain V gene with most counts (``""`` when none).

    Reads ``layers["counts"]`` (``X`` when absent). Columns ``ighv``, ``light_v``,
    ``clonotype`` (``"<IGHV>|<light V>"``, ``""`` when neither chain is measured).
    """
    names = adata.var_names.astype(str)
    C = adata.layers[schema.LAYER_COUNTS] if schema.LAYER_COUNTS in adata.layers else adata.X
    C = sp.csr_matrix(C)
    out = pd.DataFrame(index=adata.obs_names)
    for chain, rx in V_GENE_PATTERNS.items():
        idx = np.flatnonzero([bool(rx.match(g)) for g in names])
        col = "ighv" if chain == "heavy" else "light_v"
        if idx.size == 0:
            out[col] = ""
            continue
        S = C[:, idx].toarray()
        top = S.argmax(1)
        has = S.max(1) > 0
        out[col] = np.where(has, names[idx][top], "")
    both = (out["ighv"] != "") | (out["light_v"] != "")
    out[schema.OBS_CLONOTYPE] = np.where(both, out["ighv"] + "|" + out["light_v"], "")
    return out


def _matches(ighv: pd.Series, light: pd.Series, dom_h: str, dom_l: str) -> np.ndarray:
    """Expression clonotype agrees with the dominant one (a missing chain does not count)."""
    h = ighv.to_numpy()
    lv = light.to_numpy()
    ok_h = (h == dom_h) if dom_h else np.ones(len(h), bool)
    ok_l = (lv == dom_l) | (lv == "") if dom_l else np.ones(len(h), bool)
    if dom_h:
        ok_h &= h != ""
    return ok_h & ok_l & ((h != "") | (lv != ""))


def _neighbour_vote(adata, cells: np.ndarray, typed: np.ndarray, vote: np.ndarray):
    """Mean ``vote`` (+1 / -1) of each of ``cells``' typed kNN neighbours (NaN: none)."""
    conn = adata.obsp.get("connectivities") if hasattr(adata, "obsp") else None
    out = np.full(cells.size, np.nan)
    if conn is None or not typed.any():
        return out
    conn = sp.csr_matrix(conn)
    v = np.zeros(adata.n_obs)
    w = np.zeros(adata.n_obs)
    v[typed] = vote[typed]
    w[typed] = 1.0
    num = conn[cells] @ v
    den = conn[cells] @ w
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return out


# ----------------------------------------------------------------------------- the call
def _shallow_copy(adata):
    """What the first (clonotype-only) pass may change, copied; the matrices it only reads
    shared. ``adata.copy()`` there duplicated X, the counts layer and every embedding (2+ GB
    at 232k cells) for a pass that writes ``obs`` columns, tables and ``uns`` entries."""
    import anndata as ad

    out = ad.AnnData(
        X=adata.X,
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        layers={k: adata.layers[k] for k in adata.layers},
        obsp={k: adata.obsp[k] for k in adata.obsp},
    )
    out.uns.update(adata.uns)
    if schema.UNS_TABLES in adata.uns:
        out.uns[schema.UNS_TABLES] = dict(adata.uns[schema.UNS_TABLES])
    return out


def call_malignant(
    adata,
    *,
    species: str = "human",
    min_clone_fraction: float = 0.2,
    min_clone_cells: int = 10,
    min_lesion_effect: float = 0.65,
    min_lesion_carrier_excess: float = 0.15,
    min_lesion_cells: int = 10,
    cnv: bool = True,
    keep_cnv_matrix: bool = False,
    _first_pass: bool = False,
):
    """The malignant call per cell (see the module docstring).

    Reads ``X`` (log-normalised), ``layers["counts"]``, ``obs`` patient, lineage, cell type
    (+confidence); V(D)J contigs from the table :data:`~atlas.schema.TABLE_VDJ_CONTIGS`
    when the sample sheet had a ``vdj`` column. Writes ``obs``: :data:`~atlas.schema.OBS_MALIGNANT`
    (bool), ``OBS_MALIGNANT_CONFIDENCE``, ``OBS_MALIGNANT_EVIDENCE``, ``OBS_CNV_SCORE``,
    ``OBS_CLONOTYPE``, ``OBS_CLONOTYPE_SOURCE``, ``OBS_IN_DOMINANT_CLONE``,
    ``OBS_CLL_PROGRAMME``; relabels ``OBS_CELL_TYPE`` of the B lineage; tables
    ``TABLE_LESIONS``, ``TABLE_CNV_PROFILE``, ``TABLE_CLONES``; ``uns[UNS_MALIGNANT]``
    (parameters, versions). Returns ``adata``.
    """
    from importlib import metadata

    from atlas.tables import get_table, has_table, put_table

    from .vdj import bcr_clonotypes, ighv_status

    obs = adata.obs
    n = adata.n_obs
    patients = obs[schema.OBS_PATIENT].astype(str).to_numpy()
    lineage = obs[schema.OBS_LINEAGE].astype(str).to_numpy()
    is_b = lineage == B_LINEAGE

    # --- evidence 1: clonotypes
    expr = expression_clonotypes(adata)
    clon = expr[schema.OBS_CLONOTYPE].to_numpy().astype(object)
    source = np.where(clon != "", "expression", "").astype(object)
    vdj = None
    if has_table(adata, schema.TABLE_VDJ_CONTIGS):
        contigs = get_table(adata, schema.TABLE_VDJ_CONTIGS)
        if len(contigs):
            vdj = bcr_clonotypes(contigs).reindex(adata.obs_names)
            has_vdj = vdj[schema.OBS_CLONOTYPE].fillna("").to_numpy() != ""
            clon[has_vdj] = "vdj:" + vdj[schema.OBS_CLONOTYPE].to_numpy()[has_vdj].astype(str)
            source[has_vdj] = "vdj"
        # the contigs were input; the atlas keeps the per-cell result only
        tables = dict(adata.uns[schema.UNS_TABLES])
        tables.pop(schema.TABLE_VDJ_CONTIGS, None)
        adata.uns[schema.UNS_TABLES] = tables

    # --- evidence 2: programme
    prog = cll_programme_score(adata, species=species)

    # --- evidence 3: copy number, once clonality is known (polyclonal B cells join the
    # reference, so B-cell genes are not read as gains)
    lesions = load_lesions(species)
    carriers = np.zeros((n, len(lesions)), bool)
    ref_mask = np.zeros(n, bool)
    inferred = np.zeros(n, bool)
    called_pre: dict[str, np.ndarray] = {}
    if cnv and len(lesions):
        first = call_malignant(_shallow_copy(adata), species=species, cnv=False,
                               min_clone_fraction=min_clone_fraction,
                               min_clone_cells=min_clone_cells, _first_pass=True)  # fmt: skip
        clone0 = first.obs[schema.OBS_IN_DOMINANT_CLONE].to_numpy(dtype=bool)
        typed0 = first.obs[schema.OBS_CLONOTYPE_SOURCE].astype(str).to_numpy() != ""
        infer_cnv(adata, species=species, dynamic_threshold=None,
                  b_reference=is_b & typed0 & ~clone0)  # fmt: skip
        inferred = np.isfinite(adata.obs[schema.OBS_CNV_SCORE].to_numpy())
        scores = lesion_scores(adata, lesions)
        ref_mask = ~is_b & inferred
        sign = np.where(lesions["kind"].to_numpy() == "gain", 1.0, -1.0)
        for p in sorted(set(patients)):
            pm = (patients == p) & inferred
            ref = pm & ref_mask
            if ref.sum() < 3:
                continue
            query = pm & clone0
            if query.sum() < min_lesion_cells:
                query = pm & is_b
            mu, sd = scores[ref].mean(0), np.maximum(scores[ref].std(0), 1e-6)
            carriers[pm] = lesion_carriers(scores[pm], lesions, ref[pm])
            if query.sum() >= min_lesion_cells:
                d = (scores[query].mean(0) - mu) / sd * sign
                # and carried by a real share of the clone beyond the reference's background
                excess = carriers[query].mean(0) - carriers[ref].mean(0)
                called_pre[p] = (d >= min_lesion_effect) & (excess >= min_lesion_carrier_excess)
    else:
        adata.obs[schema.OBS_CNV_SCORE] = np.full(n, np.nan, dtype=np.float32)
    malignant = np.zeros(n, bool)
    in_clone = np.zeros(n, bool)
    conf = np.full(n, np.nan)
    evidence = np.full(n, "", dtype=object)
    evidence[~is_b] = "not B lineage"
    clone_rows, lesion_rows = [], []
    for p in sorted(set(patients)):
        pc = np.flatnonzero(patients == p)
        b = pc[is_b[pc]]
        # lesions in the patient's B cells
        n_b = max(b.size, 1)
        frac_b = carriers[b].sum(0) / n_b
        ref_p = pc[ref_mask[pc]]
        frac_ref = carriers[ref_p].sum(0) / max(ref_p.size, 1)
        lesion_called = called_pre.get(p, np.zeros(len(lesions), bool)).copy()
        # dominant clone among typed B cells, V(D)J first
        row = {schema.OBS_PATIENT: p, "n_b_cells": int(b.size), "clonal": False}
        match = np.zeros(b.size, bool)
        typed = np.zeros(b.size, bool)
        src_b = source[b]
        for src in ("vdj", "expression"):
            t = src_b == src
            if t.sum() == 0:
                continue
            if src == "vdj":
                vc = pd.Series(clon[b][t]).value_counts()
                dom = vc.index[0]
                m = clon[b] == dom
                ighv = str(vdj.loc[adata.obs_names[b][t & m], "ighv"].mode().iat[0])
                light = str(vdj.loc[adata.obs_names[b][t & m], "light_v"].mode().iat[0])
                ident = vdj.loc[adata.obs_names[b][t & m], "v_identity"].median()
            else:
                eh = expr["ighv"].to_numpy()[b][t]
                el = expr["light_v"].to_numpy()[b][t]
                pair = pd.Series(eh + "|" + el)
                dom = pair.value_counts().index[0]
                ighv, light = dom.split("|")
                m = _matches(expr["ighv"].iloc[b], expr["light_v"].iloc[b], ighv, light)
                ident = np.nan
            frac = float((m & t).sum() / t.sum())
            if src == "vdj" or not row.get("source"):
                row.update(
                    source=src, clonotype=str(dom), ighv=ighv, light_v=light,
                    ighv_identity=float(ident) if np.isfinite(ident) else np.nan,
                    ighv_status=ighv_status(ident), n_typed=int(t.sum()),
                    clone_fraction=frac,
                )  # fmt: skip
            match[t] = m[t]
            typed |= t
        if typed.any():
            n_match = int(match.sum())
            row["clonal"] = bool(
                row["clone_fraction"] >= min_clone_fraction and n_match >= min_clone_cells
            )
        else:
            row.update(source="cnv" if lesion_called.any() else "", clonotype="", ighv="",
                       light_v="", ighv_identity=np.nan, ighv_status="", n_typed=0,
                       clone_fraction=np.nan)  # fmt: skip
            row["clonal"] = bool(lesion_called.any())
        clonal = row["clonal"]
        in_clone[b] = match & clonal
        if not clonal:
            evidence[b] = "no clonal B population"
            conf[b] = 0.9 if typed.sum() >= min_clone_cells else 0.6
            row["n_malignant"] = 0
            clone_rows.append(row)
            lesion_called[:] = False
        else:
            # per-cell votes: +1 malignant, -1 normal, 0/NaN unknown
            v_clone = np.where(typed, np.where(match, 1.0, -1.0), np.nan)
            called_l = np.flatnonzero(lesion_called)
            if called_l.size:
                carries = carriers[b][:, called_l].any(1)
                v_cnv = np.where(inferred[b], np.where(carries, 1.0, -0.5), np.nan)
            else:
                v_cnv = np.full(b.size, np.nan)
            pr = prog[b]
            v_prog = np.where(np.isfinite(pr), np.clip(pr, -1, 1), np.nan)
            call = np.where(typed, match, False)
            untyped = ~typed
            if untyped.any():
                votes = np.where(typed, np.where(match, 1.0, -1.0), 0.0)
                full = np.zeros(n)
                full[b] = votes
                typed_full = np.zeros(n, bool)
                typed_full[b] = typed
                nb_vote = _neighbour_vote(adata, b[untyped], typed_full, full)
                fallback = np.where(
                    np.isfinite(v_cnv[untyped]) & (v_cnv[untyped] > 0),
                    1.0,
                    np.nan_to_num(v_prog[untyped], nan=1.0),
                )
                decide = np.where(np.isfinite(nb_vote), nb_vote + 0.5 * fallback, fallback)
                call[untyped] = decide > 0
            sign = np.where(call, 1.0, -1.0)
            num = np.zeros(b.size)
            den = np.zeros(b.size)
            for name, v in (("clonotype", v_clone), ("cnv", v_cnv), ("programme", v_prog)):
                ok = np.isfinite(v)
                num[ok] += WEIGHTS[name] * v[ok] * sign[ok]
                den[ok] += WEIGHTS[name] * np.abs(np.where(ok, 1.0, 0.0))[ok]
            c = np.where(den > 0, 0.5 + 0.5 * np.clip(num / np.maximum(den, 1e-9), -1, 1), 0.5)
            malignant[b] = call
            conf[b] = c
            ev = []
            for i in range(b.size):
                parts = []
                if typed[i]:
                    parts.append(("clonotype" if src_b[i] == "vdj" else "v_genes") +
                                 ("+" if match[i] else "-"))  # fmt: skip
                else:
                    parts.append("neighbours")
                if np.isfinite(v_cnv[i]):
                    parts.append("cnv" + ("+" if v_cnv[i] > 0 else "-"))
                if np.isfinite(v_prog[i]):
                    parts.append("programme" + ("+" if v_prog[i] > 0 else "-"))
                ev.append(";".join(parts))
            evidence[b] = ev
            row["n_malignant"] = int(call.sum())
            clone_rows.append(row)
        mal_p = b[malignant[b]]
        for j, les in enumerate(lesions.itertuples()):
            lesion_rows.append(
                {
                    schema.OBS_PATIENT: p,
                    "lesion": les.lesion,
                    "chromosome": str(les.chromosome),
                    "start": int(les.start),
                    "end": int(les.end),
                    "kind": les.kind,
                    "called": bool(lesion_called[j]),
                    "frac_b_cells": float(frac_b[j]),
                    "frac_malignant": float(carriers[mal_p, j].mean()) if mal_p.size else np.nan,
                    "frac_reference": float(frac_ref[j]),
                    "n_b_cells": int(b.size),
                    "recurrent": les.recurrent == "yes",
                }  # fmt: skip
            )

    # --- write
    obs[schema.OBS_MALIGNANT] = malignant
    obs[schema.OBS_MALIGNANT_CONFIDENCE] = conf.astype(np.float32)
    obs[schema.OBS_MALIGNANT_EVIDENCE] = pd.Categorical(evidence.astype(str))
    obs[schema.OBS_CLONOTYPE] = pd.Categorical(np.asarray(clon, dtype=str))
    obs[schema.OBS_CLONOTYPE_SOURCE] = pd.Categorical(np.asarray(source, dtype=str))
    obs[schema.OBS_IN_DOMINANT_CLONE] = in_clone
    obs[schema.OBS_CLL_PROGRAMME] = prog.astype(np.float32)
    relabel_b_lineage(adata)
    clones = pd.DataFrame(clone_rows).reindex(columns=schema.TABLE_COLUMNS[schema.TABLE_CLONES])
    put_table(adata, schema.TABLE_CLONES, clones)
    put_table(
        adata,
        schema.TABLE_LESIONS,
        pd.DataFrame(lesion_rows, columns=schema.TABLE_COLUMNS[schema.TABLE_LESIONS]),
    )
    if schema.OBSM_CNV in adata.obsm:
        put_table(adata, schema.TABLE_CNV_PROFILE, cnv_profile(adata))
        win = adata.uns[schema.UNS_CNV]
        adata.uns[schema.UNS_CNV] = {k: v for k, v in win.items() if k != "windows"}
        if not keep_cnv_matrix:
            del adata.obsm[schema.OBSM_CNV]
    versions = {}
    for pkg in ("infercnvpy", "scirpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:  # pragma: no cover
            versions[pkg] = "not installed"
    adata.uns[schema.UNS_MALIGNANT] = {
        "species": species,
        "min_clone_fraction": min_clone_fraction,
        "min_clone_cells": min_clone_cells,
        "min_lesion_effect": min_lesion_effect,
        "min_lesion_carrier_excess": min_lesion_carrier_excess,
        "min_lesion_cells": min_lesion_cells,
        "cnv": bool(cnv and len(lesions)),
        "vdj": vdj is not None,
        "versions": versions,
    }
    n_b = int(is_b.sum())
    (log.debug if _first_pass else log.info)(
        "malignant: %d of %d B-lineage cells called CLL; clonal patients: %s",
        int(malignant.sum()),
        n_b,
        ", ".join(r[schema.OBS_PATIENT] for r in clone_rows if r["clonal"]) or "none",
    )
    return adata


def relabel_b_lineage(adata) -> None:
    """CLL labels follow the malignant call: B-lineage non-malignant -> ``Normal B``,
    malignant ``Normal B`` -> the resting CLL state."""
    ct = adata.obs[schema.OBS_CELL_TYPE]
    lab = ct.astype(str).to_numpy().copy()
    mal = adata.obs[schema.OBS_MALIGNANT].to_numpy(dtype=bool)
    is_cll = np.char.startswith(lab.astype(str), "CLL")
    lab[is_cll & ~mal] = NORMAL_B
    lab[(lab == NORMAL_B) & mal] = CLL_RESTING
    cats = list(ct.cat.categories) if hasattr(ct, "cat") else []
    for extra in (NORMAL_B, CLL_RESTING):
        if extra not in cats and (lab == extra).any():
            cats.append(extra)
    used = [c for c in cats if (lab == c).any()] + sorted(set(lab) - set(cats))
    adata.obs[schema.OBS_CELL_TYPE] = pd.Categorical(lab, categories=used)


def cnv_profile(adata) -> pd.DataFrame:
    """Mean copy-number signal per patient x group (malignant / normal B / reference) x window."""
    win = adata.uns[schema.UNS_CNV]["windows"]
    win = win if isinstance(win, pd.DataFrame) else pd.DataFrame(dict(win))
    M = np.asarray(adata.obsm[schema.OBSM_CNV])
    patients = adata.obs[schema.OBS_PATIENT].astype(str).to_numpy()
    is_b = adata.obs[schema.OBS_LINEAGE].astype(str).to_numpy() == B_LINEAGE
    mal = adata.obs[schema.OBS_MALIGNANT].to_numpy(dtype=bool)
    inferred = np.isfinite(adata.obs[schema.OBS_CNV_SCORE].to_numpy())
    rows = []
    for p in sorted(set(patients)):
        for group, sel in (
            ("malignant", mal),
            ("normal B", is_b & ~mal),
            ("reference", ~is_b),
        ):
            cells = (patients == p) & sel & inferred
            if cells.sum() < 3:
                continue
            mean = M[cells].mean(0)
            rows.append(
                pd.DataFrame(
                    {
                        schema.OBS_PATIENT: p,
                        "group": group,
                        "window": np.arange(len(win)),
                        "chromosome": win["chromosome"].astype(str).to_numpy(),
                        "start": win["start"].to_numpy(),
                        "end": win["end"].to_numpy(),
                        "mean": mean.astype(float),
                    }
                )
            )
    cols = schema.TABLE_COLUMNS[schema.TABLE_CNV_PROFILE]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=cols)


def run_malignant(adata, *, species: str = "human", config=None):
    """Build stage ``malignant`` (after ``annotate``): one malignant (CLL) call per cell.

    :func:`call_malignant` with the settings of ``config`` (:class:`atlas.config.MalignantConfig`;
    defaults when ``None``). V(D)J contigs of the sample sheet's ``vdj`` column arrive as the
    build-only table ``TABLE_VDJ_CONTIGS`` (removed here). The CLL labels of
    ``OBS_CELL_TYPE`` follow the call: a patient without a clonal B population has no CLL
    cells.

    Writes
    ------
    ``obs[schema.OBS_MALIGNANT]``, ``obs[schema.OBS_MALIGNANT_CONFIDENCE]``,
    ``obs[schema.OBS_MALIGNANT_EVIDENCE]``, ``obs[schema.OBS_CNV_SCORE]``,
    ``obs[schema.OBS_CLONOTYPE]``, ``obs[schema.OBS_CLONOTYPE_SOURCE]``,
    ``obs[schema.OBS_IN_DOMINANT_CLONE]``, ``obs[schema.OBS_CLL_PROGRAMME]``
    (and relabels ``obs[schema.OBS_CELL_TYPE]`` of the B lineage);
    tables ``schema.TABLE_LESIONS``, ``schema.TABLE_CNV_PROFILE``, ``schema.TABLE_CLONES``;
    ``uns[schema.UNS_MALIGNANT]``, ``uns[schema.UNS_CNV]``, ``uns[params_key("malignant")]``.
    """
    from atlas.config import MalignantConfig
    from atlas.params import record_params

    cfg = config if config is not None else MalignantConfig()
    opts = {
        "min_clone_fraction": cfg.min_clone_fraction,
        "min_clone_cells": cfg.min_clone_cells,
        "min_lesion_effect": cfg.min_lesion_effect,
        "min_lesion_carrier_excess": cfg.min_lesion_carrier_excess,
        "min_lesion_cells": cfg.min_lesion_cells,
        "cnv": cfg.cnv,
    }
    adata = call_malignant(adata, species=species, **opts)
    record_params(adata, "malignant", {"species": species, **opts})
    return adata
