"""Multiply-add budget of a model, layer by layer.

MACs come from torch.utils.flop_counter.FlopCounterMode (it tracks the module
hierarchy; we do not re-implement op counting). FlopCounterMode reports 2 FLOPs
per multiply-accumulate, so MACs = FLOPs / 2. The fused ops register their own
formulas, forward and backward (ops/inception.py, ops/branch_graph.py), so a fused
model counts exactly its reference's MACs. Ops torch has no formula for on the CPU
(attention, LSTM) are counted by the formulas of _aten_flops.py, inside profile only.

Conventions: 1 MAC = 1 multiply + 1 add. Pooling, ReLU, LRN, batch norm, softmax,
dropout and bias adds are not MACs (FlopCounterMode counts none of them).

How a model is run (each pass under FlopCounterMode, on the model as given or, with
meta=True, on a copy of it on the meta device):
  1. eval mode, no grad: the inference path. Its MACs are the total.
  2. only if some module did not run in pass 1, or with backward=True: train mode
     (batch norms kept in eval mode: they count no MACs, and batch statistics over
     a batch of 1 would fail). A module that runs here but not in pass 1 is
     auxiliary (GoogLeNet's aux1/aux2, Inception-v3's AuxLogits, whatever their
     name): reported on its own row, outside the total unless include_aux.
     With backward=True this pass also runs the backward of every floating
     output's sum into every parameter that requires grad (torch.autograd.grad:
     no .grad is written), the cost of one training step.
nn.MultiheadAttention and nn.TransformerEncoderLayer take a fused "fast path" under
no_grad that FlopCounterMode cannot see into; profile turns it off
(torch.backends.mha.set_fastpath_enabled(False)) while it runs, and restores it.

The model comes back as it was: modes, parameters, buffers (BN running statistics,
num_batches_tracked), hooks and the global RNG state.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode

from ._aten_flops import ATEN_FORMULAS
from .spec import BranchGraphSpec, InceptionSpec

__all__ = ["ProfileRow", "ProfileReport", "ModelDoesNotRun", "profile", "format_count"]

FUNCTIONAL = "functional"  # ProfileRow.type of the rows holding ops called straight from a forward


class ModelDoesNotRun(ValueError):
    """The model raised on the inputs profile gave it (the model's error is its __cause__)."""


@dataclass(frozen=True)
class ProfileRow:
    name: str
    type: str
    detail: str  # kernel/stride/patch, where it applies
    output_shape: tuple[int, ...] | None  # of the first tensor output; None: did not run (e.g. aux heads in eval)
    params: int
    macs: int
    auxiliary: bool = False  # runs in train mode only: reported, outside the total unless include_aux
    breakdown: dict[str, int] | None = None  # MACs per branch convolution of an Inception block
    depth: int = 1  # 1: a child of the model, 2: a grandchild, ...
    subtotal: bool = False  # nested view: a parent whose MACs include the rows below it
    backward_macs: int | None = None  # with backward=True: MACs of this layer's backward


@dataclass
class ProfileReport:
    input_size: tuple[int, ...]  # shape of the (first) input tensor
    rows: list[ProfileRow]
    total_macs: int
    total_params: int
    budget: float | None = None
    unattributed_macs: int = 0  # MACs of ops called straight from a forward (its "functional" rows)
    aux_macs: int = 0  # auxiliary heads, in total_macs only with include_aux
    notes: list[str] = field(default_factory=list)
    backward_macs: int | None = None  # with backward=True: the backward of one training step
    inputs: str = ""  # what the model was called with, e.g. "1×3×224×224 float32"
    include_aux: bool = False  # auxiliary rows are in total_macs (and backward_macs)

    @property
    def within_budget(self) -> bool:
        return self.budget is None or self.total_macs <= self.budget

    @property
    def training_step_macs(self) -> int | None:
        """Forward plus backward MACs of one training step (None without backward=True)."""
        return None if self.backward_macs is None else self.total_macs + self.backward_macs

    def leaf_rows(self) -> list[ProfileRow]:
        """The rows whose MACs add up to total_macs: all but nested subtotals and, without
        include_aux, auxiliary rows."""
        return [r for r in self.rows if not r.subtotal and (self.include_aux or not r.auxiliary)]

    def to_markdown(self) -> str:
        backward = self.backward_macs is not None
        head = "| layer | type | kernel / stride | output | params | MACs | share | cumulative |"
        rule = "|---|---|---|---|---:|---:|---:|---:|"
        if backward:
            head += " backward MACs | fwd + bwd |"
            rule += "---:|---:|"
        lines = [head, rule]
        running = 0
        for r in self.rows:
            shape = _shape_text(r.output_shape, self.input_size) if r.output_shape else (
                "" if r.type == FUNCTIONAL else "not run")
            indent = "&nbsp;&nbsp;" * (r.depth - 1)
            extra = ""
            if backward:
                bwd = r.backward_macs or 0
                extra = f" {format_count(bwd)} | {format_count(r.macs + bwd)} |"
            counted = not r.auxiliary or self.include_aux
            name = f"{indent}{r.name}"
            if r.auxiliary:
                name += " (auxiliary)" if counted else " (auxiliary, MACs not in total)"
            share = f"{r.macs / self.total_macs:.1%}" if self.total_macs and counted else ""
            if r.subtotal or not counted:
                cumulative = ""
            else:
                running += r.macs
                cumulative = format_count(running)
                if self.budget:
                    cumulative += f" ({running / self.budget:.0%} of budget)"
            kind = f"{r.type} (subtotal)" if r.subtotal else r.type
            lines.append(f"| {name} | {kind} | {r.detail} | {shape} | {r.params:,} | {format_count(r.macs)} | "
                         f"{share} | {cumulative} |{extra}")
            for label, branch_macs in (r.breakdown or {}).items():
                lines.append(f"| {indent}&nbsp;&nbsp;↳ {label} | | | | | {format_count(branch_macs)} | | |"
                             + (" | |" if backward else ""))
        total = (f"| **total** | | | | **{self.total_params:,}** | **{format_count(self.total_macs)}** | | |")
        if backward:
            total += f" **{format_count(self.backward_macs)}** | **{format_count(self.training_step_macs)}** |"
        lines.append(total)
        if self.budget:
            over = self.total_macs / self.budget - 1
            verdict = "within" if self.within_budget else f"OVER by {over:.1%}"
            lines.append(f"\nBudget {self.budget / 1e9:.3g} G MACs: {verdict} ({self.total_macs / 1e9:.3f} G).")
        lines.extend(f"\n{note}" for note in self.notes)
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf)
        nested = any(r.depth > 1 or r.subtotal for r in self.rows)
        backward = self.backward_macs is not None
        header = ["name", "type", "detail", "output_shape", "params", "macs", "auxiliary"]
        header += ["depth", "subtotal"] if nested else []
        header += ["backward_macs"] if backward else []
        writer.writerow(header)
        for r in self.rows:
            shape = "x".join(map(str, r.output_shape)) if r.output_shape else ""
            row = [r.name, r.type, r.detail, shape, r.params, r.macs, int(r.auxiliary)]
            row += [r.depth, int(r.subtotal)] if nested else []
            row += [r.backward_macs or 0] if backward else []
            writer.writerow(row)
        total = ["total", "", "", "", self.total_params, self.total_macs]
        if nested or backward:
            total += [""] * (1 + 2 * nested)
        total += [self.backward_macs] if backward else []
        writer.writerow(total)
        return buf.getvalue()

    def plot(self, path: str) -> str:
        """Write a PNG: MACs per layer, the cumulative curve and the budget line."""
        from .plots import plot_profile

        return str(plot_profile(self, path))

    def __str__(self) -> str:
        return self.to_markdown()


