"""The server ``edgetransfer-runtime serve`` becomes (the ``serve`` extra): one process, one
Predictor, BentoML's adaptive batcher, served by uvicorn. Run as ``python -m
edgetransfer.runtime.server`` by the launcher (:mod:`.serve`), which hands it the configuration in
:data:`~.serve_config.CONFIG_ENV`.

    POST /v1/classify, GET /v1/model   the app of :mod:`.serve_http`
    GET  /livez, /healthz               the process answers
    GET  /readyz                        the model has answered a first run (uvicorn listens only then)
    GET  /metrics                       Prometheus text

Requests are read, checked and cropped on the event loop and a thread pool; BentoML's
``CorkDispatcher`` joins the crops of concurrent requests into one run of the model (at most
``max_batch`` images, one run at a time, in a thread) and learns how long waiting for company
pays. It is BentoML's own batcher, the one its ``@bentoml.api(batchable=True)`` runs, used here in
the process that reads the requests: BentoML's HTTP stack (a service per process, tracing, its
middleware) cost a fifth of the throughput on 2 cores (docs/serving.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import uvicorn
from bentoml._internal.marshal.dispatcher import CorkDispatcher  # BentoML's adaptive batcher; bentoml pinned < 1.5
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from .errors import EdgeTransferError
from .files import sha256_file
from .predictor import Predictor
from .serve_config import ServeConfig
from .serve_http import ApiKey, BodyLimit, build_app
from .text import printable

__all__ = ["BatchedModel", "PromMetrics", "server_app", "main"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = tuple(float(2**i) for i in range(11))


class Overloaded(Exception):
    """The batcher dropped a request it could not serve within ``max_latency_ms``."""

    error_code = 503


class BatchedModel:
    """The model behind BentoML's adaptive batcher (or, with ``max_batch`` 1, one run at a time).

    At most two batches' worth of requests wait in the batcher; the others wait before it, admitted
    and cheap. The batcher learns how long to hold a request for company from how long recent
    ones waited in its queue: a long queue there (a burst) would teach it to hold even a lone
    request that long for minutes afterwards.
    """

    def __init__(self, config: ServeConfig, metrics: PromMetrics) -> None:
        self.config, self.metrics = config, metrics
        self.predictor = Predictor(
            config.model,
            providers=list(config.providers) or None,
            threads=config.threads,
            timeout=config.timeout_s,
            batch_size=config.max_batch,
            device=config.device,
        )
        self.sha256 = sha256_file(Path(config.model))
        self._runs = anyio.CapacityLimiter(1)  # one run of the model at a time: it has the cores
        self._slots: asyncio.Semaphore | None = None  # made in the server's event loop, on first use
        dispatcher: CorkDispatcher[np.ndarray, np.ndarray | None] = CorkDispatcher(
            config.max_latency_ms, config.max_batch, fallback=lambda: None, get_batch_size=len
        )
        self._batched = dispatcher(self._run_batch)

    async def describe(self) -> dict[str, Any]:
        info = self.predictor.info
        return {"props": info.to_props(), "variant": self.config.variant, "sha256": self.sha256, "provider": self.predictor.provider}

    async def infer(self, crops: np.ndarray) -> np.ndarray:
        if not self.config.batching:
            return await self._run(crops)
        if self._slots is None:
            self._slots = asyncio.Semaphore(2 * self.config.max_batch)
        async with self._slots:
            logits = await self._batched(crops)
        if logits is None:  # the batcher's fallback: it dropped the request
            raise Overloaded("the batcher could not serve this request within --max-latency-ms")
        return logits

    async def _run_batch(self, batch: Sequence[np.ndarray]) -> Sequence[np.ndarray | None]:
        logits = await self._run(np.concatenate(batch))
        return np.split(logits, np.cumsum([len(crops) for crops in batch])[:-1])

    async def _run(self, crops: np.ndarray) -> np.ndarray:
        self.metrics.batch.observe(len(crops))
        return await anyio.to_thread.run_sync(self.predictor.run_crops, crops, limiter=self._runs)


class PromMetrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.batch = Histogram(
            "edgetransfer_batch_images",
            "Images in each run of the model (the batches the batcher formed)",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter("edgetransfer_requests", "Classify requests answered, by status", ["status"], registry=self.registry)
        self.images = Counter("edgetransfer_images", "Images classified", registry=self.registry)
        self.latency = Histogram(
            "edgetransfer_request_seconds", "Seconds from a classify request's arrival to its answer", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.depth = Gauge("edgetransfer_queue_depth", "Classify requests inside the server (read, cropped, waiting or run)", registry=self.registry)

    def answered(self, status: int, seconds: float, images: int) -> None:
        self.requests.labels(status=str(status)).inc()
        if status == 200:
            self.images.inc(images)
            self.latency.observe(seconds)

    def inside(self, delta: int) -> None:
        self.depth.inc(delta)


def server_app(config: ServeConfig, model: BatchedModel | None = None, metrics: PromMetrics | None = None):
    """The whole server's ASGI app: classify and model info at ``/v1``, health and metrics."""
    metrics = metrics or PromMetrics()
    model = model or BatchedModel(config, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        size = model.predictor.info.preprocessing.input_size  # one run of the model before uvicorn listens
        await model.infer(np.zeros((1, size, size, 3), dtype=np.uint8))
        yield

    async def alive(_: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readiness(_: Request) -> Response:  # answered only once the lifespan's first run is done
        return JSONResponse({"status": "ready"})

    async def exported(_: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Mount("/v1", app=build_app(config, model, metrics)),
        Route("/livez", alive),
        Route("/healthz", alive),
        Route("/readyz", readiness),
        Route("/metrics", exported),
    ]
    app = BodyLimit(Starlette(routes=routes, lifespan=lifespan), config.max_body_bytes)
    return ApiKey(app, config.api_key) if config.api_key else app


def main() -> int:
    try:
        config = ServeConfig.from_env()
        app = server_app(config)
    except EdgeTransferError as exc:
        print(f"Error: {printable(str(exc))}", file=sys.stderr)
        return 1
    uvicorn.run(app, host=config.host, port=config.port, access_log=config.access_log, timeout_graceful_shutdown=int(config.timeout_s) + 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
