"""The backward of the fused op as ATen calls: the walk every backend implements.

From x, the output y and the intermediates (every non-final level's output: saved by the
forward, or recomputed), the backward walks the convolutions in reverse plan order, so every consumer of an intermediate is done before its producer:
  1. each convolution's ReLU gradient: masked by y > 0 for those that write the output,
     by intermediate > 0 for the others (after all its consumers have added to it);
  2. a K x K or stride-2 convolution's data and weight gradients: convolution backward;
  3. every 1x1 that reads x joins one GEMM for dx and one for their weight gradients,
     and so does the average-pool branch: the 3x3/1 average pool with count_include_pad
     is self-adjoint, so its contribution to dx is avgpool(gp) @ Wp and its weight
     gradient avgpool(gp)^T @ x, with the pooled x never recomputed (without
     count_include_pad it is S(x) / count, S the self-adjoint sum pool: S(gp / count));
  4. a max pool's gradient (the stride-1 pool branch, or the grid reduction's copied
     pool) goes to its argmax, torch's rule: the first maximum in a row-major scan.
Subgradient at 0: none flows where a ReLU output is exactly 0, as in torch.relu.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import image, rows
from .plan import Destination, GraphPlan, Source

__all__ = ["graph_backward_reference"]


def _conv_input(x: torch.Tensor, intermediates: list[torch.Tensor], source: int) -> torch.Tensor:
    """A convolution's input as (N, C, H, W): x, or an NHWC intermediate's channels-last view."""
    return x if source == Source.X else intermediates[source].permute(0, 3, 1, 2)


def _into(rows_: torch.Tensor, a_cols: torch.Tensor | None, cols: slice | None) -> torch.Tensor:
    """rows_ copied into its columns of the shared-x gradient matrix, when it has them."""
    return rows_ if cols is None else a_cols[:, cols].copy_(rows_)


def graph_backward_reference(grad_out: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                             intermediates: list[torch.Tensor], weights: list[torch.Tensor], needs: list[bool],
                             backward_plan: list[int], data_grad=None, weight_grad=None,
                             max_pool_grad=None, batch_norm=None, conv_1x1: bool = False,
                             max_pool_scatter=None, bias_grads: bool = True) -> list[torch.Tensor | None]:
    """[dx, dW_0, db_0, dW_1, db_1, ...] (spec.convs order; None where not needed) as ATen
    calls, on any device: the algorithm the C++ backward (csrc/inception_graph_cpu_backward.cpp)
    and the Triton one implement. intermediates: (N, H, W, channels) NHWC, any strides.

    data_grad, if given, computes the data gradient of each stride-1 convolution ('same'
    or unpadded) instead of ATen: data_grad(g, weight, record, d_so_far, intermediate, last) -> (d,
    masked), g the (M, cout) masked gradient of its output, d the (M, cin) rows of the
    gradient of its input: for one over an intermediate, d_so_far the sum over the
    intermediate's other consumers (None for the first), last whether no consumer is left,
    masked whether d already carries the intermediate's ReLU mask (the Triton kernel
    applies it in its epilogue); for one over x (a K x K: the 1x1s over x join the shared
    GEMM), d_so_far and intermediate None, last False, and d a term of dx. It may return
    None instead, leaving that convolution to ATen's convolution backward.

    weight_grad, if given, computes the weight gradient of each K x K convolution (not the
    1x1s over x, which share one GEMM) instead of ATen: weight_grad(g, src, weight, step) ->
    dW, g the (N, cout, gh, gw) masked gradient of its output and src its input (N, cin, H,
    W), both channels-last views; or None, leaving it to ATen's convolution backward.

    max_pool_grad, if given, takes the stride-1 max-pool branch instead of ATen:
    max_pool_grad(g, weight, need_dx) -> (pooled, pool_dx), g the (M, cout) masked gradient
    of its 1x1, pooled the (M, C) rows of the pooled x (for the weight gradient), and
    pool_dx (None unless need_dx) a function (a, w) -> the (M, C) rows of a @ w plus the max
    pool's gradient, which then computes the shared-x GEMM's dx (a and w None when no 1x1
    reads x): the Triton backward gathers that gradient in the GEMM's epilogue.

    batch_norm, if given, is train-mode batch norm between each convolution and its ReLU
    (ops/branch_graph_bn_train.py): batch_norm(i, grad, act, out=None) -> the (M, cout)
    gradient of convolution i's output, from grad, the gradient of its activation act =
    relu(BN(conv)), (M, cout) rows both (the ReLU's mask is the hook's, fused with BN's
    backward), written into `out` (columns of the shared-x gradient matrix) when given; it
    keeps gamma's and beta's gradients itself. The biases' gradients are then those of the
    convolutions' own biases.

    conv_1x1 runs the 1x1 GEMM pairs (the shared-x GEMMs, the max-pool branch's
    projection) as 1x1 convolution backwards instead of matrix products: on CPUs that is
    oneDNN, 2.2x MKL's sgemm on AMD's Zen 5.

    max_pool_scatter, if given (with conv_1x1), takes the stride-1 max-pool branch:
    max_pool_scatter(x, d_pooled, dx) -> the pooled x, with d_pooled (None when dx is not
    needed) scattered into dx in place (the C++ max_pool3x3_scatter: one pass, where ATen
    recomputes the pool with indices, zeroes a buffer, scatters and adds it).

    bias_grads=False leaves the biases' gradients None (convolutions without bias: their
    column sums cost a pass over every output gradient).
    """
    _, _, copy_channel, _, table = GraphPlan.from_backward_flat(backward_plan)
    for i, step in enumerate(table):
        if step.destination < Destination.OUT:  # as the C++ backward refuses it
            raise ValueError(f"convolution {i} ends in a residual epilogue: the backward has none "
                             "(plan_with_residual is for inference; under autograd the tail runs as ATen ops)")
    n, c, h, w = x.shape
    relu_backward = torch.ops.aten.threshold_backward
    grad_rows, x_rows = rows(grad_out), rows(x)
    y_rows = rows(y) if y is not None else None  # None only with batch_norm, which remakes the masks
    inter_rows = [t.reshape(-1, t.shape[-1]) for t in intermediates]
    d_inter: list[torch.Tensor | None] = [None] * len(intermediates)
    masked = [False] * len(intermediates)
    consumers_left = [sum(row[0] == k for row in table) for k in range(len(intermediates))]
    d_weights: list[torch.Tensor | None] = [None] * len(table)
    d_biases: list[torch.Tensor | None] = [None] * len(table)
    shared: dict[int, torch.Tensor] = {}  # conv index -> its columns of the shared-x GEMM
    dx_terms: list[torch.Tensor] = []  # logical (N, C, H, W)
    pool_dx = None  # from max_pool_grad: the shared-x GEMM's dx with the max pool's gradient
    pending_pool = None  # (conv index, g, weight) of the max-pool branch, for max_pool_scatter
    # With conv_1x1, the shared-x GEMM's gradient matrix is made whole up front and each
    # convolution's masked gradient written into its columns (no concatenation after: 0.7-1
    # ms a block at batch 16-32, the gradients of 176-448 columns copied once more).
    shared_cols: dict[int, slice] = {}
    a_cols = None
    if conv_1x1:
        ids = [i for i, st in enumerate(table) if (st.source == Source.X and (st.kh, st.kw, st.stride) == (1, 1, 1))
               or st.source in (Source.AVG_POOL, Source.AVG_POOL_EXCLUDE_PAD)]
        offset = 0
        for i in ids:
            shared_cols[i] = slice(offset, offset + weights[i].shape[0])
            offset += weights[i].shape[0]
        a_cols = grad_rows.new_empty(n * h * w, offset) if ids else None  # (N H W, K0): x's pixel rows
    for i in reversed(range(len(table))):
        source, dest, channel, kh, kw, conv_stride, pad_h, pad_w = table[i]
        weight = weights[i]
        co = weight.shape[0]
        # The gradient of the convolution's activation, and that activation (its ReLU mask).
        raw, act = ((grad_rows[:, channel:channel + co], None if y_rows is None else y_rows[:, channel:channel + co])
                    if dest < 0 else (d_inter[dest], inter_rows[dest]))
        # Its columns of the shared-x gradient matrix, where the masked gradient goes itself.
        into = a_cols[:, shared_cols[i]] if i in shared_cols and source == Source.X else None
        if batch_norm is not None:
            g = batch_norm(i, raw, act) if into is None else batch_norm(i, raw, act, out=into)
        elif dest >= 0 and masked[dest]:
            g = raw if into is None else into.copy_(raw)
        else:
            g = (relu_backward(raw, act, 0) if into is None
                 else torch.ops.aten.threshold_backward.grad_input(raw, act, 0, grad_input=into))
        d_biases[i] = g.sum(0) if bias_grads else None
        if source >= 0:
            consumers_left[source] -= 1
        if source == Source.X and (kh, kw, conv_stride) == (1, 1, 1):
            shared[i] = g
        elif source == Source.AVG_POOL:
            shared[i] = _into(rows(F.avg_pool2d(image(g, n, h, w), 3, 1, 1)), a_cols, shared_cols.get(i))  # self-adjoint
        elif source == Source.AVG_POOL_EXCLUDE_PAD:
            # S(x) / count, S the self-adjoint 3x3 sum pool: its adjoint is S(g / count).
            count = F.avg_pool2d(x.new_ones(1, 1, h, w), 3, 1, 1, divisor_override=1)
            shared[i] = _into(rows(F.avg_pool2d(image(g, n, h, w) / count, 3, 1, 1, divisor_override=1)), a_cols,
                              shared_cols.get(i))
        elif source == Source.MAX_POOL and max_pool_scatter is not None and conv_1x1:
            pending_pool = (i, g, weight)  # scattered into dx once the shared-x GEMM has made it
        elif source == Source.MAX_POOL and max_pool_grad is not None:
            pooled, pool_dx = max_pool_grad(g, weight, needs[0])
            d_weights[i] = (g.t() @ pooled).reshape(weight.shape) if needs[1] else None
        elif source == Source.MAX_POOL:
            pooled, indices = F.max_pool2d(x, 3, 1, 1, return_indices=True)
            if conv_1x1:
                d_pooled, d_weights[i], _ = torch.ops.aten.convolution_backward(
                    image(g, n, h, w), pooled, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                    [needs[0], needs[1], False])
            else:
                d_weights[i] = (g.t() @ rows(pooled)).reshape(weight.shape) if needs[1] else None
                d_pooled = image(g @ weight.flatten(1), n, h, w) if needs[0] else None
            if needs[0]:
                dx_terms.append(torch.ops.aten.max_pool2d_with_indices_backward(
                    d_pooled, x, [3, 3], [1, 1], [1, 1], [1, 1], False, indices))
        elif data_grad is not None and conv_stride == 1 and (source >= 0 or needs[0]) and (
                taken := data_grad(g, weight, table[i], d_inter[source] if source >= 0 else None,
                                   intermediates[source] if source >= 0 else None,
                                   source >= 0 and consumers_left[source] == 0)) is not None:
            if source >= 0:
                d_inter[source], masked[source] = taken
            else:
                dx_terms.append(image(taken[0], n, h, w))
            if needs[1]:
                g_img, src = image(g, n, *table[i].grid(h, w)), _conv_input(x, intermediates, source)
                d_weights[i] = weight_grad(g_img, src, weight, table[i]) if weight_grad is not None else None
                if d_weights[i] is None:
                    d_weights[i] = torch.ops.aten.convolution_backward(
                        g_img, src, weight, None, [1, 1], [pad_h, pad_w], [1, 1], False, [0, 0], 1,
                        [False, True, False])[1]
        else:
            gh, gw = table[i].grid(h, w)
            g_img, src = image(g, n, gh, gw), _conv_input(x, intermediates, source)
            need_input = source >= 0 or needs[0]
            if needs[1] and weight_grad is not None:
                d_weights[i] = weight_grad(g_img, src, weight, table[i])
            need_weight = needs[1] and d_weights[i] is None
            d_src, d_w, _ = torch.ops.aten.convolution_backward(
                g_img, src, weight, None, [conv_stride] * 2, [pad_h, pad_w], [1, 1], False, [0, 0], 1,
                [need_input, need_weight, False]) if need_input or need_weight else (None, None, None)
            if need_weight:
                d_weights[i] = d_w
            if source >= 0:
                d_src = rows(d_src)
                d_inter[source] = d_src if d_inter[source] is None else d_inter[source] + d_src
            elif need_input:
                dx_terms.append(d_src)
    if copy_channel >= 0 and needs[0]:
        _, indices = F.max_pool2d(x, 3, 2, return_indices=True)
        dx_terms.append(torch.ops.aten.max_pool2d_with_indices_backward(
            grad_out[:, copy_channel:copy_channel + c], x, [3, 3], [2, 2], [0, 0], [1, 1], False, indices))
    order = sorted(shared)
    # (M, K0): the shared-x gradient matrix, made whole in the loop where it could be.
    a = w_shared = None
    if order:
        a = a_cols if shared_cols else torch.cat([shared[i] for i in order], dim=1)
    if order and conv_1x1 and pool_dx is None:
        w_cat = torch.cat([weights[i].reshape(weights[i].shape[0], -1, 1, 1) for i in order])
        d_x, d_w, _ = torch.ops.aten.convolution_backward(
            image(a, n, h, w), x, w_cat, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
            [needs[0], needs[1], False])
        if needs[1]:
            for i, d in zip(order, d_w.split([weights[i].shape[0] for i in order])):
                d_weights[i] = d.reshape(weights[i].shape).clone()
        if needs[0]:
            dx_terms.append(d_x)
        order = []
    if pending_pool is not None:
        i, g, weight = pending_pool
        g_img = image(g, n, h, w)
        d_pooled = acc = None
        if needs[0]:
            d_pooled = torch.ops.aten.convolution_backward(
                g_img, x, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False])[0]
            d_pooled = d_pooled.contiguous(memory_format=torch.channels_last)
            if dx_terms and dx_terms[-1].is_contiguous(memory_format=torch.channels_last):
                acc = dx_terms[-1]  # a fresh term of this walk (the shared-x GEMM's dx): ours to add into
            else:
                acc = torch.zeros_like(x, memory_format=torch.channels_last)
                dx_terms.append(acc)
        pooled = max_pool_scatter(x.contiguous(memory_format=torch.channels_last), d_pooled, acc)
        if needs[1]:
            d_weights[i] = torch.ops.aten.convolution_backward(
                g_img, pooled, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False])[1]
    if order:
        w_shared = torch.cat([weights[i].flatten(1) for i in order])  # (K0, C)
        if needs[1]:
            d_shared = (a.t() @ x_rows).split([weights[i].shape[0] for i in order])
            for i, d in zip(order, d_shared):
                d_weights[i] = d.reshape(weights[i].shape).clone()
    if pool_dx is not None:
        dx_terms.append(image(pool_dx(a, w_shared), n, h, w))
    elif order and needs[0]:
        dx_terms.append(image(a @ w_shared, n, h, w))
    dx = None
    if needs[0]:
        # In place into the first term: every term is a fresh tensor of this walk (a new
        # tensor per out-of-place sum cost Inception-v3's 6a 1.7 ms a term at batch 8, most
        # of it the first touch of its pages).
        dx = dx_terms[0] if dx_terms else torch.zeros_like(x)
        for term in dx_terms[1:]:
            dx = dx.add_(term) if not dx.requires_grad else dx + term
    return [dx] + [g if needs[1] else None for pair in zip(d_weights, d_biases) for g in pair]
