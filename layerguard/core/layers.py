"""Find a model's candidate layers by watching one forward pass, and pick the ones the method monitors.

The method's "layers" are block outputs (ResNet-18: stem, 8 BasicBlocks, logits; L = 10), not every module.
Names alone cannot tell a block from a helper module, so we run one forward pass with hooks on the
model's *units* (blocks and top-level leaf modules), record the order they are called in, and group
consecutive units into *stages*: a stage starts at every block or weighted leaf (conv/linear).
Parameter-free leaves (norm, activation, pooling, flatten, dropout) that follow a weighted leaf join its
stage (conv-bn-relu-pool is one stage); those that follow a block lead into the next stage (a block's
own output stays a layer, and avgpool+fc is the logits stage). A stage's output is its last unit's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .capture import forward_hooks

__all__ = [
    "LayerInfo", "LayerPlan", "LayerSelectionError", "all_module_outputs", "default_plan", "discover_layers",
    "explicit_plan", "format_layer_table", "parse_layer_list", "plan_for",
]

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
WEIGHTED_LEAVES = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)


class LayerSelectionError(ValueError):
    """A layer name or layer list the model cannot provide."""


@dataclass(frozen=True)
class LayerInfo:
    """One candidate layer: the module name, what kind of unit it is and its per-sample output shape."""

    name: str
    kind: str  # "block", "leaf" or "stage" (a stage is watched at its last unit's output)
    output_shape: tuple[int, ...]
    units: tuple[str, ...] = ()  # every module of the stage, in call order (the hook sits on the last)

    @property
    def computation(self) -> str:
        """What the stage computes, for people: `conv4 -> bn4 -> relu -> pool -> flatten`."""
        return " -> ".join(self.units) if self.units else self.name

    @property
    def width(self) -> int:
        """Number of features once flattened: the centroid's length."""
        n = 1
        for d in self.output_shape:
            n *= d
        return n


def _is_composite(module: nn.Module) -> bool:
    return len(list(module.children())) > 0 and not isinstance(module, CONTAINERS)


def _is_block(module: nn.Module) -> bool:
    """A composite module none of whose descendants is composite (e.g. a BasicBlock)."""
    return _is_composite(module) and not any(_is_composite(m) for m in list(module.modules())[1:])


def _units(model: nn.Module) -> dict[str, nn.Module]:
    """Blocks and leaves reached by opening containers and composites that hold blocks."""
    units: dict[str, nn.Module] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if _is_block(child) or not list(child.children()):
                units[full] = child
            else:
                visit(full, child)

    if not list(model.children()):
        return {"": model}
    visit("", model)
    return units


def _trace_calls(model: nn.Module, units: dict[str, nn.Module], sample: torch.Tensor) -> list[tuple]:
    """Run one forward pass; return (name, module, output_shape_or_None, call_count) in first-call order."""
    order: list[str] = []
    shapes: dict[str, tuple[int, ...] | None] = {}
    counts: dict[str, int] = {}

    def make_hook(name: str):
        def hook(_module, _inputs, output):
            counts[name] = counts.get(name, 0) + 1
            if name not in shapes:
                order.append(name)
                ok = isinstance(output, torch.Tensor) and output.dim() >= 1
                shapes[name] = tuple(output.shape[1:]) if ok else None

        return hook

    was_training = model.training
    with forward_hooks({module: make_hook(name) for name, module in units.items()}):
        model.eval()
        try:
            with torch.inference_mode():
                model(sample)
        finally:
            model.train(was_training)
    return [(n, units[n], shapes[n], counts[n]) for n in order]


def discover_layers(model: nn.Module, sample: torch.Tensor) -> list[LayerInfo]:
    """All candidate layers (stage outputs) in forward order, found from one forward pass on `sample`.

    Units called more than once per forward pass (a shared ReLU, say) are skipped: a hook on them
    cannot tell the calls apart. Units that do not return a batch-first tensor are skipped too.
    """
    calls = _trace_calls(model, _units(model), sample)
    stages: list[list[tuple]] = []
    pending: list[tuple] = []  # parameter-free leaves after a block: they lead into the next stage
    for name, module, shape, count in calls:
        if shape is None or count != 1:
            continue
        unit = (name, module, shape)
        if _is_block(module) or isinstance(module, WEIGHTED_LEAVES):
            stages.append(pending + [unit])
            pending = []
        elif not stages or _is_block(stages[-1][-1][1]) or pending:
            pending.append(unit)
        else:
            stages[-1].append(unit)
    if pending:
        stages.append(pending)
    layers = []
    for stage in stages:
        name, module, shape = stage[-1]
        kind = "block" if _is_block(module) and len(stage) == 1 else ("leaf" if len(stage) == 1 else "stage")
        layers.append(LayerInfo(name=name, kind=kind, output_shape=shape, units=tuple(u[0] for u in stage)))
    return layers


