"""Helpers every CLI module shares: the store options, JSON and table output, list parsing."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import typer

from normlab.errors import NormlabError
from normlab.text import safe_text

#: Version of the JSON that ``--json`` prints (docs/json.md): an object carries ``"schema": JSON_SCHEMA``.
#: Raise it when a field is renamed or removed or changes meaning; adding a field keeps it.
JSON_SCHEMA = 1

STORE_HELP = "results store (SQLite file); default $NORMLAB_STORE or ./.normlab/results.sqlite"


def print_json(value: Any) -> None:
    """``value`` as strict JSON (NaN/inf -> null); an object gets ``"schema": JSON_SCHEMA`` first."""
    from normlab.store.export import json_safe

    if isinstance(value, dict):
        value = {"schema": JSON_SCHEMA, **value}
    typer.echo(json.dumps(json_safe(value), indent=2, allow_nan=False))


def console():
    from rich.console import Console

    # Piped output has no terminal width; rich's 80-column default would truncate the run tables.
    return Console() if sys.stdout.isatty() else Console(width=160)


def open_store(path: str | None):
    from normlab.store import Store

    return Store(path)


def existing_store(path: str | None):
    """The store for read-only commands: a missing file is an error, not a new empty store."""
    from normlab.store import default_store_path

    file = Path(path) if path is not None else default_store_path()
    if not file.exists():
        raise NormlabError(f"no results store at {str(file)!r}; train something first or pass --store")
    from normlab.store import Store

    # Read-only: a reading command never writes, never turns a stray file into a store, and works on a
    # store it may not write (a read-only file system, someone else's file).
    return Store(str(file), readonly=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: ``-`` for None/NaN, ``digits`` significant digits for floats, markup escaped and
    control characters shown as escapes (see :func:`safe_text`)."""
    from rich.markup import escape

    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}g}"
    return escape(safe_text(str(value)))


def csv_list(text: str, kind: type, what: str) -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise NormlabError(f"{what} is empty; give a comma-separated list, e.g. {what}=16,128")
    try:
        return [kind(item) for item in items]
    except ValueError:
        raise NormlabError(f"{what}={text!r} must be a comma-separated list of {kind.__name__}s") from None


def check_norms(norms: list[str]) -> None:
    from normlab.layers import list_norms

    valid = [*list_norms(), "nf"]
    unknown = [n for n in norms if n not in valid]
    if unknown:
        raise NormlabError(f"unknown norm(s) {', '.join(unknown)}; valid norms: {', '.join(valid)}")


def refuse_model_code_from(source: str, values: dict[str, Any], given_model: str | None) -> None:
    """A config read from ``source`` (a file: config, checkpoint, recipe) may name a registered model, but
    never user code to import: a model spec (``module:factory`` / ``file.py:factory``) in it is refused
    unless the same spec was given as ``--model`` on the command line (docs/external.md)."""
    from normlab.external import is_model_spec

    named = values.get("model")
    if is_model_spec(named) and named != given_model:
        raise NormlabError(
            f"{source} names model code {named!r}; normlab imports user code only when it is given on the "
            f"command line: add --model {named}"
        )


def refuse_paths_from(source: str, values: dict[str, Any], given: dict[str, Any]) -> None:
    """A config read from ``source`` (a config file, a checkpoint) does not choose where normlab writes
    (``checkpoint_dir``) or which data it reads (``data_root``, a ``npz:FILE`` dataset): such a field is
    refused unless the command line (``given``) sets the same value (issue 29)."""
    from normlab.data.npz import is_npz

    for field, flag in (("checkpoint_dir", "--checkpoint-dir"), ("data_root", "--data-root"),
                        ("dataset", "--dataset")):
        named = values.get(field)
        if named is None or (field == "dataset" and not is_npz(named)) or given.get(field) == named:
            continue
        raise NormlabError(
            f"{source} sets {field} {named!r}; normlab reads and writes only where the command line says: "
            f"add {flag} {named}"
        )


# -- checks before anything trains or is stored ----------------------------------------------------------

FORCE_HELP = "run even when the memory/time estimate says it will not fit"
MAX_THREADS = 1024  # beyond this, torch's thread pool creation crashes the process


def check_threads(threads: int | None, option: str = "--threads") -> None:
    """``threads`` (None = torch's default) must be in 1..min(1024, 4 x cores)."""
    if threads is None:
        return
    from normlab.sweep.executors import available_cores

    limit = min(MAX_THREADS, 4 * available_cores())
    if not 1 <= threads <= limit:
        raise NormlabError(
            f"{option} must be between 1 and {limit} (4 x the {available_cores()} cores here), got {threads}"
        )


