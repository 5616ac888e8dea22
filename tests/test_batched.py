"""normlab.batched: a member of a stacked group yields exactly the RunResult and metric history of the same
config trained alone by normlab's Trainer (SGD + momentum with per-member lr, AdamW, BN running
statistics, NF + AGC); divergence removes one member and leaves the others unchanged; per-member stopping;
random layers draw per member; grouping and sweeps. The engine keeps the first available mode (grouped,
else vmap, else loop); the modes are compared with each other directly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from normlab.batched import batch_key, group_configs, train_batched
from normlab.errors import NormlabError
from normlab.store import Store
from normlab.sweep import InlineExecutor, run_sweep
from normlab.train import RunResult, TrainConfig, Trainer
from normlab.train.budget import from_config as budget_from_config

# Small but not trivial: 24 steps of batch 16 (several log and eval points, momentum state built up).
SMALL = dict(subset=512, batch_size=16, steps=24, width=6, log_every=4, eval_every=12, eval_train_samples=128)
FIELDS = ("final_train_loss", "final_train_acc", "final_test_loss", "final_test_acc",
          "test_acc_train_mode", "test_acc_eval_mode", "train_eval_gap")


def alone(config: TrainConfig) -> Trainer:
    trainer = Trainer(config, progress=False)
    trainer.result = trainer.fit()
    return trainer


def assert_same_run(
    batched: RunResult, single: Trainer, history: dict, tol: float = 2e-5, same_config: bool = True
) -> None:
    result = single.result
    assert batched.status == result.status
    assert batched.steps == result.steps
    assert batched.config_key == result.config_key or not same_config
    for name in FIELDS:
        a, b = getattr(batched, name), getattr(result, name)
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=tol), name
    assert sorted(history) == sorted(single.history)
    for name, logged in single.history.items():
        points = sorted(dict(logged).items())  # the store keeps one value per (run, step, name)
        assert [s for s, _ in history[name]] == [s for s, _ in points], name
        got = torch.tensor([v for _, v in history[name]], dtype=torch.float64)
        want = torch.tensor([v for _, v in points], dtype=torch.float64)
        assert torch.allclose(got, want, rtol=1e-4, atol=tol, equal_nan=True), name


def run_group(configs, store):
    results = train_batched(configs, store=store)
    histories = [_history(store, r.run_id) for r in results]
    return results, histories


def _history(store, run_id) -> dict:
    return {name: store.metrics(run_id, name) for name in store.metric_names(run_id)}


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "runs.sqlite") as db:
        yield db


@pytest.mark.parametrize(
    "setup",
    [
        dict(norm="bn", optimizer="sgd", nesterov=True, schedule="cosine", warmup_steps=4),
        dict(norm="gn", optimizer="adamw", weight_decay=0.05, schedule="step", milestones=[10]),
        dict(norm="nf", agc_clip=0.01, optimizer="sgd"),
    ],
    ids=["bn-sgd-nesterov", "gn-adamw", "nf-agc"],
)
def test_batched_members_equal_their_runs_alone(store, setup):
    base = TrainConfig(**SMALL, **setup)
    configs = [base.replace(seed=0, lr=0.05), base.replace(seed=1, lr=0.2), base.replace(seed=0, lr=0.01)]
    results, histories = run_group(configs, store)
    for config, result, history in zip(configs, results, histories, strict=True):
        assert_same_run(result, alone(config), history)
    # The store holds one finished run per member, each with its own summary and environment.
    runs = store.runs()
    assert sorted(r.config_key for r in runs) == sorted(c.key() for c in configs)
    assert all(r.status == "finished" and r.environment["threads"] >= 1 for r in runs)


def test_bn_running_statistics_are_per_member(store):
    base = TrainConfig(**SMALL, norm="bn")
    configs = [base.replace(seed=3, lr=0.1), base.replace(seed=4, lr=0.1)]
    train_batched(configs, store=store)
    # Equal eval-mode test accuracy/loss (asserted above) needs the members' own running stats; here the two
    # members' final eval-mode losses must also differ from each other (no shared statistics).
    a, b = (r.summary["final_test_loss"] for r in store.runs())
    assert a != b


def test_a_diverging_member_leaves_the_others_unchanged(store):
    base = TrainConfig(**SMALL, norm="bn", divergence_bound=50.0)
    configs = [base.replace(lr=0.05), base.replace(lr=1e4), base.replace(seed=2, lr=0.1)]
    results, histories = run_group(configs, store)
    assert [r.status for r in results] == ["finished", "diverged", "finished"]
    single = alone(configs[1])
    assert single.result.status == "diverged"
    assert results[1].steps == single.result.steps
    assert results[1].error == single.result.error
    assert histories[1]["train/loss"][-1][0] == single.history["train/loss"][-1][0]
    for i in (0, 2):
        assert_same_run(results[i], alone(configs[i]), histories[i])


class _StopAt:
    """A policy stopping at ``stop`` steps on the config's schedule (as an auto budget would decide)."""

    def __init__(self, config: TrainConfig, stop: int) -> None:
        self.inner, self.stop = budget_from_config(config, config.steps), stop

    def lr(self, step: int) -> float:
        return self.inner.lr(step)

    def done(self, step: int, history) -> bool:
        assert "train/loss" in history or step < 4  # the member's own history is what it decides on
        return step >= self.stop


