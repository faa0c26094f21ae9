"""Small layout helpers shared by the pages (plain ``dash.html`` + ``assets/style.css``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from dash import dash_table, dcc, html

from . import figures as F

GRAPH_CONFIG = {
    "displaylogo": False,
    "responsive": True,
    # the camera button downloads a PNG (client-side); the "SVG" button beside each
    # figure calls Plotly.downloadImage(format="svg") (assets/explorer.js)
    "toImageButtonOptions": {"format": "png", "scale": 2},
    "modeBarButtonsToRemove": ["autoScale2d", "toggleSpikelines"],
}


def card(
    *children: Any, title: str | None = None, subtitle: Any = None, className: str = "", **kw
) -> html.Div:
    head = []
    if title:
        head.append(html.H3(title, className="card-title"))
    if subtitle:
        head.append(html.Div(subtitle, className="card-subtitle"))
    return html.Div(head + list(children), className=f"card {className}".strip(), **kw)


def row(*children: Any, className: str = "") -> html.Div:
    return html.Div(list(children), className=f"row {className}".strip())


def col(*children: Any, width: int | None = None, className: str = "", **kw) -> html.Div:
    cls = f"col col-{width}" if width else "col"
    return html.Div(list(children), className=f"{cls} {className}".strip(), **kw)


def stat(label: str, value: Any, id: str | None = None) -> html.Div:
    kw = {"id": id} if id else {}
    return html.Div(
        [html.Div(value, className="stat-value", **kw), html.Div(label, className="stat-label")],
        className="stat",
    )


def message(text: Any, kind: str = "info", id: str | None = None) -> html.Div:
    """An inline notice: ``info``, ``warn`` or ``error``."""
    kw = {"id": id} if id else {}
    if not text:
        return html.Div(className="msg-empty", **kw)
    return html.Div(text, className=f"msg msg-{kind}", role="status", **kw)


def messages(texts: Sequence[str], kind: str = "warn") -> list:
    return [message(t, kind) for t in texts if t]


def control(label: str, component: Any, className: str = "") -> html.Div:
    return html.Div(
        [html.Label(label, className="control-label"), component],
        className=f"control {className}".strip(),
    )


def graph(
    id: str,
    figure=None,
    *,
    height: int | None = None,
    svg: bool = True,
    className: str = "",
    config: dict | None = None,
) -> html.Div:
    """A ``dcc.Graph`` in a spinner, with an "SVG" download button under it."""
    kw = {"style": {"height": f"{height}px"}} if height else {}
    g = dcc.Graph(
        id=id,
        figure=figure if figure is not None else F.empty_figure("Loading…"),
        config={
            **GRAPH_CONFIG,
            "toImageButtonOptions": {**GRAPH_CONFIG["toImageButtonOptions"], "filename": id},
            **(config or {}),
        },
        className="graph",
        **kw,
    )
    parts: list[Any] = [dcc.Loading(g, type="circle", color="#5E81AC", delay_show=300)]
    if svg:
        parts.append(
            html.Div(
                html.Button(
                    "SVG",
                    id={"type": "svg-btn", "index": id},
                    className="btn btn-small btn-ghost",
                    title="Download this figure as SVG (PNG: camera icon in the figure's toolbar)",
                    n_clicks=0,
                ),
                className="graph-tools",
            )
        )
    return html.Div(parts, className=f"graph-wrap {className}".strip())


def dropdown(
    id: str,
    options: Sequence[Any],
    value: Any = None,
    *,
    multi: bool = False,
    placeholder: str = "",
    clearable: bool = True,
    searchable: bool = True,
    **kw,
) -> dcc.Dropdown:
    opts = [o if isinstance(o, dict) else {"label": str(o), "value": str(o)} for o in options]
    return dcc.Dropdown(
        id=id,
        options=opts,
        value=value,
        multi=multi,
        placeholder=placeholder,
        clearable=clearable,
        searchable=searchable,
        className="dropdown",
        **kw,
    )


def table(
    id: str,
    df: pd.DataFrame | None = None,
    *,
    page_size: int = 12,
    filterable: bool = True,
    row_selectable: str | bool = False,
    **kw,
) -> dash_table.DataTable:
    """A sortable, filterable DataTable; numbers shown with 3 significant digits."""
    df = df if df is not None else pd.DataFrame()
    return dash_table.DataTable(
        id=id,
        columns=table_columns(df),
        data=table_records(df),
        page_size=page_size,
        sort_action="native",
        filter_action="native" if filterable else "none",
        page_action="native",
        row_selectable=row_selectable,
        style_table={"overflowX": "auto"},
        style_cell={
            "fontFamily": F.FONT,
            "fontSize": "12px",
            "padding": "4px 8px",
            "textAlign": "left",
            "maxWidth": "220px",
            "overflow": "hidden",
            "textOverflow": "ellipsis",
        },
        style_header={
            "fontWeight": "600",
            "backgroundColor": "#F3F4F6",
            "border": "none",
            "borderBottom": "1px solid #D1D5DB",
        },
        style_data={"border": "none", "borderBottom": "1px solid #EEF0F3"},
        style_filter={"backgroundColor": "#FAFAFB"},
        css=[{"selector": ".dash-spreadsheet-menu", "rule": "display: none"}],
        **kw,
    )


def table_columns(df: pd.DataFrame) -> list[dict]:
    cols = []
    for c in df.columns:
        spec: dict[str, Any] = {"name": str(c), "id": str(c)}
        if pd.api.types.is_float_dtype(df[c]):
            spec["type"] = "numeric"
            spec["format"] = {"specifier": ".3~g"}
        elif pd.api.types.is_integer_dtype(df[c]):
            spec["type"] = "numeric"
        else:
            spec["type"] = "text"
        cols.append(spec)
    return cols


def table_records(df: pd.DataFrame) -> list[dict]:
    if df.empty:
        return []
    out = df.copy()
    for c in out.columns:
        if isinstance(out[c].dtype, pd.CategoricalDtype) or pd.api.types.is_bool_dtype(out[c]):
            out[c] = out[c].astype(str)
    return out.to_dict("records")
