"""The one exception type that reaches a user as a one-line message (no traceback unless --debug)."""

__all__ = ["ImgclsError"]


class ImgclsError(Exception):
    """A problem with the user's input (data, config, run folder) that they can fix.

    The message is one line that says what is wrong, where (file, key or class), and what to do.
    """
