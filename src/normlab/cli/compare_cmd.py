"""``normlab compare``: one model under several norms and batch sizes, side by side."""

from __future__ import annotations

import math
import time
from typing import Annotated, Any

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
from normlab.cli._track import (
    DEFAULT_LOG_DIR,
    LOG_DIR_HELP,
    LOG_HELP,
    check_trackers,
    close_trackers,
    open_cli_trackers,
    print_trackers,
)
from normlab.cli.train_cmd import parse_option
from normlab.errors import NormlabError

# The default grid: 4 norms x 2 batch sizes x 3 lrs x 3 seeds = 72 runs of the MNIST-1D CNN, each trained
# until the plateau rule holds (budget "auto", cap 12000 steps, 10% of the training data held out for the
# plateau rule and the lr choice), then extended where the best lr is at the grid's edge or the top lr is
# still stable (normlab.sweep.lr_search). Adam, as the reference figures of science.md section 8 (bare Adam
# loops at 1e-2); the grid is x4-spaced around 1e-2 at batch 128 and scaled with the square root of the
# batch size (Adam's rule; measured with linear scaling: at batch 16 the grid's two lower lrs, 3e-4 and
# 1.3e-3, left BN unconverged at the 3000-step cap while 5e-3, its top, converged at 95.5%).
# The cap: at 3000 steps (13 epochs at batch 16) 10 of the 12 best-lr batch-16 runs had not met the plateau
# rule (held-out accuracy still rising 1-3 pts, or training loss still falling), while every batch-128 cell
# converged by 900-2200 steps; at 6000, batch-16 runs met the rule at steps 4000-4900, too late for its
# patience and cooldown. Replayed from a 12000-cap compare's histories with the rule judged at the cap
# (normlab.train.budget), 11 of the 24 batch-16 runs at the two upper lrs end unconverged at a 6000 cap, 1 at
# 12000. Runs stop at their plateau, so a higher cap costs only the runs that need it.
# Three seeds are the fewest for which a t-interval is informative (t_{0.975,2} = 4.30; with two, 12.7).
# The validation split costs 400 of the 4000 training examples; measured (gn, batch 128, Adam 1e-2, auto
# budget, seeds 0-2): test accuracy 94.3% with it, 94.6% without, paired difference -0.4 pts (95% CI -1.2 to
# +0.4): a tie, so compare holds it out by default and never selects on test.
COMPARE_DEFAULTS = {
    "model": "cnn",
    "norms": "bn,none,gn,nf",
    "batch_sizes": "16,128",
    "lrs": "0.0025,0.01,0.04",
    "seeds": 3,
    "max_steps": 12000,
    "val_fraction": 0.1,
    "lr_extensions": 2,
    "probe_margin": 0.03,
    "margin": 1.0,
    "optimizer": "adamw",
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
        COMPARE_DEFAULTS["lrs"], help="LR grid at batch 128, scaled with the batch size (--lr-scaling)"
    ),
    lr_scaling: str = typer.Option(
        "auto", help="linear (lr * bs / 128, SGD), sqrt (lr * sqrt(bs / 128), Adam), auto: by --optimizer"
    ),
    seeds: int = typer.Option(COMPARE_DEFAULTS["seeds"], help="seeds per configuration (0..n-1)"),
    budget: str = typer.Option(
        "auto", help="auto: train each run until the plateau rule holds (cap --max-steps), then cool down; "
        "fixed: --epochs or --steps (setting either fixes the budget)",
    ),
    max_steps: int = typer.Option(COMPARE_DEFAULTS["max_steps"], help="cap of the auto budget, in steps"),
    epochs: int | None = typer.Option(None, help="fixed budget: epochs, equal for every batch size"),
    steps: int | None = typer.Option(None, help="fixed budget: optimizer steps, equal for every batch size"),
    val_fraction: float = typer.Option(
        COMPARE_DEFAULTS["val_fraction"],
        help="training data held out for the plateau rule and the lr choice (0: both use the test set)",
    ),
    lr_extensions: int = typer.Option(
        COMPARE_DEFAULTS["lr_extensions"],
        help="lrs each cell may add beyond the grid, each way, until its best lr is interior and its top lr "
        "unstable (0: the grid as given)",
    ),
    margin: float = typer.Option(
        COMPARE_DEFAULTS["margin"],
        help="equivalence margin of the verdicts, in accuracy points: a difference whose 95% interval lies "
        "inside +-margin is 'equivalent', one that excludes 0 and is not inside it a win or loss",
    ),
    probe_margin: float = typer.Option(
        COMPARE_DEFAULTS["probe_margin"],
        help="auto budget: an lr probe above a cell's best lr stops once past a tenth of its cap while its "
        "validation accuracy is this far below the best lr's (it cannot be the best); 0: every probe trains "
        "to its plateau",
    ),
    dataset: str = typer.Option("mnist1d", help="dataset name"),
    data_root: str | None = typer.Option(None, help="folder holding the data"),
    subset: str | None = typer.Option(None, help="train on a seeded subset (count or fraction)"),
    width: str | None = typer.Option(None, help="model width (model default if unset)"),
    depth: int | None = typer.Option(None, help="model depth (model default if unset)"),
    model_options: str | None = typer.Option(None, help="JSON object of model (or factory) options"),
    image_size: int | None = typer.Option(None, help="imagefolder: image side (loader default 64)"),
    test_fraction: float | None = typer.Option(
        None, help="imagefolder: hold out this fraction of each class as the test split (instead of val/)"
    ),
    agc_clip: float = typer.Option(COMPARE_DEFAULTS["agc_clip"], help="AGC clip factor for nf runs"),
    optimizer: str = typer.Option(COMPARE_DEFAULTS["optimizer"], help="sgd or adamw"),
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
    wide: bool = typer.Option(False, "--wide", help="the table with every column (steps, convergence "
                              "reasons, steps/s, train/eval gap); default: the columns that fit 80 "
                              "characters, with a legend"),
    json_output: bool = typer.Option(False, "--json", help="print JSON only"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    log: Annotated[list[str] | None, typer.Option("--log", metavar="TRACKER", help=LOG_HELP)] = None,
    log_dir: str = typer.Option(DEFAULT_LOG_DIR, "--log-dir", help=LOG_DIR_HELP),
) -> None:
    """One model under several norms and batch sizes, side by side (parallel, resumable).

    Each run trains until it converges (budget auto) unless --epochs/--steps fix its length. Per norm and
    batch size: final test accuracy (mean +- 95% t-interval over seeds) at the best stable LR (chosen on the
    held-out validation split), steps taken, convergence, the verdict word against the best norm at that
    batch size (win / loss / equivalent / unresolved / inconclusive: the 95% paired t-interval of the
    difference over seeds read against --margin), the
    largest stable LR, steps/s and the train/eval gap.
    """
    from normlab.sweep import LocalPoolExecutor, compare_configs, run_sweep
    from normlab.sweep.compare import check_seeds
    from normlab.sweep.lr_search import bracket_lrs

    check_seeds(seeds)
    for name, value in (("--max-steps", max_steps), ("--epochs", epochs), ("--steps", steps)):
        if value is not None and value < 1:
            raise NormlabError(f"{name} must be >= 1, got {value}")
    if lr_extensions < 0:
        raise NormlabError(f"--lr-extensions must be >= 0, got {lr_extensions}")
    if isinstance(margin, bool) or not 0 < margin <= 100:
        raise NormlabError(f"--margin must be above 0 and at most 100 accuracy points, got {margin}")
    if not 0 <= probe_margin <= 1:
        raise NormlabError(f"--probe-margin must be between 0 and 1 (an accuracy), got {probe_margin}")
    if budget not in ("auto", "fixed"):
        raise NormlabError(f"--budget must be auto or fixed, got {budget!r}")
    if epochs is not None and steps is not None:
        raise NormlabError("give --epochs or --steps, not both")
    if budget == "fixed" and epochs is None and steps is None:
        raise NormlabError("--budget fixed needs --epochs N or --steps N")
    fixed = epochs is not None or steps is not None
    length = (
        {"budget": "fixed", "epochs": epochs, "steps": steps}
        if fixed else {"budget": "auto", "epochs": None, "steps": max_steps}
    )  # fmt: skip
    norm_list = csv_list(norms, str, "--norms")
    check_norms(norm_list)
    configs = compare_configs(
        model=model,
        norms=norm_list,
        batch_sizes=csv_list(batch_sizes, int, "--batch-sizes"),
        seeds=list(range(seeds)),
        base_lrs=csv_list(lrs, float, "--lrs"),
        lr_scaling=_lr_scaling(lr_scaling, optimizer),
        agc_clip=agc_clip,
        group=f"compare/{model}/{dataset}",
        val_fraction=val_fraction,
        dataset=dataset,
        data_root=data_root,
        subset=parse_option("subset", subset) if subset is not None else None,
        width=parse_option("width", width) if width is not None else None,
        depth=depth,
        optimizer=optimizer,
        device=device,
        log_every=0,  # curves from the run's length: a short fixed budget still draws ~50 points
        **_data_and_model_options(model_options, image_size, test_fraction),
        **length,
    )
    _check_before_training(configs, store, out if report else None, force)
    check_trackers(log, log_dir)
    _check_buildable(configs[0])
    # Validates --workers / --executor / --address before the store is opened.
    if executor_kind == "local" and address is None:
        executor = LocalPoolExecutor(workers)
    else:
        executor = make_executor(executor_kind, workers, address=address, cpus_per_run=cpus_per_run,
                                 gpus_per_run=gpus_per_run)
    started = time.perf_counter()
    trackers = open_cli_trackers(log, log_dir)
    with open_store(store) as db, executor:
        tracking = _sweep_log(trackers, db, model, dataset)
        on_result = tracking.on_result if tracking is not None else None
        results, configs = bracket_lrs(
            configs, lambda todo, follow_up: run_sweep(todo, db, executor, batch=batch, follow_up=follow_up,
                                                       on_result=on_result),
            max_extra=lr_extensions,
            stop_margin=probe_margin, on_round=None if json_output else _announce_round,
        )  # fmt: skip
        histories = _histories(db, results) if report else None
    wall = time.perf_counter() - started
    settings = dict(model=model, norms=norms, batch_sizes=batch_sizes, lrs=lrs,
                    lr_scaling=_lr_scaling(lr_scaling, optimizer), seeds=seeds, budget=length,
                    max_steps=max_steps if not fixed else None, val_fraction=val_fraction,
                    lr_extensions=lr_extensions, probe_margin=probe_margin, margin=margin, dataset=dataset,
                    subset=subset,
                    width=width, depth=depth,
                    agc_clip=agc_clip, optimizer=optimizer, device=device,
                    gn_groups=_gn_groups(configs[0]) if "gn" in norm_list else None)
    settle = _settle(fixed, max_steps, lr_extensions)
    summary = compare_summary(results, wall, configs[0], settle=settle, margin=margin / 100)
    files = (_write_compare_report(out, results, configs[0], settings, histories, settle, margin / 100)
             if report else None)
    if json_output:
        summary["report"] = str(files.html) if files else None
        _finish_tracking(tracking, f"compare {model} on {dataset}", settings, summary, files)
        print_json(summary)
        return
    _print_compare(summary, model, dataset, seeds, wide)
    if files is not None:
        console().print(f"report: {files.html}")
    _finish_tracking(tracking, f"compare {model} on {dataset}", settings, summary, files)
    print_trackers(trackers)


