"""Overview: cells, samples, patients, conditions; composition per condition and patient
with the composition test results; the malignant call per patient (clone, IGHV, copy-number
lesions, CNV heatmap); QC summary."""

from __future__ import annotations

import numpy as np
import pandas as pd
from dash import html

from atlas import schema

from .. import components as C
from .. import figures as F
from ..labels import run_hint

NAME = "overview"
PATH = "/"
TITLE = "Overview"


def _counts(view, group: str) -> pd.DataFrame:
    obs = view.obs
    if group not in obs.columns or schema.OBS_CELL_TYPE not in obs.columns:
        return pd.DataFrame(columns=[group, schema.OBS_CELL_TYPE, "n"])
    d = pd.DataFrame({group: view.cat(group), schema.OBS_CELL_TYPE: view.cat(schema.OBS_CELL_TYPE)})
    out = d.value_counts(sort=False).rename("n").reset_index()
    return out[out["n"] > 0]


def _pick(df: pd.DataFrame, *names: str) -> str | None:
    for n in names:
        if n in df.columns:
            return n
    return None


def composition_section(ctx) -> list:
    view = ctx.view
    cmap = F.colour_map(view.cell_types)
    by_cond = F.composition_bar(
        _counts(view, schema.OBS_CONDITION),
        group=schema.OBS_CONDITION,
        group_order=view.conditions,
        category_order=view.cell_types,
        title="Composition per condition",
    )
    by_pat = F.composition_bar(
        _counts(view, schema.OBS_PATIENT),
        group=schema.OBS_PATIENT,
        group_order=view.patients,
        category_order=view.cell_types,
        title="Composition per patient",
    )
    for fig in (by_cond, by_pat):
        for t in fig.data:
            t.marker.color = cmap.get(t.name, t.marker.color)
    by_cond.update_layout(showlegend=False)
    parts = [
        C.row(
            C.col(C.card(C.graph("overview-comp-condition", by_cond)), width=5),
            C.col(C.card(C.graph("overview-comp-patient", by_pat)), width=7),
        )
    ]
    if view.has_table(schema.TABLE_COMPOSITION):
        comp = view.table(schema.TABLE_COMPOSITION)
        effect = _pick(comp, "log2fc", "lfc", "log2_fold_change", "effect", "coef", "estimate")
        sig = _pick(comp, "padj", "fdr", "qvalue", "pvalue")
        fig = (
            F.composition_effects(
                comp,
                effect=effect,
                significance=sig,
                condition_order=view.conditions,
                cell_type_order=view.cell_types,
            )
            if effect and {"cell_type", "condition"} <= set(comp.columns)
            else F.empty_figure("Composition table has no effect column")
        )
        parts.append(
            C.row(
                C.col(
                    C.card(
                        C.graph("overview-comp-test", fig),
                        title=f"Composition change vs {view.reference or 'reference'}",
                        subtitle=f"{effect} of the cell-type proportion; ★ adjusted p < 0.05",
                    ),
                    width=5,
                ),
                C.col(
                    C.card(
                        C.table("overview-comp-table", comp, page_size=10),
                        title="Composition test results",
                        subtitle="Per cell type, each condition against the reference",
                    ),
                    width=7,
                ),
            )
        )
    else:
        parts.append(
            C.card(
                C.message(
                    "No composition test results in this atlas yet: run "
                    f"{run_hint(view, 'analyse')}.",
                    "info",
                ),
                title="Composition test results",
            )
        )
    return parts


