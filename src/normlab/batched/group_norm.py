"""GroupNorm of member-major activations (K*C, B, *S) (the layout of :mod:`normlab.batched.grouped`):
each member's ``nn.GroupNorm(G, C)`` as one GroupNorm with K*G groups, whose groups never cross a
member's C channels.

    y[c, b, s] = (x[c, b, s] - mean[b, g(c)]) * rstd[b, g(c)] * weight[c] + bias[c]
    mean, var over the C/G channels of group g(c) and all positions s (biased); rstd = 1 / sqrt(var + eps)

Computed by torch's kernels on the channel-stacked transpose (B, K*C, *S), where a group's values are
contiguous: ``F.group_norm`` where a channel has at least 8 positions. Below that, torch's CPU backward
computes its per-channel sums in a scalar loop that costs ~45 us more per position on (16, 225, |S|), one
thread (|S| = 5: 227 us, |S| = 7: 319 us, |S| = 8: 33 us). There :class:`MemberGroupNorm` runs the
backward on the equivalent problem with one channel per group of C/G * |S| positions (the weight folded
into the incoming gradient, which an affine-free GroupNorm backward then needs alone) and takes the weight
and bias gradients as two sums. Forward + backward with the contiguous input gradient the conv below needs,
one thread, ``F.group_norm`` -> this: the MNIST-1D CNN's last GroupNorm (9 members, |S| = 5) 386 -> 317 us
at batch 16, 2756 -> 1706 us at batch 128; the studies' VGG (3 members, 512 channels, 32 groups, batch
128) 20.7 -> 15.0 ms at |S| = 5, 7.7 -> 6.7 ms at |S| = 2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Positions per channel below which torch's CPU GroupNorm backward takes its scalar path (module docstring;
# 8 float32 to a 256-bit vector).
SLOW_POSITIONS = 8


class MemberGroupNorm(torch.autograd.Function):
    """``x`` (K*C, B, *S) member-major, ``weight``/``bias`` (K*C,) or None, ``groups`` = K*G ->
    (K*C, B, *S), with the backward that avoids torch's scalar path (module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        groups: int,
        eps: float,
    ) -> Tensor:
        channels, batch, positions = x.shape[0], x.shape[1], math.prod(x.shape[2:])
        xt = x.transpose(0, 1).contiguous()  # channel-stacked (B, K*C, *S)
        y, mean, rstd = torch.native_group_norm(xt, weight, bias, batch, channels, positions, groups, eps)
        ctx.save_for_backward(xt, weight, mean, rstd)
        ctx.groups = groups
        return y.transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor):  # type: ignore[override]
        xt, weight, mean, rstd = ctx.saved_tensors
        groups = ctx.groups
        batch, channels = xt.shape[0], xt.shape[1]
        positions = math.prod(xt.shape[2:])
        gt = grad.transpose(0, 1).contiguous()  # channel-stacked like xt
        span = channels // groups * positions  # a group's values per example
        gx = gw = gb = None
        if weight is not None and ctx.needs_input_grad[1]:  # sum over examples and positions of grad * x_hat
            x_hat = (xt.view(batch, groups, span) - mean.unsqueeze(2)).mul_(rstd.unsqueeze(2))
            gw = (gt * x_hat.view_as(gt)).view(batch, channels, positions).sum(dim=(0, 2))
        if ctx.needs_input_grad[2]:
            gb = grad.reshape(channels, -1).sum(dim=1)
        if ctx.needs_input_grad[0]:  # an affine-free GroupNorm backward, one channel per group
            g_hat = gt if weight is None else gt * weight.view(channels, *([1] * (gt.dim() - 2)))
            gx = torch.ops.aten.native_group_norm_backward(
                g_hat.view(batch, groups, span), xt.view(batch, groups, span), mean, rstd, None,
                batch, groups, span, groups, [True, False, False],
            )[0]
        if gx is not None:
            gx = gx.view(xt.shape).transpose(0, 1).contiguous()
        return gx, gw, gb, None, None


def member_group_norm(
    x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """GroupNorm with ``groups`` (K*G) groups of member-major ``x`` (K*C, B, *S) (module docstring):
    :class:`MemberGroupNorm` on the CPU where a channel has fewer than ``SLOW_POSITIONS`` positions and a
    group at least that many values, else ``F.group_norm`` on the transpose."""
    positions = math.prod(x.shape[2:])
    span = x.shape[0] // groups * positions
    if x.device.type != "cpu" or not positions < SLOW_POSITIONS <= span:
        y = torch.nn.functional.group_norm(x.transpose(0, 1), groups, weight, bias, eps)
        return y.transpose(0, 1).contiguous()
    return MemberGroupNorm.apply(x, weight, bias, groups, eps)
