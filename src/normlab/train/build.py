"""From a :class:`TrainConfig` to the objects a run needs: device, data, model, loss.

Each builder validates through the package that owns the concept (``load_dataset``, ``create_model``),
so an unknown name fails here, before anything is written to the store.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from normlab.errors import NormlabError
from normlab.external.spec import is_model_spec
from normlab.train.config import TrainConfig


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; an unavailable device raises NormlabError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NormlabError(f"device={name!r} but CUDA is not available here; use device='cpu' or 'auto'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise NormlabError(f"device={name!r} but CUDA has {torch.cuda.device_count()} device(s) here; use "
                           "device='cpu' or 'auto'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise NormlabError(f"device={name!r} but MPS is not available here; use device='cpu' or 'auto'")
    return device


def load_data(config: TrainConfig):
    """The dataset of ``config`` (in-memory tensors, see :func:`normlab.data.load_dataset`)."""
    from normlab.data import load_dataset

    # Loader options the config sets (imagefolder's image size and held-out split); an unset one is left
    # to the loader's default, and one the dataset does not take is named by load_dataset's error.
    options = {name: getattr(config, name) for name in ("image_size", "test_fraction")}
    return load_dataset(
        config.dataset,
        root=config.data_root,
        download=config.download,
        subset=config.subset,
        seed=config.seed,
        **{name: value for name, value in options.items() if value is not None},
    )


def build_model(config: TrainConfig, data) -> nn.Module:
    """``create_model`` for ``config`` shaped to ``data`` (channels, dims, classes, input length); a model
    spec (``module:factory`` / ``file.py:factory``) is built by
    :func:`normlab.external.build_external_model`."""
    from normlab.models import create_model, model_options

    if is_model_spec(config.model):
        return _build_external(config, data)
    options = dict(config.model_options)
    # Models that size a flatten/linear layer from the input need its length; the data knows it.
    if "input_size" in model_options(config.model) and "input_size" not in options:
        options["input_size"] = int(data.input_shape[-1])
    if data.task == "classification":
        outputs = data.num_classes
    else:
        outputs = int(data.y_train.shape[-1]) if data.y_train.ndim > 1 else 1
    return create_model(
        config.model,
        norm=config.norm,
        num_classes=outputs,
        in_channels=data.in_channels,
        dims=data.dims,
        width=config.width,
        depth=config.depth,
        norm_options=config.norm_options,
        **options,
    )


def _build_external(config: TrainConfig, data) -> nn.Module:
    from normlab.external import build_external_model

    options = dict(config.model_options)
    for name in ("width", "depth"):  # the factory's own knobs, when the config sets them
        if getattr(config, name) is not None and name not in options:
            options[name] = getattr(config, name)
    return build_external_model(
        config.model,
        norm=config.norm,
        norm_options=config.norm_options,
        options=options,
        outputs=_outputs(data),
        in_channels=data.in_channels,
        sample=data.x_train[:2],
    )


def _outputs(data) -> int:
    if data.task == "classification":
        return data.num_classes
    return int(data.y_train.shape[-1]) if data.y_train.ndim > 1 else 1


def loss_function(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy for classification; mean squared error for regression (e.g. the DLN's ``||f(x)-Ax||^2``
    averaged over examples and outputs)."""
    if task == "classification":
        return F.cross_entropy
    if task == "regression":
        return F.mse_loss
    raise NormlabError(f"unknown task {task!r}; allowed: classification, regression")