def test_members_stop_on_their_own_policy_and_the_rest_go_on(store):
    base = TrainConfig(**{**SMALL, "eval_every": 0}, norm="bn", schedule="constant")
    configs = [base.replace(seed=0), base.replace(seed=1), base.replace(seed=2)]
    policies = [_StopAt(c, s) for c, s in zip(configs, (8, 24, 16), strict=True)]
    results = train_batched(configs, store=store, policies=policies)
    assert [r.steps for r in results] == [8, 24, 16]
    assert all(r.status == "finished" for r in results)
    # The member that stopped at 8 is the run of 8 steps alone (constant lr: the schedule does not depend
    # on the length); the one that went on to 24 is unaffected by the others leaving the stack.
    history = [_history(store, r.run_id) for r in results]
    assert_same_run(results[0], alone(configs[0].replace(steps=8)), history[0], same_config=False)
    assert_same_run(results[1], alone(configs[1]), history[1])


def test_noisy_bn_members_draw_their_own_noise(store):
    base = TrainConfig(**{**SMALL, "eval_every": 0}, norm="noisy_bn")
    # Two members with the same seed and lr differ only through the noise each draws.
    results = train_batched([base, base.replace(name="twin")], store=store)
    assert all(r.status == "finished" and math.isfinite(r.final_test_loss) for r in results)
    assert results[0].final_test_loss != results[1].final_test_loss
    assert 0.05 < results[0].final_test_acc <= 1.0


def test_deterministic_variants_match_alone(store):
    for norm, options in (("ghost_bn", {"virtual_batch_size": 8}), ("batch_renorm", {})):
        base = TrainConfig(**{**SMALL, "steps": 12, "eval_every": 0}, norm=norm, norm_options=options)
        configs = [base.replace(seed=0, lr=0.05), base.replace(seed=1, lr=0.1)]
        results, histories = run_group(configs, store)
        for config, result, history in zip(configs, results, histories, strict=True):
            assert_same_run(result, alone(config), history)


def test_grouping_keeps_seed_and_lr_apart_from_everything_else():
    base = TrainConfig(**SMALL)
    same = [base.replace(seed=s, lr=lr, name=f"r{s}") for s in range(3) for lr in (0.1, 0.2)]
    other = base.replace(norm="gn")
    alone_only = base.replace(checkpoint_dir="/tmp/ckpt")
    assert len({batch_key(c) for c in same}) == 1 and batch_key(other) != batch_key(base)
    groups = group_configs([*same, other, alone_only], max_size=4)
    assert groups == [[0, 1, 2], [3, 4, 5], [6], [7]]
    assert group_configs(same, min_groups=3) == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(NormlabError, match="batched configs must differ only in seed, lr, name and group"):
        train_batched([base, other])
    with pytest.raises(NormlabError, match="cannot be batched \\(checkpointing or compile\\)"):
        train_batched([alone_only])


