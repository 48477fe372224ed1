"""The search service without the model: upload validation, the /images/ guard, request validation, headers.

The app is exercised through FastAPI's TestClient over :class:`CataloguePipeline`, a small real search engine
(word overlap for text, thumbnail similarity for images) over a synthetic catalogue: deterministic and fast,
so these tests check the HTTP plumbing; the model pipeline has its own end-to-end test.
"""

from __future__ import annotations

import io
import json
import logging
import re
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fixtures import (
    CONVERTIBLE_IMAGES,
    write_bomb_png,
    write_convertible_image,
    write_garbage,
    write_rgb_jpeg,
    write_rgb_png,
    write_tiny,
    write_truncated_jpeg,
    write_truncated_png,
)
from kaleido_bert.errors import KaleidoError
from kaleido_bert.serve.uploads import UploadError, read_upload, sniff_format
from serve_fixtures import CataloguePipeline

fastapi = pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from kaleido_bert.serve.app import WEB_DIR, catalogue_file, create_app  # noqa: E402

# ---------------------------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def pipeline(catalogue_root) -> CataloguePipeline:
    return CataloguePipeline(catalogue_root)


@pytest.fixture(scope="module")
def client(pipeline, catalogue_root) -> TestClient:
    app = create_app(pipeline, catalogue_root=catalogue_root, max_upload_bytes=200_000, max_query_chars=64, max_k=20)
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def photo(catalogue_root, pipeline) -> bytes:
    return (catalogue_root / pipeline.items[0].image).read_bytes()


# ---------------------------------------------------------------------------------------------- read_upload


def _bytes(writer, tmp_path: Path, name: str, *args) -> bytes:
    return writer(tmp_path / name, *args).read_bytes()


def _refused(data: bytes, content_type: str | None, status: int, words_in_message: str, **kw) -> UploadError:
    with pytest.raises(UploadError) as info:
        read_upload(data, content_type=content_type, filename="shot.jpg", **kw)
    err = info.value
    assert err.status == status, str(err)
    message = str(err)
    assert words_in_message in message and "shot.jpg" in message and "\n" not in message, message
    return err


def test_good_uploads_decode_as_rgb(tmp_path):
    jpeg = _bytes(write_rgb_jpeg, tmp_path, "a.jpg")
    png = _bytes(write_rgb_png, tmp_path, "a.png")
    webp_buf = io.BytesIO()
    Image.open(io.BytesIO(png)).save(webp_buf, "WEBP")
    for data, ctype in [(jpeg, "image/jpeg"), (png, "image/png"), (webp_buf.getvalue(), "image/webp"),
                        (jpeg, None), (png, "application/octet-stream"), (jpeg, "IMAGE/JPEG; charset=binary"),
                        (jpeg, "image/jpg")]:
        img = read_upload(data, content_type=ctype)
        assert img.mode == "RGB" and img.size == (48, 64)
    assert [sniff_format(d) for d in (jpeg, png, webp_buf.getvalue(), b"GIF89a")] == ["JPEG", "PNG", "WebP", None]


@pytest.mark.parametrize("kind", sorted(CONVERTIBLE_IMAGES))
def test_other_modes_convert_to_rgb(tmp_path, kind):
    data = write_convertible_image(tmp_path, kind).read_bytes()
    img = read_upload(data, content_type=None)
    assert img.mode == "RGB" and img.size == CONVERTIBLE_IMAGES[kind][2]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    data = write_convertible_image(tmp_path, "cmyk").read_bytes()
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    img = read_upload(data, content_type="image/jpeg")
    assert img.mode == "RGB" and np.asarray(img).std() > 10  # real pixels, not a blank conversion


def test_empty_and_too_large(tmp_path):
    _refused(b"", "image/jpeg", 400, "empty")
    jpeg = _bytes(write_rgb_jpeg, tmp_path, "a.jpg")
    _refused(jpeg, "image/jpeg", 413, "limit", max_bytes=len(jpeg) - 1)
    assert read_upload(jpeg, content_type="image/jpeg", max_bytes=len(jpeg)).size == (48, 64)


@pytest.mark.parametrize("ctype", ["text/plain", "image/gif", "application/pdf", "image/svg+xml", "multipart/x"])
def test_unsupported_content_type(tmp_path, ctype):
    _refused(_bytes(write_rgb_jpeg, tmp_path, "a.jpg"), ctype, 415, "not supported")


