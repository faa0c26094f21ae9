"""Interactions: ligand-receptor crosstalk per condition (table ``interactions``) and its
changes against the reference (``interactions_diff``).

Filters: condition, sender, receiver, ligand, receptor, curated only. Views: a dot plot
(sender→receiver x ligand→receptor), a heatmap of interaction strength between cell types,
a network (circle layout), the differential view (gained / lost), and, on clicking an
interaction, the ligand's expression in senders and the receptor's in receivers across
conditions (from the store's expression summary).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from dash import Input, Output, State, dcc, html, no_update

from atlas import schema

from .. import components as C
from .. import figures as F
from ..data import UnknownValue
from ..labels import run_hint
from ..urls import as_bool, as_list, build_query
from . import spatial

NAME = "interactions"
PATH = "/interactions"
TITLE = "Interactions"
TABLE_ROWS = 500  # rows sent to the browser table (the CSV download has all)
KEYS = ("source", "target", "ligand", "receptor")


def _spatial_link(ctx, view, ligand, receptor) -> list:
    """A link to where the pair is co-expressed in space (Spatial page), when it was scored."""
    sp = view.spatial
    name = f"{ligand}{spatial.LR_SEP}{receptor}"
    if sp is None or name not in sp.interactions:
        return []
    href = ctx.href(spatial.PATH, spatial.lr_href(str(ligand), str(receptor)))
    return [" · ", dcc.Link("where it is co-expressed in space", href=href, id="ia-spatial-link")]


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``strength`` (magnitude; higher = stronger) and ``specificity``
    (-log10 specificity rank; higher = more specific) to an interactions table."""
    d = df.copy()
    if "lr_means" in d.columns:
        d["strength"] = pd.to_numeric(d["lr_means"], errors="coerce")
    elif "magnitude" in d.columns:
        d["strength"] = pd.to_numeric(d["magnitude"], errors="coerce")
    elif "magnitude_rank" in d.columns:
        d["strength"] = -np.log10(np.clip(pd.to_numeric(d["magnitude_rank"]), 1e-12, 1))
    else:
        num = d.select_dtypes("number").columns
        d["strength"] = d[num[0]] if len(num) else 1.0
    if "specificity_rank" in d.columns:
        d["specificity"] = -np.log10(np.clip(pd.to_numeric(d["specificity_rank"]), 1e-12, 1))
    else:
        d["specificity"] = d["strength"]
    for k in KEYS:
        if k in d.columns:
            d[k] = d[k].astype(str)
    if schema.COL_CURATED in d.columns:
        d[schema.COL_CURATED] = (
            d[schema.COL_CURATED].astype(str).str.lower().isin(["true", "1", "yes"])
        )
    return d


def filter_interactions(
    df: pd.DataFrame,
    *,
    condition=None,
    senders=(),
    receivers=(),
    ligands=(),
    receptors=(),
    curated_only=False,
) -> pd.DataFrame:
    m = np.ones(len(df), dtype=bool)
    if condition and schema.COL_CONDITION in df.columns:
        m &= (df[schema.COL_CONDITION].astype(str) == condition).to_numpy()
    for col, vals in (
        ("source", senders),
        ("target", receivers),
        ("ligand", ligands),
        ("receptor", receptors),
    ):
        if vals:
            m &= df[col].isin(list(vals)).to_numpy()
    if curated_only and schema.COL_CURATED in df.columns:
        m &= df[schema.COL_CURATED].to_numpy(dtype=bool)
    return df[m]


def _values(df: pd.DataFrame, col: str) -> list[str]:
    return sorted(df[col].astype(str).unique()) if col in df.columns else []