def _sweep_log(trackers, db, model: str, dataset: str):
    """The trackers of ``--log`` over this compare's runs (each sent from the store as it completes)."""
    if not trackers:
        return None
    from normlab.track import SweepLog, session_name

    return SweepLog(trackers, db, session_name("compare", model, dataset))


def _finish_tracking(tracking, name: str, settings: dict[str, Any], summary: dict[str, Any], files) -> None:
    """The session's record in each tracker (settings, verdict sentences, report files), then close them."""
    if tracking is None:
        return
    tracking.summary(name, settings, summary["verdicts"], files.html.parent if files else None)
    close_trackers(tracking.trackers)


def _lr_scaling(choice: str, optimizer: str) -> str:
    if choice not in ("auto", "linear", "sqrt"):
        raise NormlabError(f"--lr-scaling must be auto, linear or sqrt, got {choice!r}")
    if choice != "auto":
        return choice
    return "sqrt" if optimizer == "adamw" else "linear"


def _announce_round(round_number: int, new_configs) -> None:
    cells = sorted({(c.norm, c.batch_size, c.lr) for c in new_configs})
    text = ", ".join(f"{n}/bs{b}/lr{lr:.3g}" for n, b, lr in cells)
    console().print(f"lr search, round {round_number} of its cell: {len(new_configs)} more runs ({text})")


