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
    shape: str = typer.Option("8,4,5,5", help="input shape N,C,... (channels-first)"),
    seed: int = typer.Option(0),
    t_mad: float = T_MAD,
    t_class: float = T_CLASS,
    p: float = P,
    rtol: float = RTOL,
    atol: float = ATOL,
    as_json: bool = JSON,
) -> None:
    """Cross-check one normalization layer (outputs and running statistics) against the numpy oracle."""
    from normlab.crossval import LayerSpec, crossval_layer

    _check_run(seed, steps, math.prod(_ints(shape, "shape")))
    spec = LayerSpec(
        kind=kind,
        eps=eps,
        momentum=_momentum(momentum),
        affine=affine,
        mode=mode,
        layout=layout,
        steps=steps,
        groups=groups,
    )
    report = crossval_layer(
        spec,
        backends,
        shape=_ints(shape, "shape"),
        seed=seed,
        thresholds=_thresholds(t_mad, t_class, p, rtol, atol),
    )
    _finish(report, as_json)


@crossval_app.command("model")
def model(
    model_name: str = typer.Option("resnet20", "--model", help="a normlab model name"),
    norm: str = typer.Option("bn", help="normalization of the model"),
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
    from normlab.models import create_model

    if batch < 1 or steps < 0:
        raise NormlabError(f"batch must be >= 1 and steps >= 0, got batch={batch}, steps={steps}")
    default_shape = (in_channels, 32 * 32 if dims == 2 else 40)
    per_input = _ints(input_shape, "input_shape") if input_shape else default_shape
    _check_run(seed, steps, batch * math.prod(per_input))
    torch.manual_seed(seed)
    net = create_model(model_name, norm=norm, num_classes=num_classes, in_channels=in_channels, dims=dims)
    if randomize_norms:
        randomize_norm_state(net, seed)
    shape = (
        _ints(input_shape, "input_shape")
        if input_shape
        else (in_channels, *((32, 32) if dims == 2 else (40,)))
    )
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *shape)).astype(np.float32)
    train_batches = [rng.normal(size=(batch, *shape)).astype(np.float32) for _ in range(steps)]
    report = crossval_model(
        net,
        x,
        backends,
        mode=mode,
        train_batches=train_batches,
        name=model_name,
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
