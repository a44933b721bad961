"""The HTTP face of ``edgetransfer-runtime serve``: a Starlette app that takes images, checks and
crops each one on its own, and hands the crops to a :class:`Backend` that runs the model (in the
server, a Predictor behind BentoML's adaptive batcher: :mod:`.server`).

    POST /v1/classify   one image as the body (image/*, application/octet-stream), or several as
                        multipart/form-data files; ?top_k=N. JSON: per image its top-k, with the
                        model's sha256 and variant.
    GET  /v1/model      labels, preprocessing, limits and provenance of the served model.

Each image is checked and preprocessed before it joins a batch, so a bad one is a 400 naming it
and never fails the other requests its batch would have held. Bounds: at most ``max_queue``
requests inside at once (503 with Retry-After at once past that), a body over ``max_body_mb`` is
a 413 (refused on its Content-Length before it is read, or as soon as it passes the limit), at
most ``max_images`` images, and at most one image per decoding thread in memory at a time.
Starlette is in the ``serve`` extra: this module is imported only by the server.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import numpy as np
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .errors import EdgeTransferError, first_line
from .metadata import ModelInfo
from .predictor import answers, as_json, crop
from .serve_config import ServeConfig
from .text import printable

__all__ = ["Backend", "Metrics", "HttpError", "build_app", "BodyLimit", "ApiKey", "HEALTH_PATHS"]

HEALTH_PATHS = frozenset({"/livez", "/readyz", "/healthz"})
RAW_TYPES = ("application/octet-stream",)
NAME_LIMIT = 80  # characters of a client's file name echoed back


class Backend(Protocol):
    """Runs the model: ``describe`` once, then ``infer`` on stacked crops :func:`crop` made
    (uint8 NHWC, finished into rows by :meth:`Predictor.run_crops`), returning logits."""

    async def describe(self) -> dict[str, Any]: ...

    async def infer(self, crops: np.ndarray) -> np.ndarray: ...


class Metrics(Protocol):
    def answered(self, status: int, seconds: float, images: int) -> None: ...

    def inside(self, delta: int) -> None: ...


class HttpError(Exception):
    """An answer other than 200: its status and one line that says what to do."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, status_code=self.status, headers=self.headers)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is a 413, by its Content-Length before any of
    it is read, or while it streams in (chunked) as soon as it passes the limit."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await self._refuse(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        await self.app(scope, limited, send)

    async def _refuse(self, scope, receive, send) -> None:
        await _too_large(self.limit).response()(scope, receive, send)


def _too_large(limit: int) -> HttpError:
    message = f"the request body is over the server's limit of {limit / 2**20:g} MB; send smaller or fewer images"
    return HttpError(413, message, {"Connection": "close"})


class ApiKey:
    """ASGI middleware: every path but the health checks needs ``Authorization: Bearer KEY``."""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in HEALTH_PATHS and not self._allowed(scope):
            refusal = HttpError(401, "this server needs its API key: send the header 'Authorization: Bearer KEY'", {"WWW-Authenticate": "Bearer"})
            return await refusal.response()(scope, receive, send)
        await self.app(scope, receive, send)

    def _allowed(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key)


@dataclass
class _State:
    config: ServeConfig
    backend: Backend
    metrics: Metrics
    decoders: anyio.CapacityLimiter
    inside: int = 0
    info: ModelInfo | None = None
    described: dict[str, Any] | None = None


def build_app(config: ServeConfig, backend: Backend, metrics: Metrics) -> Starlette:
    """The app, mounted by the server at ``/v1``."""
    state = _State(config, backend, metrics, anyio.CapacityLimiter(config.threads or os.cpu_count() or 1))

    async def classify(request: Request) -> JSONResponse:
        return await _admitted(state, request, _classify)

    async def model(request: Request) -> JSONResponse:
        try:
            return JSONResponse(await _model(state))
        except HttpError as exc:
            return exc.response()

    return Starlette(routes=[Route("/classify", classify, methods=["POST"]), Route("/model", model, methods=["GET"])])


async def _admitted(state: _State, request: Request, handler: Callable[[_State, Request], Awaitable[dict]]) -> JSONResponse:
    if state.inside >= state.config.max_queue:
        state.metrics.answered(503, 0.0, 0)
        return HttpError(503, f"the server is full ({state.config.max_queue} requests inside); retry shortly", {"Retry-After": "1"}).response()
    started = time.perf_counter()
    state.inside += 1
    state.metrics.inside(1)
    status, images = 500, 0
    try:
        body = await asyncio.wait_for(handler(state, request), state.config.timeout_s)
        status, images = 200, len(body["results"])
        return JSONResponse(body)
    except asyncio.TimeoutError:
        status = 504
        return HttpError(504, f"the request took over the server's limit of {state.config.timeout_s:g} s; retry, or send fewer images").response()
    except HttpError as exc:
        status = exc.status
        return exc.response()
    except _TooLarge:  # raised by BodyLimit's receive while the body streamed in
        status = 413
        return _too_large(state.config.max_body_bytes).response()
    finally:
        state.inside -= 1
        state.metrics.inside(-1)
        state.metrics.answered(status, time.perf_counter() - started, images)


