"""Noise without normalization: Santurkar et al. 2018 (arXiv 1805.11604, Sec. 2.1)'s control experiment.

The same per-step noise as :class:`normlab.layers.NoisyBatchNorm` (Alg. 1), applied to raw activations with
no normalization: the paper reports that it prevents training, while noisy *BN* trains as well as BN.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.errors import NormlabError
from normlab.layers._batchnorm_base import check_input
from normlab.layers.factory import register_norm
from normlab.layers.noisy_bn import check_noise, expected_scale, sample_bn_noise
from normlab.layers.standard import check_dims


def inject_bn_noise(x: Tensor, *, generator: torch.Generator | None = None, per_position: bool = True,
                    **noise: float) -> Tensor:
    """Alg. 1's noise ``s * x + m`` on ``x`` (N, C, *S) without any normalization (the "noise without BN")."""
    s, m = sample_bn_noise(x.shape, per_position=per_position, generator=generator, device=x.device,
                           dtype=x.dtype, **noise)
    return torch.addcmul(m, x, s)


class NoiseInjection(nn.Module):
    """Alg. 1's noise alone, no normalization and no parameters: the study's "noise without BN" control.

    Training: ``y = s * x + m`` (see :func:`sample_bn_noise`); evaluation: its expectation over the noise,
    ``E[s] * x`` with ``E[s] = (1 + n_sigma) / 2`` (``eval_expectation=False``: identity), as
    :class:`normlab.layers.NoisyBatchNorm`. Shapes (N, C, *S).
    """

    def __init__(
        self, num_features: int, *, n_mu: float = 0.5, n_sigma: float = 1.25, r_mu: float = 0.1,
        r_sigma: float = 0.1, per_position: bool = True, eval_expectation: bool = True, dims: int = 2,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise NormlabError(f"num_features must be a positive int, got {num_features!r}")
        check_noise(n_mu, n_sigma, r_mu, r_sigma)
        self.num_features = num_features
        self.dims = check_dims(dims)
        self.noise = {"n_mu": float(n_mu), "n_sigma": float(n_sigma), "r_mu": float(r_mu),
                      "r_sigma": float(r_sigma)}
        self.per_position = bool(per_position)
        self.eval_expectation = bool(eval_expectation)
        self.generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, type(self).__name__)
        if not self.training:
            return x * expected_scale(self.noise["n_sigma"]) if self.eval_expectation else x
        return inject_bn_noise(x, generator=self.generator, per_position=self.per_position, **self.noise)

    def extra_repr(self) -> str:
        noise = ", ".join(f"{k}={v}" for k, v in self.noise.items())
        return (f"{self.num_features}, dims={self.dims}, {noise}, per_position={self.per_position}, "
                f"eval_expectation={self.eval_expectation}")


@register_norm("noise")
def noise(
    num_channels: int, *, n_mu: float = 0.5, n_sigma: float = 1.25, r_mu: float = 0.1, r_sigma: float = 0.1,
    per_position: bool = True, eval_expectation: bool = True, dims: int = 2,
) -> nn.Module:
    return NoiseInjection(num_channels, n_mu=n_mu, n_sigma=n_sigma, r_mu=r_mu, r_sigma=r_sigma,
                          per_position=per_position, eval_expectation=eval_expectation, dims=dims)
