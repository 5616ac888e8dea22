"""``normlab probe NAME``: run one probe on a model (fresh or from a training checkpoint) and a batch of data.

The model comes from ``--checkpoint`` (a file written by the trainer: its config names model, norm and data,
and its weights and optimizer state are loaded) or is built fresh from ``--model`` / ``--norm``. The batch
is ``--batch-size`` training examples drawn with ``--seed``; ``train_eval_gap`` uses the test set,
``signal_propagation`` unit Gaussian input of the dataset's input shape. Probes that take an optimizer step
(``landscape``, ``ics``) step at ``--lr``, else at the run's base (peak) lr the checkpoint records (not the
optimizer's last lr, near 0 after a decaying schedule), else the config's lr; they print the lr used.
``--mode`` says whether BN uses batch statistics ("train", default) or running ones ("eval"); every result
states it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer

from normlab.cli._common import (
    FORCE_HELP,
    check_probe_budget,
    refuse_model_code_from,
    refuse_paths_from,
)
from normlab.errors import NormlabError

_GAP_EXAMPLES = 2048  # test examples for train_eval_gap (and up to 20 training batches for PreciseBN)


def _parse_options(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise NormlabError(f"--options must be a JSON object of probe arguments: {exc}") from None
    if not isinstance(options, dict):
        raise NormlabError(f"--options must be a JSON object of probe arguments, got {text!r}")
    return options


# Arguments the command sets itself; --options may set the probe's other keyword arguments.
_SET_BY_CLI = {
    "model", "x", "y", "batch", "optimizer", "loss_fn", "mode", "seed", "recalibrate", "input_shape",
    "through", "directions",
}


def check_options(name: str, options: dict[str, Any]) -> None:
    """Unknown --options keys for probe ``name`` raise NormlabError listing the valid ones."""
    import inspect

    from normlab import probes

    params = inspect.signature(getattr(probes, name)).parameters
    valid = sorted(set(params) - _SET_BY_CLI | ({"precise_bn"} if name == "train_eval_gap" else set()))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise NormlabError(
            f"unknown --options key(s) {', '.join(unknown)} for probe {name}; valid: {', '.join(valid)}"
        )


STEPPING = ("landscape", "ics")  # probes whose measurement takes a step of some lr


def _setup(checkpoint: str | None, overrides: dict[str, Any]):
    """(config, data, model, optimizer, loss_fn, base lr) from a checkpoint or from the overrides alone."""
    from normlab.train import TrainConfig, load_checkpoint
    from normlab.train.build import build_model, load_data, loss_function
    from normlab.train.optimizer import build_optimizer

    state = None
    values: dict[str, Any] = {}
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        if not isinstance(state.get("config"), dict):
            raise NormlabError(
                f"checkpoint {checkpoint!r} has no config table (got {type(state.get('config')).__name__}); "
                "it was not written by normlab's trainer"
            )
        values = dict(state["config"])
        refuse_model_code_from(f"checkpoint {checkpoint!r}", values, overrides.get("model"))
        values.pop("checkpoint_dir", None)  # a probe writes no checkpoints
        refuse_paths_from(f"checkpoint {checkpoint!r}", values, overrides)
        for entry in ("model", "optimizer"):
            if not isinstance(state.get(entry), dict):
                kind = type(state.get(entry)).__name__
                raise NormlabError(
                    f"checkpoint {checkpoint!r}: its {entry!r} entry is a {kind}, not a state dict; it was "
                    "not written by normlab's trainer"
                )
        for name in ("model", "norm"):
            given = overrides.get(name)
            if given is not None and given != values.get(name):
                raise NormlabError(
                    f"--{name} {given!r} conflicts with the checkpoint, which is a {values.get(name)!r} "
                    f"{name}; drop --{name}"
                )
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = TrainConfig.from_dict(values)
    data = load_data(config)
    model = build_model(config, data)
    optimizer = build_optimizer(model, config)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as exc:
            text = " ".join(str(exc).split())[:200]
            raise NormlabError(f"checkpoint {checkpoint!r} does not match its own config: {text}") from None
    base_lr = state.get("base_lr", config.lr) if state is not None else config.lr
    if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or not 0 < base_lr < float("inf"):
        raise NormlabError(f"checkpoint {checkpoint!r}: its 'base_lr' entry is {base_lr!r}, not a positive "
                           "number; it was not written by normlab's trainer")
    return config, data, model, optimizer, loss_function(data.task), float(base_lr)


def _batch(x, y, size: int, seed: int):
    import torch

    if size > x.shape[0]:
        raise NormlabError(f"--batch-size {size} is larger than the {x.shape[0]} training examples")
    index = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:size]
    return x[index], y[index]


def run_probe(name: str, *, config, data, model, optimizer, loss_fn, mode: str, seed: int, options: dict):
    """Call probe ``name`` with what the command line set up; returns its result."""
    from normlab import probes
    from normlab.probes._state import check_mode

    check_mode(mode)
    batch_size = config.batch_size
    x, y = _batch(data.x_train, data.y_train, batch_size, seed)
    if name == "train_eval_gap":
        if data.task != "classification":
            raise NormlabError(f"train_eval_gap compares accuracies; dataset {config.dataset!r} has none")
        options.setdefault("batch_size", batch_size)
        if options.pop("precise_bn", False):
            train_x = data.x_train[: 20 * batch_size]
            options["recalibrate"] = list(train_x.split(batch_size))
        x_test, y_test = data.x_test[:_GAP_EXAMPLES], data.y_test[:_GAP_EXAMPLES]
        return probes.train_eval_gap(model, x_test, y_test, **options)
    if name == "activation_stats":
        return probes.activation_stats(model, x, mode=mode, seed=seed, **options)
    if name == "ics":
        return probes.ics(model, optimizer, (x, y), loss_fn, mode=mode, **options)
    if name == "landscape":
        return probes.landscape(model, (x, y), loss_fn, optimizer=optimizer, mode=mode, seed=seed, **options)
    if name == "hessian":
        return probes.hessian(model, (x, y), loss_fn, mode=mode, seed=seed, **options)
    if name == "hessian_density":
        return probes.hessian_density(model, (x, y), loss_fn, mode=mode, seed=seed, **options)
    if name == "landscape_2d":
        return probes.landscape_2d(model, (x, y), loss_fn, mode=mode, seed=seed, **options)
    if name == "signal_propagation":
        options.setdefault("batch_size", batch_size)
        shape = tuple(data.input_shape)
        return probes.signal_propagation(model, input_shape=shape, mode=mode, seed=seed, **options)
    if name == "example_similarity":
        return probes.example_similarity(model, x, mode=mode, **options)
    if name == "residual_scale":
        return probes.residual_scale(model, x, mode=mode, **options)
    if name == "batch_dependence":
        return probes.batch_dependence(model, x, mode=mode, **options)
    raise NormlabError(f"unknown probe {name!r}; valid probes: {', '.join(sorted(probes.PROBES))}")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    if isinstance(value, list):
        if value and isinstance(value[0], list):
            return f"[{len(value)} x {len(value[0])}]"
        shown = ", ".join(_cell(v) for v in value[:8])
        return shown + (", ..." if len(value) > 8 else "")
    return "-" if value is None else str(value)


def _table(name: str, result) -> None:
    from rich.console import Console
    from rich.table import Table

    values = result.to_dict()
    console = Console()
    layered = {k: v for k, v in values.items() if isinstance(v, dict)}
    scalars = Table(title=f"{name} (mode: {values.get('mode')})")
    scalars.add_column("field")
    scalars.add_column("value", justify="right")
    for key, value in values.items():
        if key not in layered and key != "mode":
            scalars.add_row(key, _cell(value))
    console.print(scalars)
    layered = {k: v for k, v in layered.items() if v}
    if layered:
        layers = list(dict.fromkeys(layer for v in layered.values() for layer in v))
        per_layer = Table(title="per layer")
        per_layer.add_column("layer")
        for key in layered:
            per_layer.add_column(key, justify="right")
        for layer in layers:
            per_layer.add_row(layer, *(_cell(layered[key].get(layer)) for key in layered))
        console.print(per_layer)


def probe_command(
    name: str = typer.Argument(..., help="probe: activation_stats, batch_dependence, example_similarity, "
                               "hessian, hessian_density, ics, landscape, landscape_2d, residual_scale, "
                               "signal_propagation, train_eval_gap"),
    model: str | None = typer.Option(None, "--model", help="model name or your code (module:factory, "
                                     "file.py:factory); default: the checkpoint's, or cnn"),
    norm: str | None = typer.Option(None, "--norm", help="normalization (default: the checkpoint's, or bn)"),
    checkpoint: str | None = typer.Option(None, "--checkpoint", help="a trainer checkpoint (.pt) to load"),
    dataset: str | None = typer.Option(None, "--dataset", help="dataset (default: checkpoint's, or mnist1d)"),
    data_root: str | None = typer.Option(None, "--data-root", help="folder holding the data"),
    model_options: str | None = typer.Option(None, "--model-options", help="JSON object of model options"),
    image_size: int | None = typer.Option(None, "--image-size", help="imagefolder: image side"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="examples in the probe batch"),
    mode: str = typer.Option("train", "--mode", help="train (BN batch statistics) or eval (running ones)"),
    seed: int = typer.Option(0, "--seed", help="seed of the batch draw and of random directions / units"),
    options: str | None = typer.Option(None, "--options", help='JSON object of probe arguments, e.g. '
                                       '\'{"num_points": 4}\'; train_eval_gap takes {"precise_bn": true}'),
    lr: float | None = typer.Option(None, "--lr", help="lr of the step landscape / ics take (default: the "
                                    "run's base lr from the checkpoint, or the config's)"),
    through: list[str] | None = typer.Option(  # noqa: B008 (a repeatable option is a list)
        None, "--through", help="landscape_2d: a checkpoint the plane passes through; give it twice (A, B)"
    ),
    figure: str | None = typer.Option(None, "--figure", help="landscape_2d, hessian_density: draw the "
                                      "result into this .png or .svg file"),
    json_output: bool = typer.Option(False, "--json", help="print the result as JSON only"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Measure one mechanism of BN on a model: what it changes, in training mode by default."""
    from normlab import probes
    from normlab.probes._result import json_ready
    from normlab.probes._state import check_mode

    if name not in probes.PROBES:
        raise NormlabError(f"unknown probe {name!r}; valid probes: {', '.join(sorted(probes.PROBES))}")
    check_mode(mode)
    if batch_size is not None and batch_size < 1:
        raise NormlabError(f"--batch-size must be a positive int, got {batch_size}")
    if not 0 <= seed < 2**63:
        raise NormlabError(f"--seed must be between 0 and 2**63-1, got {seed}")
    probe_options = _parse_options(options)
    overrides = {"model": model, "norm": norm, "dataset": dataset, "data_root": data_root,
                 "batch_size": batch_size, "image_size": image_size}
    if model_options is not None:
        from normlab.cli.train_cmd import parse_option

        overrides["model_options"] = parse_option("model_options", model_options)
    if data_root is not None and not Path(data_root).is_dir():
        raise NormlabError(f"--data-root {data_root!r} is not a folder")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise NormlabError(f"--lr must be a finite number > 0, got {lr}")
    _check_figure(name, figure)
    if through and name != "landscape_2d":
        raise NormlabError(f"--through goes with probe landscape_2d, not {name}")
    if through and len(through) != 2:
        raise NormlabError(f"--through needs exactly two checkpoints (A and B), got {len(through)}")
    config, data, net, optimizer, loss_fn, base_lr = _setup(checkpoint, overrides)
    check_options(name, probe_options)
    if name in STEPPING and "etas" not in probe_options:
        if lr is not None and "lr" in probe_options:
            raise NormlabError("give the lr once: --lr or --options '{\"lr\": ...}', not both")
        probe_options.setdefault("lr", lr if lr is not None else base_lr)
    check_probe_budget(name, probe_options, config, data, force=force)
    if through:
        probe_options["through"] = tuple(_weights_of(path, config) for path in through)
    result = run_probe(name, config=config, data=data, model=net, optimizer=optimizer, loss_fn=loss_fn,
                       mode=mode, seed=seed, options=probe_options)
    if figure is not None:
        from normlab.reports.probe_figures import probe_figure

        probe_figure(name, result, figure)
    if json_output:
        from normlab.cli._common import JSON_SCHEMA

        document = {"schema": JSON_SCHEMA, "probe": name, **result.to_dict()}
        typer.echo(json.dumps(json_ready(document), indent=2, allow_nan=False))
        return
    if name in STEPPING and getattr(result, "lr", None) is not None:
        typer.echo(f"{name} stepped at lr {result.lr:.6g}")
    _table(name, result)
    if figure is not None:
        typer.echo(f"figure: {figure}")


