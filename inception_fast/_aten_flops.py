"""FLOP formulas for aten ops that torch's FlopCounterMode (torch 2.14) has none for.

profile() passes them as FlopCounterMode(custom_mapping=ATEN_FORMULAS): they apply inside
profile only, so importing inception_fast does not change what FlopCounterMode counts
elsewhere. Like torch's own formulas they return FLOPs, 2 per multiply-accumulate, and
read shapes (every tensor argument arrives as its shape).

- CPU attention: scaled_dot_product_attention on a CPU tensor runs
  aten._scaled_dot_product_flash_attention_for_cpu (and its backward); torch counts the
  CUDA flavours only. The same count as torch's: QK^T and (softmax)V, causal masks not
  discounted.
- CPU LSTM: nn.LSTM on the CPU runs one aten.mkldnn_rnn_layer per layer and direction.
  Its multiply-adds are the gate GEMMs, steps x batch x (W_ih + W_hh elements): the
  count that the same LSTM gets on any device where it decomposes into addmm.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["ATEN_FORMULAS"]

aten = torch.ops.aten


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _rnn_layer_macs(input_shape, w_ih_shape, w_hh_shape) -> int:
    # input (T, B, I), (B, T, I) or packed (sum of batch sizes, I): rows = all but the last dim.
    return math.prod(input_shape[:-1]) * (math.prod(w_ih_shape) + math.prod(w_hh_shape))


def _mkldnn_rnn_layer_flop(input_shape, w_ih_shape, w_hh_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _rnn_layer_macs(input_shape, w_ih_shape, w_hh_shape)


def _mkldnn_rnn_layer_backward_flop(input_shape, w_ih_shape, w_hh_shape, *args, out_shape=None, **kwargs) -> int:
    # The kernel computes all four products: the input and hidden-state gradients, and the
    # W_ih and W_hh gradients, each one forward's worth of multiply-adds.
    return 2 * 2 * _rnn_layer_macs(input_shape, w_ih_shape, w_hh_shape)


ATEN_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flop,
    aten.mkldnn_rnn_layer: _mkldnn_rnn_layer_flop,
    aten.mkldnn_rnn_layer_backward: _mkldnn_rnn_layer_backward_flop,
}
