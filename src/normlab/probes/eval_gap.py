"""Train/eval discrepancy of BatchNorm: the same examples through batch statistics vs. running estimates.

BN normalizes with the statistics of the current batch in training mode and with population estimates
(EMA of batch statistics) in evaluation mode (Ioffe & Szegedy 2015, Sec. 3.1). "Rethinking 'Batch' in
BatchNorm" (Wu & Johnson 2021, Sec. 3-4) shows the inconsistency grows as the normalization batch shrinks
and that PreciseBN (population statistics recomputed on the frozen model) removes the part due to EMA.

With ``p_i`` the softmax of example i in training mode (normalized together with the ``batch_size - 1``
examples next to it) and ``q_i`` in evaluation mode::

    kl      = 1/N * sum_i KL(p_i || q_i) = 1/N * sum_i sum_c p_ic (log p_ic - log q_ic)
    acc_gap = acc_train_mode - acc_eval_mode

"Training mode" here means BN-like layers normalize with batch statistics; dropout and other layers stay
in evaluation mode in both passes, so the numbers measure BN alone. Normalizers without batch statistics
(GN, LN, none) give exactly ``kl = 0`` and ``acc_gap = 0``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from normlab.errors import NormlabError
from normlab.probes._data import (
    check_batch,
    check_labels,
    check_positive_int,
    full_batches,
    model_device,
)
from normlab.probes._result import ProbeResult
from normlab.probes._state import batch_stat_layers, check_batch_for_mode, preserved, rng_preserved, set_mode


@dataclasses.dataclass
class TrainEvalGap(ProbeResult):
    """``mode`` is "train_vs_eval": the probe compares both modes on the same examples.

    ``acc_eval_precise`` / ``kl_precise`` are the evaluation-mode accuracy and KL(train || eval) after
    PreciseBN on a copy of the model (None unless ``recalibrate`` was given)."""

    mode: str
    batch_size: int
    num_examples: int
    kl: float
    acc_train_mode: float
    acc_eval_mode: float
    acc_gap: float
    acc_eval_precise: float | None = None
    kl_precise: float | None = None


@dataclasses.dataclass
class TrainEvalGapCurve(ProbeResult):
    """:func:`train_eval_gap` as a function of the normalization batch size (one list entry per size)."""

    mode: str
    batch_sizes: list[int]
    kl: list[float]
    acc_train_mode: list[float]
    acc_eval_mode: list[float]
    acc_gap: list[float]
    acc_eval_precise: list[float | None]
    kl_precise: list[float | None]


def _logits(model: nn.Module, x: torch.Tensor, batches: list[slice], mode: str) -> torch.Tensor:
    """Outputs with BN-like layers in ``mode`` and every other layer (dropout, ...) in eval mode, so that the
    gap isolates batch versus population statistics."""
    set_mode(model, "eval")
    for _, layer in batch_stat_layers(model):
        layer.train(mode == "train")
    return torch.cat([model(x[s]) for s in batches]).float()


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean").item()


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == y).float().mean().item()


def train_eval_gap(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    recalibrate: Iterable[object] | None = None,
    num_recalibration_batches: int | None = None,
) -> TrainEvalGap:
    """Measure the train/eval discrepancy of ``model`` (a classifier) on ``x`` (N, ...), ``y`` (N,).

    Training-mode outputs are taken on consecutive batches of exactly ``batch_size`` examples (a trailing
    partial batch is dropped; ``num_examples`` says how many were used). ``recalibrate``: an iterable of input
    batches (tensors or ``(x, y)`` pairs) for PreciseBN (:func:`normlab.layers.precise_bn`, at most
    ``num_recalibration_batches``), run on a deep copy. Parameters, buffers, the train/eval flags and RNG
    state of ``model`` are left exactly as they were.
    """
    check_batch(x, y)
    check_labels(y)
    check_positive_int(batch_size, "batch_size")
    check_batch_for_mode(model, batch_size, "train", what="batch_size")
    slices = full_batches(x.shape[0], batch_size)
    n = slices[-1].stop
    device = model_device(model)
    x, y = x[:n].to(device), y[:n].to(device)
    with torch.no_grad(), preserved(model, parameters=False):
        # Eval first: the train-mode passes update the running statistics the eval pass must not see.
        eval_logits = _logits(model, x, slices, "eval")
        log_p = F.log_softmax(_logits(model, x, slices, "train"), dim=1)
    log_q = F.log_softmax(eval_logits, dim=1)
    acc_train = _accuracy(log_p, y)
    acc_eval = _accuracy(eval_logits, y)
    result = TrainEvalGap(
        mode="train_vs_eval",
        batch_size=batch_size,
        num_examples=n,
        kl=_kl(log_p, log_q),
        acc_train_mode=acc_train,
        acc_eval_mode=acc_eval,
        acc_gap=acc_train - acc_eval,
    )
    if recalibrate is not None:
        precise_logits = _precise_eval_logits(model, x, slices, recalibrate, num_recalibration_batches)
        result.acc_eval_precise = _accuracy(precise_logits, y)
        result.kl_precise = _kl(log_p, F.log_softmax(precise_logits, dim=1))
    return result


def _precise_eval_logits(
    model: nn.Module, x: torch.Tensor, slices: list[slice], batches: Iterable[object], num_batches: int | None
) -> torch.Tensor:
    from normlab.layers import precise_bn  # the layers package owns PreciseBN

    # On a copy so the caller's running statistics stay untouched; PreciseBN's forward passes may draw
    # random numbers (dropout), so the RNG is restored too.
    clone = copy.deepcopy(model)
    with rng_preserved(), torch.no_grad():
        precise_bn(clone, batches, num_batches=num_batches)
        return _logits(clone, x, slices, "eval")


def train_eval_gap_curve(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_sizes: Sequence[int],
    *,
    recalibrate: Iterable[object] | None = None,
    num_recalibration_batches: int | None = None,
) -> TrainEvalGapCurve:
    """:func:`train_eval_gap` for each normalization batch size in ``batch_sizes`` (same examples; each
    size uses the largest multiple of it that fits in N). ``recalibrate`` is materialized once and reused."""
    if not batch_sizes:
        raise NormlabError("batch_sizes must name at least one batch size, got an empty sequence")
    batches = list(recalibrate) if recalibrate is not None else None
    n_recal = num_recalibration_batches
    gaps = [
        train_eval_gap(model, x, y, batch_size=b, recalibrate=batches, num_recalibration_batches=n_recal)
        for b in batch_sizes
    ]
    return TrainEvalGapCurve(
        mode="train_vs_eval",
        batch_sizes=[g.batch_size for g in gaps],
        kl=[g.kl for g in gaps],
        acc_train_mode=[g.acc_train_mode for g in gaps],
        acc_eval_mode=[g.acc_eval_mode for g in gaps],
        acc_gap=[g.acc_gap for g in gaps],
        acc_eval_precise=[g.acc_eval_precise for g in gaps],
        kl_precise=[g.kl_precise for g in gaps],
    )
