"""Slow scientific checks of normlab.models against published numbers (run with ``pytest -m slow``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normlab.data import BatchIterator, load_dataset
from normlab.models import create_model


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["none", "bn"])
def test_mnist1d_cnn_reaches_the_papers_accuracy(norm: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    # Greydanus 2020 (MNIST-1D README / paper Table 1): the CNN reaches ~94% test accuracy. Their recipe:
    # Adam, lr 1e-2, batch 100. 3000 steps here (75 epochs) already gives 93-94% (measured: none 0.937,
    # bn 0.931 at seed 0); 0.90 leaves room for seeds and BLAS differences.
    ds = load_dataset("mnist1d", root=tmp_path_factory.mktemp("mnist1d"))
    torch.manual_seed(0)
    model = create_model("cnn", norm=norm)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = BatchIterator(ds.x_train, ds.y_train, 100, seed=0)
    for _ in range(3000):
        x, y = batches.next_batch()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
    assert accuracy >= 0.90
