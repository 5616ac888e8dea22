"""Data-parallel training of one :class:`~normlab.train.TrainConfig` over N processes (``normlab train
--nproc N``): PyTorch ``DistributedDataParallel`` around the normlab :class:`~normlab.train.Trainer`.

Every rank builds the same Trainer (same seed: same initial model and the same sequence of *global*
batches of ``config.batch_size``) and trains on its contiguous share: rank r takes samples
``[r * b, (r + 1) * b)`` of each global batch, ``b = batch_size / N``. DDP averages the gradients, so
with ``--bn-sync sync`` a step equals a single-process step on the global batch, and with ``local`` it
equals single-process ghost BN with virtual batch b (tests/test_distributed.py checks both).

The training loss every rank sees (and checks for divergence, and rank 0 logs) is the mean over the global
batch; its gradient is the local one. Rank 0 alone writes the store; ``train/acc`` is rank 0's share.
Evaluation runs on every rank over the whole test set (the replicas hold the same weights).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from normlab.distributed.convert import BN_SYNC_MODES, convert_sync_norm
from normlab.distributed.launch import check_nproc, launch
from normlab.distributed.process_group import destroy_process_group, init_process_group
from normlab.errors import NormlabError
from normlab.train import RunResult, TrainConfig


def train_data_parallel(
    config: TrainConfig,
    nproc: int,
    bn_sync: str = "local",
    *,
    store_path: str | None = None,
    progress: bool | None = False,
    virtual_batch_size: int | None = None,
    threads: int = 1,
) -> RunResult:
    """Train ``config`` on ``nproc`` local processes with BN semantics ``bn_sync``; rank 0's result.

    ``config.batch_size`` is the global batch; it must split evenly. ``virtual_batch_size`` is the ghost
    batch of ``--bn-sync ghost`` (default: the norm option ``virtual_batch_size``).
    """
    check_data_parallel(config, nproc, bn_sync, virtual_batch_size)
    results = launch(_rank_main, nproc, (config.to_dict(), bn_sync, store_path, progress, virtual_batch_size),
                     threads=threads)
    return results[0]


def check_data_parallel(config: TrainConfig, nproc: int, bn_sync: str,
                        virtual_batch_size: int | None = None) -> None:
    """Bad input for a data-parallel run, as NormlabError, before any process starts."""
    check_nproc(nproc, config.device)
    if bn_sync not in BN_SYNC_MODES:
        raise NormlabError(f"unknown --bn-sync {bn_sync!r}; valid: {', '.join(BN_SYNC_MODES)}")
    if config.batch_size % nproc:
        raise NormlabError(f"--batch-size {config.batch_size} does not split over --nproc {nproc} replicas")
    replica_batch = config.batch_size // nproc
    vbs = virtual_batch_size
    if vbs is not None and (vbs < 2 or replica_batch % vbs):
        raise NormlabError(f"--virtual-batch-size {vbs} must be >= 2 and divide the per-replica batch "
                           f"{replica_batch}")
    if config.checkpoint_dir is not None:
        raise NormlabError("--nproc > 1 does not write checkpoints; drop --checkpoint-dir")


def _rank_main(config_dict: dict[str, Any], bn_sync: str, store_path: str | None, progress: bool | None,
               virtual_batch_size: int | None) -> RunResult | None:
    from torch.nn.parallel import DistributedDataParallel

    from normlab.train import Trainer

    # The run's name says how it ran (the config key cannot: TrainConfig has no field for it).
    config_dict = {**config_dict}
    config_dict["name"] = config_dict.get("name") or (
        f"{config_dict['model']}/{config_dict['norm']} nproc={dist_world()} bn-sync={bn_sync}"
    )
    config = TrainConfig.from_dict(config_dict)
    rank, world, device = init_process_group(config.device)
    try:
        if device.type == "cuda":
            config = TrainConfig.from_dict({**config_dict, "device": str(device)})
        store = None
        if rank == 0 and store_path is not None:
            from normlab.store import Store

            store = Store(store_path)
        trainer = Trainer(config, store=store, progress=progress if rank == 0 else False)
        vbs = virtual_batch_size or config.norm_options.get("virtual_batch_size")
        model = convert_sync_norm(trainer.model, bn_sync, virtual_batch_size=vbs)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        # The loop calls trainer.forward (the model, or its compiled forward): it must be the DDP wrapper,
        # whose backward all-reduces the gradients.
        trainer.model = trainer.forward = ddp
        trainer.batches = ShardedBatches(trainer.batches, rank, world)
        trainer.loss_fn = GlobalMeanLoss(trainer.loss_fn)
        result = trainer.fit()
        if store is not None:
            if result.run_id is not None:
                record = {"nproc": world, "bn_sync": bn_sync, "virtual_batch_size": vbs,
                          "backend": dist.get_backend(), "replica_batch_size": config.batch_size // world}
                store.add_artifact(result.run_id, "data_parallel.json", "json", json.dumps(record).encode())
            store.close()
        return result if rank == 0 else None
    finally:
        destroy_process_group()


def dist_world() -> int:
    """WORLD_SIZE of this launched process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class ShardedBatches:
    """This rank's contiguous share of each global batch from a :class:`~normlab.data.BatchIterator`."""

    def __init__(self, batches: Any, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        return self._share(*self.batches.next_batch())

    def peek(self) -> tuple[Tensor, Tensor]:
        """This rank's share of the batch :meth:`next_batch` will return, without advancing."""
        return self._share(*self.batches.peek())

    def _share(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        b = x.shape[0] // self.world
        return x[self.rank * b:(self.rank + 1) * b], y[self.rank * b:(self.rank + 1) * b]


class GlobalMeanLoss:
    """While training (grad enabled): ``local + (mean over replicas of local - local).detach()``, so the
    value is the global batch's mean loss on every rank (one divergence decision for all) and the gradient
    stays the local one (DDP averages it). Evaluation (no grad) uses the plain loss."""

    def __init__(self, loss_fn: Any) -> None:
        self.loss_fn = loss_fn

    def __call__(self, out: Tensor, y: Tensor) -> Tensor:
        loss = self.loss_fn(out, y)
        if not torch.is_grad_enabled():
            return loss
        mean = loss.detach().clone()
        dist.all_reduce(mean, op=dist.ReduceOp.SUM)
        return loss + (mean / dist.get_world_size() - loss).detach()
