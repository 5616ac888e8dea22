"""``GroupedModel``: K members of one architecture as one network of ordinary kernels on channel-stacked
activations (the "grouped" mode of :class:`normlab.batched.StackedModel`), without ``vmap``.

The activations of the K members travel as one tensor (B, K*C, *spatial) in which member k's C channels
are contiguous (channels ``k*C .. (k+1)*C - 1``). Every leaf module of a copy of the architecture is
replaced by its grouped twin, which reads member k's parameters as slice k of the stacked tensors
(``params[name]``: (K, *shape), the engine's optimizer and AGC state) and runs the K members as one
kernel:

* Conv (and normlab's Scaled WS conv): weight (K, C_out, C_in/g, *k) viewed as (K*C_out, C_in/g, *k),
  one convolution with ``groups = K*g`` (Scaled WS standardizes each output unit's filter, so the K*C_out
  rows standardize exactly as each member's C_out rows would); or, where that is faster for a layer and
  input shape (timed once per shape), im2col and one batched matmul over the members (:func:`matmul_conv`);
* BatchNorm (torch BN, frozen BN, ghost BN): one ``F.batch_norm`` over K*C channels; its running
  statistics are (K*C,) views of the stacked (K, C) buffers, so the in-place update lands in each member's
  slice (a batch statistic of one channel never mixes channels, hence never members);
* GroupNorm(G, C) (normlab's ``gn``, ``ln`` = G=1, ``in`` = G=C): ``F.group_norm`` with K*G groups, which
  never cross a member's C channels;
* nn.LayerNorm over (C, *spatial): normalized per member on the (B, K, C, *spatial) view;
* Linear (after a flatten, (B, K*F), member k's F features contiguous): ``torch.baddbmm`` of the (K, B, F)
  view with the (K, F, out) weights, back to (B, K*out);
* activations, pools, flatten, identity and residual additions act elementwise or per channel and are
  used unchanged.

Any other leaf (or a container holding parameters of its own) makes the model ungroupable (``None``
from :func:`grouped_model`); so does a model whose code mixes channels outside its leaves: before the
mode is offered, :func:`grouped_model` checks on two throwaway members that the grouped forward, the
gradients, the running statistics and the eval-mode forward equal the member-by-member ones.
"""

from __future__ import annotations

import copy
import math
import time
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

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


def grouped_conv(x: Tensor, w: Tensor, bias: Tensor | None, k: int, groups: int, conv: nn.Module) -> Tensor:
    """K members' convs as one ``groups = K * groups`` convolution. ``x`` (B, K*C_in, *spatial), ``w``
    (K*C_out, C_in/groups, *kernel), ``bias`` (K*C_out,) or None; ``conv`` gives stride/padding/dilation."""
    fn = F.conv1d if x.dim() == 3 else F.conv2d
    return fn(x, w, bias, conv.stride, conv.padding, conv.dilation, groups * k)


def matmul_conv(x: Tensor, w: Tensor, bias: Tensor | None, k: int, conv: nn.Module) -> Tensor:
    """The same convolution (``groups == 1`` per member) as im2col (``F.unfold``) and one batched matmul
    over the members: (K, C_out, C_in*|kernel|) @ (K, C_in*|kernel|, B*positions). oneDNN's grouped
    convolution is slow per FLOP for few channels per group (the MNIST-1D CNN's first conv: 2.5x)."""
    one_d = x.dim() == 3
    x4 = x.unsqueeze(-1) if one_d else x
    def pair(v: tuple[int, ...], unit: int) -> tuple[int, int]:  # a 1-D conv is 2-D with a width-1 kernel
        return (v[0], unit) if one_d else (v[0], v[1])

    size, stride = pair(conv.kernel_size, 1), pair(conv.stride, 1)
    padding, dilation = pair(conv.padding, 0), pair(conv.dilation, 1)
    cols = F.unfold(x4, size, dilation=dilation, padding=padding, stride=stride)  # (B, K*C_in*|kernel|, P)
    b, positions = x.shape[0], cols.shape[-1]
    fan_in = cols.shape[1] // k
    cols = cols.view(b, k, fan_in, positions).permute(1, 2, 0, 3).reshape(k, fan_in, b * positions)
    w3 = w.reshape(k, -1, fan_in)
    y = torch.bmm(w3, cols) if bias is None else torch.baddbmm(bias.view(k, -1, 1), w3, cols)
    out = [(x4.shape[2 + i] + 2 * padding[i] - dilation[i] * (size[i] - 1) - 1) // stride[i] + 1
           for i in range(2)]
    y = y.view(k, -1, b, positions).permute(2, 0, 1, 3)  # (B, K, C_out, P)
    return y.reshape(b, -1, out[0]) if one_d else y.reshape(b, -1, *out)


