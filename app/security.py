"""Security hooks of the explorer: headers, error pages, health check, password access.

``install_security(server, config, app=None)`` is called once by :func:`app.factory.create_app`
on the Flask server under the Dash app. It

* adds security headers to every response (``X-Content-Type-Options: nosniff``,
  ``X-Frame-Options: DENY``, ``Referrer-Policy``, a Content-Security-Policy that Dash and
  plotly.js work with, ``Cross-Origin-Opener-Policy``, ``Permissions-Policy``);
* replaces Flask's error pages with plain ones that never carry a traceback, a path or an
  exception message (the details go to the server log only);
* adds ``GET /healthz`` (public, cheap: 200 when the atlas registry can serve, else 503);
* with ``config.auth.enabled`` puts HTTP Basic authentication in front of every route
  except ``/healthz``. Passwords are checked against werkzeug hashes kept in
  ``config.auth.users`` (username -> hash); make a hash with
  ``python -m app.security hash-password``. Basic credentials travel in a header, never in
  the URL, and are only safe behind TLS: host behind a reverse proxy that terminates HTTPS.

It also holds small validators for user-supplied values (gene names, ids, categories):
everything a user sends is checked against the atlas's known values before use; nothing
a user sends reaches the file system or an interpreter.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import getpass
import hashlib
import hmac
import logging
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

log = logging.getLogger("tme_atlas.app.security")

HEALTH_PATH = "/healthz"

# Every inline <script> Dash renders is either JSON data (type="application/json", not
# executed, so outside CSP) or the one-line renderer bootstrap, allowed by its hash
# (``app.csp_hashes()``). 'unsafe-eval' is needed by plotly.js: WebGL traces (scattergl,
# used for >10k cells) compile their shaders with regl, which builds functions with
# ``new Function``; without it those figures stay blank and the console shows CSP errors
# (checked in tests/test_security.py::test_csp_no_violations_in_chromium).
# Inline styles are needed by React/Dash components and plotly.js.
CSP_BASE: dict[str, list[str]] = {
    "default-src": ["'self'"],
    "script-src": ["'self'", "'unsafe-eval'"],
    "style-src": ["'self'", "'unsafe-inline'"],
    "img-src": ["'self'", "data:", "blob:"],
    "font-src": ["'self'", "data:"],
    "connect-src": ["'self'"],
    "worker-src": ["'self'", "blob:"],
    "object-src": ["'none'"],
    "base-uri": ["'self'"],
    "form-action": ["'self'"],
    "frame-ancestors": ["'none'"],
}

STATIC_HEADERS: dict[str, str] = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}

_ERROR_TEXT = {
    400: "Bad request.",
    401: "Login required.",
    403: "Forbidden.",
    404: "Not found.",
    405: "Method not allowed.",
    413: "Request too large.",
    415: "Unsupported media type.",
    500: "Internal server error. The problem has been logged; please try again or "
    "contact the site administrator.",
    503: "Service unavailable: the atlas cannot be read right now. Please try again later "
    "or contact the site administrator.",
}


# ------------------------------------------------------------------------ CSP and headers
def content_security_policy(app: Any | None = None, extra: Mapping[str, Iterable[str]] = ()) -> str:
    """The CSP header value; with a Dash ``app`` its inline-script hashes are allowed."""
    directives = {k: list(v) for k, v in CSP_BASE.items()}
    if app is not None and hasattr(app, "csp_hashes"):
        try:
            directives["script-src"].extend(app.csp_hashes())
        except Exception:  # pragma: no cover - hashing needs the app's index
            log.warning("could not compute the Dash inline-script hashes for the CSP")
    for k, v in dict(extra).items():
        directives.setdefault(k, []).extend(v)
    return "; ".join(f"{k} {' '.join(v)}" for k, v in directives.items())


# ------------------------------------------------------------------------ passwords
def hash_password(password: str) -> str:
    """A werkzeug password hash (scrypt) for ``config.auth.users``."""
    from werkzeug.security import generate_password_hash

    if not password:
        raise ValueError("empty password")
    return generate_password_hash(password)


# a fixed hash checked for unknown users so that timing does not reveal valid names
_DUMMY_HASH: str | None = None


def _dummy_hash() -> str:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password(os.urandom(16).hex())
    return _DUMMY_HASH


class PasswordChecker:
    """Checks ``(username, password)`` against werkzeug hashes, with a small success cache.

    A scrypt check costs ~50 ms of CPU; the browser resends Basic credentials with every
    request (dozens per page), so verified credentials are remembered per process, keyed
    by an HMAC with a random per-process key (no password is kept in memory).
    """

    def __init__(self, users: Mapping[str, str], cache_size: int = 256):
        self.users = dict(users)
        self._key = os.urandom(32)
        self._ok: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        self._size = cache_size

    def __call__(self, username: str, password: str) -> bool:
        from werkzeug.security import check_password_hash

        stored = self.users.get(username)
        digest = hmac.new(
            self._key, f"{username}\0{password}\0{stored}".encode(), hashlib.sha256
        ).digest()
        with self._lock:
            if stored is not None and digest in self._ok:
                self._ok.move_to_end(digest)
                return True
        try:
            ok = check_password_hash(stored or _dummy_hash(), password)
        except (ValueError, TypeError):  # a malformed hash in the config
            log.error("auth: the password hash of user %r is malformed", username)
            ok = False
        ok = ok and stored is not None
        if ok:
            with self._lock:
                self._ok[digest] = None
                while len(self._ok) > self._size:
                    self._ok.popitem(last=False)
        return ok


def _parse_basic(header: str | None) -> tuple[str, str] | None:
    if not header or not header.startswith("Basic "):
        return None
    try:
        raw = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    if ":" not in raw:
        return None
    user, _, password = raw.partition(":")
    return user, password


def install_basic_auth(
    app: Any, users: Mapping[str, str], realm: str = "CLL TME Atlas"
) -> Callable[[str, str], bool]:
    """HTTP Basic authentication on every route of the Dash ``app`` except ``/healthz``.

    Built on ``dash_auth.BasicAuth`` with an auth function (werkzeug hashes); its request
    hook is replaced by a stricter one: no public callbacks, malformed headers or bodies
    are a 401, never a 500.
    """
    import dash_auth
    import flask

    checker = PasswordChecker(users)

    class _HashedBasicAuth(dash_auth.BasicAuth):
        def _protect(self) -> None:  # replaces dash_auth's hook (it 500s on bad bodies)
            server = self.app.server

            @server.before_request
            def _require_login():
                if flask.request.path == HEALTH_PATH:
                    return None
                if self.is_authorized():
                    return None
                return self.login_request()

        def is_authorized(self) -> bool:
            creds = _parse_basic(flask.request.headers.get("Authorization"))
            if creds is None:
                return False
            return bool(checker(*creds))

        def login_request(self):
            return flask.Response(
                _ERROR_TEXT[401] + "\n",
                status=401,
                mimetype="text/plain",
                headers={"WWW-Authenticate": f'Basic realm="{realm}", charset="UTF-8"'},
            )

    _HashedBasicAuth(app, auth_func=checker)
    return checker


def install_flask_basic_auth(
    server: Any, users: Mapping[str, str], realm: str = "CLL TME Atlas"
) -> Callable[[str, str], bool]:
    """The same Basic authentication for a plain Flask ``server`` (no Dash app)."""
    import flask

    checker = PasswordChecker(users)

    @server.before_request
    def _require_login():
        if flask.request.path == HEALTH_PATH:
            return None
        creds = _parse_basic(flask.request.headers.get("Authorization"))
        if creds is not None and checker(*creds):
            return None
        return flask.Response(
            _ERROR_TEXT[401] + "\n",
            status=401,
            mimetype="text/plain",
            headers={"WWW-Authenticate": f'Basic realm="{realm}", charset="UTF-8"'},
        )

    return checker


# ------------------------------------------------------------------------ the hook
def _plain(status: int, text: str | None = None):
    import flask

    body = (text or _ERROR_TEXT.get(status) or "Error.") + "\n"
    return flask.Response(body, status=status, mimetype="text/plain")


def install_security(
    server: Any,
    config: Any = None,
    app: Any = None,
    health: Callable[[], tuple[bool, dict]] | None = None,
) -> None:
    """Install headers, error pages, ``/healthz`` and (if configured) password access.

    ``server``: the Flask server (``app.server``); ``app``: the Dash app (for the CSP
    hashes and for authentication); ``health``: returns ``(ok, details)`` for /healthz
    (default: always ok). Idempotent per server.
    """
    import flask
    from werkzeug.exceptions import HTTPException

    if server.config.get("TME_SECURITY_INSTALLED"):
        return
    server.config["TME_SECURITY_INSTALLED"] = True
    # never serve debug pages or propagate exceptions to the WSGI server
    server.debug = False
    server.config["PROPAGATE_EXCEPTIONS"] = False
    server.config["TRAP_HTTP_EXCEPTIONS"] = False
    server.config.setdefault("MAX_CONTENT_LENGTH", 8 * 1024 * 1024)  # callback bodies are small

    csp_cache: dict[str, str] = {}

    def _csp() -> str:
        if "v" not in csp_cache:
            csp_cache["v"] = content_security_policy(app)
        return csp_cache["v"]

    @server.after_request
    def _security_headers(response):
        for k, v in STATIC_HEADERS.items():
            response.headers.setdefault(k, v)
        response.headers.setdefault("Content-Security-Policy", _csp())
        if flask.request.path == HEALTH_PATH or response.status_code >= 400:
            response.headers["Cache-Control"] = "no-store"
        return response

    @server.errorhandler(HTTPException)
    def _http_error(e):
        code = e.code or 500
        resp = _plain(code)
        if code == 405 and getattr(e, "valid_methods", None):
            resp.headers["Allow"] = ", ".join(e.valid_methods)
        return resp

    @server.errorhandler(Exception)
    def _any_error(e):
        kind = _classify(e)
        if kind == "not_found":  # e.g. Dash's DependencyException for an unknown asset path
            return _plain(404)
        if kind == "bad_value":  # a validator's message is safe to show
            return _plain(400, str(e))
        unavailable = kind == "unavailable"
        log.error(
            "%s %s failed: %s",
            flask.request.method,
            flask.request.path,
            e.__class__.__name__,
            exc_info=not unavailable,
        )
        return _plain(503 if unavailable else 500)

    def _healthz():
        ok, details = (True, {}) if health is None else _safe_health(health)
        body = {"status": "ok" if ok else "unavailable", **details}
        resp = flask.jsonify(body)
        resp.status_code = 200 if ok else 503
        return resp

    if health is not None or not any(r.rule == HEALTH_PATH for r in server.url_map.iter_rules()):
        # registered first wins in Flask: with a health function ours replaces the app's
        for rule in [r for r in server.url_map.iter_rules() if r.rule == HEALTH_PATH]:
            server.view_functions[rule.endpoint] = _healthz
        if not any(r.rule == HEALTH_PATH for r in server.url_map.iter_rules()):
            server.add_url_rule(
                HEALTH_PATH, "tme_security_healthz", _healthz, methods=["GET", "HEAD"]
            )

    auth = getattr(config, "auth", None)
    if auth is not None and auth.enabled:
        if not auth.users:
            raise ValueError(
                "auth.enabled is true but auth.users is empty: add users with hashes from "
                "`python -m app.security hash-password`"
            )
        bad = [u for u, h in auth.users.items() if not _looks_like_hash(h)]
        if bad:
            raise ValueError(
                f"auth.users: the password of {', '.join(sorted(bad))} is not a werkzeug hash "
                "(plain passwords are refused; use `python -m app.security hash-password`)"
            )
        if app is None:  # a plain Flask app (e.g. the atlas index): the same check
            install_flask_basic_auth(server, auth.users)
        else:
            install_basic_auth(app, auth.users)
    else:
        serve = getattr(config, "serve", None)
        host = getattr(serve, "host", "127.0.0.1")
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning(
                "serving on %s without password protection (auth.enabled is false); "
                "enable it for unpublished data",
                host,
            )


def _classify(e: BaseException) -> str:
    """'unavailable' (503), 'not_found' (404), 'bad_value' (400) or 'error' (500)."""
    from app.registry import AtlasUnavailableError, UnknownAtlasError

    if isinstance(e, AtlasUnavailableError):
        return "unavailable"
    try:  # the explorer's own "unknown value" error (its message is safe to show)
        from app.data import UnknownValue
    except ImportError:  # pragma: no cover
        UnknownValue = UnknownValueError  # noqa: N806
    if isinstance(e, (UnknownValueError, UnknownAtlasError, UnknownValue)):
        return "bad_value"
    try:
        from dash.exceptions import DependencyException
    except ImportError:  # pragma: no cover
        DependencyException = ()  # noqa: N806
    if isinstance(e, DependencyException):
        return "not_found"
    return "error"


def _safe_health(health: Callable[[], tuple[bool, dict]]) -> tuple[bool, dict]:
    try:
        return health()
    except Exception as e:  # noqa: BLE001 - health must answer, not raise
        log.error("health check failed: %s", e.__class__.__name__)
        return False, {}


def _looks_like_hash(value: str) -> bool:
    return (
        isinstance(value, str) and value.split(":", 1)[0] in ("scrypt", "pbkdf2") and ("$" in value)
    )


# ------------------------------------------------------------------------ validators
class UnknownValueError(ValueError):
    """A user-supplied value is not one of the atlas's known values (message is safe)."""


