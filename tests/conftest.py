"""Shared fixtures. Heavy ones are built once per session; tests get copies.

Threads: 1 torch/BLAS thread (2 threads under contention made scVI up to 17x slower here).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TME_ATLAS_NO_PROGRESS", "1")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ARTIFACTS = REPO / "test-artifacts"


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


def shared_file(name: str) -> Path:
    """A file of ../shared/data, or skip the test when absent."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"optional real data {path} is absent")
    return path


def fast_config(**sections):
    """A Config for small test builds: short scVI budget, few permutations."""
    from atlas.config import load_config

    overrides = {
        "scvi": {"max_steps": 300, "batch_size": 256, "n_latent": 10},
        "crosstalk": {"n_perms": 20},
        "hvg": {"n_top_genes": 1000},
        "scanvi": {"max_steps": 150},
        "mapping": {"max_steps": 100},
    }
    for k, v in sections.items():
        overrides.setdefault(k, {}).update(v)
    return load_config(env={}, overrides=overrides)


# ----------------------------------------------------------------------------- simulator
@pytest.fixture(scope="session")
def small_sim():
    """In-memory simulation: 3 patients x 4 conditions, ~200 cells per sample."""
    from preprocessing.simulate import simulate

    return simulate(seed=1, n_patients=3, cells_per_sample=200)


@pytest.fixture(scope="session")
def small_sim_dir(tmp_path_factory) -> Path:
    """The small simulation written as a user's input (10x folders + samplesheet)."""
    from preprocessing.simulate import write_dataset

    out = tmp_path_factory.mktemp("small_sim")
    write_dataset(out, seed=1, n_patients=3, cells_per_sample=200)
    return out


@pytest.fixture(scope="session")
def small_atlas_dir_session(small_sim_dir, tmp_path_factory) -> Path:
    """A complete small atlas built from ``small_sim_dir`` (session; do not modify)."""
    from preprocessing.pipeline import run_build

    out = tmp_path_factory.mktemp("small_atlas") / "atlas"
    run_build(
        samplesheet=small_sim_dir / "samplesheet.csv",
        out=out,
        config=fast_config(),
    )
    return out


@pytest.fixture
def small_atlas_dir(small_atlas_dir_session, tmp_path) -> Path:
    """A private copy of the small atlas, free to modify."""
    dst = tmp_path / "atlas"
    shutil.copytree(small_atlas_dir_session, dst)
    return dst


# ----------------------------------------------------------------------------- demo size
@pytest.fixture(scope="session")
def demo_sim_dir(tmp_path_factory) -> Path:
    """The default demo cohort (same as ``make demo``), written to disk."""
    from preprocessing.simulate import write_dataset

    out = tmp_path_factory.mktemp("demo_sim")
    write_dataset(out, seed=0, lesions=True, vdj=True)  # tme-atlas simulate's defaults
    return out


@pytest.fixture(scope="session")
def demo_atlas_dir(demo_sim_dir, tmp_path_factory) -> Path:
    """The demo atlas built with the default configuration (slow; session; read-only)."""
    from atlas.config import load_config
    from preprocessing.pipeline import run_build

    out = tmp_path_factory.mktemp("demo_atlas") / "atlas"
    run_build(samplesheet=demo_sim_dir / "samplesheet.csv", out=out, config=load_config(env={}))
    return out
