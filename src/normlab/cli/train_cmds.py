"""``normlab train``, ``runs``, ``models``, ``norms`` and ``compare``: training and results from the shell.

Every command that prints results takes ``--json`` (machine-readable, nothing else on stdout; progress
bars go to stderr). Bad input raises NormlabError before the store is opened, so it is left untouched.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import typer

from normlab.errors import NormlabError

# -- shared helpers ---------------------------------------------------------------------------------

_STORE_HELP = "results store (SQLite file); default $NORMLAB_STORE or ./.normlab/results.sqlite"


def _print_json(value: Any) -> None:
    from normlab.store.export import json_safe

    typer.echo(json.dumps(json_safe(value), indent=2, allow_nan=False))


def _console():
    from rich.console import Console

    # Piped output has no terminal width; rich's 80-column default would truncate the run tables.
    return Console() if sys.stdout.isatty() else Console(width=160)


def _open_store(path: str | None):
    from normlab.store import Store

    return Store(path)


def _existing_store(path: str | None):
    """The store for read-only commands: a missing file is an error, not a new empty store."""
    from normlab.store import default_store_path

    file = Path(path) if path is not None else default_store_path()
    if not file.exists():
        raise NormlabError(f"no results store at {str(file)!r}; train something first or pass --store")
    return _open_store(str(file))


def _fmt(value: Any, digits: int = 4) -> str:
    """A table cell: ``-`` for None/NaN, ``digits`` significant digits for floats, markup escaped."""
    from rich.markup import escape

    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}g}"
    return escape(str(value))


def _csv_list(text: str, kind: type, what: str) -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise NormlabError(f"{what} is empty; give a comma-separated list, e.g. {what}=16,128")
    try:
        return [kind(item) for item in items]
    except ValueError:
        raise NormlabError(f"{what}={text!r} must be a comma-separated list of {kind.__name__}s") from None


# -- normlab train ----------------------------------------------------------------------------------

_FIELD_HELP = {
    "model": "model name (see `normlab models`)",
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
    "batch_size": "training batch size",
    "epochs": "epochs (ignored when --steps is set)",
    "steps": "optimizer steps (overrides --epochs)",
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
    "eval_every": "evaluate on the test set every N steps (0: at the end only)",
    "eval_batch_size": "batch size of evaluation",
    "eval_train_samples": "training examples evaluated at the end",
    "divergence_bound": "a loss above this (or non-finite) stops the run as diverged",
    "log_every": "log training metrics every N steps",
    "checkpoint_dir": "folder for checkpoints",
    "checkpoint_every": "checkpoint every N steps (0: at the end only, if checkpoint_dir is set)",
    "name": "run name",
    "group": "run group / study tag",
}


def _option_type(name: str, annotation: str) -> type:
    # Field annotations are strings (postponed evaluation); their first type names the option's type.
    if name in ("norm_options", "model_options", "milestones", "width", "subset"):
        return str  # parsed by _parse_option: JSON / comma list / int-or-float
    first = annotation.split("|")[0].strip()
    return {"bool": bool, "int": int, "float": float}.get(first, str)


def _parse_option(name: str, value: Any) -> Any:
    if name in ("norm_options", "model_options"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise NormlabError(f"--{name.replace('_', '-')} must be a JSON object: {exc}") from None
        return parsed
    if name == "milestones":
        return _csv_list(value, int, "--milestones")
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
        )
    ]
    for f in dataclasses.fields(TrainConfig):
        default = getattr(defaults, f.name)
        kind = _option_type(f.name, str(f.type))
        flag = "--" + f.name.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
        shown = json.dumps(default) if isinstance(default, (dict, list)) else default
        help_text = f"{_FIELD_HELP.get(f.name, f.name)} [default: {shown}]"
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, *decls, help=help_text),
                annotation=kind | None,
            )
        )
    extra = [
        ("store", str | None, typer.Option(None, "--store", help=_STORE_HELP)),
        ("threads", int | None, typer.Option(None, "--threads", help="torch CPU threads (default: torch's)")),
        ("resume", bool, typer.Option(False, "--resume", help="continue from this config's checkpoint")),
        ("progress", bool, typer.Option(True, "--progress/--no-progress", help="progress bar on a terminal")),
        ("json_output", bool, typer.Option(False, "--json", help="print the result as JSON only")),
    ]
    keyword = inspect.Parameter.KEYWORD_ONLY
    params += [inspect.Parameter(n, keyword, default=d, annotation=a) for n, a, d in extra]
    return inspect.Signature(params)


def config_from_cli(config_file: Path | None, options: dict[str, Any]):
    """A TrainConfig from an optional TOML file with the given options (not None) applied on top."""
    from normlab.train import TrainConfig

    values = TrainConfig.from_toml(config_file).to_dict() if config_file is not None else {}
    values.update({k: _parse_option(k, v) for k, v in options.items() if v is not None})
    return TrainConfig.from_dict(values)


def train_command(**kwargs: Any) -> None:
    """Train one model and record it in the results store."""
    from normlab.train import Trainer

    store_path, resume, threads = kwargs.pop("store"), kwargs.pop("resume"), kwargs.pop("threads")
    progress, as_json = kwargs.pop("progress"), kwargs.pop("json_output")
    config = config_from_cli(kwargs.pop("config"), kwargs)
    if threads is not None:
        if threads < 1:
            raise NormlabError(f"--threads must be a positive int, got {threads}")
        # Small models gain little from intra-op threads, and on a busy machine spinning threads cost a lot.
        import torch

        torch.set_num_threads(threads)
    # Build everything (data, model, checkpoint) before opening the store: bad input leaves it untouched.
    trainer = Trainer(config, progress=None if progress else False, resume=True if resume else None)
    with _open_store(store_path) as store:
        trainer.store = store
        result = trainer.fit()
    if as_json:
        _print_json(result.to_dict())
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
            table.add_row(name, _fmt(value))
    _console().print(table)


train_command.__signature__ = _train_signature()  # type: ignore[attr-defined]


# -- normlab runs -----------------------------------------------------------------------------------

runs_app = typer.Typer(help="List, show and export the runs in the results store.", no_args_is_help=True)


@runs_app.command("list")
def runs_list(
    status: str | None = typer.Option(None, help="finished, diverged, failed or running"),
    group: str | None = typer.Option(None, help="only runs of this group"),
    limit: int | None = typer.Option(None, help="at most this many (the latest)"),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    json_output: bool = typer.Option(False, "--json", help="print JSON only"),
) -> None:
    """List runs, oldest first."""
    if limit is not None and limit < 1:
        raise NormlabError(f"--limit must be a positive int, got {limit}")
    with _existing_store(store) as db:
        runs = db.runs(status=status, group=group)
    if limit is not None:
        runs = runs[-limit:]
    if json_output:
        _print_json([run.to_dict() for run in runs])
        return
    from rich.table import Table

    table = Table(title=f"{len(runs)} runs")
    columns = ("id", "name", "status", "model", "norm", "batch", "lr", "seed", "test acc", "steps/s", "wall")
    for column in columns:
        table.add_column(column, justify="left" if column in ("name", "status", "model", "norm") else "right")
    for run in runs:
        c, s = run.config, run.summary
        table.add_row(
            str(run.id), _fmt(run.name), run.status, str(c.get("model")), str(c.get("norm")),
            str(c.get("batch_size")), _fmt(c.get("lr")), str(c.get("seed")),
            _fmt(s.get("final_test_acc")), _fmt(s.get("steps_per_s")), _fmt(run.wall_time, 3),
        )  # fmt: skip
    _console().print(table)


@runs_app.command("show")
def runs_show(
    run_id: int = typer.Argument(..., help="run id (see `normlab runs list`)"),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    json_output: bool = typer.Option(False, "--json", help="print JSON only"),
) -> None:
    """Show one run: config, environment, summary and its metrics' last values."""
    with _existing_store(store) as db:
        run = db.get_run(run_id)
        metrics = {name: db.metrics(run_id, name) for name in db.metric_names(run_id)}
    if json_output:
        series = {name: [[step, value] for step, value in points] for name, points in metrics.items()}
        _print_json({**run.to_dict(), "metrics": series})
        return
    from rich.table import Table

    console = _console()
    from rich.markup import escape

    title = f"{escape(run.name or '')} status={run.status} group={escape(run.group or '-')}"
    console.print(f"[bold]run {run.id}[/bold] {title}")
    if run.error:
        console.print(f"error: {escape(run.error)}")
    for title, values in (("config", run.config), ("summary", run.summary), ("environment", run.environment)):
        table = Table(title=title)
        table.add_column("field")
        table.add_column("value", justify="right")
        for key, value in values.items():
            table.add_row(key, _fmt(value) if not isinstance(value, (dict, list)) else json.dumps(value))
        console.print(table)
    table = Table(title="metrics")
    for column in ("name", "points", "last step", "last value"):
        table.add_column(column)
    for name, series in metrics.items():
        table.add_row(name, str(len(series)), str(series[-1][0]), _fmt(series[-1][1]))
    console.print(table)


