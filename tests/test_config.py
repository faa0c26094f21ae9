"""atlas.config: defaults < file < environment < CLI flags; invalid values -> ConfigError."""

from __future__ import annotations

import json

import pytest

from atlas.config import Config, ConfigError, load_config


def test_defaults():
    c = load_config(env={})
    assert c == Config()
    assert c.scvi.batch_key == "sample_id"
    assert "condition" not in c.scvi.categorical_covariates
    assert c.serve.port == 8050
    assert c.hvg.n_top_genes == 2000


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json", ".toml"])
def test_file_formats(tmp_path, suffix):
    f = tmp_path / f"c{suffix}"
    if suffix == ".json":
        f.write_text(json.dumps({"serve": {"port": 9000}, "hvg": {"n_top_genes": 1500}}))
    elif suffix == ".toml":
        f.write_text("[serve]\nport = 9000\n[hvg]\nn_top_genes = 1500\n")
    else:
        f.write_text("serve:\n  port: 9000\nhvg:\n  n_top_genes: 1500\n")
    c = load_config(f, env={})
    assert c.serve.port == 9000
    assert c.hvg.n_top_genes == 1500
    assert c.qc.min_genes == Config().qc.min_genes  # untouched sections keep defaults


def test_precedence_defaults_file_env_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("serve:\n  port: 9000\n  host: 0.0.0.0\nscvi:\n  max_steps: 100\n")
    env = {"TME_ATLAS__SERVE__PORT": "9100", "TME_ATLAS__SCVI__N_LATENT": "12"}
    # file only
    assert load_config(f, env={}).serve.port == 9000
    # env beats file
    c = load_config(f, env=env)
    assert (c.serve.port, c.serve.host, c.scvi.max_steps, c.scvi.n_latent) == (
        9100,
        "0.0.0.0",
        100,
        12,
    )
    # CLI beats env; None values (flags not given) do not override
    c = load_config(f, env=env, overrides={"serve": {"port": 9200, "host": None}})
    assert (c.serve.port, c.serve.host) == (9200, "0.0.0.0")
    # nothing anywhere: defaults
    assert load_config(env={}, overrides={"serve": {"port": None}}).serve.port == 8050


def test_config_file_from_environment(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"cluster": {"resolutions": [0.2, 0.4]}}))
    c = load_config(env={"TME_ATLAS_CONFIG": str(f)})
    assert c.cluster.resolutions == [0.2, 0.4]


def test_env_values_are_parsed():
    env = {
        "TME_ATLAS__QC__DOUBLETS": "false",
        "TME_ATLAS__CLUSTER__RESOLUTIONS": "[0.5, 1.5]",
        "TME_ATLAS__SCVI__LEARNING_RATE": "0.001",
        "TME_ATLAS__ANALYSES__REFERENCE": "untreated",
        "UNRELATED": "x",
    }
    c = load_config(env=env)
    assert c.qc.doublets is False
    assert c.cluster.resolutions == [0.5, 1.5]
    assert c.scvi.learning_rate == pytest.approx(0.001)
    assert c.analyses.reference == "untreated"


def test_invalid_values_give_one_line_each():
    with pytest.raises(ConfigError) as e:
        load_config(
            env={"TME_ATLAS__SERVE__PORT": "70000", "TME_ATLAS__QC__MAX_PCT_MITO": "-1"},
            overrides={"hvg": {"n_top_genes": 3}},
        )
    lines = str(e.value).splitlines()
    assert len(lines) == 3
    assert any(line.startswith("config serve.port:") for line in lines)
    assert any(line.startswith("config qc.max_pct_mito:") for line in lines)
    assert any(line.startswith("config hvg.n_top_genes:") for line in lines)


def test_unknown_keys_rejected(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("scvi:\n  n_latnet: 10\n")
    with pytest.raises(ConfigError, match=r"config scvi\.n_latnet"):
        load_config(f, env={})
    with pytest.raises(ConfigError, match="config nosuchsection"):
        load_config(env={"TME_ATLAS__NOSUCHSECTION__X": "1"})


def test_condition_as_batch_covariate_rejected():
    with pytest.raises(ConfigError, match="never a batch covariate"):
        load_config(env={}, overrides={"scvi": {"categorical_covariates": ["condition"]}})
    with pytest.raises(ConfigError, match="scvi.categorical_covariates"):
        load_config(env={"TME_ATLAS__SCVI__CATEGORICAL_COVARIATES": "[patient, condition]"})
    ok = load_config(env={}, overrides={"scvi": {"categorical_covariates": ["patient"]}})
    assert ok.scvi.categorical_covariates == ["patient"]
    c = Config()
    with pytest.raises(ValueError):
        c.scvi.categorical_covariates = ["condition"]  # validate_assignment


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "c.ini"
    bad.write_text("[x]\n")
    with pytest.raises(ConfigError, match="use .yaml"):
        load_config(bad, env={})
    broken = tmp_path / "c.yaml"
    broken.write_text("serve: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(broken, env={})
    scalar = tmp_path / "s.json"
    scalar.write_text("3")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar, env={})


def test_json_round_trip_and_section_hash():
    c = load_config(env={}, overrides={"scvi": {"max_steps": 500}})
    again = Config.model_validate_json(c.to_json())
    assert again == c
    assert c.section_hash("scvi") != Config().section_hash("scvi")
    assert c.section_hash("qc") == Config().section_hash("qc")


def test_cli_flags_reach_config(tmp_path):
    from tme_atlas.cli import _overrides, build_parser

    args = build_parser().parse_args(["serve", "DIR", "--port", "8123"])
    c = load_config(env={"TME_ATLAS__SERVE__PORT": "9000"}, overrides=_overrides(args))
    assert c.serve.port == 8123
    args = build_parser().parse_args(["analyse", "DIR", "--reference", "untreated"])
    c = load_config(env={}, overrides=_overrides(args))
    assert c.analyses.reference == "untreated"
