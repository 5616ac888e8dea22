"""Run a :class:`~normlab.crossval.graph.ModelGraph` with one backend's array operations.

The numpy oracle and the JAX/Flax backend share this loop and differ only in their ``ops`` object, which
provides one method per graph op (``conv``, ``bn``, ``add``, ...), ``to_native`` (channels-first float32
numpy -> the backend's arrays and layout) and ``to_common`` (back). Batch-norm running statistics live in
``stats`` (module name -> (running_mean, running_var, batches_seen)) and are updated in training mode.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from normlab.crossval.graph import ModelGraph
from normlab.errors import NormlabError

_PARAMS = ("weight", "bias")


def initial_stats(graph: ModelGraph) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Running statistics of every BN module, as the model holds them."""
    stats = {}
    for node in graph.nodes:
        if node.op == "bn" and node.module not in stats:
            tracked = graph.param(node, "num_batches_tracked")
            stats[node.module] = (
                graph.param(node, "running_mean"),
                graph.param(node, "running_var"),
                int(tracked) if tracked is not None else 0,
            )
    return stats


def interpret(graph: ModelGraph, x: np.ndarray, ops: Any, *, training: bool, stats: dict) -> dict[str, Any]:
    """Every recorded layer's output (backend-native arrays), keyed by common layer name."""
    values: dict[str, Any] = {graph.input: ops.to_native(x)}
    for node in graph.nodes:
        if node.op == "const":
            values[node.name] = ops.const(graph.state[node.name])
            continue
        args = [values[name] for name in node.inputs]
        params = {p: graph.param(node, p) for p in _PARAMS}
        if node.op == "bn":
            mean, var, seen = stats[node.module]
            y, mean, var = ops.bn(node, args[0], params, mean, var, seen + 1, training=training)
            if training:
                stats[node.module] = (mean, var, seen + 1)
        elif node.op == "identity":
            if training and node.attrs.get("dropout", 0.0) > 0:
                raise NormlabError(
                    f"layer {node.name!r} is Dropout(p={node.attrs['dropout']}) in training mode: its random "
                    "mask differs between backends; compare in eval mode"
                )
            y = args[0]
        else:
            y = getattr(ops, node.op)(node, *args, **params)
        values[node.name] = y
    return {name: values[name] for name in graph.recorded}
