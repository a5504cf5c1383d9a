"""The general structural parser: any block whose traced forward is a branch graph.

parse_branch_graph(block) reads a BranchGraphSpec off the canonical torch.fx graph of a
block (blocks.canonical_graph: every ReLU form one node, a BatchNorm2d traced through as
its module, nn.Identity passed through), never off class or attribute names. It accepts

    forward(x) = torch.cat([branch, ..., pool branch, ..., branch], dim=1)

(nested cats flattened: a fan-out's own cat, or any grouping) where a branch is a chain of
conv units over x, unit = ReLU(BatchNorm2d?(Conv2d(.))), each level reading the previous
level's one output, the last level possibly several units over that output (a fan-out,
adjacent in the concat); a Conv2d has an odd kernel, groups 1, dilation 1, zero padding,
stride 1 with 'same' padding, or (ending its branch, in a grid reduction) 3x3 stride 2
unpadded. At most one pool branch: a 3x3/1/1 average (count_include_pad either way) or max
pool of x (module or functional) and one 1x1 unit; or, in a grid reduction, a bare 3x3/2
max pool of x. Every intermediate feeds only the next level, and nothing else is computed,
except Inception-ResNet's residual tail after the concat:

    forward(x) = relu?(x + scale * conv1x1(torch.cat([...], dim=1)))

(x added on either side, scale a Python number or absent, the 1x1 a plain Conv2d).

Anything else raises NotAnInceptionBlock with one line naming the branch, level and node.
Once the forward is known to concatenate conv branches (or a cat of them is followed by
more ops, as a residual block's), the reason is a near miss, worth a warning.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ConvUnit, NotAnInceptionBlock, canonical_graph, trace_block
from .spec import MAX_KERNEL, Branch, BranchGraphSpec, Conv, Residual

__all__ = ["parse_branch_graph"]

_CATS = (torch.cat, torch.concat, torch.concatenate)
# Positional parameters of the functional pools, after the input, with their defaults.
_POOL_PARAMS = {
    F.max_pool2d: ("max", (("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1),
                           ("ceil_mode", False), ("return_indices", False))),
    F.avg_pool2d: ("avg", (("kernel_size", None), ("stride", None), ("padding", 0), ("ceil_mode", False),
                           ("count_include_pad", True), ("divisor_override", None))),
}
_OPS = {operator.add: "add", operator.mul: "mul", operator.sub: "sub", operator.truediv: "div", torch.add: "add",
        torch.mul: "mul"}


def _pair(v) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


class _Graph:
    """The canonical graph of a traced block, with users by position, and the one-line
    descriptions the reasons use."""

    def __init__(self, block: nn.Module, traced):
        self.name = type(block).__name__
        self.root = block
        self.nodes = canonical_graph(traced, root=block)
        self.users: list[list[int]] = [[] for _ in self.nodes]
        for i, c in enumerate(self.nodes):
            for j in c.inputs:
                self.users[j].append(i)
        self.visited: set[int] = set()

    def fail(self, message: str, near_miss: bool = True):
        raise NotAnInceptionBlock(f"{self.name}: {message}", near_miss=near_miss)

    def module(self, i: int) -> nn.Module | None:
        """The module a call_module node (or an inlined BN) runs on one tensor, else None."""
        c = self.nodes[i]
        if c.entry[0] != "call_module" or len(c.inputs) != 1 or c.entry[3]:
            return None
        return self.root.get_submodule(c.entry[1][0])

    def module_name(self, i: int) -> str:
        return self.nodes[i].entry[1][0]

    def unit_name(self, relu: int) -> str:
        """The conv module's name of the unit ending in this ReLU (ReLU <- BN? <- conv)."""
        j = self.nodes[relu].inputs[0]
        j = self.nodes[j].inputs[0] if self.bn(j) is not None else j
        return self.module_name(j) if self.conv(j) is not None else self.describe(j)

    def is_relu(self, i: int) -> bool:
        return self.nodes[i].entry[0] == "relu"

    def conv(self, i: int) -> nn.Conv2d | None:
        m = self.module(i)
        return m if type(m) is nn.Conv2d and self.nodes[i].entry[1][1] is nn.Conv2d else None

    def bn(self, i: int) -> nn.BatchNorm2d | None:
        m = self.module(i)
        return m if isinstance(m, nn.BatchNorm2d) and self.nodes[i].entry[1][1] is nn.BatchNorm2d else None

    def cat_parts(self, i: int) -> list[int] | None:
        """The inputs of a torch.cat along channels, else None."""
        node = self.nodes[i].node
        if node.op != "call_function" or node.target not in _CATS:
            return None
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        if dim not in (1, -3) or not isinstance(tensors, (list, tuple)) or len(tensors) != len(self.nodes[i].inputs):
            return None
        return list(self.nodes[i].inputs)

    def pool(self, i: int) -> dict | None:
        """A pooling node's kind and geometry, else None: nn.MaxPool2d / nn.AvgPool2d or their
        functional forms, on one tensor."""
        c = self.nodes[i]
        m = self.module(i)
        if type(m) in (nn.MaxPool2d, nn.AvgPool2d):
            kind = "max" if type(m) is nn.MaxPool2d else "avg"
            p = {k: getattr(m, k) for k in ("kernel_size", "stride", "padding", "ceil_mode")}
            if kind == "max":
                p.update(dilation=m.dilation, return_indices=m.return_indices)
            else:
                p.update(count_include_pad=m.count_include_pad, divisor_override=m.divisor_override)
        elif c.node.op == "call_function" and c.node.target in _POOL_PARAMS and len(c.inputs) == 1:
            kind, params = _POOL_PARAMS[c.node.target]
            p = dict(params)
            p.update(zip((k for k, _ in params), c.node.args[1:]))
            p.update(c.node.kwargs)
        else:
            return None
        if p.get("stride") in (None, []):  # F.*_pool2d's default: the kernel size
            p["stride"] = p["kernel_size"]
        for k in ("kernel_size", "stride", "padding", "dilation"):
            if k in p:
                p[k] = _pair(p[k])
        p.update(kind=kind, input=c.inputs[0])
        return p

    def describe(self, i: int) -> str:
        """One node in a few words: the module it runs, or the function and its operands."""
        c = self.nodes[i]
        node = c.node
        if c.entry[0] == "relu":
            return "relu"
        if c.entry[0] == "placeholder":
            return "x"
        if c.entry[0] == "call_module":
            m = self.root.get_submodule(c.entry[1][0])
            if type(m) is nn.Conv2d:
                kh, kw = m.kernel_size
                bias = ", with bias" if m.bias is not None else ""
                return f"{c.entry[1][0]} ({kh}x{kw} conv{bias})"
            return f"{c.entry[1][0]} ({type(m).__name__})"

        def arg(a):
            if isinstance(a, torch.fx.Node):
                return "x" if a.op == "placeholder" else a.name
            if isinstance(a, float):
                return f"{a:g}"
            return repr(a)

        target = node.target
        fn = _OPS.get(target) or getattr(target, "__name__", None) or str(target)
        args = [arg(a) for a in node.args] + [f"{k}={arg(v)}" for k, v in node.kwargs.items()]
        return f"{fn}({', '.join(args)})"


