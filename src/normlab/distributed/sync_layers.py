"""Cross-replica forms of normlab's BN-like layers: each normalizes with the statistics of the global batch
(:func:`~normlab.distributed.cross_replica_bn.global_batch_stats`) and is otherwise its parent layer.

- :class:`CrossReplicaBatchNorm`: BN (replaces ``nn.BatchNorm*d`` where torch's ``SyncBatchNorm`` cannot
  run: CPU tensors / gloo).
- :class:`CrossReplicaBatchRenorm`: Batch Renorm (Ioffe 2017) whose mu_B, sigma_B, hence r and d, are the
  global batch's.
- :class:`CrossReplicaNoisyBatchNorm`: Santurkar et al.'s noisy BN over global statistics; each replica draws
  its own noise for its own samples (the per-channel draws differ between replicas too).
- :class:`CrossReplicaEvalNorm`: EvalNorm trains as BN: global statistics in training, its blend in eval.
- :class:`CrossReplicaGhostBatchNorm`: ghost BN (Hoffer et al. 2017) over the *global* batch. A ghost batch
  of V samples with per-replica batch b: when b is a multiple of V the ghost batches lie inside each
  replica (no communication); when V is a multiple of b they span V / b consecutive replicas, whose
  statistics are all-reduced within that sub-group (created at conversion).

Running statistics: every replica updates its own buffers from the same global statistics, so they stay
equal on all replicas (one update per step; a single-process ghost BN makes one update per ghost batch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.distributed.cross_replica_bn import (
    CrossReplicaNormFn,
    cross_replica_batch_norm,
    global_batch_stats,
)
from normlab.errors import NormlabError
from normlab.layers._batchnorm_base import BatchStatsNorm, channel_view
from normlab.layers.batch_renorm import BatchRenorm
from normlab.layers.evalnorm import EvalNorm
from normlab.layers.ghost_bn import GhostBatchNorm
from normlab.layers.noisy_bn import NoisyBatchNorm, sample_bn_noise


class CrossReplicaBatchNorm(BatchStatsNorm):
    """BatchNorm with global batch statistics (:func:`cross_replica_batch_norm`); input/output (N_r, C, *S).

    ``process_group``: the replicas sharing statistics (None: the default group, all of them).
    """

    def __init__(self, num_features: int, *, process_group=None, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.process_group = process_group

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        momentum = self._next_momentum() if self.training else 0.0
        return cross_replica_batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=self.training,
            momentum=momentum, eps=self.eps, group=self.process_group,
        )


class CrossReplicaEvalNorm(EvalNorm):
    """EvalNorm whose training-mode BN uses global batch statistics."""

    process_group = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        self._check(x)
        return cross_replica_batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=True,
            momentum=self._next_momentum(), eps=self.eps, group=self.process_group,
        )


class CrossReplicaBatchRenorm(BatchRenorm):
    """Batch Renorm with r = clip(sigma_B / sigma), d = clip((mu_B - mu) / sigma) from the global batch.

    As in :func:`normlab.layers.batch_renorm.batch_renorm`, r and d are constants for backprop, so the
    output is cross-replica BN with weight ``gamma * r`` and bias ``gamma * d + beta``.
    """

    process_group = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        self._check(x)
        r_max, d_max = self.current_limits()
        self.renorm_steps.add_(1)
        momentum = self._next_momentum()
        mean_b, var_b, count = global_batch_stats(x, self.process_group)
        with torch.no_grad():
            inv_sigma = torch.rsqrt(self.running_var + self.eps)
            r = (torch.sqrt(var_b + self.eps) * inv_sigma).clamp_(1.0 / r_max, r_max).to(x.dtype)
            d = ((mean_b - self.running_mean) * inv_sigma).clamp_(-d_max, d_max).to(x.dtype)
            self.running_mean.lerp_(mean_b.to(self.running_mean.dtype), momentum)
            unbiased = var_b * (count / max(count - 1, 1))
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        w = r if self.weight is None else self.weight * r
        b = d if self.weight is None else torch.addcmul(self.bias, self.weight, d)
        invstd = torch.rsqrt(var_b + self.eps)
        return CrossReplicaNormFn.apply(x, w, b, mean_b, invstd, count, self.process_group)


class CrossReplicaNoisyBatchNorm(NoisyBatchNorm):
    """Noisy BN (Santurkar et al. 2018, Alg. 1) after BN with global statistics; noise is per replica."""

    process_group = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        self._check(x)
        momentum = self._next_momentum()
        s, m = sample_bn_noise(x.shape, per_position=self.per_position, generator=self.generator,
                               device=x.device, dtype=x.dtype, **self.noise)
        if self.noise_after_affine or self.weight is None:
            a = cross_replica_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                         training=True, momentum=momentum, eps=self.eps,
                                         group=self.process_group)
            return torch.addcmul(m, s, a)
        x_hat = cross_replica_batch_norm(x, self.running_mean, self.running_var, None, None, training=True,
                                         momentum=momentum, eps=self.eps, group=self.process_group)
        gamma, beta = channel_view(self.weight, x), channel_view(self.bias, x)
        return torch.addcmul(torch.addcmul(beta, gamma, m), x_hat, gamma * s)


class CrossReplicaGhostBatchNorm(GhostBatchNorm):
    """Ghost BN over the global batch (see the module docstring).

    ``ghost_groups``: {replicas per ghost batch k: this replica's sub-group of k consecutive ranks}, built
    by :func:`~normlab.distributed.convert.convert_sync_norm`; ``world_size``: the number of replicas.
    """

    ghost_groups: dict = {}
    world_size: int = 1

    def forward(self, x: Tensor) -> Tensor:
        b, v = x.shape[0], self.virtual_batch_size
        if not self.training or b % v == 0:
            return super().forward(x)  # ghost batches inside this replica: nothing to share
        if v % b != 0 and v < b * self.world_size:
            raise NormlabError(
                f"ghost BN with virtual_batch_size={v} cannot be split over replicas of batch {b}: "
                "one must be a multiple of the other"
            )
        k = min(v // b, self.world_size)
        if k not in self.ghost_groups:
            raise NormlabError(
                f"ghost BN: a ghost batch of {v} spans {k} replicas, which does not divide the "
                f"{self.world_size} replicas"
            )
        self._check(x)
        return cross_replica_batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=True,
            momentum=self._next_momentum(), eps=self.eps, group=self.ghost_groups[k],
        )

