"""Cross-check one layer or one model on several backends (CRADLE, Pham et al. ICSE 2019, section III).

Ground truth G: the float64 numpy oracle. For a layer, G is its output (and running statistics); for a
model, G is the oracle's final output (``truth="oracle"``, default) or, with ``truth="labels"``, the one-hot
labels compared with each backend's softmax output, as CRADLE did for classifiers. The class-based
distance uses the given labels or, without labels, the oracle's top-1 class.

Each backend is measured against the oracle *of its own convention* (the Flax backend against an oracle
whose running variance is biased), so a pair that disagrees only by convention is reported as a
:class:`~normlab.crossval.conventions.ConventionDifference` with its size, not as an inconsistency.
Per-layer distances of a pair follow CRADLE, ``delta_L = mean|L_1 - L_2|``, computed on each backend's
output minus its own-convention oracle (identical to CRADLE's when the conventions agree).

Noise floor: a layer output (or a D_MAD pair) is "at the truth" when its mean absolute error is at most
``atol + rtol * mean|G|``; float32 backends differ from a float64 oracle by rounding alone (~1e-7 relative).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from torch import nn

from normlab.crossval import metrics
from normlab.crossval.backends import BackendUnsupportedError, get_backend, parse_backends
from normlab.crossval.backends.numpy_backend import NumpyBackend
from normlab.crossval.conventions import Convention, ConventionDifference, running_var_difference
from normlab.crossval.graph import ModelGraph, trace_model
from normlab.crossval.spec import LayerParams, LayerSpec, ModelRun, check_batches, to_channels_first
from normlab.errors import NormlabError


@dataclass(frozen=True)
class Thresholds:
    """CRADLE's thresholds (T_MAD, T_C, p; values recalled from the paper: 0.2, 8, 0) and the noise floor."""

    t_mad: float = 0.2
    t_class: float = 8.0
    p: float = 0.0
    k: int = 5
    rtol: float = 1e-5
    atol: float = 1e-6

    def __post_init__(self) -> None:
        if not 0.0 <= self.t_mad <= 1.0:
            raise NormlabError(f"t_mad must be in [0, 1], got {self.t_mad!r}")
        if self.t_class < 0:
            raise NormlabError(f"t_class must be >= 0, got {self.t_class!r}")
        if not 0.0 <= self.p < 1.0:
            raise NormlabError(f"p must be in [0, 1), got {self.p!r}")
        if self.rtol < 0 or self.atol < 0:
            raise NormlabError(f"rtol and atol must be >= 0, got {self.rtol!r}, {self.atol!r}")

    def floor(self, truth: np.ndarray) -> float:
        return self.atol + self.rtol * float(np.abs(truth).mean())


@dataclass
class BackendStatus:
    name: str
    status: str  # "ok" | "skipped" | "error"
    message: str = ""
    seconds: float = 0.0
    delta_to_truth: float | None = None  # mean |O - G| of the measured output
    notes: list[str] = field(default_factory=list)


@dataclass
class LayerDistance:
    """CRADLE's per-layer localization numbers for one backend pair."""

    layer: str
    op: str
    delta: float
    delta_pre: float
    rate: float
    inconsistent: bool


@dataclass
class PairResult:
    backends: tuple[str, str]
    delta: float  # mean |O1 - O2| of the measured outputs
    max_abs: float
    d_mad: list[float]  # per input
    inconsistent: bool
    reasons: list[str] = field(default_factory=list)
    d_class: list[float] | None = None
    stats_d_mad: dict[str, float] = field(default_factory=dict)
    layers: list[LayerDistance] = field(default_factory=list)
    first_inconsistent: str | None = None
    localized: str | None = None


