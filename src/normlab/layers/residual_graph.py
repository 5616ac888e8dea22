"""Residual structure read from a model's graph (``torch.fx``), not from its attribute names.

A *residual join* is an addition ``out = branch + shortcut`` whose two operands both derive from one earlier
tensor, the *split* (the nearest node both depend on). Found in the traced graph: ``a + b`` and
``out += b`` (fx records both as ``operator.add``), ``torch.add`` and ``Tensor.add`` / ``add_``. Of the two
operands the *shortcut* is the split itself (identity) or the path with fewer conv/linear layers (a
projection); the *branch* is the other one. Per join:

- ``post_activation``: the sum's only user is an activation (``relu(out + shortcut)``: torchvision's
  ``BasicBlock``, the common CIFAR files); the block output is that activation;
- ``preact``: the norm / activation nodes between the block input and the branch's first conv (a
  pre-activation block: ``relu(bn(x))``); ``kind`` is ``"post-activation"``, ``"pre-activation"`` or
  ``"plain"`` (the branch starts with a conv on the un-activated sum: an inverted residual);
- ``block_input``: where the block starts (the split, or before its pre-activation chain).

Tracing keeps norms and every module without submodules as one node (their input checks are Python
control flow fx cannot follow; the analysis only needs how leaf modules connect). A join's ``name`` is the
deepest module that holds all of its modules (``layer1.0``), else the add node's name. Used by
:func:`normlab.layers.to_normalizer_free` and the residual probes (:mod:`normlab.probes._blocks`).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from normlab.errors import NormlabError
from normlab.layers.kinds import is_norm

ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.SELU,
                      nn.Hardswish, nn.Mish)
_ACT_FUNCTIONS = {F.relu, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, F.selu, F.hardswish, F.mish,
                  torch.relu, torch.sigmoid, torch.tanh, torch.selu, F.sigmoid, F.tanh}
_ACT_METHODS = {"relu", "relu_", "sigmoid", "tanh", "sigmoid_", "tanh_"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_NORM_FUNCTIONS = {F.batch_norm, F.group_norm, F.layer_norm, F.instance_norm, torch.batch_norm,
                   torch.group_norm, torch.layer_norm, torch.instance_norm}
WEIGHT_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_WEIGHT_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv1d, torch.conv2d, torch.conv3d}
# Shape-only or per-channel-neutral steps a signal passes through between two layers.
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten, nn.AvgPool1d, nn.AvgPool2d, nn.MaxPool1d,
                 nn.MaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_PASS_METHODS = {"view", "reshape", "flatten", "contiguous", "mean"}
_PASS_FUNCTIONS = {torch.flatten, F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, F.dropout}


class _Tracer(fx.Tracer):
    """Norms and childless modules stay single nodes; remembers the module being traced, so an untraceable
    model is named down to the module whose ``forward`` failed."""

    def __init__(self, leaf_types: tuple[type[nn.Module], ...] = ()) -> None:
        super().__init__()
        self.failed_in: str | None = None
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (is_norm(m) or isinstance(m, self.leaf_types) or not any(m.children())
                or super().is_leaf_module(m, module_qualified_name))

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module: the first to see the error
                self.failed_in = self.path_of_module(m)
            raise


def trace(model: nn.Module, leaf_types: tuple[type[nn.Module], ...] = ()) -> fx.GraphModule:
    """``model`` traced by torch.fx (norms and childless modules as leaves); the GraphModule shares the
    model's submodules (same objects, same parameters).

    Raises:
        NormlabError: fx cannot trace it (tensor-dependent control flow, ...), naming the innermost module.
    """
    tracer = _Tracer(leaf_types)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises many types for untraceable code
        where = tracer.failed_in or "<root>"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "control flow" in reason:
            reason = "its forward branches on a tensor's value (tensor-dependent control flow)"
        raise NormlabError(
            f"cannot read the graph of {type(model).__name__}: module {where} "
            f"({type(model.get_submodule(where)).__name__ if where != '<root>' else type(model).__name__}) "
            f"cannot be traced by torch.fx: {reason}"
        ) from None
    return fx.GraphModule(model, graph, type(model).__name__)


@dataclasses.dataclass
class ResidualJoin:
    """One residual join ``output = [act](branch_out + shortcut_out)`` (module docstring)."""

    name: str
    add: fx.Node
    split: fx.Node
    block_input: fx.Node
    branch_out: fx.Node
    shortcut_out: fx.Node
    output: fx.Node
    branch_nodes: list[fx.Node]
    shortcut_nodes: list[fx.Node]
    preact_nodes: list[fx.Node]
    post_activation: bool
    projects: bool

    @property
    def kind(self) -> str:
        if self.post_activation:
            return "post-activation"
        return "pre-activation" if self.preact_nodes else "plain"

    def nodes(self) -> list[fx.Node]:
        return [*self.preact_nodes, *self.branch_nodes, *self.shortcut_nodes]


@dataclasses.dataclass
class ResidualGraph:
    """The traced model and its residual joins in forward order; ``stem`` is the first block's input."""

    graph_module: fx.GraphModule
    joins: list[ResidualJoin]

    @property
    def stem(self) -> fx.Node | None:
        return self.joins[0].block_input if self.joins else None

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.graph_module.get_submodule(node.target) if node.op == "call_module" else None

    def capture(self, x: torch.Tensor, nodes: dict[str, fx.Node]) -> dict[str, torch.Tensor]:
        """Run the model on ``x`` and return the value of each named node (detached clones)."""
        wanted: dict[fx.Node, list[str]] = {}
        for key, node in nodes.items():
            wanted.setdefault(node, []).append(key)
        out: dict[str, torch.Tensor] = {}

        class _Capture(fx.Interpreter):
            def run_node(self, n):
                value = super().run_node(n)
                if n in wanted and isinstance(value, torch.Tensor):
                    kept = value.detach().clone()  # clone: a later in-place op may change it
                    out.update({key: kept for key in wanted[n]})
                return value

        _Capture(self.graph_module).run(x)
        return out


