"""Which runs can share a stacked model, and how a sweep's configs are cut into groups.

Runs are compatible when their configs agree on everything but ``seed``, ``lr``, ``name`` and ``group``
(:func:`batch_key`): same model, norm, data, batch size, optimizer, schedule shape and length. Runs with
checkpoints or ``compile`` are trained alone (per-run files and compiled graphs do not stack), and so are
runs with callbacks (probes look at one ``nn.Module``): the sweep does not offer those to the engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from normlab.errors import NormlabError
from normlab.train import TrainConfig

MAX_GROUP = 16
# What may differ inside a group (each member keeps its own); everything else must agree.
_PER_MEMBER = ("seed", "lr", "name", "group")


def can_batch(config: TrainConfig) -> bool:
    """Whether ``config`` may be trained as a member of a stacked group."""
    return config.checkpoint_dir is None and not getattr(config, "compile", False)


def batch_key(config: TrainConfig) -> str:
    """Equal for configs that can share one stacked model (all fields but seed, lr, name, group)."""
    from normlab.store import config_key

    return config_key({k: v for k, v in config.to_dict().items() if k not in _PER_MEMBER})


def check_group(configs: Sequence[TrainConfig]) -> None:
    """Raise NormlabError unless ``configs`` is a non-empty list of compatible, batchable configs."""
    if not configs:
        raise NormlabError("a batched group needs at least one config, got none")
    for config in configs:
        if not isinstance(config, TrainConfig):
            raise NormlabError(f"batched configs must be TrainConfigs, got {type(config).__name__}")
        if not can_batch(config):
            raise NormlabError(
                f"config {config.name or config.key()} cannot be batched (checkpointing or compile); "
                "train it alone"
            )
    keys = {batch_key(c) for c in configs}
    if len(keys) > 1:
        raise NormlabError(
            "batched configs must differ only in seed, lr, name and group; "
            f"got {len(keys)} different setups"
        )


def group_configs(
    configs: Sequence[TrainConfig], *, max_size: int = MAX_GROUP, min_groups: int = 1
) -> list[list[int]]:
    """Indices of ``configs`` cut into groups of compatible configs, in first-seen order.

    Each compatible set is split evenly into ``ceil(n / max_size)`` groups; when that gives fewer than
    ``min_groups`` groups in all (e.g. fewer groups than workers), the largest are split further so every
    worker has one. Configs that :func:`can_batch` refuses come back as groups of one.
    """
    if max_size < 1:
        raise NormlabError(f"max group size must be >= 1, got {max_size}")
    by_key: dict[str, list[int]] = {}
    singles: list[list[int]] = []
    for i, config in enumerate(configs):
        if can_batch(config):
            by_key.setdefault(batch_key(config), []).append(i)
        else:
            singles.append([i])
    sets = list(by_key.values())
    parts = [math.ceil(len(s) / max_size) for s in sets]
    while sum(parts) + len(singles) < min_groups:
        # Split the set whose groups are largest, as long as it has members to spare.
        sizes = [len(s) / p if p < len(s) else 0 for s, p in zip(sets, parts, strict=True)]
        if not sizes or max(sizes) <= 1:
            break
        parts[sizes.index(max(sizes))] += 1
    groups = [chunk for s, p in zip(sets, parts, strict=True) for chunk in _split(s, p)]
    return groups + singles


def _split(items: list[int], parts: int) -> list[list[int]]:
    """``items`` in ``parts`` contiguous chunks whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for p in range(parts):
        end = start + size + (p < extra)
        chunks.append(items[start:end])
        start = end
    return chunks
