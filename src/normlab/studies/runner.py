"""Run a study end to end: load the recipe, train through the store, write the report.

Output layout, for ``out="normlab-results"`` and study ``regularization``::

    normlab-results/regularization/report.html   self-contained (figures inlined)
    normlab-results/regularization/report.md     Markdown summary
    normlab-results/regularization/*.png         the figures
    normlab-results/regularization/outcome.json  tables, verdict, raw data, config and environment
                                                 (re-rendered by ``normlab report <that folder>``)

The runs go to ``store`` (default ``<out>/<name>/runs.sqlite``); rerunning an interrupted study reads
the finished runs back and trains only the rest.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from normlab.errors import NormlabError
from normlab.files import atomic_write
from normlab.reports.document import ReportFiles, Section, write_report
from normlab.studies.base import SCALES, Study, StudyContext, StudyOutcome
from normlab.studies.outcome_file import read_outcome_file
from normlab.studies.overrides import apply_overrides, override_flags
from normlab.studies.recipe import check_margin, validate_params
from normlab.studies.registry import get_study

OUTCOME_FILE = "outcome.json"


def run_study(
    name: str | Path,
    *,
    scale: str = "quick",
    seeds: int = 3,
    device: str = "cpu",
    out: str | Path = "normlab-results",
    store: Any = None,
    executor: Any = None,
    trackers: Sequence[Any] = (),
    progress: Callable[[str], None] | None = None,
    model: Any = None,
    model_options: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    dataset: str | None = None,
    data_root: str | None = None,
    margin: float | None = None,
) -> tuple[StudyOutcome, ReportFiles]:
    """Run study ``name`` (a built-in name or a recipe path) and write its report under ``<out>/<name>``.

    Args:
        scale: ``tiny`` (tests), ``quick`` (CPU minutes) or ``paper`` (the paper's settings).
        seeds: number of seeds (0 ... seeds-1) every configuration is repeated with.
        trackers: experiment trackers (:mod:`normlab.track`): every run of the study as it completes,
            grouped under a session ``study-<name>-<time>``, then the study's settings, verdict and report.
        store: a :class:`normlab.store.Store`, a path to one, or None for ``<out>/<name>/runs.sqlite``.
        model: your model (a factory returning an ``nn.Module``, or a ``module:factory`` / ``file.py:factory``
            spec) in place of the recipe's in every training run; studies that sweep their own
            architectures (mean-shift, residual, cost) refuse it. ``model_options`` go to the factory, and
            the recipe's ``width`` / ``depth`` only where its signature takes them.
        dataset: a dataset in place of the recipe's in every run (``train --dataset`` syntax), with
            ``data_root``. The report's subtitle, configuration and ``outcome.json`` name model and data.
        overrides: fields of the scale table to change (dotted path -> value, ``--set``; see
            :mod:`normlab.studies.overrides`), e.g. ``{"steps": 6000}`` for a longer budget.
        margin: the equivalence margin of every verdict, in the recipe's ``margin_unit`` (``--margin``);
            None: the recipe's ``margin``. outcome.json and the report state the margin used.

    Raises:
        NormlabError: unknown study or scale, ``seeds < 1``, an output folder that is a file, a bad recipe,
            an override of a field the scale table does not have or of another type, a margin that is
            not a positive number; every run of the study failed (the first run's error, in one line).
    """
    if scale not in SCALES:
        raise NormlabError(f"unknown scale {scale!r}; valid scales: {', '.join(SCALES)}")
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise NormlabError(f"seeds must be a positive int, got {seeds!r}")
    from normlab.sweep.compare import check_seeds

    check_seeds(seeds, "seeds")
    if margin is not None:
        margin = check_margin(margin)
    study = get_study(name)
    if overrides:
        study = overridden(study, scale, overrides)
    out_dir = prepare_out_dir(Path(out), study.name)
    from normlab.store import Store

    if store is None or isinstance(store, (str, Path)):
        store = Store(Path(store) if store is not None else out_dir / "runs.sqlite")
    tracking = None
    if trackers:
        from normlab.track import SweepLog, session_name

        tracking = SweepLog(trackers, store, session_name("study", study.name))
    ctx = StudyContext(
        study=study,
        scale=scale,
        params=study.params(scale),
        seeds=list(range(seeds)),
        device=device,
        out_dir=out_dir,
        store=store,
        executor=executor,
        on_result=tracking.on_result if tracking is not None else None,
        progress=progress or (lambda message: None),
        model=model,
        model_options=model_options,
        overrides=dict(overrides or {}),
        dataset=dataset,
        data_root=data_root,
        margin=study.margin if margin is None else margin,
    )
    start = time.perf_counter()
    outcome = study.load_module().run(ctx)
    if not isinstance(outcome, StudyOutcome):
        raise NormlabError(
            f"study module {study.module_name}.run returned {type(outcome).__name__}, "
            "expected StudyOutcome"
        )
    failed = [r for r in ctx.results if getattr(r, "status", None) == "failed"]
    if ctx.results and len(failed) == len(ctx.results):
        first = (failed[0].error or "no error recorded").strip().splitlines()
        raise NormlabError(f"every run of study {study.name} failed ({len(failed)} runs); the first: "
                           f"{first[-1] if first else ''}")
    wall = time.perf_counter() - start
    meta = study_meta(study, ctx, wall)
    meta["margin_source"] = "recipe" if margin is None else "--margin"
    atomic_write(out_dir / OUTCOME_FILE,
                 json.dumps({"meta": meta, "outcome": outcome.to_dict()}, indent=1, default=_json_default))
    files = write_study_report(out_dir, meta, outcome)
    if tracking is not None:
        settings = {k: meta[k] for k in ("name", "scale", "seeds", "device", "params", "overrides")}
        verdicts = [outcome.verdict, *(text for text in (outcome.key_figures, outcome.discrepancy) if text)]
        tracking.summary(f"study {study.name}", settings, verdicts, out_dir)
    return outcome, files


def overridden(study: Study, scale: str, overrides: dict[str, Any]) -> Study:
    """``study`` with ``overrides`` set in its ``scale`` table, checked against the module's ``PARAMS``."""
    params = apply_overrides(study.params(scale), overrides, f"scale.{scale} of recipe {study.name}")
    study = dataclasses.replace(study, scales={**study.scales, scale: params})
    spec = getattr(study.load_module(), "PARAMS", None)
    if spec:
        validate_params(study, spec)
    return study


def prepare_out_dir(out: Path, name: str) -> Path:
    """Create ``<out>/<name>``; NormlabError if ``out`` or ``<out>/<name>`` exists and is a file."""
    for path in (out, out / name):
        if path.exists() and not path.is_dir():
            raise NormlabError(f"output folder {path} exists and is a file; give a folder path with --out")
    (out / name).mkdir(parents=True, exist_ok=True)
    return out / name


def study_meta(study: Study, ctx: StudyContext, wall_time: float) -> dict[str, Any]:
    """The recipe, scale parameters and environment recorded beside a study's outcome."""
    from normlab.store.environment import environment_info

    return {
        "name": study.name,
        "title": study.title,
        "claim": study.claim,
        "paper": study.paper,
        "scale": ctx.scale,
        "seeds": ctx.seeds,
        "device": ctx.device,
        "params": ctx.params,
        "overrides": ctx.overrides,
        "model": _model_name(ctx.model),
        "model_options": ctx.model_options,
        "dataset": ctx.dataset,
        "margin": ctx.margin,
        "margin_unit": study.margin_unit,
        "store": str(getattr(ctx.store, "path", ctx.store)),
        "wall_time_s": round(wall_time, 2),
        "environment": environment_info(ctx.device),
    }


def write_study_report(out_dir: Path, meta: dict[str, Any], outcome: StudyOutcome) -> ReportFiles:
    """Render ``outcome`` into ``<out_dir>/report.html`` + ``report.md``."""
    if outcome.agrees_with_paper is None:
        kind, agreement = "info", "Inconclusive against the paper at this scale"
    elif outcome.agrees_with_paper:
        kind, agreement = "ok", "Agrees with the paper"
    else:
        kind, agreement = "warn", "Disagrees with the paper"
    # Summary first: the verdict and the result tables, then the figures, then the claim in words.
    margin_text = []
    if "margin" in meta:  # outcome.json written before margins existed has none
        source = "set by --margin" if meta.get("margin_source") == "--margin" else "the recipe's"
        margin_text.append(f"Margin: ±{meta['margin']:.4g} ({meta.get('margin_unit', '')}; {source}): "
                           "every difference is read against it (science.md section 8).")
    sections = [Section("Summary", text=margin_text, tables=outcome.tables,
                        callout=f"{agreement}. {outcome.verdict}", callout_kind=kind)]
    if outcome.figures:
        sections.append(Section("Figures", figures=outcome.figures))
    reading = [f"Paper's claim ({meta['paper']}): {meta['claim']}"]
    if outcome.key_figures:
        reading.append(f"Key figures: {outcome.key_figures}")
    if outcome.discrepancy:
        reading.append(f"Discrepancy: {outcome.discrepancy}")
    sections.append(Section("The claim", text=reading))
    run_info = {k: meta[k] for k in ("scale", "seeds", "device", "store", "wall_time_s")}
    flags = override_flags(meta.get("overrides") or {})
    changed = f", changed by {flags}" if flags else ""
    user = user_flags(meta)
    on = ", on " + " and ".join(
        f"{what} {meta[key]!r}" for what, key in (("your model", "model"), ("your data", "dataset"))
        if meta.get(key)) if user else ""
    sections += [
        Section("Configuration", text=[f"Scale {meta['scale']!r} of recipe {meta['name']!r}{on}{changed}."],
                data={**run_info, **{k: meta[k] for k in ("model", "dataset") if meta.get(k)},
                      "params": meta["params"]}),
        Section("Environment", data=meta["environment"]),
    ]
    subtitle = f"normlab study {meta['name']} --scale {meta['scale']} --seeds {len(meta['seeds'])}"
    subtitle += f" {user}" if user else ""
    subtitle += f" {flags}" if flags else ""
    subtitle += f" --margin {meta['margin']:g}" if meta.get("margin_source") == "--margin" else ""
    return write_report(out_dir, meta["title"], sections, subtitle=subtitle)


def user_flags(meta: dict[str, Any]) -> str:
    """``--model X --dataset Y`` of a study run on the user's model / data ("" for the recipe's)."""
    parts = [f"--{key} {meta[key]}" for key in ("model", "dataset") if meta.get(key)]
    return " ".join(parts)


def _model_name(model: Any) -> str | None:
    if model is None or isinstance(model, str):
        return model
    from normlab.external import spec_of

    try:
        return spec_of(model)
    except NormlabError:
        return getattr(model, "__qualname__", repr(model))


def render_study_folder(folder: str | Path) -> ReportFiles:
    """Re-render the report of a study output folder from its ``outcome.json``."""
    folder = Path(folder)
    file = folder / OUTCOME_FILE
    if not file.is_file():
        raise NormlabError(f"{folder} is not a study output folder: it has no {OUTCOME_FILE}")
    meta, outcome = read_outcome_file(file)
    return write_study_report(folder, meta, outcome)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
