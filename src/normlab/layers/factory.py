"""Name -> normalization layer factory, in the spirit of timm's ``create_norm_layer``.

Every layer built here takes input of shape (N, C), (N, C, L) or (N, C, H, W) (C = ``num_channels``).
``dims`` says which PyTorch BatchNorm class to use for ``bn``: 1 -> ``BatchNorm1d`` (features or 1-D
signals), 2 -> ``BatchNorm2d``, 3 -> ``BatchNorm3d``. The other layers accept any of these shapes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

from torch import nn

from normlab.errors import NormlabError

_NORMS: dict[str, Callable[..., nn.Module]] = {}


def register_norm(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``builder(num_channels, **options) -> nn.Module`` under ``name``."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _NORMS:
            raise NormlabError(f"norm {name!r} is already registered")
        _NORMS[name] = builder
        return builder

    return decorator


def list_norms() -> list[str]:
    """Names accepted by :func:`create_norm`, sorted."""
    return sorted(_NORMS)


def norm_options(name: str) -> list[str]:
    """The option names :func:`create_norm` accepts for ``name``."""
    builder = _get_builder(name)
    params = list(inspect.signature(builder).parameters.values())[1:]
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def create_norm(name: str, num_channels: int, **options) -> nn.Module:
    """Build the normalization layer called ``name`` for ``num_channels`` channels.

    Raises:
        NormlabError (a ValueError): unknown name, unknown option or bad option value; the message lists
            what is valid.
    """
    builder = _get_builder(name)
    if not isinstance(num_channels, int) or isinstance(num_channels, bool) or num_channels < 1:
        raise NormlabError(f"num_channels must be a positive int, got {num_channels!r}")
    valid = norm_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise NormlabError(
            f"unknown option(s) {', '.join(unknown)} for norm {name!r}; "
            f"valid options: {', '.join(valid) or 'none'}"
        )
    for option, value in options.items():
        check_option(name, option, value)
    return builder(num_channels, **options)


# Options whose type the factory enforces before a builder sees them (the builders check the ranges).
_BOOL_OPTIONS = ("affine", "per_position", "noise_after_affine")
_NUMBER_OPTIONS = ("eps", "momentum", "dims", "groups", "virtual_batch_size", "warmup_steps", "bn_steps",
                   "r_max", "d_max", "sample_weight", "n_mu", "n_sigma", "r_mu", "r_sigma")  # fmt: skip
# Noise constants beyond this overflow float32 activations (the papers use values below 3).
_NOISE_MAX = {"n_mu": 1e4, "n_sigma": 1e4, "r_mu": 1e4, "r_sigma": 1e4}


def check_option(norm: str, option: str, value: object) -> None:
    """Strict type of one option before the builder checks its range: bools are ``True``/``False`` only
    (``"no"``, ``-1`` or NaN are not booleans), numbers are finite ints/floats (never bools or strings;
    ``momentum`` may be None), and noise constants stay where float32 activations stay finite.

    Raises:
        NormlabError: naming the norm, the option, the value given and what is allowed.
    """
    if option in _BOOL_OPTIONS and not isinstance(value, bool):
        raise NormlabError(
            f"norm {norm!r}: {option} must be True or False, got {type(value).__name__} {value!r}"
        )
    if option not in _NUMBER_OPTIONS or (option == "momentum" and value is None):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NormlabError(f"norm {norm!r}: {option} must be a number, got {type(value).__name__} {value!r}")
    # eps = inf passes the builders' "> 0" and zeroes every output; other ranges are the builders'.
    if option == "eps" and isinstance(value, float) and math.isinf(value):
        raise NormlabError(f"norm {norm!r}: {option} must be finite, got {value!r}")
    if option in _NOISE_MAX and math.isfinite(value) and value > _NOISE_MAX[option]:
        raise NormlabError(
            f"norm {norm!r}: {option} must be <= {_NOISE_MAX[option]:g} (float32 activations overflow "
            f"beyond), got {value!r}"
        )


def _get_builder(name: str) -> Callable[..., nn.Module]:
    _load_builtin_norms()
    if name not in _NORMS:
        raise NormlabError(f"unknown norm {name!r}; valid norms: {', '.join(list_norms())}")
    return _NORMS[name]


def _load_builtin_norms() -> None:
    # The builders live beside the layers they build; importing the package registers them.
    import normlab.layers  # noqa: F401
