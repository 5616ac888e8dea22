"""Build a user's model from its spec and put the requested normalization in it.

``norm="bn"`` keeps the model as built; ``"nf"`` runs :func:`normlab.layers.to_normalizer_free`; any other
name of ``normlab.layers.list_norms()`` swaps every norm layer through :func:`normlab.layers.convert_norm`.
The factory gets ``model_options`` as keyword arguments, plus ``num_classes`` / ``in_channels`` when its
signature names them (or, for ``num_classes``, takes ``**kwargs``, as torchvision's builders do) and the
options do not set them. The built model is checked on two examples of the data: its output must be
(2, outputs).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.external.spec import call_signature, load_factory


def build_external_model(
    spec: str,
    *,
    norm: str,
    norm_options: dict[str, Any],
    options: dict[str, Any],
    outputs: int,
    in_channels: int,
    sample: torch.Tensor,
) -> nn.Module:
    """The model ``spec``'s factory returns, with ``norm`` applied, checked on ``sample`` (a few examples).

    Raises:
        NormlabError: the factory cannot be loaded, raises, returns something other than an ``nn.Module``,
            or a model whose output on ``sample`` is not (len(sample), outputs); or a norm it cannot take.
    """
    factory = load_factory(spec)
    kwargs = dict(options)
    if "num_classes" not in kwargs and takes_option(factory, "num_classes"):
        kwargs["num_classes"] = outputs
    if "in_channels" not in kwargs and takes_option(factory, "in_channels", var_keyword=False):
        kwargs["in_channels"] = in_channels
    try:
        model = factory(**kwargs)
    except (Exception, SystemExit) as exc:  # a factory's sys.exit() would end normlab without a word
        message = f"called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else \
            (f"{type(exc).__name__}: {exc}".splitlines() or [type(exc).__name__])[0]
        raise NormlabError(f"model factory {spec!r} raised {message}") from None
    if not isinstance(model, nn.Module):
        raise NormlabError(f"model factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    model = apply_norm(model, norm, norm_options, spec)
    check_outputs(model, sample, outputs, spec)
    return model


def takes_option(factory: Any, name: str, *, var_keyword: bool = True) -> bool:
    """Whether ``factory`` (a callable or a spec) has a parameter ``name`` (keyword-only included), or
    takes ``**kwargs`` when ``var_keyword``; False when its signature cannot be read (nothing is passed)."""
    if isinstance(factory, str):
        factory = load_factory(factory)
    signature = call_signature(factory)
    if signature is None:
        return False
    params = signature.parameters
    named = name in params and params[name].kind is not inspect.Parameter.POSITIONAL_ONLY
    return named or (var_keyword and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()))


def apply_norm(model: nn.Module, norm: str, norm_options: dict[str, Any], what: str) -> nn.Module:
    """``bn``: as built; ``nf``: :func:`to_normalizer_free`; else :func:`convert_norm` to ``norm``."""
    from normlab.layers import convert_norm, list_norms, to_normalizer_free
    from normlab.layers.kinds import is_norm

    if norm == "bn":
        return model
    if norm == "nf":
        valid = [p for p in inspect.signature(to_normalizer_free).parameters if p != "model"]
        unknown = sorted(set(norm_options) - set(valid))
        if unknown:
            raise NormlabError(f"unknown option(s) {', '.join(unknown)} for norm 'nf' on model {what!r}; "
                               f"valid options: {', '.join(valid)}")
        return to_normalizer_free(model, **norm_options)
    if norm not in list_norms():
        raise NormlabError(f"unknown norm {norm!r}; valid norms: {', '.join([*list_norms(), 'nf'])}")
    if norm != "none" and not any(is_norm(m) for m in model.modules()):
        raise NormlabError(f"model {what!r} has no normalization layers to swap for {norm!r}")
    return convert_norm(model, norm, **norm_options)


def check_outputs(model: nn.Module, sample: torch.Tensor, outputs: int, what: str) -> None:
    """Run ``model`` in eval mode on ``sample`` (no gradient, buffers untouched); check its output shape."""
    was_training = model.training
    model.eval()
    # On the model's device: a model built under ``torch.device("meta")`` (normlab.train.estimate) checks
    # its output shape there, without memory.
    tensor = next(iter(model.parameters()), None)
    if tensor is not None:
        sample = sample.to(tensor.device)
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise NormlabError(
            f"model {what!r} fails on input of shape {tuple(sample.shape)}: {message}"
        ) from None
    finally:
        model.train(was_training)
    expected = (sample.shape[0], outputs)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise NormlabError(
            f"model {what!r} outputs {got} for input {tuple(sample.shape)}, expected {expected} "
            f"({outputs} classes/outputs of the data); pass num_classes={outputs} in --model-options"
        )
