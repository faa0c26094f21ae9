"""Stage ``programs``: per-cell gene-programme scores from ``references/programs_<species>.csv``.

Each programme (columns ``program, gene, source, description``) is scored with
``scanpy.tl.score_genes`` on the log-normalised ``X`` (seeded control genes) into
``obs["score_<programme>"]``. Genes absent from the data are dropped; the genes actually used
are stored in ``uns[UNS_PROGRAMS]`` (programme -> list of genes).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd

from atlas import schema
from atlas.params import record_params
from atlas.species import species_of
from references import path as reference_path

from .log import get_logger

log = get_logger("programs")

PROGRAM_COLUMNS = ("program", "gene", "source", "description")


@lru_cache(maxsize=4)
def _load_cached(species: str) -> pd.DataFrame:
    path = reference_path(f"programs_{species}.csv")
    df = pd.read_csv(path, dtype=str).fillna("")
    missing = [c for c in PROGRAM_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path.name}: missing columns {missing}")
    return df


def load_programs(species: str = "human") -> pd.DataFrame:
    """The curated programme table: program, gene, source, description."""
    return _load_cached(species).copy()


def programme_genes(species: str = "human") -> dict[str, list[str]]:
    df = load_programs(species)
    return {p: list(dict.fromkeys(g["gene"])) for p, g in df.groupby("program", sort=False)}


def score_programs(
    adata,
    *,
    species: str | None = None,
    programs: dict[str, list[str]] | None = None,
    min_genes: int = 2,
    ctrl_size: int = 50,
    seed: int = 0,
):
    """Score every programme of ``references/programs_<species>.csv`` (or ``programs``).

    Programmes with fewer than ``min_genes`` genes in the data are skipped (logged).

    Writes
    ------
    ``obs[score_key(name)]`` (``OBS_SCORE_PREFIX`` + programme) per programme, the genes
    used in ``uns[UNS_PROGRAMS]`` and ``uns[params_key("programs")]``.
    """
    import scanpy as sc

    species = species_of(adata, species)
    programs = programs if programs is not None else programme_genes(species)
    have = set(adata.var_names)
    used: dict[str, list[str]] = {}
    skipped: list[str] = []
    for name, genes in programs.items():
        g = [x for x in dict.fromkeys(genes) if x in have]
        if len(g) < min_genes:
            skipped.append(name)
            continue
        key = schema.score_key(name)
        sc.tl.score_genes(
            adata,
            g,
            ctrl_size=min(ctrl_size, max(1, adata.n_vars - len(g))),
            n_bins=25,
            score_name=key,
            random_state=seed,
            use_raw=False,
        )
        adata.obs[key] = adata.obs[key].astype(np.float32)
        used[name] = g
    if skipped:
        log.info("programmes skipped (< %d genes in the data): %s", min_genes, ", ".join(skipped))
    log.info("programmes scored: %s", ", ".join(f"{k} ({len(v)})" for k, v in used.items()))
    adata.uns[schema.UNS_PROGRAMS] = used
    record_params(
        adata,
        "programs",
        {
            "table": f"references/programs_{species}.csv",
            "method": "scanpy.tl.score_genes (use_raw=False)",
            "ctrl_size": int(ctrl_size),
            "seed": int(seed),
            "skipped": skipped,
        },
    )
    return adata