class _Conv(_Leaf):
    """Grouped conv; where both apply, the faster of :func:`grouped_conv` and :func:`matmul_conv` for
    each input shape, timed on detached copies (forward and backward in training, forward alone in
    evaluation) the first time the shape is seen, as ``cudnn.benchmark`` does."""

    def __init__(self, members: _Members, prefix: str, conv: nn.Conv1d | nn.Conv2d) -> None:
        super().__init__(members, prefix)
        self.conv = conv  # on the meta device: only its hyper-parameters are read
        self.groups = conv.groups
        self.ws = (conv.gamma, conv.eps) if isinstance(conv, (ScaledStdConv1d, ScaledStdConv2d)) else None
        self.matmul_ok = conv.groups == 1 and not isinstance(conv.padding, str)
        self.fastest: dict[tuple[int, ...], str] = {}  # (backward, *input shape) -> implementation

    def forward(self, x: Tensor) -> Tensor:
        w = self.p("weight")
        w = w.reshape(-1, *w.shape[2:])  # (K*C_out, C_in/g, *k)
        if self.ws is not None:
            gain = self.p("gain")
            w = scaled_std_weight(w, gain.reshape(-1, *gain.shape[2:]), *self.ws)
        bias = _flat(self.p("bias"))
        impl = self._impl(x, w, bias)
        if impl == "matmul":
            return matmul_conv(x, w, bias, self.k, self.conv)
        return grouped_conv(x, w, bias, self.k, self.groups, self.conv)

    def _impl(self, x: Tensor, w: Tensor, bias: Tensor | None) -> str:
        if not self.matmul_ok:
            return "grouped"
        if self.members.conv is not None:
            return self.members.conv
        backward = self.training and torch.is_grad_enabled()
        key = (backward, *x.shape)
        if key not in self.fastest:
            self.fastest[key] = self._time(x, w, bias, backward)
        return self.fastest[key]

    def _time(self, x: Tensor, w: Tensor, bias: Tensor | None, backward: bool, reps: int = 3) -> str:
        x, w = x.detach().requires_grad_(backward), w.detach().requires_grad_(backward)
        bias = None if bias is None else bias.detach().requires_grad_(backward)
        runs = {
            "grouped": lambda: grouped_conv(x, w, bias, self.k, self.groups, self.conv),
            "matmul": lambda: matmul_conv(x, w, bias, self.k, self.conv),
        }
        times: dict[str, float] = {name: math.inf for name in runs}
        for rep in range(reps + 1):
            for name, run in runs.items():
                tick = time.perf_counter()
                with torch.enable_grad() if backward else torch.no_grad():
                    out = run()
                    if backward:
                        out.sum().backward()
                if rep:  # the first round warms up
                    times[name] = min(times[name], time.perf_counter() - tick)
        return min(times, key=times.__getitem__)


class _Linear(_Leaf):
    def __init__(self, members: _Members, prefix: str, linear: nn.Linear) -> None:
        super().__init__(members, prefix)
        self.ws = (linear.gamma, linear.eps) if isinstance(linear, ScaledStdLinear) else None

    def forward(self, x: Tensor) -> Tensor:
        w = self.p("weight")  # (K, out, F)
        k, out, features = w.shape
        if self.ws is not None:
            w = scaled_std_weight(w.reshape(k * out, features), self.p("gain").reshape(-1), *self.ws)
            w = w.view(k, out, features)
        xs = x.reshape(x.shape[0], k, features).transpose(0, 1)  # (K, B, F)
        bias = self.p("bias")
        wt = w.transpose(1, 2)  # (K, F, out)
        y = torch.bmm(xs, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), xs, wt)
        return y.transpose(0, 1).reshape(x.shape[0], k * out)


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
        use_batch = self.training or mean is None
        return F.batch_norm(
            x, mean, var, _flat(self.p("weight")), _flat(self.p("bias")), use_batch, momentum, self.eps
        )


