"""Schemathesis hooks for ``tests/test_api_conformance.py`` (loaded by ``st run`` through ``SCHEMATHESIS_HOOKS``).

The upload endpoints take a ``format: binary`` file that must be a decodable JPEG, PNG or WebP of at least 16 px
a side; a schema cannot say "decodable image", so schemathesis's stock binary values (random bytes and 1×1
sample files) would all be refused with 400/415. This registers a strategy of real images for ``binary``: random
sizes from 16 to 64 px, random pixels, each of the three formats. Negative cases (empty files, wrong types) are
still generated from the schema, and must still be refused. :func:`filter_failure` drops one kind of false
report, and only after proving it false (see there).
"""

from __future__ import annotations

import io
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import jsonschema_rs
import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image
from schemathesis.core.failures import AcceptedNegativeData

FORMATS = ("JPEG", "PNG", "WEBP")


def _encode(size: tuple[int, int], seed: int, fmt: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


IMAGES = st.builds(_encode, st.tuples(st.integers(16, 64), st.integers(16, 64)), st.integers(0, 2**16),
                   st.sampled_from(FORMATS))
"""Decodable JPEG/PNG/WebP files the upload endpoints accept."""

schemathesis.openapi.format("binary", IMAGES)


def _form_as_read(request: Any) -> dict[str, str] | None:
    """The multipart body of ``request`` as the server reads it: each part's last value, files and fields as text
    (a file as a placeholder of its length); None when the body is not multipart."""
    content_type = request.headers.get("Content-Type", "")
    if not content_type.startswith("multipart/form-data") or not isinstance(request.body, bytes):
        return None
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + request.body)
    fields = {}
    for part in message.iter_parts():
        payload = part.get_payload(decode=True) or b""
        fields[part.get_param("name", header="content-disposition")] = payload.decode("utf-8", "replace")
    return fields


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure but a "schema-violating request accepted" whose multipart body, as sent, is valid.

    On the wire every multipart field is text, so a negative case that turns a text field into a number
    (``text: 7e16``) sends a valid text. schemathesis 4.32 reconciles such cases itself, but not when the body
    holds a file part (its validator cannot read the file value), so it reports them; this re-checks the body
    as the server reads it and drops the report only when that reading satisfies the schema.
    """
    if not isinstance(failure, AcceptedNegativeData):
        return True
    sent = _form_as_read(response.request)
    body = case.operation.get_body_for_media_type(case.media_type)
    if sent is None or body is None:
        return True
    return not jsonschema_rs.validator_for(body.optimized_schema).is_valid(sent)
