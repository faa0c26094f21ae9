"""One error hierarchy for the whole project.

Every error the code raises on purpose is an :class:`AtlasError`. Each class says

* ``http_status``: what the explorer answers when it escapes a request (the Flask error
  handler in :mod:`app.security` reads it from the base class; nothing else is mapped);
* ``public``: whether its message is safe to show to a web user (a validator's message
  names the user's own, clipped, value; others stay in the server log).

The command line turns any of them into one line per problem on stderr and exit code 2.

::

    AtlasError (500)
    ├── InputError (400)                bad input: sheet, files, options, a user's choice
    │   ├── UnknownValue (400, public)  a choice not among the atlas's values (= UnknownValueError)
    │   │   ├── UnknownGeneError        a gene symbol not in the atlas (close matches listed)
    │   │   └── UnknownAtlasError       an atlas name that is not configured
    │   ├── InvalidName (400, public)   a label or label-set name a user typed is refused
    │   └── NotAnAtlasError (503)       a directory that is not a finished atlas
    │       └── StoreCorruptError       a read-store file truncated or unreadable
    ├── ConfigError (500)               an invalid configuration file/variable/flag
    ├── MissingKeyError (500)           an atlas lacks a key (names the stage to run)
    ├── AtlasUnavailableError (503)     a served atlas cannot be read now
    ├── CurationRefused (403, public)   a label edit by a user who may not edit
    ├── CurationConflict (409, public)  a label edit based on an outdated version
    └── ExportRefused (429, public)     an explorer export is not allowed now
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any


class AtlasError(Exception):
    """Base of every error the project raises on purpose.

    ``problems`` holds one line per problem (naming file/sample/column where there is one).
    """

    http_status: int = 500
    public: bool = False

    def __init__(self, problems: str | Iterable[str] = ()):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = [str(p) for p in problems] or [self._default]
        super().__init__("\n".join(self.problems))

    _default = "error"

    def __str__(self) -> str:  # never quoted (KeyError subclasses would quote it)
        return "\n".join(self.problems)


class InputError(AtlasError):
    """Bad user input. ``problems`` holds one line per problem, naming file/sample/column."""

    http_status = 400
    _default = "invalid input"


class UnknownValue(InputError, ValueError):
    """A user-supplied value that the atlas does not know (the message is safe to show)."""

    public = True


UnknownValueError = UnknownValue  # the name app.security used


class UnknownGeneError(UnknownValue, KeyError):
    """A gene symbol is not in the atlas; the message lists close matches."""


class UnknownAtlasError(UnknownValue):
    """A requested atlas name is not configured (the message is safe to show)."""


class InvalidName(InputError):
    """A cell-type label or label-set name typed by a user is refused (too long, control
    characters, a spreadsheet-formula prefix, ...); the message is safe to show."""

    public = True


class NotAnAtlasError(InputError):
    """``DIR`` is not a (finished, current-format) atlas directory."""

    http_status = 503


class StoreCorruptError(NotAnAtlasError):
    """A file of the read store is truncated or unreadable (checked on every open)."""


class ConfigError(AtlasError, ValueError):
    """A configuration file, variable or flag is invalid (one line per problem)."""


class AtlasUnavailableError(AtlasError, RuntimeError):
    """A served atlas cannot be read now (vanished, half-written, unreadable)."""

    http_status = 503


class CurationRefused(AtlasError):
    """A label edit by a user who may not edit (not an editor, or the explorer's curation
    is off); the message is safe to show."""

    http_status = 403
    public = True


class CurationConflict(AtlasError):
    """A label edit based on a version that is no longer the latest (another editor saved
    first); the message is safe to show."""

    http_status = 409
    public = True


class ExportRefused(AtlasError):
    """An export is not allowed now (rate or disk limit; the message is safe to show)."""

    http_status = 429
    public = True


# ------------------------------------------------------------------ the one validator
def clip(value: Any, n: int = 40) -> str:
    """``value`` as printable text of at most ``n`` characters (safe to echo back)."""
    s = "".join(ch if ch.isprintable() else "?" for ch in str(value))
    return s if len(s) <= n else s[: n - 1] + "…"


def check_choice(value: Any, allowed: Collection[str], what: str = "value") -> str:
    """``value`` if it is one of ``allowed``; else :class:`UnknownValue` (safe text)."""
    if isinstance(value, str) and value in allowed:
        return value
    raise UnknownValue(f"unknown {what} {clip(value)!r}")


def check_choices(
    values: Any, allowed: Collection[str], what: str = "value", limit: int | None = None
) -> list[str]:
    """The known values among ``values``, de-duplicated in order; an unknown value or more
    than ``limit`` values raise :class:`UnknownValue` (a message for the user); ``values``
    of the wrong type (not a list: a payload no browser sends) raise ``TypeError`` (the
    explorer answers "no update")."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, Sequence):
        raise TypeError(f"{what}s: expected a list, got {type(values).__name__}")
    if not isinstance(allowed, (set, frozenset, dict)):
        allowed = set(allowed)
    out: list[str] = []
    unknown: list[str] = []
    for v in values:
        if isinstance(v, str) and v in allowed:
            if v not in out:
                out.append(v)
        else:
            unknown.append(clip(v))
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise UnknownValue(f"unknown {what}: {shown}{more}")
    if limit is not None and len(out) > limit:
        raise UnknownValue(f"too many {what}s: {len(out)} (at most {limit} per request)")
    return out
