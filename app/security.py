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

Errors escaping a request answer the ``http_status`` of their class in the one error
hierarchy (:mod:`atlas.errors`); only a ``public`` error's message is shown. Everything a
user sends is checked against the atlas's known values before use (the one validator,
:func:`atlas.errors.check_choice`); nothing a user sends reaches the file system or an
interpreter.
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from atlas.errors import AtlasError

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

ERROR_TEXT = {
    400: "Bad request.",
    401: "Login required.",
    403: "Forbidden.",
    404: "Not found.",
    405: "Method not allowed.",
    413: "Request too large.",
    415: "Unsupported media type.",
    429: "Too many attempts; wait a little and try again.",
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


# hashes checked for unknown users, one per hash method (``scrypt:32768:8:1``,
# ``pbkdf2:sha256:600000``, ...): an unknown name costs what a wrong password costs
_DUMMY_HASHES: dict[str, str] = {}
_DUMMY_LOCK = threading.Lock()


def _dummy_hash(method: str | None = None) -> str:
    from werkzeug.security import generate_password_hash

    key = method or "default"
    with _DUMMY_LOCK:
        if key not in _DUMMY_HASHES:
            pw = os.urandom(16).hex()
            try:
                h = generate_password_hash(pw, method=method) if method else hash_password(pw)
            except (ValueError, TypeError):  # an unknown method: the default one
                h = hash_password(pw)
            _DUMMY_HASHES[key] = h
        return _DUMMY_HASHES[key]


def _hash_method(stored: str) -> str:
    """``scrypt:32768:8:1`` of ``scrypt:32768:8:1$salt$hash``."""
    return stored.split("$", 1)[0]


class LoginThrottle:
    """Failed logins per username and per client address, with exponential backoff.

    The first :attr:`free` failures of a key cost nothing; after that the key is refused
    (HTTP 429, no password hash computed) for ``2 ** (failures - free)`` seconds after its
    last failure, at most :attr:`max_delay`. A success clears the username's count; keys
    are forgotten :attr:`forget` seconds after their last failure. Counted per worker
    process (gunicorn: each worker keeps its own counts).
    """

    free = 5
    max_delay = 300.0
    forget = 900.0
    max_keys = 10_000

    def __init__(self, clock: Callable[[], float] | None = None):
        import time

        self._clock = clock or time.monotonic
        self._fail: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()
        self._lock = threading.Lock()

    def _delay(self, n: int) -> float:
        return 0.0 if n < self.free else min(self.max_delay, 2.0 ** (n - self.free))

    def retry_after(self, *keys: tuple[str, str]) -> float:
        """Seconds until ``keys`` may try again (0: now)."""
        now = self._clock()
        wait = 0.0
        with self._lock:
            for k in keys:
                n, last = self._fail.get(k, (0, 0.0))
                if n and now - last > self.forget:
                    self._fail.pop(k, None)
                    continue
                wait = max(wait, last + self._delay(n) - now) if n >= self.free else wait
        return max(0.0, wait)

    def failed(self, *keys: tuple[str, str]) -> None:
        now = self._clock()
        with self._lock:
            for k in keys:
                n, _ = self._fail.pop(k, (0, 0.0))
                self._fail[k] = (n + 1, now)
            while len(self._fail) > self.max_keys:
                self._fail.popitem(last=False)

    def succeeded(self, *keys: tuple[str, str]) -> None:
        with self._lock:
            for k in keys:
                self._fail.pop(k, None)


class PasswordChecker:
    """Checks ``(username, password)`` against werkzeug hashes, with a small success cache
    and a :class:`LoginThrottle`.

    A scrypt check costs ~50-100 ms of CPU; the browser resends Basic credentials with every
    request (dozens per page), so verified credentials are remembered per process, keyed
    by an HMAC with a random per-process key (no password is kept in memory). An unknown
    username is checked against a dummy hash made with the configured users' own hash
    method, so that it takes as long as a wrong password.
    """

    def __init__(self, users: Mapping[str, str], cache_size: int = 256):
        self.users = dict(users)
        self._key = os.urandom(32)
        self._ok: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        self._size = cache_size
        self.throttle = LoginThrottle()
        methods = [_hash_method(h) for h in self.users.values() if isinstance(h, str)]
        # the most used method of the configured users (ties: the first configured)
        self._unknown_method = max(methods, key=methods.count) if methods else None

    def __call__(self, username: str, password: str) -> bool:
        return self.check(username, password)[0] == "ok"

    def check(self, username: str, password: str, client: str = "") -> tuple[str, float]:
        """``("ok" | "bad" | "throttled", retry_after_seconds)``."""
        from werkzeug.security import check_password_hash

        stored = self.users.get(username)
        digest = hmac.new(
            self._key, f"{username}\0{password}\0{stored}".encode(), hashlib.sha256
        ).digest()
        with self._lock:
            if stored is not None and digest in self._ok:
                self._ok.move_to_end(digest)
                return "ok", 0.0
        keys = [("user", username)] + ([("client", client)] if client else [])
        wait = self.throttle.retry_after(*keys)
        if wait > 0:
            return "throttled", wait
        try:
            ok = check_password_hash(
                stored if stored is not None else _dummy_hash(self._unknown_method), password
            )
        except (ValueError, TypeError):  # a malformed hash in the config
            log.error("auth: the password hash of user %s is malformed", safe_log_value(username))
            ok = False
        ok = ok and stored is not None
        if ok:
            self.throttle.succeeded(*keys)
            with self._lock:
                self._ok[digest] = None
                while len(self._ok) > self._size:
                    self._ok.popitem(last=False)
            return "ok", 0.0
        self.throttle.failed(*keys)
        log.warning(
            "auth: failed login for user %s from %s",
            safe_log_value(username),
            safe_log_value(client or "-"),
        )
        return "bad", 0.0


# ------------------------------------------------------------------------ log fields
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}
_CONTROL.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def safe_log_value(value: Any, limit: int = 200) -> str:
    """``value`` for a log line: control characters (newlines included) escaped, so that a
    user-supplied value cannot start a forged line; at most ``limit`` characters."""
    s = value if isinstance(value, str) else str(value)
    s = s.translate(_CONTROL)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _sanitising_record_factory(base):
    def factory(*args, **kwargs):
        record = base(*args, **kwargs)
        if record.name.startswith(("tme_atlas", "gunicorn", "werkzeug")) and record.args:
            if isinstance(record.args, tuple):
                record.args = tuple(
                    safe_log_value(a, 2000) if isinstance(a, str) else a for a in record.args
                )
        return record

    factory._tme_sanitising = True  # type: ignore[attr-defined]
    return factory


