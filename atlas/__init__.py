"""CLL TME atlas: the key registry (:mod:`atlas.schema`), configuration, the on-disk
store (:mod:`atlas.store`) and exports (:mod:`atlas.export`).

``atlas.open(DIR)`` opens an atlas read-only (an :class:`atlas.store.AtlasStore`);
``atlas.write_atlas(adata, DIR)`` writes one; ``atlas.read_atlas_adata(DIR)`` reads the
full AnnData. Heavy modules are imported on first use, so ``import atlas.config`` stays
light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .store import AtlasStore

__all__ = ["AtlasStore", "open", "read_atlas_adata", "write_atlas", "export_atlas"]


def open(path) -> AtlasStore:  # noqa: A001 - ``atlas.open`` by design
    """Open the atlas directory ``path`` read-only (see :class:`atlas.store.AtlasStore`)."""
    from .store import AtlasStore

    return AtlasStore(path)


def __getattr__(name: str) -> Any:
    if name in ("AtlasStore", "read_atlas_adata", "write_atlas"):
        from . import store

        return getattr(store, name)
    if name == "export_atlas":
        from .export import export_atlas

        return export_atlas
    raise AttributeError(f"module 'atlas' has no attribute {name!r}")
