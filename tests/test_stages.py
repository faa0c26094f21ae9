"""The stage registry (``preprocessing.stages``) and the stage contract.

Every registered stage function: ``adata`` first, options keyword-only, a numpydoc
``Writes`` section naming every key its registry entry declares; every declared key is in
the small simulated atlas; hints, skips and resume hashes come from the registry.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from atlas import schema
from preprocessing import stages
from preprocessing.stages import STAGES, Stage, Writes

RUN_STAGES = [s for s in STAGES if s.run is not None]


def _constant_names(value: str) -> list[str]:
    """The names of the schema constants spelling ``value``."""
    return [n for n in dir(schema) if n.isupper() and getattr(schema, n) == value]


def _ctx():
    from atlas.config import load_config
    from preprocessing.pipeline import BuildContext

    return BuildContext(
        out=Path("x"), config=load_config(env={}), conditions=["a", "b"], reference="a"
    )


def test_registry_order_and_names():
    names = stages.names()
    assert names[0] == "ingest" and names[-1] == "write"
    assert len(set(names)) == len(names)
    assert stages.skippable() == ("scanvi", "analyses", "crosstalk")
    for s in STAGES:
        for need in s.needs:
            assert need in stages.skippable(), (s.name, need)
            assert names.index(need) < names.index(s.name)


def test_declared_keys_are_schema_constants_and_unique():
    seen: dict[str, str] = {}
    for s in STAGES:
        for key in (*s.writes.keys(), *s.writes.obs_prefixes):
            assert _constant_names(key) or key == schema.params_key(s.name), (s.name, key)
            assert key not in seen, f"{key!r} declared by {seen.get(key)} and {s.name}"
            seen[key] = s.name


def test_sections_and_context_exist():
    ctx = _ctx()
    cfg = ctx.config.model_dump()
    for s in STAGES:
        for section in s.sections:
            assert section in cfg, (s.name, section)
        for attr in s.context:
            assert hasattr(ctx, attr), (s.name, attr)


@pytest.mark.parametrize("stage", RUN_STAGES, ids=lambda s: s.name)
def test_stage_function_contract(stage: Stage):
    """scanpy-style: ``adata`` first, options keyword-only, documented keys written."""
    params = list(inspect.signature(stage.run).parameters.values())
    assert params[0].name == "adata", stage.name
    assert params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    for p in params[1:]:
        assert p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD), (
            f"{stage.run.__qualname__}: option {p.name!r} is not keyword-only"
        )
    accepted = {p.name for p in params[1:]}
    assert set(stage.options(_ctx())) <= accepted, stage.name
    doc = inspect.getdoc(stage.run) or ""
    assert "Writes\n------" in doc, f"{stage.run.__qualname__}: no numpydoc 'Writes' section"
    writes = doc.split("Writes\n------", 1)[1]
    for key in (*stage.writes.keys(), *stage.writes.obs_prefixes):
        spelled = [key, *_constant_names(key)]
        if key == schema.params_key(stage.name):
            spelled.append(f'params_key("{stage.name}")')
        assert any(x in writes for x in spelled), (
            f"{stage.run.__qualname__}: 'Writes' does not name {key!r}"
        )


def test_every_declared_key_is_in_the_small_atlas(small_atlas_dir_session, small_sim_dir):
    import anndata as ad
    import pandas as pd

    a = ad.read_h5ad(small_atlas_dir_session / schema.ATLAS_FILE)
    tables = set(a.uns.get(schema.UNS_TABLES, {}))
    for s in STAGES:
        w = s.writes
        missing = (
            [k for k in w.obs if k not in a.obs]
            + [p for p in w.obs_prefixes if not any(c.startswith(p) for c in a.obs.columns)]
            + [k for k in w.obsm if k not in a.obsm]
            + [k for k in w.var if k not in a.var]
            + [k for k in w.layers if k not in a.layers]
            + [k for k in w.uns if k not in a.uns]
            + [k for k in w.tables if k not in tables]
        )
        assert not missing, f"stage {s.name} declares {missing} but the atlas lacks them"
    # the other way round: every .obs column is a sheet column or declared by a stage
    sheet = set(pd.read_csv(small_sim_dir / "samplesheet.csv", nrows=1).columns)
    declared = {k for s in STAGES for k in s.writes.obs}
    prefixes = tuple(p for s in STAGES for p in s.writes.obs_prefixes)
    undeclared = [
        c for c in a.obs.columns if c not in declared | sheet and not c.startswith(prefixes)
    ]
    assert not undeclared, undeclared


def test_hints_come_from_the_registry():
    for s in STAGES:
        for key in s.writes.keys():
            assert schema.stage_of(key) == s.name, key
            assert schema.run_hint(key) == s.hint
    assert schema.run_hint(schema.leiden_key(0.5)) == "tme-atlas build (stage 'cluster')"
    assert schema.run_hint(schema.TABLE_DE) == "tme-atlas analyse DIR"
    assert schema.stage_of("not_a_key") is None


def test_skip_reasons():
    ctx = _ctx()
    assert stages.get("crosstalk").skip_reason(ctx) is None
    ctx.skip = ("analyses",)
    assert stages.get("analyses").skip_reason(ctx) == "--skip analyses"
    assert stages.get("crosstalk").skip_reason(ctx) == "--skip analyses"
    ctx.skip = ()
    ctx.conditions = ["a"]
    assert stages.get("analyses").skip_reason(ctx) == "only one condition"
    assert stages.get("qc").skip_reason(ctx) is None


def test_a_new_stage_is_one_registry_entry(monkeypatch, tmp_path):
    """Adding a stage = one entry: hashes, checkpoints and hints follow from it."""
    from preprocessing.pipeline import stage_hashes

    def mark(adata, *, flag: str = "x"):
        """Toy stage.

        Writes
        ------
        ``obs["toy"]``
        """
        adata.obs["toy"] = flag
        return adata

    toy = Stage("toy", mark, options=lambda ctx: {"flag": "y"}, writes=Writes(obs=("toy",)))
    before = stage_hashes(_ctx())
    i = stages.names().index("programs")
    monkeypatch.setattr(stages, "STAGES", (*STAGES[:i], toy, *STAGES[i:]))
    after = stage_hashes(_ctx())
    assert list(after) == list(stages.names())
    assert all(after[n] == before[n] for n in stages.names()[:i])
    assert all(after[n] != before[n] for n in stages.names()[i + 1 :])
    assert schema.run_hint("toy") == "tme-atlas build (stage 'toy')"
    assert "toy" in stages.derived_obs()[0]
