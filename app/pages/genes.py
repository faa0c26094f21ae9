"""Genes: symbol search with server-side autocomplete; feature plot; violin by cell type split
by condition; dot plot for several genes or a programme; pseudobulk DE table per cell type
and contrast (filterable) with a volcano plot."""

from __future__ import annotations

import numpy as np
import pandas as pd
from dash import Input, Output, State, dcc, html, no_update

from atlas import schema

from .. import components as C
from .. import figures as F
from ..data import UnknownValue
from ..labels import run_hint
from ..urls import as_list, build_query

NAME = "genes"
PATH = "/genes"
TITLE = "Genes"
VIOLIN_MAX_PER_GROUP = 2000  # cells drawn per cell type x condition (fixed random subset)
DE_COLUMNS_FIRST = ("gene", "cell_type", "condition", "reference", "log2fc", "pvalue", "padj")


def default_gene(view) -> str:
    for g in ("CD5", "Cd5", "CD19", "Cd19"):
        if g in view._gene_set.values():
            return g
    return view.gene_names[0]


# the DE table's columns, as the build writes them (atlas.schema.TABLE_COLUMNS[TABLE_DE])
DE_KEY_COLUMNS = (schema.COL_CONDITION, schema.COL_LOG2FC, schema.COL_PADJ)


def de_columns(df: pd.DataFrame) -> tuple[str | None, str | None, str | None]:
    """(condition, log2fc, padj) columns of the DE table, from the schema (no guessing);
    ``None`` for one the table lacks."""
    cond, lfc, padj = (c if c in df.columns else None for c in DE_KEY_COLUMNS)
    return cond, lfc, padj


def violin_frame(
    view, gene: str, conditions: list[str], seed: int = 0, zeros: bool = False
) -> pd.DataFrame:
    """Expression of ``gene`` per cell type x condition, at most VIOLIN_MAX_PER_GROUP cells
    per group (a fixed random subset) for drawing; only expressing cells unless ``zeros``."""
    expr = view.gene(gene)
    ct = view.cat(schema.OBS_CELL_TYPE)
    cond = view.cat(schema.OBS_CONDITION)
    cond_codes = [k for k, c in enumerate(cond.categories) if c in set(conditions)]
    mask = np.isin(cond.codes, cond_codes)
    if not zeros:
        mask &= expr > 0
    keep = np.flatnonzero(mask)
    if keep.size == 0:
        return pd.DataFrame(columns=["group", "condition", "value"])
    key = ct.codes[keep].astype(np.int64) * (len(cond.categories) + 1) + cond.codes[keep]
    rng = np.random.default_rng(seed)
    order = rng.permutation(keep.size)
    # rank within group in random order; keep the first VIOLIN_MAX_PER_GROUP of each
    ranks = pd.Series(key[order]).groupby(key[order]).cumcount().to_numpy()
    chosen = np.sort(keep[order[ranks < VIOLIN_MAX_PER_GROUP]])
    return pd.DataFrame(
        {
            "group": np.asarray(ct[chosen]).astype(str),
            "condition": np.asarray(cond[chosen]).astype(str),
            "value": expr[chosen],
        }
    )


def dot_frame(view, genes: list[str], split: bool) -> pd.DataFrame:
    by = [schema.OBS_CELL_TYPE, schema.OBS_CONDITION] if split else [schema.OBS_CELL_TYPE]
    s = view.summary(genes, by=by)
    if split:
        s["group"] = s[schema.OBS_CELL_TYPE].astype(str) + " · " + s[schema.OBS_CONDITION]
    else:
        s["group"] = s[schema.OBS_CELL_TYPE].astype(str)
    return s


def dot_order(view, split: bool) -> list[str]:
    if not split:
        return view.cell_types
    return [f"{t} · {c}" for t in view.cell_types for c in view.conditions]


def feature_figure(view, gene: str):
    idx = view.display_idx
    df = pd.DataFrame(
        {"x": view.umap[idx, 0], "y": view.umap[idx, 1], "value": view.gene(gene)[idx]}
    )
    # draw expressing cells on top
    df = df.iloc[np.argsort(df["value"].to_numpy(), kind="stable")]
    fig = F.umap_figure(df, categorical=False, colour_label=gene, height=420)
    fig.update_layout(dragmode="pan")
    return fig