def _follow(g: _Graph, start: int, output: int) -> str:
    """The ops from `start` on to the output, as 'a -> b -> c' (where the path is one chain)."""
    steps, i = [], start
    while i != output and len(g.users[i]) == 1:
        i = g.users[i][0]
        if i != output:
            steps.append(g.describe(i))
    return " -> ".join(steps) if steps else "more ops"


def _adds(c) -> bool:
    """An addition node (x + y, torch.add, .add, .add_)."""
    if c.node.op == "call_method":
        return c.node.target in ("add", "add_")
    return c.node.op == "call_function" and c.node.target in (operator.add, operator.iadd, torch.add)


def _not_the_output(g: _Graph, output_of: int, output: int) -> None:
    """The forward does not return a cat: a near miss when it concatenates conv branches
    along channels on the way (a residual Inception block), else not an Inception block."""
    x = next(j for j, c in enumerate(g.nodes) if c.entry[0] == "placeholder")

    def path_to_x(p) -> frozenset | None:
        """The nodes from p back to x through one-input ops (conv units, pools), else None."""
        path = set()
        while p != x:
            if len(g.nodes[p].inputs) != 1 or g.nodes[p].entry[0] not in ("relu", "call_module", "call_function"):
                return None
            path.add(p)
            p = g.nodes[p].inputs[0]
        return frozenset(path)

    for i in range(len(g.nodes)):
        parts = g.cat_parts(i)
        if parts is None or len(parts) < 2:
            continue
        # Branches over x: at least two parts reach x along chains of their own (a whole
        # network's concat of branches over some inner tensor is not this block's).
        paths = [q for q in map(path_to_x, parts) if q is not None]
        if len(paths) < 2 or len(frozenset().union(*paths)) != sum(map(len, paths)):
            continue
        chain = _follow(g, i, output)
        residual = any(_adds(g.nodes[j]) and x in g.nodes[j].inputs for j in range(i, len(g.nodes)))
        what = ("a residual Inception block whose tail is not act(x + scale * 1x1 conv(concat)), the one residual "
                "tail the fused block runs") if residual else "the fused op ends at the concat"
        g.fail(f"the concat of its {len(parts)} branches is not the output: the forward goes on with {chain}; "
               f"{what}")
    g.fail(f"its forward does not return a torch.cat along channels (it returns {g.describe(output_of)})",
           near_miss=False)


