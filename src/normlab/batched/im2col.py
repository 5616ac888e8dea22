"""K members' convolutions (``groups == 1`` per member) as im2col and one batched matmul, on member-major
activations (the layout of :mod:`normlab.batched.grouped`: (K*C, B, *S), member k's C channels contiguous,
then the batch, then the spatial dims):

    y[k, o, b, s] = bias[k, o] + sum_{c, j} w[k, o, c, j] * x_pad[k, c, b, stride * s + dilation * j]

(``j`` and ``s`` run over the kernel's and the output's positions, one index per spatial dim). Forward:
the padded input's windows (``Tensor.unfold``, a view) are copied once into columns (K, C_in*|kernel|,
B*|S'|) and multiplied by the (K, C_out, C_in*|kernel|) weights in one ``torch.bmm``, whose result is
already the member-major output. Backward, written out (:class:`Im2colConv`): the weight gradient is one
``bmm`` with the saved columns, the bias gradient a sum, and the input gradient one ``bmm`` back to
columns followed by |kernel| strided additions into the input's gradient (col2im as the transpose of the
window view), each clipped to the positions that read real input rather than padding, so the gradient is
contiguous (a strided slice of a padded buffer made the ReLU backward before it 5x slower: 706 vs 130 us
on (225, 128, 19), one thread).

Why by hand: the same computation left to autograd (``F.unfold`` or ``Tensor.unfold`` and permutes) spends
most of its backward in generic view-backward kernels, and oneDNN's grouped convolution is slow per FLOP
for few channels per group. Measured on the MNIST-1D CNN's second conv (K = 9, 25 -> 25 channels, length
19, one thread), forward + backward at batch 16 / 128: oneDNN grouped convolution on channel-stacked
(B, K*C, L) activations 889 / 5270 us, im2col via ``F.unfold`` there 897 / 7135 us, this function on
member-major activations 487 / 2923 us.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _tuple(v: int | tuple[int, ...], n: int) -> tuple[int, ...]:
    return (v,) * n if isinstance(v, int) else tuple(v)


class Im2colConv(torch.autograd.Function):
    """``x`` (K*C_in, B, *S), ``w`` (K*C_out, C_in, *kernel), ``bias`` (K*C_out,) or None, ``k`` = K
    members -> (K*C_out, B, *S') (module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        w: Tensor,
        bias: Tensor | None,
        k: int,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
    ) -> Tensor:
        b, nd = x.shape[1], x.dim() - 2
        c_in, c_out, kernel = w.shape[1], w.shape[0] // k, tuple(w.shape[2:])
        xp = F.pad(x, [p for p in reversed(padding) for _ in (0, 1)]) if any(padding) else x
        windows = xp.view(k, c_in, b, *xp.shape[2:])
        for d in range(nd):  # (K, C_in, B, *S', *kernel): a view
            span = dilation[d] * (kernel[d] - 1) + 1
            windows = windows.unfold(3 + d, span, stride[d])
            if dilation[d] > 1:
                windows = windows[..., :: dilation[d]]
        out = tuple(windows.shape[3 : 3 + nd])
        # (K, C_in, *kernel, B, *S') -> columns (K, C_in*|kernel|, B*|S'|): the one copy of the input.
        order = (0, 1, *range(3 + nd, 3 + 2 * nd), 2, *range(3, 3 + nd))
        cols = windows.permute(order).reshape(k, c_in * math.prod(kernel), b * math.prod(out))
        w3 = w.reshape(k, c_out, -1)
        y = torch.bmm(w3, cols) if bias is None else torch.baddbmm(bias.view(k, c_out, 1), w3, cols)
        ctx.save_for_backward(cols, w)
        ctx.geometry = (b, k, c_in, c_out, tuple(x.shape[2:]), out, kernel)
        ctx.conv = (stride, padding, dilation, bias is not None)
        return y.view(k * c_out, b, *out)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor):  # type: ignore[override]
        cols, w = ctx.saved_tensors
        b, k, c_in, c_out, size, out, kernel = ctx.geometry
        stride, padding, dilation, has_bias = ctx.conv
        g = grad.reshape(k, c_out, -1)  # (K, C_out, B*|S'|)
        grad_x = grad_w = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(g, cols.transpose(1, 2)).view_as(w)
        if has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(-1).view(-1)
        if ctx.needs_input_grad[0]:
            grad_cols = torch.bmm(w.reshape(k, c_out, -1).transpose(1, 2), g).view(k, c_in, *kernel, b, *out)
            # col2im straight into the unpadded gradient (contiguous: the ReLU backward before it runs
            # 5x faster than on a strided slice of a padded buffer), each kernel offset's output
            # positions clipped to those that read a real (not padding) input position.
            grad_x = grad.new_zeros(k, c_in, b, *size)
            for offset in itertools.product(*(range(n) for n in kernel)):
                spans = [
                    _span(o * d - p, s, n, extent)
                    for o, d, p, s, n, extent in zip(offset, dilation, padding, stride, out, size,
                                                     strict=True)
                ]
                if any(span is None for span in spans):
                    continue
                target = tuple(slice(first, first + s * (count - 1) + 1, s)
                               for (first, _, count), s in zip(spans, stride, strict=True))
                source = tuple(slice(lo, lo + count) for _, lo, count in spans)
                grad_x[(..., *target)] += grad_cols[(slice(None), slice(None), *offset, slice(None), *source)]
            grad_x = grad_x.view(k * c_in, b, *size)
        return grad_x, grad_w, grad_bias, None, None, None, None


def _span(shift: int, stride: int, out: int, extent: int) -> tuple[int, int, int] | None:
    """The output positions ``s`` (``0 <= s < out``) whose input position ``stride * s + shift`` lies in
    ``[0, extent)``: ``(first input position, first s, count)``, or None when there are none."""
    lo = max(0, -(shift // stride))  # ceil(-shift / stride)
    hi = min(out - 1, (extent - 1 - shift) // stride)
    if hi < lo:
        return None
    return stride * lo + shift, lo, hi - lo + 1


def matmul_conv(x: Tensor, w: Tensor, bias: Tensor | None, k: int, conv: nn.Module) -> Tensor:
    """K members' ``conv`` (its stride, padding and dilation; ``groups == 1``) on member-major ``x``
    (K*C_in, B, *S), as :class:`Im2colConv`."""
    nd = x.dim() - 2
    return Im2colConv.apply(
        x, w, bias, k, _tuple(conv.stride, nd), _tuple(conv.padding, nd), _tuple(conv.dilation, nd)
    )
