"""Figures of the explorer: pure functions ``DataFrame -> go.Figure``.

Nothing here touches Dash or the atlas store, so every figure is unit-tested on small
hand-made frames (``tests/test_figures.py``). Large numeric arrays are passed to plotly as
``float32`` numpy arrays, which plotly (>= 6) serialises as base64 typed arrays.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from atlas import schema

FONT = "Inter, system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"

# categorical palette (colour-blind aware, extended); cycles when there are more groups
PALETTE = (
    "#4E79A7",
    "#F28E2B",
    "#E15759",
    "#76B7B2",
    "#59A14F",
    "#EDC948",
    "#B07AA1",
    "#FF9DA7",
    "#9C755F",
    "#BAB0AC",
    "#1F77B4",
    "#AEC7E8",
    "#FFBB78",
    "#98DF8A",
    "#FF9896",
    "#C5B0D5",
    "#C49C94",
    "#F7B6D2",
    "#DBDB8D",
    "#9EDAE5",
    "#17BECF",
    "#BCBD22",
    "#8C564B",
    "#E377C2",
)
CONDITION_PALETTE = ("#4C566A", "#D08770", "#5E81AC", "#A3BE8C", "#B48EAD", "#EBCB8B", "#88C0D0")
CONTINUOUS_SCALE = "Viridis"
CONTINUOUS_BINS = 24  # colour levels of a continuous UMAP (one single-colour trace each)
COLOURBAR_TRACE = "colour bar"
NA_COLOUR = "#D1D5DB"
DIVERGING_SCALE = "RdBu_r"
UP_COLOUR = "#C0392B"
DOWN_COLOUR = "#2E86C1"
NS_COLOUR = "#B8BEC6"
UMAP_PANEL_KEYS = ("x", "y")


# ----------------------------------------------------------------------------- helpers
def colour_map(categories: Sequence, palette: Sequence[str] = PALETTE) -> dict[str, str]:
    """A stable colour for each category, in the given order."""
    return {str(c): palette[i % len(palette)] for i, c in enumerate(categories)}


def style(fig: go.Figure, *, title: str | None = None, height: int | None = None) -> go.Figure:
    """The explorer's common look: white template, system font, tight margins."""
    fig.update_layout(
        template="plotly_white",
        font={"family": FONT, "size": 12, "color": "#2E3440"},
        margin={"l": 60, "r": 20, "t": 50 if title else 20, "b": 50},
        title={"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 15}}
        if title
        else None,
        hoverlabel={"font": {"family": FONT}},
        legend={"itemsizing": "constant"},
    )
    if height:
        fig.update_layout(height=height)
    return fig


def empty_figure(message: str, *, height: int = 320) -> go.Figure:
    """A blank figure that says why there is nothing to show."""
    fig = go.Figure()
    fig.add_annotation(
        text=message,
        x=0.5,
        y=0.5,
        xref="paper",
        yref="paper",
        showarrow=False,
        font={"size": 14, "color": "#6B7280"},
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return style(fig, height=height)


def _f32(values) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(values, dtype=np.float32))


def _ncols(n_panels: int) -> int:
    return n_panels if n_panels <= 4 else 3


def _axis_suffix(i: int) -> str:
    return "" if i == 0 else str(i + 1)


# ----------------------------------------------------------------------------- UMAP
def umap_panels(df: pd.DataFrame, panel_order: Sequence[str] | None = None) -> list[str]:
    """The panels of a UMAP figure: one per value of ``df["panel"]`` (or a single one)."""
    if "panel" not in df.columns:
        return ["all"]
    present = {str(v) for v in pd.unique(df["panel"].dropna())}
    order = [str(p) for p in panel_order] if panel_order is not None else sorted(present)
    return [p for p in order if p in present] or ["all"]


def umap_trace_rows(
    df: pd.DataFrame,
    *,
    categorical: bool,
    panel_order: Sequence[str] | None = None,
    category_order: Sequence[str] | None = None,
) -> list[tuple[str, str | None, np.ndarray]]:
    """The traces of :func:`umap_figure`, in order: ``(panel, category, row positions)``.

    The row positions index ``df``; the selection and ``Patch`` code use them to map plotly
    points back to cells.
    """
    panels = umap_panels(df, panel_order)
    out: list[tuple[str, str | None, np.ndarray]] = []
    if "panel" in df.columns:
        pcodes, puniq = _codes(df["panel"])
        plookup = {str(u): k for k, u in enumerate(puniq)}
    if categorical:
        vcodes, vuniq = _codes(df["value"])
        vlookup = {str(u): k for k, u in enumerate(vuniq)}
        cats = (
            [str(c) for c in category_order]
            if category_order is not None
            else sorted(str(u) for u in vuniq)
        )
        # sort once by (panel, category): each trace is then a contiguous slice
        pk = pcodes if "panel" in df.columns else np.zeros(len(df), dtype=np.int64)
        key = pk.astype(np.int64) * (len(vuniq) + 1) + vcodes
        order = np.argsort(key, kind="stable")
        bounds = np.searchsorted(key[order], np.arange(key.max() + 2 if len(key) else 1))
    for p in panels:
        if "panel" in df.columns:
            pc = plookup.get(p, -1)
        if not categorical:
            rows = np.flatnonzero(pcodes == pc) if "panel" in df.columns else np.arange(len(df))
            out.append((p, None, rows))
            continue
        base = (pc if "panel" in df.columns else 0) * (len(vuniq) + 1)
        for c in cats:
            vc = vlookup.get(c)
            if vc is None:
                continue
            k = base + vc
            if k + 1 >= len(bounds):
                continue
            r = order[bounds[k] : bounds[k + 1]]
            if r.size:
                out.append((p, c, r))
    return out


def _codes(s: pd.Series) -> tuple[np.ndarray, list]:
    """Integer codes and the unique values of a column (categoricals without copying)."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        return s.cat.codes.to_numpy().astype(np.int64), [str(c) for c in s.cat.categories]
    codes, uniq = pd.factorize(s.astype(str))
    return codes.astype(np.int64), list(uniq)


def colour_range(values: np.ndarray) -> tuple[float, float]:
    """``(cmin, cmax)`` of the finite values (a constant or empty column gets a unit range)."""
    finite = values[np.isfinite(values)]
    cmin = float(finite.min()) if finite.size else 0.0
    cmax = float(finite.max()) if finite.size else 1.0
    return cmin, (cmax if cmax > cmin else cmin + 1.0)


def continuous_bins(
    values: np.ndarray, cmin: float, cmax: float, k: int = CONTINUOUS_BINS
) -> np.ndarray:
    """Equal-width bin (0..k-1) of each value in ``[cmin, cmax]``; -1 where not finite."""
    v = np.asarray(values, dtype=np.float64)
    out = np.full(v.shape, -1, dtype=np.int64)
    ok = np.isfinite(v)
    out[ok] = np.clip(((v[ok] - cmin) / (cmax - cmin) * k).astype(np.int64), 0, k - 1)
    return out


def continuous_trace_rows(
    panel_rows: list[tuple[str, str | None, np.ndarray]], bins: np.ndarray
) -> list[tuple[str, str, np.ndarray]]:
    """Split each panel's rows by bin, lowest first (no value, -1, underneath all):
    ``(panel, str(bin), rows)`` for the non-empty bins."""
    out = []
    for p, _, r in panel_rows:
        b = bins[r]
        order = np.argsort(b, kind="stable")
        kinds, starts = np.unique(b[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        out.extend((p, str(int(k)), r[order[s:e]]) for k, s, e in zip(kinds, starts, ends))
    return out


def sample_scale(name: str, k: int) -> list[str]:
    """``k`` colours of the named plotly colour scale, at the bin centres."""
    from plotly.colors import get_colorscale, sample_colorscale

    return sample_colorscale(get_colorscale(name), list((np.arange(k) + 0.5) / k))


def umap_traces(
    df: pd.DataFrame,
    *,
    categorical: bool,
    colour_label: str = "",
    panel_order: Sequence[str] | None = None,
    category_order: Sequence[str] | None = None,
    colours: dict[str, str] | None = None,
    point_size: float | None = None,
) -> tuple[list[dict], list[int], tuple[float, float] | None]:
    """The traces of :func:`umap_figure` as plain dicts (numpy coordinates), the panel index
    of each, and the colour range (continuous values; else ``None``)."""
    panels = umap_panels(df, panel_order)
    n = len(panels)
    if point_size is None:
        per_panel = len(df) / n
        point_size = float(np.clip(9 - 1.3 * np.log10(max(per_panel, 1)), 1.5, 6))
    x = _f32(df["x"])
    y = _f32(df["y"])
    rows = umap_trace_rows(
        df, categorical=categorical, panel_order=panel_order, category_order=category_order
    )
    if categorical:
        cats = list(dict.fromkeys(c for _, c, _ in rows))
        if category_order is not None:
            cats = [str(c) for c in category_order if str(c) in set(cats)]
        cmap = dict(colour_map(cats))
        if colours:
            cmap.update({str(k): v for k, v in colours.items()})
    else:
        values = _f32(df["value"])
        cmin, cmax = colour_range(values)
        rows = continuous_trace_rows(rows, continuous_bins(values, cmin, cmax))
        bin_colours = sample_scale(CONTINUOUS_SCALE, CONTINUOUS_BINS)
        edges = np.linspace(cmin, cmax, CONTINUOUS_BINS + 1)
    # traces as plain dicts added in one call, unvalidated (their keys are fixed here):
    # plotly's per-trace validation cost ~4 ms a trace, most of a gene switch's server time
    traces: list[dict] = []
    where: list[int] = []
    if not categorical:
        # the colour bar rides on one invisible point of the first panel
        traces.append(
            {
                "type": "scattergl",
                "x": x[:1],
                "y": y[:1],
                "mode": "markers",
                "marker": {"color": [cmin], "coloraxis": "coloraxis", "opacity": 0, "size": 1},
                "name": COLOURBAR_TRACE,
                "showlegend": False,
                "hoverinfo": "skip",
            }
        )
        where.append(0)
    seen: set[str] = set()
    for p, c, r in rows:
        i = panels.index(p)
        where.append(i)
        trace = {"type": "scattergl", "x": x[r], "y": y[r], "mode": "markers"}
        if categorical:
            trace.update(
                marker={"size": point_size, "color": cmap[c], "opacity": 0.85},
                name=c,
                legendgroup=c,
                showlegend=c not in seen,
                hovertemplate=f"{c}<extra></extra>",
            )
            seen.add(c)
        else:
            k = int(c)
            lo_hi = f"{edges[k]:.3g} – {edges[k + 1]:.3g}" if k >= 0 else "no value"
            trace.update(
                marker={"size": point_size, "color": bin_colours[k] if k >= 0 else NA_COLOUR},
                name=p,
                showlegend=False,
                hovertemplate=f"{colour_label} {lo_hi}<extra></extra>",
            )
        traces.append(trace)
    return traces, where, (None if categorical else (cmin, cmax))


def umap_colour_patch(
    df: pd.DataFrame, *, colour_label: str, panel_order: Sequence[str] | None = None
) -> tuple[list[dict], float, float]:
    """Continuous values: the traces of :func:`umap_figure`, JSON-ready (base64 float32
    coordinates, subplot axes set), to replace a continuous figure's ``data`` in a ``Patch``
    when only the colour changes: no figure, layout or validation is rebuilt."""
    traces, where, crange = umap_traces(
        df, categorical=False, colour_label=colour_label, panel_order=panel_order
    )
    out = []
    for t, i in zip(traces, where):
        suffix = _axis_suffix(i)
        out.append(
            {**t, "x": b64_array(t["x"]), "y": b64_array(t["y"]),
             "xaxis": "x" + suffix, "yaxis": "y" + suffix}
        )  # fmt: skip
    cmin, cmax = crange
    return out, cmin, cmax


def b64_array(values) -> dict:
    """A plotly typed-array spec (base64 float32): ``Patch`` sends numpy arrays as lists."""
    arr = np.ascontiguousarray(np.asarray(values, dtype=np.float32))
    return {"dtype": "f4", "bdata": base64.b64encode(arr.tobytes()).decode("ascii")}


def umap_figure(
    df: pd.DataFrame,
    *,
    categorical: bool,
    colour_label: str = "",
    panel_order: Sequence[str] | None = None,
    category_order: Sequence[str] | None = None,
    colours: dict[str, str] | None = None,
    point_size: float | None = None,
    height: int | None = None,
    title: str | None = None,
) -> go.Figure:
    """UMAP as WebGL scatter(s).

    ``df`` columns: ``x``, ``y``, ``value`` (category or number), optional ``panel`` (one
    side-by-side panel per value, e.g. the condition). Continuous values are drawn as
    ``CONTINUOUS_BINS`` single-colour traces per panel (equal-width bins of the colour range,
    coloured at the bin centre, high values on top, cells without a value grey underneath)
    and one invisible point that carries the colour bar: Plotly converts a per-point colour
    array point by point (~650 ms for 100k points in headless Chromium here), single-colour
    traces draw in ~50 ms.
    """
    if df.empty:
        return empty_figure("No cells to show")
    panels = umap_panels(df, panel_order)
    n = len(panels)
    ncols = _ncols(n)
    nrows = int(np.ceil(n / ncols))
    counts = df["panel"].astype(str).value_counts(sort=False) if "panel" in df.columns else None
    titles = [f"{p} ({counts[p]:,} cells)" if counts is not None else "" for p in panels]
    fig = make_subplots(
        rows=nrows,
        cols=ncols,
        subplot_titles=titles if counts is not None else None,
        horizontal_spacing=0.02,
        vertical_spacing=0.06,
        shared_xaxes=True,
        shared_yaxes=True,
    )
    traces, where, crange = umap_traces(
        df,
        categorical=categorical,
        colour_label=colour_label,
        panel_order=panel_order,
        category_order=category_order,
        colours=colours,
        point_size=point_size,
    )
    if traces:
        fig._validate = False
        try:
            fig.add_traces(
                traces, rows=[i // ncols + 1 for i in where], cols=[i % ncols + 1 for i in where]
            )
        finally:
            fig._validate = True
    fig.update_xaxes(
        showticklabels=False, showgrid=False, zeroline=False, showline=True, linecolor="#E5E7EB"
    )
    fig.update_yaxes(
        showticklabels=False, showgrid=False, zeroline=False, showline=True, linecolor="#E5E7EB"
    )
    fig.update_yaxes(scaleanchor="x", scaleratio=1, row=1, col=1)
    if crange is not None:
        cmin, cmax = crange
        fig.update_layout(
            coloraxis={
                "colorscale": CONTINUOUS_SCALE,
                "cmin": cmin,
                "cmax": cmax,
                "colorbar": {"title": {"text": colour_label}, "thickness": 12, "len": 0.8},
            }
        )
    fig.update_layout(
        dragmode="lasso",
        uirevision="umap",
        legend={"title": {"text": colour_label}, "itemsizing": "constant", "font": {"size": 11}},
        hovermode="closest",
    )
    style(fig, title=title, height=height or (420 * nrows if n > 1 else 560))
    fig.update_layout(margin={"l": 10, "r": 10, "t": 40 if (title or n > 1) else 10, "b": 10})
    return fig


MAX_LASSO_VERTICES = 1000
MAX_SHAPES = 64


def selection_geometry(
    selected: dict | None, *, max_vertices: int = MAX_LASSO_VERTICES
) -> list[tuple[int, str, np.ndarray]]:
    """Shapes of a plotly ``selectedData``: ``(panel index, "lasso"|"box", vertices)``.

    A box gives its two corners; a lasso its polygon. Axis ``x3`` -> panel 2. A lasso of
    more than ``max_vertices`` vertices is thinned to that many (evenly along the path: a
    hand-drawn outline keeps its shape, and the point-in-polygon test costs at most that);
    at most :data:`MAX_SHAPES` shapes are used.
    """
    out: list[tuple[int, str, np.ndarray]] = []
    if not selected:
        return out
    for kind, key in (("lasso", "lassoPoints"), ("box", "range")):
        geo = selected.get(key) or {}
        for axis, xs in geo.items():
            if not axis.startswith("x") or len(out) >= MAX_SHAPES:
                continue
            suffix = axis[1:]
            ys = geo.get("y" + suffix)
            if ys is None or len(xs) != len(ys) or len(xs) < 2:
                continue
            idx = int(suffix) - 1 if suffix else 0
            if kind == "lasso" and len(xs) > max_vertices:
                keep = np.linspace(0, len(xs) - 1, max_vertices).round().astype(np.int64)
                xs, ys = [xs[i] for i in keep], [ys[i] for i in keep]
            out.append((idx, kind, np.column_stack([np.asarray(xs, float), np.asarray(ys, float)])))
    return out


def points_in_shape(x: np.ndarray, y: np.ndarray, kind: str, vertices: np.ndarray) -> np.ndarray:
    """Boolean mask of the points inside a box (two corners) or a lasso polygon."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if kind == "box":
        (x0, x1), (y0, y1) = np.sort(vertices[:, 0]), np.sort(vertices[:, 1])
        return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    px, py = vertices[:, 0], vertices[:, 1]
    inside = (x >= px.min()) & (x <= px.max()) & (y >= py.min()) & (y <= py.max())
    cand = np.flatnonzero(inside)
    if cand.size == 0:
        return inside
    try:
        from matplotlib.path import Path

        hit = Path(vertices).contains_points(np.column_stack([x[cand], y[cand]]))
    except ImportError:  # pragma: no cover - matplotlib ships with scanpy
        hit = _ray_cast(x[cand], y[cand], px, py)
    out = np.zeros(len(x), dtype=bool)
    out[cand[hit]] = True
    return out


def _ray_cast(x, y, px, py) -> np.ndarray:
    inside = np.zeros(len(x), dtype=bool)
    j = len(px) - 1
    for i in range(len(px)):
        cond = (py[i] > y) != (py[j] > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = (px[j] - px[i]) * (y - py[i]) / (py[j] - py[i]) + px[i]
        inside ^= cond & (x < xint)
        j = i
    return inside


# ----------------------------------------------------------------------------- composition
def composition_bar(
    df: pd.DataFrame,
    *,
    group: str,
    category: str = schema.COL_CELL_TYPE,
    value: str = "n",
    group_order: Sequence[str] | None = None,
    category_order: Sequence[str] | None = None,
    title: str | None = None,
    height: int = 380,
) -> go.Figure:
    """Stacked bars of proportions: one bar per ``group`` (condition, patient), stacked by
    ``category``; ``value`` (counts or proportions) is normalised within each bar."""
    if df.empty:
        return empty_figure("No cells")
    d = df.groupby([group, category], observed=True)[value].sum().reset_index()
    d[group] = d[group].astype(str)
    d[category] = d[category].astype(str)
    totals = d.groupby(group)[value].transform("sum")
    d["prop"] = np.where(totals > 0, d[value] / totals, 0.0)
    groups = [str(g) for g in group_order] if group_order is not None else sorted(d[group].unique())
    groups = [g for g in groups if g in set(d[group])]
    cats = (
        [str(c) for c in category_order]
        if category_order is not None
        else sorted(d[category].unique())
    )
    cmap = colour_map(cats)
    fig = go.Figure()
    for c in cats:
        s = d[d[category] == c].set_index(group).reindex(groups)
        fig.add_trace(
            go.Bar(
                x=groups,
                y=s["prop"].fillna(0).to_numpy(),
                name=c,
                marker_color=cmap[c],
                customdata=s[value].fillna(0).to_numpy(),
                hovertemplate=f"{c}<br>%{{x}}: %{{y:.1%}} (%{{customdata:,.0f}})<extra></extra>",
            )
        )
    fig.update_layout(barmode="stack", bargap=0.25)
    fig.update_yaxes(tickformat=".0%", title="proportion of cells", range=[0, 1])
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=groups)
    return style(fig, title=title, height=height)


def composition_effects(
    df: pd.DataFrame,
    *,
    effect: str,
    significance: str | None = None,
    alpha: float = 0.05,
    condition_order: Sequence[str] | None = None,
    cell_type_order: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Heatmap of composition-test effects: ``cell_type`` x ``condition`` (vs reference),
    coloured by ``effect`` (e.g. log2 fold change of proportions); significant cells starred."""
    if df.empty or effect not in df.columns:
        return empty_figure("No composition test results")
    m = df.pivot_table(
        index=schema.COL_CELL_TYPE, columns=schema.COL_CONDITION, values=effect, aggfunc="mean"
    )
    if condition_order is not None:
        m = m.reindex(columns=[c for c in condition_order if c in m.columns])
    if cell_type_order is not None:
        m = m.reindex(index=[t for t in cell_type_order if t in m.index])
    text = None
    if significance and significance in df.columns:
        p = df.pivot_table(
            index=schema.COL_CELL_TYPE, columns=schema.COL_CONDITION, values=significance
        )
        p = p.reindex(index=m.index, columns=m.columns)
        text = np.where(p.to_numpy() < alpha, "★", "")
    lim = float(np.nanmax(np.abs(m.to_numpy()))) if m.size else 1.0
    lim = lim if np.isfinite(lim) and lim > 0 else 1.0
    fig = go.Figure(
        go.Heatmap(
            z=m.to_numpy(),
            x=[str(c) for c in m.columns],
            y=[str(r) for r in m.index],
            colorscale=DIVERGING_SCALE,
            zmin=-lim,
            zmax=lim,
            text=text,
            texttemplate="%{text}" if text is not None else None,
            colorbar={"title": {"text": effect}, "thickness": 12},
            hovertemplate="%{y} in %{x}<br>" + effect + ": %{z:.2f}<extra></extra>",
        )
    )
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return style(fig, title=title, height=max(300, 26 * len(m.index) + 120))


def qc_bars(
    df: pd.DataFrame,
    *,
    value: str,
    group: str = schema.OBS_SAMPLE,
    colour: str | None = None,
    title: str | None = None,
) -> go.Figure:
    """One bar per sample (e.g. cells kept), coloured by ``colour`` (e.g. condition)."""
    if df.empty or value not in df.columns:
        return empty_figure("No QC summary")
    d = df.copy()
    d[group] = d[group].astype(str)
    fig = go.Figure()
    if colour and colour in d.columns:
        levels = list(dict.fromkeys(d[colour].astype(str)))
        cmap = colour_map(levels, CONDITION_PALETTE)
        for lev in levels:
            s = d[d[colour].astype(str) == lev]
            fig.add_trace(go.Bar(x=s[group], y=s[value], name=lev, marker_color=cmap[lev]))
    else:
        fig.add_trace(go.Bar(x=d[group], y=d[value], marker_color=PALETTE[0], showlegend=False))
    fig.update_xaxes(
        type="category", categoryorder="array", categoryarray=d[group].tolist(), tickangle=-45
    )
    fig.update_yaxes(title=value)
    return style(fig, title=title, height=340)


# ----------------------------------------------------------------------------- genes
def violin_figure(
    df: pd.DataFrame,
    *,
    gene: str,
    group_order: Sequence[str] | None = None,
    condition_order: Sequence[str] | None = None,
    colours: dict[str, str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Expression violins: ``df`` columns ``group`` (cell type), ``condition``, ``value``.

    One violin trace per condition, grouped side by side within each cell type.
    """
    if df.empty:
        return empty_figure("No cells in the chosen conditions")
    d = df.copy()
    d["group"] = d["group"].astype(str)
    d[schema.COL_CONDITION] = d[schema.COL_CONDITION].astype(str)
    groups = (
        [str(g) for g in group_order] if group_order is not None else sorted(d["group"].unique())
    )
    conds = (
        [str(c) for c in condition_order]
        if condition_order is not None
        else sorted(d[schema.COL_CONDITION].unique())
    )
    conds = [c for c in conds if c in set(d[schema.COL_CONDITION])]
    cmap = colours or colour_map(conds, CONDITION_PALETTE)
    fig = go.Figure()
    for c in conds:
        s = d[d[schema.COL_CONDITION] == c]
        fig.add_trace(
            go.Violin(
                x=s["group"].to_numpy(),
                y=_f32(s["value"]),
                name=c,
                legendgroup=c,
                scalegroup=c,
                line={"color": cmap.get(c, PALETTE[0]), "width": 1},
                fillcolor=cmap.get(c, PALETTE[0]),
                opacity=0.75,
                points=False,
                spanmode="hard",
                meanline={"visible": True},
                scalemode="width",
                hoveron="violins",
            )
        )
    fig.update_layout(violinmode="group", violingap=0.12, violingroupgap=0.0)
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=groups, tickangle=-30)
    fig.update_yaxes(title=f"{gene} (log-normalised)", rangemode="tozero")
    fig.update_layout(legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0})
    return style(fig, title=title, height=420)