def _residual_tail(g: _Graph, top: int, x: int) -> tuple[int, Residual, nn.Conv2d, list[int]] | None:
    """(the concat's node, the tail, its 1x1 conv, the tail's nodes) when the forward ends in
    relu?(x + scale * conv1x1(cat)), x added either side, the scale a number or absent
    (Inception-ResNet's Block35, 17 and 8), else None."""
    i, relu, nodes = top, False, []
    if g.is_relu(i):
        relu, i = True, g.nodes[i].inputs[0]
        nodes.append(top)
    add = g.nodes[i]
    if not _adds(add) or add.node.kwargs or len(add.inputs) != 2 or add.inputs.count(x) != 1:
        return None
    nodes.append(i)
    j, scale = next(p for p in add.inputs if p != x), 1.0
    mul = g.nodes[j].node
    if (mul.op == "call_function" and mul.target in (operator.mul, torch.mul)) or (
            mul.op == "call_method" and mul.target == "mul"):
        numbers = [a for a in mul.args if not isinstance(a, torch.fx.Node)]
        if mul.kwargs or len(g.nodes[j].inputs) != 1 or len(numbers) != 1 or isinstance(numbers[0], bool) \
                or not isinstance(numbers[0], (int, float)):
            return None
        nodes.append(j)
        scale, j = float(numbers[0]), g.nodes[j].inputs[0]
    conv = g.conv(j)
    if conv is None or g.cat_parts(g.nodes[j].inputs[0]) is None or (
            conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups) != ((1, 1), (1, 1), (0, 0),
                                                                                        (1, 1), 1):
        return None
    nodes.append(j)
    if any(len(g.users[n]) != 1 for n in nodes) or len(g.users[g.nodes[j].inputs[0]]) != 1:
        return None
    return g.nodes[j].inputs[0], Residual(Conv(conv.in_channels, conv.out_channels), scale, relu), conv, nodes


class _Unit:
    """One ReLU(BN?(Conv2d)) found in the graph: node positions and modules."""

    def __init__(self, relu: int, bn: int | None, conv: int, g: _Graph):
        self.relu, self.bn_at, self.conv_at = relu, bn, conv
        self.conv = g.conv(conv)
        self.bn = g.bn(bn) if bn is not None else None
        self.source = g.nodes[conv].inputs[0]
        self.name = g.module_name(conv)


def _unit(g: _Graph, i: int, where: str) -> _Unit:
    """The conv unit whose ReLU is node i, or the reason it is not one."""
    if not g.is_relu(i):
        g.fail(f"{where} ends in {g.describe(i)}, not a conv (+ batch norm) + ReLU")
    j = g.nodes[i].inputs[0]
    bn = None
    if g.bn(j) is not None:
        bn, j = j, g.nodes[j].inputs[0]
    elif g.module(j) is not None and isinstance(g.module(j), nn.modules.batchnorm._BatchNorm):
        g.fail(f"{where}: {g.describe(j)} is not a plain nn.BatchNorm2d")
    if g.conv(j) is None:
        node = g.nodes[j].node
        if node.op == "call_function" and node.target is F.conv2d:
            g.fail(f"{where}: {g.describe(j)} is a functional conv (or a Conv2d subclass traced through), "
                   "not an nn.Conv2d module")
        g.fail(f"{where}: the ReLU reads {g.describe(j)}, not a Conv2d (+ BatchNorm2d)")
    for at, what in ((j, "conv"), (bn, "batch norm")):
        if at is not None and len(g.users[at]) != 1:
            g.fail(f"{where}: the output of {g.describe(at)} is used {len(g.users[at])} times, not only by the "
                   f"unit's next op")
    g.visited.update(k for k in (i, bn, j) if k is not None)
    return _Unit(i, bn, j, g)


