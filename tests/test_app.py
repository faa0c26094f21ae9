"""The explorer without a browser: pages, callbacks (through Dash's HTTP endpoint), URL
validation, optional parts missing, mouse atlases, limits, WSGI and ``serve``."""

# ruff: noqa: F811 - pytest fixtures imported from app_fixtures
from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
from app_fixtures import (  # noqa: F401 - fixtures
    app_atlas_dir,
    app_atlas_dir_bare,
    app_atlas_dir_mouse,
    dash_app,
    small_config,
    vocab,
)

from app import urls
from app.factory import create_app
from atlas import schema


# ----------------------------------------------------------------------------- helpers
def _outputs(key: str):
    if key.startswith(".."):
        parts = key.strip(".").split("...")
        return [_split(p) for p in parts]
    return _split(key)


def _split(spec: str) -> dict:
    spec = spec.split("@")[0]
    cid, prop = spec.rsplit(".", 1)
    return {"id": json.loads(cid) if cid.startswith("{") else cid, "property": prop}


def dispatch(app, output: str, values: dict, *, triggered: str | None = None):
    """POST one callback to /_dash-update-component; ``output`` is a substring of its key;
    ``values`` maps "id.prop" to the value of each input and state."""
    key = next(k for k in app.callback_map if output in k)
    cb = app.callback_map[key]

    def fill(items):
        return [{**i, "value": values.get(f"{i['id']}.{i['property']}")} for i in items]

    inputs = fill(cb["inputs"])
    payload = {
        "output": key,
        "outputs": _outputs(key),
        "inputs": inputs,
        "state": fill(cb["state"]),
        "changedPropIds": [triggered or f"{inputs[0]['id']}.{inputs[0]['property']}"],
    }
    r = app.server.test_client().post("/_dash-update-component", json=payload)
    assert r.status_code in (200, 204), r.data[:500]
    return r.get_json() if r.status_code == 200 else None


def text_of(component) -> str:
    """All strings inside a Dash component tree (or its JSON)."""
    if hasattr(component, "to_plotly_json"):
        component = json.loads(json.dumps(component, cls=_Enc))
    out = []

    def walk(x):
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)

    walk(component)
    return " ".join(out)


from plotly.utils import PlotlyJSONEncoder as _Enc  # noqa: E402


def route(app, path: str, search: str = ""):
    res = dispatch(app, "page.children", {"url.pathname": path, "url.search": search})
    return res["response"]["page"]["children"]


# ----------------------------------------------------------------------------- basics
def test_healthz_index_and_no_cdn(dash_app):
    c = dash_app.server.test_client()
    r = c.get("/healthz")
    assert r.status_code == 200 and r.get_json() == {"status": "ok"}  # the status only
    html = c.get("/").get_data(as_text=True)
    assert "CLL TME Atlas" in html
    assert "https://" not in html.split("<body>")[0]  # no external scripts or styles
    assert c.get("/assets/style.css").status_code == 200


def test_every_page_renders(dash_app):
    for path, needle in (
        ("/", "Atlas overview"),
        ("/cells", "Cells"),
        ("/genes", "Pseudobulk"),
        ("/interactions", "Interactions"),
        ("/downloads", "Downloads"),
        ("/nowhere", "Page not found"),
    ):
        assert needle in text_of(route(dash_app, path)), path


def test_url_parameters_are_validated(dash_app, vocab):
    ref = vocab["reference"]
    body = text_of(route(dash_app, "/genes", f"?gene=<script>&condition=bogus,{ref}"))
    assert "unknown gene" in body and "unknown condition" in body and "Traceback" not in body
    body = text_of(route(dash_app, "/cells", "?color=nope&gene=XYZ123"))
    assert "Unknown colour" in body and "unknown gene" in body
    body = text_of(route(dash_app, "/interactions", "?sender=Martians&condition=mars"))
    assert "unknown sender" in body and "unknown condition" in body
    long = "?gene=" + "A" * 5000
    assert "Traceback" not in text_of(route(dash_app, "/genes", long))


