"""``GroupedModel``: K members of one architecture as one network of ordinary kernels on member-major
activations (the "grouped" mode of :class:`normlab.batched.StackedModel`), without ``vmap``.

The activations of the K members travel as one tensor (K*C, B, *spatial): member k's C channels are
contiguous (rows ``k*C .. (k+1)*C - 1``), each channel holding the batch and then the spatial positions
(a member's own (B, C, *spatial) activation is ``h[k*C:(k+1)*C].transpose(0, 1)``). In that layout a
member's convolution is one slice of a batched matmul whose result needs no transposition, and a channel's
batch statistics are one contiguous row. Every leaf module of a copy of the architecture is replaced by
its grouped twin, which reads member k's parameters as slice k of the stacked tensors (``params[name]``:
(K, *shape), the engine's optimizer and AGC state) and runs the K members as one kernel:

* Conv (and normlab's Scaled WS conv; Scaled WS standardizes each output unit's filter, so the K*C_out
  rows standardize exactly as each member's C_out rows would): im2col and one batched matmul over the
  members with a hand-written backward (:mod:`normlab.batched.im2col`); a grouped or ``padding="same"``
  conv runs as one ``groups = K*g`` convolution on the channel-stacked (B, K*C, *spatial) transpose;
* BatchNorm (torch BN, frozen BN): one batch norm over the K*C rows of the (K*C, B*|spatial|) view
  (:func:`normlab.batched.row_batch_norm.row_batch_norm` in training, ``F.batch_norm`` in eval mode); its
  running statistics are (K*C,) views of the stacked (K, C) buffers, so the in-place update lands in each
  member's slice (a channel's batch statistic never mixes channels, hence never members; the
  unbiased count B*|spatial| is the member's own);
* GroupNorm(G, C) (normlab's ``gn``, ``ln`` = G=1, ``in`` = G=C): one GroupNorm with K*G groups, which
  never cross a member's C channels (:mod:`normlab.batched.group_norm`);
* ghost BN and nn.LayerNorm over (C, *spatial): on the channel-stacked transpose, where their per-sample
  statistics are contiguous;
* flatten: (K*C, B, *spatial) -> (K*C*|spatial|, B), member k's features in its own (C, *spatial) order;
* Linear on (K*F, B): ``torch.baddbmm`` of the (K, out, F) weights with the (K, F, B) view;
* activations, pools, identity and residual additions act elementwise, per channel or on the trailing
  spatial dims and are used unchanged.

Any other leaf (or a container holding parameters of its own) makes the model ungroupable (``None``
from :func:`grouped_model`); so does a model whose own code (outside its leaves) reads the batch or channel
dim: before the mode is offered, :func:`grouped_model` checks on two throwaway members that the grouped
forward, the gradients, the running statistics and the eval-mode forward equal the member-by-member ones.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from normlab.batched.group_norm import member_group_norm
from normlab.batched.im2col import matmul_conv
from normlab.batched.row_batch_norm import row_batch_norm
from normlab.layers.frozen_bn import FrozenBatchNorm
from normlab.layers.ghost_bn import GhostBatchNorm, ghost_batch_norm
from normlab.layers.std_conv import ScaledStdConv1d, ScaledStdConv2d, ScaledStdLinear, scaled_std_weight
from normlab.models._layers import FlattenTo, MaxPool

# Leaves without parameters that act per channel (or elementwise): the same module runs K members.
_PASS_THROUGH = (
    nn.ReLU, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.SELU, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, MaxPool,
)


class _Members:
    """The stacked tensors the grouped leaves read: set by :meth:`GroupedModel.__call__` for one forward."""

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    size: int
    conv: str | None = None  # "grouped" / "matmul": every conv uses it (the probe checks both)


class _Leaf(nn.Module):
    """A grouped leaf: its stacked tensors are ``members.params[prefix + name]`` (K, *shape)."""

    def __init__(self, members: _Members, prefix: str) -> None:
        super().__init__()
        self.__dict__["members"] = members  # not a submodule
        self.prefix = prefix

    def p(self, name: str) -> Tensor | None:
        return self.members.params.get(self.prefix + name)

    def b(self, name: str) -> Tensor | None:
        return self.members.buffers.get(self.prefix + name)

    @property
    def k(self) -> int:
        return self.members.size


def _flat(t: Tensor | None) -> Tensor | None:
    """(K, C) -> (K*C,) (a view: in-place updates land in the stacked tensor)."""
    return None if t is None else t.view(-1)


def _rows(x: Tensor) -> Tensor:
    """Member-major (K*C, B, *spatial) -> (1, K*C, B*|spatial|): a channel's batch statistics in one row."""
    return x.view(1, x.shape[0], -1)


