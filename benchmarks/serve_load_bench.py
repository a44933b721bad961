"""Load test of `edgetransfer serve`: the real server, started as a user starts it, on loopback.

N concurrent clients (closed loop: each sends its next image when its last answer came) send real
images as raw bytes to POST /v1/classify, for a bounded number of requests per row, with adaptive
batching on (--max-batch) and off (--max-batch 1). Every answer is checked against
Predictor.predict on the same bytes. Per row: throughput, p50/p99 latency, the mean batch the
server ran (its own edgetransfer_batch_images histogram, read from /metrics), the answers by
status, and the ratio to the ceiling: Predictor.predict in this process at its best batch size.

Then an overload run: --overload-factor times the clients the server admits (--max-queue) for
--overload-seconds, each request carrying its own id (a multipart file name, echoed in the
answer), against the same server at capacity (--max-queue clients) for as long. Reported: the
answers by status (200, 503, 504), requests without an answer (lost), answers that name another
request or give another label (mixed up), the server's memory (its process tree's proportional
set size, sampled each second) at capacity and in overload, and whether it serves normally after.

The load generator is a minimal HTTP/1.1 keep-alive client on asyncio streams (no HTTP library):
on 2 cores it shares the CPU with the server, and should take as little of it as it can.

    pip install -e ./runtime -e ".[serve,dev]"
    python benchmarks/serve_load_bench.py --model runs/lite0-224 --images calibration/digits
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import psutil

from edgetransfer.runtime import Predictor
from edgetransfer.runtime_commands import served_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_choice_bench import tree_pss_mb  # noqa: E402 - the sibling benchmark's sampler

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8")


class Connection:
    """One keep-alive HTTP/1.1 connection; ``post`` returns (status, body)."""

    def __init__(self, port: int) -> None:
        self.port, self.reader, self.writer = port, None, None

    async def post(self, path: str, body: bytes, kind: str) -> tuple[int, bytes, float]:
        """(status, body, the Retry-After seconds the answer asked for, else 0)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n\r\n"
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readuntil(b"\r\n")
        headers = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        length = int(headers.split("content-length:", 1)[1].split("\r\n", 1)[0])
        answer = await self.reader.readexactly(length)
        if "connection: close" in headers:
            self.close()
        retry = headers.split("retry-after:", 1)[1].split("\r\n", 1)[0] if "retry-after:" in headers else "0"
        return int(status_line.split()[1]), answer, float(retry)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = "edgetransferbench"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\nContent-Type: image/png\r\n\r\n'
    return head.encode() + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def closed_loop(
    port: int, images: list[bytes], expected: list[str], clients: int, requests: int | None, seconds: float | None, tagged: bool
) -> dict:
    """``clients`` connections, each sending its next request when its last answer came, until
    ``requests`` were sent or ``seconds`` passed."""
    latencies, statuses, mixed, lost, sent = [], Counter(), 0, 0, 0
    stop = time.perf_counter() + seconds if seconds else None

    async def client() -> None:
        nonlocal mixed, lost, sent
        connection = Connection(port)
        while (requests is None or sent < requests) and (stop is None or time.perf_counter() < stop):
            n, sent = sent, sent + 1
            image = n % len(images)
            body, kind = multipart(f"request-{n}.png", images[image]) if tagged else (images[image], "image/png")
            started = time.perf_counter()
            try:
                status, answer, retry_after = await connection.post("/v1/classify", body, kind)
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                lost += 1
                connection.close()
                continue
            statuses[status] += 1
            if status == 200:
                latencies.append(time.perf_counter() - started)
            await asyncio.sleep(min(retry_after, 5.0))
            if status == 200:
                [result] = json.loads(answer)["results"]
                mixed += result["predictions"][0]["label"] != expected[image] or (tagged and result["image"] != f"request-{n}.png")
        connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - started
    ok = sorted(1000 * t for t in latencies)  # of the answered requests: a 503 comes back at once
    return {
        "clients": clients,
        "sent": sent,
        "answered": {str(status): count for status, count in sorted(statuses.items())},  # as JSON keeps it
        "lost": lost,
        "mixed_up": mixed,
        "seconds": round(wall, 2),
        "images_per_s": round(statuses[200] / wall, 1),
        "p50_ms": round(ok[len(ok) // 2], 1) if ok else None,
        "p99_ms": round(ok[min(len(ok) - 1, int(len(ok) * 0.99))], 1) if ok else None,
    }


def batch_counts(port: int) -> tuple[float, float]:
    """(images, batches) the model service has run: its edgetransfer_batch_images histogram."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    total = {"_sum": 0.0, "_count": 0.0}
    for line in text.splitlines():
        for suffix in total:
            if line.startswith("edgetransfer_batch_images" + suffix):
                total[suffix] += float(line.rsplit(" ", 1)[1])
    return total["_sum"], total["_count"]


class Server:
    """``edgetransfer-runtime serve`` in its own process group."""

    def __init__(self, model: Path, variant: str, port: int, args, max_batch: int, max_queue: int, log: Path) -> None:
        command = [sys.executable, "-m", "edgetransfer.runtime", "serve", str(model), "--variant", variant, "--port", str(port)]
        command += ["--max-batch", str(max_batch), "--max-queue", str(max_queue), "--max-latency-ms", str(args.max_latency_ms)]
        command += ["--threads", str(args.threads)]
        self.port, self.log = port, log
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True)  # noqa: SIM115

    def wait_ready(self, limit: float = 120) -> float:
        started = time.perf_counter()
        while time.perf_counter() - started < limit and self.process.poll() is None:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5).status == 200:
                    return time.perf_counter() - started
            except OSError:
                time.sleep(0.25)
        raise RuntimeError(f"the server did not start: {self.log.read_text()[-2000:]}")

    def memory_mb(self) -> float:
        return tree_pss_mb(self.process.pid)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)


def ceiling(predictor: Predictor, images: list[bytes], seconds: float) -> dict:
    """Predictor.predict in this process: images/s at each batch size, and batch-1 latency."""
    rates = {}
    for batch in (1, 2, 4, 8, 16):
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            predictor.predict([images[(done + i) % len(images)] for i in range(batch)], top_k=1)
            done += batch
        rates[batch] = done / (time.perf_counter() - started)
    best = max(rates, key=rates.__getitem__)
    return {
        "images_per_s": {str(b): round(r, 1) for b, r in rates.items()},
        "best_batch": best,
        "best": round(rates[best], 1),
        "batch1_ms": round(1000 / rates[1], 2),
    }


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of the server (its process tree) and of this process,
    the load generator: where the cores went."""
    server = psutil.Process(pid)
    total = 0.0
    for proc in [server, *server.children(recursive=True)]:
        try:
            total += sum(proc.cpu_times()[:2])
        except psutil.Error:
            continue
    return {"server": total, "load generator": sum(psutil.Process().cpu_times()[:2])}


def load_rows(server: Server, images, expected, args) -> list[dict]:
    asyncio.run(closed_loop(server.port, images, expected, 8, 80, None, False))  # warm up: BentoML's batcher learns its latency model
    rows = []
    for clients in args.clients:
        before, cpu_before = batch_counts(server.port), cpu_seconds(server.process.pid)
        row = asyncio.run(closed_loop(server.port, images, expected, clients, max(args.requests, 4 * clients), None, False))
        after, cpu_after = batch_counts(server.port), cpu_seconds(server.process.pid)
        row["mean_batch"] = round((after[0] - before[0]) / max(after[1] - before[1], 1), 2)
        row["cpu_cores"] = {role: round((cpu_after[role] - cpu_before.get(role, 0.0)) / row["seconds"], 2) for role in cpu_after}
        rows.append(row)
        print(
            f"  {clients:4d} clients: {row['images_per_s']} images/s, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, batch {row['mean_batch']}, {row['answered']}",
            flush=True,
        )
    return rows


def memory_during(server: Server, images, expected, clients: int, seconds: float) -> tuple[dict, list[float]]:
    samples: list[float] = []

    async def run() -> dict:
        async def sample() -> None:
            while True:
                await asyncio.sleep(1.0)
                samples.append(await asyncio.to_thread(server.memory_mb))

        sampler = asyncio.ensure_future(sample())
        try:
            return await closed_loop(server.port, images, expected, clients, None, seconds, True)
        finally:
            sampler.cancel()

    return asyncio.run(run()), samples


def overload(model, variant, images, expected, args, port: int, folder: Path) -> dict:
    server = Server(model, variant, port, args, args.max_batch, args.max_queue, folder / "overload.log")
    try:
        server.wait_ready()
        asyncio.run(closed_loop(port, images, expected, 8, 80, None, False))
        before = asyncio.run(lone_client(port, images[0], 5.0))
        print(
            f"overload: {args.max_queue} clients (capacity) for {args.overload_seconds} s, then {args.overload_factor * args.max_queue}", flush=True
        )
        capacity, at_capacity = memory_during(server, images, expected, args.max_queue, args.overload_seconds)
        flood, in_overload = memory_during(server, images, expected, args.overload_factor * args.max_queue, args.overload_seconds)
        after = asyncio.run(closed_loop(port, images, expected, 1, 20, None, True))
        recovery = asyncio.run(lone_client(port, images[0], args.recovery_seconds))
        alive = server.process.poll() is None
    finally:
        server.stop()
    return {
        "capacity": capacity,
        "overload": flood,
        "after": after,
        "alive_after": alive,
        "memory_mb_at_capacity": {"mean": round(statistics.fmean(at_capacity), 1), "max": round(max(at_capacity), 1)},
        "memory_mb_in_overload": {"mean": round(statistics.fmean(in_overload), 1), "max": round(max(in_overload), 1)},
        "memory_change": round(max(in_overload) / max(at_capacity) - 1, 3),
        "lone_client_ms": {
            "before": _median(before),
            "after_first_20": _median(recovery[:20]),
            f"after_last_{RECOVERY_TAIL_S:g}_s": _median([r for r in recovery if r[0] >= recovery[-1][0] - RECOVERY_TAIL_S]),
            "statuses_after": sorted({r[2] for r in recovery}),
        },
    }


RECOVERY_TAIL_S = 5.0


async def lone_client(port: int, image: bytes, seconds: float) -> list[tuple[float, float, int]]:
    """One client for ``seconds``: (seconds since start, latency ms, status) of each request."""
    connection, started, found = Connection(port), time.perf_counter(), []
    while time.perf_counter() - started < seconds:
        sent = time.perf_counter()
        status, _, _ = await connection.post("/v1/classify", image, "image/png")
        found.append((sent - started, 1000 * (time.perf_counter() - sent), status))
    connection.close()
    return found


def _median(rows: list[tuple[float, float, int]]) -> float:
    return round(statistics.median(r[1] for r in rows), 1)


def machine() -> dict:
    cpu = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")][0]
    flags = sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split()} & set(FLAGS))
    return {"cpu": cpu, "cores": os.cpu_count(), "flags": flags}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a run directory (its recommended variant) or a model file")
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--clients", type=lambda v: [int(c) for c in v.split(",")], default=[1, 8, 32, 128])
    parser.add_argument("--requests", type=int, default=400, help="per row (at least 4 per client)")
    parser.add_argument("--max-batch", type=int, default=None, help="batching's largest batch (default: the in-process ceiling's best)")
    parser.add_argument("--max-latency-ms", type=int, default=2000)
    parser.add_argument("--max-queue", type=int, default=64, help="the overload run's queue (load rows admit every client)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--ceiling-seconds", type=float, default=4.0)
    parser.add_argument("--overload-factor", type=int, default=10)
    parser.add_argument("--overload-seconds", type=float, default=30.0)
    parser.add_argument("--recovery-seconds", type=float, default=60.0, help="one client after the overload, to see the server return to normal")
    parser.add_argument("--port", type=int, default=18411)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve_load")
    parser.add_argument("--from-json", action="store_true", help="write the table and plot again from OUT.json, running nothing")
    args = parser.parse_args()
    if args.from_json:
        report = json.loads(args.out.with_suffix(".json").read_text())
        args.max_batch = report["modes"]["batching"]["max_batch"]
        print("\n".join(write_markdown(report, args)))
        plot(report, args.out.with_suffix(".png"))
        return
    model, variant, note = served_model(args.model)
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:64]
    images = [p.read_bytes() for p in files]
    predictor = Predictor(model, threads=args.threads)
    expected = [best[0].label for best in predictor.predict(images, top_k=1)]
    best = ceiling(predictor, images, args.ceiling_seconds)
    del predictor
    print(f"{variant} ({model}); in-process {best}", flush=True)
    args.max_batch = args.max_batch or best["best_batch"]
    folder = Path(tempfile.mkdtemp(prefix="serve_load_"))  # the servers' logs
    print(f"server logs: {folder}", flush=True)
    modes = {}
    for name, max_batch in (("batching", args.max_batch), ("no batching", 1)):
        print(f"{name} (--max-batch {max_batch}):", flush=True)
        server = Server(model, variant, args.port, args, max_batch, 2 * max(args.clients), folder / f"{max_batch}.log")
        try:
            startup = server.wait_ready()
            modes[name] = {"max_batch": max_batch, "startup_s": round(startup, 1), "rows": load_rows(server, images, expected, args)}
        finally:
            server.stop()
    report = {
        "machine": machine(),
        "model": str(model),
        "variant": variant,
        "note": note,
        "images": len(images),
        "options": {k: str(v) for k, v in vars(args).items()},
        "in_process": best,
        "modes": modes,
        "overload": overload(model, variant, images, expected, args, args.port + 1, folder),
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = write_markdown(report, args)
    plot(report, args.out.with_suffix(".png"))
    print("\n".join(lines))


def write_markdown(report: dict, args) -> list[str]:
    m, best, over = report["machine"], report["in_process"], report["overload"]
    on, off = report["modes"]["batching"]["rows"], report["modes"]["no batching"]["rows"]
    lines = [
        "# Serving load test: `edgetransfer serve` under N concurrent clients",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; flags {', '.join(m['flags'])}; {args.threads} ONNX Runtime threads; the load generator runs on the same cores. "
        "Produced by `python benchmarks/serve_load_bench.py`.",
        "",
        f"Model: the variant `{report['variant']}` ({Path(report['model']).name}); {report['images']} real images sent as raw PNG bytes, every answer checked against "
        f"`Predictor.predict` on the same bytes. In-process ceiling: `Predictor.predict` at batch {best['best_batch']}, **{best['best']} images/s** "
        f"(batch 1: {best['images_per_s']['1']} images/s, {best['batch1_ms']} ms).",
        "",
        "| batching | clients | requests | images/s | x in-process | p50 ms | p99 ms | mean batch | answers | lost | wrong | cores: server / load generator |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("batching", "no batching"):
        mode = report["modes"][name]
        for row in mode["rows"]:
            lines.append(
                f"| {'on, max ' + str(mode['max_batch']) if mode['max_batch'] > 1 else 'off'} | {row['clients']} | {row['sent']} | {row['images_per_s']} | "
                f"{row['images_per_s'] / best['best']:.2f} | {row['p50_ms']} | {row['p99_ms']} | {row['mean_batch']} | {_statuses(row)} | {row['lost']} | {row['mixed_up']} | {_cores(row)} |"
            )
    lines += ["", *verdicts(report, on, off, args), "", *overload_lines(over, args)]
    report_path = args.out.with_suffix(".md")
    report_path.write_text("\n".join(lines) + "\n")
    return lines


def _cores(row: dict) -> str:
    cores = row.get("cpu_cores", {})
    return " / ".join(str(cores.get(role, "?")) for role in ("server", "load generator"))


def _statuses(row: dict) -> str:
    return ", ".join(f"{count}×{status}" for status, count in row["answered"].items())


def verdicts(report: dict, on: list[dict], off: list[dict], args) -> list[str]:
    best = report["in_process"]
    by = {r["clients"]: r for r in on}
    off_by = {r["clients"]: r for r in off}
    lines = [
        "<!-- --8<-- [start:summary] -->",
        f"Against the targets ({report['machine']['cpu']}, {report['machine']['cores']} cores; {', '.join(report['machine']['flags'])}):",
        "",
    ]
    if 32 in by:
        ratio = by[32]["images_per_s"] / best["best"]
        lines.append(f"- 32 clients: {ratio:.2f}x the in-process ceiling (target ≥ 0.8x).")
        if 32 in off_by:
            lines.append(
                f"- 32 clients, batching against none: {by[32]['images_per_s'] / off_by[32]['images_per_s']:.2f}x (target ≥ 2x); "
                f"the model itself gains {best['best'] / best['images_per_s']['1']:.2f}x from batching in-process on this CPU."
            )
    if 8 in by:
        bound = 3 * best["batch1_ms"] + args.max_latency_ms
        floor = 1000 * 8 / by[8]["images_per_s"]
        lines.append(
            f"- 8 clients: p99 {by[8]['p99_ms']} ms; target ≤ 3 × {best['batch1_ms']} ms + the batcher's bound {args.max_latency_ms} ms = {bound:.0f} ms. "
            f"Eight clients in a closed loop wait for each other's images: the mean latency cannot be below 8 / throughput = {floor:.0f} ms."
        )
    over = report["overload"]
    flood, lone = over["overload"], over["lone_client_ms"]
    lines += [
        f"- overload ({flood['clients']} clients for {args.overload_seconds:g} s, {args.overload_factor}x what the server admits): "
        f"{flood['answered'].get('503', 0)} answered 503 at once, {flood['answered'].get('200', 0)} served, {flood['lost']} lost, {flood['mixed_up']} mixed up; "
        f"peak memory {100 * over['memory_change']:+.1f}% against the peak at capacity (target within 20%); "
        f"a lone client's p50 {lone['before']} ms before, {lone['after_first_20']} ms right after, "
        f"{lone[f'after_last_{RECOVERY_TAIL_S:g}_s']} ms {args.recovery_seconds:g} s later.",
        "<!-- --8<-- [end:summary] -->",
    ]
    return lines


def overload_lines(over: dict, args) -> list[str]:
    cap, flood, lone = over["capacity"], over["overload"], over["lone_client_ms"]
    return [
        f"## Overload: {args.overload_factor}x the clients the server admits, {args.overload_seconds:g} s",
        "",
        f"The server admits {args.max_queue} requests at once (`--max-queue {args.max_queue}`). Each request names itself (a multipart file name the answer echoes); a client answered 503 waits the Retry-After it names (1 s), as a well-behaved client does, then sends its next request.",
        "",
        "| load | clients | requests | answers | lost | mixed up | images/s | p50 ms | p99 ms | memory MB (PSS) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| at capacity | {cap['clients']} | {cap['sent']} | {_statuses(cap)} | {cap['lost']} | {cap['mixed_up']} | {cap['images_per_s']} | {cap['p50_ms']} | {cap['p99_ms']} | {_memory(over['memory_mb_at_capacity'])} |",
        f"| overload | {flood['clients']} | {flood['sent']} | {_statuses(flood)} | {flood['lost']} | {flood['mixed_up']} | {flood['images_per_s']} | {flood['p50_ms']} | {flood['p99_ms']} | {_memory(over['memory_mb_in_overload'])} |",
        f"| after | {over['after']['clients']} | {over['after']['sent']} | {_statuses(over['after'])} | {over['after']['lost']} | {over['after']['mixed_up']} | {over['after']['images_per_s']} | {over['after']['p50_ms']} | {over['after']['p99_ms']} | |",
        "",
        f"Peak memory in overload against the peak at capacity: {100 * over['memory_change']:+.1f}% (target within 20%). "
        f"After the overload every request was {'answered 200' if over['alive_after'] and over['after'].get('answered') == {'200': over['after']['sent']} and lone['statuses_after'] == [200] else 'NOT answered 200'}.",
        "",
        f"One client alone, before the overload: p50 {lone['before']} ms; its first 20 requests after it: p50 {lone['after_first_20']} ms; "
        f"its last {RECOVERY_TAIL_S:g} s of {args.recovery_seconds:g}: p50 {lone[f'after_last_{RECOVERY_TAIL_S:g}_s']} ms. "
        "BentoML's batcher holds a request for company about as long as recent requests waited in its queue, so after a burst a lone request waits longer until that estimate decays.",
    ]


def _memory(memory: dict) -> str:
    return f"{memory['mean']} mean, {memory['max']} peak"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, mode in report["modes"].items():
        clients = [r["clients"] for r in mode["rows"]]
        left.plot(clients, [r["images_per_s"] for r in mode["rows"]], marker="o", label=f"{name} (max batch {mode['max_batch']})")
        right.plot(clients, [r["p99_ms"] for r in mode["rows"]], marker="o", label=name)
    left.axhline(report["in_process"]["best"], color="grey", linestyle="--", label="in-process Predictor, best batch")
    for axis, title in ((left, "throughput, images/s"), (right, "p99 latency, ms")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_title(title)
        axis.legend(fontsize=8)
    right.set_yscale("log")
    m = report["machine"]
    fig.suptitle(f"edgetransfer serve, {report['variant']}; {m['cpu']}, {m['cores']} cores ({', '.join(m['flags'])})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
