"""Downloads: figures (PNG / SVG, client-side), result tables (CSV) and a subset of the
atlas as h5ad (through ``atlas.export.export_atlas``, refused above
``limits.max_export_cells``)."""

from __future__ import annotations

import logging
import os

from dash import Input, Output, State, dcc, html, no_update

from atlas import schema
from atlas.tables import csv_text

from .. import components as C
from ..data import UnknownValue
from ..exports import ExportRefused, ExportStore

log = logging.getLogger("tme_atlas.app")

NAME = "downloads"
PATH = "/downloads"
TITLE = "Downloads"
SUBSET_FILTERS = (
    ("cell_types", schema.OBS_CELL_TYPE, "Cell types"),
    ("conditions", schema.OBS_CONDITION, "Conditions"),
    ("patients", schema.OBS_PATIENT, "Patients"),
    ("samples", schema.OBS_SAMPLE, "Samples"),
)


def available_tables(view) -> list[str]:
    names = list(getattr(view.store, "table_names", []) or [])
    return [n for n in names if view.has_table(n)]


def layout(ctx, params: dict) -> html.Div:
    view = ctx.view
    tables = available_tables(view)
    cap = int(ctx.limits.max_export_cells)
    filters = [
        C.control(
            label,
            C.dropdown(f"dl-{key}", view._categories(col), [], multi=True, placeholder="all"),
            className="control-wide",
        )
        for key, col, label in SUBSET_FILTERS
        if col in view.obs.columns
    ]
    return html.Div(
        [
            html.Div(
                [
                    html.H1("Downloads"),
                    html.P("Figures, result tables and subsets of the atlas.", className="lead"),
                ],
                className="page-head",
            ),
            C.row(
                C.col(
                    C.card(
                        html.P(
                            [
                                "Every figure has a ",
                                html.B("camera"),
                                " icon in its toolbar "
                                "(top right, on hover) that saves a PNG, and an ",
                                html.B("SVG"),
                                " button underneath for a vector version. Both are made in your "
                                "browser from the current view, zoom and filters included.",
                            ]
                        ),
                        html.P(
                            "Tip: the page URL keeps your selections; copy it to share or to "
                            "come back to the same view.",
                            className="muted",
                        ),
                        title="Figures",
                    ),
                    width=5,
                ),
                C.col(
                    C.card(
                        html.Div(
                            [
                                C.control(
                                    "Table",
                                    C.dropdown(
                                        "dl-table",
                                        tables,
                                        tables[0] if tables else None,
                                        clearable=False,
                                    ),
                                    className="control-wide",
                                ),
                                html.Button(
                                    "Download CSV",
                                    id="dl-table-btn",
                                    n_clicks=0,
                                    className="btn",
                                    disabled=not tables,
                                ),
                            ],
                            className="controls controls-end",
                        ),
                        html.Div(id="dl-table-info", className="muted small"),
                        title="Result tables",
                    ),
                    width=7,
                ),
            ),
            C.card(
                html.Div(filters, className="controls"),
                html.Div(
                    [
                        html.Div(id="dl-subset-count", className="sel-summary"),
                        html.Button("Export h5ad", id="dl-export-btn", n_clicks=0, className="btn"),
                    ],
                    className="controls controls-end",
                ),
                html.Div(id="dl-export-msg"),
                title="Atlas subset as h5ad",
                subtitle=f"Raw counts, normalised expression, embeddings, metadata and result "
                f"tables of the chosen cells; at most {cap:,} cells per export (use "
                "`tme-atlas export` on the server for more).",
            ),
            dcc.Download(id="dl-table-download"),
            dcc.Download(id="dl-export-download"),
        ],
        className="page",
    )


