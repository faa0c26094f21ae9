"""Spatial: one section with its cells coloured by cell type, niche, mapping confidence, a
panel gene or a ligand–receptor pair's LIANA+ local score (WebGL, every cell drawn); niche composition per
condition; the neighbourhood-enrichment matrix per condition.

Reads the atlas's spatial results (``tme-atlas spatial``) through ``AtlasView.spatial``
(``atlas.spatial.SpatialResults``). URL: ``/spatial?section=S&colour=cell_type|niche|
confidence|lr|gene&lr=LIGAND^RECEPTOR&gene=G&condition=C``; the Interactions page links here with
``lr=`` set.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from dash import Input, Output, dcc, html

from atlas import schema

from .. import components as C
from .. import figures as F
from ..data import UnknownValue
from ..urls import build_query

NAME = "spatial"
PATH = "/spatial"
TITLE = "Spatial"
COLOUR_TYPE = "cell_type"
COLOUR_NICHE = "niche"
COLOUR_CONFIDENCE = "confidence"
COLOUR_LR = "lr"
COLOUR_GENE = "gene"
COLOUR_CHOICES = {
    COLOUR_TYPE: "cell type",
    COLOUR_NICHE: "niche",
    COLOUR_CONFIDENCE: "mapping confidence",
    COLOUR_LR: "LR local score",
    COLOUR_GENE: "gene",
}
LR_SEP = "^"  # liana's ligand^receptor


def lr_href(ligand: str, receptor: str) -> str:
    """The Spatial page's query for one interaction (the Interactions page links with it)."""
    return build_query({"colour": COLOUR_LR, "lr": f"{ligand}{LR_SEP}{receptor}"})


def section_frame(
    sp, section: str, colour: str, lr: str | None, gene: str | None = None
) -> tuple[pd.DataFrame, bool, str]:
    """``(x, y, value)`` of one section's cells, whether categorical, and the colour label."""
    rows = sp.section_rows(section)
    cells = sp.cells().iloc[rows]
    df = pd.DataFrame(
        {
            "x": cells[schema.OBS_SPATIAL_X].to_numpy(np.float32),
            "y": cells[schema.OBS_SPATIAL_Y].to_numpy(np.float32),
        }
    )
    if colour == COLOUR_NICHE:
        df["value"] = cells[schema.OBS_NICHE].to_numpy()
        return df, True, "niche"
    if colour == COLOUR_CONFIDENCE:
        df["value"] = cells[schema.OBS_CELL_TYPE_CONFIDENCE].to_numpy(np.float32)
        return df, False, "confidence"
    if colour == COLOUR_LR and lr:
        df["value"] = sp.local_score(lr, rows)
        return df, False, lr.replace(LR_SEP, " → ")
    if colour == COLOUR_GENE and gene:
        df["value"] = sp.expression(gene, rows)
        return df, False, gene
    df["value"] = cells[schema.OBS_CELL_TYPE].to_numpy()
    return df, True, "cell type"


def _choices(sp, params: dict, msgs: list[str]) -> dict:
    sections = sp.sections
    section = params.get("section") or (sections[0] if sections else None)
    if section not in sections:
        msgs.append(f"unknown section {str(section)[:40]!r}")
        section = sections[0] if sections else None
    lrs = sp.interactions
    lr = params.get("lr")
    if lr and lr not in lrs:
        msgs.append(f"interaction {str(lr)[:60]!r} was not scored in space (panel or choice)")
        lr = None
    colour = params.get("colour") or (COLOUR_LR if lr else COLOUR_TYPE)
    if colour not in COLOUR_CHOICES:
        msgs.append(f"unknown colour {str(colour)[:40]!r}")
        colour = COLOUR_TYPE
    if colour == COLOUR_LR and not lr:
        lr = lrs[0] if lrs else None
        if lr is None:
            colour = COLOUR_TYPE
    genes = sp.genes if sp.has_expression() else []
    gene = params.get("gene")
    if gene and gene not in genes:
        msgs.append(f"gene {str(gene)[:40]!r} is not on the panel")
        gene = None
    if colour == COLOUR_GENE and not gene:
        gene = genes[0] if genes else None
        if gene is None:
            colour = COLOUR_TYPE
    conds = sp.conditions
    condition = params.get("condition") or "all"
    if condition != "all" and condition not in conds:
        msgs.append(f"unknown condition {str(condition)[:40]!r}")
        condition = "all"
    return {
        "section": section,
        "colour": colour,
        "lr": lr,
        "panel_gene": gene,
        "nhood_cond": condition,
    }


