"""K members' convolutions (``groups == 1`` per member) as im2col and one batched matmul, on member-major
activations (the layout of :mod:`normlab.batched.grouped`: (K*C, B, *S), member k's C channels contiguous,
then the batch, then the spatial dims):

    y[k, o, b, s] = bias[k, o] + sum_{c, j} w[k, o, c, j] * x_pad[k, c, b, stride * s + dilation * j]

(``j`` and ``s`` run over the kernel's and the output's positions, one index per spatial dim). Forward:
the input is copied once into columns (K, C_in*|kernel|, B*|S'|), each column one (kernel offset, example,
output position) of a channel, and multiplied by the (K, C_out, C_in*|kernel|) weights in one
``torch.bmm``, whose result is already the member-major output. Backward, written out
(:class:`Im2colConv`): the weight gradient is one ``bmm`` with the saved columns, the bias gradient a sum,
and the input gradient one ``bmm`` back to columns followed by col2im, each column's gradient added to the
input position it read (none for those that read padding), into a contiguous gradient (a strided slice of
a padded buffer made the ReLU backward before it 5x slower: 706 vs 130 us on (225, 128, 19), one thread).

Two ways to copy the columns, by a fixed rule on their size (K*C_in*|kernel|*B*|S'| entries), never by
timing; both give the same numbers bit for bit (col2im adds in kernel-offset order either way):

* up to 2^20 entries (4 MiB: the MNIST-1D CNN's convs at batch 16 to 128): a gather, ``index_select``
  of each channel's row of inputs at a precomputed index (:func:`_window_index`), and col2im as
  ``index_add_`` at the same index. The strided copy below runs short inner loops there (a stride-2 conv
  on length 19 copies runs of 10 elements 2 apart). Forward + backward, one thread, input gradient on,
  strided -> gather: the CNN's second conv (K = 9) at batch 16 853 -> 719 us, its third 555 -> 413, the
  second at batch 128 4664 -> 3622 us; 2-D 8 x 8 maps, K = 3, 32 channels, batch 32: 7.5 -> 7.0 ms.
* more: the padded input's windows (``Tensor.unfold``, a view) copied by one ``reshape``, and col2im as
  |kernel| strided additions clipped to the positions that read real input. Past a few MiB the copy is
  memory-bound and the gather's index adds to the traffic: the studies' VGG convs on MNIST-1D (K = 3,
  batch 128, 3M entries) 1.04-1.12x slower gathered, 2-D 16 x 16 maps (K = 3, 16 channels, batch 32)
  1.12x.

Why by hand: the same computation left to autograd (``F.unfold`` or ``Tensor.unfold`` and permutes) spends
most of its backward in generic view-backward kernels, and oneDNN's grouped convolution is slow per FLOP
for few channels per group. Measured on the MNIST-1D CNN's second conv (K = 9, 25 -> 25 channels, length
19, one thread), forward + backward at batch 16 / 128: oneDNN grouped convolution on channel-stacked
(B, K*C, L) activations 889 / 5270 us, im2col via ``F.unfold`` there 897 / 7135 us, this function on
member-major activations (with the strided copy) 487 / 2923 us.
"""

from __future__ import annotations

import functools
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
        b, size = x.shape[1], tuple(x.shape[2:])
        c_in, c_out, kernel = w.shape[1], w.shape[0] // k, tuple(w.shape[2:])
        out = tuple(
            (n + 2 * p - d * (kk - 1) - 1) // s + 1
            for n, p, d, kk, s in zip(size, padding, dilation, kernel, stride, strict=True)
        )
        gather = x.shape[0] * math.prod(kernel) * b * math.prod(out) <= GATHER_COLUMNS
        # Columns (K*C_in, |kernel|*B*|S'|) = (K, C_in*|kernel|, B*|S'|): the one copy of the input.
        if gather:
            index, padded = _window_index(b, size, out, kernel, stride, padding, dilation, x.device)
            cols = x.reshape(x.shape[0], -1).index_select(1, index)
            if padded is not None:
                cols.index_fill_(1, padded, 0.0)
            ctx.save_for_backward(cols, w, index, padded)
        else:
            cols = _window_view(x, k, kernel, stride, padding, dilation).reshape(k * c_in, -1)
            ctx.save_for_backward(cols, w)
        cols = cols.view(k, c_in * math.prod(kernel), b * math.prod(out))
        w3 = w.reshape(k, c_out, -1)
        y = torch.bmm(w3, cols) if bias is None else torch.baddbmm(bias.view(k, c_out, 1), w3, cols)
        ctx.geometry = (b, k, c_in, c_out, size, out, kernel, bias is not None)
        ctx.conv = (stride, padding, dilation, gather)
        return y.view(k * c_out, b, *out)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor):  # type: ignore[override]
        cols, w, *gather_index = ctx.saved_tensors
        b, k, c_in, c_out, size, out, kernel, has_bias = ctx.geometry
        stride, padding, dilation, gather = ctx.conv
        cols = cols.view(k, c_in * math.prod(kernel), b * math.prod(out))
        g = grad.reshape(k, c_out, -1)  # (K, C_out, B*|S'|)
        grad_x = grad_w = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(g, cols.transpose(1, 2)).view_as(w)
        if has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(-1).view(-1)
        if ctx.needs_input_grad[0]:
            grad_cols = torch.bmm(w.reshape(k, c_out, -1).transpose(1, 2), g)
            if gather:
                # Every column's gradient added to the input position it read, in kernel-offset order; the
                # columns that read padding are zeroed and added to a clamped position (adding 0).
                index, padded = gather_index
                grad_cols = grad_cols.view(k * c_in, -1)
                if padded is not None:
                    grad_cols.index_fill_(1, padded, 0.0)
                grad_x = grad.new_zeros(k * c_in, b * math.prod(size)).index_add_(1, index, grad_cols)
            else:
                grad_x = _strided_col2im(grad_cols.view(k, c_in, *kernel, b, *out), size, stride, padding,
                                         dilation)
            grad_x = grad_x.view(k * c_in, b, *size)
        return grad_x, grad_w, grad_bias, None, None, None, None


