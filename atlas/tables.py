"""Result tables stored h5ad-safe in ``.uns[UNS_TABLES]`` and as CSV files.

h5ad-safe means: no object columns holding mixed types, no pickles, strings as plain
``str``, booleans as ``bool``, numbers as float64/int64. Such tables read back identically
with anndata, scanpy, zellkonverter and anndata for R.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import schema
from .io import atomic_write_text


def h5ad_safe(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` with columns of h5ad-safe dtypes and a plain RangeIndex."""
    out = df.reset_index(drop=True).copy()
    for col in out.columns:
        s = out[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            s = s.astype(str)
        if pd.api.types.is_bool_dtype(s):
            out[col] = s.astype(bool)
        elif pd.api.types.is_integer_dtype(s):
            out[col] = s.astype(np.int64)
        elif pd.api.types.is_float_dtype(s):
            out[col] = s.astype(np.float64)
        else:
            out[col] = s.astype(object).where(s.notna(), "").astype(str).astype(object)
    out.columns = [str(c) for c in out.columns]
    return out


def put_table(adata, name: str, df: pd.DataFrame) -> None:
    """Store ``df`` as ``adata.uns[UNS_TABLES][name]`` (h5ad-safe)."""
    if name not in schema.TABLES:
        raise ValueError(f"unknown table {name!r}; declare it in atlas.schema.TABLES")
    tables = dict(adata.uns.get(schema.UNS_TABLES, {}))
    tables[name] = h5ad_safe(df)
    adata.uns[schema.UNS_TABLES] = tables


def get_table(adata, name: str) -> pd.DataFrame:
    """The table ``name``; :class:`~atlas.schema.MissingKeyError` when absent."""
    schema.require_table(adata, name)
    df = adata.uns[schema.UNS_TABLES][name]
    if not isinstance(df, pd.DataFrame):  # older anndata may return a dict of arrays
        df = pd.DataFrame(dict(df))
    return df.copy()


def has_table(adata, name: str) -> bool:
    return name in adata.uns.get(schema.UNS_TABLES, {})


# Cells a spreadsheet (Excel, LibreOffice, Google Sheets) would run as a formula: "=cmd|...",
# "+SUM(...)", "-2+3", "@SUM(...)", and the same after a tab or carriage return.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def is_formula_like(value: object) -> bool:
    """A string a spreadsheet would read as a formula (``=``, ``+``, ``-``, ``@``, tab, CR)."""
    return isinstance(value, str) and value.startswith(FORMULA_PREFIXES)


def _escape_cell(value: object) -> object:
    if not isinstance(value, str):
        return value
    if is_formula_like(value):
        value = f"'{value}"
    # a bare CR is not quoted by the csv writer, and spreadsheets start a new row at it
    return value.replace("\r\n", "\n").replace("\r", "\n") if "\r" in value else value


def _needs_escape(value: object) -> bool:
    return is_formula_like(value) or (isinstance(value, str) and "\r" in value)


def csv_text(df: pd.DataFrame, **kwargs) -> str:
    """``df.to_csv(index=False, **kwargs)`` with text cells (and column names) that a
    spreadsheet would run as a formula prefixed with ``'`` (OWASP "CSV injection"); numbers
    (negative ones included) are written as numbers; carriage returns inside a cell become
    newlines (quoted). Every CSV the project writes goes through here."""
    kwargs.setdefault("index", False)
    out = df.copy(deep=False)
    out.columns = [_escape_cell(str(c)) for c in out.columns]
    for i in range(out.shape[1]):
        col = out.iloc[:, i]
        if isinstance(col.dtype, pd.CategoricalDtype) or pd.api.types.is_object_dtype(col):
            col = col.astype(object)
            if col.map(_needs_escape).any():
                out.isetitem(i, col.map(_escape_cell))
        elif pd.api.types.is_string_dtype(col):
            out.isetitem(i, col.map(_escape_cell))
    if kwargs.get("index"):
        out.index = out.index.map(_escape_cell)
    return out.to_csv(**kwargs)


def write_tables_csv(adata, out_dir: str | Path) -> list[Path]:
    """Write every stored table to ``out_dir/<name>.csv`` (atomically); returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, df in adata.uns.get(schema.UNS_TABLES, {}).items():
        if not isinstance(df, pd.DataFrame):
            df = pd.DataFrame(dict(df))
        path = out_dir / f"{name}.csv"
        atomic_write_text(path, csv_text(df))
        paths.append(path)
    return paths


def get_tables(adata, *names: str) -> dict[str, pd.DataFrame]:
    """The stored tables ``names`` (default: every stored table) by name."""
    names = names or tuple(adata.uns.get(schema.UNS_TABLES, {}))
    return {name: get_table(adata, name) for name in names}
