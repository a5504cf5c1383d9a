"""The fused op in training with batch norm: every convolution of the block followed by
BatchNorm2d on the batch's statistics, then ReLU (torchvision's BasicConv2d in train mode).

Forward: the plan's stages run one after another, every GEMM storing its pre-BN sums z
(the convolution's, with its own bias if it has one); between stages, each stored slice
gets its batch statistics (per channel over every image and pixel of its grid) and
relu(BN(z)) goes where the next stage reads it, or into the output: no concat, no separate
BN and ReLU passes. A folded eval kernel cannot do this: the stage after a reduction needs
the reduction's statistics over the whole batch. On the CPU it is one C++ call
(csrc/batch_norm_train.h: shifted sums in float64); on Triton (_triton_forward), the stage
launches with the LINEAR epilogue and torch.var_mean between them.

Backward: the plan's reference walk (graph_backward.py) with BN's backward between each
ReLU mask and its convolution's backward, on the saved z, mean and invstd: on the CPU one
C++ pass pair per convolution (relu_batch_norm_backward) and the max-pool branch's
scatter (max_pool3x3_scatter); elsewhere ATen's threshold_backward and
native_batch_norm_backward. The output is not saved: its ReLU masks are remade from z.

Running statistics are updated as nn.BatchNorm2d updates them (momentum, or the cumulative
average for momentum=None; the unbiased variance); the module around the op
(fused_graph.py) increments num_batches_tracked and picks each BN's factor.

Eager calls go through BranchGraphBatchNormFunction; under torch.compile (C++ kernel) the
same forward and backward run as the custom ops graph_bn_train and graph_bn_train_backward,
with the packing and the running-statistics updates traced around them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .backend import image, rows, weight_layout
from .branch_graph import _interiors, pack_weights, winograd_data_grad, winograd_tiles, winograd_weight_grad
from .graph_backward import graph_backward_reference
from .plan import GraphPlan

__all__ = ["BatchNormTrain", "apply_graph_bn_train", "check_batch_size"]


class BatchNormTrain(NamedTuple):
    """One convolution's batch norm in training: its affine parameters (None without
    affine), eps, and where the running statistics go: (running_mean, running_var, factor),
    factor the weight of this batch's statistics (momentum, or 1 / num_batches_tracked),
    or None (track_running_stats=False)."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    running: tuple[torch.Tensor, torch.Tensor, float] | None


def _bn_params(graph: GraphPlan, x: torch.Tensor, bns: list[BatchNormTrain]) -> list[torch.Tensor]:
    """Per destination (the output, then each buffer) the (3, channels) gamma / beta / eps
    rows the kernel reads, in the destination's channel order (the max-pool copy's
    channels, not normalised, get 1, 0, 1)."""
    params = []
    for channels in (graph.out_channels, *graph.buf_channels):
        t = x.new_empty(3, channels)
        t[0], t[1], t[2] = 1, 0, 1
        params.append(t)
    for conv, bn, width in zip(graph.convs, bns, _segments(graph).widths):
        p = params[conv.destination + 1]
        c = slice(conv.channel, conv.channel + width)
        if bn.weight is not None:
            p[0, c] = bn.weight
            p[1, c] = bn.bias
        p[2, c] = bn.eps
    return params


class _Segments(NamedTuple):
    """Where each convolution of a plan stores (plan.convs order): its output channels (its
    GEMM segment's width) and the index of its segment's z among the segments of GEMMs with
    weights, in plan order (what the forward returns)."""

    widths: tuple[int, ...]
    z_index: tuple[int, ...]


def _segments(graph: GraphPlan) -> _Segments:
    """_Segments of a plan, worked out once per plan (every training step asks); under
    torch.compile, where dynamo traces around an lru_cache (and warns), each trace."""
    return _plan_segments(graph) if torch.compiler.is_compiling() else _cached_segments(graph)


def _plan_segments(graph: GraphPlan) -> _Segments:
    widths, z_index = [0] * len(graph.convs), [0] * len(graph.convs)
    k = 0
    for g in graph.gemms:
        for i, seg in zip(g.convs, g.segments):
            widths[i], z_index[i] = seg.end - seg.begin, k
            k += 1
    return _Segments(tuple(widths), tuple(z_index))


_cached_segments = functools.lru_cache(maxsize=256)(_plan_segments)


