"""Request fields the search service accepts, and error bodies it can always send back (``kaleido serve``).

The app (:mod:`kaleido_bert.serve.app`) builds its request models from these field types, so every endpoint holds
every field to the same rules, and its schema says what the server checks:

* :data:`Flag`: a JSON ``true``/``false`` only (no ``0``, ``"yes"``, ``null``);
* :data:`Count`: a JSON integer (``5``, and ``5.0`` which JSON Schema also calls an integer); ``NaN``,
  ``Infinity``, ``1e400`` (which Python's JSON reader turns into ``inf``), ``2.5``, ``"5"`` and ``true`` are
  refused;
* :data:`Text`: a JSON string that encodes as UTF-8 (a lone surrogate such as ``"\\ud800"`` is refused with a
  422 naming the field, before a tokenizer sees it). A query declares :data:`NOT_BLANK`, a pattern saying it
  holds a non-whitespace character; :data:`SPACES` is Python's whitespace, the set ``str.strip`` removes,
  spelled out so that every regex engine reads the pattern alike.
* :data:`LABELS` and :data:`TEMPLATE`: the patterns of ``POST /api/classify``'s zero-shot ``labels`` (comma-separated,
  none blank or repeated) and ``template`` (``{}`` exactly once), so that a schema-valid request is one the server
  accepts.

Error bodies: :func:`safe_json` makes any error detail sendable (non-finite numbers become the strings
``"NaN"``/``"Infinity"``, strings and bytes that are not UTF-8 are backslash-escaped, an integer too long to
print is described), so an error about bad
input never fails to encode and turn into a 500. :func:`input_faults` turns a ``TypeError``/``UnicodeError``
raised inside the pipeline into a 422 only when a text it was given is not UTF-8; any other exception stays a
server fault. :func:`public_facts` keeps filesystem paths out of ``/healthz``.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import PurePath
from typing import Annotated, Any

from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from pydantic import BeforeValidator, StrictBool, StrictInt, StrictStr, ValidationInfo
from pydantic_core import PydanticCustomError

SPACES = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008" \
         "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
"""Every character ``str.isspace`` (and so ``str.strip``) treats as whitespace."""
NOT_BLANK = f"[^{SPACES}]"
"""The pattern of a text that holds at least one non-whitespace character (JSON Schema patterns are unanchored)."""
_MAX_INT_BITS = 14_000  # about 4,200 decimal digits, under Python's int-to-str limit
_SPACE, _SOLID = f"[{SPACES}]", f"[^,{SPACES}]"
_LABEL = f"{_SOLID}(?:[^,]*{_SOLID})?"  # one stripped label: no comma, no whitespace at either end
_REPEAT = f"(?:[^,]*,)*{_SPACE}*({_LABEL}){_SPACE}*,(?:[^,]*,)*{_SPACE}*\\1{_SPACE}*(?:,|$)"
LABELS = f"^(?:{_SPACE}*|(?!{_REPEAT}){_SPACE}*{_LABEL}{_SPACE}*(?:,{_SPACE}*{_LABEL}{_SPACE}*)*)$"
"""The pattern of a zero-shot ``labels`` field: blank (none), or comma-separated labels, none blank and none the same
as another after stripping (the rules of :func:`kaleido_bert.model.zero_shot.check_labels`)."""
_NO_SLOT = "(?:[^{]|\\{+[^{}])*\\{*"  # a text without "{}"
TEMPLATE = f"^(?:{_SPACE}*|{_NO_SLOT}\\{{\\}}{_NO_SLOT})$"
"""The pattern of a zero-shot ``template`` field: blank (the default), or a text holding ``{}`` exactly once."""


def utf8_problem(text: str) -> str | None:
    """Why ``text`` cannot be sent as UTF-8 (a lone surrogate, and where), or None when it can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"it holds a lone surrogate U+{ord(text[err.start]):04X} at character {err.start}"
    return None


def _utf8(value: Any, info: ValidationInfo) -> Any:
    problem = utf8_problem(value) if isinstance(value, str) else None
    if problem:
        raise PydanticCustomError("string_unicode", "{field} is not valid UTF-8 text: {problem}",
                                  {"field": info.field_name or "text", "problem": problem})
    return value


def _json_integer(value: Any) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PydanticCustomError("finite_number", "Input should be a finite integer, not {value}",
                                      {"value": safe_json(value)})
        if value.is_integer():
            return int(value)
    return value


Flag = StrictBool
"""A boolean field: JSON ``true`` or ``false`` only."""
Count = Annotated[StrictInt, BeforeValidator(_json_integer)]
"""An integer field: a JSON integer (or an integral float), never a string, boolean or non-finite number."""


Text = Annotated[StrictStr, BeforeValidator(_utf8)]
"""A string field: a JSON string (not a number, not ``null`` unless the field says ``| None``) that encodes as UTF-8.
Its length limit is the endpoint's to check: an over-long text is a 413, as docs/serving.md promises."""


def safe_json(value: Any) -> Any:
    """``value`` made JSON-encodable as strict UTF-8 JSON: non-finite floats as strings, unencodable text escaped."""
    if isinstance(value, str):
        return value if utf8_problem(value) is None else value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > _MAX_INT_BITS:
        return f"an integer of {value.bit_length():,} bits"  # str() refuses over 4,300 digits
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {safe_json(str(k) if not isinstance(k, str) else k): safe_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [safe_json(v) for v in value]
    if isinstance(value, BaseException):
        return safe_json(str(value))
    return safe_json(jsonable_encoder(value))


@contextlib.contextmanager
def input_faults(**texts: str | None) -> Iterator[None]:
    """Around a pipeline call: a ``TypeError``/``UnicodeError`` caused by one of ``texts`` (name → text) not being
    UTF-8 becomes a 422 naming it; every other exception, and those when the texts are fine, propagate unchanged.

    Raises:
        RequestValidationError: a named text is not UTF-8 and the call failed with a ``TypeError``/``UnicodeError``.
    """
    try:
        yield
    except (TypeError, UnicodeError):
        errors = [{"type": "string_unicode", "loc": ("body", name), "msg": f"{name} is not valid UTF-8 text: {problem}",
                   "input": safe_json(text)}
                  for name, text in texts.items() if text is not None and (problem := utf8_problem(text))]
        if not errors:
            raise
        raise RequestValidationError(errors) from None


def _public(value: Any) -> Any:
    if isinstance(value, str | PurePath) and os.path.isabs(value):
        return PurePath(value).name
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_public(v) for v in value]
    return value


def public_facts(facts: dict[str, Any]) -> dict[str, Any]:
    """A pipeline's ``info()`` with every absolute path cut to its last component (a service never tells
    clients where its files live)."""
    return _public(facts)
