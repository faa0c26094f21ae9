"""Finished h5ad exports waiting for their one download, shared by every worker and process.

A download link (``/_tme_export/<token>``) may be answered by any gunicorn worker, so the
file and its token live on disk, in one export folder per explorer instance
(``serve.export_dir``; default ``<temp dir>/tme-atlas-exports-<uid>-<port>``, mode 0700):

* ``<token>.h5ad`` + ``<token>.json`` (owner, time, size): a finished export. The first
  download renames the file away (atomic: exactly one request gets it, in any process)
  and deletes it once sent; a link older than ``limits.export_ttl_s`` is deleted unused.
* ``.work-*``: exports being written (removed on failure, swept when stale).
* ``rate/<owner>-<ms>-<random>``: one empty file per export started, for the per-owner hourly
  limit (``limits.exports_per_hour``; owner = the logged-in user, else the client address).

Disk: a new export is refused while the folder holds more than
``limits.max_export_disk_bytes``; an export larger than ``limits.max_export_bytes`` is
deleted and refused. Every add sweeps expired files; gunicorn's master empties the folder
when it exits (``app/gunicorn_conf.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from atlas.errors import ExportRefused

__all__ = ["ExportRefused", "ExportStore", "clear_export_dir", "default_export_dir"]

TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{32}$")
SUFFIX = ".h5ad"
RATE_DIR = "rate"
RATE_WINDOW_S = 3600.0


def default_export_dir(config: Any) -> Path:
    """``serve.export_dir`` or ``<temp dir>/tme-atlas-exports-<uid>-<port>``."""
    serve = getattr(config, "serve", None)
    given = getattr(serve, "export_dir", "") or ""
    if given:
        return Path(given).expanduser()
    uid = os.getuid() if hasattr(os, "getuid") else 0
    port = getattr(serve, "port", 8050)
    return Path(tempfile.gettempdir()) / f"tme-atlas-exports-{uid}-{port}"


def _private_dir(path: Path) -> Path:
    """Create ``path`` (0700) or check that the existing one is ours and not a link."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    import stat

    if not stat.S_ISDIR(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
        raise RuntimeError(f"export folder {path} is not a folder owned by this user")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


class ExportStore:
    """The export folder of one explorer instance (see the module docstring)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        ttl_s: float = 3600,
        max_disk_bytes: int = 8 * 1024**3,
        max_file_bytes: int = 2 * 1024**3,
        per_hour: int = 10,
        clock=time.time,
    ):
        self.dir = _private_dir(Path(directory))
        self.ttl_s = float(ttl_s)
        self.max_disk_bytes = int(max_disk_bytes)
        self.max_file_bytes = int(max_file_bytes)
        self.per_hour = int(per_hour)
        self._clock = clock

    @classmethod
    def from_config(cls, config: Any) -> ExportStore:
        lim = config.limits
        return cls(
            default_export_dir(config),
            ttl_s=lim.export_ttl_s,
            max_disk_bytes=lim.max_export_disk_bytes,
            max_file_bytes=lim.max_export_bytes,
            per_hour=lim.exports_per_hour,
        )

    # ------------------------------------------------------------------ writing
    @staticmethod
    def _owner_key(owner: str) -> str:
        return hashlib.sha256(owner.encode("utf-8", "replace")).hexdigest()[:24]

    def used_bytes(self) -> int:
        total = 0
        for root, _dirs, files in os.walk(self.dir):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, f)).st_size
        return total

    def admit(self, owner: str) -> None:
        """Count an export for ``owner`` or raise :class:`ExportRefused` (rate, disk)."""
        self.sweep()
        key = self._owner_key(owner)
        rate = _private_dir(self.dir / RATE_DIR)
        now = self._clock()
        recent = [p for p in rate.glob(f"{key}-*") if now - _stamp(p) < RATE_WINDOW_S]
        if len(recent) >= self.per_hour:
            raise ExportRefused(
                f"At most {self.per_hour} exports per hour; please try again later."
            )
        if self.used_bytes() >= self.max_disk_bytes:
            raise ExportRefused(
                "The server's export space is full; please try again later or ask the site "
                "administrator for `tme-atlas export`."
            )
        (rate / f"{key}-{int(now * 1000)}-{secrets.token_hex(4)}").touch()

    @contextlib.contextmanager
    def workdir(self):
        """A private folder inside the export folder for one export being written."""
        tmp = Path(tempfile.mkdtemp(prefix=".work-", dir=self.dir))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def check_size(self, path: Path) -> int:
        size = path.stat().st_size
        if size > self.max_file_bytes:
            raise ExportRefused(
                f"The export is {size / 1e6:,.0f} MB, above the limit of "
                f"{self.max_file_bytes / 1e6:,.0f} MB; narrow the filters."
            )
        if self.used_bytes() > self.max_disk_bytes:
            raise ExportRefused(
                "The server's export space is full; please try again later or ask the site "
                "administrator for `tme-atlas export`."
            )
        return size

    def add(self, path: Path, owner: str = "") -> str:
        """Move the finished export ``path`` into the folder; returns its token."""
        token = secrets.token_urlsafe(24)
        meta = {"owner": self._owner_key(owner), "created": self._clock()}
        meta["size"] = path.stat().st_size
        (self.dir / f"{token}.json").write_text(json.dumps(meta), encoding="utf-8")
        os.replace(path, self.dir / f"{token}{SUFFIX}")
        return token

    # ------------------------------------------------------------------ reading
    def take(self, token: str) -> Path | None:
        """The file of ``token`` for its one download (the caller deletes it when sent),
        or None: unknown, already taken or expired (then deleted)."""
        if not isinstance(token, str) or not TOKEN_RE.match(token):
            return None
        src = self.dir / f"{token}{SUFFIX}"
        meta_file = self.dir / f"{token}.json"
        taken = self.dir / f".taken-{token}-{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"
        try:
            os.rename(src, taken)  # atomic: one request (in one process) wins
        except OSError:
            return None
        try:
            created = float(json.loads(meta_file.read_text("utf-8"))["created"])
        except (OSError, ValueError, KeyError, TypeError):
            created = _mtime(taken)
        meta_file.unlink(missing_ok=True)
        if self._clock() - created > self.ttl_s:
            taken.unlink(missing_ok=True)
            return None
        return taken

    # ------------------------------------------------------------------ cleaning
    def sweep(self) -> list[str]:
        """Delete expired exports, stale work folders and downloads, old rate entries."""
        now = self._clock()
        gone = []
        for p in list(self.dir.iterdir()):
            name = p.name
            age = now - _mtime(p)
            if name == RATE_DIR:
                for r in p.iterdir():
                    if now - _stamp(r) > RATE_WINDOW_S:
                        r.unlink(missing_ok=True)
                continue
            stale = age > self.ttl_s
            if name.endswith(".json"):
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    stale = now - float(json.loads(p.read_text("utf-8"))["created"]) > self.ttl_s
            if not stale:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
                if name.endswith(".json"):
                    (self.dir / (name[: -len(".json")] + SUFFIX)).unlink(missing_ok=True)
            gone.append(name)
        return gone

    def clear(self) -> None:
        """Delete everything in the folder (the instance shuts down)."""
        for p in list(self.dir.iterdir()):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _stamp(p: Path) -> float:
    """The time a rate entry ``<owner>-<ms>-<random>`` was made (0 when malformed)."""
    try:
        return int(p.name.split("-")[1]) / 1000.0
    except (IndexError, ValueError):
        return 0.0


def _mtime(p: Path) -> float:
    try:
        return os.lstat(p).st_mtime
    except OSError:
        return 0.0


def clear_export_dir(config: Any) -> None:
    """Empty the export folder of ``config``'s instance (gunicorn's ``on_exit``)."""
    d = default_export_dir(config)
    if d.is_dir():
        ExportStore(d).clear()