# Training repacks the weights every step, and a 3x3's Winograd panels cost ~5 ns per
# weight to make against ~3 ps per weight and pixel saved in the GEMM: below ~2,000 pixels
# (N x grid) the direct GEMM wins. GoogLeNet's blocks at batch 16, forward with packing
# (Zen 5, 2 threads): 5b (7x7) 8.9 ms Winograd against 6.6 direct, 4a (14x14) 7.1 against
# 6.8, 4e 12.8 against 13.4, 3a (28x28) 10.0 against 11.6.
WINOGRAD_MIN_PIXELS = 2048


def _winograd_flags(graph: GraphPlan, n: int, h: int, w: int):
    """pack_weights's Winograd flags for a training step: winograd_tiles where the GEMM's
    grid holds at least WINOGRAD_MIN_PIXELS pixels over the batch, else direct."""
    tiles = winograd_tiles(graph, h, w)
    return [t if n * g.grid(h, w)[0] * g.grid(h, w)[1] >= WINOGRAD_MIN_PIXELS else False
            for g, t in zip(graph.gemms, tiles)]


def _cpu_pack(graph: GraphPlan, x: torch.Tensor, weights: list, biases: list) -> tuple[list, list]:
    """The form's packed weights on the C++ kernel, Winograd by _winograd_flags for x's grid."""
    n, _, h, w = x.shape
    return pack_weights(graph, list(weights), list(biases), "cpu", _winograd_flags(graph, n, h, w))


def _cpu_run(x: torch.Tensor, packed_b: list, packed_bias: list, bn_params: list, flat_plan: list[int]):
    """graph_forward_bn_train: (output, the intermediates' interiors (N, H, W, channels)
    contiguous, z per GEMM segment, stats per destination). Contiguous because ATen's
    convolution backward takes its input fast: a bordered interior view cost the backward
    ~3x on GoogLeNet's 3x3s; the kernel writes them as it normalises."""
    return tuple(torch.ops.inception_fast.graph_forward_bn_train(x, packed_b, packed_bias, bn_params, flat_plan))


def _contiguous_interiors(buffers: list[torch.Tensor], h: int, w: int) -> list[torch.Tensor]:
    return [t.contiguous() for t in _interiors(buffers, h, w)]


class BranchGraphBatchNormFunction(torch.autograd.Function):
    """The train-mode BN form of the fused op, over Conv2d-layout weights.

    apply(x, backend, graph, backward_plan, bns, *weights, *biases, *gammas, *betas):
    backend "cpu" (the C++ kernel) or "triton" (_triton_forward); graph the
    GraphPlan of the block (convolutions in spec order), backward_plan its backward_flat();
    bns one BatchNormTrain per convolution (its running statistics are updated here);
    biases zeros for a convolution without one, gammas and betas None without affine.
    Saves x, the normalised intermediates, the pre-BN sums and the statistics (not the
    output: its ReLU masks are remade from the sums).
    """

    @staticmethod
    def forward(ctx, x, backend: str, graph: GraphPlan, backward_plan, bns, *params):
        n_conv = len(graph.convs)
        weights, biases = params[:n_conv], params[n_conv:2 * n_conv]
        n, _, h, w = x.shape
        if backend == "triton":
            y, buffers, z, stats = _triton_forward(x, graph, list(weights), list(biases), bns)
            inter = _contiguous_interiors(buffers, h, w)
        else:
            y, inter, z, stats = _cpu_run(x, *_cpu_pack(graph, x, weights, biases), _bn_params(graph, x, bns),
                                          graph.flat())
        _update_running_stats(graph, bns, stats, n, h, w)
        # Not y: the output's ReLU masks are remade from z (stats rows 3 and 4), so the caller
        # owns y outright (an in-place op on it, as on eager's concat, breaks no backward)
        # and no copy of it is made or kept.
        ctx.save_for_backward(x, *weights, *params[2 * n_conv:3 * n_conv], *inter, *z, *stats)
        ctx.graph, ctx.backward_plan, ctx.eps, ctx.backend = graph, backward_plan, [bn.eps for bn in bns], backend
        ctx.counts = (n_conv, len(inter), len(z))
        return y

    @staticmethod
    def backward(ctx, grad_out):
        # Its C++ passes have no derivatives. once_differentiable alone is not enough: where
        # grad_out needs no grad, or autograd.grad skips its error node, a second order
        # through it would silently lose every term of this block (a gradient penalty's
        # weight gradients came out 0.02 against eager's 558).
        if torch.is_grad_enabled():
            raise RuntimeError(
                "inception_fast: second-order gradients (create_graph=True) through a fused block in train mode "
                "with batch norm are not supported; set FusedBranchGraph.fuse_train_bn = False (or on the "
                "block) to run such blocks unfused in train mode")
        return BranchGraphBatchNormFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        n_conv, n_inter, n_dest = ctx.counts
        x, *rest = ctx.saved_tensors
        weights, gammas = rest[:n_conv], rest[n_conv:2 * n_conv]
        inter = rest[2 * n_conv:2 * n_conv + n_inter]
        z = rest[2 * n_conv + n_inter:2 * n_conv + n_inter + n_dest]
        stats = rest[2 * n_conv + n_inter + n_dest:]
        first = 5  # x, backend, graph, backward_plan, bns
        needs = ctx.needs_input_grad
        dx, d_w, d_b, d_gamma, d_beta = _walk_backward(
            grad_out, x, list(weights), list(gammas), ctx.eps, list(inter), list(z), list(stats), ctx.graph.convs,
            ctx.backward_plan, _segments(ctx.graph).z_index, ctx.backend, needs[0], needs[first:first + n_conv],
            needs[first + n_conv:first + 2 * n_conv], needs[first + 2 * n_conv:first + 3 * n_conv],
            needs[first + 3 * n_conv:first + 4 * n_conv])
        # In each parameter's layout, so that AccumulateGrad stores them without a copy
        # (oneDNN's follow the layout of the convolution's input, not the weight's).
        d_w = [g if g is None else g.contiguous(memory_format=weight_layout(wt)) for g, wt in zip(d_w, weights)]
        return (dx, None, None, None, None, *d_w, *d_b, *d_gamma, *d_beta)


