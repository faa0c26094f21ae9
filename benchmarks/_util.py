"""Shared benchmark helpers: stage timers with peak-RSS sampling, subprocess peak memory."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

# TME_BENCH_WORK / TME_BENCH_RESULTS redirect scratch data and results (the smoke test uses them)
WORK = Path(os.environ.get("TME_BENCH_WORK", Path(__file__).resolve().parent / "_work"))
RESULTS = Path(os.environ.get("TME_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))


def machine() -> dict:
    """Machine facts recorded beside every result."""
    return {
        "cpu_count": os.cpu_count(),
        "mem_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 when it is gone)."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


CHROMEDRIVER = "/usr/bin/chromedriver"


def chromium_driver(*, log_browser: bool = False, page_load_timeout: float = 60):
    """Debian's headless Chromium through selenium, with the flags this machine needs
    (no sandbox as root, no GPU, no background networking)."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--enable-unsafe-swiftshader",
    ):
        opts.add_argument(arg)
    if log_browser:
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary:
        opts.binary_location = binary
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(page_load_timeout)
    return driver


def explorer_parser(doc: str, *, repeats: int):
    """The options the explorer benchmarks share: sizes (synthetic atlases of
    :mod:`benchmarks.bench_store`), repeats, ``--quick`` (20k cells, 3 repeats), work, out."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--quick", action="store_true", help="20k cells, 3 repeats")
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--out", type=Path, default=None)
    return p


def explorer_sizes(args) -> tuple[list[int], int]:
    args.work.mkdir(parents=True, exist_ok=True)
    return ([20_000], 3) if args.quick else (args.sizes, args.repeats)


def write_results(module: str, out: Path, results: dict, argv: list[str] | None, **extra) -> Path:
    """Write ``out`` (JSON): the machine, the command line, ``extra`` and ``results``."""
    import sys

    args = argv if argv is not None else sys.argv[1:]
    payload = {
        "machine": machine(),
        "command": " ".join([f"python -m {module}", *args]),
        **extra,
        "sizes": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {out}")
    return out


class _Sampler(threading.Thread):
    """Samples the RSS of a process tree every ``interval`` seconds; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


class StageTimer:
    """Records wall time and peak RSS (MB) of named stages of the current process; with
    ``progress``, the stages so far and the one running are written there at every stage
    boundary (so a run killed for memory still says how far it got)."""

    def __init__(self, progress: Path | None = None) -> None:
        self.stages: dict[str, dict[str, float]] = {}
        self.progress = progress  # partial results written here at every stage boundary

    def _write_progress(self, running: str | None) -> None:
        if self.progress is not None:
            self.progress.parent.mkdir(parents=True, exist_ok=True)
            self.progress.write_text(
                json.dumps({"partial": True, "running": running, "stages": self.stages}, indent=2)
            )

    @contextmanager
    def stage(self, name: str):
        self._write_progress(name)
        sampler = _Sampler(os.getpid())
        sampler.start()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            wall = time.perf_counter() - t0
            peak = sampler.stop()
            self.stages[name] = {"seconds": round(wall, 2), "peak_mb": round(peak / 2**20)}
            self._write_progress(None)

    def total(self) -> float:
        return round(sum(s["seconds"] for s in self.stages.values()), 2)


def run_measured(cmd: list[str], *, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run ``cmd``; return wall seconds, peak RSS of its process tree (MB) and return code."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, cwd=cwd)
    sampler = _Sampler(proc.pid, interval=0.2)
    sampler.start()
    rc = proc.wait()
    peak = sampler.stop()
    return {"seconds": round(time.perf_counter() - t0, 2), "peak_mb": round(peak / 2**20), "rc": rc}


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str))
    return path
