"""Counting rules for other MAC counters, so that they count a fused block as they count
the block it replaced.

thop and ptflops count modules through forward hooks; a fused block's forward calls one
custom op instead of its convolutions, so without a rule both count it as 0. fvcore
counts the ops of a jit trace and knows no inception_fast op. Each rule here gives the
peer what it needs:

    import thop, ptflops
    from fvcore.nn import FlopCountAnalysis
    import inception_fast as ifast

    macs, params = thop.profile(model, inputs=(x,), custom_ops=ifast.counting_rules.thop())
    macs, params = ptflops.get_model_complexity_info(
        model, (3, 224, 224), backend="pytorch", as_strings=False,
        custom_modules_hooks=ifast.counting_rules.ptflops())
    flops = FlopCountAnalysis(model, x).set_op_handle(**ifast.counting_rules.fvcore(model)).total()

Each peer keeps its own conventions (all three count a convolution as its
multiply-adds; thop and ptflops add batch norm, pooling and more, each its own way), and
a swapped model counts exactly what the same peer counts for the original:

  * thop, ptflops: the rule runs the block's original, unfused forward (the children
    the fused block keeps) once more, on the meta device (shapes only, nothing
    computed), and adds up what the peer's own hooks on those children (and, for
    ptflops, its patched torch.nn.functional calls) count. Whatever the peer's version
    counts for a conv, BN, ReLU or pooling layer, the fused block counts the same.
  * fvcore: handles for the fused ops in a traced graph (inception_fast::cpu_forward,
    ::triton_forward, ::graph_forward, ::graph_triton_forward and their *_saving
    variants): the convolutions' multiply-adds from the op's input shape and its
    plan, plus, given the model, fvcore's eval-mode batch-norm count (1 per output
    element, 2 with an affine BN) for each BN folded into the block.

ptflops: only its "pytorch" backend takes custom_modules_hooks; its "aten" backend
counts aten ops and sees the fused op as 0.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .fused import FusedInception
from .fused_graph import FusedBranchGraph

__all__ = ["thop", "ptflops", "fvcore", "FUSED_OPS"]

#: The traced op names of the fused forwards that fvcore() gives handles for: the custom
#: ops, and the autograd Functions that a trace with gradients on records whole (fvcore
#: traces with the parameters requiring grad; it names those nodes prim::PythonOp.<class>).
FUSED_OPS = (
    "inception_fast::cpu_forward",
    "inception_fast::triton_forward",
    "inception_fast::graph_forward",
    "inception_fast::graph_triton_forward",
    "inception_fast::graph_forward_saving",
    "inception_fast::graph_triton_forward_saving",
    "prim::PythonOp.InceptionFunction",
    "prim::PythonOp.BranchGraphFunction",
)

_PEER_COUNTERS = ("total_ops", "total_params")  # thop's per-module buffers: never swapped for meta tensors


# -- the unfused forward of a fused block, on the meta device --------------------------------


class _Branches(nn.Module):
    """The four branches of a GoogLeNet-style block, concatenated: the forward of
    ReferenceInception and torchvision's Inception, over the fused block's own children."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)


def _unfused(block: nn.Module) -> nn.Module:
    if isinstance(block, FusedBranchGraph):
        return block._original[0]
    if getattr(block, "_traced", None) is not None:
        return block._traced  # a user's block, as torch.fx traced it (sharing its children)
    return _Branches(block)


def _replay_unfused(block: nn.Module, x: torch.Tensor, read: Callable[[nn.Module], float | None]) -> float:
    """Run `block`'s original forward on a meta twin of x, with meta stand-ins for its
    parameters and buffers; return how much read(m) grew over its submodules (the peer's
    own per-module counters, which its hooks on those submodules increase)."""
    original = _unfused(block)
    subs = list(original.modules())
    before = [read(m) for m in subs]
    state = {name: torch.empty_like(t, device="meta")
             for name, t in [*original.named_parameters(), *original.named_buffers()]
             if name.rpartition(".")[2] not in _PEER_COUNTERS}
    with torch.no_grad():
        torch.func.functional_call(original, state, (torch.empty_like(x, device="meta"),))
    return sum(read(m) - b for m, b in zip(subs, before) if b is not None)


def _first_tensor(inputs: Any) -> torch.Tensor:
    return inputs[0] if isinstance(inputs, (tuple, list)) else inputs


# -- thop -------------------------------------------------------------------------------------


def thop() -> dict[type, Callable]:
    """thop.profile's custom_ops: {FusedInception: rule, FusedBranchGraph: rule}.

    Each rule adds to the fused block's total_ops what thop's own rules count for the
    block's children (conv, BN, ...) when the original block runs. thop.profile reads a
    module with a rule and skips its children, so nothing counts twice.
    """

    def read(m: nn.Module) -> float | None:
        ops = m._buffers.get("total_ops")
        return None if ops is None else float(ops.sum())

    def rule(module: nn.Module, inputs: Any, output: Any) -> None:
        count = _replay_unfused(module, _first_tensor(inputs), read)
        module.total_ops += torch.tensor([count], dtype=torch.float64, device=module.total_ops.device)

    return {FusedInception: rule, FusedBranchGraph: rule}