# ----------------------------------------------------------------------------- layout
def layout(ctx, params: dict) -> html.Div:
    view = ctx.view
    msgs: list[str] = []
    gene = params.get("gene")
    try:
        gene = view.resolve_gene(gene) if gene else default_gene(view)
    except UnknownValue as e:
        msgs.append(str(e))
        gene = default_gene(view)
    conds = as_list(params.get("condition"))
    try:
        conds = view.check_choices(conds, view.conditions, "condition") or list(view.conditions)
    except UnknownValue as e:
        msgs.append(str(e))
        conds = list(view.conditions)
    try:
        dot_genes = view.resolve_genes(as_list(params.get("genes")))
    except UnknownValue as e:
        msgs.append(str(e))
        dot_genes = []
    program = params.get("program")
    if program and program not in view.programs:
        msgs.append(f"unknown programme {program[:40]!r}")
        program = None
    if not dot_genes and not program:
        if view.programs:
            program = next(iter(view.programs))
        else:
            dot_genes = [gene]
    split_dot = params.get("dotsplit") == "1"

    # DE choices
    de_block: list
    if view.has_table(schema.TABLE_DE):
        de = view.table(schema.TABLE_DE)
        cond_col, _, _ = de_columns(de)
        types = [
            t
            for t in view.cell_types
            if t in set(de.get(schema.COL_CELL_TYPE, pd.Series()).astype(str))
        ]
        types = types or sorted(
            de.get(schema.COL_CELL_TYPE, pd.Series(dtype=str)).astype(str).unique()
        )
        contrasts = (
            [c for c in view.conditions if c in set(de[cond_col].astype(str))] if cond_col else []
        )
        celltype = params.get("celltype") or (types[0] if types else None)
        if celltype not in types:
            msgs.append(f"unknown cell type {str(celltype)[:40]!r} for the DE table")
            celltype = types[0] if types else None
        contrast = params.get("contrast") or (contrasts[0] if contrasts else None)
        if contrast not in contrasts:
            msgs.append(f"unknown contrast {str(contrast)[:40]!r}")
            contrast = contrasts[0] if contrasts else None
        ref = view.reference or "reference"
        de_block = [
            html.Div(
                [
                    C.control(
                        "Cell type",
                        C.dropdown("genes-de-celltype", types, celltype, clearable=False),
                    ),
                    C.control(
                        f"Contrast (vs {ref})",
                        C.dropdown("genes-de-contrast", contrasts, contrast, clearable=False),
                    ),
                ],
                className="controls",
            ),
            C.row(
                C.col(C.graph("genes-volcano"), width=5),
                C.col(C.table("genes-de-table", pd.DataFrame(), page_size=12), width=7),
            ),
        ]
    else:
        de_block = [
            C.message(
                f"No pseudobulk DE table in this atlas yet: run {run_hint(view, 'analyse')}.",
                "info",
            ),
            html.Div(
                [C.dropdown("genes-de-celltype", []), C.dropdown("genes-de-contrast", [])],
                style={"display": "none"},
            ),
        ]

    prog_opts = [{"label": f"{p} ({len(g)} genes)", "value": p} for p, g in view.programs.items()]
    return html.Div(
        [
            html.Div(
                [
                    html.H1("Genes"),
                    html.P(
                        "Search a gene; the feature plot, violins and table follow it.",
                        className="lead",
                    ),
                ],
                className="page-head",
            ),
            html.Div(C.messages(msgs), id="genes-messages"),
            html.Div(
                [
                    C.control(
                        "Gene",
                        C.dropdown(
                            "genes-gene",
                            [gene],
                            gene,
                            clearable=False,
                            placeholder="Type a gene symbol",
                        ),
                        className="control-wide",
                    ),
                    C.control(
                        "Conditions",
                        C.dropdown("genes-conditions", view.conditions, conds, multi=True),
                        className="control-wide",
                    ),
                ],
                className="controls",
            ),
            C.row(
                C.col(C.card(C.graph("genes-feature"), title="Feature plot"), width=4),
                C.col(
                    C.card(
                        dcc.Checklist(
                            id="genes-violin-zeros",
                            options=[
                                {"label": " include cells without expression", "value": "zeros"}
                            ],
                            value=["zeros"] if params.get("zeros") == "1" else [],
                            className="checklist",
                        ),
                        C.graph("genes-violin"),
                        title="Expression by cell type and condition",
                        subtitle=f"Expressing cells (> 0) unless ticked; at most "
                        f"{VIOLIN_MAX_PER_GROUP:,} random cells per cell type × condition are "
                        "drawn. The dot plot shows the fraction expressing.",
                    ),
                    width=8,
                ),
            ),
            C.card(
                html.Div(
                    [
                        C.control(
                            "Genes",
                            C.dropdown(
                                "genes-dot-genes",
                                dot_genes,
                                dot_genes,
                                multi=True,
                                placeholder="Add genes…",
                            ),
                            className="control-wide",
                        ),
                        C.control(
                            "…or a programme",
                            C.dropdown(
                                "genes-dot-program",
                                prog_opts,
                                program,
                                placeholder="Choose a programme",
                            ),
                        ),
                        C.control(
                            "Columns",
                            dcc.Checklist(
                                id="genes-dot-split",
                                options=[{"label": " split by condition", "value": "split"}],
                                value=["split"] if split_dot else [],
                                className="checklist",
                            ),
                        ),
                    ],
                    className="controls",
                ),
                C.graph("genes-dotplot"),
                title="Dot plot",
                subtitle="Colour: mean log-normalised expression; size: % of cells expressing",
            ),
            C.card(
                *de_block,
                title="Pseudobulk differential expression",
                subtitle="Per cell type, each condition against the reference. Filter the table "
                "by typing in its header row (e.g. < 0.05 under padj); click a gene in the "
                "volcano or the table to show it above.",
            ),
        ],
        className="page",
    )


