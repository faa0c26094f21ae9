"""Security of the explorer: headers, CSP, error pages, password access, no unpickling."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app import security
from app.security import (
    HEALTH_PATH,
    PasswordChecker,
    content_security_policy,
    hash_password,
    install_security,
)
from atlas import errors
from atlas.errors import UnknownValueError
from atlas.errors import check_choice as validate_choice
from atlas.errors import check_choices as validate_choices

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers
def _config(**sections):
    from atlas.config import load_config

    return load_config(env={}, overrides=sections)


def _dash_app(config=None, *, health=None, scattergl: bool = False):
    """A small Dash app with a failing route and callbacks, secured like the explorer."""
    import dash
    import numpy as np
    import plotly.graph_objects as go
    from dash import Input, Output, dcc, html

    app = dash.Dash(__name__)
    app.layout = html.Div(
        [
            dcc.Dropdown(["CD19", "CD3E"], "CD19", id="gene"),
            dcc.Graph(id="umap"),
            dcc.Graph(id="violin"),
            html.Button("boom", id="boom"),
            html.Div(id="out"),
        ]
    )

    @app.callback(Output("umap", "figure"), Output("violin", "figure"), Input("gene", "value"))
    def _figs(gene):
        rng = np.random.default_rng(0)
        n = 15000 if scattergl else 200
        trace = go.Scattergl if scattergl else go.Scatter
        x = rng.normal(size=n)
        return (
            go.Figure(trace(x=x, y=rng.normal(size=n), mode="markers")),
            go.Figure(go.Violin(y=x[:300], name=gene)),
        )

    @app.callback(Output("out", "children"), Input("boom", "n_clicks"), prevent_initial_call=True)
    def _boom(n):
        raise RuntimeError("secret /srv/patients/CLL-007 path in the message")

    @app.server.route("/_test_fail")
    def _fail():
        raise KeyError("/srv/patients/secret.h5ad")

    install_security(app.server, config or _config(), app=app, health=health)
    return app


def _basic(user: str, password: str) -> dict:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


# ----------------------------------------------------------------------------- headers
def test_security_headers_on_pages_and_callbacks():
    app = _dash_app()
    c = app.server.test_client()
    for path in ("/", "/_dash-layout", "/_dash-dependencies", HEALTH_PATH, "/nope/../etc"):
        r = c.get(path)
        assert r.headers["X-Content-Type-Options"] == "nosniff", path
        assert r.headers["X-Frame-Options"] == "DENY", path
        assert r.headers["Referrer-Policy"] == "no-referrer", path
        csp = r.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp
        assert "default-src 'self'" in csp
        assert "object-src 'none'" in csp
    # the renderer's inline bootstrap is allowed by hash, not by 'unsafe-inline'
    script_src = re.search(r"script-src ([^;]+)", csp).group(1)
    assert "'unsafe-inline'" not in script_src
    assert any(h in script_src for h in app.csp_hashes())


def test_csp_string_shape():
    csp = content_security_policy()
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["connect-src"] == "'self'"  # callbacks only to this origin
    assert "http:" not in csp and "https:" not in csp and "*" not in csp


def test_no_debug_and_no_traceback_in_500():
    app = _dash_app()
    assert app.server.debug is False
    c = app.server.test_client()
    r = c.get("/_test_fail")
    assert r.status_code == 500
    body = r.get_data(as_text=True)
    assert r.mimetype == "text/plain"
    assert "Traceback" not in body and "secret" not in body and "KeyError" not in body
    assert "Internal server error" in body


def test_failing_callback_gives_plain_500():
    app = _dash_app()
    c = app.server.test_client()
    payload = {
        "output": "out.children",
        "outputs": {"id": "out", "property": "children"},
        "inputs": [{"id": "boom", "property": "n_clicks", "value": 1}],
        "changedPropIds": ["boom.n_clicks"],
        "state": [],
    }
    r = c.post("/_dash-update-component", json=payload)
    assert r.status_code == 500
    body = r.get_data(as_text=True)
    assert "Traceback" not in body and "secret" not in body and "RuntimeError" not in body


@pytest.mark.parametrize(
    "body, ctype",
    [
        (b"not json", "application/json"),
        (b"{}", "application/json"),
        (b'{"output": 1}', "application/json"),
        (b"\xff\xfe\x00garbage", "application/json"),
        (b"x=1", "application/x-www-form-urlencoded"),
    ],
)
def test_malformed_callback_bodies_never_leak(body, ctype):
    app = _dash_app()
    r = app.server.test_client().post("/_dash-update-component", data=body, content_type=ctype)
    text = r.get_data(as_text=True)
    assert r.status_code in (400, 415, 500)
    assert "Traceback" not in text and 'File "' not in text


def test_unknown_path_and_method():
    app = _dash_app()
    c = app.server.test_client()
    r = c.delete("/_dash-layout")
    assert r.status_code == 405 and "Traceback" not in r.get_data(as_text=True)
    r = c.get("/_dash-component-suites/../../etc/passwd")
    assert r.status_code in (400, 404)
    assert "root:" not in r.get_data(as_text=True)


def test_request_size_limit():
    app = _dash_app()
    r = app.server.test_client().post(
        "/_dash-update-component", data=b"x" * (9 * 1024 * 1024), content_type="application/json"
    )
    assert r.status_code in (400, 413)


def test_healthz():
    app = _dash_app(health=lambda: (True, {"default": "demo"}))
    r = app.server.test_client().get(HEALTH_PATH)
    assert r.status_code == 200 and r.get_json()["status"] == "ok"
    assert r.headers["Cache-Control"] == "no-store"

    def broken():
        raise OSError("/srv/secret")

    app = _dash_app(health=broken)
    r = app.server.test_client().get(HEALTH_PATH)
    assert r.status_code == 503 and "secret" not in r.get_data(as_text=True)


# ----------------------------------------------------------------------------- passwords
USERS = {"alice": hash_password("correct horse"), "bob": hash_password("b0b!")}


def _auth_app():
    return _dash_app(_config(auth={"enabled": True, "users": USERS}))


def test_auth_off_by_default():
    assert _config().auth.enabled is False
    app = _dash_app()
    assert app.server.test_client().get("/").status_code == 200


def test_auth_required_everywhere_but_healthz():
    app = _auth_app()
    c = app.server.test_client()
    for path in ("/", "/_dash-layout", "/_dash-dependencies", "/_dash-component-suites/x.js"):
        r = c.get(path)
        assert r.status_code == 401, path
        assert r.headers["WWW-Authenticate"].startswith("Basic ")
        assert r.headers["X-Frame-Options"] == "DENY"
    assert c.get(HEALTH_PATH).status_code == 200
    assert c.get("/", headers=_basic("alice", "correct horse")).status_code == 200
    assert c.get("/_dash-layout", headers=_basic("bob", "b0b!")).status_code == 200
    assert c.get("/", headers=_basic("alice", "b0b!")).status_code == 401
    assert c.get("/", headers=_basic("mallory", "x")).status_code == 401
    assert c.get("/", headers=_basic("alice", "")).status_code == 401
    # credentials in the URL are ignored
    assert c.get("/?user=alice&password=correct+horse").status_code == 401


@pytest.mark.parametrize(
    "header",
    [
        "Basic",
        "Basic ",
        "Basic !!!notbase64",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),
        "Bearer abc",
        "basic " + base64.b64encode(b"alice:correct horse").decode(),
    ],
)
def test_malformed_auth_headers_are_401_not_500(header):
    app = _auth_app()
    c = app.server.test_client()
    assert c.get("/", headers={"Authorization": header}).status_code == 401
    r = c.post(
        "/_dash-update-component",
        data=b"not json",
        content_type="application/json",
        headers={"Authorization": header},
    )
    assert r.status_code == 401


def _gene_callback() -> dict:
    """The body of the Genes page's gene-switch callback (UMAP + violin) for CD19."""
    return {
        "output": "..umap.figure...violin.figure..",
        "outputs": [{"id": "umap", "property": "figure"}, {"id": "violin", "property": "figure"}],
        "inputs": [{"id": "gene", "property": "value", "value": "CD19"}],
        "changedPropIds": ["gene.value"],
        "state": [],
    }