def _check_figure(name: str, figure: str | None) -> None:
    if figure is None:
        return
    from normlab.cli._common import check_file_target
    from normlab.reports.probe_figures import FIGURES

    if name not in FIGURES:
        raise NormlabError(f"--figure draws {', '.join(sorted(FIGURES))}; probe {name} has no figure")
    if Path(figure).suffix.lower() not in (".png", ".svg"):
        raise NormlabError(f"--figure {figure!r} must end in .png or .svg")
    check_file_target(figure, "--figure")


def _weights_of(path: str, config) -> dict:
    """The model weights of checkpoint ``path``, which must hold the same model as the probed one."""
    from normlab.train import load_checkpoint

    state = load_checkpoint(path)
    values = state.get("config") if isinstance(state, dict) else None
    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(values, dict) or not isinstance(weights, dict):
        raise NormlabError(f"--through {path!r} is not a trainer checkpoint (no config and model weights)")
    for field in ("model", "norm"):
        if values.get(field) != getattr(config, field):
            raise NormlabError(
                f"--through {path!r} holds a {values.get(field)!r} {field}, the probed model a "
                f"{getattr(config, field)!r}; the plane needs checkpoints of the same model"
            )
    return weights


def register(app: typer.Typer) -> None:
    app.command("probe", help="Run one probe (normlab.probes) on a model and a batch.")(probe_command)
