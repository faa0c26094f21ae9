"""Analyses with a curated label version (``tme-atlas analyse|crosstalk DIR --labels NAME``).

The curated labels (:mod:`atlas.curation`) stand in for ``obs["cell_type"]`` in memory;
the tables are written to ``DIR/annotations/NAME/tables/v<N>/`` with the label set and
version recorded in their ``params.json``. ``atlas.h5ad``, the read store and
``DIR/tables/`` are never rewritten.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from atlas import curation, schema
from atlas.tables import get_table, has_table, put_table
from preprocessing.log import get_logger

log = get_logger("curated")


def use_curated_labels(adata, *, atlas_dir: str | Path, name: str, version: int | None = None):
    """Replace ``obs["cell_type"]`` of ``adata`` by set ``name`` at ``version`` (default: the
    latest) and drop the stored label-dependent tables (they described the old labels).

    Returns the version used. Raises :class:`~atlas.errors.UnknownValue` for an unknown set
    or version, :class:`~atlas.errors.InputError` when the set was made on other cells.

    Writes
    ------
    ``obs[schema.OBS_CELL_TYPE]`` (in memory only), removes :data:`curation.LABEL_TABLES`
    from ``uns[schema.UNS_TABLES]``.
    """
    version = curation.check_version(atlas_dir, name, version)
    labels = curation.aligned_labels(atlas_dir, name, version, adata.obs_names)
    adata.obs[schema.OBS_CELL_TYPE] = pd.Categorical(labels.astype(str))
    tables = dict(adata.uns.get(schema.UNS_TABLES, {}))
    for t in curation.LABEL_TABLES:
        tables.pop(t, None)
    adata.uns[schema.UNS_TABLES] = tables
    log.info(
        "labels: set %s v%d (%d labels) in place of %s",
        name,
        version,
        len(set(labels)),
        schema.OBS_CELL_TYPE,
    )
    return version


def save_curated_tables(
    adata, *, atlas_dir: str | Path, name: str, version: int, step: str, names: Sequence[str]
) -> Path:
    """Write the tables ``names`` of ``adata`` (those present) for set ``name`` at
    ``version`` with the parameters of ``step`` (``uns[params_key(step)]``) and the label
    version. Returns the folder.

    Writes
    ------
    ``DIR/annotations/<name>/tables/v<N>/`` (see :func:`atlas.curation.write_tables`)
    """
    tables = {n: get_table(adata, n) for n in names if has_table(adata, n)}
    params = dict(adata.uns.get(schema.params_key(step), {}))
    params.update({"labels": name, "label_version": int(version)})
    folder = curation.write_tables(atlas_dir, name, version, tables, step=step, params=params)
    log.info("%s with labels %s v%d: wrote %s", step, name, version, folder)
    return folder


def load_curated_table(adata, *, atlas_dir: str | Path, name: str, version: int, table: str):
    """Put the table ``table`` computed with set ``name`` at ``version`` into ``adata``
    (:class:`~atlas.curation.MissingVersionTable` names the command to run first).

    Writes
    ------
    ``uns[schema.UNS_TABLES][table]``
    """
    put_table(adata, table, curation.read_table(atlas_dir, name, version, table))
