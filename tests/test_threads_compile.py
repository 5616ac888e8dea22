"""Threads that fit the usable cores (normlab.train.threads); the compile option (normlab.train.compile)."""

from __future__ import annotations

import warnings

import pytest
import torch

from normlab.errors import NormlabError
from normlab.store import environment_info
from normlab.sweep import LocalPoolExecutor
from normlab.train import TrainConfig, Trainer, threads
from normlab.train import compile as compile_module


def test_threads_split_the_affinity_cores_between_workers(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert threads.available_cores() == 6
    assert [threads.fit_threads(w) for w in (1, 2, 4, 6, 12)] == [6, 3, 1, 1, 1]
    assert threads.fit_threads(4, requested=3) == 3  # --threads overrides
    with pytest.raises(NormlabError, match="threads must be a positive int, got 0"):
        threads.fit_threads(1, requested=0)
    monkeypatch.setattr("normlab.sweep.executors.available_cores", lambda: 6)
    pool = LocalPoolExecutor(workers=4)
    assert (pool.workers, pool.threads_per_worker) == (4, 1)
    pool = LocalPoolExecutor(workers=2)
    assert pool.workers * pool.threads_per_worker == 6
    assert LocalPoolExecutor(workers=9).workers == 6  # never more processes than cores


def test_environment_records_the_thread_count_and_cores():
    before = torch.get_num_threads()
    try:
        threads.set_threads(1)
        env = environment_info("cpu")
        assert env["threads"] == 1 and env["cores"] == threads.available_cores()
    finally:
        torch.set_num_threads(before)


def test_compile_falls_back_to_eager_with_one_warning_without_a_compiler(monkeypatch):
    monkeypatch.setattr(compile_module, "compiler_available", lambda: False)
    monkeypatch.setattr(compile_module, "_WARNED", False)
    config = TrainConfig(subset=256, batch_size=32, steps=4, width=4, eval_train_samples=64)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler is present for torch.compile; running eagerly"):
        trainer = Trainer(config.replace(compile=True), progress=False)
    assert trainer.forward is trainer.model
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning while training
        result = trainer.fit()
    eager = Trainer(config, progress=False).fit()
    assert result.final_test_loss == eager.final_test_loss
    assert config.replace(compile=True).key() == config.key()  # same run, computed another way


def test_a_failing_compile_warns_once_and_runs_eagerly(monkeypatch):
    model = torch.nn.Linear(3, 2)

    def broken(*args):
        raise RuntimeError("no backend")

    forward = compile_module.CompiledForward(model)
    forward._compiled = broken
    x = torch.randn(4, 3)
    message = "torch.compile failed \\(RuntimeError: no backend\\); running eagerly"
    with pytest.warns(UserWarning, match=message):
        out = forward(x)
    torch.testing.assert_close(out, model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(forward(x), model(x))


@pytest.mark.slow
def test_compiled_training_equals_eager():
    if not compile_module.compiler_available():
        pytest.skip("no C++ compiler for torch.compile")
    config = TrainConfig(subset=256, batch_size=32, steps=6, width=4, eval_train_samples=64, log_every=2)
    eager = Trainer(config, progress=False)
    eager_result = eager.fit()
    compiled = Trainer(config.replace(compile=True), progress=False)
    compiled_result = compiled.fit()
    assert isinstance(compiled.forward, compile_module.CompiledForward)
    assert compiled.forward._compiled is not None  # it really ran compiled
    for name in ("final_train_loss", "final_test_loss", "final_test_acc"):
        assert getattr(compiled_result, name) == pytest.approx(getattr(eager_result, name), abs=1e-4)
    losses = [v for _, v in compiled.history["train/loss"]]
    assert losses == pytest.approx([v for _, v in eager.history["train/loss"]], abs=1e-4)


def test_compile_by_default_only_where_it_paid():
    cpu = torch.device("cpu")
    long_resnet = TrainConfig(model="resnet20", dataset="cifar10", steps=3000)
    assert compile_module.wants_compile(long_resnet, 3000, cpu)
    assert not compile_module.wants_compile(long_resnet.replace(steps=100), 100, cpu)
    assert not compile_module.wants_compile(long_resnet.replace(compile=False), 3000, cpu)
    assert not compile_module.wants_compile(TrainConfig(steps=5000), 5000, cpu)  # the cnn: slower compiled
    assert compile_module.wants_compile(TrainConfig(compile=True), 10, cpu)
