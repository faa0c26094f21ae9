"""Curated cell-type labels: versioned label sets kept beside the atlas, never in it.

``atlas.h5ad`` and the read store are never rewritten by a curation. Each named label set
lives in its own folder of the atlas directory::

    DIR/annotations/<set>/manifest.json          who, when, what, for every version
    DIR/annotations/<set>/v0001.parquet          the full label vector of version 1
    DIR/annotations/<set>/v0002.parquet          ... (columns cell_id, label)
    DIR/annotations/<set>/tables/v0002/*.parquet the tables recomputed with version 2
    DIR/annotations/<set>/tables/v0002/*.csv     (``tme-atlas analyse|crosstalk DIR --labels``)
    DIR/annotations/<set>/tables/v0002/params.json
    DIR/annotations/<set>/.lock                  serialises writers (``flock``)

An edit is one operation on the latest version (the atlas's own ``obs["cell_type"]`` for
the first): ``rename`` one label, ``merge`` several labels into one, ``relabel`` a list of
cells (by cell id, e.g. a lasso selection). It writes a new version file (atomically), then
appends its entry to the manifest (atomically; the manifest is the commit point), under an
exclusive lock of the set; with ``expected_version`` an edit based on an older version is
refused (:class:`~atlas.errors.CurationConflict`), so two editors cannot overwrite each other.
Labels and set names typed by users are validated (:func:`check_label`,
:func:`check_set_name`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import schema
from .errors import (
    AtlasError,
    CurationConflict,
    InputError,
    InvalidName,
    UnknownValue,
    check_choice,
    clip,
)
from .io import atomic_path, atomic_write_text
from .tables import csv_text, is_formula_like

log = logging.getLogger("tme_atlas.curation")

SET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
MAX_LABEL_CHARS = 60
MAX_LABELS = 500  # distinct labels in one version
OPERATIONS = ("rename", "merge", "relabel")
VERSION_FILE = "v{:04d}.parquet"
VERSION_DIR = "v{:04d}"
LOCK_FILE = ".lock"
# the tables that depend on the cell labels (recomputed per label version)
LABEL_TABLES = (
    schema.TABLE_PROPORTIONS,
    schema.TABLE_COMPOSITION,
    schema.TABLE_DE,
    schema.TABLE_PROGRAMS,
    schema.TABLE_INTERACTIONS,
    schema.TABLE_INTERACTIONS_BY_SAMPLE,
    schema.TABLE_INTERACTIONS_DIFF,
    schema.TABLE_INTERACTIONS_DIFF_ALL,
    schema.TABLE_LIGREC_AGREEMENT,
)


class MissingVersionTable(schema.MissingKeyError):
    """A label version without a recomputed table; names the command to run."""

    def __init__(self, name: str, version: int, table: str):
        self.where, self.key, self.stage = schema.ANNOTATIONS_DIR, table, None
        cmd = "crosstalk" if table.startswith(schema.TABLE_INTERACTIONS) else "analyse"
        if table == schema.TABLE_LIGREC_AGREEMENT:
            cmd = "crosstalk"
        AtlasError.__init__(
            self,
            f"label set {name!r} v{version} has no table {table!r}: run "
            f"`tme-atlas {cmd} DIR --labels {name}` first",
        )


# ------------------------------------------------------------------ validation
def check_set_name(name: Any) -> str:
    """A label-set name: 1-40 characters of letters, digits, ``_.-``, starting with a letter
    or digit (it names a folder); else :class:`InvalidName`."""
    if not isinstance(name, str) or not SET_NAME_RE.match(name):
        raise InvalidName(
            f"invalid label-set name {clip(name)!r}: 1-40 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_label(label: Any) -> str:
    """A cell-type label typed by a user, stripped: 1-60 printable characters, not starting
    like a spreadsheet formula (``=``, ``+``, ``-``, ``@``); else :class:`InvalidName`."""
    if not isinstance(label, str):
        raise InvalidName("a label must be text")
    s = label.strip()
    if not s:
        raise InvalidName("empty label")
    if len(s) > MAX_LABEL_CHARS:
        raise InvalidName(f"label too long ({len(s)} characters, at most {MAX_LABEL_CHARS})")
    if not all(ch.isprintable() for ch in s):
        raise InvalidName(f"label {clip(s)!r} holds control characters")
    if is_formula_like(s):
        raise InvalidName(
            f"label {clip(s)!r} starts with {s[0]!r} (read as a formula by spreadsheets)"
        )
    return s


def parse_labels_arg(spec: Any) -> tuple[str, int | None]:
    """``("NAME", None)`` for ``--labels NAME`` (the latest version), ``("NAME", N)`` for
    ``--labels NAME@N``; else :class:`InvalidName`."""
    name, sep, version = str(spec).partition("@")
    check_set_name(name)
    if not sep:
        return name, None
    if not version.isdigit() or len(version) > 6:
        raise InvalidName(f"--labels {clip(spec)!r}: use NAME or NAME@VERSION")
    return name, int(version)


# ------------------------------------------------------------------ paths and reading
def annotations_dir(atlas_dir: str | Path) -> Path:
    return Path(atlas_dir) / schema.ANNOTATIONS_DIR


def set_dir(atlas_dir: str | Path, name: str) -> Path:
    return annotations_dir(atlas_dir) / check_set_name(name)


def label_sets(atlas_dir: str | Path) -> list[str]:
    """Names of the label sets of the atlas (those with a manifest), sorted."""
    root = annotations_dir(atlas_dir)
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if SET_NAME_RE.match(p.name) and (p / schema.ANNOTATION_MANIFEST_FILE).is_file()
    )


def read_manifest(atlas_dir: str | Path, name: str) -> dict[str, Any]:
    """The manifest of set ``name``; :class:`UnknownValue` when there is no such set."""
    path = set_dir(atlas_dir, name) / schema.ANNOTATION_MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UnknownValue(f"unknown label set {clip(name)!r}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable manifest ({e.__class__.__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("versions"), list):
        raise InputError(f"{path}: not a label-set manifest")
    return data


def versions(atlas_dir: str | Path, name: str) -> list[dict[str, Any]]:
    """The version entries of set ``name`` (oldest first): version, file, user, time, op,
    summary, n_changed, n_labels."""
    return list(read_manifest(atlas_dir, name)["versions"])


def latest_version(atlas_dir: str | Path, name: str) -> int:
    """The newest version of set ``name`` (0 when the set does not exist yet)."""
    try:
        vs = versions(atlas_dir, name)
    except UnknownValue:
        return 0
    return int(vs[-1]["version"]) if vs else 0


def check_version(atlas_dir: str | Path, name: str, version: Any = None) -> int:
    """``version`` (default: the latest) if set ``name`` has it; else :class:`UnknownValue`."""
    known = [int(v["version"]) for v in versions(atlas_dir, name)]
    if not known:
        raise UnknownValue(f"label set {clip(name)!r} has no version yet")
    if version is None:
        return known[-1]
    if isinstance(version, str) and version.isdigit():
        version = int(version)
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
        raise UnknownValue(f"unknown version {clip(version)!r} of label set {clip(name)!r}")
    check_choice(str(int(version)), [str(v) for v in known], f"version of {clip(name)!r}")
    return int(version)


def read_labels(atlas_dir: str | Path, name: str, version: int | None = None) -> pd.Series:
    """The labels of set ``name`` at ``version`` (default: the latest): a string Series
    indexed by cell id."""
    v = check_version(atlas_dir, name, version)
    df = pd.read_parquet(set_dir(atlas_dir, name) / VERSION_FILE.format(v))
    return pd.Series(
        df[schema.ANNOTATION_COL_LABEL].astype(str).to_numpy(dtype=object),
        index=pd.Index(df[schema.ANNOTATION_COL_CELL].astype(str), name=None),
        name=schema.ANNOTATION_COL_LABEL,
    )


def aligned_labels(
    atlas_dir: str | Path, name: str, version: int | None, cell_ids: Sequence[str]
) -> np.ndarray:
    """The labels of ``cell_ids`` (in that order) as a string array; :class:`InputError`
    when the set was made on other cells (an atlas rebuilt since)."""
    labels = read_labels(atlas_dir, name, version)
    ids = pd.Index(np.asarray(cell_ids, dtype=str))
    if len(labels) == len(ids) and labels.index.equals(ids):
        return labels.to_numpy(dtype=object)
    out = labels.reindex(ids)
    missing = int(out.isna().sum())
    if missing:
        raise InputError(
            f"label set {name!r}: {missing} of the atlas's {len(ids)} cells have no label "
            "(the set was made on another build of the atlas)"
        )
    return out.to_numpy(dtype=object)


# ------------------------------------------------------------------ operations
def apply_operation(labels: pd.Series, op: Mapping[str, Any]) -> tuple[pd.Series, dict, int]:
    """Apply one edit to ``labels`` (cell id -> label). Returns the new labels, the
    operation as recorded (validated, labels stripped) and the number of cells changed.

    ``{"op": "rename", "from": A, "to": B}``: every ``A`` cell becomes ``B`` (``B`` must be
    new; joining an existing label is a merge). ``{"op": "merge", "from": [A, B, ...],
    "to": C}``: at least two labels become ``C`` (new or one of them). ``{"op": "relabel",
    "cells": [id, ...], "to": C}``: those cells become ``C``. Unknown labels or cells and
    edits that change no cell raise :class:`InvalidName` / :class:`UnknownValue`.
    """
    if not isinstance(op, Mapping):
        raise InvalidName("an edit must be a mapping with 'op'")
    kind = check_choice(op.get("op"), OPERATIONS, "edit")
    to = check_label(op.get("to"))
    values = labels.to_numpy(dtype=object)
    present = set(pd.unique(values))
    if kind == "rename":
        src = op.get("from")
        check_choice(src, present, "label")
        if to in present:
            raise InvalidName(f"label {clip(to)!r} exists already: merge the two instead")
        mask = values == src
        rec = {"op": kind, "from": src, "to": to}
    elif kind == "merge":
        src = op.get("from")
        if not isinstance(src, (list, tuple)) or len(set(map(str, src))) < 2:
            raise InvalidName("merge: choose at least two labels")
        srcs = []
        for s in src:
            check_choice(s, present, "label")
            if s not in srcs:
                srcs.append(s)
        mask = np.isin(values, srcs)
        rec = {"op": kind, "from": srcs, "to": to}
    else:
        cells = op.get("cells")
        if not isinstance(cells, (list, tuple, np.ndarray, pd.Index)) or len(cells) == 0:
            raise InvalidName("relabel: select cells first")
        ids = pd.Index(np.asarray(cells, dtype=object).astype(str)).unique()
        pos = labels.index.get_indexer(ids)
        if (pos < 0).any():
            raise UnknownValue(f"relabel: {int((pos < 0).sum())} unknown cell id(s)")
        mask = np.zeros(len(values), dtype=bool)
        mask[pos] = True
        before = pd.Series(values[mask]).value_counts()
        rec = {
            "op": kind,
            "to": to,
            "n_cells": int(mask.sum()),
            "from_counts": {str(k): int(v) for k, v in before.items()},
        }
    changed = mask & (values != to)
    n = int(changed.sum())
    if n == 0:
        raise InvalidName("the edit changes no cell")
    new = values.copy()
    new[mask] = to
    if len(set(pd.unique(new))) > MAX_LABELS:
        raise InvalidName(f"too many distinct labels (at most {MAX_LABELS})")
    return pd.Series(new, index=labels.index, name=labels.name), rec, n


def describe(op: Mapping[str, Any]) -> str:
    """One line for the manifest and the log (user values clipped, control chars escaped)."""
    kind = op.get("op")
    if kind == "rename":
        return f"rename {clip(op['from'])!r} -> {clip(op['to'])!r}"
    if kind == "merge":
        return f"merge {', '.join(repr(clip(s)) for s in op['from'])} -> {clip(op['to'])!r}"
    return f"relabel {op.get('n_cells', 0)} cells -> {clip(op['to'])!r}"


# ------------------------------------------------------------------ writing
@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder/.lock`` (every process and thread of a host)."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _cells_digest(ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def edit_labels(
    atlas_dir: str | Path,
    name: str,
    op: Mapping[str, Any],
    *,
    user: str,
    base_labels: pd.Series | Callable[[], pd.Series] | None = None,
    expected_version: int | None = None,
) -> dict[str, Any]:
    """Apply ``op`` (see :func:`apply_operation`) to the latest version of set ``name`` and
    save the result as a new version; returns its manifest entry.

    ``base_labels`` (cell id -> label, or a function returning them) start a new set: the
    atlas's ``obs["cell_type"]``. ``expected_version``: the version the editor saw (0 for
    a new set); another latest version raises :class:`CurationConflict` and writes nothing.
    ``user`` is recorded as given (the login name).

    Writes
    ------
    ``DIR/annotations/<name>/v<N>.parquet`` and its entry in ``manifest.json``.
    """
    folder = set_dir(atlas_dir, name)
    with _locked(folder):
        try:
            manifest = read_manifest(atlas_dir, name)
        except UnknownValue:
            manifest = None
        latest = int(manifest["versions"][-1]["version"]) if manifest else 0
        if expected_version is not None and int(expected_version) != latest:
            raise CurationConflict(
                f"label set {name!r} is at version {latest}, not {int(expected_version)}: "
                "someone else saved an edit; reload and try again"
            )
        if latest:
            current = read_labels(atlas_dir, name, latest)
        else:
            if base_labels is None:
                raise UnknownValue(f"unknown label set {clip(name)!r}")
            current = base_labels() if callable(base_labels) else base_labels
            current = pd.Series(
                np.asarray(current.astype(str), dtype=object),
                index=pd.Index(np.asarray(current.index, dtype=str)),
                name=schema.ANNOTATION_COL_LABEL,
            )
            manifest = {
                "name": name,
                "base": {
                    "source": "atlas",
                    "column": schema.OBS_CELL_TYPE,
                    "n_cells": len(current),
                    "cells_sha256": _cells_digest(current.index),
                },
                "versions": [],
            }
        new, rec, n_changed = apply_operation(current, op)
        version = latest + 1
        fname = VERSION_FILE.format(version)
        _write_parquet(
            pd.DataFrame(
                {
                    schema.ANNOTATION_COL_CELL: new.index.to_numpy(dtype=object),
                    schema.ANNOTATION_COL_LABEL: pd.Categorical(new.to_numpy(dtype=object)),
                }
            ),
            folder / fname,
        )
        entry = {
            "version": version,
            "file": fname,
            "parent": latest,
            "user": str(user),
            "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "op": rec,
            "summary": describe(rec),
            "n_changed": n_changed,
            "n_labels": int(new.nunique()),
        }
        manifest["versions"].append(entry)
        atomic_write_text(
            folder / schema.ANNOTATION_MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n"
        )
    log.info(
        "labels %s v%d by %s: %s (%d cells)",
        name,
        version,
        clip(user, 64),
        entry["summary"],
        n_changed,
    )
    return entry


# ------------------------------------------------------------------ recomputed tables
def tables_dir(atlas_dir: str | Path, name: str, version: int) -> Path:
    return (
        set_dir(atlas_dir, name) / schema.ANNOTATION_TABLES_DIR / VERSION_DIR.format(int(version))
    )


def write_tables(
    atlas_dir: str | Path,
    name: str,
    version: int,
    tables: Mapping[str, pd.DataFrame],
    *,
    step: str,
    params: Mapping[str, Any],
) -> Path:
    """Write the tables computed with set ``name`` at ``version`` (parquet for the explorer,
    CSV for people) and record ``params`` under ``step`` in ``params.json``, every file
    atomically. Only :data:`LABEL_TABLES` are written. Returns the folder.

    Writes
    ------
    ``DIR/annotations/<name>/tables/v<N>/<table>.parquet``, ``<table>.csv``, ``params.json``
    """
    folder = tables_dir(atlas_dir, name, version)
    with _locked(set_dir(atlas_dir, name)):
        folder.mkdir(parents=True, exist_ok=True)
        for tname, df in tables.items():
            if tname not in LABEL_TABLES:
                continue
            _write_parquet(df, folder / f"{tname}.parquet")
            atomic_write_text(folder / f"{tname}.csv", csv_text(df))
        pfile = folder / schema.ANNOTATION_PARAMS_FILE
        record = json.loads(pfile.read_text(encoding="utf-8")) if pfile.is_file() else {}
        record.update({"labels": name, "version": int(version), step: dict(params)})
        atomic_write_text(pfile, json.dumps(record, indent=1, default=str) + "\n")
    return folder


def table_names(atlas_dir: str | Path, name: str, version: int) -> list[str]:
    folder = tables_dir(atlas_dir, name, version)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.parquet") if p.stem in LABEL_TABLES)


def read_table(atlas_dir: str | Path, name: str, version: int, table: str) -> pd.DataFrame:
    """A table recomputed with set ``name`` at ``version``; :class:`MissingVersionTable`
    (naming the command to run) when absent."""
    path = tables_dir(atlas_dir, name, version) / f"{check_choice(table, LABEL_TABLES, 'table')}"
    path = path.with_name(path.name + ".parquet")
    if not path.is_file():
        raise MissingVersionTable(name, version, table)
    return pd.read_parquet(path)


def read_params(atlas_dir: str | Path, name: str, version: int) -> dict[str, Any]:
    pfile = tables_dir(atlas_dir, name, version) / schema.ANNOTATION_PARAMS_FILE
    return json.loads(pfile.read_text(encoding="utf-8")) if pfile.is_file() else {}
