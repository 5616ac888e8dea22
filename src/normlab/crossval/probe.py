"""Measure each installed library's batch-norm defaults and behaviours (science.md section 7).

Nothing here is a hard-coded table: every value is read from the library (constructor defaults, the ONNX
operator schema) or measured by running it. One training step from running_mean = running_var = 0 on a
batch x of m values per channel gives

    running_mean = w * mean(x)            -> w, the weight of the new batch
    running_var  = w * c * var_B(x)       -> c = 1 (biased) or m/(m-1) (unbiased)

and comparing w with the library's momentum parameter p tells its meaning: w = p ("weight of the new
batch", PyTorch) or w = 1 - p ("decay of the old value", Flax, ONNX). Batch size 1 in training and float16 /
bfloat16 inputs are run as-is and the outcome recorded (output vs the float32 result of the same library).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from normlab.crossval.backends import get_backend, parse_backends

C, M = 3, 16  # channels, values per channel in the probing batch


@dataclass
class BNProbe:
    """What one library's batch norm does, measured."""

    backend: str
    library: str = ""
    eps_default: float | None = None
    momentum_default: float | None = None
    new_batch_weight: float | None = None
    momentum_meaning: str = ""
    variance_factor: float | None = None  # c: running_var batch contribution / biased variance
    running_var: str = ""
    batch1_train: str = ""
    half: dict[str, str] = field(default_factory=dict)
    skipped: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _batch(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (1.0 + 2.0 * rng.normal(size=(M, C))).astype(np.float32)


def _interpret(probe: BNProbe, mean: np.ndarray, var: np.ndarray, x: np.ndarray) -> None:
    x64 = x.astype(np.float64)
    w = float(np.mean(mean / x64.mean(axis=0)))
    c = float(np.mean(var / (w * x64.var(axis=0))))
    probe.new_batch_weight = w
    probe.variance_factor = c
    if probe.momentum_default is not None:
        p = probe.momentum_default
        probe.momentum_meaning = (
            "weight of the new batch"
            if abs(w - p) < 1e-6
            else "decay of the old value"
            if abs(w - (1 - p)) < 1e-6
            else f"neither (momentum {p}, new-batch weight {w:.6g})"
        )
    unbiased = x.shape[0] / (x.shape[0] - 1)
    probe.running_var = (
        "biased"
        if abs(c - 1) < 1e-5
        else f"unbiased (m/(m-1) = {unbiased:.6g})"
        if abs(c - unbiased) < 1e-5
        else f"factor {c:.6g}"
    )


def _outcome(fn: Callable[[], np.ndarray]) -> str:
    try:
        y = np.asarray(fn(), np.float64)
    except Exception as exc:
        return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return f"output {np.array2string(y.ravel()[:C], precision=4)} (finite: {bool(np.isfinite(y).all())})"


def _half(
    run: Callable[[str], np.ndarray], ref: np.ndarray, dtypes=("float16", "bfloat16")
) -> dict[str, str]:
    out = {}
    for dtype in dtypes:
        try:
            y, out_dtype = run(dtype)
            err = float(np.max(np.abs(np.asarray(y, np.float64) - ref)))
            out[dtype] = f"output {out_dtype}, max |y - y_float32| = {err:.3g}"
        except Exception as exc:
            out[dtype] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return out


def probe_torch(probe: BNProbe) -> None:
    import torch

    probe.library = f"torch {torch.__version__}"
    bn = torch.nn.BatchNorm1d(C)
    probe.eps_default, probe.momentum_default = bn.eps, bn.momentum
    x = _batch()
    bn.running_mean.zero_()
    bn.running_var.zero_()
    with torch.no_grad():
        ref = bn(torch.from_numpy(x)).numpy()
    _interpret(probe, bn.running_mean.numpy(), bn.running_var.numpy(), x)
    probe.batch1_train = _outcome(lambda: torch.nn.BatchNorm1d(C)(torch.from_numpy(x[:1])).detach().numpy())

    def half(dtype):
        layer = torch.nn.BatchNorm1d(C).to(getattr(torch, dtype))
        with torch.no_grad():
            y = layer(torch.from_numpy(x).to(getattr(torch, dtype)))
        return y.float().numpy(), str(y.dtype).replace("torch.", "")

    probe.half = _half(half, ref)


def probe_flax(probe: BNProbe) -> None:
    import flax
    import flax.linen as nn
    import jax.numpy as jnp

    probe.library = f"flax {flax.__version__}"
    module = nn.BatchNorm(use_running_average=False)
    probe.eps_default, probe.momentum_default = module.epsilon, module.momentum
    x = _batch()
    zeros = jnp.zeros(C)

    def run(xx, dtype=jnp.float32):
        variables = {
            "params": {"scale": jnp.ones(C), "bias": jnp.zeros(C)},
            "batch_stats": {"mean": zeros, "var": zeros},
        }
        return nn.BatchNorm(use_running_average=False, dtype=dtype).apply(
            variables, jnp.asarray(xx, dtype), mutable=["batch_stats"]
        )

    y, updated = run(x)
    _interpret(
        probe, np.asarray(updated["batch_stats"]["mean"]), np.asarray(updated["batch_stats"]["var"]), x
    )
    probe.batch1_train = _outcome(lambda: run(x[:1])[0])

    def half(dtype):
        out, _ = run(x, getattr(jnp, dtype))
        return np.asarray(out.astype(jnp.float32)), str(out.dtype)

    probe.half = _half(half, np.asarray(y))


def _onnx_bn(training: bool, dtype: str = "float32"):
    import onnx
    from onnx import TensorProto, helper

    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}[
        dtype
    ]
    names = ["Y", "running_mean", "running_var"] if training else ["Y"]
    inputs = [helper.make_tensor_value_info("X", elem, [None, C])]
    inputs += [helper.make_tensor_value_info(n, elem, [C]) for n in ("scale", "B", "mean", "var")]
    outputs = [helper.make_tensor_value_info(n, elem, None) for n in names]
    node = helper.make_node(
        "BatchNormalization", ["X", "scale", "B", "mean", "var"], names, training_mode=int(training)
    )
    graph = helper.make_graph([node], "bn", inputs, outputs)
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def probe_onnxruntime(probe: BNProbe) -> None:
    import onnx
    import onnxruntime as ort

    probe.library = f"onnxruntime {ort.__version__} (ONNX BatchNormalization-15 with training_mode=1)"
    attrs = onnx.defs.get_schema("BatchNormalization").attributes
    # Schema defaults are float32: print them as the operator spec states them.
    probe.eps_default = float(f"{attrs['epsilon'].default_value.f:.6g}")
    probe.momentum_default = float(f"{attrs['momentum'].default_value.f:.6g}")

    def run(xx, training=True, dtype="float32"):
        np_dtype = np.float16 if dtype == "float16" else np.float32
        session = ort.InferenceSession(
            _onnx_bn(training, dtype).SerializeToString(), providers=["CPUExecutionProvider"]
        )
        feeds = {
            "X": xx.astype(np_dtype),
            "scale": np.ones(C, np_dtype),
            "B": np.zeros(C, np_dtype),
            "mean": np.zeros(C, np_dtype),
            "var": np.zeros(C, np_dtype),
        }
        return session.run(None, feeds)

    x = _batch()
    y, mean, var = run(x)
    _interpret(probe, mean, var, x)
    probe.batch1_train = _outcome(lambda: run(x[:1])[0])

    def half(dtype):
        if dtype == "bfloat16":
            raise TypeError("numpy has no bfloat16 to feed onnxruntime")
        out = run(x, True, dtype)[0]
        return out.astype(np.float32), str(out.dtype)

    probe.half = _half(half, y)


