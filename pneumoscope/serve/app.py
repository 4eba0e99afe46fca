"""FastAPI app: the upload page, ``POST /v1/predict``, ``GET /healthz``, ``/openapi.json``.

``create_app(run_dir, ...)`` returns the app; the model loads once in its lifespan
(start-up). Bad input always gets a 4xx with a message naming the file and the problem:
413 over the upload limit (Content-Length checked first, then counted while reading),
415 for what is not a JPEG/PNG/DICOM image, 422 for an image that cannot be used
(corrupt, truncated, empty, absurd dimensions — refused from the header, before decoding).

Uploads never touch the disk: the multipart body is parsed into memory (bounded by the
upload limit), where Starlette's own parser spools a file part over 1 MiB to /tmp. Who may
ask is decided by pneumoscope.serve.security (Host header, token, rate limit, CSP on every
response). No Swagger UI (``/docs``): it loads its scripts from a CDN.
"""

from __future__ import annotations

import sys
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from pneumoscope import __version__
from pneumoscope.data.decode import ImageDecodeError
from pneumoscope.serve import DEFAULT_MAX_UPLOAD_BYTES
from pneumoscope.serve.engine import InferenceEngine
from pneumoscope.serve.security import (
    DEFAULT_RATE_LIMIT,
    HostCheck,
    RateLimit,
    SecurityHeaders,
    TokenCheck,
    allowed_host_names,
)

DISCLAIMER = (
    "Research tool, not a medical device: its output is not a diagnosis and must not "
    "guide the care of a patient."
)
# The page is self-contained: everything from this origin, images from data: URLs.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

# Problems (ImageDecodeError.problem prefixes) that mean "not a supported image type".
_UNSUPPORTED = ("unsupported format", "not an image", "not a readable DICOM file")


class ModelInfo(BaseModel):
    backbone: str | None
    image_size: int
    run: str
    runtime: Literal["torch", "onnxruntime"]
    threshold_rule: str


class Prediction(BaseModel):
    p_pneumonia: float = Field(description="probability of pneumonia, in [0, 1]")
    label: Literal["NORMAL", "PNEUMONIA", "BACTERIAL", "VIRAL"] = Field(
        description="binary runs: PNEUMONIA when p_pneumonia >= threshold; three-class runs: NORMAL below "
        "it, else BACTERIAL when p_bacterial / p_pneumonia >= bacterial_vs_viral_threshold, else VIRAL"
    )
    probabilities: dict[str, float] | None = Field(
        None, description="three-class runs: p of normal, bacterial and viral (summing to 1)"
    )
    bacterial_vs_viral_threshold: float | None = Field(
        None,
        description="three-class runs: threshold on p(bacterial | pneumonia), chosen on validation",
    )
    threshold: float = Field(
        description="the run's operating threshold, chosen on validation "
        "(or on a site sample by `pneumoscope calibrate`)"
    )
    threshold_rule: str
    model: ModelInfo
    input_png: str | None = Field(
        None, description="with ?heatmap=true: the model's input image, base64 PNG"
    )
    heatmap_png: str | None = Field(
        None, description="with ?heatmap=true: Grad-CAM overlay, base64 PNG"
    )
    heatmap_empty: bool | None = Field(
        None,
        description="with ?heatmap=true: no region raised the "
        "pneumonia score (the map is all zero)",
    )


class Health(BaseModel):
    status: Literal["ok"]
    model: ModelInfo
    version: str


def status_for(err: ImageDecodeError) -> int:
    if err.problem.startswith(_UNSUPPORTED):
        return 415
    if err.problem.startswith("file too large"):
        return 413
    return 422


def _static_dir() -> Path:
    return Path(str(resources.files("pneumoscope.serve").joinpath("static")))


