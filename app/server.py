"""``tme-atlas serve DIR``: the explorer on gunicorn, exactly as in production.

``serve`` replaces the CLI process with ``gunicorn -c app/gunicorn_conf.py app.wsgi:server``
(the Docker image's CMD), passing the atlas, the config file and the host/port through the
same environment variables the image uses. One code path for development and production:
the same WSGI dispatcher (one or several atlases), workers, limits, security hooks and
export folder; never Flask's development server.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from atlas.config import Config
from atlas.errors import InputError

from .wsgi import ENV_ATLAS

log = logging.getLogger("tme_atlas.app")

CONF_FILE = Path(__file__).resolve().with_name("gunicorn_conf.py")
# what the Dockerfile's CMD runs after "gunicorn" (tests/test_hosting.py compares them)
GUNICORN_ARGS = ["-c", "app/gunicorn_conf.py", "app.wsgi:server"]
ENV_CONFIG = "TME_ATLAS_CONFIG"


def _atlas_dir(atlas_dir: str | os.PathLike | None, config: Config) -> Path | None:
    if atlas_dir:
        return Path(atlas_dir)
    if os.environ.get(ENV_ATLAS):
        return Path(os.environ[ENV_ATLAS])
    if config.serve.atlases:
        return None  # several atlases from the config
    raise InputError("serve: give an atlas directory (tme-atlas serve DIR)")


def gunicorn_argv(config_file: str | os.PathLike | None = None) -> list[str]:
    """``python -m gunicorn -c <app/gunicorn_conf.py> app.wsgi:server``."""
    args = [str(CONF_FILE) if a == GUNICORN_ARGS[1] else a for a in GUNICORN_ARGS]
    return [sys.executable, "-m", "gunicorn", *args]


def serve_environment(
    atlas_dir: Path | None, config: Config, config_file: str | os.PathLike | None = None
) -> dict[str, str]:
    """The environment of the gunicorn process (the variables the Docker image uses)."""
    env = dict(os.environ)
    if atlas_dir is not None:
        env[ENV_ATLAS] = str(atlas_dir.resolve())
    if config_file:
        env[ENV_CONFIG] = str(Path(config_file).resolve())
    env["TME_ATLAS__SERVE__HOST"] = str(config.serve.host)
    env["TME_ATLAS__SERVE__PORT"] = str(config.serve.port)
    env.setdefault("PYTHONUNBUFFERED", "1")
    root = str(Path(__file__).resolve().parents[1])  # a checkout: importable by gunicorn
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def serve(
    atlas_dir: str | os.PathLike | None = None,
    *,
    config: Config | None = None,
    config_file: str | os.PathLike | None = None,
) -> None:
    """Serve ``atlas_dir`` (or ``serve.atlases``) on ``config.serve.host:port`` with
    gunicorn; does not return (the process becomes gunicorn's master)."""
    config = config or Config()
    path = _atlas_dir(atlas_dir, config)
    if path is not None and not path.is_dir():
        raise InputError(f"serve: atlas directory {path} does not exist")
    for name, p in config.serve.atlases.items():
        if not Path(p).expanduser().is_dir():
            raise InputError(f"serve: atlas {name!r}: directory {p} does not exist")
    host, port = config.serve.host, config.serve.port
    base = config.serve.url_base_pathname or "/"
    print(f"CLL TME Atlas explorer: http://{host}:{port}{base}  (Ctrl+C to stop)", flush=True)
    argv = gunicorn_argv(config_file)
    os.execvpe(argv[0], argv, serve_environment(path, config, config_file))
