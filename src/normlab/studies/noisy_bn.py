"""Study ``noisy-bn``: is BN's benefit the stability of layer input distributions? (Santurkar et al. 2018).

Santurkar, Tsipras, Ilyas, Madry (arXiv 1805.11604, Sec. 2.1, Fig. 1-2, Alg. 1) train a VGG four ways:
standard (no norm), with BN, with "noisy" BN -- after every BN layer, at every step, per channel j
``mu_j ~ U(-n_mu, n_mu)``, ``sigma_j ~ U(1, n_sigma)`` and per sample and channel
``m_ij ~ U(mu_j - r_mu, mu_j + r_mu)``, ``s_ij ~ N(sigma_j, r_sigma)``, ``a_ij <- s_ij a_ij + m_ij``
(n_mu = 0.5, n_sigma = 1.25, r_mu = r_sigma = 0.1; training mode only) -- and with the same noise but no
BN. Their finding (Fig. 2 is about *training*): noisy BN trains about as well as BN although its layers'
input distributions are far less stable, while the noise alone harms training.

Protocol: norms ``none`` / ``bn`` / ``noisy_bn`` / ``noise`` (``normlab.layers``), plain SGD (no momentum,
no weight decay), constant LR, for every LR of ``lrs`` and every seed.

- Training performance (the claim): the logged training-batch accuracy and loss in train mode (noise on),
  over the last 10% of the logs, and their curves (the accuracy figure).
- Eval mode: the noise layers evaluate as the expectation of their training-time layer (output x E[s],
  E[s] = (1 + n_sigma) / 2, E[m] = 0; :func:`expected_layers`); dropping the noise without rescaling leaves
  every later layer's running statistics off by E[s]. Reported beside the training numbers, not decided on.
- Stability: every ``track_every`` steps an :class:`normlab.probes.ActivationTracker` measures, on the
  step's batch in training mode, ``units`` sampled channels at the *inputs* of the norm slots
  ``track_layers`` (1-based: the conv / hidden linear output before the i-th norm slot). Noisy BN injects
  its noise after the norm, so at these points only the earlier layers' noise arrives: their instability
  is a measurement, not true by construction (it would be at the slot's output). Logged per step: the {1,
  15, 50, 85, 99}th percentiles of each unit (``probe/activation_stats/p<q>/<layer>/<unit>``) and the
  tracker's step-to-step mean change ``|mu_{t+1} - mu_t|``, variance change and drift from the first
  step (``probe/activation_stats/<field>/<layer>``).

The verdict (:func:`verdict`, first LR) decides the paper's three claims separately, each by the shared
rule (:func:`normlab.stats.compare_arms`, paired over seeds) with its own margin:

1. noisy BN trains about as well as BN (an equivalence claim): train-mode training accuracy, margin
   ``margin`` (1 point); agrees on *equivalent*, disagrees on a win either way;
2. the noise without BN prevents training: that arm alone against chance level (100 / classes %), margin
   ``chance_margin``; stalled at chance *is* the result (agrees on *equivalent*), a run that trained well
   above chance disagrees;
3. noisy BN's layer inputs are less stable than BN's (a win claim): the step-to-step mean change, compared
   as a log against the log-ratio ``stability_margin``; agrees when BN wins.

Arms are gated on their trajectory, not on end-of-run convergence (:func:`normlab.studies._bands.
trajectory_status`: left chance level and did not diverge within the window); the standard network is a
control, reported and never blocking a verdict. The study disagrees when any claim does; otherwise an
unresolved or inconclusive claim makes it inconclusive.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from torch import nn

from normlab.errors import NormlabError
from normlab.stats import EQUIVALENT, INCONCLUSIVE, UNRESOLVED, WIN, Verdict, compare_arms
from normlab.studies import _bands
from normlab.studies._santurkar import longer_budget, santurkar_base
from normlab.studies._series import mean_curve
from normlab.studies._verdict import SETTLE
from normlab.studies.base import StudyContext, StudyOutcome, Table, mean_ci

PARAMS: dict[str, Any] = {
    "model": str,
    "width": float,
    "dataset": str,
    "subset": int,
    "batch_size": int,
    "steps": int,
    "lrs": {"list": float},
    "norms": {"list": str},
    "eval_every": int,
    "track_every": int,
    "track_layers": {"list": int},
    "units": int,
    "window": int,
    "chance_fraction": float,
    "margin": float,
    "chance_margin": float,
    "stability_margin": float,
}

LABELS = {"none": "standard", "bn": "BN", "noisy_bn": "noisy BN", "noise": "noise, no BN"}
PERCENTILES = (1.0, 15.0, 50.0, 85.0, 99.0)
STABILITY_FIELDS = ("mean_change", "var_change", "mean_drift")


def _weight_and_slot(model: nn.Module) -> list[tuple[str, str]]:
    """``(weight layer, the module right after it)`` for every conv / hidden linear layer inside a
    Sequential, in forward order."""
    weight_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    pairs = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (name, module), (next_name, _) in zip(children, children[1:], strict=False):
            if isinstance(module, weight_types) or "StdConv" in type(module).__name__:
                pairs.append(tuple(f"{parent_name}.{n}" if parent_name else n for n in (name, next_name)))
    return pairs


def norm_slots(model: nn.Module) -> list[str]:
    """Names of the modules that directly follow a conv or hidden linear layer inside a Sequential, in
    forward order: where VGG/CNN/MLP models put their norm (``nn.Identity`` for ``norm="none"``)."""
    return [slot for _, slot in _weight_and_slot(model)]


def weight_layers(model: nn.Module) -> list[str]:
    """Names of the conv / hidden linear layers whose outputs feed the norm slots (:func:`norm_slots`), in
    the same order: the norm layers' inputs. Noisy BN injects its noise in the slot, not here, so the
    stability of these inputs is a measurement, not true by construction."""
    return [weight for weight, _ in _weight_and_slot(model)]


def check_track_layers(slots: list[int], count: int, where: str) -> None:
    """NormlabError unless every 1-based slot index is in ``1..count``."""
    bad = [i for i in slots if not 1 <= i <= count]
    if not slots or bad:
        raise NormlabError(
            f"{where}: norm slots must be a non-empty list of 1-based positions in 1..{count} (the model "
            f"has {count} norm slots), got {slots!r}"
        )


class StabilityProbe:
    """Trainer callback: an :class:`~normlab.probes.ActivationTracker` on the inputs of the chosen norm slots
    (the outputs of the conv / linear layers before them, :func:`weight_layers`), logging every unit's
    percentiles and the tracker's moment changes at every ``every_n_steps``-th step."""

    def __init__(self, every_n_steps: int, slots: list[int], units: int, seed: int) -> None:
        self.every_n_steps = every_n_steps
        self.slots = slots
        self.units = units
        self.seed = seed
        self.tracker: Any = None

    def __call__(self, ctx: Any) -> None:
        from normlab.probes import ActivationTracker

        if self.tracker is None:
            names = weight_layers(ctx.model)
            check_track_layers(self.slots, len(names), "track_layers")
            self.tracker = ActivationTracker(
                layers=[names[i - 1] for i in self.slots],
                units_per_layer=self.units,
                percentiles=PERCENTILES,
                mode="train",
                seed=self.seed,
            )
        stats = self.tracker.update(ctx.model, ctx.batch[0], ctx.step)
        for layer, units in stats.units.items():
            for unit, values in zip(units, stats.percentiles[layer], strict=True):
                for level, value in zip(PERCENTILES, values, strict=True):
                    ctx.log(f"probe/activation_stats/p{level:g}/{layer}/{unit}", value)
        trajectory = self.tracker.result()
        for field in STABILITY_FIELDS:
            for layer, series in getattr(trajectory, field).items():
                ctx.log(f"probe/activation_stats/{field}/{layer}", series[-1])