def probe_numpy(probe: BNProbe) -> None:
    from normlab.crossval import oracle
    from normlab.crossval.spec import LayerSpec

    probe.library = f"numpy {np.__version__} (normlab oracle)"
    spec = LayerSpec()
    probe.eps_default, probe.momentum_default = spec.eps, spec.momentum
    x = _batch()
    zeros = np.zeros(C)

    def run(xx, dtype=np.float64):
        return oracle.batch_norm_train(
            xx.astype(dtype),
            np.ones(C),
            zeros,
            zeros,
            zeros,
            eps=spec.eps,
            momentum=spec.momentum,
            batches_seen=1,
        )

    y, mean, var = run(x)
    _interpret(probe, mean, var, x)
    y1, _, var1 = run(x[:1])
    probe.batch1_train = (
        f"output {np.array2string(y1.ravel(), precision=4)} (= beta); unbiased running_var "
        f"{np.array2string(var1, precision=4)} (m/(m-1) undefined at m = 1)"
    )
    probe.half = {
        "float16": "not applicable: the oracle computes in float64 whatever the input dtype",
        "bfloat16": "not applicable: numpy has no bfloat16",
    }


_PROBES = {
    "numpy": (probe_numpy, ()),
    "torch": (probe_torch, ("torch",)),
    "torch-compile": (probe_torch, ("torch",)),
    "torch-cuda": (probe_torch, ("torch",)),
    "jax": (probe_flax, ("jax", "flax")),
    "onnxruntime": (probe_onnxruntime, ("onnx", "onnxruntime")),
}


def probe_conventions(backends: str | list[str] = "numpy,torch,onnxruntime,jax") -> list[BNProbe]:
    """Probe the BN of each backend's library; missing packages give a ``skipped`` entry."""
    results = []
    for name in parse_backends(backends):
        probe = BNProbe(name)
        results.append(probe)
        if name not in _PROBES:
            probe.skipped = f"no probe for backend {name!r}"
            continue
        fn, packages = _PROBES[name]
        reason = get_backend(name).unavailable()
        if reason is None:
            for package in packages:
                try:
                    importlib.import_module(package)
                except Exception as exc:
                    reason = f"package {package!r} is not importable ({exc})"
        if reason:
            probe.skipped = reason
            continue
        if name in ("torch-compile", "torch-cuda"):
            probe.skipped = (f"same library defaults as 'torch' ({name} runs torch's own modules, which "
                             "compilation or the device does not change)")
            continue
        fn(probe)
    return results