def _clip(value: Any, n: int = 40) -> str:
    s = str(value)
    s = "".join(ch if ch.isprintable() else "?" for ch in s)
    return s if len(s) <= n else s[: n - 1] + "…"


def validate_choice(value: Any, allowed: Collection[str], what: str = "value") -> str:
    """``value`` if it is one of ``allowed``; else :class:`UnknownValueError` (safe text)."""
    if isinstance(value, str) and value in allowed:
        return value
    raise UnknownValueError(f"unknown {what}: {_clip(value)!r}")


def validate_choices(
    values: Any, allowed: Collection[str], what: str = "value", limit: int | None = None
) -> list[str]:
    """A de-duplicated list of known values; unknown ones or too many raise a safe error."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, Sequence):
        raise UnknownValueError(f"invalid {what} list")
    out: list[str] = []
    unknown: list[str] = []
    for v in values:
        if isinstance(v, str) and v in allowed:
            if v not in out:
                out.append(v)
        else:
            unknown.append(_clip(v))
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise UnknownValueError(f"unknown {what}: {shown}{more}")
    if limit is not None and len(out) > limit:
        raise UnknownValueError(f"too many {what}s: {len(out)} (at most {limit} per request)")
    return out


# ------------------------------------------------------------------------ CLI
def _cli(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m app.security",
        description="Helpers for password-protecting the CLL TME Atlas explorer.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser(
        "hash-password",
        help="print a werkzeug hash for auth.users (reads the password from the terminal, "
        "or one line from stdin when piped)",
    )
    h.add_argument("--user", help="also print a YAML line 'USER: HASH'")
    args = p.parse_args(argv)
    if args.cmd == "hash-password":
        if sys.stdin.isatty():
            pw = getpass.getpass("password: ")
            if pw != getpass.getpass("again: "):
                print("error: the passwords differ", file=sys.stderr)
                return 2
        else:
            pw = sys.stdin.readline().rstrip("\r\n")
        if not pw:
            print("error: empty password", file=sys.stderr)
            return 2
        h_ = hash_password(pw)
        print(f'{args.user}: "{h_}"' if args.user else h_)
        return 0
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(_cli())
