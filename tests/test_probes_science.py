"""Scientific checks of the probes on normlab's models at initialization (slow tier: -m slow).

Each asserts a qualitative finding of the paper the probe comes from, on numbers far from the threshold."""

import math

import pytest
import torch

from normlab.models import create_model
from normlab.probes import example_similarity, residual_scale, signal_propagation, train_eval_gap_curve

pytestmark = pytest.mark.slow


def _resnet56(norm: str, **options):
    torch.manual_seed(0)
    return create_model("resnet", norm=norm, in_channels=1, dims=1, depth=56, **options)


def test_spp_mean_shift_grows_without_normalization_and_bn_resets_it():
    """Brock, De & Smith 2021a Fig. 1: in an unnormalized ReLU ResNet the squared channel mean grows with
    depth; BN resets it in every block."""
    plain = signal_propagation(_resnet56("none"), input_shape=(1, 64), batch_size=32)
    bn = signal_propagation(_resnet56("bn"), input_shape=(1, 64), batch_size=32)
    sq_plain = list(plain.avg_sq_mean.values())
    assert sq_plain[-1] > 1000 * max(sq_plain[4], 1e-3)
    assert max(bn.avg_sq_mean.values()) < 20
    assert plain.avg_var["stages.2.8"] > 100 * bn.avg_var["stages.2.8"]


def test_spp_nf_resnet_variance_grows_by_alpha_squared_per_block():
    """NF-ResNets (Brock et al. 2021a Sec. 4): with the skip gain at 1, the block outputs' average channel
    variance grows by alpha^2 per block inside a stage, from ~1 (here checked on the first stage)."""
    torch.manual_seed(0)
    model = create_model("nf_resnet", norm="nf", in_channels=1, dims=1, depth=20, skip_gain_init=1.0)
    spp = signal_propagation(model, input_shape=(1, 128), batch_size=64)
    first_stage = [spp.avg_var[f"stages.0.{j}"] for j in range(3)]
    for j, value in enumerate(first_stage):
        assert value == pytest.approx(1 + (j + 1) * 0.2**2, rel=0.15)


def test_bn_downscales_residual_branches_with_depth_and_skipinit_zeroes_them():
    """De & Smith 2020 Sec. 2: in a BN ResNet at init the branch / skip std ratio falls like 1/sqrt(k) along
    a stage (the skip path accumulates every earlier branch); SkipInit(0) makes every block the identity."""
    ratios = residual_scale(_resnet56("bn"), input_shape=(1, 64), batch_size=32).ratio
    stage = [ratios[f"stages.1.{j}"] for j in range(1, 9)]
    assert stage[-1] < 0.6 * stage[0]
    # ratio_k * sqrt(k) roughly constant: within a factor 2 from block 2 to block 9 of the stage
    scaled = [r * math.sqrt(k + 1) for k, r in enumerate(stage, start=1)]
    assert max(scaled) < 2 * min(scaled)
    skipinit = residual_scale(_resnet56("none", skipinit=True), input_shape=(1, 64), batch_size=32)
    assert all(r == 0.0 for r in skipinit.ratio.values())


def test_examples_become_alike_without_normalization():
    """Rank collapse (Brock et al. 2021a Sec. 2; De & Smith 2020): deep unnormalized ReLU ResNets map
    different inputs to nearly parallel activations at init; BN keeps them apart."""
    plain = example_similarity(_resnet56("none"), input_shape=(1, 64), batch_size=64)
    bn = example_similarity(_resnet56("bn"), input_shape=(1, 64), batch_size=64)
    assert plain.mean_cosine["stages.2.8"] > 0.8
    assert bn.mean_cosine["stages.2.8"] < 0.5


def test_train_eval_gap_grows_as_the_normalization_batch_shrinks():
    """Wu & Johnson 2021 Sec. 3: the train/eval inconsistency of BN grows as the batch shrinks."""
    from normlab.train import TrainConfig, Trainer

    config = TrainConfig(model="mlp", norm="bn", dataset="synthetic", steps=150, batch_size=32, log_every=50)
    trainer = Trainer(config, progress=False)
    trainer.fit()
    x, y = trainer.data.x_train, trainer.data.y_train
    curve = train_eval_gap_curve(trainer.model, x, y, [2, 8, 64, 256])
    assert curve.kl[0] > curve.kl[1] > curve.kl[2]
    assert curve.kl[0] > 5 * curve.kl[3]
