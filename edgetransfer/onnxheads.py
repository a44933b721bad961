"""Classifier heads written as plain ONNX after the backbone's features (the graph output
``pooled``): a prototype head, and the heads of a multi-task model that has a prototype task.

A prototype head is appended rather than exported so that its nodes carry names that INT8
quantisation leaves in float (``PROTOTYPE_NODE``), its prototype matrix is one named initializer
that enrolment rewrites without onnx or torch, and its class dimension is named, not fixed.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from .prototype import PrototypeHead
from .runtime.enrolment import features_of, prototypes_of
from .runtime.tasks import Tasks

__all__ = ["POOLED", "PROTOTYPE_NODE", "append_prototype_head", "append_task_heads"]

POOLED, PROTOTYPE_NODE = "pooled", "edgetransfer.prototype"  # the heads' input, and the prototype nodes' name prefix
TASK_NODE = "edgetransfer.task"  # the name prefix of a multi-task model's Linear heads and their Concat


def _l2_nodes(prefix: str, source: str, output: str, axes: str, eps: str) -> list:
    """ONNX nodes for ``output = source / sqrt(max(sum(source * source, axes), eps))``, named under ``prefix``."""
    inner = prefix.replace("/", ".")
    return [
        helper.make_node("Mul", [source, source], [f"{inner}.squares"], name=f"{prefix}/square"),
        helper.make_node("ReduceSum", [f"{inner}.squares", axes], [f"{inner}.sum"], name=f"{prefix}/sum", keepdims=1),
        helper.make_node("Max", [f"{inner}.sum", eps], [f"{inner}.safe"], name=f"{prefix}/max"),
        helper.make_node("Sqrt", [f"{inner}.safe"], [f"{inner}.norm"], name=f"{prefix}/sqrt"),
        helper.make_node("Div", [source, f"{inner}.norm"], [output], name=f"{prefix}/divide"),
    ]


def _prototype_nodes(graph, head: PrototypeHead, logits: str, task: str | None = None) -> list:
    """A prototype head reading ``POOLED`` and writing ``logits`` and :func:`features_of` ``task``,
    as :class:`~edgetransfer.prototype.PrototypeHead` computes it::

        centred  = l2(x - center)                       l2(v) = v / sqrt(max(sum(v * v), 1e-24))
        features = l2(centred @ whitening)              (an output; no MatMul when not whitened)
        logits   = Gemm(features, prototypes, alpha=scale, transB=1)

    Nodes are named under ``PROTOTYPE_NODE`` (``/task`` for a task's), its tensors likewise, and
    the prototype matrix is the initializer :func:`prototypes_of` ``task``.
    """
    nodes_name = PROTOTYPE_NODE + (f"/{task}" if task else "")
    name = PROTOTYPE_NODE + (f".{task}" if task else "")
    features = features_of(task)

    def constant(array: np.ndarray, suffix: str) -> str:
        graph.initializer.append(numpy_helper.from_array(array, f"{name}.{suffix}"))
        return f"{name}.{suffix}"

    axes, eps = constant(np.array([1], dtype=np.int64), "axes"), constant(np.array(1e-24, dtype=np.float32), "eps")

    def l2(source: str, output: str, step: str) -> list:
        return _l2_nodes(f"{nodes_name}/{step}", source, output, axes, eps)

    center = constant(head.center.detach().cpu().numpy().astype(np.float32), "center")
    nodes = [helper.make_node("Sub", [POOLED, center], [f"{name}.shifted"], name=f"{nodes_name}/centre")]
    if head.whitens:
        whitening = constant(head.whitening.detach().cpu().numpy().astype(np.float32), "whitening")
        nodes += l2(f"{name}.shifted", f"{name}.centred", "l2")
        nodes.append(helper.make_node("MatMul", [f"{name}.centred", whitening], [f"{name}.whitened"], name=f"{nodes_name}/whiten"))
        nodes += l2(f"{name}.whitened", features, "l2_whitened")
    else:
        nodes += l2(f"{name}.shifted", features, "l2")
    matrix = prototypes_of(task)
    graph.initializer.append(numpy_helper.from_array(head.prototypes.detach().cpu().numpy().astype(np.float32), matrix))
    nodes.append(helper.make_node("Gemm", [features, matrix], [logits], name=f"{nodes_name}/gemm", alpha=float(head.scale), transB=1))
    return nodes


def _pooled(graph) -> str | int:
    """Take the graph's one output (``POOLED``) off: its batch dimension."""
    batch = graph.output.pop().type.tensor_type.shape.dim[0]
    return batch.dim_param or batch.dim_value


def append_prototype_head(model, head: PrototypeHead, output: str) -> None:
    """A prototype head after the classifier's input: outputs ``output`` (the logits, their class
    dimension named ``classes``) and ``features``."""
    graph = model.graph
    batch = _pooled(graph)
    graph.node.extend(_prototype_nodes(graph, head, output))
    graph.output.extend(
        [
            helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, "classes"]),
            helper.make_tensor_value_info(features_of(None), TensorProto.FLOAT, [batch, head.prototypes.shape[1]]),
        ]
    )


def append_task_heads(model, heads: nn.ModuleList, tasks: Tasks, output: str) -> None:
    """Every task's head after the classifier's input: a Linear head as one ``Gemm``, a prototype
    head as :func:`_prototype_nodes`. Outputs ``output`` (every task's logits side by side, one
    ``Concat``), then each task's logits, then each prototype task's features. A prototype task's
    class dimension is named (``classes_TASK``), so enrolment can change it."""
    graph = model.graph
    batch = _pooled(graph)
    outputs, features, widths = tasks.outputs, [], list[str | int]()
    for task, head, logits, labels in zip(tasks.names, heads, outputs, tasks.labels, strict=True):
        if isinstance(head, PrototypeHead):
            graph.node.extend(_prototype_nodes(graph, head, logits, task))
            features.append(helper.make_tensor_value_info(features_of(task), TensorProto.FLOAT, [batch, head.prototypes.shape[1]]))
            widths.append(f"classes_{task}")
            continue
        assert isinstance(head, nn.Linear), "install_task_heads makes Linear heads"
        weight, bias = f"{TASK_NODE}.{task}.weight", f"{TASK_NODE}.{task}.bias"
        graph.initializer.append(numpy_helper.from_array(head.weight.detach().cpu().numpy().astype(np.float32), weight))
        graph.initializer.append(numpy_helper.from_array(head.bias.detach().cpu().numpy().astype(np.float32), bias))
        graph.node.append(helper.make_node("Gemm", [POOLED, weight, bias], [logits], name=f"{TASK_NODE}/{task}/gemm", transB=1))
        widths.append(len(labels))
    graph.node.append(helper.make_node("Concat", outputs, [output], name=f"{TASK_NODE}/concat", axis=1))
    graph.output.extend(
        [
            helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, "classes"]),
            *(helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, size]) for name, size in zip(outputs, widths, strict=True)),
            *features,
        ]
    )
