"""Hostile request fields on every endpoint: non-finite numbers, lone surrogates, wrong types → 4xx, never a 500.

Each case is a raw request body (bytes, so ``NaN``, ``1e400`` and ``"\\ud800"`` arrive exactly as a client can
send them) posted through FastAPI's TestClient with server exceptions turned into responses, so a fault shows
as the 500 a client would see. Every refusal must be a 4xx whose body is strict JSON (no bare ``NaN``) with a
``detail``, and a field error must name its field. Also here: real server faults stay 500, ``/healthz`` names
no absolute path, and the unit rules of :mod:`kaleido_bert.serve.validation`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from kaleido_bert.serve.app import create_app  # noqa: E402
from kaleido_bert.serve.validation import NOT_BLANK, SPACES, input_faults, public_facts, safe_json  # noqa: E402
from serve_fixtures import CataloguePipeline  # noqa: E402

NON_FINITE = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1e309"]
SURROGATES = [rb'"\ud800"', rb'"a\udfffb"', rb'"\ude00\ud83d"', rb'"\udbff"', b'"\xed\xa0\x80"']  # last: CESU-8
WRONG_FOR_INT = [b"-0", b"-0.0", b"0.0", b"2.5", b'"5"', b"true", b"false", b"null", b"[]", b"{}", b"[5]",
                 b"1" + b"0" * 30, b"-1" + b"0" * 30]
WRONG_FOR_BOOL = [b"0", b"1", b"0.0", b'"true"', b'"false"', b'"yes"', b"null", b"[]", b"{}", b"[true]"]
WRONG_FOR_TEXT = [b"42", b"4.2", b"true", b"null", b"[]", b'["red"]', b"{}"]

FIELD_CASES: list[tuple[str, bytes]] = [
    *[("k", v) for v in NON_FINITE + WRONG_FOR_INT],
    *[("rerank", v) for v in NON_FINITE + WRONG_FOR_BOOL],
    *[("query", v) for v in NON_FINITE + SURROGATES],
    *[("query", v) for v in WRONG_FOR_TEXT if v != b"null"],
    *[("category", v) for v in NON_FINITE + SURROGATES + WRONG_FOR_TEXT if v != b"null"],
]
"""(field, raw JSON value) pairs for ``POST /api/search/text``; every one must be a 422 naming the field."""

BODY_CASES: list[tuple[bytes, str | None]] = [
    *[(v, "application/json") for v in NON_FINITE + [b"[]", b'"red"', b"null", b"true", b"42"]],
    (rb'{"\ud800": NaN, "k": Infinity}', "application/json"),  # no query: the error echoes the whole body
    (b'{"query": "red", "k": 1' + b"0" * 5000 + b"}", "application/json"),  # more digits than Python parses
    (b"[" * 50_000 + b"]" * 50_000, "application/json"),  # deeper than the JSON parser recurses
    (b'{"query": "\xff\xfe"}', "application/json"),  # not UTF-8 at all
    (b"\xff\xfe\x00\x00", "application/json"),
    (b"\xff\xfe", "text/plain"),
    (b"\xff", None),
    (b'{"query": "red"}', "text/plain"),
]
"""Raw bodies (and content type) for ``POST /api/search/text``; every one must be a 4xx."""

FORM_K_CASES = ["NaN", "nan", "Infinity", "-Infinity", "inf", "1e400", "1e2", "-0", "2.5", "true", "[]",
                "99999999999999999999999999", "1" * 5000, "\u0663"]
"""Multipart ``k`` values for ``POST /api/search/image``; every one must be a 422 (an empty one means the default)."""

IMAGE_PATHS = ["/images/%ED%A0%80.jpg", "/images/%FF.jpg", "/images/images/%ED%B0%80.png", "/images/%C0%AE%C0%AE/x.jpg",
               "/images/NaN", "/images/1e400.webp", "/images/images/p00000_v1.jpg%00.png"]
"""``GET /images/...`` paths with undecodable or odd bytes; every one must be a 4xx."""


def _strict_json(response) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"the body holds a bare {constant}: {response.content[:200]!r}")

    return json.loads(response.content.decode("utf-8"), parse_constant=refuse)


def _refused(response, *, status: int | None = None) -> Any:
    assert 400 <= response.status_code < 500, (response.status_code, response.content[:300])
    assert status is None or response.status_code == status, (response.status_code, response.content[:300])
    body = _strict_json(response)
    assert body["detail"], body
    return body


@pytest.fixture(scope="module")
def pipeline(catalogue_root) -> CataloguePipeline:
    return CataloguePipeline(catalogue_root)


@pytest.fixture(scope="module")
def client(pipeline, catalogue_root):
    app = create_app(pipeline, catalogue_root=catalogue_root, max_upload_bytes=200_000, max_query_chars=64, max_k=20)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def photo(catalogue_root, pipeline) -> bytes:
    return (Path(catalogue_root) / pipeline.items[0].image).read_bytes()


def _multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"kaleidoboundary") -> tuple[bytes, dict]:
    """A hand-built multipart body (so its bytes can be anything) from (Content-Disposition params, payload)."""
    body = b"".join(b"--" + boundary + b"\r\nContent-Disposition: form-data; " + params + b"\r\n\r\n" + payload
                    + b"\r\n" for params, payload in parts) + b"--" + boundary + b"--\r\n"
    return body, {"content-type": "multipart/form-data; boundary=" + boundary.decode()}


# ---------------------------------------------------------------------------------------------- JSON search


@pytest.mark.parametrize(("field", "value"), FIELD_CASES, ids=[f"{f}={v[:12]!r}" for f, v in FIELD_CASES])
def test_a_bad_text_search_field_is_a_422_naming_it(client, pipeline, field, value):
    fields = {"query": b'"red shirt"', field: value}
    raw = b"{" + b", ".join(b'"' + k.encode() + b'": ' + v for k, v in fields.items()) + b"}"
    before = len(pipeline.calls)
    body = _refused(client.post("/api/search/text", content=raw, headers={"content-type": "application/json"}),
                    status=422)
    assert [tuple(e["loc"]) for e in body["detail"]] == [("body", field)], body
    if value in SURROGATES:
        assert f"{field} is not valid UTF-8 text: it holds a lone surrogate U+" in body["detail"][0]["msg"]
    assert len(pipeline.calls) == before  # refused before the pipeline (and its tokenizer) saw anything


@pytest.mark.parametrize(("raw", "content_type"), BODY_CASES, ids=[f"{r[:16]!r}-{c}" for r, c in BODY_CASES])
def test_a_bad_text_search_body_is_a_4xx(client, raw, content_type):
    headers = {"content-type": content_type} if content_type else {}
    _refused(client.post("/api/search/text", content=raw, headers=headers))


def test_good_neighbours_of_the_bad_values_are_accepted(client):
    for raw in (b'{"query": "red", "k": 5.0, "rerank": false}', b'{"query": "\\ud83d\\ude00 red", "k": 1}',
                b'{"query": " red ", "category": null}', b'{"query": "red", "category": ""}'):
        response = client.post("/api/search/text", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 200, (raw, response.text)
    assert client.post("/api/search/text", json={"query": "\u3000\u2003\t"}).status_code == 400  # blank


# ---------------------------------------------------------------------------------------------- multipart


@pytest.mark.parametrize("k", FORM_K_CASES, ids=[repr(k[:12]) for k in FORM_K_CASES])
def test_a_bad_image_search_k_is_a_422(client, photo, k):
    body = _refused(client.post("/api/search/image", files={"file": ("p.jpg", photo, "image/jpeg")},
                                data={"k": k}), status=422)
    assert [tuple(e["loc"]) for e in body["detail"]] == [("body", "k")], body


@pytest.mark.parametrize("endpoint", ["/api/search/image", "/api/caption", "/api/classify"])
def test_odd_bytes_in_multipart_names_and_texts_are_never_a_500(client, photo, endpoint):
    for filename in (b"\xff\xfe.jpg", b"\xed\xa0\x80.jpg", "caf\u00e9 \U0001f600.jpg".encode(), b"NaN"):
        raw, headers = _multipart([(b'name="file"; filename="' + filename + b'"', photo)])
        assert client.post(endpoint, content=raw, headers=headers).status_code == 200, filename
        raw, headers = _multipart([(b'name="file"; filename="' + filename + b'"', b"not an image at all")])
        detail = _refused(client.post(endpoint, content=raw, headers=headers), status=415)["detail"]
        assert detail.endswith(": not a JPEG, PNG or WebP image (unrecognised file signature)"), detail
    raw, headers = _multipart([(b'name="file"; filename="a.jpg"', b"")])
    assert "empty" in _refused(client.post(endpoint, content=raw, headers=headers), status=400)["detail"]


def test_classify_text_is_checked_and_odd_bytes_are_read_as_text(client, photo):
    for text in (b"\xff\xfe", b"\xed\xa0\x80", b"\x00", "\U0001f600 shirt".encode()):
        raw, headers = _multipart([(b'name="file"; filename="a.jpg"', photo), (b'name="text"', text)])
        # Starlette reads form text that is not UTF-8 as Latin-1: valid text, so classified, never a 500
        assert client.post("/api/classify", content=raw, headers=headers).status_code == 200, text
    for text in (b"x" * 65, b" " * 65):  # the limit counts what was sent, blank or not
        raw, headers = _multipart([(b'name="file"; filename="a.jpg"', photo), (b'name="text"', text)])
        assert "text is 65 characters" in _refused(client.post("/api/classify", content=raw, headers=headers),
                                                   status=413)["detail"]
    headers["content-type"] += "; charset=utf-16-le"  # a lone surrogate code unit in UTF-16 is not decodable
    raw, _ = _multipart([(b'name="file"; filename="a.jpg"', photo), (b'name="text"', b"\x00\xd8")])
    assert client.post("/api/classify", content=raw, headers=headers).status_code < 500


# ---------------------------------------------------------------------------------------------- the image route


@pytest.mark.parametrize("path", IMAGE_PATHS)
def test_odd_image_paths_are_a_4xx(client, path):
    _refused(client.get(path))


# ---------------------------------------------------------------------------------------------- faults, health


class _Faulty(CataloguePipeline):
    """A pipeline with a bug: search_text raises TypeError for any query; info() tells absolute paths."""

    def search_text(self, query: str, k: int, *, category: str | None = None, rerank: bool = True) -> list[dict]:
        raise TypeError("a bug in the pipeline, not in the query")

    def info(self) -> dict[str, Any]:
        root = str(Path(self.catalogue.root).resolve())
        return {"pipeline": "faulty", "run": "/srv/runs/r1", "catalogue": root, "items": 3,
                "models": {"retrieval": "/srv/runs/r1/finetune/retrieval/checkpoint-10", "caption": "finetune/c"},
                "sources": [root + "/catalogue.jsonl", "relative/path.txt"], "rerank": True}


def test_server_faults_stay_500_and_healthz_names_no_absolute_path(catalogue_root):
    app = create_app(_Faulty(catalogue_root), catalogue_root=catalogue_root)
    with TestClient(app, raise_server_exceptions=False) as faulty:
        assert faulty.post("/api/search/text", json={"query": "red"}).status_code == 500
        health = faulty.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "pipeline": "faulty", "run": "r1", "catalogue": Path(catalogue_root).name,
                             "items": 3, "models": {"retrieval": "checkpoint-10", "caption": "finetune/c"},
                             "sources": ["catalogue.jsonl", "relative/path.txt"], "rerank": True}
    assert str(catalogue_root) not in health.text and "/srv" not in health.text


def test_healthz_of_the_word_overlap_pipeline(client, pipeline):
    assert client.get("/healthz").json() == {"status": "ok", "pipeline": "word-overlap", "items": len(pipeline.items)}
    assert public_facts({"a": {"b": [Path("/x/y.pt"), "/x/z"]}, "c": "./w", "d": 1}) == \
        {"a": {"b": ["y.pt", "z"]}, "c": "./w", "d": 1}


def test_input_faults_turn_only_text_caused_errors_into_a_422():
    with pytest.raises(RequestValidationError) as info:
        with input_faults(query="red \ud800", category=None):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")
    (error,) = info.value.errors()
    assert error["loc"] == ("body", "query") and "U+D800 at character 4" in error["msg"]
    json.dumps(safe_json(info.value.errors())).encode("utf-8")  # and it can be sent
    with pytest.raises(TypeError, match="a real bug"):  # the texts are fine: a server fault, left alone
        with input_faults(query="red shirt"):
            raise TypeError("a real bug")
    with pytest.raises(RuntimeError):  # not the kind of error bad text causes
        with input_faults(query="\ud800"):
            raise RuntimeError("out of memory")


# ---------------------------------------------------------------------------------------------- unit rules


def test_safe_json_makes_anything_sendable():
    value = {"\ud800": [math.nan, math.inf, -math.inf, b"\xff", ValueError("bad \udfff"), (1, 2.5, None, True)],
             3: "ok \U0001f600", "big": 10**5000}
    safe = safe_json(value)
    assert json.loads(json.dumps(safe, allow_nan=False).encode("utf-8")) == {
        "\\ud800": ["NaN", "Infinity", "-Infinity", "\\xff", "bad \\udfff", [1, 2.5, None, True]],
        "3": "ok \U0001f600", "big": "an integer of 16,610 bits"}


def test_the_blank_pattern_agrees_with_str_strip():
    assert set(SPACES) == {chr(c) for c in range(0x110000) if chr(c).isspace()}
    for text in ["", " ", "\t\n", "\u3000\u2028", "\x1c\x85", " a ", "\ufeff", "\u200b", "x"]:
        assert (re.search(NOT_BLANK, text) is not None) == bool(text.strip()), repr(text)


def test_the_schema_documents_every_status(client):
    schema = client.get("/openapi.json").json()
    statuses = {(path, method): set(op["responses"]) for path, item in schema["paths"].items()
                for method, op in item.items()}
    assert statuses == {
        ("/healthz", "get"): {"200"},
        ("/api/categories", "get"): {"200"},
        ("/api/search/text", "post"): {"200", "400", "413", "422"},
        ("/api/search/image", "post"): {"200", "400", "413", "415", "422"},
        ("/api/caption", "post"): {"200", "400", "413", "415", "422"},
        ("/api/classify", "post"): {"200", "400", "413", "415", "422"},
        ("/images/{image_path}", "get"): {"200", "400", "404", "422"},
    }
    components = schema["components"]["schemas"]
    request = components["TextSearchRequest"]["properties"]
    assert request["rerank"]["type"] == "boolean" and request["k"]["type"] == "integer"
    assert request["query"]["pattern"] == NOT_BLANK and request["query"]["maxLength"] == 64
    assert request["category"]["enum"] == [None, "", *client.get("/api/categories").json()["categories"]]
    upload = components["Body_caption_api_caption_post"]["properties"]["file"]
    assert upload["minLength"] == 1 and upload["format"] == "binary"
    images = schema["paths"]["/images/{image_path}"]["get"]
    assert set(images["responses"]["200"]["content"]) == {"image/jpeg", "image/png", "image/webp"}
    example = images["parameters"][0]["schema"]["examples"][0]
    assert client.get(f"/images/{example}").status_code == 200
