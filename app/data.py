"""The explorer's read layer: one :class:`AtlasView` per served atlas, on top of the store.

Everything the pages read goes through here, and everything here reads through
``atlas.open()`` (the column-oriented store), never AnnData. What is computed once per
process and kept: the cell metadata, the UMAP coordinates, the fixed display subset of
cells (at most ``limits.max_display_points``), the condition order and colours. Gene
vectors are read on demand from the store (a small LRU cache keeps the last few).

User-supplied values (URL parameters, dropdown values) are validated against the atlas's
known values here, with the project's one validator (:func:`atlas.errors.check_choice`);
an unknown value raises :class:`~atlas.errors.UnknownValue` (HTTP 400), whose message the
pages show instead of a traceback.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atlas import curation, schema
from atlas.errors import UnknownValue, check_choice, check_choices, clip

__all__ = ["AtlasView", "LabelledView", "UnknownValue"]

log = logging.getLogger("tme_atlas.app")

DISPLAY_SEED = 0
GENE_CACHE = 8
# categorical obs columns offered for colouring, in this order when present
PREFERRED_CATEGORICAL = (
    schema.OBS_CELL_TYPE,
    schema.OBS_ORIGIN,  # query atlases (tme-atlas map): reference or query
    schema.OBS_CONDITION,
    schema.OBS_LINEAGE,
    schema.OBS_MALIGNANT,
    schema.OBS_CLONOTYPE,
    schema.OBS_IN_DOMINANT_CLONE,
    schema.OBS_LEIDEN,
    schema.OBS_PATIENT,
    schema.OBS_SAMPLE,
    schema.OBS_TISSUE,
    schema.OBS_QC_PASS,
    schema.OBS_PREDICTED_DOUBLET,
)
PREFERRED_NUMERIC = (
    schema.OBS_LABEL_UNCERTAINTY,  # query atlases: 1 - scANVI's probability of the label
    schema.OBS_TOTAL_COUNTS,
    schema.OBS_N_GENES,
    schema.OBS_PCT_MITO,
    schema.OBS_DOUBLET_SCORE,
    schema.OBS_CELL_TYPE_CONFIDENCE,
    schema.OBS_CNV_SCORE,
    schema.OBS_MALIGNANT_CONFIDENCE,
    schema.OBS_CLL_PROGRAMME,
)
MAX_CATEGORIES = 120  # more distinct values than this: not offered as a colour
# columns with one value per clone (thousands in a polyclonal repertoire): the most frequent
# values are kept, the rest read LUMPED_OTHER, empty values LUMPED_NONE
LUMPED = {schema.OBS_CLONOTYPE: 12}
LUMPED_OTHER = "other"
LUMPED_NONE = "none"


def open_store(path: str | Path) -> Any:
    """Open the atlas in ``path`` with ``atlas.open`` (the typed, column-oriented reader).
    The one place the explorer opens an atlas: the factory and the registry call it."""
    import atlas

    return atlas.open(Path(path))


def open_view(path: str | Path, limits: Any, *, name: str | None = None) -> AtlasView:
    """:class:`AtlasView` over :func:`open_store` of ``path`` (named after its folder)."""
    return AtlasView(open_store(path), limits, name=name or Path(path).resolve().name)


class AtlasView:
    """Read access and cached derived data for one atlas store."""

    def __init__(self, store: Any, limits: Any, name: str | None = None):
        self.store = store
        self.limits = limits
        self.name = name or "atlas"
        self._lock = threading.Lock()
        self._genes: OrderedDict[str, np.ndarray] = OrderedDict()

    # ------------------------------------------------------------------ basics
    @cached_property
    def obs(self) -> pd.DataFrame:
        """All cell metadata (categoricals kept), positional index 0..n-1."""
        df = self.store.obs()
        return df.reset_index(drop=True) if not isinstance(df.index, pd.RangeIndex) else df

    @cached_property
    def cell_ids(self) -> np.ndarray:
        return np.asarray(self.store.obs_names, dtype=object)

    @property
    def n_cells(self) -> int:
        return int(self.store.n_cells)

    @cached_property
    def species(self) -> str:
        return str(getattr(self.store, "species", "human") or "human")

    @cached_property
    def conditions(self) -> list[str]:
        """Conditions in sheet order (reference first when known)."""
        order = [str(c) for c in (getattr(self.store, "conditions", None) or [])]
        present = self._categories(schema.OBS_CONDITION)
        order = [c for c in order if c in present] + [c for c in present if c not in order]
        ref = self.reference
        if ref in order:
            order.remove(ref)
            order.insert(0, ref)
        return order

    @cached_property
    def reference(self) -> str | None:
        ref = getattr(self.store, "reference", None)
        return str(ref) if ref else None

    @cached_property
    def cell_types(self) -> list[str]:
        return self._categories(schema.OBS_CELL_TYPE)

    @cached_property
    def samples(self) -> list[str]:
        return self._categories(schema.OBS_SAMPLE)

    @cached_property
    def patients(self) -> list[str]:
        return self._categories(schema.OBS_PATIENT)

    def _categories(self, col: str) -> list[str]:
        if col not in self.obs.columns:
            return []
        if col in LUMPED:
            return [str(c) for c in self.lumped(col).categories]
        s = self.obs[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            cats = [str(c) for c in s.cat.categories if (s == c).any()]
            return cats
        return sorted(map(str, pd.unique(s.dropna())))

    def codes(self, col: str) -> np.ndarray:
        """The column as strings (numpy object array), cached."""
        return self._str_column(col)

    def lumped(self, col: str) -> pd.Categorical:
        """A :data:`LUMPED` column (clonotype) as a categorical of its most frequent values,
        :data:`LUMPED_OTHER` for the rest and :data:`LUMPED_NONE` for empty ones (cached)."""
        cache = self.__dict__.setdefault("_lumped_cols", {})
        if col not in cache:
            s = self.obs[col].astype(str).replace({"nan": ""}).to_numpy(dtype=object)
            vc = pd.Series(s[s != ""]).value_counts()
            top = [str(v) for v, n in vc.items() if n > 1][: LUMPED[col]]
            out = np.where(s == "", LUMPED_NONE, np.where(np.isin(s, top), s, LUMPED_OTHER))
            cats = top + [c for c in (LUMPED_OTHER, LUMPED_NONE) if (out == c).any()]
            cache[col] = pd.Categorical(out.astype(str), categories=cats)
        return cache[col]

    def cat(self, col: str) -> pd.Categorical:
        """The column as a categorical of strings (cached); conditions in atlas order."""
        if col in LUMPED and col in self.obs.columns:
            return self.lumped(col)
        cache = self.__dict__.setdefault("_cat_cols", {})
        if col not in cache:
            s = self.obs[col]
            if isinstance(s.dtype, pd.CategoricalDtype):
                c = s.cat.rename_categories([str(x) for x in s.cat.categories]).array
            else:
                c = pd.Categorical(s.astype(str))
            order = self.conditions if col == schema.OBS_CONDITION else None
            if order:
                c = c.set_categories(order + [x for x in c.categories if x not in order])
            cache[col] = pd.Categorical(c)
        return cache[col]

    def _str_column(self, col: str) -> np.ndarray:
        cache = self.__dict__.setdefault("_str_cols", {})
        if col not in cache:
            if col in LUMPED:
                cache[col] = np.asarray(self.lumped(col).astype(str), dtype=object)
            else:
                cache[col] = self.obs[col].astype(str).to_numpy()
        return cache[col]

    # ------------------------------------------------------------------ colouring options
    @cached_property
    def categorical_columns(self) -> list[str]:
        out = []
        cols = list(self.obs.columns)
        for c in list(PREFERRED_CATEGORICAL) + sorted(cols):
            if c not in cols or c in out or c.startswith(schema.OBS_SCORE_PREFIX):
                continue
            s = self.obs[c]
            if isinstance(s.dtype, pd.CategoricalDtype) or s.dtype == object or s.dtype == bool:
                if c in LUMPED or s.nunique() <= MAX_CATEGORIES:
                    out.append(c)
        return out

    @cached_property
    def numeric_columns(self) -> list[str]:
        out = []
        cols = list(self.obs.columns)
        for c in list(PREFERRED_NUMERIC) + sorted(cols):
            if c not in cols or c in out or c.startswith(schema.OBS_SCORE_PREFIX):
                continue
            s = self.obs[c]
            if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
                out.append(c)
        return out

    @cached_property
    def score_columns(self) -> list[str]:
        return schema.score_columns(self.obs.columns)

    @cached_property
    def colour_columns(self) -> list[str]:
        return self.categorical_columns + self.score_columns + self.numeric_columns

    # ------------------------------------------------------------------ query atlases
    @cached_property
    def has_origin(self) -> bool:
        """A query atlas (``tme-atlas map``) with both reference and query cells."""
        if schema.OBS_ORIGIN not in self.obs.columns:
            return False
        return {str(v) for v in pd.unique(self.obs[schema.OBS_ORIGIN])} >= set(schema.ORIGINS)

    @cached_property
    def query_mask(self) -> np.ndarray:
        """Boolean per cell: a mapped query cell (all False outside query atlases)."""
        if schema.OBS_ORIGIN not in self.obs.columns:
            return np.zeros(self.n_cells, dtype=bool)
        return self._str_column(schema.OBS_ORIGIN) == schema.ORIGIN_QUERY

    def shown_idx(self, query_only: bool = False) -> np.ndarray:
        """The displayed cells (:attr:`display_idx`), only the query's when ``query_only``."""
        idx = self.display_idx
        return idx[self.query_mask[idx]] if query_only and self.has_origin else idx

    def is_categorical(self, col: str) -> bool:
        return col in self.categorical_columns

    # ------------------------------------------------------------------ embedding
    @cached_property
    def umap(self) -> np.ndarray | None:
        """UMAP coordinates (n x 2 float32) or None when the atlas has none."""
        try:
            xy = self.store.embedding(schema.OBSM_UMAP)
        except (KeyError, FileNotFoundError):
            return None
        return np.ascontiguousarray(np.asarray(xy)[:, :2], dtype=np.float32)

    @cached_property
    def display_idx(self) -> np.ndarray:
        """A fixed random subset of cells drawn for display (sorted positions).

        All cells when the atlas has at most ``limits.max_display_points``; statistics are
        always computed on all cells.
        """
        n, cap = self.n_cells, int(self.limits.max_display_points)
        if n <= cap:
            return np.arange(n)
        rng = np.random.default_rng(DISPLAY_SEED)
        return np.sort(rng.choice(n, size=cap, replace=False))

    @property
    def downsampled(self) -> bool:
        return len(self.display_idx) < self.n_cells

    # ------------------------------------------------------------------ genes
    @cached_property
    def gene_names(self) -> list[str]:
        return [str(g) for g in self.store.genes]

    @cached_property
    def _gene_set(self) -> dict[str, str]:
        return {g.upper(): g for g in self.gene_names}

    def resolve_gene(self, gene: Any) -> str:
        """The atlas's symbol for ``gene`` (case-insensitive); else :class:`UnknownValue`."""
        if isinstance(gene, str):
            hit = self._gene_set.get(gene.strip().upper())
            if hit:
                return hit
        raise UnknownValue(f"unknown gene {clip(gene)!r} (not in this {self.species} atlas)")

    def resolve_genes(self, genes: Iterable[Any], *, limit: int | None = None) -> list[str]:
        out, bad = [], []
        for g in genes:
            try:
                s = self.resolve_gene(g)
            except UnknownValue:
                bad.append(clip(g))
                continue
            if s not in out:
                out.append(s)
        if bad:
            raise UnknownValue(f"unknown gene(s): {', '.join(bad[:5])}")
        limit = limit or int(self.limits.max_genes_per_request)
        if len(out) > limit:
            raise UnknownValue(f"too many genes: {len(out)} (at most {limit} per request)")
        return out

    def search_genes(self, query: str | None, limit: int = 30) -> list[str]:
        q = (query or "").strip()
        if not q:
            return []
        qu = q.upper()
        hits = [str(g) for g in self.store.search_genes(q, limit=max(200, limit))]
        # exact match first, then the shortest prefix matches (CD5 before CD58)
        hits = sorted(hits, key=lambda g: (g.upper() != qu, len(g), g))[:limit]
        if len(hits) < limit and len(q) >= 2:  # then substring matches
            more = [g for g in self.gene_names if qu in g.upper() and g not in hits]
            hits += sorted(more, key=len)[: limit - len(hits)]
        return hits

    def gene(self, gene: str) -> np.ndarray:
        """Log-normalised expression of one gene over all cells (float32, cached)."""
        with self._lock:
            hit = self._genes.get(gene)
            if hit is not None:
                self._genes.move_to_end(gene)
                return hit
        v = np.asarray(self.store.expression(gene), dtype=np.float32).ravel()
        with self._lock:
            self._genes[gene] = v
            while len(self._genes) > GENE_CACHE:
                self._genes.popitem(last=False)
        return v

    def genes_matrix(self, genes: Sequence[str], cells: np.ndarray | None = None) -> np.ndarray:
        """Dense cells x genes float32 matrix (rows: ``cells`` positions or all cells)."""
        sparse = getattr(self.store, "gene_sparse", None)
        if sparse is None or cells is None:
            m = self.store.expression_matrix(list(genes), cells=cells)
            return np.asarray(m.to_numpy(), dtype=np.float32)
        # read only the non-zeros of each gene and scatter those of the chosen cells
        cells = np.asarray(cells, dtype=np.int64)
        pos = np.full(self.n_cells, -1, dtype=np.int64)
        pos[cells] = np.arange(len(cells))
        out = np.zeros((len(cells), len(genes)), dtype=np.float32)
        for j, g in enumerate(genes):
            idx, val = sparse(g)
            p = pos[idx]
            keep = p >= 0
            out[p[keep], j] = val[keep]
        return out

    @cached_property
    def variable_genes(self) -> list[str]:
        """Genes for the quick DE: the atlas's most variable genes (at most 300)."""
        var = self.var
        if var is not None and schema.VAR_HVG in var.columns:
            hv = var[var[schema.VAR_HVG].astype(bool)]
            for col in ("variances_norm", "dispersions_norm", "variances"):
                if col in hv.columns:
                    hv = hv.sort_values(col, ascending=False)
                    break
            genes = [str(g) for g in hv.index][:300]
            if genes:
                return genes
        return self.gene_names[:300]

    @cached_property
    def var(self) -> pd.DataFrame | None:
        try:
            return self.store.var()
        except (AttributeError, TypeError, KeyError, FileNotFoundError):
            return None

    # ------------------------------------------------------------------ programmes
    @cached_property
    def programs(self) -> dict[str, list[str]]:
        try:
            progs = self.store.programs or {}
        except (KeyError, FileNotFoundError, schema.MissingKeyError):
            return {}
        known = self._gene_set
        out = {}
        for name, genes in progs.items():
            present = [known[g.upper()] for g in genes if str(g).upper() in known]
            if present:
                out[str(name)] = present
        return out

    # ------------------------------------------------------------------ tables / summary
    @cached_property
    def spatial(self) -> Any:
        """The atlas's spatial results (``atlas.spatial.SpatialResults``) or ``None``."""
        opener = getattr(self.store, "spatial", None)
        return opener() if opener is not None else None

    def has_table(self, name: str) -> bool:
        try:
            return bool(self.store.has_table(name))
        except Exception:  # noqa: BLE001 - a broken table is a missing table here
            return False

    def table(self, name: str) -> pd.DataFrame:
        """A result table; :class:`~atlas.schema.MissingKeyError` when absent."""
        cache = self.__dict__.setdefault("_tables", {})
        if name not in cache:
            cache[name] = self.store.table(name)
        return cache[name]

    def summary(
        self, genes: Sequence[str], by: Sequence[str] = (schema.OBS_CELL_TYPE, schema.OBS_CONDITION)
    ):
        """Mean expression and fraction expressing per gene x group (long frame).

        Columns: ``gene``, the ``by`` columns, ``n_cells``, ``mean``, ``frac``.
        """
        return self.store.summary(list(genes), groupby=list(by))

    # ------------------------------------------------------------------ masks
    def mask(self, **filters: Sequence[str] | None) -> np.ndarray:
        """Boolean mask of cells whose obs columns take one of the given values."""
        m = np.ones(self.n_cells, dtype=bool)
        for col, values in filters.items():
            if values:
                m &= np.isin(self._str_column(col), list(values))
        return m

    # ------------------------------------------------------------------ curated labels
    label_set: str | None = None  # a LabelledView's set and version; None: the atlas's own
    label_version: int | None = None
    LABELLED_CACHE = 6

    @property
    def atlas_dir(self) -> Path | None:
        path = getattr(self.store, "path", None)
        return Path(path) if path is not None else None

    def label_versions(self) -> list[tuple[str, int, dict]]:
        """Every (set, version, manifest entry) of the curated label sets, newest last per
        set (read from disk on each call: edits by other users and processes show)."""
        out: list[tuple[str, int, dict]] = []
        if self.atlas_dir is None:
            return out
        for name in curation.label_sets(self.atlas_dir):
            try:
                for e in curation.versions(self.atlas_dir, name):
                    out.append((name, int(e["version"]), e))
            except Exception:  # noqa: BLE001 - a damaged set is not offered
                log.warning("label set %s is unreadable; not offered", name)
        return out

    def labelled(self, name: str, version: int) -> AtlasView:
        """This atlas seen with curated label set ``name`` at ``version`` (validated; cached
        per view, a few at a time)."""
        with self._lock:  # a saved version never changes: a cached one needs no disk read
            cache = self.__dict__.setdefault("_labelled", OrderedDict())
            hit = cache.get((name, version))
            if hit is not None:
                cache.move_to_end((name, version))
                return hit
        version = curation.check_version(self.atlas_dir, name, version)
        key = (name, version)
        view = LabelledView(self, name, version)
        with self._lock:
            cache[key] = view
            while len(cache) > self.LABELLED_CACHE:
                cache.popitem(last=False)
        return view

    def base_labels(self) -> pd.Series:
        """The atlas's own cell-type labels by cell id (the start of a new label set)."""
        base = getattr(self, "base", self)
        return pd.Series(base.codes(schema.OBS_CELL_TYPE), index=base.cell_ids)

    # ------------------------------------------------------------------ validation
    def check_choice(self, value: Any, allowed: Sequence[str], what: str) -> str:
        """:func:`atlas.errors.check_choice` (the one validator)."""
        return check_choice(value, allowed, what)

    def check_choices(self, values: Iterable[Any], allowed: Sequence[str], what: str) -> list[str]:
        """:func:`atlas.errors.check_choices` (the one validator)."""
        return check_choices(values, allowed, what)