def dotplot_figure(
    df: pd.DataFrame,
    *,
    x: str = "group",
    y: str = schema.COL_GENE,
    colour: str = "mean",
    size: str = "frac",
    x_order: Sequence[str] | None = None,
    y_order: Sequence[str] | None = None,
    colour_label: str = "mean expr.",
    size_label: str = "% expressing",
    colorscale: str = "Reds",
    title: str | None = None,
    max_size: float = 16.0,
) -> go.Figure:
    """A dot plot: dot size = ``size`` (fraction 0..1), colour = ``colour``."""
    if df.empty:
        return empty_figure("Nothing to show")
    d = df.copy()
    d[x] = d[x].astype(str)
    d[y] = d[y].astype(str)
    xs = [str(v) for v in x_order] if x_order is not None else sorted(d[x].unique())
    ys = [str(v) for v in y_order] if y_order is not None else sorted(d[y].unique())
    sz = d[size].astype(float).clip(0, None).to_numpy()
    smax = float(np.nanmax(sz)) if sz.size and np.nanmax(sz) > 0 else 1.0
    frac_like = smax <= 1.0
    scale = 1.0 if frac_like else smax
    fig = go.Figure(
        go.Scatter(
            x=d[x],
            y=d[y],
            mode="markers",
            marker={
                "size": np.sqrt(np.nan_to_num(sz) / scale) * max_size + 1,
                "color": d[colour].astype(float).to_numpy(),
                "colorscale": colorscale,
                "showscale": True,
                "colorbar": {"title": {"text": colour_label}, "thickness": 12, "len": 0.7},
                "line": {"width": 0.5, "color": "#6B7280"},
            },
            customdata=np.column_stack([sz, d[colour].astype(float).to_numpy()]),
            hovertemplate=f"%{{y}} · %{{x}}<br>{colour_label}: %{{customdata[1]:.3g}}<br>"
            + (
                f"{size_label}: %{{customdata[0]:.1%}}"
                if frac_like
                else f"{size_label}: %{{customdata[0]:.3g}}"
            )
            + "<extra></extra>",
            showlegend=False,
        )
    )
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=xs, tickangle=-40)
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=ys[::-1])
    height = max(300, 24 * len(ys) + 170)
    return style(fig, title=title, height=min(height, 1400))


