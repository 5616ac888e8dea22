"""``normlab train``: one run, every :class:`~normlab.train.TrainConfig` field an option."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import typer

from normlab.cli._common import (
    FORCE_HELP,
    STORE_HELP,
    check_store_target,
    check_threads,
    console,
    csv_list,
    fmt,
    open_store,
    preflight,
    print_json,
    refuse_model_code_from,
    refuse_paths_from,
)
from normlab.cli._track import (
    DEFAULT_LOG_DIR,
    LOG_DIR_HELP,
    LOG_HELP,
    check_trackers,
    close_trackers,
    open_cli_trackers,
    print_trackers,
)
from normlab.errors import NormlabError

PROBE_HELP = ("run a probe during training (repeatable): NAME every EVERY steps (default 100), e.g. "
              "--probe ics:200; its numbers go to the store as probe/NAME/... (see `normlab probe --help`)")

_FIELD_HELP = {
    "model": "model name (see `normlab models`), or your code: package.module:factory or file.py:factory",
    "norm": "normalization (see `normlab norms`), or nf for the normalizer-free variant",
    "norm_options": 'JSON object of norm options, e.g. \'{"groups": 8}\'',
    "model_options": "JSON object of model options",
    "width": "model width (model default if unset)",
    "depth": "model depth (model default if unset)",
    "dataset": "dataset name",
    "data_root": "folder holding the data (default ~/.cache/normlab)",
    "download": "download missing data",
    "subset": "train on a seeded subset: a count, or a fraction in (0, 1]",
    "augment": "augmentation: shift (1-D), crop_flip (images)",
    "image_size": "imagefolder: side of the resized, centre-cropped images (loader default 64)",
    "test_fraction": "imagefolder: hold out this fraction of each class's training images as the test split "
                    "(instead of val/)",
    "batch_size": "training batch size",
    "epochs": "epochs (ignored when --steps is set)",
    "steps": "optimizer steps (overrides --epochs); the cap of --budget auto",
    "budget": "fixed: --steps/--epochs; auto: until the plateau rule holds (cap: --steps/--epochs)",
    "cooldown": "auto budget: linear lr decay to 0 over this fraction of the steps taken",
    "stop_below": "auto budget: end the run (as unconverged) at a held-out evaluation after the first "
                  "tenth of the cap where its best held-out accuracy is still below this (0-1; compare's lr "
                  "search sets it on lrs above a cell's best)",
    "val_fraction": "training data held out as a validation split for the plateau rule (0: none)",
    "optimizer": "sgd or adamw",
    "lr": "peak learning rate",
    "momentum": "SGD momentum",
    "nesterov": "Nesterov momentum (SGD)",
    "weight_decay": "weight decay",
    "wd_exclude_norm_bias": "no weight decay on 1-D parameters (norm gains, biases)",
    "agc_clip": "Adaptive Gradient Clipping factor lambda (off if unset)",
    "agc_eps": "AGC's floor on parameter norms",
    "schedule": "constant, step or cosine",
    "warmup_steps": "linear warmup steps",
    "milestones": "comma-separated steps where the step schedule multiplies the lr by gamma",
    "gamma": "step-schedule factor",
    "seed": "seed of init, data order and augmentation",
    "device": "cpu, cuda, cuda:N, mps or auto",
    "eval_every": "evaluate on the test set every N steps (0: 20 times over the run)",
    "eval_batch_size": "batch size of evaluation",
    "eval_train_samples": "training examples evaluated at the end",
    "divergence_bound": "a loss above this (or non-finite) stops the run as diverged",
    "log_every": "log training metrics every N steps (0: about 50 times over the run, at least every 10 "
                 "steps)",
    "checkpoint_dir": "folder for checkpoints",
    "checkpoint_every": "checkpoint every N steps (0: at the end only, if checkpoint_dir is set)",
    "name": "run name",
    "group": "run group / study tag",
    "compile": "torch.compile the step (same numbers); unset: only where it pays (long runs of large "
               "models)",
}


def _default_text(default: Any) -> str:
    """How ``--help`` shows a TrainConfig default: unset for None, on/off for booleans, JSON for tables."""
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, (dict, list)):
        return json.dumps(default)
    return str(default)


def _option_type(name: str, annotation: str) -> type:
    # Field annotations are strings (postponed evaluation); their first type names the option's type.
    if name in ("norm_options", "model_options", "milestones", "width", "subset"):
        return str  # parsed by parse_option: JSON / comma list / int-or-float
    first = annotation.split("|")[0].strip()
    return {"bool": bool, "int": int, "float": float}.get(first, str)


def parse_option(name: str, value: Any) -> Any:
    if name in ("norm_options", "model_options"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise NormlabError(f"--{name.replace('_', '-')} must be a JSON object: {exc}") from None
        return parsed
    if name == "milestones":
        return csv_list(value, int, "--milestones")
    if name in ("width", "subset"):
        try:
            number = float(value)
        except ValueError:
            raise NormlabError(f"--{name} must be a number, got {value!r}") from None
        return int(number) if number.is_integer() and "." not in value else number
    return value


def _train_signature() -> inspect.Signature:
    from normlab.train import TrainConfig

    defaults = TrainConfig()
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--config", "-c", help="TOML file of TrainConfig fields"),
            annotation=Path | None,
        ),
        inspect.Parameter(
            "like",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--like", metavar="RUN_ID", help="train the stored run RUN_ID's "
                                 "config again (e.g. a compare cell; `normlab runs` lists ids); options "
                                 "given beside it change that config"),
            annotation=int | None,
        ),
    ]
    for f in dataclasses.fields(TrainConfig):
        default = getattr(defaults, f.name)
        kind = _option_type(f.name, str(f.type))
        flag = "--" + f.name.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
        help_text = f"{_FIELD_HELP.get(f.name, f.name)} [default: {_default_text(default)}]"
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, *decls, help=help_text),
                annotation=kind | None,
            )
        )
    extra = [
        ("store", str | None, typer.Option(None, "--store", help=STORE_HELP)),
        ("threads", int | None, typer.Option(None, "--threads", help="torch threads (default: cores)")),
        ("resume", bool, typer.Option(False, "--resume", help="continue from this config's checkpoint")),
        ("progress", bool, typer.Option(True, "--progress/--no-progress", help="progress bar on a terminal")),
        ("json_output", bool, typer.Option(False, "--json", help="print the result as JSON only")),
        ("nproc", int, typer.Option(1, "--nproc", help="data-parallel processes on this machine (torchrun-"
                                    "style; gloo on CPU, NCCL on CUDA); --batch-size is the global batch")),
        ("bn_sync", str, typer.Option("local", "--bn-sync", help="BN across replicas: local (own sub-batch, "
                                      "DDP's default), sync (global batch), ghost (virtual batch)")),
        ("virtual_batch_size", int | None, typer.Option(None, "--virtual-batch-size",
                                                        help="ghost batch of --bn-sync ghost")),
        ("force", bool, typer.Option(False, "--force", help=FORCE_HELP)),
        ("probe", list[str] | None, typer.Option(None, "--probe", metavar="NAME[:EVERY]", help=PROBE_HELP)),
        ("log", list[str] | None, typer.Option(None, "--log", metavar="TRACKER", help=LOG_HELP)),
        ("log_dir", str, typer.Option(DEFAULT_LOG_DIR, "--log-dir", help=LOG_DIR_HELP)),
    ]
    keyword = inspect.Parameter.KEYWORD_ONLY
    params += [inspect.Parameter(n, keyword, default=d, annotation=a) for n, a, d in extra]
    return inspect.Signature(params)


def config_from_cli(config_file: Path | None, options: dict[str, Any], like: dict[str, Any] | None = None):
    """A TrainConfig from an optional TOML file (or a stored run's config, ``like``) with the given options
    (not None) applied on top."""
    from normlab.train import TrainConfig

    values = TrainConfig.from_toml(config_file).to_dict() if config_file is not None else {}
    if config_file is not None:
        refuse_model_code_from(f"config file {str(config_file)!r}", values, options.get("model"))
        refuse_paths_from(f"config file {str(config_file)!r}", values, options)
    if like is not None:
        values = dict(like)
    values.update({k: parse_option(k, v) for k, v in options.items() if v is not None})
    return TrainConfig.from_dict(values)


def train_command(**kwargs: Any) -> None:
    """Train one model and record it in the results store."""
    from normlab.train import Trainer

    probes, log, log_dir = kwargs.pop("probe"), kwargs.pop("log"), kwargs.pop("log_dir")
    store_path, resume, threads = kwargs.pop("store"), kwargs.pop("resume"), kwargs.pop("threads")
    progress, as_json, force = kwargs.pop("progress"), kwargs.pop("json_output"), kwargs.pop("force")
    nproc, bn_sync, vbs = kwargs.pop("nproc"), kwargs.pop("bn_sync"), kwargs.pop("virtual_batch_size")
    config_file, like = kwargs.pop("config"), kwargs.pop("like")
    config = config_from_cli(config_file, kwargs, _stored_config(like, store_path, config_file, kwargs))
    check_threads(threads)
    check_store_target(store_path)
    callbacks = _probe_schedule(probes)
    check_trackers(log, log_dir)
    preflight(config, force=force)  # paths, device, data shape, memory/time: before anything is stored
    from normlab.train.threads import fit_threads, set_threads

    # The same rule as sweeps and studies: the cores this process may use (normlab.train.threads).
    set_threads(fit_threads(1, threads))
    if vbs is not None and bn_sync != "ghost":
        raise NormlabError("--virtual-batch-size goes with --bn-sync ghost")
    if nproc != 1 or bn_sync != "local":
        if callbacks:
            raise NormlabError("--probe works for one process only; drop it or --nproc")
        result = _train_data_parallel(config, nproc, bn_sync, store_path, resume, progress, vbs)
        _send_stored_run(log, log_dir, store_path, result.run_id, quiet=as_json)
    else:
        # Build everything (data, model, checkpoint) before opening the store: bad input leaves it untouched.
        # The trackers get the run live; its end (Trainer's end_run, failed runs too) closes what they wrote.
        trainer = Trainer(config, progress=None if progress else False, resume=True if resume else None,
                          callbacks=callbacks, trackers=open_cli_trackers(log, log_dir))
        if not as_json:
            print_trackers(trainer.trackers)  # before training: the dashboard can follow the run
        with open_store(store_path) as store:
            trainer.store = store
            result = trainer.fit()
    checkpoint = _checkpoint_written(config)
    if as_json:
        print_json({**result.to_dict(), "checkpoint": checkpoint})
        return
    from rich.table import Table

    table = Table(title=f"run {result.run_id}: {config.model} / {config.norm} on {config.dataset}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in (
        "status", "steps", "final_train_loss", "final_train_acc", "final_test_loss", "final_test_acc",
        "test_acc_train_mode", "test_acc_eval_mode", "train_eval_gap", "steps_per_s", "wall_time", "error",
    ):  # fmt: skip
        value = getattr(result, name)
        if value is not None:
            table.add_row(name, fmt(value))
    console().print(table)
    if checkpoint is not None:
        typer.echo(f"checkpoint: {checkpoint}")


def _stored_config(run_id: int | None, store_path: str | None, config_file, options: dict[str, Any]):
    """The config of run ``run_id`` of the store (``--like``), refusing model code it names."""
    if run_id is None:
        return None
    if config_file is not None:
        raise NormlabError("give --config or --like, not both")
    from normlab.cli._common import existing_store

    with existing_store(store_path) as store:
        run = store.get_run(run_id)
    if not isinstance(run.config, dict) or not run.config:
        raise NormlabError(f"run {run_id} has no stored config to train again")
    refuse_model_code_from(f"run {run_id} of the store", run.config, options.get("model"))
    return run.config


def _checkpoint_written(config) -> str | None:
    """The checkpoint file the run wrote, if it wrote one."""
    from normlab.train.checkpoint import checkpoint_file

    path = checkpoint_file(config)
    return str(path) if path is not None and path.is_file() else None


def _send_stored_run(log: list[str] | None, log_dir: str, store_path, run_id: int | None,
                     quiet: bool) -> None:
    """``--log`` of a data-parallel run: its ranks trained elsewhere, so it is sent from the store."""
    trackers = open_cli_trackers(log, log_dir)
    if not trackers or run_id is None:
        return
    from normlab.track import log_stored_run

    with open_store(store_path) as store:
        try:
            log_stored_run(trackers, store, run_id)
        finally:
            close_trackers(trackers)
    if not quiet:
        print_trackers(trackers)


def _probe_schedule(probes: list[str] | None) -> list:
    """``--probe NAME[:EVERY]`` as one :class:`~normlab.probes.ProbeSchedule` (or no callbacks)."""
    if not probes:
        return []
    from normlab.probes import ProbeSchedule
    from normlab.probes.watcher import probe_intervals

    return [ProbeSchedule(probe_intervals(probes))]


def _train_data_parallel(config, nproc: int, bn_sync: str, store_path, resume: bool, progress: bool,
                         virtual_batch_size: int | None):
    from normlab.distributed import check_data_parallel, train_data_parallel
    from normlab.train import Trainer

    if resume:
        raise NormlabError("--resume works for one process only; drop it or --nproc")
    check_data_parallel(config, nproc, bn_sync, virtual_batch_size)
    Trainer(config, progress=False)  # bad model / data names fail here, before any process starts
    with open_store(store_path) as store:
        path = str(store.path)
    return train_data_parallel(config, nproc, bn_sync, store_path=path, progress=None if progress else False,
                               virtual_batch_size=virtual_batch_size)


train_command.__signature__ = _train_signature()  # type: ignore[attr-defined]


def register(app: typer.Typer) -> None:
    app.command("train", help="Train one model (every TrainConfig field is an option).")(train_command)