def test_callbacks_need_auth():
    app = _auth_app()
    c = app.server.test_client()
    payload = _gene_callback()
    assert c.post("/_dash-update-component", json=payload).status_code == 401
    ok = c.post("/_dash-update-component", json=payload, headers=_basic("alice", "correct horse"))
    assert ok.status_code == 200


def test_auth_config_refuses_plain_or_missing_passwords():
    with pytest.raises(ValueError, match="not a werkzeug hash"):
        _dash_app(_config(auth={"enabled": True, "users": {"alice": "hunter2"}}))
    with pytest.raises(ValueError, match="users is empty"):
        _dash_app(_config(auth={"enabled": True}))


def test_auth_config_from_environment(tmp_path, monkeypatch):
    """The documented way: users (hashes) in a config file, switched on by a variable."""
    from atlas.config import load_config

    cfg = tmp_path / "atlas.yaml"
    cfg.write_text(f'auth:\n  users:\n    alice: "{USERS["alice"]}"\n')
    config = load_config(env={"TME_ATLAS_CONFIG": str(cfg), "TME_ATLAS__AUTH__ENABLED": "true"})
    app = _dash_app(config)
    c = app.server.test_client()
    assert c.get("/").status_code == 401
    assert c.get("/", headers=_basic("alice", "correct horse")).status_code == 200


