"""``normlab compare``: one model under several norms and batch sizes, side by side."""

from __future__ import annotations

import math
import time
from typing import Any

import typer

from normlab.cli._common import (
    FORCE_HELP,
    STORE_HELP,
    check_folder_target,
    check_norms,
    check_store_target,
    console,
    csv_list,
    fmt,
    open_store,
    preflight,
    print_json,
)
from normlab.cli._executor import ADDRESS_HELP, CPUS_HELP, EXECUTOR_HELP, GPUS_HELP, make_executor
from normlab.cli.train_cmd import parse_option
from normlab.errors import NormlabError

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
    model: str = typer.Option(
        COMPARE_DEFAULTS["model"], help="model name (see `normlab models`), or your code: "
        "package.module:factory or file.py:factory (bn: as built; nf: to_normalizer_free)"
    ),
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
    model_options: str | None = typer.Option(None, help="JSON object of model (or factory) options"),
    image_size: int | None = typer.Option(None, help="imagefolder: image side (loader default 64)"),
    val_fraction: float | None = typer.Option(
        None, help="imagefolder: hold out this fraction of each class as the test split (instead of val/)"
    ),
    agc_clip: float = typer.Option(COMPARE_DEFAULTS["agc_clip"], help="AGC clip factor for nf runs"),
    optimizer: str = typer.Option("sgd", help="sgd or adamw"),
    device: str = typer.Option("cpu", help="device of every run"),
    workers: int | None = typer.Option(None, help="parallel runs (default: all cores)"),
    executor_kind: str = typer.Option("local", "--executor", help=EXECUTOR_HELP),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    cpus_per_run: float = typer.Option(1, "--cpus-per-run", help=CPUS_HELP),
    gpus_per_run: float = typer.Option(0, "--gpus-per-run", help=GPUS_HELP),
    batch: bool = typer.Option(
        True, "--batch/--no-batch", help="train runs differing only in seed and lr as one stacked model"
    ),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    out: str = typer.Option(
        "normlab-results/compare", "--out", help="folder for report.html + report.md + figures"
    ),
    report: bool = typer.Option(True, "--report/--no-report", help="write the HTML/Markdown report"),
    json_output: bool = typer.Option(False, "--json", help="print JSON only"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """One model under several norms and batch sizes, side by side (parallel, resumable).

    Shows final test accuracy (mean +- 95% t-interval over seeds) at each norm's best stable LR, the
    largest stable LR, steps/s, and the train/eval gap (test accuracy with batch statistics at the
    training batch size minus eval-mode accuracy).
    """
    from normlab.sweep import LocalPoolExecutor, compare_configs, run_sweep, summarize_compare

    if seeds < 1:
        raise NormlabError(f"--seeds must be >= 1, got {seeds}")
    norm_list = csv_list(norms, str, "--norms")
    check_norms(norm_list)
    configs = compare_configs(
        model=model,
        norms=norm_list,
        batch_sizes=csv_list(batch_sizes, int, "--batch-sizes"),
        seeds=list(range(seeds)),
        base_lrs=csv_list(lrs, float, "--lrs"),
        agc_clip=agc_clip,
        group=f"compare/{model}/{dataset}",
        epochs=epochs,
        dataset=dataset,
        data_root=data_root,
        subset=parse_option("subset", subset) if subset is not None else None,
        width=parse_option("width", width) if width is not None else None,
        depth=depth,
        optimizer=optimizer,
        device=device,
        **_data_and_model_options(model_options, image_size, val_fraction),
    )
    _check_before_training(configs, store, out if report else None, force)
    _check_buildable(configs[0])
    # Validates --workers / --executor / --address before the store is opened.
    if executor_kind == "local" and address is None:
        executor = LocalPoolExecutor(workers)
    else:
        executor = make_executor(executor_kind, workers, address=address, cpus_per_run=cpus_per_run,
                                 gpus_per_run=gpus_per_run)
    started = time.perf_counter()
    with open_store(store) as db, executor:
        results = run_sweep(configs, db, executor, batch=batch)
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
        print_json(summary)
        return
    _print_compare(cells, results, wall, counts, model, dataset, epochs, seeds)
    if files is not None:
        console().print(f"report: {files.html}")


def _write_compare_report(out: str, results, example, settings: dict[str, Any]):
    from normlab.reports import compare_report
    from normlab.store import environment_info

    return compare_report(
        out, results, title=f"normlab compare: {example.model} on {example.dataset}", config=settings,
        environment=environment_info(example.device),
    )


def _data_and_model_options(model_options: str | None, image_size: int | None, val_fraction: float | None):
    """The TrainConfig fields of --model-options / --image-size / --val-fraction that were given."""
    fields: dict[str, Any] = {"image_size": image_size, "val_fraction": val_fraction}
    if model_options is not None:
        fields["model_options"] = parse_option("model_options", model_options)
    return {name: value for name, value in fields.items() if value is not None}


def _check_buildable(config) -> None:
    # Fail on a bad model/dataset/data folder here, in one line, instead of in every worker.
    from normlab.train.build import build_model, load_data, resolve_device

    resolve_device(config.device)
    build_model(config, load_data(config))


def _check_before_training(configs, store: str | None, out: str | None, force: bool) -> None:
    # Every batch size, the largest lr and the costliest run are checked, and the store and report folder
    # must be writable, before the first run trains (not after all of them).
    check_store_target(store)
    check_folder_target(out, "--out")
    data = None
    for config in {c.batch_size: c for c in configs}.values():
        data = preflight(config, force=force, data=data)
    preflight(max(configs, key=lambda c: c.lr), force=True, data=data)


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
            cell.norm, str(cell.batch_size), ci, fmt(best.lr, 3), fmt(cell.largest_stable_lr, 3),
            fmt(row["steps_per_s"], 4), f"{100 * row['train_eval_gap']:+.1f} pts",
        )  # fmt: skip
    out = console()
    out.print(table)
    out.print(
        f"{counts['finished']} finished, {counts['diverged']} diverged, {counts['failed']} failed "
        f"in {wall:.1f} s. Stable LR: no seed diverged (a stable top LR means the grid did not reach "
        "instability); best = highest mean accuracy among stable LRs; train/eval gap: test accuracy with "
        "batch statistics at the training batch size minus eval mode."
    )


def register(app: typer.Typer) -> None:
    app.command("compare")(compare_command)
