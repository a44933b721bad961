"""The INT8 accuracy guard: find the layers whose quantisation hurts most and keep them in float.

Sensitivity is measured, not guessed: each quantised node is left in float on its own and the
model is scored on validation data (top-1 lost, then logit error against float; a quantisation
from cached ranges plus one evaluation, about a second for a small CNN). Proxies such as
per-tensor SQNR ranked the wrong layers on EfficientNet-Lite0, whose INT8 loss is spread over
many layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import QuantizationError
from ..results import GuardStep

__all__ = ["Score", "score", "quantized_nodes", "guard", "GuardSubject", "GuardResult", "hold_budget"]

Score = tuple[float, float]  # (top-1 points lost against float, mean squared logit error against float)


class GuardSubject(Protocol):
    """What the guard needs of a quantiser (ONNX Runtime's, NNCF's, or the next one).

    Attributes:
        name: what the messages call the quantised model (``"INT8"``, ``"OpenVINO INT8"``).
        fallback: the precisions to suggest when the budget cannot be held.
    """

    name: str
    fallback: str

    def layers(self) -> list[str]:
        """The quantised layers that could be kept in float, in graph order."""

    def score(self, kept: Sequence[str]) -> Score:
        """The quantised model's :func:`score` with the ``kept`` layers in float."""


@dataclass(frozen=True)
class GuardResult:
    """The layers kept in float, the top-1 drop with them, and every step the guard took."""

    kept: list[str]
    drop_points: float
    steps: list[GuardStep]


def hold_budget(subject: GuardSubject, budget: float, max_float: int, report: Callable[[str], None]) -> GuardResult:
    """Score ``subject`` fully quantised; when it loses more than ``budget`` top-1 points, keep
    its most sensitive layers in float (:func:`guard`) until it does not.

    Raises:
        QuantizationError: the budget cannot be held with at most ``max_float`` layers in float.
    """
    unguarded = subject.score([])
    if unguarded[0] <= budget:
        return GuardResult([], unguarded[0], [])
    report(f"{subject.name} loses {unguarded[0]:.2f} top-1 points (budget {budget}): finding the sensitive layers")
    kept, drop, steps = guard(subject.score, subject.layers(), budget, max_float, report, unguarded)
    if drop > budget:
        raise QuantizationError(
            f"{subject.name} loses {drop:.2f} top-1 points even with {len(kept)} layer(s) kept in float (budget"
            f" {budget}); nothing was written. Raise --max-accuracy-drop, or use {subject.fallback}"
        )
    return GuardResult(kept, drop, steps)


def quantized_nodes(qdq_model: Path) -> list[str]:
    """Names of the compute nodes that read a dequantised tensor (what quantisation touched)."""
    import onnx

    graph = onnx.load(str(qdq_model)).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return [
        node.name for node in graph.node
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dequantized for i in node.input)
    ]


def score(logits, float_logits, labels) -> Score:
    """How far a quantised model is from float: top-1 points lost, then mean squared logit error.

    Top-1 on a validation split moves in whole images; when INT8's loss is spread over many
    layers, no single layer changes it and only the logit error tells the layers apart.
    """
    import numpy as np

    from ..metrics import topk_accuracy

    drop = 100 * (topk_accuracy(float_logits, labels, 1) - topk_accuracy(logits, labels, 1))
    return float(drop), float(np.mean((logits - float_logits) ** 2))


def guard(
    score_with: Callable[[list[str]], Score],
    candidates: list[str],
    budget: float,
    max_float: int,
    report: Callable[[str], None] = lambda message: None,
    unguarded: Score | None = None,
) -> tuple[list[str], float, list[GuardStep]]:
    """Greedy forward selection of nodes to keep in float until the top-1 drop fits ``budget``.

    The first pass tries the nodes in the order of their sensitivity alone and keeps each one
    that brings the score closer to float. Sensitivities are not additive (bias correction and
    rounding errors partly cancel), so when a pass ends over budget the nodes left are measured
    again, each on top of those already kept, and a new pass runs in that order. It stops when
    the budget holds, ``max_float`` nodes are kept, or a pass keeps nothing.

    Args:
        score_with: quantises with the given nodes excluded and returns its :func:`score`.
        candidates: quantised nodes to consider.
        budget: the largest acceptable drop.
        max_float: the most nodes that may be kept in float.
        unguarded: ``score_with([])`` where the caller has it already.

    Returns:
        The nodes kept in float, the final drop, and every step taken (for the manifest).
        The caller checks the final drop against the budget.
    """
    best = unguarded if unguarded is not None else score_with([])
    steps, kept = [_step([], best)], []

    def done() -> bool:
        return best[0] <= budget or len(kept) >= max_float

    for pass_number in range(1, len(candidates) + 1):
        if done():
            break
        ranked = _rank(score_with, kept, [name for name in candidates if name not in kept])
        if not ranked or not ranked[0][0] < best:
            break  # no node on its own brings the model closer to float: the guard has stalled
        (drop, error), name = ranked[0]
        where = "alone" if not kept else f"on top of the {len(kept)} kept"
        report(f"INT8 guard, pass {pass_number}: measured {len(ranked)} layers {where}; best: {name} ({drop:.2f} points, logit MSE {error:.3g})")
        for position, (measured, name) in enumerate(ranked):
            if done():
                break
            candidate = measured if position == 0 else score_with(kept + [name])
            if candidate < best:  # fewer points lost, or as many with logits closer to float
                kept, best = kept + [name], candidate
                steps.append(_step(kept, best))
                report(f"INT8 guard: {len(kept)} layer(s) in float, top-1 drop {best[0]:.2f} points")
    return kept, best[0], steps


def _rank(score_with: Callable[[list[str]], Score], kept: list[str], remaining: list[str]) -> list[tuple[Score, str]]:
    """Each remaining node scored on top of those kept, best (closest to float) first."""
    return sorted(((score_with(kept + [name]), name) for name in remaining), key=lambda pair: pair[0])


def _step(kept: list[str], result: Score) -> GuardStep:
    return GuardStep(tuple(kept), result[0], result[1])
