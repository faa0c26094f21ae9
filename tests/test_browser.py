"""The explorer in headless Chromium: every page loads without console errors, a gene
recolours the UMAP, a condition change updates the violins, an interaction filter changes
the dot plot, and a shared URL restores the view. Screenshots of every page go to
``test-artifacts/screenshots/`` (git-ignored)."""

# ruff: noqa: F811 - pytest fixtures imported from app_fixtures
from __future__ import annotations

import time
from urllib.parse import urlencode

import pytest
from app_fixtures import (  # noqa: F401 - fixtures
    SCREENSHOTS,
    app_atlas_dir,
    browser,
    dash_app,
    live_server,
    vocab,
)

pytestmark = pytest.mark.browser

PAGES = {
    "overview": ("/", "overview-comp-condition"),
    "cells": ("/cells", "cells-umap"),
    "genes": ("/genes", "genes-violin"),
    "interactions": ("/interactions", "ia-dotplot"),
    "downloads": ("/downloads", None),
}

JS_FIG = """
const el = document.getElementById(arguments[0]);
const gd = el && (el.classList.contains('js-plotly-plot') ? el : el.querySelector('.js-plotly-plot'));
if (!gd || !gd.data || !gd._fullLayout) return null;
const ann = (gd.layout.annotations || []).map(a => a.text);
if (ann.includes('Loading…')) return null;
return {
  n: gd.data.length,
  types: gd.data.map(t => t.type),
  names: gd.data.map(t => t.name === undefined ? null : String(t.name)),
  lens: gd._fullData.map(t => t._length || 0),
  colours: gd._fullData.map(t => (t.marker && typeof t.marker.color === 'string') ? t.marker.color : null),
  x: gd.data.length ? Array.from(gd.data[0].x || []).slice(0, 2000).map(String) : [],
  colorLen: gd._fullData.map(t => (t.marker && t.marker.color && typeof t.marker.color !== 'string')
                               ? t.marker.color.length : 0),
  colorSum: gd._fullData.map(t => (t.marker && t.marker.color && typeof t.marker.color !== 'string')
                               ? Array.from(t.marker.color).reduce((a, b) => a + b, 0) : null),
  colorbar: gd.layout.coloraxis && gd.layout.coloraxis.colorbar && gd.layout.coloraxis.colorbar.title
            ? gd.layout.coloraxis.colorbar.title.text : null,
  ytitle: gd.layout.yaxis && gd.layout.yaxis.title ? gd.layout.yaxis.title.text : null,
  annotations: ann,
};
"""


def wait_for(fn, timeout: float = 30.0, interval: float = 0.2, what: str = "condition"):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        try:
            last = fn()
        except Exception as e:  # noqa: BLE001 - DOM in flux
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def figure(driver, graph_id: str, until=None, timeout: float = 30.0) -> dict:
    def get():
        f = driver.execute_script(JS_FIG, graph_id)
        return f if f and (until is None or until(f)) else None

    return wait_for(get, timeout, what=f"figure {graph_id}")


def severe_logs(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def screenshot(driver, name: str) -> None:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(max(int(height), 1000), 5000))
    time.sleep(0.5)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    driver.set_window_size(1400, 1000)


def idle(driver, timeout: float = 30.0) -> None:
    """Wait until Dash has no callback in flight."""
    wait_for(
        lambda: driver.execute_script(
            "return !document.querySelector('[data-dash-is-loading=\"true\"]')"
        ),
        timeout,
        what="callbacks to settle",
    )


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait_for(lambda: driver.find_elements("css selector", "#page .page"), what="page body")