@runs_app.command("export")
def runs_export(
    format: str = typer.Option("csv", "--format", help="csv or json"),
    output: str | None = typer.Option(None, "--output", "-o", help="file to write (default: stdout)"),
    status: str | None = typer.Option(None, help="only runs with this status"),
    group: str | None = typer.Option(None, help="only runs of this group"),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
) -> None:
    """Export runs (config and summary flattened per row for CSV; full records for JSON)."""
    from normlab.store.export import EXPORT_FORMATS

    if format not in EXPORT_FORMATS:
        raise NormlabError(f"unknown export format {format!r}; allowed: {', '.join(EXPORT_FORMATS)}")
    with _existing_store(store) as db:
        db.export(output if output is not None else sys.stdout, format, status=status, group=group)


# -- normlab models / norms -------------------------------------------------------------------------


def models_command(json_output: bool = typer.Option(False, "--json", help="print JSON only")) -> None:
    """List the models and their options (every model also takes norm, width, depth)."""
    from normlab.models import list_models, model_options

    rows = [{"name": name, "options": model_options(name)} for name in list_models()]
    _print_rows(rows, "models", json_output)


def norms_command(json_output: bool = typer.Option(False, "--json", help="print JSON only")) -> None:
    """List the normalization layers and their options (and nf, the normalizer-free model variant)."""
    from normlab.layers import list_norms, norm_options

    rows = [{"name": name, "options": norm_options(name)} for name in list_norms()]
    rows.append({"name": "nf", "options": [], "note": "model's normalizer-free variant (Scaled WS; use AGC)"})
    _print_rows(rows, "norms", json_output)


