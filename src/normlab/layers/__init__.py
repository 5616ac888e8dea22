"""Normalization layers and normalizer-free parts, by name (:func:`create_norm`), for any model."""

from normlab.layers import standard  # noqa: F401  (registers bn, gn, ln, in, none)
from normlab.layers.factory import create_norm, list_norms, norm_options, register_norm

__all__ = ["create_norm", "list_norms", "norm_options", "register_norm"]
