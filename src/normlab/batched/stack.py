"""``StackedModel``: K copies of one architecture as stacked tensors, run as one model.

Member k's parameter ``name`` is ``params[name][k]`` and its buffer (BN running statistics, counters) is
``buffers[name][k]`` (``torch.func.stack_module_state``). The forward of all members is one
``torch.func.vmap`` over ``functional_call`` of a parameter-free copy of the architecture on the meta
device: input (K, B, ...) -> output (K, B, ...). Under vmap a conv with a batched weight becomes one
grouped convolution and BN one ``batch_norm`` over K*C channels, so K small runs cost a few larger kernels
instead of K times the per-step Python and dispatch overhead. Buffers go in as batched inputs, so the
in-place running-statistics updates of BN-type layers land in each member's own slice, and
``randomness="different"`` gives every member its own noise (noisy BN).

Member by member (``mode == "loop"``), each member's forward runs on views of the same stacked tensors
with the ordinary kernels, while the optimizer, clipping and bookkeeping stay batched. That is the only
mode for layers vmap cannot trace (old-style ``torch.autograd.Function`` s without a vmap rule, e.g. noisy
BN's fused kernel, batch renorm; found by trying vmap on a throwaway copy of two members), and it is the
faster one where the arithmetic outweighs the per-step overhead: oneDNN's grouped convolution and vmap's
batch norm are slower per FLOP than the plain kernels (the CNN at batch 128: vmap 1.26x, loop 0.88x the
time of 9 separate runs; at batch 16: vmap 0.45x, loop 0.89x).

Grouped (``mode == "grouped"``, :mod:`normlab.batched.grouped`): a hand-grouped twin of the architecture
runs the K members as channel groups of one network of ordinary kernels (grouped conv, one BN / GroupNorm
over K*C channels, batched matmul for linear layers) on views of the same stacked tensors, without vmap's
per-op overhead and its slower batch norm. It is offered only where every layer has a grouped form and a
probe on two throwaway members reproduces the member-by-member outputs, gradients and running statistics.

``modes`` lists the usable modes, best first; the engine uses the first (:meth:`StackedModel.use` picks
another). The pick is a fixed rule, never a timing: the modes (and the grouped mode's two convolution
kernels) compute the same numbers up to rounding, a run of thousands of steps amplifies the rounding (a
held-out accuracy one example apart moves the plateau rule's stopping step), and a pick by timing flips
between processes on noise. Measured with timed picks: two identical default compares differed in 5 of 8
groups, even when another mode had to be 1.25x faster to replace the preferred one. On the MNIST-1D CNN
the modes' step times differ by 1.5-4x (batch 16: grouped 3.1, vmap 4.9, loop 10 ms), grouped fastest.

The sum of the members' losses has, for each member's parameters, exactly that member's gradient (no
member's output depends on another's parameters), so one ``backward`` gives every member its own
gradient.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from normlab.batched.flat import FlatParameters, flat_parameters
from normlab.batched.grouped import grouped_model


class StackedModel:
    """K members of one architecture (``models``: same class and shapes) as stacked leaf tensors;
    ``input_shape``: one example's shape (without the batch dim), used to choose the mode."""

    def __init__(self, models: list[nn.Module], input_shape: tuple[int, ...]) -> None:
        if not models:
            raise ValueError("StackedModel needs at least one model")
        params, buffers = stack_module_state(models)
        self.params: dict[str, Tensor] = params
        self.flat: FlatParameters | None = None
        self._flatten()
        self.buffers: dict[str, Tensor] = buffers
        # Parameter-free skeleton: functional_call swaps the stacked slices in.
        self.skeleton = copy.deepcopy(models[0]).to("meta")
        self.size = len(models)
        self.mode = _choose_mode(self.skeleton, params, buffers, tuple(input_shape))
        self.modes: tuple[str, ...] = ("vmap", "loop") if self.mode == "vmap" else ("loop",)
        # The hand-grouped twin, offered only where it reproduces the member-by-member numbers.
        self.grouped = grouped_model(self.skeleton, params, buffers, tuple(input_shape))
        if self.grouped is not None:
            self.mode, self.modes = "grouped", ("grouped", *self.modes)

    def use(self, modes: tuple[str, ...] | None = None) -> None:
        """Run the first of ``modes`` (default: of :attr:`modes`); ValueError for a mode not offered."""
        modes = self.modes if modes is None else tuple(modes)
        unavailable = [m for m in modes if m not in self.modes]
        if unavailable or not modes:
            raise ValueError(
                f"mode(s) {', '.join(unavailable) or 'none'} not available for this group; "
                f"available: {', '.join(self.modes)}"
            )
        self.mode = modes[0]

    def train(self, mode: bool = True) -> None:
        self.skeleton.train(mode)
        if self.grouped is not None:
            self.grouped.train(mode)

    def __call__(self, x: Tensor, *, shared_input: bool = False) -> Tensor:
        """Outputs (K, B, ...) of inputs (K, B, ...), or of one (B, ...) for all when ``shared_input``."""
        if self.mode == "grouped":
            return self.grouped(self.params, self.buffers, x, shared_input=shared_input)
        if self.mode == "vmap":
            in_x = None if shared_input else 0
            return vmap(self._forward_one, in_dims=(0, 0, in_x), randomness="different")(
                self.params, self.buffers, x
            )
        return torch.stack([
            self._forward_one(
                {n: p[k] for n, p in self.params.items()},
                {n: b[k] for n, b in self.buffers.items()},
                x if shared_input else x[k],
            )
            for k in range(self.size)
        ])

    def _forward_one(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.skeleton, (params, buffers), (x,))

    def keep(self, members: list[int]) -> None:
        """Keep only ``members`` (indices into the current stack), in that order (new leaf tensors)."""
        index = torch.tensor(members, dtype=torch.long)
        device = next(iter(self.params.values())).device
        index = index.to(device)
        self.params = {
            n: p.detach().index_select(0, index).requires_grad_(p.requires_grad)
            for n, p in self.params.items()
        }
        self.buffers = {n: b.index_select(0, index) for n, b in self.buffers.items()}
        self.size = len(members)
        self._flatten()

    def _flatten(self) -> None:
        """Parameters as views of one flat buffer where they allow it (:mod:`normlab.batched.flat`)."""
        self.flat = flat_parameters(self.params)
        if self.flat is not None:
            self.params = self.flat.params

    def zero_grad(self) -> None:
        """Clear every parameter's gradient before a backward."""
        if self.flat is not None:
            self.flat.zero_grad()
        else:
            for p in self.params.values():
                p.grad = None

    @torch.no_grad()
    def copy_member_to(self, k: int, model: nn.Module) -> None:
        """Write member ``k``'s parameters and buffers into ``model`` (same architecture)."""
        state = {n: p[k] for n, p in self.params.items()} | {n: b[k] for n, b in self.buffers.items()}
        model.load_state_dict(state, strict=True)


def _choose_mode(
    skeleton: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], shape: tuple[int, ...]
) -> str:
    """``"vmap"`` if a training-mode forward and backward of two throwaway members runs under vmap."""
    probe = {n: p[:2].detach().clone().requires_grad_(p.requires_grad) for n, p in params.items()}
    probe_buffers = {n: b[:2].clone() for n, b in buffers.items()}
    device = next(iter(params.values())).device
    x = torch.randn(2, 4, *shape, device=device)
    was_training = skeleton.training
    skeleton.train()
    state = torch.random.get_rng_state()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # functorch's "no batching rule, slow fallback" notes
            out = vmap(
                lambda p, b, xb: functional_call(skeleton, (p, b), (xb,)), randomness="different"
            )(probe, probe_buffers, x)
            out.float().sum().backward()
        return "vmap"
    except Exception:  # noqa: BLE001 - any layer vmap cannot run sends the group down the loop path
        return "loop"
    finally:
        torch.random.set_rng_state(state)  # the probe must not shift the members' random streams
        skeleton.train(was_training)
