"""Hosting: the Docker entrypoint (run without Docker), several atlases, faults, load.

The gunicorn tests start exactly the Docker image's CMD (parsed from the Dockerfile) as a
subprocess on 127.0.0.1:<free port> against a synthetic atlas.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(REPO))

from app.registry import (  # noqa: E402
    AtlasRegistry,
    AtlasUnavailableError,
    UnknownAtlasError,
    build_wsgi,
    slugify,
)
from benchmarks.bench_load import (  # noqa: E402
    GUNICORN_ARGS,
    AppModel,
    Server,
    gunicorn_command,
    run_load,
    walk,
)

DOCKERFILE = REPO / "Dockerfile"


# ----------------------------------------------------------------------------- fixtures
def _make_atlas(out: Path, n_cells: int, n_genes: int, seed: int, **kw) -> Path:
    testing = pytest.importorskip("atlas.testing")
    testing.make_synthetic_atlas(out, n_cells=n_cells, n_genes=n_genes, seed=seed, **kw)
    return out


@pytest.fixture(scope="session")
def host_atlas(tmp_path_factory) -> Path:
    """A small synthetic human atlas (session, read-only)."""
    return _make_atlas(tmp_path_factory.mktemp("host") / "human", 2000, 400, 0)


@pytest.fixture(scope="session")
def host_atlas_b(tmp_path_factory) -> Path:
    """A second, different atlas (mouse, other size)."""
    return _make_atlas(tmp_path_factory.mktemp("host") / "mouse", 1200, 300, 1, species="mouse")


@pytest.fixture
def atlas_copy(host_atlas, tmp_path) -> Path:
    dst = tmp_path / "served" / "atlas"
    shutil.copytree(host_atlas, dst)
    return dst


def _config(**sections):
    from atlas.config import load_config

    return load_config(env={}, overrides=sections)


def _server(atlas, tmp_path, **kw) -> Server:
    pytest.importorskip("app.wsgi")
    return Server(atlas, log_path=tmp_path / "gunicorn.log", **kw)


# ----------------------------------------------------------------------------- Dockerfile
def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text()
    text = re.sub(r"\\\n", " ", text)  # line continuations
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _exec_form(value: str) -> list[str]:
    value = value.strip()
    return json.loads(value) if value.startswith("[") else shlex.split(value)


def test_dockerfile_cmd_is_the_tested_command():
    ins = _dockerfile_instructions()
    cmds = [v for k, v in ins if k == "CMD"]
    assert len(cmds) == 1 and not [v for k, v in ins if k == "ENTRYPOINT"]
    cmd = _exec_form(cmds[0])
    assert cmd == ["gunicorn", *GUNICORN_ARGS]
    tested = gunicorn_command()
    assert Path(tested[0]).name == "gunicorn" and tested[1:] == cmd[1:]


def test_dockerfile_hosting_rules():
    ins = _dockerfile_instructions()
    get = lambda k: [v for kk, v in ins if kk == k]  # noqa: E731
    assert get("FROM") == ["python:3.11-slim"]
    runs = " ".join(get("RUN"))
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in runs
    assert "-c requirements/constraints.txt" in runs
    users = get("USER")
    assert users and users[-1] not in ("root", "0")
    envs = " ".join(get("ENV"))
    assert "TME_ATLAS_ATLAS=/data/atlas" in envs and "TME_ATLAS__SERVE__HOST=0.0.0.0" in envs
    assert get("VOLUME") and "/data/atlas" in get("VOLUME")[0]
    (health,) = get("HEALTHCHECK")
    assert "/healthz" in health
    # the health check runs with the image's python, no curl in a slim image
    assert "curl" not in health and "wget" not in health
    # every COPY source exists, and no data or venv is copied in
    for src in get("COPY"):
        for part in _exec_form(src)[:-1]:
            assert (REPO / part).exists(), part
    ignore = (REPO / ".dockerignore").read_text().split()
    for must in (".venv", ".git", "demo/", "**/*.h5ad", "tests/"):
        assert must in ignore


def test_gunicorn_conf_from_environment(tmp_path):
    """Bind, workers and preload come from the project config and TME_ATLAS_* variables."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TME_ATLAS")},
        "TME_ATLAS__SERVE__HOST": "127.0.0.1",
        "TME_ATLAS__SERVE__PORT": "18123",
        "TME_ATLAS_WORKERS": "3",
        "TME_ATLAS_THREADS": "2",
        "TME_ATLAS_ATLAS": str(tmp_path / "atlas"),  # opened lazily: need not exist here
    }
    r = subprocess.run(
        [*gunicorn_command(), "--print-config"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    conf = dict(
        (k.strip(), v.strip()) for k, _, v in (ln.partition("=") for ln in r.stdout.splitlines())
    )
    assert conf["bind"] == "['127.0.0.1:18123']"
    assert conf["workers"] == "3" and conf["threads"] == "2"
    assert conf["preload_app"] == "False" and conf["reload"] == "False"
    env["TME_ATLAS__SERVE__PORT"] = "not-a-port"
    r = subprocess.run(
        [*gunicorn_command(), "--print-config"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "error: config serve.port" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- registry
def _fake_opener(calls):
    def opener(path):
        calls.append(path)
        if not (path / "store").is_dir():
            raise FileNotFoundError(path)
        return {"path": path, "n": len(calls)}

    return opener


def _fake_atlas(root: Path, name: str) -> Path:
    d = root / name
    (d / "store").mkdir(parents=True)
    (d / "atlas.h5ad").write_bytes(b"x")
    return d


def test_registry_names_and_default(tmp_path):
    a, b = _fake_atlas(tmp_path, "a"), _fake_atlas(tmp_path, "b")
    reg = AtlasRegistry({"CLL patients": a, "Eµ-TCL1 mouse": b}, opener=_fake_opener([]))
    assert reg.names == ["CLL patients", "Eµ-TCL1 mouse"] and reg.default == "CLL patients"
    assert reg.resolve(None) == reg.resolve("") == "CLL patients"
    assert reg.resolve(["Eµ-TCL1 mouse"]) == "Eµ-TCL1 mouse"
    for bad in (str(a), "../a", "a", "/etc/passwd", "CLL patients/../b", 3, {"x": 1}):
        with pytest.raises(UnknownAtlasError, match="unknown atlas"):
            reg.resolve(bad)
    with pytest.raises(ValueError, match="invalid atlas name"):
        AtlasRegistry({"../x": a})
    with pytest.raises(ValueError, match="no atlas configured"):
        AtlasRegistry({})
    with pytest.raises(ValueError, match="not configured"):
        AtlasRegistry({"a": a}, default="b")


def test_registry_from_config_and_env(tmp_path, monkeypatch):
    a, b = _fake_atlas(tmp_path, "human"), _fake_atlas(tmp_path, "mouse")
    cfg = _config(serve={"atlases": {"Mouse model": str(b)}})
    monkeypatch.setenv("TME_ATLAS_ATLAS", str(a))
    reg = AtlasRegistry.from_config(cfg)
    assert reg.names == ["human", "Mouse model"] and reg.default == "human"
    # a path already configured is not added twice; it becomes the default
    monkeypatch.setenv("TME_ATLAS_ATLAS", str(b))
    reg = AtlasRegistry.from_config(cfg)
    assert reg.names == ["Mouse model"] and reg.default == "Mouse model"
    monkeypatch.delenv("TME_ATLAS_ATLAS")
    with pytest.raises(ValueError, match="no atlas configured"):
        AtlasRegistry.from_config(_config())


def test_registry_reopens_replaced_and_reports_vanished(tmp_path):
    calls: list = []
    a = _fake_atlas(tmp_path, "a")
    reg = AtlasRegistry({"A": a}, opener=_fake_opener(calls))
    s1 = reg.get("A")
    assert reg.get("A") is s1 and len(calls) == 1  # cached while unchanged
    # replaced the way a build finishes: a new directory renamed into place
    new = _fake_atlas(tmp_path, "a.new")
    old = tmp_path / "a.old"
    os.replace(a, old)
    os.replace(new, a)
    s2 = reg.get("A")
    assert s2 is not s1 and len(calls) == 2
    # vanished: a clear error, every time, until it is back
    shutil.rmtree(a)
    for _ in range(2):
        with pytest.raises(AtlasUnavailableError, match="not available"):
            reg.get("A")
    ok, details = reg.health()
    assert not ok and details["atlases"]["A"] == "unavailable"
    os.replace(old, a)
    assert reg.get("A") is not s2 and reg.health()[0]
    # a directory that exists but cannot be opened is "unavailable" too, not a crash
    shutil.rmtree(a / "store")
    with pytest.raises(AtlasUnavailableError, match="cannot be opened"):
        reg.get("A")


def test_registry_with_the_real_store(atlas_copy, host_atlas_b, tmp_path):
    reg = AtlasRegistry({"human": atlas_copy})
    s1 = reg.get()
    assert s1.n_cells == 2000
    # replace the atlas by another one (different size) while "serving"
    tmp = atlas_copy.with_name("incoming")
    shutil.copytree(host_atlas_b, tmp)
    shutil.rmtree(atlas_copy)
    os.replace(tmp, atlas_copy)
    s2 = reg.get()
    assert s2 is not s1 and s2.n_cells == 1200
    shutil.rmtree(atlas_copy)
    with pytest.raises(AtlasUnavailableError):
        reg.get()


def test_slugify():
    assert slugify("CLL patients") == "cll-patients"
    assert slugify("Eµ-TCL1 mouse") == "e-tcl1-mouse"
    assert slugify("../..") == "atlas"


# ----------------------------------------------------------------------------- dispatcher
def _client(wsgi):
    from werkzeug.test import Client

    return Client(wsgi)


def test_one_atlas_served_at_root(host_atlas):
    c = _client(build_wsgi(_config(), host_atlas))
    r = c.get("/healthz")
    assert r.status_code == 200 and r.get_json()["status"] == "ok"
    r = c.get("/")
    assert r.status_code == 200 and b"_dash-config" in r.data
    assert r.headers["X-Frame-Options"] == "DENY"
    assert c.get("/_dash-layout").status_code == 200


def test_served_under_a_sub_path(host_atlas, host_atlas_b):
    """Behind a proxy at https://host/tme/: serve.url_base_pathname = /tme/."""
    c = _client(build_wsgi(_config(serve={"url_base_pathname": "/tme/"}), host_atlas))
    r = c.get("/tme/")
    assert r.status_code == 200 and "\\u002ftme\\u002f" in r.get_data(as_text=True)
    assert c.get("/tme/_dash-layout").status_code == 200
    assert c.get("/healthz").status_code == 200
    assert c.get("/").status_code == 404
    cfg = _config(
        serve={
            "url_base_pathname": "/tme/",
            "atlases": {"A": str(host_atlas), "B": str(host_atlas_b)},
        }
    )
    c = _client(build_wsgi(cfg))
    assert c.get("/tme/").status_code == 200
    assert c.get("/tme/?atlas=B").headers["Location"].endswith("/tme/atlas/b/")
    assert c.get("/tme/atlas/b/_dash-layout").status_code == 200


def test_several_atlases_by_name(host_atlas, host_atlas_b):
    cfg = _config(
        serve={"atlases": {"CLL patients": str(host_atlas), "TCL1 mouse": str(host_atlas_b)}}
    )
    c = _client(build_wsgi(cfg))
    index = c.get("/")
    assert index.status_code == 200
    text = index.get_data(as_text=True)
    assert "CLL patients" in text and "TCL1 mouse" in text
    assert str(host_atlas) not in text  # names, never paths
    r = c.get("/?atlas=TCL1+mouse")
    assert r.status_code == 302 and r.headers["Location"].endswith("/atlas/tcl1-mouse/")
    for bad in ("nope", str(host_atlas), "../../etc/passwd"):
        r = c.get("/", query_string={"atlas": bad})
        assert r.status_code == 404
        body = r.get_data(as_text=True)
        assert "unknown atlas" in body and "Traceback" not in body
        assert "/etc/passwd" not in body or bad == "../../etc/passwd"
    for slug, n in (("cll-patients", "2,000"), ("tcl1-mouse", "1,200")):
        r = c.get(f"/atlas/{slug}/")
        assert r.status_code == 200 and b"_dash-config" in r.data
        assert f'"requests_pathname_prefix":"\\u002fatlas\\u002f{slug}\\u002f"' in r.get_data(
            as_text=True
        )
        layout = c.get(f"/atlas/{slug}/_dash-layout")
        assert layout.status_code == 200 and n in layout.get_data(as_text=True)
    assert c.get("/atlas/tcl1-mouse").status_code == 308
    health = c.get("/healthz")
    assert health.get_json() == {"status": "ok"}  # every atlas checked, no names shown


def test_missing_atlas_gives_503_page_not_a_crash(tmp_path):
    missing = tmp_path / "not-there"
    c = _client(build_wsgi(_config(), missing))
    for _ in range(3):  # retried on every request, never a traceback
        r = c.get("/")
        assert r.status_code == 503
        body = r.get_data(as_text=True)
        assert "atlas cannot be read" in body and str(missing) not in body
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert c.get("/healthz").status_code == 503


def test_auth_covers_index_and_atlases(host_atlas, host_atlas_b):
    import base64

    from app.security import hash_password

    users = {"alice": hash_password("pw")}
    cfg = _config(
        auth={"enabled": True, "users": users},
        serve={"atlases": {"A": str(host_atlas), "B": str(host_atlas_b)}},
    )
    c = _client(build_wsgi(cfg))
    ok = {"Authorization": "Basic " + base64.b64encode(b"alice:pw").decode()}
    for path in ("/", "/atlas/a/", "/atlas/b/_dash-layout", "/?atlas=B"):
        assert c.get(path).status_code == 401, path
        assert c.get(path, headers=ok).status_code in (200, 302), path
    assert c.get("/healthz").status_code == 200


# ----------------------------------------------------------------------------- gunicorn
def test_gunicorn_entrypoint_serves_pages_and_callbacks(host_atlas, tmp_path):
    import requests

    with _server(host_atlas, tmp_path, workers=2, threads=2) as srv:
        assert (
            srv.command[1:]
            == _exec_form([v for k, v in _dockerfile_instructions() if k == "CMD"][0])[1:]
        )
        r = requests.get(srv.url + "/healthz", timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        r = requests.get(srv.url + "/", timeout=30)
        assert r.status_code == 200 and "_dash-config" in r.text
        assert r.headers["Content-Security-Policy"].startswith("default-src 'self'")
        assert r.headers["Server"].startswith("gunicorn")
        res = run_load(srv.url, clients=2, duration=3, warmup=0.5, server=srv)
        assert res["requests"] > 5 and res["errors_5xx"] == 0, res["status"]
        assert any(k.startswith(("page_callback", "interaction")) for k in res["callbacks_fired"])
        assert len(srv.workers()) == 2
        log = srv.log_tail()
    assert "Traceback" not in log, log


def test_killed_worker_is_replaced(host_atlas, tmp_path):
    import requests

    with _server(host_atlas, tmp_path, workers=2, threads=2) as srv:
        before = srv.workers()
        assert len(before) == 2
        for _ in range(4):  # both workers serve (and open the store)
            assert requests.get(srv.url + "/_dash-layout", timeout=30).status_code == 200
        # SIGKILL a worker in the middle of a slow request burst
        os.kill(before[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = srv.workers()
            if len(now) == 2 and before[0] not in now:
                break
            time.sleep(0.2)
        after = srv.workers()
        assert len(after) == 2 and before[0] not in after and before[1] in after
        for _ in range(10):
            assert requests.get(srv.url + "/_dash-layout", timeout=60).status_code == 200
        res = run_load(srv.url, clients=3, duration=3, warmup=0, server=srv)
        assert res["errors_5xx"] == 0 and res["connection_errors"] == 0, res["status"]


def test_atlas_vanishing_and_replaced_while_serving(atlas_copy, host_atlas_b, tmp_path):
    import requests

    with _server(atlas_copy, tmp_path, workers=2, threads=2) as srv:
        assert requests.get(srv.url + "/", timeout=30).status_code == 200
        with requests.Session() as s:
            model = AppModel(s, srv.url)  # the callback map, read while the atlas is there
        res = run_load(srv.url, clients=2, duration=2, warmup=0, server=srv, model=model)
        assert res["errors_5xx"] == 0
        workers = srv.workers()
        # the atlas vanishes: clear 503s (page + callbacks), /healthz 503, no crash loop
        away = atlas_copy.with_name("away")
        os.replace(atlas_copy, away)
        r = requests.get(srv.url + "/healthz", timeout=10)
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
        res = run_load(srv.url, clients=2, duration=2, warmup=0, server=srv, model=model)
        codes = {k for k in res["status"] if k != "200"}
        assert codes <= {"503"}, res["status"]
        assert "503" in res["status"]
        for path in ("/", "/_dash-layout", "/genes"):
            r = requests.get(srv.url + path, timeout=10)
            assert r.status_code == 503 and "atlas cannot be read" in r.text, path
            assert "Traceback" not in r.text and str(atlas_copy) not in r.text
        assert srv.workers() == workers and srv.proc.poll() is None  # nothing restarted
        # a different atlas is put in place (as a finished build renames it): served again
        tmp = atlas_copy.with_name("incoming")
        shutil.copytree(host_atlas_b, tmp)
        os.replace(tmp, atlas_copy)
        r = requests.get(srv.url + "/healthz", timeout=10)
        assert r.status_code == 200
        res = run_load(srv.url, clients=2, duration=2, warmup=0, server=srv)
        assert res["errors_5xx"] == 0, res["status"]
        assert "1,200 cells" in requests.get(srv.url + "/_dash-layout", timeout=30).text
        assert srv.workers() == workers
        log = srv.log_tail(20000)
    assert "changed on disk; reopening" in log or "is missing" in log


def test_gunicorn_refuses_to_start_without_an_atlas(tmp_path):
    pytest.importorskip("app.wsgi")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TME_ATLAS")}
    env.update({"TME_ATLAS__SERVE__PORT": "1", "TME_ATLAS_WORKERS": "1"})
    r = subprocess.run(
        [*gunicorn_command(), "--check-config"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "no atlas configured" in r.stderr + r.stdout


# ----------------------------------------------------------------------------- load
@pytest.mark.slow
def test_load_20_clients(tmp_path_factory, tmp_path):
    """20 concurrent users for 20 s: zero 5xx, bounded latency, stable worker memory."""
    atlas = _make_atlas(tmp_path_factory.mktemp("load") / "atlas", 5000, 1000, 3)
    with _server(atlas, tmp_path, workers=3, threads=4) as srv:
        res = run_load(srv.url, clients=20, duration=20, warmup=10, server=srv)
    print(json.dumps({k: v for k, v in res.items() if k != "callbacks_fired"}, indent=1))
    assert res["errors_5xx"] == 0 and res["connection_errors"] == 0, res["status"]
    assert res["requests"] > 100
    assert res["latency_ms"]["all"]["p95"] < 30_000
    w = res["workers"]
    assert not w["replaced"]
    # after the warm-up every worker has its caches; what is left must level off
    assert w["max_growth_mb"] < 250, w
    assert w.get("growth_second_half_mb", 0) < 150, w


# ----------------------------------------------------------------------------- killed builds
def _have_build() -> bool:
    from importlib.util import find_spec

    return all(
        find_spec(m) is not None for m in ("preprocessing.pipeline", "preprocessing.simulate")
    )


@pytest.fixture(scope="module")
def kill_dataset(tmp_path_factory) -> Path:
    if not _have_build():
        pytest.skip("the build pipeline or the simulator has not landed yet")
    from preprocessing.simulate import write_dataset

    data = tmp_path_factory.mktemp("killbuild") / "data"
    write_dataset(data, seed=2, n_patients=2, cells_per_sample=150)
    return data


# kill when the log shows this line: the start of a stage, or (write) the last stage done
KILL_POINTS = {
    "ingest": r"tme-atlas build:",
    "qc": r"stage qc \.\.\.",
    "integrate": r"stage integrate \.\.\.",
    "cluster": r"stage cluster \.\.\.",
    "write": r"stage programs done",
}


@pytest.mark.slow
def test_build_killed_with_sigkill_at_each_stage_then_resume(kill_dataset, tmp_path):
    """SIGKILL at successive stages (each run resuming the previous one): a killed build
    never leaves anything that looks like a finished atlas, and ``--resume`` completes it.
    """
    import atlas as atlas_pkg
    from atlas import schema

    out = tmp_path / "atlas"
    log_file = out / schema.LOG_FILE
    env = {
        **os.environ,
        "TME_ATLAS__SCVI__MAX_STEPS": "60",
        "TME_ATLAS__HVG__N_TOP_GENES": "500",
        "TME_ATLAS_NO_PROGRESS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "tme_atlas",
        "build",
        str(kill_dataset / "samplesheet.csv"),
        "--out",
        str(out),
        "--skip",
        "analyses",
        "crosstalk",
        "--resume",
    ]
    killed_at = []
    for stage, pattern in KILL_POINTS.items():
        offset = log_file.stat().st_size if log_file.is_file() else 0
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 900
            hit = False
            while time.monotonic() < deadline and proc.poll() is None:
                if log_file.is_file():
                    with open(log_file, errors="replace") as fh:
                        fh.seek(offset)
                        hit = re.search(pattern, fh.read(), re.M) is not None
                if hit:
                    break
                assert not (out / schema.ATLAS_FILE).exists(), "atlas.h5ad before the end"
                time.sleep(0.05)
            if stage == "write":
                time.sleep(0.3)  # inside the writing of model/, qc/, tables/, store/
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != -signal.SIGKILL:  # it finished before the kill point
            break
        killed_at.append(stage)
        # nothing that looks like a finished atlas; the explorer refuses the directory
        assert not (out / schema.ATLAS_FILE).exists(), f"killed at {stage}: atlas.h5ad left"
        with pytest.raises(Exception, match="not an atlas"):
            atlas_pkg.open(out)
        assert not [p.name for p in out.iterdir() if p.suffix == ".h5ad"]
    assert len(killed_at) >= 4, killed_at
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resume: stages up to" in log_file.read_text()
    assert (out / schema.ATLAS_FILE).is_file()
    assert atlas_pkg.open(out).n_cells > 0
    assert not (out / schema.WORK_DIR).exists()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- hardening (#18)
def test_export_store_shared_one_time_expiring_bounded(tmp_path):
    """Two ExportStore objects on one folder stand for two workers / processes."""
    from app.exports import ExportRefused, ExportStore

    now = [1_000_000.0]
    a = ExportStore(
        tmp_path / "ex", ttl_s=600, per_hour=3, max_disk_bytes=10_000, clock=lambda: now[0]
    )
    b = ExportStore(
        tmp_path / "ex", ttl_s=600, per_hour=3, max_disk_bytes=10_000, clock=lambda: now[0]
    )
    assert (tmp_path / "ex").stat().st_mode & 0o777 == 0o700

    def made(store, owner="user:alice", size=1000):
        store.admit(owner)
        with store.workdir() as w:
            f = w / "x.h5ad"
            f.write_bytes(b"x" * size)
            store.check_size(f)
            return store.add(f, owner)

    t1 = made(a)
    p = b.take(t1)  # another worker serves the link, once
    assert p is not None and p.read_bytes() == b"x" * 1000
    assert a.take(t1) is None and b.take(t1) is None
    p.unlink()
    for bad in ("../../etc/passwd", "x" * 32 + "/..", "", "a" * 200):
        assert a.take(bad) is None
    t2 = made(b, owner="addr:10.0.0.1")
    now[0] += 601  # expired: refused and deleted
    assert a.take(t2) is None
    assert [q.name for q in (tmp_path / "ex").iterdir() if q.name != "rate"] == []
    # rate: 3 per hour per owner (alice has used 1, in the last hour)
    made(a)
    made(b)
    with pytest.raises(ExportRefused, match="3 exports per hour"):
        a.admit("user:alice")
    b.admit("user:bob")
    # disk: an export above the folder's bound is refused and nothing of it stays
    with pytest.raises(ExportRefused, match="export space is full"):
        made(a, owner="user:carol", size=20_000)
    a.sweep()
    now[0] += 4000
    a.sweep()
    assert [q.name for q in (tmp_path / "ex").iterdir() if q.name != "rate"] == []
    assert list((tmp_path / "ex" / "rate").iterdir()) == []
    made(a, owner="user:dave")
    a.clear()
    assert list((tmp_path / "ex").iterdir()) == []


def _truncate_by_rename(file: Path) -> None:
    """What an operator's interrupted copy does: a truncated file renamed into place."""
    tmp = file.with_name(file.name + ".part")
    tmp.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    os.replace(tmp, file)


@pytest.mark.parametrize("part", ["obs.parquet", "var.parquet", "embeddings", "expr_csc.h5"])
def test_corrupt_store_part_gives_503_and_healthz_503(atlas_copy, part):
    from atlas import schema

    c = _client(build_wsgi(_config(), atlas_copy))
    assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200
    store = atlas_copy / schema.STORE_DIR
    target = next((store / part).glob("*.npy")) if part == "embeddings" else store / part
    _truncate_by_rename(target)
    r = c.get("/healthz")
    assert r.status_code == 503 and r.get_json() == {"status": "unavailable"}
    for path in ("/", "/_dash-layout"):
        r = c.get(path)
        assert r.status_code == 503 and "atlas cannot be read" in r.get_data(as_text=True), path


def test_store_verify_names_the_truncated_file(atlas_copy):
    import atlas
    from atlas import schema
    from atlas.store import StoreCorruptError

    _truncate_by_rename(atlas_copy / schema.STORE_DIR / schema.STORE_OBS_FILE)
    with pytest.raises(StoreCorruptError, match=r"store/obs\.parquet is unreadable"):
        atlas.open(atlas_copy)


def test_no_slug_oracle_without_credentials(host_atlas, host_atlas_b):
    """Without credentials a known slug and an unknown one answer alike (401)."""
    from app.security import hash_password

    cfg = _config(
        auth={"enabled": True, "users": {"alice": hash_password("pw")}},
        serve={"atlases": {"CLL patients": str(host_atlas), "TCL1 mouse": str(host_atlas_b)}},
    )
    c = _client(build_wsgi(cfg))
    for path in ("/atlas/tcl1-mouse", "/atlas/nope", "/atlas/tcl1-mouse/", "/atlas/nope/"):
        r = c.get(path)
        assert r.status_code == 401, path
    import base64

    ok = {"Authorization": "Basic " + base64.b64encode(b"alice:pw").decode()}
    assert c.get("/atlas/tcl1-mouse", headers=ok).status_code == 308


# ---- one gunicorn (2 workers, password, two atlases) for the probes below, in this order
HARD_PW = "s3cret horse"


@pytest.fixture(scope="module")
def hard_srv(host_atlas, host_atlas_b, tmp_path_factory):
    from app.security import hash_password

    root = tmp_path_factory.mktemp("hard")
    a, c = root / "a", root / "c"
    shutil.copytree(host_atlas, a)
    shutil.copytree(host_atlas_b, c)
    exports = root / "exports"
    cfg = root / "atlas.yaml"
    cfg.write_text(
        f'auth:\n  enabled: true\n  users:\n    alice: "{hash_password(HARD_PW)}"\n'
        f"serve:\n  export_dir: {exports}\n  atlases:\n    A: {a}\n    C: {c}\n"
        "limits:\n  export_inline_bytes: 0\n  exports_per_hour: 6\n"
    )
    srv = _server(
        None,
        root,
        workers=2,
        threads=2,
        env={"TME_ATLAS_CONFIG": str(cfg), "TME_ATLAS_ACCESS_LOG": "-"},
    )
    srv.start()
    srv.root, srv.exports, srv.atlas_c = root, exports, c
    yield srv
    srv.stop()


def _auth(user: str = "alice", pw: str = HARD_PW):
    return (user, pw)


def _export_link(srv) -> str:
    """Run the Downloads page's export callback of atlas A; returns the link (or the text)."""
    import requests
    from test_security import _payload

    deps = requests.get(srv.url + "/atlas/a/_dash-dependencies", auth=_auth(), timeout=30).json()
    cb = next(d for d in deps if "dl-export-msg.children" in d["output"])
    r = requests.post(
        srv.url + "/atlas/a/_dash-update-component",
        json=_payload(cb, {"dl-export-btn": 1}),
        auth=_auth(),
        timeout=120,
    )
    assert r.status_code == 200, r.text[:300]
    hrefs = [
        n["props"]["href"] for n in walk(r.json()) if "_tme_export/" in n["props"].get("href", "")
    ]
    return hrefs[0] if hrefs else json.dumps(r.json())


def test_exports_work_across_workers_once_and_clean_up(hard_srv):
    """2 workers: every first download works (was 404 4 times in 5), the second is a 404,
    the file is deleted once sent, the hourly limit holds."""
    import requests

    links = [_export_link(hard_srv) for _ in range(5)]
    assert all("_tme_export/" in x for x in links), links
    for href in links:  # a new connection each: any worker may answer
        r = requests.get(hard_srv.url + href, auth=_auth(), timeout=60)
        assert r.status_code == 200 and len(r.content) > 10_000
        assert requests.get(hard_srv.url + href, auth=_auth(), timeout=30).status_code == 404
    time.sleep(0.5)
    left = [p.name for p in hard_srv.exports.iterdir() if p.name != "rate"]
    assert left == [], left
    kept = _export_link(hard_srv)  # the 6th: not downloaded (shutdown removes it)
    assert "_tme_export/" in kept
    refused = _export_link(hard_srv)
    assert "exports per hour" in refused
    assert len([p for p in hard_srv.exports.iterdir() if p.suffix == ".h5ad"]) == 1


def test_forged_log_line_through_username(hard_srv):
    import requests

    r = requests.get(
        hard_srv.url + "/atlas/a/", auth=("eve\nFORGED 10.0.0.1 admin", "x"), timeout=30
    )
    assert r.status_code == 401
    time.sleep(0.5)
    lines = hard_srv.log_tail(200_000).splitlines()
    assert not [ln for ln in lines if ln.startswith("FORGED")]
    assert any("eve\\nFORGED" in ln for ln in lines)


def test_store_truncated_in_place_while_serving(hard_srv):
    """expr_csc.h5 truncated in place (mmapped by the workers: was SIGBUS): 503 pages, 503
    /healthz, the same workers."""
    import requests

    from atlas import schema

    url = hard_srv.url + "/atlas/c/_dash-layout"
    for _ in range(4):  # both workers have the atlas open and mapped
        assert requests.get(url, auth=_auth(), timeout=30).status_code == 200
    workers = hard_srv.workers()
    expr = hard_srv.atlas_c / schema.STORE_DIR / schema.STORE_EXPR_FILE
    with open(expr, "r+b") as fh:
        fh.truncate(expr.stat().st_size // 3)
    for _ in range(6):
        r = requests.get(url, auth=_auth(), timeout=30)
        assert r.status_code == 503 and "atlas cannot be read" in r.text
    assert requests.get(hard_srv.url + "/healthz", timeout=10).status_code == 503
    assert requests.get(hard_srv.url + "/atlas/a/_dash-layout", auth=_auth(), timeout=30).ok
    assert hard_srv.workers() == workers and hard_srv.proc.poll() is None


def test_login_throttled_per_user_and_address(hard_srv):
    import requests

    t0 = time.monotonic()
    codes = [
        requests.get(
            hard_srv.url + "/atlas/a/", auth=("mallory", f"guess{i}"), timeout=30
        ).status_code
        for i in range(40)
    ]
    assert set(codes) <= {401, 429} and codes.count(429) >= 25, codes
    assert time.monotonic() - t0 < 30
    r = requests.get(hard_srv.url + "/atlas/a/", auth=("mallory", "again"), timeout=30)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1


def test_shutdown_empties_the_export_folder(hard_srv):
    assert any(p.suffix == ".h5ad" for p in hard_srv.exports.iterdir())
    hard_srv.stop()
    assert list(hard_srv.exports.iterdir()) == []


def test_serve_runs_gunicorn_with_several_atlases(host_atlas, host_atlas_b, tmp_path):
    """`tme-atlas serve` is the production command (gunicorn), several atlases included."""
    import requests

    from benchmarks.bench_load import free_port

    port = free_port()
    cfg = tmp_path / "atlas.yaml"
    cfg.write_text(
        f"serve:\n  export_dir: {tmp_path / 'ex'}\n  atlases:\n    A: {host_atlas}\n    B: {host_atlas_b}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TME_ATLAS")}
    env.update(TME_ATLAS_WORKERS="2", TME_ATLAS_THREADS="2", TME_ATLAS_ACCESS_LOG="")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tme_atlas",
                "serve",
                "--config",
                str(cfg),
                "--port",
                str(port),
            ],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if requests.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None, log.read_text()
            time.sleep(0.3)
        r = requests.get(url + "/atlas/b/", timeout=30)
        assert r.status_code == 200 and r.headers["Server"].startswith("gunicorn")
        assert requests.get(url + "/", timeout=30).status_code == 200
        import psutil

        assert len(psutil.Process(proc.pid).children()) == 2  # gunicorn's workers
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    text = log.read_text()
    assert "development server" not in text and "Traceback" not in text