async def _classify(state: _State, request: Request) -> dict:
    k = _top_k(request, state.config.top_k)
    images = await _images(request, state.config)
    info = await _info(state)
    crops = await asyncio.gather(*(_crop(state, info, n, name, data) for n, (name, data) in enumerate(images)))
    try:
        logits = await state.backend.infer(np.stack(crops))
    except HttpError:
        raise
    except Exception as exc:  # the batcher's refusal or the model's failure: one line, the server stays up
        raise _backend_error(exc) from None
    described = state.described or {}
    results = answers(np.asarray(logits, dtype=np.float32), info, k)
    return {
        "model": {"variant": described.get("variant"), "sha256": described.get("sha256")},
        "results": [{"image": name, "predictions": as_json(found)} for (name, _), found in zip(images, results, strict=True)],
    }


def _top_k(request: Request, default: int) -> int:
    text = request.query_params.get("top_k")
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise HttpError(400, f"top_k must be a whole number from 1 to 1000, got {printable(text[:20])!r}")
    return int(text)


async def _images(request: Request, config: ServeConfig) -> list[tuple[str, bytes]]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind.startswith("image/") or kind in RAW_TYPES:
        body = await request.body()
        if not body:
            raise HttpError(400, "the request body is empty: send the image's bytes")
        return [("image", body)]
    if kind != "multipart/form-data":
        shown = printable(kind[:60]) or "none"
        raise HttpError(415, f"content type {shown} is not an image: send image/* or application/octet-stream bytes, or multipart/form-data files")
    try:
        form = await request.form(max_files=config.max_images, max_fields=config.max_images, max_part_size=config.max_body_bytes)
    except HTTPException as exc:
        raise HttpError(400, f"the multipart body cannot be read: {printable(first_line(Exception(exc.detail), 200))}") from None
    images = []
    for field_name, value in form.multi_items():
        if not isinstance(value, UploadFile):
            raise HttpError(400, f"form field {printable(field_name[:NAME_LIMIT])!r} is not a file: send each image as a file part")
        images.append((printable((value.filename or field_name)[:NAME_LIMIT]), await value.read()))
    if not images:
        raise HttpError(400, "the multipart body holds no files: send each image as a file part")
    return images


async def _crop(state: _State, info: ModelInfo, n: int, name: str, data: bytes) -> np.ndarray:
    try:
        return await anyio.to_thread.run_sync(crop, data, info, state.config.fast_jpeg, limiter=state.decoders)
    except EdgeTransferError as exc:
        raise HttpError(400, f"image {n + 1} ({name}): {printable(first_line(exc, 300))}") from None
    except Exception as exc:  # a decoder's own failure on a hostile file is still the file's fault
        raise HttpError(
            400, f"image {n + 1} ({name}) cannot be decoded ({type(exc).__name__}); send a PNG, JPEG or another image Pillow reads"
        ) from None


async def _info(state: _State) -> ModelInfo:
    if state.info is None:
        try:
            state.described = await state.backend.describe()
        except Exception as exc:
            raise HttpError(503, f"the model is not ready yet ({printable(first_line(exc, 200))}); retry shortly", {"Retry-After": "1"}) from None
        state.info = ModelInfo.from_props(state.described["props"])
    return state.info


async def _model(state: _State) -> dict[str, Any]:
    info = await _info(state)
    config = state.config
    described = state.described or {}
    return {
        "variant": described.get("variant"),
        "sha256": described.get("sha256"),
        "provider": described.get("provider"),
        "arch": info.arch,
        "labels": list(info.labels),
        **({"tasks": {name: list(labels) for name, labels in zip(info.tasks.names, info.tasks.labels, strict=True)}} if info.tasks else {}),
        "input_format": info.input_format,
        "preprocessing": info.preprocessing.to_dict(),
        "limits": {
            "max_batch": config.max_batch,
            "max_latency_ms": config.max_latency_ms,
            "max_queue": config.max_queue,
            "max_body_mb": config.max_body_mb,
            "max_images": config.max_images,
            "timeout_s": config.timeout_s,
        },
    }


def _backend_error(exc: Exception) -> HttpError:
    status = getattr(exc, "error_code", None)
    code = int(status) if status is not None else 500
    if code in (429, 503):
        return HttpError(503, "the server is over capacity and could not run this request in time; retry shortly", {"Retry-After": "1"})
    return HttpError(500, f"the model failed on this request ({type(exc).__name__}: {printable(first_line(exc, 200))})")
