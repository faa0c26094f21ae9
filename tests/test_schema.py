"""atlas.schema: the key registry, MissingKeyError messages, and that keys are spelled once."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from atlas import schema

REPO = Path(__file__).resolve().parents[1]


def _adata(**kw):
    import anndata as ad

    obs = pd.DataFrame({schema.OBS_SAMPLE: ["a", "b"]}, index=["c1", "c2"])
    return ad.AnnData(X=np.zeros((2, 3), dtype=np.float32), obs=obs, **kw)


@pytest.mark.parametrize(
    ("where", "key", "stage", "command"),
    [
        ("obs", schema.OBS_CELL_TYPE, "annotate", "tme-atlas build (stage 'annotate')"),
        ("obs", schema.OBS_LEIDEN, "cluster", "tme-atlas build (stage 'cluster')"),
        ("obs", schema.leiden_key(0.5), "cluster", "tme-atlas build (stage 'cluster')"),
        ("obs", schema.score_key("nfkb"), "programs", "tme-atlas build (stage 'programs')"),
        ("obs", schema.OBS_QC_PASS, "qc", "tme-atlas build (stage 'qc')"),
        ("obsm", schema.OBSM_SCVI, "integrate", "tme-atlas build (stage 'integrate')"),
        ("obsm", schema.OBSM_UMAP, "cluster", "tme-atlas build (stage 'cluster')"),
        ("layers", schema.LAYER_COUNTS, "ingest", "tme-atlas build (stage 'ingest')"),
        ("uns['tme_tables']", schema.TABLE_DE, "analyses", "tme-atlas analyse DIR"),
        ("uns['tme_tables']", schema.TABLE_COMPOSITION, "analyses", "tme-atlas analyse DIR"),
        ("uns['tme_tables']", schema.TABLE_INTERACTIONS, "crosstalk", "tme-atlas crosstalk DIR"),
        (
            "uns['tme_tables']",
            schema.TABLE_INTERACTIONS_DIFF,
            "crosstalk",
            "tme-atlas crosstalk DIR",
        ),
        ("obs", "something_else", None, "tme-atlas build"),
    ],
)
def test_missing_key_error_names_stage_and_command(where, key, stage, command):
    err = schema.MissingKeyError(where, key)
    assert isinstance(err, KeyError)
    assert err.stage == stage
    assert err.key == key
    msg = str(err)
    assert msg == f"atlas has no {where}[{key!r}]: run {command} first"
    assert not msg.startswith("'")  # KeyError would quote it otherwise


def test_require_helpers():
    a = _adata(obsm={schema.OBSM_UMAP: np.zeros((2, 2))})
    schema.require_obs(a, schema.OBS_SAMPLE)
    schema.require_obsm(a, schema.OBSM_UMAP)
    with pytest.raises(schema.MissingKeyError, match="stage 'annotate'"):
        schema.require_obs(a, schema.OBS_SAMPLE, schema.OBS_CELL_TYPE)
    with pytest.raises(schema.MissingKeyError, match="stage 'integrate'"):
        schema.require_obsm(a, schema.OBSM_SCVI)
    with pytest.raises(schema.MissingKeyError, match="stage 'ingest'"):
        schema.require_layer(a, schema.LAYER_COUNTS)
    with pytest.raises(schema.MissingKeyError, match=r"uns\['tme_species'\]"):
        schema.require_uns(a, schema.UNS_SPECIES)
    with pytest.raises(schema.MissingKeyError, match="tme-atlas analyse DIR"):
        schema.require_table(a, schema.TABLE_DE)
    a.uns[schema.UNS_TABLES] = {schema.TABLE_DE: pd.DataFrame({"x": [1]})}
    schema.require_table(a, schema.TABLE_DE)


def test_key_helpers():
    assert schema.leiden_key(0.5) == "leiden_r0.5"
    assert schema.leiden_key(1.0) == "leiden_r1"
    assert schema.score_key("nfkb") == "score_nfkb"
    assert schema.score_columns(["a", "score_x", "score_y", "cell_type"]) == ["score_x", "score_y"]
    assert schema.stage_of(schema.score_key("x")) == "programs"


def test_registry_is_consistent():
    assert len(set(schema.TABLES)) == len(schema.TABLES)
    # obs keys are unique strings (no two constants share a spelling unless aliases)
    aliases = {"OBS_SAMPLE", "OBS_PATIENT", "OBS_CONDITION", "OBS_TISSUE", "OBS_SPECIES"}
    seen: dict[str, str] = {}
    for name in dir(schema):
        if (
            name.startswith("OBS_")
            and name not in aliases
            and isinstance(getattr(schema, name), str)
        ):
            value = getattr(schema, name)
            assert value not in seen, f"{name} and {seen.get(value)} both spell {value!r}"
            seen[value] = name
    assert schema.STORE_FORMAT_VERSION >= 1


# ----------------------------------------------------------------------------- one spelling
CONTAINERS = {"obs", "obsm", "layers", "uns", "var", "varm", "obsp"}
SCANNED = ("preprocessing", "atlas", "app")


def _schema_keys() -> dict[str, str]:
    keys: dict[str, str] = {}
    for name in dir(schema):
        value = getattr(schema, name)
        if isinstance(value, str) and name.split("_")[0] in {"OBS", "OBSM", "LAYER", "UNS", "VAR"}:
            keys.setdefault(value, name)
    return keys


def literal_key_subscripts(root: Path = REPO) -> list[str]:
    """``x.obs["cell_type"]``-style subscripts spelling a schema key outside schema.py."""
    keys = _schema_keys()
    hits = []
    for folder in SCANNED:
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel == "atlas/schema.py":
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
            except SyntaxError:  # another test reports broken files
                continue
            for node in ast.walk(tree):
                if not isinstance(node, ast.Subscript):
                    continue
                target = node.value
                if not (isinstance(target, ast.Attribute) and target.attr in CONTAINERS):
                    continue
                key = node.slice
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    if key.value in keys:
                        hits.append(
                            f"{rel}:{node.lineno}: .{target.attr}[{key.value!r}] -> use "
                            f"schema.{keys[key.value]}"
                        )
    return hits


def test_literal_key_detector_finds_subscripts(tmp_path):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "x.py").write_text(
        'a.obsm["X_umap"]\n'
        'b.layers["counts"]\n'
        "c.obs[schema.OBS_CELL_TYPE]\n"
        'd.obs["not_a_schema_key"]\n'
        '"""docs mention .obs["cell_type"]"""\n'
        'df["cell_type"]\n'
    )
    for folder in ("preprocessing", "atlas"):
        (tmp_path / folder).mkdir()
    hits = literal_key_subscripts(tmp_path)
    assert [h.split(":")[1] for h in hits] == ["1", "2"]
    assert "schema.OBSM_UMAP" in hits[0] and "schema.LAYER_COUNTS" in hits[1]


def test_schema_keys_are_spelled_only_in_schema():
    hits = literal_key_subscripts()
    assert not hits, "literal AnnData keys outside atlas/schema.py:\n" + "\n".join(hits)


def test_flag_column_reads_flags_after_concat_and_h5ad(tmp_path):
    """A bool flag that only some cells carry (a reference's ``doublet_like_cluster`` beside
    query cells) becomes object-with-NaN after ``concat`` and a categorical of the strings
    ``'False'``/``'True'`` after an h5ad round trip, where ``astype(bool)`` reads ``'False'``
    as True: ``flag_column`` reads every form as the flag it was, missing as False."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    a = ad.AnnData(obs=pd.DataFrame({"f": [True, False]}, index=["a", "b"]))
    b = ad.AnnData(obs=pd.DataFrame(index=["c"]))
    c = ad.concat([a, b], join="outer")
    c.write_h5ad(tmp_path / "c.h5ad")
    back = ad.read_h5ad(tmp_path / "c.h5ad")
    for obj in (c, back, back.obs):
        np.testing.assert_array_equal(schema.flag_column(obj, "f"), [True, False, False])
    # as a query atlas held it (measured): a categorical of strings, where astype(bool)
    # reads 'False' as True
    cat = pd.DataFrame({"f": pd.Categorical(["True", "False", np.nan])})
    assert cat["f"].astype(object).fillna("False").astype(bool).tolist() == [True, True, True]
    np.testing.assert_array_equal(schema.flag_column(cat, "f"), [True, False, False])
    num = pd.DataFrame({"f": [1.0, np.nan, 0.0], "g": pd.array([True, None, False])})
    np.testing.assert_array_equal(schema.flag_column(num, "f"), [True, False, False])
    np.testing.assert_array_equal(schema.flag_column(num, "g"), [True, False, False])
