"""``train_batched``: K runs that differ only in seed and learning rate, trained as one stacked model.

Each member is built by :class:`normlab.train.Trainer` exactly as its run alone would be (seeded init,
data, its own seeded :class:`normlab.data.BatchIterator`, store record), then the members' parameters and
buffers are stacked (:class:`StackedModel`) and the loop below replaces ``Trainer.fit``'s, step for step:

    every member draws its own batch; its policy gives its lr; one forward of the stack; per-member loss;
    members whose loss is non-finite or above ``divergence_bound`` stop as ``diverged``; one backward of
    the sum of the others' losses; per-member grad norm (on log steps) and AGC; one stacked optimizer
    step; per-member logging; evaluation on the test split every ``eval_every`` steps; members whose
    policy says done stop.

A member that stops leaves the stack (the rest are re-stacked) and is finished by its own Trainer
(``Trainer.conclude``): final evaluation, train/eval gap, summary and store record are the single run's
code, so results and the store look as if the runs were trained one by one. ``steps_per_s`` of a member
is its steps over the group's loop time (the members shared that time).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vmap

from normlab.batched.clip import member_grad_norms, stacked_agc_
from normlab.batched.grouping import check_group
from normlab.batched.optim import StackedOptimizer
from normlab.batched.policy import MemberPolicy
from normlab.batched.stack import StackedModel
from normlab.data.iterator import BatchIterator
from normlab.train import RunResult, TrainConfig, Trainer
from normlab.train.optimizer import param_groups


class _Member:
    """One run in the group: its Trainer (model, data, store record, history) and policy."""

    def __init__(self, trainer: Trainer, policy: MemberPolicy) -> None:
        self.trainer = trainer
        self.policy = policy
        self.result: RunResult | None = None
        self.reason: str | None = None


def train_batched(
    configs: Sequence[TrainConfig],
    store: Any = None,
    policies: Sequence[MemberPolicy] | None = None,
    modes: Sequence[str] | None = None,
) -> list[RunResult]:
    """Train ``configs`` (compatible: :func:`normlab.batched.batch_key` equal) as one stacked model and
    return their RunResults in order. ``policies`` overrides each member's own budget (``Trainer.budget``);
    ``modes`` names the forward modes allowed, the first kept (default: those the stack offers, in its
    order: grouped, vmap, loop; never chosen by timing, see :class:`normlab.batched.StackedModel`); a mode
    the group cannot use raises ValueError.

    Bad configs raise NormlabError before anything is stored; an exception while training records every
    unfinished member as ``failed`` and returns those results (as a sweep's worker would)."""
    configs = list(configs)
    check_group(configs)
    if policies is not None and len(policies) != len(configs):
        raise ValueError(f"{len(policies)} policies for {len(configs)} configs")
    members = []
    for i, config in enumerate(configs):
        trainer = Trainer(config, store=store, progress=False)
        if members:
            _share_data(members[0].trainer, trainer)
        # The member's own budget (normlab.train.budget: fixed, or auto until its plateau), as alone.
        policy = policies[i] if policies is not None else trainer.budget
        members.append(_Member(trainer, policy))
    _Group(members, modes).run()
    return [m.result for m in members]  # type: ignore[misc]


class _Group:
    def __init__(self, members: list[_Member], modes: Sequence[str] | None = None) -> None:
        first = members[0].trainer
        self.members = members
        self.alive = list(members)
        self.config = first.config
        self.loss_fn = first.loss_fn
        self.classification = first.classification
        self.stack = StackedModel([m.trainer.model for m in members], tuple(first.data.x_train.shape[1:]))
        self.stack.use(None if modes is None else tuple(modes))
        names = dict(first.model.named_parameters())
        decayed_ids = {
            id(p)
            for g in param_groups(first.model, self.config.weight_decay, self.config.wd_exclude_norm_bias)
            if g["weight_decay"]
            for p in g["params"]
        }
        self.optimizer = StackedOptimizer(
            self.stack.params, {n for n, p in names.items() if id(p) in decayed_ids}, self.config,
            flat=self.stack.flat,
        )
        self.agc_names: list[str] = []
        if self.config.agc_clip is not None:
            from normlab.optim import agc_parameters

            clipped = {id(p) for p in agc_parameters(first.model)}
            self.agc_names = [n for n, p in names.items() if id(p) in clipped]
        self.train_time = 0.0

    # -- the loop -----------------------------------------------------------------------------------

    def run(self) -> None:
        for m in self.members:
            m.trainer.open_run()
        started = time.perf_counter()
        side = 0.0
        try:
            self.stack.train()
            while self.alive:
                self._step()
                tick = time.perf_counter()
                self._evaluate_due()
                side += time.perf_counter() - tick
                self.train_time = time.perf_counter() - started - side
                tick = time.perf_counter()
                self._retire(done=[m for m in self.alive if m.policy.done(m.trainer.step, m.trainer.history)])
                side += time.perf_counter() - tick
        except Exception as exc:  # every unfinished member failed with it, as a single run would
            for m in self.alive:
                m.trainer.record_failure(exc)
                t = m.trainer
                m.result = RunResult(
                    status="failed", steps=t.step, run_id=t.run_id, error=f"{type(exc).__name__}: {exc}",
                    config=t.config.to_dict(), config_key=t.config.key(),
                )
            self.alive = []

    def _step(self) -> None:
        cfg, alive, stack = self.config, self.alive, self.stack
        x, y = _next_batches([m.trainer.batches for m in alive])
        lrs = [m.policy.lr(m.trainer.step) for m in alive]

        out = stack(x)
        losses = member_losses(self.loss_fn, out, y)
        values = losses.tolist()
        diverged = [i for i, v in enumerate(values) if not math.isfinite(v) or v > cfg.divergence_bound]
        for i in diverged:
            t = alive[i].trainer
            t.log("train/loss", values[i], step=t.step + 1)
        ok = [i for i in range(len(alive)) if i not in set(diverged)]
        stack.zero_grad()
        if ok:
            total = losses.sum() if not diverged else losses[torch.tensor(ok, device=losses.device)].sum()
            total.backward()
        after = [m.trainer.step + 1 for m in alive]
        log_now = [
            s % m.trainer.log_every == 0 or m.policy.done(s, m.trainer.history)
            for s, m in zip(after, alive, strict=True)
        ]
        grad_norms = member_grad_norms(stack.params).tolist() if any(log_now) else None
        if self.agc_names:
            stacked_agc_(stack.params, self.agc_names, cfg.agc_clip, cfg.agc_eps)
        self.optimizer.step(stack.params, torch.tensor(lrs, dtype=torch.float64))

        accs = None
        if self.classification and any(log_now):
            accs = (out.detach().argmax(dim=-1) == y).float().mean(dim=1).tolist()
        for i in ok:
            t = alive[i].trainer
            t.step += 1
            if log_now[i]:
                t.log("train/loss", values[i])
                t.log("train/grad_norm", grad_norms[i])
                t.log("train/lr", lrs[i])
                if accs is not None:
                    t.log("train/acc", accs[i])
        if diverged:
            for i in diverged:
                t = alive[i].trainer
                alive[i].reason = (
                    f"loss {values[i]:.4g} at step {t.step + 1} "
                    f"(non-finite or above divergence_bound={cfg.divergence_bound:g})"
                )
            self._retire(diverged=[alive[i] for i in diverged])

    @torch.no_grad()
    def _evaluate_due(self) -> None:
        # Each member's Trainer resolved eval_every (0: spread over the run) as the run alone would.
        due = [m for m in self.alive if m.trainer.step % m.trainer.eval_every == 0]
        if not due:
            return
        # Members step together, so either all alive members are due or none. As the Trainer does, the
        # held-out split its plateau rule reads: the validation split when one is held out, else the test set.
        split = self.alive[0].trainer.heldout
        losses, accs = self._evaluate(split)
        for m, loss, acc in zip(self.alive, losses, accs, strict=True):
            m.trainer.log(f"{split}/loss", loss)
            if self.classification:
                m.trainer.log(f"{split}/acc", acc)

    def _evaluate(self, split: str) -> tuple[list[float], list[float]]:
        """Per-member ``(mean loss, accuracy)`` on ``split`` (``val`` or ``test``) in eval mode, as
        :func:`normlab.train.evaluate.evaluate` (chunks of ``eval_batch_size``, chunk means re-weighted)."""
        xs = [getattr(m.trainer, f"x_{split}") for m in self.alive]
        ys = [getattr(m.trainer, f"y_{split}") for m in self.alive]
        shared = all(x is xs[0] or torch.equal(x, xs[0]) for x in xs) and all(
            y is ys[0] or torch.equal(y, ys[0]) for y in ys
        )
        x_all = xs[0] if shared else torch.stack(xs)
        y_all = ys[0] if shared else torch.stack(ys)
        n, size = xs[0].shape[0], self.config.eval_batch_size
        k = len(self.alive)
        total = torch.zeros(k, dtype=torch.float64)
        correct = torch.zeros(k, dtype=torch.float64)
        self.stack.train(False)
        try:
            for start in range(0, n, size):
                if shared:
                    xb, yb = x_all[start : start + size], y_all[start : start + size]
                    out = self.stack(xb, shared_input=True)
                    loss = member_losses(self.loss_fn, out, yb.expand(k, *yb.shape))
                    hits = (out.argmax(dim=-1) == yb) if self.classification else None
                else:
                    xb, yb = x_all[:, start : start + size], y_all[:, start : start + size]
                    out = self.stack(xb)
                    loss = member_losses(self.loss_fn, out, yb)
                    hits = (out.argmax(dim=-1) == yb) if self.classification else None
                m = min(size, n - start)
                total += loss.double() * m
                if hits is not None:
                    correct += hits.sum(dim=1).double()
        finally:
            self.stack.train(True)
        accs = (correct / n).tolist() if self.classification else [math.nan] * k
        return (total / n).tolist(), accs

    # -- members leaving --------------------------------------------------------------------------

    def _retire(self, *, done: Sequence[_Member] = (), diverged: Sequence[_Member] = ()) -> None:
        leaving = {id(m) for m in (*done, *diverged)}
        if not leaving:
            return
        for i, m in enumerate(self.alive):
            if id(m) not in leaving:
                continue
            t = m.trainer
            if any(m is d for d in diverged):
                m.result = t.conclude("diverged", m.reason, steps=t.step, train_time=self.train_time)
            else:
                self.stack.copy_member_to(i, t.model)
                m.result = t.conclude("finished", None, steps=t.step, train_time=self.train_time)
        keep = [i for i, m in enumerate(self.alive) if id(m) not in leaving]
        self.alive = [self.alive[i] for i in keep]
        if keep:
            self.stack.keep(keep)
            self.optimizer.keep(keep, self.stack.params, self.stack.flat)


def member_losses(loss_fn: Any, out: Tensor, y: Tensor) -> Tensor:
    """Each member's mean loss (K,) of outputs ``out`` (K, B, ...) and targets ``y`` (K, B, ...): for the
    trainer's cross-entropy and mean squared error, per-example losses of all K*B examples in one kernel
    and a mean per member (what ``vmap(loss_fn)`` computes, without its per-call overhead); any other
    ``loss_fn`` under ``vmap``."""
    k, b = out.shape[:2]
    if loss_fn is F.cross_entropy and y.dim() == 2:
        flat = F.cross_entropy(out.reshape(k * b, *out.shape[2:]), y.reshape(k * b), reduction="none")
        return flat.view(k, -1).mean(dim=1)
    if loss_fn is F.mse_loss and y.shape == out.shape:
        return F.mse_loss(out, y, reduction="none").reshape(k, -1).mean(dim=1)
    return vmap(loss_fn)(out, y)


def _next_batches(iterators: Sequence[Any]) -> tuple[Tensor, Tensor]:
    """Every member's next batch, stacked (K, B, ...). Members drawing from one data set without
    augmentation (``_share_data`` made their tensors the same) are gathered in one ``index_select`` of
    all their indices: 9 gathers and a stack took ~110 us of a ~5 ms batch-16 step, one gather ~13 us."""
    first = iterators[0]
    if all(isinstance(it, BatchIterator) and it.augment_name is None and it.x is first.x and it.y is first.y
           for it in iterators):
        indices = [it.next_index() for it in iterators]
        if len({len(i) for i in indices}) != 1:  # members step together through equal data
            raise RuntimeError(f"members' batches differ in size: {[len(i) for i in indices]}")
        index, k = torch.cat(indices), len(indices)
        x, y = first.x.index_select(0, index), first.y.index_select(0, index)
        return x.view(k, -1, *x.shape[1:]), y.view(k, -1, *y.shape[1:])
    batches = [it.next_batch() for it in iterators]
    return torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])


def _share_data(first: Trainer, other: Trainer) -> None:
    """Let ``other`` use ``first``'s tensors where they are equal (K copies of a data set add up)."""
    a, b = first.data, other.data
    same = all(
        torch.equal(getattr(a, n), getattr(b, n)) for n in ("x_train", "y_train", "x_test", "y_test")
    )
    if same:
        other.data = a
        other.x_test, other.y_test = first.x_test, first.y_test
        if torch.equal(first.x_val, other.x_val) and torch.equal(first.y_val, other.y_val):
            other.x_val, other.y_val = first.x_val, first.y_val
        other.batches.x, other.batches.y = first.batches.x, first.batches.y


