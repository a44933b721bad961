"""Which serving framework `edgetransfer serve` is built on: BentoML and Ray Serve, measured on the
same model, the same images and the same clients, against the runtime's Predictor in-process.

Each framework serves one endpoint that takes an encoded image (base64 in JSON, the same body for
both), decodes and preprocesses it with the runtime's own code and runs the model with the
framework's adaptive batching (at most --max-batch images, waiting at most --wait-ms), one
replica. The load is N concurrent clients on loopback, each sending its next image when the last
answer came; every answer is checked against Predictor.predict on the same bytes. Reported per
framework: start-up time until the endpoint answers, throughput and p50/p99 latency at each
client count, the mean batch the server formed, the server's process-tree memory (summed
proportional set size), and against the in-process ceiling (Predictor.predict at --max-batch).

    pip install bentoml 'ray[serve]' httpx psutil   # beside edgetransfer-runtime
    python benchmarks/serve_choice_bench.py --model runs/lite0-224/model.onnx --images calibration/digits
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from edgetransfer.runtime import Predictor

HERE = Path(__file__).resolve().parent
APPS = {
    "bentoml": textwrap.dedent(
        """
        import base64, os
        import bentoml
        from edgetransfer.runtime import Predictor

        @bentoml.service(workers=1, traffic={"timeout": 60, "max_concurrency": 1024})
        class Classifier:
            def __init__(self):
                self.predictor = Predictor(os.environ["ET_MODEL"], threads=int(os.environ["ET_THREADS"]))

            @bentoml.api(batchable=True, max_batch_size=int(os.environ["ET_MAX_BATCH"]), max_latency_ms=60000)
            def classify(self, images: list[str]) -> list[dict]:
                found = self.predictor.predict([base64.b64decode(i) for i in images], top_k=1)
                return [{"label": best[0].label, "p": best[0].probability, "batch": len(images)} for best in found]
        """
    ),
    "ray": textwrap.dedent(
        """
        import base64, os
        from ray import serve
        from edgetransfer.runtime import Predictor

        @serve.deployment(max_ongoing_requests=1024, max_queued_requests=4096, ray_actor_options={"num_cpus": 0})
        class Classifier:
            def __init__(self):
                self.predictor = Predictor(os.environ["ET_MODEL"], threads=int(os.environ["ET_THREADS"]))

            @serve.batch(max_batch_size=int(os.environ["ET_MAX_BATCH"]), batch_wait_timeout_s=float(os.environ["ET_WAIT_MS"]) / 1000)
            async def classify(self, images: list[str]) -> list[dict]:
                found = self.predictor.predict([base64.b64decode(i) for i in images], top_k=1)
                return [{"label": best[0].label, "p": best[0].probability, "batch": len(images)} for best in found]

            async def __call__(self, request):
                body = await request.json()
                return [await self.classify(image) for image in body["images"]]

        if __name__ == "__main__":
            import time
            import ray
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
            serve.start(http_options={"host": "127.0.0.1", "port": int(os.environ["ET_PORT"])})
            serve.run(Classifier.bind(), route_prefix="/classify")
            while True:
                time.sleep(3600)
        """
    ),
}


def start(framework: str, folder: Path, port: int, env: dict) -> subprocess.Popen:
    (folder / f"{framework}_app.py").write_text(APPS[framework])
    bin_dir = Path(sys.executable).parent
    if framework == "bentoml":
        command = [str(bin_dir / "bentoml"), "serve", "bentoml_app:Classifier", "--port", str(port)]
    else:
        command = [sys.executable, "ray_app.py"]
        env = {**env, "ET_PORT": str(port)}
    return subprocess.Popen(
        command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=open(folder / f"{framework}.log", "w"), start_new_session=True
    )


def wait_ready(url: str, body: dict, limit: float = 180) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        try:
            if httpx.post(url, json=body, timeout=30).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not answer in {limit} s")


def tree_pss_mb(pid: int) -> float:
    total = 0.0
    for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.Error, AttributeError):
            pass
    return total / 2**20


async def load(url: str, payloads: list[str], expected: list[str], clients: int, requests: int) -> dict:
    latencies, batches, wrong, failed = [], [], 0, 0
    counter = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal wrong, failed
        for n in counter:
            started = time.perf_counter()
            answer = await http.post(url, json={"images": [payloads[n % len(payloads)]]}, timeout=120)
            latencies.append(time.perf_counter() - started)
            if answer.status_code != 200:
                failed += 1
                continue
            [result] = answer.json()
            batches.append(result["batch"])
            wrong += result["label"] != expected[n % len(payloads)]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - started
    ms = sorted(1000 * t for t in latencies)
    return {
        "clients": clients,
        "requests": requests,
        "images_per_s": round(requests / wall, 1),
        "p50_ms": round(ms[len(ms) // 2], 2),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2),
        "mean_batch": round(statistics.fmean(batches), 2) if batches else None,
        "failed": failed,
        "wrong": wrong,
    }


def ceiling(predictor: Predictor, images: list[bytes], batch: int, seconds: float = 5.0) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        chunk = [images[(done + i) % len(images)] for i in range(batch)]
        predictor.predict(chunk, top_k=1)
        done += batch
    return done / (time.perf_counter() - started)


def measure(framework: str, args, payloads: list[str], expected: list[str]) -> dict:
    port = {"bentoml": 18301, "ray": 18302}[framework]
    url = f"http://127.0.0.1:{port}/classify"
    env = {
        **os.environ,
        "ET_MODEL": str(args.model.resolve()),
        "ET_THREADS": str(args.threads),
        "ET_MAX_BATCH": str(args.max_batch),
        "ET_WAIT_MS": str(args.wait_ms),
    }
    with tempfile.TemporaryDirectory() as folder:
        server = start(framework, Path(folder), port, env)
        try:
            startup = wait_ready(url, {"images": payloads[:1]})
            rows = [asyncio.run(load(url, payloads, expected, clients, args.requests)) for clients in args.clients]
            memory = tree_pss_mb(server.pid)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
            if framework == "ray":
                subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)
    return {"framework": framework, "startup_s": round(startup, 1), "memory_mb": round(memory), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--clients", type=lambda v: [int(c) for c in v.split(",")], default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frameworks", default="bentoml,ray")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve_choice")
    args = parser.parse_args()
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:64]
    images = [p.read_bytes() for p in files]
    predictor = Predictor(args.model, threads=args.threads)
    expected = [best[0].label for best in predictor.predict(images, top_k=1)]
    best = ceiling(predictor, images, args.max_batch)
    del predictor
    payloads = [base64.b64encode(i).decode() for i in images]
    results = [measure(framework, args, payloads, expected) for framework in args.frameworks.split(",")]
    cpu = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")][0]
    flags = sorted(
        {f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split()}
        & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8"}
    )
    report = {
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "flags": flags},
        "model": str(args.model),
        "options": {k: str(v) for k, v in vars(args).items()},
        "in_process_images_per_s": round(best, 1),
        "frameworks": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Serving frameworks: BentoML against Ray Serve on the same model",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores; flags {', '.join(flags)}; {args.threads} ONNX Runtime threads. Produced by `python benchmarks/serve_choice_bench.py`.",
        "",
        f"Model `{args.model.name}`; {len(images)} images sent as base64 JSON, decoded and preprocessed by the runtime in the server; adaptive batching up to {args.max_batch}, waiting at most {args.wait_ms} ms; {args.requests} requests per row. In-process ceiling: `Predictor.predict` at batch {args.max_batch}, **{best:.1f} images/s**.",
        "",
        "| framework | start-up s | server memory MB | clients | images/s | x in-process | p50 ms | p99 ms | mean batch | failed | wrong |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for row in result["rows"]:
            lines.append(
                f"| {result['framework']} | {result['startup_s']} | {result['memory_mb']} | {row['clients']} | {row['images_per_s']} | {row['images_per_s'] / best:.2f} | {row['p50_ms']} | {row['p99_ms']} | {row['mean_batch']} | {row['failed']} | {row['wrong']} |"
            )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
