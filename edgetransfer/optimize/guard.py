"""The INT8 accuracy guard: find the layers whose quantisation hurts most and keep them in float.

Sensitivity is measured, not guessed: each quantised node is left in float on its own and the
model is scored on validation data (top-1 lost, then logit error against float; a quantisation
from cached ranges plus one evaluation, about a second for a small CNN). Proxies such as
per-tensor SQNR ranked the wrong layers on EfficientNet-Lite0, whose INT8 loss is spread over
many layers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

__all__ = ["Score", "score", "quantized_nodes", "guard"]

Score = tuple[float, float]  # (top-1 points lost against float, mean squared logit error against float)


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
) -> tuple[list[str], float, list[dict]]:
    """Greedy forward selection of nodes to keep in float until the top-1 drop fits ``budget``.

    Args:
        score_with: quantises with the given nodes excluded and returns its :func:`score`.
        candidates: quantised nodes to consider.
        budget: the largest acceptable drop.
        max_float: the most nodes that may be kept in float.

    Returns:
        The nodes kept in float, the final drop, and every step taken (for the manifest).
        The caller checks the final drop against the budget.
    """
    if max_float <= 0:  # nothing may be kept: measuring each layer would change nothing
        unguarded = score_with([])
        return [], unguarded[0], [_step([], unguarded)]
    single = sorted(((score_with([name]), name) for name in candidates), key=lambda pair: pair[0])
    if single:
        (drop, error), name = single[0]
        report(f"INT8 guard: measured {len(single)} layers one by one; best alone: {name} ({drop:.2f} points, logit MSE {error:.3g})")
    kept: list[str] = []
    best = score_with([])
    steps = [_step([], best)]
    for _, name in single:
        if best[0] <= budget or len(kept) >= max_float:
            break
        candidate = score_with(kept + [name])
        if candidate < best:  # fewer points lost, or as many with logits closer to float
            kept, best = kept + [name], candidate
            steps.append(_step(kept, best))
            report(f"INT8 guard: {len(kept)} layer(s) in float, top-1 drop {best[0]:.2f} points")
    return kept, best[0], steps


def _step(kept: list[str], result: Score) -> dict:
    return {"kept_in_float": list(kept), "drop_points": round(result[0], 3), "logit_mse": round(result[1], 6)}