def format_count(n: int | float | None) -> str:
    """A MAC (or any) count in adaptive units, three significant digits: 705 k, 54.4 M, 1.58 G."""
    if n is None:
        return ""
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if abs(v) >= 100 else f"{v:.1f} {unit}" if abs(v) >= 10 else f"{v:.2f} {unit}"
    return f"{n:.0f}"


def _shape_text(shape: tuple[int, ...], input_size: tuple[int, ...]) -> str:
    # The batch dimension is left out where the output leads with the input's batch.
    if len(shape) >= 2 and input_size and shape[0] == input_size[0]:
        shape = shape[1:]
    return "×".join(map(str, shape))


# -- what the table shows of a module --------------------------------------------------


def _detail(module: nn.Module) -> str:
    def fmt(v: object) -> str:
        v = tuple(v) if isinstance(v, (tuple, list)) else (v,)
        return "×".join(map(str, v)) if len(set(v)) > 1 else str(v[0])

    if isinstance(module, nn.Sequential) and len(module) and isinstance(module[0], nn.modules.conv._ConvNd):
        module = module[0]
    inner = getattr(module, "conv", None)  # torchvision's BasicConv2d, our ConvReLU: conv + BN + ReLU
    if not isinstance(module, nn.modules.conv._ConvNd) and isinstance(inner, nn.modules.conv._ConvNd):
        module = inner
    if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)):
        k = module.kernel_size
        dims = len(k) if isinstance(k, (tuple, list)) else (2 if "2d" in type(module).__name__ else 1)
        k = tuple(k) if isinstance(k, (tuple, list)) else (k,) * dims
        return f"{'×'.join(map(str, k))} / {fmt(module.stride)}"
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        return f"→ {fmt(module.output_size)}"
    return ""


