"""The species of an atlas (``human`` or ``mouse``), one rule for every stage and reader."""

from __future__ import annotations

import numpy as np

from . import schema


def species_of(adata, species: str | None = None, *, from_genes: bool = False) -> str:
    """The species of ``adata``.

    The argument wins, then ``uns[UNS_SPECIES]`` (written by ingest), then the most common
    ``obs[OBS_SPECIES]``; with ``from_genes`` an AnnData without either is judged by the
    case of its gene symbols (mouse symbols are capitalised, human ones upper case);
    otherwise ``human``. Raises ``ValueError`` for a species other than
    :data:`atlas.schema.SPECIES`.
    """
    if species:
        sp_ = str(species).lower()
    elif schema.UNS_SPECIES in adata.uns:
        sp_ = str(adata.uns[schema.UNS_SPECIES]).lower()
    elif schema.OBS_SPECIES in adata.obs and adata.n_obs:
        sp_ = str(adata.obs[schema.OBS_SPECIES].astype(str).mode().iloc[0]).lower()
    elif from_genes:
        names = [n for n in adata.var_names[:5000] if any(c.isalpha() for c in n)]
        upper = np.mean([n == n.upper() for n in names]) if names else 1.0
        sp_ = "human" if upper >= 0.5 else "mouse"
    else:
        sp_ = "human"
    if sp_ not in schema.SPECIES:
        raise ValueError(f"species must be one of {schema.SPECIES}, not {sp_!r}")
    return sp_
