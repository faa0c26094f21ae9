"""Explorer in a real browser: ``python -m benchmarks.bench_browser [--sizes 100000 1000000]``.

For each size, the synthetic atlas of :mod:`benchmarks.bench_store` (generated once into
``benchmarks/_work/store_<cells>x2000/``) is served by the production command
(``gunicorn -c app/gunicorn_conf.py app.wsgi:server``, 2 workers) and opened in headless
Chromium (Debian's ``chromium`` + ``chromedriver``, through selenium). Measured:

* ``first_load_s``: from ``driver.get(/cells)`` to the UMAP drawn (Plotly's ``afterplot``
  with data), median over ``--repeats`` page loads;
* ``gene_repaint_ms``: from the click on a gene in the dropdown (``performance.now()`` in
  the page) to the ``afterplot`` event of the recoloured UMAP, median over ``--repeats``
  genes; the first gene switch (the full figure with a colour bar) and later ones (only
  ``marker.color`` patched) are reported apart;
* ``worker_rss_mb``: resident memory of the gunicorn workers after the run.

Results go to ``benchmarks/results/browser.json`` (``--out``). Not a timed test.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from app.figures import COLOURBAR_TRACE
from benchmarks._util import (
    CHROMEDRIVER,
    RESULTS,
    chromium_driver,
    explorer_parser,
    explorer_sizes,
    write_results,
)
from benchmarks.bench_load import Server

N_GENES = 2000

# resolves once the UMAP graph has drawn with data: the time (performance.now()) of the
# first afterplot after ``since`` whose figure satisfies ``want`` (colour-bar title)
JS_WAIT_PLOT = """
const [graphId, since, want, done] = arguments;
function gd() {
  const el = document.getElementById(graphId);
  return el && (el.classList.contains('js-plotly-plot') ? el : el.querySelector('.js-plotly-plot'));
}
function ok(g) {
  if (!g || !g.data || !g.data.length || !g._fullLayout) return false;
  if (want === null) return true;
  const cb = g.layout.coloraxis && g.layout.coloraxis.colorbar && g.layout.coloraxis.colorbar.title;
  return !!cb && cb.text === want;
}
const t0 = performance.now();
(function poll() {
  const g = gd();
  if (g && !g.__benchHooked) {
    g.__benchHooked = true;
    g.on('plotly_afterplot', () => { window.__benchPlots = (window.__benchPlots || []).concat([performance.now()]); });
  }
  const plots = (window.__benchPlots || []).filter(t => t >= since);
  if (ok(g) && plots.length) { done(plots[plots.length - 1]); return; }
  // page load: the first draw may come before the hook is attached
  if (want === null && ok(g) && g._fullData && g._fullData.some(t => t._length > 0)) { done(performance.now()); return; }
  if (performance.now() - t0 > 120000) { done(null); return; }
  setTimeout(poll, 10);
})();
"""

# cells drawn in the figure (the graph element is, or holds, the plotly div)
JS_POINTS = """
const el = document.getElementById(arguments[0]);
const g = el && (el.classList.contains('js-plotly-plot') ? el : el.querySelector('.js-plotly-plot'));
if (!g || !g._fullData) return null;
// _fullData: x arrives base64-encoded (plotly.py 6) and is decoded there
// (the colour-bar carrier, arguments[1], is not a cell)
return g._fullData.filter(t => t.name !== arguments[1])
  .reduce((a, t) => a + (t._length || (t.x && t.x.length) || 0), 0);
"""

JS_CLICK_OPTION = """
const opt = document.querySelector(arguments[0]);
if (!opt) return null;
const t = performance.now();
opt.closest('label').click();
return t;
"""


def _driver():
    d = chromium_driver(page_load_timeout=120)
    d.set_script_timeout(150)
    return d


def _ensure_atlas(n: int, work: Path) -> Path:
    d = work / f"store_{n}x{N_GENES}"
    if not (d / "atlas.h5ad").is_file():
        subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_store", "--sizes", str(n), "--reads", "2",
             "--csr-reads", "1", "--work", str(work), "--out", str(work / f"store_{n}.json")],
            check=True,
        )  # fmt: skip
    return d


def _genes(atlas_dir: Path, k: int) -> list[str]:
    import atlas

    names = list(atlas.open(atlas_dir).var_names)
    step = max(1, len(names) // (k + 1))
    return [names[i * step] for i in range(1, k + 1)]


def _choose_gene(d, gene: str) -> float:
    """Open the gene dropdown, search ``gene``, click it; return the click time (page ms)."""
    from selenium.webdriver.common.keys import Keys

    search = ".dash-dropdown-content input.dash-dropdown-search"
    # a previous Escape sent while the page was busy drawing may have left the menu open:
    # clicking the dropdown then would close it
    if not d.find_elements("css selector", search):
        d.find_element("id", "cells-gene").click()
    box = _wait(lambda: d.find_element("css selector", search))
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    box.send_keys(gene)
    sel = f".dash-dropdown-content input.dash-options-list-option-checkbox[value='{gene}']"
    _wait(lambda: d.find_element("css selector", sel))
    t = d.execute_script(JS_CLICK_OPTION, sel)
    d.find_element("css selector", "body").send_keys(Keys.ESCAPE)
    return float(t)


def _wait(fn, timeout: float = 60.0):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - DOM in flux
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"timed out ({last!r})")


def measure(atlas_dir: Path, *, repeats: int, log: Path) -> dict:
    out: dict = {}
    with Server(atlas_dir, workers=2, threads=4, log_path=log) as srv:
        d = _driver()
        try:
            loads = []
            for _ in range(repeats):
                d.get("about:blank")
                t0 = time.perf_counter()
                d.get(srv.url + "/cells")
                if d.execute_async_script(JS_WAIT_PLOT, "cells-umap", 0, None) is None:
                    raise TimeoutError("the UMAP did not draw within 120 s")
                loads.append(time.perf_counter() - t0)
            out["first_load_s"] = round(statistics.median(loads), 3)
            out["first_load_all_s"] = [round(x, 3) for x in loads]
            first, later = [], []
            for i, g in enumerate(_genes(atlas_dir, repeats + 1)):
                t_click = _choose_gene(d, g)
                t_plot = d.execute_async_script(JS_WAIT_PLOT, "cells-umap", t_click, g)
                if t_plot is None:
                    raise TimeoutError(f"no repaint for {g}")
                (first if i == 0 else later).append(t_plot - t_click)
            out["gene_repaint_first_ms"] = round(first[0], 1)
            out["gene_repaint_ms"] = round(statistics.median(later), 1)
            out["gene_repaint_all_ms"] = [round(x, 1) for x in first + later]
            out["points_drawn"] = d.execute_script(JS_POINTS, "cells-umap", COLOURBAR_TRACE)
        finally:
            d.quit()
        out["worker_rss_mb"] = srv.worker_rss_mb()
    return out


def main(argv: list[str] | None = None) -> int:
    p = explorer_parser(__doc__, repeats=5)
    args = p.parse_args(argv)
    if shutil.which("chromium") is None or not Path(CHROMEDRIVER).exists():
        print("chromium / chromedriver missing (apt-get install chromium chromium-driver)")
        return 2
    sizes, repeats = explorer_sizes(args)
    results = {}
    for n in sizes:
        atlas_dir = _ensure_atlas(n, args.work)
        res = measure(atlas_dir, repeats=repeats, log=args.work / f"bench_browser_{n}.log")
        results[str(n)] = res
        print(json.dumps({n: res}))
    out = args.out or RESULTS / ("browser_quick.json" if args.quick else "browser.json")
    write_results("benchmarks.bench_browser", out, results, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
