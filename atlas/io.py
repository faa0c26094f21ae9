"""Atomic file writing: a reader never sees a half-written file or directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    Works for files and directories. On error the temporary is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sweep_temporaries(directory: str | Path) -> list[str]:
    """Remove what a killed :func:`atomic_path` left in ``directory``: its ``.<name>.*.tmp``
    temporaries and ``.<name>.old.<pid>`` copies whose ``<name>`` is in place. Call it only
    from the one process that owns ``directory`` (the build of that output folder). Returns
    the names removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    gone = []
    for p in directory.iterdir():
        n = p.name
        stale_tmp = n.startswith(".") and n.endswith(".tmp")
        head, sep, pid = n.rpartition(".old.")
        stale_old = n.startswith(".") and sep and pid.isdigit() and (directory / head[1:]).exists()
        if stale_tmp or stale_old:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(n)
    return gone


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_h5ad_atomic(adata, path: str | Path, **kwargs) -> None:
    """``adata.write_h5ad`` to a temporary file, then rename onto ``path``."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, **kwargs)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