# Column entries (K*C_in*|kernel|*B*|S'|, 4 MiB of float32) up to which the gather copies them (module
# docstring).
GATHER_COLUMNS = 2**20


def _window_view(
    x: Tensor, k: int, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> Tensor:
    """The padded input's windows as a view (K, C_in, *kernel, B, *S') of ``x`` (K*C_in, B, *S)."""
    b, nd = x.shape[1], x.dim() - 2
    xp = F.pad(x, [p for p in reversed(padding) for _ in (0, 1)]) if any(padding) else x
    windows = xp.view(k, -1, b, *xp.shape[2:])
    for d in range(nd):  # (K, C_in, B, *S', *kernel)
        span = dilation[d] * (kernel[d] - 1) + 1
        windows = windows.unfold(3 + d, span, stride[d])
        if dilation[d] > 1:
            windows = windows[..., :: dilation[d]]
    return windows.permute(0, 1, *range(3 + nd, 3 + 2 * nd), 2, *range(3, 3 + nd))


def _strided_col2im(
    grad_cols: Tensor, size: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> Tensor:
    """col2im of ``grad_cols`` (K, C_in, *kernel, B, *S') into a new (K, C_in, B, *S): one strided addition
    per kernel offset, its output positions clipped to those that read a real (not padding) input."""
    nd = len(size)
    kernel, out = grad_cols.shape[2 : 2 + nd], grad_cols.shape[3 + nd :]
    grad_x = grad_cols.new_zeros(*grad_cols.shape[:2], grad_cols.shape[2 + nd], *size)
    for offset in itertools.product(*(range(n) for n in kernel)):
        spans = [
            _span(o * d - p, s, n, extent)
            for o, d, p, s, n, extent in zip(offset, dilation, padding, stride, out, size, strict=True)
        ]
        if any(span is None for span in spans):
            continue
        target = tuple(slice(first, first + s * (count - 1) + 1, s)
                       for (first, _, count), s in zip(spans, stride, strict=True))
        source = tuple(slice(lo, lo + count) for _, lo, count in spans)
        grad_x[(..., *target)] += grad_cols[(slice(None), slice(None), *offset, slice(None), *source)]
    return grad_x


def _span(shift: int, stride: int, out: int, extent: int) -> tuple[int, int, int] | None:
    """The output positions ``s`` (``0 <= s < out``) whose input position ``stride * s + shift`` lies in
    ``[0, extent)``: ``(first input position, first s, count)``, or None when there are none."""
    lo = max(0, -(shift // stride))  # ceil(-shift / stride)
    hi = min(out - 1, (extent - 1 - shift) // stride)
    if hi < lo:
        return None
    return stride * lo + shift, lo, hi - lo + 1


@functools.lru_cache(maxsize=64)
def _window_index(
    batch: int,
    size: tuple[int, ...],
    out: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    device: torch.device,
) -> tuple[Tensor, Tensor | None]:
    """For each column (kernel offset ``j``, example ``b``, output position ``s``, in that order), the
    position it reads in a channel's row of B*|S| inputs: ``b |S| + sum_d (stride_d s_d + dilation_d j_d -
    padding_d) * (S_{d+1} ... S_{nd})``, clamped into the input where it falls into padding; and the
    columns that read padding (None if none do)."""
    nd = len(size)
    shape = (*kernel, batch, *out)
    index = torch.arange(batch).view(*([1] * nd), batch, *([1] * nd)) * math.prod(size)
    valid = torch.ones(shape, dtype=torch.bool)
    for d in range(nd):
        j = torch.arange(kernel[d]).view(*([1] * d), kernel[d], *([1] * (2 * nd - d)))
        s = torch.arange(out[d]).view(*([1] * (nd + 1 + d)), out[d], *([1] * (nd - 1 - d)))
        position = stride[d] * s + dilation[d] * j - padding[d]
        valid = valid & (position >= 0) & (position < size[d])
        index = index + position.clamp(0, size[d] - 1) * math.prod(size[d + 1 :])
    index = index.expand(shape).reshape(-1)
    padded = (~valid).reshape(-1).nonzero().squeeze(1)
    return index.to(device), (padded.to(device) if padded.numel() else None)


def matmul_conv(x: Tensor, w: Tensor, bias: Tensor | None, k: int, conv: nn.Module) -> Tensor:
    """K members' ``conv`` (its stride, padding and dilation; ``groups == 1``) on member-major ``x``
    (K*C_in, B, *S), as :class:`Im2colConv`."""
    nd = x.dim() - 2
    return Im2colConv.apply(
        x, w, bias, k, _tuple(conv.stride, nd), _tuple(conv.padding, nd), _tuple(conv.dilation, nd)
    )
