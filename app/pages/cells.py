"""Cells: the UMAP coloured by metadata, a gene or a programme score, optionally split by
condition; a lasso/box selection shows its size and composition, runs a quick DE of the
selection against the rest and exports the cell ids.

Display: at most ``limits.max_display_points`` cells are drawn (a fixed random subset);
selections are resolved on *all* cells from the lasso/box geometry. A gene or score is
drawn as single-colour traces of binned values (:func:`app.figures.umap_figure`): Plotly
recolours per-point colour arrays point by point, ~12x slower to repaint. Switching from one
gene or score to another sends a ``Patch`` with only the new traces (base64 float32) and
the colour range.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from dash import Input, Output, Patch, State, dcc, html, no_update
from dash import ctx as dash_ctx

from atlas import curation, schema
from atlas.errors import CurationConflict, CurationRefused, InvalidName
from atlas.tables import csv_text

from .. import components as C
from .. import figures as F
from ..data import UnknownValue
from ..labels import label_options
from ..security import safe_log_value
from ..stats import quick_de
from ..urls import as_bool, build_query

log = logging.getLogger("tme_atlas.app")

NAME = "cells"
PATH = "/cells"
TITLE = "Cells"


# ----------------------------------------------------------------------------- data
def colour_options(view) -> list[dict]:
    opts = []
    for c in view.categorical_columns:
        opts.append({"label": c.replace("_", " "), "value": c})
    for c in view.score_columns:
        opts.append({"label": f"score: {c[len(schema.OBS_SCORE_PREFIX) :]}", "value": c})
    for c in view.numeric_columns:
        opts.append({"label": c.replace("_", " "), "value": c})
    return opts


def default_colour(view) -> str | None:
    cols = view.colour_columns
    return schema.OBS_CELL_TYPE if schema.OBS_CELL_TYPE in cols else (cols[0] if cols else None)


def umap_frame(view, values, split: bool, query_only: bool = False) -> pd.DataFrame:
    """x, y, value (and panel = condition when split) for the displayed cells (only the
    mapped query cells of a query atlas when ``query_only``)."""
    idx = view.shown_idx(query_only)
    xy = view.umap
    df = pd.DataFrame({"x": xy[idx, 0], "y": xy[idx, 1], "value": values})
    if split and schema.OBS_CONDITION in view.obs.columns:
        df["panel"] = view.cat(schema.OBS_CONDITION)[idx]
    return df


def colour_values(view, gene: str | None, colour: str | None, query_only: bool = False):
    """(values on displayed cells, categorical?, label, category order)."""
    idx = view.shown_idx(query_only)
    if gene:
        return view.gene(gene)[idx], False, gene, None
    if colour in view.categorical_columns:
        cats = view.conditions if colour == schema.OBS_CONDITION else view._categories(colour)
        return view.cat(colour)[idx], True, colour, cats
    vals = view.obs[colour].to_numpy(dtype=np.float32)[idx]
    label = (
        colour[len(schema.OBS_SCORE_PREFIX) :]
        if colour.startswith(schema.OBS_SCORE_PREFIX)
        else colour
    )
    return vals, False, label, None


def selected_cells(
    view, selected: dict | None, split: bool, query_only: bool = False
) -> np.ndarray:
    """Positions of all cells (not only displayed ones) inside the lasso/box selection
    (query cells only when ``query_only``)."""
    if not selected or view.umap is None:
        return np.zeros(0, dtype=np.int64)
    cells = _selected_cells(view, selected, split)
    if query_only and view.has_origin:
        cells = cells[view.query_mask[cells]]
    return cells


def _selected_cells(view, selected: dict, split: bool) -> np.ndarray:
    shapes = F.selection_geometry(
        selected, max_vertices=int(getattr(view.limits, "max_lasso_vertices", 1000))
    )
    xy = view.umap
    if shapes:
        mask = np.zeros(view.n_cells, dtype=bool)
        panels = None
        if split and schema.OBS_CONDITION in view.obs.columns:
            cat = view.cat(schema.OBS_CONDITION)
            cond = cat.codes
            present = {str(c) for c in pd.unique(cat[view.display_idx])}
            panels = [c for c in view.conditions if c in present]
            code_of = {str(c): k for k, c in enumerate(cat.categories)}
        for i, kind, vertices in shapes:
            inside = F.points_in_shape(xy[:, 0], xy[:, 1], kind, vertices)
            if panels is not None:
                if i >= len(panels):
                    continue
                inside &= cond == code_of[panels[i]]
            mask |= inside
        return np.flatnonzero(mask)
    # a click selection without geometry: the displayed points themselves
    pts = selected.get("points") or []
    return (
        np.unique(view.display_idx[[p["pointIndex"] for p in pts if "pointIndex" in p]])
        if pts
        else np.zeros(0, dtype=np.int64)
    )


# ----------------------------------------------------------------------------- layout
def layout(ctx, params: dict) -> html.Div:
    view = ctx.view
    msgs: list[str] = []
    if view.umap is None:
        return html.Div(
            [
                html.H1("Cells"),
                C.message(
                    "This atlas has no UMAP embedding: run `tme-atlas build` (stage 'cluster').",
                    "warn",
                ),
            ],
            className="page",
        )
    colour = params.get("color") or default_colour(view)
    if colour not in view.colour_columns:
        msgs.append(f"Unknown colour {colour[:40]!r}; showing cell type instead.")
        colour = default_colour(view)
    gene = params.get("gene")
    if gene:
        try:
            gene = view.resolve_gene(gene)
        except UnknownValue as e:
            msgs.append(str(e))
            gene = None
    split = as_bool(params.get("split"))
    query_only = as_bool(params.get("query")) and view.has_origin
    layout_opts = [{"label": " split by condition", "value": "split"}]
    if view.has_origin:  # a query atlas (tme-atlas map)
        layout_opts.append({"label": " mapped query cells only", "value": "query"})
    gene_opts = [{"label": gene, "value": gene}] if gene else []
    n_show = len(view.display_idx)
    note = (
        f"Showing a fixed random subset of {n_show:,} of {view.n_cells:,} cells for display; "
        "selections, composition and statistics use all cells."
        if view.downsampled
        else f"{view.n_cells:,} cells."
    )
    controls = html.Div(
        [
            C.control(
                "Colour by",
                C.dropdown("cells-colour", colour_options(view), colour, clearable=False),
            ),
            C.control(
                "…or a gene",
                C.dropdown(
                    "cells-gene",
                    gene_opts,
                    gene,
                    placeholder="Type a gene symbol, e.g. CD5",
                    debounce=False,
                ),
                className="control-wide",
            ),
            C.control(
                "Layout",
                dcc.Checklist(
                    id="cells-split",
                    options=layout_opts,
                    value=(["split"] if split else []) + (["query"] if query_only else []),
                    className="checklist",
                ),
            ),
        ],
        className="controls",
    )
    side = C.card(
        html.Div(
            id="cells-sel-summary",
            className="sel-summary",
            children="Draw a lasso or box on the UMAP to select cells.",
        ),
        C.graph("cells-sel-comp", F.empty_figure("No cells selected", height=240), svg=False),
        html.Div(
            [
                html.Button(
                    "Compare with the rest",
                    id="cells-de-btn",
                    n_clicks=0,
                    className="btn",
                    disabled=True,
                ),
                html.Button(
                    "Export cell ids (CSV)",
                    id="cells-export-btn",
                    n_clicks=0,
                    className="btn btn-ghost",
                    disabled=True,
                ),
            ],
            className="btn-row",
        ),
        html.Div(id="cells-de-msg"),
        title="Selection",
    )
    side_cards = [side]
    if ctx.can_edit():
        side_cards.append(curation_panel(view))
    elif view.label_set:
        side_cards.append(C.card(label_history(view), title="Label versions"))
    return html.Div(
        [
            html.Div(
                [html.H1("Cells"), html.P(note, className="lead", id="cells-note")],
                className="page-head",
            ),
            html.Div(C.messages(msgs), id="cells-messages"),
            controls,
            C.row(
                C.col(C.card(C.graph("cells-umap")), width=8),
                C.col(*side_cards, width=4, className="col-stack" if len(side_cards) > 1 else ""),
            ),
            html.Div(
                C.card(
                    C.row(
                        C.col(C.graph("cells-de-bar", F.quick_de_bar(pd.DataFrame()))),
                        C.col(C.table("cells-de-table", pd.DataFrame(), page_size=12)),
                    ),
                    title="Quick DE: selection vs rest",
                    subtitle=f"Wilcoxon rank-sum on the atlas's variable genes; at most "
                    f"{ctx.limits.max_cells_quick_de:,} cells (random subsets beyond). "
                    "Exploratory only: use the pseudobulk DE (Genes page) for inference.",
                ),
                id="cells-de-section",
                style={"display": "none"},
            ),
            dcc.Store(id="cells-umap-meta"),
            dcc.Download(id="cells-download"),
        ],
        className="page",
    )


# ----------------------------------------------------------------------------- curation
CURATION_OPS = [
    {"label": " rename a label", "value": "rename"},
    {"label": " merge labels", "value": "merge"},
    {"label": " relabel the selection", "value": "relabel"},
]


def label_history(view, last: int = 8) -> html.Ul:
    """Who changed what and when in the label set the view shows (newest first)."""
    if not view.label_set:
        return html.Ul([], className="curation-history")
    try:
        entries = curation.versions(view.atlas_dir, view.label_set)
    except Exception:  # noqa: BLE001 - history is informative only
        entries = []
    items = [
        html.Li(
            f"v{e.get('version')} · {str(e.get('user', ''))[:32]} · "
            f"{str(e.get('time', ''))[:16].replace('T', ' ')} · {str(e.get('summary', ''))[:120]}"
        )
        for e in reversed(entries[-last:])
    ]
    return html.Ul(items, className="curation-history")


def curation_panel(view) -> html.Div:
    """Rename / merge labels or relabel the lasso selection (rendered for editors only;
    the callback checks the editor role again on every write)."""
    if view.label_set:
        target = html.Div(
            f"Edits are saved as a new version of label set '{view.label_set}' "
            f"(you see v{view.label_version}).",
            className="muted small",
        )
        name_input = dcc.Input(id="cur-set", type="hidden", value=view.label_set)
    else:
        target = html.Div(
            "You see the atlas's labels: the first edit starts a new label set.",
            className="muted small",
        )
        name_input = C.control(
            "New label set",
            dcc.Input(
                id="cur-set",
                type="text",
                value="curated",
                maxLength=40,
                debounce=False,
            ),
        )
    return C.card(
        html.Div(
            [
                target,
                name_input,
                dcc.RadioItems(
                    id="cur-op", options=CURATION_OPS, value="rename", className="radio"
                ),
                C.control(
                    "Label(s) to change",
                    C.dropdown("cur-from", view.cell_types, [], multi=True),
                ),
                C.control(
                    "New label",
                    dcc.Input(
                        id="cur-to",
                        type="text",
                        value="",
                        maxLength=curation.MAX_LABEL_CHARS,
                        placeholder="e.g. CD8 T exhausted",
                    ),
                ),
                html.Div(
                    html.Button("Save edit", id="cur-apply", n_clicks=0, className="btn"),
                    className="btn-row",
                ),
                html.Div(id="cur-msg"),
                label_history(view),
            ],
            className="curation",
        ),
        title="Curate labels",
        subtitle="Saved beside the atlas with your name and the time; the atlas file is "
        "never changed. Recompute tables with `tme-atlas analyse DIR --labels NAME`.",
    )


def curation_op(view, kind, sources, to, selected, meta) -> dict:
    """The edit the panel describes (validated by :func:`atlas.curation.apply_operation`)."""
    sources = [sources] if isinstance(sources, str) else list(sources or [])
    if kind == "rename":
        if len(sources) != 1:
            raise InvalidName("rename: choose exactly one label")
        return {"op": "rename", "from": sources[0], "to": to}
    if kind == "merge":
        return {"op": "merge", "from": sources, "to": to}
    if kind == "relabel":
        cells_ = selected_cells(view, selected, bool((meta or {}).get("split")))
        return {"op": "relabel", "cells": list(view.cell_ids[cells_]), "to": to}
    raise InvalidName(f"unknown edit {str(kind)[:20]!r}")


def save_curation(ctx, kind, sources, to, set_name, selected, meta) -> tuple[str, dict]:
    """Check the editor role, then save the edit as a new label version; returns the set's
    name and the version's manifest entry. :class:`CurationRefused` (403) for anyone but
    an editor."""
    if not ctx.can_edit():
        log.warning("curation refused: user %s is not an editor", safe_log_value(ctx.user() or "-"))
        raise CurationRefused("you may not edit labels")
    view = ctx.view
    if view.label_set:  # edits continue the version the editor sees
        name, expected = view.label_set, view.label_version
    else:  # a new set from the atlas's labels
        name, expected = curation.check_set_name(set_name), 0
        if curation.latest_version(view.atlas_dir, name):
            raise CurationConflict(
                f"label set {name!r} exists: choose it in the Labels menu to edit it"
            )
    op = curation_op(view, kind, sources, to, selected, meta)
    entry = curation.edit_labels(
        view.atlas_dir,
        name,
        op,
        user=ctx.editor_name(),
        base_labels=view.base_labels,
        expected_version=expected,
    )
    return name, entry


# ----------------------------------------------------------------------------- callbacks
def register(app, ctx) -> None:
    @app.callback(
        Output("labels-msg", "children"),
        Output("labels-select", "options"),
        Output("labels-select", "value"),
        Input("cur-apply", "n_clicks"),
        State("cur-op", "value"),
        State("cur-from", "value"),
        State("cur-to", "value"),
        State("cur-set", "value"),
        State("cells-umap", "selectedData"),
        State("cells-umap-meta", "data"),
        prevent_initial_call=True,
    )
    def _curate(n_clicks, kind, sources, to, set_name, selected, meta):
        try:
            name, entry = save_curation(ctx, kind, sources, to, set_name, selected, meta)
        except (InvalidName, UnknownValue, CurationConflict) as e:
            return C.message(str(e), "warn"), no_update, no_update
        except OSError as e:
            log.error("curation: could not save (%s)", e.__class__.__name__)
            msg = "Could not save: the atlas folder's annotations/ is not writable."
            return C.message(msg, "error"), no_update, no_update
        text = (
            f"Saved {name} v{entry['version']}: {entry['summary']} ({entry['n_changed']:,} "
            "cells). Now showing it."
        )
        return (
            C.message(text, "info"),
            label_options(ctx.base_view),
            f"{name}@{entry['version']}",
        )

    @app.callback(
        Output("cells-gene", "options"),
        Input("cells-gene", "search_value"),
        State("cells-gene", "value"),
        prevent_initial_call=True,
    )
    def _gene_options(search, value):
        hits = ctx.view.search_genes(search, limit=30)
        if value and value not in hits:
            hits = [value, *hits]
        return [{"label": g, "value": g} for g in hits]

    @app.callback(
        Output("cells-umap", "figure"),
        Output("cells-umap-meta", "data"),
        Output("cells-messages", "children"),
        Input("cells-colour", "value"),
        Input("cells-gene", "value"),
        Input("cells-split", "value"),
        State("cells-umap-meta", "data"),
    )
    def _render(colour, gene, split_val, meta):
        view = ctx.view
        split = "split" in (split_val or [])
        query_only = "query" in (split_val or [])
        try:
            if gene:
                gene = view.resolve_gene(gene)
            if not gene and colour not in view.colour_columns:
                raise UnknownValue(f"unknown colour {str(colour)[:40]!r}")
            values, categorical, label, cats = colour_values(view, gene, colour, query_only)
        except UnknownValue as e:
            return no_update, no_update, C.messages([str(e)])
        mode = "categorical" if categorical else "continuous"
        new_meta = {"mode": mode, "split": split, "label": label, "query": query_only}
        df = umap_frame(view, values, split, query_only)
        panels = view.conditions if split else None
        if (
            meta
            and meta.get("mode") == "continuous"
            and mode == "continuous"
            and meta.get("split") == split
            and bool(meta.get("query")) == query_only
            and dash_ctx.triggered_id in ("cells-gene", "cells-colour")
        ):
            # only the colours change: new binned traces in a Patch, the layout stays
            traces, cmin, cmax = F.umap_colour_patch(df, colour_label=label, panel_order=panels)
            patch = Patch()
            patch["data"] = traces
            patch["layout"]["coloraxis"]["cmin"] = cmin
            patch["layout"]["coloraxis"]["cmax"] = cmax
            patch["layout"]["coloraxis"]["colorbar"]["title"]["text"] = label
            return patch, new_meta, []
        colours = F.colour_map(cats) if cats else None
        fig = F.umap_figure(
            df,
            categorical=categorical,
            colour_label=label,
            panel_order=panels,
            category_order=cats,
            colours=colours,
        )
        return fig, new_meta, []

    @app.callback(
        Output("url", "search", allow_duplicate=True),
        Input("cells-colour", "value"),
        Input("cells-gene", "value"),
        Input("cells-split", "value"),
        prevent_initial_call=True,
    )
    def _sync_url(colour, gene, split_val):
        vals = split_val or []
        return build_query(
            {"color": colour, "gene": gene, "split": "split" in vals, "query": "query" in vals}
        )

    @app.callback(
        Output("cells-sel-summary", "children"),
        Output("cells-sel-comp", "figure"),
        Output("cells-de-btn", "disabled"),
        Output("cells-export-btn", "disabled"),
        Input("cells-umap", "selectedData"),
        State("cells-umap-meta", "data"),
        prevent_initial_call=True,
    )
    def _selection(selected, meta):
        view = ctx.view
        cells_ = selected_cells(
            view, selected, bool((meta or {}).get("split")), bool((meta or {}).get("query"))
        )
        n = len(cells_)
        if n == 0:
            return (
                "No cells selected. Draw a lasso or box on the UMAP.",
                F.empty_figure("No cells selected", height=240),
                True,
                True,
            )
        comp = (
            pd.Series(view.codes(schema.OBS_CELL_TYPE)[cells_]).value_counts()
            if schema.OBS_CELL_TYPE in view.obs.columns
            else pd.Series(dtype=float)
        )
        summary = [
            html.Div(f"{n:,}", className="stat-value"),
            html.Div(
                f"cells selected ({n / view.n_cells:.1%} of the atlas)", className="stat-label"
            ),
        ]
        if schema.OBS_CONDITION in view.obs.columns:
            conds = pd.Series(view.codes(schema.OBS_CONDITION)[cells_]).value_counts()
            summary.append(
                html.Div(
                    " · ".join(f"{c}: {conds.get(c, 0):,}" for c in view.conditions),
                    className="muted small",
                )
            )
        return summary, F.selection_composition_bar(comp), False, False

    @app.callback(
        Output("cells-de-bar", "figure"),
        Output("cells-de-table", "data"),
        Output("cells-de-table", "columns"),
        Output("cells-de-msg", "children"),
        Output("cells-de-section", "style"),
        Input("cells-de-btn", "n_clicks"),
        State("cells-umap", "selectedData"),
        State("cells-umap-meta", "data"),
        prevent_initial_call=True,
        running=[(Output("cells-de-btn", "disabled"), True, False)],
    )
    def _quick_de(n_clicks, selected, meta):
        view = ctx.view
        cells_ = selected_cells(
            view, selected, bool((meta or {}).get("split")), bool((meta or {}).get("query"))
        )
        if len(cells_) == 0:
            return (no_update,) * 3 + (C.message("Select cells first.", "warn"), no_update)
        if len(cells_) == view.n_cells:
            msg = C.message("The selection holds every cell: nothing to compare with.", "warn")
            return (no_update,) * 3 + (msg, no_update)
        res, note = quick_de(view, cells_, max_cells=int(ctx.limits.max_cells_quick_de))
        return (
            F.quick_de_bar(res, title=None),
            C.table_records(res),
            C.table_columns(res),
            C.message(note, "info"),
            {"display": "block"},
        )

    @app.callback(
        Output("cells-download", "data"),
        Input("cells-export-btn", "n_clicks"),
        State("cells-umap", "selectedData"),
        State("cells-umap-meta", "data"),
        prevent_initial_call=True,
    )
    def _export(n_clicks, selected, meta):
        view = ctx.view
        cells_ = selected_cells(
            view, selected, bool((meta or {}).get("split")), bool((meta or {}).get("query"))
        )
        if len(cells_) == 0:
            return no_update
        ids = pd.DataFrame({"cell_id": view.cell_ids[cells_]})
        for col in (schema.OBS_SAMPLE, schema.OBS_CONDITION, schema.OBS_CELL_TYPE):
            if col in view.obs.columns:
                ids[col] = view.codes(col)[cells_]
        return {
            "content": csv_text(ids),
            "filename": "selected_cells.csv",
            "type": "text/csv",
        }