def _settle(fixed: bool, max_steps: int, lr_extensions: int):
    from normlab.sweep.compare_verdicts import Settle

    return Settle(
        unconverged="--budget auto (drop --epochs/--steps)" if fixed else f"--max-steps {2 * max_steps}",
        edge=f"--lr-extensions {lr_extensions + 2} (or a wider --lrs grid)",
    )


def _histories(db, results) -> dict[int, dict[str, list]]:
    """Learning curves (training loss, held-out accuracy) of every finished run, for the report."""
    names = ("train/loss", "val/acc", "test/acc")
    return {
        r.run_id: {name: db.metrics(r.run_id, name) for name in names}
        for r in results if r.run_id is not None and r.status == "finished"
    }  # fmt: skip


def _write_compare_report(out: str, results, example, settings: dict[str, Any], histories, settle,
                          margin: float):
    from normlab.reports import compare_report
    from normlab.store import environment_info

    return compare_report(
        out, results, title=f"normlab compare: {example.model} on {example.dataset}", config=settings,
        environment=environment_info(example.device), histories=histories, settle=settle, margin=margin,
    )


def _data_and_model_options(model_options: str | None, image_size: int | None, test_fraction: float | None):
    """The TrainConfig fields of --model-options / --image-size / --test-fraction that were given."""
    fields: dict[str, Any] = {"image_size": image_size, "test_fraction": test_fraction}
    if model_options is not None:
        fields["model_options"] = parse_option("model_options", model_options)
    return {name: value for name, value in fields.items() if value is not None}


