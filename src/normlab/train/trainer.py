"""The training engine: :class:`Trainer` and :func:`train`.

``Trainer.fit`` is one loop that reads top to bottom, as nanoGPT's ``train.py``: ask the budget whether the
run is done, get batch, set the budget's lr, forward, loss (stop if diverged), backward, grad norm, AGC,
optimizer step, log, callbacks, evaluate, checkpoint. How long a run trains and its lr schedule are the
budget's (:mod:`normlab.train.budget`: a fixed number of steps, or until the plateau rule holds). With
``val_fraction > 0`` a validation split is held out of the training data (:mod:`normlab.train.validation`)
and the plateau rule reads its accuracy; the test set is only reported. Everything else (probes, studies)
plugs in through :meth:`Trainer.add_callback`.

Determinism: torch, numpy and Python are seeded with ``config.seed`` before the data and the model are
built, and the data order comes from the batch iterator's own generator, so a run is reproducible and a
checkpoint (model, optimizer, iterator, RNG states, step) resumes it bit-for-bit on the CPU.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from normlab.errors import NormlabError
from normlab.train.budget import RunBudget, eval_every, log_every
from normlab.train.build import build_model, load_data, loss_function, resolve_device
from normlab.train.checkpoint import (
    checkpoint_file,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from normlab.train.compile import compiled, wants_compile
from normlab.train.config import TrainConfig
from normlab.train.context import Callback, StepContext, normalize_callbacks
from normlab.train.evaluate import evaluate
from normlab.train.optimizer import build_optimizer
from normlab.train.progress import StepProgress
from normlab.train.result import RunResult
from normlab.train.validation import split_validation

_FLUSH_ROWS = 2000
EVALUATIONS = 20  # held-out evaluations over a run when config.eval_every is 0 (auto)


class Trainer:
    """One training run of ``config``.

    Args:
        config: the run.
        store: a :class:`normlab.store.Store` to record the run, its metrics and summary in (optional).
        callbacks: items for :meth:`add_callback`: ``fn``, ``(fn, every_n_steps)`` or a callable object with
            an ``every_n_steps`` attribute.
        progress: show a progress bar: True, False, or None = only when stderr is a terminal.
        resume: a checkpoint file to continue from, or True for this config's checkpoint in
            ``config.checkpoint_dir`` when there is one.
        trackers: experiment trackers (:mod:`normlab.track`) that receive the run as it trains: its
            config at the start, every metric :meth:`log` records (probes' included), its status and
            summary at the end.

    Building the trainer loads the data and the model: bad names or values raise NormlabError here,
    before the store is touched.
    """

    def __init__(
        self,
        config: TrainConfig,
        store: Any = None,
        callbacks: Iterable[Any] = (),
        progress: bool | None = None,
        resume: str | os.PathLike | bool | None = None,
        trackers: Iterable[Any] = (),
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise NormlabError(f"config must be a TrainConfig, got {type(config).__name__}")
        self._started = time.perf_counter()
        self.config = config
        self.store = store
        self.progress = progress
        self.callbacks = normalize_callbacks(callbacks)
        self.trackers = list(trackers)
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.device = resolve_device(config.device)

        seed_everything(config.seed)
        self.data = load_data(config)
        self.streaming = not hasattr(self.data, "x_test")  # normlab.data.StreamingDataset
        if self.streaming:
            if config.val_fraction:
                raise NormlabError("val_fraction needs in-memory data; a streamed Dataset has its own splits")
            self.x_train = self.y_train = None
            x_val = y_val = torch.empty(0)
        else:
            self.x_train, self.y_train, x_val, y_val = split_validation(
                self.data.x_train, self.data.y_train, config.val_fraction
            )
        self.classification = self.data.task == "classification"
        if config.stop_below is not None and not self.classification:
            raise NormlabError(f"stop_below={config.stop_below} is a held-out accuracy: it needs a "
                               f"classification data set, and {config.dataset} is a {self.data.task} task")
        self.loss_fn = loss_function(self.data.task)
        self.model = build_model(config, self.data).to(self.device)
        self.optimizer = build_optimizer(self.model, config)
        self.agc_params, self._clip = self._agc()
        self.batches = self._batch_iterator()
        # The plateau rule reads the validation split when there is one, else the test set.
        self.heldout = "val" if len(x_val) else "test"
        metric = f"{self.heldout}/acc" if self.classification else f"{self.heldout}/loss"
        self.budget = RunBudget.from_config(config, len(self.batches), heldout=metric)
        self.total_steps = self.budget.cap  # the most steps the budget may take (the progress bar's length)
        # The convergence rule needs the held-out curve: eval_every=0 spreads evaluations over the run.
        self.eval_every = eval_every(config, self.budget, EVALUATIONS)
        self.log_every = log_every(config, self.budget)  # log_every=0: from the run's length
        # Streamed data (normlab.data.StreamingDataset) evaluates the test set through its loader; the
        # tensors here are then its first examples, for the train/eval gap.
        if self.streaming:
            x_test, y_test = self.data.head("test", 4096)
        else:
            x_test, y_test = self.data.x_test, self.data.y_test
        self.x_test, self.y_test = x_test.to(self.device), y_test.to(self.device)
        self.x_val, self.y_val = x_val.to(self.device), y_val.to(self.device)
        # The model, or its compiled forward (config.compile; None: where benchmarks/compile.py shows a gain).
        self.forward = compiled(self.model, wants_compile(config, self.total_steps, self.device))

        self.step = 0
        self.run_id: int | None = None
        self._train_time = 0.0  # loop time of earlier fits (a resumed run's first part)
        self._loop_started: float | None = None
        self._side_time = 0.0
        self._elapsed_before = 0.0  # wall time of the interrupted part of a resumed run
        self._pending: list[tuple[int, int, str, float]] = []
        checkpoint = self._checkpoint_to_resume(resume)
        if checkpoint is not None:
            self._restore(checkpoint)

    def add_callback(self, fn: Callback, every_n_steps: int = 1) -> None:
        """Call ``fn(ctx: StepContext)`` after every ``every_n_steps``-th optimizer step."""
        self.callbacks += normalize_callbacks([(fn, every_n_steps)])

    @property
    def checkpoint_path(self) -> Path | None:
        """``<checkpoint_dir>/<config key>.pt`` (:func:`normlab.train.checkpoint.checkpoint_file`)."""
        return checkpoint_file(self.config)

    # -- the loop -----------------------------------------------------------------------------------

    def fit(self) -> RunResult:
        """Train until the budget is done (or divergence) and return the :class:`RunResult`.

        Divergence ends the run with status ``diverged``; any exception is recorded as ``failed`` in the
        store and re-raised.
        """
        self._open_run()
        try:
            status, reason = self._loop()
            result = self._result(status, reason)
        except BaseException as exc:
            self._flush()
            self._close_run("failed", error=f"{type(exc).__name__}: {exc}", summary={})
            raise
        self._flush()
        self._close_run(result.status, error=result.error, summary=result.summary(), wall=result.wall_time)
        return result

    def _loop(self) -> tuple[str, str | None]:
        self.model.train()
        self._loop_started, self._side_time = time.perf_counter(), 0.0
        try:
            outcome = self._train_loop()
        finally:
            self._train_time = self._loop_time()
            self._loop_started, self._side_time = None, 0.0
        if outcome[0] == "finished" and self.checkpoint_path is not None:
            self.save_checkpoint()
        return outcome

    def _train_loop(self) -> tuple[str, str | None]:
        """The loop, top to bottom; returns ``(status, reason)``."""
        cfg, model, optimizer = self.config, self.model, self.optimizer
        params = [p for p in model.parameters() if p.requires_grad]
        with StepProgress(self.total_steps, self.progress, cfg.name or f"{cfg.model}/{cfg.norm}") as bar:
            bar.update(self.step, math.nan, 0.0)
            while not self.budget.done(self.step, self.history):
                x, y = self.batches.next_batch()
                lr = self.budget.lr(self.step)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                out = self.forward(x)
                loss = self.loss_fn(out, y)
                loss_value = loss.item()
                if not math.isfinite(loss_value) or loss_value > cfg.divergence_bound:
                    self.log("train/loss", loss_value, step=self.step + 1)
                    return "diverged", (
                        f"loss {loss_value:.4g} at step {self.step + 1} "
                        f"(non-finite or above divergence_bound={cfg.divergence_bound:g})"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                log_now = (self.step + 1) % self.log_every == 0 or self.step + 1 == self.total_steps
                grad_norm = _grad_norm(params) if log_now else math.nan
                if self.agc_params is not None:
                    self._clip(self.agc_params, cfg.agc_clip, cfg.agc_eps)
                optimizer.step()
                self.step += 1

                if log_now:
                    self.log("train/loss", loss_value)
                    self.log("train/grad_norm", grad_norm)
                    self.log("train/lr", lr)
                    if self.classification:
                        self.log("train/acc", (out.argmax(dim=1) == y).float().mean().item())
                    bar.update(self.step, loss_value, self.step / max(self._loop_time(), 1e-9))
                side = time.perf_counter()
                for fn, every in self.callbacks:
                    if self.step % every == 0:
                        fn(self._context(x, y))
                if self.step % self.eval_every == 0:
                    self._evaluate_heldout(final=False)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                self._side_time += time.perf_counter() - side
        return "finished", None

    def _loop_time(self) -> float:
        """Seconds spent in training steps (batch, forward, backward, step, logging) over the whole run,
        without callbacks, evaluation and checkpoints: what ``steps_per_s`` divides by."""
        running = time.perf_counter() - self._loop_started if self._loop_started is not None else 0.0
        return self._train_time + running - self._side_time

    # -- pieces of the loop -------------------------------------------------------------------------

    def log(self, name: str, value: float, step: int | None = None) -> None:
        """Record metric ``name`` at ``step`` (default: the current step) in the history and the store."""
        step = self.step if step is None else step
        value = float(value)
        self.history[name].append((step, value))
        if self.store is not None and self.run_id is not None:
            self._pending.append((self.run_id, step, name, value))
            if len(self._pending) >= _FLUSH_ROWS:
                self._flush()
        for tracker in self.trackers:
            tracker.log_metric(step, name, value)

    def _context(self, x: torch.Tensor, y: torch.Tensor) -> StepContext:
        return StepContext(
            model=self.model,
            optimizer=self.optimizer,
            loss_fn=self.loss_fn,
            step=self.step,
            batch=(x, y),
            config=self.config,
            log=self.log,
            store=self.store,
            run_id=self.run_id,
            next_batch=self.batches.peek,
            last=self.budget.is_last(self.step),
        )

    def _evaluate_heldout(self, final: bool = True) -> tuple[float, float]:
        """Evaluate on the validation split (if any) and log it; evaluate on the test set too when there is
        no validation split or at the end (``final``): during training only the split the plateau rule reads
        is needed, which keeps evaluations cheap. Returns the test (loss, acc), NaN when not evaluated."""
        if len(self.x_val):
            self._evaluate("val", self.x_val, self.y_val)
        loss = acc = math.nan
        if final or not len(self.x_val):
            loss, acc = self._evaluate("test", self.x_test, self.y_test)
        self._flush()
        return loss, acc

    def _evaluate(self, split: str, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        if split == "test" and self.streaming:  # the whole test set, through the Dataset's loader
            from normlab.train.evaluate import evaluate_batches

            batches = self.data.test_batches(self.config.eval_batch_size)
            loss, acc = evaluate_batches(
                self.model, batches, self.loss_fn, device=self.device, classification=self.classification
            )
        else:
            loss, acc = evaluate(
                self.model, x, y, self.loss_fn, batch_size=self.config.eval_batch_size,
                classification=self.classification,
            )  # fmt: skip
        self.log(f"{split}/loss", loss)
        if self.classification:
            self.log(f"{split}/acc", acc)
        return loss, acc

    def _batch_iterator(self):
        from normlab.data import BatchIterator

        if self.streaming:
            if self.config.augment is not None:
                raise NormlabError("augment applies to in-memory data; a streamed Dataset does its own")
            return self.data.batches(self.config.batch_size, seed=self.config.seed, device=self.device)
        # next_batch() rolls over epochs and its state resumes mid-epoch (normlab.data.BatchIterator).
        return BatchIterator(
            self.x_train,
            self.y_train,
            self.config.batch_size,
            shuffle=True,
            drop_last=True,
            seed=self.config.seed,
            augment=self.config.augment,
            device=self.device,
        )

    def _agc(self) -> tuple[list[torch.nn.Parameter] | None, Any]:
        """The parameters AGC clips (all but the classifier) and its function, or ``(None, None)``."""
        if self.config.agc_clip is None:
            return None, None
        from normlab.optim import adaptive_clip_grad_, agc_parameters

        return list(agc_parameters(self.model)), adaptive_clip_grad_

    # -- for engines that run the loop elsewhere (normlab.batched) ---------------------------------

    def open_run(self) -> None:
        """Open the run's store record, as :meth:`fit` does before its loop."""
        self._open_run()

    def conclude(self, status: str, reason: str | None, *, steps: int, train_time: float) -> RunResult:
        """Finish a run whose loop ran elsewhere, as :meth:`fit` does after its loop: ``self.model`` holds
        the final state and the metrics went through :meth:`log`; ``train_time`` is the loop's seconds."""
        self.step, self._train_time = steps, train_time
        try:
            result = self._result(status, reason)
        except BaseException as exc:
            self.record_failure(exc)
            raise
        self._flush()
        self._close_run(result.status, error=result.error, summary=result.summary(), wall=result.wall_time)
        return result

    def record_failure(self, exc: BaseException) -> None:
        """Close the store record as ``failed`` with ``exc``'s message."""
        self._flush()
        self._close_run("failed", error=f"{type(exc).__name__}: {exc}", summary={})

    # -- end of run ---------------------------------------------------------------------------------

    def _result(self, status: str, reason: str | None) -> RunResult:
        wall = self._elapsed_before + time.perf_counter() - self._started
        result = RunResult(
            status=status,
            steps=self.step,
            wall_time=wall,
            steps_per_s=self.step / self._train_time if self._train_time > 0 else math.nan,
            run_id=self.run_id,
            error=reason,
            config=self.config.to_dict(),
            config_key=self.config.key(),
        )
        if status != "finished":
            result.convergence, result.convergence_reason = status, f"the run {status}: {reason}"
            return result
        test_loss, test_acc = self._evaluate_heldout()
        if len(self.x_val):
            result.final_val_loss = self.history["val/loss"][-1][1]
            result.final_val_acc = self.history["val/acc"][-1][1] if self.classification else math.nan
        available = len(self.data.train) if self.streaming else self.x_train.shape[0]
        n_train = min(self.config.eval_train_samples, available)
        if n_train:
            x_train, y_train = (
                self.data.head("train", n_train)
                if self.streaming
                else (self.x_train[:n_train], self.y_train[:n_train])
            )
            result.final_train_loss, result.final_train_acc = evaluate(
                self.model,
                x_train.to(self.device),
                y_train.to(self.device),
                self.loss_fn,
                batch_size=self.config.eval_batch_size,
                classification=self.classification,
            )
        result.final_test_loss, result.final_test_acc = test_loss, test_acc
        if self.classification:
            gap = self._train_eval_gap()
            result.test_acc_train_mode = gap.acc_train_mode
            result.test_acc_eval_mode = gap.acc_eval_mode
            result.train_eval_gap = gap.acc_gap
        verdict = self._convergence(result)
        result.convergence, result.convergence_reason = verdict.status, verdict.reason
        # The evaluation above is part of the run's wall time.
        result.wall_time = self._elapsed_before + time.perf_counter() - self._started
        return result

    def _convergence(self, result: RunResult):
        """Plateau and stall rules on this run's history (:mod:`normlab.train.convergence`): the training
        loss against the held-out metric (validation accuracy, else test accuracy; the loss for regression).
        An auto budget judged the plateau before its cooldown and says so (``budget.convergence()``)."""
        from normlab.train.convergence import PlateauRule, assess

        heldout = self.history[f"{self.heldout}/acc" if self.classification else f"{self.heldout}/loss"]
        return assess(
            result.status,
            train_loss=self.history["train/loss"],
            heldout=heldout,
            final_train_loss=result.final_train_loss,
            final_train_acc=result.final_train_acc,
            num_classes=self.data.num_classes if self.classification else 0,
            rule=PlateauRule(higher_is_better=self.classification),
            plateau=self.budget.convergence(),
        )

    def _train_eval_gap(self):
        from normlab.probes import train_eval_gap

        # Batch statistics over batches of the training batch size (the whole test set if it is smaller).
        batch_size = min(self.config.batch_size, self.x_test.shape[0])
        return train_eval_gap(self.model, self.x_test, self.y_test, batch_size=batch_size)

    # -- store --------------------------------------------------------------------------------------

    def _open_run(self) -> None:
        self._open_store_run()
        if self.trackers:
            from normlab.track import run_name

            for tracker in self.trackers:
                tracker.start_run(run_name(self.config.to_dict(), self.run_id), self.config.to_dict(),
                                  group=self.config.group)

    def _open_store_run(self) -> None:
        if self.store is None:
            return
        from normlab.store import environment_info

        # A resumed run continues its own record when this store holds it (same id and config key).
        same_config = self.store.runs(config_key=self.config.key())
        if self.run_id is not None and any(run.id == self.run_id for run in same_config):
            self.store.reopen_run(self.run_id)
            return
        self.run_id = self.store.start_run(
            self.config.to_dict(),
            key=self.config.key(),
            name=self.config.name,
            group=self.config.group,
            environment=environment_info(str(self.device)),
        )

    def _close_run(self, status: str, *, error: str | None, summary: dict, wall: float | None = None) -> None:
        for tracker in self.trackers:
            tracker.end_run(status, summary)
        if self.store is None or self.run_id is None:
            return
        if wall is None:
            wall = self._elapsed_before + time.perf_counter() - self._started
        self.store.finish_run(self.run_id, status, summary=summary, error=error, wall_time=wall)
        if status == "finished" and self.checkpoint_path is not None:
            self.store.add_artifact(self.run_id, str(self.checkpoint_path), "checkpoint")

    def _flush(self) -> None:
        if self._pending:
            rows, self._pending = self._pending, []
            self.store.log_metric_rows(rows)

    # -- checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Write model, optimizer, iterator and RNG states and the step atomically; returns the file."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise NormlabError("save_checkpoint needs a path or config.checkpoint_dir")
        self._flush()
        save_checkpoint(
            path,
            {
                "config": self.config.to_dict(),
                "key": self.config.key(),
                # The run's base (peak) lr: the optimizer's lr is the schedule's current one, near 0 at the
                # end of a cosine run, so probes that step read this one.
                "base_lr": self.config.lr,
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "iterator": self.batches.state_dict(),
                "rng": rng_state(),
                "run_id": self.run_id,
                "elapsed": self._elapsed_before + time.perf_counter() - self._started,
                "train_time": self._loop_time(),
                "budget": self.budget.state_dict(),
            },
        )
        return path

    def _checkpoint_to_resume(self, resume: str | os.PathLike | bool | None) -> dict | None:
        if resume is None or resume is False:
            return None
        if resume is True:
            path = self.checkpoint_path
            if path is None:
                raise NormlabError("resume=True needs config.checkpoint_dir (where the checkpoint is)")
            # A folder where the checkpoint should be is refused by load_checkpoint, not ignored.
            return load_checkpoint(path) if path.exists() else None
        return load_checkpoint(resume)

    def _restore(self, state: dict) -> None:
        if state.get("key") != self.config.key():
            raise NormlabError(
                f"checkpoint is of another config (key {state.get('key')!r}, this config is "
                f"{self.config.key()!r}); resume with the config that wrote it"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.batches.load_state_dict(state["iterator"])
            set_rng_state(state["rng"])
            self.step = int(state["step"])
            self._elapsed_before = float(state.get("elapsed", 0.0))
            self._train_time = float(state.get("train_time", 0.0))
            self.budget.load_state_dict(state.get("budget", {}))
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
            raise NormlabError(f"checkpoint does not match this run: {exc}") from None
        if not 0 <= self.step <= self.total_steps:
            raise NormlabError(
                f"checkpoint step {self.step} is outside this run's 0..{self.total_steps} steps; "
                "the checkpoint is damaged or of another run"
            )
        run_id = state.get("run_id")
        self.run_id = run_id if isinstance(run_id, int) and not isinstance(run_id, bool) else None


def _grad_norm(params: list[torch.nn.Parameter]) -> float:
    """Global L2 norm of all gradients, ``sqrt(sum_p ||g_p||^2)`` (one fused ``_foreach_norm``)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item()


@dataclass
class TrainOutput:
    """What :func:`train_model` returns: the run's :class:`RunResult` and the trained ``nn.Module`` (in
    eval mode, on the run's device). The result stays plain values (picklable, stored); the model is
    here, not in it."""

    result: RunResult
    model: torch.nn.Module


def train_model(
    config: TrainConfig,
    store: Any = None,
    callbacks: Iterable[Any] = (),
    progress: bool | None = None,
    resume: str | os.PathLike | bool | None = None,
    trackers: Iterable[Any] = (),
) -> TrainOutput:
    """Train ``config`` like :func:`train` and also return the trained model (:class:`TrainOutput`)."""
    trainer = Trainer(config, store=store, callbacks=callbacks, progress=progress, resume=resume,
                      trackers=trackers)
    result = trainer.fit()
    return TrainOutput(result=result, model=trainer.model.eval())


def train(
    config: TrainConfig,
    store: Any = None,
    callbacks: Iterable[Any] = (),
    progress: bool | None = None,
    resume: str | os.PathLike | bool | None = None,
    trackers: Iterable[Any] = (),
) -> RunResult:
    """Train ``config`` and return its :class:`RunResult` (see :class:`Trainer` for the arguments); the
    trained model: :func:`train_model`, or ``Trainer(config).fit()`` then ``trainer.model``."""
    return Trainer(config, store=store, callbacks=callbacks, progress=progress, resume=resume,
                   trackers=trackers).fit()
