"""Normalization layers and normalizer-free parts, by name (:func:`create_norm`), for any model.

Registered names: ``bn``, ``gn``, ``ln``, ``in``, ``none`` (PyTorch's layers), ``frozen_bn``, ``ghost_bn``,
``batch_renorm``, ``noisy_bn``, ``noise``, ``evalnorm``. Model tools: :func:`convert_norm`, :func:`fold_bn`,
:func:`precise_bn`, :func:`fit_evalnorm`. Normalizer-free parts: Scaled WS layers, :func:`activation_gamma`,
:class:`SkipInit`, :func:`to_normalizer_free` (a whole model).
"""

from normlab.layers import standard  # noqa: F401  (registers bn, gn, ln, in, none)
from normlab.layers._batchnorm_base import BatchStatsNorm
from normlab.layers.activation_gamma import activation_gamma
from normlab.layers.batch_renorm import BatchRenorm, batch_renorm
from normlab.layers.convert import convert_norm
from normlab.layers.evalnorm import EvalNorm, eval_norm, fit_evalnorm
from normlab.layers.factory import create_norm, list_norms, norm_options, register_norm
from normlab.layers.fold_bn import fold_bn
from normlab.layers.frozen_bn import FrozenBatchNorm, frozen_batch_norm
from normlab.layers.ghost_bn import GhostBatchNorm, ghost_batch_norm
from normlab.layers.noise import NoiseInjection, inject_bn_noise
from normlab.layers.noisy_bn import NoisyBatchNorm, noisy_batch_norm, sample_bn_noise
from normlab.layers.normalizer_free import to_normalizer_free
from normlab.layers.precise_bn import precise_bn
from normlab.layers.skipinit import SkipInit
from normlab.layers.standard import default_groups
from normlab.layers.std_conv import ScaledStdConv1d, ScaledStdConv2d, ScaledStdLinear, scaled_std_weight

__all__ = [
    "BatchRenorm", "BatchStatsNorm", "EvalNorm", "FrozenBatchNorm", "GhostBatchNorm", "NoiseInjection",
    "NoisyBatchNorm",
    "ScaledStdConv1d", "ScaledStdConv2d", "ScaledStdLinear", "SkipInit", "activation_gamma", "batch_renorm",
    "convert_norm", "create_norm", "default_groups",
    "eval_norm", "fit_evalnorm", "fold_bn", "frozen_batch_norm",
    "ghost_batch_norm", "inject_bn_noise", "list_norms", "noisy_batch_norm", "norm_options", "precise_bn",
    "register_norm", "sample_bn_noise", "scaled_std_weight", "to_normalizer_free",
]
