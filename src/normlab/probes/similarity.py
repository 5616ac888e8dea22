"""Similarity of different examples' activations and prediction collapse.

Without normalization, deep ReLU networks map different inputs to increasingly similar activations with
depth, up to predicting one class for every input at initialization (Brock, De & Smith 2021a, arXiv
2101.08692, Sec. 2 / 4: "rank collapse" and mean shift; De & Smith 2020). Per chosen layer, with A the
activations flattened to (N, D) and ``i != j`` over the N(N-1) ordered pairs::

    mean_inner  = mean_{i != j} <a_i, a_j>
    mean_cosine = mean_{i != j} <a_i, a_j> / (||a_i|| ||a_j||)

(the off-diagonal of the Gram matrix ``A A^T``; an all-zero row counts as cosine 0), and on the model output
``collapse`` = (number of examples predicted as the most-predicted class) / N, 1/num_classes for a balanced
network and 1 when every input gets the same prediction.

Default layers: stem and block outputs of a residual model (normlab.models.blocks), else the output of
every module with its own weight (conv/linear), in ``named_modules`` order.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.probes._hooks import captured, contract_blocks, probe_input
from normlab.probes._layers import require_layers, select_modules, weight_layers
from normlab.probes._result import ProbeResult
from normlab.probes._state import check_batch_for_mode, check_mode, preserved, set_mode


@dataclasses.dataclass
class ExampleSimilarity(ProbeResult):
    """Per layer ``mean_cosine`` / ``mean_inner``; ``collapse`` and ``top_class`` from the output logits."""

    mode: str
    input: str
    mean_cosine: dict[str, float]
    mean_inner: dict[str, float]
    collapse: float
    top_class: int


def gram_similarity(a: torch.Tensor) -> tuple[float, float]:
    """``(mean cosine, mean inner product)`` over the off-diagonal of the Gram matrix of (N, ...) ``a``."""
    flat = a.reshape(a.shape[0], -1).double()
    n = flat.shape[0]
    if n < 2:
        raise NormlabError(f"example similarity needs at least 2 examples, got {n}")
    gram = flat @ flat.T
    off = ~torch.eye(n, dtype=torch.bool, device=flat.device)
    norms = flat.norm(dim=1)
    denom = torch.outer(norms, norms)
    cos = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))
    return cos[off].mean().item(), gram[off].mean().item()


def default_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    blocks = contract_blocks(model)
    if blocks:
        return [("stem", model.stem), *blocks]
    layers = weight_layers(model)
    require_layers(layers, model, "layer with its own weight")
    return layers


def example_similarity(
    model: nn.Module,
    x: torch.Tensor | None = None,
    *,
    layers: list[str] | None = None,
    input_shape: tuple[int, ...] | None = None,
    batch_size: int = 16,
    mode: str = "train",
    seed: int = 0,
) -> ExampleSimilarity:
    """Mean pairwise cosine similarity / inner product of activations per layer, and prediction collapse,
    on ``x`` (N >= 2) or N(0, 1) input of ``input_shape`` (one forward pass, no gradient). ``layers``:
    module names (``dict(model.named_modules())`` keys); the output must be (N, num_classes) logits."""
    check_mode(mode)
    chosen = select_modules(model, layers, default_layers(model) if layers is None else [])
    x, source = probe_input(model, x, input_shape, batch_size, seed)
    if x.shape[0] < 2:
        raise NormlabError(f"example similarity needs a batch of at least 2 examples, got {x.shape[0]}")
    check_batch_for_mode(model, x.shape[0], mode)
    with torch.no_grad(), preserved(model, parameters=False), captured(chosen) as out:
        set_mode(model, mode)
        logits = model(x)
    if logits.dim() != 2:
        shape = tuple(logits.shape)
        raise NormlabError(f"prediction collapse needs (N, num_classes) logits, got shape {shape}")
    counts = torch.bincount(logits.argmax(dim=1), minlength=logits.shape[1])
    result = ExampleSimilarity(
        mode=mode,
        input=source,
        mean_cosine={},
        mean_inner={},
        collapse=(counts.max() / x.shape[0]).item(),
        top_class=int(counts.argmax()),
    )
    for name, _ in chosen:
        result.mean_cosine[name], result.mean_inner[name] = gram_similarity(out[name])
    return result
