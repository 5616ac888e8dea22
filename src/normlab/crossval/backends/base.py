"""The backend interface: run a normalization layer or a traced model, return numpy results.

A backend is optional when its package may be missing: :meth:`Backend.unavailable` then returns the reason
(the package to install) and the comparison skips it with that message. A backend that cannot express a
requested behaviour (ONNX Runtime has no training mode) raises :class:`BackendUnsupportedError` naming it.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod

import numpy as np

from normlab.crossval.conventions import Convention
from normlab.crossval.graph import ModelGraph
from normlab.crossval.spec import LayerParams, LayerRun, LayerSpec, ModelRun


class BackendUnsupportedError(Exception):
    """This backend cannot run this check; the message says why (shown in the report, not an error)."""


class Backend(ABC):
    """One framework behind an adapter that maps normlab's semantic config onto the framework's."""

    name: str = ""
    packages: tuple[str, ...] = ()
    convention: Convention

    def unavailable(self) -> str | None:
        """None when usable, else why not (a missing package and the extra that installs it)."""
        for package in self.packages:
            try:
                importlib.import_module(package)
            except Exception as exc:  # an ImportError, or a broken install raising anything else
                return (
                    f"backend {self.name!r} skipped: package {package!r} is not importable ({exc}); "
                    "install it with `pip install normlab[crossval]`"
                )
        return None

    @abstractmethod
    def run_layer(self, spec: LayerSpec, params: LayerParams, batches: list[np.ndarray]) -> LayerRun:
        """``batches[:-1]`` are training steps, ``batches[-1]`` the measured pass (``spec.layout``)."""

    @abstractmethod
    def run_model(
        self, graph: ModelGraph, x: np.ndarray, *, mode: str, train_batches: list[np.ndarray]
    ) -> ModelRun:
        """Training passes over ``train_batches``, then every layer's output on ``x`` in ``mode``."""