def grouped_conv(x: Tensor, w: Tensor, bias: Tensor | None, k: int, groups: int, conv: nn.Module) -> Tensor:
    """K members' convs as one ``groups = K * groups`` convolution on the channel-stacked transpose of
    member-major ``x`` (K*C_in, B, *spatial); ``w`` (K*C_out, C_in/groups, *kernel), ``bias`` (K*C_out,) or
    None; ``conv`` gives stride/padding/dilation. Returns member-major (K*C_out, B, *spatial')."""
    fn = F.conv1d if x.dim() == 3 else F.conv2d
    y = fn(x.transpose(0, 1), w, bias, conv.stride, conv.padding, conv.dilation, groups * k)
    return y.transpose(0, 1).contiguous()


class _Conv(_Leaf):
    """Grouped conv; where both apply (an ungrouped conv with numeric padding), :func:`matmul_conv`, by a
    fixed rule, not by timing: the two round differently, and a pick that flips between processes on timing
    noise changed whole groups' results between two identical compares (:mod:`normlab.batched.stack`).
    On the MNIST-1D CNN matmul was the faster in 29 of 30 timings (the other an evaluation shape within
    noise); on the studies' VGG and resnet (MNIST-1D, 3 members, batch 128) a step took 881 vs 901 ms and
    96.0 vs 96.0 ms (matmul vs grouped). ``members.conv`` forces either (the probe checks both)."""

    def __init__(self, members: _Members, prefix: str, conv: nn.Conv1d | nn.Conv2d) -> None:
        super().__init__(members, prefix)
        self.conv = conv  # on the meta device: only its hyper-parameters are read
        self.groups = conv.groups
        self.ws = (conv.gamma, conv.eps) if isinstance(conv, (ScaledStdConv1d, ScaledStdConv2d)) else None
        self.matmul_ok = conv.groups == 1 and not isinstance(conv.padding, str)

    def forward(self, x: Tensor) -> Tensor:
        w = self.p("weight")
        w = w.reshape(-1, *w.shape[2:])  # (K*C_out, C_in/g, *k)
        if self.ws is not None:
            gain = self.p("gain")
            w = scaled_std_weight(w, gain.reshape(-1, *gain.shape[2:]), *self.ws)
        bias = _flat(self.p("bias"))
        if self.matmul_ok and (self.members.conv or "matmul") == "matmul":
            return matmul_conv(x, w, bias, self.k, self.conv)
        return grouped_conv(x, w, bias, self.k, self.groups, self.conv)


class _Linear(_Leaf):
    """Linear on member-major (K*F, B) features: (K, out, F) @ (K, F, B) -> (K*out, B)."""

    def __init__(self, members: _Members, prefix: str, linear: nn.Linear) -> None:
        super().__init__(members, prefix)
        self.ws = (linear.gamma, linear.eps) if isinstance(linear, ScaledStdLinear) else None

    def forward(self, x: Tensor) -> Tensor:
        w = self.p("weight")  # (K, out, F)
        k, out, features = w.shape
        if x.dim() != 2 or x.shape[0] != k * features:
            raise _UngroupableError(f"Linear({features}, {out}) on member-major input {tuple(x.shape)}")
        if self.ws is not None:
            w = scaled_std_weight(w.reshape(k * out, features), self.p("gain").reshape(-1), *self.ws)
            w = w.view(k, out, features)
        xs = x.view(k, features, x.shape[1])
        bias = self.p("bias")
        y = torch.bmm(w, xs) if bias is None else torch.baddbmm(bias.unsqueeze(2), w, xs)
        return y.view(k * out, x.shape[1])