def all_module_outputs(model: nn.Module, sample: torch.Tensor) -> list[LayerInfo]:
    """Every named module that returns a tensor exactly once per forward pass: what `--layers` may name."""
    named = {n: m for n, m in model.named_modules() if n}
    calls = _trace_calls(model, named, sample)
    return [
        LayerInfo(name=n, kind="block" if _is_block(m) else ("leaf" if not list(m.children()) else "module"),
                  output_shape=s)
        for n, m, s, c in calls
        if s is not None and c == 1
    ]


@dataclass(frozen=True)
class LayerPlan:
    """The monitored layers and where the layer-of-interest search starts among them.

    `layers` are in forward order. The LOI is searched over indices `loi_search_start .. len(layers)-1`
    (the jump at index l is mean_sim[l] - mean_sim[l-1]), and a score sums indices LOI-2..LOI, clipped
    at 0. `total_layers` is L of the whole model, kept for the report.
    """

    layers: tuple[str, ...]
    loi_search_start: int
    total_layers: int
    ends_at_output: bool = True  # the last monitored layer is the model's output (the logits)
    computations: tuple[str, ...] = ()  # per monitored layer, every module of its stage (`a -> b -> c`)

    @property
    def penultimate(self) -> str:
        """The last monitored layer before the logits (the last one when the logits are not monitored)."""
        if self.ends_at_output and len(self.layers) > 1:
            return self.layers[-2]
        return self.layers[-1]


def default_plan(candidates: list[LayerInfo], exclude_logits: bool = False) -> LayerPlan:
    """The method's window: layers floor(L/2)-1 .. L-1 (0-based) so that LOI in floor(L/2)+1 .. L-1
    always has LOI-2 captured. This matches the official notebook's 0-based search range.

    `exclude_logits` drops the last layer (the model's output) from the window and the LOI search: on
    models where the jump into the logits is the largest for every class, the LOI lands on the logits and
    the score leans on them (docs/benchmarks.md measures when that hurts)."""
    total = len(candidates)
    if total == 0:
        raise LayerSelectionError("the model has no layer that returns a tensor; name layers with --layers")
    half = total // 2
    first = max(0, half - 1)
    last = total - 1 if exclude_logits else total
    if last - first < 1:
        raise LayerSelectionError(f"the model has {total} candidate layers: too few to leave out the logits")
    chosen = candidates[first:last]
    names = tuple(c.name for c in chosen)
    search_start = min(max(1, half + 1 - first), len(names) - 1) if len(names) > 1 else 0
    return LayerPlan(layers=names, loi_search_start=search_start, total_layers=total,
                     ends_at_output=not exclude_logits, computations=tuple(c.computation for c in chosen))


def plan_for(model: nn.Module, sample: torch.Tensor, layers: list[str] | None = None,
             exclude_logits: bool = False) -> LayerPlan:
    """The window to calibrate: the layers the user named, else the method's default one."""
    if layers:
        if exclude_logits:
            raise LayerSelectionError("--exclude-logits shapes the automatic window; with --layers, simply "
                                      "leave the output layer out of the list")
        return explicit_plan(list(layers), all_module_outputs(model, sample))
    return default_plan(discover_layers(model, sample), exclude_logits=exclude_logits)


def explicit_plan(names: list[str], available: list[LayerInfo]) -> LayerPlan:
    """Layers named by the user, which must exist, return a tensor once per pass and be in forward order."""
    position = {info.name: i for i, info in enumerate(available)}
    missing = [n for n in names if n not in position]
    if missing:
        raise LayerSelectionError(
            f"unknown or unusable layer(s): {', '.join(missing)}. "
            "Run with --list-layers to see the names this model offers."
        )
    if len(set(names)) != len(names):
        raise LayerSelectionError("a layer is named twice in --layers")
    ordered = sorted(names, key=position.__getitem__)
    if ordered != list(names):
        raise LayerSelectionError(f"--layers must be in forward order: {','.join(ordered)}")
    ends_at_output = bool(available) and names[-1] == available[-1].name
    return LayerPlan(layers=tuple(names), loi_search_start=1 if len(names) > 1 else 0, total_layers=len(names),
                     ends_at_output=ends_at_output, computations=tuple(names))


def parse_layer_list(text: str | None) -> list[str] | None:
    """`a, b,c` -> ["a", "b", "c"]; None or blank -> None (the automatic window)."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    return names or None


def format_layer_table(layers: list[LayerInfo], plan: LayerPlan | None = None) -> str:
    """A printable table of candidate layers, marking the ones a plan monitors, with every module of each
    stage: a stage is watched at its last module's output, which is not always the name one expects."""
    chosen = set(plan.layers) if plan else set()
    rows = [f"{'#':>3}  {'layer':<28} {'kind':<6} {'features':>10}  {'output shape':<16} computes"]
    for i, info in enumerate(layers):
        mark = "*" if info.name in chosen else " "
        rows.append(
            f"{i:>3}{mark} {info.name:<28} {info.kind:<6} {info.width:>10}  {str(tuple(info.output_shape)):<16} "
            f"{info.computation}"
        )
    return "\n".join(rows)
