"""How each framework spells batch normalization, and the mapping from normlab's one semantic config.

normlab's config (PyTorch's meaning, science.md section 1): ``momentum`` = weight of the new batch,
running variance updated with the unbiased batch variance ``var_B * m / (m - 1)``, channels-first.

Flax ``BatchNorm`` (science.md section 7, measured with flax 0.12.8): ``momentum`` is the decay of the
old value, so normlab's m maps to ``1 - m``; the running variance takes the *biased* batch variance, which
no parameter changes (a *convention difference*: after k training steps from running_var r0, the batch
part of the running variance ``r_k - w0 * r0`` is m/(m-1) times larger in PyTorch, w0 = prod(1 - momentum_i));
channels-last (``axis=-1``), so arrays are transposed. ONNX ``BatchNormalization`` is exported in inference
form (no running-statistics update). These tables are the adapters' *intended* mapping; ``probe`` measures
what the installed libraries actually do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Convention:
    """One framework's BN defaults and behaviours as its adapter assumes them."""

    framework: str
    eps_default: float
    momentum_meaning: str  # "new" (weight of the new batch) | "decay" (weight of the old value)
    momentum_default: float
    running_var: str  # "unbiased" | "biased" | "none" (no update)
    layout: str  # "channels_first" | "channels_last"
    training: bool  # can run training-mode normalization

    def to_dict(self) -> dict:
        return asdict(self)


NORMLAB = Convention("normlab", 1e-5, "new", 0.1, "unbiased", "channels_first", True)
TORCH = Convention("torch", 1e-5, "new", 0.1, "unbiased", "channels_first", True)
FLAX = Convention("flax", 1e-5, "decay", 0.99, "biased", "channels_last", True)
ONNX = Convention("onnxruntime", 1e-5, "decay", 0.9, "none", "channels_first", False)


def framework_momentum(momentum: float, convention: Convention) -> float:
    """normlab's momentum (weight of the new batch) in ``convention``'s meaning."""
    return momentum if convention.momentum_meaning == "new" else 1.0 - momentum


def old_weight(momentum: float | None, steps: int, start: int = 0) -> float:
    """Weight ``w0 = prod(1 - momentum_i)`` the initial running value keeps after ``steps`` updates."""
    w = 1.0
    for i in range(start + 1, start + steps + 1):
        w *= 1.0 - (1.0 / i if momentum is None else momentum)
    return w


@dataclass
class ConventionDifference:
    """A disagreement explained by convention, with its predicted and measured size."""

    what: str
    backends: tuple[str, str]
    values: tuple[str, str]
    expected: float
    measured: float
    note: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["backends"], d["values"] = list(self.backends), list(self.values)
        return d


def running_var_difference(
    names: tuple[str, str],
    conventions: tuple[Convention, Convention],
    running_vars: tuple[np.ndarray, np.ndarray],
    initial: np.ndarray,
    *,
    momentum: float | None,
    steps: int,
    count: int,
) -> ConventionDifference | None:
    """The biased-vs-unbiased running-variance difference between two training backends, if any.

    Expected: ``(r_k^a - w0 r0) / (r_k^b - w0 r0) = (m/(m-1))^(+1 or -1)`` (m = ``count`` values per channel
    per batch); measured: the channel mean of that ratio.
    """
    a, b = conventions
    if a.running_var == b.running_var or "none" in (a.running_var, b.running_var) or steps == 0:
        return None
    w0 = old_weight(momentum, steps)
    base = w0 * np.asarray(initial, np.float64)
    ratio = (np.asarray(running_vars[0], np.float64) - base) / (
        np.asarray(running_vars[1], np.float64) - base
    )
    correction = count / (count - 1)
    expected = correction if a.running_var == "unbiased" else 1.0 / correction
    return ConventionDifference(
        what="running_var",
        backends=names,
        values=(a.running_var, b.running_var),
        expected=expected,
        measured=float(np.mean(ratio)),
        note=(
            f"batch contribution to running_var is the {a.running_var} variance in {names[0]} and the "
            f"{b.running_var} one in {names[1]}: ratio m/(m-1) = {correction:.6g} with m = {count} "
            f"(after {steps} step(s), running_var differs by up to "
            f"{float(np.max(np.abs(running_vars[0] - running_vars[1]))):.3g})"
        ),
    )
