"""verify: run an original and a swapped model side by side, block by block."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._dropin import DropInBlock

__all__ = ["BlockError", "VerifyReport", "verify"]


@dataclass(frozen=True)
class BlockError:
    name: str
    max_abs: float
    rel: float  # ||swapped - original|| / ||original||

    def ok(self, rtol: float) -> bool:
        return self.rel <= rtol  # NaN compares False: a NaN never passes


@dataclass
class VerifyReport:
    blocks: list[BlockError]
    logits: BlockError
    rtol: float

    @property
    def ok(self) -> bool:
        """Every fused block and the logits within rtol; False when no fused block was checked
        (a verification that compared nothing proves nothing)."""
        return bool(self.blocks) and self.logits.ok(self.rtol) and all(b.ok(self.rtol) for b in self.blocks)

    def to_markdown(self) -> str:
        lines = ["| output | max abs error | relative error | ok |", "|---|---:|---:|:-:|"]
        for e in [*self.blocks, self.logits]:
            lines.append(f"| {e.name} | {e.max_abs:.3e} | {e.rel:.3e} | {'yes' if e.ok(self.rtol) else 'NO'} |")
        return "\n".join(lines)

    __str__ = to_markdown


def _error(name: str, got: torch.Tensor, want: torch.Tensor) -> BlockError:
    got, want = got.detach().double(), want.detach().double()
    diff = (got - want).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    norm = want.norm().item()
    rel = (got - want).norm().item() / norm if norm > 0 else max_abs
    return BlockError(name, max_abs, rel)


def _logits(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # (logits, aux...) in training mode


def verify(original: nn.Module, swapped: nn.Module, inputs: torch.Tensor, rtol: float = 1e-4) -> VerifyReport:
    """Compare every fused block of `swapped` (FusedInception, FusedBranchGraph) with the
    same-named module of `original`, and the two models' outputs, on `inputs`.

    The report's `ok` is False when a block or the logits differ by more than `rtol`
    (relative L2), and when `swapped` holds no fused block at all. Raises TypeError for
    arguments of the wrong type, ValueError when the two models do not share module names.
    """
    for name, value in (("original", original), ("swapped", swapped)):
        if not isinstance(value, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    names = [n for n, m in swapped.named_modules() if isinstance(m, DropInBlock)]
    originals = dict(original.named_modules())
    missing = [n for n in names if n not in originals]
    if missing:
        raise ValueError(f"original has no module named {missing[0]!r}; are these the same model?")
    captured: dict[str, dict[str, torch.Tensor]] = {"original": {}, "swapped": {}}
    hooks = []
    for n in names:
        for side, model in (("original", original), ("swapped", swapped)):
            module = model.get_submodule(n)
            hooks.append(module.register_forward_hook(
                lambda m, i, out, n=n, side=side: captured[side].__setitem__(n, out)))
    try:
        with torch.no_grad():
            want = _logits(original(inputs))
            got = _logits(swapped(inputs))
    finally:
        for h in hooks:
            h.remove()
    blocks = [_error(n, captured["swapped"][n], captured["original"][n]) for n in names if n in captured["swapped"]]
    return VerifyReport(blocks=blocks, logits=_error("logits", got, want), rtol=rtol)
