"""Where the residual blocks of a model are, for the probes that measure per block (signal propagation,
residual scale, example similarity).

Found in this order (the first that applies):

1. the normlab contract (``normlab.models.blocks``): ``model.stem`` and ``model.blocks()``;
2. blocks with ``branch``, ``skip_scale`` and ``shortcut`` anywhere in the model (the same contract on a
   block, e.g. what :func:`normlab.layers.to_normalizer_free` puts in a torchvision ResNet);
3. the model's graph (:func:`graph_points`, :mod:`normlab.layers.residual_graph`): every residual join
   traced by torch.fx, whatever the modules are called (``c_a``, ``proj``, an ``nn.Sequential``), with
   in-place adds; the stem is the first block's input;
4. a model fx cannot trace: torchvision / timm ResNet blocks (``BasicBlock``, ``Bottleneck``): a module with
   ``conv1``, ``conv2`` and a ``downsample`` attribute; the branch ends at ``bn3`` / ``bn2`` (``conv3`` /
   ``conv2`` when it has no norm), the shortcut is ``downsample`` or the block's input; then timm /
   torchvision names (``layer1.0``, ``stages.0.0``, ``stages.0.blocks.0``, ``blocks.0``) with a ``bn3`` /
   ``bn2`` / ``conv3`` / ``conv2`` child.

``names=`` (the user's list of block module names) overrides the search; each named block must still match
one of the layouts, so the probe knows where its branch ends. The stem is ``model.stem`` or the first of
the modules ``stem``, ``maxpool``, ``bn1``, ``conv1`` (whose output feeds the first block).
"""

from __future__ import annotations

import dataclasses
import fnmatch

import torch.fx as fx
from torch import nn

from normlab.errors import NormlabError
from normlab.layers.normalizer_free import NFSkipGain
from normlab.layers.residual_graph import ResidualGraph, analyze, is_activation
from normlab.layers.skipinit import SkipInit

_GAINS = (NFSkipGain, SkipInit)

_BLOCK_PATTERNS = ("layer?.?", "layer?.??", "stages.?.?", "stages.?.??", "stages.?.blocks.?",
                   "stages.?.blocks.??", "blocks.?", "blocks.??")
_RESIDUAL_END = ("bn3", "conv3", "bn2", "conv2")
_STEM = ("stem", "maxpool", "bn1", "conv1")


@dataclasses.dataclass
class Block:
    """One residual block: ``out = shortcut(x) + contribution``.

    ``branch_end``'s output is the residual branch before any skip gain; ``contribution``'s output is what
    is added to the shortcut; ``shortcut`` is the projection, or None when the shortcut is the block input.
    """

    name: str
    module: nn.Module
    branch_end: nn.Module
    contribution: nn.Module
    shortcut: nn.Module | None


def find_blocks(
    model: nn.Module, names: list[str] | None = None
) -> tuple[tuple[str, nn.Module], list[Block]]:
    """``((stem name, stem), blocks in forward order)``; a model without them raises NormlabError."""
    if names is not None:
        blocks = [_named_block(model, name) for name in names]
    else:
        blocks = _contract(model) or _search(model)
    if not blocks:
        raise NormlabError(
            f"cannot find residual blocks in {type(model).__name__}: it has no model.stem + model.blocks() "
            "(normlab.models.blocks), no blocks with branch/skip_scale/shortcut, no torchvision/timm blocks "
            "(conv1, conv2, downsample) and no modules named like layer1.0 or stages.0.0; pass the block "
            "names (blocks=[...])"
        )
    return _stem(model), blocks


def _contract(model: nn.Module) -> list[Block]:
    blocks = getattr(model, "blocks", None)
    if not callable(blocks) or not hasattr(model, "stem"):
        return []
    return [_contract_block(n, b) for n, b in blocks()]


def _contract_block(name: str, block: nn.Module) -> Block:
    return Block(name, block, block.branch, block.skip_scale, block.shortcut)


def _is_contract(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, a, None), nn.Module) for a in ("branch", "skip_scale", "shortcut"))


def _is_resnet_block(module: nn.Module) -> bool:
    return hasattr(module, "downsample") and all(hasattr(module, a) for a in ("conv1", "conv2"))


def _resnet_block(name: str, block: nn.Module) -> Block | None:
    children = dict(block.named_children())
    end = next((children[c] for c in _RESIDUAL_END if c in children), None)
    if end is None:
        return None
    downsample = getattr(block, "downsample", None)
    return Block(name, block, end, end, downsample if isinstance(downsample, nn.Module) else None)