def layout(ctx, params: dict) -> html.Div:
    view = ctx.view
    sp = view.spatial
    head = html.Div(
        [
            html.H1("Spatial niches"),
            html.P(
                "Sections mapped onto the atlas: where CLL cells, macrophages and T cells "
                "meet, niches across resistance states, and where ligand–receptor pairs are "
                "co-expressed.",
                className="lead",
            ),
        ],
        className="page-head",
    )
    if sp is None:
        return html.Div(
            [
                head,
                C.message(
                    "This atlas has no spatial results: run tme-atlas spatial "
                    "SHEET.csv --atlas DIR first.",
                    "info",
                ),
            ],  # fmt: skip
            className="page",
        )
    msgs: list[str] = []
    ch = _choices(sp, params, msgs)
    lr_opts = [{"label": s.replace(LR_SEP, " → "), "value": s} for s in sp.interactions]
    controls = C.row(
        C.col(
            C.control(
                "Section", C.dropdown("sp-section", sp.sections, ch["section"], clearable=False)
            )
        ),  # fmt: skip
        C.col(
            C.control(
                "Colour by",
                C.dropdown(
                    "sp-colour",
                    [{"label": v, "value": k} for k, v in COLOUR_CHOICES.items()],
                    ch["colour"],
                    clearable=False,
                ),
            )
        ),
        C.col(C.control("Ligand → receptor", C.dropdown("sp-lr", lr_opts, ch["lr"]))),
        C.col(
            C.control(
                "Gene (panel)",
                C.dropdown("sp-gene", sp.genes if sp.has_expression() else [], ch["panel_gene"]),
            )
        ),
    )
    cond_opts = [{"label": "all sections", "value": "all"}] + [
        {"label": c, "value": c} for c in sp.conditions
    ]
    return html.Div(
        [
            head,
            *C.messages(msgs),
            C.row(
                C.stat("sections", f"{len(sp.sections):,}"),
                C.stat("cells", f"{sp.n_cells:,}"),
                C.stat("niches", f"{len(sp.niches):,}"),
                C.stat("LR pairs scored", f"{len(sp.interactions):,}"),
            ),
            C.card(controls, C.graph("sp-section-fig"), title="Section"),
            C.row(
                C.col(
                    C.card(
                        C.graph("sp-niche-comp", _niche_comp(sp)),
                        title="Niche composition per condition",
                    )
                ),  # fmt: skip
                C.col(
                    C.card(
                        C.graph("sp-niche-content", _niche_content(sp)),
                        title="What each niche holds",
                    )
                ),  # fmt: skip
            ),
            C.card(
                C.control(
                    "Condition",
                    C.dropdown("sp-nhood-cond", cond_opts, ch["nhood_cond"], clearable=False),
                ),  # fmt: skip
                C.graph("sp-nhood"),
                title="Neighbourhood enrichment",
                subtitle="z-score combined over sections (Stouffer); * Holm-adjusted p < 0.05 "
                "(t-test of the section z-scores)",
            ),
            _lr_states_card(sp),
            dcc.Store(id="sp-dummy"),
        ],
        className="page",
    )


def _lr_states_card(sp):
    """The LR pairs' per-section local scores, each state vs the reference (sections as
    units, paired by patient): where the dissociated crosstalk shows up in space."""
    if not sp.has_table(schema.TABLE_SPATIAL_LR_DIFF):
        return html.Div()
    d = sp.table(schema.TABLE_SPATIAL_LR_DIFF)
    if not d.empty:
        d = d.sort_values(schema.COL_PVALUE)
    return C.card(
        C.table("sp-lr-diff", d, page_size=10, filterable=True),
        title="LR local scores across states",
        subtitle="mean local score per section, each state vs the reference "
        "(section as unit, paired by patient when possible; BH per contrast)",
    )


def _niche_comp(sp):
    if not sp.has_table(schema.TABLE_NICHE_PROPORTIONS):
        return F.empty_figure("No niche table")
    return F.niche_composition_figure(
        sp.table(schema.TABLE_NICHE_PROPORTIONS),
        condition_order=sp.conditions,
        niche_order=sp.niches,
    )


def _niche_content(sp):
    if not sp.has_table(schema.TABLE_NICHE_COMPOSITION):
        return F.empty_figure("No niche table")
    return F.niche_content_heatmap(sp.table(schema.TABLE_NICHE_COMPOSITION))


def register(app, ctx) -> None:
    @app.callback(
        Output("sp-section-fig", "figure"),
        Input("sp-section", "value"),
        Input("sp-colour", "value"),
        Input("sp-lr", "value"),
        Input("sp-gene", "value"),
    )
    def _section(section, colour, lr, gene):
        sp = ctx.view.spatial
        if sp is None:
            return F.empty_figure("No spatial results")
        msgs: list[str] = []
        params = {"section": section, "colour": colour, "lr": lr, "gene": gene}
        ch = _choices(sp, params, msgs)
        if msgs:
            return F.empty_figure("; ".join(msgs))
        df, categorical, label = section_frame(
            sp, ch["section"], ch["colour"], ch["lr"], ch["panel_gene"]
        )
        order = sp.cell_types if ch["colour"] == COLOUR_TYPE else sp.niches
        return F.spatial_section_figure(
            df,
            categorical=categorical,
            colour_label=label,
            category_order=order if categorical else None,
            title=f"{ch['section']} ({len(df):,} cells)",
        )

    @app.callback(Output("sp-nhood", "figure"), Input("sp-nhood-cond", "value"))
    def _nhood(condition):
        sp = ctx.view.spatial
        if sp is None or not sp.has_table(schema.TABLE_NHOOD):
            return F.empty_figure("No neighbourhood enrichment")
        d = sp.table(schema.TABLE_NHOOD)
        cond = condition or "all"
        if cond != "all" and cond not in sp.conditions:
            return F.empty_figure(str(UnknownValue(f"unknown condition {cond[:40]!r}")))
        d = d[d[schema.COL_CONDITION].astype(str) == cond]
        return F.nhood_heatmap(d, order=sp.cell_types)

    @app.callback(
        Output("url", "search", allow_duplicate=True),
        Input("sp-section", "value"),
        Input("sp-colour", "value"),
        Input("sp-lr", "value"),
        Input("sp-gene", "value"),
        Input("sp-nhood-cond", "value"),
        prevent_initial_call=True,
    )
    def _sync_url(section, colour, lr, gene, condition):
        return build_query(
            {
                "section": section,
                "colour": colour,
                "lr": lr if colour == COLOUR_LR else None,
                "gene": gene if colour == COLOUR_GENE else None,
                "condition": condition if condition and condition != "all" else None,
            }
        )