# -- ptflops ----------------------------------------------------------------------------------


def ptflops() -> dict[type, Callable]:
    """ptflops.get_model_complexity_info's custom_modules_hooks (backend="pytorch"):
    {FusedInception: hook, FusedBranchGraph: hook}.

    Each hook adds to the fused block's __flops__ what ptflops' module hooks count for the
    block's children when the original block runs; the original's torch.nn.functional
    calls (torchvision's F.relu, F.avg_pool2d, F.max_pool2d) go through ptflops' patched
    functions during that run and count as they do for the original. ptflops sums a
    module with a hook and skips its children, so nothing counts twice.
    """

    def read(m: nn.Module) -> float | None:
        return getattr(m, "__flops__", None)

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        module.__flops__ += int(_replay_unfused(module, _first_tensor(inputs), read))

    return {FusedInception: hook, FusedBranchGraph: hook}


# -- fvcore -----------------------------------------------------------------------------------


def _shape(value: Any) -> list[int] | None:
    return value.type().sizes() if value.isCompleteTensor() else None


def _constant(value: Any) -> Any:
    """A traced argument's value: a constant, or a list built from constants (shapes for
    tensors, which the trace does not hold as constants)."""
    node = value.node()
    if node.kind() == "prim::ListConstruct":
        return [_constant(v) if not v.type().kind() == "TensorType" else _shape(v) for v in node.inputs()]
    if value.type().kind() == "TensorType":
        return _shape(value)
    return value.toIValue()


def _scope_module(model: nn.Module | None, value: Any) -> nn.Module | None:
    """The fused block that ran a traced op: fvcore scopes each node with the full names
    of the modules it ran in, innermost last."""
    if model is None:
        return None
    for name in reversed(value.node().scopeName().split("/")):
        try:
            module = model.get_submodule(name) if name else model
        except AttributeError:
            continue
        if isinstance(module, (FusedInception, FusedBranchGraph)):
            return module
    return None


def _bn_count(units, out_numels) -> int:
    """fvcore's eval-mode aten::batch_norm count for each unit's BN: its input's elements,
    times 2 when the BN is affine."""
    return sum(n * (2 if unit.bn.weight is not None else 1) for unit, n in zip(units, out_numels)
               if unit.bn is not None)


def fvcore(model: nn.Module | None = None) -> dict[str, Callable]:
    """Op handles for fvcore's FlopCountAnalysis.set_op_handle(**handles), one per
    name in FUSED_OPS; counts are multiply-adds, as fvcore counts convolutions.

    `model` (the model being analysed) lets a handle find the fused block a traced op
    belongs to (by its scope) and add the batch norms folded into it, as fvcore counts
    them for the original; without it only the convolutions count.
    """
    from .ops.branch_graph import GraphPlan
    from .ops.inception import _spec_of

    def inception(inputs: list, outputs: list) -> int:
        x_shape = _shape(inputs[0])
        n, _, h, w = x_shape
        if outputs[0].node().kind() == "prim::PythonOp":  # InceptionFunction: x, then the 12 weights
            shapes = [_shape(v) for v in inputs[1:13]]
            macs = n * h * w * sum(math.prod(s) for s in shapes[0::2])  # every conv 'same', stride 1
        else:
            macs = _spec_of(x_shape, _constant(inputs[-1])).macs(h, w, n).total
        block = _scope_module(model, outputs[0])
        if isinstance(block, FusedInception) and block.batch_norm:
            s = block.spec
            couts = (s.ch1x1, s.ch3x3red, s.ch3x3, s.ch5x5red, s.ch5x5, s.pool_proj)
            macs += _bn_count(block._units, [n * h * w * c for c in couts])
        return macs

    def graph(inputs: list, outputs: list) -> int:
        x_shape = _shape(inputs[0])
        n, _, h, w = x_shape
        out_pixels = n * ((h - 3) // 2 + 1) * ((w - 3) // 2 + 1)
        block = _scope_module(model, outputs[0])
        if outputs[0].node().kind() == "prim::PythonOp":
            # BranchGraphFunction records its tensors only (x, weights, biases), not the plan
            # that says which convolutions are stride 2: the block's spec does.
            if not isinstance(block, FusedBranchGraph):
                raise ValueError("counting_rules.fvcore(model): give the model to count a traced "
                                 "BranchGraphFunction (its stride-2 convolutions are in the block's spec)")
            macs = block.spec.macs(h, w, n)
        else:
            b_shapes, flat_plan = _constant(inputs[1]), _constant(inputs[3])
            _, _, _, _, gemms = GraphPlan.from_flat(flat_plan)
            # Rows x K x columns per GEMM, as the FlopCounterMode formula (ops/branch_graph.py).
            macs = sum((n * h * w if g[4] == 1 else out_pixels) * shape[-2] * g[7]
                       for shape, g in zip(b_shapes, gemms) if len(shape) >= 2)
        if isinstance(block, FusedBranchGraph):
            numels = [(n * h * w if conv.stride == 1 else out_pixels) * conv.out_channels
                      for conv in block.spec.convs]
            macs += _bn_count(block._units, numels)
        return macs

    return {name: graph if "Graph" in name or "graph" in name else inception for name in FUSED_OPS}
