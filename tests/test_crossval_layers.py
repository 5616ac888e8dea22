"""Layer cross-checks on the real backends: agreement, convention differences, layouts, bad input."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from normlab.crossval import (
    LayerSpec,
    crossval_layer,
    make_layer_inputs,
    register_backend,
    unregister_backend,
)
from normlab.crossval.backends.jax_backend import JaxBackend
from normlab.errors import NormlabError

REAL = "numpy,torch,onnxruntime,jax"


@pytest.mark.parametrize("kind", ["bn", "gn", "ln", "in"])
def test_real_backends_agree_in_eval_mode(kind):
    spec = LayerSpec(kind=kind, mode="eval", steps=0)
    params, batches = make_layer_inputs(spec, (8, 4, 5, 5), seed=3)
    params.running_mean = np.array([0.3, -0.2, 0.1, 0.5], np.float32)  # non-trivial eval statistics
    params.running_var = np.array([0.5, 2.0, 1.5, 0.8], np.float32)
    report = crossval_layer(spec, REAL, params=params, batches=batches)
    assert [s.status for s in report.backends] == ["ok"] * 4
    assert not report.inconsistent
    for pair in report.pairs:
        assert pair.max_abs < 2e-6, (pair.backends, pair.max_abs)  # float32 rounding only
    # independent of the oracle: eval BN with the running statistics, written out here
    if kind == "bn":
        shape = (1, 4, 1, 1)
        x = batches[-1].astype(np.float64)
        expected = (x - params.running_mean.reshape(shape)) / np.sqrt(
            params.running_var.reshape(shape) + 1e-5
        )
        expected = expected * params.weight.reshape(shape) + params.bias.reshape(shape)
        for status in report.backends:
            assert status.delta_to_truth < 1e-6
        from normlab.crossval import get_backend

        for name in REAL.split(","):
            out = get_backend(name).run_layer(spec, params, batches).output
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-6)
    print(kind, {"|".join(p.backends): f"{p.delta:.2e}" for p in report.pairs})


def test_train_mode_torch_vs_flax_running_var_is_a_convention_difference_of_size_m_over_m_minus_1():
    spec = LayerSpec(kind="bn", mode="train", steps=4, momentum=0.1)
    shape = (4, 3, 2, 2)  # m = 16 values per channel: m/(m-1) = 16/15
    params, batches = make_layer_inputs(spec, shape, seed=0)
    report = crossval_layer(spec, "torch,jax", params=params, batches=batches)
    pair = report.pair("torch", "jax")
    assert not pair.inconsistent, pair.reasons
    (diff,) = report.conventions
    assert diff.backends == ("torch", "jax") and diff.values == ("unbiased", "biased")
    assert diff.expected == pytest.approx(16 / 15)
    assert diff.measured == pytest.approx(16 / 15, rel=1e-5)
    # independent recomputation of both running variances over the 5 training passes
    unbiased, biased = params.running_var.astype(np.float64), params.running_var.astype(np.float64)
    for x in batches:
        v = x.transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64)
        unbiased = 0.9 * unbiased + 0.1 * v.var(axis=1, ddof=1)
        biased = 0.9 * biased + 0.1 * v.var(axis=1)
    torch_run = crossval_layer(spec, "torch", params=params, batches=batches)
    assert torch_run.backends[0].status == "ok"
    from normlab.crossval import get_backend

    t = get_backend("torch").run_layer(spec, params, batches)
    j = get_backend("jax").run_layer(spec, params, batches)
    np.testing.assert_allclose(t.running_var, unbiased, rtol=1e-5)
    np.testing.assert_allclose(j.running_var, biased, rtol=1e-5)
    print("running_var torch - flax after 5 steps:", np.abs(t.running_var - j.running_var).max())


def test_cumulative_momentum_is_mapped_for_flax():
    spec = LayerSpec(kind="bn", mode="eval", steps=3, momentum=None)
    report = crossval_layer(spec, "numpy,torch,jax", shape=(6, 2, 3, 3))
    assert not report.inconsistent
    assert report.pair("numpy", "torch").stats_d_mad == {"running_mean": 0.0, "running_var": 0.0}


def test_channels_last_layout_is_the_transposed_channels_first_result():
    first = LayerSpec(kind="gn", groups=2, mode="train", steps=0)
    last = LayerSpec(kind="gn", groups=2, mode="train", steps=0, layout="channels_last")
    params, batches = make_layer_inputs(first, (2, 4, 3, 3), seed=0)
    from normlab.crossval import get_backend

    for name in ("numpy", "torch", "jax"):
        a = get_backend(name).run_layer(first, params, batches).output
        b = get_backend(name).run_layer(last, params, [np.moveaxis(x, 1, -1) for x in batches]).output
        np.testing.assert_allclose(np.moveaxis(b, -1, 1), a, rtol=1e-6, atol=1e-6)


def test_flax_one_pass_variance_loses_float32_digits_when_mean_dominates():
    # mean 0.3, std 0.01: E[x^2] - E[x]^2 cancels ~3 of float32's 7 digits.
    spec = LayerSpec(kind="bn", mode="train", steps=0)
    params, _ = make_layer_inputs(spec, (4, 3, 2, 2), seed=1)
    rng = np.random.default_rng(1)
    batches = [(0.3 + 0.01 * rng.normal(size=(4, 3, 2, 2))).astype(np.float32)]
    register_backend("jax-two-pass", lambda: JaxBackend(fast_variance=False), replace=True)
    try:
        report = crossval_layer(spec, "numpy,torch,jax,jax-two-pass", params=params, batches=batches)
    finally:
        unregister_backend("jax-two-pass")
    assert report.pair("torch", "jax").inconsistent
    assert not report.pair("torch", "jax-two-pass").inconsistent
    status = {s.name: s.delta_to_truth for s in report.backends}
    assert status["jax"] > 10 * status["jax-two-pass"]


def test_onnxruntime_skips_training_mode_with_its_reason():
    report = crossval_layer(LayerSpec(kind="bn", mode="train", steps=1), "numpy,onnxruntime")
    (numpy_status, onnx_status) = report.backends
    assert onnx_status.status == "skipped"
    assert "inference graph only" in onnx_status.message and "mode='train'" in onnx_status.message
    assert report.pairs == []


def test_missing_package_skips_the_backend_with_a_clear_message(monkeypatch):
    real_import = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name.split(".")[0] in ("jax", "flax"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    report = crossval_layer(LayerSpec(kind="ln", mode="train", steps=0), "numpy,torch,jax")
    jax_status = report.backends[2]
    assert jax_status.status == "skipped"
    assert (
        "package 'jax' is not importable" in jax_status.message and "normlab[crossval]" in jax_status.message
    )
    assert [p.backends for p in report.pairs] == [("numpy", "torch")]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: crossval_layer(LayerSpec(), "numpy,tensorflow"),
            "unknown backend 'tensorflow'; valid backends: numpy, torch, torch-compile, onnxruntime, jax, "
            "torch-cuda",
        ),
        (
            lambda: crossval_layer(
                LayerSpec(steps=1),
                "numpy",
                params=make_layer_inputs(LayerSpec(steps=1), (2, 3, 4))[0],
                batches=[np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 5), np.float32)],
            ),
            r"mismatched shapes: batches have shapes \[\(2, 3, 4\), \(2, 3, 5\)\]",
        ),
        (
            lambda: crossval_layer(
                LayerSpec(steps=0),
                "numpy",
                params=make_layer_inputs(LayerSpec(), (2, 4, 4))[0],
                batches=[np.zeros((2, 3, 4), np.float32)],
            ),
            r"mismatched shapes: weight has shape \[4\], input has 3 channels",
        ),
        (lambda: LayerSpec(kind="bnn"), "unknown kind 'bnn'; valid: bn, gn, ln, in"),
        (lambda: LayerSpec(momentum=1.5), r"momentum must be in \[0, 1\] or None, got 1.5"),
        (lambda: LayerSpec(mode="infer"), "unknown mode 'infer'; valid: train, eval"),
        (
            lambda: crossval_layer(LayerSpec(kind="gn", groups=3), "numpy", shape=(2, 4, 3)),
            "groups=3 does not divide num_channels=4",
        ),
    ],
)
def test_layer_bad_input_messages(call, message):
    with pytest.raises(NormlabError, match=message):
        call()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: LayerSpec(eps=0.0), "eps must be > 0, got 0.0"),
        (lambda: LayerSpec(steps=-1), "steps must be an int >= 0, got -1"),
        (lambda: LayerSpec(groups=0), "groups must be a positive int, got 0"),
        (lambda: LayerSpec(layout="nhwc"), "unknown layout 'nhwc'; valid: channels_first, channels_last"),
        (
            lambda: make_layer_inputs(LayerSpec(), (4,)),
            r"shape must be \(N, C, ...\) of positive ints, got \(4,\)",
        ),
        (
            lambda: __import__("normlab.crossval", fromlist=["Thresholds"]).Thresholds(t_mad=2.0),
            r"t_mad must be in \[0, 1\], got 2.0",
        ),
        (
            lambda: __import__("normlab.crossval", fromlist=["Thresholds"]).Thresholds(p=1.0),
            r"p must be in \[0, 1\), got 1.0",
        ),
        (lambda: register_backend("numpy", JaxBackend), "backend 'numpy' is already registered"),
        (lambda: crossval_layer(LayerSpec(), ""), "no backends given; valid backends: numpy, torch"),
    ],
)
def test_spec_and_threshold_bad_input_messages(call, message):
    with pytest.raises(NormlabError, match=message):
        call()
