"""Per-sample work on a dask ``distributed`` cluster, or in this process.

The build opens one cluster for its whole run (:func:`compute_cluster`, from
``config.compute``); stages hand independent per-sample tasks to :func:`map_tasks`, which
runs them on the cluster's workers when one is open and one after the other here otherwise.
The tasks are pure functions of their arguments (seeds included), so where they run does
not change the result.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

from atlas.errors import ConfigError

from .log import get_logger, progress

log = get_logger("compute")

_CLIENT: ContextVar[Any | None] = ContextVar("tme_atlas_dask_client", default=None)


def current_client():
    """The dask client of the running build, or ``None`` (work runs in this process)."""
    return _CLIENT.get()


@contextlib.contextmanager
def compute_cluster(cfg=None) -> Iterator[Any | None]:
    """Open the cluster of ``cfg`` (:class:`atlas.config.ComputeConfig`) for the block.

    ``scheduler == ""``: nothing is opened (yields ``None``). ``"local"``: a
    ``LocalCluster`` of ``cfg.workers`` single-threaded processes, closed on exit. An
    address: a client of that scheduler (not shut down on exit). A scheduler that cannot be
    reached within ``connect_timeout_s`` raises :class:`~atlas.errors.ConfigError`.
    """
    if cfg is None or not cfg.scheduler:
        yield None
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ConfigError("compute.scheduler needs the 'distributed' package") from e
    cluster = None
    try:
        if cfg.scheduler == "local":
            cluster = LocalCluster(
                n_workers=cfg.workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            client = Client(cluster, timeout=cfg.connect_timeout_s)
            where = f"a local dask cluster of {cfg.workers} worker processes"
        else:
            client = Client(cfg.scheduler, timeout=cfg.connect_timeout_s)
            n = len(client.scheduler_info().get("workers", {}))
            where = f"dask scheduler {cfg.scheduler} ({n} workers)"
    except (OSError, TimeoutError, RuntimeError) as e:
        if cluster is not None:
            cluster.close()
        if cfg.scheduler == "local":
            raise ConfigError(
                f"compute.scheduler 'local': could not start {cfg.workers} dask workers ({e})"
            ) from e
        raise ConfigError(
            f"compute.scheduler {cfg.scheduler!r}: cannot reach it within "
            f"{cfg.connect_timeout_s:g} s ({e.__class__.__name__})"
        ) from e
    log.info("compute: per-sample work runs on %s", where)
    token = _CLIENT.set(client)
    try:
        yield client
    finally:
        _CLIENT.reset(token)
        client.close()
        if cluster is not None:
            cluster.close()


def map_tasks(
    fn: Callable[..., Any], tasks: Sequence[tuple], *, desc: str, unit: str = "sample"
) -> list[Any]:
    """``[fn(*t) for t in tasks]``, in order: on the open cluster's workers, else here.

    ``fn`` must be a module-level function (it is pickled to the workers); an exception in
    a task is raised here.
    """
    client = current_client()
    if client is None or len(tasks) == 0:
        return [fn(*t) for t in progress(tasks, desc=desc, unit=unit)]
    from distributed import as_completed

    futures = [client.submit(fn, *t, pure=False) for t in tasks]
    index = {f.key: i for i, f in enumerate(futures)}
    out: list[Any] = [None] * len(futures)
    bar = progress(total=len(futures), desc=f"{desc} (dask)", unit=unit)
    try:
        for fut in as_completed(futures):
            out[index[fut.key]] = fut.result()
            bar.update(1)
    finally:
        bar.close()
        for f in futures:
            f.release()
    return out