@dataclass
class CrossvalReport:
    target: str
    config: dict
    thresholds: Thresholds
    backends: list[BackendStatus]
    pairs: list[PairResult]
    conventions: list[ConventionDifference]

    @property
    def inconsistent(self) -> bool:
        return any(p.inconsistent for p in self.pairs)

    def pair(self, a: str, b: str) -> PairResult:
        for p in self.pairs:
            if set(p.backends) == {a, b}:
                return p
        raise NormlabError(
            f"no comparison of {a!r} and {b!r}; compared: {[list(p.backends) for p in self.pairs]}"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["conventions"] = [c.to_dict() for c in self.conventions]
        d["inconsistent"] = self.inconsistent
        for p in d["pairs"]:
            p["backends"] = list(p["backends"])
        return d


def _run_all(names, call) -> tuple[list[BackendStatus], dict]:
    """Run ``call(backend)`` on each backend; a missing package or BackendUnsupportedError -> skipped."""
    statuses, results = [], {}
    for name in names:
        backend = get_backend(name)
        reason = backend.unavailable()
        if reason:
            statuses.append(BackendStatus(name, "skipped", reason))
            continue
        start = time.perf_counter()
        try:
            result = call(backend)
        except BackendUnsupportedError as exc:
            statuses.append(BackendStatus(name, "skipped", f"backend {name!r} skipped: {exc}"))
            continue
        wall = time.perf_counter() - start
        notes = list(getattr(result, "notes", []))
        statuses.append(BackendStatus(name, "ok", seconds=wall, notes=notes))
        results[name] = (backend, result)
    return statuses, results


def _oracles(results: dict, run_oracle) -> dict[str, object]:
    """The oracle result for each convention among ``results`` (keyed by running-variance convention)."""
    needed = {b.convention.running_var for b, _ in results.values()}
    numpy_run = results.get("numpy")
    if numpy_run is not None and type(numpy_run[0]) is NumpyBackend and numpy_run[0].unbiased_running_var:
        truths = {"unbiased": numpy_run[1]}  # the oracle already ran as a backend
    else:
        truths = {"unbiased": run_oracle(NumpyBackend(unbiased_running_var=True))}
    if "biased" in needed:
        truths["biased"] = run_oracle(NumpyBackend(unbiased_running_var=False))
    truths["none"] = truths["unbiased"]
    return truths


def _truth_key(convention: Convention) -> str:
    return "biased" if convention.running_var == "biased" else "unbiased"


def crossval_layer(
    spec: LayerSpec,
    backends: str | list[str] = "numpy,torch,onnxruntime,jax",
    *,
    shape: tuple[int, ...] = (8, 4, 5, 5),
    seed: int = 0,
    params: LayerParams | None = None,
    batches: list[np.ndarray] | None = None,
    thresholds: Thresholds | None = None,
) -> CrossvalReport:
    """Run ``spec`` on every backend, compare outputs and running statistics against the oracle.

    ``batches`` (``spec.steps`` training batches then the measured one, in ``spec.layout``) and ``params``
    default to :func:`~normlab.crossval.spec.make_layer_inputs` with ``shape`` (channels-first) and ``seed``.
    """
    from normlab.crossval.spec import from_channels_first, make_layer_inputs

    thresholds = thresholds or Thresholds()
    names = parse_backends(backends)
    if params is None or batches is None:
        p, b = make_layer_inputs(spec, tuple(shape), seed=seed)
        params = params or p
        batches = batches or [from_channels_first(x, spec.layout) for x in b]
    batches = [np.asarray(x, np.float32) for x in batches]
    check_batches(batches, spec)
    channels = to_channels_first(batches[0], spec.layout).shape[1]
    for what, v in (
        ("weight", params.weight),
        ("bias", params.bias),
        ("running_mean", params.running_mean),
        ("running_var", params.running_var),
    ):
        if v is not None and np.shape(v) != (channels,):
            raise NormlabError(
                f"mismatched shapes: {what} has shape {list(np.shape(v))}, input has {channels} channels"
            )
    if spec.kind != "bn":
        spec.num_groups(channels)

    statuses, results = _run_all(names, lambda b: b.run_layer(spec, params, batches))
    truths = _oracles(results, lambda oracle: oracle.run_layer(spec, params, batches))
    g = truths["unbiased"].output
    floor = thresholds.floor(g)
    for s in statuses:
        if s.status == "ok":
            s.delta_to_truth = float(np.abs(results[s.name][1].output - g).mean())

    pairs, conventions = [], []
    for a, b in itertools.combinations([s.name for s in statuses if s.status == "ok"], 2):
        (ba, ra), (bb, rb) = results[a], results[b]
        pairs.append(_layer_pair(spec, (a, b), (ba, bb), (ra, rb), truths, floor, thresholds))
        if spec.kind == "bn" and ra.running_var is not None and rb.running_var is not None:
            trained_steps = spec.steps + (spec.mode == "train")
            x = to_channels_first(batches[0], spec.layout)
            diff = running_var_difference(
                (a, b),
                (ba.convention, bb.convention),
                (ra.running_var, rb.running_var),
                params.running_var,
                momentum=spec.momentum,
                steps=trained_steps,
                count=x.size // x.shape[1],
            )
            if diff is not None:
                conventions.append(diff)
    config = {
        "kind": "layer",
        **asdict(spec),
        "shape": list(to_channels_first(batches[0], spec.layout).shape),
    }
    return CrossvalReport(
        f"layer {spec.kind} ({spec.mode})", config, thresholds, statuses, pairs, conventions
    )


def _layer_pair(spec, names, backends, runs, truths, floor, th) -> PairResult:
    (ba, bb), (ra, rb) = backends, runs
    ga, gb = truths[_truth_key(ba.convention)], truths[_truth_key(bb.convention)]
    d = _d_mad_two_truths(ra.output, ga.output, rb.output, gb.output, floor)
    result = PairResult(
        names,
        delta=float(np.abs(ra.output - rb.output).mean()),
        max_abs=float(np.abs(ra.output - rb.output).max()),
        d_mad=d.tolist(),
        inconsistent=False,
    )
    if metrics.inconsistent(d, th.t_mad, th.p):
        result.inconsistent = True
        result.reasons.append(f"output: D_MAD > {th.t_mad} on {np.mean(d > th.t_mad):.0%} of inputs")
    if spec.kind == "bn":
        for stat in ("running_mean", "running_var"):
            oa, ob = getattr(ra, stat), getattr(rb, stat)
            ta, tb = getattr(ga, stat), getattr(gb, stat)
            stat_floor = th.floor(ta)
            dm = float(_d_mad_two_truths(oa[None], ta[None], ob[None], tb[None], stat_floor)[0])
            result.stats_d_mad[stat] = dm
            if dm > th.t_mad:
                result.inconsistent = True
                result.reasons.append(f"{stat}: D_MAD = {dm:.3g} > {th.t_mad}")
    return result


def _d_mad_two_truths(o1, g1, o2, g2, floor: float) -> np.ndarray:
    """D_MAD with each output measured against its own-convention truth (same G when conventions agree)."""
    d1, d2 = metrics.mad_delta(o1, g1), metrics.mad_delta(o2, g2)
    total = d1 + d2
    at_truth = (d1 <= floor) & (d2 <= floor)
    return np.where(at_truth | (total == 0), 0.0, np.abs(d1 - d2) / np.where(total > 0, total, 1.0))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def crossval_model(
    model: nn.Module | ModelGraph,
    x: np.ndarray,
    backends: str | list[str] = "numpy,torch,onnxruntime,jax",
    *,
    mode: str = "eval",
    train_batches: list[np.ndarray] | None = None,
    labels: np.ndarray | None = None,
    truth: str = "oracle",
    thresholds: Thresholds | None = None,
    name: str | None = None,
) -> CrossvalReport:
    """Run ``model`` with its weights on every backend; compare outputs and localize inconsistencies.

    x: (N, C, ...) float32 channels-first. ``train_batches``: training-mode passes before the measured one
    (they update BN running statistics). ``labels`` (N,) for the class-based distance (default: the
    oracle's top-1). ``truth``: ``oracle`` or ``labels`` (see module docstring).
    """
    thresholds = thresholds or Thresholds()
    names = parse_backends(backends)
    if mode not in ("train", "eval"):
        raise NormlabError(f"unknown mode {mode!r}; valid: train, eval")
    if truth not in ("oracle", "labels"):
        raise NormlabError(f"unknown truth {truth!r}; valid: oracle, labels")
    x = np.asarray(x, np.float32)
    graph = model if isinstance(model, ModelGraph) else trace_model(model, x)
    if tuple(x.shape[1:]) != graph.input_shape:
        raise NormlabError(
            f"mismatched shapes: input {list(x.shape)} for a graph traced on inputs of shape [N, "
            f"{', '.join(map(str, graph.input_shape))}]"
        )
    train_batches = [np.asarray(b, np.float32) for b in (train_batches or [])]
    for i, b in enumerate(train_batches):
        if b.shape[1:] != x.shape[1:]:
            raise NormlabError(
                f"mismatched shapes: train batch {i} has shape {list(b.shape)}, input has {list(x.shape)}"
            )
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (x.shape[0],):
            raise NormlabError(f"mismatched shapes: labels {list(labels.shape)} for {x.shape[0]} inputs")
    if truth == "labels" and labels is None:
        raise NormlabError("truth='labels' needs labels (N,) for the inputs")

    def call(backend):
        return backend.run_model(graph, x, mode=mode, train_batches=train_batches)

    statuses, results = _run_all(names, call)
    truths = _oracles(
        results, lambda oracle: oracle.run_model(graph, x, mode=mode, train_batches=train_batches)
    )
    final = graph.output
    g_out = truths["unbiased"].outputs[final]
    is_classifier = g_out.ndim == 2 and g_out.shape[1] > 1
    if truth == "labels" and not is_classifier:
        raise NormlabError(f"truth='labels' needs a classifier output (N, classes), got {list(g_out.shape)}")
    class_labels = labels if labels is not None else (g_out.argmax(axis=1) if is_classifier else None)
    for s in statuses:
        if s.status == "ok":
            s.delta_to_truth = float(np.abs(results[s.name][1].outputs[final] - g_out).mean())

    pairs, conventions = [], []
    ok = [s.name for s in statuses if s.status == "ok"]
    for a, b in itertools.combinations(ok, 2):
        (ba, ra), (bb, rb) = results[a], results[b]
        ga, gb = truths[_truth_key(ba.convention)], truths[_truth_key(bb.convention)]
        pair = _model_pair(
            graph, (a, b), ra, rb, ga, gb, truths["unbiased"], class_labels, truth, labels, thresholds
        )
        pairs.append(pair)
        if ga is not gb:
            delta = float(np.abs(ga.outputs[final] - gb.outputs[final]).mean())
            conventions.append(
                ConventionDifference(
                    what="running_var",
                    backends=(a, b),
                    values=(ba.convention.running_var, bb.convention.running_var),
                    expected=delta,
                    measured=pair.delta,
                    note=(
                        f"after {len(train_batches)} training pass(es), biased vs unbiased running variance "
                        f"moves the final output by mean |d| = {delta:.3g} (oracle under each convention); "
                        f"measured between the backends: {pair.delta:.3g}"
                    ),
                )
            )
    config = {
        "kind": "model",
        "name": name or type(model).__name__,
        "mode": mode,
        "input_shape": list(x.shape),
        "train_batches": len(train_batches),
        "truth": truth,
        "layers": len(graph.recorded),
    }
    return CrossvalReport(
        f"model {config['name']} ({mode})", config, thresholds, statuses, pairs, conventions
    )


def _model_pair(
    graph,
    names,
    ra: ModelRun,
    rb: ModelRun,
    ga: ModelRun,
    gb: ModelRun,
    g: ModelRun,
    class_labels,
    truth,
    labels,
    th,
) -> PairResult:
    final = graph.output
    oa, ob = ra.outputs[final], rb.outputs[final]
    if truth == "labels":
        one_hot = np.eye(oa.shape[1])[labels]
        d = _d_mad_two_truths(_softmax(oa), one_hot, _softmax(ob), one_hot, 0.0)
    else:
        d = _d_mad_two_truths(oa, ga.outputs[final], ob, gb.outputs[final], th.floor(g.outputs[final]))
    pair = PairResult(names, float(np.abs(oa - ob).mean()), float(np.abs(oa - ob).max()), d.tolist(), False)
    if metrics.inconsistent(d, th.t_mad, th.p):
        pair.inconsistent = True
        pair.reasons.append(f"output: D_MAD > {th.t_mad} on {np.mean(d > th.t_mad):.0%} of inputs")
    if class_labels is not None:
        dc = metrics.d_class(oa, ob, class_labels, k=min(th.k, oa.shape[1]))
        pair.d_class = dc.tolist()
        if metrics.inconsistent(dc, th.t_class, th.p):
            pair.inconsistent = True
            pair.reasons.append(f"class: D_CLASS > {th.t_class} on {np.mean(dc > th.t_class):.0%} of inputs")
    deltas: dict[str, float] = {graph.input: 0.0}
    for node in graph.nodes:
        if node.op == "const":
            deltas[node.name] = 0.0
            continue
        la = ra.outputs[node.name] - ga.outputs[node.name]
        lb = rb.outputs[node.name] - gb.outputs[node.name]
        delta = metrics.layer_delta(la, lb)
        pre = max((deltas[i] for i in node.inputs), default=0.0)
        deltas[node.name] = delta
        bad = delta > th.floor(g.outputs[node.name])
        pair.layers.append(
            LayerDistance(node.name, node.op, delta, pre, metrics.introduction_rate(delta, pre), bad)
        )
    bad_layers = [layer for layer in pair.layers if layer.inconsistent]
    if bad_layers:
        pair.first_inconsistent = bad_layers[0].layer
        pair.localized = max(bad_layers, key=lambda layer: layer.rate).layer
    return pair