def _check_before_training(configs, store: str | None, out: str | None, force: bool) -> None:
    # Every batch size, the largest lr and the costliest run are checked, and the store and report folder
    # must be writable, before the first run trains (not after all of them).
    check_store_target(store)
    check_folder_target(out, "--out")
    data = None
    for config in {c.batch_size: c for c in configs}.values():
        data = preflight(config, force=force, data=data)
    preflight(max(configs, key=lambda c: c.lr), force=True, data=data)


def _check_buildable(config) -> None:
    # Fail on a bad model/dataset/data folder here, in one line, instead of in every worker.
    from normlab.train.build import build_model, load_data, resolve_device

    resolve_device(config.device)
    build_model(config, load_data(config))


def compare_summary(results, wall: float, example, settle=None, margin: float = 0.01) -> dict[str, Any]:
    """Everything compare prints, as plain values: one row per cell (with its verdict word), the verdict
    sentences, run counts and the groups each gn layer used."""
    from normlab.reports.compare import verdict_sentences
    from normlab.stats import mean_ci, rule_text
    from normlab.sweep import summarize_compare
    from normlab.sweep.compare_verdicts import Settle, cell_words

    settle = settle or Settle()
    cells = summarize_compare(results)
    norms = list(dict.fromkeys(c.norm for c in cells))
    batches = sorted({c.batch_size for c in cells})
    grid = {(c.norm, c.batch_size): c for c in cells}
    words = cell_words(grid, norms, batches, settle, margin)
    rows = []
    for cell in cells:
        row = cell.to_dict()
        mean, half = mean_ci(row["accuracies"])
        row.update(test_acc_mean=mean, test_acc_ci95=half, verdict=words.get((cell.norm, cell.batch_size)),
                   largest_stable_lr_text=cell.largest_stable_text())
        if cell.norm == "gn":
            row["gn_groups"] = _gn_groups(example)
        rows.append(row)
    counts = {s: sum(r.status == s for r in results) for s in ("finished", "diverged", "failed")}
    convergence = {s: sum(r.convergence == s for r in results)
                   for s in ("converged", "unconverged", "stalled", "diverged", "failed")}
    return {
        "model": example.model,
        "dataset": example.dataset,
        "budget": example.budget,
        "cap_steps": example.steps,
        "epochs": example.epochs,
        "val_fraction": example.val_fraction,
        "runs": len(results),
        "statuses": counts,
        "convergence": convergence,
        "wall_time": wall,
        "rule": rule_text(margin),
        "margin": margin,
        "rows": rows,
        "verdicts": verdict_sentences(grid, norms, batches, settle, margin),
        "run_ids": [r.run_id for r in results],
    }


def _gn_groups(example) -> list[int]:
    """The group count of each GroupNorm layer in ``example``'s model (``norm="gn"``)."""
    from torch import nn

    from normlab.train.build import build_model, load_data

    config = example.replace(norm="gn", agc_clip=None)
    model = build_model(config, load_data(config))
    return [m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)]


