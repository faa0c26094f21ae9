"""The explorer's figures are pure functions: tested on hand-made frames, without Dash."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from app import figures as F


@pytest.fixture
def umap_df():
    rng = np.random.default_rng(0)
    n = 600
    return pd.DataFrame(
        {
            "x": rng.normal(size=n).astype(np.float32),
            "y": rng.normal(size=n).astype(np.float32),
            "value": rng.choice(["B", "T", "Mono"], size=n),
            "panel": rng.choice(["REF", "IBR_RES", "VEN_RES"], size=n),
        }
    )


def test_umap_categorical_split(umap_df):
    fig = F.umap_figure(
        umap_df, categorical=True, panel_order=["REF", "IBR_RES", "VEN_RES"], colour_label="type"
    )
    assert all(t.type == "scattergl" for t in fig.data)
    # one trace per (panel, category); legend shown once per category
    assert len(fig.data) == 9
    assert sum(bool(t.showlegend) for t in fig.data) == 3
    assert sum(len(t.x) for t in fig.data) == len(umap_df)
    # subplot titles carry the panel names in the given order
    titles = [a.text for a in fig.layout.annotations]
    assert titles[0].startswith("REF") and titles[1].startswith("IBR_RES")
    # trace rows map plotly points back to the frame's rows
    rows = F.umap_trace_rows(umap_df, categorical=True, panel_order=["REF", "IBR_RES", "VEN_RES"])
    for (p, c, r), t in zip(rows, fig.data):
        assert (umap_df["panel"].to_numpy()[r] == p).all()
        assert (umap_df["value"].to_numpy()[r] == c).all()
        np.testing.assert_array_equal(np.asarray(t.x), umap_df["x"].to_numpy()[r])


def _bin_traces(fig):
    return [t for t in fig.data if t.name != F.COLOURBAR_TRACE]


def test_umap_continuous_is_binned_single_colour_traces(umap_df):
    df = umap_df.drop(columns="panel").assign(value=np.linspace(0, 3, len(umap_df)))
    fig = F.umap_figure(df, categorical=False, colour_label="CD5")
    assert fig.layout.coloraxis.cmin == 0 and fig.layout.coloraxis.cmax == pytest.approx(3)
    assert fig.layout.coloraxis.colorbar.title.text == "CD5"
    carrier = [t for t in fig.data if t.name == F.COLOURBAR_TRACE]
    assert len(carrier) == 1 and carrier[0].marker.coloraxis == "coloraxis"
    traces = _bin_traces(fig)
    assert len(traces) == F.CONTINUOUS_BINS  # values span the range: every bin is used
    assert sum(len(t.x) for t in traces) == len(df)
    scale = F.sample_scale(F.CONTINUOUS_SCALE, F.CONTINUOUS_BINS)
    assert [t.marker.color for t in traces] == scale  # one colour each, low to high
    # every point sits in its bin: the trace's x values are those of the cells in the bin
    bins = F.continuous_bins(df["value"].to_numpy(), 0.0, 3.0)
    for k, t in enumerate(traces):
        np.testing.assert_array_equal(np.sort(t.x), np.sort(df["x"].to_numpy()[bins == k]))
    payload = json.loads(fig.to_json())
    # numpy float32 arrays travel as base64 typed arrays, not JSON lists
    assert payload["data"][1]["x"]["dtype"] == "f4"


def test_continuous_bins_and_missing_values():
    b = F.continuous_bins(np.array([0.0, 0.49, 0.5, 1.0, np.nan, 7.0]), 0.0, 1.0, k=2)
    assert b.tolist() == [0, 0, 1, 1, -1, 1]
    df = pd.DataFrame({"x": [0.0, 1, 2, 3], "y": [0.0, 1, 2, 3], "value": [np.nan, 0, 1, 2]})
    traces = _bin_traces(F.umap_figure(df, categorical=False))
    assert traces[0].marker.color == F.NA_COLOUR and list(traces[0].x) == [0.0]  # underneath
    assert sum(len(t.x) for t in traces) == 4


def test_umap_continuous_split_keeps_panels(umap_df):
    df = umap_df.assign(value=np.arange(len(umap_df), dtype=float))
    order = ["VEN_RES", "REF", "IBR_RES"]
    fig = F.umap_figure(df, categorical=False, panel_order=order)
    traces = _bin_traces(fig)
    assert [t.name for t in traces] == sorted((t.name for t in traces), key=order.index)
    for t in traces:
        ax = "x" if t.xaxis in (None, "x") else t.xaxis
        panel = order[0] if ax == "x" else order[int(ax[1:]) - 1]
        assert t.name == panel
        sub = df[df["panel"] == panel]
        assert set(np.asarray(t.x).tolist()) <= set(sub["x"].astype(np.float32).tolist())
    assert sum(len(t.x) for t in traces) == len(df)


def test_umap_colour_patch_matches_the_figure(umap_df):
    import base64

    df = umap_df.assign(value=np.arange(len(umap_df), dtype=float))
    order = ["VEN_RES", "REF", "IBR_RES"]
    fig = F.umap_figure(df, categorical=False, panel_order=order, colour_label="CD5")
    traces, cmin, cmax = F.umap_colour_patch(df, colour_label="CD5", panel_order=order)
    assert (cmin, cmax) == (0, len(df) - 1)
    assert len(traces) == len(fig.data)
    for t, f in zip(traces, fig.data):
        x = np.frombuffer(base64.b64decode(t["x"]["bdata"]), dtype=np.float32)
        np.testing.assert_array_equal(x, np.asarray(f.x))
        assert t["xaxis"] == (f.xaxis or "x") and t["yaxis"] == (f.yaxis or "y")
        assert t["name"] == f.name
        if t["name"] != F.COLOURBAR_TRACE:
            assert t["marker"]["color"] == f.marker.color


def test_umap_empty_and_constant():
    fig = F.umap_figure(pd.DataFrame(columns=["x", "y", "value"]), categorical=True)
    assert fig.layout.annotations[0].text == "No cells to show"
    df = pd.DataFrame({"x": [0.0, 1.0], "y": [0.0, 1.0], "value": [2.0, 2.0]})
    fig = F.umap_figure(df, categorical=False)
    assert fig.layout.coloraxis.cmax > fig.layout.coloraxis.cmin


def test_selection_geometry_and_points():
    sel = {
        "range": {"x2": [0, 1], "y2": [0, 1]},
        "lassoPoints": {"x": [0, 2, 2, 0], "y": [0, 0, 2, 2]},
    }
    shapes = F.selection_geometry(sel)
    kinds = {(i, k) for i, k, _ in shapes}
    assert kinds == {(1, "box"), (0, "lasso")}
    x = np.array([0.5, 1.5, 3.0])
    y = np.array([0.5, 1.5, 0.5])
    for _i, kind, v in shapes:
        mask = F.points_in_shape(x, y, kind, v)
        if kind == "box":
            assert mask.tolist() == [True, False, False]
        else:
            assert mask.tolist() == [True, True, False]
    # the pure-numpy fallback agrees
    v = np.array([[0, 0], [2, 0], [2, 2], [0, 2]], float)
    assert F._ray_cast(x, y, v[:, 0], v[:, 1]).tolist() == [True, True, False]
    assert F.selection_geometry(None) == []


def test_composition_bar_normalises_per_group():
    df = pd.DataFrame(
        {
            "condition": ["A", "A", "B", "B"],
            "cell_type": ["T", "B", "T", "B"],
            "n": [10, 30, 5, 5],
        }
    )
    fig = F.composition_bar(df, group="condition", group_order=["B", "A"])
    assert fig.layout.barmode == "stack"
    by_name = {t.name: list(t.y) for t in fig.data}
    assert by_name["T"] == pytest.approx([0.5, 0.25])
    assert by_name["B"] == pytest.approx([0.5, 0.75])
    assert list(fig.data[0].x) == ["B", "A"]


def test_composition_effects_stars_significant():
    df = pd.DataFrame(
        {
            "cell_type": ["T", "B", "T", "B"],
            "condition": ["X", "X", "Y", "Y"],
            "log2fc": [1.0, -0.5, 0.2, 0.0],
            "padj": [0.01, 0.5, 0.2, 0.9],
        }
    )
    fig = F.composition_effects(df, effect="log2fc", significance="padj")
    hm = fig.data[0]
    assert isinstance(hm, go.Heatmap)
    assert "★" in np.asarray(hm.text).ravel().tolist()
    assert F.composition_effects(df, effect="nope").layout.annotations


def test_violin_one_trace_per_condition():
    rng = np.random.default_rng(1)
    df = pd.DataFrame(
        {
            "group": rng.choice(["T", "B"], 200),
            "condition": rng.choice(["REF", "RES"], 200),
            "value": rng.random(200),
        }
    )
    fig = F.violin_figure(df, gene="CD5", condition_order=["RES", "REF"])
    assert [t.name for t in fig.data] == ["RES", "REF"]
    assert fig.layout.violinmode == "group"
    assert "CD5" in fig.layout.yaxis.title.text
    assert F.violin_figure(df.iloc[:0], gene="CD5").layout.annotations


def test_dotplot_sizes_and_orders():
    df = pd.DataFrame(
        {
            "gene": ["A", "A", "B", "B"],
            "group": ["T", "B", "T", "B"],
            "mean": [1.0, 0.0, 0.5, 2.0],
            "frac": [1.0, 0.0, 0.25, 0.5],
        }
    )
    fig = F.dotplot_figure(df, y_order=["B", "A"])
    sizes = np.asarray(fig.data[0].marker.size)
    assert sizes[0] > sizes[3] > sizes[2] > sizes[1]
    assert list(fig.layout.yaxis.categoryarray) == ["A", "B"]  # first gene on top


def test_volcano_classifies_and_labels():
    df = pd.DataFrame(
        {
            "gene": ["UP1", "DN1", "NS1", "NS2"],
            "log2fc": [2.0, -3.0, 0.1, 2.5],
            "padj": [1e-5, 1e-3, 1e-8, 0.5],
        }
    )
    fig = F.volcano_figure(df, highlight="NS2")
    names = [t.name for t in fig.data]
    assert names == ["n.s. (2)", "down (1)", "up (1)"]
    labels = {a.text for a in fig.layout.annotations}
    assert {"UP1", "DN1", "NS2"} <= labels
    assert F.volcano_figure(df.iloc[:0]).layout.annotations[0].text.startswith("No DE")


@pytest.fixture
def lr_df():
    return pd.DataFrame(
        {
            "source": ["T", "T", "Mono", "CLL"],
            "target": ["CLL", "CLL", "CLL", "T"],
            "ligand": ["CD40LG", "IL4", "CXCL12", "CD70"],
            "receptor": ["CD40", "IL4R", "CXCR4", "CD27"],
            "magnitude": [0.9, 0.5, 0.7, 0.3],
            "specificity": [3.0, 1.0, 2.0, 0.5],
        }
    )


def test_interaction_dotplot(lr_df):
    fig = F.interaction_dotplot(lr_df, score="magnitude", size="specificity", max_pairs=3)
    assert len(fig.data[0].x) == 3  # the weakest pair is dropped
    assert "T → CLL" in set(fig.data[0].x)
    assert "CD40LG → CD40" in set(fig.data[0].y)
    assert F.interaction_dotplot(lr_df.iloc[:0], score="magnitude").layout.annotations


def test_interaction_matrix_heatmap_network(lr_df):
    m = F.interaction_matrix(lr_df, score="magnitude")
    assert list(m.index) == list(m.columns) == ["CLL", "Mono", "T"]
    assert m.loc["T", "CLL"] == pytest.approx(1.4)
    assert F.interaction_matrix(lr_df, score="magnitude", how="count").loc["T", "CLL"] == 2
    hm = F.interaction_heatmap(m, label="sum")
    assert isinstance(hm.data[0], go.Heatmap)
    net = F.interaction_network(m, label="sum")
    arrows = [a for a in net.layout.annotations if a.showarrow]
    assert len(arrows) == 3  # T->CLL, Mono->CLL, CLL->T
    nodes = net.data[-1]
    assert list(nodes.text) == ["CLL", "Mono", "T"]
    assert F.interaction_network(pd.DataFrame(), label="x").layout.annotations


def test_interaction_diff_and_lr_expression(lr_df):
    d = lr_df.assign(delta=[0.5, -0.2, 0.0, 0.1])
    fig = F.interaction_diff_figure(d, delta="delta")
    xs = list(fig.data[0].x)
    assert xs == sorted(xs) and 0.0 not in xs and len(xs) == 3
    expr = pd.DataFrame(
        {
            "gene": ["CD40LG"] * 4 + ["CD40"] * 4,
            "group": ["T", "CLL"] * 4,
            "condition": ["REF", "REF", "RES", "RES"] * 2,
            "mean": np.arange(8, dtype=float),
        }
    )
    fig = F.lr_expression_figure(
        expr,
        ligand="CD40LG",
        receptor="CD40",
        sender="T",
        receiver="CLL",
        condition_order=["REF", "RES"],
    )
    assert len(fig.data) == 4
    assert sum(bool(t.showlegend) for t in fig.data) == 2
    widths = fig.data[0].marker.line.width
    assert list(widths) == [0, 2.5]  # groups sorted: CLL, T; T is the sender


def test_quick_de_and_selection_bars():
    df = pd.DataFrame({"gene": list("ABCD"), "log2fc": [2, -1, 0.5, -3], "padj": [0.01] * 4})
    fig = F.quick_de_bar(df, n=1)
    assert set(fig.data[0].y) == {"A", "D"}
    comp = F.selection_composition_bar(pd.Series({"T": 3, "B": 1, "NK": 0}))
    assert list(comp.data[0].y) == ["B", "T"]
    assert F.selection_composition_bar(pd.Series(dtype=float)).layout.annotations


def test_qc_bars_and_empty():
    df = pd.DataFrame({"sample_id": ["s1", "s2"], "n_cells": [10, 20], "condition": ["A", "B"]})
    fig = F.qc_bars(df, value="n_cells", colour="condition")
    assert [t.name for t in fig.data] == ["A", "B"]
    assert F.empty_figure("hello").layout.annotations[0].text == "hello"


def test_huge_lasso_is_thinned():
    """A lasso of 400k vertices (an 8 MiB body) costs what a 1,000-vertex one costs; the
    cells selected are those of the full outline (away from its edge)."""
    t = np.linspace(0, 2 * np.pi, 400_000, endpoint=False)
    sel = {"lassoPoints": {"x": np.cos(t).tolist(), "y": np.sin(t).tolist()}}
    ((i, kind, v),) = F.selection_geometry(sel)
    assert (i, kind) == (0, "lasso") and len(v) == F.MAX_LASSO_VERTICES
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-1.2, 1.2, (2, 20_000))
    r = np.hypot(x, y)
    inside = F.points_in_shape(x, y, kind, v)
    clear = np.abs(r - 1) > 1e-3
    assert (inside[clear] == (r[clear] < 1)).all()
    assert len(F.selection_geometry(sel, max_vertices=50)[0][2]) == 50


def _cnv_profile():
    """Two patients x three groups x 3 chromosomes of 4 windows; P1's malignant cells
    carry a gain of chromosome 12."""
    rows = []
    chroms = ["11", "12", "13"]
    for p in ("P1", "P2"):
        for g in ("malignant", "normal B", "reference"):
            for w in range(12):
                c = chroms[w // 4]
                gain = p == "P1" and g == "malignant" and c == "12"
                rows.append(
                    {"patient": p, "group": g, "window": w, "chromosome": c,
                     "start": (w % 4) * 10, "end": (w % 4) * 10 + 9,
                     "mean": 0.2 if gain else 0.001 * (w % 3)}
                )  # fmt: skip
    return pd.DataFrame(rows)


def test_cnv_heatmap_rows_windows_and_scale():
    prof = _cnv_profile()
    fig = F.cnv_heatmap(prof, patients=["P2", "P1"])
    hm = fig.data[0]
    assert isinstance(hm, go.Heatmap)
    assert list(hm.y) == [
        f"{p} · {g}" for p in ("P2", "P1") for g in ("malignant", "normal B", "reference")
    ]
    z = np.asarray(hm.z)
    assert z.shape == (6, 12)
    # the gain sits in P1 · malignant over chromosome 12's windows (4..7), nowhere else
    row = list(hm.y).index("P1 · malignant")
    assert np.allclose(z[row, 4:8], 0.2) and (np.abs(np.delete(z, row, 0)) < 0.01).all()
    assert hm.zmid == 0 and hm.zmin == -hm.zmax and hm.zmax == pytest.approx(0.2, rel=0.05)
    assert list(fig.layout.xaxis.ticktext) == ["11", "12", "13"]
    assert list(fig.layout.xaxis.tickvals) == [1.5, 5.5, 9.5]
    assert len(fig.layout.shapes) == 2  # chromosome boundaries
    # a group subset, and nothing to show
    assert len(F.cnv_heatmap(prof, groups=("malignant",)).data[0].y) == 2
    empty = F.cnv_heatmap(prof.iloc[:0])
    assert "No copy-number profile" in empty.layout.annotations[0].text
    json.loads(fig.to_json())
