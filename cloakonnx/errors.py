"""The one exception type for user errors.

The CLI turns a :class:`CloakError` into ``cloakonnx: error: ...`` and exit code 1,
without a traceback (as Polygraphy does). Anything else is a bug and keeps its traceback.
"""


class CloakError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors can run to pages), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