# ----------------------------------------------------------------------------- layout
def layout(ctx, params: dict) -> html.Div:
    view = ctx.view
    head = html.Div(
        [
            html.H1("Interactions"),
            html.P(
                "Ligand–receptor crosstalk between cell types per condition "
                "(LIANA+ consensus), and how it changes against the reference.",
                className="lead",
            ),
        ],
        className="page-head",
    )
    if not view.has_table(schema.TABLE_INTERACTIONS):
        return html.Div(
            [
                head,
                C.message(
                    "This atlas has no ligand–receptor results yet: run "
                    f"{run_hint(view, 'crosstalk')}.",
                    "info",
                ),
            ],
            className="page",
        )
    df = prepare(view.table(schema.TABLE_INTERACTIONS))
    msgs: list[str] = []
    conds = [c for c in view.conditions if c in set(_values(df, "condition"))] or _values(
        df, "condition"
    )

    def pick_one(key, allowed, default):
        v = params.get(key)
        if v is None:
            return default
        if v in allowed:
            return v
        msgs.append(f"unknown {key} {v[:40]!r}")
        return default

    def pick_many(key, allowed):
        try:
            return view.check_choices(as_list(params.get(key)), allowed, key)
        except UnknownValue as e:
            msgs.append(str(e))
            return []

    condition = pick_one("condition", conds, conds[0] if conds else None)
    types = sorted(set(_values(df, "source")) | set(_values(df, "target")))
    senders = pick_many("sender", types)
    receivers = pick_many("receiver", types)
    ligands = pick_many("ligand", _values(df, "ligand"))
    receptors = pick_many("receptor", _values(df, "receptor"))
    curated = as_bool(params.get("curated"))
    has_diff = view.has_table(schema.TABLE_INTERACTIONS_DIFF)
    diff_conds = []
    if has_diff:
        dd = view.table(schema.TABLE_INTERACTIONS_DIFF)
        diff_conds = [c for c in view.conditions if c in set(_values(dd, "condition"))]
    contrast = pick_one("contrast", diff_conds, diff_conds[0] if diff_conds else None)

    filters = html.Div(
        [
            C.control("Condition", C.dropdown("ia-condition", conds, condition, clearable=False)),
            C.control(
                "Sender", C.dropdown("ia-sender", types, senders, multi=True, placeholder="all")
            ),
            C.control(
                "Receiver",
                C.dropdown("ia-receiver", types, receivers, multi=True, placeholder="all"),
            ),
            C.control(
                "Ligand",
                C.dropdown(
                    "ia-ligand", _values(df, "ligand"), ligands, multi=True, placeholder="all"
                ),
            ),
            C.control(
                "Receptor",
                C.dropdown(
                    "ia-receptor", _values(df, "receptor"), receptors, multi=True, placeholder="all"
                ),
            ),
            C.control(
                "",
                dcc.Checklist(
                    id="ia-curated",
                    options=[{"label": " curated CLL interactions only", "value": "curated"}],
                    value=["curated"] if curated else [],
                    className="checklist",
                ),
            ),
        ],
        className="controls",
    )
    if has_diff:
        diff_block = [
            html.Div(
                [
                    C.control(
                        f"Condition vs {view.reference or 'reference'}",
                        C.dropdown("ia-contrast", diff_conds, contrast, clearable=False),
                    )
                ],
                className="controls",
            ),
            C.row(
                C.col(C.graph("ia-diff"), width=6),
                C.col(C.table("ia-diff-table", pd.DataFrame(), page_size=12), width=6),
            ),
            html.P(
                "score: change of the per-sample interaction score (liana lr_means), "
                "patient-paired; called: significant and both partners change (driver "
                "'both'); driver: whose expression change moves it (ligand / receptor / "
                "both); source/target_frac_log2fc: change of the sender's / receiver's "
                "share of cells, shown beside (not part of the score).",
                className="muted",
            ),
        ]
    else:
        diff_block = [
            C.message(
                "No differential interactions in this atlas (needs the DE table and "
                f"{run_hint(view, 'crosstalk')}).",
                "info",
            ),
            html.Div(C.dropdown("ia-contrast", []), style={"display": "none"}),
        ]
    return html.Div(
        [
            head,
            html.Div(C.messages(msgs), id="ia-messages"),
            filters,
            html.Div(id="ia-count", className="muted small"),
            C.card(
                C.graph("ia-dotplot"),
                title="Interactions",
                subtitle="Colour: strength (mean of ligand and receptor expression); size: "
                "specificity (−log10 rank). Click a dot to see both partners' expression.",
            ),
            C.row(
                C.col(
                    C.card(
                        dcc.RadioItems(
                            id="ia-heat-metric",
                            options=[
                                {"label": " number of interactions", "value": "count"},
                                {"label": " summed strength", "value": "sum"},
                            ],
                            value="count",
                            inline=True,
                            className="radio",
                        ),
                        C.graph("ia-heatmap"),
                        title="Between cell types",
                    ),
                    width=6,
                ),
                C.col(
                    C.card(
                        C.graph("ia-network"),
                        title="Network",
                        subtitle="Arrows sender → receiver; width ∝ strength",
                    ),
                    width=6,
                ),
            ),
            C.card(
                html.Div(id="ia-selected", className="muted"),
                C.graph("ia-expression"),
                title="Partner expression across conditions",
            ),
            C.card(
                C.table("ia-table", pd.DataFrame(), page_size=10),
                title="Interaction table",
                subtitle=f"First {TABLE_ROWS} rows by strength; filter by typing in the "
                "header row; click a row to inspect it",
            ),
            C.card(*diff_block, title="Differential view: gained and lost interactions"),
            dcc.Store(id="ia-pick"),
        ],
        className="page",
    )


