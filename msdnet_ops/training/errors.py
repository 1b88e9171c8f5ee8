"""The error type for mistakes a user can fix (bad path, bad option, missing data set).

The command line prints such an error as one clear line and exits with status 2 instead of
showing a traceback. Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: the message says what was given and what was expected."""


class DataError(UserError):
    """A data set is missing or malformed."""
