"""``compiled(model)``: the model's forward (and so its backward) through ``torch.compile``, or eager.

``TrainConfig.compile`` asks for it (True / False); ``None`` (the default) compiles only where
benchmarks/compile.py showed a net gain, compile time included: :data:`PAYS_FROM_STEPS`. Measured on the
2-core CPU (1 thread, batch 128, a loaded machine), compiled / eager step time without / with the compile
time spread over 3000 steps: ``cnn`` 1.17 / 2.00 (compile 32 s: the small model's step is overhead the
compiled graph does not remove), study ``vgg`` 1.26 / 1.27 (compile 179 s), ``resnet20`` 0.63 / 0.65
(compile 199 s; it pays from about 150 steps there, 1000 is the margin kept). Inductor on the CPU needs a
C++ compiler; where there is none, or where compiling fails at the first call, the run goes on eagerly
with one warning (the numbers are the same either way, to float tolerance).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# model -> fewest steps from which compiling pays on the CPU (benchmarks/compile.py; figures above).
PAYS_FROM_STEPS = {"resnet20": 1000}


def wants_compile(config: Any, total_steps: int, device: torch.device) -> bool:
    """``config.compile`` when set; else True only for a CPU run of a model in :data:`PAYS_FROM_STEPS`
    that is at least that long."""
    if config.compile is not None:
        return bool(config.compile)
    threshold = PAYS_FROM_STEPS.get(config.model)
    return device.type == "cpu" and threshold is not None and total_steps >= threshold


def compiler_available() -> bool:
    """Whether ``torch.compile`` can build kernels here: a C++ compiler for the CPU backend."""
    if not hasattr(torch, "compile"):
        return False
    cxx = os.environ.get("CXX", "")
    return any(shutil.which(name) for name in (cxx, "g++", "c++", "clang++") if name)


class CompiledForward:
    """Calls ``torch.compile(model)``; the first failure to compile warns once and falls back to eager."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._compiled: Callable[..., Any] | None = torch.compile(model)

    def __call__(self, *args: Any) -> Any:
        if self._compiled is None:
            return self.model(*args)
        try:
            return self._compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any backend failure: eager gives the same numbers
            message = f"torch.compile failed ({type(exc).__name__}: {exc}); running eagerly"
            warnings.warn(message, stacklevel=2)
            self._compiled = None
            return self.model(*args)


_WARNED = False


def compiled(model: nn.Module, enabled: bool = True) -> Callable[..., Any]:
    """The callable a training step runs: ``model`` itself when not ``enabled``, else a compiled forward,
    or ``model`` with one warning when no compiler is present."""
    if not enabled:
        return model
    if not compiler_available():
        # One warning per process, not per run of a sweep.
        global _WARNED
        if _WARNED:
            return model
        _WARNED = True
        warnings.warn("compile=True but no C++ compiler is present for torch.compile; running eagerly",
                      stacklevel=2)
        return model
    return CompiledForward(model)
