"""CRADLE-style cross-backend validation of normalization layers and normlab models.

CRADLE (Pham, Lutellier, Qi, Tan, ICSE 2019) found a wrong batch-normalization formula in a Keras backend
by running one model on several backends and comparing outputs. This package runs a layer spec or a model
with its weights on ``numpy`` (float64 oracle from the paper's formula), ``torch``, ``torch-compile``,
``onnxruntime`` and ``jax`` (Flax), maps normlab's one config to each framework's conventions, and reports
CRADLE's distances, per-layer localization and convention differences (science.md sections 6 and 7).
"""

from normlab.crossval.backends import (
    Backend,
    BackendUnsupportedError,
    get_backend,
    list_backends,
    parse_backends,
    register_backend,
    unregister_backend,
)
from normlab.crossval.compare import CrossvalReport, Thresholds, crossval_layer, crossval_model
from normlab.crossval.conventions import Convention, ConventionDifference
from normlab.crossval.graph import ModelGraph, trace_model
from normlab.crossval.probe import BNProbe, probe_conventions
from normlab.crossval.report import conventions_html, report_html, to_json
from normlab.crossval.spec import LayerParams, LayerRun, LayerSpec, ModelRun, make_layer_inputs
from normlab.crossval.state import randomize_norm_state

__all__ = [
    "BNProbe",
    "Backend",
    "BackendUnsupportedError",
    "Convention",
    "ConventionDifference",
    "CrossvalReport",
    "LayerParams",
    "LayerRun",
    "LayerSpec",
    "ModelGraph",
    "ModelRun",
    "Thresholds",
    "crossval_layer",
    "crossval_model",
    "conventions_html",
    "get_backend",
    "list_backends",
    "make_layer_inputs",
    "parse_backends",
    "probe_conventions",
    "randomize_norm_state",
    "register_backend",
    "report_html",
    "to_json",
    "trace_model",
    "unregister_backend",
]
