"""Backends by name: ``numpy`` (the oracle), ``torch``, ``torch-compile``, ``onnxruntime``, ``jax``,
``torch-cuda`` (skipped, with the reason, where CUDA is not available)."""

from __future__ import annotations

from collections.abc import Callable

from normlab.crossval.backends.base import Backend, BackendUnsupportedError
from normlab.errors import NormlabError

_BACKENDS: dict[str, Callable[[], Backend]] = {}


def register_backend(name: str, factory: Callable[[], Backend], *, replace: bool = False) -> None:
    """Make ``factory()`` available under ``name`` (tests register deliberately buggy backends)."""
    if name in _BACKENDS and not replace:
        raise NormlabError(f"backend {name!r} is already registered")
    _BACKENDS[name] = factory


def unregister_backend(name: str) -> None:
    _BACKENDS.pop(name, None)


def list_backends() -> list[str]:
    """Registered backend names, in registration order (the oracle first)."""
    return list(_BACKENDS)


def get_backend(name: str) -> Backend:
    """A fresh backend; an unknown name raises NormlabError listing the valid ones."""
    if name not in _BACKENDS:
        raise NormlabError(f"unknown backend {name!r}; valid backends: {', '.join(_BACKENDS)}")
    return _BACKENDS[name]()


def parse_backends(spec: str | list[str]) -> list[str]:
    """``"numpy,torch,jax"`` or a list -> validated, de-duplicated names."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in dict.fromkeys(names) if n]
    if not names:
        raise NormlabError(f"no backends given; valid backends: {', '.join(_BACKENDS)}")
    for name in names:
        if name not in _BACKENDS:
            raise NormlabError(f"unknown backend {name!r}; valid backends: {', '.join(_BACKENDS)}")
    return names


def _register_builtin() -> None:
    from normlab.crossval.backends.jax_backend import JaxBackend
    from normlab.crossval.backends.numpy_backend import NumpyBackend
    from normlab.crossval.backends.onnx_backend import OnnxRuntimeBackend
    from normlab.crossval.backends.torch_backend import TorchBackend, TorchCompileBackend, TorchCudaBackend

    for cls in (NumpyBackend, TorchBackend, TorchCompileBackend, OnnxRuntimeBackend, JaxBackend,
                TorchCudaBackend):
        register_backend(cls.name, cls)


_register_builtin()

__all__ = [
    "Backend",
    "BackendUnsupportedError",
    "get_backend",
    "list_backends",
    "parse_backends",
    "register_backend",
    "unregister_backend",
]