def volcano_figure(
    df: pd.DataFrame,
    *,
    lfc: str = schema.COL_LOG2FC,
    padj: str = schema.COL_PADJ,
    gene: str = schema.COL_GENE,
    alpha: float = 0.05,
    lfc_threshold: float = 1.0,
    n_labels: int = 12,
    highlight: str | None = None,
    title: str | None = None,
) -> go.Figure:
    """Volcano plot of a DE table: x = log2 fold change, y = -log10 adjusted p."""
    d = df.dropna(subset=[lfc, padj]).copy() if not df.empty else df
    if d.empty:
        return empty_figure("No DE results for this cell type and contrast")
    d["nlp"] = -np.log10(np.clip(d[padj].astype(float).to_numpy(), 1e-300, 1))
    up = (d[padj] < alpha) & (d[lfc] >= lfc_threshold)
    down = (d[padj] < alpha) & (d[lfc] <= -lfc_threshold)
    d["status"] = np.where(up, "up", np.where(down, "down", "n.s."))
    fig = go.Figure()
    for status, colour in (("n.s.", NS_COLOUR), ("down", DOWN_COLOUR), ("up", UP_COLOUR)):
        s = d[d["status"] == status]
        fig.add_trace(
            go.Scattergl(
                x=_f32(s[lfc]),
                y=_f32(s["nlp"]),
                mode="markers",
                name=f"{status} ({len(s)})",
                marker={"color": colour, "size": 6, "opacity": 0.8},
                text=s[gene].astype(str).to_numpy(),
                hovertemplate="%{text}<br>log2FC %{x:.2f}<br>-log10 padj %{y:.1f}<extra></extra>",
            )
        )
    sig = d[d["status"] != "n.s."].nlargest(n_labels, "nlp")
    labelled = list(sig.itertuples())
    if highlight is not None:
        labelled += list(d[d[gene].astype(str) == highlight].itertuples())
    for k, r in enumerate(labelled):
        right = getattr(r, lfc) >= 0
        fig.add_annotation(
            x=getattr(r, lfc),
            y=r.nlp,
            text=str(getattr(r, gene)),
            showarrow=True,
            arrowhead=0,
            arrowwidth=0.8,
            arrowcolor="#9CA3AF",
            ax=(22 + 10 * (k % 3)) * (1 if right else -1),
            ay=-14 - 9 * (k % 4),
            font={"size": 10, "color": "#111827"},
            bgcolor="rgba(255,255,255,0.7)",
        )
    fig.add_hline(y=-np.log10(alpha), line={"dash": "dot", "color": "#9CA3AF", "width": 1})
    for v in (-lfc_threshold, lfc_threshold):
        fig.add_vline(x=v, line={"dash": "dot", "color": "#9CA3AF", "width": 1})
    fig.update_xaxes(title="log2 fold change", zeroline=True, zerolinecolor="#E5E7EB")
    fig.update_yaxes(title="-log10 adjusted p", rangemode="tozero")
    fig = style(fig, title=title, height=460)
    fig.update_layout(
        legend={"orientation": "h", "y": -0.18, "yanchor": "top", "x": 0},
        margin={"b": 90},
    )
    return fig


