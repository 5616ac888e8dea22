"""Injected batch-norm bugs, one at a time, in a test-only backend: each must be detected against the real
backends and, inside a model, localized to the layer that has it (CRADLE's claim, Pham et al. 2019)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normlab.crossval import (
    LayerSpec,
    crossval_layer,
    crossval_model,
    oracle,
    register_backend,
    unregister_backend,
)
from normlab.crossval.backends.numpy_backend import NumpyBackend, NumpyOps
from normlab.crossval.spec import LayerRun, check_batches
from normlab.crossval.state import randomize_norm_state

BUGS = ("no_eps", "unbiased_norm", "momentum_swapped", "gamma_beta_swapped", "eval_updates_stats")


def buggy_bn(bug, x, w, b, mean, var, *, eps, momentum, seen, training):
    """Batch norm (float64, channels-first) with exactly one bug; the rest follows the paper."""
    batch_mean, batch_var, m = oracle.batch_stats(x)
    if bug == "gamma_beta_swapped":
        w, b = b, w
    if training or bug == "eval_updates_stats":
        # eval_updates_stats: the `if training:` guard around the update is missing, so eval passes update
        # the running statistics (before normalizing with them).
        f = 1.0 / seen if momentum is None else momentum
        if bug == "momentum_swapped":
            f = 1.0 - f  # momentum read as the decay of the old value
        mean = (1 - f) * mean + f * batch_mean
        var = (1 - f) * var + f * batch_var * m / (m - 1)
    if training:
        norm_var = batch_var * m / (m - 1) if bug == "unbiased_norm" else batch_var
        y = oracle.normalize(x, batch_mean, norm_var, w, b, 0.0 if bug == "no_eps" else eps)
    else:
        y = oracle.normalize(x, mean, var, w, b, 0.0 if bug == "no_eps" else eps)
    return y, mean, var


class BuggyOps(NumpyOps):
    def __init__(self, bug: str, layer: str | None) -> None:
        super().__init__()
        self.bug, self.layer = bug, layer

    def bn(self, node, x, params, mean, var, seen, *, training):
        if self.layer is not None and node.name != self.layer:
            return super().bn(node, x, params, mean, var, seen, training=training)
        a = node.attrs
        return buggy_bn(
            self.bug,
            x,
            params["weight"],
            params["bias"],
            mean,
            var,
            eps=a["eps"],
            momentum=a["momentum"],
            seen=seen,
            training=training,
        )


class BuggyBackend(NumpyBackend):
    name = "buggy"

    def __init__(self, bug: str, layer: str | None = None) -> None:
        super().__init__()
        self.bug, self.layer = bug, layer

    def run_layer(self, spec, params, batches):
        check_batches(batches, spec)
        mean, var = params.running_mean.astype(np.float64), params.running_var.astype(np.float64)
        kw = {"eps": spec.eps, "momentum": spec.momentum}
        for seen, x in enumerate(batches[:-1], start=1):
            _, mean, var = buggy_bn(
                self.bug, x, params.weight, params.bias, mean, var, seen=seen, training=True, **kw
            )
        y, mean, var = buggy_bn(
            self.bug,
            batches[-1],
            params.weight,
            params.bias,
            mean,
            var,
            seen=spec.steps + 1,
            training=spec.mode == "train",
            **kw,
        )
        return LayerRun(y, mean, var)

    def ops(self):
        return BuggyOps(self.bug, self.layer)


@pytest.fixture
def buggy():
    def install(bug: str, layer: str | None = None) -> None:
        register_backend("buggy", lambda: BuggyBackend(bug, layer), replace=True)

    yield install
    unregister_backend("buggy")


# mode in which each bug shows in a layer's output or running statistics; small-variance input for eps
# (zero-mean there: Flax's one-pass variance loses float32 digits when |mean| >> std, tested elsewhere)
LAYER_CASES = {
    "no_eps": dict(mode="train", steps=0, scale=0.01, shift=0.0),
    "unbiased_norm": dict(mode="train", steps=0, scale=2.0),
    "momentum_swapped": dict(mode="train", steps=2, scale=2.0),
    "gamma_beta_swapped": dict(mode="eval", steps=0, scale=2.0),
    "eval_updates_stats": dict(mode="eval", steps=1, scale=2.0),
}


@pytest.mark.parametrize("bug", BUGS)
def test_layer_bug_is_detected_and_real_backends_stay_consistent(buggy, bug):
    case = LAYER_CASES[bug]
    spec = LayerSpec(kind="bn", mode=case["mode"], steps=case["steps"])
    rng = np.random.default_rng(1)
    batches = [
        (case.get("shift", 0.3) + case["scale"] * rng.normal(size=(4, 3, 2, 2))).astype(np.float32)
        for _ in range(spec.steps + 1)
    ]
    from normlab.crossval.spec import make_layer_inputs

    params, _ = make_layer_inputs(spec, (4, 3, 2, 2), seed=1)
    buggy(bug)
    report = crossval_layer(spec, "numpy,torch,jax,buggy", params=params, batches=batches)
    for real in ("numpy", "torch", "jax"):
        assert report.pair(real, "buggy").inconsistent, (bug, real, report.pair(real, "buggy"))
    for a, b in (("numpy", "torch"), ("numpy", "jax"), ("torch", "jax")):
        assert not report.pair(a, b).inconsistent, (a, b, report.pair(a, b).reasons)


def _model():
    from normlab.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", norm="bn", num_classes=10, in_channels=3, dims=2)
    return randomize_norm_state(model, seed=0).eval()


TARGET = "stages.1.0.branch.1"  # a BN in the middle of the second stage
MODEL_CASES = {  # (mode, training passes before the measured one)
    "no_eps": ("eval", 0),
    "unbiased_norm": ("train", 0),
    "momentum_swapped": ("eval", 2),
    "gamma_beta_swapped": ("eval", 0),
    "eval_updates_stats": ("eval", 0),
}


@pytest.mark.parametrize("bug", BUGS)
def test_model_bug_is_localized_to_its_layer(buggy, bug):
    model = _model()
    if bug == "no_eps":
        # eps only matters when the variance is small: shrink the conv that feeds the target BN.
        with torch.no_grad():
            model.get_submodule("stages.1.0.branch.0").weight.mul_(1e-3)
            model.get_submodule(TARGET).running_var.mul_(1e-6)
    mode, steps = MODEL_CASES[bug]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 16, 16)).astype(np.float32)
    train = [rng.normal(size=(4, 3, 16, 16)).astype(np.float32) for _ in range(steps)]
    buggy(bug, TARGET)
    report = crossval_model(model, x, "numpy,torch,buggy", mode=mode, train_batches=train)
    for real in ("numpy", "torch"):
        pair = report.pair(real, "buggy")
        assert pair.inconsistent, (bug, pair.reasons)
        assert pair.first_inconsistent == TARGET
        assert pair.localized == TARGET
        target = next(layer for layer in pair.layers if layer.layer == TARGET)
        assert target.rate > 100 and target.delta_pre < 1e-5
    clean = report.pair("numpy", "torch")
    assert not clean.inconsistent and clean.first_inconsistent is None
