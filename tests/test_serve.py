"""``edgetransfer serve`` and ``edgetransfer-runtime serve``: the HTTP app on an in-process
Predictor (answers, refusals, bounds, API key), the command lines, and one real BentoML server
started as a user starts it, fuzzed with bad requests and overloaded."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgetransfer.cli import main as cli_main
from edgetransfer.errors import MissingDependencyError, OptionError
from edgetransfer.export import ExportOptions, export_onnx
from edgetransfer.runtime import Predictor
from edgetransfer.runtime.files import sha256_file, write_json
from edgetransfer.runtime.serve import server_command
from edgetransfer.runtime.serve_config import API_KEY_ENV, CONFIG_ENV, ServeConfig
from edgetransfer.runtime.serve_http import ApiKey, BodyLimit, build_app
from edgetransfer.runtime_commands import served_model

from conftest import copy_run, digits_pixels

KEY = "k" * 24


@pytest.fixture(scope="module")
def run(trained_run, tmp_path_factory) -> Path:
    """The shared real run (EfficientNet-Lite0 head on digits, 64 px), exported to ONNX."""
    run_dir = copy_run(trained_run, tmp_path_factory, "serve")
    export_onnx(run_dir, ExportOptions(verify=False))
    return run_dir


@pytest.fixture(scope="module")
def predictor(run) -> Predictor:
    return Predictor(run / "model.onnx", threads=1)


def encoded(pixels: np.ndarray, kind: str = "PNG", size: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").resize((size, size)).save(buffer, kind)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """Six real digits: PNGs and JPEGs of several sizes."""
    digits = [p for _, p in digits_pixels(per_class=2, size=24)]
    return [encoded(p, kind, size) for p, (kind, size) in zip(digits, [("PNG", 40), ("JPEG", 64), ("PNG", 97)] * 2, strict=True)]


def huge_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (its data is one empty row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


class LocalBackend:
    """The model in this process, as the server runs it but unbatched; ``gate`` holds every
    run until it is set."""

    def __init__(self, predictor: Predictor, gate: asyncio.Event | None = None, error: Exception | None = None) -> None:
        self.predictor, self.gate, self.error, self.batches = predictor, gate, error, []

    async def describe(self):
        info = self.predictor.info
        return {"props": info.to_props(), "variant": "local", "sha256": "0" * 64, "provider": self.predictor.provider}

    async def infer(self, crops):
        self.batches.append(len(crops))
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.predictor.run_crops(crops)


class Recorder:
    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.depth = 0

    def answered(self, status, seconds, images):
        self.statuses.append(status)

    def inside(self, delta):
        self.depth += delta


def app_for(predictor, key: str | None = None, backend=None, **bounds):
    config = ServeConfig(model="model.onnx", threads=1, **bounds)
    metrics = Recorder()
    app = BodyLimit(build_app(config, backend or LocalBackend(predictor), metrics), config.max_body_bytes)
    return (ApiKey(app, key) if key else app), metrics


async def _send(app, calls):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://served") as client:
        return await asyncio.gather(*(client.request(method, url, **kwargs) for method, url, kwargs in calls))


def send(app, *calls) -> list[httpx.Response]:
    """Each (method, url, kwargs) at once, through the ASGI app in this process."""
    return asyncio.run(_send(app, calls))


def assert_same_answer(answer: dict, expected, top_k: int) -> None:
    assert len(answer["predictions"]) == top_k
    assert [p["label"] for p in answer["predictions"]] == [p.label for p in expected]
    assert np.allclose([p["probability"] for p in answer["predictions"]], [p.probability for p in expected], atol=1e-5)


def test_classify_answers_what_predict_answers(predictor, images):
    app, metrics = app_for(predictor)
    raw, jpeg = send(
        app,
        ("POST", "/classify", {"content": images[0], "headers": {"content-type": "image/png"}}),
        ("POST", "/classify?top_k=2", {"content": images[1], "headers": {"content-type": "application/octet-stream"}}),
    )
    files = [("image", (f"digit{n}.png", data, "image/png")) for n, data in enumerate(images)]
    (several,) = send(app, ("POST", "/classify?top_k=3", {"files": files}))
    assert raw.status_code == jpeg.status_code == several.status_code == 200, several.text
    assert_same_answer(raw.json()["results"][0], predictor.predict(images[0], top_k=5), 5)  # the server's default
    assert_same_answer(jpeg.json()["results"][0], predictor.predict(images[1], top_k=2), 2)
    expected = predictor.predict(images, top_k=3)
    body = several.json()
    assert [r["image"] for r in body["results"]] == [f"digit{n}.png" for n in range(len(images))]
    for answer, want in zip(body["results"], expected, strict=True):
        assert_same_answer(answer, want, 3)
    assert body["model"] == {"variant": "local", "sha256": "0" * 64}
    assert metrics.statuses == [200, 200, 200] and metrics.depth == 0


def test_model_info_names_labels_preprocessing_and_bounds(predictor):
    app, _ = app_for(predictor, max_queue=7)
    (answer,) = send(app, ("GET", "/model", {}))
    body = answer.json()
    assert body["labels"] == list(predictor.labels) and body["limits"]["max_queue"] == 7
    assert body["preprocessing"]["input_size"] == predictor.info.preprocessing.input_size == 64


def chunks(asynchronous: bool, count: int = 20, size: int = 65536):
    """A body sent chunked (no Content-Length), for an async or a sync client."""

    async def async_chunks():
        for _ in range(count):
            yield b"x" * size

    return async_chunks() if asynchronous else (b"x" * size for _ in range(count))


def bad_requests(images: list[bytes], asynchronous: bool) -> list[tuple[str, str, dict, int, str]]:
    """(method, url, kwargs, status, a word the one-line reason must hold)."""
    png = {"content-type": "image/png"}
    return [
        ("POST", "/classify", {"content": b"", "headers": png}, 400, "empty"),
        ("POST", "/classify", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "not an image"),
        ("POST", "/classify", {"content": images[0]}, 415, "none"),
        ("POST", "/classify", {"content": os.urandom(3000), "headers": png}, 400, "image 1"),
        ("POST", "/classify", {"content": images[0][: len(images[0]) // 2], "headers": png}, 400, "image 1"),
        ("POST", "/classify", {"content": huge_png(), "headers": png}, 400, "image 1"),
        ("POST", "/classify?top_k=0", {"content": images[0], "headers": png}, 400, "top_k"),
        ("POST", "/classify?top_k=x%1b[31m", {"content": images[0], "headers": png}, 400, "top_k"),
        ("POST", "/classify", {"files": [("a", ("good.png", images[0])), ("b", ("bad.png", b"\x89PNG\r\n"))]}, 400, "image 2 (bad.png)"),
        ("POST", "/classify", {"data": {"note": "hi"}, "files": [("a", ("good.png", images[0]))]}, 400, "not a file"),
        ("POST", "/classify", {"files": [("a", (f"{n}.png", images[0])) for n in range(5)]}, 400, "multipart"),
        ("POST", "/classify", {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, "multipart"),
        ("POST", "/classify", {"content": b"x" * (2**20 + 1), "headers": png}, 413, "limit"),
        ("POST", "/classify", {"content": chunks(asynchronous), "headers": png}, 413, "limit"),  # chunked, no length
        ("GET", "/classify", {}, 405, ""),
    ]


def test_bad_requests_get_a_one_line_reason_and_the_app_serves_on(predictor, images):
    app, metrics = app_for(predictor, max_body_mb=1.0, max_images=4)
    cases = bad_requests(images, asynchronous=True)
    for (_, url, kwargs, status, word), answer in zip(cases, send(app, *[c[:3] for c in cases]), strict=True):
        assert answer.status_code == status, (url, kwargs.get("headers"), answer.text)
        if status != 405:
            reason = answer.json()["error"]
            assert word in reason and "\n" not in reason and "\x1b" not in reason, reason
    (good,) = send(app, ("POST", "/classify", {"content": images[0], "headers": {"content-type": "image/png"}}))
    assert good.status_code == 200 and metrics.depth == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.binary(max_size=4096), kind=st.sampled_from(["image/png", "image/jpeg", "application/octet-stream", "multipart/form-data; boundary=b"])
)
def test_random_bodies_are_refused_with_400_never_500(predictor, body, kind):
    app, _ = app_for(predictor)
    (answer,) = send(app, ("POST", "/classify", {"content": body, "headers": {"content-type": kind}}))
    assert answer.status_code == 400, answer.text
    assert "\n" not in answer.json()["error"]


def test_a_full_server_answers_503_at_once_and_serves_the_ones_inside(predictor, images):
    async def scenario():
        gate = asyncio.Event()
        backend = LocalBackend(predictor, gate)
        app, metrics = app_for(predictor, backend=backend, max_queue=2)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://served") as client:

            def post():
                return client.post("/classify", content=images[0], headers={"content-type": "image/png"})

            inside = [asyncio.ensure_future(post()) for _ in range(2)]
            while len(backend.batches) < 2:  # both are waiting on the model
                await asyncio.sleep(0.01)
            started = time.perf_counter()
            refused = await post()
            waited = time.perf_counter() - started
            gate.set()
            return refused, waited, await asyncio.gather(*inside), metrics

    refused, waited, served, metrics = asyncio.run(scenario())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1" and "full" in refused.json()["error"]
    assert waited < 1.0
    assert [a.status_code for a in served] == [200, 200]
    assert sorted(metrics.statuses) == [200, 200, 503] and metrics.depth == 0


class Refused(Exception):
    error_code = 503


def test_the_batchers_refusal_is_503_and_a_model_failure_is_one_line_500(predictor, images):
    png = {"content": images[0], "headers": {"content-type": "image/png"}}
    busy_app, _ = app_for(predictor, backend=LocalBackend(predictor, error=Refused("queue")))
    broken_app, _ = app_for(predictor, backend=LocalBackend(predictor, error=RuntimeError("boom\nsecond line")))
    (busy,) = send(busy_app, ("POST", "/classify", png))
    (broken,) = send(broken_app, ("POST", "/classify", png))
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert broken.status_code == 500 and "boom" in broken.json()["error"] and "\n" not in broken.json()["error"]


def test_the_api_key_guards_everything_but_health(predictor, images):
    app, _ = app_for(predictor, key=KEY)
    png = {"content": images[0], "headers": {"content-type": "image/png"}}
    bare, wrong, right, health = send(
        app,
        ("POST", "/classify", png),
        ("POST", "/classify", {**png, "headers": {**png["headers"], "authorization": "Bearer " + "x" * 24}}),
        ("POST", "/classify", {**png, "headers": {**png["headers"], "authorization": f"Bearer {KEY}"}}),
        ("GET", "/livez", {}),
    )
    assert bare.status_code == wrong.status_code == 401 and bare.headers["www-authenticate"] == "Bearer"
    assert right.status_code == 200 and health.status_code == 404  # not refused: the server itself answers /livez


@pytest.mark.parametrize(
    ("bounds", "word"),
    [
        ({"max_batch": 0}, "--max-batch"),
        ({"port": 70000}, "--port"),
        ({"timeout_s": float("nan")}, "--timeout"),
        ({"max_body_mb": -1.0}, "--max-body-mb"),
        ({"api_key": "short"}, "16 printable"),
        ({"api_key": "a key with spaces in it"}, "16 printable"),
    ],
)
def test_out_of_range_bounds_are_one_line_errors(bounds, word):
    with pytest.raises(OptionError, match=word):
        ServeConfig(model="m.onnx", **bounds)


def test_the_server_command_checks_first_and_keeps_the_key_out_of_the_config(run, monkeypatch):
    config = ServeConfig(model=str(run / "model.onnx"), port=free_port(), api_key=KEY, max_batch=4)
    argv, env = server_command(config)
    assert argv[1:] == ["-m", "edgetransfer.runtime.server"]
    assert KEY not in env[CONFIG_ENV] and env[API_KEY_ENV] == KEY
    monkeypatch.setenv(CONFIG_ENV, env[CONFIG_ENV])
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert ServeConfig.from_env() == config
    with pytest.raises(OptionError, match="pick another"), socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server_command(ServeConfig(model=config.model, port=taken.getsockname()[1]))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match=r"edgetransfer-runtime\[serve\]"):
        server_command(config)


def test_a_run_serves_its_recommended_variant_or_its_onnx_model(run, tmp_path, monkeypatch):
    run = Path(shutil.copytree(run, tmp_path / "run"))
    (tmp_path / "empty").mkdir()
    assert served_model(run) == (run / "model.onnx", "onnx", "")
    assert served_model(run / "model.onnx") == (run / "model.onnx", "model", "")
    int8 = run / "fast.onnx"
    int8.write_bytes((run / "model.onnx").read_bytes())
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["artifacts"]["ort-cpu-int8"] = {"path": "fast.onnx", "sha256": sha256_file(int8)}
    write_json(run / "manifest.json", manifest)
    write_json(run / "bench.json", {"recommendation": {"variant": "ort-cpu-int8"}})
    assert served_model(run) == (int8, "ort-cpu-int8", "")
    write_json(run / "bench.json", {"recommendation": {"variant": "eager"}})
    path, variant, note = served_model(run)
    assert (path, variant) == (run / "model.onnx", "onnx") and "eager" in note
    with pytest.raises(OptionError, match="neither"):
        served_model(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text('{"artifacts": {}}')
    with pytest.raises(OptionError, match="edgetransfer export"):
        served_model(tmp_path / "empty")

    started = []
    monkeypatch.setattr("edgetransfer.runtime_commands.serve_config", started.append)
    result = CliRunner().invoke(cli_main, ["serve", "--port", "8123", str(run), "--max-batch", "16"])
    assert result.exit_code == 0, result.output
    assert (started[0].model, started[0].variant, started[0].port, started[0].max_batch) == (str(run / "model.onnx"), "onnx", 8123, 16)
    refused = CliRunner().invoke(cli_main, ["serve", str(run), "--max-queue", "0"])
    assert refused.exit_code == 1 and "--max-queue" in refused.output


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    """A real ``edgetransfer-runtime serve`` on a free loopback port,
    started as a user starts it, with an API key, a small queue and a 1 MB body limit."""
    home = tmp_path_factory.mktemp("server")
    (home / "key").write_text(KEY)
    port = free_port()
    command = [sys.executable, "-m", "edgetransfer.runtime", "serve", str(run / "model.onnx"), "--port", str(port)]
    command += ["--api-key-file", str(home / "key"), "--max-queue", "4", "--max-body-mb", "1", "--max-images", "4", "--threads", "1"]
    log = open(home / "log", "w")  # noqa: SIM115 - open for the server's lifetime
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "BENTOML_HOME": str(home)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail(f"the server did not become ready: {(home / 'log').read_text()[-3000:]}")
        yield url, process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


AUTH = {"authorization": f"Bearer {KEY}"}


def test_the_real_server_answers_as_predict_does_and_shows_its_metrics(server, predictor, images, run):
    url, _ = server
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
        raw = client.post("/v1/classify?top_k=3", content=images[2], headers={"content-type": "image/png"})
        several = client.post("/v1/classify?top_k=3", files=[("image", (f"{n}.img", data)) for n, data in enumerate(images[:4])])
        info = client.get("/v1/model").json()
        metrics = client.get("/metrics").text
        assert httpx.get(url + "/v1/model").status_code == 401 and httpx.get(url + "/livez").status_code == 200
    assert raw.status_code == several.status_code == 200, several.text
    assert_same_answer(raw.json()["results"][0], predictor.predict(images[2], top_k=3), 3)
    for answer, want in zip(several.json()["results"], predictor.predict(images[:4], top_k=3), strict=True):
        assert_same_answer(answer, want, 3)
    assert raw.json()["model"] == {"variant": "model", "sha256": sha256_file(run / "model.onnx")}
    assert info["labels"] == list(predictor.labels) and info["limits"]["max_queue"] == 4
    for name in (
        "edgetransfer_requests_total",
        "edgetransfer_batch_images_bucket",
        "edgetransfer_queue_depth",
        "edgetransfer_request_seconds_bucket",
    ):
        assert name in metrics, name


def test_the_real_server_survives_bad_requests_and_overload(server, predictor, images):
    url, process = server
    cases = bad_requests(images, asynchronous=False)
    with httpx.Client(base_url=url + "/v1", headers=AUTH, timeout=30) as client:
        for method, path, kwargs, status, word in cases:
            answer = client.request(method, path, **kwargs)
            assert answer.status_code == status, (path, answer.text)
            assert status == 405 or word in answer.json()["error"]
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as garbage:
        garbage.sendall(os.urandom(2000) + b"\r\n\r\n")
        garbage.recv(1000)  # an answer (400) or a closed connection, and nothing else

    async def steady(clients: int, each: int) -> list[int]:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as client:

            async def one(k: int) -> list[int]:
                return [
                    (await client.post("/v1/classify", content=images[(k + n) % 6], headers={"content-type": "image/png"})).status_code
                    for n in range(each)
                ]

            return [status for statuses in await asyncio.gather(*(one(k) for k in range(clients))) for status in statuses]

    assert set(asyncio.run(steady(4, 60))) == {200}  # a steady load inside the bounds: every answer a result

    async def flood(count: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60, limits=httpx.Limits(max_connections=count)) as client:
            return await asyncio.gather(
                *(client.post("/v1/classify", content=images[n % 6], headers={"content-type": "image/png"}) for n in range(count))
            )

    answers = asyncio.run(flood(96))
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) >= 4, statuses
    for n, answer in enumerate(answers):
        if answer.status_code == 200:
            assert_same_answer(answer.json()["results"][0], predictor.predict(images[n % 6], top_k=5), 5)
    after = httpx.post(url + "/v1/classify", content=images[0], headers={**AUTH, "content-type": "image/png"}, timeout=30)
    assert after.status_code == 200 and process.poll() is None