def _breakdown(module: nn.Module, shape: tuple[int, ...] | None) -> dict[str, int] | None:
    """MACs per convolution of an Inception block (a module with a .spec): in the paper's
    Table 1 terms for GoogLeNet's module, per branch and level for any branch graph."""
    spec = getattr(module, "spec", None)
    if shape is None or len(shape) != 4:
        return None
    if isinstance(spec, InceptionSpec):
        macs = spec.macs(shape[2], shape[3], shape[0])
        labels = ("#1×1", "#3×3 reduce", "#3×3", "#5×5 reduce", "#5×5", "pool proj")
        return dict(zip(labels, macs))
    if isinstance(spec, BranchGraphSpec):
        return spec.macs_by_conv(shape[2], shape[3], shape[0])
    return None


@dataclass
class _Entry:
    name: str
    module: nn.Module
    depth: int
    container: str  # the expanded module it sits in ("" for the model)
    expanded: bool  # a parent whose children are rows too


def _layout(model: nn.Module, depth: int) -> list[_Entry]:
    """Modules down to `depth` below the root, parents before their children. Leaves
    shallower than `depth` and Inception blocks (modules with a .spec) are not expanded."""
    entries: list[_Entry] = []

    def walk(prefix: str, module: nn.Module, level: int) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            expand = level < depth and any(True for _ in child.children()) and not hasattr(child, "spec")
            entries.append(_Entry(full, child, level, prefix, expand))
            if expand:
                walk(full, child, level + 1)

    walk("", model, 1)
    return entries


# -- running the model under FlopCounterMode --------------------------------------------


@dataclass
class _Pass:
    entered: set  # modules whose forward started
    shapes: dict  # module -> shape of its first tensor output
    forward: dict  # module -> forward MACs
    backward: dict  # module -> backward MACs
    total_forward: int = 0
    total_backward: int = 0
    error: BaseException | None = None


_NORMS = (nn.modules.batchnorm._NormBase,)  # BatchNorm*, SyncBatchNorm, InstanceNorm*


def _set_modes(model: nn.Module, train: bool) -> None:
    # Attribute writes, not .train(): a module's own train() override may do more than
    # flip the flag, and _left_as_found puts every flag back.
    for m in model.modules():
        m.training = train and not isinstance(m, _NORMS)


@contextlib.contextmanager
def _mha_fastpath_off():
    fastpath = torch.backends.mha
    was = fastpath.get_fastpath_enabled()
    fastpath.set_fastpath_enabled(False)
    try:
        yield
    finally:
        fastpath.set_fastpath_enabled(was)


def _first_shape(out: Any) -> tuple[int, ...] | None:
    for t in tree_leaves(out):
        if isinstance(t, torch.Tensor):
            return tuple(t.shape)
    return None


def _tracker_names(counter: FlopCounterMode, model: nn.Module) -> dict:
    """module -> its key in counter.get_flop_counts(). ModuleTracker names each module when
    it first sees it; where that private map is missing, its naming rule rebuilt."""
    known = getattr(getattr(counter, "mod_tracker", None), "_known_modules", None)
    if known is not None:
        return {m: known[m] for m in model.modules() if m in known}
    root = type(model).__name__
    return {m: f"{root}.{name}" if name else root for name, m in model.named_modules()}