def _print_compare(summary: dict[str, Any], model: str, dataset: str, seeds: int, wide: bool = False) -> None:
    """The cell table (fewer columns, with a legend, unless ``wide``), the verdicts and the run counts."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    budget = (f"auto budget (cap {summary['cap_steps']} steps)" if summary["budget"] == "auto"
              else f"fixed budget ({summary['cap_steps'] or summary['epochs']} "
                   f"{'steps' if summary['cap_steps'] else 'epochs'})")
    table = Table(title=f"{model} on {dataset}: {budget}, {seeds} seeds, {summary['runs']} runs",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    if wide:
        columns = ("norm", "batch", "test acc (95% CI)", "verdict", "steps", "convergence", "best LR",
                   "max stable LR", "steps/s", "train/eval gap")
    else:  # fits 80 columns; the legend below names what each short heading means
        columns = ("norm", "bs", "test acc %", "verdict", "conv", "best lr", "max lr")
    left = ("norm", "verdict", "convergence", "conv")
    for column in columns:
        table.add_column(column, justify="left" if column in left else "right", no_wrap=not wide)
    edge = False
    for row in summary["rows"]:
        norm = row["norm"] + (f" ({row['gn_groups'][0]} groups)" if wide and row.get("gn_groups") else "")
        verdict = row["verdict"] or "-"
        if row["best_lr"] is None:
            cells = [escape(norm), str(row["batch_size"]), "no stable LR", verdict]
            rest = ["-", "-", "-", row["largest_stable_lr_text"], "-", "-"] if wide else ["-", "-", "none"]
            table.add_row(*cells, *rest)
            continue
        mean, half = row["test_acc_mean"], row["test_acc_ci95"]
        conv = row["convergences"]
        converged = sum(c == "converged" for c in conv)
        best_lr = fmt(row["best_lr"], 3)
        if wide:
            ci = f"{100 * mean:.1f} ± {100 * half:.1f}%" if math.isfinite(half) else f"{100 * mean:.1f}%"
            conv_text = f"{converged}/{len(conv)} converged"
            if converged < len(conv):
                conv_text += f" ({row['convergence']})"
            if row["best_lr_at_edge"]:
                best_lr += f" (edge: {row['best_lr_at_edge']})"
            table.add_row(
                escape(norm), str(row["batch_size"]), ci, verdict, _steps_text(row["steps"]),
                conv_text, best_lr, row["largest_stable_lr_text"], fmt(row["steps_per_s"], 4),
                f"{100 * row['train_eval_gap']:+.1f} pts",
            )  # fmt: skip
            continue
        ci = f"{100 * mean:.1f}±{100 * half:.1f}" if math.isfinite(half) else f"{100 * mean:.1f}"
        if row["best_lr_at_edge"]:
            best_lr += "*"
            edge = True
        top = row["largest_stable_lr_text"].replace(" (top of grid)", "").replace(">= ", ">=")
        table.add_row(escape(norm), str(row["batch_size"]), ci, verdict, f"{converged}/{len(conv)}", best_lr,
                      top)
    out = console()
    out.print(table)
    if not wide:
        groups = next((r["gn_groups"] for r in summary["rows"] if r.get("gn_groups")), None)
        legend = [
            "bs: batch size; test acc %: mean ± 95% t-interval over seeds; verdict: against the best norm at "
            "that batch size; conv: seeds converged; best lr: highest mean validation accuracy among stable "
            "lrs" + ("; * at the edge of the lr grid" if edge else "") + "; max lr: largest stable lr "
            "(>=: the top of the grid was still stable)",
            *([f"gn: {groups[0]} groups per layer"] if groups else []),
            "--wide: every column (steps taken, convergence reasons, steps/s, train/eval gap)",
        ]
        for line in legend:
            out.print(escape(line), style="dim")
    for line in summary["verdicts"]:
        out.print(escape(line))
    counts, conv = summary["statuses"], summary["convergence"]
    out.print(
        f"{counts['finished']} finished ({conv['converged']} converged, {conv['unconverged']} unconverged, "
        f"{conv['stalled']} stalled), {counts['diverged']} diverged, {counts['failed']} failed "
        f"in {summary['wall_time']:.1f} s. Rule: {summary['rule']}. Stable LR: no seed diverged, failed or "
        "stalled; best = highest mean validation accuracy among stable LRs; train/eval gap: test accuracy "
        "with batch statistics at the training batch size minus eval mode."
    )


def _steps_text(steps: list[int]) -> str:
    if not steps:
        return "-"
    low, high = min(steps), max(steps)
    return str(low) if low == high else f"{low}-{high}"


def register(app: typer.Typer) -> None:
    app.command("compare")(compare_command)
