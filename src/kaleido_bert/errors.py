"""The one exception family the CLI turns into a one-line message (no traceback) and exit code 2."""


class KaleidoError(Exception):
    """A user-facing error: bad input, a mismatched store or checkpoint, an invalid config. One line, names the item."""