def create_app(
    run_dir: str | Path,
    *,
    onnx_path: str | Path | None = None,
    threshold_rule: str | None = None,
    device: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    engine: InferenceEngine | None = None,
    host: str = "127.0.0.1",
    allowed_hosts: tuple[str, ...] = (),
    token: str | None = None,
    rate_limit: int | None = DEFAULT_RATE_LIMIT,
) -> FastAPI:
    """The web app for one run. `onnx_path`: probabilities from that ONNX export
    (Grad-CAM still uses the run's torch model). `engine`: an already loaded model.
    `host`: the address it will be bound to (with `allowed_hosts`, the Host header names
    it answers to); `token`: required of every API request when given; `rate_limit`:
    requests a minute per client (None or 0: no limit)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = engine or InferenceEngine(run_dir, onnx_path, threshold_rule, device)
        yield

    app = FastAPI(
        title="pneumoscope",
        version=__version__,
        lifespan=lifespan,
        description=f"Chest X-ray pneumonia classifier. {DISCLAIMER}",
        docs_url=None,  # Swagger UI / ReDoc load from a CDN
        redoc_url=None,
    )
    static = _static_dir()
    app.mount("/static", StaticFiles(directory=static), name="static")
    _add_error_handlers(app, max_upload_bytes)
    _add_guards(app, max_upload_bytes, host, allowed_hosts, token, rate_limit)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(
            static / "index.html",
            headers={
                "Content-Security-Policy": PAGE_CSP,
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-cache",
            },
        )

    @app.get("/healthz", response_model=Health)
    async def healthz(request: Request) -> dict:
        return {"status": "ok", "model": request.app.state.engine.info, "version": __version__}

    @app.post(
        "/v1/predict",
        response_model=Prediction,
        response_model_exclude_none=True,
        max_body_size=max_upload_bytes,
        openapi_extra=UPLOAD_BODY,
        responses={
            413: {"description": f"upload larger than {max_upload_bytes} bytes"},
            415: {"description": "not a JPEG, PNG or DICOM image"},
            422: {"description": "unreadable image (corrupt, truncated, empty, too many pixels)"},
        },
    )
    async def predict(
        request: Request,
        heatmap: bool = Query(False, description="add the Grad-CAM overlay (slower)"),
    ) -> dict:
        engine_: InferenceEngine = request.app.state.engine
        name, data = await read_upload(request)
        try:
            return await run_in_threadpool(engine_.predict, data, name, heatmap)
        except ImageDecodeError as err:
            raise HTTPException(status_for(err), detail=str(err)) from err

    return app


# The request body /v1/predict reads itself (read_upload), described for /openapi.json.
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "chest X-ray: JPEG, PNG (8/16-bit) or DICOM",
                        }
                    },
                }
            }
        },
    }
}


class InMemoryMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, its file parts kept in memory: the stock one rolls a
    part over 1 MiB into a temporary file on disk, where a DICOM's patient name would sit
    for the length of the request. Memory stays bounded: the route's max_body_size stops
    the body at the upload limit before more is read."""

    spool_max_size = sys.maxsize  # a SpooledTemporaryFile that never rolls over to disk


async def read_upload(request: Request) -> tuple[str, bytes]:
    """(file name, bytes) of the one `file` field of a multipart upload, read in memory."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(
            422, "expected a multipart/form-data upload with the image in the field `file`"
        )
    parser = InMemoryMultiPartParser(request.headers, request.stream(), max_files=1, max_fields=8)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise HTTPException(400, err.message) from err
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, "the field `file` (the image) is missing from the upload")
        return Path(upload.filename or "upload").name, await upload.read()
    finally:
        await form.close()


def _add_guards(
    app: FastAPI,
    max_upload_bytes: int,
    host: str,
    allowed_hosts: tuple[str, ...],
    token: str | None,
    rate_limit: int | None,
) -> None:
    """The middleware, innermost first: the upload limit, the token, the rate limit, the
    Host check, and the security headers around them all (refusals get them too)."""
    app.add_middleware(ContentLengthLimit, max_bytes=max_upload_bytes, paths=("/v1/predict",))
    if token:
        app.add_middleware(TokenCheck, token=token)
    if rate_limit:
        app.add_middleware(RateLimit, per_minute=rate_limit)
    app.add_middleware(HostCheck, allowed=allowed_host_names(host, allowed_hosts))
    app.add_middleware(SecurityHeaders)


def _too_large(max_upload_bytes: int) -> str:
    return f"upload too large: the limit is {max_upload_bytes:,} bytes"


# A refused upload up to this size is read and thrown away before the 413 goes out, so
# the client, still sending, reads our answer instead of a connection reset (what
# nginx's lingering close does); larger ones are cut off at once.
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024


async def _discard_body(receive) -> None:
    """Read the request body chunk by chunk and drop it (memory stays flat)."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


class ContentLengthLimit:
    """413 from the declared Content-Length, before the route parses a byte of the body.

    The route's own ``max_body_size`` (Starlette) then counts the bytes as they arrive,
    for chunked uploads or a lying header; this check only makes the early answer JSON
    with the limit in it, and spares reading (or 100-continue'ing) an upload we refuse."""

    def __init__(self, app, max_bytes: int, paths: tuple[str, ...]):
        self.app, self.max_bytes, self.paths = app, max_bytes, paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            declared = Headers(scope=scope).get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_bytes:
                if int(declared) <= DRAIN_LIMIT_BYTES:
                    await _discard_body(receive)
                response = JSONResponse(
                    {"detail": _too_large(self.max_bytes)},
                    status_code=413,
                    headers={"Connection": "close"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _add_error_handlers(app: FastAPI, max_upload_bytes: int) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail
        if exc.status_code == 413 and detail == "Content Too Large":  # Starlette's body limit
            detail = _too_large(max_upload_bytes)
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)
