"""Name -> model factory: :func:`create_model` and :func:`list_models`.

A builder is registered as ``builder(*, norm, num_classes, in_channels, dims, width, depth, norm_options,
**its_options) -> nn.Module``; the keyword-only parameters after the common ones are the options
``create_model`` accepts for that model, validated here so every model reports a bad option the same way.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from normlab.errors import NormlabError
from normlab.layers import list_norms
from normlab.models._layers import check_positive_float, check_positive_int

_COMMON = ("norm", "num_classes", "in_channels", "dims", "width", "depth", "norm_options")
_MODELS: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {}
_DEFAULT_NORMS: dict[str, str] = {}
NF = "nf"


def register_model(
    name: str, default_norm: str = "bn"
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a model builder under ``name``; ``default_norm`` is used when ``norm=None``."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS or name in _ALIASES:
            raise NormlabError(f"model {name!r} is already registered")
        _MODELS[name] = builder
        _DEFAULT_NORMS[name] = default_norm
        return builder

    return decorator


def register_alias(alias: str, name: str, **fixed: Any) -> None:
    """``alias`` builds ``name`` with the arguments in ``fixed`` (e.g. ``resnet20`` = resnet, depth=20)."""
    if alias in _MODELS or alias in _ALIASES:
        raise NormlabError(f"model {alias!r} is already registered")
    _ALIASES[alias] = (name, fixed)


def list_models() -> list[str]:
    """Names accepted by :func:`create_model` (models and aliases), sorted."""
    _load_builtin_models()
    return sorted([*_MODELS, *_ALIASES])


def model_options(name: str) -> list[str]:
    """The model-specific option names :func:`create_model` accepts for ``name``."""
    base, fixed = _resolve(name)
    params = inspect.signature(_MODELS[base]).parameters.values()
    return [
        p.name
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _COMMON and p.name not in fixed
    ]


def create_model(
    name: str,
    *,
    norm: str | None = None,
    num_classes: int = 10,
    in_channels: int = 1,
    dims: int = 1,
    width: float | None = None,
    depth: int | None = None,
    norm_options: dict[str, Any] | None = None,
    **options: Any,
) -> nn.Module:
    """Build model ``name`` with normalization ``norm`` (any name of ``normlab.layers.list_norms()``, or
    ``"nf"`` for the model's normalizer-free variant: Scaled WS convs/linears, no norm layers; ``None``: the
    model's default, ``"bn"`` for every model but ``nf_resnet``, whose only norm is ``"nf"``).

    Args:
        num_classes: size of the classifier's output (for regression: the output dimension).
        in_channels: channels of the input, (N, in_channels, L) for ``dims=1``, (N, in_channels, H, W) for 2.
        width, depth: the model's width / depth knob (see each model; ``None`` = the paper's default).
        norm_options: passed to ``create_norm`` for every norm layer (e.g. ``{"groups": 8}`` for ``gn``).
        options: model-specific options, listed by :func:`model_options`.

    Raises:
        NormlabError: unknown model, norm or option, or a bad value; the message lists what is valid.
    """
    base, fixed = _resolve(name)
    norm = _DEFAULT_NORMS[base] if norm is None else norm
    _check_common(norm, num_classes, in_channels, dims, width, depth, norm_options)
    if depth is not None:
        depth = check_positive_int("depth", depth)
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        given, allowed = ", ".join(unknown), ", ".join(valid) or "none"
        raise NormlabError(f"unknown option(s) {given} for model {name!r}; valid options: {allowed}")
    args = dict(
        norm=norm, num_classes=num_classes, in_channels=in_channels, dims=dims, width=width, depth=depth
    )
    for key, value in fixed.items():
        if args.get(key) is not None and args[key] != value:
            raise NormlabError(f"model {name!r} fixes {key}={value}, got {key}={args[key]!r}")
        args[key] = value
    return _MODELS[base](**args, norm_options=dict(norm_options or {}), **options)


def _resolve(name: str) -> tuple[str, dict[str, Any]]:
    _load_builtin_models()
    if name in _ALIASES:
        return _ALIASES[name]
    if name not in _MODELS:
        raise NormlabError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    return name, {}


def _check_common(
    norm: object,
    num_classes: object,
    in_channels: object,
    dims: object,
    width: object,
    depth: object,
    norm_options: object,
) -> None:
    valid_norms = [*list_norms(), NF]
    if norm not in valid_norms:
        raise NormlabError(f"unknown norm {norm!r}; valid norms: {', '.join(valid_norms)}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise NormlabError(f"num_classes must be an int >= 0 (0 only for dln), got {num_classes!r}")
    check_positive_int("in_channels", in_channels)
    if dims not in (1, 2):
        raise NormlabError(f"dims must be 1 (N, C, L) or 2 (N, C, H, W), got {dims!r}")
    if width is not None:
        check_positive_float("width", width)
    if depth is not None:
        check_positive_int("depth", depth)
    if norm_options is not None and not isinstance(norm_options, dict):
        raise NormlabError(f"norm_options must be a dict of create_norm options, got {norm_options!r}")
    if norm_options and "dims" in norm_options:
        raise NormlabError(
            "norm_options may not set dims: pass dims= to create_model, every norm layer follows it"
        )


def check_classes(name: str, num_classes: int) -> int:
    if num_classes < 1:
        raise NormlabError(f"{name} needs num_classes >= 1, got {num_classes}")
    return num_classes


def _load_builtin_models() -> None:
    # Builders live beside their models; importing the package registers them.
    import normlab.models  # noqa: F401
