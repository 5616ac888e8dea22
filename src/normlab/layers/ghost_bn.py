"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017, "Train longer, generalize better", Sec. 4).

Training normalizes each *virtual* (ghost) sub-batch of ``virtual_batch_size`` consecutive samples with its
own statistics, so the noise of the batch statistics is that of a small batch while the optimizer sees the
large one. Evaluation is plain BN with the running statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from normlab.errors import NormlabError
from normlab.layers._batchnorm_base import BatchStatsNorm, check_batch_size, under_vmap
from normlab.layers.factory import register_norm


class _GhostBatchNormFn(torch.autograd.Function):
    """Training-mode ghost BN: one fused ``native_batch_norm`` per ghost batch, written in place into slices
    of one output, and one fused ``native_batch_norm_backward`` per ghost batch in the backward.

    Ghost batches are consecutive samples, so each one is a contiguous slice of x: each kernel reads and
    writes its slice directly (``out=``) and no ``torch.cat`` (forward) or concatenated gradient (backward)
    is materialized. Those two copies made the old split + ``F.batch_norm`` + cat version 1.44x
    ``nn.BatchNorm2d``'s forward+backward time (benchmarks/layers.py). The running statistics are updated
    by the kernels themselves, ghost batch after ghost batch, with ``momenta[g]`` for ghost batch g.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, size, momenta, eps):
        x = x.contiguous()
        out = torch.empty_like(x)
        k, c = len(momenta), x.shape[1]
        stat_dtype = x.dtype if weight is None else weight.dtype
        means = x.new_empty((k, c), dtype=stat_dtype)
        invstds = x.new_empty((k, c), dtype=stat_dtype)
        for g, m in enumerate(momenta):
            rows = slice(g * size, (g + 1) * size)
            torch.ops.aten.native_batch_norm.out(
                x[rows], weight, bias, running_mean, running_var, True, m, eps,
                out=out[rows], save_mean=means[g], save_invstd=invstds[g],
            )
        ctx.save_for_backward(x, weight, means, invstds)
        ctx.size, ctx.eps = size, eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, means, invstds = ctx.saved_tensors
        dy = dy.contiguous()
        affine = weight is not None
        # The out= kernel needs every output defined (it rejects a masked-out one), so it always computes
        # dx, dgamma and dbeta (the last two are the reductions dx needs anyway); without gamma, ones give
        # the same dx.
        kernel_weight = weight if affine else x.new_ones(x.shape[1], dtype=means.dtype)
        if under_vmap(dy):
            # Under vmap (e.g. autograd.grad(is_grads_batched=True)) out= kernels have no batching rule: the
            # functional kernel per ghost batch, then one concatenation.
            grads = [torch.ops.aten.native_batch_norm_backward(
                dy[g * ctx.size:(g + 1) * ctx.size], x[g * ctx.size:(g + 1) * ctx.size], kernel_weight, None,
                None, means[g], invstds[g], True, ctx.eps, [True, True, True]) for g in range(len(means))]
            dx = torch.cat([gr[0] for gr in grads])
            dws, dbs = torch.stack([gr[1] for gr in grads]), torch.stack([gr[2] for gr in grads])
        else:
            dx = torch.empty_like(x)
            dws = kernel_weight.new_empty((len(means), x.shape[1]))
            dbs = kernel_weight.new_empty((len(means), x.shape[1]))
            for g in range(len(means)):
                rows = slice(g * ctx.size, (g + 1) * ctx.size)
                torch.ops.aten.native_batch_norm_backward.out(
                    dy[rows], x[rows], kernel_weight, None, None, means[g], invstds[g], True, ctx.eps,
                    [True, True, True], out0=dx[rows], out1=dws[g], out2=dbs[g],
                )
        dw = dws.sum(0) if affine and ctx.needs_input_grad[1] else None
        db = dbs.sum(0) if affine and ctx.needs_input_grad[2] else None
        dx = dx if ctx.needs_input_grad[0] else None
        return dx, dw, db, None, None, None, None, None


def ghost_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    virtual_batch_size: int,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """Ghost BN: ``y[g] = gamma * (x[g] - mean_g) / sqrt(var_g + eps) + beta`` for each ghost batch g.

    ``x`` (N, C, *spatial) is split along N into chunks of ``virtual_batch_size`` (the last one holds the
    remainder, as ``torch.split`` does); mean_g and var_g (biased) are taken over the chunk's samples and
    spatial positions. Each chunk is one fused BN kernel writing into its slice of the output
    (:class:`_GhostBatchNormFn`), so there is no per-channel loop and no concatenation.

    Running statistics: every ghost batch is one BN update, applied in order, exactly as a BatchNorm layer
    fed the ghost batches one after another would do: ``running = (1 - m) * running + m * stat_g`` with the
    chunk's unbiased variance. A batch of N = k * virtual_batch_size therefore moves the running statistics
    k times (weight ``1 - (1 - m)^k`` in total). With ``momentum=None`` each ghost batch counts once in the
    cumulative average (``num_batches_tracked`` advances by k).

    In eval mode (``training=False``) this is ``F.batch_norm`` with the running statistics.
    """
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    n, v = x.shape[0], virtual_batch_size
    sizes = [min(v, n - start) for start in range(0, n, v)]
    for size in sizes:
        check_batch_size(x[:size], "GhostBatchNorm (one ghost batch)")
    momenta = []
    for _ in sizes:
        m = 0.0 if momentum is None else momentum
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if momentum is None:
                m = 1.0 / float(num_batches_tracked)
        momenta.append(m)
    if under_vmap(x):  # out= kernels have no vmap batching rules
        chunks = [F.batch_norm(chunk, running_mean, running_var, weight, bias, True, m, eps)
                  for chunk, m in zip(torch.split(x, v), momenta, strict=True)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return _GhostBatchNormFn.apply(x, weight, bias, running_mean, running_var, v, momenta, eps)


class GhostBatchNorm(BatchStatsNorm):
    """BatchNorm over ghost batches of ``virtual_batch_size`` samples (see :func:`ghost_batch_norm`).

    Shapes: input and output (N, C, *spatial). With ``virtual_batch_size >= N`` it is exactly
    ``nn.BatchNorm{dims}d`` (outputs and running statistics).
    """

    def __init__(
        self, num_features: int, virtual_batch_size: int = 32, *, dims: int = 2, eps: float = 1e-5,
        momentum: float | None = 0.1, affine: bool = True,
    ) -> None:
        super().__init__(num_features, dims=dims, eps=eps, momentum=momentum, affine=affine)
        vbs = virtual_batch_size
        if not isinstance(vbs, int) or isinstance(vbs, bool) or vbs < 2:
            raise NormlabError(f"virtual_batch_size must be an int >= 2, got {virtual_batch_size!r}")
        self.virtual_batch_size = virtual_batch_size

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        return ghost_batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            virtual_batch_size=self.virtual_batch_size, training=self.training, momentum=self.momentum,
            eps=self.eps, num_batches_tracked=self.num_batches_tracked,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


@register_norm("ghost_bn")
def ghost_bn(
    num_channels: int, *, virtual_batch_size: int = 32, dims: int = 2, eps: float = 1e-5,
    momentum: float | None = 0.1, affine: bool = True,
) -> nn.Module:
    return GhostBatchNorm(
        num_channels, virtual_batch_size, dims=dims, eps=eps, momentum=momentum, affine=affine
    )
