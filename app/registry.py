"""Several atlases served by one explorer instance, chosen by name — never by path.

``config.serve.atlases`` maps display names to atlas directories, e.g.::

    serve:
      atlases:
        CLL patients: /data/atlas/human
        Eµ-TCL1 mouse: /data/atlas/mouse

The user picks an atlas by name (``?atlas=NAME`` in the URL, or the selector in the
layout); a name that is not configured is refused with a message. Stores are opened
lazily (``atlas.open``) on first use, once per process, so that gunicorn workers each
map the same files and share the OS page cache.

On every access the registry re-checks the atlas directory's identity (device, inode and
mtime of the directory and of its store) with a few ``stat`` calls: an atlas that was
replaced while serving (``tme-atlas build`` renames a finished atlas into place) is
reopened; one that vanished gives :class:`AtlasUnavailableError`, which the explorer shows
as a clear error page (HTTP 503), not a crash loop.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas import schema
from atlas.errors import AtlasUnavailableError, UnknownAtlasError

from .security import ERROR_TEXT, install_security

log = logging.getLogger("tme_atlas.app.registry")

ENV_ATLAS = "TME_ATLAS_ATLAS"
_NAME_OK = re.compile(r"^[\w .,()+\-µ]{1,64}$", re.UNICODE)


@dataclass
class _Entry:
    name: str
    path: Path
    store: Any = None
    view: Any = None
    ident: tuple | None = None
    opened_at: float = 0.0
    error: str | None = None
    generation: int = 0  # +1 each time the directory is (re)opened from disk


def _identity(path: Path) -> tuple:
    """Cheap fingerprint of an atlas directory and of every file of its read store (inode,
    size, mtime: a file truncated or replaced in place changes it, and the store is then
    reopened and verified); raises OSError when the directory is gone."""
    st = os.stat(path)
    parts: list = [st.st_dev, st.st_ino, st.st_mtime_ns]
    for rel in (schema.STORE_DIR, schema.ATLAS_FILE):
        try:
            s = os.stat(path / rel)
        except FileNotFoundError:
            parts.append(None)
        else:
            parts.extend((s.st_ino, s.st_mtime_ns))
    parts.extend(_tree_identity(path / schema.STORE_DIR))
    return tuple(parts)


def _tree_identity(folder: Path, depth: int = 2) -> list:
    out: list = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return out
    for e in entries:
        try:
            if e.is_dir(follow_symlinks=False):
                if depth > 1:
                    out.append(e.name)
                    out.extend(_tree_identity(Path(e.path), depth - 1))
                continue
            s = e.stat()
        except OSError:
            continue
        out.append((e.name, s.st_ino, s.st_size, s.st_mtime_ns))
    return out


def _default_opener(path: Path) -> Any:
    from .data import open_store

    return open_store(path)


class AtlasRegistry:
    """Named atlases of one explorer instance.

    ``atlases``: name -> directory (``config.serve.atlases``); ``default``: the name used
    when none is asked for (the first configured one unless given); ``opener``: opens a
    directory (default ``atlas.open``); ``wrap``: optional ``wrap(store, name)`` building
    the object :meth:`get` returns (e.g. the explorer's per-atlas view with its caches),
    rebuilt whenever the store is reopened.
    """

    def __init__(
        self,
        atlases: Mapping[str, str | os.PathLike],
        default: str | None = None,
        opener: Callable[[Path], Any] | None = None,
        wrap: Callable[[Any, str], Any] | None = None,
    ):
        if not atlases:
            raise ValueError(
                "no atlas configured: give an atlas directory (TME_ATLAS_ATLAS or "
                "`tme-atlas serve DIR`) or serve.atlases in the config"
            )
        self._entries: dict[str, _Entry] = {}
        for name, path in atlases.items():
            if not isinstance(name, str) or not _NAME_OK.match(name):
                raise ValueError(
                    f"serve.atlases: invalid atlas name {name!r} (letters, digits, spaces, "
                    "'.,()+-_', at most 64 characters)"
                )
            self._entries[name] = _Entry(name, Path(path).expanduser().resolve())
        if default is None:
            default = next(iter(self._entries))
        if default not in self._entries:
            raise ValueError(f"default atlas {default!r} is not configured")
        self.default = default
        self._opener = opener or _default_opener
        self._wrap = wrap
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        config: Any,
        atlas_path: str | os.PathLike | None = None,
        opener: Callable[[Path], Any] | None = None,
        wrap: Callable[[Any, str], Any] | None = None,
    ) -> AtlasRegistry:
        """Atlases from ``config.serve.atlases`` plus ``atlas_path`` (or ``$TME_ATLAS_ATLAS``).

        A single ``atlas_path`` not among the configured directories is added under the
        name of its directory and becomes the default.
        """
        atlases: dict[str, str] = dict(getattr(getattr(config, "serve", None), "atlases", {}) or {})
        if atlas_path is None:
            atlas_path = os.environ.get(ENV_ATLAS) or None
        default = None
        if atlas_path is not None:
            p = Path(atlas_path).expanduser().resolve()
            known = {Path(v).expanduser().resolve(): k for k, v in atlases.items()}
            if p in known:
                default = known[p]
            else:
                name = _unique_name(p.name or "atlas", atlases)
                atlases = {name: str(p), **atlases}
                default = name
        return cls(atlases, default=default, opener=opener, wrap=wrap)

    # ------------------------------------------------------------------ names
    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def resolve(self, name: Any = None) -> str:
        """The configured name for a user's choice (``None``/"" -> the default)."""
        if name is None or name == "":
            return self.default
        if isinstance(name, (list, tuple)) and len(name) == 1:  # parse_qs gives lists
            name = name[0]
        if isinstance(name, str) and name in self._entries:
            return name
        shown = str(name)[:40]
        raise UnknownAtlasError(f"unknown atlas {shown!r}; available: {', '.join(self._entries)}")

    def path(self, name: str | None = None) -> Path:
        """The directory of a configured atlas (for the server's own use; never a user's)."""
        return self._entries[self.resolve(name)].path

    # ------------------------------------------------------------------ stores
    def get(self, name: Any = None) -> Any:
        """The open store (or wrapped view) of atlas ``name``.

        Reopened when the directory was replaced; :class:`AtlasUnavailableError` when it
        vanished or cannot be opened (the next call tries again: no crash loop).
        """
        entry = self._entries[self.resolve(name)]
        try:
            ident = _identity(entry.path)
        except OSError:
            with self._lock:  # dropped, not closed: requests in flight may still read it
                entry.store = entry.view = entry.ident = None
                first = entry.error != "vanished"
                entry.error = "vanished"
            if first:  # logged once per outage, not once per request
                log.error("atlas %r: directory %s is missing", entry.name, entry.path)
            raise AtlasUnavailableError(
                f"The atlas {entry.name!r} is not available right now (its files are "
                "missing). Please contact the site administrator."
            ) from None
        view = entry.view
        if view is not None and ident == entry.ident:
            return view
        with self._lock:
            if entry.view is not None and ident == entry.ident:
                return entry.view
            if entry.store is not None:
                # dropped, not closed: requests in flight keep their (still mapped) store
                log.warning("atlas %r changed on disk; reopening %s", entry.name, entry.path)
                entry.store = entry.view = None
            try:
                store = self._opener(entry.path)
                view = store if self._wrap is None else self._wrap(store, entry.name)
            except Exception as e:  # noqa: BLE001 - any failure to open is "unavailable"
                if entry.error != e.__class__.__name__:  # once per outage
                    log.error("atlas %r: cannot open %s: %s", entry.name, entry.path, e)
                entry.error = e.__class__.__name__
                raise AtlasUnavailableError(
                    f"The atlas {entry.name!r} cannot be opened right now. Please contact "
                    "the site administrator."
                ) from e
            # the directory may have been swapped while opening: fingerprint again
            try:
                after = _identity(entry.path)
            except OSError:
                after = None
            entry.store, entry.view = store, view
            entry.generation += 1
            entry.ident = after if after == ident else None
            entry.opened_at, entry.error = time.time(), None
            return view

    def generation(self, name: Any = None) -> int:
        """How many times atlas ``name`` was opened from disk (changes when replaced)."""
        return self._entries[self.resolve(name)].generation

    def adopt(self, name: str, store: Any, view: Any = None) -> None:
        """Register an already-open store (and its view) for ``name`` (no second open)."""
        entry = self._entries[self.resolve(name)]
        if store is None and view is None:
            return
        try:
            ident = _identity(entry.path)
        except OSError:
            return
        with self._lock:
            entry.store = store if store is not None else view
            entry.view = view if view is not None else store
            entry.ident, entry.opened_at, entry.error = ident, time.time(), None

    def health(self) -> tuple[bool, dict]:
        """``(ok, details)`` for /healthz: ok when every configured atlas opens and its
        store verifies (every part the explorer serves); the details stay in the server
        (/healthz shows the status only)."""
        status: dict[str, str] = {}
        for name in self._entries:
            try:
                self.get(name)
                status[name] = "open"
            except AtlasUnavailableError:
                status[name] = "unavailable"
        return all(v == "open" for v in status.values()), {"atlases": status}

    def close(self) -> None:
        with self._lock:
            for entry in self._entries.values():
                if entry.store is not None:
                    _close(entry.store)
                entry.store = entry.view = entry.ident = None


def _close(store: Any) -> None:
    close = getattr(store, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # noqa: BLE001 - closing a replaced store must not fail a request
            log.debug("closing a store failed", exc_info=True)


def _unique_name(name: str, taken: Mapping[str, Any]) -> str:
    name = re.sub(r"[^\w .,()+\-µ]", "_", name)[:60] or "atlas"
    out, i = name, 2
    while out in taken:
        out, i = f"{name} ({i})", i + 1
    return out


# ====================================================================== the WSGI entry point
ATLAS_PREFIX = "atlas"  # several atlases: /atlas/<slug>/ (slug from the configured name)


def slugify(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "atlas"


class AtlasDispatcher:
    """The WSGI application gunicorn serves (``app.wsgi:server``).

    * ``/healthz`` (always, public): 200 when the default atlas opens, else 503 (JSON).
    * one atlas: its explorer at ``/`` (the configured ``serve.url_base_pathname``);
    * several atlases: ``/`` lists them by name (``/?atlas=NAME`` redirects to it) and
      each explorer lives at ``/atlas/<slug>/``. Names never reach the file system: a
      request only selects one of the configured entries.

    The Dash app of an atlas is created on its first request in each worker (after the
    fork) and the registry re-validates the atlas directory on every data access. An atlas
    that is missing or unreadable gives a 503 page and is tried again on the next request:
    the worker keeps running (no crash loop), /healthz reports it.
    """

    def __init__(self, registry: AtlasRegistry, config: Any, create_app: Callable | None = None):
        import flask

        self.registry = registry
        self.config = config
        self._create_app = create_app
        base = (getattr(config.serve, "url_base_pathname", "/") or "/").rstrip("/") + "/"
        self.base = base
        self.multi = len(registry.names) > 1
        self.slugs: dict[str, str] = {}
        for name in registry.names:
            slug, i = slugify(name), 2
            while slug in self.slugs.values():
                slug, i = f"{slugify(name)}-{i}", i + 1
            self.slugs[name] = slug
        self.prefix = {
            name: (f"{base}{ATLAS_PREFIX}/{slug}/" if self.multi else base)
            for name, slug in self.slugs.items()
        }
        self._prefixes = set(self.prefix.values())
        self._apps: dict[str, Any] = {}
        self._lock = threading.Lock()

        root = flask.Flask("tme_atlas_root")
        self.root = root
        install_security(root, config, app=None, health=registry.health)
        self._unavailable_text = ERROR_TEXT[503]

        def _add_slash(**_):
            return flask.redirect(flask.request.path + "/", code=308)

        for name, prefix in self.prefix.items() if self.multi else ():
            root.add_url_rule(
                prefix.rstrip("/"), f"tme_slash_{self.slugs[name]}", _add_slash, methods=["GET"]
            )

        @root.route(base, methods=["GET"])
        def _index():
            choice = flask.request.args.get("atlas")
            if choice is not None or not self.multi:
                try:
                    name = registry.resolve(choice)
                except UnknownAtlasError as e:
                    return flask.Response(
                        f"{e}\n", status=404, mimetype="text/plain; charset=utf-8"
                    )
                return flask.redirect(self.prefix[name], code=302)
            return flask.Response(self._index_html(), mimetype="text/html; charset=utf-8")

    # ------------------------------------------------------------------ pages
    def _index_html(self) -> str:
        from html import escape

        items = "\n".join(
            f'<li><a href="{escape(self.prefix[n])}">{escape(n)}</a>'
            f"{' (default)' if n == self.registry.default else ''}</li>"
            for n in self.registry.names
        )
        return (
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<title>CLL TME Atlas</title></head><body><h1>CLL TME Atlas</h1>"
            f"<p>Choose an atlas:</p><ul>\n{items}\n</ul></body></html>"
        )

    def _atlas_for(self, path: str) -> str | None:
        if not self.multi:
            return self.registry.default if path.startswith(self.base) else None
        for name, prefix in self.prefix.items():
            if path.startswith(prefix) or path + "/" == prefix:
                return name
        return None

    def app_for(self, name: str) -> Any:
        """The Dash app of atlas ``name``: created on first use, and again when the atlas
        directory was replaced (its layout shows the new atlas); raises
        :class:`AtlasUnavailableError` while the atlas cannot be read."""
        # a few stat() calls: reopens a replaced atlas, raises for a vanished one
        self.registry.get(name)
        gen = self.registry.generation(name)
        app, app_gen = self._apps.get(name, (None, -1))
        if app is not None and app_gen == gen:
            return app
        with self._lock:
            app, app_gen = self._apps.get(name, (None, -1))
            gen = self.registry.generation(name)
            if app is not None and app_gen == gen:
                return app
            if app is not None:
                log.warning("atlas %r was replaced: rebuilding its explorer", name)
            create = self._create_app
            if create is None:
                from .factory import create_app as create
            config = self.config.model_copy(deep=True)
            config.serve.url_base_pathname = self.prefix[name]
            try:
                app = create(self.registry.path(name), config, name=name)
            except Exception as e:  # noqa: BLE001 - shown as "unavailable", retried
                log.error("atlas %r: the explorer could not be created: %s", name, e)
                raise AtlasUnavailableError(f"atlas {name!r} cannot be shown") from e
            ctx = getattr(app, "tme", None)  # an app.factory.AppContext
            if ctx is not None:
                own = ctx.opened_view
                self.registry.adopt(name, getattr(own, "store", None), own)
                ctx.serve_from(lambda: self.registry.get(name))
            self._apps[name] = (app, self.registry.generation(name))
            return app

    # ------------------------------------------------------------------ WSGI
    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "") or "/"
        if self.multi and path + "/" in self._prefixes:
            # through the root app: with auth on, a known slug answers 401 like an unknown one
            return self.root(environ, start_response)
        if path == "/healthz" or (self.multi and path in (self.base, self.base.rstrip("/"))):
            return self.root(environ, start_response)
        name = self._atlas_for(path)
        if name is None:
            return self.root(environ, start_response)
        try:
            # a vanished atlas gives the 503 page for the page, callbacks and assets alike
            app = self.app_for(name)
        except AtlasUnavailableError:
            return self._unavailable(environ, start_response)
        return app.server(environ, start_response)

    def _unavailable(self, environ, start_response):
        # through the root Flask app: security headers (and auth, when on) apply
        environ = dict(environ)
        environ["PATH_INFO"] = "/_tme_unavailable"
        return self.root(environ, start_response)


def build_wsgi(
    config: Any = None,
    atlas_path: str | os.PathLike | None = None,
    create_app: Callable | None = None,
) -> AtlasDispatcher:
    """The WSGI app for ``config`` (+ ``atlas_path`` or ``$TME_ATLAS_ATLAS``)."""
    if config is None:
        from atlas.config import load_config

        config = load_config()

    def wrap(store: Any, name: str) -> Any:
        from .data import AtlasView

        return AtlasView(store, config.limits, name=name)

    registry = AtlasRegistry.from_config(config, atlas_path, wrap=wrap)
    disp = AtlasDispatcher(registry, config, create_app=create_app)

    @disp.root.route("/_tme_unavailable", methods=["GET", "POST", "HEAD"])
    def _unavailable():
        import flask

        return flask.Response(
            disp._unavailable_text + "\n", status=503, mimetype="text/plain; charset=utf-8"
        )

    return disp
