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

thop and ptflops need no rule of ours. They count through forward hooks on every leaf
module (conv, BN, ReLU, pooling), and a fused block whose children carry hooks runs its
original forward (the drop-in contract: hooks are honoured, see _dropin.py), so those
hooks fire and the peer counts the block exactly as it counts the original, with its own
conventions. thop() and ptflops() therefore return empty rule sets; they exist so that
code can pass them unconditionally, and the tests check both peers with and without.

fvcore's FlopCountAnalysis scopes its jit trace with hooks on every module, so it too
sees the original ops of a fused block and counts a swapped model as the original with
no handle. A trace made without such hooks (torch.jit.trace of a swapped model, then
counted op by op) holds the fused custom ops (inception_fast::graph_forward,
::graph_triton_forward, ...); fvcore() gives handles for those ops: the convolutions' multiply-adds from the op's input shape and its plan, plus, given
the model, fvcore's eval-mode batch-norm count (1 per output element, 2 with an affine
BN) for each BN folded into the block. (A fused Inception-v3 block traced with autograd
on records the same custom op, with its registered autograd.)

ptflops: only its "pytorch" backend takes custom_modules_hooks; its "aten" backend
counts aten ops and sees the fused op as 0.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from torch import nn

from .fused_graph import FusedBranchGraph

__all__ = ["thop", "ptflops", "fvcore", "FUSED_OPS"]

#: The traced op names of the fused forwards that fvcore() gives handles for: the custom
#: ops, and the autograd Functions that a trace with gradients on records whole (fvcore
#: traces with the parameters requiring grad; it names those nodes prim::PythonOp.<class>).
FUSED_OPS = (
    "inception_fast::graph_forward",
    "inception_fast::graph_triton_forward",
    "inception_fast::graph_forward_saving",
    "inception_fast::graph_triton_forward_saving",
    "prim::PythonOp.BranchGraphFunction",
)

def thop() -> dict[type, Callable]:
    """thop.profile's custom_ops for fused blocks: none are needed (see the module
    docstring: thop's hooks on a fused block's children make it run the original)."""
    return {}


def ptflops() -> dict[type, Callable]:
    """ptflops' custom_modules_hooks for fused blocks: none are needed (see the module
    docstring); its "aten" backend, which counts aten ops, sees a fused op as 0."""
    return {}


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
        if isinstance(module, FusedBranchGraph):  # FusedInception too
            return module
    return None


def _bn_count(units, out_numels) -> int:
    """fvcore's eval-mode aten::batch_norm count for each unit's BN: its input's elements,
    times 2 when the BN is affine."""
    return sum(n * (2 if unit.bn.weight is not None else 1) for unit, n in zip(units, out_numels)
               if unit.bn is not None)


def fvcore(model: nn.Module | None = None) -> dict[str, Callable]:
    """Op handles for fvcore's FlopCountAnalysis.set_op_handle(**handles), one per
    name in FUSED_OPS, and fvcore's own addmm count for aten::addmm_ (a residual tail's
    GEMM); counts are multiply-adds, as fvcore counts convolutions.

    `model` (the model being analysed) lets a handle find the fused block a traced op
    belongs to (by its scope) and add the batch norms folded into it, as fvcore counts
    them for the original; without it only the convolutions count.
    """
    from .ops.branch_graph import graph_macs

    def graph(inputs: list, outputs: list) -> int:
        x_shape = _shape(inputs[0])
        n, _, h, w = x_shape
        block = _scope_module(model, outputs[0])
        if outputs[0].node().kind() == "prim::PythonOp":
            # BranchGraphFunction records its tensors only (x, weights, biases), not the plan
            # that says which convolutions are stride 2: the block's spec does.
            if not isinstance(block, FusedBranchGraph):
                raise ValueError("counting_rules.fvcore(model): give the model to count a traced "
                                 "BranchGraphFunction (its stride-2 convolutions are in the block's spec)")
            # The fused op's convolutions only: a residual tail's 1x1 (the last in spec order)
            # runs after it as an aten::addmm, which fvcore counts on its own.
            macs = sum(list(block.graph.macs_by_conv(h, w, n).values())[:block._op_convs])
        else:
            # The FlopCounterMode formula's count (ops/branch_graph.py).
            macs = graph_macs(x_shape, _constant(inputs[3]))
        if isinstance(block, FusedBranchGraph):
            numels = [n * math.prod(conv.out_size(h, w)) * conv.out_channels for conv in block.graph.convs]
            macs += _bn_count(block._units, numels)
        return macs

    handles = {name: graph for name in FUSED_OPS}
    # A residual tail (ops/branch_graph.residual_tail) accumulates its GEMM in place:
    # aten::addmm_, which fvcore counts as it counts aten::addmm once it is told to.
    from fvcore.nn.jit_handles import addmm_flop_jit

    handles["aten::addmm_"] = addmm_flop_jit
    return handles
