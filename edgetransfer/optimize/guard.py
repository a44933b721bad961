"""The INT8 accuracy guard: keep the fewest layers in float that bring a quantised model within
its budget, chosen without labels on images that no reported figure uses.

How it decides:

* **Selection images, no labels.** Quantisation damage is measured against the float model, not
  against labels: the share of images whose top-1 class changes (an upper bound on the top-1
  points the model can lose on them) and the mean squared logit difference. The guard runs on
  the run's validation images, which the weights never trained on; every accuracy a variant
  reports comes from the run's test images, which the guard never sees (:class:`Selection`
  records which images chose). Training images would be more, but a head fitted on them gives
  them wide margins: on EfficientNet-Lite0, INT8 changed the top-1 of 0.6% of training images
  and of 6% of test images.
* **Ranking by the error each layer adds.** Each quantised layer is measured as the only
  quantised layer (every other one put back in float) on a small ranking subset (32 images):
  the logit error its quantisation adds on its own, the per-layer sensitivity that
  quantisation debuggers (ONNX Runtime's ``qdq_loss_debug``, NNCF's accuracy control) look at.
  Putting layers back in float needs no new calibration (a graph edit), so one layer costs one
  short inference run.
* **Recovery before float** (optional). The quantiser may first quantise the whole model better
  (ONNX Runtime: AdaRound on every layer, :mod:`.rounding`); the model is then measured again,
  and ranked only if it still misses the budget.
* **Bisection along the ranking.** The number of layers kept in float is found by bisection over
  the ranked list, each candidate measured on every selection image: about log2(``max_float``)
  measurements instead of one per layer per pass.

The guard's own time, the ranking and every measured step go to the manifest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx

from ..errors import QuantizationError
from ..results import GuardStep
from ..runtime.tasks import Tasks

__all__ = [
    "Score",
    "distance",
    "quantized_nodes",
    "Selection",
    "GuardSubject",
    "GuardResult",
    "hold_budget",
    "rank_layers",
    "RANKING_IMAGES",
    "hold_prequantized",
    "QAT_FALLBACK",
]

Score = tuple[float, float]  # (top-1 disagreement with float in points, mean squared logit error against float)
RANKING_IMAGES = 32
METHOD = "ranked bisection"


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

    def logits(self, kept: Sequence[str], images: np.ndarray) -> np.ndarray:
        """The quantised model's logits on ``images`` with the ``kept`` layers in float."""


@dataclass(frozen=True)
class Selection:
    """The images the guard chooses on, and the float model's logits on them.

    Attributes:
        images: prepared model inputs.
        float_logits: the float model's logits on them.
        names: where each image came from (for the manifest).
        source: what the images are (``"validation images"``).
    """

    images: np.ndarray
    float_logits: np.ndarray
    names: list[str]
    source: str
    labels: np.ndarray | None = None  # a QAT model's criterion (:func:`hold_prequantized`); a multi-task model's task per image
    tasks: Tasks | None = None  # a multi-task model: the worst task decides (:meth:`score`)

    @property
    def scope(self) -> str:
        """What a disagreement is a share of, for the messages."""
        if self.tasks is None:
            return f"{len(self.images)} selection images"
        return f"the worst task's selection images ({len(self.images)} in all, each task on its own)"

    def score(self, logits: np.ndarray) -> Score:
        """How far ``logits`` are from float: :func:`distance`; for a multi-task model the worst
        task's disagreement (each task on its own images and its own columns), so that damage
        to one task cannot hide in the others' agreement."""
        per_task = self.per_task(logits)
        mse = distance(logits, self.float_logits)[1]
        return (max(per_task.values()), mse) if per_task else (distance(logits, self.float_logits)[0], mse)

    def per_task(self, logits: np.ndarray) -> dict[str, float]:
        """Each task's top-1 disagreement with float in points (empty for one task)."""
        if self.tasks is None or self.labels is None:
            return {}
        rows = self.tasks.task_of(self.labels)
        return {
            name: distance(logits[rows == index][:, columns], self.float_logits[rows == index][:, columns])[0]
            for index, (name, columns) in enumerate(zip(self.tasks.names, self.tasks.slices, strict=True))
            if (rows == index).any()
        }

    def ranking(self, count: int = RANKING_IMAGES) -> tuple[np.ndarray, np.ndarray]:
        """The first ``count`` images (the selection is class-balanced in order) and their float logits."""
        return self.images[:count], self.float_logits[:count]


