"""Errors the CLI turns into one clear line each and exit code 2."""

from __future__ import annotations

from collections.abc import Iterable


class InputError(Exception):
    """Bad user input. ``problems`` holds one line per problem, naming file/sample/column."""

    def __init__(self, problems: str | Iterable[str]):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = [str(p) for p in problems] or ["invalid input"]
        super().__init__("\n".join(self.problems))