# the cached data a LabelledView shares with its atlas view (label-independent)
_SHARED = (
    "cell_ids",
    "species",
    "reference",
    "umap",
    "display_idx",
    "gene_names",
    "_gene_set",
    "variable_genes",
    "var",
    "programs",
)


class LabelledView(AtlasView):
    """An :class:`AtlasView` whose ``obs["cell_type"]`` is a curated label version and whose
    label-dependent tables (composition, DE, interactions, ...) are those recomputed with
    it (``tme-atlas analyse|crosstalk DIR --labels NAME``); a table not recomputed for this
    version is missing (the page says which command to run). Gene data, the embedding and
    the other tables are the atlas's own (shared, not copied). The precomputed dot-plot
    summaries of the store are grouped by the atlas's labels: :meth:`summary` uses them."""

    def __init__(self, base: AtlasView, name: str, version: int):
        super().__init__(base.store, base.limits, name=base.name)
        self.base = base
        self.label_set = name
        self.label_version = int(version)
        self._genes = base._genes  # one gene cache (and its lock) for both
        self._lock = base._lock
        for key in _SHARED:
            self.__dict__[key] = getattr(base, key)
        labels = curation.aligned_labels(base.atlas_dir, name, version, base.cell_ids)
        obs = base.obs.copy(deep=False)
        cats = sorted(set(labels), key=str)
        obs[schema.OBS_CELL_TYPE] = pd.Categorical(labels, categories=cats)
        self.__dict__["obs"] = obs

    def label_versions(self) -> list[tuple[str, int, dict]]:
        return self.base.label_versions()

    def labelled(self, name: str, version: int) -> AtlasView:
        return self.base.labelled(name, version)

    def has_table(self, name: str) -> bool:
        if name in curation.LABEL_TABLES:  # on disk now (recomputed while serving)
            return name in curation.table_names(
                self.base.atlas_dir, self.label_set, self.label_version
            )
        return self.base.has_table(name)

    def table(self, name: str) -> pd.DataFrame:
        if name not in curation.LABEL_TABLES:
            return self.base.table(name)
        folder = curation.tables_dir(self.base.atlas_dir, self.label_set, self.label_version)
        try:
            stamp = (folder / f"{name}.parquet").stat().st_mtime_ns
        except OSError:
            stamp = None
        cache = self.__dict__.setdefault("_tables", {})
        hit = cache.get(name)
        if hit is None or hit[0] != stamp:
            df = curation.read_table(self.base.atlas_dir, self.label_set, self.label_version, name)
            cache[name] = hit = (stamp, df)
        return hit[1].copy()

    def summary(self, genes, by=(schema.OBS_CELL_TYPE, schema.OBS_CONDITION)):
        return self.base.summary(genes, by=by)