def _classify(name: str, module: nn.Module) -> Block | None:
    if _is_contract(module):
        return _contract_block(name, module)
    if _is_resnet_block(module) or any(fnmatch.fnmatchcase(name, p) for p in _BLOCK_PATTERNS):
        return _resnet_block(name, module)
    return None


def _search(model: nn.Module) -> list[Block]:
    found: list[Block] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{b.name}.") for b in found):
            continue  # a block's own parts are not blocks
        block = _classify(name, module)
        if block is not None:
            found.append(block)
    return found


def _named_block(model: nn.Module, name: str) -> Block:
    modules = dict(model.named_modules())
    if name not in modules:
        raise NormlabError(f"no module named {name!r} in {type(model).__name__} (given in blocks=)")
    block = _classify(name, modules[name])
    if block is None:
        raise NormlabError(
            f"module {name!r} ({type(modules[name]).__name__}) is not a residual block this probe knows: it "
            "needs branch/skip_scale/shortcut or a bn2/bn3/conv2/conv3 child"
        )
    return block


def _stem(model: nn.Module) -> tuple[str, nn.Module]:
    if isinstance(getattr(model, "stem", None), nn.Module):
        return "stem", model.stem
    modules = dict(model.named_modules())
    stem = next(((n, modules[n]) for n in _STEM if n in modules), None)
    if stem is None:
        raise NormlabError(
            f"cannot find the stem of {type(model).__name__}: no model.stem and no module named "
            f"{', '.join(_STEM)}"
        )
    return stem


@dataclasses.dataclass
class GraphPoints:
    """Where a model's per-block statistics are read when its blocks come from its graph
    (:mod:`normlab.layers.residual_graph`): node per name of the stem (the first block's input), each block
    output, branch end (before a skip gain), contribution (what is added) and shortcut. A model without
    residual joins (a plain CNN, an ``nn.Sequential``) has one point per activation output instead."""

    graph: ResidualGraph
    stem: tuple[str, fx.Node] | None
    outputs: dict[str, fx.Node]
    branch_ends: dict[str, fx.Node]
    contributions: dict[str, fx.Node]
    shortcuts: dict[str, fx.Node]

    def capture(self, x) -> dict[str, dict[str, object]]:
        """The values of every point on input ``x``, by kind ("stem", "output", "branch", ...)."""
        kinds = {"output": self.outputs, "branch": self.branch_ends, "contribution": self.contributions,
                 "shortcut": self.shortcuts}
        wanted = {f"{kind}/{name}": node for kind, points in kinds.items() for name, node in points.items()}
        if self.stem is not None:
            wanted["stem"] = self.stem[1]
        values = self.graph.capture(x, wanted)
        out: dict[str, dict[str, object]] = {kind: {} for kind in kinds}
        for key, value in values.items():
            kind, _, name = key.partition("/")
            if kind == "stem":
                out["stem"] = {self.stem[0]: value}
            else:
                out[kind][name] = value
        return out


def graph_first(model: nn.Module, names: list[str] | None) -> GraphPoints | None:
    """The graph's points, unless ``names`` are given, the model has normlab contract blocks (orders 1-2),
    or it cannot be traced (then the name search, orders 3-4, is the fallback)."""
    if names is not None or _contract(model) or any(_is_contract(m) for m in model.modules()):
        return None
    try:
        return graph_points(model)
    except NormlabError:
        return None


def graph_points(model: nn.Module) -> GraphPoints:
    """The residual joins of ``model``'s traced graph as probe points (NormlabError: untraceable)."""
    graph = analyze(model, leaf_types=(SkipInit,))
    gm = graph.graph_module
    outputs, ends, contributions, shortcuts = {}, {}, {}, {}
    for join in graph.joins:
        name, k = join.name, 1
        while name in outputs:
            k += 1
            name = f"{join.name}@{k}"
        end = join.branch_out
        if isinstance(graph.module(end), _GAINS) and end.all_input_nodes:
            end = end.all_input_nodes[0]  # before the skip gain
        outputs[name], ends[name] = join.output, end
        contributions[name], shortcuts[name] = join.branch_out, join.shortcut_out
    stem = None
    if graph.joins:
        node = graph.stem
        stem = (node.target if node.op == "call_module" else node.name, node)
    else:
        for node in gm.graph.nodes:
            if is_activation(gm, node):
                outputs[node.target if node.op == "call_module" else node.name] = node
        if not outputs:
            raise NormlabError(f"cannot find residual blocks in {type(model).__name__}: its graph has no "
                               "residual join and no activation to measure at")
    return GraphPoints(graph, stem, outputs, ends, contributions, shortcuts)