def test_password_checker_caches_only_successes():
    checker = PasswordChecker(USERS)
    t0 = time.perf_counter()
    assert checker("alice", "correct horse")
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(50):
        assert checker("alice", "correct horse")
    cached = (time.perf_counter() - t0) / 50
    assert cached < first / 5
    assert not checker("alice", "wrong")
    assert not checker("alice", "wrong")
    assert not checker("nobody", "correct horse")
    # a user removed from the config is refused even if once cached
    checker.users.pop("alice")
    assert not checker("alice", "correct horse")


def test_hash_password_cli():
    from werkzeug.security import check_password_hash

    r = subprocess.run(
        [sys.executable, "-m", "app.security", "hash-password"],
        input="s3cret pass\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    h = r.stdout.strip()
    assert h.startswith(("scrypt:", "pbkdf2:")) and "s3cret" not in h
    assert check_password_hash(h, "s3cret pass")
    r = subprocess.run(
        [sys.executable, "-m", "app.security", "hash-password", "--user", "carol"],
        input="pw\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert r.returncode == 0 and r.stdout.startswith('carol: "scrypt:')
    r = subprocess.run(
        [sys.executable, "-m", "app.security", "hash-password"],
        input="\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: empty password")


# ----------------------------------------------------------------------------- validators
def test_validators():
    genes = {"CD19", "CD3E", "MS4A1"}
    assert validate_choice("CD19", genes, "gene") == "CD19"
    for bad in ("../../etc/passwd", "CD19; rm -rf /", None, 3, ["CD19"], "__import__('os')"):
        with pytest.raises(UnknownValueError):
            validate_choice(bad, genes, "gene")
    assert validate_choices(["CD19", "CD19", "CD3E"], genes, "gene") == ["CD19", "CD3E"]
    assert validate_choices("CD19", genes) == ["CD19"]
    assert validate_choices(None, genes) == []
    with pytest.raises(TypeError):  # a wrong type: "no update" in the explorer, not a message
        validate_choices(-1, genes, "gene")
    with pytest.raises(UnknownValueError, match="unknown gene: 'NOPE'"):
        validate_choices(["CD19", "NOPE"], genes, "gene")
    with pytest.raises(UnknownValueError, match="too many genes"):
        validate_choices(["CD19", "CD3E", "MS4A1"], genes, "gene", limit=2)
    with pytest.raises(UnknownValueError) as e:
        validate_choice("x" * 10_000 + "\x00\n", genes, "gene")
    assert len(str(e.value)) < 80 and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- error -> status
def test_errors_answer_the_status_of_their_class():
    """One hierarchy: every error the project raises on purpose is an AtlasError whose class
    gives the HTTP status; only public messages reach the user."""
    import flask

    from atlas.config import ConfigError
    from atlas.schema import MissingKeyError
    from atlas.store import NotAnAtlasError, StoreCorruptError, UnknownGeneError

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert len(classes) >= 10 and all(issubclass(c, errors.AtlasError) for c in classes)
    assert issubclass(MissingKeyError, errors.AtlasError) and ConfigError is errors.ConfigError
    cases = {
        "/value": (UnknownValueError("unknown gene 'NOPE'"), 400, "unknown gene 'NOPE'"),
        "/gene": (UnknownGeneError("gene 'X' is not in the atlas"), 400, "gene 'X' is not"),
        "/atlas": (errors.UnknownAtlasError("unknown atlas 'z'"), 400, "unknown atlas"),
        "/input": (errors.InputError("sheet /srv/x.csv: bad"), 400, "Bad request."),
        "/gone": (errors.AtlasUnavailableError("/srv/atlas vanished"), 503, "Service unavail"),
        "/corrupt": (StoreCorruptError("/srv/atlas/store broken"), 503, "Service unavail"),
        "/notatlas": (NotAnAtlasError("/srv/x is not an atlas"), 503, "Service unavail"),
        "/key": (MissingKeyError("obs", "cell_type"), 500, "Internal server error"),
        "/config": (ConfigError("serve.port: bad"), 500, "Internal server error"),
        "/export": (errors.ExportRefused("3 exports per hour"), 429, "3 exports per hour"),
        "/other": (RuntimeError("/srv/secret"), 500, "Internal server error"),
    }
    server = flask.Flask("errors")
    for path, (exc, _, _) in cases.items():
        server.add_url_rule(path, path, lambda exc=exc: (_ for _ in ()).throw(exc))
    install_security(server, _config())
    client = server.test_client()
    for path, (_, status, text) in cases.items():
        r = client.get(path)
        body = r.get_data(as_text=True)
        assert r.status_code == status, path
        assert body.startswith(text), (path, body)
        assert "/srv" not in body and "Traceback" not in body


# ----------------------------------------------------------------------------- no unpickling
_FORBIDDEN = [
    (r"\bpickle\.loads?\(", "pickle.load"),
    (r"\bcloudpickle\.loads?\(", "cloudpickle.load"),
    (r"\bdill\.loads?\(", "dill.load"),
    (r"\bjoblib\.load\(", "joblib.load"),
    (r"\btorch\.load\(", "torch.load"),
    (r"\bread_pickle\(", "pandas.read_pickle"),
    (r"allow_pickle\s*=\s*True", "numpy allow_pickle=True"),
    (r"\byaml\.load\(", "yaml.load (use yaml.safe_load)"),
    (r"\byaml\.unsafe_load\(", "yaml.unsafe_load"),
    (r"(?<![\w.])eval\(", "eval"),
    (r"(?<![\w.])exec\(", "exec"),
    (r"\bos\.system\(", "os.system"),
    (r"shell\s*=\s*True", "subprocess shell=True"),
    (r"\bmarshal\.loads?\(", "marshal.load"),
    (r"\bshelve\.open\(", "shelve.open"),
]


def _sources():
    for pkg in ("preprocessing", "atlas", "app"):
        yield from sorted((REPO / pkg).rglob("*.py"))


def test_no_unpickling_or_interpreters_in_code():
    """Nothing is unpickled or evaluated: no user file or value reaches an interpreter."""
    hits = []
    for path in _sources():
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, what in _FORBIDDEN:
                if re.search(pattern, code):
                    hits.append(f"{path.relative_to(REPO)}:{i}: {what}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_scvi_models_loaded_only_from_the_build_output():
    """scVI's loader uses torch.load (pickle): it may only read the atlas's own model dir."""
    offenders = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        if re.search(r"\b(SCVI|SCANVI|scvi\.model\.\w+)\.load(_query_data)?\(", text):
            if "MODEL_DIR" not in text:
                offenders.append(str(path.relative_to(REPO)))
    assert not offenders, (
        f"scVI models loaded from a path not derived from schema.MODEL_DIR: {offenders}"
    )


# ----------------------------------------------------------------------------- browser
def _chrome():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("chromium/chromedriver not installed (make browser-deps)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:  # pragma: no cover
        pytest.skip("selenium not installed")
    opts = Options()
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--enable-unsafe-swiftshader",
        "--use-angle=swiftshader",
        "--window-size=1280,900",
    ):
        opts.add_argument(a)
    opts.binary_location = chromium
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(driver), options=opts)
    # collect CSP violations from the very first script on
    d.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument",
        {
            "source": "window.__csp = []; document.addEventListener('securitypolicyviolation', "
            "e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI + ' ' + "
            "e.sourceFile + ':' + e.lineNumber));"
        },
    )
    return d


def _serve_in_thread(wsgi_app):
    import logging

    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    srv = make_server("127.0.0.1", 0, wsgi_app, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_port}"


def csp_violations(url: str, wait_for: str, timeout: float = 30.0) -> tuple[list, list]:
    """Load ``url`` in headless Chromium; return (CSP violations, severe console lines)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    d = _chrome()
    try:
        d.get(url)
        WebDriverWait(d, timeout).until(EC.presence_of_element_located((By.CSS_SELECTOR, wait_for)))
        time.sleep(2.0)  # let async chunks (plotly.js, WebGL) load and draw
        violations = d.execute_script("return window.__csp || []")
        severe = [
            e["message"]
            for e in d.get_log("browser")
            if e["level"] == "SEVERE" and "favicon" not in e["message"]
        ]
        return violations, severe
    finally:
        d.quit()


@pytest.mark.browser
def test_csp_no_violations_in_chromium():
    """Dash 4 + plotly.js (incl. WebGL scattergl) run under the CSP with no violation."""
    app = _dash_app(scattergl=True)
    srv, url = _serve_in_thread(app.server)
    try:
        violations, severe = csp_violations(url + "/", "#umap .gl-container canvas")
    finally:
        srv.shutdown()
    assert violations == [], violations
    assert not [s for s in severe if "Content Security Policy" in s], severe


@pytest.mark.browser
def test_csp_without_unsafe_eval_breaks_webgl(monkeypatch):
    """Why 'unsafe-eval' is in the CSP: plotly's WebGL (regl) compiles code with eval."""
    monkeypatch.setitem(security.CSP_BASE, "script-src", ["'self'"])
    app = _dash_app(scattergl=True)
    srv, url = _serve_in_thread(app.server)
    try:
        violations, _ = csp_violations(url + "/", "#umap .gl-container canvas")
    finally:
        srv.shutdown()
    assert any(v.startswith("script-src") and "eval" in v for v in violations), violations


@pytest.mark.browser
def test_csp_no_violations_in_the_explorer(tmp_path_factory):
    """Every page of the real explorer (synthetic atlas) loads with no CSP violation."""
    testing = pytest.importorskip("atlas.testing")
    from app.registry import build_wsgi
    from atlas.config import load_config

    atlas_dir = tmp_path_factory.mktemp("csp") / "atlas"
    testing.make_synthetic_atlas(atlas_dir, n_cells=1500, n_genes=300, seed=0)
    wsgi = build_wsgi(load_config(env={}), atlas_dir)
    srv, url = _serve_in_thread(wsgi)
    try:
        for page in ("/", "/cells", "/genes", "/interactions", "/downloads"):
            violations, severe = csp_violations(url + page, ".js-plotly-plot, .dash-graph, h1")
            assert violations == [], (page, violations)
            assert not [s for s in severe if "Content Security Policy" in s], (page, severe)
    finally:
        srv.shutdown()


# ----------------------------------------------------------------------------- fuzzing
MALICIOUS = [
    "../../../../etc/passwd",
    "<script>alert(1)</script>",
    "__import__('os').system('id')",
    {"__class__": "x"},
    ["CD19"] * 5000,
    "A" * 100_000,
    -1,
    None,
]


@pytest.fixture(scope="module")
def explorer_client(tmp_path_factory):
    testing = pytest.importorskip("atlas.testing")
    from werkzeug.test import Client

    from app.registry import build_wsgi
    from atlas.config import load_config

    atlas_dir = tmp_path_factory.mktemp("fuzz") / "atlas"
    testing.make_synthetic_atlas(atlas_dir, n_cells=800, n_genes=200, seed=2)
    return Client(build_wsgi(load_config(env={}), atlas_dir))


def _payload(cb: dict, values: dict) -> dict:
    def parse(spec):
        if spec.startswith("..") and spec.endswith(".."):
            parts = spec[2:-2].split("...")
        else:
            parts = [spec]
        return [p.rpartition(".")[::2] for p in parts]

    outs = parse(cb["output"])
    multi = cb["output"].startswith("..")
    return {
        "output": cb["output"],
        "outputs": [{"id": i, "property": p} for i, p in outs]
        if multi
        else {"id": outs[0][0], "property": outs[0][1]},
        "inputs": [
            {"id": d["id"], "property": d["property"], "value": values.get(d["id"])}
            for d in cb["inputs"]
        ],
        "changedPropIds": [f"{d['id']}.{d['property']}" for d in cb["inputs"][:1]],
        "state": [
            {"id": d["id"], "property": d["property"], "value": values.get(d["id"])}
            for d in cb.get("state", [])
        ],
    }


# props a URL, a dropdown or a search box can carry: hostile *strings* there must never 5xx
USER_STRING_PROPS = {"value", "pathname", "search", "search_value"}


def test_callbacks_survive_malicious_values(explorer_client):
    """Every server callback, every input set to hostile values: never a traceback or a
    file's content, the server keeps serving; hostile strings in user-facing props are
    messages or 4xx, never a 5xx (validated against the atlas's values).

    Type-confused payloads (a dict where the renderer always sends a string, ...) that no
    browser sends may still answer a plain 500 (no details): listed, not failed."""
    c = explorer_client
    deps = [
        cb
        for cb in c.get("/_dash-dependencies").get_json()
        if not cb.get("clientside_function") and "{" not in cb["output"]
    ]
    assert deps
    failures, type_confused = [], []
    for cb in deps:
        props = {}
        for d in cb["inputs"] + cb.get("state", []):
            props.setdefault(d["id"], set()).add(d["property"])
        for target, tprops in props.items():
            for bad in MALICIOUS:
                r = c.post("/_dash-update-component", json=_payload(cb, {target: bad}))
                body = r.get_data(as_text=True)
                what = f"{cb['output'][:50]} {target}={str(bad)[:30]!r}: {r.status_code}"
                if "Traceback" in body or "root:x:0:0" in body or 'File "' in body:
                    failures.append("LEAK " + what)
                elif r.status_code >= 500:
                    user_string = (
                        bad is None or isinstance(bad, str)
                    ) and tprops <= USER_STRING_PROPS
                    (failures if user_string else type_confused).append(what)
    assert c.get("/healthz").status_code == 200
    if type_confused:
        print(f"{len(type_confused)} type-confused payloads answered 500 (plain):")
        print("\n".join(type_confused))
    assert not failures, "\n".join(failures[:40]) + f"\n({len(failures)} in all)"


@pytest.mark.parametrize(
    "search",
    [
        "?gene=../../etc/passwd",
        "?gene=%3Cscript%3Ealert(1)%3C/script%3E&condition=x,y",
        "?colour=__class__&split=1e309",
        "?" + "a=1&" * 3000,
        "?atlas=../../secret",
    ],
)
def test_pages_with_hostile_url_parameters(explorer_client, search):
    c = explorer_client
    router = c.get("/_dash-dependencies").get_json()[0]
    assert any(i["property"] == "pathname" for i in router["inputs"])
    for page in ("/", "/cells", "/genes", "/interactions", "/downloads"):
        payload = _payload(router, {"url": page})
        payload["inputs"] = [  # the URL path, and the Labels menu (a hostile value too)
            {"id": "url", "property": "pathname", "value": page},
            {"id": "labels-select", "property": "value", "value": search[:60]},
        ]
        payload["state"] = [{"id": "url", "property": "search", "value": search}]
        r = c.post("/_dash-update-component", json=payload)
        body = r.get_data(as_text=True)
        assert r.status_code == 200, (page, search, r.status_code)
        assert "Traceback" not in body and "<script>alert" not in body


# ----------------------------------------------------------------------------- hardening (#18)
def _padded_callback(pad_bytes: int) -> bytes:
    """A *valid* callback request of the test app, padded to ``pad_bytes``."""
    import json

    # Dash ignores unknown keys
    return json.dumps({**_gene_callback(), "pad": "p" * pad_bytes}).encode()


def test_request_size_limit_is_real():
    """Flask defines MAX_CONTENT_LENGTH (as None): the limit must be set, not setdefault."""
    app = _dash_app()
    assert app.server.config["MAX_CONTENT_LENGTH"] == _config().limits.max_request_bytes
    c = app.server.test_client()
    small = c.post(
        "/_dash-update-component", data=_padded_callback(1000), content_type="application/json"
    )
    assert small.status_code == 200
    big = c.post(
        "/_dash-update-component",
        data=_padded_callback(9 * 1024 * 1024),
        content_type="application/json",
    )
    assert big.status_code == 413 and "Traceback" not in big.get_data(as_text=True)
    app = _dash_app(_config(limits={"max_request_bytes": 128 * 1024}))
    r = app.server.test_client().post(
        "/_dash-update-component", data=_padded_callback(200_000), content_type="application/json"
    )
    assert r.status_code == 413


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"{}",
        b"[1, 2]",
        b'{"output": 1}',
        b'{"output": "nope.children", "inputs": []}',
        b'{"output": "out.children", "inputs": "x"}',
        b'{"output": "out.children", "inputs": [], "state": []}',
        b"\xff\xfe\x00garbage",
    ],
)
def test_malformed_or_unknown_callback_is_400_without_traceback(body, caplog):
    app = _dash_app()
    with caplog.at_level("DEBUG"):
        r = app.server.test_client().post(
            "/_dash-update-component", data=body, content_type="application/json"
        )
    assert r.status_code == 400, r.get_data(as_text=True)
    assert "Traceback" not in r.get_data(as_text=True)
    assert not [rec for rec in caplog.records if rec.exc_info], "a traceback was logged"
    assert "callback request refused (400)" in caplog.text


