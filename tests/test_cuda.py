"""The CUDA path: a training step, batched members, BN folding and crossval's ``torch-cuda`` backend on a GPU.

Skipped where CUDA is not available (this project's CPUs and CI); run them on a GPU machine with
``pytest tests/test_cuda.py`` (``benchmarks/gpu_session.sh`` runs them with the GPU benchmark). Each
compares the GPU against the exact computation it should reproduce: the same run on the GPU trained alone
(batched members), the unfolded model (folding), the float64 oracle (crossval). TF32 is switched off where a
test compares float32 results to 1e-5 (cuDNN's default TF32 convolutions round to ~1e-3).
"""

from __future__ import annotations

import math

import pytest
import torch

from normlab.crossval import LayerSpec, crossval_layer
from normlab.crossval.backends import get_backend

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available here")


@pytest.fixture
def exact_float32():
    """No TF32 for the duration of a test (matmul and cuDNN), restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_torch_cuda_backend_says_why_it_is_skipped_without_cuda(monkeypatch):
    # Runs everywhere: on a machine without CUDA the backend is skipped with that reason, never an error.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_backend("torch-cuda").unavailable() == (
        "backend 'torch-cuda' skipped: CUDA is not available here (no GPU or a CPU-only torch)")
    layer = crossval_layer(LayerSpec(kind="bn", mode="train", steps=2), "numpy,torch-cuda")
    assert [(s.name, s.status) for s in layer.backends] == [("numpy", "ok"), ("torch-cuda", "skipped")]


@needs_cuda
def test_a_training_run_on_cuda_learns_and_records_the_device(tmp_path):
    from normlab.store import Store
    from normlab.train import TrainConfig, train

    config = TrainConfig(model="cnn", norm="bn", device="cuda", steps=200, batch_size=64, lr=0.05,
                         subset=1024, log_every=20, eval_every=100)
    with Store(tmp_path / "runs.sqlite") as store:
        result = train(config, store=store, progress=False)
        run = store.runs()[0]
    assert result.status == "finished" and math.isfinite(result.final_train_loss)
    assert result.final_train_loss < math.log(10) - 0.5  # it learned: well below chance's ln(10) = 2.30
    assert "cuda" in str(run.environment.get("device", "")).lower()


@needs_cuda
def test_batched_members_on_cuda_equal_their_runs_alone(tmp_path, exact_float32):
    from normlab.batched import train_batched
    from normlab.store import Store
    from normlab.train import TrainConfig, Trainer

    base = TrainConfig(subset=512, batch_size=16, steps=24, width=6, log_every=4, eval_every=12,
                       eval_train_samples=128, norm="bn", optimizer="sgd", device="cuda")
    configs = [base.replace(seed=0, lr=0.05), base.replace(seed=1, lr=0.2)]
    with Store(tmp_path / "runs.sqlite") as store:
        results = train_batched(configs, store=store)
    for config, batched in zip(configs, results, strict=True):
        alone = Trainer(config, progress=False).fit()
        assert batched.status == alone.status == "finished" and batched.steps == alone.steps
        for name in ("final_train_loss", "final_test_acc", "test_acc_eval_mode"):
            assert getattr(batched, name) == pytest.approx(getattr(alone, name), abs=1e-4), name


@needs_cuda
def test_bn_folding_on_cuda_equals_the_unfolded_model(exact_float32):
    from normlab.layers.fold_bn import fold_bn
    from normlab.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", norm="bn", num_classes=10, in_channels=3, dims=2).cuda()
    with torch.no_grad():  # non-trivial running statistics, so folding has something to fold
        model.train()
        for _ in range(3):
            model(torch.randn(32, 3, 16, 16, device="cuda"))
    model.eval()
    x = torch.randn(8, 3, 16, 16, device="cuda")
    folded = fold_bn(model)
    with torch.no_grad():
        want, got = model(x), folded(x)
    assert got.device.type == "cuda"
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()


@needs_cuda
def test_crossval_torch_cuda_agrees_with_the_oracle(exact_float32):
    layer = crossval_layer(LayerSpec(kind="bn", mode="train", steps=2), "numpy,torch,torch-cuda")
    assert [s.status for s in layer.backends] == ["ok", "ok", "ok"]
    assert not layer.inconsistent
    assert layer.pair("numpy", "torch-cuda").max_abs < 1e-5