def _update_running_stats(graph: GraphPlan, bns: list[BatchNormTrain], stats: list[torch.Tensor], n: int, h: int,
                          w: int) -> None:
    """Each BN's running mean and unbiased running variance, as nn.BatchNorm2d's kernel
    updates them, from the forward's stats rows (mean, biased variance)."""
    for conv, bn, width in zip(graph.convs, bns, _segments(graph).widths):
        if bn.running is None:
            continue
        running_mean, running_var, factor = bn.running
        s = stats[conv.destination + 1][:, conv.channel:conv.channel + width]
        gh, gw = conv.grid(h, w)
        count = n * gh * gw
        running_mean.copy_(factor * s[0] + (1 - factor) * running_mean)
        running_var.copy_(factor * s[1] * (count / (count - 1)) + (1 - factor) * running_var)


def _walk_backward(grad_out, x, weights: list, gammas: list, eps: list, inter: list, z: list, stats: list,
                   steps, backward_plan: list[int], z_index, backend: str, needs_x: bool, needs_weight, needs_bias,
                   needs_gamma, needs_beta):
    """The form's backward: graph_backward_reference's walk with BN's backward between each
    ReLU mask and its convolution. gammas per convolution (None without affine), eps its
    BN's (the ATen path's), inter / z / stats as the forward returns them, steps the
    convolutions' ConvSteps in spec order (GraphPlan.convs, or from_backward_flat's),
    z_index each one's z (_Segments), needs_* one flag per convolution. Returns (dx, [dW],
    [db], [dgamma], [dbeta]), None where not needed."""
    n, _, h, w = x.shape
    n_conv = len(weights)
    d_gamma, d_beta = [None] * n_conv, [None] * n_conv
    cpu = backend == "cpu"

    def batch_norm(i, grad, act, out=None):
        conv = steps[i]
        c = slice(conv.channel, conv.channel + weights[i].shape[0])
        s = stats[conv.destination + 1]
        zi = z[z_index[i]].reshape(grad.shape)
        # The output's activations are not kept (act None): the mask comes from z.
        if cpu and out is not None:
            dz = out
            dg, db = torch.ops.inception_fast.relu_batch_norm_backward_into(
                grad, act, zi, s[0, c], s[2, c], gammas[i], s[3, c], s[4, c], out)
        elif cpu:
            dz, dg, db = torch.ops.inception_fast.relu_batch_norm_backward(
                grad, act, zi, s[0, c], s[2, c], gammas[i], s[3, c], s[4, c])
        else:  # ATen's pair, on any device
            if act is None:
                act = _bn_affine(zi, s[3, c], s[4, c])
            g = torch.ops.aten.threshold_backward(grad, act, 0)
            gh, gw = conv.grid(h, w)
            dz, dg, db = torch.ops.aten.native_batch_norm_backward(
                image(g, n, gh, gw), image(zi, n, gh, gw), gammas[i], None, None, s[0, c], s[2, c], True,
                eps[i], [True, needs_gamma[i], needs_beta[i]])
            dz = rows(dz) if out is None else out.copy_(rows(dz))
        d_gamma[i] = dg if needs_gamma[i] else None
        d_beta[i] = db if needs_beta[i] else None
        return dz

    needs = [needs_x, any(needs_weight) or any(needs_bias)]
    grads = graph_backward_reference(grad_out, x, None, inter, weights, needs, backward_plan,
                                     data_grad=winograd_data_grad(n, h, w) if cpu else None,
                                     weight_grad=winograd_weight_grad if cpu else None,
                                     batch_norm=batch_norm, conv_1x1=True,
                                     max_pool_scatter=torch.ops.inception_fast.max_pool3x3_scatter if cpu else None,
                                     bias_grads=any(needs_bias))
    d_w = [g if want else None for g, want in zip(grads[1::2], needs_weight)]
    d_b = [g if want else None for g, want in zip(grads[2::2], needs_bias)]
    return grads[0], d_w, d_b, d_gamma, d_beta


