"""The curated reference tables: structure, sources, coverage of the contract's cell types,
species-appropriate symbols and the HVG gene filters."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from preprocessing.annotate import load_markers
from preprocessing.integrate import excluded_gene_categories, load_gene_filters
from preprocessing.programs import load_programs

SIM_TYPES = [
    "CLL resting", "CLL activated", "CLL proliferating", "Normal B", "CD4 naive", "CD4 Tfh",
    "CD4 Treg", "CD8 effector", "CD8 exhausted", "NK", "Classical monocyte",
    "Non-classical monocyte", "NLC", "cDC", "pDC", "Platelet",
]  # fmt: skip
EXTRA_TYPES = ["Plasma cell", "Neutrophil", "Erythroid", "Stromal", "Endothelial"]
PROGRAMMES = [
    "proteasome", "immunoproteasome", "bcl2_antiapoptotic", "bcl2_proapoptotic", "nfkb_ln",
    "bcr_early", "proliferation", "oxphos", "immune_evasion", "cd20_regulation",
]  # fmt: skip


@pytest.mark.parametrize("species", ["human", "mouse"])
def test_marker_tables(species):
    m = load_markers(species)
    assert list(m.columns[:5]) == ["cell_type", "lineage", "gene", "direction", "source"]
    assert (m["source"].str.len() > 3).all(), "every marker row names its source"
    assert set(m["direction"]) <= {"up", "down"}
    assert not m.duplicated(["cell_type", "gene", "direction"]).any()
    types = set(m["cell_type"])
    for t in SIM_TYPES + EXTRA_TYPES:
        assert t in types, t
        assert (m[(m.cell_type == t)].direction == "up").sum() >= 2, t
    # one lineage per type
    assert (m.groupby("cell_type")["lineage"].nunique() == 1).all()
    assert m.loc[m.cell_type.str.startswith("CLL"), "lineage"].eq("B/CLL").all()


def test_marker_sources_cite_the_key_papers():
    m = load_markers("human")
    nlc = m[m.cell_type == "NLC"]
    assert nlc["source"].str.contains("Burger 2000").any()
    assert m["source"].str.contains("PMID:").mean() > 0.5


def test_mouse_tables_use_mouse_symbols():
    m = load_markers("mouse")
    p = load_programs("mouse")
    for genes in (m["gene"], p["gene"]):
        upper = [g for g in genes if g.isupper() and g != "TCL1A" and not g.startswith("H2-")]
        assert not upper, f"human-style symbols in a mouse table: {upper[:5]}"
    assert "Gnly" not in set(m["gene"])
    for g in ("Fcgr4", "Ly6c2", "Adgre1", "Cd5", "TCL1A", "Lyz2"):
        assert g in set(m["gene"]), g


@pytest.mark.parametrize("species", ["human", "mouse"])
def test_programme_tables(species):
    p = load_programs(species)
    assert list(p.columns[:4]) == ["program", "gene", "source", "description"]
    assert (p["source"].str.len() > 3).all() and (p["description"].str.len() > 3).all()
    for name in PROGRAMMES:
        assert (p["program"] == name).sum() >= 3, name
    assert not p.duplicated(["program", "gene"]).any()
    nfkb = p[p.program == "nfkb_ln"]
    assert nfkb["source"].str.contains("Herishanu 2011").all()
    # the immunoproteasome is kept apart from the constitutive proteasome
    prot = set(p.loc[p.program == "proteasome", "gene"].str.upper())
    assert {"PSMB8", "PSMB9", "PSMB10"}.isdisjoint(prot)


@pytest.mark.parametrize(
    ("gene", "category"),
    [
        ("IGHV3-23", "immunoglobulin"),
        ("IGKV1-5", "immunoglobulin"),
        ("IGLJ1", "immunoglobulin"),
        ("IGHM", "immunoglobulin"),
        ("IGHD", "immunoglobulin"),
        ("IGHG3", "immunoglobulin"),
        ("IGHA1", "immunoglobulin"),
        ("IGKC", "immunoglobulin"),
        ("IGLC2", "immunoglobulin"),
        ("JCHAIN", "immunoglobulin"),
        ("TRAC", "tcr"),
        ("TRBC2", "tcr"),
        ("TRBV20-1", "tcr"),
        ("TRDC", "tcr"),
        ("TRGC1", "tcr"),
        ("MT-CO1", "mitochondrial"),
        ("RPL13A", "ribosomal"),
        ("RPS4X", "ribosomal"),
        ("RPLP0", "ribosomal"),
        ("RPSA", "ribosomal"),
        ("HBB", "haemoglobin"),
        ("HBA2", "haemoglobin"),
        # look-alikes that must stay usable
        ("TRADD", ""),
        ("TRAF1", ""),
        ("IGHMBP2", ""),
        ("IGF1R", ""),
        ("IGLL5", "immunoglobulin"),
        ("RPS6KA1", ""),
        ("HBEGF", ""),
        ("HBP1", ""),
        ("MTOR", ""),
        ("CD79A", ""),
        ("MRPL12", ""),
    ],
)
def test_human_gene_filters(gene, category):
    assert excluded_gene_categories([gene], "human").iloc[0] == category


def test_mouse_gene_filters():
    genes = ["Ighm", "Igkc", "Iglc2", "Ighv1-72", "Igkv3-2", "Jchain", "Trac", "Trbc1",
             "Tcrg-C1", "mt-Co1", "Rpl13a", "Rps4x", "Hba-a1", "Hbb-bs",
             "Cd79a", "Tradd", "Ighmbp2", "Rps6ka1", "Hbegf"]  # fmt: skip
    cats = excluded_gene_categories(genes, "mouse")
    assert (cats.iloc[:14] != "").all(), cats.iloc[:14][cats.iloc[:14] == ""]
    assert (cats.iloc[14:] == "").all(), cats.iloc[14:][cats.iloc[14:] != ""]


def test_gene_filter_file_is_valid_regex():
    for species in ("human", "mouse"):
        filters = load_gene_filters(species)
        assert set(filters) == {
            "immunoglobulin", "tcr", "mitochondrial", "ribosomal", "haemoglobin",
        }  # fmt: skip
        for pats in filters.values():
            for p in pats:
                re.compile(p)


def test_simulator_genes_are_covered():
    """Every simulated cell type has at least 3 of its positive markers in the simulator's
    gene universe (so annotation can find it)."""
    from preprocessing.simulate import gene_universe

    _, human = gene_universe("human")
    m = load_markers("human")
    have = set(human)
    counts = m[(m.direction == "up") & m.gene.isin(have)].groupby("cell_type").size()
    counts = counts.reindex(SIM_TYPES).fillna(0)
    assert (counts >= 3).all(), counts[counts < 3]
    assert isinstance(counts, pd.Series)


def test_gene_positions_human():
    from references import GENE_TABLE_COLUMNS, gene_positions

    g = gene_positions("human")
    assert tuple(g.columns) == GENE_TABLE_COLUMNS
    assert g["symbol"].is_unique and len(g) > 30_000
    placed = g[g["chromosome"] != ""]
    assert len(placed) > 25_000 and (placed["start"] <= placed["end"]).all()
    # spot checks against hg38 (TP53 on 17p13.1, ATM on 11q22.3, CD5 on 11q12.2)
    row = g.set_index("symbol")
    assert (
        row.loc["TP53", "chromosome"] == "17" and 7_660_000 < row.loc["TP53", "start"] < 7_700_000
    )
    assert (
        row.loc["ATM", "chromosome"] == "11" and row.loc["ATM", "ensembl_id"] == "ENSG00000149311"
    )
    assert row.loc["CD5", "ensembl_id"] == "ENSG00000110448"


def test_gene_positions_mouse():
    from references import gene_positions

    g = gene_positions("mouse").set_index("symbol")
    assert len(g) > 40_000
    # GRCm38 spot checks: Trp53 on chr11, Cd5 on chr19
    assert g.loc["Trp53", "chromosome"] == "11" and g.loc["Trp53", "start"] == 69_580_359
    assert g.loc["Cd5", "chromosome"] == "19"
