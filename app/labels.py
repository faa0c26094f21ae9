"""The Labels menu: which label version a request sees (atlas labels or a curated one).

The menu's value is ``"SET@VERSION"`` (:data:`ATLAS_LABELS`: the atlas's own labels). The router puts the
menu's value in ``flask.g`` for its own request and in a cookie (scoped to the explorer's
path) for the callbacks that follow, so every callback of a page reads the same labels
through ``ctx.view`` without carrying the choice as an input.
"""

from __future__ import annotations

from typing import Any

from atlas import curation
from atlas.curation import SET_NAME_RE

LABELS_COOKIE = "tme_labels"  # the Labels menu's choice: "SET@VERSION" or ATLAS_LABELS
ATLAS_LABELS = "atlas"  # the menu's value for the atlas's own labels (never has an "@")
LOCAL_EDITOR = "local"  # the recorded editor when curating without auth


def parse_label_choice(value: Any) -> tuple[str, int] | None:
    """``("SET", version)`` of a Labels-menu value ``"SET@VERSION"``; None for the atlas's
    own labels and for anything malformed (never an error: the value comes from a cookie)."""
    if not isinstance(value, str) or len(value) > 60 or "@" not in value:
        return None
    name, _, version = value.rpartition("@")
    if not SET_NAME_RE.match(name) or not version.isdigit() or len(version) > 6:
        return None
    return name, int(version)


def label_choice() -> tuple[str, int] | None:
    """The label version of the current request: the Labels menu's value when the request
    is the menu's own change (set by the router), else the cookie."""
    import flask

    if not flask.has_request_context():
        return None
    if "tme_labels" in flask.g:
        return parse_label_choice(flask.g.tme_labels)
    return parse_label_choice(flask.request.cookies.get(LABELS_COOKIE))


def label_options(view: Any) -> list[dict]:
    """The Labels menu: the atlas's own labels, then every version of every label set."""
    opts = [{"label": "atlas labels (as built)", "value": ATLAS_LABELS}]
    entries = view.label_versions()
    latest: dict[str, int] = {}
    for name, version, _ in entries:
        latest[name] = max(latest.get(name, 0), version)
    for name, version, e in reversed(entries):
        tag = " (latest)" if latest[name] == version else ""
        who = str(e.get("user", ""))[:32]
        when = str(e.get("time", ""))[:16].replace("T", " ")
        opts.append(
            {
                "label": f"{name} v{version}{tag} · {who} {when}",
                "value": f"{name}@{version}",
            }
        )
    return opts


def run_hint(view: Any, command: str) -> str:
    """The command that computes a missing table for what ``view`` shows: ``tme-atlas
    analyse DIR``, or with ``--labels SET`` (``SET@N`` for an older version) for a curated
    version."""
    labels = getattr(view, "label_set", None)
    if not labels:
        return f"`tme-atlas {command} DIR`"
    version = getattr(view, "label_version", None)
    try:
        latest = curation.latest_version(view.atlas_dir, labels)
    except Exception:  # noqa: BLE001 - a hint only
        latest = version
    spec = labels if version == latest else f"{labels}@{version}"
    return f"`tme-atlas {command} DIR --labels {spec}`"