def _bn_affine(z: torch.Tensor, alpha: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """BN's output before ReLU on the Triton path: one expression for the forward and for
    the backward's ReLU mask, so that both round alike."""
    return z * alpha + shift


def _triton_forward(x: torch.Tensor, graph: GraphPlan, weights: list, biases: list, bns: list[BatchNormTrain]):
    """The form on the Triton kernels: the plan's stage launches with the LINEAR epilogue
    (every GEMM stores conv + bias), and between stages each segment's batch statistics
    (torch.var_mean in float32 or wider) and relu(z alpha + shift) in place, as the C++
    kernel's normalize_stage. Returns what graph_forward_bn_train returns: (output,
    buffers, z per GEMM segment in plan order, stats per destination (5, channels))."""
    from .branch_graph_triton import graph_forward_triton
    from .triton_gemm import input_precision, round_tf32_host

    n, _, h, w = x.shape
    params = _bn_params(graph, x, bns)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    stats = [x.new_zeros(5, c, dtype=acc) for c in (graph.out_channels, *graph.buf_channels)]
    jobs = [(g.stage, s.destination, s.channel, s.end - s.begin) for g in graph.gemms if g.convs for s in g.segments]
    z: list[torch.Tensor | None] = [None] * len(jobs)
    tf32 = input_precision(x.dtype) == "tf32"

    def normalize(stage: int, out: torch.Tensor, bufs: list) -> None:
        for k, (st, dest, ch, co) in enumerate(jobs):
            if st != stage:
                continue
            view = (rows(out) if dest < 0 else bufs[dest].reshape(-1, bufs[dest].shape[-1]))[:, ch:ch + co]
            zk = view.clone()
            wide = zk.to(acc)
            # mean() as eager's sum / count: an infinite value gives an infinite mean, not var_mean's NaN
            mean, var = wide.mean(dim=0), wide.var(dim=0, unbiased=False)
            p = params[dest + 1][:, ch:ch + co].to(acc)
            invstd = torch.rsqrt(var + p[2])
            alpha = p[0] * invstd
            shift = p[1] - mean * alpha
            for row, value in enumerate((mean, var, invstd, alpha, shift)):
                stats[dest + 1][row, ch:ch + co] = value
            y = torch.relu(_bn_affine(zk, alpha, shift)).to(x.dtype)
            # A buffer is the next stage's dot operand: TF32-exact, as the RELU epilogue leaves it.
            view.copy_(round_tf32_host(y) if tf32 and dest >= 0 else y)
            z[k] = zk.reshape(n, *(graph.out_size(h, w) if dest < 0 else (h, w)), co)

    packed_b, packed_bias = pack_weights(graph, weights, biases, "triton")
    bufs: list[torch.Tensor] = []
    y = graph_forward_triton(x, packed_b, packed_bias, graph.flat(), keep=bufs, between_stages=normalize)
    return y, bufs, z, stats


def check_batch_size(graph: GraphPlan, x: torch.Tensor) -> None:
    """Raise eager batch norm's ValueError (F.batch_norm's _verify_batch_size, same words)
    where a convolution of the block would have a single value per channel over x: batch 1
    onto a 1x1 grid."""
    n, _, h, w = x.shape
    for conv, width in zip(graph.convs, _segments(graph).widths):
        gh, gw = conv.grid(h, w)
        if n * gh * gw == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input size "
                             f"{torch.Size((n, width, gh, gw))}")


