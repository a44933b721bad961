"""What ``edgetransfer-runtime serve`` serves and within which bounds: one frozen record, checked
once, handed to the server process as JSON in an environment variable.

Every bound has a default that keeps one server's memory finite: at most ``max_queue`` requests
are inside at once (one more is answered 503 at once), each body at most ``max_body_mb``, each
request at most ``max_images`` images, each answered within ``timeout_s`` (else 504).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import OptionError

__all__ = ["ServeConfig", "CONFIG_ENV", "API_KEY_ENV"]

CONFIG_ENV = "EDGETRANSFER_SERVE_CONFIG"  # the JSON the server reads at start
API_KEY_ENV = "EDGETRANSFER_API_KEY"  # a key clients must send as "Authorization: Bearer KEY"
MAX_PORT = 65535
MAX_BATCH = 1024
MAX_QUEUE = 100_000
MAX_BODY_MB = 1024.0
MAX_TIMEOUT_S = 3600.0
MIN_KEY = 16  # characters: a shorter key is guessable


@dataclass(frozen=True)
class ServeConfig:
    """One server's model and bounds.

    Attributes:
        model: the ``.onnx`` (or OpenVINO ``.xml``) file served.
        variant: the name answers carry for the model (default: the file's stem).
        max_batch: the most images the adaptive batcher joins into one run of the model;
            1 turns batching off (each request runs on its own, as it comes).
        max_latency_ms: the batcher's bound on a request's wait and run: a request it cannot
            serve within it is answered 503 instead of waiting on.
        max_queue: requests inside the server at once; one more is answered 503 at once.
        max_body_mb: the largest request body; a larger one is answered 413 before it is read.
        max_images: images in one request (multipart).
        timeout_s: seconds a request may take in all; then it is answered 504.
        threads: ONNX Runtime threads, and threads that decode images (default: one per core).
        top_k: classes per image in an answer unless the request asks (``?top_k=``).
        access_log: log a line per request (BentoML's access log).
        api_key: when set, every path but the health checks needs ``Authorization: Bearer KEY``.
    """

    model: str
    variant: str = ""
    host: str = "127.0.0.1"
    port: int = 3000
    max_batch: int = 8
    max_latency_ms: int = 2000
    max_queue: int = 64
    max_body_mb: float = 16.0
    max_images: int = 16
    timeout_s: float = 30.0
    threads: int | None = None
    providers: tuple[str, ...] = ()
    device: str = "CPU"
    top_k: int = 5
    fast_jpeg: bool = False
    access_log: bool = True
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.variant:
            object.__setattr__(self, "variant", Path(self.model).stem)
        object.__setattr__(self, "providers", tuple(self.providers))
        _whole("port", self.port, 1, MAX_PORT)
        _whole("max_batch", self.max_batch, 1, MAX_BATCH)
        _whole("max_latency_ms", self.max_latency_ms, 1, int(MAX_TIMEOUT_S * 1000))
        _whole("max_queue", self.max_queue, 1, MAX_QUEUE)
        _whole("max_images", self.max_images, 1, MAX_BATCH)
        _whole("top_k", self.top_k, 1, 1_000_000)
        if self.threads is not None:
            _whole("threads", self.threads, 1, 1024)
        _number("max_body_mb", self.max_body_mb, MAX_BODY_MB)
        _number("timeout_s", self.timeout_s, MAX_TIMEOUT_S)
        if self.api_key is not None and (len(self.api_key) < MIN_KEY or not self.api_key.isprintable() or " " in self.api_key):
            raise OptionError(f"the API key must be at least {MIN_KEY} printable characters without spaces; make one with: openssl rand -hex 24")

    @property
    def batching(self) -> bool:
        return self.max_batch > 1

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    def to_json(self) -> str:
        """The record without the API key (the launcher hands that on in :data:`API_KEY_ENV`)."""
        return json.dumps({k: v for k, v in asdict(self).items() if k != "api_key"})

    @classmethod
    def from_env(cls) -> ServeConfig:
        """The record the launcher put in :data:`CONFIG_ENV` (and the key in :data:`API_KEY_ENV`).

        Raises:
            OptionError: no record, or one that is not this version's.
        """
        text = os.environ.get(CONFIG_ENV)
        if not text:
            raise OptionError(f"{CONFIG_ENV} is not set: start the server with `edgetransfer-runtime serve MODEL`")
        try:
            data: dict[str, Any] = json.loads(text)
            known = {f.name for f in fields(cls)}
            if not isinstance(data, dict) or not set(data) <= known:
                raise ValueError(f"unknown fields {sorted(set(data) - known)}")
        except ValueError as exc:
            raise OptionError(
                f"{CONFIG_ENV} is not a serve configuration ({exc}); start the server with `edgetransfer-runtime serve MODEL`"
            ) from None
        return cls(**{**data, "api_key": os.environ.get(API_KEY_ENV) or None})


def _whole(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise OptionError(f"{_option(name)} must be a whole number from {low} to {high}, got {value!r}")


def _number(name: str, value: Any, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= high:
        raise OptionError(f"{_option(name)} must be a number above 0 and at most {high:g}, got {value!r}")


def _option(name: str) -> str:
    """The command-line option that sets the field ``name``."""
    return "--timeout" if name == "timeout_s" else "--" + name.replace("_", "-")