class _BatchNorm(_Leaf):
    def __init__(self, members: _Members, prefix: str, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__(members, prefix)
        self.eps, self.momentum, self.track = bn.eps, bn.momentum, bn.track_running_stats

    def forward(self, x: Tensor) -> Tensor:
        mean, var = _flat(self.b("running_mean")), _flat(self.b("running_var"))
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track:
            count = self.b("num_batches_tracked")
            if count is not None:
                count.add_(1)
                if self.momentum is None:  # cumulative average: every member has seen as many batches
                    momentum = 1.0 / float(count[0])
        weight, bias = _flat(self.p("weight")), _flat(self.p("bias"))
        if self.training or mean is None:  # batch statistics, one row per channel
            return row_batch_norm(x.reshape(x.shape[0], -1), mean, var, weight, bias, momentum, self.eps
                                  ).view(x.shape)
        return F.batch_norm(_rows(x), mean, var, weight, bias, False, momentum, self.eps).view(x.shape)


class _FrozenBatchNorm(_Leaf):
    def __init__(self, members: _Members, prefix: str, bn: FrozenBatchNorm) -> None:
        super().__init__(members, prefix)
        self.eps = bn.eps

    def forward(self, x: Tensor) -> Tensor:
        y = F.batch_norm(
            _rows(x), _flat(self.b("running_mean")), _flat(self.b("running_var")), _flat(self.b("weight")),
            _flat(self.b("bias")), False, 0.0, self.eps,
        )
        return y.view(x.shape)


class _GhostBatchNorm(_Leaf):
    def __init__(self, members: _Members, prefix: str, bn: GhostBatchNorm) -> None:
        super().__init__(members, prefix)
        self.eps, self.momentum, self.size = bn.eps, bn.momentum, bn.virtual_batch_size

    def forward(self, x: Tensor) -> Tensor:
        count = self.b("num_batches_tracked")
        shared = count[0].clone() if count is not None and self.training else None  # one count for all
        y = ghost_batch_norm(
            x.transpose(0, 1), _flat(self.b("running_mean")), _flat(self.b("running_var")),
            _flat(self.p("weight")), _flat(self.p("bias")), virtual_batch_size=self.size,
            training=self.training, momentum=self.momentum, eps=self.eps, num_batches_tracked=shared,
        )
        if shared is not None:
            count.copy_(shared.expand_as(count))
        return y.transpose(0, 1).contiguous()


class _GroupNorm(_Leaf):
    def __init__(self, members: _Members, prefix: str, gn: nn.GroupNorm) -> None:
        super().__init__(members, prefix)
        self.groups, self.eps = gn.num_groups, gn.eps

    def forward(self, x: Tensor) -> Tensor:
        return member_group_norm(x, self.groups * self.k, _flat(self.p("weight")), _flat(self.p("bias")),
                                 self.eps)


class _LayerNorm(_Leaf):
    """nn.LayerNorm whose normalized shape is (C, *spatial): all of a member's features."""

    def __init__(self, members: _Members, prefix: str, ln: nn.LayerNorm) -> None:
        super().__init__(members, prefix)
        self.shape, self.eps = tuple(ln.normalized_shape), ln.eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() - 1 != len(self.shape):
            raise _UngroupableError(f"LayerNorm over {self.shape} on input {tuple(x.shape)}")
        xt = x.transpose(0, 1)  # channel-stacked (B, K*C, *spatial)
        y = F.layer_norm(xt.reshape(xt.shape[0], self.k, *self.shape), self.shape, eps=self.eps)
        weight, bias = self.p("weight"), self.p("bias")
        if weight is not None:
            y = y * weight
        if bias is not None:
            y = y + bias
        return y.reshape(xt.shape).transpose(0, 1).contiguous()


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward makes the gradient contiguous: the flatten's transpose hands the layer
    below a strided gradient, on which the ReLU's backward ran 6x slower (770 vs 130 us on (225, 128, 5))
    than after this one small copy."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.contiguous()


class _Flatten(nn.Module):
    """A flatten of each member's (C, *spatial) features (``nn.Flatten()``, normlab's FlattenTo): member-major
    (K*C, B, *spatial) -> (K*C*|spatial|, B), member k's features in its own (C, *spatial) order."""

    def __init__(self, members: _Members, features: int | None = None) -> None:
        super().__init__()
        self.__dict__["members"] = members
        self.features = features

    def forward(self, x: Tensor) -> Tensor:
        k, b = self.members.size, x.shape[1]
        if x.dim() > 2:
            rows = _ContiguousGrad.apply(x.view(x.shape[0], b, -1))  # (K*C, B, |spatial|)
            x = rows.view(k, -1, b, rows.shape[2]).transpose(2, 3).reshape(-1, b)
        if self.features is not None and x.shape[0] != k * self.features:
            raise _UngroupableError(f"flattened {x.shape[0]} features for {k} members")
        return x


class _UngroupableError(Exception):
    """A module (or input) the grouped twin cannot run."""


def _grouped_leaf(module: nn.Module, members: _Members, prefix: str) -> nn.Module:
    if isinstance(module, _PASS_THROUGH):
        return module
    if isinstance(module, nn.Flatten):
        if module.start_dim == 1 and module.end_dim == -1:
            return _Flatten(members)
    elif isinstance(module, FlattenTo):
        return _Flatten(members, module.features)
    elif isinstance(module, nn.Dropout):
        if module.p == 0:
            return module
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.padding_mode == "zeros":
            return _Conv(members, prefix, module)
    elif isinstance(module, nn.Linear):
        return _Linear(members, prefix, module)
    elif type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return _BatchNorm(members, prefix, module)
    elif type(module) is FrozenBatchNorm:
        return _FrozenBatchNorm(members, prefix, module)
    elif type(module) is GhostBatchNorm:
        return _GhostBatchNorm(members, prefix, module)
    elif type(module) is nn.GroupNorm:
        return _GroupNorm(members, prefix, module)
    elif type(module) is nn.LayerNorm:
        return _LayerNorm(members, prefix, module)
    raise _UngroupableError(f"no grouped form of {type(module).__name__}")


def _holds_tensors(module: nn.Module) -> bool:
    """Whether ``module`` itself (not its children) has parameters or buffers."""
    own = (*module.parameters(recurse=False), *module.buffers(recurse=False))
    return len(own) > 0


def _replace_leaves(module: nn.Module, members: _Members, prefix: str = "") -> None:
    for name, child in module.named_children():
        full = f"{prefix}{name}."
        if next(child.children(), None) is None:
            setattr(module, name, _grouped_leaf(child, members, full))
        else:
            if _holds_tensors(child):
                raise _UngroupableError(f"{type(child).__name__} holds parameters of its own")
            _replace_leaves(child, members, full)


class GroupedModel:
    """The grouped twin of ``skeleton`` (an architecture whose tensors are supplied at call time)."""

    def __init__(self, skeleton: nn.Module) -> None:
        if _holds_tensors(skeleton):
            raise _UngroupableError(f"{type(skeleton).__name__} holds parameters of its own")
        if next(skeleton.children(), None) is None:
            raise _UngroupableError("a model without submodules")
        self.members = _Members()
        self.net = copy.deepcopy(skeleton)
        _replace_leaves(self.net, self.members)

    def train(self, mode: bool = True) -> None:
        self.net.train(mode)

    def __call__(
        self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, *, shared_input: bool = False
    ) -> Tensor:
        """Outputs (K, B, ...) of inputs (K, B, C, ...), or of one (B, C, ...) for all (``shared_input``)."""
        k = next(iter(params.values())).shape[0]
        self.members.params, self.members.buffers, self.members.size = params, buffers, k
        if shared_input:  # (B, C, ...) -> (C, B, ...) -> K copies: (K*C, B, ...)
            xt = x.transpose(0, 1)
            xg = xt.unsqueeze(0).expand(k, *xt.shape).reshape(k * xt.shape[0], *xt.shape[1:])
        else:  # (K, B, C, ...) -> (K, C, B, ...) -> (K*C, B, ...)
            xg = x.transpose(1, 2).reshape(k * x.shape[2], x.shape[1], *x.shape[3:])
        out = self.net(xg)  # member-major (K*O, B, ...)
        return out.unflatten(0, (k, -1)).transpose(1, 2)


def grouped_model(
    skeleton: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], shape: tuple[int, ...],
    tol: float = 1e-5,
) -> GroupedModel | None:
    """The grouped twin of ``skeleton`` if it computes, for two throwaway members on a random batch of
    inputs of ``shape``, the member-by-member outputs, gradients and running statistics in training mode
    and outputs in eval mode (to ``tol`` absolute plus ``10 * tol`` of each tensor's largest magnitude: the
    grouped kernels sum in another order), with either conv implementation; else None."""
    try:
        grouped = GroupedModel(skeleton)
    except _UngroupableError:
        return None
    device = next(iter(params.values())).device
    x = torch.randn(2, 4, *shape, device=device)
    probe = {n: p[:2].detach().clone().requires_grad_(p.requires_grad) for n, p in params.items()}
    probe_buffers = {n: b[:2].clone() for n, b in buffers.items()}
    was_training = skeleton.training
    state = torch.random.get_rng_state()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ok = all(
                _matches(skeleton, grouped, probe, probe_buffers, x, conv, tol)
                for conv in ("grouped", "matmul")
            )
    except Exception:  # noqa: BLE001 - any failure of the grouped twin means: not groupable
        ok = False
    finally:
        torch.random.set_rng_state(state)
        skeleton.train(was_training)
        grouped.train(was_training)
        grouped.members.conv = None
    return grouped if ok else None


