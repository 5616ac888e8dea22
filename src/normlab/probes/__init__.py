"""Probes: measure what BatchNorm does on any ``nn.Module``, in training mode by default.

Each probe is one function ``probe(model, ...) -> dataclass`` of plain numbers with a ``mode`` field and
``to_dict()``. ``mode="train"`` (the default) measures the model as it trains: ``model.train()``, BN-like
layers normalize with batch statistics (dropout is active too, with the same masks in every pass of one
probe); ``mode="eval"`` uses ``model.eval()`` and the running estimates. ``train_eval_gap`` compares the two
with only the BN-like layers switched (mode "train_vs_eval"). No probe changes the model's parameters,
buffers (BN running statistics), train/eval flags, ``.grad``, RNG state or an optimizer's state.
:class:`ProbeSchedule` runs probes from the trainer's callback point; :func:`watch` runs it from your own
loop (``watch.step(batch)`` after each optimizer step), :class:`normlab.probes.lightning.ProbeCallback`
from a Lightning ``Trainer``.
"""

from normlab.probes._result import ProbeResult
from normlab.probes.activations import (
    ActivationSnapshot,
    ActivationStats,
    ActivationTracker,
    ActivationTrajectory,
    activation_stats,
)
from normlab.probes.batch_coupling import BatchDependence, batch_dependence
from normlab.probes.covariate_shift import ICS, ics
from normlab.probes.eval_gap import TrainEvalGap, TrainEvalGapCurve, train_eval_gap, train_eval_gap_curve
from normlab.probes.hessian_density import HessianDensity, hessian_density
from normlab.probes.hessian_spectrum import Hessian, hessian
from normlab.probes.landscape_2d import Landscape2D, landscape_2d
from normlab.probes.loss_landscape import Landscape, landscape
from normlab.probes.residual import ResidualScale, residual_scale
from normlab.probes.schedule import DEFAULT_PROBES, PROBES, ProbeSchedule
from normlab.probes.signal_prop import SignalPropagation, signal_propagation
from normlab.probes.similarity import ExampleSimilarity, example_similarity
from normlab.probes.watcher import Watch, watch

__all__ = [
    "DEFAULT_PROBES",
    "PROBES",
    "ActivationSnapshot",
    "ProbeSchedule",
    "ICS",
    "ActivationStats",
    "ActivationTracker",
    "ActivationTrajectory",
    "BatchDependence",
    "ExampleSimilarity",
    "Hessian",
    "HessianDensity",
    "Landscape",
    "Landscape2D",
    "ProbeResult",
    "ResidualScale",
    "SignalPropagation",
    "TrainEvalGap",
    "TrainEvalGapCurve",
    "Watch",
    "activation_stats",
    "batch_dependence",
    "example_similarity",
    "hessian",
    "hessian_density",
    "ics",
    "landscape",
    "landscape_2d",
    "residual_scale",
    "signal_propagation",
    "train_eval_gap",
    "train_eval_gap_curve",
    "watch",
]