# ----------------------------------------------------------------------------- callbacks
def register(app, ctx) -> None:
    def table() -> pd.DataFrame:
        cache = ctx.__dict__.setdefault("_ia_cache", {})
        if "df" not in cache:
            cache["df"] = prepare(ctx.view.table(schema.TABLE_INTERACTIONS))
        return cache["df"]

    filter_inputs = [
        Input("ia-condition", "value"),
        Input("ia-sender", "value"),
        Input("ia-receiver", "value"),
        Input("ia-ligand", "value"),
        Input("ia-receptor", "value"),
        Input("ia-curated", "value"),
    ]

    @app.callback(
        Output("ia-dotplot", "figure"),
        Output("ia-heatmap", "figure"),
        Output("ia-network", "figure"),
        Output("ia-table", "data"),
        Output("ia-table", "columns"),
        Output("ia-count", "children"),
        *filter_inputs,
        Input("ia-heat-metric", "value"),
    )
    def _render(condition, senders, receivers, ligands, receptors, curated, metric):
        df = table()
        sub = filter_interactions(
            df,
            condition=condition,
            senders=senders or (),
            receivers=receivers or (),
            ligands=ligands or (),
            receptors=receptors or (),
            curated_only=schema.COL_CURATED in (curated or []),
        )
        dot = F.interaction_dotplot(
            sub, score="strength", size="specificity", title=f"{condition}" if condition else None
        )
        how = "sum" if metric == "sum" else "count"
        m = F.interaction_matrix(sub, score="strength", how=how)
        label = "summed strength" if how == "sum" else "interactions"
        heat = F.interaction_heatmap(m, label=label)
        net = F.interaction_network(m, label=label)
        shown = sub.sort_values("strength", ascending=False).head(TABLE_ROWS)
        cols = [
            c
            for c in (
                "condition",
                *KEYS,
                "strength",
                "specificity",
                "magnitude_rank",
                "specificity_rank",
                "curated",
                "curated_source",
            )
            if c in shown.columns
        ]
        shown = shown[cols]
        count = f"{len(sub):,} interactions match the filters (of {len(df):,})."
        return dot, heat, net, C.table_records(shown), C.table_columns(shown), count

    @app.callback(
        Output("ia-pick", "data"),
        Input("ia-dotplot", "clickData"),
        Input("ia-table", "active_cell"),
        State("ia-table", "derived_viewport_data"),
        State("ia-condition", "value"),
        prevent_initial_call=True,
    )
    def _pick(click, active, rows, condition):
        from dash import ctx as dash_ctx

        if dash_ctx.triggered_id == "ia-table":
            if not active or not rows or active.get("row", 0) >= len(rows):
                return no_update
            r = rows[active["row"]]
            return {k: r.get(k) for k in KEYS}
        if not click or not click.get("points"):
            return no_update
        p = click["points"][0]
        try:
            sender, receiver = (s.strip() for s in str(p["x"]).split("→"))
            ligand, receptor = (s.strip() for s in str(p["y"]).split("→"))
        except (KeyError, ValueError):
            return no_update
        return {"source": sender, "target": receiver, "ligand": ligand, "receptor": receptor}

    @app.callback(
        Output("ia-expression", "figure"),
        Output("ia-selected", "children"),
        Input("ia-pick", "data"),
    )
    def _expression(pick):
        view = ctx.view
        if not pick:
            return (
                F.empty_figure("Click an interaction in the dot plot or the table"),
                "No interaction chosen.",
            )
        ligand, receptor = pick.get(schema.COL_LIGAND), pick.get(schema.COL_RECEPTOR)
        genes_l = [g for g in str(ligand).split("_") if g]
        genes_r = [g for g in str(receptor).split("_") if g]
        try:  # complexes (A_B): show the first subunit the atlas has
            lg = next(view.resolve_gene(g) for g in genes_l if g.upper() in view._gene_set)
            rg = next(view.resolve_gene(g) for g in genes_r if g.upper() in view._gene_set)
        except StopIteration:
            return F.empty_figure(f"{ligand} / {receptor}: not measured in this atlas"), ""
        s = view.summary([lg, rg], by=[schema.OBS_CELL_TYPE, schema.OBS_CONDITION])
        s = s.rename(columns={schema.OBS_CELL_TYPE: "group"})
        fig = F.lr_expression_figure(
            s,
            ligand=lg,
            receptor=rg,
            sender=pick.get(schema.COL_SOURCE),
            receiver=pick.get(schema.COL_TARGET),
            condition_order=view.conditions,
            group_order=view.cell_types,
        )
        text = (
            f"{pick.get(schema.COL_SOURCE)} → {pick.get(schema.COL_TARGET)}: {ligand} → {receptor} "
            "(sender and receiver outlined)"
        )
        return fig, html.Span([text, *_spatial_link(ctx, view, ligand, receptor)])

    @app.callback(
        Output("ia-diff", "figure"),
        Output("ia-diff-table", "data"),
        Output("ia-diff-table", "columns"),
        Input("ia-contrast", "value"),
        Input("ia-sender", "value"),
        Input("ia-receiver", "value"),
        Input("ia-ligand", "value"),
        Input("ia-receptor", "value"),
        Input("ia-curated", "value"),
    )
    def _diff(contrast, senders, receivers, ligands, receptors, curated):
        view = ctx.view
        if not view.has_table(schema.TABLE_INTERACTIONS_DIFF) or not contrast:
            return no_update, no_update, no_update
        dd = prepare(view.table(schema.TABLE_INTERACTIONS_DIFF))
        sub = filter_interactions(
            dd,
            condition=contrast,
            senders=senders or (),
            receivers=receivers or (),
            ligands=ligands or (),
            receptors=receptors or (),
            curated_only=schema.COL_CURATED in (curated or []),
        )
        delta = next((c for c in ("score", "log2fc") if c in sub.columns), "strength")
        fig = F.interaction_diff_figure(
            sub,
            delta=delta,
            title=f"{contrast} vs {view.reference or 'reference'}: gained (red) and lost (blue)",
        )
        sign = np.sign(pd.to_numeric(sub[delta], errors="coerce").fillna(0).to_numpy())
        sub = sub.assign(
            change=np.where(sign > 0, "gained", np.where(sign < 0, "lost", "unchanged"))
        )
        cols = [
            c
            for c in (
                *KEYS,
                "change",
                "called",
                "driver",
                "score",
                "log2fc",
                "padj",
                "ligand_log2fc",
                "receptor_log2fc",
                "ligand_padj",
                "receptor_padj",
                "source_frac_log2fc",
                "target_frac_log2fc",
                "pvalue",
                "curated",
            )
            if c in sub.columns
        ]
        if schema.COL_PADJ in sub.columns:
            sub = sub.sort_values(schema.COL_PADJ, kind="stable")
        if "called" in sub.columns:  # two-sided calls first
            called = sub["called"].astype(str).str.lower().eq("true")
            sub = sub.assign(_c=~called).sort_values("_c", kind="stable").drop(columns="_c")
        sub = sub[cols].head(TABLE_ROWS)
        return fig, C.table_records(sub), C.table_columns(sub)

    @app.callback(
        Output("url", "search", allow_duplicate=True),
        *filter_inputs,
        Input("ia-contrast", "value"),
        prevent_initial_call=True,
    )
    def _sync_url(condition, senders, receivers, ligands, receptors, curated, contrast):
        return build_query(
            {
                "condition": condition,
                "sender": senders,
                "receiver": receivers,
                "ligand": ligands,
                "receptor": receptors,
                "curated": schema.COL_CURATED in (curated or []),
                "contrast": contrast,
            }
        )
