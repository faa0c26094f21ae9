"""Logging and progress helpers shared by the CLI stages."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

LOGGER_NAME = "tme_atlas"
# ``log.error(..., extra=FILE_ONLY)``: into build.log, not on the console (for problems the
# CLI prints itself as ``error: ...`` lines, so that each is shown once)
FILE_ONLY = {"file_only": True}


def _console_filter(record: logging.LogRecord) -> bool:
    return not getattr(record, "file_only", False)


def get_logger(name: str | None = None) -> logging.Logger:
    return logging.getLogger(LOGGER_NAME if name is None else f"{LOGGER_NAME}.{name}")


def setup_logging(log_file: str | Path | None = None, *, verbose: bool = False) -> logging.Logger:
    """Log to stderr (INFO, or DEBUG with ``verbose``) and, if given, to ``log_file``."""
    logger = get_logger()
    logger.setLevel(logging.DEBUG)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(fmt)
    console.addFilter(_console_filter)
    logger.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    logger.propagate = False
    return logger


def progress_enabled() -> bool:
    """Progress bars on a terminal, off under CI or when ``TME_ATLAS_NO_PROGRESS`` is set."""
    if os.environ.get("TME_ATLAS_NO_PROGRESS") or os.environ.get("CI"):
        return False
    return sys.stderr.isatty()


def progress(iterable=None, **kwargs):
    """``tqdm`` with the project's defaults (disabled off-terminal)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", not progress_enabled())
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)
