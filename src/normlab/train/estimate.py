"""What a training run will cost, estimated before it starts: memory (parameters, optimizer state,
activations) and compute (multiply-accumulates per step), so a run that cannot fit is refused in one line
instead of growing until the machine kills it or running for years.

The model is built on PyTorch's ``meta`` device (shapes only, no memory), and one forward pass of a batch
on ``meta`` counts, through forward hooks, the multiply-accumulates of every convolution and linear layer
and the elements of every module output (what autograd keeps for the backward pass). Training costs about
three forward passes (forward, and backward's two products), i.e. ``6 * MACs`` FLOPs per step (Kaplan et
al. 2020, section 2.1). The estimate is an order of magnitude, which is what refusing needs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from normlab.errors import NormlabError

BYTES_PER_VALUE = 4  # float32
MAX_DAYS = 30.0  # longer than this on the assumed throughput is refused without --force
# Assumed sustained training throughput; small convnets on a laptop CPU reach a few GFLOP/s per core.
FLOPS_PER_S = {"cpu": 2e10, "cuda": 2e13, "mps": 2e12}
MAX_DEPTH = 2000  # ResNet-1202 (He et al. 2016) is the deepest network normlab's papers train


@dataclass(frozen=True)
class Cost:
    """Estimated cost of one run: ``parameters`` (count), ``memory_bytes`` (peak, training) and
    ``flops`` (whole run); None where the meta pass could not tell."""

    parameters: int
    memory_bytes: float
    flops: float | None

    def seconds(self, device_type: str) -> float | None:
        return None if self.flops is None else self.flops / FLOPS_PER_S.get(device_type, FLOPS_PER_S["cpu"])


def estimate_cost(config, data) -> Cost:
    """The :class:`Cost` of training ``config`` (a TrainConfig) on ``data`` (its Dataset)."""
    from normlab.train.build import build_model

    if config.depth is not None and config.depth > MAX_DEPTH:
        # Building even a meta model of 10^5 layers takes minutes and gigabytes of Python objects.
        raise NormlabError(
            f"depth={config.depth} exceeds {MAX_DEPTH} layers (ResNet-1202 is the deepest in the papers); "
            "pass --force to build it anyway"
        )
    try:
        with torch.device("meta"):
            model = build_model(config, data)
    except (RuntimeError, OverflowError, MemoryError) as exc:  # sizes beyond what torch can index
        reason = " ".join(str(exc).split())[:120]
        raise NormlabError(
            f"the model (width={config.width}, depth={config.depth}) is too large to build: {reason}"
        ) from None
    parameters = sum(p.numel() for p in model.parameters())
    optimizer_states = 2 if config.optimizer == "adamw" else (1 if config.momentum > 0 else 0)
    memory = parameters * BYTES_PER_VALUE * (2 + optimizer_states)  # weights, grads, optimizer state
    macs, activations = _meta_forward(model, config.batch_size, tuple(data.input_shape))
    if macs is None:
        return Cost(parameters, float(memory), None)
    memory += 2 * activations * BYTES_PER_VALUE  # saved activations and their gradients
    steps = config.steps or config.epochs * max(1, len(data.x_train) // config.batch_size)
    return Cost(parameters, float(memory), 6.0 * macs * steps)


def _meta_forward(model: nn.Module, batch: int, input_shape: tuple[int, ...]) -> tuple[float | None, float]:
    """(MACs, output elements) of one forward pass of ``batch`` examples, counted on the meta device."""
    counts = {"macs": 0.0, "values": 0.0}

    def hook(module: nn.Module, inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            counts["values"] += output.numel()
            if isinstance(module, nn.modules.conv._ConvNd):
                weight = module.weight
                counts["macs"] += output.numel() * weight[0].numel()
            elif isinstance(module, nn.Linear):
                counts["macs"] += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        model.train()
        model(torch.empty((batch, *input_shape), device="meta"))
    except Exception:  # an op without a meta kernel: fall back to parameters only
        return None, 0.0
    finally:
        for handle in handles:
            handle.remove()
    return counts["macs"], counts["values"]


def device_memory(device: torch.device) -> float | None:
    """Bytes of memory of ``device`` (physical RAM for the CPU), or None when unknown."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(config, data, device: torch.device) -> Cost:
    """Raise NormlabError (with the estimate) when the run needs more memory than ``device`` has or more
    than ``MAX_DAYS`` at the assumed throughput; return the :class:`Cost` otherwise."""
    cost = estimate_cost(config, data)
    available = device_memory(device)
    if available is not None and cost.memory_bytes > available:
        raise NormlabError(
            f"this run needs about {_size(cost.memory_bytes)} ({cost.parameters:.3g} parameters, batch "
            f"{config.batch_size}) but the {device.type} has {_size(available)}; reduce --width/--depth/"
            "--batch-size, or pass --force"
        )
    seconds = cost.seconds(device.type)
    if seconds is not None and seconds > MAX_DAYS * 86400:
        raise NormlabError(
            f"this run would take about {_duration(seconds)} ({cost.flops:.2g} FLOPs at an assumed "
            f"{FLOPS_PER_S.get(device.type, FLOPS_PER_S['cpu']):.0e} FLOP/s on {device.type}), more than "
            f"{MAX_DAYS:.0f} days; reduce --steps/--epochs or the model, or pass --force"
        )
    return cost


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if nbytes < 1024 or unit == "PB":
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1024
    return f"{nbytes:.3g} PB"


def _duration(seconds: float) -> str:
    days = seconds / 86400
    if days >= 365:
        return f"{days / 365:.2g} years"
    return f"{days:.2g} days" if days >= 1 else f"{seconds / 3600:.2g} hours"


def finite_lr(lr: float) -> None:
    """An lr above float32's largest value cannot even be applied to float32 weights."""
    if lr > torch.finfo(torch.float32).max or not math.isfinite(lr):
        raise NormlabError(f"lr={lr!r} exceeds float32's largest value {torch.finfo(torch.float32).max:.3g}")