def _matches(
    skeleton: nn.Module, grouped: GroupedModel, params: dict[str, Tensor], buffers: dict[str, Tensor],
    x: Tensor, conv: str, tol: float,
) -> bool:
    """One training step's outputs, gradients and buffers, then eval outputs: grouped == member by member."""
    grouped.members.conv = conv
    mine = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in params.items()}
    twin = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in params.items()}
    loop_buffers = {n: b.clone() for n, b in buffers.items()}
    grouped_buffers = {n: b.clone() for n, b in buffers.items()}
    pairs = []
    for training in (True, False):
        skeleton.train(training)
        grouped.train(training)
        want = torch.stack([
            functional_call(
                skeleton,
                ({n: p[i] for n, p in mine.items()}, {n: b[i] for n, b in loop_buffers.items()}),
                (x[i],),
            )
            for i in range(x.shape[0])
        ])
        got = grouped(twin, grouped_buffers, x)
        if training:
            want.float().square().sum().backward()
            got.float().square().sum().backward()
        pairs.append((got.detach(), want.detach()))
    pairs += [(twin[n].grad, p.grad) for n, p in mine.items() if p.requires_grad]
    pairs += [(grouped_buffers[n], b) for n, b in loop_buffers.items()]
    return all(
        (a is None and b is None)
        or (a is not None and b is not None and a.shape == b.shape and _close(a.double(), b.double(), tol))
        for a, b in pairs
    )


def _close(got: Tensor, want: Tensor, tol: float) -> bool:
    """``max |got - want| <= tol + 10 tol max |want|``: relative to the tensor's scale, not elementwise (a
    gradient entry near 0 can lose all its digits to cancellation in either summation order)."""
    if want.numel() == 0:
        return True
    return bool((got - want).abs().max() <= tol + 10 * tol * want.abs().max())
