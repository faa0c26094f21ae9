"""``tme-atlas serve DIR``: the explorer on Flask's development server (debug off).

For production use gunicorn: ``gunicorn -c app/gunicorn_conf.py app.wsgi:server``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from atlas.config import Config
from atlas.errors import InputError

from .wsgi import ENV_ATLAS

log = logging.getLogger("tme_atlas.app")


def _atlas_dir(atlas_dir: str | os.PathLike | None, config: Config) -> Path:
    if atlas_dir:
        return Path(atlas_dir)
    if os.environ.get(ENV_ATLAS):
        return Path(os.environ[ENV_ATLAS])
    if config.serve.atlases:
        return Path(next(iter(config.serve.atlases.values())))
    raise InputError("serve: give an atlas directory (tme-atlas serve DIR)")


def serve(atlas_dir: str | os.PathLike | None = None, *, config: Config | None = None) -> None:
    """Build the app for ``atlas_dir`` and serve it on ``config.serve.host:port``."""
    from .factory import create_app

    config = config or Config()
    path = _atlas_dir(atlas_dir, config)
    if not path.is_dir():
        raise InputError(f"serve: atlas directory {path} does not exist")
    app = create_app(path, config)
    host, port = config.serve.host, config.serve.port
    base = config.serve.url_base_pathname or "/"
    print(f"CLL TME Atlas explorer: http://{host}:{port}{base}  (Ctrl+C to stop)", flush=True)
    app.run(host=host, port=port, debug=False)