def check_device(name: str):
    """The torch device ``name`` names, or a NormlabError listing the valid forms."""
    from normlab.train.build import resolve_device

    try:
        return resolve_device(name)
    except NormlabError as err:  # a valid name this machine lacks: say what is missing
        raise NormlabError(str(err).replace(f"device={name!r}", f"--device {name}")
                           .replace("use device='cpu' or 'auto'", "use --device cpu or auto")) from None
    except (RuntimeError, ValueError, TypeError):
        allowed = "cpu, cuda, cuda:N, mps, auto"
        raise NormlabError(f"--device {name!r} is not a device; allowed: {allowed}") from None


def check_folder_target(path: str | Path | None, option: str) -> None:
    """``path`` is a folder, or can be created as one, and is writable (checked before any work)."""
    if path is None:
        return
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NormlabError(f"{option} {str(folder)!r} exists and is a file; give a folder")
    _check_writable_ancestor(folder, option)


def check_file_target(path: str | Path | None, option: str) -> None:
    """``path`` can be written as a file: not a folder, its folder creatable and writable."""
    if path is None:
        return
    file = Path(path)
    if file.is_dir():
        raise NormlabError(f"{option} {str(file)!r} is a folder; give a file path")
    if file.exists():
        if not os.access(file, os.W_OK):
            raise NormlabError(f"{option} {str(file)!r} is not writable (read-only file or file system)")
        return
    _check_writable_ancestor(file.parent, option, target=file)


def _check_writable_ancestor(folder: Path, option: str, target: Path | None = None) -> None:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    shown = str(target if target is not None else folder)
    if not probe.is_dir():
        raise NormlabError(f"{option} {shown!r} cannot be created: {str(probe)!r} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise NormlabError(f"{option} {shown!r} cannot be written: {str(probe)!r} is read-only")


def check_store_target(path: str | None) -> None:
    """The store a command will write: a writable file path (default: $NORMLAB_STORE or ./.normlab/)."""
    from normlab.store import default_store_path

    check_file_target(path if path is not None else default_store_path(), "--store")


PROBE_SIZE_OPTIONS = ("num_points", "max_iter", "top_k", "trace_samples", "num_examples", "units_per_layer",
                      "batch_size", "iterations", "runs")  # fmt: skip
PROBE_MAX_S = 86400.0


def check_probe_budget(name: str, options: dict, config, data, *, force: bool = False) -> None:
    """Refuse probe ``options`` whose sizes multiply to more than a day of forward/backward passes."""
    from normlab.train.estimate import FLOPS_PER_S, estimate_cost

    sizes = {k: v for k, v in options.items() if k in PROBE_SIZE_OPTIONS}
    for key, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise NormlabError(f"--options {key} must be a positive int, got {value!r}")
    if force or not sizes:
        return
    units = math.prod(sizes.values())
    step_flops = estimate_cost(config.replace(steps=1), data).flops
    if step_flops is None:
        return
    device = check_device(config.device).type
    seconds = units * step_flops / FLOPS_PER_S.get(device, FLOPS_PER_S["cpu"])
    if seconds > PROBE_MAX_S:
        shown = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise NormlabError(
            f"probe {name} with {shown} would take about {seconds / 3600:.3g} hours (at least {units:.3g} "
            f"forward/backward passes of {step_flops:.2g} FLOPs); reduce them or pass --force"
        )


def preflight(config, *, force: bool = False, data=None):
    """Check one run of ``config`` before it trains: device, lr, augmentation against the data's shape,
    checkpoint folder, and the memory/time estimate (skipped with ``force``). Returns the loaded data."""
    from normlab.train.build import load_data
    from normlab.train.estimate import MAX_DEPTH, check_fits, finite_lr

    device = check_device(config.device)
    finite_lr(config.lr)
    check_folder_target(config.checkpoint_dir, "--checkpoint-dir")
    data = load_data(config) if data is None else data
    if config.batch_size > len(data.x_train):
        raise NormlabError(
            f"batch size {config.batch_size} exceeds the {len(data.x_train)} training examples of "
            f"{config.dataset}; use a batch size up to {len(data.x_train)}"
        )
    if config.augment is not None:
        import torch

        from normlab.data.augment import get_augmentation

        get_augmentation(config.augment)(data.x_train[:2], torch.Generator().manual_seed(0))
    if not force:
        check_fits(config, data, device)
    elif config.depth is not None and config.depth > 100 * MAX_DEPTH:
        raise NormlabError(f"depth={config.depth} is beyond what even --force builds ({100 * MAX_DEPTH})")
    return data