def apply_graph_bn_train(x: torch.Tensor, graph: GraphPlan, backward_plan: list[int], weights: list, biases: list,
                         bns: list[BatchNormTrain], backend: str = "cpu") -> torch.Tensor:
    """x (N, C, H, W) through the block with train-mode batch norm after every convolution,
    on backend "cpu" (float32, float64) or "triton" (float32; CUDA tensors, or CPU ones
    under TRITON_INTERPRET=1): (N, out_channels, H', W') channels_last, differentiable in
    x, the weights and biases (None without one) and the BNs' affine parameters. Updates the
    BNs' running statistics (not num_batches_tracked: the caller's, as nn.BatchNorm2d's
    forward increments it before its kernel). Raises ValueError, as eager batch norm does,
    where a convolution's output has a single value per channel (check_batch_size). Under
    torch.compile on "cpu", the custom ops graph_bn_train and graph_bn_train_backward."""
    check_batch_size(graph, x)
    biases = [b if b is not None else wt.new_zeros(wt.shape[0]) for wt, b in zip(weights, biases)]
    if backend == "cpu" and torch.compiler.is_compiling():
        return _compiled_graph_bn_train(x, graph, backward_plan, weights, biases, bns)
    params = (*weights, *biases, *(bn.weight for bn in bns), *(bn.bias for bn in bns))
    return BranchGraphBatchNormFunction.apply(x, backend, graph, backward_plan, bns, *params)