def test_healthz_reveals_the_status_only():
    app = _dash_app(health=lambda: (True, {"atlases": {"CLL patients": "open"}, "pid": 123}))
    r = app.server.test_client().get(HEALTH_PATH)
    assert r.get_json() == {"status": "ok"}


def test_unknown_user_costs_a_hash_of_the_users_method(monkeypatch):
    """pbkdf2 users: an unknown name is checked against a pbkdf2 hash with the same
    parameters (was scrypt: a different time than a wrong password)."""
    import werkzeug.security as ws

    from app.security import PasswordChecker

    pbkdf2 = ws.generate_password_hash("pw", method="pbkdf2:sha256:1000")
    checker = PasswordChecker({"carol": pbkdf2})
    seen = []
    real = ws.check_password_hash
    monkeypatch.setattr(ws, "check_password_hash", lambda h, p: seen.append(h) or real(h, p))
    assert checker("carol", "wrong") is False
    assert checker("mallory", "wrong") is False
    methods = [h.split("$", 1)[0] for h in seen]
    assert methods == ["pbkdf2:sha256:1000", "pbkdf2:sha256:1000"]


def test_login_throttle_per_user_and_client(monkeypatch):
    import werkzeug.security as ws

    from app.security import LoginThrottle, PasswordChecker

    now = [1000.0]
    checker = PasswordChecker({"alice": USERS["alice"]})
    checker.throttle = LoginThrottle(clock=lambda: now[0])
    calls = []
    real = ws.check_password_hash
    monkeypatch.setattr(ws, "check_password_hash", lambda h, p: calls.append(1) or real(h, p))
    for _ in range(LoginThrottle.free):
        assert checker.check("alice", "guess", client="10.0.0.9") == ("bad", 0.0)
    status, wait = checker.check("alice", "guess", client="10.0.0.9")
    assert status == "throttled" and wait == pytest.approx(1.0)
    n = len(calls)
    for _ in range(50):  # refused without computing a hash
        assert checker.check("alice", "correct horse", client="10.0.0.7")[0] == "throttled"
        assert checker.check("bob", "guess", client="10.0.0.9")[0] == "throttled"
    assert len(calls) == n
    now[0] += 1.01
    assert checker.check("alice", "guess", client="10.0.0.9")[0] == "bad"
    status, wait = checker.check("alice", "guess", client="10.0.0.9")
    assert status == "throttled" and wait == pytest.approx(2.0)  # backoff doubles
    now[0] += 2.01
    assert checker.check("alice", "correct horse", client="10.0.0.9") == ("ok", 0.0)
    assert checker.check("alice", "guess", client="10.0.0.8")[0] == "bad"  # count cleared


def test_login_throttle_answers_429_with_retry_after():
    app = _auth_app()
    c = app.server.test_client()
    codes = [c.get("/", headers=_basic("alice", f"guess{i}")).status_code for i in range(8)]
    assert codes[:5] == [401] * 5 and codes[-1] == 429
    r = c.get("/", headers=_basic("alice", "guess"))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert c.get(HEALTH_PATH).status_code == 200


def test_log_fields_are_escaped(caplog):
    from app.security import safe_log_value

    assert safe_log_value("eve\nFORGED 127.0.0.1 GET /admin\r\x1b[31m") == (
        "eve\\nFORGED 127.0.0.1 GET /admin\\r\\x1b[31m"
    )
    app = _auth_app()
    with caplog.at_level("INFO"):
        app.server.test_client().get("/", headers=_basic("eve\nFORGED line", "x"))
    lines = caplog.text.splitlines()
    assert not any(ln.startswith("FORGED") for ln in lines)
    assert "eve\\nFORGED line" in caplog.text