def patient_lesion_table(lesions: pd.DataFrame, clones: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per patient: the dominant B clone and the copy-number lesions called.

    ``lesions`` is the atlas table ``cnv_lesions`` and ``clones`` the table ``b_clones``.
    Columns: ``patient``, ``clonal``, ``clone source``, ``IGHV``, ``IGHV status``,
    ``clone fraction``, ``malignant cells``, ``lesions called`` (``name (x% of malignant
    cells)``, ``;``-joined; ``none`` when the patient's clone carries none), then one
    column per recurrent lesion with the fraction of malignant cells carrying it (NaN where
    the lesion is not called).
    """
    pcol = schema.OBS_PATIENT
    pats = sorted(set(lesions[pcol].astype(str)) if len(lesions) else set())
    if clones is not None and len(clones):
        pats = sorted(set(pats) | set(clones[pcol].astype(str)))
    out = pd.DataFrame({pcol: pats})
    if clones is not None and len(clones):
        c = clones.assign(**{pcol: clones[pcol].astype(str)}).set_index(pcol)
        out["clonal"] = out[pcol].map(c["clonal"].astype(bool)).fillna(False).astype(bool)
        out["clone source"] = out[pcol].map(c["source"].astype(str)).fillna("")
        out["IGHV"] = out[pcol].map(c["ighv"].astype(str)).fillna("")
        out["IGHV status"] = out[pcol].map(c["ighv_status"].astype(str)).fillna("")
        out["clone fraction"] = out[pcol].map(c["clone_fraction"].astype(float))
        out["malignant cells"] = out[pcol].map(c["n_malignant"]).fillna(0).astype(int)
    called = (
        lesions[lesions["called"].astype(bool)].assign(**{pcol: lambda d: d[pcol].astype(str)})
        if len(lesions)
        else pd.DataFrame(columns=[pcol, "lesion", "frac_malignant"])
    )

    def _text(p: str) -> str:
        rows = called[called[pcol] == p]
        if rows.empty:
            return "none"
        return "; ".join(
            f"{r.lesion} ({r.frac_malignant:.0%})" if np.isfinite(r.frac_malignant) else r.lesion
            for r in rows.itertuples()
        )

    out["lesions called"] = [_text(p) for p in out[pcol]]
    if len(lesions):
        rec = lesions[lesions["recurrent"].astype(bool)]
        for name in dict.fromkeys(rec["lesion"].astype(str)):
            sub = called[called["lesion"].astype(str) == name].set_index(pcol)["frac_malignant"]
            out[name] = out[pcol].map(sub.astype(float))
    return out


def malignant_section(ctx) -> list:
    """The per-patient lesion table and the CNV heatmap (atlases with a malignant call)."""
    view = ctx.view
    if not view.has_table(schema.TABLE_LESIONS):
        return []
    lesions = view.table(schema.TABLE_LESIONS)
    clones = view.table(schema.TABLE_CLONES) if view.has_table(schema.TABLE_CLONES) else None
    table = patient_lesion_table(lesions, clones)
    parts = [
        html.H2("Malignant cells", className="section"),
        C.card(
            C.table("overview-lesion-table", table, page_size=10),
            title="Clone and copy-number lesions per patient",
            subtitle=(
                "Dominant B clone (V(D)J or expressed V genes), IGHV status, and the lesions "
                "called in the clone (share of malignant cells carrying each). A patient "
                "without a clonal B population has no malignant cells."
            ),
        ),
    ]
    if view.has_table(schema.TABLE_CNV_PROFILE):
        fig = F.cnv_heatmap(view.table(schema.TABLE_CNV_PROFILE), patients=view.patients)
        parts.append(
            C.card(
                C.graph("overview-cnv-heatmap", fig),
                title="Inferred copy number (infercnvpy)",
                subtitle="Mean signal per patient and group of cells; red gain, blue loss",
            )
        )
    return parts


def qc_section(ctx) -> list:
    view = ctx.view
    if view.has_table(schema.TABLE_QC_SUMMARY):
        qc = view.table(schema.TABLE_QC_SUMMARY)
    else:
        qc = pd.DataFrame()
    # cells per sample from the atlas itself (always available)
    obs = view.obs
    if schema.OBS_SAMPLE in obs.columns:
        d = pd.DataFrame({schema.OBS_SAMPLE: view.cat(schema.OBS_SAMPLE)})
        if schema.OBS_CONDITION in obs.columns:
            d[schema.OBS_CONDITION] = view.cat(schema.OBS_CONDITION)
        per = d.value_counts(sort=False).rename("cells").reset_index()
        per = per[per["cells"] > 0].astype({schema.OBS_SAMPLE: str})
        if schema.OBS_CONDITION in per.columns:
            per[schema.OBS_CONDITION] = per[schema.OBS_CONDITION].astype(str)
        if schema.OBS_CONDITION in per.columns:
            order = {c: i for i, c in enumerate(view.conditions)}
            per["_o"] = per[schema.OBS_CONDITION].map(order)
            per = per.sort_values(["_o", schema.OBS_SAMPLE]).drop(columns="_o")
        fig = F.qc_bars(
            per, value="cells", colour=schema.OBS_CONDITION, title="Cells per sample (after QC)"
        )
    else:
        fig = F.empty_figure("No sample column")
    qc_metrics = [
        c
        for c in (schema.OBS_TOTAL_COUNTS, schema.OBS_N_GENES, schema.OBS_PCT_MITO)
        if c in obs.columns
    ]
    med = [
        C.stat(f"median {c.replace('_', ' ')}", f"{np.nanmedian(obs[c].to_numpy(float)):,.1f}")
        for c in qc_metrics
    ]
    body = [
        C.row(
            C.col(
                C.card(
                    C.graph("overview-qc-cells", fig), html.Div(med, className="stats stats-small")
                ),
                width=5,
            ),
            C.col(
                C.card(
                    C.table("overview-qc-table", qc, page_size=10)
                    if not qc.empty
                    else C.message("No QC summary table in this atlas.", "info"),
                    title="QC summary per sample",
                ),
                width=7,
            ),
        )
    ]
    return body


def layout(ctx, params: dict) -> html.Div:
    view = ctx.view
    n_types = len(view.cell_types)
    stats = html.Div(
        [
            C.stat("cells", f"{view.n_cells:,}"),
            C.stat("genes", f"{len(view.gene_names):,}"),
            C.stat("samples", f"{len(view.samples):,}"),
            C.stat("patients", f"{len(view.patients):,}"),
            C.stat("conditions", f"{len(view.conditions):,}"),
            C.stat("cell types", f"{n_types:,}"),
        ],
        className="stats",
    )
    conds = html.Div(
        [
            html.Span(c + (" (reference)" if c == view.reference else ""), className="chip")
            for c in view.conditions
        ],
        className="chips",
    )
    return html.Div(
        [
            html.Div(
                [
                    html.H1("Atlas overview"),
                    html.P(
                        f"{view.species.capitalize()} atlas of the CLL tumour microenvironment "
                        "across resistance states. Conditions:",
                        className="lead",
                    ),
                    conds,
                ],
                className="page-head",
            ),
            stats,
            *composition_section(ctx),
            *malignant_section(ctx),
            html.H2("Quality control", className="section"),
            *qc_section(ctx),
        ],
        className="page",
    )


def register(app, ctx) -> None:  # static page: no callbacks
    return None
