"""WSGI entry point: ``server`` (Flask) for gunicorn, e.g.::

    TME_ATLAS_ATLAS=/data/atlas gunicorn -c app/gunicorn_conf.py app.wsgi:server

The atlas directory comes from ``$TME_ATLAS_ATLAS``; settings from ``load_config()``
(``$TME_ATLAS_CONFIG`` file and ``TME_ATLAS__SECTION__FIELD`` variables). The app is built
on first access of ``server`` / ``app`` (importing this module opens nothing).
"""

from __future__ import annotations

from typing import Any

from .registry import ENV_ATLAS, AtlasRegistry

__all__ = ["ENV_ATLAS", "get_app", "get_server"]

_APP: Any = None


def get_app():
    """The Dash explorer of the default atlas (``$TME_ATLAS_ATLAS``, else the first of
    ``serve.atlases``), resolved by :meth:`app.registry.AtlasRegistry.from_config` like
    everything gunicorn serves."""
    global _APP
    if _APP is None:
        from atlas.config import load_config

        from .factory import create_app

        config = load_config()
        registry = AtlasRegistry.from_config(config)
        _APP = create_app(registry.path(), config, name=registry.default)
    return _APP


_SERVER: Any = None


def get_server():
    """What gunicorn serves: :class:`app.registry.AtlasDispatcher` (hosting).

    One atlas at ``/`` or several by name (``serve.atlases``), each explorer created
    lazily in the worker; a missing atlas gives a 503 page and /healthz 503, not a worker
    that fails to boot (a crash loop).
    """
    global _SERVER
    if _SERVER is None:
        from .registry import build_wsgi

        _SERVER = build_wsgi()
    return _SERVER


def __getattr__(name: str):  # PEP 562: `from app.wsgi import server` builds the app
    if name == "server":
        return get_server()
    if name == "app":
        return get_app()
    raise AttributeError(name)
