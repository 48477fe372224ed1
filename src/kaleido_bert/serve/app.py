"""The product-search web service: a FastAPI app over a loaded pipeline, plus the search page it serves.

:func:`create_app` wraps a pipeline object (the model is loaded once, by the caller) in these endpoints:

=============================  ==============================================================================
``GET /``                      the search page (``web/index.html``; its script and style under ``/static/``)
``GET /healthz``               ``{"status": "ok", ...pipeline.info()}``
``GET /api/categories``        the category names the search can be limited to
``POST /api/search/text``      JSON ``{"query", "k", "category", "rerank"}`` → ranked products (``reranked``: re-scored or not)
``POST /api/search/image``     multipart ``file`` + ``k`` → similar products and matching descriptions
``POST /api/caption``          multipart ``file`` → a generated description
``POST /api/classify``         multipart ``file`` (+ optional ``text``) → top categories and sub-categories;
                               with ``labels`` (comma-separated, + optional ``template``) also those labels
                               ranked zero-shot (:mod:`kaleido_bert.model.zero_shot`)
``GET /images/{path}``         a catalogue image, only from inside the catalogue directory
=============================  ==============================================================================

Bad input never causes a 500: uploads go through :func:`kaleido_bert.serve.uploads.read_upload` (400/413/415),
every request field has a strict type from :mod:`kaleido_bert.serve.validation` (booleans are ``true``/``false``,
counts finite integers in range, texts UTF-8: 422), a blank query or an unknown category is a 400, a text over
its length limit is a 413 (counted as sent), bodies over the upload limit are cut off with 413, and any
:class:`~kaleido_bert.errors.KaleidoError` becomes a 400. Errors are JSON ``{"detail": "..."}`` (a 422 keeps
FastAPI's list of field errors); every error body goes through :func:`~kaleido_bert.serve.validation.safe_json`,
so one about a ``NaN`` or a lone surrogate can still be sent. Each endpoint documents every status it answers with
in the OpenAPI schema (``/openapi.json``; ``tests/test_api_conformance.py`` checks it with schemathesis), and
``/healthz`` names no absolute path. Every response carries ``Server-Timing`` and ``X-Latency-ms`` headers, and
each request is logged (method, path, status, milliseconds) on the ``kaleido_bert.serve.app`` logger.
Pipeline calls are serialised by a lock; they run in FastAPI's thread pool, off the event loop.

The pipeline is duck-typed (see :class:`SearchPipeline`): ``search_text``, ``search_image``, ``caption``,
``classify``, ``zero_shot``, ``categories`` and ``info``. Needs the ``serve`` extra (fastapi, uvicorn,
python-multipart).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at run time, and
# they refer to names local to create_app (the request model, max_k).
import logging
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Protocol
from urllib.parse import quote

from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi import Path as PathParam
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kaleido_bert.errors import KaleidoError
from kaleido_bert.model.zero_shot import DEFAULT_TEMPLATE, check_template, parse_labels, prompts
from kaleido_bert.serve.schemas import (
    CaptionResponse,
    CategoriesResponse,
    ClassifyResponse,
    DescriptionHit,
    ErrorResponse,
    HealthResponse,
    ImageSearchResponse,
    LabelProb,
    LabelScore,
    Product,
    TextSearchResponse,
)
from kaleido_bert.serve.uploads import MAX_UPLOAD_BYTES, UploadError, read_upload
from kaleido_bert.serve.validation import (
    LABELS,
    NOT_BLANK,
    TEMPLATE,
    Count,
    Flag,
    Text,
    input_faults,
    public_facts,
    safe_json,
)

log = logging.getLogger("kaleido_bert.serve.app")

WEB_DIR = Path(__file__).resolve().parent / "web"
"""The search page's files (index.html, app.js, style.css), shipped as package data."""
IMAGE_SUFFIXES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
"""The only files ``GET /images/`` serves."""
MULTIPART_SLACK = 64 * 1024
"""Bytes a request body may exceed the upload limit by (multipart boundaries, headers and form fields)."""


