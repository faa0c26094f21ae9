"""Curated reference tables shipped with the package (markers, programmes, LR pairs).

Each table carries a ``source`` column (literature or database) for every row.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def path(name: str) -> Path:
    """Filesystem path of a shipped reference file, e.g. ``path("markers_human.csv")``."""
    p = Path(str(resources.files(__name__).joinpath(name)))
    if not p.is_file():
        raise FileNotFoundError(f"reference file {name!r} is not shipped in references/")
    return p