@dataclass(frozen=True)
class GuardResult:
    """The layers kept in float, how far that model is from float on the selection images, and
    how the guard got there."""

    kept: list[str]
    final: Score
    steps: list[GuardStep]
    ranking: list[tuple[str, float]] = field(default_factory=list)  # (layer, logit error when it alone is quantised)
    seconds: float = 0.0
    labelled_drop: float | None = None  # a QAT model's criterion (see hold_prequantized)
    recovery: dict | None = None  # what the quantiser did to the model before any layer went back to float

    def record(self, selection: Selection, budget: float, max_float: int) -> dict:
        """The guard's entry in the manifest."""
        if self.labelled_drop is not None:
            return {
                "method": "measured only (QAT: nothing can go back to float)",
                "criterion": "labelled top-1 drop against float",
                "labelled_drop_points": round(self.labelled_drop, 3),
                "seconds": round(self.seconds, 2),
                "budget_points": budget,
                "selection": {"source": selection.source, "images": len(selection.names), "labels_used": True, "names": list(selection.names)},
                "disagreement_points": round(self.final[0], 3),
                "logit_mse": round(self.final[1], 6),
            }
        return {
            "method": METHOD if self.ranking else "learned rounding" if self.recovery else "none needed",
            "seconds": round(self.seconds, 2),
            "budget_points": budget,
            "max_float_layers": max_float,
            "selection": {
                "source": selection.source,
                "images": len(selection.names),
                "ranking_images": min(RANKING_IMAGES, len(selection.names)),
                "labels_used": False,
                "names": list(selection.names),
            },
            "disagreement_points": round(self.final[0], 3),
            **({"criterion": "the worst task's top-1 disagreement", "tasks": list(selection.tasks.names)} if selection.tasks else {}),
            "logit_mse": round(self.final[1], 6),
            "ranking": [{"layer": name, "logit_mse_alone": round(error, 6)} for name, error in self.ranking],
            "recovery": self.recovery,
        }


def distance(logits: np.ndarray, float_logits: np.ndarray) -> Score:
    """How far a quantised model is from float, without labels: the share of images whose top-1
    class differs, in points, then the mean squared logit error."""
    disagreement = 100.0 * float(np.mean(logits.argmax(1) != float_logits.argmax(1))) if len(logits) else 0.0
    return disagreement, float(np.mean((logits - float_logits) ** 2)) if len(logits) else 0.0


def rank_layers(
    subject: GuardSubject, layers: Sequence[str], images: np.ndarray, float_logits: np.ndarray, report: Callable[[str], None] = lambda message: None
) -> list[tuple[str, float]]:
    """Each layer with the logit error its quantisation adds on its own: the model with only that
    layer quantised (every other one in float) against the float model. Largest first; ties keep
    graph order.

    Measured alone, the errors of layers add up closely (independent rounding noise), so keeping
    a prefix of this ranking in float removes error steadily. Measured the other way (one layer
    in float, the rest quantised) they do not: with bias correction, later layers compensate for
    earlier ones, and on EfficientNet-Lite0 keeping the top 8 of that ranking left 1.37% of the
    images changed, the top 12 2.15% and the top 24 1.76%, where this ranking reached 0.59% with 3.
    """
    measured = []
    started = time.perf_counter()
    for position, name in enumerate(layers, 1):
        only = [other for other in layers if other != name]
        measured.append((name, distance(subject.logits(only, images), float_logits)[1]))
        if position % 10 == 0 or position == len(layers):
            report(f"{subject.name} guard: ranked {position}/{len(layers)} layers ({time.perf_counter() - started:.0f} s)")
    order = sorted(range(len(measured)), key=lambda i: (-measured[i][1], i))
    return [measured[i] for i in order]