# Under torch.compile the form runs as two custom ops, opaque to inductor: the forward
# (graph_forward_bn_train, plus the intermediates' interiors the backward reads) and its
# backward (_walk_backward). The weights are packed, the (3, channels) BN rows built and the
# running statistics updated around them in traced code. The ops take the Conv2d-layout
# weights and biases as inputs of their own, so that the weight gradients come straight from
# the walk (a packed Winograd B has no cheap gradient), and the BN rows' gradient carries
# gamma's and beta's.
@torch.library.custom_op("inception_fast::graph_bn_train", mutates_args=())
def graph_bn_train(x: torch.Tensor, b: list[torch.Tensor], bias: list[torch.Tensor], bn_params: list[torch.Tensor],
                   weights: list[torch.Tensor], biases: list[torch.Tensor], flat_plan: list[int],
                   backward_plan: list[int], z_index: list[int]
                   ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The train-mode BN forward on the C++ kernel: (output (N, C', H', W') channels_last,
    intermediates' interiors (N, H, W, channels) contiguous, z per GEMM segment, stats per
    destination), as graph_forward_bn_train; weights, biases, backward_plan and z_index are
    for the backward only."""
    return _cpu_run(x, b, bias, bn_params, flat_plan)


@graph_bn_train.register_fake
def _graph_bn_train_fake(x, b, bias, bn_params, weights, biases, flat_plan, backward_plan, z_index):
    graph = GraphPlan.from_flat(list(flat_plan))
    n, _, h, w = x.shape
    ho, wo = graph.out_size(h, w)
    y = torch.empty((n, graph.out_channels, ho, wo), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    inter = [x.new_empty((n, h, w, c)) for c in graph.buf_channels]
    z = [x.new_empty((n, *((ho, wo) if s.destination < 0 else (h, w)), s.end - s.begin))
         for g in graph.gemms if g.convs for s in g.segments]
    return y, inter, z, [x.new_empty((5, c)) for c in (graph.out_channels, *graph.buf_channels)]


@torch.library.custom_op("inception_fast::graph_bn_train_backward", mutates_args=())
def graph_bn_train_backward(grad_out: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor],
                            bn_params: list[torch.Tensor], inter: list[torch.Tensor], z: list[torch.Tensor],
                            stats: list[torch.Tensor], backward_plan: list[int], z_index: list[int],
                            needs: list[bool]) -> list[torch.Tensor]:
    """graph_bn_train's backward on the C++ kernels: [dx, dW..., db..., d_bn_params...] (an
    empty tensor where not needed; needs = (x, weights, biases, bn_params)); d_bn_params per
    destination (3, channels): gamma's gradients in row 0, beta's in row 1."""
    steps = GraphPlan.from_backward_flat(backward_plan)[4]
    n_conv = len(weights)
    gammas = [bn_params[c.destination + 1][0, c.channel:c.channel + wt.shape[0]] for c, wt in zip(steps, weights)]
    flags = [[flag] * n_conv for flag in needs[1:]]
    dx, d_w, d_b, d_gamma, d_beta = _walk_backward(
        grad_out.contiguous(memory_format=torch.channels_last), x, list(weights), gammas, [0.0] * n_conv, list(inter),
        list(z), list(stats), steps, list(backward_plan), list(z_index), "cpu", needs[0], *flags, flags[2])
    d_params = [torch.zeros_like(p) for p in bn_params] if needs[3] else []
    for c, wt, dg, db in zip(steps, weights, d_gamma, d_beta):
        if dg is not None:
            d_params[c.destination + 1][0, c.channel:c.channel + wt.shape[0]] = dg
            d_params[c.destination + 1][1, c.channel:c.channel + wt.shape[0]] = db

    def given(g, memory_format=torch.contiguous_format):
        # The fake's layout; a fresh empty tensor for each one not needed (outputs never alias).
        return g.contiguous(memory_format=memory_format) if g is not None else x.new_empty(0)

    return ([given(dx if needs[0] else None, torch.channels_last)]
            + [given(g, weight_layout(wt)) for g, wt in zip(d_w, weights)]
            + [given(g) for g in d_b] + (d_params or [given(None) for _ in bn_params]))


@graph_bn_train_backward.register_fake
def _graph_bn_train_backward_fake(grad_out, x, weights, bn_params, inter, z, stats, backward_plan, z_index, needs):
    return ([torch.empty_like(x, memory_format=torch.channels_last) if needs[0] else x.new_empty(0)]
            + [wt.new_empty(wt.shape).contiguous(memory_format=weight_layout(wt)) if needs[1] else wt.new_empty(0)
               for wt in weights]
            + [wt.new_empty(wt.shape[:1] if needs[2] else (0,)) for wt in weights]
            + [p.new_empty(p.shape if needs[3] else (0,)) for p in bn_params])


def _setup_bn_train_context(ctx, inputs, output):
    x, b, bias, bn_params, weights, biases, flat_plan, backward_plan, z_index = inputs
    _, inter, z, stats = output
    ctx.save_for_backward(x, *weights, *bn_params, *inter, *z, *stats)
    ctx.counts = (len(weights), len(bn_params), len(inter), len(z))
    ctx.backward_plan, ctx.z_index, ctx.n_gemms = list(backward_plan), list(z_index), len(b)


def _bn_train_op_backward(ctx, grad_out, _grad_inter, _grad_z, _grad_stats):
    n_conv, n_dest, n_inter, n_z = ctx.counts
    x, *rest = ctx.saved_tensors
    weights, rest = rest[:n_conv], rest[n_conv:]
    bn_params, rest = rest[:n_dest], rest[n_dest:]
    inter, z, stats = rest[:n_inter], rest[n_inter:n_inter + n_z], rest[n_inter + n_z:]
    # One flag per tensor of a list input.
    needs_input = ctx.needs_input_grad
    needs = [bool(needs_input[0]), any(needs_input[4]), any(needs_input[5]), any(needs_input[3])]
    none_b = [None] * ctx.n_gemms
    if grad_out is None or not any(needs):
        return None, none_b, none_b, [None] * n_dest, [None] * n_conv, [None] * n_conv, None, None, None
    grads = graph_bn_train_backward(grad_out, x, list(weights), list(bn_params), list(inter), list(z), list(stats),
                                    ctx.backward_plan, ctx.z_index, needs)
    d_w, d_b = grads[1:1 + n_conv], grads[1 + n_conv:1 + 2 * n_conv]
    d_params = grads[1 + 2 * n_conv:]
    return (grads[0] if needs[0] else None, none_b, none_b, d_params if needs[3] else [None] * n_dest,
            d_w if needs[1] else [None] * n_conv, d_b if needs[2] else [None] * n_conv, None, None, None)


graph_bn_train.register_autograd(_bn_train_op_backward, setup_context=_setup_bn_train_context)


def _compiled_graph_bn_train(x: torch.Tensor, graph: GraphPlan, backward_plan: list[int], weights: list,
                             biases: list, bns: list[BatchNormTrain]) -> torch.Tensor:
    """apply_graph_bn_train under torch.compile, on the C++ kernel: graph_bn_train between
    traced packing and running-statistics updates (biases zeros for a convolution without
    one)."""
    packed_b, packed_bias = _cpu_pack(graph, x, weights, biases)
    y, _, _, stats = graph_bn_train(x, packed_b, packed_bias, _bn_params(graph, x, bns), list(weights), list(biases),
                                    graph.flat(), list(backward_plan), list(_segments(graph).z_index))
    with torch.no_grad():
        _update_running_stats(graph, bns, stats, *x.shape[:1], *x.shape[2:])
    return y
