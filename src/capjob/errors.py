"""Errors a user can act on. The CLI prints them as one line, without a traceback."""


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