EXPECTED_EVAL = "noisy_bn/expected_eval_test_acc"


def expected_layers(model: nn.Module) -> int:
    """Make every noise-injecting module of ``model`` (noisy BN, noise without BN) evaluate as the
    expectation of its training-time layer: ``E[s] * a + E[m]`` with ``E[s] = (1 + n_sigma) / 2`` and
    ``E[m] = 0`` (Alg. 1's draws; science.md section 2). A layer whose eval output already carries E[s] is
    left alone (after i11a the layers do this themselves); one that drops the noise (output = plain BN, or
    the identity) gets a forward hook applying E[s] where its noise acts. Returns the number of hooks added.
    The model must be in eval mode."""
    import torch
    import torch.nn.functional as F

    hooks = 0
    for module in model.modules():
        noise = getattr(module, "noise", None)
        if not isinstance(noise, dict) or "n_sigma" not in noise:
            continue
        scale = (1.0 + noise["n_sigma"]) / 2.0
        channels = getattr(module, "num_features", None) or 4
        out = plain = None
        for shape in ((4, channels, 3), (4, channels), (4, channels, 3, 3)):
            probe = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
            try:
                if getattr(module, "running_mean", None) is not None:
                    probe = probe.to(module.running_mean)
                    plain = F.batch_norm(probe, module.running_mean, module.running_var, module.weight,
                                         module.bias, False, 0.0, module.eps)
                else:
                    plain = probe
                out = module(probe)
                break
            except Exception:  # noqa: BLE001,S112 - the layer rejects this input rank: try the next one
                continue
        if out is None:
            raise NormlabError(f"cannot probe the eval output of {type(module).__name__}")
        if not torch.allclose(out, plain, atol=1e-5):
            continue  # the layer's eval already differs from dropping the noise: trust it
        bias = getattr(module, "bias", None)
        before_affine = not getattr(module, "noise_after_affine", True) and bias is not None

        def hook(_module: nn.Module, _inputs: Any, output: Any, scale=scale, bias=bias,
                 before_affine=before_affine) -> Any:
            if before_affine:  # gamma * (E[s] * x_hat) + beta
                shift = bias.view(1, -1, *([1] * (output.dim() - 2)))
                return scale * (output - shift) + shift
            return scale * output

        module.register_forward_hook(hook)
        hooks += 1
    return hooks


