"""Frozen Batch Normalization: BN with fixed statistics and fixed affine parameters (torchvision's
``FrozenBatchNorm2d``; the "FrozenBN" of Wu & Johnson 2021, "Rethinking batch in BatchNorm", Sec. 5).

The layer is the affine map BN computes at inference, in training and evaluation alike:
``y = x * scale + shift`` with ``scale = weight / sqrt(running_var + eps)`` and
``shift = bias - running_mean * scale``. Nothing is learned and no statistic is updated, so a network can be
fine-tuned with small batches without the train/test inconsistency of batch statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.errors import NormlabError
from normlab.layers._batchnorm_base import channel_view, check_input
from normlab.layers.factory import register_norm
from normlab.layers.standard import check_dims, check_eps


def frozen_batch_norm(
    x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5
) -> Tensor:
    """``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` per channel (dim 1) of ``x``."""
    scale = weight * torch.rsqrt(running_var + eps)
    shift = bias - running_mean * scale
    return torch.addcmul(channel_view(shift, x), x, channel_view(scale, x))


class FrozenBatchNorm(nn.Module):
    """BN with frozen statistics and affine parameters, all buffers (see :func:`frozen_batch_norm`).

    Shapes: input and output (N, C, *spatial). Buffers ``weight``, ``bias``, ``running_mean``,
    ``running_var`` carry torch BN's names, so a BatchNorm state dict loads into it (its
    ``num_batches_tracked`` is ignored).
    """

    def __init__(self, num_features: int, *, dims: int = 2, eps: float = 1e-5) -> None:
        super().__init__()
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise NormlabError(f"num_features must be a positive int, got {num_features!r}")
        self.num_features = num_features
        self.dims = check_dims(dims)
        self.eps = check_eps(eps)
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @classmethod
    def from_bn(cls, bn: nn.Module) -> FrozenBatchNorm:
        """A FrozenBatchNorm computing what ``bn`` computes in eval mode (statistics and affine copied)."""
        frozen = cls(bn.num_features, dims=getattr(bn, "dims", 2), eps=bn.eps)
        if bn.running_mean is None:
            raise NormlabError(f"cannot freeze {type(bn).__name__} without running statistics")
        ref = bn.running_mean
        frozen = frozen.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight)
            if bn.bias is not None:
                frozen.bias.copy_(bn.bias)
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A BatchNorm checkpoint has this counter; it means nothing for frozen statistics.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, type(self).__name__)
        out = frozen_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)
        return out.to(x.dtype)  # float32 buffers with fp16/bf16 input: the output keeps the input's dtype

    def extra_repr(self) -> str:
        return f"{self.num_features}, dims={self.dims}, eps={self.eps}"


@register_norm("frozen_bn")
def frozen_bn(num_channels: int, *, dims: int = 2, eps: float = 1e-5) -> nn.Module:
    return FrozenBatchNorm(num_channels, dims=dims, eps=eps)