def hold_budget(
    subject: GuardSubject,
    selection: Selection,
    budget: float,
    max_float: int,
    report: Callable[[str], None],
    recover: Callable[[], dict | None] | None = None,
) -> GuardResult:
    """Measure ``subject`` fully quantised on the selection images; when its top-1 disagreement
    with float is over ``budget`` points, keep its highest-ranked layers in float, as few as
    bisection along the ranking finds.

    Args:
        recover: called once when the fully quantised model misses the budget, before any layer
            goes back to float: the quantiser may quantise it better (learned rounding) and
            returns its record, or None when it changed nothing. The model is then measured again,
            and ranked only if it still misses the budget.

    Raises:
        QuantizationError: the budget cannot be held with at most ``max_float`` layers in float.
    """
    started = time.perf_counter()
    steps: list[GuardStep] = []

    def measure(kept: Sequence[str]) -> Score:
        result = selection.score(subject.logits(kept, selection.images))
        steps.append(GuardStep(tuple(kept), result[0], result[1], len(selection.images)))
        return result

    full = measure([])
    if full[0] <= budget:
        return GuardResult([], full, steps, seconds=time.perf_counter() - started)
    report(f"{subject.name} changes the top-1 of {full[0]:.2f}% of {selection.scope} (budget {budget})")
    recovery = recover() if recover else None
    if recovery is not None:
        full = measure([])
        report(f"{subject.name} after {recovery.get('method', 'recovery')}: {full[0]:.2f}% disagreement")
        if full[0] <= budget:
            return GuardResult([], full, steps, [], time.perf_counter() - started, recovery=recovery)
    limit = min(max_float, len(layers := subject.layers()))
    if not limit:
        _refuse(subject, full[0], 0, budget, started, selection.scope)
    report(f"{subject.name} guard: ranking its layers")
    ranking = rank_layers(subject, layers, *selection.ranking(), report)
    ranked = [name for name, _ in ranking]
    most = measure(ranked[:limit])
    if most[0] > budget:
        _refuse(subject, most[0], limit, budget, started, selection.scope)
    kept, score = _fewest_in_float(measure, ranked, (limit, most), budget, lambda text: report(f"{subject.name} guard: {text}"))
    return GuardResult(ranked[:kept], score, steps, ranking, time.perf_counter() - started, recovery=recovery)


def _fewest_in_float(
    measure: Callable[[Sequence[str]], Score], ranked: list[str], holding: tuple[int, Score], budget: float, report: Callable[[str], None]
) -> tuple[int, Score]:
    """Bisection along the ranking: the fewest leading layers in float that hold the budget, and
    that model's score, given ``holding``: a count that holds it, and its score (none in float does not)."""
    limit, at_limit = holding
    outcome = {limit: at_limit}
    low, high = 0, limit  # low misses the budget, high holds it
    while high - low > 1:
        middle = (low + high) // 2
        outcome[middle] = measure(ranked[:middle])
        low, high = (low, middle) if outcome[middle][0] <= budget else (middle, high)
        report(f"{middle} layer(s) in float -> {outcome[middle][0]:.2f}% disagreement")
    return high, outcome[high]


def _refuse(subject: GuardSubject, disagreement: float, kept: int, budget: float, started: float, scope: str = "the selection images") -> None:
    raise QuantizationError(
        f"{subject.name} changes the top-1 of {disagreement:.2f}% of {scope} even with {kept} layer(s)"
        f" kept in float (budget {budget} points; {time.perf_counter() - started:.0f} s of guard); nothing was written."
        f" Raise --max-accuracy-drop or --max-float-layers, or use {subject.fallback}"
    )


QAT_FALLBACK = "more --qat-epochs, or post-training INT8 of the parent run (its guard can keep layers in float)"


def hold_prequantized(name: str, run: Callable[[np.ndarray], np.ndarray], selection: Selection, budget: float) -> GuardResult:
    """The guard for a model trained with its quantisation (QAT): it ships as it is, so it is only
    measured, and refused over the budget; nothing can go back to float, its weights were
    trained for INT8.

    Its criterion is the labelled top-1 drop against the float model on the selection images,
    not the label-free disagreement. Training moved its weights, so it may disagree with the
    float model on images where both are unsure, in both directions; on the demo, a QAT model
    within 0.3 points of float top-1 changed the top-1 of 7% of the images. QAT chose its epoch on
    these same validation images; the figures a variant reports come from the test split.

    Raises:
        QuantizationError: it loses more than ``budget`` top-1 points on the selection images.
    """
    started = time.perf_counter()
    logits = run(selection.images)
    disagreement, mse = distance(logits, selection.float_logits)
    labels = selection.labels
    if labels is None:
        raise QuantizationError("a QAT model's guard needs the selection images' labels; none were loaded")
    drop = 100.0 * float(np.mean(selection.float_logits.argmax(1) == labels) - np.mean(logits.argmax(1) == labels))
    steps = [GuardStep((), disagreement, mse, len(selection.images))]
    if drop > budget:
        raise QuantizationError(
            f"{name} loses {drop:.2f} top-1 points against the float model on {len(labels)} validation images (budget {budget});"
            f" nothing was written. Raise --max-accuracy-drop, or use {QAT_FALLBACK}"
        )
    return GuardResult([], (disagreement, mse), steps, seconds=time.perf_counter() - started, labelled_drop=drop)


def quantized_nodes(qdq_model) -> list[str]:
    """Names of the compute nodes of a QDQ model (a path or ModelProto) that read a dequantised
    tensor (what quantisation touched), in graph order."""
    graph = (qdq_model if isinstance(qdq_model, onnx.ModelProto) else onnx.load(str(qdq_model))).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return [
        node.name for node in graph.node if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dequantized for i in node.input)
    ]