def quick_de_bar(df: pd.DataFrame, *, n: int = 15, title: str | None = None) -> go.Figure:
    """Top genes of a quick DE (``gene``, ``log2fc``, ``padj``): bars of log2FC."""
    if df.empty:
        return empty_figure("Select cells to compare them with the rest", height=300)
    top = pd.concat([df.nlargest(n, "log2fc"), df.nsmallest(n, "log2fc")]).drop_duplicates("gene")
    top = top.sort_values(schema.COL_LOG2FC)
    colours = np.where(top[schema.COL_LOG2FC] > 0, UP_COLOUR, DOWN_COLOUR)
    fig = go.Figure(
        go.Bar(
            x=top[schema.COL_LOG2FC],
            y=top[schema.COL_GENE].astype(str),
            orientation="h",
            marker_color=colours,
            customdata=top[schema.COL_PADJ],
            hovertemplate="%{y}: log2FC %{x:.2f}, padj %{customdata:.2g}<extra></extra>",
        )
    )
    fig.update_yaxes(type="category", tickfont={"size": 10})
    fig.update_xaxes(title="log2FC selection vs rest")
    return style(fig, title=title, height=max(300, 16 * len(top) + 90))


# ----------------------------------------------------------------------------- interactions
def interaction_dotplot(
    df: pd.DataFrame,
    *,
    score: str,
    size: str | None = None,
    max_pairs: int = 30,
    max_celltype_pairs: int = 30,
    title: str | None = None,
) -> go.Figure:
    """Dot plot of interactions: x = ``sender → receiver``, y = ``ligand → receptor``.

    Colour = ``score`` (interaction strength); size = ``size`` (e.g. -log10 p or
    specificity, larger = more specific). Keeps the strongest pairs only.
    """
    if df.empty:
        return empty_figure("No interactions match the filters")
    d = df.copy()
    d["lr"] = d[schema.COL_LIGAND].astype(str) + " → " + d[schema.COL_RECEPTOR].astype(str)
    d["st"] = d[schema.COL_SOURCE].astype(str) + " → " + d[schema.COL_TARGET].astype(str)
    top_lr = d.groupby("lr")[score].max().nlargest(max_pairs).index
    top_st = d.groupby("st")[score].max().nlargest(max_celltype_pairs).index
    d = d[d["lr"].isin(top_lr) & d["st"].isin(top_st)]
    d = d.groupby(["st", "lr"], as_index=False).agg(
        score=(score, "max"), size=(size, "max") if size else (score, "max")
    )
    sz = d["size"].astype(float).to_numpy()
    rng = np.nanmax(sz) - np.nanmin(sz) if sz.size else 0
    norm = (sz - np.nanmin(sz)) / rng if rng > 0 else np.ones_like(sz)
    fig = go.Figure(
        go.Scatter(
            x=d["st"],
            y=d["lr"],
            mode="markers",
            marker={
                "size": 5 + 13 * np.nan_to_num(norm),
                "color": d["score"].astype(float),
                "colorscale": "Viridis",
                "showscale": True,
                "colorbar": {"title": {"text": score}, "thickness": 12, "len": 0.7},
                "line": {"width": 0.5, "color": "#374151"},
            },
            customdata=np.column_stack([d["score"], d["size"]]),
            hovertemplate="%{y}<br>%{x}<br>"
            + f"{score}: %{{customdata[0]:.3g}}"
            + (f"<br>{size}: %{{customdata[1]:.3g}}" if size else "")
            + "<extra></extra>",
        )
    )
    xs = sorted(d["st"].unique())
    ys = d.groupby("lr")["score"].max().sort_values().index.tolist()
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=xs, tickangle=-45)
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=ys)
    return style(fig, title=title, height=max(360, 22 * len(ys) + 200))


