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

log = logging.getLogger("tme_atlas.app.registry")

ENV_ATLAS = "TME_ATLAS_ATLAS"
_NAME_OK = re.compile(r"^[\w .,()+\-µ]{1,64}$", re.UNICODE)


class UnknownAtlasError(ValueError):
    """A requested atlas name is not configured (the message is safe to show)."""


class AtlasUnavailableError(RuntimeError):
    """A configured atlas cannot be read now (vanished, half-written, unreadable)."""


@dataclass
class _Entry:
    name: str
    path: Path
    store: Any = None
    ident: tuple | None = None
    opened_at: float = 0.0
    error: str | None = None


def _identity(path: Path) -> tuple:
    """Cheap fingerprint of an atlas directory; raises OSError when it is gone."""
    st = os.stat(path)
    parts: list = [st.st_dev, st.st_ino, st.st_mtime_ns]
    for rel in (schema.STORE_DIR, schema.ATLAS_FILE):
        try:
            s = os.stat(path / rel)
        except FileNotFoundError:
            parts.append(None)
        else:
            parts.extend((s.st_ino, s.st_mtime_ns))
    return tuple(parts)


def _default_opener(path: Path) -> Any:
    import atlas

    return atlas.open(path)


class AtlasRegistry:
    """Named atlases of one explorer instance.

    ``atlases``: name -> directory (``config.serve.atlases``); ``default``: the name used
    when none is asked for (the first configured one unless given); ``opener``: opens a
    directory (default ``atlas.open``).
    """

    def __init__(
        self,
        atlases: Mapping[str, str | os.PathLike],
        default: str | None = None,
        opener: Callable[[Path], Any] | None = None,
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
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        config: Any,
        atlas_path: str | os.PathLike | None = None,
        opener: Callable[[Path], Any] | None = None,
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
        return cls(atlases, default=default, opener=opener)

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
        """The open store of atlas ``name``; reopened if replaced, error if vanished."""
        entry = self._entries[self.resolve(name)]
        try:
            ident = _identity(entry.path)
        except OSError:
            with self._lock:
                entry.store, entry.ident = None, None
                entry.error = "vanished"
            log.error("atlas %r: directory %s is missing", entry.name, entry.path)
            raise AtlasUnavailableError(
                f"The atlas {entry.name!r} is not available right now (its files are "
                "missing). Please contact the site administrator."
            ) from None
        store = entry.store
        if store is not None and ident == entry.ident:
            return store
        with self._lock:
            if entry.store is not None and ident == entry.ident:
                return entry.store
            if entry.store is not None:
                log.warning("atlas %r changed on disk; reopening %s", entry.name, entry.path)
                _close(entry.store)
                entry.store = None
            try:
                store = self._opener(entry.path)
            except Exception as e:  # noqa: BLE001 - any failure to open is "unavailable"
                entry.error = f"{e.__class__.__name__}"
                log.error("atlas %r: cannot open %s: %s", entry.name, entry.path, e)
                raise AtlasUnavailableError(
                    f"The atlas {entry.name!r} cannot be opened right now. Please contact "
                    "the site administrator."
                ) from e
            # the directory may have been swapped while opening: fingerprint again
            try:
                after = _identity(entry.path)
            except OSError:
                after = None
            entry.store, entry.ident = store, (after if after == ident else None)
            entry.opened_at, entry.error = time.time(), None
            return store

    def health(self) -> tuple[bool, dict]:
        """``(ok, details)`` for /healthz: ok when the default atlas can be opened."""
        status: dict[str, str] = {}
        for name, entry in self._entries.items():
            try:
                _identity(entry.path)
                status[name] = "open" if entry.store is not None else "available"
            except OSError:
                status[name] = "missing"
        try:
            self.get(self.default)
            status[self.default] = "open"
            ok = True
        except AtlasUnavailableError:
            status[self.default] = "unavailable"
            ok = False
        return ok, {"atlases": status, "default": self.default, "pid": os.getpid()}

    def close(self) -> None:
        with self._lock:
            for entry in self._entries.values():
                if entry.store is not None:
                    _close(entry.store)
                entry.store, entry.ident = None, None


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
