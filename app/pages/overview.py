"""Overview: cells, samples, patients, conditions; composition per condition and patient
with the composition test results; QC summary."""

from __future__ import annotations

import numpy as np
import pandas as pd
from dash import html

from atlas import schema

from .. import components as C
from .. import figures as F

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
                    "No composition test results in this atlas yet: run `tme-atlas analyse DIR`.",
                    "info",
                ),
                title="Composition test results",
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
            html.H2("Quality control", className="section"),
            *qc_section(ctx),
        ],
        className="page",
    )


def register(app, ctx) -> None:  # static page: no callbacks
    return None
