"""Errors a user can fix: each message is one line that says what to change.

Every such error derives from :class:`UserError`, so the command line catches one type and prints
its message without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, a wrong setting or a state on disk the user can repair; the message says how."""


def first_line(error: BaseException) -> str:
    """An error's first line, or its type's name when it has no message: for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