def interaction_matrix(df: pd.DataFrame, *, score: str, how: str = "sum") -> pd.DataFrame:
    """Sender x receiver matrix of interaction strength (``sum`` of scores or ``count``)."""
    if df.empty:
        return pd.DataFrame()
    g = df.groupby([schema.COL_SOURCE, schema.COL_TARGET], observed=True)[score]
    agg = g.count() if how == "count" else g.sum()
    m = agg.unstack("target").fillna(0.0)
    types = sorted(set(m.index.astype(str)) | set(m.columns.astype(str)))
    m.index = m.index.astype(str)
    m.columns = m.columns.astype(str)
    return m.reindex(index=types, columns=types, fill_value=0.0)


def interaction_heatmap(matrix: pd.DataFrame, *, label: str, title: str | None = None) -> go.Figure:
    """Heatmap of a sender x receiver matrix (:func:`interaction_matrix`)."""
    if matrix.empty:
        return empty_figure("No interactions match the filters")
    fig = go.Figure(
        go.Heatmap(
            z=matrix.to_numpy(),
            x=list(matrix.columns),
            y=list(matrix.index),
            colorscale="YlOrRd",
            colorbar={"title": {"text": label}, "thickness": 12},
            hovertemplate="%{y} → %{x}<br>" + label + ": %{z:.3g}<extra></extra>",
        )
    )
    fig.update_xaxes(type="category", title="receiver", tickangle=-40)
    fig.update_yaxes(type="category", title="sender", autorange="reversed")
    return style(fig, title=title, height=max(360, 28 * len(matrix) + 160))