def test_magic_bytes_must_agree_with_the_declared_type(tmp_path):
    png = _bytes(write_rgb_png, tmp_path, "a.png")
    _refused(png, "image/jpeg", 400, "declared as JPEG but the file is a PNG")
    _refused(b"just some notes, renamed to .jpg\n" * 4, "image/jpeg", 415, "unrecognised file signature")
    _refused(b"GIF89a" + bytes(64), None, 415, "not a JPEG, PNG or WebP")
    _refused(_bytes(write_garbage, tmp_path, "g.bin"), "application/octet-stream", 415, "unrecognised")
    # the right signature followed by junk is found by the decoder
    _refused(b"\xff\xd8\xff" + bytes(range(256)) * 8, "image/jpeg", 400, "not a readable image")


@pytest.mark.parametrize("writer", [write_truncated_jpeg, write_truncated_png])
def test_truncated_images(tmp_path, writer):
    data = writer(tmp_path / ("t.jpg" if writer is write_truncated_jpeg else "t.png")).read_bytes()
    _refused(data, None, 400, "truncated or corrupt")


def test_too_small(tmp_path):
    _refused(_bytes(write_tiny, tmp_path, "tiny.png"), "image/png", 400, "too small")


@pytest.mark.parametrize("size", [(50000, 50000), (9000, 9000)])
def test_decompression_bomb_is_refused_from_the_header(tmp_path, size):
    data = write_bomb_png(tmp_path / "bomb.png", size).read_bytes()
    length, kind = struct.unpack(">I4s", data[8:16])
    ihdr = data[16 : 16 + length]
    assert kind == b"IHDR" and struct.unpack(">II", ihdr[:8]) == size
    assert struct.unpack(">I", data[16 + length : 20 + length])[0] == zlib.crc32(b"IHDR" + ihdr)  # a valid CRC
    start = time.perf_counter()
    _refused(data, "image/png", 413, "too large")
    assert time.perf_counter() - start < 1.0


def test_pixel_limit_is_configurable(tmp_path):
    _refused(_bytes(write_rgb_png, tmp_path, "a.png"), "image/png", 413, "exceeds 1,000 pixels", max_pixels=1000)


# ---------------------------------------------------------------------------------------------- the app


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "<title>kaleido-bert product search</title>" in html
    for id_ in ("query", "k", "category", "search-button", "results", "drop-zone", "file-input", "caption",
                "classification", "descriptions", "error", "status"):
        assert f'id="{id_}"' in html, id_
    for name, ctype in (("app.js", "javascript"), ("style.css", "text/css")):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and ctype in response.headers["content-type"]
    for path in WEB_DIR.iterdir():  # no CDN, no external fonts: the page works offline
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", path.read_text()), path.name
        assert "@import" not in path.read_text() and "url(http" not in path.read_text()


def test_health_categories_and_openapi(client, pipeline):
    health = client.get("/healthz").json()
    assert health == {"status": "ok", "pipeline": "word-overlap", "items": len(pipeline.items)}
    assert client.get("/api/categories").json() == {"categories": pipeline.categories()}
    schema = client.get("/openapi.json").json()
    assert {"/api/search/text", "/api/search/image", "/api/caption", "/api/classify", "/api/categories",
            "/healthz", "/images/{image_path}"} <= set(schema["paths"])
    request = schema["components"]["schemas"]["TextSearchRequest"]["properties"]
    assert request["k"]["maximum"] == 20 and request["k"]["minimum"] == 1 and request["query"]["maxLength"] == 64
    assert "Product" in schema["components"]["schemas"]