class SearchPipeline(Protocol):
    """What :func:`create_app` needs from the model side (``kaleido_bert.serve.pipeline.KaleidoBertPipeline``)."""

    def search_text(
        self, query: str, k: int, *, category: str | None = None, rerank: bool = True
    ) -> list[dict[str, Any]]: ...

    def search_image(self, image: Image.Image, k: int) -> dict[str, list[dict[str, Any]]]: ...

    def caption(self, image: Image.Image) -> str: ...

    def classify(self, image: Image.Image, text: str | None = None) -> dict[str, list[dict[str, Any]]]: ...

    def zero_shot(self, image: Image.Image, labels: list[str], template: str = ...) -> list[dict[str, Any]]: ...

    def categories(self) -> list[str]: ...

    def info(self) -> dict[str, Any]: ...

    @property
    def reranks(self) -> bool: ...


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


_TEXT_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("a blank query, an unknown category, a body that is not JSON, or a query the pipeline refuses"),
    413: _error("a query over its length limit, or a request body over the upload limit"),
    422: {"description": "a field of the wrong type or out of range: k not a finite integer in range, rerank not "
                         "a JSON boolean, a text that is not valid UTF-8, a missing query"},
}
_UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("an empty, truncated, corrupt or too small image, a declared type that disagrees with the "
                "file's signature, or a malformed multipart body"),
    413: _error("the upload is over the byte limit or its header promises more pixels than allowed, the "
                "request body is over the limit, or a text is over its length limit"),
    415: _error("not a JPEG, PNG or WebP image (by declared content type or file signature)"),
    422: {"description": "no file part, k not an integer in range, or a text that is not valid UTF-8"},
}
_CLASSIFY_ERRORS: dict[int | str, dict[str, Any]] = {
    **_UPLOAD_ERRORS,
    400: _error(f"{_UPLOAD_ERRORS[400]['description']}; labels with a blank or repeated item, a template without "
                "exactly one {}, or a run without the classifier a field needs (when no labels are given)"),
}
_IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the image file",
          "content": {media: {"schema": {"type": "string", "format": "binary"}} for media in
                      sorted(set(IMAGE_SUFFIXES.values()))}},
    400: _error("a malformed path: absolute, with a backslash or NUL, or with '.', '..' or empty segments"),
    404: _error("no such JPEG, PNG or WebP image inside the catalogue directory"),
}


# ---------------------------------------------------------------------------------------------- middleware


class _RequestGuard:
    """Times and logs every request, adds the latency headers, and refuses bodies over ``max_body`` with 413."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        received = 0

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                ms = (time.perf_counter() - start) * 1000
                headers = MutableHeaders(scope=message)
                headers.append("Server-Timing", f"app;dur={ms:.1f}")
                headers.append("X-Latency-ms", f"{ms:.1f}")
            await send(message)

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise HTTPException(413, f"request body over {self.max_body:,} bytes")
            return message

        try:
            length = Headers(scope=scope).get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                detail = f"request body is {int(length):,} bytes; the limit is {self.max_body:,} bytes"
                await JSONResponse({"detail": detail}, status_code=413)(scope, receive, timed_send)
            else:
                await self.app(scope, limited_receive, timed_send)
        finally:
            ms = (time.perf_counter() - start) * 1000
            log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status, ms)


# ---------------------------------------------------------------------------------------------- helpers


def catalogue_file(root: Path, relative: str) -> Path:
    """The catalogue image at ``relative`` inside ``root``, refusing anything that could leave ``root``.

    Refused: empty paths, absolute paths, backslashes, NUL, ``.``/``..``/empty segments (also when they arrived
    percent-encoded: the path is decoded before it gets here), files that are not JPEG/PNG/WebP, and symlinks
    whose target lies outside ``root``.

    Raises:
        HTTPException: 400 for a malformed or escaping path, 404 when no such image is inside ``root``.
    """
    if not relative or "\x00" in relative or "\\" in relative or relative.startswith("/"):
        raise HTTPException(400, "invalid image path")
    if any(part in ("", ".", "..") for part in relative.split("/")):
        raise HTTPException(400, "invalid image path: no '.', '..' or empty segments")
    if PurePosixPath(relative).suffix.lower() not in IMAGE_SUFFIXES:
        raise HTTPException(404, f"not a catalogue image: {relative}")
    base = root.resolve()
    try:
        target = (base / relative).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        raise HTTPException(404, f"image not found: {relative}") from None
    if not target.is_relative_to(base) or not target.is_file():
        raise HTTPException(404, f"image not found: {relative}")
    return target


def _example_image(root: Path) -> list[str] | None:
    """One catalogue image path, as the schema's example of ``GET /images/{image_path}`` (None when there is none)."""
    found = next((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), None)
    return None if found is None else [found.relative_to(root).as_posix()]


