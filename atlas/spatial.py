"""Read access to an atlas's spatial results (``DIR/spatial/``, written by ``tme-atlas
spatial``): per-cell positions, types and niches (parquet), the LIANA+ local scores
(memory-mapped ``.npy``), the result tables (CSV) and ``meta.json``. No AnnData.

``AtlasStore.spatial()`` (:mod:`atlas.store`) returns one of these, or ``None`` when the
atlas has no spatial results.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from . import schema
from .errors import NotAnAtlasError, UnknownValue


class SpatialResults:
    """A read-only view of ``path`` (the spatial output folder). Cheap to open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / schema.SPATIAL_META_FILE).read_text("utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise NotAnAtlasError(
                f"spatial results {self.path}: {schema.SPATIAL_META_FILE} is unreadable "
                f"({e.__class__.__name__}); run tme-atlas spatial again"
            ) from None
        self._lock = threading.Lock()
        self._cells: pd.DataFrame | None = None
        self._local: np.ndarray | None = None
        self._expr: tuple | None = None
        self._tables: dict[str, pd.DataFrame] = {}

    @property
    def sections(self) -> list[str]:
        return [str(s) for s in self.meta.get("sections", [])]

    @property
    def conditions(self) -> list[str]:
        return [str(s) for s in self.meta.get("conditions", [])]

    @property
    def interactions(self) -> list[str]:
        return [str(s) for s in self.meta.get("interactions", [])]

    @property
    def cell_types(self) -> list[str]:
        return [str(s) for s in self.meta.get("cell_types", [])]

    @property
    def niches(self) -> list[str]:
        return [str(s) for s in self.meta.get("niches", [])]

    @property
    def genes(self) -> list[str]:
        """Panel genes (``[]`` for results written without expression)."""
        return [str(g) for g in self.meta.get("genes", [])]

    def has_expression(self) -> bool:
        return all((self.path / f).is_file() for f in schema.SPATIAL_EXPR_FILES)

    def expression(self, gene: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Log-normalised expression of panel gene ``gene`` per cell (float32; read from the
        memory-mapped CSC column)."""
        j = self.genes.index(gene)  # ValueError for an unknown gene: callers validate
        with self._lock:
            if self._expr is None:
                self._expr = tuple(
                    np.load(self.path / f, mmap_mode="r") for f in schema.SPATIAL_EXPR_FILES
                )
        data, indices, indptr = self._expr
        lo, hi = int(indptr[j]), int(indptr[j + 1])
        col = np.zeros(self.n_cells, dtype=np.float32)
        col[np.asarray(indices[lo:hi])] = np.asarray(data[lo:hi])
        return col if rows is None else col[rows]

    @property
    def n_cells(self) -> int:
        return int(self.meta.get("n_cells", 0))

    def cells(self) -> pd.DataFrame:
        """All cells (positional index = row of the local-score matrix)."""
        with self._lock:
            if self._cells is None:
                df = pd.read_parquet(self.path / schema.SPATIAL_CELLS_FILE)
                self._cells = df.reset_index(drop=True)
            return self._cells

    def section_rows(self, section: str) -> np.ndarray:
        """Row positions of the cells of ``section``."""
        col = self.cells()[schema.OBS_SAMPLE]
        return np.flatnonzero((col == section).to_numpy())

    def local_score(self, interaction: str, rows: np.ndarray | None = None) -> np.ndarray:
        """LIANA+ local score of ``interaction`` per cell (float32)."""
        names = self.interactions
        j = names.index(interaction)  # ValueError for an unknown one: callers validate
        with self._lock:
            if self._local is None:
                self._local = np.load(self.path / schema.SPATIAL_LR_LOCAL_FILE, mmap_mode="r")
        col = self._local[:, j]
        return np.asarray(col if rows is None else col[rows], dtype=np.float32)

    def has_table(self, name: str) -> bool:
        return (self.path / schema.TABLES_DIR / f"{name}.csv").is_file()

    def table(self, name: str) -> pd.DataFrame:
        """A result table (a copy); :class:`~atlas.schema.MissingKeyError` when absent."""
        with self._lock:
            df = self._tables.get(name)
            if df is None:
                f = self.path / schema.TABLES_DIR / f"{name}.csv"
                if not f.is_file():
                    raise UnknownValue(
                        f"spatial results have no table {name!r}; run tme-atlas spatial"
                    )
                df = pd.read_csv(f, keep_default_na=False, na_values=[""])
                self._tables[name] = df
        return df.copy()


def open_spatial(atlas_dir: str | Path) -> SpatialResults | None:
    """The spatial results of the atlas in ``atlas_dir``, or ``None`` when there are none."""
    p = Path(atlas_dir) / schema.SPATIAL_DIR
    if not (p / schema.SPATIAL_META_FILE).is_file():
        return None
    return SpatialResults(p)