def choose(driver, dropdown_id: str, value: str, search: str | None = None) -> None:
    """Pick ``value`` in a Dash 4 dropdown (typing ``search`` first, if given)."""
    driver.find_element("id", dropdown_id).click()
    if search:
        box = wait_for(
            lambda: driver.find_element(
                "css selector", ".dash-dropdown-content input.dash-dropdown-search"
            )
        )
        box.send_keys(search)
    sel = f".dash-dropdown-content input.dash-options-list-option-checkbox[value='{value}']"
    opt = wait_for(lambda: driver.find_element("css selector", sel), what=f"option {value}")
    driver.execute_script("arguments[0].closest('label').click()", opt)
    time.sleep(0.3)
    # close the popover
    driver.find_element("css selector", "body").send_keys("\ue00c")  # Escape
    time.sleep(0.2)


@pytest.mark.parametrize("name", list(PAGES))
def test_page_loads_without_console_errors(browser, live_server, name):
    path, graph_id = PAGES[name]
    browser.get_log("browser")  # clear
    open_page(browser, live_server.url + path)
    if graph_id:
        figure(browser, graph_id)
    idle(browser)
    time.sleep(0.5)
    screenshot(browser, name)
    assert severe_logs(browser) == []
    assert "Traceback" not in browser.page_source


def test_gene_recolours_umap(browser, live_server):
    browser.get_log("browser")
    open_page(browser, live_server.url + "/cells")
    before = figure(browser, "cells-umap")
    assert before["n"] > 1 and set(before["types"]) == {"scattergl"}  # one trace per type
    choose(browser, "cells-gene", "CD5", search="CD5")
    after = figure(browser, "cells-umap", until=lambda f: f["colorbar"] == "CD5")
    # binned single-colour traces + the colour-bar carrier; every cell drawn once
    drawn = [n for n, name in zip(after["lens"], after["names"]) if name != "colour bar"]
    assert len(drawn) > 1 and sum(drawn) == 3000
    assert all(c for c, name in zip(after["colours"], after["names"]) if name != "colour bar")
    choose(browser, "cells-gene", "CD19", search="CD19")
    second = figure(browser, "cells-umap", until=lambda f: f["colorbar"] == "CD19")
    drawn2 = [n for n, name in zip(second["lens"], second["names"]) if name != "colour bar"]
    assert sum(drawn2) == 3000 and drawn2 != drawn  # another gene, other bins
    wait_for(lambda: "gene=CD19" in browser.current_url, what="URL to follow the gene")
    idle(browser)
    screenshot(browser, "cells_gene")
    assert severe_logs(browser) == []


def test_condition_updates_violin(browser, live_server, vocab):
    ref, n = vocab["reference"], vocab["n_conditions"]
    browser.get_log("browser")
    open_page(browser, live_server.url + "/genes?gene=CD5")
    before = figure(browser, "genes-violin", until=lambda f: f["n"] == n)
    assert ref in before["names"]
    choose(browser, "genes-conditions", ref)  # toggles it off
    after = figure(browser, "genes-violin", until=lambda f: f["n"] == n - 1)
    assert ref not in after["names"]
    wait_for(lambda: "condition=" in browser.current_url, what="URL to keep the conditions")
    assert severe_logs(browser) == []


def test_interaction_filter_changes_dotplot(browser, live_server, vocab):
    sender = vocab["sender"]
    browser.get_log("browser")
    open_page(browser, live_server.url + "/interactions")
    before = figure(browser, "ia-dotplot")
    senders_before = {x.split(" → ")[0] for x in before["x"]}
    assert len(senders_before) > 1
    choose(browser, "ia-sender", sender)
    after = figure(
        browser,
        "ia-dotplot",
        until=lambda f: f["x"] and {x.split(" → ")[0] for x in f["x"]} == {sender},
    )
    assert after["x"] != before["x"]
    wanted = urlencode({"sender": sender})
    wait_for(lambda: wanted in browser.current_url, what="URL to keep the filter")
    # clicking a dot shows both partners' expression
    idle(browser)
    browser.execute_script(
        """const gd = document.querySelector('#ia-dotplot .js-plotly-plot');
           const t = gd.data[0];
           gd.emit('plotly_click', {points: [{x: t.x[0], y: t.y[0], curveNumber: 0,
                                              pointNumber: 0, pointIndex: 0}]});"""
    )
    expr = figure(browser, "ia-expression", until=lambda f: f["n"] >= 2)
    assert expr["n"] >= 2
    idle(browser)
    screenshot(browser, "interactions_filtered")
    assert severe_logs(browser) == []


