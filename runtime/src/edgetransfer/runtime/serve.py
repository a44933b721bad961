"""``edgetransfer-runtime serve MODEL``: the model over HTTP with BentoML's adaptive batching
(the ``serve`` extra; why BentoML: docs/serving.md). This module checks everything it can in
this process, so that a bad model, a port in use or a missing extra is one line, and then
replaces itself with the server (:mod:`.server`), which signals reach directly.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import sys
from pathlib import Path

from .errors import MissingDependencyError, OptionError
from .predictor import Predictor
from .serve_config import API_KEY_ENV, CONFIG_ENV, ServeConfig
from .text import printable

__all__ = ["add_serve_parser", "serve", "server_command", "config_from_args"]

SERVER = "edgetransfer.runtime.server"
SERVE_EXTRA = ("bentoml", "uvicorn", "starlette", "multipart", "prometheus_client")  # what the server imports


def add_serve_parser(commands) -> None:
    serve_parser = commands.add_parser(
        "serve",
        help="serve the model over HTTP with adaptive batching (the serve extra)",
        description="Serve MODEL over HTTP: POST /v1/classify (image bytes, or multipart files), GET /v1/model,"
        " /livez, /readyz and /metrics (Prometheus). Needs: pip install 'edgetransfer-runtime[serve]'.",
    )
    serve_parser.add_argument("model", type=Path)
    add_serve_options(serve_parser)
    serve_parser.set_defaults(run=run_serve)


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``serve`` (``edgetransfer serve`` shows and passes on the same ones)."""
    default = ServeConfig(model="model.onnx")
    option = parser.add_argument
    option("--host", default=default.host, help=f"address to listen on; 0.0.0.0 for every interface (default {default.host})")
    option("--port", type=int, default=default.port, help=f"port to listen on (default {default.port})")
    option(
        "--max-batch",
        type=int,
        default=default.max_batch,
        help=f"most images in one run of the model; 1 turns batching off (default {default.max_batch})",
    )
    option(
        "--max-latency-ms",
        type=int,
        default=default.max_latency_ms,
        help=f"a request the batcher cannot serve within this is refused with 503 (default {default.max_latency_ms})",
    )
    option(
        "--max-queue",
        type=int,
        default=default.max_queue,
        help=f"requests inside at once; one more is refused with 503 (default {default.max_queue})",
    )
    option(
        "--max-body-mb",
        type=float,
        default=default.max_body_mb,
        help=f"largest request body; larger is refused with 413 (default {default.max_body_mb:g})",
    )
    option("--max-images", type=int, default=default.max_images, help=f"images in one request (default {default.max_images})")
    option("--timeout", type=float, default=default.timeout_s, help=f"seconds a request may take in all; then 504 (default {default.timeout_s:g})")
    option("--threads", type=int, default=None, help="ONNX Runtime threads and image-decoding threads (default: one per core)")
    option(
        "--provider", dest="providers", action="append", help="cpu, cuda, tensorrt or a full provider name; repeat for a fallback order (default cpu)"
    )
    option("--device", default=default.device, help="OpenVINO device, for an .xml model (CPU, GPU, AUTO)")
    option("--top-k", type=int, default=default.top_k, help=f"classes per image unless a request asks ?top_k=N (default {default.top_k})")
    option("--fast-jpeg", action="store_true", help="decode large JPEGs at a reduced scale: faster, pixels within 2 levels of the exact path")
    option("--no-access-log", dest="access_log", action="store_false", help="log no line per request (faster under heavy load)")
    option("--variant", default="", help="the name answers give the model (default: the file's name)")
    option(
        "--api-key-file",
        type=Path,
        default=None,
        help=f"a file holding the key every path but the health checks needs as 'Authorization: Bearer KEY' (or set {API_KEY_ENV})",
    )


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The configuration the options ask for, checked.

    Raises:
        OptionError: a bound out of range, an unreadable key file or a short key.
    """
    return ServeConfig(
        model=str(args.model.resolve()),
        variant=args.variant,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_latency_ms=args.max_latency_ms,
        max_queue=args.max_queue,
        max_body_mb=args.max_body_mb,
        max_images=args.max_images,
        timeout_s=args.timeout,
        threads=args.threads,
        providers=tuple(args.providers or ()),
        device=args.device,
        top_k=args.top_k,
        fast_jpeg=args.fast_jpeg,
        access_log=args.access_log,
        api_key=_api_key(args.api_key_file),
    )


def run_serve(args: argparse.Namespace) -> int:
    serve(config_from_args(args))
    return 0  # not reached: serve() becomes the server


def serve(config: ServeConfig) -> None:
    """Check the model, the port and the extra, then become the server (never returns).

    Raises:
        MissingDependencyError: BentoML is not installed.
        PredictorError: the model cannot be served (unreadable, no edgetransfer metadata, ...).
        OptionError: the port is in use or cannot be bound.
    """
    argv, env = server_command(config)
    print(
        f"serving {printable(config.variant)} ({printable(config.model)}) on http://{printable(config.host)}:{config.port}:"
        " POST /v1/classify, GET /v1/model, /livez, /readyz, /metrics; Ctrl+C stops",
        file=sys.stderr,
    )
    sys.stderr.flush()
    os.execve(argv[0], argv, env)


def server_command(config: ServeConfig) -> tuple[list[str], dict[str, str]]:
    """The server's command line and environment for ``config``, after checking that the model
    loads, the port is free and the serve extra is there."""
    missing = [name for name in SERVE_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(f"serving needs {', '.join(missing)}: pip install 'edgetransfer-runtime[serve]' (or 'edgetransfer[serve]')")
    Predictor(config.model, providers=list(config.providers) or None, threads=1, device=config.device)
    _check_port(config.host, config.port)
    env = {**os.environ, CONFIG_ENV: config.to_json(), "BENTOML_DO_NOT_TRACK": "True"}
    env.pop(API_KEY_ENV, None)
    if config.api_key:
        env[API_KEY_ENV] = config.api_key
    return [sys.executable, "-m", SERVER], env


def _check_port(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise OptionError(f"cannot listen on {printable(host)}: {exc.strerror or exc}; pass --host an address of this machine") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise OptionError(f"cannot listen on {printable(host)}:{port} ({exc.strerror or exc}); pick another with --port") from None


def _api_key(path: Path | None) -> str | None:
    if path is None:
        return os.environ.get(API_KEY_ENV) or None
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionError(f"cannot read the API key file {printable(path)}: {exc}") from None
    if not key:
        raise OptionError(f"the API key file {printable(path)} is empty; put the key in it (make one with: openssl rand -hex 24)")
    return key
