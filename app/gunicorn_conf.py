"""gunicorn settings for the explorer: ``gunicorn -c app/gunicorn_conf.py app.wsgi:server``.

The same command is the Docker image's CMD and is what tests/test_hosting.py runs.
Everything comes from the project's configuration (``atlas.config.load_config``:
defaults < ``$TME_ATLAS_CONFIG`` file < ``TME_ATLAS__SECTION__FIELD`` variables); a few
process settings have their own variables:

==========================  ===========================================================
``TME_ATLAS__SERVE__HOST``  bind address (default 127.0.0.1; the image sets 0.0.0.0)
``TME_ATLAS__SERVE__PORT``  port (default 8050)
``TME_ATLAS_WORKERS``       worker processes (default: CPUs + 1, between 2 and 8)
``TME_ATLAS_THREADS``       threads per worker (default 4)
``TME_ATLAS_TIMEOUT``       seconds before a stuck worker is killed and replaced (120)
``TME_ATLAS_MAX_REQUESTS``  recycle a worker after this many requests (1000; 0 = never)
``TME_ATLAS_PRELOAD``       1 = import the app in the master before forking (default 0)
``FORWARDED_ALLOW_IPS``     proxies trusted for X-Forwarded-* (gunicorn's; 127.0.0.1)
==========================  ===========================================================

Workers and memory: ``preload_app`` is off, so every worker imports the app itself and
the atlas registry opens the store lazily, on the first request, *after* the fork. No
HDF5/file handle is ever shared across a fork (HDF5 is not fork-safe), and because the
store is read through memory maps, all workers map the same files: the OS page cache
keeps one copy of the atlas however many workers there are; each worker's private
memory is the Python code plus per-request temporaries. Preloading would share the
imported code copy-on-write, but CPython's reference counting soon dirties those pages,
so it saves little and delays every worker's restart; it is safe (the registry opens
nothing at import) and can be turned on with ``TME_ATLAS_PRELOAD=1``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# gunicorn execs this file by path: make the repository importable when run from a checkout
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from atlas.config import ConfigError, load_config  # noqa: E402


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"error: {name} must be an integer, got {raw!r}") from None


try:
    _config = load_config()
except ConfigError as _e:
    for _line in str(_e).splitlines():
        print(f"error: {_line}", file=sys.stderr)
    raise SystemExit(2) from None
_serve = _config.serve

bind = [f"[{_serve.host}]:{_serve.port}" if ":" in _serve.host else f"{_serve.host}:{_serve.port}"]
workers = _int_env("TME_ATLAS_WORKERS", max(2, min(8, (os.cpu_count() or 1) + 1)))
# gthread: a slow client ties up one thread, not a whole worker (no buffering proxy needed)
worker_class = "gthread"
threads = _int_env("TME_ATLAS_THREADS", 4)
timeout = _int_env("TME_ATLAS_TIMEOUT", 120)
graceful_timeout = 30
keepalive = 5
max_requests = _int_env("TME_ATLAS_MAX_REQUESTS", 1000)
max_requests_jitter = max(0, max_requests // 10)
preload_app = os.environ.get("TME_ATLAS_PRELOAD", "0").strip().lower() in ("1", "true", "yes")
# request size limits (Dash callback payloads are small JSON bodies)
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
# heartbeat files in memory (a read-only or overlay root file system is fine)
worker_tmp_dir = (
    "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
)
accesslog = os.environ.get("TME_ATLAS_ACCESS_LOG", "-") or None
errorlog = "-"
# every access-log field escaped (a Basic-auth username with a newline forged log lines)
logger_class = "app.security.SafeGunicornLogger"
loglevel = os.environ.get("TME_ATLAS_LOG_LEVEL", "info")
proc_name = "tme-atlas"
# never the development server's reloader or debugger
reload = False


def when_ready(server):  # noqa: D401 - gunicorn hook
    server.log.info(
        "CLL TME Atlas explorer: %d workers x %d threads on http://%s/ (health: /healthz)",
        workers,
        threads,
        bind[0],
    )


def post_fork(server, worker):  # gunicorn hook
    logging.getLogger("tme_atlas").setLevel(logging.INFO)


def on_exit(server):  # gunicorn hook (master): nothing left in the export folder
    from app.exports import clear_export_dir

    clear_export_dir(_config)


def worker_abort(worker):  # gunicorn hook: a request ran past `timeout`
    worker.log.error("worker %s timed out and is being replaced", worker.pid)
