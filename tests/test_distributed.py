"""normlab.distributed: cross-replica BN against single-process BN on the global batch (2 gloo processes),
``local`` against ghost BN, the float64 gradcheck of the all-reducing backward, and ``train --nproc``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from _cli import cli
from torch import nn

from normlab.distributed import (
    CrossReplicaBatchNorm,
    convert_sync_norm,
    cross_replica_batch_norm,
    launch,
)
from normlab.distributed.cross_replica_bn import CrossReplicaNormFn, global_batch_stats
from normlab.layers import create_norm
from normlab.layers.ghost_bn import GhostBatchNorm
from normlab.store import Store

B, C, L = 6, 3, 5  # per-replica batch, channels, length


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * B, C, L, generator=g, dtype=torch.float64) * 2 + 0.5
    w = torch.randn(2 * B, C, L, generator=g, dtype=torch.float64)  # dL/dy: a non-trivial upstream grad
    return x, w


def _layer(name: str) -> nn.Module:
    torch.manual_seed(1)
    layer = {"bn": lambda: nn.BatchNorm1d(C), "ghost_global": lambda: GhostBatchNorm(C, 2 * B, dims=1),
             "renorm": lambda: create_norm("batch_renorm", C, dims=1, r_max=1.5, d_max=0.5),
             "noisy0": lambda: create_norm("noisy_bn", C, dims=1, n_mu=0.0, n_sigma=1.0, r_mu=0.0,
                                           r_sigma=0.0),
             "evalnorm": lambda: create_norm("evalnorm", C, dims=1)}[name]()
    layer = layer.double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        layer.running_mean.uniform_(-0.2, 0.2)  # renorm's r and d depend on the running statistics
    return layer


def _step(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two training steps (the second one sees updated running statistics); loss = sum(y * w)."""
    x = x.clone().requires_grad_(True)
    out = None
    for _ in range(2):
        layer.zero_grad()
        out = layer(x)
        (out * w).sum().backward()
    return {"out": out.detach(), "dx": x.grad.detach() / 2, "dw": layer.weight.grad.detach(),
            "db": layer.bias.grad.detach(), "rm": layer.running_mean.detach().clone(),
            "rv": layer.running_var.detach().clone()}


def _replica(names: list[str]) -> dict:
    """In each of 2 processes: this rank's half of the batch through every layer, converted for ``sync``
    (and plain BN left ``local``); parameter gradients summed over ranks as DDP's all_reduce would."""
    import torch.distributed as dist

    from normlab.distributed import destroy_process_group, init_process_group

    rank, _, _ = init_process_group("cpu")
    try:
        x, w = _data()
        share = slice(rank * B, (rank + 1) * B)
        results = {}
        for name in names:
            layer = convert_sync_norm(_layer(name), "sync")
            r = _step(layer, x[share], w[share])
            for key in ("dw", "db"):
                dist.all_reduce(r[key])
            results[name] = r
        local = convert_sync_norm(_layer("bn"), "local")
        results["local"] = _step(local, x[share], w[share])
        results["local_class"] = type(local).__name__
        results["sync_class"] = type(convert_sync_norm(_layer("bn"), "sync")).__name__
        return results
    finally:
        destroy_process_group()


NAMES = ["bn", "ghost_global", "renorm", "noisy0", "evalnorm"]


@pytest.fixture(scope="module")
def replicas() -> list[dict]:
    return launch(_replica, 2, (NAMES,), timeout_s=240)


@pytest.mark.parametrize("name", NAMES)
def test_sync_with_2_replicas_of_b_equals_one_process_on_2b(replicas, name):
    x, w = _data()
    # The reference: the same (unconverted) layer on the whole batch in one process; ghost with V = 2B is BN.
    ref = _step(_layer(name), x, w)
    for key in ("out", "dx"):
        got = torch.cat([replicas[0][name][key], replicas[1][name][key]])
        torch.testing.assert_close(got, ref[key], rtol=0, atol=1e-10, msg=f"{name} {key}")
    for key in ("dw", "db", "rm", "rv"):
        for rank in (0, 1):
            torch.testing.assert_close(replicas[rank][name][key], ref[key], rtol=0, atol=1e-10,
                                       msg=f"{name} {key} rank {rank}")
    assert replicas[0]["sync_class"] == "CrossReplicaBatchNorm"


