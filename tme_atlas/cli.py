"""``tme-atlas`` (also ``python -m tme_atlas``): the command-line interface.

Subcommands: ``simulate``, ``build``, ``map``, ``analyse``, ``crosstalk``, ``export`` (offline:
:mod:`preprocessing`, :mod:`atlas`) and ``serve`` (the explorer, :mod:`app`, imported only
for that subcommand; it execs gunicorn on ``app.wsgi:server``, the Docker image's command).
Bad input (any :class:`atlas.errors.AtlasError`: ``InputError``, ``ConfigError``, a
missing atlas key, ...) ends with one line per problem on stderr and exit code 2; nothing
half-written is left behind.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from preprocessing import stages

EXIT_INPUT = 2


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML/JSON/TOML config file")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tme-atlas",
        description="CLL TME Atlas: build, analyse and explore single-cell atlases of the "
        "CLL tumour microenvironment across resistance states.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulate", help="simulate a CLL TME cohort with planted truth")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cells-per-sample", type=int, default=None, metavar="N")
    p.add_argument("--patients", type=int, default=None, metavar="N")
    p.add_argument("--species", choices=["human", "mouse"], default="human")
    p.add_argument("--healthy", action="store_true", help="healthy donors: no leukaemia")
    p.add_argument(
        "--vdj",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write Cell Ranger V(D)J contigs (sheet column vdj; default on)",
    )
    p.add_argument(
        "--lesions",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="plant copy-number lesions in the CLL clones (default on)",
    )
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("build", help="raw counts of many samples -> integrated, annotated atlas")
    p.add_argument("samplesheet", nargs="?", metavar="SAMPLESHEET.csv")
    p.add_argument("--h5ad", metavar="MERGED.h5ad", help="one pre-merged AnnData instead")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--resume", action="store_true", help="skip stages done with same config")
    p.add_argument("--keep-all", action="store_true", help="flag failing cells, keep them")
    p.add_argument(
        "--allow-outside-paths",
        action="store_true",
        help="allow sheet paths outside the sheet's folder",
    )
    p.add_argument("--skip", nargs="*", default=[], choices=list(stages.skippable()))
    _add_config(p)

    p = sub.add_parser(
        "map", help="map new samples onto a built atlas (scArches surgery, label transfer)"
    )
    p.add_argument("samplesheet", nargs="?", metavar="SAMPLESHEET.csv")
    p.add_argument("--h5ad", metavar="MERGED.h5ad", help="one pre-merged AnnData instead")
    p.add_argument("--atlas", required=True, metavar="DIR", help="the reference atlas")
    p.add_argument("--out", required=True, metavar="DIR2", help="the query atlas")
    p.add_argument(
        "--unknown-threshold",
        type=float,
        metavar="U",
        help="label uncertainty above which a cell is Unknown (mapping.unknown_threshold)",
    )
    p.add_argument("--query-only", action="store_true", default=None, help="query cells only")
    p.add_argument(
        "--allow-outside-paths",
        action="store_true",
        help="allow sheet paths outside the sheet's folder",
    )
    _add_config(p)

    p = sub.add_parser("analyse", help="composition, pseudobulk DE and programmes")
    p.add_argument("atlas_dir", metavar="DIR")
    p.add_argument("--reference", metavar="COND")
    p.add_argument("--contrast", nargs="+", metavar="COND")
    p.add_argument(
        "--labels",
        metavar="NAME",
        help="use the latest version of this curated label set (NAME@N: version N); tables "
        "go to DIR/annotations/NAME/tables/vN/ (the atlas is not rewritten)",
    )
    _add_config(p)

    p = sub.add_parser("crosstalk", help="ligand-receptor crosstalk per resistance state")
    p.add_argument("atlas_dir", metavar="DIR")
    p.add_argument("--n-perms", type=int, metavar="N")
    p.add_argument(
        "--labels",
        metavar="NAME",
        help="use the latest version of this curated label set (NAME@N: version N), after "
        "analyse --labels with the same version",
    )
    _add_config(p)

    p = sub.add_parser(
        "spatial", help="spatial sections: cell types from the atlas, niches, spatial LR"
    )
    p.add_argument("samplesheet", metavar="SHEET.csv", help="one row per section")
    p.add_argument("--atlas", required=True, metavar="DIR", help="the atlas to map onto")
    p.add_argument("--out", metavar="DIR2", help="output folder (default: DIR/spatial)")
    p.add_argument("--interactions", metavar="CSV", help="also score these ligand,receptor pairs")
    p.add_argument(
        "--allow-outside-paths",
        action="store_true",
        help="allow sheet paths outside the sheet's folder",
    )
    _add_config(p)

    p = sub.add_parser("simulate-spatial", help="simulate sections with planted spatial truth")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--seed", type=int, default=0, help="same seed as simulate: same profiles")
    p.add_argument("--patients", type=int, default=4, metavar="N")
    p.add_argument("--cells-per-section", type=int, default=4000, metavar="N")
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("labels", help="list the curated label sets: who changed what, when")
    p.add_argument("atlas_dir", metavar="DIR")
    p.add_argument("--set", metavar="NAME", help="only this label set")
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("export", help="self-contained h5ad (and tables) for collaborators")
    p.add_argument("atlas_dir", metavar="DIR")
    p.add_argument("--out", required=True, metavar="FILE.h5ad")
    for opt in ("cell-types", "conditions", "samples", "patients", "genes"):
        p.add_argument(f"--{opt}", nargs="+", metavar="X")
    p.add_argument("--tables", metavar="DIR", help="also write the tables as CSV here")
    p.add_argument("--with-model", action="store_true", help="copy the scVI model alongside")
    _add_config(p)

    p = sub.add_parser("serve", help="serve the explorer")
    p.add_argument("atlas_dir", nargs="?", metavar="DIR")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    _add_config(p)
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    o: dict = {}
    if args.command == "analyse":
        o["analyses"] = {"reference": args.reference, "contrasts": args.contrast}
    elif args.command == "crosstalk":
        o["crosstalk"] = {"n_perms": args.n_perms}
    elif args.command == "map":
        o["mapping"] = {"unknown_threshold": args.unknown_threshold, "query_only": args.query_only}
    elif args.command == "serve":
        o["serve"] = {"host": args.host, "port": args.port}
    return o


def _run(args: argparse.Namespace) -> int:
    from atlas.config import load_config
    from preprocessing.log import setup_logging

    if args.command == "simulate":
        setup_logging(verbose=args.verbose)
        from preprocessing.simulate import write_dataset

        write_dataset(
            args.out,
            seed=args.seed,
            cells_per_sample=args.cells_per_sample,
            n_patients=args.patients,
            species=args.species,
            healthy=args.healthy,
            vdj=args.vdj,
            lesions=args.lesions,
        )
        return 0

    if args.command == "simulate-spatial":
        setup_logging(verbose=args.verbose)
        from preprocessing.spatial_sim import write_spatial_dataset

        write_spatial_dataset(
            args.out,
            seed=args.seed,
            n_patients=args.patients,
            cells_per_section=args.cells_per_section,
        )
        return 0

    if args.command == "labels":
        _list_labels(args.atlas_dir, args.set)
        return 0

    config = load_config(args.config, overrides=_overrides(args))

    if args.command == "build":
        from preprocessing.pipeline import run_build

        _one_input(args, "build")
        run_build(
            samplesheet=args.samplesheet,
            h5ad=args.h5ad,
            out=args.out,
            config=config,
            resume=args.resume,
            keep_all=args.keep_all,
            allow_outside_paths=args.allow_outside_paths,
            skip=tuple(args.skip),
            verbose=args.verbose,
        )
        return 0

    if args.command == "map":
        from preprocessing.mapping import run_map

        _one_input(args, "map")
        run_map(
            samplesheet=args.samplesheet,
            h5ad=args.h5ad,
            atlas=args.atlas,
            out=args.out,
            config=config,
            allow_outside_paths=args.allow_outside_paths,
            verbose=args.verbose,
        )
        return 0

    setup_logging(verbose=args.verbose)
    if args.command == "analyse":
        from preprocessing.analyses import run_analyse_dir

        run_analyse_dir(args.atlas_dir, config=config, labels=args.labels)
    elif args.command == "crosstalk":
        from preprocessing.crosstalk import run_crosstalk_dir

        run_crosstalk_dir(args.atlas_dir, config=config, labels=args.labels)
    elif args.command == "spatial":
        from preprocessing.spatial import run_spatial

        run_spatial(
            args.samplesheet,
            atlas_dir=args.atlas,
            out=args.out,
            config=config,
            interactions=args.interactions,
            allow_outside_paths=args.allow_outside_paths,
        )
    elif args.command == "export":
        from atlas.export import export_atlas

        export_atlas(
            args.atlas_dir,
            args.out,
            cell_types=args.cell_types,
            conditions=args.conditions,
            samples=args.samples,
            patients=args.patients,
            genes=args.genes,
            tables_dir=args.tables,
            with_model=args.with_model,
        )
    elif args.command == "serve":
        from app.server import serve

        serve(args.atlas_dir, config=config, config_file=args.config)
    return 0


def _list_labels(atlas_dir: str, name: str | None) -> None:
    """One line per version: set, version, time (UTC), user, what, cells changed, and
    whether its tables were recomputed (``analyse`` / ``crosstalk --labels``)."""
    from pathlib import Path

    from atlas import curation, schema
    from atlas.errors import InputError, clip

    if not (Path(atlas_dir) / schema.ATLAS_FILE).is_file():
        raise InputError(f"{atlas_dir}: not an atlas directory (no {schema.ATLAS_FILE})")
    names = [curation.check_set_name(name)] if name else curation.label_sets(atlas_dir)
    if not names:
        print("no curated label sets")
    for n in names:
        for e in curation.versions(atlas_dir, n):
            v = int(e["version"])
            tables = curation.table_names(atlas_dir, n, v)
            done = [s for s, t in (("analyse", schema.TABLE_COMPOSITION),
                                   ("crosstalk", schema.TABLE_INTERACTIONS)) if t in tables]  # fmt: skip
            print(
                f"{n}\tv{v}\t{e.get('time', '')}\t{clip(e.get('user', ''), 64)}\t{e.get('summary', '')}"
                f"\t{e.get('n_changed', '')} cells\ttables: {', '.join(done) or '-'}"
            )


def _one_input(args, command: str) -> None:
    """``build`` and ``map`` read a sample sheet or one merged h5ad, not both, not neither."""
    if bool(args.samplesheet) == bool(args.h5ad):
        from atlas.errors import InputError

        raise InputError(f"{command}: give either SAMPLESHEET.csv or --h5ad MERGED.h5ad")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from atlas.errors import AtlasError

    try:
        return _run(args)
    except AtlasError as e:  # InputError, ConfigError, MissingKeyError, ...
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_INPUT
    except FileNotFoundError as e:
        name = e.filename or e
        print(f"error: file not found: {name}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
