"""A normlab model as a backend-neutral layer graph, traced once with ``torch.fx``.

Every backend runs the same graph, so intermediate outputs share one key: the common layer name is the
module's qualified name for a module call (``blocks.0.branch.1``; ``name#2`` on its second call) and the
fx node name for a function call (``add_3``). The graph knows the layer kinds normlab models use: conv,
linear, batch/group/layer norm, ReLU, max/average/global pooling, flatten, residual add and scalar or
parameter multiply. Anything else, including a custom ``torch.autograd.Function`` (fx would silently trace
its forward and lose its backward), is refused with a message naming the layer.

``ModelGraph.capture`` is an ``fx.GraphModule`` that returns every recorded layer's output as a tuple, in
graph order: the torch backends run it eagerly or compiled and the ONNX backend exports it, so each
intermediate output is a graph output there (CRADLE's hidden-state comparison).
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from normlab.errors import NormlabError

SUPPORTED = (
    "Conv1d/2d/3d, Linear, BatchNorm1d/2d/3d, GroupNorm, LayerNorm, ReLU, MaxPool1d/2d, AvgPool1d/2d, "
    "AdaptiveAvgPool(1), Flatten, Identity, Dropout (eval), +, *, torch.flatten/mean/relu"
)


@dataclass(frozen=True)
class Node:
    """One layer: ``op`` on the outputs of ``inputs`` (common names); ``module`` names its parameters."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    module: str | None = None


@dataclass
class ModelGraph:
    """Nodes in execution order, the model's float32 state (numpy), and the capturing GraphModule."""

    nodes: list[Node]
    input: str
    output: str
    state: dict[str, np.ndarray]
    capture: fx.GraphModule
    recorded: list[str]

    def param(self, node: Node, name: str) -> np.ndarray | None:
        return self.state.get(f"{node.module}.{name}" if node.module else name)


class _Tracer(fx.Tracer):
    """fx tracer that remembers which module each traced call happens in (to name refused layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.path: list[str] = []

    def call_module(self, m, forward, args, kwargs):
        self.path.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.path.pop()


@contextlib.contextmanager
def _refuse_custom_autograd(tracer: _Tracer) -> Iterator[None]:
    # fx calls a custom Function's forward on proxies and records only its ops: the model would run
    # here with a different backward than the user's. Refuse instead, naming the module being traced.
    original = torch.autograd.Function.__dict__["apply"]

    def refuse(cls, *args, **kwargs):
        where = tracer.path[-1] if tracer.path and tracer.path[-1] else "the model's forward"
        raise NormlabError(
            f"cannot translate layer {where!r}: it calls the custom autograd function {cls.__name__}, "
            f"which other backends cannot reproduce; supported layers: {SUPPORTED}"
        )

    torch.autograd.Function.apply = classmethod(refuse)
    try:
        yield
    finally:
        torch.autograd.Function.apply = original


def trace_model(model: nn.Module) -> ModelGraph:
    """Trace ``model`` (a copy: in-place activations are turned off so captured outputs stay intact)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    tracer = _Tracer()
    try:
        with _refuse_custom_autograd(tracer):
            graph = tracer.trace(model)
    except NormlabError:
        raise
    except Exception as exc:
        raise NormlabError(
            f"cannot trace model {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
            "cross-backend validation needs a forward without data-dependent control flow"
        ) from exc
    gm = fx.GraphModule(model, graph)
    modules = dict(gm.named_modules())
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise NormlabError(f"model forward must take one tensor input, got {len(placeholders)} inputs")
    names: dict[fx.Node, str] = {}
    nodes: list[Node] = []
    calls: dict[str, int] = {}
    aux: dict[fx.Node, Any] = {}  # non-tensor values: x.size(), constants
    for n in graph.nodes:
        if n.op == "placeholder":
            names[n] = n.name
            continue
        if n.op == "output":
            out = n.args[0]
            if not isinstance(out, fx.Node) or out not in names:
                raise NormlabError("model forward must return one tensor")
            output = names[out]
            continue
        node = _translate(n, modules, names, aux, calls)
        if node is None:
            continue
        names[n] = node.name
        nodes.append(node)
    for n in graph.nodes:  # captured values keep their meaning only with functional relu
        if n.op == "call_function" and n.kwargs.get("inplace"):
            n.kwargs = {**n.kwargs, "inplace": False}
    recorded = [node.name for node in nodes if node.op != "const"]
    by_name = {v: k for k, v in names.items()}
    out_node = next(n for n in graph.nodes if n.op == "output")
    out_node.args = (tuple(by_name[name] for name in recorded),)
    graph.lint()
    capture = fx.GraphModule(model, graph)
    state = {k: v.detach().cpu().numpy().copy() for k, v in capture.state_dict().items()}
    return ModelGraph(nodes, placeholders[0].name, output, state, capture, recorded)


def _unsupported(name: str, what: str) -> NormlabError:
    return NormlabError(
        f"cannot translate layer {name!r} ({what}) for cross-backend validation; supported: {SUPPORTED}"
    )


