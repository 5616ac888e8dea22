"""Gain constants gamma of the activations for Scaled Weight Standardization (Brock et al. 2021a,
arXiv 2101.08692, Sec. 4 and Appendix; the values of deepmind-research ``nfnets/base.py`` and timm).

gamma = 1 / sqrt(Var[g(z)]) for z ~ N(0, 1): multiplying the activation's output by gamma restores unit
variance. The table holds the empirical values of the official code (e.g. relu 1.7139588594436646; the
analytic sqrt(2 / (1 - 1/pi)) = 1.71286 differs in the third decimal).
"""

from __future__ import annotations

from normlab.errors import NormlabError

_GAMMAS: dict[str, float] = {
    "identity": 1.0,
    "relu": 1.7139588594436646,
    "gelu": 1.7015043497085571,
    "silu": 1.7881293296813965,
    "elu": 1.2716004848480225,
    "leaky_relu": 1.70590341091156,
    "tanh": 1.5939117670059204,
    "sigmoid": 4.803835391998291,
    "selu": 1.0008515119552612,
}


def activation_gamma(name: str) -> float:
    """The Scaled WS gain constant of activation ``name`` (one of :data:`_GAMMAS`'s keys)."""
    if name not in _GAMMAS:
        valid = ", ".join(sorted(_GAMMAS))
        raise NormlabError(f"unknown activation {name!r} for activation_gamma; valid: {valid}")
    return _GAMMAS[name]