def install_log_sanitizer() -> None:
    """Escape control characters in the string arguments of every log record of the
    project, gunicorn and werkzeug (idempotent)."""
    base = logging.getLogRecordFactory()
    if not getattr(base, "_tme_sanitising", False):
        logging.setLogRecordFactory(_sanitising_record_factory(base))


try:  # gunicorn's access log: the same escaping for every atom (user, path, headers)
    from gunicorn.glogging import Logger as _GunicornLogger
except ImportError:  # pragma: no cover - gunicorn is a dependency
    _GunicornLogger = object  # type: ignore[assignment,misc]


class SafeGunicornLogger(_GunicornLogger):  # type: ignore[misc,valid-type]
    """gunicorn's logger with every access-log field passed through :func:`safe_log_value`
    (gunicorn writes the Basic-auth username as it was sent, newlines included)."""

    def atoms(self, resp, req, environ, request_time):
        atoms = super().atoms(resp, req, environ, request_time)
        return {k: safe_log_value(v, 2000) if isinstance(v, str) else v for k, v in atoms.items()}


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

    checker = PasswordChecker(users)

    class _HashedBasicAuth(dash_auth.BasicAuth):
        def _protect(self) -> None:  # replaces dash_auth's hook (it 500s on bad bodies)
            self.app.server.before_request(_login_hook(checker, realm))

    _HashedBasicAuth(app, auth_func=checker)
    return checker


def install_flask_basic_auth(
    server: Any, users: Mapping[str, str], realm: str = "CLL TME Atlas"
) -> Callable[[str, str], bool]:
    """The same Basic authentication for a plain Flask ``server`` (no Dash app)."""
    checker = PasswordChecker(users)
    server.before_request(_login_hook(checker, realm))
    return checker


