"""``ProbeCallback`` in a real ``lightning.Trainer.fit`` on CPU: the probes it logs equal the probe functions
called on the same state (the same model, optimizer and batches, at the same hook), and reach the
trainer's logger at their step."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")

from normlab.probes import ics, landscape  # noqa: E402
from normlab.probes.lightning import ProbeCallback  # noqa: E402

PROBES = {"ics": 2, "landscape": (4, {"num_points": 2})}


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Direct(L.Callback):
    """After the ProbeCallback, at the same hooks: the probe functions on the state it just saw."""

    def __init__(self) -> None:
        self.taken, self.seen, self.results = None, 0, {}

    def _measure(self, trainer, module, upcoming):
        step, optimizer = trainer.global_step, trainer.optimizers[0]
        self.seen = step
        if step % 2 == 0:
            self.results[("ics", step)] = ics(module, optimizer, upcoming, F.cross_entropy)
        if step % 4 == 0:
            self.results[("landscape", step)] = landscape(module, upcoming, F.cross_entropy,
                                                          optimizer=optimizer, num_points=2)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.taken is not None and trainer.global_step > self.seen:
            self._measure(trainer, module, (batch[0], batch[1]))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.taken = (batch[0], batch[1])

    def on_train_end(self, trainer, module):
        if trainer.global_step > self.seen:
            self._measure(trainer, module, self.taken)


def test_lightning_fit_logs_the_probe_functions_numbers(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g))
    probe, direct = ProbeCallback(F.cross_entropy, probes=PROBES), Direct()
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name="csv"),
        callbacks=[probe, direct], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(Classifier(), DataLoader(data, batch_size=16))
    assert sorted(direct.results) == [("ics", 2), ("ics", 4), ("landscape", 4)]
    history = probe.watch.history
    for (name, step), result in direct.results.items():
        scalars = result.scalars()
        assert len(scalars) > 4
        for key, value in scalars.items():  # exact: the same functions on the same state
            assert (step, value) in history[f"probe/{name}/{key}"], (name, key)
    # Step 4 is the last: measured at on_train_end on its own batch, whole result as the function's.
    assert probe.watch.last["landscape"].to_dict() == direct.results[("landscape", 4)].to_dict()
    cos = history["probe/ics/cos/net.3"]
    assert [s for s, _ in cos] == [2, 4] and all(v < 1 - 1e-6 for _, v in cos)  # a layer with ICS
    # The trainer's logger got each value at its step.
    (metrics,) = (tmp_path / "csv").rglob("metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("probe/ics/cos/net.3")]
    assert [(int(r["step"]), float(r["probe/ics/cos/net.3"])) for r in rows] == cos
