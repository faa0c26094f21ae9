"""Shareable URLs: a page's main selections live in the query string.

``parse_query("?gene=CD5&condition=A,B")`` -> ``{"gene": "CD5", "condition": "A,B"}``;
:func:`as_list` splits comma-joined values. :func:`build_query` writes them back, leaving
out empty values, so ``/genes?gene=CD5&condition=IBR_RES`` restores that view.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

MAX_QUERY = 4000  # characters; longer query strings are ignored (with a message)


def parse_query(search: str | None) -> dict[str, str]:
    """The last value of each parameter of a query string (``?a=1&b=2``)."""
    if not search:
        return {}
    s = search[1:] if search.startswith("?") else search
    if len(s) > MAX_QUERY:
        return {"_too_long": "1"}
    return {k: v for k, v in parse_qsl(s, keep_blank_values=False)}


def as_list(value: str | None) -> list[str]:
    """Comma-separated values (empty items dropped)."""
    if not value:
        return []
    return [v for v in (p.strip() for p in value.split(",")) if v]


def as_bool(value: str | None, default: bool = False) -> bool:
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def build_query(params: Mapping[str, Any]) -> str:
    """``?k=v&...`` from a mapping; lists are comma-joined; empty values are left out."""
    items = []
    for k, v in params.items():
        if v is None or v == "" or v == [] or v is False:
            continue
        if isinstance(v, (list, tuple)):
            v = ",".join(str(x) for x in v)
        elif v is True:
            v = "1"
        items.append((k, str(v)))
    return "?" + urlencode(items, safe=",:") if items else ""
