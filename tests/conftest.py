import os

import pytest
import torch

# Two cores in CI: keep each test on one thread so the suite's timing is predictable.
torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    # The CLI sets the process's thread count (normlab.train.threads); tests run in one process.
    torch.set_num_threads(1)