def interaction_network(
    matrix: pd.DataFrame, *, label: str, max_edges: int = 40, title: str | None = None
) -> go.Figure:
    """Circle-layout network: nodes = cell types, arrows sender → receiver, width ∝ strength."""
    if matrix.empty or not np.any(matrix.to_numpy() > 0):
        return empty_figure("No interactions match the filters")
    types = list(matrix.index)
    n = len(types)
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False) + np.pi / 2
    pos = {t: (float(np.cos(a)), float(np.sin(a))) for t, a in zip(types, theta)}
    edges = matrix.stack().reset_index()
    edges.columns = ["source", "target", "w"]
    edges = edges[edges["w"] > 0].nlargest(max_edges, "w")
    wmax = float(edges["w"].max()) if len(edges) else 1.0
    cmap = colour_map(types)
    fig = go.Figure()
    self_w = {t: 0.0 for t in types}
    for r in edges.itertuples(index=False):
        if r.source == r.target:
            self_w[r.source] = float(r.w)
            continue
        (x0, y0), (x1, y1) = pos[r.source], pos[r.target]
        # shorten so arrows end at the node's rim; bend slightly so A->B and B->A differ
        dx, dy = x1 - x0, y1 - y0
        length = np.hypot(dx, dy) or 1.0
        ox, oy = -dy / length * 0.04, dx / length * 0.04
        sx, sy = x0 + dx * 0.08 + ox, y0 + dy * 0.08 + oy
        ex, ey = x1 - dx * 0.08 + ox, y1 - dy * 0.08 + oy
        width = 0.8 + 5 * r.w / wmax
        fig.add_annotation(
            x=ex,
            y=ey,
            ax=sx,
            ay=sy,
            xref="x",
            yref="y",
            axref="x",
            ayref="y",
            showarrow=True,
            arrowhead=2,
            arrowsize=0.8,
            arrowwidth=width,
            arrowcolor=cmap[r.source],
            opacity=0.55 + 0.4 * r.w / wmax,
        )
        # invisible hover point at the edge midpoint
        fig.add_trace(
            go.Scatter(
                x=[(sx + ex) / 2],
                y=[(sy + ey) / 2],
                mode="markers",
                marker={"size": 10, "color": "rgba(0,0,0,0)"},
                hovertemplate=f"{r.source} → {r.target}<br>{label}: {r.w:.3g}<extra></extra>",
                showlegend=False,
            )
        )
    out_w = matrix.sum(axis=1)
    sizes = 18 + 22 * (out_w / out_w.max() if out_w.max() > 0 else out_w)
    fig.add_trace(
        go.Scatter(
            x=[pos[t][0] for t in types],
            y=[pos[t][1] for t in types],
            mode="markers+text",
            text=types,
            textposition=["top center" if pos[t][1] >= 0 else "bottom center" for t in types],
            marker={
                "size": sizes.to_numpy(),
                "color": [cmap[t] for t in types],
                "line": {"width": 1.5, "color": "white"},
            },
            customdata=np.column_stack([out_w.to_numpy(), [self_w[t] for t in types]]),
            hovertemplate="%{text}<br>outgoing: %{customdata[0]:.3g}"
            "<br>autocrine: %{customdata[1]:.3g}<extra></extra>",
            showlegend=False,
        )
    )
    fig.update_xaxes(visible=False, range=[-1.45, 1.45])
    fig.update_yaxes(visible=False, range=[-1.35, 1.35], scaleanchor="x", scaleratio=1)
    return style(fig, title=title, height=520)


