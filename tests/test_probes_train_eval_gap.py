import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from normlab.errors import NormlabError
from normlab.probes import train_eval_gap, train_eval_gap_curve


def _mlp(norm: str, dropout: float = 0.0) -> nn.Sequential:
    layer = {"bn": nn.BatchNorm1d(8), "gn": nn.GroupNorm(2, 8), "none": nn.Identity()}[norm]
    return nn.Sequential(nn.Linear(5, 8), layer, nn.ReLU(), nn.Linear(8, 3), nn.Dropout(dropout))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def _trained_bn():
    torch.manual_seed(1)
    model = _mlp("bn")
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
    return model


def _by_hand(model, x, batch_size):
    """The two forward passes written out with F.batch_norm's formula (biased batch var vs running)."""
    lin1, bn, _, lin2, _ = model
    logp, logq = [], []
    for i in range(0, x.shape[0] - batch_size + 1, batch_size):
        h = lin1(x[i : i + batch_size])
        mu, var = h.mean(0), h.var(0, unbiased=False)
        train_h = (h - mu) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
        eval_h = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        logp.append(F.log_softmax(lin2(F.relu(train_h)), 1))
        logq.append(F.log_softmax(lin2(F.relu(eval_h)), 1))
    return torch.cat(logp), torch.cat(logq)


def test_bn_gap_matches_hand_computation_and_leaves_model_untouched():
    model = _trained_bn()
    model.eval()
    x, y = torch.randn(50, 5), torch.randint(0, 3, (50,))
    before, flags = _snapshot(model)
    gap = train_eval_gap(model, x, y, batch_size=16)
    with torch.no_grad():
        logp, logq = _by_hand(model, x, 16)
    yy = y[:48]
    kl = (logp.exp() * (logp - logq)).sum(1).mean().item()
    acc_t = (logp.argmax(1) == yy).float().mean().item()
    acc_e = (logq.argmax(1) == yy).float().mean().item()
    assert gap.num_examples == 48 and gap.batch_size == 16 and gap.mode == "train_vs_eval"
    assert gap.kl == pytest.approx(kl, rel=1e-5, abs=1e-7) and gap.kl > 1e-3
    assert gap.acc_train_mode == pytest.approx(acc_t) and gap.acc_eval_mode == pytest.approx(acc_e)
    assert gap.acc_gap == pytest.approx(acc_t - acc_e)
    after, flags_after = _snapshot(model)
    assert flags_after == flags
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. running stats, num_batches_tracked
    d = gap.to_dict()
    assert d["acc_eval_precise"] is None and isinstance(d["kl"], float)


@pytest.mark.parametrize("norm", ["gn", "none"])
def test_gap_is_zero_without_batch_statistics(norm):
    model = _mlp(norm, dropout=0.5)  # dropout stays in eval mode: the gap is BN's alone
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    gap = train_eval_gap(model, x, y, batch_size=8)
    assert gap.kl == pytest.approx(0.0, abs=1e-7)
    assert gap.acc_gap == 0.0


def test_curve_sweeps_batch_sizes():
    model = _trained_bn()
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    curve = train_eval_gap_curve(model, x, y, [2, 8, 64])
    assert curve.batch_sizes == [2, 8, 64]
    for b, kl in zip(curve.batch_sizes, curve.kl, strict=True):
        assert kl == pytest.approx(train_eval_gap(model, x, y, batch_size=b).kl, rel=1e-6)
    assert all(math.isfinite(k) for k in curve.kl)


def test_precise_bn_recalibration_on_a_copy():
    layers = pytest.importorskip("normlab.layers")
    if not hasattr(layers, "precise_bn"):
        pytest.skip("normlab.layers.precise_bn has not landed")
    model = _trained_bn()
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    before, _ = _snapshot(model)
    calib = [torch.randn(32, 5) * 0.5 for _ in range(4)]
    gap = train_eval_gap(model, x, y, batch_size=16, recalibrate=calib)
    # PreciseBN = the population statistics of all calibration batches combined (Wu & Johnson 2021,
    # Appendix; fvcore's _PopulationVarianceEstimator): E[x] and E[x^2] - E[x]^2; eval logits by hand.
    with torch.no_grad():
        h = torch.cat([model[0](c) for c in calib])
        mean, var = h.mean(0), h.var(0, unbiased=False)
        bn = model[1]
        z = model[0](x)
        zn = (z - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
        logq = F.log_softmax(model[3](F.relu(zn)), 1)
        logp, _ = _by_hand(model, x, 16)
    kl = (logp.exp() * (logp - logq)).sum(1).mean().item()
    assert gap.kl_precise == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert gap.acc_eval_precise == pytest.approx((logq.argmax(1) == y).float().mean().item())
    after, _ = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_input_messages():
    model = _mlp("bn")
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    with pytest.raises(NormlabError, match="too small for mode='train'"):
        train_eval_gap(model, x, y, batch_size=1)
    with pytest.raises(NormlabError, match="batch_size=20 is larger than the 10 examples"):
        train_eval_gap(model, x, y, batch_size=20)
    with pytest.raises(NormlabError, match="batch_size must be a positive int, got 0"):
        train_eval_gap(model, x, y, batch_size=0)
    with pytest.raises(NormlabError, match="class labels must be a 1-D integer tensor"):
        train_eval_gap(model, x, torch.randn(10), batch_size=5)
    with pytest.raises(NormlabError, match="targets must be a tensor with 10 rows"):
        train_eval_gap(model, x, y[:4], batch_size=5)
    with pytest.raises(NormlabError, match="batch_sizes must name at least one"):
        train_eval_gap_curve(model, x, y, [])
