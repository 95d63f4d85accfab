"""Errors that the CLI turns into one-line messages.

Library code raises these; only the CLI exits.
"""


class ClfpipeError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class RecipeError(ClfpipeError):
    """A recipe file or override is invalid."""


class DataError(ClfpipeError):
    """The image folder is missing, empty or holds an unreadable image."""


class ManifestError(ClfpipeError):
    """A run directory or its manifest is missing, corrupt or inconsistent."""


class ExportError(ClfpipeError):
    """Export failed or the exported model disagrees with PyTorch."""


class ServeError(ClfpipeError):
    """The Triton server could not be started, reached or stopped."""


def first_line(exc: BaseException) -> str:
    """The first line of what an exception says, or its type's name when it says nothing: what a
    one-line error quotes of a library's message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
