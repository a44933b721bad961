"""The BentoML services that ``edgetransfer-runtime serve`` runs (the ``serve`` extra). BentoML
imports this module in each of its processes; the launcher (:mod:`.serve`) hands it the
configuration in :data:`~.serve_config.CONFIG_ENV`.

Two services, each its own process, talking over a Unix socket in a private folder:

- ``edgetransfer`` (the front, public): the HTTP app of :mod:`.serve_http` at ``/v1``, BentoML's
  ``/livez``, ``/readyz`` and ``/metrics`` beside it. It reads, checks and preprocesses each image
  on its own, so a bad image is answered 400 and never reaches a batch.
- ``edgetransfer-model`` (internal): the model, one Predictor, behind BentoML's adaptive batcher
  (``max_batch`` images at most, a request it cannot serve within ``max_latency_ms`` is refused
  with 503); with ``max_batch`` 1 each request runs on its own as it comes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import aiohttp
import bentoml
import numpy as np

from .files import sha256_file
from .predictor import Predictor
from .serve_config import ServeConfig
from .serve_http import ApiKey, BodyLimit, build_app

__all__ = ["Inference", "Classifier", "CONFIG"]

CONFIG = ServeConfig.from_env()
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = tuple(float(2**i) for i in range(11))

_batch_images = bentoml.metrics.Histogram(
    name="edgetransfer_batch_images", documentation="Images in each run of the model (the batches the batcher formed)", buckets=BATCH_BUCKETS
)
_requests = bentoml.metrics.Counter(name="edgetransfer_requests", documentation="Classify requests answered, by status", labelnames=["status"])
_images = bentoml.metrics.Counter(name="edgetransfer_images", documentation="Images classified")
_latency = bentoml.metrics.Histogram(
    name="edgetransfer_request_seconds", documentation="Seconds from a classify request's arrival to its answer", buckets=LATENCY_BUCKETS
)
_inside = bentoml.metrics.Gauge(
    name="edgetransfer_queue_depth",
    documentation="Classify requests inside the server (being read, preprocessed, waiting or run)",
    multiprocess_mode="livesum",
)


def _batched(func):
    """BentoML's adaptive batching for ``func``, or (``max_batch`` 1) a plain API."""
    if CONFIG.batching:
        return bentoml.api(batchable=True, max_batch_size=CONFIG.max_batch, max_latency_ms=CONFIG.max_latency_ms)(func)
    return bentoml.api(func)


@bentoml.service(
    name="edgetransfer-model",
    workers=1,
    # never the bound itself: the front admits at most max_queue requests, each within the timeout
    traffic={"timeout": CONFIG.timeout_s, "max_concurrency": 4 * CONFIG.max_queue},
    # the front's client keeps its connections: BentoML renews them every 100 requests by default,
    # closing the old ones under the requests still on them (bentoml/BentoML#5540)
    runner_connection={"max_requests": 2**31 - 1, "max_age": 10.0 * 365 * 86400},
    logging={"access": {"enabled": False}},  # the front logs each request; this one would log it again
    metrics={"enabled": False},
)
class Inference:
    def __init__(self) -> None:
        self.predictor = Predictor(
            CONFIG.model,
            providers=list(CONFIG.providers) or None,
            threads=CONFIG.threads,
            timeout=CONFIG.timeout_s,
            batch_size=CONFIG.max_batch,
            device=CONFIG.device,
        )
        self.sha256 = sha256_file(Path(CONFIG.model))

    @bentoml.api
    def describe(self) -> dict[str, Any]:
        return {"props": self.predictor.info.to_props(), "variant": CONFIG.variant, "sha256": self.sha256, "provider": self.predictor.provider}

    @_batched
    def infer(self, crops: np.ndarray) -> np.ndarray:
        _batch_images.observe(len(crops))
        return self.predictor.run_crops(crops)


class _Metrics:
    def answered(self, status: int, seconds: float, images: int) -> None:
        _requests.labels(status=str(status)).inc()
        if status == 200:
            _images.inc(images)
            _latency.observe(seconds)

    def inside(self, delta: int) -> None:
        _inside.inc(delta)


class _Remote:
    """The model service, reached through the front's BentoML dependency.

    A call whose connection broke is made once more: BentoML's client (1.4.31 and later) replaces
    its connection pool (by default every 100 requests, here never: see ``runner_connection``
    above) and closes the old one under the requests still on it (bentoml/BentoML#5540). Both
    calls are free of side effects, so the retry cannot run anything twice that matters.

    At most two batches' worth of requests are in the model service at once; the others wait
    here, admitted and cheap. BentoML's batcher learns how long to hold a request for company
    from how long recent requests waited in its queue: a long queue there (a burst) would teach it
    to hold even a lone request that long for minutes afterwards.
    """

    def __init__(self) -> None:
        self._slots: asyncio.Semaphore | None = None  # made in the server's event loop, on first use

    async def describe(self) -> dict[str, Any]:
        return await self._call("describe")

    async def infer(self, crops: np.ndarray) -> np.ndarray:
        if self._slots is None:
            self._slots = asyncio.Semaphore(2 * CONFIG.max_batch)
        async with self._slots:
            return await self._call("infer", crops)

    @staticmethod
    async def _call(name: str, *args: Any) -> Any:
        method = getattr(bentoml.get_current_service().inference.to_async, name)
        try:
            return await method(*args)
        except aiohttp.ClientConnectionError:
            return await method(*args)


@bentoml.service(name="edgetransfer", workers=1, traffic={"timeout": CONFIG.timeout_s}, logging={"access": {"enabled": CONFIG.access_log}})
@bentoml.asgi_app(BodyLimit(build_app(CONFIG, _Remote(), _Metrics()), CONFIG.max_body_bytes), path="/v1")
class Classifier:
    inference = bentoml.depends(Inference)

    async def __is_ready__(self) -> bool:
        try:
            await self.inference.to_async.describe()
        except Exception:  # not ready is the answer to any failure here; /readyz says 503
            return False
        return True


if CONFIG.api_key:  # bentoml.service made Classifier a Service; its type hints still say the class
    cast(Any, Classifier).add_asgi_middleware(ApiKey, key=CONFIG.api_key)