# ----------------------------------------------------------------------------- callbacks
def register(app, ctx) -> None:
    def _options(search, value):
        hits = ctx.view.search_genes(search, limit=30)
        values = value if isinstance(value, list) else ([value] if value else [])
        for v in values[::-1]:
            if v not in hits:
                hits = [v, *hits]
        return [{"label": g, "value": g} for g in hits]

    @app.callback(
        Output("genes-gene", "options"),
        Input("genes-gene", "search_value"),
        State("genes-gene", "value"),
        prevent_initial_call=True,
    )
    def _gene_opts(search, value):
        return _options(search, value)

    @app.callback(
        Output("genes-dot-genes", "options"),
        Input("genes-dot-genes", "search_value"),
        State("genes-dot-genes", "value"),
        prevent_initial_call=True,
    )
    def _dot_opts(search, value):
        return _options(search, value)

    @app.callback(Output("genes-feature", "figure"), Input("genes-gene", "value"))
    def _feature(gene):
        view = ctx.view
        if view.umap is None:
            return F.empty_figure("This atlas has no UMAP")
        try:
            gene = view.resolve_gene(gene)
        except UnknownValue as e:
            return F.empty_figure(str(e))
        return feature_figure(view, gene)

    @app.callback(
        Output("genes-violin", "figure"),
        Input("genes-gene", "value"),
        Input("genes-conditions", "value"),
        Input("genes-violin-zeros", "value"),
    )
    def _violin(gene, conds, zeros=None):
        view = ctx.view
        try:
            gene = view.resolve_gene(gene)
            conds = view.check_choices(conds or [], view.conditions, "condition")
        except UnknownValue as e:
            return F.empty_figure(str(e))
        if not conds:
            return F.empty_figure("Choose at least one condition")
        df = violin_frame(view, gene, conds, zeros="zeros" in (zeros or []))
        if df.empty:
            return F.empty_figure(f"No cell expresses {gene} in the chosen conditions")
        cmap = F.colour_map(view.conditions, F.CONDITION_PALETTE)
        return F.violin_figure(
            df,
            gene=gene,
            group_order=view.cell_types,
            condition_order=[c for c in view.conditions if c in conds],
            colours=cmap,
        )

    @app.callback(
        Output("genes-dotplot", "figure"),
        Input("genes-dot-genes", "value"),
        Input("genes-dot-program", "value"),
        Input("genes-dot-split", "value"),
    )
    def _dot(genes, program, split_val):
        view = ctx.view
        split = "split" in (split_val or [])
        try:
            genes = view.resolve_genes(genes or [])
        except UnknownValue as e:
            return F.empty_figure(str(e))
        title = None
        if not genes and program:
            if program not in view.programs:
                return F.empty_figure(f"unknown programme {str(program)[:40]!r}")
            genes = view.programs[program][: int(ctx.limits.max_genes_per_request)]
            title = f"Programme: {program}"
        if not genes:
            return F.empty_figure("Choose genes or a programme")
        df = dot_frame(view, genes, split)
        return F.dotplot_figure(
            df, x="group", y="gene", x_order=dot_order(view, split), y_order=genes, title=title
        )

    @app.callback(
        Output("genes-volcano", "figure"),
        Output("genes-de-table", "data"),
        Output("genes-de-table", "columns"),
        Input("genes-de-celltype", "value"),
        Input("genes-de-contrast", "value"),
        Input("genes-gene", "value"),
    )
    def _de(celltype, contrast, gene):
        view = ctx.view
        if not view.has_table(schema.TABLE_DE):
            return no_update, no_update, no_update
        de = view.table(schema.TABLE_DE)
        cond_col, lfc, padj = de_columns(de)
        sub = de
        if schema.COL_CELL_TYPE in de.columns and celltype:
            sub = sub[sub[schema.COL_CELL_TYPE].astype(str) == str(celltype)]
        if cond_col and contrast:
            sub = sub[sub[cond_col].astype(str) == str(contrast)]
        first = [c for c in DE_COLUMNS_FIRST if c in sub.columns]
        sub = sub[first + [c for c in sub.columns if c not in first]]
        if padj:
            sub = sub.sort_values(padj, kind="stable")
        fig = (
            F.volcano_figure(
                sub,
                lfc=lfc,
                padj=padj,
                highlight=gene,
                title=f"{celltype}: {contrast} vs {view.reference or 'reference'}",
            )
            if lfc and padj
            else F.empty_figure("DE table lacks log2fc / padj columns")
        )
        return fig, C.table_records(sub), C.table_columns(sub)

    @app.callback(
        Output("genes-gene", "value", allow_duplicate=True),
        Output("genes-gene", "options", allow_duplicate=True),
        Input("genes-volcano", "clickData"),
        Input("genes-de-table", "active_cell"),
        State("genes-de-table", "derived_viewport_data"),
        prevent_initial_call=True,
    )
    def _inspect_gene(click, active, rows):
        from dash import ctx as dash_ctx

        gene = None
        if dash_ctx.triggered_id == "genes-volcano" and click and click.get("points"):
            gene = click["points"][0].get("text")
        elif active and rows and active.get("row", 0) < len(rows):
            gene = rows[active["row"]].get(schema.COL_GENE)
        try:
            gene = ctx.view.resolve_gene(gene)
        except UnknownValue:
            return no_update, no_update
        return gene, [{"label": gene, "value": gene}]

    @app.callback(
        Output("url", "search", allow_duplicate=True),
        Input("genes-gene", "value"),
        Input("genes-conditions", "value"),
        Input("genes-dot-genes", "value"),
        Input("genes-dot-program", "value"),
        Input("genes-dot-split", "value"),
        Input("genes-de-celltype", "value"),
        Input("genes-de-contrast", "value"),
        Input("genes-violin-zeros", "value"),
        prevent_initial_call=True,
    )
    def _sync_url(gene, conds, dot_genes, program, split_val, celltype, contrast, zeros=None):
        view = ctx.view
        conds = conds or []
        return build_query(
            {
                "gene": gene,
                # all conditions is the default: keep the URL short
                "condition": conds if set(conds) != set(view.conditions) else None,
                "genes": dot_genes,
                "program": program if not dot_genes else None,
                "dotsplit": "split" in (split_val or []),
                "celltype": celltype,
                "contrast": contrast,
                "zeros": "zeros" in (zeros or []),
            }
        )
