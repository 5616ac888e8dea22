"""JAX backend: Flax ``linen`` modules with normlab's parameters carried over.

Adapter (the convention mapping, see :mod:`normlab.crossval.conventions`): arrays are transposed to
channels-last, Flax's native layout; normlab's momentum m (weight of the new batch) becomes Flax's decay
``1 - m`` (momentum=None, the cumulative average, becomes ``1 - 1/t`` at step t); eps is passed through;
gamma/beta/running statistics go to ``params.scale/bias`` and ``batch_stats.mean/var``. What Flax cannot
express is left as Flax does it and reported as a convention difference: its running variance takes the
biased batch variance. ``ln`` (normlab's LayerNorm over C and space, per-channel affine) is Flax
``LayerNorm`` over all non-batch axes with ``feature_axes=-1``; ``gn``/``in`` are Flax ``GroupNorm``.
Flax's norms compute the variance in one pass, ``E[x^2] - E[x]^2`` (``use_fast_variance=True``, the
default), which in float32 loses digits when |mean| >> std; the backend keeps the default because that is
what Flax users run (``JaxBackend(fast_variance=False)`` gives the two-pass variance).

Models: a Flax translation of the traced graph, op by op (``Conv``, ``Dense``, the norms above,
``relu``, ``max_pool``/``avg_pool``, add, multiply); values stay channels-last between ops.
"""

from __future__ import annotations

import time

import numpy as np

from normlab.crossval.backends.base import Backend
from normlab.crossval.conventions import FLAX, framework_momentum
from normlab.crossval.interpret import initial_stats, interpret
from normlab.crossval.spec import LayerRun, ModelRun, check_batches, to_channels_first


def _last(x):
    import jax.numpy as jnp

    return jnp.moveaxis(x, 1, -1) if x.ndim >= 3 else x


def _first(x):
    import jax.numpy as jnp

    return jnp.moveaxis(x, -1, 1) if x.ndim >= 3 else x


def _affine(weight, bias) -> dict:
    import jax.numpy as jnp

    params = {}
    if weight is not None:
        params["scale"] = jnp.asarray(weight, jnp.float32)
    if bias is not None:
        params["bias"] = jnp.asarray(bias, jnp.float32)
    return params


def flax_batch_norm(x, weight, bias, mean, var, *, eps, momentum, seen, training, fast_variance=True):
    """Flax ``BatchNorm`` on channels-last x; returns (y, running mean, running var) as numpy float64."""
    import flax.linen as nn
    import jax.numpy as jnp

    m = 1.0 / seen if momentum is None else momentum
    module = nn.BatchNorm(
        use_running_average=not training,
        axis=-1,
        momentum=framework_momentum(m, FLAX),
        epsilon=eps,
        use_bias=bias is not None,
        use_scale=weight is not None,
        use_fast_variance=fast_variance,
    )
    variables = {
        "params": _affine(weight, bias),
        "batch_stats": {"mean": jnp.asarray(mean, jnp.float32), "var": jnp.asarray(var, jnp.float32)},
    }
    if training:
        y, updated = module.apply(variables, x, mutable=["batch_stats"])
        stats = updated["batch_stats"]
        return y, np.asarray(stats["mean"], np.float64), np.asarray(stats["var"], np.float64)
    return module.apply(variables, x), np.asarray(mean, np.float64), np.asarray(var, np.float64)


def flax_group_norm(x, groups, weight, bias, *, eps, fast_variance=True):
    import flax.linen as nn

    module = nn.GroupNorm(
        num_groups=groups,
        epsilon=eps,
        use_bias=bias is not None,
        use_scale=weight is not None,
        use_fast_variance=fast_variance,
    )
    return module.apply({"params": _affine(weight, bias)}, x)


def flax_layer_norm(x, weight, bias, *, eps, fast_variance=True):
    """normlab ``ln``: normalize over all non-batch axes, per-channel (last axis) affine."""
    import flax.linen as nn

    module = nn.LayerNorm(
        epsilon=eps,
        use_bias=bias is not None,
        use_scale=weight is not None,
        reduction_axes=tuple(range(1, x.ndim)),
        feature_axes=-1,
        use_fast_variance=fast_variance,
    )
    return module.apply({"params": _affine(weight, bias)}, x)


