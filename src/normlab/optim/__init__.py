"""Optimizer tools: Adaptive Gradient Clipping (:func:`adaptive_clip_grad_`, :func:`agc_parameters`)."""

from normlab.optim.agc import adaptive_clip_grad_, agc_parameters, unitwise_norms

__all__ = ["adaptive_clip_grad_", "agc_parameters", "unitwise_norms"]
