import pytest
import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.probes import batch_dependence


def _net(norm: str) -> nn.Sequential:
    layer = {
        "none": nn.Identity(),
        "gn": nn.GroupNorm(2, 4),
        "ln": nn.GroupNorm(1, 4),
        "bn": nn.BatchNorm1d(4),
    }[norm]
    return nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), layer, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5, 3))


@pytest.mark.parametrize("norm", ["none", "gn", "ln"])
def test_independent_examples_give_zero(norm):
    result = batch_dependence(_net(norm), torch.randn(6, 2, 5), num_examples=6)
    assert result.coupling <= 1e-7 and result.max_coupling <= 1e-7 and len(result.per_example) == 6


def test_bn_train_mode_couples_examples_and_eval_mode_does_not():
    net = _net("bn")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(6, 2, 5)
    train = batch_dependence(net, x, num_examples=3)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert train.coupling > 1e-2 and train.mode == "train"
    # Independent computation: the full Jacobian (N, K, N, D) by torch.autograd.functional.jacobian.
    net.train()
    jac = torch.autograd.functional.jacobian(lambda inp: net(inp), x).double()
    net.load_state_dict(before)
    for i in range(3):
        norms = jac[i].permute(1, 0, 2, 3).reshape(6, -1).norm(dim=1)
        expected = torch.cat([norms[:i], norms[i + 1 :]]).mean() / norms[i]
        assert train.per_example[i] == pytest.approx(expected.item(), rel=1e-5)
    assert train.coupling == pytest.approx(sum(train.per_example) / 3)
    assert batch_dependence(net, x, mode="eval").coupling <= 1e-7


def test_batch_dependence_bad_input():
    with pytest.raises(NormlabError, match="too small for mode='train'"):
        batch_dependence(_net("bn"), torch.randn(1, 2, 5))
    with pytest.raises(NormlabError, match="at least 2 examples, got 1"):
        batch_dependence(_net("gn"), torch.randn(1, 2, 5))
    with pytest.raises(NormlabError, match="x must be floating, got torch.int64"):
        batch_dependence(_net("gn"), torch.ones(3, 2, 5, dtype=torch.long))
    with pytest.raises(NormlabError, match="num_examples must be a positive int, got 0"):
        batch_dependence(_net("gn"), torch.randn(3, 2, 5), num_examples=0)
