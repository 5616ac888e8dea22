"""``normlab crossval``: cross-backend validation of a normalization layer or a model (CRADLE-style).

``layer`` and ``model`` print rich tables (``--json`` for machine-readable output) and exit with code 1
when some backend pair is inconsistent, so they can gate CI; ``conventions`` probes the installed
libraries' batch norm.
"""

from __future__ import annotations

import math

import typer

from normlab.errors import NormlabError

crossval_app = typer.Typer(
    help="Cross-backend validation (CRADLE): run a layer or model on several backends.", no_args_is_help=True
)

_BACKENDS_HELP = ("comma-separated: numpy,torch,torch-compile,onnxruntime,jax,torch-cuda (numpy is the "
                  "float64 oracle)")


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise NormlabError(f"{what} must be comma-separated ints, got {text!r}") from None
    if not values:
        raise NormlabError(f"{what} must be comma-separated ints, got {text!r}")
    return values


def _momentum(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise NormlabError(f"momentum must be a float in [0, 1] or 'none', got {text!r}") from None


MAX_WORK_VALUES = 2e9  # steps x input values: ~8 GB of float32 batches, minutes of numpy work per backend


def _check_run(seed: int, steps: int, values: int) -> None:
    """Seed in range; ``steps`` passes over ``values`` input values must fit memory and minutes."""
    if not 0 <= seed < 2**63:
        raise NormlabError(f"--seed must be between 0 and 2**63-1, got {seed}")
    if steps < 0:
        raise NormlabError(f"--steps must be >= 0, got {steps}")
    work = max(steps, 1) * values
    if work > MAX_WORK_VALUES:
        raise NormlabError(
            f"--steps {steps} over inputs of {values} values is {work:.3g} values to generate and run "
            f"through every backend (about {work * 4 / 2**30:.3g} GiB of float32); the limit is "
            f"{MAX_WORK_VALUES:.0e}"
        )


def _thresholds(t_mad: float, t_class: float, p: float, rtol: float, atol: float):
    from normlab.crossval import Thresholds

    for flag, value in (("--t-mad", t_mad), ("--t-class", t_class), ("--rtol", rtol), ("--atol", atol)):
        if not math.isfinite(value) or value < 0:
            raise NormlabError(f"{flag} must be a finite number >= 0, got {value}")
    if not 0.0 <= p <= 1.0:  # also refuses nan
        raise NormlabError(f"--p must be a fraction in [0, 1], got {p}")

    return Thresholds(t_mad=t_mad, t_class=t_class, p=p, rtol=rtol, atol=atol)


def _finish(report, as_json: bool) -> None:
    from normlab.crossval.report import render, to_json

    if as_json:
        typer.echo(to_json(report))
    else:
        render(report)
    if report.inconsistent:
        raise typer.Exit(1)


T_MAD = typer.Option(0.2, "--t-mad", help="MAD-distance threshold T_MAD")
T_CLASS = typer.Option(8.0, "--t-class", help="class-distance threshold T_C (k=5 scores: 16, 8, 4, 2, 1)")
P = typer.Option(0.0, "--p", help="inconsistent when more than this fraction of inputs exceed a threshold")
RTOL = typer.Option(1e-5, "--rtol", help="noise floor: mean|O - G| <= atol + rtol * mean|G| is agreement")
ATOL = typer.Option(1e-6, "--atol", help="noise floor, absolute part")
JSON = typer.Option(False, "--json", help="print JSON instead of tables")


@crossval_app.command("layer")
def layer(
    kind: str = typer.Option("bn", help="bn, gn, ln or in"),
    mode: str = typer.Option("train", help="mode of the measured pass: train or eval"),
    backends: str = typer.Option("numpy,torch,onnxruntime,jax", help=_BACKENDS_HELP),
    eps: float = typer.Option(1e-5),
    momentum: str = typer.Option("0.1", help="weight of the new batch (PyTorch meaning), or 'none'"),
    affine: bool = typer.Option(True, "--affine/--no-affine"),
    layout: str = typer.Option("channels_first", help="channels_first or channels_last"),
    steps: int = typer.Option(1, help="training steps before the measured pass"),
    groups: int = typer.Option(2, help="GroupNorm groups (gn)"),
    shape: str = typer.Option("8,4,5,5", help="input shape N,C,... (channels-first); with --dataset only N "
                              "counts (the batch)"),
    model_spec: str = typer.Option(None, "--model", help="your model (file.py:factory, module:factory): "
                                   "check its own norm layer (--layer) on the input that reaches it"),
    layer_name: str = typer.Option(None, "--layer", help="which norm layer of --model (default: the first "
                                   "one called)"),
    dataset: str = typer.Option(None, "--dataset", help="inputs from this data set (as train --dataset)"),
    data_root: str = typer.Option(None, "--data-root", help="folder holding --dataset's data"),
    seed: int = typer.Option(0),
    t_mad: float = T_MAD,
    t_class: float = T_CLASS,
    p: float = P,
    rtol: float = RTOL,
    atol: float = ATOL,
    as_json: bool = JSON,
) -> None:
    """Cross-check one normalization layer (outputs and running statistics) against the numpy oracle."""
    import numpy as np

    from normlab.crossval import LayerSpec, crossval_layer
    from normlab.crossval.spec import from_channels_first, make_layer_inputs

    if layer_name is not None and model_spec is None:
        raise NormlabError("--layer needs --model")
    dims = _ints(shape, "shape")
    data = _data(dataset, data_root)
    _check_run(seed, steps, math.prod(dims) if data is None else dims[0] * math.prod(data.input_shape))
    params = batches = None
    if data is not None:
        batches = _data_batches(data, dims[0], steps + 1)
    if model_spec is not None:
        if batches is None:
            rng = np.random.default_rng(seed)
            batches = [rng.normal(size=dims).astype(np.float32) for _ in range(steps + 1)]
        classes = data.num_classes if data is not None and data.task == "classification" else 10
        net = _user_model(model_spec, "bn", classes, batches[0].shape[1], batches[0][:2])
        kind, eps, momentum, affine, groups, params, batches = _model_layer(net, model_spec, layer_name,
                                                                            batches)
    spec = LayerSpec(
        kind=kind,
        eps=eps,
        momentum=momentum if model_spec is not None else _momentum(momentum),
        affine=affine,
        mode=mode,
        layout=layout,
        steps=steps,
        groups=groups,
    )
    if batches is not None:
        if params is None:  # seeded gamma, beta and running statistics for the data's channels
            params = make_layer_inputs(spec, batches[0].shape, seed=seed)[0]
        batches = [from_channels_first(b, layout) for b in batches]
    report = crossval_layer(
        spec,
        backends,
        shape=dims,
        seed=seed,
        params=params,
        batches=batches,
        thresholds=_thresholds(t_mad, t_class, p, rtol, atol),
    )
    _finish(report, as_json)


def _model_layer(net, spec: str, name: str | None, batches: list):
    """``(kind, eps, momentum, affine, groups, params, inputs)`` of a BatchNorm / GroupNorm of the user's
    model: its settings and state, and the input it receives on each batch (eval-mode forward)."""
    import torch
    from torch import nn

    from normlab.crossval.spec import LayerParams
    from normlab.layers.kinds import is_norm

    norms = [(n, m) for n, m in net.named_modules() if is_norm(m)]
    if not norms:
        raise NormlabError(f"model {spec!r} has no normalization layer to check")
    inputs: dict[str, list] = {}
    handles = [m.register_forward_pre_hook(
        lambda _m, args, n=n: inputs.setdefault(n, []).append(args[0].detach().numpy().copy()))
        for n, m in norms]
    net.eval()
    try:
        with torch.no_grad():
            for b in batches:
                net(torch.from_numpy(b))
    finally:
        for handle in handles:
            handle.remove()
    called = [n for n, _ in norms if n in inputs]
    if name is None:
        name = called[0] if called else norms[0][0]
    layers = dict(norms)
    if name not in layers:
        raise NormlabError(f"--layer {name!r} is not a norm layer of {spec!r}; its norm layers: "
                           f"{', '.join(n for n, _ in norms[:8])}")
    layer = layers[name]
    if type(layer) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) and layer.track_running_stats:
        kind, groups, momentum = "bn", 2, layer.momentum
        mean, var = layer.running_mean, layer.running_var
    elif type(layer) is nn.GroupNorm:
        kind, groups, momentum = "gn", layer.num_groups, 0.1
        mean, var = torch.zeros(layer.num_channels), torch.ones(layer.num_channels)
    else:
        raise NormlabError(f"--layer {name} of {spec!r} is a {type(layer).__name__}; crossval layer checks "
                           "torch BatchNorm (with running statistics) and GroupNorm layers")
    if name not in inputs or len(inputs[name]) != len(batches):
        raise NormlabError(f"norm layer {name} of {spec!r} is not called once per forward pass")
    affine = layer.weight is not None
    params = LayerParams(
        weight=layer.weight.detach().numpy().copy() if affine else None,
        bias=layer.bias.detach().numpy().copy() if affine else None,
        running_mean=mean.detach().numpy().copy(), running_var=var.detach().numpy().copy(),
    )
    return kind, layer.eps, momentum, affine, groups, params, inputs[name]


