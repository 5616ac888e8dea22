"""The study contract: a loaded recipe (:class:`Study`), what a study module gets (:class:`StudyContext`)
and what it returns (:class:`StudyOutcome`).

A study module exposes ``run(ctx: StudyContext) -> StudyOutcome``. It reads its grid from ``ctx.params``
(the recipe's ``[scale.<scale>]`` table), trains through :meth:`StudyContext.train_grid` (a resumable
:mod:`normlab.sweep` over ``ctx.store``: rerunning an interrupted study skips finished runs), saves figures
with :meth:`StudyContext.save_figure`, and summarises in :class:`Table` s whose cells are
``(mean, half_width)`` from :func:`mean_ci` over ``ctx.seeds``. The verdict sentence is formatted from the
table's values, and ``agrees_with_paper`` / ``discrepancy`` say whether the numbers agree with the claim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normlab.errors import NormlabError
from normlab.reports.figure import Figure, save_matplotlib
from normlab.reports.stats import mean_ci, t_quantile_975
from normlab.reports.table import Table
from normlab.stats import DEFAULT_MARGIN

__all__ = [
    "SCALES",
    "Figure",
    "Study",
    "StudyContext",
    "StudyOutcome",
    "Table",
    "mean_ci",
    "t_quantile_975",
]

SCALES = ("tiny", "quick", "paper")


@dataclass(frozen=True)
class Study:
    """A loaded, validated recipe ``src/normlab/studies/recipes/<name>.toml``.

    ``scales`` maps each of ``tiny`` / ``quick`` / ``paper`` to its parameter table. ``margin`` is the
    equivalence margin every verdict of the study reads its differences against (science.md section 8), in
    ``margin_unit`` (a fraction of accuracy by default; a log ratio for timings and other ratios).
    """

    name: str
    title: str
    claim: str
    paper: str
    module: str
    scales: dict[str, dict[str, Any]]
    path: Path | None = None
    margin: float = DEFAULT_MARGIN
    margin_unit: str = "accuracy (0.01 = 1 point)"

    def params(self, scale: str) -> dict[str, Any]:
        """The ``[scale.<scale>]`` table (a copy)."""
        if scale not in self.scales:
            raise NormlabError(
                f"study {self.name!r} has no scale {scale!r}; valid scales: {', '.join(self.scales)}"
            )
        return dict(self.scales[scale])

    @property
    def module_name(self) -> str:
        """``normlab.studies.<module>`` for a built-in study, ``plugin:<name>`` for a plugin."""
        if self.module.startswith(PLUGIN_PREFIX):
            return self.module
        return f"normlab.studies.{self.module}"

    def load_module(self) -> Any:
        """Import the study's module; it must define ``run(ctx) -> StudyOutcome``.

        A recipe is untrusted (it may come from a shared folder), so ``module`` names either a built-in
        study, ``"<name>"`` for ``normlab/studies/<name>.py``, or ``"plugin:<name>"`` for an installed
        plugin: an entry point ``<name>`` in the group ``normlab.studies`` of an installed package's
        metadata (``[project.entry-points."normlab.studies"] my_study = "my_pkg.my_study"``). Nothing
        else on ``sys.path`` (the recipe's own folder, the working directory) is ever imported.
        """
        import importlib

        if self.module.startswith(PLUGIN_PREFIX):
            module = _load_plugin(self.module[len(PLUGIN_PREFIX) :], self.path or self.name)
        else:
            name = _builtin_study_module(self.module, self.path or self.name)
            module = importlib.import_module(name)
        if not callable(getattr(module, "run", None)):
            raise NormlabError(f"study module {self.module_name} has no run(ctx) function")
        return module


@dataclass
class StudyOutcome:
    """What a study returns: tables, figures, the verdict sentence and the raw data behind them.

    ``verdict`` is one sentence whose numbers come from ``tables``; ``agrees_with_paper`` is None when the
    study cannot decide (inconclusive: an arm did not converge, too few seeds, or the seeds' spread does
    not separate the arms the claim ranks); ``discrepancy`` explains a disagreement and is shown in the
    report. ``key_figures`` is one line of the deciding numbers with their 95% CIs (the ``--all`` table
    and the index report show it). ``data`` holds JSON-ready raw values (per-seed numbers, curves).
    """

    tables: list[Table]
    figures: list[Figure]
    verdict: str
    agrees_with_paper: bool | None = None
    discrepancy: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    key_figures: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "tables": [t.to_dict() for t in self.tables],
            "figures": [f.to_dict() for f in self.figures],
            "verdict": self.verdict,
            "agrees_with_paper": self.agrees_with_paper,
            "discrepancy": self.discrepancy,
            "data": self.data,
            "key_figures": self.key_figures,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyOutcome:
        return cls(
            tables=[Table.from_dict(t) for t in data["tables"]],
            figures=[Figure.from_dict(f) for f in data["figures"]],
            verdict=data["verdict"],
            agrees_with_paper=data.get("agrees_with_paper"),
            discrepancy=data.get("discrepancy"),
            data=data.get("data", {}),
            key_figures=data.get("key_figures", ""),
        )


@dataclass
class StudyContext:
    """Everything a study's ``run`` needs.

    Attributes:
        study: the loaded recipe.
        scale: ``"tiny"``, ``"quick"`` or ``"paper"``.
        params: the recipe's ``[scale.<scale>]`` table.
        seeds: the seeds to repeat every configuration with (``range(n)`` for ``--seeds n``).
        device: torch device string for training (``"cpu"``, ``"cuda"``...).
        out_dir: this study's output folder ``<out>/<name>`` (figures are saved here).
        store: the :class:`normlab.store.Store` every run is recorded in (resumable).
        executor: a :class:`normlab.sweep.Executor` or None for the sweep's default (local).
        on_result: ``on_result(config, result)`` as each run of :meth:`train_grid` completes (the
            experiment trackers, :class:`normlab.track.SweepLog`); None: nothing.
        progress: ``progress(message)``, a one-line status reporter (the CLI prints it).
        model: a user model (a factory, or a ``module:factory`` / ``file.py:factory`` spec) that replaces
            the recipe's model in every training run (:class:`normlab.train.TrainConfig` ``model``); None:
            the recipe's. ``model_options`` go to its factory, and of the recipe's ``width`` / ``depth``
            only those its signature takes (a named parameter or ``**kwargs``).
        dataset: a dataset (``train --dataset`` syntax: ``npz:FILE``, ``imagefolder``, a registered name)
            in place of the recipe's in every run; ``data_root`` its folder.
        results: every RunResult :meth:`train_grid` returned, in order (the runner checks that not all
            failed).
        overrides: the fields of ``params`` changed from the recipe's (``--set``; dotted path -> value),
            already applied to ``params``; recorded so the report says what was changed.
        margin: the equivalence margin of every verdict (the recipe's ``margin``, or ``--margin``), in the
            recipe's ``margin_unit``; pass it as ``margin=`` to every :mod:`normlab.studies._verdict` call.
    """

    study: Study
    scale: str
    params: dict[str, Any]
    seeds: list[int]
    device: str
    out_dir: Path
    store: Any
    executor: Any = None
    on_result: Callable[[Any, Any], None] | None = None
    progress: Callable[[str], None] = field(default=lambda message: None)
    model: Any = None
    model_options: dict[str, Any] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    data_root: str | None = None
    results: list[Any] = field(default_factory=list)
    margin: float = DEFAULT_MARGIN

    def param(self, name: str, kind: type | tuple[type, ...] | None = None) -> Any:
        """``params[name]``, or a NormlabError naming the recipe, scale and field when it is missing/wrong."""
        where = f"{self.study.path or self.study.name} [scale.{self.scale}]"
        if name not in self.params:
            raise NormlabError(f"{where}: missing field {name!r}")
        value = self.params[name]
        kinds = _tuple(kind) if kind is not None else ()
        # bool is an int subclass: True must not pass where an int is expected.
        if kinds and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            names = " or ".join(k.__name__ for k in kinds)
            raise NormlabError(
                f"{where}: field {name!r} must be {names}, got {type(value).__name__} {value!r}"
            )
        return value

    def config(self, **fields: Any) -> Any:
        """A :class:`normlab.train.TrainConfig` of ``fields``, with ``device`` defaulting to this context's
        device and ``group`` to ``study/<name>`` (the group is a label, not part of the run's key)."""
        from normlab.train import TrainConfig

        fields.setdefault("device", self.device)
        fields.setdefault("group", f"study/{self.study.name}")
        if self.model is not None:  # the user's model in place of the recipe's, in every run
            from normlab.external import takes_option

            fields["model"] = self.model
            fields["model_options"] = dict(self.model_options or {})
            for name in ("width", "depth"):  # the recipe's knobs, only where the factory has them
                if fields.get(name) is not None and not takes_option(self.model, name):
                    fields.pop(name)
        if self.dataset is not None:  # the user's data in place of the recipe's
            fields["dataset"] = self.dataset
            fields["data_root"] = self.data_root
        return TrainConfig(**fields)

    def builtin_models_only(self, why: str) -> None:
        """Refuse a user model for a study that builds its own architectures (``why`` says what it sweeps)."""
        if self.model is not None:
            raise NormlabError(f"study {self.study.name} {why}; it does not take a user model (--model)")

    def train_grid(
        self, configs: Sequence[Any], callbacks_factory: Callable[..., list] | None = None
    ) -> list[Any]:
        """Train ``configs`` via :func:`normlab.sweep.run_sweep` on ``self.store``; results in input order.

        Finished runs (same config key) are read back from the store instead of retrained, so an interrupted
        study resumes where it stopped. Failed and diverged runs come back with their status set; they do
        not stop the grid. ``callbacks_factory`` must be a picklable module-level function (the process
        pool calls it in the worker) returning the run's callbacks, e.g. ``[ProbeSchedule(...)]``.
        """
        from normlab.sweep import run_sweep

        configs = list(configs)
        self.progress(f"{self.study.name}: {len(configs)} runs")
        results = list(
            run_sweep(
                configs,
                store=self.store,
                executor=self.executor,
                on_result=self.on_result,
                callbacks_factory=callbacks_factory,
            )
        )
        self.results.extend(results)
        return results

    def save_figure(self, fig: Any, name: str, caption: str) -> Figure:
        """Save matplotlib ``fig`` as ``<out_dir>/<name>.png``, close it, and return the :class:`Figure`."""
        return save_matplotlib(fig, self.out_dir, name, caption)

    def metrics(self, run_id: Any, name: str) -> list[tuple[int, float]]:
        """The ``(step, value)`` series of metric ``name`` for run ``run_id`` (e.g. ``probe/ics/...``)."""
        return [(int(s), float(v)) for s, v in self.store.metrics(run_id, name)]


PLUGIN_PREFIX = "plugin:"
PLUGIN_GROUP = "normlab.studies"


def _builtin_study_module(module: str, source: Any) -> str:
    """``normlab.studies.<module>`` after checking it is a plain name whose file lies in this package."""
    import importlib.util

    if not module.isidentifier():
        raise NormlabError(
            f"recipe {source}: module {module!r} must be the name of a built-in study module "
            f"(normlab/studies/<name>.py) or {PLUGIN_PREFIX}<entry point> of the {PLUGIN_GROUP!r} group"
        )
    name = f"normlab.studies.{module}"
    spec = importlib.util.find_spec(name)
    package_dir = Path(__file__).resolve().parent
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    if origin is None or origin.parent != package_dir:
        raise NormlabError(f"recipe {source}: {module!r} is not a built-in study module of normlab.studies")
    return name


def _load_plugin(name: str, source: Any) -> Any:
    """Load entry point ``name`` of the ``normlab.studies`` group (installed packages only)."""
    from importlib.metadata import entry_points

    # A package "installed" by a .dist-info folder lying in the working directory or beside the recipe
    # (``python -m`` puts the working directory on sys.path) would be a shared folder naming its own code.
    untrusted = {Path.cwd().resolve()}
    if isinstance(source, Path):
        untrusted.add(source.resolve().parent)
    found = [
        ep for ep in entry_points(group=PLUGIN_GROUP)
        if ep.name == name and _dist_folder(ep) not in untrusted
    ]
    if not found:
        installed = sorted(ep.name for ep in entry_points(group=PLUGIN_GROUP))
        raise NormlabError(
            f"recipe {source}: no installed study plugin {name!r} in entry-point group {PLUGIN_GROUP!r}; "
            f"installed: {', '.join(installed) or 'none'}"
        )
    return found[0].load()


def _dist_folder(entry_point: Any) -> Path | None:
    """The folder holding the entry point's ``.dist-info`` (None when it cannot be told)."""
    located = getattr(getattr(entry_point, "dist", None), "_path", None)
    return Path(located).resolve().parent if located is not None else None


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)
