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


GENE_TABLE_COLUMNS = ("symbol", "ensembl_id", "chromosome", "start", "end")


def gene_positions(species: str):
    """Gene symbol -> Ensembl id, chromosome, start, end (1-based) for ``species``.

    Human: ``genes_human.tsv.gz`` (NCBI Entrez Gene symbols, Ensembl ids, UCSC hg38 positions via
    Bioconductor ``org.Hs.eg.db``; see ``make_gene_table.py``). Genes without a primary-assembly
    position have an empty ``chromosome`` and missing ``start``/``end``. Raises
    ``FileNotFoundError`` for a species without a shipped table (mouse: see references/README.md).
    """
    import pandas as pd

    p = path(f"genes_{species}.tsv.gz")
    df = pd.read_csv(
        p,
        sep="\t",
        dtype={"symbol": str, "ensembl_id": str, "chromosome": str},
        keep_default_na=False,
        na_values={"start": [""], "end": [""]},
    )
    df["start"] = df["start"].astype("Int64")
    df["end"] = df["end"].astype("Int64")
    return df