def _data(dataset: str | None, data_root: str | None):
    """The dataset ``--dataset`` names (train's syntax), or None."""
    if dataset is None:
        if data_root is not None:
            raise NormlabError("--data-root needs --dataset")
        return None
    from normlab.data import load_dataset

    return load_dataset(dataset, root=data_root)


def _data_batches(data, batch: int, count: int) -> list:
    """``count`` batches of ``batch`` examples: training examples, then the measured one from the test set."""
    import numpy as np

    x_train, x_test = data.x_train.float().numpy(), data.x_test.float().numpy()
    if batch > min(len(x_train), len(x_test)):
        raise NormlabError(f"batch {batch} is larger than the data ({len(x_train)} training, {len(x_test)} "
                           "test examples)")
    if (count - 1) * batch > len(x_train):
        raise NormlabError(f"{count - 1} training batches of {batch} need more than the {len(x_train)} "
                           "training examples")
    train = [x_train[i * batch:(i + 1) * batch] for i in range(count - 1)]
    return [np.ascontiguousarray(b, np.float32) for b in [*train, x_test[:batch]]]


def _user_model(spec: str, norm: str, num_classes: int, in_channels: int, sample):
    """The user's model of ``spec`` (``file.py:factory`` / ``module:factory``) with ``norm`` applied."""
    import torch

    from normlab.external import build_external_model

    return build_external_model(spec, norm=norm, norm_options={}, options={}, outputs=num_classes,
                                in_channels=in_channels, sample=torch.from_numpy(sample))


