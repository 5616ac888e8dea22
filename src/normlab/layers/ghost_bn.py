"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017, "Train longer, generalize better", Sec. 4).

Training normalizes each *virtual* (ghost) sub-batch of ``virtual_batch_size`` consecutive samples with its
own statistics, so the noise of the batch statistics is that of a small batch while the optimizer sees the
large one. Evaluation is plain BN with the running statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.errors import NormlabError
from normlab.layers._batchnorm_base import BatchStatsNorm, check_batch_size
from normlab.layers.factory import register_norm


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
    spatial positions. Each chunk is one fused ``F.batch_norm`` call, so there is no per-channel loop.

    Running statistics: every ghost batch is one BN update, applied in order, exactly as a BatchNorm layer
    fed the ghost batches one after another would do: ``running = (1 - m) * running + m * stat_g`` with the
    chunk's unbiased variance. A batch of N = k * virtual_batch_size therefore moves the running statistics
    k times (weight ``1 - (1 - m)^k`` in total). With ``momentum=None`` each ghost batch counts once in the
    cumulative average (``num_batches_tracked`` advances by k).

    In eval mode (``training=False``) this is ``F.batch_norm`` with the running statistics.
    """
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    chunks = torch.split(x, virtual_batch_size)
    outs = []
    for chunk in chunks:
        check_batch_size(chunk, "GhostBatchNorm (one ghost batch)")
        m = 0.0 if momentum is None else momentum
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if momentum is None:
                m = 1.0 / float(num_batches_tracked)
        outs.append(F.batch_norm(chunk, running_mean, running_var, weight, bias, True, m, eps))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


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