def test_sweep_batched_equals_sweep_one_by_one_and_resumes(tmp_path):
    base = TrainConfig(**{**SMALL, "steps": 12, "eval_every": 6}, norm="bn")
    configs = [base.replace(seed=s, lr=lr) for s in (0, 1) for lr in (0.05, 0.2)] + [base.replace(norm="gn")]
    with Store(tmp_path / "a.sqlite") as a, Store(tmp_path / "b.sqlite") as b:
        batched = run_sweep(configs, a, InlineExecutor(), batch=True)
        single = run_sweep(configs, b, InlineExecutor(), batch=False)
        for x, y in zip(batched, single, strict=True):
            assert x.config_key == y.config_key and x.status == y.status
            assert x.final_test_acc == pytest.approx(y.final_test_acc, abs=1e-6)
            assert x.final_test_loss == pytest.approx(y.final_test_loss, abs=2e-5)
        assert len(a.runs()) == len(b.runs()) == 5
        # Resume: every run is finished, so nothing is trained again.
        again = run_sweep(configs, a, InlineExecutor(), batch=True)
        assert [r.run_id for r in again] == [r.run_id for r in batched]
        assert len(a.runs()) == 5


# -- the grouped mode (members as channel groups of ordinary kernels) ------------------------------------


@pytest.mark.parametrize(
    "setup",
    [
        dict(norm="bn", optimizer="sgd", nesterov=False),
        dict(norm="gn", optimizer="adamw", weight_decay=0.05),
        dict(norm="ln", optimizer="sgd"),
        dict(norm="none", optimizer="adamw"),
        dict(norm="nf", agc_clip=0.01, optimizer="sgd"),
        dict(norm="nf", agc_clip=0.01, optimizer="adamw"),
    ],
    ids=["bn-sgd", "gn-adamw", "ln-sgd", "none-adamw", "nf-agc-sgd", "nf-agc-adamw"],
)
def test_grouped_mode_members_equal_their_runs_alone(store, setup):
    base = TrainConfig(**{**SMALL, "steps": 16, "eval_every": 8}, **setup)
    configs = [base.replace(seed=0, lr=0.05), base.replace(seed=1, lr=0.2)]
    results = train_batched(configs, store=store, modes=["grouped"])  # every step in grouped mode
    histories = [_history(store, r.run_id) for r in results]
    for config, result, history in zip(configs, results, histories, strict=True):
        assert_same_run(result, alone(config), history)


def test_a_mode_the_group_cannot_use_is_refused(store):
    base = TrainConfig(**SMALL, norm="batch_renorm")  # no vmap rule, no grouped form: loop only
    with pytest.raises(ValueError, match="mode\\(s\\) grouped not available for this group; available: loop"):
        train_batched([base, base.replace(seed=1)], store=store, modes=["grouped"])
    assert store.runs() == []