def interaction_diff_figure(
    df: pd.DataFrame, *, delta: str, n: int = 15, title: str | None = None
) -> go.Figure:
    """Gained (delta > 0) and lost (delta < 0) interactions vs the reference: the ``n``
    strongest of each as horizontal bars."""
    if df.empty or delta not in df.columns:
        return empty_figure("No differential interactions for this contrast")
    d = df.copy()
    d["label"] = (
        d[schema.COL_LIGAND].astype(str)
        + " → "
        + d[schema.COL_RECEPTOR].astype(str)
        + "  ("
        + d[schema.COL_SOURCE].astype(str)
        + " → "
        + d[schema.COL_TARGET].astype(str)
        + ")"
    )
    top = pd.concat([d.nlargest(n, delta), d.nsmallest(n, delta)]).drop_duplicates("label")
    top = top[top[delta] != 0].sort_values(delta)
    if top.empty:
        return empty_figure("No gained or lost interactions for this contrast")
    fig = go.Figure(
        go.Bar(
            x=top[delta],
            y=top["label"],
            orientation="h",
            marker_color=np.where(top[delta] > 0, UP_COLOUR, DOWN_COLOUR),
            hovertemplate="%{y}<br>" + delta + ": %{x:.3g}<extra></extra>",
        )
    )
    fig.update_yaxes(type="category", tickfont={"size": 10})
    fig.update_xaxes(title=f"{delta} (gained > 0 > lost)", zeroline=True, zerolinecolor="#9CA3AF")
    return style(fig, title=title, height=max(320, 18 * len(top) + 120))


def lr_expression_figure(
    df: pd.DataFrame,
    *,
    ligand: str,
    receptor: str,
    sender: str | None = None,
    receiver: str | None = None,
    condition_order: Sequence[str] | None = None,
    group_order: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Ligand expression per cell type (left) and receptor (right), bars per condition.

    ``df`` columns: ``gene``, ``group`` (cell type), ``condition``, ``mean``; the chosen
    sender / receiver are outlined.
    """
    if df.empty:
        return empty_figure("No expression summary for this pair")
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=[f"ligand {ligand} (senders)", f"receptor {receptor} (receivers)"],
        horizontal_spacing=0.08,
    )
    conds = (
        [str(c) for c in condition_order]
        if condition_order is not None
        else sorted(df[schema.COL_CONDITION].astype(str).unique())
    )
    cmap = colour_map(conds, CONDITION_PALETTE)
    for col, (gene, focus) in enumerate(((ligand, sender), (receptor, receiver)), start=1):
        s = df[df[schema.COL_GENE].astype(str) == gene]
        present = set(s["group"].astype(str))
        groups = (
            [g for g in group_order if g in present] if group_order is not None else sorted(present)
        )
        for c in conds:
            sc = s[s[schema.COL_CONDITION].astype(str) == c].set_index("group").reindex(groups)
            fig.add_trace(
                go.Bar(
                    x=groups,
                    y=sc["mean"].to_numpy(),
                    name=c,
                    legendgroup=c,
                    showlegend=col == 1,
                    marker={
                        "color": cmap[c],
                        "line": {
                            "width": [2.5 if g == focus else 0 for g in groups],
                            "color": "#111827",
                        },
                    },
                    hovertemplate=f"{gene} · %{{x}} · {c}: %{{y:.3g}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
    fig.update_layout(barmode="group")
    fig.update_xaxes(type="category", tickangle=-40)
    fig.update_yaxes(title="mean expression", col=1)
    fig.update_layout(legend={"orientation": "h", "y": 1.1, "yanchor": "bottom", "x": 0})
    return style(fig, title=title, height=420)


def selection_composition_bar(counts: pd.Series, *, title: str | None = None) -> go.Figure:
    """Cell-type composition of a selection (``counts`` indexed by cell type)."""
    if counts.empty or counts.sum() == 0:
        return empty_figure("No cells selected", height=240)
    c = counts[counts > 0].sort_values()
    cmap = colour_map(sorted(counts.index.astype(str)))
    fig = go.Figure(
        go.Bar(
            x=(c / c.sum()).to_numpy(),
            y=c.index.astype(str),
            orientation="h",
            marker_color=[cmap[str(k)] for k in c.index],
            customdata=c.to_numpy(),
            hovertemplate="%{y}: %{x:.1%} (%{customdata:,} cells)<extra></extra>",
        )
    )
    fig.update_xaxes(tickformat=".0%", title="share of selection")
    fig.update_yaxes(type="category")
    return style(fig, title=title, height=max(220, 20 * len(c) + 90))


def cnv_heatmap(
    profile: pd.DataFrame,
    *,
    groups: Sequence[str] = ("malignant", "normal B", "reference"),
    patients: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Inferred copy number along the genome: one row per patient x cell group.

    ``profile`` is the atlas table ``cnv_profile`` (columns ``patient``, ``group``,
    ``window``, ``chromosome``, ``start``, ``end``, ``mean``: the mean infercnvpy signal of
    the group's cells per genomic window). Windows run along x in genome order with one tick
    per chromosome and a line between chromosomes; the colour scale is diverging and
    centred on 0 (gain red, loss blue), symmetric at the 99th percentile of ``|mean|``.
    """
    need = {"patient", "group", "window", "chromosome", "mean"}
    if profile is None or profile.empty or not need <= set(profile.columns):
        return empty_figure("No copy-number profile in this atlas")
    df = profile[profile["group"].astype(str).isin([str(g) for g in groups])].copy()
    if df.empty:
        return empty_figure("No copy-number profile for these groups")
    df[schema.OBS_PATIENT] = df[schema.OBS_PATIENT].astype(str)
    df["group"] = df["group"].astype(str)
    df["window"] = df["window"].astype(int)
    order_p = [str(p) for p in patients] if patients else sorted(df[schema.OBS_PATIENT].unique())
    order_p = [p for p in order_p if p in set(df[schema.OBS_PATIENT])]
    g_rank = {str(g): i for i, g in enumerate(groups)}
    rows = (
        df[[schema.OBS_PATIENT, "group"]]
        .drop_duplicates()
        .assign(_p=lambda d: d[schema.OBS_PATIENT].map({p: i for i, p in enumerate(order_p)}))
        .assign(_g=lambda d: d["group"].map(g_rank))
        .dropna(subset=["_p"])
        .sort_values(["_p", "_g"])
    )
    labels = [f"{r.patient} · {r.group}" for r in rows.itertuples()]
    windows = df[["window", "chromosome"]].drop_duplicates("window").sort_values("window")
    mat = (
        df.assign(_row=df[schema.OBS_PATIENT] + " · " + df["group"])
        .pivot_table(index="_row", columns="window", values="mean", aggfunc="mean")
        .reindex(index=labels, columns=windows["window"].to_numpy())
    )
    z = mat.to_numpy(dtype=np.float32)
    finite = np.abs(z[np.isfinite(z)])
    lim = float(np.quantile(finite, 0.99)) if finite.size else 1.0
    lim = lim if lim > 0 else 1.0
    chrom = windows["chromosome"].astype(str).to_numpy()
    x = np.arange(len(chrom))
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=x,
            y=labels,
            zmin=-lim,
            zmax=lim,
            zmid=0,
            colorscale=DIVERGING_SCALE,
            colorbar={"title": {"text": "copy number<br>signal"}, "thickness": 12},
            customdata=np.broadcast_to(chrom, z.shape),
            hovertemplate="%{y}<br>chr%{customdata}<br>signal %{z:.3f}<extra></extra>",
        )
    )
    starts = np.flatnonzero(np.r_[True, chrom[1:] != chrom[:-1]])
    ends = np.r_[starts[1:], len(chrom)]
    for s in starts[1:]:
        fig.add_vline(x=s - 0.5, line={"color": "#4B5563", "width": 0.6})
    fig.update_xaxes(
        tickmode="array",
        tickvals=[(a + b - 1) / 2 for a, b in zip(starts, ends)],
        ticktext=[str(chrom[a]) for a in starts],
        title="chromosome",
        showgrid=False,
    )
    fig.update_yaxes(type="category", autorange="reversed", showgrid=False)
    return style(fig, title=title, height=max(300, 22 * len(labels) + 140))


