"""Downloads: figures (PNG / SVG, client-side), result tables (CSV) and a subset of the
atlas as h5ad (through ``atlas.export.export_atlas``, refused above
``limits.max_export_cells``)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from dash import Input, Output, State, dcc, html, no_update

from atlas import schema
from atlas.tables import csv_text

from .. import components as C
from ..data import UnknownValue

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
    exports = ExportFiles()
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
        try:
            from atlas.export import export_atlas
        except ImportError:
            return no_update, C.message("Export is not available in this installation.", "error")
        tmp = Path(tempfile.mkdtemp(prefix="tme-export-"))
        out = tmp / EXPORT_NAME
        try:
            export_atlas(ctx.atlas_path, out, **chosen)
        except Exception:  # noqa: BLE001 - report, never a traceback in the browser
            shutil.rmtree(tmp, ignore_errors=True)
            log.exception("export failed")
            return no_update, C.message("The export failed; the error was logged.", "error")
        size = out.stat().st_size
        if size <= INLINE_MAX_BYTES:  # small: straight to the browser's downloads
            try:
                data = dcc.send_file(str(out), filename=EXPORT_NAME)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return data, C.message(f"Exported {count:,} cells ({size / 1e6:.1f} MB).", "info")
        # large: a one-time link streamed by Flask (no base64 through the callback)
        token = exports.add(out)
        href = app.get_relative_path(f"/{EXPORT_ROUTE}/{token}")
        link = html.A(
            f"Download {EXPORT_NAME} ({size / 1e6:,.0f} MB)",
            href=href,
            className="btn",
            download=EXPORT_NAME,
        )
        return no_update, html.Div(
            [
                C.message(
                    f"Exported {count:,} cells. The link works once, for "
                    f"{EXPORT_TTL_S // 60} minutes.",
                    "info",
                ),
                link,
            ]
        )

    _add_export_route(app, exports)


EXPORT_NAME = "atlas_subset.h5ad"
EXPORT_ROUTE = "_tme_export"
EXPORT_TTL_S = 3600
INLINE_MAX_BYTES = 20_000_000


class ExportFiles:
    """Finished exports waiting to be downloaded: token -> file; one download each,
    removed after EXPORT_TTL_S."""

    def __init__(self):
        import threading

        self._files: dict[str, tuple[Path, float]] = {}
        self._lock = threading.Lock()

    def add(self, path: Path) -> str:
        import secrets
        import time

        self.cleanup()
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._files[token] = (path, time.time())
        return token

    def take(self, token: str) -> Path | None:
        with self._lock:
            item = self._files.pop(token, None)
        return item[0] if item else None

    def cleanup(self) -> None:
        import time

        now = time.time()
        with self._lock:
            old = [t for t, (_, t0) in self._files.items() if now - t0 > EXPORT_TTL_S]
            paths = [self._files.pop(t)[0] for t in old]
        for p in paths:
            shutil.rmtree(p.parent, ignore_errors=True)


def _add_export_route(app, exports: ExportFiles) -> None:
    import flask

    server = app.server
    endpoint = "tme_export_download"
    if endpoint in server.view_functions:
        return
    prefix = app.config.routes_pathname_prefix or "/"

    def download(token: str):
        path = exports.take(token) if len(token) < 100 else None
        if path is None or not path.is_file():
            flask.abort(404)
        resp = flask.send_file(
            path, as_attachment=True, download_name=EXPORT_NAME, mimetype="application/octet-stream"
        )
        resp.call_on_close(lambda: shutil.rmtree(path.parent, ignore_errors=True))
        return resp

    server.add_url_rule(f"{prefix}{EXPORT_ROUTE}/<token>", endpoint, download, methods=["GET"])