def is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in _ACT_FUNCTIONS
    return node.op == "call_method" and node.target in _ACT_METHODS


def is_norm_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return is_norm(gm.get_submodule(node.target))
    return node.op == "call_function" and node.target in _NORM_FUNCTIONS


def is_weight_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), WEIGHT_MODULES)
    return node.op == "call_function" and node.target in _WEIGHT_FUNCTIONS


def is_pass_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A step that leaves the signal's per-channel statistics alone or only pools / reshapes it."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return isinstance(m, _PASS_MODULES) or (isinstance(m, nn.Sequential) and len(m) == 0)
    if node.op == "call_function":
        return node.target in _PASS_FUNCTIONS
    return node.op == "call_method" and node.target in _PASS_METHODS


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return True
    return node.op == "call_method" and node.target in ("add", "add_")


def analyze(model: nn.Module, leaf_types: tuple[type[nn.Module], ...] = ()) -> ResidualGraph:
    """Trace ``model`` (:func:`trace`) and find its residual joins (module docstring)."""
    gm = trace(model, leaf_types)
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    ancestors: list[int] = []  # bit i set: node i is an ancestor
    for n in nodes:
        mask = 0
        for a in n.all_input_nodes:
            mask |= ancestors[index[a]] | (1 << index[a])
        ancestors.append(mask)
    joins = []
    for n in nodes:
        operands = [a for a in n.args[:2] if isinstance(a, fx.Node)] if _is_add(n) else []
        if len(operands) != 2 or n.kwargs.get("alpha", 1) != 1:
            continue
        join = _join(gm, n, operands, nodes, index, ancestors)
        if join is not None:
            joins.append(join)
    return ResidualGraph(gm, joins)


def _join(gm, add, operands, nodes, index, ancestors) -> ResidualJoin | None:
    a, b = operands
    self_a = ancestors[index[a]] | (1 << index[a])
    self_b = ancestors[index[b]] | (1 << index[b])
    common = self_a & self_b
    if a is b or not common or all(nodes[i].op == "get_attr" for i in _bits(common)):
        return None  # x + x, or x + a learned tensor: not a residual join
    split = nodes[common.bit_length() - 1]
    s = index[split]

    def path(mask: int) -> list[fx.Node]:
        return [nodes[i] for i in _bits(mask) if i > s and (ancestors[i] >> s) & 1]

    path_a, path_b = path(self_a), path(self_b)
    weights_a = sum(is_weight_node(gm, x) for x in path_a)
    weights_b = sum(is_weight_node(gm, x) for x in path_b)
    if b is split or (a is not split and (weights_a, len(path_a)) >= (weights_b, len(path_b))):
        branch_out, shortcut_out, branch, shortcut = a, b, path_a, path_b
    else:
        branch_out, shortcut_out, branch, shortcut = b, a, path_b, path_a
    users = list(add.users)
    post = len(users) == 1 and is_activation(gm, users[0])
    preact: list[fx.Node] = []
    block_input = split
    if not post:
        chain, behind = split, []  # walk back over a pre-activation (norm / activation) before the split
        while (is_norm_node(gm, chain) or is_activation(gm, chain)) and chain.all_input_nodes:
            behind.insert(0, chain)
            chain = chain.all_input_nodes[0]
        if behind and _is_add(chain):  # only when it starts at the previous join (not in a stem)
            preact, block_input = behind, chain
        for x in branch:  # and forward over the branch's leading norm / activation
            if not (is_norm_node(gm, x) or is_activation(gm, x)):
                break
            preact.append(x)
        branch = [x for x in branch if x not in preact]
    return ResidualJoin(
        name=owner(add), add=add, split=split, block_input=block_input,
        branch_out=branch_out, shortcut_out=shortcut_out, output=users[0] if post else add,
        branch_nodes=branch, shortcut_nodes=shortcut, preact_nodes=preact, post_activation=post,
        projects=any(is_weight_node(gm, x) for x in shortcut),
    )


def _bits(mask: int) -> Iterable[int]:
    i = 0
    while mask:
        if mask & 1:
            yield i
        mask >>= 1
        i += 1


def owner(node: fx.Node) -> str:
    """The module whose ``forward`` made the node (fx's ``nn_module_stack``), else the node's name."""
    return module_of(node) or node.name


def module_of(node: fx.Node) -> str | None:
    """The qualified name of the module whose ``forward`` made ``node``; None for the root's forward."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else None
