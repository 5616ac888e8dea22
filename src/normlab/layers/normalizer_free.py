"""``to_normalizer_free(model)``: make a model of torch.nn layers normalizer-free, after Brock, De & Smith
2021a (NF-ResNets, arXiv 2101.08692, Sec. 3-4) and Brock et al. 2021b (NFNets, arXiv 2102.06171, Sec. 3-4);
science.md section 4.

**Residual networks of the common layouts** (torchvision ``BasicBlock`` / ``Bottleneck``: ``conv1``, ``bn1``,
``conv2``, ``bn2`` [, ``conv3``, ``bn3``], ``downsample``; timm's ResNet blocks have the same names), when
every residual join of the model's graph lies in such a block, become NF-ResNets: every block is restructured
to a pre-activation NF block::

    h   = act(x) * beta,                beta = 1 / sqrt(expected_var)
    out = shortcut + alpha * g * branch(h),   g a learnable scalar, init ``skip_gain_init`` (0: SkipInit)
    shortcut = x                        (no ``downsample``)
             = WSconv1x1_stride(h)      (the block's ``downsample`` conv, its norm removed)
    branch   = WSconv1 -> act -> WSconv2 [-> act -> WSconv3]   (the block's own convs, norms removed)

with ``expected_var = 1`` at the first block, ``+= alpha^2`` after each block and reset to ``1 + alpha^2``
after a block with a projection shortcut (which re-normalizes the signal), as timm's ``nfnet.py`` and
``normlab.models.nf_resnet``. Every conv after an activation is a Scaled WS conv (``ScaledStdConv2d``, with a
bias, zero where it had none) with the activation's gain gamma folded in; the first conv of the model sees the
data and gets gamma 1. Every norm layer becomes ``nn.Identity``. At the top level of a torchvision / timm
ResNet the stem's activation (``relu`` / ``act1``) is dropped (the first block's pre-activation applies it, as
in timm's NF stems) and one activation is put before ``avgpool`` / ``global_pool`` (the pre-activation form
ends un-activated; a model that pools in ``forward`` has no such module and keeps its last block's output
un-activated). The classifier (``classifier`` or ``fc`` or the last ``nn.Linear``) is zero-initialized, as in
the NF paper, and stays a plain linear layer; train with AGC (``agc_clip``), which skips it.

**Every other model** is converted in place from its graph (:mod:`normlab.layers.residual_graph`: each
residual join ``branch + shortcut`` that torch.fx traces, in-place ``out += self.shortcut(x)`` included,
whatever the modules are called), keeping the user's classes and attribute names:

- every residual branch gets a learnable skip gain g (``NFSkipGain``, init ``skip_gain_init``, 0: SkipInit)
  at its end: the branch's last module, when a norm, is replaced by the gain; any other last module m
  becomes ``nn.Sequential(m, gain)``;
- a *pre-activation* join (``relu(bn(x))`` starts the branch) and a *plain* one (an inverted residual whose
  branch starts with a conv on the sum) follow the NF schedule: ``out = shortcut + alpha * g * branch``,
  and the first conv on each path of the block (branch and projection) sees ``beta * input`` with
  ``beta = 1 / sqrt(expected_var)`` (folded into the conv's gamma: exact, the conv is linear), the variance
  reset to 1 at the first block and after a conv between blocks, ``+= alpha^2`` per block, ``1 + alpha^2``
  after a projection;
- a *post-activation* join (``relu(out + shortcut)``: the common CIFAR files) is gated as SkipInit, not
  restructured: ``out = act(shortcut + alpha * g * branch)``, no beta (the activation after the sum keeps no
  variance schedule); with g = 0 each block starts as ``act(shortcut)``;
- every ``nn.Conv1d/2d`` and ``nn.Linear`` but the classifier becomes its Scaled WS version with a bias
  (zero when it had none: BN's shift is gone, NFNets' convs carry one) and the activation's gamma when its
  input comes from an activation (through pooling / reshapes), else gamma 1; every norm is removed.

What it cannot convert it refuses in one line naming the module: a forward fx cannot trace
(tensor-dependent control flow), a norm or conv called as a function (``F.batch_norm``), a branch that ends
in a function call or a module called twice, nested residual joins, a layer with no Scaled WS version
(``Conv3d``). After converting, the model is traced again: a norm left or a branch without a skip gain is an
error, never a silent half conversion. A model without residual joins (an ``nn.Sequential`` CNN) gets the
last item only.

NOTE: a torchvision stem's 3x3 max-pool (ImageNet layout) changes the stem output's variance on white-noise
input (max of 9 Gaussians: variance ~0.37, mean ~1.5), so the analytic schedule then holds from the first
transition on; timm's NF-ResNets keep the pool too. The CIFAR layout (``maxpool = nn.Identity()``) keeps it
from the first block.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch import nn

from normlab.errors import NormlabError
from normlab.layers.activation_gamma import activation_gamma
from normlab.layers.kinds import is_norm
from normlab.layers.residual_graph import (
    ResidualGraph,
    ResidualJoin,
    analyze,
    is_activation,
    is_norm_node,
    is_pass_node,
    is_weight_node,
    module_of,
)
from normlab.layers.skipinit import SkipInit
from normlab.layers.std_conv import ScaledStdConv1d, ScaledStdConv2d, ScaledStdLinear

_ACTIVATIONS: dict[type[nn.Module], str] = {
    nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu", nn.ELU: "elu", nn.LeakyReLU: "leaky_relu",
    nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SELU: "selu",
}
_ACTIVATION_MODULES = {name: cls for cls, name in _ACTIVATIONS.items()}
_ACTIVATIONS[nn.ReLU6] = "relu"  # relu's gamma: ReLU6 differs on N(0, 1) input only where z > 6 (p ~ 1e-9)


class NFPreAct(nn.Module):
    """``act(x) * beta``: the block input brought to unit variance (beta = 1 / sqrt(expected variance))."""

    def __init__(self, act: nn.Module, beta: float) -> None:
        super().__init__()
        self.act = act
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) * self.beta

    def extra_repr(self) -> str:
        return f"beta={self.beta:.6g}"


class NFSkipGain(nn.Module):
    """``x * (gain * alpha)``: the learnable skip gain (SkipInit, init 0) times the fixed residual scale."""

    def __init__(self, alpha: float, init: float = 0.0) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.gain = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.gain * self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class NFResidualBlock(nn.Module):
    """A pre-activation NF residual block (module docstring) with the normlab block contract: ``preact``,
    ``branch``, ``skip_scale``, ``shortcut``, ``projects``."""

    def __init__(
        self, preact: nn.Module, branch: nn.Module, skip_scale: nn.Module, shortcut: nn.Module | None
    ) -> None:
        super().__init__()
        self.preact = preact
        self.branch = branch
        self.skip_scale = skip_scale
        self.projects = shortcut is not None
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.preact(x)
        return self.shortcut(h if self.projects else x) + self.skip_scale(self.branch(h))


_NF_PARTS = (NFPreAct, NFSkipGain, SkipInit)  # single graph nodes
_GAINS = (NFSkipGain, SkipInit)


def is_resnet_block(module: nn.Module) -> bool:
    """A torchvision/timm-style ``BasicBlock`` or ``Bottleneck``: ``conv1``, ``conv2`` and ``downsample``."""
    return all(hasattr(module, name) for name in ("conv1", "conv2", "downsample")) and isinstance(
        module.conv1, nn.Conv2d
    )


def to_normalizer_free(
    model: nn.Module,
    *,
    alpha: float = 0.2,
    skip_gain_init: float = 0.0,
    activation: str | None = None,
    eps: float = 1e-5,
    zero_init_classifier: bool = True,
) -> nn.Module:
    """Make ``model`` normalizer-free in place (module docstring) and return it.

    Args:
        alpha: residual branch scale (0.2 in the NF papers).
        skip_gain_init: init of each block's learnable skip gain (0 = SkipInit, the NFNet default; 1 gives
            the signal-propagation schedule of Brock et al. 2021a Fig. 2 at init).
        activation: the model's activation (gamma from :func:`activation_gamma`); None = the one kind of
            activation module found in the model (``relu`` when there is none).
        eps: the Scaled WS eps added to the weight variance.
        zero_init_classifier: zero the classifier's weight and bias (the NF papers' init).

    Raises:
        NormlabError: a bad option, several kinds of activation and ``activation`` unset, a residual block
            with parts this conversion does not know, or what the module docstring lists as refused (each
            named in the message).
    """
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise NormlabError(f"alpha must be a finite number > 0, got {alpha!r}")
    act_name = activation if activation is not None else _detect_activation(model)
    gamma = activation_gamma(act_name)
    if act_name not in _ACTIVATION_MODULES and act_name != "identity":
        raise NormlabError(f"activation {act_name!r} has no torch.nn module here; use one of "
                           f"{', '.join(sorted(_ACTIVATION_MODULES))}")
    head = classifier_of(model)
    graph = analyze(model, leaf_types=_NF_PARTS)
    _refuse_unplaceable(model, graph)
    blocks = [(name, m) for name, m in model.named_modules() if name and is_resnet_block(m)]
    blocks = [(n, m) for n, m in blocks if not any(n.startswith(f"{o}.") for o, _ in blocks)]
    block_names = {n for n, _ in blocks}
    if blocks and all(j.name in block_names for j in graph.joins):
        _restructure_blocks(model, blocks, alpha, skip_gain_init, gamma, eps, act_name)
    else:  # every join from the graph, in place
        _convert_joins(model, graph, head, alpha, skip_gain_init, gamma, eps)
    _remove_norms(model)
    _standardize_rest(model, head, gamma, eps)
    if zero_init_classifier and head is not None:
        with torch.no_grad():
            head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()
    _check_converted(model)
    return model


def _restructure_blocks(model, blocks, alpha, skip_gain_init, gamma, eps, act_name) -> None:
    """torchvision / timm blocks -> pre-activation NF blocks (module docstring, first part)."""
    make_act = _ACTIVATION_MODULES.get(act_name, nn.Identity)
    expected_var = 1.0
    for name, block in blocks:
        nf_block = _nf_block(name, block, alpha, expected_var ** -0.5, skip_gain_init, gamma, eps, make_act)
        _set_submodule(model, name, nf_block)
        expected_var = (1.0 if nf_block.projects else expected_var) + alpha**2
    _pre_activation_ends(model, make_act)


def _refuse_unplaceable(model: nn.Module, graph: ResidualGraph) -> None:
    """A norm or conv called as a function cannot be removed or standardized; nested joins have no NF
    schedule: refused, naming where."""
    gm = graph.graph_module
    for node in gm.graph.nodes:
        if node.op == "call_function" and (is_norm_node(gm, node) or is_weight_node(gm, node)):
            where = module_of(node) or f"{type(model).__name__}.forward"
            what = "norm" if is_norm_node(gm, node) else "conv/linear"
            raise NormlabError(
                f"cannot make {type(model).__name__} normalizer-free: {where} calls "
                f"{getattr(node.target, '__name__', node.target)} as a function (a {what} that is not a "
                "module cannot be removed or standardized in place)"
            )
    adds = {j.add: j for j in graph.joins}
    for join in graph.joins:
        inner = [adds[n].name for n in join.branch_nodes if n in adds]
        if inner:
            raise NormlabError(
                f"cannot make {type(model).__name__} normalizer-free: the residual branch of {join.name} "
                f"holds another residual join ({inner[0]}); nested residuals have no NF variance schedule"
            )


def _convert_joins(model, graph, head, alpha, skip_gain_init, gamma, eps) -> None:
    """Every residual join of ``graph`` in place (module docstring, second part)."""
    gm = graph.graph_module
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def single_module(node: fx.Node, join: ResidualJoin, role: str) -> str:
        if node.op != "call_module":
            raise NormlabError(
                f"cannot make residual join {join.name} normalizer-free: its {role} is "
                f"{node.op} {getattr(node.target, '__name__', node.target)}, not a module, so the "
                f"{'skip gain' if role == 'branch end' else 'scale beta'} has no place"
            )
        if calls[node.target] > 1:
            raise NormlabError(
                f"cannot make residual join {join.name} normalizer-free: its {role} {node.target} is called "
                f"{calls[node.target]} times in forward"
            )
        return node.target

    gains: dict[str, float] = {}
    betas: dict[str, float] = {}
    expected_var, previous = 1.0, None
    for join in graph.joins:
        end = single_module(join.branch_out, join, "branch end")
        if join.post_activation:  # gated as SkipInit: the activation after the sum has no variance schedule
            gains[end], expected_var, previous = alpha, 1.0, join.output
            continue
        if previous is None or _source(gm, join.block_input) is not previous:
            expected_var = 1.0  # the first block, or a conv between blocks: unit variance again
        for node in _first_weights(gm, join):
            betas[single_module(node, join, "first conv")] = expected_var**-0.5
        gains[end] = alpha
        expected_var = (1.0 if join.projects else expected_var) + alpha**2
        previous = join.output
    for node in gm.graph.nodes:
        if node.op == "call_module" and is_weight_node(gm, node):
            layer = model.get_submodule(node.target)
            if layer is head or isinstance(layer, (ScaledStdConv1d, ScaledStdConv2d, ScaledStdLinear)):
                continue
            g = (gamma if is_activation(gm, _source(gm, node.args[0])) else 1.0) * betas.get(node.target, 1.0)
            replaced = _standardized(layer, g, eps)
            if replaced is None:
                raise NormlabError(f"cannot make {node.target} ({type(layer).__name__}) normalizer-free: "
                                   "only Conv1d, Conv2d and Linear layers have Scaled WS versions here")
            _set_submodule(model, node.target, replaced)
    for target, scale in gains.items():
        layer = model.get_submodule(target)
        ref = next(iter(model.parameters()))
        gain = NFSkipGain(scale, skip_gain_init).to(device=ref.device, dtype=ref.dtype)
        _set_submodule(model, target, gain if is_norm(layer) else nn.Sequential(layer, gain))


def _source(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Walk back from ``node`` over pooling, reshapes and norms (removed) to what produced the signal."""
    while isinstance(node, fx.Node) and node.all_input_nodes and (is_pass_node(gm, node)
                                                                   or is_norm_node(gm, node)):
        node = node.all_input_nodes[0]
    return node


