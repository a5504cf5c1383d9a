"""The fused op in training with batch norm: every convolution of the block followed by
BatchNorm2d on the batch's statistics, then ReLU (torchvision's BasicConv2d in train mode),
on the CPU.

Forward (csrc/batch_norm_train.h): the C++ kernel runs the plan's stages one after
another, every GEMM storing its pre-BN sums z (the convolution's, with its own bias if it
has one); between stages, each stored slice gets its batch statistics (per channel over
every image and pixel of its grid, shifted sums in float64) and
relu(BN(z)) goes where the next stage reads it, or into the output: the concat and the
separate BN and ReLU passes of eager never happen. A folded eval kernel cannot do this,
as the stage after a reduction needs the reduction's statistics over the whole batch.

Backward: the plan's reference walk (graph_backward.py) with BN's backward between each
ReLU mask and its convolution's backward: ATen's native_batch_norm_backward on the saved
z, mean and invstd, as eager's BN backward. The convolution backwards are the walk's
(one GEMM pair for every 1x1 over x).

Running statistics are updated as nn.BatchNorm2d updates them (momentum, or the cumulative
average for momentum=None; the unbiased variance); the module around the op
(fused_graph.py) increments num_batches_tracked and picks each BN's factor.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .branch_graph import _interiors, pack_weights, winograd_tiles
from .graph_backward import graph_backward_reference
from .plan import GraphPlan

__all__ = ["BatchNormTrain", "apply_graph_bn_train"]


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
    for conv, bn in zip(graph.convs, bns):
        p = params[conv.destination + 1]
        c = slice(conv.channel, conv.channel + _out_channels(graph, conv))
        if bn.weight is not None:
            p[0, c] = bn.weight
            p[1, c] = bn.bias
        p[2, c] = bn.eps
    return params


def _out_channels(graph: GraphPlan, conv) -> int:
    """Convolution `conv`'s output channels: its GEMM segment's width."""
    for g in graph.gemms:
        for s in g.segments:
            if s.destination == conv.destination and s.channel == conv.channel:
                return s.end - s.begin
    raise ValueError(f"no GEMM of the plan writes {conv}")


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


class BranchGraphBatchNormFunction(torch.autograd.Function):
    """The train-mode BN form of the fused op on the CPU, over Conv2d-layout weights.

    apply(x, graph, backward_plan, bns, *weights, *biases, *gammas, *betas): graph the
    GraphPlan of the block (convolutions in spec order), backward_plan its backward_flat();
    bns one BatchNormTrain per convolution (its running statistics are updated here);
    biases None for a convolution without one, gammas and betas None without affine.
    Saves x, the normalised intermediates, the pre-BN sums and the statistics (not the
    output: its ReLU masks are remade from the sums).
    """

    @staticmethod
    def forward(ctx, x, graph: GraphPlan, backward_plan, bns, *params):
        n_conv = len(graph.convs)
        weights, biases = params[:n_conv], params[n_conv:2 * n_conv]
        n, _, h, w = x.shape
        biases = [b if b is not None else wt.new_zeros(wt.shape[0]) for wt, b in zip(weights, biases)]
        packed_b, packed_bias = pack_weights(graph, list(weights), biases, "cpu", _winograd_flags(graph, n, h, w))
        y, buffers, z, stats = torch.ops.inception_fast.graph_forward_bn_train(
            x, packed_b, packed_bias, _bn_params(graph, x, bns), graph.flat())
        for conv, bn in zip(graph.convs, bns):
            if bn.running is None:
                continue
            running_mean, running_var, factor = bn.running
            s = stats[conv.destination + 1][:, conv.channel:conv.channel + _out_channels(graph, conv)]
            gh, gw = conv.grid(h, w)
            count = n * gh * gw
            running_mean.copy_(factor * s[0] + (1 - factor) * running_mean)
            running_var.copy_(factor * s[1] * (count / (count - 1)) + (1 - factor) * running_var)
        # Contiguous, as ATen's convolution backward takes its input fast (a bordered
        # interior view cost the backward ~3x on GoogLeNet's 3x3s).
        inter = [t.contiguous() for t in _interiors(buffers, h, w)]
        # Not y: the output's ReLU masks are remade from z (stats rows 3 and 4), so the caller
        # owns y outright (an in-place op on it, as on eager's concat, breaks no backward)
        # and no copy of it is made or kept.
        ctx.save_for_backward(x, *weights, *params[2 * n_conv:3 * n_conv], *inter, *z, *stats)
        ctx.graph, ctx.backward_plan, ctx.eps = graph, backward_plan, [bn.eps for bn in bns]
        ctx.counts = (n_conv, len(inter), len(z))
        return y

    @staticmethod
    def backward(ctx, grad_out):
        n_conv, n_inter, n_dest = ctx.counts
        x, *rest = ctx.saved_tensors
        weights, gammas = rest[:n_conv], rest[n_conv:2 * n_conv]
        inter = rest[2 * n_conv:2 * n_conv + n_inter]
        z = rest[2 * n_conv + n_inter:2 * n_conv + n_inter + n_dest]
        stats = rest[2 * n_conv + n_inter + n_dest:]
        n, _, h, w = x.shape
        needs_weight, needs_bias = ctx.needs_input_grad[4:4 + n_conv], ctx.needs_input_grad[4 + n_conv:4 + 2 * n_conv]
        needs_gamma = ctx.needs_input_grad[4 + 2 * n_conv:4 + 3 * n_conv]
        needs_beta = ctx.needs_input_grad[4 + 3 * n_conv:4 + 4 * n_conv]
        d_gamma, d_beta = [None] * n_conv, [None] * n_conv

        z_of = [0] * n_conv  # convolution -> its GEMM segment's z
        for k, i in enumerate(i for g in ctx.graph.gemms for i in g.convs):
            z_of[i] = k

        def batch_norm(i, grad, act):
            conv = ctx.graph.convs[i]
            c = slice(conv.channel, conv.channel + weights[i].shape[0])
            s = stats[conv.destination + 1]
            # The output's activations are not kept (act None): the mask comes from z.
            dz, dg, db = torch.ops.inception_fast.relu_batch_norm_backward(
                grad, act, z[z_of[i]].reshape(grad.shape), s[0, c], s[2, c], gammas[i], s[3, c], s[4, c])
            d_gamma[i] = dg if needs_gamma[i] else None
            d_beta[i] = db if needs_beta[i] else None
            return dz

        needs = [ctx.needs_input_grad[0], any(needs_weight) or any(needs_bias)]
        grads = graph_backward_reference(grad_out, x, None, list(inter), list(weights), needs, ctx.backward_plan,
                                         batch_norm=batch_norm, conv_1x1=True,
                                         max_pool_scatter=torch.ops.inception_fast.max_pool3x3_scatter,
                                         bias_grads=any(needs_bias))
        d_w = [g if want else None for g, want in zip(grads[1::2], needs_weight)]
        d_b = [g if want else None for g, want in zip(grads[2::2], needs_bias)]
        return (grads[0], None, None, None, *d_w, *d_b, *d_gamma, *d_beta)


def apply_graph_bn_train(x: torch.Tensor, graph: GraphPlan, backward_plan: list[int], weights: list, biases: list,
                         bns: list[BatchNormTrain]) -> torch.Tensor:
    """x (N, C, H, W) float32 or float64 CPU tensor through the block with train-mode batch
    norm after every convolution: (N, out_channels, H', W') channels_last, differentiable in
    x, the weights and biases (None without one) and the BNs' affine parameters. Updates the
    BNs' running statistics (not num_batches_tracked: the caller's, as nn.BatchNorm2d's
    forward increments it before its kernel). Raises ValueError, as eager batch norm does,
    where a convolution's output has a single value per channel."""
    n, _, h, w = x.shape
    for conv in graph.convs:
        gh, gw = conv.grid(h, w)
        if n * gh * gw == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input size "
                             f"{torch.Size((n, _out_channels(graph, conv), gh, gw))}")
    params = (*weights, *biases, *(bn.weight for bn in bns), *(bn.bias for bn in bns))
    return BranchGraphBatchNormFunction.apply(x, graph, backward_plan, bns, *params)
