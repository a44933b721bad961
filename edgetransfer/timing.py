"""Timing runners fairly: every variant in turn, round after round, on batches cut in advance,
so that a machine that slows down or speeds up affects them all alike. Nothing but
``runner.infer`` is inside a timed region."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .backends import Runner
from .benchreport import BenchRow, Latency
from .config import BenchOptions
from .errors import first_line

__all__ = ["Timed", "time_in_rounds", "time_alone", "batched_logits"]


@dataclass
class Timed:
    """A variant's row, its open runner and its prepared inputs."""

    row: BenchRow
    runner: Runner
    inputs: np.ndarray


def time_in_rounds(timed: list[Timed], batch: int, options: BenchOptions) -> None:
    """Time every open variant at ``batch``, in turn, round after round, on batches cut from the
    inputs in advance (nothing else is timed); a variant that fails while timed is marked failed."""
    per_round = -(-options.iterations // options.rounds)
    pools = {id(t): _batches(t.inputs, batch) for t in timed}
    rounds: dict[int, list[list[float]]] = {id(t): [] for t in timed}
    spent: dict[int, float] = {id(t): 0.0 for t in timed}

    def live() -> list[Timed]:
        return [t for t in timed if t.row.measured]

    for t in live():
        _guarded(t, functools.partial(_timed_runs, t.runner, pools[id(t)], options.warmup, 0))
    done = 0
    while live() and (done < options.rounds or min(spent[id(t)] for t in live()) < options.min_seconds):
        for t in live():
            if t.row.kind == "torch-checkpoint" and t.row.threads:
                torch.set_num_threads(t.row.threads)  # torch's pool is the process's: each eager row gets its own setting
            times = _guarded(t, functools.partial(_timed_runs, t.runner, pools[id(t)], per_round, len(rounds[id(t)]) * per_round))
            if times:
                rounds[id(t)].append(times)
                spent[id(t)] += sum(times)
        done += 1
    for t in live():
        t.row.latency[str(batch)] = Latency.from_times(batch, [x for r in rounds[id(t)] for x in r], rounds[id(t)])


def _guarded(t: Timed, work: Callable[[], Any]) -> Any:
    try:
        return work()
    except Exception as exc:  # a variant that breaks while timed is reported, the others go on
        t.row.status, t.row.reason = "failed", f"{type(exc).__name__}: {first_line(exc)}"
        return None


def _batches(inputs: np.ndarray, batch: int) -> list[np.ndarray]:
    reps = -(-batch // len(inputs))
    pool = np.concatenate([inputs] * reps) if reps > 1 else inputs
    return [np.ascontiguousarray(pool[i : i + batch]) for i in range(0, len(pool) - batch + 1, batch)][:16]


def _timed_runs(runner: Runner, batches: list[np.ndarray], count: int, start: int) -> list[float]:
    times = []
    for i in range(start, start + count):
        chunk = batches[i % len(batches)]
        t0 = time.perf_counter()
        runner.infer(chunk)
        times.append(time.perf_counter() - t0)
    return times


def batched_logits(runner: Runner, inputs: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([runner.infer(inputs[i : i + batch]) for i in range(0, len(inputs), batch)])


def time_alone(runner: Runner, inputs: np.ndarray, batch: int, options: BenchOptions) -> Latency:
    """Latency of one ``runner`` alone (the thread-count probe); benches time in rounds instead."""
    batches = _batches(inputs, batch)
    for i in range(options.warmup):
        runner.infer(batches[i % len(batches)])
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < options.iterations or time.perf_counter() - started < options.min_seconds:
        times += _timed_runs(runner, batches, 1, len(times))
    return Latency.from_times(batch, times)