_OWNER = "inception_fast.profile.owner"  # autograd Node.metadata key: the module whose forward made the node


class _BackwardCounter(FlopCounterMode):
    """FlopCounterMode that also files each backward op under the module whose forward
    created the autograd node running it. ModuleTracker's own backward attribution keeps a
    module open until the gradient of its input is complete, so where two modules read
    one tensor (an auxiliary head and the next block), one's backward lands in both."""

    def __init__(self) -> None:
        super().__init__(display=False, depth=None, custom_mapping=ATEN_FORMULAS)
        self.by_owner: dict = {}

    def _count_flops(self, func_packet, out, args, kwargs):
        node = torch._C._current_autograd_node()
        if node is not None and func_packet in self.flop_registry:
            flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            owner = node.metadata.get(_OWNER)
            self.by_owner[owner] = self.by_owner.get(owner, 0) + flops
        return super()._count_flops(func_packet, out, args, kwargs)


def _run(model: nn.Module, args: tuple, kwargs: dict, train: bool, backward: bool) -> _Pass:
    _set_modes(model, train)
    entered: set = set()
    shapes: dict = {}
    stack: list = [model]

    def pre(mod, inp):
        entered.add(mod)
        stack.append(mod)

    def post(mod, inp, out):
        shapes[mod] = _first_shape(out)
        if stack[-1] is mod:
            stack.pop()

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    counter = _BackwardCounter() if backward else FlopCounterMode(display=False, depth=None,
                                                                   custom_mapping=ATEN_FORMULAS)
    # With backward, every autograd node made in the forward remembers the innermost module running.
    tag_nodes = torch.autograd.graph.node_creation_hook(lambda node: node.metadata.__setitem__(_OWNER, stack[-1]))
    forward_counts: dict = {}
    error = None
    try:
        with _mha_fastpath_off(), torch.set_grad_enabled(backward), counter:
            try:
                with tag_nodes if backward else contextlib.nullcontext():
                    out = model(*args, **kwargs)
                forward_counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
                if backward:
                    _backward(model, out)
            except Exception as exc:  # noqa: BLE001 -- reported by the caller, with the input it ran on
                error = exc
    finally:
        for h in handles:
            h.remove()
    if error is not None and not forward_counts:
        forward_counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    names = _tracker_names(counter, model)
    fwd = {m: forward_counts.get(key, 0) // 2 for m, key in names.items()}
    bwd: dict = {}
    if backward:
        # Each module's backward: that of the nodes it made, and those its submodules made.
        paths = {m: n for n, m in model.named_modules()}
        for owner, flops in counter.by_owner.items():
            name = paths.get(owner)
            while name is not None:
                m = model.get_submodule(name)
                bwd[m] = bwd.get(m, 0) + flops // 2
                name = name.rpartition(".")[0] if name else None
    return _Pass(entered, shapes, fwd, bwd, forward_counts.get("Global", 0) // 2,
                 sum(counter.by_owner.values()) // 2 if backward else 0, error)


def _backward(model: nn.Module, out: Any) -> None:
    outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad
               and (t.is_floating_point() or t.is_complex())]
    params = [p for p in model.parameters() if p.requires_grad]
    if outputs and params:
        # autograd.grad, not .backward(): no parameter's .grad is written.
        torch.autograd.grad(sum(t.real.sum() if t.is_complex() else t.sum() for t in outputs), params,
                            allow_unused=True)


# -- leaving the model as it was ----------------------------------------------------------


def _hook_dicts(m: nn.Module) -> tuple:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_state_dict_hooks", "_load_state_dict_pre_hooks")
    return tuple(tuple(getattr(m, n, {}).keys()) for n in names)


@contextlib.contextmanager
def _left_as_found(model: nn.Module):
    """Restores every module's mode, buffers (objects and values) and parameters (objects),
    and the global RNG; raises if a forward wrote a parameter in place (none in torch.nn)."""
    modules = list(model.modules())
    modes = [m.training for m in modules]
    buffers = [(m, name, b, None if b is None else (b.detach().clone(), b._version))
               for m in modules for name, b in m._buffers.items()]
    params = [(m, name, p, None if p is None else p._version) for m in modules for name, p in m._parameters.items()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for m, training in zip(modules, modes):
            m.training = training
        with torch.no_grad():
            for m, name, b, saved in buffers:
                m._buffers[name] = b
                if saved is not None and b._version != saved[1]:
                    b.copy_(saved[0])
        for m, name, p, _ in params:
            m._parameters[name] = p
    written = [name for m, name, p, version in params if p is not None and p._version != version]
    if written:
        raise RuntimeError(f"the model's forward wrote parameters in place ({', '.join(written[:5])}); "
                           "profile cannot undo that")


def _meta_twin(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers are on the meta device: shapes
    and dtypes only, never their values (so nothing is copied but the module objects)."""
    memo: dict = {}
    for t in model.parameters():
        memo[id(t)] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
    for t in model.buffers():
        memo[id(t)] = torch.empty_like(t, device="meta")
    return copy.deepcopy(model, memo)


# -- inputs ---------------------------------------------------------------------------------


def _index_bound(model: nn.Module) -> int:
    """Integer inputs are drawn below the smallest embedding table, so that any id is valid."""
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    return min(sizes) if sizes else 2


def _check_size(input_size: object) -> tuple[int, ...]:
    if not isinstance(input_size, (tuple, list, torch.Size)) or not input_size or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in input_size
    ):
        raise ValueError(f"input_size must be a sequence of positive ints, got {input_size!r}")
    return tuple(input_size)


def _make_inputs(model: nn.Module, input_size, inputs, kwargs, dtype, meta: bool) -> tuple[tuple, dict]:
    if inputs is not None and input_size is not None:
        raise ValueError("give input_size (a random tensor of that shape) or inputs, not both")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict, got {type(kwargs).__name__}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    kw = dict(kwargs or {})
    if inputs is None:
        size = _check_size((1, 3, 224, 224) if input_size is None else input_size)
        param = next(model.parameters(), None)
        device = "meta" if meta else (param.device if param is not None else "cpu")
        if dtype is None:
            dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        if dtype.is_floating_point or dtype.is_complex:
            x = torch.randn(size, dtype=dtype, device=device)
        elif dtype == torch.bool:
            x = torch.randint(0, 2, size, device=device).bool()
        else:
            x = torch.randint(0, _index_bound(model), size, dtype=dtype, device=device)
        return (x,), kw
    if dtype is not None:
        raise ValueError("dtype applies to the random input of input_size; give inputs of the dtype you want")
    if isinstance(inputs, torch.Tensor):
        args: tuple = (inputs,)
    elif isinstance(inputs, (tuple, list)):
        args = tuple(inputs)
    elif isinstance(inputs, dict):
        args, kw = (), {**inputs, **kw}
    else:
        raise TypeError(f"inputs must be a tensor, a tuple/list of arguments or a dict of keyword arguments, "
                        f"got {type(inputs).__name__}")
    if meta:
        args, kw = tree_map(lambda t: torch.empty_like(t, device="meta") if isinstance(t, torch.Tensor) else t,
                            (args, kw))
    return args, kw


def _describe(args: tuple, kwargs: dict) -> str:
    def one(v: object) -> str:
        if isinstance(v, torch.Tensor):
            return f"{'×'.join(map(str, v.shape)) or 'scalar'} {str(v.dtype).removeprefix('torch.')}"
        return type(v).__name__

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# -- profile ------------------------------------------------------------------------------------


def profile(
    model: nn.Module,
    input_size: tuple[int, ...] | list[int] | None = None,
    budget: float | None = None,
    depth: int = 1,
    include_aux: bool = False,
    *,
    inputs: Any = None,
    kwargs: dict | None = None,
    dtype: torch.dtype | None = None,
    meta: bool = False,
    nested: bool = False,
    backward: bool = False,
) -> ProfileReport:
    """Count parameters and multiply-accumulates (MACs, not FLOPs) per layer of `model`.

    Inputs (one of):
      input_size: a shape; the model gets one random tensor of it, on its device, of
        `dtype` (default: the parameters' floating dtype). An integer dtype draws ids
        in [0, smallest nn.Embedding's num_embeddings) (token ids). Default (1, 3, 224, 224).
      inputs: the model's own arguments: a tensor, a tuple/list of positional
        arguments, or a dict of keyword arguments. `kwargs` adds keyword arguments
        to either.
    meta: count on a copy of the model on the meta device: shapes only, nothing is
      computed and no weights are copied (ops that read values, like .item(), fail).

    Rows are the modules `depth` levels below the model (1: its children); leaves
    and Inception blocks (modules with a .spec, broken down by branch) stop earlier.
    nested=True also shows every parent down to `depth` with its subtotal; each
    row's .depth says its level. MACs of ops a forward calls directly (x @ w,
    F.linear, ...) outside any row get a row of type "functional", so that the
    rows add up to total_macs.

    The total is the inference path: what the model runs in eval mode. Modules
    that run only in train mode are auxiliary: own rows, in the total only with
    include_aux (report.aux_macs). backward=True also counts the backward of one
    training step in train mode (ProfileRow.backward_macs, report.backward_macs,
    report.training_step_macs).

    The model is left exactly as it was (modes, state_dict, hooks, RNG).

    Raises TypeError/ValueError for bad arguments, and ModelDoesNotRun (a ValueError),
    chained to the model's own error, when the model does not run on the inputs in eval
    mode (or, with backward=True, in train mode). Auxiliary heads that fail in train mode
    are left uncounted, with a note saying why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if input_size is not None:
        _check_size(input_size)
    if budget is not None and not (isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > 0):
        raise ValueError(f"budget must be a positive number of MACs, got {budget!r}")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"depth must be an int >= 1, got {depth!r}")

    with _left_as_found(model):
        net = _meta_twin(model) if meta else model
        args, kw = _make_inputs(net, input_size, inputs, kwargs, dtype, meta)
        described = _describe(args, kw)
        main = _run(net, args, kw, train=False, backward=False)
        if main.error is not None:
            raise ModelDoesNotRun(f"{type(model).__name__} does not run on {described} in eval mode: "
                             f"{_first_line(main.error)}") from main.error
        side = None
        if backward or any(m not in main.entered for m in net.modules()):
            side = _run(net, args, kw, train=True, backward=backward)
            if side.error is not None and backward:
                raise ModelDoesNotRun(f"{type(model).__name__} does not run a training step on {described}: "
                                 f"{_first_line(side.error)}") from side.error
        report = _build(net, model, args, kw, described, main, side, depth, nested, include_aux, backward)
    report.budget = budget
    return report


def _build(net, model, args, kw, described, main: _Pass, side: _Pass | None, depth, nested, include_aux,
           backward) -> ProfileReport:
    names = {m: n for n, m in net.named_modules()}
    aux_tops = _auxiliary_heads(net, names, main, side)
    aux = {m for top in aux_tops for m in top.modules() if m not in main.entered}
    side_ok = side is not None and side.error is None

    def fwd(m: nn.Module) -> int:
        if m in aux:
            return side.forward.get(m, 0) if side_ok else 0
        return main.forward.get(m, 0)

    def bwd(m: nn.Module) -> int | None:
        return side.backward.get(m, 0) if backward else None

    entries = _layout(net, depth)
    rows: list[ProfileRow] = []
    row_names = {e.name for e in entries}
    children: dict[str, list[_Entry]] = {}
    for e in entries:
        children.setdefault(e.container, []).append(e)

    def functional_row(container: str, module: nn.Module, level: int) -> ProfileRow | None:
        kids = children.get(container, [])
        own_f = (main.total_forward if module is net else fwd(module)) - sum(fwd(k.module) for k in kids
                                                                             if k.module not in aux)
        own_b = None
        if backward:
            total_b = side.total_backward if module is net else bwd(module)
            own_b = total_b - sum(bwd(k.module) for k in kids)
        if module in aux or (own_f == 0 and not own_b):
            return None
        name = f"{container}.(functional)" if container else "(functional)"
        return ProfileRow(name, FUNCTIONAL, "", None, 0, own_f, depth=level, backward_macs=own_b)

    def add(e: _Entry) -> None:
        shape = (side.shapes if e.module in aux and side else main.shapes).get(e.module)
        is_row = nested or not e.expanded
        if is_row:
            rows.append(ProfileRow(
                name=e.name, type=type(e.module).__name__, detail=_detail(e.module), output_shape=shape,
                params=sum(p.numel() for p in e.module.parameters()), macs=fwd(e.module),
                auxiliary=e.module in aux, breakdown=None if e.expanded else _breakdown(e.module, shape),
                depth=e.depth, subtotal=e.expanded, backward_macs=bwd(e.module)))
        if e.expanded:
            for k in children.get(e.name, []):
                add(k)
            extra = functional_row(e.name, e.module, e.depth + 1)
            if extra is not None:
                rows.append(extra)
        else:
            # Auxiliary modules inside a row that is not auxiliary itself get rows of their own.
            for top in aux_tops:
                top_name = names[top]
                if e.module not in aux and top_name.startswith(e.name + ".") and top_name not in row_names:
                    rows.append(ProfileRow(top_name, type(top).__name__, _detail(top), side.shapes.get(top),
                                           sum(p.numel() for p in top.parameters()), fwd(top), auxiliary=True,
                                           depth=top_name.count(".") + 1, backward_macs=bwd(top)))

    for e in children.get("", []):
        add(e)
    root_extra = functional_row("", net, 1)
    if root_extra is not None and not entries:  # a model without children is its own one row
        root_extra = ProfileRow(type(net).__name__, type(net).__name__, _detail(net), main.shapes.get(net),
                                sum(p.numel() for p in net.parameters()), root_extra.macs,
                                backward_macs=root_extra.backward_macs)
    if root_extra is not None:
        rows.append(root_extra)

    notes = []
    aux_macs = sum(fwd(m) for m in aux_tops)
    if side is not None and side.error is not None and aux:
        heads = ", ".join(sorted(names[m] for m in aux_tops))
        notes.append(f"Auxiliary {heads}: not counted; the train-mode forward fails on {described} "
                     f"({_first_line(side.error)}).")
    if side is not None and side.error is not None:
        unreached = [r.name for r in rows if r.output_shape is None and r.type != FUNCTIONAL and not r.auxiliary]
        if unreached:
            notes.append(f"Not run in eval mode, and not reached in train mode before that failure: "
                         f"{', '.join(unreached)}.")
    total = main.total_forward + (aux_macs if include_aux else 0)
    backward_total = None
    if backward:
        backward_total = side.total_backward - (0 if include_aux else sum(side.backward.get(m, 0) for m in aux_tops))
    unattributed = sum(r.macs for r in rows if r.type == FUNCTIONAL)  # 0 for a model without children
    first = next((a for a in tree_leaves((args, kw)) if isinstance(a, torch.Tensor)), None)
    return ProfileReport(
        input_size=tuple(first.shape) if first is not None else (),
        rows=rows,
        total_macs=total,
        total_params=sum(p.numel() for p in model.parameters()),
        unattributed_macs=unattributed,
        aux_macs=aux_macs,
        notes=notes,
        backward_macs=backward_total,
        inputs=described,
        include_aux=include_aux,
    )


def _auxiliary_heads(net: nn.Module, names: dict, main: _Pass, side: _Pass | None) -> list[nn.Module]:
    """The outermost modules that run in train mode only and add work there: their
    parent's train-mode count grows by theirs. That tells an auxiliary head (GoogLeNet's
    aux1: the model does more in train mode) from the children of a fused block, which run
    in train mode in place of the fused kernel (the block counts the same either way)."""
    if side is None:
        return []
    only_train = [m for m in side.entered if m not in main.entered and m in names]
    tops: dict = {}
    for m in only_train:
        name = names[m]
        parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
        if parent not in only_train:
            tops.setdefault(parent, []).append(m)
    heads = []
    for parent, children in tops.items():
        if side.error is not None:
            # No counts to compare: modules of a fused or Inception block (.spec) are its own.
            heads += [] if hasattr(parent, "spec") else children
        elif sum(side.forward.get(m, 0) for m in children) <= side.forward.get(parent, 0) - main.forward.get(parent, 0):
            heads += children
    return sorted(heads, key=lambda m: names[m])
