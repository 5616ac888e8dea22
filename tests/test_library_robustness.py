"""Library numerics under hostile values (issue 15, item 12): create_norm option types, fp16/bf16 output
dtypes, and AGC with non-finite, empty and sparse gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.layers import create_norm
from normlab.optim import adaptive_clip_grad_


@pytest.mark.parametrize(
    ("norm", "options", "message"),
    [
        ("bn", {"eps": "1e-5"}, "norm 'bn': eps must be a number, got str '1e-5'"),
        ("bn", {"momentum": "0.1"}, "norm 'bn': momentum must be a number, got str '0.1'"),
        ("gn", {"eps": True}, "norm 'gn': eps must be a number, got bool True"),
        ("bn", {"eps": math.inf}, "norm 'bn': eps must be finite, got inf"),
        ("ln", {"eps": math.inf}, "norm 'ln': eps must be finite, got inf"),
        ("bn", {"affine": "no"}, "norm 'bn': affine must be True or False, got str 'no'"),
        ("gn", {"affine": math.nan}, "norm 'gn': affine must be True or False, got float nan"),
        ("in", {"affine": -1}, "norm 'in': affine must be True or False, got int -1"),
        ("noise", {"per_position": "yes"}, "norm 'noise': per_position must be True or False"),
        ("noisy_bn", {"noise_after_affine": 0}, "noise_after_affine must be True or False, got int 0"),
        ("noisy_bn", {"n_sigma": 1e300}, "n_sigma must be <= 10000 (float32 activations overflow beyond)"),
        ("noise", {"r_mu": 1e6}, "r_mu must be <= 10000"),
    ],
)
def test_create_norm_refuses_loose_option_types(norm, options, message):
    with pytest.raises(NormlabError) as info:
        create_norm(norm, 4, **options)
    assert message in str(info.value)


def test_valid_options_still_build():
    assert create_norm("bn", 4, eps=1e-3, momentum=None, affine=False).eps == 1e-3
    assert create_norm("noisy_bn", 4, n_sigma=2, per_position=True).per_position is True


@pytest.mark.parametrize("norm", ["batch_renorm", "frozen_bn", "noisy_bn", "bn"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_keeps_its_dtype(norm, dtype):
    layer = create_norm(norm, 4)  # float32 parameters and buffers, as under autocast
    x = torch.randn(8, 4, 3, 3).to(dtype).requires_grad_()
    y = layer(x)
    assert y.dtype == dtype
    reference = layer(x.detach().float())  # same computation in float32 (noise: fresh draw, compare shape)
    if norm in ("frozen_bn", "bn", "batch_renorm"):
        layer.eval()
        torch.testing.assert_close(layer(x.detach()).float(), layer(x.detach().float()), atol=2e-2, rtol=2e-2)
    assert reference.dtype == torch.float32
    if norm in ("frozen_bn", "bn"):  # the fused backward of batch_renorm/noisy_bn needs one dtype on CPU
        y.float().sum().backward()
        assert x.grad.dtype == dtype


def _param(grad: torch.Tensor, weight: torch.Tensor | None = None) -> nn.Parameter:
    p = nn.Parameter(torch.ones_like(grad) if weight is None else weight)
    p.grad = grad.clone()
    return p


def test_agc_propagates_non_finite_gradients_unchanged():
    grad = torch.tensor([[math.inf, 1.0], [math.nan, 1.0], [100.0, 0.0], [-math.inf, 0.0]])
    p = _param(grad)
    adaptive_clip_grad_([p], clip=0.01, eps=1e-3)
    assert p.grad[0].tolist() == [math.inf, 1.0]  # inf stays inf (0 * inf would have made it NaN)
    assert math.isnan(p.grad[1, 0]) and p.grad[1, 1] == 1.0
    assert p.grad[3].tolist() == [-math.inf, 0.0]
    # The finite unit is clipped as the formula says: clip * ||W_i|| / ||G_i|| * G_i.
    torch.testing.assert_close(p.grad[2], torch.tensor([0.01 * math.sqrt(2), 0.0]))


def test_agc_skips_empty_tensors():
    for shape in [(0,), (0, 3), (3, 0), (0, 2, 3, 3)]:
        p = _param(torch.zeros(shape))
        adaptive_clip_grad_([p, _param(torch.full((2, 2), 10.0))], clip=0.01)
        assert p.grad.shape == torch.Size(shape)


def test_agc_clips_sparse_gradients_per_row_like_the_dense_ones():
    torch.manual_seed(0)
    dense = nn.Embedding(6, 3)
    sparse = nn.Embedding(6, 3, sparse=True)
    sparse.weight.data.copy_(dense.weight.data)
    ids = torch.tensor([1, 1, 4])
    for emb in (dense, sparse):
        (emb(ids).sum() * 100).backward()
        adaptive_clip_grad_(emb.parameters(), clip=0.01, eps=1e-3)
    assert sparse.weight.grad.is_sparse
    torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad)
    norms = sparse.weight.grad.to_dense().norm(dim=1)
    torch.testing.assert_close(norms[[1, 4]], 0.01 * dense.weight.detach().norm(dim=1)[[1, 4]])
