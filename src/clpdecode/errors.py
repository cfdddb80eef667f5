"""Errors that the CLI turns into one clear line on stderr and exit status 2."""


class ClpError(Exception):
    """A user-facing error: bad input, a missing file, a mismatched artifact."""