def _check_conv(g: _Graph, unit: _Unit, where: str, last: bool) -> Conv:
    """The Conv shape of a unit, or why the fused op cannot run it."""
    conv, bn = unit.conv, unit.bn
    where = f"{where} ({unit.name})"
    kh, kw = conv.kernel_size
    kernel = f"{kh}x{kw} conv"
    if conv.groups != 1:
        g.fail(f"{where}: grouped {kernel} (groups={conv.groups}); the fused op runs dense convolutions")
    if conv.dilation != (1, 1):
        g.fail(f"{where}: dilated {kernel} (dilation {conv.dilation}); the fused op runs undilated convolutions")
    if kh % 2 == 0 or kw % 2 == 0:
        g.fail(f"{where}: even kernel {kh}x{kw}; 'same' padding needs odd kernels")
    if max(kh, kw) > MAX_KERNEL:
        g.fail(f"{where}: {kernel}; the fused op's kernels are at most {MAX_KERNEL}x{MAX_KERNEL}")
    if conv.padding_mode != "zeros":
        g.fail(f"{where}: {kernel} pads with {conv.padding_mode!r}, not zeros")
    padding = conv.padding
    if padding == "valid":
        padding = (0, 0)
    padded = True
    if conv.stride == (1, 1):
        if padding == (0, 0) and (kh, kw) != (1, 1):
            if not last:
                g.fail(f"{where}: {kernel} with padding 0 at stride 1 ('valid') shrinks the grid before its "
                       "branch ends; the fused op's unpadded convolutions end their branch")
            padded = False
        elif padding not in ("same", (kh // 2, kw // 2)):
            g.fail(f"{where}: {kernel} with padding {padding} at stride 1 is neither 'same' padding "
                   f"({kh // 2}, {kw // 2}) nor none")
        stride = 1
    elif conv.stride == (2, 2):
        if (kh, kw) != (3, 3) or padding != (0, 0) or not last:
            g.fail(f"{where}: {kernel} at stride 2 with padding {padding}"
                   f"{'' if last else ' before its branch ends'}; the fused op's stride-2 convolutions are 3x3, "
                   "unpadded, and end their branch (a grid reduction)")
        stride = 2
    else:
        g.fail(f"{where}: {kernel} with stride {conv.stride}; the fused op runs stride 1, or 2 in a grid reduction")
    if bn is not None and (bn.running_mean is None or bn.running_var is None):
        g.fail(f"{where}: its batch norm has no running statistics to fold")
    return Conv(conv.in_channels, conv.out_channels, kh, kw, stride, padded)


def _pool_kind(g: _Graph, pool: dict, where: str, x: int) -> tuple[str, bool, int]:
    """(kind, count_include_pad, stride) of a pool the fused op runs, or the reason."""
    at = pool["input"]
    if at != x:
        g.fail(f"{where}: the pool reads {g.describe(at)}, not the block's input")
    kind = pool["kind"]
    geometry = (pool["kernel_size"], pool["stride"], pool["padding"], pool.get("dilation", (1, 1)),
                bool(pool["ceil_mode"]))
    extras = pool.get("return_indices", False) or pool.get("divisor_override") is not None
    if geometry == ((3, 3), (1, 1), (1, 1), (1, 1), False) and not extras:
        return kind, bool(pool.get("count_include_pad", True)), 1
    if kind == "max" and geometry == ((3, 3), (2, 2), (0, 0), (1, 1), False) and not extras:
        return kind, True, 2
    what = "an average" if kind == "avg" else "a max"
    g.fail(f"{where}: {what} pool with kernel {pool['kernel_size']}, stride {pool['stride']}, padding "
           f"{pool['padding']}{', ceil_mode' if pool['ceil_mode'] else ''}{', extra outputs' if extras else ''}; "
           "the fused op pools 3x3/1 padding 1 (then a 1x1), or 3x3/2 unpadded (max, a grid reduction)")


def parse_branch_graph(block: nn.Module, traced=None, lone: bool = False):
    """(BranchGraphSpec, units in spec.convs order, traced graph) of a block whose traced
    forward is a branch graph (see the module docstring), or NotAnInceptionBlock with the
    first reason it is not. `traced`: trace_block(block), when the caller already has it.
    `lone`: also read a lone conv unit over x, no concat (a stem's BasicConv2d), as a graph
    of one branch of one level."""
    traced = traced if traced is not None else trace_block(block)
    g = _Graph(block, traced)
    inputs = [i for i, c in enumerate(g.nodes) if c.entry[0] == "placeholder"]
    if len(inputs) != 1:
        g.fail(f"its forward takes {len(inputs)} inputs, not one", near_miss=False)
    x = inputs[0]
    output = next(i for i, c in enumerate(g.nodes) if c.entry[0] == "output")
    if len(g.nodes[output].inputs) != 1 or not isinstance(g.nodes[output].node.args[0], torch.fx.Node):
        g.fail("its forward does not return one tensor", near_miss=False)
    top = g.nodes[output].inputs[0]
    parts, residual = g.cat_parts(top), None
    if parts is None:
        found = _residual_tail(g, top, x)
        if found is not None:
            top, residual, tail_conv, tail_nodes = found
            g.visited.update(tail_nodes)
            parts = g.cat_parts(top)
        elif lone and g.is_relu(top):
            parts, top = [top], output  # the unit itself is the one part; `top` is marked visited below
        else:
            _not_the_output(g, top, output)
    if len(parts) < 2 and top != output:
        g.fail(f"its forward concatenates {len(parts)} tensor", near_miss=False)
    g.visited.update((x, output, top))

    # Flatten nested cats (a fan-out's own cat, or any grouping): the same channels in order.
    def flatten(i):
        inner = g.cat_parts(i)
        if inner is not None and len(g.users[i]) == 1:
            g.visited.add(i)
            return [p for q in inner for p in flatten(q)]
        return [i]

    parts = [p for q in parts for p in flatten(q)]
    if len(set(parts)) != len(parts):
        g.fail("the concat takes one tensor twice")

    # Group the parts into branches: adjacent units over one shared intermediate are a fan-out.
    def shared_source(p):
        if not g.is_relu(p):
            return None
        j = g.nodes[p].inputs[0]
        j = g.nodes[j].inputs[0] if g.bn(j) is not None else j
        if g.conv(j) is None:
            return None
        s = g.nodes[j].inputs[0]
        return s if s != x and g.is_relu(s) and len(g.users[s]) > 1 else None

    groups: list[list[int]] = []
    for p in parts:
        s = shared_source(p)
        if s is not None and groups and shared_source(groups[-1][-1]) == s:
            groups[-1].append(p)
        else:
            groups.append([p])

    branches: list[list[list[_Unit]]] = []  # per branch: levels (x outward) of units
    pools: list[tuple[int, str, bool, int, _Unit | None]] = []  # (branch position, kind, include_pad, stride, unit)
    for k, group in enumerate(groups, 1):
        where = f"branch {k}"
        if len(group) == 1 and (pool := g.pool(group[0])) is not None:  # a bare pool in the concat
            kind, include_pad, stride = _pool_kind(g, pool, where, x)
            if stride == 1:
                g.fail(f"{where}: a bare 3x3/1 {kind} pool without a 1x1 projection; the fused op projects a "
                       "stride-1 pool branch with one 1x1")
            if len(g.users[group[0]]) != 1:
                g.fail(f"{where}: the pooled tensor {g.describe(group[0])} is used more than once")
            g.visited.add(group[0])
            pools.append((k - 1, kind, include_pad, stride, None))
            continue
        last = [_unit(g, p, where) for p in group]
        for p in group:
            if len(g.users[p]) != 1:
                others = [g.describe(u) for u in g.users[p] if g.cat_parts(u) is None]
                g.fail(f"{where}: the output of {g.unit_name(p)}'s unit feeds the concat and also "
                       f"{', '.join(others) or 'the concat again'}")
        levels = [last]
        source = last[0].source
        while source != x:
            # What reads this level's input: the level's own convolutions and nothing else.
            readers = {u.conv_at for u in levels[0]}
            if set(g.users[source]) != readers or len(g.users[source]) != len(readers):
                others = ["the concat" if g.cat_parts(u) is not None else g.describe(u)
                          for u in g.users[source] if u not in readers]
                what = g.describe(source) if not g.is_relu(source) else f"the output of {g.unit_name(source)}'s unit"
                g.fail(f"{where}: {what} also feeds {', '.join(others) or 'the same convolution twice'}; only "
                       "the last level of a branch may fan out, to convolutions adjacent in the concat")
            if (pool := g.pool(source)) is not None:
                if len(levels) > 1 or len(last) > 1:
                    g.fail(f"{where}: the pool branch has {sum(map(len, levels))} convolutions; the fused op "
                           "projects the pool with one 1x1")
                kind, include_pad, stride = _pool_kind(g, pool, where, x)
                if stride == 2:
                    g.fail(f"{where}: a 3x3/2 max pool followed by {last[0].name}; the fused op's grid-reduction "
                           "pool is bare (no projection)")
                if len(g.users[source]) != 1:
                    g.fail(f"{where}: the pooled tensor {g.describe(source)} is used more than once")
                g.visited.add(source)
                pools.append((k - 1, kind, include_pad, stride, last[0]))
                break
            if not g.is_relu(source):
                g.fail(f"{where}: {levels[0][0].name} reads {g.describe(source)}, not x, a 3x3 pool of x or the "
                       "previous conv unit")
            unit = _unit(g, source, where)
            levels.insert(0, [unit])
            source = unit.source
        else:
            branches.append(levels)

    extra = next((i for i in range(len(g.nodes)) if i not in g.visited), None)
    if extra is not None:
        g.fail(f"its forward computes more than the branches and the concat: {g.describe(extra)}")

    # Every unit's geometry, branch by branch in concat order, level by level.
    pool_positions = {p[0] for p in pools}
    specs, units = [], []
    conv_branches = [k for k in range(len(groups)) if k not in pool_positions]
    for k, levels in zip(conv_branches, branches):
        where = f"branch {k + 1}"
        shape = []
        for j, level in enumerate(levels):
            shape.append(tuple(_check_conv(g, u, f"{where}, level {j + 1}", j == len(levels) - 1) for u in level))
            units += [ConvUnit(u.conv, u.bn) for u in level]
        specs.append(Branch(tuple(shape)))
    for k, _, _, _, unit in pools:
        if unit is not None:
            proj = _check_conv(g, unit, f"branch {k + 1} (the pool branch)", True)
            if (proj.kh, proj.kw, proj.stride) != (1, 1, 1):
                g.fail(f"branch {k + 1} (the pool branch) ({unit.name}): a {proj.kh}x{proj.kw} conv after the "
                       "pool; the fused op projects the pool with a 1x1")
    if len(pools) > 1:
        g.fail(f"it has {len(pools)} pooling branches (branches {', '.join(str(p[0] + 1) for p in pools)}); the "
               "fused op runs one")
    # No pool branch at all (Inception-ResNet's residual blocks): the spec checks the stride.
    position, kind, include_pad, pool_stride, pool_unit = pools[0] if pools else (None, None, True, 1, None)

    # Stride: a grid reduction ends every branch in 3x3/2 convolutions and pools 3x3/2 bare.
    ends = {k + 1: {c.stride for c in b.levels[-1]} for k, b in zip(conv_branches, specs)}
    stride = 2 if pool_stride == 2 or any(2 in s for s in ends.values()) else 1
    for k, s in ends.items():
        if s != {stride}:
            g.fail(f"branch {k} ends at stride {'/'.join(map(str, sorted(s)))} while the block "
                   f"{'reduces the grid (3x3/2)' if stride == 2 else 'keeps it'}; every branch must end at the "
                   "block's stride")
    if pools and pool_stride != stride:
        g.fail(f"branch {position + 1} (the pool branch) pools at stride {pool_stride} in a stride-{stride} block")
    for k, b in zip(conv_branches, specs):
        first = b.levels[0][0]
        direct = len(b.levels) == 1 and len(b.levels[0]) == 1
        if (first.kh, first.kw) != (1, 1) and not direct:
            g.fail(f"branch {k + 1}, level 1 ({branches[conv_branches.index(k)][0][0].name}): a {first.kh}x"
                   f"{first.kw} conv reads x; the fused op starts each branch of several levels with a 1x1 over "
                   "x (a branch of one conv may be any over x)")
    if pool_unit is not None:
        units.append(ConvUnit(pool_unit.conv, pool_unit.bn))
    if residual is not None:
        units.append(ConvUnit(tail_conv, None))
    proj = None if pool_unit is None else Conv(pool_unit.conv.in_channels, pool_unit.conv.out_channels)
    in_channels = proj.in_channels if proj is not None else specs[0].levels[0][0].in_channels
    try:
        spec = BranchGraphSpec(in_channels, tuple(specs), kind, proj, stride=stride, count_include_pad=include_pad,
                               pool_index=position, residual=residual)
    except ValueError as exc:
        g.fail(str(exc))
    return spec, units, traced
