"""``compiled(model)``: the model's forward (and so its backward) through ``torch.compile``, or eager.

``TrainConfig.compile`` asks for it. Inductor on the CPU needs a C++ compiler; where there is none, or
where compiling fails at the first call, the run goes on eagerly with one warning (the numbers are the
same either way, to float tolerance). Off by default: benchmarks/compile.py measures compiled / eager step
time with and without the compile time, and on a 2-core CPU no default model wins once the compile time
is counted (figures in that script's docstring).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


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


def compiled(model: nn.Module, enabled: bool = True) -> Callable[..., Any]:
    """The callable a training step runs: ``model`` itself when not ``enabled``, else a compiled forward,
    or ``model`` with one warning when no compiler is present."""
    if not enabled:
        return model
    if not compiler_available():
        warnings.warn("compile=True but no C++ compiler is present for torch.compile; running eagerly",
                      stacklevel=2)
        return model
    return CompiledForward(model)