class FlaxOps:
    """Graph ops with Flax modules; every value of 3 or more axes is channels-last."""

    def __init__(self, fast_variance: bool = True) -> None:
        self.fast_variance = fast_variance

    def to_native(self, x):
        import jax.numpy as jnp

        return _last(jnp.asarray(np.asarray(x, np.float32)))

    def to_common(self, v):
        return np.asarray(_first(v), np.float64)

    def const(self, v):
        return self.to_native(v)

    def conv(self, node, x, weight, bias):
        import flax.linen as nn
        import jax.numpy as jnp

        a = node.attrs
        d = a["dims"]
        module = nn.Conv(
            features=weight.shape[0],
            kernel_size=tuple(weight.shape[2:]),
            strides=a["stride"],
            padding=[(p, p) for p in a["padding"]],
            kernel_dilation=a["dilation"],
            feature_group_count=a["groups"],
            use_bias=bias is not None,
        )
        # PyTorch (out, in/groups, *k) -> Flax (*k, in/groups, out)
        kernel = np.transpose(weight, (*range(2, 2 + d), 1, 0))
        params = {"kernel": jnp.asarray(kernel)}
        if bias is not None:
            params["bias"] = jnp.asarray(bias)
        return module.apply({"params": params}, x)

    def linear(self, node, x, weight, bias):
        import flax.linen as nn
        import jax.numpy as jnp

        module = nn.Dense(features=weight.shape[0], use_bias=bias is not None)
        params = {"kernel": jnp.asarray(np.ascontiguousarray(weight.T))}
        if bias is not None:
            params["bias"] = jnp.asarray(bias)
        # nn.Linear acts on the last channels-first axis.
        return _last(module.apply({"params": params}, _first(x)))

    def bn(self, node, x, params, mean, var, seen, *, training):
        a = node.attrs
        return flax_batch_norm(
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

    def gn(self, node, x, weight, bias):
        return flax_group_norm(x, node.attrs["groups"], weight, bias, eps=node.attrs["eps"])

    def layernorm(self, node, x, weight, bias):
        import flax.linen as nn

        k = node.attrs["normalized_ndim"]
        y = _first(x)
        axes = tuple(range(y.ndim - k, y.ndim))
        module = nn.LayerNorm(
            epsilon=node.attrs["eps"],
            use_bias=bias is not None,
            use_scale=weight is not None,
            reduction_axes=axes,
            feature_axes=axes,
            use_fast_variance=self.fast_variance,
        )
        return _last(module.apply({"params": _affine(weight, bias)}, y))

    def relu(self, node, x, **_):
        import jax

        return jax.nn.relu(x)

    def maxpool(self, node, x, **_):
        import flax.linen as nn

        a = node.attrs
        return nn.max_pool(x, a["kernel"], a["stride"], padding=[(p, p) for p in a["padding"]])

    def avgpool(self, node, x, **_):
        import flax.linen as nn

        a = node.attrs
        return nn.avg_pool(
            x, a["kernel"], a["stride"], padding=[(p, p) for p in a["padding"]], count_include_pad=True
        )

    def gap(self, node, x, **_):
        return x.mean(axis=tuple(range(1, x.ndim - 1)), keepdims=True)

    def mean(self, node, x, **_):
        return _last(_first(x).mean(axis=node.attrs["dims"], keepdims=node.attrs["keepdim"]))

    def flatten(self, node, x, **_):
        y = _first(x)  # flatten in PyTorch's (channels-first) element order
        return _last(y.reshape(y.shape[0], -1))

    def reshape(self, node, x, **_):
        y = _first(x)
        return _last(y.reshape(y.shape[0], *node.attrs["shape"]))

    def add(self, node, x, y=None, **_):
        other = node.attrs["scalar"] if y is None else _first(y)
        return _last(_first(x) + other)

    def mul(self, node, x, y=None, **_):
        other = node.attrs["scalar"] if y is None else _first(y)
        return _last(_first(x) * other)


class JaxBackend(Backend):
    """JAX + Flax linen, CPU, float32, channels-last."""

    name = "jax"
    packages = ("jax", "flax")
    convention = FLAX

    def __init__(self, fast_variance: bool = True) -> None:
        self.fast_variance = fast_variance

    def run_layer(self, spec, params, batches):
        import jax.numpy as jnp

        check_batches(batches, spec)
        xs = [_last(jnp.asarray(to_channels_first(np.asarray(b, np.float32), spec.layout))) for b in batches]
        start = time.perf_counter()
        if spec.kind != "bn":
            channels = xs[-1].shape[-1]
            if spec.kind == "ln":
                y = flax_layer_norm(
                    xs[-1], params.weight, params.bias, eps=spec.eps, fast_variance=self.fast_variance
                )
            else:
                y = flax_group_norm(
                    xs[-1],
                    spec.num_groups(channels),
                    params.weight,
                    params.bias,
                    eps=spec.eps,
                    fast_variance=self.fast_variance,
                )
            return LayerRun(self._out(y, spec.layout), seconds=time.perf_counter() - start)
        mean, var = params.running_mean, params.running_var
        for seen, x in enumerate(xs[:-1], start=1):
            _, mean, var = self._bn(spec, params, x, mean, var, seen, True)
        y, mean, var = self._bn(spec, params, xs[-1], mean, var, spec.steps + 1, spec.mode == "train")
        return LayerRun(self._out(y, spec.layout), mean, var, time.perf_counter() - start)

    def _bn(self, spec, params, x, mean, var, seen, training):
        return flax_batch_norm(
            x,
            params.weight,
            params.bias,
            mean,
            var,
            eps=spec.eps,
            momentum=spec.momentum,
            seen=seen,
            training=training,
            fast_variance=self.fast_variance,
        )

    @staticmethod
    def _out(y, layout: str) -> np.ndarray:
        y = np.asarray(y, np.float64)
        return y if layout == "channels_last" or y.ndim < 3 else np.moveaxis(y, -1, 1)

    def run_model(self, graph, x, *, mode, train_batches):
        ops = FlaxOps(self.fast_variance)
        start = time.perf_counter()
        stats = initial_stats(graph)
        for batch in train_batches:
            interpret(graph, batch, ops, training=True, stats=stats)
        values = interpret(graph, x, ops, training=mode == "train", stats=stats)
        outputs = {name: ops.to_common(v) for name, v in values.items()}
        return ModelRun(outputs, graph.output, time.perf_counter() - start)
