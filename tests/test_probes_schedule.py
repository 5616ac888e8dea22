import json

import pytest
import torch

from normlab.errors import NormlabError
from normlab.probes import DEFAULT_PROBES, ProbeSchedule
from normlab.store import Store
from normlab.train import TrainConfig, Trainer


def _config(**overrides):
    values = dict(model="mlp", norm="bn", dataset="synthetic", steps=8, batch_size=16, log_every=4)
    values.update(overrides)
    return TrainConfig(**values)


ALL = {
    "activation_stats": 2,
    "train_eval_gap": 4,
    "landscape": (4, {"num_points": 2}),
    "ics": 8,
    "hessian": (8, {"max_iter": 3, "trace_samples": 2}),
    "batch_dependence": (8, {"num_examples": 2}),
    "example_similarity": 8,
}


def test_instrumented_run_trains_bit_identically_and_records_probes(tmp_path):
    plain = Trainer(_config(), progress=False)
    plain.fit()
    store = Store(tmp_path / "runs.db")
    trainer = Trainer(_config(), store=store, progress=False)
    schedule = ProbeSchedule(ALL).attach(trainer)
    assert schedule.every_n_steps == 2
    trainer.fit()
    # Probes change nothing: the instrumented model ends bit-identical to the plain one.
    instrumented = trainer.model.state_dict()
    for name, value in plain.model.state_dict().items():
        assert torch.equal(value, instrumented[name]), name
    names = set(store.metric_names(trainer.run_id))
    assert {"probe/train_eval_gap/kl", "probe/landscape/beta_smoothness", "probe/hessian/trace",
            "probe/batch_dependence/coupling", "probe/example_similarity/collapse"} <= names
    assert any(n.startswith("probe/ics/l2/") for n in names)
    assert any(n.startswith("probe/activation_stats/mean_drift/") for n in names)
    steps = [s for s, _ in store.metrics(trainer.run_id, "probe/landscape/loss_min")]
    assert steps == [4, 8]
    drift = [s for s, _ in store.metrics(trainer.run_id, next(n for n in names if "mean_drift" in n))]
    assert drift == [2, 4, 6, 8]
    artifacts = {a.path: a for a in store.artifacts(trainer.run_id) if a.kind == "json"}
    landscape = json.loads(artifacts["probes/landscape/step00000008.json"].payload)
    assert landscape["step"] == 8 and len(landscape["losses"]) == 2 and landscape["mode"] == "train"
    assert set(schedule.last) == set(ALL)
    store.close()


def test_schedule_defaults_and_bad_input():
    schedule = ProbeSchedule()
    assert [s.name for s in schedule.specs] == list(DEFAULT_PROBES)
    assert schedule.every_n_steps == 10  # gcd of 20, 50, 100, 200
    with pytest.raises(NormlabError, match="unknown probe 'ihs'; valid probes: activation_stats, batch_"):
        ProbeSchedule({"ihs": 10})
    with pytest.raises(NormlabError, match="probe 'ics': every must be a positive number of steps, got 0"):
        ProbeSchedule({"ics": 0})
    with pytest.raises(NormlabError, match="probes must be a non-empty mapping"):
        ProbeSchedule({})
    with pytest.raises(NormlabError, match="mode must be 'train' or 'eval', got 'both'"):
        ProbeSchedule({"ics": 1}, mode="both")