class ExpectedEval:
    """Trainer callback at the last step: the test accuracy of a copy of the model whose noise layers
    evaluate as their expected training-time layer (:func:`expected_layers`), logged as
    :data:`EXPECTED_EVAL`."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __call__(self, ctx: Any) -> None:
        import copy

        from normlab.train.evaluate import evaluate

        model = copy.deepcopy(ctx.model).eval()
        expected_layers(model)
        device = next(model.parameters()).device
        _, acc = evaluate(model, self.data.x_test.to(device), self.data.y_test.to(device), ctx.loss_fn,
                          batch_size=ctx.config.eval_batch_size, classification=True)
        ctx.log(EXPECTED_EVAL, acc)


def callbacks(config: Any, *, every: int, slots: list[int], units: int) -> list:
    """The callbacks of one run; module level so the process pool can pickle it (via ``partial``)."""
    out: list = [StabilityProbe(every, slots, units, seed=config.seed)]
    if config.norm in ("noisy_bn", "noise"):
        from normlab.train.build import load_data

        out.append((ExpectedEval(load_data(config)), config.steps))
    return out


def stability(metrics: dict[str, list[tuple[int, float]]], field: str) -> float:
    """Mean over tracked layers and recorded steps of ``probe/activation_stats/<field>/<layer>``; for the
    changes the first step (0 by definition) is left out, for the drift only the last step counts."""
    prefix = f"probe/activation_stats/{field}/"
    per_layer = []
    for name, series in metrics.items():
        if not name.startswith(prefix) or not series:
            continue
        values = [v for _, v in sorted(series)]
        values = values[-1:] if field == "mean_drift" else values[1:] or values
        per_layer.append(math.fsum(values) / len(values))
    return math.fsum(per_layer) / len(per_layer) if per_layer else math.nan


def final_fit(series: list[tuple[int, float]]) -> float:
    """Mean of a logged training-batch series (train mode: noise on) over the last 10% of the logs."""
    values = [v for _, v in sorted(series)]
    tail = values[-max(1, len(values) // 10) :]
    return math.fsum(tail) / len(tail) if tail else math.nan


def _statuses(records: list[dict[str, Any]], stall_is_result: bool = False) -> list[str]:
    # The noise without BN "prevents training" (Fig. 2): for that arm a run stalled at chance level is the
    # outcome the paper predicts, a measured training accuracy, not a run that failed to give a result.
    ok = (_bands.TRAINED, "stalled") if stall_is_result else (_bands.TRAINED,)
    return ["converged" if r["gate"] in ok else r["gate"] for r in records]


def claims(
    runs: dict[str, list[dict[str, Any]]], chance: float, margin: float = 1.0, chance_margin: float = 5.0,
    stability_margin: float = math.log(1.25), settle: dict[str, str] | None = None,
) -> dict[str, Verdict]:
    """The three claims' verdicts from ``runs[norm]`` (records with ``gate``, ``fit_acc`` in % and
    ``mean_change``): ``trains`` (noisy BN vs BN, equivalence within ``margin`` points), ``prevents`` (the
    noise arm vs ``chance`` %, within ``chance_margin`` points) and ``stable`` (log mean change, noisy BN vs
    BN, against ``stability_margin``)."""
    settle = settle or SETTLE
    noisy, bn, noise = runs["noisy_bn"], runs["bn"], runs["noise"]
    trains = compare_arms(
        LABELS["noisy_bn"], [r["fit_acc"] for r in noisy], LABELS["bn"], [r["fit_acc"] for r in bn],
        statuses_a=_statuses(noisy), statuses_b=_statuses(bn), paired=len(noisy) == len(bn), margin=margin,
        settle=settle)
    prevents = compare_arms(
        LABELS["noise"], [r["fit_acc"] for r in noise], "chance level", [chance] * len(noise),
        statuses_a=_statuses(noise, stall_is_result=True), paired=True, margin=chance_margin, settle=settle)
    stable = compare_arms(
        LABELS["noisy_bn"], [_log(r["mean_change"]) for r in noisy], LABELS["bn"],
        [_log(r["mean_change"]) for r in bn], statuses_a=_statuses(noisy), statuses_b=_statuses(bn),
        higher_is_better=False, paired=len(noisy) == len(bn), margin=stability_margin, settle=settle)
    return {"trains": trains, "prevents": prevents, "stable": stable}


def _log(x: float) -> float:
    return math.log(x) if x > 0 else math.nan


def claim_outcome(name: str, v: Verdict) -> bool | None:
    """True (agrees), False (disagrees) or None (unresolved / inconclusive) for one claim of
    :func:`claims`."""
    if v.word in (INCONCLUSIVE, UNRESOLVED):
        return None
    if name == "trains":
        return v.word == EQUIVALENT
    if name == "prevents":
        return v.word == EQUIVALENT or (v.word == WIN and v.winner == "chance level")
    return v.word == WIN and v.winner == LABELS["bn"]


CLAIMS = {
    "trains": "noisy BN trains about as well as BN",
    "prevents": "the noise without BN prevents training",
    "stable": "noisy BN's layer inputs are less stable than BN's",
}


def verdict(
    lr: float, runs: dict[str, list[dict[str, Any]]], chance: float = 10.0, margin: float = 1.0,
    chance_margin: float = 5.0, stability_margin: float = math.log(1.25),
    settle: dict[str, str] | None = None,
) -> tuple[str, bool | None, str | None, str]:
    """The verdict on Santurkar et al.'s Fig. 2 claims at LR ``lr``: ``(sentence, agrees, discrepancy, key
    figures)``. ``runs[norm]`` holds one record per seed: ``gate`` (:func:`normlab.studies._bands.
    trajectory_status`), ``fit_acc`` / ``fit_loss`` (training-batch accuracy % and loss in train mode, noise
    on, over the last 10% of the logs: the training performance Fig. 2 plots), ``test_acc`` (eval mode: the
    expected layer) and ``mean_change`` (step-to-step change of the tracked units' mean at the pre-norm conv
    outputs, where no noise is injected). Each claim of :func:`claims` is decided alone; the standard
    network (``none``) is a control, quoted and never deciding.
    """
    needed = ("bn", "noisy_bn", "noise")
    if any(n not in runs for n in needed):
        return "The recipe must train bn, noisy_bn and noise to test the claims.", None, None, ""

    def fig(norm: str, key: str, unit: str = "%") -> str:
        mean, half = mean_ci(r[key] for r in runs.get(norm, []))
        if not math.isfinite(mean):
            return "n/a"
        return f"{mean:.1f}" + (f" ± {half:.1f}" if math.isfinite(half) else "") + unit

    found = claims(runs, chance, margin, chance_margin, stability_margin, settle)
    outcome = {name: claim_outcome(name, v) for name, v in found.items()}
    arms = [n for n in ("noisy_bn", "bn", "none", "noise") if n in runs]
    key = ("train-mode training acc: " + ", ".join(f"{LABELS[n]} {fig(n, 'fit_acc')}" for n in arms)
           + f"; eval-mode test acc: noisy BN {fig('noisy_bn', 'test_acc')}, BN {fig('bn', 'test_acc')}")
    texts = {
        "trains": found["trains"].sentence("train-mode training accuracy", 1.0),
        "prevents": found["prevents"].sentence("train-mode training accuracy", 1.0),
        "stable": found["stable"].sentence("log step-to-step mean change (lower)", 100.0, " x 0.01"),
    }
    word = {True: "agrees", False: "disagrees", None: "undecided"}
    parts = [f"({i}) {CLAIMS[n]}: {word[outcome[n]]}. {texts[n]}" for i, n in enumerate(CLAIMS, 1)]
    control = ""
    if "none" in runs:
        trained = sum(r["gate"] == _bands.TRAINED for r in runs["none"])
        control = (f" Control (not decided on): the standard net reaches {fig('none', 'fit_acc')} train-mode "
                   f"training accuracy ({trained}/{len(runs['none'])} runs left chance level).")
    sentence = f"At LR {lr:g}, in train mode (noise on): " + " ".join(parts) + control + (
        f" Eval mode (the expected layer): noisy BN {fig('noisy_bn', 'test_acc')} test accuracy vs BN "
        f"{fig('bn', 'test_acc')}.")
    failed = [f"{CLAIMS[n]} does not hold ({found[n].word}" + (f", {found[n].winner} ahead" if found[n].winner
                                                              else "") + ")"
              for n in CLAIMS if outcome[n] is False]
    if failed:
        discrepancy = ("Santurkar et al. find all three, but " + "; ".join(failed)
                       + " (see the accuracy figure).")
        return sentence, False, discrepancy, key
    pending = [found[n] for n in CLAIMS if outcome[n] is None]
    if pending:
        why = "; ".join(dict.fromkeys(
            f"{CLAIMS[n]}: {found[n].reason}" for n in CLAIMS if outcome[n] is None))
        fixes = "; ".join(dict.fromkeys(v.settle for v in pending if v.settle)) or SETTLE["unconverged"]
        return (f"Inconclusive at this scale ({why}); to settle it: {fixes}. As measured (not a verdict): "
                f"{sentence}"), None, None, key
    return sentence, True, None, key


def run(ctx: StudyContext) -> StudyOutcome:
    norms, lrs = ctx.param("norms", list), ctx.param("lrs", list)
    base = santurkar_base(ctx, "study/noisy-bn")
    grid = [(lr, norm, seed) for lr in lrs for norm in norms for seed in ctx.seeds]
    configs = [ctx.config(**base, lr=lr, norm=norm, seed=seed) for lr, norm, seed in grid]
    # Check the tracked slots against the model before training (a worker would only record a failure).
    from normlab.train.build import build_model, load_data

    data = load_data(configs[0])
    probe_model = build_model(configs[0], data)
    chance = 100.0 / data.num_classes
    window, chance_fraction = ctx.param("window", int), float(ctx.param("chance_fraction", (int, float)))
    where = f"{ctx.study.path or ctx.study.name} [scale.{ctx.scale}] track_layers"
    check_track_layers(ctx.param("track_layers", list), len(norm_slots(probe_model)), where)
    factory = functools.partial(
        callbacks,
        every=ctx.param("track_every", int),
        slots=ctx.param("track_layers", list),
        units=ctx.param("units", int),
    )
    results = ctx.train_grid(configs, callbacks_factory=factory)

    runs: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for (lr, norm, _), result in zip(grid, results, strict=True):
        done = result.status == "finished"
        record: dict[str, Any] = {
            "run_id": result.run_id,
            "status": result.status,
            "convergence": result.convergence or ("unconverged" if done else result.status),
            "convergence_reason": result.convergence_reason,
            "test_acc": 100.0 * result.final_test_acc if done else math.nan,
            "layer_eval_acc": 100.0 * result.final_test_acc if done else math.nan,
            "train_acc": 100.0 * result.final_train_acc if done else math.nan,
        }
        loss = ctx.metrics(result.run_id, "train/loss") if result.run_id is not None else []
        record["gate"] = _bands.trajectory_status(result.status, loss, math.log(data.num_classes),
                                                  chance_fraction, window)
        metrics = {}
        if result.run_id is not None:
            metrics = {
                n: ctx.metrics(result.run_id, n)
                for n in ctx.store.metric_names(result.run_id)
                if n.startswith("probe/activation_stats/")
            }
        for field in STABILITY_FIELDS:
            record[field] = stability(metrics, field) if done else math.nan
        for key, name, scale in (("fit_acc", "train/acc", 100.0), ("fit_loss", "train/loss", 1.0)):
            series = ctx.metrics(result.run_id, name) if result.run_id is not None and done else []
            record[key] = scale * final_fit(series) if series else math.nan
        if done and norm in ("noisy_bn", "noise") and result.run_id is not None:
            # Eval mode of the noise layers: their expected training-time layer (output x E[s]).
            last = ctx.store.latest_metric(result.run_id, EXPECTED_EVAL)
            record["test_acc"] = 100.0 * last[1] if last is not None else math.nan
        runs.setdefault((lr, norm), []).append(record)

    table = Table(
        "Final accuracy and distributional stability (Santurkar et al. 2018, Sec. 2.1)",
        [
            "lr",
            "network",
            "train-mode batch acc %",
            "train-mode batch loss",
            "test acc % (eval, expected layer)",
            "train acc % (eval)",
            "|mu_t+1 - mu_t|",
            "|var_t+1 - var_t|",
            "|mu_T - mu_0|",
            "trained",
        ],
        notes=[
            f"mean ± 95% CI over {len(ctx.seeds)} seeds; units tracked at the inputs of norm slots "
            f"{ctx.param('track_layers', list)} (the conv outputs before them: noisy BN's noise is injected "
            f"after the norm, so only the earlier layers' noise reaches these) every "
            f"{ctx.param('track_every', int)} steps, train mode, averaged over sampled units, layers and "
            "measurements.",
            "train-mode batch acc / loss: the logged training-batch accuracy and loss (batch statistics, "
            "noise on: the training performance of Santurkar et al. Fig. 2), mean over the last 10% of "
            "the logs. test / train acc (eval): the final model in eval mode, where noisy BN is the "
            "expectation of its training-time layer (output x E[s]).",
            "trained: runs that left chance level and did not diverge within the window (the gate of the "
            "claims; the noise arm's stalled runs are its result). Margins: noisy BN vs BN "
            f"±{ctx.param('margin', (int, float)):g} pts; noise arm vs chance "
            f"±{ctx.param('chance_margin', (int, float)):g} pts; the mean change as a log, "
            f"±{ctx.param('stability_margin', (int, float)):.3g}.",
        ],
    )
    summary: dict[float, dict[str, dict[str, tuple[float, float]]]] = {}
    for lr in lrs:
        summary[lr] = {}
        for norm in norms:
            rs = runs[(lr, norm)]
            s = {
                key: mean_ci(r[key] for r in rs)
                for key in ("test_acc", "train_acc", "fit_acc", "fit_loss", *STABILITY_FIELDS)
            }
            summary[lr][norm] = s
            table.add_row(
                lr,
                LABELS.get(norm, norm),
                s["fit_acc"],
                s["fit_loss"],
                s["test_acc"],
                s["train_acc"],
                s["mean_change"],
                s["var_change"],
                s["mean_drift"],
                f"{sum(r['gate'] == _bands.TRAINED for r in rs)}/{len(rs)}",
            )
    lr0 = lrs[0]
    settle = longer_budget({"steps": ctx.param("steps", int)})
    sentence, agrees, discrepancy, key_figures = verdict(
        lr0, {n: runs[(lr0, n)] for n in norms}, chance, float(ctx.param("margin", (int, float))),
        float(ctx.param("chance_margin", (int, float))), float(ctx.param("stability_margin", (int, float))),
        settle)
    figures = [_accuracy_figure(ctx, lrs, norms, runs)] + [_band_figure(ctx, lr, norms, runs) for lr in lrs]
    data = {
        f"{lr}/{norm}": [{k: v for k, v in r.items()} for r in runs[(lr, norm)]]
        for lr in lrs
        for norm in norms
    }
    return StudyOutcome(
        tables=[table],
        figures=figures,
        verdict=sentence,
        agrees_with_paper=agrees,
        discrepancy=discrepancy,
        data=data,
        key_figures=key_figures,
    )


def _accuracy_figure(ctx: StudyContext, lrs: list[float], norms: list[str], runs: dict) -> Any:
    """Santurkar Fig. 1 / 2 (left): training and test accuracy over steps, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("train/acc", "training-batch accuracy (train mode)", 100.0, "accuracy %"),
        ("train/loss", "training-batch loss (train mode)", 1.0, "loss"),
        ("test/acc", "test accuracy (eval mode)", 100.0, "accuracy %"),
    )
    fig, axes = plt.subplots(len(lrs), len(panels), figsize=(15, 3.6 * len(lrs)), squeeze=False)
    for row, lr in enumerate(lrs):
        for norm in norms:
            ids = [r["run_id"] for r in runs[(lr, norm)] if r["run_id"] is not None]
            for col, (name, title, scale, _) in enumerate(panels):
                steps, mean = mean_curve([ctx.metrics(i, name) for i in ids])
                axes[row][col].plot(steps, [scale * m for m in mean], label=LABELS.get(norm, norm))
                axes[row][col].set_title(f"{title}, lr {lr:g}", fontsize=10)
        for ax, (name, _, _, ylabel) in zip(axes[row], panels, strict=True):
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            if name == "train/loss":
                ax.set_yscale("log")
            ax.legend(fontsize=8)
    fig.tight_layout()
    return ctx.save_figure(
        fig,
        "accuracy",
        "Training performance (train mode, noise on: Santurkar et al. 2018, Fig. 2 left) and eval-mode "
        "test accuracy of standard, BN, noisy BN and noise-only networks; mean over seeds.",
    )