def register(app, ctx) -> None:
    keys = [k for k, col, _ in SUBSET_FILTERS]
    cols = {k: col for k, col, _ in SUBSET_FILTERS}

    def _subset(values: dict) -> tuple[dict, int]:
        view = ctx.view
        chosen = {}
        for k, vals in values.items():
            if not vals or cols[k] not in view.obs.columns:
                continue
            chosen[k] = view.check_choices(vals, view._categories(cols[k]), k.rstrip("s"))
        n = int(view.mask(**{cols[k]: v for k, v in chosen.items()}).sum())
        return chosen, n

    present = [k for k in keys if cols[k] in ctx.view.obs.columns]
    exports = ExportStore.from_config(ctx.config)
    ctx.exports = exports

    @app.callback(
        Output("dl-subset-count", "children"),
        Output("dl-export-btn", "disabled"),
        *[Input(f"dl-{k}", "value") for k in present],
    )
    def _count(*vals):
        try:
            _, n = _subset(dict(zip(present, vals)))
        except UnknownValue as e:
            return str(e), True
        cap = int(ctx.limits.max_export_cells)
        text = f"{n:,} cells in the subset"
        if n > cap:
            text += f" — above the limit of {cap:,}: narrow the filters"
        return text, n == 0 or n > cap

    @app.callback(
        Output("dl-table-info", "children"),
        Input("dl-table", "value"),
    )
    def _table_info(name):
        view = ctx.view
        if not name or not view.has_table(name):
            return "No result tables in this atlas."
        df = view.table(name)
        return f"{name}: {len(df):,} rows × {df.shape[1]} columns"

    @app.callback(
        Output("dl-table-download", "data"),
        Input("dl-table-btn", "n_clicks"),
        State("dl-table", "value"),
        prevent_initial_call=True,
    )
    def _download_table(n, name):
        view = ctx.view
        if not name or name not in available_tables(view):
            return no_update
        df = view.table(name)
        return {"content": csv_text(df), "filename": f"{name}.csv", "type": "text/csv"}

    @app.callback(
        Output("dl-export-download", "data"),
        Output("dl-export-msg", "children"),
        Input("dl-export-btn", "n_clicks"),
        *[State(f"dl-{k}", "value") for k in present],
        prevent_initial_call=True,
        running=[(Output("dl-export-btn", "disabled"), True, False)],
    )
    def _export(n, *vals):
        try:
            chosen, count = _subset(dict(zip(present, vals)))
        except UnknownValue as e:
            return no_update, C.message(str(e), "warn")
        cap = int(ctx.limits.max_export_cells)
        if count > cap:
            return no_update, C.message(
                f"{count:,} cells is above the export limit of {cap:,}; narrow the filters.", "warn"
            )
        if count == 0:
            return no_update, C.message("The subset is empty.", "warn")
        if chosen.get("cell_types") and ctx.view.label_set:
            return no_update, C.message(
                "The h5ad export filters cell types by the atlas's own labels: choose "
                "'atlas labels' in the Labels menu, or leave the cell types empty.",
                "warn",
            )
        try:
            from atlas.export import export_atlas
        except ImportError:
            return no_update, C.message("Export is not available in this installation.", "error")
        try:
            exports.admit(_requester())
        except ExportRefused as e:
            return no_update, C.message(str(e), "warn")
        inline_max = int(getattr(ctx.limits, "export_inline_bytes", INLINE_MAX_BYTES))
        with exports.workdir() as tmp:
            out = tmp / EXPORT_NAME
            try:
                export_atlas(ctx.atlas_path, out, **chosen)
                size = exports.check_size(out)
            except ExportRefused as e:
                return no_update, C.message(str(e), "warn")
            except Exception:  # noqa: BLE001 - report, never a traceback in the browser
                log.exception("export failed")
                return no_update, C.message("The export failed; the error was logged.", "error")
            if size <= inline_max:  # small: straight to the browser's downloads
                data = dcc.send_file(str(out), filename=EXPORT_NAME)
                return data, C.message(f"Exported {count:,} cells ({size / 1e6:.1f} MB).", "info")
            # large: a one-time link any worker can serve, streamed by Flask
            token = exports.add(out, _requester())
        href = app.get_relative_path(f"/{EXPORT_ROUTE}/{token}")
        link = html.A(
            f"Download {EXPORT_NAME} ({size / 1e6:,.0f} MB)",
            href=href,
            className="btn",
            download=EXPORT_NAME,
        )
        ttl_min = int(exports.ttl_s // 60)
        return no_update, html.Div(
            [
                C.message(
                    f"Exported {count:,} cells. The link works once, for {ttl_min} minutes.",
                    "info",
                ),
                link,
            ]
        )

    _add_export_route(app, exports)


EXPORT_NAME = "atlas_subset.h5ad"
EXPORT_ROUTE = "_tme_export"
INLINE_MAX_BYTES = 20_000_000


def _requester() -> str:
    """Who asks (for the export rate limit): the logged-in user, else the client address."""
    import flask

    auth = flask.request.authorization
    if auth is not None and auth.username:
        return f"user:{auth.username}"
    return f"addr:{flask.request.remote_addr or '-'}"


def _add_export_route(app, exports: ExportStore) -> None:
    import flask

    server = app.server
    endpoint = "tme_export_download"
    if endpoint in server.view_functions:
        return
    prefix = app.config.routes_pathname_prefix or "/"

    def download(token: str):
        path = exports.take(token)
        if path is None:
            flask.abort(404)
        try:
            fh = path.open("rb")
        except OSError:
            flask.abort(404)
        finally:  # gone from the folder now; the open handle streams it, then it is freed
            path.unlink(missing_ok=True)
        resp = flask.send_file(
            fh,
            as_attachment=True,
            download_name=EXPORT_NAME,
            mimetype="application/octet-stream",
            max_age=0,
        )
        resp.headers["Content-Length"] = str(os.fstat(fh.fileno()).st_size)
        resp.call_on_close(fh.close)
        return resp

    server.add_url_rule(f"{prefix}{EXPORT_ROUTE}/<token>", endpoint, download, methods=["GET"])
