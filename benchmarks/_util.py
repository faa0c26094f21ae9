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


class _Sampler(threading.Thread):
    """Samples the RSS of a process tree every ``interval`` seconds; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self._stop_event = threading.Event()

    def _tree_rss(self) -> int:
        try:
            proc = psutil.Process(self.pid)
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

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self._tree_rss())
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


class StageTimer:
    """Records wall time and peak RSS (MB) of named stages of the current process."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}

    @contextmanager
    def stage(self, name: str):
        sampler = _Sampler(os.getpid())
        sampler.start()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            wall = time.perf_counter() - t0
            peak = sampler.stop()
            self.stages[name] = {"seconds": round(wall, 2), "peak_mb": round(peak / 2**20)}

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