def _band_figure(ctx: StudyContext, lr: float, norms: list[str], runs: dict) -> Any:
    """Santurkar Fig. 2 (right): one sampled unit per tracked layer, its {15, 50, 85}th percentiles (dark)
    and {1, 99}th (light) over training, first seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = {
        norm: next((r["run_id"] for r in runs[(lr, norm)] if r["run_id"] is not None), None) for norm in norms
    }
    units_by_norm = {}
    for norm, run_id in first.items():
        names = ctx.store.metric_names(run_id) if run_id is not None else []
        prefix = "probe/activation_stats/p50/"
        # Names are probe/activation_stats/p50/<layer>/<unit>: keep "<layer>/<unit>".
        units_by_norm[norm] = sorted({n[len(prefix) :] for n in names if n.startswith(prefix)})
    order = (
        {name: i for i, name in enumerate(norm_slots(_model_of(ctx, first)))} if any(first.values()) else {}
    )
    layers = sorted(
        {u.rsplit("/", 1)[0] for us in units_by_norm.values() for u in us}, key=lambda n: order.get(n, 0)
    )
    fig, axes = plt.subplots(
        max(len(layers), 1),
        len(norms),
        figsize=(3.2 * len(norms), 2.6 * max(len(layers), 1)),
        squeeze=False,
        sharex=True,
    )
    for col, norm in enumerate(norms):
        for row, layer in enumerate(layers):
            ax = axes[row][col]
            unit = next((u for u in units_by_norm[norm] if u.rsplit("/", 1)[0] == layer), None)
            if unit is None or first[norm] is None:
                continue
            series = {
                q: dict(ctx.metrics(first[norm], f"probe/activation_stats/p{q:g}/{unit}"))
                for q in PERCENTILES
            }
            steps = sorted(series[50.0])
            band = {q: [series[q][s] for s in steps] for q in PERCENTILES}
            ax.fill_between(steps, band[1.0], band[99.0], alpha=0.2, color="C0", lw=0)
            ax.fill_between(steps, band[15.0], band[85.0], alpha=0.45, color="C0", lw=0)
            ax.plot(steps, band[50.0], color="C0", lw=1)
            ax.set_title(f"{LABELS.get(norm, norm)}: {layer}, unit {unit.rsplit('/', 1)[1]}", fontsize=8)
            if row == len(layers) - 1:
                ax.set_xlabel("step")
    fig.tight_layout()
    return ctx.save_figure(
        fig,
        f"stability_lr{lr:g}",
        f"Distribution of one sampled unit per tracked layer over "
        f"training at lr {lr:g}: 15-85th (dark) and 1-99th (light) percentiles and the median "
        "(Santurkar et al. 2018, Fig. 2 right).",
    )


def _model_of(ctx: StudyContext, run_ids: dict[str, Any]) -> nn.Module:
    """A model with the layout of the study's runs (for the forward order of its norm slots)."""
    from normlab.train import TrainConfig
    from normlab.train.build import build_model, load_data

    run_id = next(i for i in run_ids.values() if i is not None)
    config = TrainConfig.from_dict(ctx.store.get_run(run_id).config)
    return build_model(config, load_data(config))
