"""Load test of the explorer under gunicorn: ``python -m benchmarks.bench_load``.

Starts the production command (``gunicorn -c app/gunicorn_conf.py app.wsgi:server``, the
Docker image's CMD) on 127.0.0.1 against an atlas, then runs ``--clients`` concurrent
simulated users for ``--duration`` seconds. Each user behaves like a browser tab:

* page load: ``GET /<page>`` (the HTML index), then every callback the page fires at start
  (the callback map is read from ``/_dash-dependencies``, the component values from
  ``/_dash-layout`` and from the routing callback's output), applying each response to its
  own copy of the page's state like the Dash renderer does, so chained callbacks get the
  values a real browser would send;
* interactions: switch a dropdown / radio / checklist to another of its options (gene
  switch, colour-by, filter by condition or cell type ...) and fire the callbacks that
  listen to it, then their dependants.

Reported: requests, errors by status (any 5xx fails the run), p50/p95/p99 latency per
request kind, and the RSS of every gunicorn worker at the start (after a warm-up) and at
the end (memory stability). Loopback only: the server binds 127.0.0.1.

Without ``--atlas`` a synthetic atlas of demo size (``atlas.testing.make_synthetic_atlas``,
~17k cells) is made under ``benchmarks/_work``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.server import GUNICORN_ARGS  # the image's CMD after "gunicorn" (one definition)

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "_work"
# what users type into gene search boxes (prefixes of common markers)
SEARCH_PREFIXES = [
    "CD",
    "CD1",
    "CD3",
    "CD8",
    "MS4",
    "IL",
    "CCL",
    "CXC",
    "GZM",
    "LYZ",
    "NK",
    "HLA",
    "G",
]


# ====================================================================== server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gunicorn_command() -> list[str]:
    """The image's CMD, with gunicorn from this interpreter's environment."""
    exe = Path(sys.executable).with_name("gunicorn")
    return [str(exe) if exe.exists() else "gunicorn", *GUNICORN_ARGS]


class Server:
    """``gunicorn -c app/gunicorn_conf.py app.wsgi:server`` as a subprocess on loopback."""

    def __init__(
        self,
        atlas: str | Path | None,
        *,
        port: int | None = None,
        workers: int = 2,
        threads: int = 4,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("TME_ATLAS__") and k not in ("TME_ATLAS_CONFIG",)
        }
        self.env.update(
            {
                "TME_ATLAS__SERVE__HOST": "127.0.0.1",
                "TME_ATLAS__SERVE__PORT": str(self.port),
                "TME_ATLAS_WORKERS": str(workers),
                "TME_ATLAS_THREADS": str(threads),
                "TME_ATLAS_MAX_REQUESTS": "0",  # no recycling: memory growth must show
                "TME_ATLAS_ACCESS_LOG": "",
                "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1",
                "OPENBLAS_NUM_THREADS": "1",
            }
        )
        if atlas is not None:
            self.env["TME_ATLAS_ATLAS"] = str(atlas)
        self.env.update(env or {})
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.command = gunicorn_command()

    def start(self, timeout: float = 120.0) -> Server:
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.command,
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        import requests

        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"gunicorn exited with {self.proc.returncode}: {self.log_tail()}"
                )
            try:
                r = requests.get(self.url + "/healthz", timeout=5)
                if r.status_code == 200:
                    return
                last = r.status_code
            except requests.RequestException as e:
                last = e.__class__.__name__
            time.sleep(0.25)
        raise TimeoutError(f"gunicorn not healthy after {timeout}s ({last}): {self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    def workers(self) -> list[int]:
        import psutil

        if self.proc is None:
            return []
        try:
            return sorted(c.pid for c in psutil.Process(self.proc.pid).children())
        except psutil.NoSuchProcess:
            return []

    def worker_rss_mb(self) -> dict[int, float]:
        import psutil

        out = {}
        for pid in self.workers():
            try:
                out[pid] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
            except psutil.NoSuchProcess:
                pass
        return out

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # graceful: gunicorn stops its workers
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ====================================================================== a tiny Dash client
def walk(node: Any) -> Iterator[dict]:
    """Every component (``{"type", "namespace", "props"}``) in a layout tree."""
    if isinstance(node, dict):
        if "props" in node and "type" in node:
            yield node
            yield from walk(node["props"].get("children"))
            for k, v in node["props"].items():  # components in other props (e.g. tabs)
                if k != "children" and isinstance(v, (dict, list)):
                    yield from walk(v)
        else:
            for v in node.values():
                if isinstance(v, (dict, list)):
                    yield from walk(v)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def _id_key(cid: Any) -> str:
    return json.dumps(cid, sort_keys=True, separators=(",", ":")) if isinstance(cid, dict) else cid


def _parse_outputs(spec: str) -> list[tuple[str, str]]:
    """``"..a.b...c.d.."`` or ``"a.b"`` -> [("a", "b"), ("c", "d")] (string ids only)."""
    if spec.startswith("..") and spec.endswith(".."):
        parts = spec[2:-2].split("...")
    else:
        parts = [spec]
    out = []
    for p in parts:
        cid, _, prop = p.rpartition(".")
        out.append((cid, prop))
    return out


class AppModel:
    """The callback map and initial component values of the served app."""

    def __init__(self, session, base: str):
        self.base = base
        r = session.get(base + "/_dash-dependencies", timeout=30)
        r.raise_for_status()
        self.callbacks = [
            cb
            for cb in r.json()
            if not cb.get("clientside_function")
            and not any(_is_pattern(d["id"]) for d in cb["inputs"] + cb.get("state", []))
            and "{" not in cb["output"]
        ]
        r = session.get(base + "/_dash-layout", timeout=30)
        r.raise_for_status()
        self.layout = r.json()
        self.base_props = props_of(self.layout)
        self.router = self._find_router()
        self.pages = self._find_pages()

    def _find_router(self) -> dict | None:
        for cb in self.callbacks:
            if any(i["property"] == "pathname" for i in cb["inputs"]):
                return cb
        return None

    def _find_pages(self) -> list[str]:
        pages = []
        for comp in walk(self.layout):
            href = comp["props"].get("href")
            if isinstance(href, str) and href.startswith("/") and not href.startswith("//"):
                path = href.split("?", 1)[0].split("#", 1)[0]
                if path not in pages and not path.startswith(("/_", "/assets")):
                    pages.append(path)
        return pages or ["/"]


def _is_pattern(cid: Any) -> bool:
    return isinstance(cid, dict) or (isinstance(cid, str) and cid.startswith("{"))


def props_of(layout: Any) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for comp in walk(layout):
        cid = comp["props"].get("id")
        if cid is None or _is_pattern(cid):
            continue
        props = {k: v for k, v in comp["props"].items() if k != "children"}
        props["children"] = comp["props"].get("children")
        props["__type"] = comp["type"]
        out[_id_key(cid)] = props
    return out


def choice_values(props: dict) -> list[Any]:
    """The values a user could pick in a dropdown / radio / checklist."""
    opts = props.get("options")
    vals: list[Any] = []
    if isinstance(opts, dict):
        vals = list(opts.keys())
    elif isinstance(opts, list):
        for o in opts:
            if isinstance(o, dict) and "value" in o and not o.get("disabled"):
                vals.append(o["value"])
            elif isinstance(o, (str, int, float)):
                vals.append(o)
    return vals


class Tab:
    """One simulated browser tab: page state + callbacks, like the Dash renderer."""

    def __init__(self, model: AppModel, session, rng: random.Random, record):
        self.m, self.s, self.rng, self.record = model, session, rng, record
        self.props: dict[str, dict] = {}
        self.path = "/"

    # ---------------------------------------------------------------- requests
    def _fire(self, cb: dict, changed: list[str], kind: str) -> bool:
        def val(d):
            p = self.props.get(d["id"])
            return None if p is None else p.get(d["property"])

        if any(d["id"] not in self.props for d in cb["inputs"]):
            return False
        outs = _parse_outputs(cb["output"])
        multi = cb["output"].startswith("..")
        payload = {
            "output": cb["output"],
            "outputs": [{"id": i, "property": p} for i, p in outs]
            if multi
            else {"id": outs[0][0], "property": outs[0][1]},
            "inputs": [
                {"id": d["id"], "property": d["property"], "value": val(d)} for d in cb["inputs"]
            ],
            "changedPropIds": changed,
            "state": [
                {"id": d["id"], "property": d["property"], "value": val(d)}
                for d in cb.get("state", [])
                if d["id"] in self.props
            ],
        }
        self.record.fired(cb["output"], kind)
        t0 = time.perf_counter()
        try:
            r = self.s.post(self.m.base + "/_dash-update-component", json=payload, timeout=120)
            status = r.status_code
        except Exception as e:  # noqa: BLE001 - connection errors are results too
            self.record(kind, time.perf_counter() - t0, f"exc:{e.__class__.__name__}")
            return False
        self.record(kind, time.perf_counter() - t0, status)
        if hasattr(self.record, "nbytes"):
            self.record.nbytes(kind, len(r.content))
        if status != 200:
            return False
        try:
            resp = r.json().get("response", {})
        except ValueError:
            return False
        for cid, upd in resp.items():
            if not isinstance(upd, dict):
                continue
            self.props.setdefault(cid, {}).update(upd)
            if "children" in upd:
                for k, v in props_of(upd["children"]).items():
                    self.props.setdefault(k, {}).update(v)
        return True

    def _callbacks_on(self, triggers: set[tuple[str, str]]) -> list[dict]:
        return [
            cb
            for cb in self.m.callbacks
            if cb is not self.m.router
            and any((d["id"], d["property"]) in triggers for d in cb["inputs"])
        ]

    def _cascade(self, triggers: set[tuple[str, str]], kind: str, depth: int = 3) -> None:
        fired: set[str] = set()
        for _ in range(depth):
            cbs = [cb for cb in self._callbacks_on(triggers) if cb["output"] not in fired]
            if not cbs:
                return
            triggers = set()
            for cb in cbs:
                fired.add(cb["output"])
                changed = [f"{d['id']}.{d['property']}" for d in cb["inputs"]]
                if self._fire(cb, changed[:1], kind):
                    triggers |= set(_parse_outputs(cb["output"]))

    # ---------------------------------------------------------------- user actions
    def load_page(self, path: str) -> None:
        self.path = path
        t0 = time.perf_counter()
        try:
            r = self.s.get(self.m.base + path, timeout=60)
            self.record("page_html", time.perf_counter() - t0, r.status_code)
        except Exception as e:  # noqa: BLE001
            self.record("page_html", time.perf_counter() - t0, f"exc:{e.__class__.__name__}")
            return
        self.props = copy.deepcopy(self.m.base_props)
        for p in self.props.values():
            if p.get("__type") == "Location":
                p.update({"pathname": path, "search": "", "href": self.m.base + path, "hash": ""})
        initial: set[tuple[str, str]] = set()
        if self.m.router is not None:
            if self._fire(self.m.router, [f"{self.m.router['inputs'][0]['id']}.pathname"], "route"):
                initial |= set(_parse_outputs(self.m.router["output"]))
        # every callback whose inputs exist now fires once (initial call), then dependants
        startup = [
            cb
            for cb in self.m.callbacks
            if cb is not self.m.router
            and not cb.get("prevent_initial_call")
            and all(d["id"] in self.props for d in cb["inputs"])
        ]
        triggers: set[tuple[str, str]] = set()
        for cb in startup:
            if self._fire(cb, [], "page_callback"):
                triggers |= set(_parse_outputs(cb["output"]))
        self._cascade(triggers, "page_callback", depth=2)

    def search_and_pick(self) -> bool:
        """Type into a searchable dropdown (server-side options), then pick a result."""
        comps = [
            cid
            for cid in self.props
            if self._callbacks_on({(cid, "search_value")}) and self._callbacks_on({(cid, "value")})
        ]
        if not comps:
            return False
        cid = self.rng.choice(comps)
        p = self.props[cid]
        p["search_value"] = self.rng.choice(SEARCH_PREFIXES)
        for cb in self._callbacks_on({(cid, "search_value")}):
            self._fire(cb, [f"{cid}.search_value"], "gene_search")
        vals = [v for v in choice_values(p) if v != p.get("value")]
        if not vals:
            return True
        new = self.rng.choice(vals)
        p["value"] = [new] if (isinstance(p.get("value"), list) or p.get("multi")) else new
        self._cascade({(cid, "value")}, "gene_switch")
        return True

    def interact(self) -> bool:
        """Change one dropdown / radio / checklist to another value; fire what listens."""
        if self.rng.random() < 0.4 and self.search_and_pick():
            return True
        candidates = []
        for cid, p in self.props.items():
            vals = choice_values(p)
            if len(vals) < 2:
                continue
            if not self._callbacks_on({(cid, "value")}):
                continue
            candidates.append((cid, p, vals))
        if not candidates:
            return False
        cid, p, vals = self.rng.choice(candidates)
        if isinstance(p.get("value"), list) or p.get("multi") or p.get("__type") == "Checklist":
            k = self.rng.randint(1, min(3, len(vals)))
            new: Any = self.rng.sample(vals, k)
        else:
            new = self.rng.choice([v for v in vals if v != p.get("value")] or vals)
        p["value"] = new
        self._cascade({(cid, "value")}, "interaction")
        return True


# ====================================================================== the load run
class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.status: dict[str, int] = defaultdict(int)
        self.outputs: dict[str, int] = defaultdict(int)

    def fired(self, output: str, kind: str) -> None:
        with self.lock:
            self.outputs[f"{kind}: {output}"] += 1

    def __call__(self, kind: str, seconds: float, status: Any) -> None:
        with self.lock:
            self.lat[kind].append(seconds)
            self.status[str(status)] += 1

    def summary(self) -> dict:
        def pct(xs: list[float], q: float) -> float:
            xs = sorted(xs)
            return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else float("nan")

        allx = [x for xs in self.lat.values() for x in xs]
        n5xx = sum(v for k, v in self.status.items() if k.startswith("5"))
        nexc = sum(v for k, v in self.status.items() if k.startswith("exc"))
        return {
            "callbacks_fired": dict(sorted(self.outputs.items())),
            "requests": len(allx),
            "status": dict(sorted(self.status.items())),
            "errors_5xx": n5xx,
            "connection_errors": nexc,
            "latency_ms": {
                "all": {"p50": pct(allx, 0.5), "p95": pct(allx, 0.95), "p99": pct(allx, 0.99)},
                **{
                    k: {"n": len(v), "p50": pct(v, 0.5), "p95": pct(v, 0.95), "p99": pct(v, 0.99)}
                    for k, v in sorted(self.lat.items())
                },
            },
        }


def run_load(
    base_url: str,
    *,
    clients: int = 20,
    duration: float = 60.0,
    seed: int = 0,
    think: float = 0.0,
    server: Server | None = None,
    warmup: float = 5.0,
    model: AppModel | None = None,
) -> dict:
    """``clients`` threads, each a browser tab doing page loads and interactions."""
    import requests

    if model is None:
        with requests.Session() as s:
            model = AppModel(s, base_url)
    rec = Recorder()
    # warm-up: every worker opens the store and fills its caches before the RSS baseline
    warm = Recorder()
    _drive(model, warm, clients=clients, duration=warmup, seed=seed + 1000, think=think)
    rss_start = server.worker_rss_mb() if server else {}
    timeline: list[tuple[float, float]] = []  # (seconds, total worker RSS MB)
    done = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while server is not None and not done.wait(max(1.0, duration / 12)):
            rss = server.worker_rss_mb()
            timeline.append((round(time.monotonic() - t0, 1), round(sum(rss.values()), 1)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _drive(model, rec, clients=clients, duration=duration, seed=seed, think=think)
    elapsed = time.monotonic() - t0
    done.set()
    sampler.join(timeout=10)
    rss_end = server.worker_rss_mb() if server else {}
    out = rec.summary()
    out.update(
        {
            "clients": clients,
            "duration_s": round(elapsed, 1),
            "throughput_rps": round(out["requests"] / elapsed, 1),
            "pages": model.pages,
            "n_callbacks": len(model.callbacks),
            "warmup": {"seconds": warmup, "requests": warm.summary()["requests"]},
        }
    )
    if server is not None:
        same = sorted(set(rss_start) & set(rss_end))
        out["workers"] = {
            "rss_start_mb": rss_start,
            "rss_end_mb": rss_end,
            "replaced": sorted(set(rss_start) ^ set(rss_end)),
            "max_growth_mb": max((rss_end[p] - rss_start[p] for p in same), default=0.0),
            "total_rss_timeline_mb": timeline,
        }
        half = [mb for t, mb in timeline if t >= elapsed / 2]
        if half:  # growth over the second half of the run (after caches have filled)
            out["workers"]["growth_second_half_mb"] = round(sum(rss_end.values()) - half[0], 1)
    return out


def _drive(
    model: AppModel, rec: Recorder, *, clients: int, duration: float, seed: int, think: float
):
    import requests

    stop = time.monotonic() + duration

    def user(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with requests.Session() as s:
            tab = Tab(model, s, rng, rec)
            while time.monotonic() < stop:
                tab.load_page(rng.choice(model.pages))
                for _ in range(rng.randint(2, 6)):
                    if time.monotonic() >= stop or not tab.interact():
                        break
                    if think:
                        time.sleep(rng.uniform(0, think))

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration + 180)


def synthetic_atlas(n_cells: int = 17_000, n_genes: int = 2_000, seed: int = 0) -> Path:
    """A synthetic atlas of about demo size under benchmarks/_work (reused when present)."""
    from atlas import schema
    from atlas.testing import make_synthetic_atlas

    out = WORK / f"load_atlas_{n_cells}_{n_genes}_{seed}"
    if (out / schema.ATLAS_FILE).is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(make_synthetic_atlas(out, n_cells=n_cells, n_genes=n_genes, seed=seed) or out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_load", description=__doc__.split("\n")[0]
    )
    p.add_argument("--atlas", help="atlas directory (default: demo/atlas, else a synthetic one)")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--workers", type=int, default=max(2, min(8, (os.cpu_count() or 1) + 1)))
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--cells", type=int, default=17_000, help="synthetic atlas size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=float, default=20.0, help="seconds before the RSS baseline")
    p.add_argument("--quick", action="store_true", help="10 s, for a smoke run")
    p.add_argument("--out", help="JSON result file (default benchmarks/results/load_<tag>.json)")
    args = p.parse_args(argv)

    atlas_dir = Path(args.atlas) if args.atlas else None
    if atlas_dir is None:
        demo = REPO / "demo" / "atlas"
        atlas_dir = (
            demo if (demo / "atlas.h5ad").is_file() else synthetic_atlas(args.cells, seed=args.seed)
        )
    duration = 10.0 if args.quick else args.duration
    WORK.mkdir(parents=True, exist_ok=True)
    log = WORK / "bench_load_gunicorn.log"
    with Server(atlas_dir, workers=args.workers, threads=args.threads, log_path=log) as srv:
        res = run_load(
            srv.url,
            clients=args.clients,
            duration=duration,
            seed=args.seed,
            server=srv,
            warmup=min(args.warmup, duration),
        )
    res.update(
        {
            "atlas": str(atlas_dir),
            "command": " ".join(["gunicorn", *GUNICORN_ARGS]),
            "gunicorn": {"workers": args.workers, "threads": args.threads},
        }
    )
    print(json.dumps(res, indent=2))
    try:
        from benchmarks._util import save

        tag = "quick" if args.quick else "full"
        path = save(f"load_{tag}", res) if not args.out else None
    except ImportError:  # pragma: no cover
        path = None
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
        path = args.out
    if path:
        print(f"wrote {path}", file=sys.stderr)
    return 1 if res["errors_5xx"] or res["connection_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
