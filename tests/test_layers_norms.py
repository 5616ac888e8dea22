"""normlab.layers norms: equality with PyTorch, by-hand formulas, gradcheck in float64, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck

from normlab.errors import NormlabError
from normlab.layers import (
    BatchRenorm,
    EvalNorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    NoisyBatchNorm,
    create_norm,
    fit_evalnorm,
    list_norms,
    noisy_batch_norm,
    sample_bn_noise,
)
from normlab.layers import noisy_bn as noisy_bn_module
from normlab.layers.batch_renorm import batch_renorm, renorm_limits
from normlab.layers.evalnorm import eval_norm
from normlab.layers.ghost_bn import ghost_batch_norm

CUSTOM = ["frozen_bn", "ghost_bn", "batch_renorm", "noisy_bn", "noise", "evalnorm"]
SHAPES = [(6, 4), (6, 4, 5), (6, 4, 3, 3)]


def _randomize(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            t = getattr(layer, name, None)
            if t is not None:
                t.copy_(torch.randn_like(t))
        if getattr(layer, "running_var", None) is not None:
            layer.running_var.copy_(torch.rand_like(layer.running_var) + 0.5)
    return layer


def _by_hand_bn(x, weight, bias, eps=1e-5):
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean) / torch.sqrt(var + eps) * weight.view(shape) + bias.view(shape)


# --- registry and PyTorch equality ---------------------------------------------------------------------

def test_all_names_registered():
    assert set(CUSTOM + ["bn", "gn", "ln", "in", "none"]) <= set(list_norms())


@pytest.mark.parametrize("dims,shape", [(1, (8, 6)), (1, (8, 6, 5)), (2, (8, 6, 4, 4)), (3, (4, 6, 2, 3, 3))])
def test_bn_equals_pytorch(dims, shape):
    ours = _randomize(create_norm("bn", 6, dims=dims))
    ref = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](6)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_gn_and_ln_equal_pytorch():
    x = torch.randn(4, 64, 5, 5)
    gn = _randomize(create_norm("gn", 64))
    ref = nn.GroupNorm(32, 64)
    ref.load_state_dict(gn.state_dict())
    torch.testing.assert_close(gn(x), ref(x))
    # LN over (C, H, W): F.layer_norm at its default (unit) affine parameters.
    torch.testing.assert_close(create_norm("ln", 64)(x), F.layer_norm(x, x.shape[1:]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CUSTOM)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_custom_norms_run_on_every_shape(name, shape, dtype):
    layer = create_norm(name, shape[1], dims=1 if len(shape) < 4 else 2).to(dtype)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    layer.eval()
    assert layer(x).shape == x.shape


# --- frozen BN ---------------------------------------------------------------------------------------------

def test_frozen_bn_equals_bn_eval_and_loads_bn_state_dict():
    bn = _randomize(nn.BatchNorm2d(5)).eval()
    frozen = FrozenBatchNorm(5)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(3, 5, 4, 4)
    torch.testing.assert_close(frozen.train()(x), bn(x))
    torch.testing.assert_close(FrozenBatchNorm.from_bn(bn)(x), bn(x))
    assert list(frozen.parameters()) == []


# --- ghost BN --------------------------------------------------------------------------------------------

def test_ghost_bn_with_virtual_equal_to_batch_is_bn():
    ghost, bn = GhostBatchNorm(4, virtual_batch_size=8), nn.BatchNorm2d(4)
    _randomize(ghost)
    bn.load_state_dict(ghost.state_dict())
    for _ in range(3):
        x = torch.randn(8, 4, 3, 3)
        torch.testing.assert_close(ghost(x), bn(x))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ghost, name), getattr(bn, name))
    ghost.eval(), bn.eval()
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(ghost(x), bn(x))


def test_ghost_bn_normalizes_each_ghost_batch_and_updates_stats_in_order():
    ghost = _randomize(GhostBatchNorm(3, virtual_batch_size=2, momentum=0.2))
    rm0, rv0 = ghost.running_mean.clone(), ghost.running_var.clone()
    x = torch.randn(5, 3, 4)  # ghost batches of 2, 2 and 1 sample (the last has 4 values per channel)
    y = ghost(x)
    expected = torch.cat([_by_hand_bn(c, ghost.weight, ghost.bias) for c in x.split(2)])
    torch.testing.assert_close(y, expected)
    rm, rv = rm0, rv0
    for c in x.split(2):
        var, mean = torch.var_mean(c, dim=[0, 2], correction=1)
        rm, rv = 0.8 * rm + 0.2 * mean, 0.8 * rv + 0.2 * var
    torch.testing.assert_close(ghost.running_mean, rm)
    torch.testing.assert_close(ghost.running_var, rv)
    assert int(ghost.num_batches_tracked) == 3


# --- batch renorm ---------------------------------------------------------------------------------------

def test_renorm_with_rmax_1_dmax_0_is_bn():
    renorm, bn = BatchRenorm(4, r_max=1.0, d_max=0.0), nn.BatchNorm2d(4)
    _randomize(renorm)
    bn.load_state_dict(renorm.state_dict(), strict=False)
    for _ in range(2):
        warm = torch.randn(6, 4, 3, 3)
        renorm(warm), bn(warm)
    x = torch.randn(6, 4, 3, 3)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = renorm(xa), bn(xb)
    torch.testing.assert_close(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(renorm.weight.grad, bn.weight.grad)
    torch.testing.assert_close(renorm.running_mean, bn.running_mean)
    torch.testing.assert_close(renorm.running_var, bn.running_var)


#: The full limits from the first step (the default schedule trains as plain BN first).
NO_RAMP = dict(bn_fraction=0.0, r_max_fraction=0.0, d_max_fraction=0.0)


def test_renorm_matches_ioffe_formula_by_hand():
    torch.manual_seed(1)
    layer = BatchRenorm(3, r_max=1.5, d_max=0.5, momentum=0.1, **NO_RAMP)
    _randomize(layer)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(10, 3, 4) * 2 + 1
    y = layer(x)
    var_b, mu_b = torch.var_mean(x, dim=[0, 2], correction=0)
    sigma_b, sigma = torch.sqrt(var_b + 1e-5), torch.sqrt(rv + 1e-5)
    r = (sigma_b / sigma).clamp(1 / 1.5, 1.5)
    d = ((mu_b - rm) / sigma).clamp(-0.5, 0.5)
    v = lambda t: t.view(1, -1, 1)  # noqa: E731
    expected = v(layer.weight) * ((x - v(mu_b)) / v(sigma_b) * v(r) + v(d)) + v(layer.bias)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(layer.running_mean, 0.9 * rm + 0.1 * mu_b)
    torch.testing.assert_close(layer.running_var, 0.9 * rv + 0.1 * var_b * 40 / 39)


def test_renorm_unclipped_training_output_is_the_inference_function():
    layer = _randomize(BatchRenorm(3, r_max=1e6, d_max=1e6, momentum=0.0, **NO_RAMP))
    x = torch.randn(8, 3, 5, dtype=torch.float64)
    layer.double()
    y_train = layer(x)
    torch.testing.assert_close(y_train, layer.eval()(x))


def test_renorm_schedule_is_ioffe_scaled_to_the_run():
    # Ioffe 2017 Sec. 4 over 130k steps: BN until 5k, r_max 1 -> 3 by 40k, d_max 0 -> 5 by 25k (linear ramps).
    assert renorm_limits(0, 3.0, 5.0) == (1.0, 0.0)
    assert renorm_limits(4_999, 3.0, 5.0) == (1.0, 0.0)
    assert renorm_limits(15_000, 3.0, 5.0) == pytest.approx((1.0 + 2.0 * 10 / 35, 5.0 * 10 / 20))
    assert renorm_limits(25_000, 3.0, 5.0) == pytest.approx((1.0 + 2.0 * 20 / 35, 5.0))
    assert renorm_limits(40_000, 3.0, 5.0) == (3.0, 5.0)
    assert renorm_limits(129_999, 3.0, 5.0) == (3.0, 5.0)
    # The same schedule on a 1,300-step run: BN for 50 steps, d_max at 5 from step 250, r_max at 3 from 400.
    assert renorm_limits(49, 3.0, 5.0, total_steps=1300) == (1.0, 0.0)
    assert renorm_limits(150, 3.0, 5.0, total_steps=1300) == pytest.approx((1.0 + 2.0 * 100 / 350, 2.5))
    assert renorm_limits(250, 3.0, 5.0, total_steps=1300) == pytest.approx((1.0 + 2.0 * 200 / 350, 5.0))
    assert renorm_limits(400, 3.0, 5.0, total_steps=1300) == (3.0, 5.0)
    # Custom fractions: no BN phase and both limits reached at 40% of 10 steps.
    kw = dict(total_steps=10, bn_fraction=0.0, r_max_fraction=0.4, d_max_fraction=0.4)
    assert renorm_limits(2, 3.0, 5.0, **kw) == pytest.approx((2.0, 2.5))
    layer = BatchRenorm(2, total_steps=26)  # BN for 1 step, d_max at 5 from step 5, r_max at 3 from step 8
    seen = []
    for _ in range(9):
        seen.append(layer.current_limits())
        layer(torch.randn(4, 2))
    expected = [(1.0, 0.0), (1.0, 0.0), (1 + 2 / 7, 1.25), (1 + 4 / 7, 2.5), (1 + 6 / 7, 3.75),
                (1 + 8 / 7, 5.0), (1 + 10 / 7, 5.0), (1 + 12 / 7, 5.0), (3.0, 5.0)]
    assert [pytest.approx(e) for e in expected] == seen
    assert int(layer.renorm_steps) == 9


def test_renorm_gradcheck_with_saturated_clips():
    # r and d carry no gradient; with both clipped they are locally constant, so finite differences agree.
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.full((3,), 10.0, dtype=torch.float64), torch.full((3,), 100.0, dtype=torch.float64)
    fn = lambda x, w, b: batch_renorm(x, rm, rv, w, b, training=True, r_max=2.0, d_max=0.5, momentum=0.0)  # noqa: E731
    assert gradcheck(fn, (x, w, b))


# --- noisy BN and noise ---------------------------------------------------------------------------------

N_MU, N_SIGMA, R_MU, R_SIGMA = 0.5, 1.25, 0.1, 0.1
E_S = (1 + N_SIGMA) / 2  # 1.125
VAR_S = (N_SIGMA - 1) ** 2 / 12 + R_SIGMA**2  # sigma_j ~ U(1, n_sigma), then N(sigma_j, r_sigma^2)
VAR_M = N_MU**2 / 3 + R_MU**2 / 3  # mu_j ~ U(-n_mu, n_mu), then U(mu_j - r_mu, mu_j + r_mu)


def test_noise_moments_match_algorithm_1_per_sample():
    gen = torch.Generator().manual_seed(0)
    draws = [sample_bn_noise((16, 64, 3, 3), generator=gen, per_position=False) for _ in range(400)]
    s = torch.stack([d[0] for d in draws]).double()
    m = torch.stack([d[1] for d in draws]).double()
    assert s.shape == (400, 16, 64, 1, 1)
    assert abs(m.mean().item()) < 0.01
    assert m.var().item() == pytest.approx(VAR_M, rel=0.03)
    assert s.mean().item() == pytest.approx(E_S, abs=0.003)
    assert s.var().item() == pytest.approx(VAR_S, rel=0.03)
    # Within one draw and channel, m_ij stays within r_mu of the channel's mu_j.
    spread = m.amax(dim=1) - m.amin(dim=1)
    assert spread.max().item() <= 2 * R_MU + 1e-6


@pytest.mark.parametrize("shape", [(16, 8, 16, 16), (4, 8, 3, 3)])  # per-channel draws / broadcast path
def test_per_position_noise_moments_match_algorithm_1(shape):
    # The paper's default for conv layers: H and W are batch dimensions, every activation (n, c, h, w) gets
    # its own m and s.
    gen = torch.Generator().manual_seed(0)
    draws = [sample_bn_noise(shape, generator=gen) for _ in range(60 if shape[0] == 16 else 2000)]
    s = torch.stack([d[0] for d in draws]).double()  # (draw, N, C, H, W)
    m = torch.stack([d[1] for d in draws]).double()
    assert s.shape[1:] == shape and m.shape[1:] == shape
    assert s.mean().item() == pytest.approx(E_S, abs=0.01)
    assert s.var().item() == pytest.approx(VAR_S, rel=0.1)
    assert abs(m.mean().item()) < 0.02
    assert m.var().item() == pytest.approx(VAR_M, rel=0.1)
    # Given a draw's channel (mu_j, sigma_j), the activations' noise varies like U(mu_j +- r_mu) and
    # N(sigma_j, r_sigma^2) over samples and positions, and never beyond r_mu of mu_j.
    per_channel = (1, 3, 4)  # within one draw and channel
    assert m.var(dim=per_channel).mean().item() == pytest.approx(R_MU**2 / 3, rel=0.1)
    assert s.var(dim=per_channel).mean().item() == pytest.approx(R_SIGMA**2, rel=0.1)
    spread = m.amax(dim=(1, 3, 4)) - m.amin(dim=(1, 3, 4))
    assert spread.max().item() <= 2 * R_MU + 1e-6
    # positions of one sample and channel do not share a draw
    assert (s.std(dim=(3, 4)) > 1e-4).all() and (m.std(dim=(3, 4)) > 1e-4).all()


def test_noisy_bn_output_is_noise_times_bn_plus_noise_and_eval_is_its_expectation():
    layer = _randomize(NoisyBatchNorm(4))
    ref = nn.BatchNorm2d(4)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(6, 4, 3, 3)
    layer.generator = torch.Generator().manual_seed(3)
    y = layer(x)
    s, m = sample_bn_noise(x.shape, generator=torch.Generator().manual_seed(3))
    assert s.shape == x.shape  # per-position by default
    torch.testing.assert_close(y, s * _by_hand_bn(x, layer.weight, layer.bias) + m)
    ref(x)
    torch.testing.assert_close(layer.running_var, ref.running_var)
    layer.eval(), ref.eval()
    torch.testing.assert_close(layer(x), E_S * ref(x))
    layer.eval_expectation = False
    torch.testing.assert_close(layer(x), ref(x))
    before = _randomize(NoisyBatchNorm(4, noise_after_affine=False)).eval()
    ref.load_state_dict(before.state_dict())
    w, b = before.weight.view(1, -1, 1, 1), before.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(before(x), w * E_S * (ref(x) - b) / w + b)


def test_noisy_bn_per_channel_draws_match_sample_bn_noise_and_autograd():
    # 16 * 16 * 16 = 4096 values per channel: the noise is drawn channel by channel, m into the output
    layer = _randomize(NoisyBatchNorm(4))
    x = torch.randn(16, 4, 16, 16, requires_grad=True)
    layer.generator = torch.Generator().manual_seed(3)
    y = layer(x)
    s, m = sample_bn_noise(x.shape, generator=torch.Generator().manual_seed(3))
    x_ref = x.detach().clone().requires_grad_()
    w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    y_ref = s * F.batch_norm(x_ref, None, None, w, b, training=True) + m
    torch.testing.assert_close(y, y_ref)
    assert y.is_contiguous()
    g = torch.randn_like(y)
    y.backward(g), y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.weight.grad, w.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.bias.grad, b.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["ghost_bn", "noisy_bn"])
def test_fused_layers_under_batched_gradients_and_vmap(name):
    # Their out= / in-place kernels have no vmap batching rule: batched vector-Jacobian products (the batch-
    # coupling probe) and torch.func.vmap must take the functional fallback and give the row-by-row result.
    layer = _randomize(create_norm(name, 3, **({"virtual_batch_size": 4} if name == "ghost_bn" else {})))
    if name == "noisy_bn":
        layer.generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 4, 4, requires_grad=True)
    y = layer(x)
    seeds = torch.randn(5, *y.shape)
    (batched,) = torch.autograd.grad(y, x, grad_outputs=seeds, retain_graph=True, is_grads_batched=True)
    rows = torch.stack([torch.autograd.grad(y, x, s, retain_graph=True)[0] for s in seeds])
    torch.testing.assert_close(batched, rows, atol=1e-5, rtol=1e-4)
    if name == "ghost_bn":  # without running statistics (torch.func cannot mutate captured buffers)
        w, b = layer.weight.detach(), layer.bias.detach()

        def f(x):
            return ghost_batch_norm(x, None, None, w, b, virtual_batch_size=4, training=True).square().sum()

        xs = torch.randn(2, 6, 3, 4, 4)
        per_sample = torch.func.vmap(torch.func.grad(f))(xs)
        torch.testing.assert_close(per_sample, torch.stack([torch.func.grad(f)(xi) for xi in xs]))


def test_fold_bn_keeps_noisy_bn_unless_its_eval_is_plain_bn():
    from normlab.layers import fold_bn

    x = torch.randn(2, 3, 6, 6)
    for expectation, kept in ((True, True), (False, False)):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), _randomize(NoisyBatchNorm(4, eval_expectation=expectation)))
        folded = fold_bn(model.eval())
        assert any(isinstance(m, NoisyBatchNorm) for m in folded.modules()) == kept
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("after", [True, False])
def test_noisy_bn_eval_is_the_expected_training_time_layer_of_a_linear_network(after):
    # Linear -> noisy BN -> Linear with the running statistics set to the batch's (biased) statistics, so
    # training- and evaluation-mode BN normalize alike: the mean of the training-mode output over many noise
    # draws is the evaluation-mode output (the layers after the noise are linear).
    torch.manual_seed(0)
    noisy = _randomize(NoisyBatchNorm(4, dims=1, momentum=0.0, noise_after_affine=after))
    net = nn.Sequential(nn.Linear(5, 4), noisy, nn.Linear(4, 3))
    x = torch.randn(32, 5)
    with torch.no_grad():
        h = net[0](x)
        noisy.running_mean.copy_(h.mean(0))
        noisy.running_var.copy_(h.var(0, correction=0))
        draws = 2000
        mean_train = sum(net(x) for _ in range(draws)) / draws
        expected = net.eval()(x)
        noisy.eval_expectation = False
        clean = net(x)
    torch.testing.assert_close(mean_train, expected, atol=0.04, rtol=0)
    assert (mean_train - clean).abs().max() > 0.1  # dropping the noise without E[s] is not the expectation


def test_noisy_bn_noise_before_affine():
    layer = _randomize(NoisyBatchNorm(4, noise_after_affine=False))
    layer.generator = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, 2, 2)
    y = layer(x)
    s, m = sample_bn_noise(x.shape, generator=torch.Generator().manual_seed(5))
    x_hat = _by_hand_bn(x, torch.ones(4), torch.zeros(4))
    gamma, beta = layer.weight.view(1, -1, 1, 1), layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(y, gamma * (s * x_hat + m) + beta)


def test_noise_layer_is_noise_without_normalization():
    layer = create_norm("noise", 4)
    layer.generator = torch.Generator().manual_seed(7)
    x = torch.randn(6, 4, 3, 3) * 5 + 2
    s, m = sample_bn_noise(x.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(layer(x), s * x + m)
    torch.testing.assert_close(layer.eval()(x), E_S * x)  # the expectation of s * x + m
    layer.eval_expectation = False
    assert torch.equal(layer(x), x)


@pytest.mark.parametrize("after", [True, False])
@pytest.mark.parametrize("per_position", [False, True])
def test_noisy_bn_gradcheck_with_frozen_noise(after, per_position):
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return noisy_batch_norm(x, None, None, w, b, training=True, noise_after_affine=after,
                                per_position=per_position, generator=torch.Generator().manual_seed(0))

    assert gradcheck(fn, (x, w, b))


def test_noisy_bn_without_affine_gradcheck():
    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)

    for after in (True, False):
        def fn(x, after=after):
            return noisy_batch_norm(x, None, None, None, None, training=True, noise_after_affine=after,
                                    generator=torch.Generator().manual_seed(1))

        assert gradcheck(fn, (x,))


@pytest.mark.parametrize("affine", [True, False])
def test_noisy_bn_channel_by_channel_draws_gradcheck(monkeypatch, affine):
    # The per-channel path (noise drawn channel by channel and folded into the output in place, backward in
    # place in dx's buffer) on a tensor small enough for gradcheck: lower the size at which it starts.
    monkeypatch.setattr(noisy_bn_module, "_PER_CHANNEL_MIN_VALUES", 1)
    assert noisy_bn_module._draws_per_channel((4, 3, 2, 2), True, torch.device("cpu"))
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    params = (torch.randn(3, dtype=torch.float64, requires_grad=True),
              torch.randn(3, dtype=torch.float64, requires_grad=True)) if affine else ()

    def fn(x, *wb):
        w, b = wb if affine else (None, None)
        gen = torch.Generator().manual_seed(2)
        return noisy_batch_norm(x, None, None, w, b, training=True, generator=gen)

    assert gradcheck(fn, (x, *params))


@pytest.mark.parametrize("shape", [(16, 4, 16, 16), (4, 3, 3, 3), (6, 3, 5)])  # per-channel / broadcast
@pytest.mark.parametrize("per_position", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_noisy_bn_fused_equals_unfused_reference(shape, per_position, affine):
    # _NoisyBNFn (BN written into the output, noise folded in place, backward in place in dx's buffer)
    # against the unfused formula on the same draws: s * F.batch_norm(x) + m, autograd through plain ops.
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    if len(shape) == 4 and shape[0] == 16:
        x = x.contiguous(memory_format=torch.channels_last)  # the kernels' other layout
    x.requires_grad_()
    layer = _randomize(NoisyBatchNorm(shape[1], dims=len(shape) - 2, per_position=per_position,
                                      affine=affine)).double()
    layer.generator = torch.Generator().manual_seed(4)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    y = layer(x)
    s, m = sample_bn_noise(shape, per_position=per_position, generator=torch.Generator().manual_seed(4),
                           dtype=torch.float64)
    x_ref = x.detach().clone().requires_grad_()
    w = b = None
    if affine:
        w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    y_ref = s * F.batch_norm(x_ref, rm, rv, w, b, training=True, momentum=0.1) + m
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(layer.running_mean, rm)
    torch.testing.assert_close(layer.running_var, rv)
    g = torch.randn_like(y)
    y.backward(g), y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    if affine:
        torch.testing.assert_close(layer.weight.grad, w.grad)
        torch.testing.assert_close(layer.bias.grad, b.grad)


def test_noisy_bn_scratch_buffer_shared_by_stacked_layers_and_repeated_backward():
    # Two noisy BN layers in a row both draw m into, and multiply dy * s into, the one reused scratch buffer;
    # a second backward through the retained graph must see the same s (saved, never the scratch).
    layers = [_randomize(NoisyBatchNorm(4)).double() for _ in range(2)]
    for seed, layer in enumerate(layers):
        layer.generator = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, 16, 16, dtype=torch.float64, requires_grad=True)  # per-channel draws
    y = layers[1](layers[0](x))
    x_ref = ref = x.detach().clone().requires_grad_()
    for seed, layer in enumerate(layers):
        s, m = sample_bn_noise(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        ref = s * F.batch_norm(ref, None, None, layer.weight.detach(), layer.bias.detach(), training=True) + m
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    (first,) = torch.autograd.grad(y, x, g, retain_graph=True)
    (second,) = torch.autograd.grad(y, x, g)
    (expected,) = torch.autograd.grad(ref, x_ref, g)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)


def test_noisy_bn_saves_only_x_gamma_s_and_the_statistics():
    # Backward of s * a + m w.r.t. a is s: the graph keeps x, gamma, s and two (C,) statistics, no BN
    # output, no m (each would be one more tensor of x's size held until backward).
    layer = NoisyBatchNorm(4)
    x = torch.randn(16, 4, 16, 16, requires_grad=True)
    saved = layer(x).grad_fn.saved_tensors
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(saved) == 5 and len(big) == 2
    assert big[0] is x or big[0].data_ptr() == x.data_ptr()


def test_ghost_bn_without_affine_or_with_frozen_gamma_gradcheck():
    x = torch.randn(7, 3, 2, dtype=torch.float64, requires_grad=True)
    bare = lambda x: ghost_batch_norm(x, None, None, None, None, virtual_batch_size=3, training=True)  # noqa: E731
    assert gradcheck(bare, (x,))
    w = torch.randn(3, dtype=torch.float64)  # no gradient wanted for gamma
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x, b: ghost_batch_norm(x, None, None, w, b, virtual_batch_size=3, training=True),
                     (x, b))


def test_ghost_and_frozen_bn_gradcheck():
    x = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    def ghost(x, w, b):
        return ghost_batch_norm(x, None, None, w, b, virtual_batch_size=4, training=True)

    assert gradcheck(ghost, (x, w, b))
    frozen = _randomize(FrozenBatchNorm(3)).double()
    assert gradcheck(frozen, (x,))


# --- EvalNorm ---------------------------------------------------------------------------------------------

def test_evalnorm_sample_weight_0_is_bn_and_training_is_bn():
    ev, bn = _randomize(EvalNorm(4)), nn.BatchNorm2d(4)
    bn.load_state_dict(ev.state_dict(), strict=False)
    x = torch.randn(6, 4, 3, 3)
    torch.testing.assert_close(ev(x), bn(x))
    torch.testing.assert_close(ev.running_var, bn.running_var)
    ev.eval(), bn.eval()
    torch.testing.assert_close(ev(x), bn(x))


def test_evalnorm_blend_by_hand_and_weight_1_is_instance_norm():
    ev = _randomize(EvalNorm(4, sample_weight=1.0)).eval()
    x = torch.randn(3, 4, 5, 5)
    expected = F.instance_norm(x, weight=ev.weight, bias=ev.bias, eps=1e-5)
    torch.testing.assert_close(ev(x), expected, atol=1e-5, rtol=1e-5)
    a, b = 0.3, 0.6
    var_x, mu_x = torch.var_mean(x, dim=(2, 3), correction=0, keepdim=True)
    rm, rv = ev.running_mean.view(1, -1, 1, 1), ev.running_var.view(1, -1, 1, 1)
    mu, var = a * mu_x + (1 - a) * rm, b * var_x + (1 - b) * rv
    expected = (x - mu) / torch.sqrt(var + 1e-5) * ev.weight.view(1, -1, 1, 1) + ev.bias.view(1, -1, 1, 1)
    got = eval_norm(x, ev.running_mean, ev.running_var, ev.weight, ev.bias, alpha=a, beta=b)
    torch.testing.assert_close(got, expected)


def test_evalnorm_gradcheck():
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5
    assert gradcheck(lambda x, w, b: eval_norm(x, rm, rv, w, b, alpha=0.3, beta=0.6), (x, w, b))


def test_fit_evalnorm_recovers_one_over_batch_size():
    # A single EvalNorm on i.i.d. samples whose running statistics are the population ones: a sample has
    # weight 1/B in its batch mean, so the least-squares blend weight a is 1/B.
    torch.manual_seed(0)
    B = 4
    model = nn.Sequential(EvalNorm(8)).eval()
    model[0].running_mean.fill_(0.0)
    model[0].running_var.fill_(1.0 + 0.25)  # per-sample means ~N(0, 1), within-sample noise var 0.25
    batches = [torch.randn(B, 8, 1, 1) + 0.5 * torch.randn(B, 8, 6, 6) for _ in range(300)]
    fit_evalnorm(model, batches)
    assert float(model[0].alpha) == pytest.approx(1 / B, abs=0.03)
    assert 0.0 <= float(model[0].beta) <= 1.0
    assert not model.training and torch.equal(model[0].running_var, torch.full((8,), 1.25))


def test_fit_evalnorm_two_batches_by_hand():
    model = nn.Sequential(_randomize(EvalNorm(3)))
    batches = [torch.randn(4, 3, 5) + 3.0, torch.randn(4, 3, 5) - 1.0]
    fit_evalnorm(model, batches)
    ev = model[0]
    sd = torch.sqrt(ev.running_var + ev.eps)  # the EMA is the same for both batches (and restored)
    num = den = 0.0
    for x in batches:
        mu_x, mu_b = x.mean(dim=2), x.mean(dim=(0, 2))
        dx, db = (mu_x - ev.running_mean) / sd, (mu_b - ev.running_mean) / sd
        num, den = num + (dx * db).sum(), den + (dx * dx).sum()
    expected = (num / den).clamp(0, 1)
    assert float(ev.alpha) == pytest.approx(expected.item(), rel=1e-5)
    assert model.training


# --- bad input ---------------------------------------------------------------------------------------------

def test_unknown_name_lists_valid_norms():
    with pytest.raises(NormlabError, match=r"unknown norm 'batchnorm'; valid norms: .*ghost_bn"):
        create_norm("batchnorm", 4)


@pytest.mark.parametrize("name,option,value,text", [
    ("ghost_bn", "virtual_batch_size", 1, "virtual_batch_size must be an int >= 2, got 1"),
    ("ghost_bn", "momentum", 1.5, "momentum must be in [0, 1] or None, got 1.5"),
    ("batch_renorm", "r_max", 0.5, "r_max must be a finite number >= 1, got 0.5"),
    ("batch_renorm", "d_max", -1.0, "d_max must be a finite number >= 0, got -1.0"),
    ("batch_renorm", "total_steps", 0, "total_steps must be a positive int or None, got 0"),
    ("batch_renorm", "bn_fraction", 1.5, "bn_fraction must be a number in [0, 1], got 1.5"),
    ("batch_renorm", "d_max_fraction", 0.01, "d_max_fraction must be >= bn_fraction (0.0384615), got 0.01"),
    ("noisy_bn", "n_sigma", 0.9, "n_sigma must be a finite number >= 1, got 0.9"),
    ("noisy_bn", "r_sigma", -0.1, "r_sigma must be a finite number >= 0, got -0.1"),
    ("noise", "n_mu", math.inf, "n_mu must be a finite number >= 0, got inf"),
    ("evalnorm", "sample_weight", 1.5, "sample_weight must be a number in [0, 1], got 1.5"),
    ("frozen_bn", "eps", 0.0, "eps must be > 0, got 0.0"),
    ("frozen_bn", "dims", 4, "dims must be 1, 2 or 3, got 4"),
    ("ghost_bn", "bogus", 1, "unknown option(s) bogus for norm 'ghost_bn'; valid options: virtual_batch"),
])
def test_bad_option_values(name, option, value, text):
    with pytest.raises(NormlabError) as err:
        create_norm(name, 4, **{option: value})
    assert text in str(err.value)


@pytest.mark.parametrize("name", ["ghost_bn", "batch_renorm", "noisy_bn", "evalnorm"])
def test_one_value_per_channel_in_training_raises(name):
    layer = create_norm(name, 4, dims=1)
    with pytest.raises(NormlabError, match="expected more than 1 value per channel when training"):
        layer(torch.randn(1, 4))
    layer.eval()(torch.randn(1, 4))  # evaluation uses running statistics: fine


def test_ghost_batch_of_one_value_raises():
    with pytest.raises(NormlabError, match="more than 1 value per channel"):
        ghost_batch_norm(torch.randn(5, 3), None, None, None, None, virtual_batch_size=2, training=True)


@pytest.mark.parametrize("name", CUSTOM)
def test_wrong_channel_count_names_expected_and_got(name):
    layer = create_norm(name, 8)
    with pytest.raises(NormlabError, match=r"expected 8 channels \(input.shape\[1\]\), got 3"):
        layer(torch.randn(4, 3, 2, 2))


def test_wrong_rank_raises():
    with pytest.raises(NormlabError, match=r"got shape \(4,\)"):
        create_norm("ghost_bn", 4)(torch.randn(4))
