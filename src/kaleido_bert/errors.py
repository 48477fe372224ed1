"""The one exception family the CLI turns into a one-line message (no traceback) and exit code 2, and the check that
turns text a tokenizer cannot take into one."""

from __future__ import annotations


class KaleidoError(Exception):
    """A user-facing error: bad input, a mismatched store or checkpoint, an invalid config. One line, names the item."""


def require_utf8(text: str, what: str) -> str:
    """``text``, when it encodes as UTF-8 (what the tokenizer needs; it raises a bare TypeError otherwise).

    Raises:
        KaleidoError: a lone surrogate, named with its code point and position.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise KaleidoError(f"{what} is not valid UTF-8 text: it holds a lone surrogate U+{ord(text[err.start]):04X} "
                           f"at character {err.start}") from None
    return text
