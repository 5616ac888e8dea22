"""ONNX Runtime backend: ``torch.onnx.export`` (the dynamo exporter) then an ``InferenceSession`` on CPU.

Inference only: the exported ``BatchNormalization`` uses the running statistics and never updates them,
so training-mode checks and training steps are skipped with that reason. For models the exported module is
the traced graph's capturing ``GraphModule``, so every layer's output is an ONNX graph output.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings

import numpy as np
import torch

from normlab.crossval.backends.base import Backend, BackendUnsupportedError
from normlab.crossval.backends.torch_backend import build_layer
from normlab.crossval.conventions import ONNX
from normlab.crossval.spec import LayerRun, ModelRun, check_batches, from_channels_first, to_channels_first
from normlab.errors import NormlabError


def export_session(module: torch.nn.Module, example: torch.Tensor, what: str):
    """Export ``module`` (eval mode) and open it in ONNX Runtime; an export failure names ``what``."""
    import onnxruntime as ort

    module.eval()
    # The exporter logs a warning per missing torchvision op: noise for normlab's models.
    exporter_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (example,), dynamo=True, verbose=False)
    except Exception as exc:
        raise NormlabError(f"torch.onnx.export failed for {what}: {type(exc).__name__}: {exc}") from exc
    finally:
        exporter_log.setLevel(level)
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime, CPU execution provider, eval mode."""

    name = "onnxruntime"
    packages = ("onnx", "onnxruntime", "onnxscript")
    convention = ONNX

    def _check_mode(self, mode: str, steps: int) -> None:
        if mode != "eval" or steps:
            raise BackendUnsupportedError(
                f"onnxruntime runs the exported inference graph only (got mode={mode!r}, {steps} training "
                "step(s)); BatchNormalization there never updates its running statistics"
            )

    def run_layer(self, spec, params, batches):
        check_batches(batches, spec)
        self._check_mode(spec.mode, spec.steps)
        x = to_channels_first(np.asarray(batches[-1], np.float32), spec.layout).copy()
        layer = build_layer(spec, params, x.shape[1], x.ndim)
        session = export_session(layer, torch.from_numpy(x), f"layer {spec.kind}")
        start = time.perf_counter()
        (y,) = session.run(None, {session.get_inputs()[0].name: x})
        seconds = time.perf_counter() - start
        out = from_channels_first(np.asarray(y, np.float64), spec.layout)
        if spec.kind != "bn":
            return LayerRun(out, seconds=seconds)
        # Inference leaves the running statistics where they were.
        return LayerRun(
            out,
            np.asarray(params.running_mean, np.float64),
            np.asarray(params.running_var, np.float64),
            seconds,
        )

    def run_model(self, graph, x, *, mode, train_batches):
        self._check_mode(mode, len(train_batches))
        x = np.asarray(x, np.float32)
        start = time.perf_counter()
        session = export_session(graph.capture, torch.from_numpy(x), "the model")
        exported = time.perf_counter()
        values = session.run(None, {session.get_inputs()[0].name: x})
        if len(values) != len(graph.recorded):
            raise NormlabError(
                f"ONNX graph has {len(values)} outputs, expected one per layer ({len(graph.recorded)})"
            )
        outputs = {name: np.asarray(v, np.float64) for name, v in zip(graph.recorded, values, strict=True)}
        run = ModelRun(outputs, graph.output, time.perf_counter() - start)
        run.notes.append(f"export {exported - start:.2f} s")
        return run