def _pair(v, dims: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims


def _translate(n: fx.Node, modules, names, aux, calls) -> Node | None:
    def arg_names(args) -> tuple[str, ...]:
        return tuple(names[a] for a in args if isinstance(a, fx.Node) and a in names)

    if n.op == "get_attr":
        return Node(n.target, "const", (), module=None)
    if n.op == "call_module":
        calls[n.target] = calls.get(n.target, 0) + 1
        name = n.target if calls[n.target] == 1 else f"{n.target}#{calls[n.target]}"
        m = modules[n.target]
        op, attrs = _module_op(name, m)
        return Node(name, op, arg_names(n.args), attrs, module=n.target)
    name = n.name
    target = n.target
    if n.op == "call_method" and target == "size":
        aux[n] = "size"
        return None
    if n.op == "call_function" and target is operator.getitem and aux.get(n.args[0]) == "size":
        aux[n] = ("size", n.args[1])
        return None
    tensors = arg_names(n.args)
    if target in (operator.add, torch.add, operator.iadd) or (n.op == "call_method" and target == "add"):
        return _binary(name, "add", n, tensors)
    if target in (operator.mul, torch.mul, operator.imul) or (n.op == "call_method" and target == "mul"):
        return _binary(name, "mul", n, tensors)
    if target in (F.relu, torch.relu) or (n.op == "call_method" and target == "relu"):
        return Node(name, "relu", tensors[:1])
    if target is torch.flatten or (n.op == "call_method" and target == "flatten"):
        start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
        end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
        if end != -1:
            raise _unsupported(name, f"flatten with end_dim={end}")
        return Node(name, "flatten", tensors[:1], {"start_dim": start})
    if n.op == "call_method" and target in ("view", "reshape"):
        shape = n.args[1:]
        if len(shape) == 2 and aux.get(shape[0]) == ("size", 0) and shape[1] == -1:
            return Node(name, "flatten", tensors[:1], {"start_dim": 1})
        raise _unsupported(name, f"{target} to {shape}")
    if target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d):
        size = n.args[1] if len(n.args) > 1 else n.kwargs.get("output_size")
        if size not in (1, (1,), (1, 1)):
            raise _unsupported(name, f"adaptive_avg_pool with output size {size}")
        return Node(name, "gap", tensors[:1])
    if target is torch.mean or (n.op == "call_method" and target == "mean"):
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if dim is None:
            raise _unsupported(name, "mean over all axes")
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        keepdim = bool(n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False))
        return Node(name, "mean", tensors[:1], {"dims": dims, "keepdim": keepdim})
    what = getattr(target, "__name__", str(target))
    raise _unsupported(name, f"{n.op} {what}")


def _binary(name: str, op: str, n: fx.Node, tensors: tuple[str, ...]) -> Node:
    scalars = [a for a in n.args if isinstance(a, (int, float))]
    if len(tensors) == 2:
        return Node(name, op, tensors)
    if len(tensors) == 1 and len(scalars) == 1:
        return Node(name, op, tensors, {"scalar": float(scalars[0])})
    raise _unsupported(name, f"{op} of {n.args}")


def _module_op(name: str, m: nn.Module) -> tuple[str, dict[str, Any]]:
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise _unsupported(name, f"{type(m).__name__} with padding={m.padding!r}, mode {m.padding_mode}")
        dims = m.weight.ndim - 2
        return "conv", {
            "dims": dims,
            "stride": _pair(m.stride, dims),
            "padding": _pair(m.padding, dims),
            "dilation": _pair(m.dilation, dims),
            "groups": m.groups,
            "bias": m.bias is not None,
        }
    if isinstance(m, nn.Linear):
        return "linear", {"bias": m.bias is not None}
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if not m.track_running_stats:
            raise _unsupported(name, f"{type(m).__name__} without running statistics")
        return "bn", {"eps": m.eps, "momentum": m.momentum, "affine": m.affine}
    if isinstance(m, nn.GroupNorm):
        return "gn", {"groups": m.num_groups, "eps": m.eps, "affine": m.affine}
    if isinstance(m, nn.LayerNorm):
        return "layernorm", {
            "normalized_ndim": len(m.normalized_shape),
            "eps": m.eps,
            "affine": m.elementwise_affine,
            "bias": getattr(m, "bias", None) is not None,
        }
    if isinstance(m, nn.ReLU):
        return "relu", {}
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return "identity", {"dropout": getattr(m, "p", 0.0)}
    if isinstance(m, nn.Flatten):
        if m.end_dim != -1:
            raise _unsupported(name, f"Flatten with end_dim={m.end_dim}")
        return "flatten", {"start_dim": m.start_dim}
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)):
        dims = 1 if isinstance(m, (nn.MaxPool1d, nn.AvgPool1d)) else 2
        if m.ceil_mode or getattr(m, "dilation", 1) not in (1, (1, 1)):
            raise _unsupported(name, f"{type(m).__name__} with ceil_mode or dilation")
        if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d)) and (
            not m.count_include_pad or getattr(m, "divisor_override", None)
        ):
            raise _unsupported(name, f"{type(m).__name__} without count_include_pad")
        op = "maxpool" if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)) else "avgpool"
        return op, {
            "dims": dims,
            "kernel": _pair(m.kernel_size, dims),
            "stride": _pair(m.stride or m.kernel_size, dims),
            "padding": _pair(m.padding, dims),
        }
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        if m.output_size not in (1, (1,), (1, 1)):
            raise _unsupported(name, f"{type(m).__name__}({m.output_size})")
        return "gap", {}
    raise _unsupported(name, type(m).__name__)
