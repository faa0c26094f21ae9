"""``create_app(atlas_path, config)``: the Dash explorer of one atlas.

Structure (kept simple so hosting concerns can be layered on):

* ``app.server`` is the Flask server (gunicorn serves ``app.wsgi:server``);
  ``/healthz`` answers ``{"status": "ok", "cells": n}``.
* One :class:`AppContext` per app holds the config and the :class:`~app.data.AtlasView`
  (``app.tme``); every callback reads through ``ctx.view``.
* Pages live in ``app/pages/*.py``; each has ``PATH``, ``TITLE``, ``layout(ctx, params)``
  and ``register(app, ctx)``. A single router callback renders the page for the URL path;
  the query string carries each page's selections (``app/urls.py``), so a copied URL
  restores the view. Callbacks are registered on this app instance (never globally), so
  several apps can live in one process (tests, several atlases).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dash
from dash import Input, Output, State, dcc, html

from atlas.config import Config
from atlas.errors import AtlasError

from . import components as C
from .data import AtlasView, open_view
from .labels import (
    ATLAS_LABELS,
    LABELS_COOKIE,
    LOCAL_EDITOR,
    label_choice,
    label_options,
    parse_label_choice,
)
from .pages import cells, downloads, genes, interactions, overview, spatial
from .urls import parse_query

log = logging.getLogger("tme_atlas.app")

ASSETS = Path(__file__).resolve().parent / "assets"
PAGES = (overview, cells, genes, interactions, spatial, downloads)
APP_TITLE = "CLL TME Atlas"


class AppContext:
    """What the callbacks of one app share: config, limits and the atlas view.

    ``opened_view`` is the view :func:`create_app` opened; hosting
    (:class:`app.registry.AtlasDispatcher`) adopts it into its registry and then sets
    :meth:`serve_from` so that every access goes through the registry (which re-validates
    the atlas directory, reopens a replaced atlas and raises ``AtlasUnavailableError``,
    a 503 page, for a vanished one).
    """

    def __init__(self, atlas_path: str | Path, config: Config, view: AtlasView):
        self.atlas_path = Path(atlas_path)
        self.config = config
        self.limits = config.limits
        self.opened_view = view
        self.view_provider: Callable[[], AtlasView] | None = None
        self.app: dash.Dash | None = None

    def serve_from(self, provider: Callable[[], AtlasView]) -> None:
        """Read the atlas through ``provider()`` from now on (the hosting registry)."""
        self.view_provider = provider

    @property
    def base_view(self) -> AtlasView:
        """The atlas with its own labels."""
        provider = self.view_provider
        return provider() if provider is not None else self.opened_view

    @property
    def view(self) -> AtlasView:
        """The atlas as this request sees it: with the curated label version chosen in the
        Labels menu (:func:`label_choice`), else with its own labels."""
        base = self.base_view
        choice = label_choice()
        if choice is None:
            return base
        try:
            return base.labelled(*choice)
        except AtlasError:  # a stale or forged choice: the atlas's own labels
            return base

    # ------------------------------------------------------------------ curation rights
    def user(self) -> str | None:
        """The logged-in user of this request (checked by the login hook), or None."""
        import flask

        if not self.config.auth.enabled or not flask.has_request_context():
            return None
        auth = flask.request.authorization
        return auth.username if auth is not None and auth.username else None

    def can_edit(self) -> bool:
        """May this request's user curate labels? With auth on: users listed in
        ``auth.editors``; without auth: only with ``auth.curation_without_auth``."""
        auth = self.config.auth
        if auth.enabled:
            user = self.user()
            return user is not None and user in auth.editors and user in auth.users
        return bool(auth.curation_without_auth)

    def editor_name(self) -> str:
        return self.user() or LOCAL_EDITOR

    def href(self, path: str, search: str = "") -> str:
        assert self.app is not None
        return self.app.get_relative_path(path) + (search or "")


def _shell(ctx: AppContext) -> html.Div:
    v = ctx.view
    current = f"{v.label_set}@{v.label_version}" if v.label_set else ATLAS_LABELS
    nav = [
        dcc.Link(p.TITLE, href=ctx.href(p.PATH), id=f"nav-{p.NAME}", className="nav-link")
        for p in PAGES
    ]
    return html.Div(
        [
            dcc.Location(id="url", refresh=False),
            html.Header(
                [
                    html.Div(
                        [
                            html.Span("CLL", className="brand-mark"),
                            html.Div(
                                [
                                    html.Div(APP_TITLE, className="brand-title"),
                                    html.Div(
                                        f"{v.name} · {v.species} · {v.n_cells:,} cells",
                                        className="brand-sub",
                                        id="atlas-label",
                                    ),
                                ]
                            ),
                        ],
                        className="brand",
                    ),
                    html.Nav(nav, className="nav"),
                    html.Div(
                        C.dropdown(
                            "labels-select",
                            label_options(v),
                            current,
                            clearable=False,
                        ),
                        className="labels-select",
                        title="Cell-type labels: as built, or a curated version",
                    ),
                ],
                className="topbar",
            ),
            html.Div(id="labels-msg"),
            html.Main(html.Div(id="page"), className="content"),
            html.Footer(
                [
                    "CLL TME Atlas explorer · the URL keeps your selections: copy it to share "
                    "this view.",
                ],
                className="footer",
            ),
        ],
        className="shell",
    )


def create_app(
    atlas_path: str | Path, config: Config | None = None, *, name: str | None = None
) -> dash.Dash:
    """The explorer for the atlas in ``atlas_path`` (opened with :func:`app.data.open_view`)."""
    config = config or Config()
    atlas_path = Path(atlas_path)
    view = open_view(atlas_path, config.limits, name=name)
    ctx = AppContext(atlas_path, config, view)
    app = dash.Dash(
        __name__,
        title=APP_TITLE,
        assets_folder=str(ASSETS),
        url_base_pathname=config.serve.url_base_pathname or "/",
        suppress_callback_exceptions=True,
        serve_locally=True,
        update_title=None,
        meta_tags=[{"name": "viewport", "content": "width=device-width, initial-scale=1"}],
    )
    ctx.app = app
    app.tme = ctx  # type: ignore[attr-defined]
    app.layout = lambda: _shell(ctx)  # per page load: the Labels menu lists new versions
    _register_router(app, ctx)
    for page in PAGES:
        page.register(app, ctx)
    app.clientside_callback(
        dash.ClientsideFunction(namespace="tme", function_name="downloadSvg"),
        Output({"type": "svg-btn", "index": dash.MATCH}, "title"),
        Input({"type": "svg-btn", "index": dash.MATCH}, "n_clicks"),
        State({"type": "svg-btn", "index": dash.MATCH}, "id"),
        prevent_initial_call=True,
    )
    _add_health(app, ctx)
    from .security import install_security  # headers, CSP, plain error pages, auth

    install_security(app.server, config, app=app)
    _guard_callbacks(app)
    _register_js_paths(app)
    return app


def _register_js_paths(app: dash.Dash) -> None:
    """Dash allows its component bundles to be fetched only once it has rendered an index
    page (that is when it registers their paths). Under gunicorn a browser's first page load
    can fetch the page from one worker and a bundle from another that has not rendered one:
    a 404 on ``polyfill@7…js`` and a blank page (seen in the browser benchmark). Render the
    index once, in process, so every worker serves every bundle from its first request."""
    prefix = app.config.requests_pathname_prefix or "/"
    with app.server.test_request_context(prefix):
        app.index()


def _guard_callbacks(app: dash.Dash) -> None:
    """Inputs of the wrong type (a payload no browser sends: a number where a list is
    expected, ...) end the callback with "no update" (HTTP 204) and a log line, not a 500.
    Unknown *values* are handled by each callback and shown as messages."""
    import functools

    from dash.exceptions import PreventUpdate

    def guard(key, fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
                log.warning("callback %s rejected its input (%s)", key[:80], type(e).__name__)
                raise PreventUpdate from None

        return inner

    for key, cb in app.callback_map.items():
        if callable(cb.get("callback")):
            cb["callback"] = guard(key, cb["callback"])


def _register_router(app: dash.Dash, ctx: AppContext) -> None:
    by_path = {p.PATH: p for p in PAGES}

    @app.callback(
        Output("page", "children"),
        *[Output(f"nav-{p.NAME}", "className") for p in PAGES],
        Input("url", "pathname"),
        Input("labels-select", "value"),
        State("url", "search"),
    )
    def _route(pathname: str | None, labels: str | None, search: str | None):
        _use_labels(app, labels)
        try:
            path = "/" + (app.strip_relative_path(pathname or "/") or "").strip("/")
        except Exception:  # noqa: BLE001 - hostile pathname ('../..', not a str): not found
            path = "/" + str(pathname)[:60].strip("/")
        page = by_path.get(path, overview if path in ("/", "/overview") else None)
        classes = ["nav-link active" if p is page else "nav-link" for p in PAGES]
        if page is None:
            body = html.Div(
                [
                    html.H2("Page not found"),
                    C.message(f"There is no page {path[:60]!r}. Use the menu above.", "warn"),
                ],
                className="page",
            )
            return (body, *classes)
        params = parse_query(search)
        try:
            body = page.layout(ctx, params)
        except Exception:  # noqa: BLE001 - never a traceback in the browser
            log.exception("page %s failed to render", page.PATH)
            body = html.Div(
                C.message("This page could not be shown; the error was logged.", "error"),
                className="page",
            )
        return (body, *classes)


def _use_labels(app: dash.Dash, value: Any) -> None:
    """The Labels menu's ``value`` for this request and, as a cookie, for the callbacks
    that follow (scoped to this explorer's path; unknown values mean the atlas's labels)."""
    import flask

    value = value if isinstance(value, str) and parse_label_choice(value) else ATLAS_LABELS
    flask.g.tme_labels = value
    if flask.request.cookies.get(LABELS_COOKIE, ATLAS_LABELS) == value:
        return

    @flask.after_this_request
    def _set_cookie(response):
        response.set_cookie(
            LABELS_COOKIE,
            value,
            path=app.config.requests_pathname_prefix or "/",
            httponly=True,
            samesite="Strict",
            secure=flask.request.is_secure,
        )
        return response


def _add_health(app: dash.Dash, ctx: AppContext) -> None:
    import flask

    server = app.server
    if "tme_healthz" in server.view_functions:
        return

    def healthz():  # the status only (a vanished atlas: 503 through the error handler)
        ctx.view.n_cells  # noqa: B018 - touching the view re-validates the atlas
        return flask.jsonify({"status": "ok"})

    server.add_url_rule("/healthz", "tme_healthz", healthz, methods=["GET"])


def app_context(app: Any) -> AppContext:
    return app.tme
