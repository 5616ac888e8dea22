"""What a cross-check runs: one normalization layer's semantic config, and what a backend returns.

normlab's semantics are the reference every backend adapter translates from (see ``conventions``):
``momentum`` is the weight of the new batch (PyTorch's meaning), the running variance takes the unbiased
batch variance, and arrays are channels-first unless ``layout="channels_last"``.

A run is ``steps`` training-mode passes (each on its own batch; they update the running statistics) and
then one measured pass in ``mode`` on the measured batch. The result holds the measured output and, for
``bn``, the running statistics after all of it, so running statistics updated in eval mode are visible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from normlab.errors import NormlabError

KINDS = ("bn", "gn", "ln", "in")
MODES = ("train", "eval")
LAYOUTS = ("channels_first", "channels_last")


@dataclass(frozen=True)
class LayerSpec:
    """One normalization layer, in normlab's semantic config.

    kind: ``bn`` | ``gn`` | ``ln`` | ``in``; groups: GroupNorm groups (``gn`` only); eps; momentum: weight of
    the new batch in [0, 1] or None (cumulative average), ``bn`` only; affine: learnable gamma/beta;
    mode: ``train`` | ``eval`` for the measured pass; layout: how the given arrays are laid out;
    steps: training passes before the measured one.
    """

    kind: str = "bn"
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    mode: str = "train"
    layout: str = "channels_first"
    steps: int = 1
    groups: int = 2

    def __post_init__(self) -> None:
        _choice("kind", self.kind, KINDS)
        _choice("mode", self.mode, MODES)
        _choice("layout", self.layout, LAYOUTS)
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise NormlabError(f"eps must be > 0, got {self.eps!r}")
        if self.momentum is not None and not 0.0 <= self.momentum <= 1.0:
            raise NormlabError(f"momentum must be in [0, 1] or None, got {self.momentum!r}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise NormlabError(f"steps must be an int >= 0, got {self.steps!r}")
        if not isinstance(self.groups, int) or self.groups < 1:
            raise NormlabError(f"groups must be a positive int, got {self.groups!r}")

    def num_groups(self, channels: int) -> int:
        """Groups of the GroupNorm that ``gn``/``ln``/``in`` are (LN: 1, IN: C)."""
        groups = {"gn": self.groups, "ln": 1, "in": channels}[self.kind]
        if channels % groups:
            raise NormlabError(f"groups={groups} does not divide num_channels={channels}")
        return groups


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise NormlabError(f"unknown {name} {value!r}; valid: {', '.join(allowed)}")


@dataclass
class LayerParams:
    """The shared initial state every backend starts from (float32, per channel)."""

    weight: np.ndarray | None
    bias: np.ndarray | None
    running_mean: np.ndarray
    running_var: np.ndarray


@dataclass
class LayerRun:
    """A backend's answer for a layer: measured output (given layout) and, for ``bn``, running stats."""

    output: np.ndarray
    running_mean: np.ndarray | None = None
    running_var: np.ndarray | None = None
    seconds: float = 0.0


@dataclass
class ModelRun:
    """A backend's answer for a model: every layer's output by common layer name, in graph order."""

    outputs: dict[str, np.ndarray]
    final: str
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def to_channels_first(x: np.ndarray, layout: str) -> np.ndarray:
    """(N, *spatial, C) -> (N, C, *spatial) when ``layout`` is channels_last."""
    if layout == "channels_first" or x.ndim < 3:
        return x
    return np.moveaxis(x, -1, 1)


def from_channels_first(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "channels_first" or x.ndim < 3:
        return x
    return np.moveaxis(x, 1, -1)


def check_batches(batches: list[np.ndarray], spec: LayerSpec) -> None:
    """``steps`` training batches then the measured one, all of the same (N, C, ...) shape."""
    if len(batches) != spec.steps + 1:
        raise NormlabError(f"need steps + 1 = {spec.steps + 1} batches, got {len(batches)}")
    shapes = {tuple(b.shape) for b in batches}
    if len(shapes) != 1:
        raise NormlabError(f"mismatched shapes: batches have shapes {sorted(shapes)}; all must match")
    shape = batches[0].shape
    if len(shape) < 2 or len(shape) > 5:
        raise NormlabError(f"layer input must be (N, C) .. (N, C, D, H, W), got shape {list(shape)}")


def make_layer_inputs(
    spec: LayerSpec, shape: tuple[int, ...], *, seed: int = 0, scale: float = 2.0, shift: float = 0.5
) -> tuple[LayerParams, list[np.ndarray]]:
    """Random float32 parameters and ``steps + 1`` batches of ``shape`` (channels-first), reproducibly.

    Gamma ~ U(0.5, 1.5) and beta ~ N(0, 1) so that a gamma/beta swap changes the output; inputs are
    ``shift + scale * N(0, 1)`` so the running statistics move away from their (0, 1) initial values.
    """
    if len(shape) < 2 or any(not isinstance(s, int) or s < 1 for s in shape):
        raise NormlabError(f"shape must be (N, C, ...) of positive ints, got {shape!r}")
    rng = np.random.default_rng(seed)
    c = shape[1]
    params = LayerParams(
        weight=rng.uniform(0.5, 1.5, c).astype(np.float32) if spec.affine else None,
        bias=rng.normal(size=c).astype(np.float32) if spec.affine else None,
        running_mean=np.zeros(c, np.float32),
        running_var=np.ones(c, np.float32),
    )
    batches = [(shift + scale * rng.normal(size=shape)).astype(np.float32) for _ in range(spec.steps + 1)]
    return params, batches
