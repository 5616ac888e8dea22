"""State and input checks shared by normlab's batch-statistics layers (ghost, renorm, noisy, EvalNorm).

The buffers and parameters carry the names of ``torch.nn.BatchNorm*d`` (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``) so state dicts move between a torch BN and any
of these layers, and :func:`normlab.layers.convert_norm` / :func:`normlab.layers.precise_bn` /
:func:`normlab.layers.fold_bn` treat them alike. Running statistics follow PyTorch: the batch's *unbiased*
variance enters ``running_var``; ``momentum=None`` makes it a cumulative average.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.errors import NormlabError
from normlab.layers.standard import check_dims, check_eps, check_momentum


def check_input(x: Tensor, num_features: int, layer: str) -> None:
    """Raise NormlabError unless ``x`` is (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), C channels."""
    if not 2 <= x.dim() <= 5:
        raise NormlabError(
            f"{layer} expects input of shape (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[1] != num_features:
        raise NormlabError(
            f"{layer} expected {num_features} channels (input.shape[1]), got {x.shape[1]} "
            f"(input shape {tuple(x.shape)})"
        )


def check_batch_size(x: Tensor, layer: str) -> None:
    """Training-mode batch statistics need more than one value per channel (PyTorch raises the same)."""
    if x.numel() // max(x.shape[1], 1) <= 1:
        raise NormlabError(
            f"{layer}: expected more than 1 value per channel when training, got input of shape "
            f"{tuple(x.shape)}"
        )


def reduce_dims(x: Tensor) -> list[int]:
    """The dimensions a batch statistic averages over: N and every spatial dimension."""
    return [0, *range(2, x.dim())]


def under_vmap(t: Tensor) -> bool:
    """Inside a functorch transform, or given a vmap-batched tensor (``autograd.grad(is_grads_batched=True)``
    hands a backward a legacy-vmap tensor carrying the Batched dispatch key): then ``out=`` and in-place
    kernels, which have no batching rule, must give way to functional ones."""
    return (torch._C._are_functorch_transforms_active() or torch._C._functorch.is_batchedtensor(t)
            or "Batched" in str(torch._C._dispatch_keys(t)))


def channel_view(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a (C,) tensor so it broadcasts against ``x`` of shape (N, C, *spatial)."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


class BatchStatsNorm(nn.Module):
    """Base of the BN-like layers: affine parameters, running statistics and the momentum schedule.

    Args:
        num_features: C, the number of channels.
        dims: 1, 2 or 3; recorded so :func:`convert_norm` can map the layer back to ``BatchNorm{dims}d``.
            The layers accept any input of shape (N, C, *spatial).
        eps: added to the variance before the square root.
        momentum: weight of the new batch in the running statistics; ``None`` = cumulative average.
        affine: learnable per-channel ``weight`` (gamma, init 1) and ``bias`` (beta, init 0).
    """

    def __init__(
        self, num_features: int, *, dims: int = 2, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise NormlabError(f"num_features must be a positive int, got {num_features!r}")
        self.num_features = num_features
        self.dims = check_dims(dims)
        self.eps = check_eps(eps)
        self.momentum = check_momentum(momentum)
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def _next_momentum(self) -> float:
        """Count one running-statistics update and return its weight (1/n for the cumulative average)."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _check(self, x: Tensor) -> None:
        check_input(x, self.num_features, type(self).__name__)
        if self.training:
            check_batch_size(x, type(self).__name__)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, dims={self.dims}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}"
        )
