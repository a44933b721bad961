"""Where a model's classifier sits, and the classifier of a multi-task model: one Linear layer
per task on the backbone's one feature vector.

A multi-task model is the architecture's own network with :class:`TaskHeads` where its
classifier was: it outputs every task's logits side by side (task after task, in the run's
order), so everything that runs a classifier (the frozen pass, parity, quantisers, engines) runs
it unchanged, and :func:`task_slices` says which columns belong to which task.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ModelError
from .models import BuiltModel
from .runtime.tasks import Tasks

__all__ = ["tasks_of", "TaskHeads", "swap_classifier", "one_linear_classifier", "install_task_heads", "task_slices"]


class TaskHeads(nn.Module):
    """One classifier per task, reading the same features; the logits side by side.

    Each head is a Linear layer, or a prototype head (:class:`~edgetransfer.prototype.PrototypeHead`,
    put in its place by the caller). With ``features_only`` set (during export) it returns its
    input: export then appends every head to the graph itself.
    """

    def __init__(self, width: int, sizes: list[int]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(width, size) for size in sizes)
        self.sizes = list(sizes)
        self.width = width
        self.features_only = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.features_only:
            return x
        return torch.cat([head(x) for head in self.heads], dim=1)

    def kinds(self) -> list[str]:
        """Each task's head: ``linear`` or ``prototype``."""
        return ["linear" if isinstance(head, nn.Linear) else "prototype" for head in self.heads]


def task_slices(sizes: list[int]) -> list[slice]:
    """The columns of each task's logits in the side-by-side output."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(start, start + size) for start, size in zip(starts, sizes, strict=True)]


def swap_classifier(built: BuiltModel, head: nn.Module) -> None:
    """Put ``head`` where the model's one classifier layer is (the caller checked there is one)."""
    for name, module in built.module.named_modules():
        if module is built.heads[0]:
            parent_name, _, attribute = name.rpartition(".")
            parent = built.module.get_submodule(parent_name) if parent_name else built.module
            if attribute.isdigit() and isinstance(parent, (nn.Sequential, nn.ModuleList)):
                parent[int(attribute)] = head
            else:
                setattr(parent, attribute, head)
            return
    raise ModelError(f"cannot find {built.arch.name}'s classifier among its layers")  # pragma: no cover - heads come from the module


def one_linear_classifier(built: BuiltModel, what: str) -> nn.Module:
    """The model's classifier, if it is one Linear layer (or a head already put in its place).

    Raises:
        ModelError: the model has two heads (distilled) or a classifier that is not a Linear
            layer reading a feature vector (``what`` names the head that needs one).
    """
    heads = built.heads
    if len(heads) != 1 or not isinstance(heads[0], nn.Linear):
        kind = "two classifier heads" if len(heads) != 1 else f"a {type(heads[0]).__name__} classifier"
        raise ModelError(
            f"{built.arch.name} has {kind}; {what} replaces one Linear classifier on a feature vector."
            " Choose another architecture (resnet18, timm:efficientnet_lite0, mobilenet_v3_small, …)"
        )
    return heads[0]


def install_task_heads(built: BuiltModel, sizes: list[int]) -> TaskHeads:
    """Replace ``built``'s classifier by one Linear head per task (initialised as the
    architecture's classifier would be: the first head takes the built classifier's rows).

    Raises:
        ModelError: as :func:`one_linear_classifier`.
    """
    old = one_linear_classifier(built, "a multi-task model")
    assert isinstance(old, nn.Linear)
    heads = TaskHeads(old.in_features, sizes)
    with torch.no_grad():
        weight, bias = old.weight, old.bias if old.bias is not None else torch.zeros(old.out_features)
        rows = 0
        for head in heads.heads:
            assert isinstance(head, nn.Linear)
            take = min(head.out_features, max(0, old.out_features - rows))
            head.weight[:take] = weight[rows : rows + take]
            head.bias[:take] = bias[rows : rows + take]
            rows += take
    swap_classifier(built, heads)
    built.num_classes = sum(sizes)
    return heads


def tasks_of(payload: dict) -> Tasks | None:
    """A multi-task checkpoint's tasks (``load_checkpoint`` checked them against its classes), else ``None``."""
    tasks = payload.get("tasks")
    return Tasks(tuple(tasks), tuple(tuple(labels) for labels in tasks.values())) if tasks else None
