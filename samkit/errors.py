"""The one exception type users see.

Anything raised as :class:`SamkitError` is a problem with the user's input or environment
(a missing file, a checkpoint that does not fit, a prompt outside the image). The CLI prints
its message on one line and exits non-zero; library callers can catch it.
"""


class SamkitError(Exception):
    """A user-facing error with a one-line, actionable message."""


def one_line(err: BaseException) -> str:
    """The first line of an error's message (some, e.g. CUDA's out-of-memory text, run to
    several), or its type's name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
