"""Probes in the user's own loop (``normlab.probes.watch``) and ``normlab train --probe``: the same numbers as
normlab's trainer-side ``ProbeSchedule`` and as the probe functions called on the same state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _cli import cli
from torch import nn

from normlab.errors import NormlabError
from normlab.probes import ProbeSchedule, Watch, ics, landscape, watch
from normlab.probes.watcher import probe_intervals
from normlab.store import Store
from normlab.train import TrainConfig, Trainer

PROBES = {
    "activation_stats": 2,
    "train_eval_gap": 4,
    "landscape": (4, {"num_points": 2}),
    "ics": 4,
    "batch_dependence": (4, {"num_examples": 2}),
}


def _config(**overrides):
    values = dict(model="mlp", norm="bn", dataset="synthetic", steps=8, batch_size=16, log_every=4,
                  subset=128)
    values.update(overrides)
    return TrainConfig(**values)


def test_watch_gives_the_trainer_schedules_numbers_on_the_same_state():
    trainer = Trainer(_config(), progress=False)
    ProbeSchedule(PROBES).attach(trainer)
    watches = []

    def alongside(ctx):  # after the schedule, at every step: the watch decides what is due
        if not watches:
            watches.append(Watch(ctx.model, ctx.optimizer, ctx.loss_fn, probes=PROBES))
        watches[0].step(ctx.batch, ctx.next_batch(), step=ctx.step)

    trainer.add_callback(alongside, 1)
    trainer.fit()
    (hook,) = watches
    probed = {name: series for name, series in trainer.history.items() if name.startswith("probe/")}
    assert any(n.startswith("probe/ics/cos/") for n in probed) and "probe/landscape/loss_max" in probed
    assert dict(hook.history) == probed  # bit for bit: the same runners on the same model and batches
    assert hook.history["probe/landscape/loss_max"][-1][0] == 8


def _loop_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_watch_in_a_plain_loop_equals_the_probe_functions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hook = watch(model, optimizer, F.cross_entropy, every=2, probes=["ics", "landscape:4"])
    x, y = _loop_data()
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    direct = {}
    for i, (xb, yb) in enumerate(batches):
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        following = batches[(i + 1) % len(batches)]
        done = hook.step((xb, yb), next_batch=following)
        if hook.steps % 2 == 0:
            direct[hook.steps] = ics(model, optimizer, following, F.cross_entropy).to_dict()
            assert done["ics"].to_dict() == direct[hook.steps]
        if hook.steps == 4:
            assert done["landscape"].to_dict() == landscape(model, following, optimizer=optimizer).to_dict()
    assert sorted(direct) == [2, 4] and sorted(hook.last) == ["ics", "landscape"]
    cos = hook.history["probe/ics/cos/0"]
    assert cos == [(2, direct[2]["cos"]["0"]), (4, direct[4]["cos"]["0"])]


def test_train_probe_flag_records_the_schedules_numbers(capsys, tmp_path):
    db = str(tmp_path / "db.sqlite")
    code, _, err = cli(capsys, "train", "--model", "mlp", "--dataset", "synthetic", "--steps", "8",
                       "--batch-size", "16", "--log-every", "4", "--subset", "128", "--store", db,
                       "--no-progress", "--json", "--probe", "ics:4",
                       "--probe", "activation_stats:2")  # fmt: skip
    assert code == 0, err
    trainer = Trainer(_config(), progress=False)
    ProbeSchedule({"ics": 4, "activation_stats": 2}).attach(trainer)
    trainer.fit()
    with Store(db, readonly=True) as store:
        (run,) = store.runs()
        names = [n for n in store.metric_names(run.id) if n.startswith("probe/")]
        assert any(n.startswith("probe/ics/l2/") for n in names)
        assert {n: store.metrics(run.id, n) for n in names} == {n: trainer.history[n] for n in names}
        assert sorted(n for n in trainer.history if n.startswith("probe/")) == sorted(names)


def test_probe_names_intervals_and_bad_input(capsys, tmp_path):
    assert probe_intervals(["ics", "landscape:500"], every=50) == {"ics": 50, "landscape": 500}
    assert probe_intervals({"ics": (10, {"include_norm": True})}) == {"ics": (10, {"include_norm": True})}
    with pytest.raises(NormlabError, match="probe 'ics:x': the interval after ':' must be a whole number"):
        probe_intervals(["ics:x"])
    with pytest.raises(NormlabError, match="probes must be a list of probe names or a mapping"):
        probe_intervals("ics")
    model = nn.Linear(2, 2)
    with pytest.raises(NormlabError, match="probe ics measures an optimizer step: pass the optimizer"):
        watch(model, probes=["ics"])
    hook = watch(model, probes=["batch_dependence:1"])
    with pytest.raises(NormlabError, match=r"batch must be \(x, y\) tensors, got dict"):
        hook.step({"x": torch.zeros(2, 2)})
    base = ["train", "--model", "mlp", "--dataset", "synthetic", "--steps", "2",
            "--store", str(tmp_path / "d")]
    for probe, message in (
        ("nope", "error: unknown probe 'nope'; valid probes: activation_stats, batch_dependence"),
        ("ics:0", "error: probe 'ics': every must be a positive number of steps, got 0"),
        ("ics:often", "error: probe 'ics:often': the interval after ':' must be a whole number of steps"),
    ):
        code, _, err = cli(capsys, *base, "--probe", probe)
        assert code == 2 and err.startswith(message) and len(err.splitlines()) == 1, err
    assert not (tmp_path / "d").exists()


def test_the_lightning_callback_without_lightning_names_the_extra(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # what an absent package looks like
    monkeypatch.delitem(sys.modules, "normlab.probes.lightning", raising=False)
    with pytest.raises(NormlabError, match=r"^normlab.probes.lightning needs Lightning: pip install "
                                           r"'normlab\[lightning\]'$"):
        importlib.import_module("normlab.probes.lightning")
