"""Beyond one process: data-parallel training with explicit BN semantics across replicas.

- :func:`launch`: start N local processes the way torchrun does (loopback rendezvous, env variables).
- :func:`init_process_group`: gloo on CPU, NCCL on CUDA.
- :func:`cross_replica_batch_norm` / :class:`CrossReplicaBatchNorm`: BN over the global batch that works on
  CPU tensors (torch's ``SyncBatchNorm`` does not), with its own all-reducing backward.
- :func:`convert_sync_norm`: ``local`` / ``sync`` / ``ghost`` semantics for every BN-like layer.
- :func:`train_data_parallel`: ``normlab train --nproc N --bn-sync MODE``.
"""

from normlab.distributed.convert import BN_SYNC_MODES, convert_sync_norm
from normlab.distributed.cross_replica_bn import cross_replica_batch_norm, global_batch_stats
from normlab.distributed.data_parallel import check_data_parallel, train_data_parallel
from normlab.distributed.launch import check_nproc, free_port, launch, max_procs
from normlab.distributed.process_group import backend_for, destroy_process_group, init_process_group
from normlab.distributed.sync_layers import (
    CrossReplicaBatchNorm,
    CrossReplicaBatchRenorm,
    CrossReplicaEvalNorm,
    CrossReplicaGhostBatchNorm,
    CrossReplicaNoisyBatchNorm,
)

__all__ = [
    "BN_SYNC_MODES",
    "CrossReplicaBatchNorm",
    "CrossReplicaBatchRenorm",
    "CrossReplicaEvalNorm",
    "CrossReplicaGhostBatchNorm",
    "CrossReplicaNoisyBatchNorm",
    "backend_for",
    "check_data_parallel",
    "check_nproc",
    "convert_sync_norm",
    "cross_replica_batch_norm",
    "destroy_process_group",
    "free_port",
    "global_batch_stats",
    "init_process_group",
    "launch",
    "max_procs",
    "train_data_parallel",
]
