"""Recognising Inception blocks and folding their weights for the fused op.

A block is accepted when its traced forward proves that it computes GoogLeNet's
Inception module: y = cat([relu(1x1(x)), relu(KxK(relu(1x1(x)))),
relu(KxK(relu(1x1(x)))), relu(1x1(maxpool3x3/1/1(x)))], dim=1), each conv
optionally followed by an eval-foldable BatchNorm2d. The block is recognised by
what it computes, never by its class or attribute names: it is traced with
torch.fx (through any user or torchvision wrapper such as BasicConv2d), and every
node of the graph must be one of these ops with these arguments. Every
convolution must be stride 1 with zero 'same' padding and an odd square kernel.
Anything else (a leaky ReLU, an extra op, a subclassed Conv2d) is rejected with
the reason, never half-accepted.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .spec import InceptionSpec

__all__ = ["CanonicalNode", "ConvUnit", "NotAnInceptionBlock", "canonical_graph", "fold_conv_bn", "graph_signature",
           "parse_traced_block", "trace_block"]


class NotAnInceptionBlock(ValueError):
    """The module is not (provably) the Inception computation; the message says why.

    `near_miss` is set once the block is known to concatenate four branches along
    channels: a reason worth showing a user, unlike "a ResNet block does not end in cat".
    """

    def __init__(self, message: str, near_miss: bool = False):
        super().__init__(message)
        self.near_miss = near_miss


class ConvUnit(NamedTuple):
    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None


def _check_conv(conv: nn.Module, bn: nn.Module | None, where: str, kernel: int | None) -> ConvUnit:
    """A stride-1, 'same'-padded, odd square conv (and a foldable BN), or the reasons it is not."""
    if not isinstance(conv, nn.Conv2d):
        raise NotAnInceptionBlock(f"{where} is a {type(conv).__name__}, not nn.Conv2d")
    k = conv.kernel_size[0]
    problems = []
    if conv.kernel_size != (k, k) or k % 2 == 0:
        problems.append(f"kernel {conv.kernel_size} is not square and odd")
    if kernel is not None and k != kernel:
        problems.append(f"kernel {k}x{k} where {kernel}x{kernel} is required")
    if conv.stride != (1, 1):
        problems.append(f"stride {conv.stride} is not 1")
    if conv.dilation != (1, 1) or conv.groups != 1:
        problems.append("dilated or grouped")
    if conv.padding not in ((k // 2, k // 2), "same") or conv.padding_mode != "zeros":
        problems.append(f"padding {conv.padding} ({conv.padding_mode}) is not zero 'same' padding")
    if bn is not None:
        if not isinstance(bn, nn.BatchNorm2d):
            problems.append(f"bn is a {type(bn).__name__}, not nn.BatchNorm2d")
        elif not bn.track_running_stats:
            problems.append("bn has no running statistics to fold")
    if problems:
        raise NotAnInceptionBlock(f"{where}: " + "; ".join(problems))
    return ConvUnit(conv, bn)


def _is_max_pool_3x3_s1_p1(pool: nn.Module) -> bool:
    return (
        type(pool) is nn.MaxPool2d
        and not pool.return_indices
        and _pair(pool.kernel_size) == (3, 3)
        and _pair(pool.stride) == (1, 1)
        and _pair(pool.padding) == (1, 1)
        and _pair(pool.dilation) == (1, 1)
    )


def _units_spec(units: tuple[ConvUnit, ...]) -> tuple[InceptionSpec, tuple[ConvUnit, ...]]:
    """Check that the six units chain as an Inception module does, and read its spec."""
    c = [u.conv for u in units]
    cin = c[0].in_channels
    for where, conv, expected_in in (
        ("the 3x3 reduction", c[1], cin),
        ("the 3x3 convolution", c[2], c[1].out_channels),
        ("the 5x5 reduction", c[3], cin),
        ("the 5x5 convolution", c[4], c[3].out_channels),
        ("the pool projection", c[5], cin),
    ):
        if conv.in_channels != expected_in:
            raise NotAnInceptionBlock(
                f"{where} takes {conv.in_channels} channels, its input has {expected_in}"
            )
    if len({u.bn is None for u in units}) != 1:
        raise NotAnInceptionBlock("some convolutions have batch norm and others do not")
    spec = InceptionSpec(
        in_channels=cin,
        ch1x1=c[0].out_channels,
        ch3x3red=c[1].out_channels,
        ch3x3=c[2].out_channels,
        ch5x5red=c[3].out_channels,
        ch5x5=c[4].out_channels,
        pool_proj=c[5].out_channels,
        k3=c[2].kernel_size[0],
        k5=c[4].kernel_size[0],
    )
    return spec, units


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def _relu_node(node, modules: dict[str, nn.Module]) -> bool:
    """A plain ReLU of one tensor: torch.relu, F.relu (inplace or not), .relu(), nn.ReLU."""
    import torch.nn.functional as F

    if node.op == "call_function" and node.target is F.relu:
        return len(node.args) <= 2 and set(node.kwargs) <= {"inplace"}
    if len(node.args) != 1 or node.kwargs:
        return False
    if node.op == "call_function":
        return node.target in (torch.relu, torch.relu_)
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return node.op == "call_module" and type(modules[node.target]) is nn.ReLU


def trace_block(block: nn.Module):
    """fx.symbolic_trace(block), traced in eval and in train mode (every module's flag is
    restored after): a forward whose Python control flow reads self.training would
    otherwise have one branch frozen into the graph that recognition reads. Returns the
    eval graph, the train one as its `train_twin` attribute. Raises NotAnInceptionBlock
    when the block does not trace, or traces differently by mode."""
    import torch.fx as fx

    name = type(block).__name__
    flags = [(m, m.training) for m in block.modules()]
    # Tracing in train mode through a norm module's forward (timm's BatchNormAct2d) runs
    # its num_batches_tracked.add_(1) on the real buffer: restored after, or the swap would
    # change the model's state (and momentum=None's cumulative average) by one step.
    counters = [(m.num_batches_tracked, m.num_batches_tracked.clone()) for m in block.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.num_batches_tracked is not None]
    graphs = []
    try:
        for mode in (False, True):
            block.train(mode)
            graphs.append(fx.symbolic_trace(block))
    except Exception as exc:  # data-dependent control flow, unsupported ops...
        raise NotAnInceptionBlock(f"{name}'s forward does not trace with torch.fx ({exc})") from None
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for counter, before in counters:
                if not counter.is_meta and not torch.equal(counter, before):
                    counter.copy_(before)
    if graph_signature(graphs[0], root=block) != graph_signature(graphs[1], training=True, root=block):
        raise NotAnInceptionBlock(f"{name}'s forward computes something else in train mode than in eval mode",
                                  near_miss=True)
    # The train-mode graph rides along (a plain attribute, not a submodule) for FX replays
    # in train mode (DropInBlock._run_original).
    object.__setattr__(graphs[0], "train_twin", graphs[1])
    return graphs[0]


def _inline_batch_norm(node, modules: dict[str, nn.Module], training: bool) -> str | None:
    """The BatchNorm2d whose own forward a traced F.batch_norm call repeats, or None: a norm
    module traced through (timm's BatchNormAct2d) reads its running statistics, weight and
    bias as get_attr nodes of one BatchNorm2d and passes its momentum and eps. Its
    `training` flag must be the traced mode's (eval: running statistics), as a
    BatchNorm2d's own forward would pass."""
    import torch.nn.functional as F

    if node.op != "call_function" or node.target is not F.batch_norm or len(node.args) != 3:
        return None
    _, mean, var = node.args
    kw = node.kwargs
    if set(kw) != {"weight", "bias", "training", "momentum", "eps"}:
        return None
    if not all(getattr(a, "op", None) == "get_attr" for a in (mean, var)):
        return None
    owner = mean.target.rpartition(".")[0]
    bn = modules.get(owner)
    if not isinstance(bn, nn.BatchNorm2d) or (mean.target, var.target) != (f"{owner}.running_mean",
                                                                          f"{owner}.running_var"):
        return None
    for name in ("weight", "bias"):
        want = f"{owner}.{name}" if getattr(bn, name) is not None else None
        if (kw[name].target if getattr(kw[name], "op", None) == "get_attr" else kw[name]) != want:
            return None
    if kw["eps"] != bn.eps or kw["momentum"] != (0.0 if bn.momentum is None else bn.momentum) \
            or kw["training"] != (training or bn.running_mean is None):
        return None
    return owner


def _counts_batches(node, modules: dict[str, nn.Module]) -> bool:
    """`bn.num_batches_tracked.add_(1)`, which a BatchNorm2d traced through in train mode
    records: part of what the module itself does in train mode."""
    if node.op != "call_method" or node.target != "add_" or node.args[1:] != (1,) or node.kwargs:
        return False
    buffer = node.args[0]
    owner, _, name = getattr(buffer, "target", "").rpartition(".") if getattr(buffer, "op", None) == "get_attr" \
        else ("", "", "")
    return name == "num_batches_tracked" and isinstance(modules.get(owner), nn.BatchNorm2d)


def graph_signature(graph_module, training: bool = False, root: nn.Module | None = None) -> list[tuple]:
    """Every node of a traced graph as (op, target, args, kwargs), with nodes named by position
    and leaf modules by (qualified name, exact type, their hyperparameters but for convs and
    BNs): two blocks with equal signatures run the same ops on the same operands, and differ
    at most in their convolutions' and BNs' own attributes, which the parsers check.

    Forms that compute the same thing read the same: every ReLU form (F.relu, torch.relu,
    .relu(), nn.ReLU, in place or not) is one ("relu",) node; a BatchNorm2d traced through
    (timm's BatchNormAct2d: F.batch_norm over its own get_attr buffers, after an input-rank
    assertion) is its call_module node; nn.Identity passes its input on. `training`: the
    mode the graph was traced in (what such an inlined BN must have passed on). `root`: the
    module that was traced (a GraphModule keeps only stand-ins of the modules it reads
    attributes of, so those are looked up there)."""
    return [c.entry for c in canonical_graph(graph_module, training, root)]


class CanonicalNode(NamedTuple):
    """One node of graph_signature's canonical graph: the traced node it stands for (for
    messages), its signature entry, and the canonical positions of the nodes it reads."""

    node: object  # torch.fx.Node
    entry: tuple
    inputs: tuple[int, ...]


def canonical_graph(graph_module, training: bool = False, root: nn.Module | None = None) -> list[CanonicalNode]:
    """graph_signature's nodes with the traced node behind each and its inputs by position:
    what the structural parser (graph_parse.py) walks."""
    import torch.fx as fx

    modules = dict((root if root is not None else graph_module).named_modules())
    nodes = list(graph_module.graph.nodes)
    inline_bn = {n: owner for n in nodes if (owner := _inline_batch_norm(n, modules, training)) is not None}
    # Nodes that only feed assertions (an input-rank check) or the inlined BNs' buffers: no computation.
    silent = set()
    for node in reversed(nodes):
        if node.op == "call_function" and node.target is torch._assert:
            silent.add(node)
        elif _counts_batches(node, modules):  # a train-mode BN's num_batches_tracked += 1
            silent.add(node)
        elif node.op == "call_function" and node.target is getattr and not node.users:
            silent.add(node)  # an attribute read nothing uses (the assertion's message reads x.ndim)
        elif node.users and node.op in ("call_function", "call_method", "get_attr") and all(
                u in silent or (u in inline_bn and node is not u.args[0]) for u in node.users):
            silent.add(node)
    index: dict = {}

    def norm(a):
        return fx.node.map_arg(a, lambda n: index[n])

    def reads(a) -> tuple[int, ...]:
        found: list[int] = []
        fx.node.map_arg(a, lambda n: found.append(index[n][1]))
        return tuple(found)

    canonical: list[CanonicalNode] = []
    for node in nodes:
        if node in silent:
            continue
        target = node.target
        if node.op == "call_module" and type(modules[target]) is nn.Identity:
            index[node] = index[node.args[0]]
            continue
        if node in inline_bn:
            operands = node.args[:1]
            entry = ("call_module", (inline_bn[node], nn.BatchNorm2d, None), norm(operands), {})
        elif _relu_node(node, modules):
            operands = node.args[:1]
            entry = ("relu", None, norm(operands), {})
        else:
            if node.op == "call_module":
                m = modules[target]
                # Conv2d and BatchNorm2d by type alone: their shapes and geometry are the
                # parsers' to read and check (any channel counts, any odd 'same' kernel).
                target = (target, type(m), None if type(m) in (nn.Conv2d, nn.BatchNorm2d) else m.extra_repr())
            elif node.op == "placeholder":
                target = "input"
            operands = (node.args, dict(node.kwargs))
            entry = (node.op, target, norm(node.args), norm(dict(node.kwargs)))
        inputs = reads(operands)
        index[node] = ("node", len(canonical))
        canonical.append(CanonicalNode(node, entry, inputs))
    return canonical


def parse_traced_block(block: nn.Module, graph_module=None):
    """Read an Inception module off the traced forward of any block.

    Proves, from the torch.fx graph, that forward(x) is torch.cat([b1, b2, b3, b4], 1)
    with b1 = relu(bn?(conv1x1(x))), b2 and b3 = relu(bn?(convKxK(relu(bn?(conv1x1(x)))))),
    b4 = relu(bn?(conv1x1(maxpool3x3/1/1(x)))), every intermediate used once. Returns
    (spec, units, graph module sharing the block's submodules), or raises
    NotAnInceptionBlock with the first reason it is not. `graph_module`: trace_block(block),
    when the caller already has it.
    """
    import torch.fx as fx
    import torch.nn.functional as F

    name = type(block).__name__
    graph_module = graph_module if graph_module is not None else trace_block(block)
    nodes = list(graph_module.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    output = next(n for n in nodes if n.op == "output")
    if len(inputs) != 1:
        raise NotAnInceptionBlock(f"{name}'s forward takes {len(inputs)} inputs, not one")
    x = inputs[0]
    cat = output.args[0]
    if not (isinstance(cat, fx.Node) and cat.op == "call_function" and cat.target is torch.cat):
        raise NotAnInceptionBlock(f"{name}'s forward does not return a torch.cat")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    parts = cat.args[0]
    if dim not in (1, -3) or not isinstance(parts, (list, tuple)) or len(parts) != 4:
        raise NotAnInceptionBlock(f"{name} concatenates {len(parts)} tensors along dim {dim}, not 4 along 1")
    modules = dict(graph_module.named_modules())

    seen = {x, cat, output}

    def module_of(node, kind):
        """The module a call_module node runs, when it is exactly `kind` called on one tensor."""
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            return None
        return modules[node.target] if type(modules[node.target]) is kind else None

    def conv_unit(node, where):
        """relu(bn?(conv(input))) ending at node -> (unit, input node)."""
        if not isinstance(node, fx.Node) or not _relu_node(node, modules):
            what = node.format_node() if isinstance(node, fx.Node) else repr(node)
            raise NotAnInceptionBlock(f"{name}: {where} does not end in a plain ReLU ({what})", near_miss=True)
        prev = node.args[0]
        bn = module_of(prev, nn.BatchNorm2d)
        if bn is not None:
            seen.add(prev)
            if len(prev.users) != 1:
                raise NotAnInceptionBlock(f"{name}: {where}'s batch norm output is used twice", near_miss=True)
            prev = prev.args[0]
        conv = module_of(prev, nn.Conv2d)
        if conv is None or len(prev.users) != 1:
            raise NotAnInceptionBlock(f"{name}: {where} is not conv(+bn)+ReLU ({prev.format_node()})", near_miss=True)
        seen.update((node, prev))
        return (conv, bn), prev.args[0]

    branches = []
    for i, part in enumerate(parts):
        where = f"branch {i + 1} of the concat"
        (conv, bn), src = conv_unit(part, where)
        if src is x:
            branches.append(("1x1", [(conv, bn)]))
        elif module_of(src, nn.MaxPool2d) is not None and src.args[0] is x:
            if not _is_max_pool_3x3_s1_p1(modules[src.target]):
                raise NotAnInceptionBlock(f"{name}: {where} pools with {modules[src.target]}, not 3x3/1/1", near_miss=True)
            if len(src.users) != 1:
                raise NotAnInceptionBlock(f"{name}: {where}'s pooled input is used twice", near_miss=True)
            seen.add(src)
            branches.append(("pool", [(conv, bn)]))
        elif src.op == "call_function" and src.target is F.max_pool2d:
            raise NotAnInceptionBlock(f"{name}: {where} uses functional max_pool2d; use nn.MaxPool2d", near_miss=True)
        else:
            (rconv, rbn), src2 = conv_unit(src, where + "'s reduction")
            if src2 is not x or len(src.users) != 1:
                raise NotAnInceptionBlock(f"{name}: {where} is deeper than 1x1 -> KxK", near_miss=True)
            branches.append(("spatial", [(rconv, rbn), (conv, bn)]))
    extra = [n for n in nodes if n not in seen]
    if extra:
        raise NotAnInceptionBlock(f"{name}'s forward computes more than the Inception module: "
                                  f"{extra[0].format_node()}", near_miss=True)
    kinds = [k for k, _ in branches]
    if kinds != ["1x1", "spatial", "spatial", "pool"]:
        raise NotAnInceptionBlock(f"{name} concatenates branches {kinds}, not [1x1, spatial, spatial, pool]", near_miss=True)
    where = ("1x1", "3x3 reduction", "3x3 convolution", "5x5 reduction", "5x5 convolution", "pool projection")
    raw = [u for _, units in branches for u in units]
    kernels = (1, 1, None, 1, None, 1)
    try:
        units = tuple(_check_conv(c, b, f"{name}'s {w}", k) for (c, b), w, k in zip(raw, where, kernels))
        spec, units = _units_spec(units)
    except NotAnInceptionBlock as exc:
        raise NotAnInceptionBlock(str(exc), near_miss=True) from None
    return spec, units, graph_module


def fold_conv_bn(unit: ConvUnit) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of conv followed by eval-mode BN: w*g/sqrt(var+eps), (b-mu)*g/sqrt(var+eps)+beta.

    Computed in fp32 or wider, returned in the conv weight's dtype. Differentiable: under
    autograd the folded tensors stay connected to the parameters.
    """
    conv, bn = unit
    if bn is None:
        bias = conv.bias
        if bias is None:
            bias = torch.zeros(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device)
        return conv.weight, bias
    # In fp32 at least, rounded once to the conv's dtype at the end: eager's bf16/fp16 batch
    # norm computes in fp32, and a fold in bf16 rounds mean * scale before beta cancels it
    # (20% off on a block whose BN mean is large against its output). A no-op cast for
    # fp32/fp64 models, whose folds are unchanged bit for bit.
    dtype = conv.weight.dtype
    wide = torch.promote_types(torch.promote_types(dtype, bn.running_var.dtype), torch.float32)
    scale = torch.rsqrt(bn.running_var.to(wide) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(wide)
    # No zeros for a bias-less conv: inductor's freezing does not constant-fold through a
    # fresh torch.zeros, and would recompute every folded bias on every call.
    mean = bn.running_mean.to(wide)
    shift = (-mean if conv.bias is None else conv.bias.to(wide) - mean) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(wide)
    return (conv.weight.to(wide) * scale.reshape(-1, 1, 1, 1)).to(dtype), shift.to(dtype)