def _print_rows(rows: list[dict], title: str, json_output: bool) -> None:
    if json_output:
        _print_json(rows)
        return
    from rich.table import Table

    table = Table(title=title)
    table.add_column("name")
    table.add_column("options")
    for row in rows:
        table.add_row(row["name"], ", ".join(row["options"]) or row.get("note", "-"))
    _console().print(table)


# -- normlab compare --------------------------------------------------------------------------------

# Sized for a laptop: 4 norms x 2 batch sizes x 3 LRs x 3 seeds = 72 runs of the MNIST-1D CNN for 8 epochs,
# measured at 270 CPU-seconds in all (so about 2.3 minutes on 2 free cores); BN reached 89.5% test accuracy
# at batch 128 and 93.3% at batch 16 (means over 3 seeds at the best stable LR). Three seeds
# are the fewest for which a t-interval is informative (t_{0.975,2} = 4.30; with two it is 12.7).
COMPARE_DEFAULTS = {
    "model": "cnn",
    "norms": "bn,none,gn,nf",
    "batch_sizes": "16,128",
    "lrs": "0.05,0.2,0.8",
    "seeds": 3,
    "epochs": 8,
    "agc_clip": 0.02,
}


def compare_command(
    model: str = typer.Option(COMPARE_DEFAULTS["model"], help="model name (see `normlab models`)"),
    norms: str = typer.Option(COMPARE_DEFAULTS["norms"], help="comma-separated norms; nf = NF variant + AGC"),
    batch_sizes: str = typer.Option(COMPARE_DEFAULTS["batch_sizes"], help="comma-separated batch sizes"),
    lrs: str = typer.Option(
        COMPARE_DEFAULTS["lrs"], help="LR grid at batch 128, scaled linearly with batch size (lr * bs / 128)"
    ),
    seeds: int = typer.Option(COMPARE_DEFAULTS["seeds"], help="seeds per configuration (0..n-1)"),
    epochs: int = typer.Option(COMPARE_DEFAULTS["epochs"], help="epochs, equal for every batch size"),
    dataset: str = typer.Option("mnist1d", help="dataset name"),
    data_root: str | None = typer.Option(None, help="folder holding the data"),
    subset: str | None = typer.Option(None, help="train on a seeded subset (count or fraction)"),
    width: str | None = typer.Option(None, help="model width (model default if unset)"),
    depth: int | None = typer.Option(None, help="model depth (model default if unset)"),
    agc_clip: float = typer.Option(COMPARE_DEFAULTS["agc_clip"], help="AGC clip factor for nf runs"),
    optimizer: str = typer.Option("sgd", help="sgd or adamw"),
    device: str = typer.Option("cpu", help="device of every run"),
    workers: int | None = typer.Option(None, help="parallel runs (default: all cores)"),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    out: str = typer.Option(
        "normlab-results/compare", "--out", help="folder for report.html + report.md + figures"
    ),
    report: bool = typer.Option(True, "--report/--no-report", help="write the HTML/Markdown report"),
    json_output: bool = typer.Option(False, "--json", help="print JSON only"),
) -> None:
    """One model under several norms and batch sizes, side by side (parallel, resumable).

    Shows final test accuracy (mean +- 95% t-interval over seeds) at each norm's best stable LR, the
    largest stable LR, steps/s, and the train/eval gap (test accuracy with batch statistics at the
    training batch size minus eval-mode accuracy).
    """
    from normlab.sweep import LocalPoolExecutor, compare_configs, run_sweep, summarize_compare

    if seeds < 1:
        raise NormlabError(f"--seeds must be >= 1, got {seeds}")
    norm_list = _csv_list(norms, str, "--norms")
    _check_norms(norm_list)
    configs = compare_configs(
        model=model,
        norms=norm_list,
        batch_sizes=_csv_list(batch_sizes, int, "--batch-sizes"),
        seeds=list(range(seeds)),
        base_lrs=_csv_list(lrs, float, "--lrs"),
        agc_clip=agc_clip,
        group=f"compare/{model}/{dataset}",
        epochs=epochs,
        dataset=dataset,
        data_root=data_root,
        subset=_parse_option("subset", subset) if subset is not None else None,
        width=_parse_option("width", width) if width is not None else None,
        depth=depth,
        optimizer=optimizer,
        device=device,
    )
    _check_buildable(configs[0])
    executor = LocalPoolExecutor(workers)  # validates --workers before the store is opened
    started = time.perf_counter()
    with _open_store(store) as db, executor:
        results = run_sweep(configs, db, executor)
    wall = time.perf_counter() - started
    cells = summarize_compare(results)
    counts = {s: sum(r.status == s for r in results) for s in ("finished", "diverged", "failed")}
    settings = dict(model=model, norms=norms, batch_sizes=batch_sizes, lrs=lrs, seeds=seeds, epochs=epochs,
                    dataset=dataset, subset=subset, width=width, depth=depth, agc_clip=agc_clip,
                    optimizer=optimizer, device=device)
    files = _write_compare_report(out, results, configs[0], settings) if report else None
    if json_output:
        summary = _compare_json(cells, results, wall, counts, configs[0])
        summary["report"] = str(files.html) if files else None
        _print_json(summary)
        return
    _print_compare(cells, results, wall, counts, model, dataset, epochs, seeds)
    if files is not None:
        _console().print(f"report: {files.html}")