def test_shared_url_restores_view(browser, live_server, vocab):
    ref, contrast, sender = vocab["reference"], vocab["contrast"], vocab["sender"]
    browser.get_log("browser")
    q = urlencode({"gene": "CD19", "condition": contrast})
    open_page(browser, live_server.url + "/genes?" + q)
    v = figure(browser, "genes-violin", until=lambda f: f["n"] == 1)
    assert v["names"] == [contrast]
    assert "CD19" in v["ytitle"]
    assert "CD19" in browser.find_element("id", "genes-gene").text
    open_page(browser, live_server.url + "/cells?gene=CD5&split=1")
    u = figure(browser, "cells-umap", until=lambda f: f["colorbar"] == "CD5")
    panels = set(u["names"]) - {"colour bar"}
    assert len(panels) == vocab["n_conditions"]  # one panel per condition
    screenshot(browser, "cells_split_shared_url")
    q = urlencode({"sender": sender, "condition": ref})
    open_page(browser, live_server.url + "/interactions?" + q)
    d = figure(browser, "ia-dotplot")
    assert {x.split(" → ")[0] for x in d["x"]} == {sender}
    assert severe_logs(browser) == []


def test_svg_button_downloads_the_figure(browser, live_server):
    browser.get_log("browser")
    open_page(browser, live_server.url + "/")
    figure(browser, "overview-comp-condition")
    btn = browser.find_element("css selector", "button[id*='overview-comp-condition']")
    btn.click()
    wait_for(lambda: btn.get_attribute("title").startswith("SVG saved"), what="SVG export")
    assert severe_logs(browser) == []


def test_unknown_url_values_give_a_message(browser, live_server):
    browser.get_log("browser")
    open_page(browser, live_server.url + "/genes?gene=NOT_A_GENE&condition=nope")
    msgs = wait_for(lambda: browser.find_elements("css selector", "#genes-messages .msg"))
    text = " ".join(m.text for m in msgs)
    assert "NOT_A_GENE" in text and "nope" in text
    figure(browser, "genes-violin")
    open_page(browser, live_server.url + "/no-such-page")
    assert "Page not found" in browser.find_element("id", "page").text
    assert severe_logs(browser) == []


def test_lasso_selection_and_quick_de(browser, live_server):
    browser.get_log("browser")
    open_page(browser, live_server.url + "/cells")
    figure(browser, "cells-umap")
    idle(browser)
    # a box selection over the whole left half of the embedding, sent as plotly does
    browser.execute_script(
        """const gd = document.querySelector('#cells-umap .js-plotly-plot');
           const xr = gd._fullLayout.xaxis.range, yr = gd._fullLayout.yaxis.range;
           gd.emit('plotly_selected', {points: [],
               range: {x: [xr[0], (xr[0] + xr[1]) / 2], y: [yr[0], yr[1]]}});"""
    )
    wait_for(
        lambda: "cells selected" in browser.find_element("id", "cells-sel-summary").text.lower(),
        what="selection summary",
    )
    btn = browser.find_element("id", "cells-de-btn")
    wait_for(lambda: btn.is_enabled(), what="DE button")
    btn.click()
    wait_for(
        lambda: "Compared" in browser.find_element("id", "cells-de-msg").text,
        timeout=60,
        what="quick DE",
    )
    figure(browser, "cells-de-bar", until=lambda f: f["n"] == 1 and f["types"] == ["bar"])
    idle(browser)
    screenshot(browser, "cells_selection")
    assert severe_logs(browser) == []
