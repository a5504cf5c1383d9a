"""Multiply-add budget of a model, layer by layer.

MACs come from torch.utils.flop_counter.FlopCounterMode (it tracks the module
hierarchy; we do not re-implement op counting). FlopCounterMode reports 2 FLOPs
per multiply-accumulate, so MACs = FLOPs / 2. The fused op registers its own
formula (ops/inception.py), so a fused model counts exactly its reference's MACs.

Conventions: 1 MAC = 1 multiply + 1 add. Pooling, ReLU, LRN, batch norm,
dropout and bias adds are not MACs (FlopCounterMode counts none of them).
Auxiliary classifiers are reported on their own rows and left out of the
inference total unless asked for.
"""

from __future__ import annotations

import copy
import csv
import io
import json
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .spec import InceptionSpec

__all__ = ["ProfileRow", "ProfileReport", "profile"]


@dataclass(frozen=True)
class ProfileRow:
    name: str
    type: str
    detail: str  # kernel/stride/patch, where it applies
    output_shape: tuple[int, ...] | None  # None: the layer did not run (e.g. aux heads in eval)
    params: int
    macs: int
    auxiliary: bool = False  # an auxiliary classifier: reported, outside the inference total
    breakdown: dict[str, int] | None = None  # MACs per branch convolution of an Inception block


@dataclass
class ProfileReport:
    input_size: tuple[int, ...]
    rows: list[ProfileRow]
    total_macs: int
    total_params: int
    budget: float | None = None
    unattributed_macs: int = 0  # MACs of ops called directly in a forward, outside any row
    aux_macs: int = 0  # auxiliary heads, in total_macs only with include_aux
    notes: list[str] = field(default_factory=list)

    @property
    def within_budget(self) -> bool:
        return self.budget is None or self.total_macs <= self.budget

    def to_markdown(self) -> str:
        lines = [
            "| layer | type | kernel / stride | output | params | MACs | share | cumulative |",
            "|---|---|---|---|---:|---:|---:|---:|",
        ]
        running = 0
        for r in self.rows:
            shape = "×".join(map(str, r.output_shape[1:])) if r.output_shape else "not run"
            share = r.macs / self.total_macs if self.total_macs else 0.0
            if r.auxiliary:
                lines.append(f"| {r.name} (auxiliary, not in total) | {r.type} | {r.detail} | {shape} | "
                             f"{r.params:,} | {r.macs / 1e6:,.1f} M | | |")
                continue
            running += r.macs
            cumulative = f"{running / 1e6:,.1f} M"
            if self.budget:
                cumulative += f" ({running / self.budget:.0%} of budget)"
            lines.append(
                f"| {r.name} | {r.type} | {r.detail} | {shape} | {r.params:,} | "
                f"{r.macs / 1e6:,.1f} M | {share:.1%} | {cumulative} |"
            )
            for label, branch_macs in (r.breakdown or {}).items():
                lines.append(f"| &nbsp;&nbsp;↳ {label} | | | | | {branch_macs / 1e6:,.1f} M | | |")
        lines.append(
            f"| **total** | | | | **{self.total_params:,}** | **{self.total_macs / 1e6:,.1f} M** | | |"
        )
        if self.budget:
            verdict = "within" if self.within_budget else "OVER"
            lines.append(f"\nBudget {self.budget / 1e9:.3g} G MACs: {verdict} ({self.total_macs / 1e9:.3f} G).")
        lines.extend(f"\n{note}" for note in self.notes)
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["name", "type", "detail", "output_shape", "params", "macs", "auxiliary"])
        for r in self.rows:
            shape = "x".join(map(str, r.output_shape)) if r.output_shape else ""
            writer.writerow([r.name, r.type, r.detail, shape, r.params, r.macs, int(r.auxiliary)])
        writer.writerow(["total", "", "", "", self.total_params, self.total_macs])
        return buf.getvalue()

    def plot(self, path: str) -> str:
        """Write a PNG: MACs per layer, the cumulative curve and the budget line."""
        from .plots import plot_profile

        return str(plot_profile(self, path))

    def __str__(self) -> str:
        return self.to_markdown()


def _detail(module: nn.Module) -> str:
    def fmt(v: object) -> str:
        v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
        return f"{v[0]}×{v[1]}" if len(set(v)) > 1 else str(v[0])

    if isinstance(module, nn.Sequential) and len(module) and isinstance(module[0], nn.Conv2d):
        module = module[0]
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        k = module.kernel_size
        k = (k, k) if isinstance(k, int) else k
        return f"{k[0]}×{k[1]} / {fmt(module.stride)}"
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return f"→ {fmt(module.output_size)}"
    return ""


