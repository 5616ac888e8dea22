"""``normlab study NAME`` (run a study and write its report), ``normlab study --list`` and
``normlab report PATH`` (render a report from a study output folder or a results store)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from normlab.cli._common import check_file_target, check_folder_target, check_threads, print_json
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
from normlab.errors import NormlabError


def register(app: typer.Typer) -> None:
    app.command("study")(study)
    app.command("report")(report)


def study(
    name: Annotated[str | None, typer.Argument(help="Study name (see --list) or a recipe path.")] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the studies and exit.")] = False,
    all_: Annotated[
        bool, typer.Option("--all", help="Run every study; print one table and write OUT/index.html.")
    ] = False,
    json_: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON instead of Markdown.")
    ] = False,
    scale: Annotated[str, typer.Option(help="tiny (seconds), quick (CPU minutes), paper (GPU).")] = "quick",
    seeds: Annotated[int, typer.Option(help="Seeds per configuration; tables show mean ± 95% CI.")] = 3,
    device: Annotated[str, typer.Option(help="Torch device for training, e.g. cpu or cuda.")] = "cpu",
    out: Annotated[
        Path, typer.Option(help="Output folder; the report goes to OUT/NAME/.")
    ] = Path("normlab-results"),
    store: Annotated[Path | None, typer.Option(help="Results store (default OUT/NAME/runs.sqlite).")] = None,
    workers: Annotated[int, typer.Option(help="Parallel training processes (1 = in this process).")] = 1,
    threads: Annotated[
        int, typer.Option(help="Torch threads per training process (0 = usable cores / workers).")
    ] = 0,
    model: Annotated[str | None, typer.Option(
        help="your model (package.module:factory or file.py:factory) in place of the recipe's, in every run"
    )] = None,
    model_options: Annotated[
        str | None, typer.Option(help="JSON object of options for --model's factory")
    ] = None,
    dataset: Annotated[str | None, typer.Option(
        help="your data in place of the recipe's, in every run (as train --dataset: npz:FILE, "
             "imagefolder, ...)"
    )] = None,
    data_root: Annotated[str | None, typer.Option(help="folder holding --dataset's data")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", metavar="FIELD=VALUE",
        help="change a field of the scale table (repeatable), e.g. --set steps=6000 or "
             "--set nets.vgg.steps=10000: a longer budget where a study is inconclusive at this scale",
    )] = None,
    margin: Annotated[float | None, typer.Option(
        help="equivalence margin of every verdict, in the recipe's margin_unit (accuracy as a fraction: "
             "0.01 = 1 point; timings as a log ratio); default: the recipe's margin. One study only",
    )] = None,
    executor_kind: Annotated[str, typer.Option("--executor", help=EXECUTOR_HELP)] = "local",
    address: Annotated[str | None, typer.Option("--address", help=ADDRESS_HELP)] = None,
    cpus_per_run: Annotated[float, typer.Option("--cpus-per-run", help=CPUS_HELP)] = 1,
    gpus_per_run: Annotated[float, typer.Option("--gpus-per-run", help=GPUS_HELP)] = 0,
    log: Annotated[list[str] | None, typer.Option("--log", metavar="TRACKER", help=LOG_HELP)] = None,
    log_dir: Annotated[str, typer.Option("--log-dir", help=LOG_DIR_HELP)] = DEFAULT_LOG_DIR,
) -> None:
    """Run a study: train its variants, measure, and write OUT/NAME/report.html + report.md."""
    from rich.console import Console
    from rich.markup import escape

    from normlab.studies import get_study, list_studies

    console = Console()
    if list_:
        rows = [{"name": n, "title": get_study(n).title} for n in list_studies()]
        if json_:
            print_json(rows)
            return
        for row in rows:
            console.print(f"[bold]{row['name']}[/bold]  {escape(row['title'])}", soft_wrap=True)
        return
    if all_ and name is not None:
        raise NormlabError(f"give a study name or --all, not both (got {name!r} and --all)")
    if name is None and not all_:
        raise NormlabError(f"give a study name, --all or --list; valid studies: {', '.join(list_studies())}")
    if model is None and model_options is not None:
        raise NormlabError("--model-options needs --model")
    if model is not None and all_:
        raise NormlabError("--model goes with one study, not --all (some studies sweep their own models)")
    if (dataset is not None or data_root is not None) and all_:
        raise NormlabError("--dataset goes with one study, not --all")
    if set_ and all_:
        raise NormlabError("--set goes with one study, not --all (each study has its own scale table)")
    if margin is not None and all_:
        raise NormlabError("--margin goes with one study, not --all (each study's margin is in its own "
                           "units: accuracy, log ratios of timings; the recipes set them)")
    if margin is not None:
        from normlab.studies.recipe import check_margin

        check_margin(margin)
    from normlab.studies.overrides import parse_overrides

    overrides = parse_overrides(set_ or [])
    factory_options = None
    if model_options is not None:
        from normlab.cli.train_cmd import parse_option

        factory_options = parse_option("model_options", model_options)
        if not isinstance(factory_options, dict):
            raise NormlabError(f"--model-options must be a JSON object, got {model_options!r}")
    if workers < 1:
        raise NormlabError(f"--workers must be >= 1, got {workers!r}")
    from normlab.sweep.compare import MAX_SEEDS, check_seeds

    if seeds > MAX_SEEDS:  # before --all runs every study into an error row
        check_seeds(seeds)
    if threads < 0:
        raise NormlabError(f"--threads must be >= 0 (0 = usable cores / workers), got {threads!r}")
    check_threads(threads or None)
    check_folder_target(out, "--out")
    if store is not None:
        check_file_target(store, "--store")
    check_trackers(log, log_dir)
    from normlab.train.threads import fit_threads, set_threads

    # On a shared machine, oversubscribed intra-op threads can slow training by an order of magnitude.
    set_threads(fit_threads(workers, threads or None))
    from normlab.studies.runner import run_study

    err = Console(stderr=True)
    executor = make_executor(executor_kind, workers, address=address, cpus_per_run=cpus_per_run,
                             gpus_per_run=gpus_per_run, threads=threads or None)
    trackers = open_cli_trackers(log, log_dir)
    if all_:
        try:
            _run_all(console, err, scale, seeds, device, out, store, executor, json_, trackers)
        finally:
            close_trackers(trackers)
            if executor is not None:
                executor.shutdown()
        if not json_:
            print_trackers(trackers)
        return
    try:
        outcome, files = run_study(
            name,
            scale=scale,
            seeds=seeds,
            device=device,
            out=out,
            store=store,
            executor=executor,
            trackers=trackers,
            progress=lambda message: err.print(f"[dim]{message}[/dim]"),
            model=model,
            model_options=factory_options,
            overrides=overrides,
            dataset=dataset,
            data_root=data_root,
            margin=margin,
        )
    finally:
        close_trackers(trackers)
        if executor is not None:
            executor.shutdown()
    if json_:
        from normlab.studies._verdict import agreement_word

        payload = {"study": name, "verdict": agreement_word(outcome.agrees_with_paper),
                   "report": str(files.html), "markdown": str(files.markdown), **outcome.to_dict()}
        payload.pop("data")
        print_json(payload)
        return
    _print_markdown(console, files.markdown_text)
    console.print(f"report: {files.html}")
    print_trackers(trackers)


def _run_all(console, err, scale, seeds, device, out, store, executor, as_json: bool, trackers) -> None:
    """``--all``: every study in turn, one table, ``OUT/index.html``."""
    from normlab.studies import registry
    from normlab.studies.suite import run_all, suite_table, write_index

    rows = run_all(
        registry.list_studies(), out=out, scale=scale, seeds=seeds, device=device, store=store,
        executor=executor, progress=lambda message: err.print(f"[dim]{message}[/dim]"), trackers=trackers,
    )
    files = write_index(out, rows, scale=scale, seeds=seeds)
    if as_json:
        rows_json = [r.to_dict() for r in rows]
        print_json({"scale": scale, "seeds": seeds, "index": str(files.html), "rows": rows_json})
        return
    _print_markdown(console, suite_table(rows).to_markdown())
    console.print(f"index: {files.html}")


def report(
    path: Annotated[Path, typer.Argument(
        help="A study output folder (with outcome.json), a folder of them (index.html), or a store file."
    )],
    out: Annotated[Path | None, typer.Option(help="Where a store report goes (default: beside).")] = None,
    quiet: Annotated[bool, typer.Option(help="Do not print the Markdown summary.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON only (report paths).")] = False,
) -> None:
    """Render report.html + report.md from a study output folder or a results store, and print the summary."""
    from rich.console import Console

    from normlab.reports.store_report import store_report
    from normlab.studies.runner import render_study_folder

    if not path.exists():
        raise NormlabError(f"report path {path} does not exist; give a study output folder or a store file")
    if out is not None:
        check_folder_target(out, "--out")
    if path.is_dir() and not (path / "outcome.json").is_file() and any(path.glob("*/outcome.json")):
        from normlab.studies.suite import index_from_folder

        files = index_from_folder(path)
    elif path.is_dir():
        files = render_study_folder(path)
    else:
        from normlab.store import Store

        target = out if out is not None else path.parent / f"{path.stem}-report"
        files = store_report(Store(path, readonly=True), target)
    if json_output:
        paths = {"report": str(files.html), "markdown": str(files.markdown)}
        print_json({**paths, "summary": files.markdown_text})
        return
    console = Console()
    if not quiet:
        _print_markdown(console, files.markdown_text)
    console.print(f"report: {files.html}")


def _print_markdown(console, text: str) -> None:
    from rich.markdown import Markdown

    console.print(Markdown(text))
