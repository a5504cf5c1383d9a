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
  module hook: the original, so that every hook fires as it would. Under
  torch.compile the hooks are read as dynamo reads the original model's: when it
  traces, unguarded unless torch._dynamo.config.skip_nnmodule_hook_guards is False;
* autocast where the fused kernel lacks the autocast dtype (autocast to a dtype no
  kernel takes): the original, which autocast runs as usual;
* forward-mode AD (inside torch.autograd.forward_ad.dual_level): the original;
* any BN in train mode, or without running statistics (a BN cannot be folded then):
  FusedBranchGraph's train-mode BN form where it applies (every convolution followed
  by a BN on batch statistics, float32 or float64 on the C++ kernel, not traced;
  fused_graph.py), else the original; both update the running statistics.

A child replaced, a convolution's geometry changed, or the module shallow-copied
(nn.DataParallel's replicate) after the swap makes the fused weights describe another
block, so the forward raises instead of computing from either.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from torch.autograd import forward_ad as _forward_ad
from torch.nn.modules import module as _module_globals  # where register_module_forward_hook keeps hooks

from .ops.backend import autocast_dtype, resolve_backend

__all__ = ["DropInBlock", "autocast_dtype", "autocast_off", "hooks_or_parametrizations", "match_memory_format",
           "uses_batch_statistics"]

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


def _conv_geometry(conv: nn.Conv2d) -> tuple:
    return (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode)


try:  # the two flags torch.onnx.is_in_onnx_export() reads, without its per-call imports
    from torch.onnx._internal.exporter import _flags as _onnx_flags
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS as _onnx_globals

    def _onnx_exporting() -> bool:
        return _onnx_globals.in_onnx_export or _onnx_flags._is_onnx_exporting
except ImportError:  # another torch layout: the public function
    _onnx_exporting = torch.onnx.is_in_onnx_export


def _global_module_hooks() -> bool:
    m = _module_globals
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


@torch._dynamo.assume_constant_result
def _hooks_when_traced(block: "DropInBlock") -> bool | None:
    """Called by dynamo at trace time, its result a constant of the graph (no guards): whether
    a module below `block` has hooks, or None where dynamo guards nn.Module hooks
    (torch._dynamo.config.skip_nnmodule_hook_guards False), and so must the caller."""
    if not torch._dynamo.config.skip_nnmodule_hook_guards:
        return None
    return block._walk_tree(hooks=True)


@torch._dynamo.assume_constant_result
def _global_hooks_when_traced() -> bool:
    """Global module hooks, read when dynamo traces: it does not guard them for the original
    model either, whatever skip_nnmodule_hook_guards says (a global hook registered after
    compiling fires on the compiled model's outer module only)."""
    return _global_module_hooks()


def autocast_off(x: torch.Tensor, dtype: torch.dtype | None):
    """Around a fused kernel that already runs in autocast's dtype: autocast off on x's
    device (its packing ops must not be cast again); nothing to do without autocast."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(x.device.type, enabled=False)


def match_memory_format(x: torch.Tensor, y: torch.Tensor, saved: bool = True) -> torch.Tensor:
    """y (channels_last from the kernels) in the memory format eager convolution gives for x:
    channels_last for a channels_last input, contiguous NCHW otherwise (so `y.view(n, -1)`
    works wherever it worked on the original).

    Under autograd the fused backward saves y for its ReLU masks, so the caller gets its own
    copy: an in-place op on the output (ReLU(inplace=True), a residual add_) works as it
    does on the original's concat, instead of failing the backward's version check.
    saved=False: the backward keeps no reference to y (the train-mode BN form), no copy."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return y.clone() if y.requires_grad and saved else y
    return y.contiguous()


def uses_batch_statistics(bn: nn.Module) -> bool:
    """Whether a BN normalises by the batch's statistics (train mode, or no running
    statistics), as _BatchNorm.forward decides: then it cannot be folded."""
    return bn.training or bn.running_mean is None or bn.running_var is None


def _inlines_batch_norm(graph: torch.fx.GraphModule) -> bool:
    """Whether a traced block calls F.batch_norm itself (a norm module traced through),
    rather than BatchNorm2d modules that read their own mode when run."""
    return any(n.op == "call_function" and n.target is torch.nn.functional.batch_norm for n in graph.graph.nodes)


class DropInBlock(nn.Module):
    """Base of the fused modules: adoption of the original block and the per-call choice
    between the fused kernel and the original forward (see the module docstring)."""

    def _adopt_original(self, block: nn.Module, traced: torch.fx.GraphModule | None) -> None:
        for name, child in block.named_children():
            self.add_module(name, child)  # same objects, same names: same state_dict
        # Tuples and object.__setattr__: plain attributes, not registered as submodules twice.
        self._original = (block,)
        object.__setattr__(self, "_traced", traced)
        # The train-mode trace (trace_block): a norm traced through (timm's BatchNormAct2d)
        # has its mode baked into the graph as F.batch_norm's `training` argument.
        object.__setattr__(self, "_traced_train", getattr(traced, "train_twin", None))
        # (parent, name, child) of every module below this one: a replaced child is seen per
        # call with one identity test each.
        self._tree = tuple((parent, name, child) for parent in self.modules()
                           for name, child in parent._modules.items())

    def _adopt_units(self, units) -> None:
        """The conv(+BN) units the fused kernel folds, and a snapshot of what the fold and the
        plan assume of them (conv geometry), to be compared on every call."""
        self._units = units  # a plain tuple: not registered twice as submodules
        self._bns = tuple(u.bn for u in units if u.bn is not None)
        self._geometry = tuple(_conv_geometry(u.conv) for u in units)

    def _unfused_reason(self, x: object) -> str | None:
        """Why this call must run the original forward, or None when the fused kernel may."""
        if isinstance(x, torch.fx.Proxy):
            return "fx"
        if self._tree and self._tree[0][0] is not self:
            raise RuntimeError(
                f"{type(self).__name__} was copied without its submodules being re-bound (nn.DataParallel's "
                "replicate, copy.copy): it would compute with the source module's weights. Use "
                "DistributedDataParallel, copy.deepcopy, or swap_inception inside each copy")
        compiling = torch.compiler.is_compiling()
        # dynamo traces the public function, not the flags behind it.
        if torch.onnx.is_in_onnx_export() if compiling else _onnx_exporting():
            return "onnx"
        if not compiling:
            if torch._C._functorch.peek_interpreter_stack() is not None:
                return "torch.func"
            if _forward_ad._current_level >= 0:  # inside forward_ad.dual_level(): dual tensors may flow
                return "forward AD"
        # A BN folds only in eval mode with running statistics; one on batch statistics (train
        # mode, or no running statistics) takes the train-mode BN form of the op, or the
        # original (which updates its running statistics), after the checks below.
        batch_statistics = any(map(uses_batch_statistics, self._bns))
        for unit, geometry in zip(self._units, self._geometry):
            if _conv_geometry(unit.conv) != geometry:
                raise RuntimeError(
                    f"{type(self).__name__}: a convolution's stride, padding, dilation or groups changed after the "
                    "swap, so the fused plan no longer describes the block; swap the block again")
        # Under torch.compile, hooks are read as dynamo reads the original model's: once, when
        # traced, without guards (inner modules' hooks unless skip_nnmodule_hook_guards is
        # False; global module hooks always); each hook dict read here would otherwise be a
        # guard, ~5 per submodule, and a whole swapped googlenet's guards took twice the
        # original's time at batch 1. Replacements stay guarded.
        if not compiling:
            if self._walk_tree(hooks=True) or _global_module_hooks():
                return "hooks"
            return "batch statistics" if batch_statistics else None
        traced = _hooks_when_traced(self)
        if self._walk_tree(hooks=traced is None) or traced or _global_hooks_when_traced():
            return "hooks"
        return "batch statistics" if batch_statistics else None

    def _walk_tree(self, hooks: bool) -> bool:
        """Raise if a submodule was replaced since the swap; with `hooks`, whether any module
        below this one has a hook or parametrization. One pass: identity and dict-truthiness
        tests only."""
        for parent, name, child in self._tree:
            if parent._modules.get(name) is not child:
                raise RuntimeError(
                    f"{type(self).__name__}: submodule {name!r} of {type(parent).__name__} was replaced after "
                    "the swap, so the fused weights no longer describe the block; swap the new block again "
                    "(swap_inception / from_module)")
            if hooks and child is not None and (child._forward_hooks or child._forward_pre_hooks
                                                or child._backward_hooks or child._backward_pre_hooks
                                                or "parametrizations" in child._modules):
                return True  # hooks_or_parametrizations, inlined
        return False

    def _kernel_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype | None] | None:
        """(x as the fused kernel takes it, autocast's dtype or None), or None when only the
        original can run this call as autocast would: under autocast the fused kernels run in
        the autocast dtype where a kernel has it (Triton: fp16 and bf16; the C++ kernel: bf16,
        CPU autocast's default, and fp16 through fp32)."""
        dtype = autocast_dtype(x)
        if dtype is None:
            return x, None
        if self.backend == "reference":
            return None
        x_cast = x.to(dtype)
        try:
            backend = resolve_backend(self.backend, x_cast)
        except TypeError:  # a backend without that dtype: the original, as autocast runs it
            return None
        return (x_cast, dtype) if backend in ("triton", "cpu") else None

    def _run_original(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy) and self._traced is not None:
            # Replay the original's graph: its call_module nodes reach the shared children,
            # which the outer tracer finds under this module's path. The one traced in this
            # mode: an inlined BN replayed from the eval graph in train mode would normalise
            # by its running statistics (create_feature_extractor traces both modes).
            train = getattr(self, "_traced_train", None)
            graph = train if self.training and train is not None else self._traced
            if any(bn.training != self.training for bn in self._bns) and _inlines_batch_norm(graph):
                # A norm traced through (timm's BatchNormAct2d) has its mode baked into the
                # graph: with BNs in another mode than the block, neither trace is right.
                raise RuntimeError(
                    f"{type(self).__name__}: torch.fx tracing of a block whose batch norms are in another mode "
                    "than the block itself (some train, some eval) is not supported when the norms are traced "
                    "through (timm's BatchNormAct2d); put the block and its norms in one mode")
            return torch.fx.Interpreter(graph).run(x)
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
