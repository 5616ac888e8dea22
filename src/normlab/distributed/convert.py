"""``convert_sync_norm(model, mode)``: give a model the BN semantics of data-parallel training, like
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` but for every BN-like layer normlab has.

Modes (``--bn-sync``):
- ``local``: each replica normalizes with its own sub-batch (PyTorch DDP's default). Nothing changes; over R
  replicas of batch b this is ghost BN with virtual batch b on the global batch (tests/test_distributed.py).
- ``sync``: statistics of the global batch. ``nn.BatchNorm*d`` becomes torch's ``SyncBatchNorm`` on CUDA
  with NCCL and :class:`~normlab.distributed.sync_layers.CrossReplicaBatchNorm` otherwise (torch's refuses
  CPU tensors); ghost BN, Batch Renorm, noisy BN and EvalNorm become their cross-replica forms.
- ``ghost``: an explicit virtual batch inside each replica: ``nn.BatchNorm*d`` becomes
  :class:`~normlab.layers.GhostBatchNorm` with ``virtual_batch_size``; ghost BN layers keep theirs unless
  ``virtual_batch_size`` is given.

Unchanged in every mode: frozen BN (no batch statistics), GN / LN / IN (per-sample statistics), noise
layers. Parameters and buffers stay the same tensor objects, so an optimizer built before the conversion
keeps working; normlab's layers keep their object (their cross-replica forms only add behaviour).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.distributed.sync_layers import (
    CrossReplicaBatchNorm,
    CrossReplicaBatchRenorm,
    CrossReplicaEvalNorm,
    CrossReplicaGhostBatchNorm,
    CrossReplicaNoisyBatchNorm,
)
from normlab.errors import NormlabError
from normlab.layers.batch_renorm import BatchRenorm
from normlab.layers.evalnorm import EvalNorm
from normlab.layers.ghost_bn import GhostBatchNorm
from normlab.layers.noisy_bn import NoisyBatchNorm

BN_SYNC_MODES = ("local", "sync", "ghost")

# normlab layer -> its cross-replica form (a subclass adding behaviour only). Order: most specific first.
_SYNC_FORMS: tuple[tuple[type, type], ...] = (
    (GhostBatchNorm, CrossReplicaGhostBatchNorm),
    (BatchRenorm, CrossReplicaBatchRenorm),
    (NoisyBatchNorm, CrossReplicaNoisyBatchNorm),
    (EvalNorm, CrossReplicaEvalNorm),
)
_NORMLAB_BN = tuple(plain for plain, _ in _SYNC_FORMS)
_DIMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


def convert_sync_norm(
    model: nn.Module,
    mode: str,
    *,
    process_group=None,
    virtual_batch_size: int | None = None,
    torch_sync: bool | None = None,
) -> nn.Module:
    """Convert ``model``'s BN-like layers for ``mode`` in place and return it (see the module docstring).

    Args:
        process_group: the replicas sharing statistics in ``sync`` mode (None: all).
        virtual_batch_size: the ghost batch of ``ghost`` mode (required there unless every BN layer is
            already a ghost BN).
        torch_sync: use ``torch.nn.SyncBatchNorm`` for ``nn.BatchNorm*d``; default: when the model's
            parameters are on CUDA and the backend is NCCL.

    ``sync`` mode with ghost BN creates sub-groups of consecutive ranks: every rank must call this, in the
    same order (as for ``dist.new_group``).
    """
    if mode not in BN_SYNC_MODES:
        raise NormlabError(f"unknown --bn-sync {mode!r}; valid: {', '.join(BN_SYNC_MODES)}")
    if mode == "local":
        return model
    if mode == "ghost":
        return _convert(model, lambda layer: _to_ghost(layer, virtual_batch_size))
    if torch_sync is None:
        torch_sync = _on_cuda(model) and dist.is_initialized() and dist.get_backend() == "nccl"
    ghost_groups, world = _ghost_groups(model, process_group)

    def to_sync(layer: nn.Module) -> nn.Module:
        if isinstance(layer, _NORMLAB_BN) or not isinstance(layer, _BatchNorm):
            return _to_sync_normlab(layer, process_group, ghost_groups, world)
        if torch_sync:
            return nn.SyncBatchNorm.convert_sync_batchnorm(layer, process_group)
        # Plain BN, or a torch SyncBatchNorm that would refuse these (CPU) tensors.
        return _adopt(CrossReplicaBatchNorm(
            layer.num_features, process_group=process_group, dims=_DIMS.get(type(layer), 2), eps=layer.eps,
            momentum=layer.momentum, affine=layer.affine,
        ), layer)

    return _convert(model, to_sync)


def _convert(model: nn.Module, fn) -> nn.Module:
    if _convertible(model):
        return fn(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _convertible(child):
                setattr(parent, name, fn(child))
    return model


def _convertible(module: nn.Module) -> bool:
    return isinstance(module, (_BatchNorm, *_NORMLAB_BN))


def _to_sync_normlab(layer: nn.Module, group, ghost_groups: dict, world: int) -> nn.Module:
    for plain, synced in _SYNC_FORMS:
        if isinstance(layer, plain):
            layer.__class__ = synced
            layer.process_group = group
            if synced is CrossReplicaGhostBatchNorm:
                layer.ghost_groups, layer.world_size = ghost_groups, world
            return layer
    return layer


def _to_ghost(layer: nn.Module, virtual_batch_size: int | None) -> nn.Module:
    if isinstance(layer, GhostBatchNorm):
        if virtual_batch_size is not None:
            layer.virtual_batch_size = virtual_batch_size
        return layer
    if type(layer) not in _DIMS:
        return layer  # renorm / noisy / EvalNorm keep their own batch semantics
    if virtual_batch_size is None:
        raise NormlabError("--bn-sync ghost needs a virtual batch size (norm option virtual_batch_size)")
    if layer.running_mean is None:
        raise NormlabError(f"cannot make {type(layer).__name__} without running statistics a ghost BN")
    ghost = GhostBatchNorm(layer.num_features, virtual_batch_size, dims=_DIMS[type(layer)], eps=layer.eps,
                           momentum=layer.momentum, affine=layer.affine)
    return _adopt(ghost, layer)


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` the very parameter and buffer objects of ``old`` (an optimizer keeps tracking them)."""
    if old.running_mean is None:
        raise NormlabError(f"cannot synchronize {type(old).__name__} without running statistics")
    for name, param in old.named_parameters(recurse=False):
        setattr(new, name, param)
    for name, buf in old.named_buffers(recurse=False):
        new.register_buffer(name, buf)
    new.train(old.training)
    return new


def _on_cuda(model: nn.Module) -> bool:
    ref = next(iter(model.parameters()), None)
    return ref is not None and ref.is_cuda


def _ghost_groups(model: nn.Module, process_group) -> tuple[dict, int]:
    """{k: this rank's group of k consecutive ranks} for every k dividing the world (k = world: the whole
    group), created only when the model has ghost BN layers and a process group is up."""
    if not any(isinstance(m, GhostBatchNorm) for m in model.modules()):
        return {}, 1
    if not (dist.is_available() and dist.is_initialized()):
        return {1: None}, 1
    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    groups: dict = {}
    for k in range(1, world + 1):
        if world % k:
            continue
        if k == world:
            groups[k] = process_group
            continue
        for start in range(0, world, k):
            # new_group is collective: every rank creates every sub-group, keeps its own.
            group = dist.new_group(ranks=list(range(start, start + k)))
            if start <= rank < start + k:
                groups[k] = group
    return groups, world