# ----------------------------------------------------------------------------- spatial
def spatial_section_figure(
    df: pd.DataFrame,
    *,
    categorical: bool,
    colour_label: str = "",
    category_order: Sequence[str] | None = None,
    colours: dict[str, str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """One section as WebGL scatter (µm, equal aspect): ``df`` columns ``x``, ``y``,
    ``value`` as for :func:`umap_figure` (single-colour traces per category or per binned
    value, so large sections repaint fast); panning instead of lasso."""
    fig = umap_figure(
        df,
        categorical=categorical,
        colour_label=colour_label,
        category_order=category_order,
        colours=colours,
        title=title,
        height=640,
    )
    fig.update_layout(dragmode="pan", uirevision="spatial")
    return fig


def nhood_heatmap(df: pd.DataFrame, *, order: Sequence[str] | None = None,
                  title: str | None = None) -> go.Figure:  # fmt: skip
    """Neighbourhood-enrichment matrix (symmetric) from the long ``nhood_enrichment`` rows
    of one condition: colour = combined z-score, ``*`` where padj < 0.05."""
    if df.empty:
        return empty_figure("No neighbourhood enrichment for this choice")
    a, b = schema.COL_TYPE_A, schema.COL_TYPE_B
    types = sorted(set(df[a].astype(str)) | set(df[b].astype(str)))
    if order is not None:
        types = [t for t in order if t in set(types)] + [t for t in types if t not in set(order)]
    idx = {t: i for i, t in enumerate(types)}
    z = np.full((len(types), len(types)), np.nan)
    star = np.full(z.shape, "", dtype=object)
    for ta, tb, zz, padj in zip(
        df[a].astype(str), df[b].astype(str), df[schema.COL_ZSCORE], df[schema.COL_PADJ]
    ):
        i, j = idx[ta], idx[tb]
        z[i, j] = z[j, i] = zz
        s = "*" if (padj == padj and padj < 0.05) else ""
        star[i, j] = star[j, i] = s
    lim = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=types,
            y=types,
            text=star,
            texttemplate="%{text}",
            colorscale=DIVERGING_SCALE,
            zmin=-lim,
            zmax=lim,
            colorbar={"title": {"text": "z"}, "thickness": 12},
            hovertemplate="%{y} – %{x}<br>z %{z:.2f}<extra></extra>",
        )
    )
    fig.update_xaxes(type="category", tickangle=-40)
    fig.update_yaxes(type="category", autorange="reversed")
    return style(fig, title=title, height=max(380, 26 * len(types) + 170))


def niche_composition_figure(
    props: pd.DataFrame, *, condition_order: Sequence[str] | None = None,
    niche_order: Sequence[str] | None = None, title: str | None = None,
) -> go.Figure:  # fmt: skip
    """Niche proportions per condition: stacked bars of the niche shares (cells pooled over
    the sections of a condition; the test uses sections as units)."""
    if props.empty:
        return empty_figure("No niches")
    return composition_bar(
        props,
        group=schema.OBS_CONDITION,
        category=schema.COL_NICHE,
        value="n_cells",
        group_order=condition_order,
        category_order=niche_order,
        title=title,
    )


def niche_content_heatmap(comp: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Cell-type composition of each niche (rows niches, columns cell types)."""
    if comp.empty:
        return empty_figure("No niches")
    m = comp.pivot_table(
        index=schema.COL_NICHE, columns=schema.COL_CELL_TYPE, values=schema.COL_FRACTION
    ).fillna(0)
    fig = go.Figure(
        go.Heatmap(
            z=m.to_numpy(),
            x=list(m.columns),
            y=list(m.index),
            colorscale="YlOrRd",
            colorbar={"title": {"text": "share"}, "thickness": 12},
            hovertemplate="%{y}: %{x} %{z:.1%}<extra></extra>",
        )
    )
    fig.update_xaxes(type="category", tickangle=-40)
    fig.update_yaxes(type="category", autorange="reversed")
    return style(fig, title=title, height=max(320, 30 * len(m) + 170))