def _row_modules(model: nn.Module, depth: int) -> list[tuple[str, nn.Module]]:
    """Modules at `depth` below the root (1: its children); shallower leaves stay rows."""
    rows: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module, level: int) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if level == depth or not any(True for _ in child.children()) or hasattr(child, "spec"):
                rows.append((full, child))  # an Inception block is one row, broken down below
            else:
                walk(full, child, level + 1)

    walk("", model, 1)
    return rows


def _count(model: nn.Module, x: torch.Tensor, modules: list[tuple[str, nn.Module]]):
    """One forward under FlopCounterMode: MACs and output shape per row module, and the total."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    hooks = [
        module.register_forward_hook(
            lambda m, i, out, name=name: shapes.__setitem__(
                name, tuple(out.shape) if isinstance(out, torch.Tensor) else None
            )
        )
        for name, module in modules
    ]
    counter = FlopCounterMode(display=False, depth=None)
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    counts = counter.get_flop_counts()
    root = type(model).__name__

    def macs_of(key: str) -> int:
        return sum(counts.get(key, {}).values()) // 2

    return {name: macs_of(f"{root}.{name}") for name, _ in modules}, shapes, macs_of("Global")


def _is_auxiliary(name: str) -> bool:
    """Auxiliary classifiers (GoogLeNet's aux1/aux2, Inception-v3's AuxLogits) by their name."""
    return name.split(".")[0].lower().startswith("aux")


def _breakdown(module: nn.Module, shape: tuple[int, ...] | None) -> dict[str, int] | None:
    spec = getattr(module, "spec", None)
    if not isinstance(spec, InceptionSpec) or shape is None or len(shape) != 4:
        return None
    macs = spec.macs(shape[2], shape[3], shape[0])
    labels = ("#1×1", "#3×3 reduce", "#3×3", "#5×5 reduce", "#5×5", "pool proj")
    return dict(zip(labels, macs))


def profile(
    model: nn.Module,
    input_size: tuple[int, ...] | list[int] = (1, 3, 224, 224),
    budget: float | None = None,
    depth: int = 1,
    include_aux: bool = False,
) -> ProfileReport:
    """Count parameters and MACs per layer of `model` for one forward.

    Rows are the modules `depth` levels below the model (1: its children).
    Inception blocks (modules with an InceptionSpec) are one row each, broken
    down by branch. The model runs once in its current mode on a random input
    of `input_size` (on the model's device and dtype), under torch.no_grad().
    Auxiliary heads (children named aux*) that the current mode does not run
    are counted on a training-mode copy; they stay out of the total unless
    `include_aux`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(input_size, (tuple, list)) or not input_size or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in input_size
    ):
        raise ValueError(f"input_size must be a sequence of positive ints, got {input_size!r}")
    if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
        raise ValueError(f"budget must be a positive number of MACs, got {budget!r}")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"depth must be an int >= 1, got {depth!r}")
    param = next(model.parameters(), None)
    x = torch.randn(
        *input_size,
        device=param.device if param is not None else "cpu",
        dtype=param.dtype if param is not None else torch.float32,
    )

    modules = _row_modules(model, depth)
    macs, shapes, total = _count(model, x, modules)
    skipped_aux = [n for n, _ in modules if _is_auxiliary(n) and shapes.get(n) is None]
    if skipped_aux:
        # A copy, so that training mode cannot touch the model's BN statistics.
        twin = copy.deepcopy(model).train()
        with torch.random.fork_rng(devices=[]):
            aux_macs, aux_shapes, _ = _count(twin, x, _row_modules(twin, depth))
        for n in skipped_aux:
            macs[n], shapes[n] = aux_macs[n], aux_shapes.get(n)
    rows = [
        ProfileRow(
            name=name,
            type=type(module).__name__,
            detail=_detail(module),
            output_shape=shapes.get(name),
            params=sum(p.numel() for p in module.parameters()),
            macs=macs[name],
            auxiliary=_is_auxiliary(name),
            breakdown=_breakdown(module, shapes.get(name)),
        )
        for name, module in modules
    ]
    aux_total = sum(r.macs for r in rows if r.auxiliary)
    ran_aux = sum(r.macs for r in rows if r.auxiliary and r.name not in skipped_aux)
    main_total = total - ran_aux
    return ProfileReport(
        input_size=tuple(input_size),
        rows=rows,
        total_macs=main_total + aux_total if include_aux else main_total,
        total_params=sum(p.numel() for p in model.parameters()),
        budget=budget,
        unattributed_macs=main_total - sum(r.macs for r in rows if not r.auxiliary),
        aux_macs=aux_total,
    )
