"""Errors a user can act on. The CLI prints them as one line, without a traceback."""

from typing import Optional


def first_line(text: object, limit: Optional[int] = None) -> str:
    """The first non-blank line of `text` (an error, or its message; None and an empty message
    give ""), cut to `limit` characters ending in "…" (None: not cut): the one-line error
    messages and report cells. Callers that name the error's type write it themselves."""
    if text is None:
        return ""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if limit is None or len(line) <= limit else line[: limit - 1] + "…"


def describe(error: BaseException, limit: Optional[int] = None) -> str:
    """`Type: first line of its message` (first_line, cut to `limit`), or `Type` alone when the
    message is empty: an unforeseen error in one line."""
    line = first_line(error, limit)
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


class CapjobError(Exception):
    """Base class: the message alone must tell the user what to change."""


class ConfigError(CapjobError):
    """A config value is invalid; the message starts with the key."""


class SourceError(CapjobError):
    """The input cannot be read (missing path/bucket/column, unreachable endpoint...)."""


class SinkError(CapjobError):
    """The output location cannot be written."""


class AccountingError(CapjobError):
    """Rows in != captioned + quarantined: something was lost or duplicated."""


class ClusterError(CapjobError):
    """The cluster lost what the job needs mid-run (a node that left); what was written stays."""
