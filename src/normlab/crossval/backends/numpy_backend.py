"""The float64 numpy oracle backend: the reference every other backend is measured against.

Layers use the paper formulas in :mod:`normlab.crossval.oracle`; models run the traced graph with the
numpy operations below (channels-first, float64 throughout). ``unbiased_running_var`` selects the
running-variance convention so that a Flax-convention backend can be checked against its own ground truth.
"""

from __future__ import annotations

import time

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from normlab.crossval import oracle
from normlab.crossval.backends.base import Backend
from normlab.crossval.conventions import NORMLAB
from normlab.crossval.interpret import initial_stats, interpret
from normlab.crossval.spec import LayerRun, ModelRun, check_batches, from_channels_first, to_channels_first


class NumpyOps:
    """One method per graph op, float64, channels-first."""

    def __init__(self, unbiased_running_var: bool = True) -> None:
        self.unbiased_running_var = unbiased_running_var

    def to_native(self, x):
        return np.asarray(x, np.float64)

    def to_common(self, v):
        return np.asarray(v, np.float64)

    def const(self, v):
        return np.asarray(v, np.float64)

    def conv(self, node, x, weight, bias):
        """Cross-correlation as PyTorch defines it: zero padding, stride, dilation, groups."""
        a = node.attrs
        d = a["dims"]
        x = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in a["padding"]])
        k = weight.shape[2:]
        span = tuple((ki - 1) * di + 1 for ki, di in zip(k, a["dilation"], strict=True))
        win = sliding_window_view(x, span, axis=tuple(range(2, 2 + d)))
        index = (slice(None), slice(None))
        index += tuple(slice(None, None, s) for s in a["stride"])
        index += tuple(slice(None, None, di) for di in a["dilation"])
        win = win[index]  # (N, Cin, *out, *k)
        g = a["groups"]
        n, cin = win.shape[:2]
        out_shape = win.shape[2 : 2 + d]
        win = win.reshape(n, g, cin // g, *out_shape, -1)
        w = np.asarray(weight, np.float64).reshape(g, weight.shape[0] // g, cin // g, -1)
        y = np.einsum("ngc...k,gock->ngo...", win, w).reshape(n, weight.shape[0], *out_shape)
        if bias is not None:
            y = y + np.asarray(bias, np.float64).reshape((1, -1) + (1,) * d)
        return y

    def linear(self, node, x, weight, bias):
        y = x @ np.asarray(weight, np.float64).T
        return y if bias is None else y + bias

    def bn(self, node, x, params, mean, var, seen, *, training):
        a = node.attrs
        if training:
            return oracle.batch_norm_train(
                x,
                params["weight"],
                params["bias"],
                mean,
                var,
                eps=a["eps"],
                momentum=a["momentum"],
                batches_seen=seen,
                unbiased_running_var=self.unbiased_running_var,
            )
        y = oracle.batch_norm_eval(x, params["weight"], params["bias"], mean, var, eps=a["eps"])
        return y, mean, var

    def gn(self, node, x, weight, bias):
        return oracle.group_norm(x, node.attrs["groups"], weight, bias, eps=node.attrs["eps"])

    def layernorm(self, node, x, weight, bias):
        return oracle.layer_norm_last(x, node.attrs["normalized_ndim"], weight, bias, eps=node.attrs["eps"])

    def relu(self, node, x, **_):
        return np.maximum(x, 0.0)

    def _pool(self, node, x, pad_value, reduce):
        a = node.attrs
        d = a["dims"]
        x = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in a["padding"]], constant_values=pad_value)
        win = sliding_window_view(x, a["kernel"], axis=tuple(range(2, 2 + d)))
        win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in a["stride"])]
        return reduce(win, axis=tuple(range(-d, 0)))

    def maxpool(self, node, x, **_):
        return self._pool(node, x, -np.inf, np.max)

    def avgpool(self, node, x, **_):
        return self._pool(node, x, 0.0, np.mean)

    def gap(self, node, x, **_):
        return x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)

    def mean(self, node, x, **_):
        return x.mean(axis=node.attrs["dims"], keepdims=node.attrs["keepdim"])

    def flatten(self, node, x, **_):
        return x.reshape(x.shape[0], -1)

    def reshape(self, node, x, **_):
        return x.reshape(x.shape[0], *node.attrs["shape"])

    def add(self, node, x, y=None, **_):
        return x + (node.attrs["scalar"] if y is None else y)

    def mul(self, node, x, y=None, **_):
        return x * (node.attrs["scalar"] if y is None else y)


class NumpyBackend(Backend):
    """float64 numpy from the paper's formulas (the ground truth G)."""

    name = "numpy"
    packages = ()
    convention = NORMLAB

    def __init__(self, unbiased_running_var: bool = True) -> None:
        self.unbiased_running_var = unbiased_running_var

    def run_layer(self, spec, params, batches):
        check_batches(batches, spec)
        start = time.perf_counter()
        xs = [to_channels_first(np.asarray(b, np.float64), spec.layout) for b in batches]
        mean = np.asarray(params.running_mean, np.float64)
        var = np.asarray(params.running_var, np.float64)
        if spec.kind != "bn":
            y = oracle.group_norm(
                xs[-1], spec.num_groups(xs[-1].shape[1]), params.weight, params.bias, eps=spec.eps
            )
            return LayerRun(from_channels_first(y, spec.layout), seconds=time.perf_counter() - start)
        for seen, x in enumerate(xs[:-1], start=1):
            _, mean, var = self._train(spec, x, params, mean, var, seen)
        if spec.mode == "train":
            y, mean, var = self._train(spec, xs[-1], params, mean, var, spec.steps + 1)
        else:
            y = oracle.batch_norm_eval(xs[-1], params.weight, params.bias, mean, var, eps=spec.eps)
        return LayerRun(from_channels_first(y, spec.layout), mean, var, time.perf_counter() - start)

    def _train(self, spec, x, params, mean, var, seen):
        return oracle.batch_norm_train(
            x,
            params.weight,
            params.bias,
            mean,
            var,
            eps=spec.eps,
            momentum=spec.momentum,
            batches_seen=seen,
            unbiased_running_var=self.unbiased_running_var,
        )

    def ops(self) -> NumpyOps:
        return NumpyOps(self.unbiased_running_var)

    def run_model(self, graph, x, *, mode, train_batches):
        start = time.perf_counter()
        ops = self.ops()
        stats = initial_stats(graph)
        for batch in train_batches:
            interpret(graph, batch, ops, training=True, stats=stats)
        values = interpret(graph, x, ops, training=mode == "train", stats=stats)
        outputs = {name: ops.to_common(v) for name, v in values.items()}
        return ModelRun(outputs, graph.output, time.perf_counter() - start)
