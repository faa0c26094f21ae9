"""Stage ``ingest``: read and validate a sample sheet (or one pre-merged h5ad).

Everything is validated before any heavy compute, and every problem is reported at once
(one line per problem, naming the file, sample or column) as an
:class:`~atlas.errors.InputError`.

Sample sheet: a UTF-8 CSV with the columns ``sample_id,path,patient,condition,tissue,
species``; any extra column (timepoint, treatment, genotype, sex, ...) is carried into
``.obs``. The optional column ``vdj`` names the sample's Cell Ranger V(D)J
``filtered_contig_annotations.csv`` (relative to the sheet; empty for a sample without one):
it is checked against the sample's barcodes here and its contigs travel to the
``malignant`` stage as the build-only table ``vdj_contigs``. Paths are relative to the sheet's folder, and may not leave it unless
``allow_outside_paths``. Formats are detected from the path:

* 10x v3 folder: ``matrix.mtx.gz``, ``features.tsv.gz``, ``barcodes.tsv.gz``
* 10x v2 folder: ``matrix.mtx``, ``genes.tsv``, ``barcodes.tsv`` (plain or gzipped)
* 10x HDF5: ``*.h5``
* AnnData: ``*.h5ad`` (counts from ``layers["counts"]``, ``raw.X`` or ``X``)
* dense text: ``*.csv``/``*.tsv``/``*.txt`` (optionally ``.gz``); genes in rows and cells
  in columns, or cells in rows when the first header cell is ``barcode``/``cell``.

The merged AnnData has ``X`` = ``layers["counts"]`` = raw counts (float32 CSR holding
integers), ``obs_names`` = ``"<sample_id>:<barcode>"``, ``.obs[barcode]`` the original
barcode, the sheet's columns in ``.obs`` (condition categorical in sheet order), unique gene
symbols as ``var_names`` and Ensembl ids in ``.var["gene_ids"]``.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlas import schema
from atlas.errors import InputError
from atlas.tables import FORMULA_PREFIXES, is_formula_like, put_table

from .log import get_logger
from .stages import derived_obs
from .vdj import contigs_table, read_contigs

log = get_logger("ingest")

FMT_10X_V3 = "10x_v3"
FMT_10X_V2 = "10x_v2"
FMT_10X_H5 = "10x_h5"
FMT_H5AD = "h5ad"
FMT_TEXT = "text"

_TEXT_SUFFIXES = (".csv", ".tsv", ".txt")
_CELL_HEADERS = {"barcode", "barcodes", "cell", "cells", "cell_id", "cell_barcode", "obs_names"}
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, IndexError, TypeError, zlib.error)

# Sample sheet limits: one row per sample; anything bigger is not a sample sheet
MAX_SHEET_BYTES = 8 << 20
MAX_SHEET_LINE = 64 << 10  # characters per line
MAX_SHEET_FIELD = 4096  # characters per field
# Columns whose values name things (and travel into every result table): a value a
# spreadsheet would run as a formula is refused there (and escaped in every CSV written).
ID_COLUMNS = (
    schema.SHEET_SAMPLE,
    schema.SHEET_PATIENT,
    schema.SHEET_CONDITION,
    schema.SHEET_TISSUE,
)
# Plausible raw UMI counts: per gene per cell, and per cell (float32 holds integers exactly
# up to 2**24; more reads than that in one cell is not a droplet)
MAX_COUNT_ENTRY = 1_000_000
MAX_COUNT_CELL = 1 << 24
ENSEMBL_ID = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


@dataclass
class Sample:
    """One row of the sample sheet, resolved."""

    sample_id: str
    path: Path  # resolved absolute path
    raw_path: str  # as written in the sheet
    meta: dict[str, str]  # every sheet column except path
    fmt: str | None = None
    vdj: Path | None = None  # resolved V(D)J contigs file (optional sheet column ``vdj``)


@dataclass
class IngestResult:
    """What :func:`ingest` returns: the merged counts and what provenance needs."""

    adata: object  # AnnData
    samples: list[str]
    conditions: list[str]  # in sheet order
    species: str
    checksums: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    source: str = ""  # the sheet or h5ad path


# ----------------------------------------------------------------------------- checksums
def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def checksum_inputs(paths: dict[str, Path], base: Path | None = None) -> dict[str, str]:
    """sha256 of every input file (files inside folders listed one by one)."""
    out: dict[str, str] = {}
    for _name, path in paths.items():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            key = str(f)
            if base is not None:
                try:
                    key = str(f.relative_to(base))
                except ValueError:
                    pass
            out[key] = sha256_file(f)
    return out


# ----------------------------------------------------------------------------- sheet
def _clean(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return str(v).strip()


def formula_problem(value: str, label: str, column: str) -> str | None:
    """The problem with an id a spreadsheet would run as a formula (``=cmd|...``,
    ``+SUM(...)``, ``@...``, ``-...``), or None."""
    if not is_formula_like(value):
        return None
    shown = value if len(value) <= 40 else value[:37] + "..."
    return (
        f"{label}: {column} {shown!r} starts with {value[0]!r}, which spreadsheets run as a "
        f"formula; ids may not start with any of {' '.join(repr(c) for c in FORMULA_PREFIXES)}"
    )


def _sheet_rows(sheet: Path, text: str) -> list[list[str]]:
    """CSV rows of the sheet; :class:`InputError` on an over-long line or field."""
    problems = []
    for i, line in enumerate(text.splitlines(), start=1):
        if len(line) > MAX_SHEET_LINE:
            problems.append(
                f"sample sheet {sheet}, line {i}: {len(line):,} characters; a line may have at "
                f"most {MAX_SHEET_LINE:,}"
            )
            if len(problems) >= 5:
                break
    if problems:
        raise InputError(problems)
    reader = csv.reader(io.StringIO(text))
    try:
        rows = list(reader)
    except csv.Error as e:
        raise InputError(
            f"sample sheet {sheet}, line {reader.line_num}: not valid CSV ({e})"
        ) from None
    header = rows[0] if rows else []
    for i, row in enumerate(rows, start=1):
        for j, v in enumerate(row):
            if len(v) > MAX_SHEET_FIELD:
                col = header[j].strip()[:40] if j < len(header) and i > 1 else f"#{j + 1}"
                problems.append(
                    f"sample sheet {sheet}, line {i}, column '{col}': field of {len(v):,} "
                    f"characters; a field may have at most {MAX_SHEET_FIELD:,}"
                )
    if problems:
        raise InputError(problems[:20])
    return rows


def _sheet_path(raw: str, base: Path, allow_outside: bool) -> Path | None:
    """``raw`` (absolute, or relative to the sheet's folder ``base``) resolved; ``None`` when
    it points outside ``base`` and that is not allowed."""
    p = Path(raw).expanduser()
    resolved = (p if p.is_absolute() else base / p).resolve()
    return resolved if allow_outside or resolved.is_relative_to(base) else None


def _outside(raw: str, base: Path) -> str:
    return (
        f"path '{raw}' points outside the sample sheet's folder {base} "
        "(use --allow-outside-paths to allow)"
    )


def read_samplesheet(
    samplesheet: str | Path, *, allow_outside_paths: bool = False
) -> tuple[list[Sample], list[str]]:
    """Parse and check the sheet; returns the samples and a list of problems (not raised).

    Limits: :data:`MAX_SHEET_BYTES` per file, :data:`MAX_SHEET_LINE` characters per line,
    :data:`MAX_SHEET_FIELD` per field; values of :data:`ID_COLUMNS` may not look like
    spreadsheet formulas."""
    sheet = Path(samplesheet)
    problems: list[str] = []
    if not sheet.exists():
        raise InputError(f"sample sheet {sheet}: file not found")
    if not sheet.is_file():
        raise InputError(f"sample sheet {sheet}: not a file")
    try:
        size = sheet.stat().st_size
    except OSError as e:
        raise InputError(f"sample sheet {sheet}: cannot read ({e.strerror or e})") from None
    if size > MAX_SHEET_BYTES:
        raise InputError(
            f"sample sheet {sheet}: {size / 1e6:,.1f} MB; a sample sheet (one line per sample) "
            f"may be at most {MAX_SHEET_BYTES / 1e6:.1f} MB"
        )
    try:
        raw = sheet.read_bytes()
    except OSError as e:
        raise InputError(f"sample sheet {sheet}: cannot read ({e.strerror or e})") from None
    if raw[:2] == b"\x1f\x8b":
        raise InputError(f"sample sheet {sheet}: is gzip-compressed; give a plain CSV file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(
            f"sample sheet {sheet}: not UTF-8 text (line {line}, byte {e.start}); "
            "save it as UTF-8 CSV"
        ) from None
    if "\x00" in text:
        raise InputError(f"sample sheet {sheet}: contains NUL bytes; is it a CSV file?")
    rows = _sheet_rows(sheet, text)
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise InputError(f"sample sheet {sheet}: empty")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in schema.SHEET_REQUIRED if c not in header]
    for c in missing:
        problems.append(f"sample sheet {sheet}: missing required column '{c}'")
    dup_cols = sorted({h for h in header if header.count(h) > 1 and h})
    for c in dup_cols:
        problems.append(f"sample sheet {sheet}: column '{c}' appears more than once")
    if any(not h for h in header):
        problems.append(f"sample sheet {sheet}: a column has an empty name")
    if len(rows) == 1:
        problems.append(f"sample sheet {sheet}: has no samples (only a header)")
    if missing or dup_cols or len(rows) == 1:
        raise InputError(problems)

    base = sheet.resolve().parent
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            problems.append(
                f"sample sheet {sheet}, line {i}: {len(row)} fields, expected {len(header)}"
            )
            continue
        rec = {h: _clean(v) for h, v in zip(header, row)}
        sid = rec[schema.SHEET_SAMPLE]
        label = f"sample '{sid}'" if sid else f"sample sheet line {i}"
        for c in schema.SHEET_REQUIRED:
            if not rec[c]:
                what = "condition" if c == schema.SHEET_CONDITION else c
                problems.append(f"{label}: empty {what} (column '{c}')")
        bad_ids = [
            p for c in ID_COLUMNS if rec[c] and (p := formula_problem(rec[c], label, c)) is not None
        ]
        if bad_ids:
            problems.extend(bad_ids)
            continue
        if sid:
            if sid in seen:
                problems.append(f"sample '{sid}': duplicate sample_id (lines {seen[sid]} and {i})")
                continue
            seen[sid] = i
        sp_ = rec[schema.SHEET_SPECIES].lower()
        if sp_ and sp_ not in schema.SPECIES:
            problems.append(
                f"{label}: unknown species '{rec[schema.SHEET_SPECIES]}' "
                f"(use one of: {', '.join(schema.SPECIES)})"
            )
        rec[schema.SHEET_SPECIES] = sp_
        raw_path = rec[schema.SHEET_PATH]
        if not raw_path:
            continue
        resolved = _sheet_path(raw_path, base, allow_outside_paths)
        if resolved is None:
            problems.append(f"{label}: {_outside(raw_path, base)}")
            continue
        vdj = None
        raw_vdj = rec.get(schema.SHEET_VDJ, "")
        if raw_vdj:
            vdj = _sheet_path(raw_vdj, base, allow_outside_paths)
            if vdj is None:
                problems.append(f"{label}: column '{schema.SHEET_VDJ}': {_outside(raw_vdj, base)}")
                continue
        meta = {k: v for k, v in rec.items() if k != schema.SHEET_PATH}
        samples.append(Sample(sample_id=sid, path=resolved, raw_path=raw_path, meta=meta, vdj=vdj))

    extra = [h for h in header if h not in (*schema.SHEET_REQUIRED, schema.SHEET_VDJ)]
    if extra:
        log.info(
            "sample sheet %s: %d extra column(s) carried into .obs as given: %s",
            sheet,
            len(extra),
            ", ".join(extra),
        )
    species = sorted({s.meta[schema.SHEET_SPECIES] for s in samples} & set(schema.SPECIES))
    if len(species) > 1:
        by = {
            sp_: [s.sample_id for s in samples if s.meta[schema.SHEET_SPECIES] == sp_]
            for sp_ in species
        }
        detail = "; ".join(f"{k}: {', '.join(v[:5])}" for k, v in by.items())
        problems.append(f"sample sheet {sheet}: mixed species in one build ({detail})")
    return samples, problems


# ----------------------------------------------------------------------------- formats
def _find(folder: Path, *names: str) -> Path | None:
    for n in names:
        for cand in (folder / n, folder / f"{n}.gz"):
            if cand.is_file():
                return cand
    return None


def detect_format(path: Path) -> str:
    """The input format of ``path``; raises ``ValueError`` with the reason when unknown."""
    if path.is_dir():
        mtx = _find(path, "matrix.mtx")
        if mtx is None:
            raise ValueError(
                "directory has no matrix.mtx(.gz); expected a 10x folder "
                "(matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz)"
            )
        if _find(path, "features.tsv"):
            return FMT_10X_V3
        if _find(path, "genes.tsv"):
            return FMT_10X_V2
        raise ValueError("10x folder has matrix.mtx but no features.tsv(.gz) or genes.tsv")
    name = path.name.lower()
    if name.endswith(".h5ad"):
        return FMT_H5AD
    if name.endswith(".h5"):
        return FMT_10X_H5
    stem = name[:-3] if name.endswith(".gz") else name
    if stem.endswith(_TEXT_SUFFIXES):
        return FMT_TEXT
    raise ValueError(
        "unknown format; expected a 10x folder, .h5, .h5ad or a (gzipped) CSV/TSV matrix"
    )


def _open_text(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_lines(path: Path) -> list[list[str]]:
    with _open_text(path) as fh:
        return [line.rstrip("\r\n").split("\t") for line in fh if line.strip()]


def _read_mtx(path: Path) -> sp.csr_matrix:
    import scipy.io

    with open(path, "rb") as fh:
        magic = fh.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    with opener(path, "rb") as fh:
        m = scipy.io.mmread(fh)
    return sp.csr_matrix(m)


@dataclass
class _Raw:
    X: sp.csr_matrix  # cells x genes
    barcodes: list[str]
    symbols: list[str]
    gene_ids: list[str]
    feature_types: list[str] | None = None
    source: str = ""  # where the counts came from (h5ad)


def _read_10x_folder(path: Path, fmt: str) -> _Raw:
    problems = []
    mtx = _find(path, "matrix.mtx")
    feat = _find(path, "features.tsv" if fmt == FMT_10X_V3 else "genes.tsv")
    bc = _find(path, "barcodes.tsv")
    if bc is None:
        raise ValueError("10x folder has no barcodes.tsv(.gz)")
    try:
        m = _read_mtx(mtx)
    except _READ_ERRORS as e:
        raise ValueError(f"cannot read {mtx.name}: {_reason(e)}") from None
    try:
        feats = _read_lines(feat)
    except (*_READ_ERRORS, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {feat.name}: {_reason(e)}") from None
    try:
        barcodes = [r[0] for r in _read_lines(bc)]
    except (*_READ_ERRORS, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {bc.name}: {_reason(e)}") from None
    n_genes, n_cells = m.shape
    if len(feats) != n_genes:
        problems.append(f"{feat.name} has {len(feats)} features but {mtx.name} has {n_genes} rows")
    if len(barcodes) != n_cells:
        problems.append(
            f"{bc.name} has {len(barcodes)} barcodes but {mtx.name} has {n_cells} columns"
        )
    if problems:
        raise ValueError("; ".join(problems))
    gene_ids = [r[0] for r in feats]
    symbols = [r[1] if len(r) > 1 and r[1] else r[0] for r in feats]
    ftypes = [r[2] for r in feats] if feats and all(len(r) > 2 for r in feats) else None
    return _Raw(m.T.tocsr(), barcodes, symbols, gene_ids, ftypes)


def _read_10x_h5(path: Path) -> _Raw:
    import scanpy as sc

    try:
        ad = sc.read_10x_h5(path, gex_only=False)
    except Exception as e:  # h5py raises many kinds
        raise ValueError(f"cannot read 10x HDF5: {_reason(e)}") from None
    ids = ad.var[schema.VAR_GENE_ID].astype(str).tolist() if schema.VAR_GENE_ID in ad.var else None
    ftypes = (
        ad.var[schema.VAR_FEATURE_TYPE].astype(str).tolist()
        if schema.VAR_FEATURE_TYPE in ad.var
        else None
    )
    symbols = ad.var_names.astype(str).tolist()
    return _Raw(
        sp.csr_matrix(ad.X), ad.obs_names.astype(str).tolist(), symbols, ids or symbols, ftypes
    )


def counts_of_anndata(ad) -> tuple[object, object, str]:
    """``(matrix, var, source)``: counts from ``layers["counts"]``, else ``raw.X``, else ``X``."""
    if schema.LAYER_COUNTS in ad.layers:
        return ad.layers[schema.LAYER_COUNTS], ad.var, f"layers['{schema.LAYER_COUNTS}']"
    if ad.raw is not None:
        return ad.raw.X, ad.raw.var, "raw.X"
    if ad.X is None:
        raise ValueError("has no counts: no layers['counts'], raw.X or X")
    return ad.X, ad.var, "X"


def _read_h5ad_file(path: Path):
    import anndata as ad

    try:
        return ad.read_h5ad(path)
    except Exception as e:  # h5py / anndata raise many kinds on corrupt files
        raise ValueError(f"cannot read h5ad: {_reason(e)}") from None


def _read_h5ad_sample(path: Path) -> _Raw:
    a = _read_h5ad_file(path)
    X, var, source = counts_of_anndata(a)
    if X is None:
        raise ValueError("has no counts: no layers['counts'], raw.X or X")
    X = sp.csr_matrix(X)
    ids = var["gene_ids"].astype(str).tolist() if "gene_ids" in var else None
    symbols = var.index.astype(str).tolist()
    return _Raw(X, a.obs_names.astype(str).tolist(), symbols, ids or symbols, source=source)


def _read_text(path: Path) -> _Raw:
    name = path.name.lower()
    stem = name[:-3] if name.endswith(".gz") else name
    sep = "," if stem.endswith(".csv") else "\t"
    try:
        with _open_text(path) as fh:
            df = pd.read_csv(fh, sep=sep, index_col=0)
    except (*_READ_ERRORS, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise ValueError(f"cannot read matrix: {_reason(e)}") from None
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise ValueError(f"matrix is empty ({df.shape[0]} rows x {df.shape[1]} columns)")
    cells_in_rows = str(df.index.name or "").strip().lower() in _CELL_HEADERS
    if not cells_in_rows:
        df = df.T
    nonnum = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if nonnum:
        raise ValueError(
            f"non-numeric values in {len(nonnum)} "
            f"{'gene' if cells_in_rows else 'cell'} column(s), e.g. '{nonnum[0]}'"
        )
    X = sp.csr_matrix(df.to_numpy(dtype=np.float64))
    symbols = [str(c) for c in df.columns]
    return _Raw(X, [str(i) for i in df.index], symbols, symbols)


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, EOFError | zlib.error) or "gzip" in msg.lower() or "crc" in msg.lower():
        return f"corrupt or truncated file ({e.__class__.__name__}{': ' + msg if msg else ''})"
    return f"{e.__class__.__name__}: {msg}" if msg else e.__class__.__name__


def _gene_expression_only(raw: _Raw, label: str) -> _Raw:
    """Drop antibody-capture / CRISPR / custom features (10x ``feature_types``)."""
    if raw.feature_types is None:
        return raw
    ft = np.asarray(raw.feature_types, dtype=object)
    gex = ft == "Gene Expression"
    if not gex.any() or gex.all():
        return raw
    log.info(
        "%s: keeping %d Gene Expression features, dropping %d others (%s)",
        label,
        int(gex.sum()),
        int((~gex).sum()),
        ", ".join(sorted(set(ft[~gex].astype(str)))),
    )
    idx = np.flatnonzero(gex)
    return _Raw(
        X=raw.X[:, idx].tocsr(),
        barcodes=raw.barcodes,
        symbols=[raw.symbols[i] for i in idx],
        gene_ids=[raw.gene_ids[i] for i in idx],
        feature_types=[raw.feature_types[i] for i in idx],
        source=raw.source,
    )


def read_counts(path: Path, fmt: str) -> _Raw:
    if fmt in (FMT_10X_V3, FMT_10X_V2):
        return _read_10x_folder(path, fmt)
    if fmt == FMT_10X_H5:
        return _read_10x_h5(path)
    if fmt == FMT_H5AD:
        return _read_h5ad_sample(path)
    return _read_text(path)


def count_problems(X, what: str) -> list[str]:
    """Problems with a (cells x genes) counts matrix: NaN/inf, negative or non-integer
    values, and implausibly large ones (above :data:`MAX_COUNT_ENTRY` for one gene in one
    cell, or :data:`MAX_COUNT_CELL` for one cell)."""
    data = X.data if sp.issparse(X) else np.asarray(X).ravel()
    if data.size and not np.issubdtype(data.dtype, np.number):
        return [f"{what}: counts are not numeric ({data.dtype})"]
    if np.issubdtype(data.dtype, np.integer):
        neg = int((data < 0).sum())
        return [f"{what}: {neg} negative count(s)"] if neg else _bound_problems(X, data, what)
    out = _value_problems(data.astype(np.float64, copy=False), what)
    return out or _bound_problems(X, data, what)


def _bound_problems(X, data: np.ndarray, what: str) -> list[str]:
    """Counts above plausible raw UMI counts (a sum, a scaled or corrupt matrix)."""
    out = []
    if not data.size:
        return out
    big = data > MAX_COUNT_ENTRY
    if big.any():
        out.append(
            f"{what}: {int(big.sum()):,} count(s) above {MAX_COUNT_ENTRY:,} for one gene in "
            f"one cell (largest {float(data.max()):,.0f}); give raw UMI counts"
        )
        return out  # the cells' totals follow
    totals = np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()
    heavy = totals > MAX_COUNT_CELL
    if heavy.any():
        out.append(
            f"{what}: {int(heavy.sum()):,} cell(s) with more than {MAX_COUNT_CELL:,} counts in "
            f"total (largest {float(totals.max()):,.0f}); give raw UMI counts"
        )
    return out


def _value_problems(data: np.ndarray, what: str) -> list[str]:
    out = []
    n_nan = int(np.isnan(data).sum())
    n_inf = int(np.isinf(data).sum())
    if n_nan:
        out.append(f"{what}: {n_nan} NaN count(s)")
    if n_inf:
        out.append(f"{what}: {n_inf} infinite count(s)")
    finite = data[np.isfinite(data)]
    neg = int((finite < 0).sum())
    if neg:
        out.append(f"{what}: {neg} negative count(s)")
    frac = int((finite != np.round(finite)).sum())
    if frac:
        ex = finite[finite != np.round(finite)][0]
        out.append(
            f"{what}: {frac} non-integer count(s) (e.g. {ex:g}); give raw UMI counts, "
            "not normalised or log-transformed values"
        )
    return out


# ----------------------------------------------------------------------------- merge
def _make_unique(names: list[str]) -> tuple[list[str], int]:
    """Append ``-1``, ``-2``, ... to repeated names (like anndata); returns (names, n renamed)."""
    seen: dict[str, int] = {}
    used = set(names)
    out = []
    n = 0
    for name in names:
        if name in seen:
            k = seen[name]
            while f"{name}-{k}" in used:
                k += 1
            seen[name] = k + 1
            new = f"{name}-{k}"
            used.add(new)
            out.append(new)
            n += 1
        else:
            seen[name] = 1
            out.append(name)
    return out, n


def _to_anndata(raw: _Raw, sample: Sample, obs_cols: list[str]):
    import anndata as ad

    X = raw.X.astype(np.float32)
    X.sort_indices()
    obs = pd.DataFrame(
        {c: sample.meta.get(c, "") for c in obs_cols},
        index=[f"{sample.sample_id}:{b}" for b in raw.barcodes],
    )
    obs[schema.OBS_BARCODE] = raw.barcodes
    var = pd.DataFrame(
        {"symbol": raw.symbols, schema.VAR_GENE_ID: raw.gene_ids},
        index=pd.Index([str(i) for i in range(len(raw.symbols))]),
    )
    if raw.feature_types is not None:
        var[schema.VAR_FEATURE_TYPE] = raw.feature_types
    return ad.AnnData(X=X, obs=obs, var=var)


def _merge(parts: list, samples: list[Sample]) -> object:
    """Concatenate samples on shared genes (matched by Ensembl id when all have one)."""
    import anndata as ad

    use_ids = all(
        any(g != s for g, s in zip(p.var[schema.VAR_GENE_ID], p.var["symbol"])) for p in parts
    )
    key_col = schema.VAR_GENE_ID if use_ids else "symbol"
    keyed = []
    for p, s in zip(parts, samples):
        keys, n = _make_unique(p.var[key_col].astype(str).tolist())
        if n:
            log.warning(
                "sample '%s': %d repeated gene %s made unique",
                s.sample_id,
                n,
                "id(s)" if use_ids else "symbol(s)",
            )
        p.var_names = keys
        keyed.append(p)
    common = set(keyed[0].var_names)
    for p in keyed[1:]:
        common &= set(p.var_names)
    order = [g for g in keyed[0].var_names if g in common]
    if not order:
        raise InputError(
            "the samples share no genes ("
            + ("Ensembl ids" if use_ids else "gene symbols")
            + f" compared; e.g. '{samples[0].sample_id}' and '{samples[-1].sample_id}'; "
            "mixed species or references?)"
        )
    union = set().union(*(set(p.var_names) for p in keyed))
    if len(union) > len(order):
        log.warning(
            "samples have different genes: keeping the %d shared by all (%d dropped)",
            len(order),
            len(union) - len(order),
        )
    keyed = [p[:, order] for p in keyed]
    merged = ad.concat(keyed, join="inner", merge="first", index_unique=None)
    merged.obs_names = [str(n) for n in merged.obs_names]
    var = keyed[0].var.copy()
    symbols, n = _make_unique(var["symbol"].astype(str).tolist())
    if n:
        log.warning("%d repeated gene symbol(s) made unique (suffix -1, -2, ...)", n)
    var.index = pd.Index(symbols)
    var = var.drop(columns=["symbol"])
    merged.var = var
    merged.X = sp.csr_matrix(merged.X)
    return merged


def _finish(adata, conditions: list[str], species: str, obs_cols: list[str]):
    """Categoricals in a stable order, counts layer, uns keys."""
    for c in obs_cols + [schema.OBS_BARCODE]:
        if c in adata.obs:
            adata.obs[c] = adata.obs[c].astype(str)
    samples_order = list(dict.fromkeys(adata.obs[schema.OBS_SAMPLE]))
    adata.obs[schema.OBS_SAMPLE] = pd.Categorical(
        adata.obs[schema.OBS_SAMPLE], categories=samples_order
    )
    adata.obs[schema.OBS_CONDITION] = pd.Categorical(
        adata.obs[schema.OBS_CONDITION], categories=conditions
    )
    for c in (schema.OBS_PATIENT, schema.OBS_TISSUE, schema.OBS_SPECIES):
        adata.obs[c] = pd.Categorical(adata.obs[c], categories=list(dict.fromkeys(adata.obs[c])))
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.layers[schema.LAYER_COUNTS] = adata.X.copy()
    adata.uns[schema.UNS_CONDITION_ORDER] = list(conditions)
    adata.uns[schema.UNS_SPECIES] = species
    return adata


def symbol_species(symbols: list[str]) -> tuple[str | None, str]:
    """The species the gene names look like: human symbols are upper-case (``CD3E``,
    ``MT-CO1``), mouse symbols capitalised (``Cd3e``, ``mt-Co1``), Ensembl gene ids carry
    the species in their prefix (``ENSG``, ``ENSMUSG``). Returns ``(species or None, why)``;
    None unless at least 10 names are telling and 80% of them agree."""
    n = {"human": 0, "mouse": 0}
    examples: dict[str, list[str]] = {"human": [], "mouse": []}
    for s in symbols:
        if ENSEMBL_ID.match(s):
            sp_ = "mouse" if s.startswith("ENSMUSG") else "human" if s.startswith("ENSG") else None
        else:
            core = s[3:] if s[:3].lower() == "mt-" else s
            if sum(c.isalpha() for c in core) < 2:
                continue
            if core == core.upper():
                sp_ = "human"
            elif core[0].isupper() and core[1:] == core[1:].lower():
                sp_ = "mouse"
            else:
                continue
        if sp_ is not None:
            n[sp_] += 1
            if len(examples[sp_]) < 3:
                examples[sp_].append(s)
    total = n["human"] + n["mouse"]
    for sp_ in n:
        if total >= 10 and n[sp_] >= 0.8 * total:
            return sp_, f"{n[sp_]:,} of {total:,} gene names look {sp_}, e.g. " + ", ".join(
                examples[sp_]
            )
    return None, ""


def species_problem(symbols: list[str], species: str, label: str) -> str | None:
    """The contradiction between the declared ``species`` and the gene names, or None."""
    looks, why = symbol_species(symbols)
    if looks is None or looks == species:
        return None
    return f"{label}: species is '{species}' but the genes look {looks} ({why}); fix the species"


@functools.cache
def _ensembl_to_symbol(species: str) -> dict[str, str] | None:
    """Ensembl gene id -> symbol from the shipped gene table, or None when none ships."""
    import references

    try:
        table = references.gene_positions(species)
    except FileNotFoundError:
        return None
    table = table[table["ensembl_id"].ne("") & table["symbol"].ne("")]
    table = table.drop_duplicates("ensembl_id")  # an id of several symbols: the table's first
    return dict(zip(table["ensembl_id"], table["symbol"]))


def ensembl_symbols(
    ids: list[str], species: str, label: str
) -> tuple[list[str] | None, str | None]:
    """Gene symbols for features that are Ensembl gene ids only (``ENSG00000...``), from the
    shipped gene table (``references.gene_positions``); ``(None, None)`` when the features
    are not Ensembl ids, ``(None, problem)`` when no table covers ``species`` or it knows
    under half of the ids. Ids the table lacks stay as they are."""
    n_ens = sum(bool(ENSEMBL_ID.match(s)) for s in ids)
    if not ids or n_ens < 0.9 * len(ids):
        return None, None
    what = (
        "give gene symbols (10x features.tsv: id<TAB>symbol<TAB>Gene Expression; h5ad: "
        "symbols as var_names)"
    )
    mapping = _ensembl_to_symbol(species)
    if mapping is None:
        return None, (
            f"{label}: the features are Ensembl ids only (e.g. {ids[0]}) and no gene table "
            f"ships for {species}; {what}"
        )
    out = [mapping.get(s.split(".", 1)[0], s) for s in ids]
    n_mapped = sum(a != b for a, b in zip(out, ids))
    if n_mapped < 0.5 * len(ids):
        return None, (
            f"{label}: the features are Ensembl ids only (e.g. {ids[0]}) and only "
            f"{n_mapped:,} of {len(ids):,} are in the {species} gene table "
            f"(references/genes_{species}.tsv.gz); wrong species or not gene ids? {what}"
        )
    log.info(
        "%s: features are Ensembl ids; %d of %d mapped to gene symbols with "
        "references/genes_%s.tsv.gz (the others kept as ids)",
        label,
        n_mapped,
        len(ids),
        species,
    )
    return out, None


def ingest(samplesheet: str | Path, *, allow_outside_paths: bool = False) -> IngestResult:
    """Validate every sample of the sheet, then merge them; :class:`InputError` lists all
    problems at once."""
    sheet = Path(samplesheet)
    samples, problems = read_samplesheet(sheet, allow_outside_paths=allow_outside_paths)
    # the build's species (gene names are checked against it when the sheet names one)
    declared = {s.meta[schema.SHEET_SPECIES] for s in samples} & set(schema.SPECIES)
    species = declared.pop() if len(declared) == 1 else ""
    parts: list = []
    ok_samples: list[Sample] = []
    contigs: dict[str, pd.DataFrame] = {}  # sample_id -> V(D)J contigs (sheet column vdj)
    for s in samples:
        label = f"sample '{s.sample_id}' ({s.raw_path})"
        if not s.path.exists():
            problems.append(f"{label}: file or folder not found ({s.path})")
            continue
        try:
            s.fmt = detect_format(s.path)
        except ValueError as e:
            problems.append(f"{label}: {e}")
            continue
        try:
            raw = read_counts(s.path, s.fmt)
        except PermissionError:
            problems.append(f"{label}: permission denied")
            continue
        except ValueError as e:
            problems.append(f"{label}: {e}")
            continue
        except _READ_ERRORS as e:
            problems.append(f"{label}: cannot read: {_reason(e)}")
            continue
        raw = _gene_expression_only(raw, label)
        mapped, problem = ensembl_symbols(raw.symbols, species or "human", label)
        if problem is not None:
            problems.append(problem)
            continue
        if mapped is not None:
            raw.symbols = mapped
        where = f"{label} {raw.source}".rstrip() if raw.source else label
        bad = count_problems(raw.X, where)
        if raw.X.shape[0] == 0:
            bad.append(f"{label}: has no cells (0 barcodes)")
        if raw.X.shape[1] == 0:
            bad.append(f"{label}: has no genes (0 features)")
        dup_bc = len(raw.barcodes) - len(set(raw.barcodes))
        if dup_bc:
            bad.append(f"{label}: {dup_bc} duplicate barcode(s)")
        if not bad and raw.X.nnz == 0:
            bad.append(f"{label}: all counts are zero")
        if species and (p := species_problem(raw.symbols, species, label)) is not None:
            bad.append(p)
        if bad:
            problems.extend(bad)
            continue
        if s.vdj is not None:
            try:
                contigs[s.sample_id] = read_contigs(
                    s.vdj,
                    raw.barcodes,
                    label=f"sample '{s.sample_id}' (column '{schema.SHEET_VDJ}')",
                )
            except ValueError as e:
                problems.append(str(e))
                continue
        log.info("%s: %s, %d cells x %d genes", s.sample_id, s.fmt, raw.X.shape[0], raw.X.shape[1])
        parts.append(raw)
        ok_samples.append(s)
    if problems:
        raise InputError(problems)

    header_cols = list(samples[0].meta.keys())
    # a V(D)J file path is an input, not a cell attribute: it stays out of .obs
    obs_cols = [c for c in header_cols if c not in (schema.SHEET_PATH, schema.SHEET_VDJ)]
    adatas = [_to_anndata(r, s, obs_cols) for r, s in zip(parts, ok_samples)]
    del parts
    merged = _merge(adatas, ok_samples)
    if merged.n_vars == 0:
        raise InputError(f"sample sheet {sheet}: the samples share no genes")
    conditions = list(dict.fromkeys(s.meta[schema.SHEET_CONDITION] for s in ok_samples))
    species = ok_samples[0].meta[schema.SHEET_SPECIES]
    merged = _finish(merged, conditions, species, obs_cols)
    base = sheet.resolve().parent
    checks = {"samplesheet": sheet.resolve()}
    checks.update({s.sample_id: s.path for s in ok_samples})
    checks.update({f"{s.sample_id}:vdj": s.vdj for s in ok_samples if s.vdj is not None})
    checksums = checksum_inputs(checks, base=base)
    if contigs:
        # build-only table: the malignant stage calls clonotypes from it and drops it
        put_table(merged, schema.TABLE_VDJ_CONTIGS, contigs_table(contigs))
        log.info(
            "V(D)J contigs: %d sample(s), %d cells with immunoglobulin contigs",
            len(contigs),
            sum(int(df["barcode"].nunique()) for df in contigs.values()),
        )
    log.info(
        "ingested %d samples, %d cells x %d genes (%s)",
        len(ok_samples),
        merged.n_obs,
        merged.n_vars,
        species,
    )
    return IngestResult(
        adata=merged,
        samples=[s.sample_id for s in ok_samples],
        conditions=conditions,
        species=species,
        checksums=checksums,
        source=str(sheet),
    )


# .obs columns the later stages write (the stage registry declares them)
_DERIVED_OBS, _DERIVED_PREFIXES = derived_obs()


def _is_derived(col: str) -> bool:
    """An ``.obs`` column a build writes (stale when an atlas is fed back as input)."""
    return col in _DERIVED_OBS or col.startswith(_DERIVED_PREFIXES)


def ingest_h5ad(path: str | Path) -> IngestResult:
    """Validate and load one pre-merged AnnData whose ``.obs`` has the sheet's columns."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"h5ad {path}: file not found")
    if not path.is_file():
        raise InputError(f"h5ad {path}: not a file")
    try:
        a = _read_h5ad_file(path)
        X, var, source = counts_of_anndata(a)
    except ValueError as e:
        raise InputError(f"h5ad {path}: {e}") from None
    problems = []
    required = [c for c in schema.SHEET_REQUIRED if c != schema.SHEET_PATH]
    for c in required:
        if c not in a.obs.columns:
            problems.append(
                f"h5ad {path}: .obs has no column '{c}' (required: {', '.join(required)})"
            )
    X = sp.csr_matrix(X) if X is not None else None
    if X is None:
        problems.append(f"h5ad {path}: has no counts: no layers['counts'], raw.X or X")
    else:
        problems.extend(count_problems(X, f"h5ad {path} {source}"))
        if X.shape[0] == 0:
            problems.append(f"h5ad {path}: has no cells")
        if X.shape[1] == 0:
            problems.append(f"h5ad {path}: has no genes")
    species = ""
    conditions: list[str] = []
    mapped: list[str] | None = None
    if not problems:
        obs = a.obs
        for c in required:
            s = obs[c].astype(str).str.strip()
            empty = obs[c].isna() | s.eq("") | s.str.lower().isin(["nan", "none"])
            if empty.any():
                what = "condition" if c == schema.SHEET_CONDITION else c
                bad_samples = sorted(
                    set(obs.loc[empty, schema.SHEET_SAMPLE].astype(str))
                    if c != schema.SHEET_SAMPLE
                    else []
                )
                extra = f" (samples: {', '.join(bad_samples[:5])})" if bad_samples else ""
                problems.append(f"h5ad {path}: {int(empty.sum())} cell(s) with empty {what}{extra}")
        spv = sorted(set(obs[schema.SHEET_SPECIES].astype(str).str.strip().str.lower()))
        unknown = [v for v in spv if v not in schema.SPECIES and v not in ("", "nan")]
        for v in unknown:
            problems.append(
                f"h5ad {path}: unknown species '{v}' (use one of: {', '.join(schema.SPECIES)})"
            )
        known = [v for v in spv if v in schema.SPECIES]
        if len(known) > 1:
            problems.append(f"h5ad {path}: mixed species in one build ({', '.join(known)})")
        if known:
            species = known[0]
        for c in ID_COLUMNS:
            for v in pd.unique(obs[c].astype(str).str.strip()):
                if (p := formula_problem(str(v), f"h5ad {path}", f".obs column '{c}'")) is not None:
                    problems.append(p)
        symbols = var.index.astype(str).tolist()
        mapped, problem = ensembl_symbols(symbols, species or "human", f"h5ad {path}")
        if problem is not None:
            problems.append(problem)
        elif len(known) == 1:
            problem = species_problem(mapped or symbols, species, f"h5ad {path}")
            if problem is not None:
                problems.append(problem)
        per_sample = obs.groupby(obs[schema.SHEET_SAMPLE].astype(str), observed=True)
        for c in (schema.SHEET_PATIENT, schema.SHEET_CONDITION, schema.SHEET_SPECIES):
            n = per_sample[c].nunique()
            bad = [str(sid) for sid in n.index[n > 1]]
            if bad:
                more = f" (also: {', '.join(bad[1:6])})" if len(bad) > 1 else ""
                problems.append(f"h5ad {path}: sample '{bad[0]}' has more than one {c}{more}")
        cond = obs[schema.SHEET_CONDITION]
        if isinstance(cond.dtype, pd.CategoricalDtype):
            present = set(cond.astype(str))
            conditions = [str(c) for c in cond.cat.categories if str(c) in present]
        else:
            conditions = list(dict.fromkeys(cond.astype(str)))
    if problems:
        raise InputError(problems)

    import anndata as ad

    obs = a.obs.copy()
    derived = [c for c in obs.columns if _is_derived(str(c))]
    if derived:
        log.warning(
            "h5ad: %d .obs column(s) are written by the build itself; kept as input_<name> (%s)",
            len(derived),
            ", ".join(map(str, derived[:8])) + (", ..." if len(derived) > 8 else ""),
        )
        obs = obs.rename(columns={c: f"input_{c}" for c in derived})
    obs_cols = [c for c in obs.columns]
    for c in required:
        obs[c] = obs[c].astype(str).str.strip()
    obs[schema.SHEET_SPECIES] = obs[schema.SHEET_SPECIES].str.lower()
    barcodes = obs.index.astype(str).tolist()
    sids = obs[schema.SHEET_SAMPLE].tolist()
    names = [b if b.startswith(f"{s}:") else f"{s}:{b}" for s, b in zip(sids, barcodes)]
    if schema.OBS_BARCODE not in obs:
        obs[schema.OBS_BARCODE] = [
            b[len(s) + 1 :] if b.startswith(f"{s}:") else b for s, b in zip(sids, barcodes)
        ]
    names, n_dup = _make_unique(names)
    if n_dup:
        log.warning("%d repeated cell name(s) made unique", n_dup)
    obs.index = pd.Index(names)
    var = pd.DataFrame(index=var.index.astype(str))
    var_src = counts_of_anndata(a)[1]
    if schema.VAR_GENE_ID in var_src:
        var[schema.VAR_GENE_ID] = var_src[schema.VAR_GENE_ID].astype(str).to_numpy()
    else:
        var[schema.VAR_GENE_ID] = var.index.to_numpy()
    symbols, n = _make_unique(mapped or var.index.tolist())
    if n:
        log.warning("%d repeated gene symbol(s) made unique (suffix -1, -2, ...)", n)
    var.index = pd.Index(symbols)
    # keep only plain obs columns (drop derived ones a previous build may have added)
    keep = [c for c in obs_cols if c in obs.columns]
    if schema.OBS_BARCODE not in keep:
        keep.append(schema.OBS_BARCODE)
    merged = ad.AnnData(X=X.astype(np.float32), obs=obs[keep], var=var)
    merged = _finish(merged, conditions, species, required)
    return IngestResult(
        adata=merged,
        samples=list(merged.obs[schema.OBS_SAMPLE].cat.categories),
        conditions=conditions,
        species=species,
        checksums={path.name: sha256_file(path)},
        source=str(path),
    )