class _FrozenBatchNorm(_Leaf):
    def __init__(self, members: _Members, prefix: str, bn: FrozenBatchNorm) -> None:
        super().__init__(members, prefix)
        self.eps = bn.eps

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(
            x, _flat(self.b("running_mean")), _flat(self.b("running_var")), _flat(self.b("weight")),
            _flat(self.b("bias")), False, 0.0, self.eps,
        )


class _GhostBatchNorm(_Leaf):
    def __init__(self, members: _Members, prefix: str, bn: GhostBatchNorm) -> None:
        super().__init__(members, prefix)
        self.eps, self.momentum, self.size = bn.eps, bn.momentum, bn.virtual_batch_size

    def forward(self, x: Tensor) -> Tensor:
        count = self.b("num_batches_tracked")
        shared = count[0].clone() if count is not None and self.training else None  # one count for all
        y = ghost_batch_norm(
            x, _flat(self.b("running_mean")), _flat(self.b("running_var")), _flat(self.p("weight")),
            _flat(self.p("bias")), virtual_batch_size=self.size, training=self.training,
            momentum=self.momentum, eps=self.eps, num_batches_tracked=shared,
        )
        if shared is not None:
            count.copy_(shared.expand_as(count))
        return y


class _GroupNorm(_Leaf):
    def __init__(self, members: _Members, prefix: str, gn: nn.GroupNorm) -> None:
        super().__init__(members, prefix)
        self.groups, self.eps = gn.num_groups, gn.eps

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = _flat(self.p("weight")), _flat(self.p("bias"))
        return F.group_norm(x, self.groups * self.k, weight, bias, self.eps)


class _LayerNorm(_Leaf):
    """nn.LayerNorm whose normalized shape is (C, *spatial): all of a member's features."""

    def __init__(self, members: _Members, prefix: str, ln: nn.LayerNorm) -> None:
        super().__init__(members, prefix)
        self.shape, self.eps = tuple(ln.normalized_shape), ln.eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() - 1 != len(self.shape):
            raise _UngroupableError(f"LayerNorm over {self.shape} on input {tuple(x.shape)}")
        y = F.layer_norm(x.view(x.shape[0], self.k, *self.shape), self.shape, eps=self.eps)
        weight, bias = self.p("weight"), self.p("bias")
        if weight is not None:
            y = y * weight
        if bias is not None:
            y = y + bias
        return y.reshape(x.shape)


class _FlattenTo(nn.Module):
    """normlab's FlattenTo, expecting K times the features."""

    def __init__(self, members: _Members, flatten: FlattenTo) -> None:
        super().__init__()
        self.__dict__["members"] = members
        self.features = flatten.features

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.members.size * self.features:
            raise _UngroupableError(f"flattened {x.shape[1]} features for {self.members.size} members")
        return x


class _UngroupableError(Exception):
    """A module (or input) the grouped twin cannot run."""


def _grouped_leaf(module: nn.Module, members: _Members, prefix: str) -> nn.Module:
    if isinstance(module, _PASS_THROUGH):
        return module
    if isinstance(module, nn.Flatten):
        if module.start_dim == 1 and module.end_dim == -1:
            return module
    elif isinstance(module, FlattenTo):
        return _FlattenTo(members, module)
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
        if shared_input:
            xg = x.repeat(1, k, *([1] * (x.dim() - 2)))
        else:
            xg = x.transpose(0, 1).reshape(x.shape[1], k * x.shape[2], *x.shape[3:])
        out = self.net(xg)
        return out.unflatten(1, (k, -1)).movedim(1, 0)


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
