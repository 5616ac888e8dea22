"""PyTorch backends: eager on the CPU, eager on CUDA (``torch-cuda``), and ``torch.compile`` (inductor, CPU).

Layers are built with :func:`normlab.layers.create_norm` from the semantic config, which is PyTorch's
(``momentum`` = weight of the new batch, unbiased running variance, channels-first), so the only mapping
is the layout. Models run the traced graph's capturing ``GraphModule``, which returns every layer's output.
``torch-compile`` compiles the module once per mode; its compile time is reported in the run's notes.
``torch-cuda`` runs the same modules on the GPU with PyTorch's defaults as a user gets them: cuDNN may use
TF32 for convolutions (``torch.backends.cudnn.allow_tf32`` is True by default), so its convolutions differ
from the float64 oracle by ~1e-3 relative where the CPU's float32 differ by ~1e-6 — a difference of backend,
which the report shows as such.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from normlab.crossval.backends.base import Backend
from normlab.crossval.conventions import TORCH
from normlab.crossval.spec import LayerRun, ModelRun, check_batches, from_channels_first, to_channels_first
from normlab.layers import create_norm


def build_layer(spec, params, channels: int, ndim: int) -> nn.Module:
    """The normlab layer for ``spec`` holding ``params`` (float32)."""
    dims = {2: 1, 3: 1, 4: 2, 5: 3}[ndim]
    options = {"dims": dims, "eps": spec.eps, "affine": spec.affine}
    if spec.kind == "bn":
        options["momentum"] = spec.momentum
    if spec.kind == "gn":
        options["groups"] = spec.groups
    layer = create_norm(spec.kind, channels, **options)
    with torch.no_grad():
        if spec.affine:
            layer.weight.copy_(torch.from_numpy(np.asarray(params.weight, np.float32)))
            layer.bias.copy_(torch.from_numpy(np.asarray(params.bias, np.float32)))
        if spec.kind == "bn":
            layer.running_mean.copy_(torch.from_numpy(np.asarray(params.running_mean, np.float32)))
            layer.running_var.copy_(torch.from_numpy(np.asarray(params.running_var, np.float32)))
    return layer


class TorchBackend(Backend):
    """PyTorch eager mode."""

    name = "torch"
    packages = ("torch",)
    convention = TORCH
    device = "cpu"

    def _wrap(self, module: nn.Module) -> nn.Module:
        return module

    def run_layer(self, spec, params, batches):
        check_batches(batches, spec)
        xs = [
            torch.from_numpy(to_channels_first(np.asarray(b, np.float32), spec.layout).copy())
            for b in batches
        ]
        layer = build_layer(spec, params, xs[0].shape[1], xs[0].ndim).to(self.device)
        xs = [x.to(self.device) for x in xs]
        run = self._wrap(layer)
        start = time.perf_counter()
        with torch.no_grad():
            layer.train()
            for x in xs[:-1]:
                run(x)
            layer.train(spec.mode == "train")
            y = run(xs[-1])
            _synchronize(self.device)
        seconds = time.perf_counter() - start
        out = from_channels_first(y.cpu().numpy().astype(np.float64), spec.layout)
        if spec.kind != "bn":
            return LayerRun(out, seconds=seconds)
        return LayerRun(
            out,
            layer.running_mean.cpu().numpy().astype(np.float64),
            layer.running_var.cpu().numpy().astype(np.float64),
            seconds,
        )

    def run_model(self, graph, x, *, mode, train_batches):
        module = copy.deepcopy(graph.capture).to(self.device)
        run = self._wrap(module)

        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.asarray(a, np.float32)).to(self.device)

        start = time.perf_counter()
        with torch.no_grad():
            module.train()
            for batch in train_batches:
                run(tensor(batch))
            module.train(mode == "train")
            values = run(tensor(x))
            _synchronize(self.device)
        outputs = {
            name: v.detach().cpu().numpy().astype(np.float64)
            for name, v in zip(graph.recorded, values, strict=True)
        }
        return ModelRun(outputs, graph.output, time.perf_counter() - start)


class TorchCudaBackend(TorchBackend):
    """PyTorch eager mode on the first CUDA device (module docstring: TF32 convolutions by default)."""

    name = "torch-cuda"
    device = "cuda"

    def unavailable(self) -> str | None:
        reason = super().unavailable()
        if reason:
            return reason
        if not torch.cuda.is_available():
            return "backend 'torch-cuda' skipped: CUDA is not available here (no GPU or a CPU-only torch)"
        return None


def _synchronize(device: str) -> None:
    # CUDA kernels run asynchronously: wait for them before the clock is read.
    if device != "cpu":
        torch.cuda.synchronize()


class TorchCompileBackend(TorchBackend):
    """``torch.compile`` with the inductor backend on CPU (needs a C++ compiler)."""

    name = "torch-compile"

    def _wrap(self, module: nn.Module) -> nn.Module:
        # dynamic=False: one static graph per mode, as a deployment would compile it.
        return torch.compile(module, backend="inductor", dynamic=False)

    def unavailable(self) -> str | None:
        reason = super().unavailable()
        if reason:
            return reason
        import shutil

        if not any(shutil.which(cc) for cc in ("cc", "gcc", "g++", "clang", "c++")):
            return "backend 'torch-compile' skipped: inductor needs a C++ compiler on PATH (none found)"
        return None