def test_url_helpers_round_trip():
    q = urls.build_query({"gene": "CD5", "condition": ["A", "B"], "split": True, "x": None})
    assert q == "?gene=CD5&condition=A,B&split=1"
    p = urls.parse_query(q)
    assert p == {"gene": "CD5", "condition": "A,B", "split": "1"}
    assert urls.as_list(p["condition"]) == ["A", "B"] and urls.as_bool(p["split"])
    assert urls.build_query({}) == "" and urls.parse_query(None) == {}


# ----------------------------------------------------------------------------- cells
def test_cells_gene_switch_patches_binned_traces(dash_app):
    import base64

    def switch(meta):
        t0 = time.perf_counter()
        res = dispatch(
            dash_app,
            "cells-umap.figure",
            {
                "cells-colour.value": "cell_type",
                "cells-gene.value": "CD19",
                "cells-split.value": [],
                "cells-umap-meta.data": meta,
            },
            triggered="cells-gene.value",
        )
        return res["response"], time.perf_counter() - t0

    # from a categorical view: the whole figure
    resp, _ = switch({"mode": "categorical", "split": False, "label": "cell_type"})
    fig = resp["cells-umap"]["figure"]
    assert fig["layout"]["coloraxis"]["colorbar"]["title"]["text"] == "CD19"
    full = [t for t in fig["data"] if t.get("name") != "colour bar"]
    assert len(full) > 1 and all(isinstance(t["marker"]["color"], str) for t in full)
    n = sum(len(base64.b64decode(t["x"]["bdata"])) // 4 for t in full)
    assert n == len(dash_app.tme.view.display_idx)  # every displayed cell drawn once
    assert resp["cells-umap-meta"]["data"]["mode"] == "continuous"
    # from another gene: a Patch of the traces and the colour range only
    resp, elapsed = switch({"mode": "continuous", "split": False, "label": "CD5"})
    patch = resp["cells-umap"]["figure"]
    assert patch.get("__dash_patch_update") == "__dash_patch_update"
    ops = {tuple(o["location"]): o["params"]["value"] for o in patch["operations"]}
    assert ops[("layout", "coloraxis", "colorbar", "title", "text")] == "CD19"
    traces = ops[("data",)]
    assert [len(t["x"]["bdata"]) for t in traces] == [len(t["x"]["bdata"]) for t in fig["data"]]
    assert [t["marker"]["color"] for t in traces] == [t["marker"]["color"] for t in fig["data"]]
    assert elapsed < 2.0


def test_cells_full_figure_categorical_and_split(dash_app):
    res = dispatch(
        dash_app,
        "cells-umap.figure",
        {
            "cells-colour.value": "cell_type",
            "cells-gene.value": None,
            "cells-split.value": ["split"],
            "cells-umap-meta.data": None,
        },
    )
    fig = res["response"]["cells-umap"]["figure"]
    assert {t["type"] for t in fig["data"]} == {"scattergl"}
    assert res["response"]["cells-umap-meta"]["data"] == {
        "mode": "categorical",
        "split": True,
        "label": "cell_type",
        "query": False,  # the synthetic atlas has no mapped query cells
    }
    # coordinates travel base64-encoded
    assert fig["data"][0]["x"]["dtype"] == "f4"
    res = dispatch(
        dash_app,
        "cells-umap.figure",
        {
            "cells-colour.value": "score_nfkb",
            "cells-gene.value": None,
            "cells-split.value": [],
        },
    )
    fig = res["response"]["cells-umap"]["figure"]
    assert fig["layout"]["coloraxis"]["colorbar"]["title"]["text"]
    assert {t["name"] for t in fig["data"]} == {"all", "colour bar"}


def test_selection_uses_all_cells_and_quick_de(dash_app):
    from app.pages.cells import selected_cells
    from app.stats import quick_de

    view = dash_app.tme.view
    xy = view.umap
    mid = float(np.median(xy[:, 0]))
    sel = {"range": {"x": [float(xy[:, 0].min()) - 1, mid], "y": [-1e9, 1e9]}}
    cells = selected_cells(view, sel, split=False)
    assert len(cells) == int((xy[:, 0] <= mid).sum())
    # split: panel 2 (x2/y2) holds the second condition only
    sel2 = {"range": {"x2": [-1e9, 1e9], "y2": [-1e9, 1e9]}}
    c2 = selected_cells(view, sel2, split=True)
    cond = view.codes("condition")
    assert set(cond[c2]) == {view.conditions[1]}
    res, note = quick_de(view, cells, max_cells=400)
    assert {"gene", "log2fc", "pvalue", "padj"} <= set(res.columns)
    assert "capped at 400" in note
    assert res["padj"].between(0, 1).all()

    out = dispatch(
        dash_app,
        "cells-download.data",
        {
            "cells-export-btn.n_clicks": 1,
            "cells-umap.selectedData": sel,
            "cells-umap-meta.data": {"split": False},
        },
    )
    csv = out["response"]["cells-download"]["data"]["content"]
    df = pd.read_csv(__import__("io").StringIO(csv))
    assert len(df) == len(cells) and df["cell_id"].is_unique


def test_rank_sum_matches_scipy():
    from scipy import stats

    from app.stats import bh_adjust, rank_sum_test

    rng = np.random.default_rng(0)
    a = rng.poisson(2, size=(60, 3)).astype(float)
    b = rng.poisson(3, size=(80, 3)).astype(float)
    _, p = rank_sum_test(a, b)
    for j in range(3):
        ref = stats.mannwhitneyu(a[:, j], b[:, j], method="asymptotic").pvalue
        assert p[j] == pytest.approx(ref, rel=1e-6)
    assert bh_adjust(np.array([0.01, 0.04, 0.03])).tolist() == pytest.approx([0.03, 0.04, 0.04])


def test_display_downsampling_is_fixed_and_capped(app_atlas_dir):
    a1 = create_app(app_atlas_dir, small_config(max_display_points=1000))
    a2 = create_app(app_atlas_dir, small_config(max_display_points=1000))
    v1, v2 = a1.tme.view, a2.tme.view
    assert len(v1.display_idx) == 1000 and v1.downsampled
    np.testing.assert_array_equal(v1.display_idx, v2.display_idx)
    assert "random subset of 1,000 of 3,000" in text_of(route(a1, "/cells"))
    res = dispatch(
        a1, "cells-umap.figure", {"cells-colour.value": "cell_type", "cells-split.value": []}
    )
    fig = res["response"]["cells-umap"]["figure"]
    import base64

    n = sum(len(base64.b64decode(t["x"]["bdata"])) // 4 for t in fig["data"])
    assert n == 1000


# ----------------------------------------------------------------------------- genes
def test_genes_callbacks(dash_app, vocab):
    ref, contrast, de_type = vocab["reference"], vocab["contrast"], vocab["de_cell_type"]
    res = dispatch(
        dash_app,
        "genes-violin.figure",
        {"genes-gene.value": "CD5", "genes-conditions.value": [ref]},
    )
    fig = res["response"]["genes-violin"]["figure"]
    assert [t["name"] for t in fig["data"]] == [ref]
    res = dispatch(
        dash_app,
        "genes-violin.figure",
        {"genes-gene.value": "NOPE", "genes-conditions.value": [ref]},
    )
    assert "unknown gene" in text_of(res["response"]["genes-violin"]["figure"]["layout"])
    res = dispatch(
        dash_app,
        "genes-gene.options",
        {"genes-gene.search_value": "cd1", "genes-gene.value": "CD5"},
    )
    labels = [o["value"] for o in res["response"]["genes-gene"]["options"]]
    assert labels[0] == "CD5" and "CD19" in labels
    res = dispatch(
        dash_app,
        "genes-dotplot.figure",
        {
            "genes-dot-genes.value": [],
            "genes-dot-program.value": "nfkb",
            "genes-dot-split.value": ["split"],
        },
    )
    fig = res["response"]["genes-dotplot"]["figure"]
    assert "nfkb" in fig["layout"]["title"]["text"]
    res = dispatch(
        dash_app,
        "genes-volcano.figure",
        {
            "genes-de-celltype.value": de_type,
            "genes-de-contrast.value": contrast,
            "genes-gene.value": "CD5",
        },
    )
    rows = res["response"]["genes-de-table"]["data"]
    assert rows and {r["cell_type"] for r in rows} == {de_type}
    assert {r["condition"] for r in rows} == {contrast}


def test_too_many_genes_is_refused(app_atlas_dir):
    a = create_app(app_atlas_dir, small_config(max_genes_per_request=2))
    res = dispatch(
        a,
        "genes-dotplot.figure",
        {
            "genes-dot-genes.value": ["CD5", "CD19", "CD3E"],
            "genes-dot-program.value": None,
            "genes-dot-split.value": [],
        },
    )
    assert "too many genes" in text_of(res["response"]["genes-dotplot"]["figure"]["layout"])


# ----------------------------------------------------------------------------- interactions
def test_interactions_filters_and_click(dash_app, vocab):
    ref, sender = vocab["reference"], vocab["sender"]
    base = {
        "ia-condition.value": ref,
        "ia-sender.value": [],
        "ia-receiver.value": [],
        "ia-ligand.value": [],
        "ia-receptor.value": [],
        "ia-curated.value": [],
        "ia-heat-metric.value": "count",
    }
    all_ = dispatch(dash_app, "ia-dotplot.figure", base)["response"]
    cll = dispatch(dash_app, "ia-dotplot.figure", {**base, "ia-sender.value": [sender]})["response"]
    assert {r["source"] for r in cll["ia-table"]["data"]} == {sender}
    assert (
        len(cll["ia-table"]["data"]) < len(all_["ia-table"]["data"])
        or len(all_["ia-table"]["data"]) == 500
    )
    cur = dispatch(dash_app, "ia-dotplot.figure", {**base, "ia-curated.value": ["curated"]})[
        "response"
    ]
    assert all(r["curated"] == "True" for r in cur["ia-table"]["data"])
    first = all_["ia-table"]["data"][0]
    pick = {k: first[k] for k in ("source", "target", "ligand", "receptor")}
    res = dispatch(dash_app, "ia-expression.figure", {"ia-pick.data": pick})
    fig = res["response"]["ia-expression"]["figure"]
    # ligand and receptor, one bar trace per condition (when the atlas measures both)
    assert len(fig["data"]) in (0, 2 * vocab["n_conditions"])
    res = dispatch(
        dash_app,
        "ia-diff.figure",
        {
            "ia-contrast.value": vocab["contrast"],
            "ia-sender.value": [],
            "ia-receiver.value": [],
            "ia-ligand.value": [],
            "ia-receptor.value": [],
            "ia-curated.value": [],
        },
    )
    rows = res["response"]["ia-diff-table"]["data"]
    assert rows and {r["change"] for r in rows} <= {"gained", "lost", "unchanged"}
    # the two-sided call, its driver and the abundance change are shown; calls first
    assert {"called", "driver", "source_frac_log2fc", "target_frac_log2fc"} <= set(rows[0])
    called = [str(r["called"]).lower() == "true" for r in rows]
    assert called == sorted(called, reverse=True)


# ----------------------------------------------------------------------------- downloads
def test_downloads_tables_and_export_limit(app_atlas_dir, vocab):
    ref = vocab["reference"]
    a = create_app(app_atlas_dir, small_config(max_export_cells=100))
    res = dispatch(
        a, "dl-table-download.data", {"dl-table-btn.n_clicks": 1, "dl-table.value": "de"}
    )
    data = res["response"]["dl-table-download"]["data"]
    assert data["filename"] == "de.csv" and data["content"].startswith("cell_type")
    res = dispatch(
        a,
        "dl-subset-count.children",
        {"dl-cell_types.value": [], "dl-conditions.value": [ref]},
    )
    assert "above the limit" in res["response"]["dl-subset-count"]["children"]
    assert res["response"]["dl-export-btn"]["disabled"] is True
    res = dispatch(
        a,
        "dl-export-msg.children",
        {"dl-export-btn.n_clicks": 1, "dl-conditions.value": [ref]},
    )
    assert "above the export limit" in text_of(res["response"]["dl-export-msg"]["children"])


def test_export_subset_h5ad(dash_app, app_atlas_dir, vocab):
    ref, de_type = vocab["reference"], vocab["de_cell_type"]
    pytest.importorskip("atlas.export")
    res = dispatch(
        dash_app,
        "dl-export-msg.children",
        {
            "dl-export-btn.n_clicks": 1,
            "dl-cell_types.value": [de_type],
            "dl-conditions.value": [ref],
        },
    )
    out = res["response"]
    if "dl-export-download" not in out:
        pytest.fail(text_of(out))
    d = out["dl-export-download"]["data"]
    assert d["filename"] == "atlas_subset.h5ad" and d["base64"] and len(d["content"]) > 1000


# ----------------------------------------------------------------------------- robustness
def test_atlas_without_optional_parts(app_atlas_dir_bare, vocab):
    ref = vocab["reference"]
    a = create_app(app_atlas_dir_bare, small_config())
    body = text_of(route(a, "/interactions"))
    assert "no ligand–receptor results yet" in body
    assert "No pseudobulk DE table" in text_of(route(a, "/genes"))
    assert "No composition test results" in text_of(route(a, "/"))
    res = dispatch(
        a,
        "genes-violin.figure",
        {"genes-gene.value": "CD5", "genes-conditions.value": [ref]},
    )
    assert res["response"]["genes-violin"]["figure"]["data"]


def test_mouse_atlas(app_atlas_dir_mouse):
    a = create_app(app_atlas_dir_mouse, small_config())
    view = a.tme.view
    assert view.species == "mouse"
    assert view.resolve_gene("CD5") == "Cd5"  # case-insensitive symbols
    body = text_of(route(a, "/genes", "?gene=cd19"))
    assert "unknown gene" not in body
    for path in ("/", "/cells", "/interactions", "/downloads"):
        assert "could not be shown" not in text_of(route(a, path))


def test_wsgi_server_from_environment(app_atlas_dir, monkeypatch):
    import app.wsgi as wsgi

    monkeypatch.setenv("TME_ATLAS_ATLAS", str(app_atlas_dir))
    monkeypatch.setattr(wsgi, "_APP", None)
    server = wsgi.get_app().server  # the Flask server of the explorer
    assert server.test_client().get("/healthz").get_json() == {"status": "ok"}


def test_serve_uses_config(app_atlas_dir, monkeypatch):
    import os

    from app.server import serve

    seen = {}

    def fake_exec(file, argv, env):
        seen.update(file=file, argv=argv, env=env)

    monkeypatch.setattr(os, "execvpe", fake_exec)
    serve(
        app_atlas_dir,
        config=small_config().model_copy(
            update={"serve": small_config().serve.model_copy(update={"port": 8123})}
        ),
    )
    # the production command (gunicorn, the image's CMD), never Flask's development server
    assert seen["argv"][1:3] == ["-m", "gunicorn"]
    assert seen["argv"][-1] == "app.wsgi:server" and seen["argv"][-2].endswith("gunicorn_conf.py")
    env = seen["env"]
    assert env["TME_ATLAS__SERVE__PORT"] == "8123" and env["TME_ATLAS__SERVE__HOST"] == "127.0.0.1"
    assert env["TME_ATLAS_ATLAS"] == str(app_atlas_dir.resolve())
    from atlas.errors import InputError

    with pytest.raises(InputError):
        serve(app_atlas_dir / "missing", config=small_config())


def test_volcano_click_selects_gene(dash_app):
    res = dispatch(
        dash_app,
        "genes-gene.value@",
        {"genes-volcano.clickData": {"points": [{"text": "CD19"}]}},
        triggered="genes-volcano.clickData",
    )
    assert res["response"]["genes-gene"]["value"] == "CD19"


def test_large_export_is_a_one_time_link(app_atlas_dir, vocab):
    pytest.importorskip("atlas.export")
    dash_app = create_app(app_atlas_dir, small_config(export_inline_bytes=0))
    res = dispatch(
        dash_app,
        "dl-export-msg.children",
        {"dl-export-btn.n_clicks": 1, "dl-conditions.value": [vocab["reference"]]},
    )
    out = res["response"]
    assert "dl-export-download" not in out
    href = next(
        c["props"]["href"]
        for c in out["dl-export-msg"]["children"]["props"]["children"]
        if isinstance(c, dict) and "href" in c.get("props", {})
    )
    c = dash_app.server.test_client()
    r = c.get(href)
    assert r.status_code == 200 and len(r.data) > 1000
    assert "attachment" in r.headers["Content-Disposition"]
    r.close()
    assert c.get(href).status_code == 404  # one download only
    assert c.get(href.rsplit("/", 1)[0] + "/forged").status_code == 404


def test_wrong_types_are_no_update_not_500(dash_app):
    key = next(k for k in dash_app.callback_map if "genes-violin.figure" in k)
    cb = dash_app.callback_map[key]
    payload = {
        "output": key,
        "outputs": _outputs(key),
        "inputs": [
            {"id": "genes-gene", "property": "value", "value": "CD5"},
            {"id": "genes-conditions", "property": "value", "value": -1},
            {"id": "genes-violin-zeros", "property": "value", "value": []},
        ],
        "state": [],
        "changedPropIds": ["genes-conditions.value"],
    }
    assert len(cb["inputs"]) == 3
    r = dash_app.server.test_client().post("/_dash-update-component", json=payload)
    assert r.status_code == 204


def test_a_fresh_worker_serves_every_bundle_of_a_page(app_atlas_dir):
    """Under gunicorn (4 threads per worker) a fresh worker gets a page's bundle requests at
    once; Dash registered the bundle paths only while handling its first request, and the
    threads that raced it answered 404 (a blank page in the browser benchmark). The paths
    are registered when the app is built, before any request."""
    import re

    page_worker = create_app(app_atlas_dir, small_config())
    html = page_worker.server.test_client().get("/cells").get_data(as_text=True)
    srcs = re.findall(r'src="[^"]*_dash-component-suites/([^/"]+)/([^"]+)"', html)
    assert any("polyfill" in path for _, path in srcs) and len(srcs) > 5
    fresh = create_app(app_atlas_dir, small_config())  # no request served yet
    registered = {
        ns: {re.sub(r"\.v[^.]+m\d+", "", p) for p in ps}
        for ns, ps in fresh.registered_paths.items()
    }
    missing = [
        (ns, p) for ns, p in srcs if re.sub(r"\.v[^.]+m\d+", "", p) not in registered.get(ns, set())
    ]
    assert missing == []
    client = fresh.server.test_client()
    assert all(client.get(f"/_dash-component-suites/{ns}/{p}").status_code == 200 for ns, p in srcs)


# ----------------------------------------------------------------------------- malignant call
def test_patient_lesion_table():
    from app.pages.overview import patient_lesion_table

    les = pd.DataFrame(
        {
            "patient": ["P1", "P1", "P2", "P2"],
            "lesion": ["trisomy 12", "del(13q14)"] * 2,
            "chromosome": ["12", "13"] * 2,
            "start": [1, 48_300_000] * 2,
            "end": [133_275_309, 51_600_000] * 2,
            "kind": ["gain", "loss"] * 2,
            "called": [True, False, False, False],
            "frac_b_cells": [0.7, 0.01, 0.0, 0.0],
            "frac_malignant": [0.9, 0.01, np.nan, np.nan],
            "frac_reference": [0.01, 0.02, 0.0, 0.01],
            "n_b_cells": [100, 100, 80, 80],
            "recurrent": [True, True, True, True],
        }
    )
    clones = pd.DataFrame(
        {
            "patient": ["P1", "P2"],
            "source": ["vdj", "expression"],
            "clonotype": ["vdj:3", "IGHV1-2|IGKV1-5"],
            "ighv": ["IGHV1-69", "IGHV1-2"],
            "light_v": ["IGKV1-5", "IGKV1-5"],
            "ighv_identity": [99.5, np.nan],
            "ighv_status": ["U-CLL", ""],
            "n_b_cells": [100, 80],
            "n_typed": [90, 70],
            "clone_fraction": [0.85, 0.05],
            "clonal": [True, False],
            "n_malignant": [88, 0],
        }
    )
    t = patient_lesion_table(les, clones).set_index("patient")
    assert t.loc["P1", "lesions called"] == "trisomy 12 (90%)"
    assert t.loc["P2", "lesions called"] == "none"
    assert bool(t.loc["P1", "clonal"]) and not bool(t.loc["P2", "clonal"])
    assert t.loc["P1", "IGHV status"] == "U-CLL" and t.loc["P2", "malignant cells"] == 0
    assert t.loc["P1", "trisomy 12"] == 0.9 and np.isnan(t.loc["P1", "del(13q14)"])
    assert np.isnan(t.loc["P2", "trisomy 12"])


def test_overview_shows_lesions_and_cnv_heatmap(dash_app):
    body = text_of(route(dash_app, "/"))
    assert "Clone and copy-number lesions per patient" in body
    assert "Inferred copy number" in body


def test_cells_colour_by_cnv_score_and_clonotype(app_atlas_dir):
    import atlas
    from app.data import LUMPED, LUMPED_NONE, LUMPED_OTHER
    from app.pages.cells import colour_options, colour_values

    view = _view(app_atlas_dir)
    values = [o["value"] for o in colour_options(view)]
    for col in (schema.OBS_CNV_SCORE, schema.OBS_CLONOTYPE, schema.OBS_MALIGNANT):
        assert col in values, col
    # clonotype: one category per dominant clone, the rest lumped, non-B cells 'none'
    vals, categorical, _, cats = colour_values(view, None, schema.OBS_CLONOTYPE)
    assert categorical and len(cats) <= LUMPED[schema.OBS_CLONOTYPE] + 2
    assert LUMPED_NONE in cats and LUMPED_OTHER in cats
    raw = atlas.open(app_atlas_dir).obs([schema.OBS_CLONOTYPE, schema.OBS_MALIGNANT])
    mal = raw[schema.OBS_MALIGNANT].to_numpy(bool)
    lumped = np.asarray(view.cat(schema.OBS_CLONOTYPE).astype(str))
    assert (lumped[mal] == raw[schema.OBS_CLONOTYPE].astype(str).to_numpy()[mal]).all()
    assert (lumped[raw[schema.OBS_CLONOTYPE].astype(str).to_numpy() == ""] == LUMPED_NONE).all()
    # numeric colour
    vals, categorical, label, _ = colour_values(view, None, schema.OBS_CNV_SCORE)
    assert not categorical and label == schema.OBS_CNV_SCORE and np.isfinite(vals).all()


def _view(atlas_dir):
    import atlas
    from app.data import AtlasView
    from atlas.config import load_config

    return AtlasView(atlas.open(atlas_dir), load_config(env={}).limits)