def test_local_equals_ghost_bn_with_virtual_batch_b(replicas):
    x, w = _data()
    ref = _step(_ghost_like_bn(), x, w)
    assert replicas[0]["local_class"] == "BatchNorm1d"
    for key in ("out", "dx"):
        got = torch.cat([replicas[0]["local"][key], replicas[1]["local"][key]])
        torch.testing.assert_close(got, ref[key], rtol=0, atol=1e-10)
    # Summed over replicas, the local parameter gradients are the ghost layer's.
    for key in ("dw", "db"):
        torch.testing.assert_close(replicas[0]["local"][key] + replicas[1]["local"][key], ref[key],
                                   rtol=0, atol=1e-10)
    # Running statistics: each replica keeps its own sub-batch's (DDP then broadcasts rank 0's).
    own = _step(_layer("bn"), x[:B], w[:B])
    torch.testing.assert_close(replicas[0]["local"]["rv"], own["rv"], rtol=0, atol=1e-12)


def _ghost_like_bn() -> GhostBatchNorm:
    ghost = GhostBatchNorm(C, B, dims=1).double()
    ghost.load_state_dict(_layer("bn").state_dict())
    return ghost


def test_cross_replica_backward_gradcheck_float64():
    x = (torch.randn(7, C, 4, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    w = torch.rand(C, dtype=torch.float64).add_(0.5).requires_grad_(True)
    b = torch.randn(C, dtype=torch.float64).requires_grad_(True)

    def fn(x, w, b):
        mean, var, count = global_batch_stats(x)
        return CrossReplicaNormFn.apply(x, w, b, mean, torch.rsqrt(var + 1e-5), count, None)

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-7)
    # and the whole function equals F.batch_norm (world of one) in outputs and running statistics
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    got = cross_replica_batch_norm(x, rm, rv, w, b, training=True, momentum=0.3)
    ref = F.batch_norm(x, rm2, rv2, w, b, True, 0.3, 1e-5)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close((rm, rv), (rm2, rv2), rtol=0, atol=1e-12)


def test_convert_keeps_parameter_objects_and_covers_every_bn_like_layer():
    model = nn.Sequential(nn.Conv1d(1, C, 3), nn.BatchNorm1d(C), create_norm("ghost_bn", C, dims=1),
                          create_norm("frozen_bn", C, dims=1), create_norm("gn", C, groups=1))
    params = [id(p) for p in model.parameters()]
    convert_sync_norm(model, "sync")
    assert [type(m).__name__ for m in model] == [
        "Conv1d", "CrossReplicaBatchNorm", "CrossReplicaGhostBatchNorm", "FrozenBatchNorm", "GroupNorm"]
    assert [id(p) for p in model.parameters()] == params
    ghost = convert_sync_norm(nn.Sequential(nn.BatchNorm1d(C)), "ghost", virtual_batch_size=4)
    assert isinstance(ghost[0], GhostBatchNorm) and ghost[0].virtual_batch_size == 4
    assert isinstance(convert_sync_norm(nn.BatchNorm2d(C), "sync"), CrossReplicaBatchNorm)
    # torch's SyncBatchNorm refuses CPU tensors: on CPU it becomes normlab's cross-replica BN.
    assert isinstance(convert_sync_norm(nn.SyncBatchNorm(C), "sync"), CrossReplicaBatchNorm)




TINY = ["--subset", "256", "--batch-size", "32", "--steps", "8", "--width", "4", "--log-every", "2",
        "--eval-train-samples", "64", "--no-progress", "--threads", "1", "--json"]  # fmt: skip


@pytest.mark.slow
def test_train_nproc_2_sync_local_ghost_equal_their_one_process_forms(capsys, tmp_path):
    db = str(tmp_path / "r.sqlite")
    runs = {}
    for label, extra in (("single", []), ("sync", ["--nproc", "2", "--bn-sync", "sync"]),
                         ("local", ["--nproc", "2", "--bn-sync", "local"]),
                         ("ghost", ["--norm", "ghost_bn", "--norm-options", '{"virtual_batch_size": 16}']),
                         ("dp_ghost8", ["--nproc", "2", "--bn-sync", "ghost", "--virtual-batch-size", "8"]),
                         ("ghost8", ["--norm", "ghost_bn", "--norm-options", '{"virtual_batch_size": 8}'])):
        code, out, err = cli(capsys, "train", *TINY, "--store", db, *extra)
        assert code == 0, err
        runs[label] = json.loads(out)
    store = Store(db)
    losses = {k: [v for _, v in store.metrics(r["run_id"], "train/loss")] for k, r in runs.items()}
    assert len(losses["sync"]) == 4
    # DDP + cross-replica BN on 2 x 16 trains the model single-process BN on 32 trains (train loss per step,
    # final eval-mode test loss: weights and running statistics alike).
    assert max(abs(a - b) for a, b in zip(losses["sync"], losses["single"], strict=True)) < 1e-5
    assert abs(runs["sync"]["final_test_loss"] - runs["single"]["final_test_loss"]) < 1e-5
    # Local BN on 2 x 16 is ghost BN with virtual batch 16 on 32 (and differs from single-process BN).
    assert max(abs(a - b) for a, b in zip(losses["local"], losses["ghost"], strict=True)) < 1e-5
    assert abs(losses["local"][-1] - losses["single"][-1]) > 1e-4
    # --bn-sync ghost: virtual batches of 8 inside each replica = ghost BN of 8 on the global batch.
    assert max(abs(a - b) for a, b in zip(losses["dp_ghost8"], losses["ghost8"], strict=True)) < 1e-5
    names = {r.id: r.name for r in store.runs()}
    assert names[runs["sync"]["run_id"]] == "cnn/bn nproc=2 bn-sync=sync"
    record = json.loads(store.artifacts(runs["local"]["run_id"])[0].payload)
    assert record == {"nproc": 2, "bn_sync": "local", "virtual_batch_size": None, "backend": "gloo",
                      "replica_batch_size": 16}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nproc", "999"], "--nproc 999 is more than the"),
        (["--nproc", "0"], "--nproc must be a positive int, got 0"),
        (["--nproc", "2", "--batch-size", "33"], "--batch-size 33 does not split over --nproc 2 replicas"),
        (["--nproc", "2", "--bn-sync", "ghost", "--virtual-batch-size", "5"],
         "--virtual-batch-size 5 must be >= 2 and divide the per-replica batch 64"),
        (["--virtual-batch-size", "8"], "--virtual-batch-size goes with --bn-sync ghost"),
        (["--nproc", "2", "--bn-sync", "sometimes"],
         "unknown --bn-sync 'sometimes'; valid: local, sync, ghost"),
    ],
)
def test_data_parallel_bad_input_is_one_line_exit_2(capsys, tmp_path, args, message):
    db = tmp_path / "r.sqlite"
    code, out, err = cli(capsys, "train", "--steps", "1", "--store", str(db), *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not db.exists()


def _ghost_replica(world: int) -> dict:
    """A ghost BN with ghost batches of 2B over replicas of B: each ghost batch spans a pair of ranks."""
    from normlab.distributed import destroy_process_group, init_process_group

    rank, _, _ = init_process_group("cpu")
    try:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(world * B, C, L, generator=g, dtype=torch.float64)
        w = torch.randn(world * B, C, L, generator=g, dtype=torch.float64)
        torch.manual_seed(1)
        layer = convert_sync_norm(GhostBatchNorm(C, 2 * B, dims=1).double(), "sync")
        share = slice(rank * B, (rank + 1) * B)
        return _step(layer, x[share], w[share])
    finally:
        destroy_process_group()


@pytest.mark.slow
def test_sync_ghost_bn_spans_sub_groups_of_replicas():
    world = 4
    got = launch(_ghost_replica, world, (world,), timeout_s=240)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(world * B, C, L, generator=g, dtype=torch.float64)
    w = torch.randn(world * B, C, L, generator=g, dtype=torch.float64)
    torch.manual_seed(1)
    ref = _step(GhostBatchNorm(C, 2 * B, dims=1).double(), x, w)  # 2 ghost batches of 2B in one process
    for key in ("out", "dx"):
        torch.testing.assert_close(torch.cat([r[key] for r in got]), ref[key], rtol=0, atol=1e-10)
    # Parameter gradients: summed over the 4 replicas they are the single-process ghost layer's.
    for key in ("dw", "db"):
        torch.testing.assert_close(sum(r[key] for r in got), ref[key], rtol=0, atol=1e-10)


def test_sharded_batches_peek_is_this_ranks_share_of_the_next_batch():
    from normlab.data import BatchIterator
    from normlab.distributed.data_parallel import ShardedBatches

    x, y = torch.randn(24, 2), torch.arange(24)
    shards = ShardedBatches(BatchIterator(x, y, 8, seed=1), rank=1, world=2)
    whole = BatchIterator(x, y, 8, seed=1)
    for _ in range(5):  # 3 batches an epoch: crosses a boundary
        px, py = shards.peek()
        gx, gy = whole.next_batch()
        assert torch.equal(py, gy[4:]) and torch.equal(px, gx[4:])
        nx, ny = shards.next_batch()
        assert torch.equal(nx, px) and torch.equal(ny, py)
