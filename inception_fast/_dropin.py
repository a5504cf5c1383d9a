"""What makes a fused block a drop-in for the block it replaced.

A fused module (FusedInception, FusedBranchGraph) adopts the original block's
children under their own names and keeps the original block object beside them
(sharing those children). On each call it runs the fused kernel only when that
is exactly the computation the original would do; otherwise it runs the
original's own forward, whose values, hooks and autograd are the original's by
construction:

* torch.fx symbolic tracing (create_feature_extractor): the original's traced
  graph, replayed over the shared children, so node names match the original;
* ONNX export (either exporter): the original, so the file holds plain
  conv/relu/pool/concat nodes that any runtime runs;
* torch.func transforms (vmap, grad, jvp, ...): the original, since the fused
  custom ops have no batching or forward-mode rules;
* any forward/backward hook or parametrization on an inner module (added after
  the swap: the swap refuses blocks that already have them), and any global
  module hook: the original, so that every hook fires as it would;
* autocast where the fused kernel lacks the autocast dtype (the C++ kernel is
  fp32/fp64): the original, which autocast runs as usual.

A child replaced after the swap (``fused.branch1 = other``) makes the fused
weights stale and the original block disagree with the fused module's own
children, so the forward raises instead of computing from either.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.modules import module as _module_globals  # where register_module_forward_hook keeps hooks

__all__ = ["DropInBlock", "autocast_dtype", "hooks_or_parametrizations", "match_memory_format"]

log = logging.getLogger("inception_fast")


def hooks_or_parametrizations(module: nn.Module) -> str | None:
    """Why `module` itself would not run as its plain forward (a hook, a parametrization), or None."""
    if module._forward_hooks or module._forward_pre_hooks:
        return "a forward hook or pre-hook (torch.nn.utils.prune and the old weight_norm are pre-hooks)"
    if module._backward_hooks or module._backward_pre_hooks:
        return "a backward hook"
    if "parametrizations" in module._modules:  # where torch.nn.utils.parametrize keeps them
        return "a parametrization (torch.nn.utils.parametrize, weight/spectral norm)"
    return None


def _global_module_hooks() -> bool:
    m = _module_globals
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs a convolution of x in, or None: autocast off on x's device, or
    x in float64 (autocast leaves float64 alone)."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type) or x.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(device_type)


def match_memory_format(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y (channels_last from the kernels) in the memory format eager convolution gives for x:
    channels_last for a channels_last input, contiguous NCHW otherwise (so `y.view(n, -1)`
    works wherever it worked on the original)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return y
    return y.contiguous()


class DropInBlock(nn.Module):
    """Base of the fused modules: adoption of the original block and the per-call choice
    between the fused kernel and the original forward (see the module docstring)."""

    def _adopt_original(self, block: nn.Module, traced: torch.fx.GraphModule | None) -> None:
        for name, child in block.named_children():
            self.add_module(name, child)  # same objects, same names: same state_dict
        # Tuples and object.__setattr__: plain attributes, not registered as submodules twice.
        self._original = (block,)
        object.__setattr__(self, "_traced", traced)
        # (parent, name, child) of every module below this one: a replaced child is seen per
        # call with one identity test each.
        self._tree = tuple((parent, parent._modules, name, child) for parent in self.modules()
                           for name, child in parent._modules.items())
        self._inner = tuple(child for *_, child in self._tree if child is not None)

    def _unfused_reason(self, x: object) -> str | None:
        """Why this call must run the original forward, or None when the fused kernel may."""
        if isinstance(x, torch.fx.Proxy):
            return "fx"
        if torch.onnx.is_in_onnx_export():
            return "onnx"
        if not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None:
            return "torch.func"
        # Runs on every call: plain attribute and identity tests, well under a microsecond a module.
        for parent, children, name, child in self._tree:
            if children.get(name) is not child or parent._modules is not children:
                raise RuntimeError(
                    f"{type(self).__name__}: submodule {name!r} of {type(parent).__name__} was replaced after "
                    "the swap, so the fused weights no longer describe the block; swap the new block again "
                    "(swap_inception / from_module)")
        for m in self._inner:
            if (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                    or "parametrizations" in m._modules):
                return "hooks"
        if _global_module_hooks():
            return "hooks"
        return None

    def _run_original(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy) and self._traced is not None:
            # Replay the original's graph: its call_module nodes reach the shared children,
            # which the outer tracer finds under this module's path.
            return torch.fx.Interpreter(self._traced).run(x)
        return self._original[0](x)

    def train(self, mode: bool = True) -> "DropInBlock":
        # The original block is not a registered submodule (its children are ours): keep
        # its own flag in step too, for forwards that read self.training.
        self._original[0].training = mode
        return super().train(mode)

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this before compiling: TorchScript cannot compile the Python
        # dispatch of the fused op, so the scripted model runs the original block.
        log.warning("%s: torch.jit.script runs the original (unfused) %s; torch.jit.trace, torch.export and "
                    "torch.compile keep the fused kernel", type(self).__name__, type(self._original[0]).__name__)
        return self._original[0]
