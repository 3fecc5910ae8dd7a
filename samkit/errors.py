"""The one exception type users see.

Anything raised as :class:`SamkitError` is a problem with the user's input or environment
(a missing file, a checkpoint that does not fit, a prompt outside the image). The CLI prints
its message on one line and exits non-zero; library callers can catch it.
"""


class SamkitError(Exception):
    """A user-facing error with a one-line, actionable message."""