def _write_compare_report(out: str, results, example, settings: dict[str, Any]):
    from normlab.reports import compare_report
    from normlab.store import environment_info

    return compare_report(
        out, results, title=f"normlab compare: {example.model} on {example.dataset}", config=settings,
        environment=environment_info(example.device),
    )


def _check_norms(norms: list[str]) -> None:
    from normlab.layers import list_norms

    valid = [*list_norms(), "nf"]
    unknown = [n for n in norms if n not in valid]
    if unknown:
        raise NormlabError(f"unknown norm(s) {', '.join(unknown)}; valid norms: {', '.join(valid)}")


def _check_buildable(config) -> None:
    # Fail on a bad model/dataset/data folder here, in one line, instead of in every worker.
    from normlab.train.build import build_model, load_data, resolve_device

    resolve_device(config.device)
    build_model(config, load_data(config))


def _ci_cell(values: list[float]) -> tuple[float, float]:
    from normlab.reports.stats import mean_ci

    return mean_ci(values)


def _compare_json(cells, results, wall, counts, example) -> dict[str, Any]:
    rows = []
    for cell in cells:
        row = cell.to_dict()
        mean, half = _ci_cell(row["accuracies"])
        row.update(test_acc_mean=mean, test_acc_ci95=half)
        rows.append(row)
    return {
        "model": example.model,
        "dataset": example.dataset,
        "epochs": example.epochs,
        "runs": len(results),
        "statuses": counts,
        "wall_time": wall,
        "rows": rows,
        "run_ids": [r.run_id for r in results],
    }


