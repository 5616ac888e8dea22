"""A normlab model as a backend-neutral layer graph, recorded by running it once on an example input.

Tracing by execution (a ``TorchFunctionMode`` plus module hooks) instead of ``torch.fx`` symbolic tracing:
normlab models branch on shapes (``MaxPool`` over dims of size >= 2, ``FlattenTo`` checks), which fx cannot
follow; running on a real tensor specializes the graph to the input shape, as ``torch.onnx.export`` does.

Every backend runs the same graph, so intermediate outputs share one key, the common layer name: the
module's qualified name for a module call (``stages.0.0.branch.1``; ``name#2`` on its second call) and
``<module>:<op>`` for a function call made inside a module's forward (``stages.0.0:add``; numbered when
repeated). Known layer kinds: conv, linear, batch/group/layer norm, ReLU, max/average/global pooling,
flatten/reshape, residual add and scalar or parameter multiply. Anything else, including a custom
``torch.autograd.Function`` (its backward would be lost), is refused with a message naming the layer.

:class:`GraphRunner` executes the graph with PyTorch and returns every recorded layer's output as a tuple:
the torch backends run it eagerly or compiled and the ONNX backend exports it, so each intermediate output
is a graph output there (CRADLE's hidden-state comparison). At trace time the runner's final output must
equal the model's own output exactly, so an operation the recorder missed cannot go unnoticed.
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
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from normlab.errors import NormlabError

SUPPORTED = (
    "Conv1d/2d/3d, Linear, BatchNorm1d/2d/3d, GroupNorm, LayerNorm, ReLU, MaxPool1d/2d, AvgPool1d/2d, "
    "AdaptiveAvgPool(1), Flatten, Identity, Dropout (eval), +, *, relu, flatten/view/reshape, mean, "
    "max_pool1d/2d"
)

_LEAVES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.ReLU,
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
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
    """Nodes in execution order, the model's float32 state (numpy), and the runner returning all outputs."""

    nodes: list[Node]
    input: str
    output: str
    state: dict[str, np.ndarray]
    capture: nn.Module
    recorded: list[str]
    input_shape: tuple[int, ...]

    def param(self, node: Node, name: str) -> np.ndarray | None:
        return self.state.get(f"{node.module}.{name}" if node.module else name)


def _unsupported(name: str, what: str) -> NormlabError:
    return NormlabError(
        f"cannot translate layer {name!r} ({what}) for cross-backend validation; supported: {SUPPORTED}"
    )