def test_text_search_returns_ranked_products_with_image_urls(client, pipeline, caplog):
    item = pipeline.items[3]
    with caplog.at_level(logging.INFO, logger="kaleido_bert.serve.app"):
        response = client.post("/api/search/text", json={"query": f"  {item.title}  ", "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"] == item.title and body["k"] == 5 and len(body["results"]) == 5
    assert body["reranked"] is False  # asked for by default, but this pipeline never re-ranks: the response says so
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and scores[0] == 1.0
    assert any(r["id"] == item.id for r in body["results"] if r["score"] == 1.0)
    first = body["results"][0]
    assert first["image_url"] == "/images/" + first["image"]
    image = client.get(first["image_url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.content == (Path(pipeline.catalogue.root) / first["image"]).read_bytes()
    assert float(response.headers["X-Latency-ms"]) >= 0 and response.headers["Server-Timing"].startswith("app;dur=")
    assert any(re.fullmatch(r"POST /api/search/text 200 [\d.]+ ms", r.getMessage()) for r in caplog.records)


def test_category_filter(client, pipeline):
    category = pipeline.categories()[0]
    body = client.post("/api/search/text", json={"query": "with a", "k": 20, "category": category}).json()
    assert body["results"] and {r["category"] for r in body["results"]} == {category}
    everything = client.post("/api/search/text", json={"query": "with a", "k": 20, "category": ""}).json()
    assert everything["category"] is None and len({r["category"] for r in everything["results"]}) > 1


@pytest.mark.parametrize(
    ("body", "status", "words_in_detail"),
    [
        ({"query": "   ", "k": 5}, 400, "empty or whitespace-only"),
        ({"query": "", "k": 5}, 400, "empty"),
        ({"query": "x" * 65}, 413, "65 characters; the limit is 64"),
        ({"query": " x" + " " * 63}, 413, "65 characters; the limit is 64"),  # counted as sent, as the schema says
        ({"query": "shirt", "category": "SPACESHIPS"}, 400, "unknown category 'SPACESHIPS'"),
        ({"query": "shirt", "k": 0}, 422, "greater than or equal to 1"),
        ({"query": "shirt", "k": 21}, 422, "less than or equal to 20"),
        ({"query": "shirt", "k": "ten"}, 422, "valid integer"),
        ({"query": "shirt", "k": 2.5}, 422, "integer"),
        ({"query": 42}, 422, "valid string"),
        ({"query": "shirt", "rerank": 0}, 422, "valid boolean"),
        ({"query": "shirt", "category": " TOPS "}, 400, "unknown category ' TOPS '"),  # exact names only
        ({"k": 3}, 422, "Field required"),
    ],
)
def test_text_search_validation(client, body, status, words_in_detail):
    response = client.post("/api/search/text", json=body)
    assert response.status_code == status, response.text
    assert words_in_detail in json.dumps(response.json()["detail"])


def test_a_pipeline_refusal_is_a_400(pipeline, catalogue_root):
    class Refusing(CataloguePipeline):
        def search_text(self, query: str, k: int, **kw: Any) -> list[dict]:
            raise KaleidoError(f"query {query!r} has no words to search for")

    app = create_app(Refusing(catalogue_root), catalogue_root=catalogue_root)
    with TestClient(app) as refusing:
        response = refusing.post("/api/search/text", json={"query": "!!! ???"})
    assert response.status_code == 400 and response.json() == {"detail": "query '!!! ???' has no words to search for"}


def test_malformed_bodies_are_not_server_errors(client):
    assert client.post("/api/search/text", content=b"{not json", headers={"content-type": "application/json"}
                       ).status_code == 422
    assert client.post("/api/search/text", content=b"[]", headers={"content-type": "application/json"}
                       ).status_code == 422
    bad_multipart = client.post("/api/caption", content=b"--x\r\nnonsense",
                                headers={"content-type": "multipart/form-data; boundary=x"})
    assert 400 <= bad_multipart.status_code < 500
    assert client.post("/api/caption").status_code == 422  # no file at all


def test_image_endpoints(client, pipeline, photo):
    files = {"file": ("photo.jpg", photo, "image/jpeg")}
    found = client.post("/api/search/image", files=files, data={"k": "4"})
    assert found.status_code == 200, found.text
    body = found.json()
    assert len(body["products"]) == 4 and body["products"][0]["id"] == pipeline.items[0].id
    assert body["products"][0]["image_url"].startswith("/images/images/")
    assert body["descriptions"][0]["product_id"] == pipeline.items[0].product_id
    assert all(isinstance(d["title"], str) and d["title"] for d in body["descriptions"])  # never a None title
    assert body["descriptions"][0]["title"] == pipeline.items[0].title
    caption = client.post("/api/caption", files=files).json()
    assert caption == {"caption": pipeline.items[0].title.lower()}
    labels = client.post("/api/classify", files=files, data={"text": "a shirt"}).json()
    assert labels["category"][0]["label"] == pipeline.items[0].category
    for kind in ("category", "subcategory"):
        probs = [p["prob"] for p in labels[kind]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert pipeline.calls[-3:] == ["search_image", "caption", "classify"]


def test_image_endpoints_refuse_bad_uploads(client, photo, tmp_path):
    bomb = write_bomb_png(tmp_path / "bomb.png", (50000, 50000)).read_bytes()
    cases = [
        (("notes.jpg", b"hello, I am text", "image/jpeg"), 415, "unrecognised file signature"),
        (("notes.txt", b"hello, I am text", "text/plain"), 415, "not supported"),
        (("empty.jpg", b"", "image/jpeg"), 400, "empty"),
        (("cut.jpg", photo[: len(photo) // 2], "image/jpeg"), 400, "truncated or corrupt"),
        (("bomb.png", bomb, "image/png"), 413, "too large"),
        (("big.jpg", photo + bytes(200_001 - len(photo)), "image/jpeg"), 413, "the limit is 200,000 bytes"),
    ]
    for endpoint in ("/api/search/image", "/api/caption", "/api/classify"):
        for file, status, words_in_detail in cases:
            response = client.post(endpoint, files={"file": file})
            assert response.status_code == status, (endpoint, file[0], response.text)
            assert words_in_detail in response.json()["detail"] and file[0] in response.json()["detail"]
    for k in ("0", "21", "many"):
        assert client.post("/api/search/image", files={"file": ("p.jpg", photo, "image/jpeg")},
                           data={"k": k}).status_code == 422


def test_oversized_body_is_cut_off_before_parsing(client):
    huge = bytes(400_000)
    response = client.post("/api/caption", files={"file": ("huge.jpg", huge, "image/jpeg")})
    assert response.status_code == 413 and "limit" in response.json()["detail"]

    def chunks():  # no Content-Length: the body is counted as it arrives
        for _ in range(40):
            yield bytes(10_000)

    streamed = client.post("/api/search/text", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


@pytest.mark.parametrize(
    "path",
    [
        "/images/%2e%2e/catalogue.jsonl",
        "/images/..%2fcatalogue.jsonl",
        "/images/images/%2e%2e/%2e%2e/secret.jpg",
        "/images/%2e%2e%2fsecret.jpg",
        "/images/%2Fetc%2Fpasswd",
        "/images//etc/passwd",
        "/images/images/.%2fp00000_v1.jpg",
        "/images/images%5c..%5c..%5csecret.jpg",
        "/images/%00.jpg",
    ],
)
def test_image_route_refuses_traversal(client, path):
    response = client.get(path)
    assert response.status_code == 400, (path, response.status_code, response.text[:200])
    assert response.json()["detail"].startswith("invalid image path")


def test_image_route_serves_only_catalogue_images(client, catalogue_root):
    secret = catalogue_root.parent / "secret.jpg"
    secret.write_bytes((catalogue_root / "images" / "p00000_v1.jpg").read_bytes())
    link = catalogue_root / "images" / "escape.jpg"
    link.symlink_to(secret)
    inner = catalogue_root / "images" / "inner.jpg"
    inner.symlink_to(catalogue_root / "images" / "p00000_v1.jpg")
    try:
        assert client.get("/images/images/escape.jpg").status_code == 404  # a symlink leaving the root
        assert client.get("/images/images/inner.jpg").status_code == 200  # a symlink that stays inside
        assert client.get("/images/catalogue.jsonl").status_code == 404  # not an image
        assert client.get("/images/images/nope.jpg").status_code == 404
        assert client.get("/images/images").status_code == 404
        with pytest.raises(fastapi.HTTPException):
            catalogue_file(catalogue_root, str(secret))  # absolute
    finally:
        link.unlink()
        inner.unlink()
        secret.unlink()


def test_create_app_checks_its_arguments(pipeline, tmp_path):
    with pytest.raises(KaleidoError, match="not a directory"):
        create_app(pipeline, catalogue_root=tmp_path / "missing")
    with pytest.raises(KaleidoError, match="positive"):
        create_app(pipeline, catalogue_root=tmp_path, max_k=0)
