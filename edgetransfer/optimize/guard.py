"""The INT8 accuracy guard: find the layers whose quantisation hurts most and keep them in float.

Sensitivity is measured, not guessed: each quantised node is left in float on its own and the
top-1 on validation data is taken (a quantisation from cached ranges plus one evaluation,
about a second for a small CNN). Proxies such as per-tensor SQNR ranked the wrong layers on
EfficientNet-Lite0, whose INT8 loss is spread over many layers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

__all__ = ["quantized_nodes", "guard"]


def quantized_nodes(qdq_model: Path) -> list[str]:
    """Names of the compute nodes that read a dequantised tensor (what quantisation touched)."""
    import onnx

    graph = onnx.load(str(qdq_model)).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return [
        node.name for node in graph.node
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dequantized for i in node.input)
    ]


def guard(
    drop_with: Callable[[list[str]], float],
    candidates: list[str],
    budget: float,
    max_float: int,
    report: Callable[[str], None] = lambda message: None,
) -> tuple[list[str], float, list[dict]]:
    """Greedy forward selection of nodes to keep in float until the top-1 drop fits ``budget``.

    Args:
        drop_with: quantises with the given nodes excluded and returns the top-1 drop in points.
        candidates: quantised nodes to consider.
        budget: the largest acceptable drop.
        max_float: the most nodes that may be kept in float.

    Returns:
        The nodes kept in float, the final drop, and every step taken (for the manifest).
        The caller checks the final drop against the budget.
    """
    single = sorted(((drop_with([name]), name) for name in candidates), key=lambda pair: pair[0])
    report(f"INT8 guard: measured {len(single)} layers one by one; best alone: {single[0][1]} ({single[0][0]:.2f} points)")
    kept: list[str] = []
    best = drop_with([])
    steps = [{"kept_in_float": [], "drop_points": round(best, 3)}]
    for _, name in single:
        if best <= budget or len(kept) >= max_float:
            break
        drop = drop_with(kept + [name])
        if drop < best:
            kept, best = kept + [name], drop
            steps.append({"kept_in_float": list(kept), "drop_points": round(drop, 3)})
            report(f"INT8 guard: {len(kept)} layer(s) in float, top-1 drop {drop:.2f} points")
    return kept, best, steps