def _login_hook(checker: PasswordChecker, realm: str) -> Callable[[], Any]:
    """The ``before_request`` hook of both: 401 without valid credentials, 429 with a
    ``Retry-After`` while the user or the client address is throttled."""
    import math

    import flask

    def _require_login():
        if flask.request.path == HEALTH_PATH:
            return None
        creds = _parse_basic(flask.request.headers.get("Authorization"))
        status, wait = "bad", 0.0
        if creds is not None:
            status, wait = checker.check(*creds, client=flask.request.remote_addr or "")
        if status == "ok":
            return None
        if status == "throttled":
            return flask.Response(
                ERROR_TEXT[429] + "\n",
                status=429,
                mimetype="text/plain",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        return flask.Response(
            ERROR_TEXT[401] + "\n",
            status=401,
            mimetype="text/plain",
            headers={"WWW-Authenticate": f'Basic realm="{realm}", charset="UTF-8"'},
        )

    return _require_login


# ------------------------------------------------------------------------ the hook
def _plain(status: int, text: str | None = None):
    import flask

    body = (text or ERROR_TEXT.get(status) or "Error.") + "\n"
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
    # Flask defines the key (as None): set it, do not setdefault it. Bigger bodies: 413.
    limits = getattr(config, "limits", None)
    server.config["MAX_CONTENT_LENGTH"] = int(
        getattr(limits, "max_request_bytes", DEFAULT_MAX_REQUEST_BYTES)
    )
    install_log_sanitizer()

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
        status, text = http_status(e)
        if status < 500:  # the user's request: a validator's message, an unknown asset
            return _plain(status, text)
        log.error(
            "%s %s failed: %s",
            flask.request.method,
            flask.request.path,
            e.__class__.__name__,
            exc_info=status == 500,  # 503: the atlas is unavailable (logged by the registry)
        )
        return _plain(status, text)

    def _healthz():
        # the status only: no atlas names, paths, sizes or process ids to the public
        ok = True if health is None else _safe_health(health)[0]
        resp = flask.jsonify({"status": "ok" if ok else "unavailable"})
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
        unknown = [u for u in getattr(auth, "editors", []) if u not in auth.users]
        if unknown:
            raise ValueError(
                f"auth.editors: {', '.join(sorted(map(str, unknown)))} not in auth.users"
            )
        if app is None:  # a plain Flask app (e.g. the atlas index): the same check
            install_flask_basic_auth(server, auth.users)
        else:
            install_basic_auth(app, auth.users)
    if app is not None:  # after the login check: no callback-name oracle without a login
        server.before_request(_callback_body_check(app))
    if not (auth is not None and auth.enabled):
        serve = getattr(config, "serve", None)
        host = getattr(serve, "host", "127.0.0.1")
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning(
                "serving on %s without password protection (auth.enabled is false); "
                "enable it for unpublished data",
                host,
            )


DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
CALLBACK_PATH = "_dash-update-component"


def _callback_body_check(app: Any) -> Callable[[], Any]:
    """A ``before_request`` hook: a Dash callback request whose body is not a JSON object
    naming a callback of this app, with a list of inputs, is a 400 (no traceback, one log
    line) before Dash sees it."""
    import flask

    def _check():
        req = flask.request
        if req.method != "POST" or not req.path.endswith("/" + CALLBACK_PATH):
            return None
        body = req.get_json(silent=True)  # over MAX_CONTENT_LENGTH: 413 from werkzeug
        problem = None
        if not isinstance(body, dict):
            problem = "not a JSON object"
        elif not isinstance(body.get("output"), str):
            problem = "no output"
        elif body["output"] not in app.callback_map:
            problem = "unknown callback"
        elif not isinstance(body.get("inputs"), list) or not isinstance(
            body.get("state", []), list
        ):
            problem = "inputs/state not lists"
        else:
            cb = app.callback_map[body["output"]]
            if len(body["inputs"]) != len(cb.get("inputs", [])) or len(
                body.get("state", [])
            ) != len(cb.get("state", [])):
                problem = "inputs/state do not match the callback"
        if problem is None:
            return None
        log.warning("callback request refused (400): %s", problem)
        return _plain(400)

    return _check


def http_status(e: BaseException) -> tuple[int, str | None]:
    """``(status, text)`` for an error that escaped a request: an
    :class:`~atlas.errors.AtlasError` answers its class's ``http_status`` (with its message
    only when the class is ``public``), Dash's unknown-asset error 404, anything else 500."""
    if isinstance(e, AtlasError):
        return e.http_status, (str(e) if e.public else None)
    try:
        from dash.exceptions import DependencyException
    except ImportError:  # pragma: no cover
        DependencyException = ()  # noqa: N806
    if isinstance(e, DependencyException):
        return 404, None
    return 500, None


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