@pytest.mark.parametrize("conv", [None, "grouped", "matmul"])  # None: each conv times both
@pytest.mark.parametrize("norm", ["bn", "gn", "ln", "none", "nf", "ghost_bn", "frozen_bn"])
def test_grouped_forward_backward_and_running_stats_equal_loop_mode(norm, conv):
    from normlab.batched import StackedModel
    from normlab.models import create_model

    options = {"virtual_batch_size": 4} if norm == "ghost_bn" else {}
    torch.manual_seed(0)
    models = [create_model("cnn", norm=norm, norm_options=options) for _ in range(3)]
    for m in models:  # random running statistics, so eval mode and the updates are not trivial
        for b in m.buffers():
            if b.is_floating_point():
                b.copy_(torch.rand_like(b) + 0.5)
    stacks = {mode: StackedModel(models, (1, 40)) for mode in ("grouped", "loop")}
    assert stacks["grouped"].modes[0] == "grouped"
    stacks["grouped"].grouped.members.conv = conv
    x = torch.randn(3, 8, 1, 40)
    out, grads = {}, {}
    for mode, stack in stacks.items():
        stack.mode = mode
        stack.train()
        y = stack(x)
        y.square().sum().backward()
        stack.train(False)
        out[mode] = (y.detach(), stack(x), stack(x[0], shared_input=True))
        grads[mode] = {n: p.grad for n, p in stack.params.items()}
    for a, b in zip(out["grouped"], out["loop"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name, g in grads["loop"].items():
        torch.testing.assert_close(grads["grouped"][name], g, rtol=1e-4, atol=1e-5, msg=name)
    # Each member's running statistics moved with its own batch, as the model alone would move them.
    for k, model in enumerate(models):
        model.train()
        model(x[k])
        for name, b in model.named_buffers():
            torch.testing.assert_close(stacks["grouped"].buffers[name][k], b, rtol=1e-5, atol=1e-6, msg=name)


class _Shuffle(torch.nn.Module):
    """A channel shuffle: no grouped form known."""

    def forward(self, x):
        return x.flip(1)


class _MixesChannels(torch.nn.Module):
    """Known leaves, but the model's own forward reverses the channels (crossing members when grouped)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(1, 4, 3)
        self.head = torch.nn.Linear(4 * 38, 3)

    def forward(self, x):
        return self.head(self.conv(x).flip(1).flatten(1))


@pytest.mark.parametrize("make", [
    lambda: torch.nn.Sequential(
        torch.nn.Conv1d(1, 4, 3), _Shuffle(), torch.nn.Flatten(), torch.nn.Linear(152, 3)
    ),
    _MixesChannels,
], ids=["unknown-layer", "forward-mixes-channels"])
def test_models_the_grouped_twin_cannot_run_fall_back(make):
    from normlab.batched import StackedModel

    models = [make() for _ in range(3)]
    stack = StackedModel(models, (1, 40))
    assert stack.grouped is None and stack.modes == ("vmap", "loop")
    x = torch.randn(3, 5, 1, 40)
    torch.testing.assert_close(stack(x), torch.stack([m(x[k]) for k, m in enumerate(models)]))


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_convolutions_equal_each_members_conv(dims, bias):
    from normlab.batched.grouped import grouped_conv, matmul_conv

    torch.manual_seed(0)
    cls = torch.nn.Conv1d if dims == 1 else torch.nn.Conv2d
    convs = [cls(3, 5, 3, stride=2, padding=2, dilation=2, bias=bias).double() for _ in range(4)]
    x = torch.randn(4, 6, 3, *([11] * dims), dtype=torch.double)  # (K, B, C, *spatial)
    # Member-major (K*C_out, B, *spatial): member k's output channels, each holding the batch.
    want = torch.cat([c(x[k]).transpose(0, 1) for k, c in enumerate(convs)])
    xg = x.transpose(1, 2).reshape(12, 6, *x.shape[3:])
    w = torch.cat([c.weight for c in convs])
    b = torch.cat([c.bias for c in convs]) if bias else None
    torch.testing.assert_close(grouped_conv(xg, w, b, 4, 1, convs[0]), want)
    torch.testing.assert_close(matmul_conv(xg, w, b, 4, convs[0]), want)


# (stride, padding, dilation, kernel) per spatial dim; the second and third pad more than a kernel
# offset reaches (output positions that read only padding: the col2im clipping).
GEOMETRIES = [
    ((2, 1), (1, 0), (1, 2), (3, 2)), ((1, 2), (2, 3), (2, 1), (3, 3)), ((3, 1), (4, 1), (1, 1), (2, 3)),
]


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("geometry", range(len(GEOMETRIES)))
@pytest.mark.parametrize("columns", ["gather", "strided"])
def test_im2col_conv_passes_gradcheck_in_float64(dims, bias, input_grad, geometry, columns, monkeypatch):
    from normlab.batched import im2col
    from normlab.batched.im2col import Im2colConv

    monkeypatch.setattr(im2col, "GATHER_COLUMNS", 10**9 if columns == "gather" else 0)
    torch.manual_seed(0)
    k, c_in, c_out = 2, 3, 4
    stride, padding, dilation, kernel = (g[:dims] for g in GEOMETRIES[geometry])
    # Member-major input (K*C_in, B, *spatial).
    x = torch.randn(k * c_in, 3, *([7, 6][:dims]), dtype=torch.double, requires_grad=input_grad)
    w = torch.randn(k * c_out, c_in, *kernel, dtype=torch.double, requires_grad=True)
    b = torch.randn(k * c_out, dtype=torch.double, requires_grad=True) if bias else None
    inputs = (x, w, b) if bias else (x, w)

    def conv(*t):
        return Im2colConv.apply(t[0], t[1], t[2] if bias else None, k, stride, padding, dilation)

    assert torch.autograd.gradcheck(conv, inputs)
    fn = torch.nn.functional.conv1d if dims == 1 else torch.nn.functional.conv2d
    want = fn(x.transpose(0, 1), w, b, stride, padding, dilation, k).transpose(0, 1)
    torch.testing.assert_close(conv(*inputs), want)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("geometry", range(len(GEOMETRIES)))
def test_im2col_gather_and_strided_columns_agree_bit_for_bit(dims, geometry, monkeypatch):
    """The two column copies (a fixed rule on their size picks one) give the same outputs and gradients
    to the last bit in float32: col2im adds in kernel-offset order in both."""
    from normlab.batched import im2col

    torch.manual_seed(0)
    k, c_in, c_out = 3, 4, 5
    stride, padding, dilation, kernel = (g[:dims] for g in GEOMETRIES[geometry])
    x = torch.randn(k * c_in, 6, *([9, 8][:dims]), requires_grad=True)
    w = torch.randn(k * c_out, c_in, *kernel, requires_grad=True)
    b = torch.randn(k * c_out, requires_grad=True)
    results = []
    for limit in (10**9, 0):
        monkeypatch.setattr(im2col, "GATHER_COLUMNS", limit)
        y = im2col.Im2colConv.apply(x, w, b, k, stride, padding, dilation)
        grads = torch.autograd.grad(y, (x, w, b), torch.linspace(-1, 1, y.numel()).view_as(y))
        results.append((y, *grads))
    for gathered, strided in zip(*results, strict=True):
        assert torch.equal(gathered, strided)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse_loss", "l1_loss"])  # l1: the vmap fallback
def test_member_losses_equal_each_members_loss(loss):
    from normlab.batched.engine import member_losses

    fn = getattr(torch.nn.functional, loss)
    torch.manual_seed(0)
    out = torch.randn(4, 6, 10)
    y = torch.randint(0, 10, (4, 6)) if loss == "cross_entropy" else torch.randn(4, 6, 10)
    want = torch.stack([fn(out[k], y[k]) for k in range(4)])
    torch.testing.assert_close(member_losses(fn, out, y), want)


def test_a_rerun_of_a_group_reproduces_its_numbers_exactly(tmp_path):
    # The mode and the conv kernel are fixed rules, not timings: two processes (here two calls) that
    # train the same group must agree to the bit, or a compare's table changes between reruns.
    base = TrainConfig(**SMALL, norm="bn", optimizer="adamw")
    configs = [base.replace(seed=s, lr=lr) for s in (0, 1) for lr in (0.003, 0.01)]
    runs = []
    for name in ("a", "b"):
        with Store(tmp_path / f"{name}.sqlite") as db:
            results = train_batched(configs, store=db)
            runs.append([(r.final_test_loss, r.final_test_acc, _history(db, r.run_id)) for r in results])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("affine", [True, False])
def test_row_batch_norm_passes_gradcheck_in_float64(affine):
    from normlab.batched.row_batch_norm import RowBatchNorm

    torch.manual_seed(0)
    x = (torch.randn(6, 20, dtype=torch.double) * 3 + 1).requires_grad_()
    w = (torch.rand(6, dtype=torch.double) + 0.5).requires_grad_() if affine else None
    b = torch.randn(6, dtype=torch.double, requires_grad=True) if affine else None

    def norm(x, *wb):
        return RowBatchNorm.apply(x, *(wb or (None, None)), None, None, 0.1, 1e-5)

    assert torch.autograd.gradcheck(norm, (x, w, b) if affine else (x,))


def test_row_batch_norm_equals_torch_batch_norm_with_running_statistics():
    from normlab.batched.row_batch_norm import row_batch_norm

    torch.manual_seed(0)
    scale, shift = torch.linspace(0.5, 4, 12).unsqueeze(1), torch.linspace(-2, 3, 12).unsqueeze(1)
    x = torch.randn(12, 300) * scale + shift
    w, b = torch.rand(12) + 0.5, torch.randn(12)
    mine = [t.clone().requires_grad_() for t in (x, w, b)]
    torch_ = [t.clone().requires_grad_() for t in (x, w, b)]
    stats_mine = [torch.randn(12), torch.rand(12) + 0.5]
    stats_torch = [s.clone() for s in stats_mine]
    y = row_batch_norm(mine[0], *stats_mine, mine[1], mine[2], 0.3, 1e-5)
    want = F.batch_norm(torch_[0].unsqueeze(0), *stats_torch, torch_[1], torch_[2], True, 0.3, 1e-5)
    want = want.squeeze(0)
    torch.testing.assert_close(y, want)
    grad = torch.randn_like(y)
    y.backward(grad)
    want.backward(grad)
    for a, b_ in zip(mine, torch_, strict=True):
        torch.testing.assert_close(a.grad, b_.grad)
    for a, b_ in zip(stats_mine, stats_torch, strict=True):  # unbiased running variance, as torch's
        torch.testing.assert_close(a, b_)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        row_batch_norm(torch.randn(3, 1), None, None, None, None, 0.1, 1e-5)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("spatial", [(3,), (2, 2)])
def test_member_group_norm_passes_gradcheck_in_float64(affine, spatial):
    from normlab.batched.group_norm import MemberGroupNorm

    torch.manual_seed(0)
    # 2 members x 6 channels in 3 groups each: 2 channels x |S| positions a group.
    x = (torch.randn(12, 4, *spatial, dtype=torch.double) * 3 + 1).requires_grad_()
    w = (torch.rand(12, dtype=torch.double) + 0.5).requires_grad_() if affine else None
    b = torch.randn(12, dtype=torch.double, requires_grad=True) if affine else None

    def norm(x, *wb):
        return MemberGroupNorm.apply(x, *(wb or (None, None)), 6, 1e-5)

    assert torch.autograd.gradcheck(norm, (x, w, b) if affine else (x,))


# (channels, groups, positions): below SLOW_POSITIONS with a group above it (MemberGroupNorm); at it
# (F.group_norm); instance norm below it (a group below too: F.group_norm).
@pytest.mark.parametrize("channels, groups, positions", [(25, 5, 5), (6, 2, 8), (4, 4, 3)])
def test_member_group_norm_equals_each_members_group_norm(channels, groups, positions):
    from normlab.batched import group_norm
    from normlab.batched.group_norm import member_group_norm

    torch.manual_seed(0)
    k, batch = 3, 5
    norms = [torch.nn.GroupNorm(groups, channels) for _ in range(k)]
    for n in norms:
        torch.nn.init.uniform_(n.weight, 0.5, 2.0)
        torch.nn.init.normal_(n.bias)
    x = torch.randn(k, batch, channels, positions) * torch.linspace(0.5, 3, channels).view(channels, 1) + 1
    want = torch.stack([n(x[i]) for i, n in enumerate(norms)])
    grad = torch.randn_like(want)
    want.backward(grad)
    xg = x.transpose(1, 2).reshape(k * channels, batch, positions).requires_grad_()  # member-major
    w = torch.cat([n.weight.detach() for n in norms]).requires_grad_()
    b = torch.cat([n.bias.detach() for n in norms]).requires_grad_()
    y = member_group_norm(xg, k * groups, w, b, 1e-5)
    y.backward(grad.transpose(1, 2).reshape(y.shape))
    torch.testing.assert_close(y.view(k, channels, batch, positions).transpose(1, 2), want)
    torch.testing.assert_close(w.grad, torch.cat([n.weight.grad for n in norms]))
    torch.testing.assert_close(b.grad, torch.cat([n.bias.grad for n in norms]))
    # the input's gradient: member k's (C, B, S) rows against x's gradient through each member's norm
    xs = x.clone().requires_grad_()
    torch.stack([n(xs[i]) for i, n in enumerate(norms)]).backward(grad)
    torch.testing.assert_close(xg.grad, xs.grad.transpose(1, 2).reshape(xg.shape))
    custom = positions < group_norm.SLOW_POSITIONS <= channels // groups * positions
    assert (y.grad_fn.name() == "MemberGroupNormBackward") == custom


@pytest.mark.parametrize(
    "setup",
    [dict(optimizer="adamw", weight_decay=0.05), dict(optimizer="sgd", momentum=0.9, nesterov=True,
                                                       weight_decay=5e-4)],
    ids=["adamw", "sgd-nesterov"],
)
def test_flat_optimizer_equals_the_per_tensor_one_across_a_member_leaving(setup):
    from normlab.batched.flat import flat_parameters
    from normlab.batched.optim import StackedOptimizer

    torch.manual_seed(0)
    config = TrainConfig(**setup)
    shapes = {"conv.weight": (3, 4, 2, 3), "conv.bias": (3, 4), "fc.weight": (3, 5, 8), "fc.bias": (3, 5)}
    start = {name: torch.randn(shape) for name, shape in shapes.items()}
    decayed = {"conv.weight", "fc.weight"}
    plain = {name: t.clone().requires_grad_() for name, t in start.items()}
    flat = flat_parameters({name: t.clone().requires_grad_() for name, t in start.items()})
    assert flat is not None and flat.data.shape == (sum(t.numel() for t in start.values()),)
    opt_plain = StackedOptimizer(plain, decayed, config)
    opt_flat = StackedOptimizer(flat.params, decayed, config, flat=flat)
    lrs = torch.tensor([0.1, 0.03, 0.01], dtype=torch.float64)
    for step in range(6):
        if step == 3:  # member 1 leaves: both re-stack the parameters and keep members 0 and 2's state
            members = [0, 2]
            plain = {n: p.detach()[members].requires_grad_() for n, p in plain.items()}
            flat = flat_parameters({n: p.detach()[members].requires_grad_() for n, p in flat.params.items()})
            opt_plain.keep(members, plain)
            opt_flat.keep(members, flat.params, flat)
            lrs = lrs[members]
        grads = {n: torch.randn(p.shape) for n, p in plain.items()}
        flat.zero_grad()
        for params in (plain, flat.params):
            sum((p * grads[n]).sum() for n, p in params.items()).backward()
        assert flat.complete
        opt_plain.step(plain, lrs)
        opt_flat.step(flat.params, lrs)
        for name in plain:
            plain[name].grad = None
            torch.testing.assert_close(flat.params[name], plain[name], rtol=1e-6, atol=1e-7)
    # The flat buffers are the parameters' storage: an update of the buffer is an update of the leaf.
    assert flat.params["fc.bias"].data_ptr() == flat.data[flat.slices["fc.bias"]].data_ptr()


def test_a_parameter_without_gradient_is_left_alone_as_torch_optim_does():
    from normlab.batched.flat import flat_parameters
    from normlab.batched.optim import StackedOptimizer

    torch.manual_seed(0)
    flat = flat_parameters({"used": torch.randn(2, 3, requires_grad=True),
                            "unused": torch.randn(2, 4, requires_grad=True)})
    before = flat.params["unused"].detach().clone()
    used = flat.params["used"].detach().clone()
    opt = StackedOptimizer(flat.params, {"used", "unused"}, TrainConfig(optimizer="adamw", weight_decay=0.1),
                           flat=flat)
    flat.zero_grad()
    flat.params["used"].square().sum().backward()
    assert flat.received == {"used"} and not flat.complete
    opt.step(flat.params, torch.tensor([0.1, 0.2], dtype=torch.float64))
    torch.testing.assert_close(flat.params["unused"], before, rtol=0, atol=0)  # no decay, no step
    # AdamW's first step, exactly: decay, then lr * sign(g) (m_hat / sqrt(v_hat) = g / |g|), g = 2 w.
    lr = torch.tensor([[0.1], [0.2]])
    torch.testing.assert_close(flat.params["used"].detach(), used * (1 - lr * 0.1) - lr * used.sign())
    # Mixed dtypes (or frozen tensors) keep their own tensors: no flat buffer.
    assert flat_parameters({"a": torch.zeros(2, 3, requires_grad=True),
                            "b": torch.zeros(2, dtype=torch.float64, requires_grad=True)}) is None
    assert flat_parameters({"a": torch.zeros(2, 3, requires_grad=True), "b": torch.zeros(2)}) is None


@pytest.mark.parametrize("augment", [None, "shift"])
def test_members_batches_are_gathered_as_each_iterator_serves_them(augment):
    # One index_select for members sharing a data set (no augmentation); each member's own batch otherwise.
    from normlab.batched.engine import _next_batches
    from normlab.data import BatchIterator

    x, y = torch.randn(30, 1, 12), torch.arange(30)

    def members():
        return [BatchIterator(x, y, 8, seed=s, augment=augment) for s in (0, 1, 2)]

    reference, gathered = members(), members()
    for _ in range(5):  # 3 batches an epoch: across an epoch boundary
        xs, ys = _next_batches(gathered)
        served = [it.next_batch() for it in reference]
        assert torch.equal(xs, torch.stack([b[0] for b in served]))
        assert torch.equal(ys, torch.stack([b[1] for b in served]))
    assert [it.state_dict() for it in gathered] == [it.state_dict() for it in reference]