def _product(hit: dict[str, Any]) -> Product:
    return Product(**{**hit, "image_url": "/images/" + quote(str(hit["image"]))})


def _read_image(file: UploadFile, max_bytes: int) -> Image.Image:
    data = file.file.read(max_bytes + 1)  # one byte over is enough to say "too large"
    return read_upload(data, content_type=file.content_type, filename=file.filename or "upload", max_bytes=max_bytes)


def _check_text(text: str, what: str, max_chars: int, *, blank: bool = False) -> str | None:
    """``text`` without surrounding whitespace: a 413 when it was sent over ``max_chars`` characters, and when
    nothing is left None if ``blank`` is allowed, else a 400."""
    if len(text) > max_chars:
        raise HTTPException(413, f"{what} is {len(text):,} characters; the limit is {max_chars:,}")
    if not text.strip() and not blank:
        raise HTTPException(400, f"{what} is empty or whitespace-only")
    return text.strip() or None


# ---------------------------------------------------------------------------------------------- the app


def create_app(
    pipeline: SearchPipeline,
    *,
    catalogue_root: str | Path,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_query_chars: int = 512,
    max_k: int = 100,
) -> FastAPI:
    """Build the search service around a loaded pipeline.

    Args:
        pipeline: the model side (see :class:`SearchPipeline`); created once by the caller.
        catalogue_root: the catalogue directory whose images ``GET /images/`` serves (results' ``image`` paths
            are relative to it).
        max_upload_bytes: largest accepted image upload.
        max_query_chars: longest accepted text query (and classify ``text``).
        max_k: largest number of results a search may ask for.

    Returns:
        The FastAPI app; run it with :func:`serve` (or any ASGI server).

    Raises:
        KaleidoError: ``catalogue_root`` is not a directory or a limit is not positive.
    """
    root = Path(catalogue_root)
    if not root.is_dir():
        raise KaleidoError(f"catalogue root {root} is not a directory")
    if min(max_upload_bytes, max_query_chars, max_k) < 1:
        raise KaleidoError("max_upload_bytes, max_query_chars and max_k must be positive")
    lock = threading.Lock()
    known = list(pipeline.categories())

    def upload() -> Any:  # the file part of each upload endpoint: non-empty, sent as a file (``format: binary``)
        return File(description=f"a JPEG, PNG or WebP product photo, at least 16 px a side, at most "
                                f"{max_upload_bytes:,} bytes", json_schema_extra={"format": "binary", "minLength": 1})

    class TextSearchRequest(BaseModel):
        query: Text = Field(description="what to look for, in words (not blank; surrounding whitespace is ignored)",
                            json_schema_extra={"minLength": 1, "maxLength": max_query_chars, "pattern": NOT_BLANK})
        k: Count = Field(10, ge=1, le=max_k, description="number of results")
        category: Text | None = Field(None, description="only products of this category (see /api/categories); "
                                          "null or \"\" for all", json_schema_extra={"enum": [None, "", *known]})
        rerank: Flag = Field(True, description="re-score the candidates with the cross-modal model, where the "
                                               "model chose to on validation (the response's reranked says)")

    app = FastAPI(
        title="kaleido-bert product search",
        description="Search a fashion catalogue by text or by image, caption and classify product photos.",
        version="1",
    )
    app.add_middleware(_RequestGuard, max_body=max_upload_bytes + MULTIPART_SLACK)

    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": safe_json(str(exc))}, status_code=exc.status)

    @app.exception_handler(KaleidoError)
    async def _kaleido_error(request: Request, exc: KaleidoError) -> JSONResponse:
        return JSONResponse({"detail": safe_json(str(exc))}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": safe_json(exc.errors())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Any:
        safe = StarletteHTTPException(exc.status_code, detail=safe_json(exc.detail), headers=exc.headers)
        return await http_exception_handler(request, safe)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.get("/healthz", response_model=HealthResponse)
    def healthz() -> dict[str, Any]:
        return {**public_facts(pipeline.info()), "status": "ok"}

    @app.get("/api/categories", response_model=CategoriesResponse)
    def categories() -> CategoriesResponse:
        return CategoriesResponse(categories=list(pipeline.categories()))

    @app.post("/api/search/text", response_model=TextSearchResponse, responses=_TEXT_ERRORS)
    def search_text(body: TextSearchRequest) -> TextSearchResponse:
        query = _check_text(body.query, "query", max_query_chars)
        category = body.category or None
        if category is not None and category not in (names := list(pipeline.categories())):
            raise HTTPException(400, f"unknown category {category!r} (known: {', '.join(names)})")
        with lock, input_faults(query=query, category=category):
            hits = pipeline.search_text(query, body.k, category=category, rerank=body.rerank)
        return TextSearchResponse(query=query, k=body.k, category=category,
                                  reranked=bool(body.rerank and pipeline.reranks),
                                  results=[_product(h) for h in hits])

    @app.post("/api/search/image", response_model=ImageSearchResponse, responses=_UPLOAD_ERRORS)
    def search_image(
        file: Annotated[UploadFile, upload()],
        k: Annotated[int, Form(ge=1, le=max_k, description="number of products")] = 10,
    ) -> ImageSearchResponse:
        image = _read_image(file, max_upload_bytes)
        with lock:
            found = pipeline.search_image(image, k)
        return ImageSearchResponse(
            products=[_product(h) for h in found["products"]],
            descriptions=[DescriptionHit(**d) for d in found["descriptions"]],
        )

    @app.post("/api/caption", response_model=CaptionResponse, responses=_UPLOAD_ERRORS)
    def caption(file: Annotated[UploadFile, upload()]) -> CaptionResponse:
        image = _read_image(file, max_upload_bytes)
        with lock:
            text = pipeline.caption(image)
        return CaptionResponse(caption=text)

    @app.post("/api/classify", response_model=ClassifyResponse, responses=_CLASSIFY_ERRORS)
    def classify(
        file: Annotated[UploadFile, upload()],
        text: Annotated[Text | None, Form(description="optional product text to classify with (blank = none)",
                                          json_schema_extra={"maxLength": max_query_chars})] = None,
        labels: Annotated[Text | None, Form(
            description="optional comma-separated labels to rank zero-shot, e.g. 'striped, floral, plain' (none "
                        "blank, none repeated; blank = none)",
            json_schema_extra={"maxLength": max_query_chars, "pattern": LABELS})] = None,
        template: Annotated[Text, Form(  # a string, never null: a form sends null as the text "null"
            description="the prompt each label fills, holding {} once (blank = the default)",
            json_schema_extra={"maxLength": max_query_chars, "pattern": TEMPLATE})] = DEFAULT_TEMPLATE,
    ) -> ClassifyResponse:
        words = None if text is None else _check_text(text, "text", max_query_chars, blank=True)
        names = None if labels is None else _check_text(labels, "labels", max_query_chars, blank=True)
        form = check_template(_check_text(template, "template", max_query_chars, blank=True) or DEFAULT_TEMPLATE)
        if names is not None:
            prompts(parse_labels(names), form)  # bad labels are refused before the upload is decoded
        image = _read_image(file, max_upload_bytes)
        with lock, input_faults(text=words, labels=names, template=form):
            ranked = None if names is None else pipeline.zero_shot(image, parse_labels(names), form)
            try:
                found = pipeline.classify(image, words)
            except KaleidoError:
                if ranked is None:
                    raise
                found = {"category": [], "subcategory": []}  # labels given: the zero-shot answer stands alone
        return ClassifyResponse(
            category=[LabelProb(**p) for p in found["category"]],
            subcategory=[LabelProb(**p) for p in found["subcategory"]],
            zero_shot=None if ranked is None else [LabelScore(**r) for r in ranked],
        )

    @app.get("/images/{image_path:path}", response_class=FileResponse, responses=_IMAGE_RESPONSES)
    def image(image_path: Annotated[str, PathParam(description="image path relative to the catalogue root",
                                                   examples=_example_image(root))]) -> FileResponse:
        target = catalogue_file(root, image_path)
        return FileResponse(
            target,
            media_type=IMAGE_SUFFIXES[target.suffix.lower()],
            headers={"Cache-Control": "public, max-age=3600"},
        )

    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info") -> None:
    """Run ``app`` with uvicorn until interrupted (loopback only unless ``host`` says otherwise).

    Args:
        app: the app from :func:`create_app`.
        host: interface to bind; ``0.0.0.0`` exposes the service to the network.
        port: TCP port.
        log_level: uvicorn's log level; the per-request latency lines use the same level.
    """
    import uvicorn

    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(log_level.upper())
    uvicorn.run(app, host=host, port=port, log_level=log_level)
