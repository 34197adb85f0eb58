"""Module-name patterns: an exact name, a glob (``*.mlp.*``), or a regex prefixed with ``re:``."""

from __future__ import annotations

import fnmatch
import re


def matches(pattern: str, name: str) -> bool:
    """Whether ``name`` matches ``pattern`` (regex patterns use ``re.search``)."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern


def select(patterns: list[str], names: list[str], what: str) -> list[str]:
    """Names matched by any pattern, in their original order; a pattern that matches nothing is an error."""
    for pattern in patterns:
        if not any(matches(pattern, n) for n in names):
            examples = ", ".join(names[:3])
            raise ValueError(
                f"{what} pattern {pattern!r} matches no module. Patterns are exact names, globs or 're:' regexes, "
                f"e.g. 're:mlp\\.down_proj$'. Some candidate names: {examples}"
            )
    return [n for n in names if any(matches(p, n) for p in patterns)]