@crossval_app.command("model")
def model(
    model_name: str = typer.Option("resnet20", "--model", help="a normlab model name, or your code "
                                   "(file.py:factory, module:factory)"),
    norm: str = typer.Option("bn", help="normalization of the model"),
    dataset: str = typer.Option(None, "--dataset", help="inputs from this data set (as train --dataset); "
                                "sets in_channels, classes and the input shape"),
    data_root: str = typer.Option(None, "--data-root", help="folder holding --dataset's data"),
    backends: str = typer.Option("numpy,torch,onnxruntime,jax", help=_BACKENDS_HELP),
    num_classes: int = typer.Option(10),
    in_channels: int = typer.Option(3),
    dims: int = typer.Option(2, help="1: (N, C, L) signals, 2: images"),
    input_shape: str = typer.Option("", help="input shape without batch, e.g. 3,32,32 (default by dims)"),
    batch: int = typer.Option(8, help="inputs per backend run"),
    mode: str = typer.Option("eval", help="mode of the measured pass"),
    steps: int = typer.Option(0, help="training passes (updating BN statistics) before the measured one"),
    randomize_norms: bool = typer.Option(
        True,
        "--randomize-norms/--no-randomize-norms",
        help="seeded gamma, beta and running statistics (else fresh init)",
    ),
    seed: int = typer.Option(0),
    t_mad: float = T_MAD,
    t_class: float = T_CLASS,
    p: float = P,
    rtol: float = RTOL,
    atol: float = ATOL,
    as_json: bool = JSON,
) -> None:
    """Cross-check a normlab model with every layer's output and localize the first inconsistent layer."""
    import numpy as np
    import torch

    from normlab.crossval import crossval_model
    from normlab.crossval.state import randomize_norm_state
    from normlab.external import is_model_spec
    from normlab.models import create_model

    if batch < 1 or steps < 0:
        raise NormlabError(f"batch must be >= 1 and steps >= 0, got batch={batch}, steps={steps}")
    data = _data(dataset, data_root)
    if data is not None:
        if input_shape:
            raise NormlabError("--input-shape goes without --dataset (the data set's shape is used)")
        in_channels, dims, shape = data.in_channels, data.dims, tuple(data.input_shape)
        num_classes = data.num_classes if data.task == "classification" else num_classes
    default_shape = (in_channels, 32 * 32 if dims == 2 else 40)
    per_input = _ints(input_shape, "input_shape") if input_shape else default_shape
    if data is not None:
        per_input = shape
    _check_run(seed, steps, batch * math.prod(per_input))
    if data is None:
        shape = (
            _ints(input_shape, "input_shape")
            if input_shape
            else (in_channels, *((32, 32) if dims == 2 else (40,)))
        )
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(batch, *shape)).astype(np.float32)
        train_batches = [rng.normal(size=(batch, *shape)).astype(np.float32) for _ in range(steps)]
    else:
        *train_batches, x = _data_batches(data, batch, steps + 1)
    torch.manual_seed(seed)
    if is_model_spec(model_name):
        net = _user_model(model_name, norm, num_classes, in_channels, x[:2])
    else:
        net = create_model(model_name, norm=norm, num_classes=num_classes, in_channels=in_channels, dims=dims)
    if randomize_norms:
        randomize_norm_state(net, seed)
    report = crossval_model(
        net,
        x,
        backends,
        mode=mode,
        train_batches=train_batches,
        name=model_name if dataset is None else f"{model_name} on {dataset}",
        thresholds=_thresholds(t_mad, t_class, p, rtol, atol),
    )
    _finish(report, as_json)


@crossval_app.command("conventions")
def conventions(
    backends: str = typer.Option("numpy,torch,onnxruntime,jax", help=_BACKENDS_HELP),
    as_json: bool = JSON,
) -> None:
    """Probe each installed library's BatchNorm: eps, momentum meaning, running-variance bias, batch size 1,
    float16/bfloat16 behaviour (all measured, nothing hard-coded)."""
    from normlab.crossval.probe import probe_conventions
    from normlab.crossval.report import render_probes, to_json

    probes = probe_conventions(backends)
    if as_json:
        typer.echo(to_json(probes))
    else:
        render_probes(probes)


def register(app: typer.Typer) -> None:
    app.add_typer(crossval_app, name="crossval")
