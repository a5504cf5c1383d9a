"""swap_inception: one generic walker that puts FusedInception into any model."""

from __future__ import annotations

import logging

from torch import nn

from ._checks import check_choice
from .blocks import NotAnInceptionBlock, parse_inception_block
from .fused import FusedInception
from .ops.inception import BACKENDS

__all__ = ["swap_inception"]

log = logging.getLogger("inception_fast")


def _looks_like_inception(module: nn.Module) -> bool:
    """Worth a full parse, and worth a logged reason when the parse fails."""
    return all(hasattr(module, f"branch{i}") for i in range(1, 5))


def swap_inception(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every Inception block of `model` in place by a FusedInception; return `model`.

    The fused block shares the original's parameters and buffers, so state_dict
    keys and values are unchanged. A block that has the four branches but
    cannot be proven equivalent is left alone, and the log says why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_choice("backend", backend, BACKENDS)
    if isinstance(model, FusedInception):
        return model
    swapped, skipped = [], []
    # Collect first: replacing children while iterating named_modules is undefined.
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if _looks_like_inception(module) and not isinstance(module, FusedInception)
    ]
    for name, module in candidates:
        try:
            parse_inception_block(module)
        except NotAnInceptionBlock as reason:
            skipped.append(name)
            log.warning("swap_inception: left %s (%s) unfused: %s", name or "<model>", type(module).__name__, reason)
            continue
        if not name:  # the model itself is a block: it cannot replace itself in place
            raise TypeError("model is itself an Inception block; use FusedInception.from_module(model)")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, FusedInception.from_module(module, backend))
        swapped.append(name)
    log.info("swap_inception: swapped %d block(s), left %d unfused", len(swapped), len(skipped))
    return model
