"""Multiply-add budget of a model, layer by layer.

MACs come from torch.utils.flop_counter.FlopCounterMode (it tracks the module
hierarchy; we do not re-implement op counting). FlopCounterMode reports 2 FLOPs
per multiply-accumulate, so MACs = FLOPs / 2. The fused op registers its own
formula (ops/inception.py), so a fused model counts exactly its reference's MACs.

Conventions: 1 MAC = 1 multiply + 1 add. Pooling, ReLU, LRN, batch norm,
dropout and bias adds are not MACs (FlopCounterMode counts none of them).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["ProfileRow", "ProfileReport", "profile"]


@dataclass(frozen=True)
class ProfileRow:
    name: str
    type: str
    detail: str  # kernel/stride/patch, where it applies
    output_shape: tuple[int, ...] | None  # None: the layer did not run (e.g. aux heads in eval)
    params: int
    macs: int


@dataclass
class ProfileReport:
    input_size: tuple[int, ...]
    rows: list[ProfileRow]
    total_macs: int
    total_params: int
    budget: float | None = None
    unattributed_macs: int = 0  # MACs of ops called directly in a forward, outside any child
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
            running += r.macs
            shape = "×".join(map(str, r.output_shape[1:])) if r.output_shape else "not run"
            share = r.macs / self.total_macs if self.total_macs else 0.0
            cumulative = f"{running / 1e6:,.1f} M"
            if self.budget:
                cumulative += f" ({running / self.budget:.0%} of budget)"
            lines.append(
                f"| {r.name} | {r.type} | {r.detail} | {shape} | {r.params:,} | "
                f"{r.macs / 1e6:,.1f} M | {share:.1%} | {cumulative} |"
            )
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
        writer.writerow(["name", "type", "detail", "output_shape", "params", "macs"])
        for r in self.rows:
            shape = "x".join(map(str, r.output_shape)) if r.output_shape else ""
            writer.writerow([r.name, r.type, r.detail, shape, r.params, r.macs])
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


def profile(
    model: nn.Module,
    input_size: tuple[int, ...] | list[int] = (1, 3, 224, 224),
    budget: float | None = None,
) -> ProfileReport:
    """Count parameters and MACs of each top-level child of `model` for one forward.

    The model runs once in its current mode on a random input of `input_size`
    (on the model's device and dtype), under torch.no_grad().
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(input_size, (tuple, list)) or not input_size or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in input_size
    ):
        raise ValueError(f"input_size must be a sequence of positive ints, got {input_size!r}")
    if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
        raise ValueError(f"budget must be a positive number of MACs, got {budget!r}")
    param = next(model.parameters(), None)
    x = torch.randn(
        *input_size,
        device=param.device if param is not None else "cpu",
        dtype=param.dtype if param is not None else torch.float32,
    )

    children = list(model.named_children())
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        child.register_forward_hook(
            lambda m, i, out, name=name: shapes.__setitem__(
                name, tuple(out.shape) if isinstance(out, torch.Tensor) else None
            )
        )
        for name, child in children
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

    rows = [
        ProfileRow(
            name=name,
            type=type(child).__name__,
            detail=_detail(child),
            output_shape=shapes.get(name),
            params=sum(p.numel() for p in child.parameters()),
            macs=macs_of(f"{root}.{name}"),
        )
        for name, child in children
    ]
    total = macs_of("Global")
    return ProfileReport(
        input_size=tuple(input_size),
        rows=rows,
        total_macs=total,
        total_params=sum(p.numel() for p in model.parameters()),
        budget=budget,
        unattributed_macs=total - sum(r.macs for r in rows),
    )