def _tuple(v, dims: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims


class _Recorder(TorchFunctionMode):
    """Records leaf-module calls (via hooks) and torch function calls made outside leaf modules."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        super().__init__()
        self.names: dict[int, str] = {id(x): "x"}
        self.keep: list[torch.Tensor] = [x]  # keep recorded tensors alive so their ids stay unique
        self.nodes: list[Node] = []
        self.path: list[str] = []
        self.leaf_depth = 0
        self.calls: dict[str, int] = {}
        self.consts: dict[str, torch.Tensor] = {}
        self.params = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
        self.busy = 0

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        # the recorder's own tensor calls (clone, .ndim) are bookkeeping, not the model's operations
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1

    def _unique(self, name: str) -> str:
        self.calls[name] = self.calls.get(name, 0) + 1
        return name if self.calls[name] == 1 else f"{name}#{self.calls[name]}"

    def _input(self, t: torch.Tensor) -> str:
        if id(t) in self.names:
            return self.names[id(t)]
        name = self.params.get(id(t)) or self._unique(f"{self.where()}:const")
        self.consts[name] = t.detach().clone()
        self.nodes.append(Node(name, "const", ()))
        self.names[id(t)] = name
        self.keep.append(t)
        return name

    def where(self) -> str:
        return self.path[-1] if self.path and self.path[-1] else "model"

    def add(self, node: Node, out: torch.Tensor) -> None:
        self.nodes.append(node)
        self.names[id(out)] = node.name
        self.keep.append(out)

    def module_call(self, path: str, module: nn.Module, args, out) -> None:
        if not isinstance(out, torch.Tensor) or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise _unsupported(
                path, f"{type(module).__name__} with {len(args)} inputs or a non-tensor output"
            )
        name = self._unique(path)
        op, attrs = _module_op(name, module)
        self.add(Node(name, op, (self._input(args[0]),), attrs, module=path), out)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.leaf_depth or self.busy or not isinstance(out, torch.Tensor):
            return out
        with self.quiet():
            op, tensors, attrs = _function_op(func, args, kwargs, out, lambda: self.where())
            if op == "identity" and tensors and tensors[0] is out:
                return out
            name = self._unique(f"{self.where()}:{op}")
            self.add(Node(name, op, tuple(self._input(t) for t in tensors), attrs), out)
        return out


def _scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _function_op(func, args, kwargs, out, where) -> tuple[str, list[torch.Tensor], dict[str, Any]]:
    """Translate one torch function call into (op, tensor inputs, attrs)."""
    name = getattr(func, "__name__", str(func))
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if name in (
        "add",
        "__add__",
        "__radd__",
        "__iadd__",
        "add_",
        "mul",
        "__mul__",
        "__rmul__",
        "__imul__",
        "mul_",
    ):
        op = "add" if "add" in name else "mul"
        scalars = [a for a in args if _scalar(a)]
        if len(tensors) == 2 and kwargs.get("alpha", 1) == 1:
            return op, tensors, {}
        if len(tensors) == 1 and len(scalars) == 1:
            return op, tensors, {"scalar": float(scalars[0])}
    if name in ("relu", "relu_"):
        return "relu", tensors[:1], {}
    if name in ("flatten", "view", "reshape") and tensors and out.shape[:1] == tensors[0].shape[:1]:
        return "reshape", tensors[:1], {"shape": tuple(out.shape[1:])}
    if name in ("contiguous", "clone"):
        return "identity", tensors[:1], {}
    if name in ("adaptive_avg_pool1d", "adaptive_avg_pool2d") and all(s == 1 for s in out.shape[2:]):
        return "gap", tensors[:1], {}
    if name == "mean" and tensors:
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if dim is not None:
            dims = (dim,) if isinstance(dim, int) else tuple(dim)
            keepdim = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
            return "mean", tensors[:1], {"dims": dims, "keepdim": keepdim}
    if name in ("max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d"):
        return _pool_function(name, args, kwargs, where)
    raise _unsupported(where(), f"function {name}")


def _pool_function(name, args, kwargs, where):
    x = args[0]
    dims = x.ndim - 2
    spec = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"]
    if name.startswith("max"):
        spec = ["kernel_size", "stride", "padding", "dilation", "ceil_mode"]
    values = dict(zip(spec, args[1:], strict=False)) | kwargs
    kernel = _tuple(values["kernel_size"], dims)
    stride = _tuple(values.get("stride") or kernel, dims)
    if values.get("ceil_mode") or values.get("dilation", 1) not in (1, (1,), (1, 1), [1, 1]):
        raise _unsupported(where(), f"{name} with ceil_mode or dilation")
    if name.startswith("avg") and not values.get("count_include_pad", True):
        raise _unsupported(where(), f"{name} without count_include_pad")
    attrs = {
        "dims": dims,
        "kernel": kernel,
        "stride": stride,
        "padding": _tuple(values.get("padding", 0), dims),
    }
    return ("maxpool" if name.startswith("max") else "avgpool"), [x], attrs


def _module_op(name: str, m: nn.Module) -> tuple[str, dict[str, Any]]:
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise _unsupported(name, f"{type(m).__name__} with padding={m.padding!r}, mode {m.padding_mode}")
        dims = m.weight.ndim - 2
        return "conv", {
            "dims": dims,
            "stride": _tuple(m.stride, dims),
            "padding": _tuple(m.padding, dims),
            "dilation": _tuple(m.dilation, dims),
            "groups": m.groups,
        }
    if isinstance(m, nn.Linear):
        return "linear", {}
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if not m.track_running_stats:
            raise _unsupported(name, f"{type(m).__name__} without running statistics")
        return "bn", {"eps": m.eps, "momentum": m.momentum, "affine": m.affine}
    if isinstance(m, nn.GroupNorm):
        return "gn", {"groups": m.num_groups, "eps": m.eps, "affine": m.affine}
    if isinstance(m, nn.LayerNorm):
        return "layernorm", {"normalized_ndim": len(m.normalized_shape), "eps": m.eps}
    if isinstance(m, nn.ReLU):
        return "relu", {}
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return "identity", {"dropout": getattr(m, "p", 0.0)}
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            raise _unsupported(name, f"Flatten({m.start_dim}, {m.end_dim})")
        return "flatten", {}
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
            "kernel": _tuple(m.kernel_size, dims),
            "stride": _tuple(m.stride or m.kernel_size, dims),
            "padding": _tuple(m.padding, dims),
        }
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        if m.output_size not in (1, (1,), (1, 1)):
            raise _unsupported(name, f"{type(m).__name__}({m.output_size})")
        return "gap", {}
    raise _unsupported(name, type(m).__name__)


def _is_leaf(m: nn.Module) -> bool:
    """A known PyTorch layer whose forward is PyTorch's own (a subclass overriding forward, such as a
    weight-standardized conv, is traced through instead, so its extra computation is not lost)."""
    return any(isinstance(m, cls) and type(m).forward is cls.forward for cls in _LEAVES)


@contextlib.contextmanager
def _hooks(model: nn.Module, rec: _Recorder) -> Iterator[None]:
    handles = []
    for path, m in model.named_modules():
        leaf = _is_leaf(m)

        def pre(module, args, path=path, leaf=leaf):
            rec.path.append(path)
            if leaf:
                rec.leaf_depth += 1

        def post(module, args, out, path=path, leaf=leaf):
            rec.path.pop()
            if leaf:
                rec.leaf_depth -= 1
                if rec.leaf_depth == 0:
                    with rec.quiet():
                        rec.module_call(path, module, args, out)

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    original = torch.autograd.Function.__dict__["apply"]

    def refuse(cls, *args, **kwargs):
        raise NormlabError(
            f"cannot translate layer {rec.where()!r}: it calls the custom autograd function {cls.__name__}, "
            f"which other backends cannot reproduce; supported layers: {SUPPORTED}"
        )

    # The user's backward lives only in the Function: refuse rather than record its forward's ops.
    torch.autograd.Function.apply = classmethod(refuse)
    try:
        yield
    finally:
        torch.autograd.Function.apply = original
        for h in handles:
            h.remove()


class GraphRunner(nn.Module):
    """Runs the recorded graph with PyTorch and returns every recorded layer's output, in graph order."""

    def __init__(self, model: nn.Module, nodes: list[Node], consts: dict[str, torch.Tensor], input_name: str):
        super().__init__()
        self.model = model
        self.nodes = nodes
        self.input_name = input_name
        self.recorded = [n.name for n in nodes if n.op != "const"]
        self.const_names = {}
        for i, (name, value) in enumerate(consts.items()):
            if name not in dict(model.named_parameters()) and name not in dict(model.named_buffers()):
                self.register_buffer(f"const{i}", value)
                self.const_names[name] = f"const{i}"

    def _const(self, name: str) -> torch.Tensor:
        if name in self.const_names:
            return getattr(self, self.const_names[name])
        module, _, attr = name.rpartition(".")
        return getattr(self.model.get_submodule(module) if module else self.model, attr)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = {self.input_name: x}
        for node in self.nodes:
            if node.op == "const":
                values[node.name] = self._const(node.name)
                continue
            args = [values[i] for i in node.inputs]
            if node.module is not None:
                values[node.name] = self.model.get_submodule(node.module)(*args)
            else:
                values[node.name] = _TORCH_OPS[node.op](node, *args)
        return tuple(values[name] for name in self.recorded)