def _print_compare(cells, results, wall, counts, model, dataset, epochs, seeds) -> None:
    from rich.table import Table

    table = Table(title=f"{model} on {dataset}: {epochs} epochs, {seeds} seeds, {len(results)} runs")
    columns = ("norm", "batch", "test acc (95% CI)", "best LR", "max stable LR", "steps/s", "train/eval gap")
    for column in columns:
        table.add_column(column, justify="left" if column == "norm" else "right")
    for cell in cells:
        best = cell.best
        if best is None:
            table.add_row(cell.norm, str(cell.batch_size), "all LRs diverged", "-", "-", "-", "-")
            continue
        mean, half = _ci_cell(best.accuracies)
        ci = f"{100 * mean:.1f} ± {100 * half:.1f}%" if math.isfinite(half) else f"{100 * mean:.1f}%"
        row = cell.to_dict()
        table.add_row(
            cell.norm, str(cell.batch_size), ci, _fmt(best.lr, 3), _fmt(cell.largest_stable_lr, 3),
            _fmt(row["steps_per_s"], 4), f"{100 * row['train_eval_gap']:+.1f} pts",
        )  # fmt: skip
    console = _console()
    console.print(table)
    console.print(
        f"{counts['finished']} finished, {counts['diverged']} diverged, {counts['failed']} failed "
        f"in {wall:.1f} s. Stable LR: no seed diverged (a stable top LR means the grid did not reach "
        "instability); best = highest mean accuracy among stable LRs; train/eval gap: test accuracy with "
        "batch statistics at the training batch size minus eval mode."
    )


def register(app: typer.Typer) -> None:
    app.command("train", help="Train one model (every TrainConfig field is an option).")(train_command)
    app.add_typer(runs_app, name="runs")
    app.command("models")(models_command)
    app.command("norms")(norms_command)
    app.command("compare")(compare_command)
