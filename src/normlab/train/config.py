"""``TrainConfig``: one training run as plain values (TOML-loadable), validated on construction.

Defaults train the 1-D ``cnn`` with BatchNorm on MNIST-1D for 10 epochs with SGD + momentum and a cosine
schedule, on the CPU in a few seconds. Every field is a plain value (str, int, float, bool, None, list,
dict), so a config round-trips through TOML/JSON and hashes to a stable key (:meth:`TrainConfig.key`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normlab.errors import NormlabError
from normlab.files import refuse_special

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "step", "cosine")
BUDGETS = ("fixed", "auto")
DEVICE_PREFIXES = ("cpu", "cuda", "mps", "auto")
# Fields that say where or under which label a run is kept, not what it computes: left out of the key.
# Data options added later: in the key only when set, so stored runs keep their keys.
_IN_KEY_WHEN_SET = ("image_size", "test_fraction", "stop_below")
# ``compile`` changes how a step is computed, not its numbers (equal to float tolerance, tested).
_NOT_IN_KEY = ("name", "group", "checkpoint_dir", "checkpoint_every", "download", "data_root", "compile")


@dataclass
class TrainConfig:
    """One training run. Step counts are optimizer updates; ``steps`` (if set) overrides ``epochs``."""

    # model
    model: str = "cnn"
    norm: str = "bn"
    norm_options: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)
    width: int | float | None = None
    depth: int | None = None
    # data
    dataset: str = "mnist1d"
    data_root: str | None = None
    download: bool = False
    subset: int | float | None = None
    augment: str | None = None
    image_size: int | None = None
    test_fraction: float | None = None
    batch_size: int = 128
    # length: "fixed" trains steps (or epochs); "auto" trains until the plateau rule holds, steps (or epochs)
    # being the cap, under warmup-stable-decay with a cooldown of ``cooldown`` x the steps taken
    # (normlab.train.budget)
    epochs: int | None = 10
    steps: int | None = None
    budget: str = "fixed"
    cooldown: float = 0.2
    # auto budget only: end the run early (unconverged, "stopped below") at the first held-out evaluation
    # after the plateau rule's start where its best held-out accuracy is below this; compare's lr search
    # sets it for lr probes above a cell's best lr, which then need not train to their plateau
    # (normlab.train.budget, normlab.sweep.lr_search)
    stop_below: float | None = None
    # held out from the training data for the plateau rule and lr choices (normlab.train.validation)
    val_fraction: float = 0.0
    # optimizer
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    wd_exclude_norm_bias: bool = True
    agc_clip: float | None = None
    agc_eps: float = 1e-3
    # learning-rate schedule (after ``warmup_steps`` of linear warmup from 0)
    schedule: str = "cosine"
    warmup_steps: int = 0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    # run
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 0
    eval_batch_size: int = 1000
    eval_train_samples: int = 10_000
    divergence_bound: float = 1e4
    log_every: int = 10
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    name: str | None = None
    group: str | None = None
    # torch.compile the model's forward/backward; None: where it pays (normlab.train.compile.wants_compile)
    compile: bool | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_field(f.name, getattr(self, f.name)))
        if self.epochs is None and self.steps is None:
            raise NormlabError("set epochs or steps: both are None")
        if self.schedule == "step" and not self.milestones:
            raise NormlabError("schedule 'step' needs milestones (steps where the lr is multiplied by gamma)")
        if list(self.milestones) != sorted(self.milestones):
            raise NormlabError(f"milestones must be increasing, got {self.milestones!r}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise NormlabError("nesterov=True needs optimizer 'sgd' with momentum > 0")
        if self.stop_below is not None and self.budget != "auto":
            raise NormlabError(f"stop_below={self.stop_below} needs budget 'auto' (a fixed budget always "
                               "trains its steps)")
        if self.checkpoint_every and self.checkpoint_dir is None:
            raise NormlabError(f"checkpoint_every={self.checkpoint_every} needs a checkpoint_dir")

    # -- conversion ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain values (lists and dicts copied)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str | None = None) -> TrainConfig:
        """Build from a mapping; unknown keys raise a NormlabError listing the valid fields."""
        unknown = sorted(set(values) - set(field_names()))
        if unknown:
            where = f" in {source}" if source else ""
            raise NormlabError(
                f"unknown TrainConfig field(s) {', '.join(unknown)}{where}; "
                f"valid fields: {', '.join(field_names())}"
            )
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a TOML file whose top-level keys are TrainConfig fields (or a ``[train]`` table of them)."""
        values = read_toml(path)
        if set(values) == {"train"} and isinstance(values["train"], dict):
            values = values["train"]
        return cls.from_dict(values, source=str(path))

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with ``changes`` applied."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def key(self) -> str:
        """Hash of the fields that determine the result (not name/group/checkpoint/data location)."""
        from normlab.store import config_key

        return config_key(self.key_dict())

    def key_dict(self) -> dict[str, Any]:
        """The fields in the key, plus ``fingerprint`` of user code and data when the run uses them
        (:mod:`normlab.external.fingerprint`: the model spec's source file, the npz file's bytes, the image
        folder's file list with sizes and times), so a changed model or data set is trained again."""
        values = {k: v for k, v in self.to_dict().items() if k not in _NOT_IN_KEY}
        for name in _IN_KEY_WHEN_SET:  # unset, they leave the keys of earlier runs as they were
            if values[name] is None:
                del values[name]
        from normlab.external import data_fingerprint, is_model_spec, model_fingerprint

        fingerprint = {}
        if is_model_spec(self.model):
            fingerprint["model"] = model_fingerprint(self.model)
        data = data_fingerprint(self.dataset, self.data_root)
        if data is not None:
            fingerprint["data"] = data
        if fingerprint:
            values["fingerprint"] = fingerprint
        return values


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a TOML file; a missing, unreadable or malformed file raises NormlabError naming it."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    path = Path(path)
    refuse_special(path, "config file")
    try:
        with open(path, "rb") as stream:
            return tomllib.load(stream)
    except FileNotFoundError:
        raise NormlabError(f"config file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise NormlabError(f"config file {str(path)!r} is a folder") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise NormlabError(f"config file {str(path)!r} is not valid TOML: {exc}") from None


# -- validation: one rule per field -----------------------------------------------------------------

_INT, _FLOAT, _NUM, _STR, _BOOL = "int", "float", "number", "str", "bool"

# name -> (kind, nullable, lower bound, upper bound, allowed values); bounds are inclusive.
_RULES: dict[str, tuple[str, bool, float | None, float | None, tuple | None]] = {
    "model": (_STR, False, None, None, None),
    "norm": (_STR, False, None, None, None),
    "width": (_NUM, True, 1e-12, None, None),
    "depth": (_INT, True, 1, None, None),
    "dataset": (_STR, False, None, None, None),
    "data_root": (_STR, True, None, None, None),
    "download": (_BOOL, False, None, None, None),
    "subset": (_NUM, True, 1e-12, None, None),
    "augment": (_STR, True, None, None, None),
    "image_size": (_INT, True, 1, None, None),
    "test_fraction": (_FLOAT, True, 1e-12, 0.999999, None),
    "batch_size": (_INT, False, 1, None, None),
    "epochs": (_INT, True, 1, None, None),
    "steps": (_INT, True, 1, None, None),
    "budget": (_STR, False, None, None, BUDGETS),
    "cooldown": (_FLOAT, False, 0.0, 1.0, None),
    "stop_below": (_FLOAT, True, 0.0, 1.0, None),
    "val_fraction": (_FLOAT, False, 0.0, 0.9, None),
    "optimizer": (_STR, False, None, None, OPTIMIZERS),
    "lr": (_FLOAT, False, 0.0, None, None),
    "momentum": (_FLOAT, False, 0.0, 0.999999, None),
    "nesterov": (_BOOL, False, None, None, None),
    "weight_decay": (_FLOAT, False, 0.0, None, None),
    "wd_exclude_norm_bias": (_BOOL, False, None, None, None),
    "agc_clip": (_FLOAT, True, 1e-12, None, None),
    "agc_eps": (_FLOAT, False, 0.0, None, None),
    "schedule": (_STR, False, None, None, SCHEDULES),
    "warmup_steps": (_INT, False, 0, None, None),
    "gamma": (_FLOAT, False, 1e-12, 1.0, None),
    "seed": (_INT, False, 0, 2**63 - 1, None),
    "device": (_STR, False, None, None, None),
    "eval_every": (_INT, False, 0, None, None),
    "eval_batch_size": (_INT, False, 1, None, None),
    "eval_train_samples": (_INT, False, 0, None, None),
    "divergence_bound": (_FLOAT, False, 1e-12, None, None),
    "log_every": (_INT, False, 0, None, None),
    "checkpoint_dir": (_STR, True, None, None, None),
    "checkpoint_every": (_INT, False, 0, None, None),
    "name": (_STR, True, None, None, None),
    "group": (_STR, True, None, None, None),
    "compile": (_BOOL, True, None, None, None),
}


def _check_field(name: str, value: Any) -> Any:
    if name in ("norm_options", "model_options"):
        if not isinstance(value, dict):
            raise NormlabError(f"{name} must be a table/dict of options, got {value!r}")
        return dict(value)
    if name == "model" and callable(value) and not isinstance(value, str):
        from normlab.external import spec_of

        return spec_of(value)  # a factory from Python: kept as the spec that loads it again (in workers too)
    if name == "milestones":
        if not isinstance(value, (list, tuple)) or not all(_is_int(v) and v > 0 for v in value):
            raise NormlabError(f"milestones must be a list of positive step numbers, got {value!r}")
        return list(value)
    kind, nullable, low, high, allowed = _RULES[name]
    if value is None:
        if nullable:
            return None
        raise NormlabError(f"{name} must not be None")
    value = _coerce(name, kind, value)
    if allowed is not None and value not in allowed:
        raise NormlabError(f"{name}={value!r} is not allowed; valid values: {', '.join(allowed)}")
    numeric = kind in (_INT, _FLOAT, _NUM)
    if numeric and ((low is not None and value < low) or (high is not None and value > high)):
        raise NormlabError(f"{name}={value!r} is out of range; allowed: {_range_text(kind, low, high)}")
    if name == "device" and value.split(":")[0] not in DEVICE_PREFIXES:
        raise NormlabError(f"device={value!r} is not a device; allowed: cpu, cuda, cuda:N, mps, auto")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _coerce(name: str, kind: str, value: Any) -> Any:
    if kind == _INT and _is_int(value):
        return value
    if kind == _FLOAT and (_is_int(value) or isinstance(value, float)):
        if not math.isfinite(value):
            raise NormlabError(f"{name}={value!r} must be a finite number")
        return float(value)
    if kind == _NUM and (_is_int(value) or isinstance(value, float)) and math.isfinite(value):
        return value
    if kind == _STR and isinstance(value, str):
        return value
    if kind == _BOOL and isinstance(value, bool):
        return value
    article = "an" if kind == _INT else "a"
    raise NormlabError(f"{name} must be {article} {kind}, got {type(value).__name__} {value!r}")


def _range_text(kind: str, low: float | None, high: float | None) -> str:
    if kind != _INT and low is not None and 0 < low < 1e-9:
        low_text = "> 0"
    elif low is not None:
        low_text = f">= {low}"
    else:
        low_text = ""
    high_text = f"<= {high}" if high is not None else ""
    return " and ".join(t for t in (low_text, high_text) if t)
