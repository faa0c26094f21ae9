"""Per-sample work on a dask cluster gives the same result as in this process."""

from __future__ import annotations

import time

import numpy as np
import pytest
import scipy.sparse as sp

from atlas import schema
from atlas.config import ComputeConfig, ConfigError, load_config


def _square(x, y):
    return x * x + y


def _fail(x):
    raise ValueError(f"task {x} failed")


def test_map_tasks_in_process_keeps_order():
    from preprocessing.parallel import current_client, map_tasks

    assert current_client() is None
    assert map_tasks(_square, [(i, 1) for i in range(5)], desc="t") == [1, 2, 5, 10, 17]


def test_scheduler_values_are_validated():
    assert ComputeConfig(scheduler=" local ").scheduler == "local"
    assert ComputeConfig(scheduler="tcp://10.0.0.1:8786").scheduler.startswith("tcp://")
    with pytest.raises(ConfigError, match="compute"):
        load_config(env={}, overrides={"compute": {"scheduler": "my-cluster"}})


def test_unreachable_scheduler_fails_fast_with_one_line():
    from preprocessing.parallel import compute_cluster

    cfg = ComputeConfig(scheduler="tcp://127.0.0.1:9", connect_timeout_s=2)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"compute.scheduler 'tcp://127.0.0.1:9': cannot reach"):
        with compute_cluster(cfg):
            pass
    assert time.perf_counter() - t0 < 30


@pytest.mark.slow
def test_qc_on_a_local_cluster_equals_in_process(small_sim):
    """Doublet scores and calls of every sample, computed on a 2-worker LocalCluster,
    equal those computed here (the tasks are pure functions of counts and seeds); a task's
    error reaches the caller."""
    from preprocessing.parallel import compute_cluster, current_client, map_tasks
    from preprocessing.qc import run_qc

    a = small_sim.adata.copy()
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    a.layers[schema.LAYER_COUNTS] = a.X.copy()
    a.uns[schema.UNS_SPECIES] = "human"
    here = run_qc(a.copy(), keep_all=True, seed=0).obs
    with compute_cluster(ComputeConfig(scheduler="local", workers=2)) as client:
        assert client is not None and current_client() is client
        assert len(client.scheduler_info()["workers"]) == 2
        there = run_qc(a.copy(), keep_all=True, seed=0).obs
        with pytest.raises(ValueError, match="task 3 failed"):
            map_tasks(_fail, [(3,)], desc="t")
    assert current_client() is None
    assert here[schema.OBS_PREDICTED_DOUBLET].sum() > 0
    np.testing.assert_array_equal(
        here[schema.OBS_PREDICTED_DOUBLET].to_numpy(),
        there[schema.OBS_PREDICTED_DOUBLET].to_numpy(),
    )
    np.testing.assert_allclose(
        here[schema.OBS_DOUBLET_SCORE].to_numpy(),
        there[schema.OBS_DOUBLET_SCORE].to_numpy(),
        rtol=1e-6,
        equal_nan=True,
    )
    np.testing.assert_array_equal(here[schema.OBS_QC_PASS], there[schema.OBS_QC_PASS])