def _first_weights(gm: fx.GraphModule, join: ResidualJoin) -> list[fx.Node]:
    """The first conv / linear on every path of the block from its input (branch and projection)."""
    inside, found, todo, seen = set(join.nodes()), [], [join.block_input], set()
    while todo:
        for user in todo.pop().users:
            if user in inside and user not in seen:
                seen.add(user)
                (found if is_weight_node(gm, user) else todo).append(user)
    return found


def _check_converted(model: nn.Module) -> None:
    """Never a half conversion: no norm left, a skip gain on every residual branch."""
    left = [n for n, m in model.named_modules() if is_norm(m)]
    if left:
        raise NormlabError(f"normalizer-free conversion left norm layers {', '.join(left[:3])}")
    graph = analyze(model, leaf_types=_NF_PARTS)
    gm = graph.graph_module
    for join in graph.joins:
        if not any(isinstance(graph.module(n), _GAINS) for n in join.branch_nodes):
            raise NormlabError(f"normalizer-free conversion could not put a skip gain on the residual "
                               f"branch of {join.name} ({gm.graph})")


def classifier_of(model: nn.Module) -> nn.Linear | None:
    """``model.classifier`` / ``model.fc`` when it is an ``nn.Linear``, else the last ``nn.Linear``."""
    for name in ("classifier", "fc", "head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _detect_activation(model: nn.Module) -> str:
    kinds = sorted({_ACTIVATIONS[type(m)] for m in model.modules() if type(m) in _ACTIVATIONS})
    if len(kinds) > 1:
        raise NormlabError(
            f"{type(model).__name__} uses several activations ({', '.join(kinds)}); pass activation= to "
            "say which one's gamma the Scaled WS convs get"
        )
    return kinds[0] if kinds else "relu"


def _pre_activation_ends(model: nn.Module, make_act) -> None:
    """torchvision / timm ResNet top level: drop the stem's activation (``relu`` / ``act1``; the first
    block's pre-activation applies it) and activate before the pool (``avgpool`` / ``global_pool``), since a
    pre-activation network ends un-activated."""
    for name in ("relu", "act1"):
        if type(getattr(model, name, None)) in _ACTIVATIONS:
            setattr(model, name, nn.Identity())
            break
    for name in ("avgpool", "global_pool"):
        if isinstance(getattr(model, name, None), nn.Module):
            setattr(model, name, nn.Sequential(make_act(), getattr(model, name)))
            break


def _ws_conv(conv: nn.Conv2d, gamma: float, eps: float) -> ScaledStdConv2d:
    if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros":
        raise NormlabError(f"expected an nn.Conv2d with zero padding, got {conv!r}")
    ws = ScaledStdConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=True, gamma=gamma, eps=eps,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    _copy_weights(conv, ws)
    return ws


def _copy_weights(layer: nn.Module, ws: nn.Module) -> None:
    """The layer's weight (standardization makes the function independent of its scale) and bias; a layer
    without one gets a zero bias: with BN's shift gone, NFNets' convs carry the per-channel shift."""
    with torch.no_grad():
        ws.weight.copy_(layer.weight)
        ws.bias.copy_(layer.bias if layer.bias is not None else torch.zeros_like(ws.bias))


def _nf_block(name, block, alpha, beta, skip_gain_init, gamma, eps, make_act) -> NFResidualBlock:
    unknown = [c for c, m in block.named_children() if _unsupported_child(c, m)]
    if unknown:
        raise NormlabError(
            f"cannot make block {name} ({type(block).__name__}) normalizer-free: it has parts "
            f"{', '.join(unknown)} beyond conv1..3, bn1..3, activations and downsample"
        )
    convs = [getattr(block, c) for c in ("conv1", "conv2", "conv3") if getattr(block, c, None) is not None]
    parts: list[nn.Module] = []
    for i, conv in enumerate(convs):
        if i:
            parts.append(make_act())
        parts.append(_ws_conv(conv, gamma, eps))
    shortcut = None
    if block.downsample is not None:
        ds_convs = [m for m in block.downsample.modules() if isinstance(m, nn.Conv2d)]
        allowed = (nn.Conv2d, nn.Sequential, nn.Identity, nn.AvgPool2d)
        others = [m for m in block.downsample.modules() if not isinstance(m, allowed) and not is_norm(m)]
        if len(ds_convs) != 1 or others:
            raise NormlabError(f"cannot make block {name}'s downsample normalizer-free: expected one conv "
                               f"(and a norm / avg-pool), got {block.downsample!r}")
        pools = [m for m in block.downsample.modules() if isinstance(m, nn.AvgPool2d)]
        conv = _ws_conv(ds_convs[0], gamma, eps)
        shortcut = nn.Sequential(*pools, conv) if pools else conv
    skip = NFSkipGain(alpha, skip_gain_init).to(device=convs[0].weight.device, dtype=convs[0].weight.dtype)
    return NFResidualBlock(NFPreAct(make_act(), beta), nn.Sequential(*parts), skip, shortcut)


def _unsupported_child(name: str, module: nn.Module) -> bool:
    if name in ("conv1", "conv2", "conv3", "downsample") or is_norm(module):
        return False
    return not (type(module) in _ACTIVATIONS or isinstance(module, nn.Identity))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _remove_norms(model: nn.Module) -> None:
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if is_norm(child):
                setattr(parent, child_name, nn.Identity())


def _standardize_rest(model: nn.Module, head: nn.Linear | None, gamma: float, eps: float) -> None:
    """Plain convs / linears outside NF blocks -> Scaled WS; the first layer (sees the data) gets gamma 1."""
    kinds = (nn.Conv1d, nn.Conv2d, nn.Linear)
    layers = [(n, m) for n, m in model.named_modules() if n and isinstance(m, kinds)]
    for index, (name, layer) in enumerate(layers):
        if layer is head or isinstance(layer, (ScaledStdConv1d, ScaledStdConv2d, ScaledStdLinear)):
            continue
        replaced = _standardized(layer, 1.0 if index == 0 else gamma, eps)
        if replaced is not None:
            _set_submodule(model, name, replaced)


def _standardized(layer: nn.Module, gamma: float, eps: float) -> nn.Module | None:
    if type(layer) is nn.Conv2d:
        return _ws_conv(layer, gamma, eps)
    if type(layer) is nn.Conv1d and layer.padding_mode == "zeros":
        padding = layer.padding if isinstance(layer.padding, str) else layer.padding[0]
        ws = ScaledStdConv1d(
            layer.in_channels, layer.out_channels, layer.kernel_size[0], stride=layer.stride[0],
            padding=padding, dilation=layer.dilation[0], groups=layer.groups, bias=True, gamma=gamma, eps=eps,
        )
    elif type(layer) is nn.Linear:
        ws = ScaledStdLinear(layer.in_features, layer.out_features, bias=True, gamma=gamma, eps=eps)
    else:
        return None
    ws = ws.to(device=layer.weight.device, dtype=layer.weight.dtype)
    _copy_weights(layer, ws)
    return ws