def _binary(fn):
    def run(node, x, y=None):
        return fn(x, node.attrs["scalar"] if y is None else y)

    return run


def _pool(node, x):
    a = node.attrs
    if node.op == "maxpool":
        fn = F.max_pool1d if a["dims"] == 1 else F.max_pool2d
        return fn(x, a["kernel"], a["stride"], a["padding"])
    fn = F.avg_pool1d if a["dims"] == 1 else F.avg_pool2d
    return fn(x, a["kernel"], a["stride"], a["padding"])


_TORCH_OPS = {
    "add": _binary(operator.add),
    "mul": _binary(operator.mul),
    "relu": lambda node, x: torch.relu(x),
    "reshape": lambda node, x: x.reshape(x.shape[0], *node.attrs["shape"]),
    "identity": lambda node, x: x,
    "gap": lambda node, x: (F.adaptive_avg_pool1d if x.ndim == 3 else F.adaptive_avg_pool2d)(x, 1),
    "mean": lambda node, x: x.mean(dim=node.attrs["dims"], keepdim=node.attrs["keepdim"]),
    "maxpool": _pool,
    "avgpool": _pool,
}


def trace_model(model: nn.Module, example: torch.Tensor | np.ndarray) -> ModelGraph:
    """Record ``model``'s layer graph by running a copy of it (eval mode, no grad) on ``example``.

    In-place activations are turned off in the copy so that recorded outputs stay intact.
    """
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    x = torch.as_tensor(np.asarray(example, np.float32)).clone()
    rec = _Recorder(model, x)
    try:
        with torch.no_grad(), _hooks(model, rec), rec:
            out = model(x)
    except NormlabError:
        raise
    except Exception as exc:
        raise NormlabError(
            f"cannot run model {type(model).__name__} on an input of shape {list(x.shape)} "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(out, torch.Tensor) or id(out) not in rec.names:
        raise NormlabError(f"model {type(model).__name__} must return one tensor computed from its input")
    nodes = rec.nodes
    runner = GraphRunner(model, nodes, rec.consts, "x")
    with torch.no_grad():
        replay = runner(x)[runner.recorded.index(rec.names[id(out)])]
    if not torch.allclose(replay, out, rtol=1e-5, atol=1e-6):
        raise NormlabError(
            f"the recorded graph of {type(model).__name__} does not reproduce its output (max difference "
            f"{(replay - out).abs().max().item():.3g}): the forward uses an operation the recorder cannot see"
        )
    state = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    state.update({k: v.cpu().numpy().copy() for k, v in rec.consts.items()})
    return ModelGraph(nodes, "x", rec.names[id(out)], state, runner, runner.recorded, tuple(x.shape[1:]))
