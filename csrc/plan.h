// The wire format of a branch-graph plan (inception_fast/ops/branch_graph.py, GraphPlan):
// the numbers that the Python planner writes and the graph kernels read. Kept to one
// `name = value` per line: a Python test parses this file and compares it with Python's.
#pragma once

#include <cstdint>
#include <utility>

namespace inception_fast::plan {

// What a GEMM or convolution reads; k >= 0 is buffer k.
enum Source : int64_t {
  kSourceX = -1,            // the block's input
  kSourceAvgPool = -2,      // x's 3x3/1 average pool (count_include_pad)
  kSourceMaxPool = -3,      // x's 3x3/1 max pool
  kSourceMaxPoolCopy = -4,  // x's 3x3/2 max pool, copied into one output slice (no weights)
  kSourceAvgPoolExcludePad = -5,  // x's 3x3/1 average pool, count_include_pad=False
};

// A 1x1 over rows of x pooled 3x3/1 while loading (the pooling branch's projection).
inline bool pooled_source(int64_t source) {
  return source == kSourceAvgPool || source == kSourceMaxPool || source == kSourceAvgPoolExcludePad;
}

// Where a GEMM segment or convolution writes; k >= 0 is buffer k.
enum Destination : int64_t {
  kDestOut = -1,  // the block's output
  kDestOutResidual = -2,  // the block's output as x + sum + bias (Inception-ResNet's tail, no activation)
  kDestOutResidualRelu = -3,  // the block's output as relu(x + sum + bias)
};

// A destination in the block's output through Inception-ResNet's tail epilogue.
inline bool residual_destination(int64_t dest) { return dest == kDestOutResidual || dest == kDestOutResidualRelu; }

// A destination in the block's output, through whichever epilogue.
inline bool out_destination(int64_t dest) { return dest == kDestOut || residual_destination(dest); }

// The output grid of a kh x kw convolution over H x W, as F.conv2d's (ops/plan.py and
// spec.py's conv_grid): x's grid for 'same' padding at stride 1, smaller unpadded or at
// stride 2. A GEMM's rows run over it; buffers are x's grid, the output that of the GEMMs
// writing it.
inline std::pair<int64_t, int64_t> conv_grid(int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t stride,
                                             int64_t pad_h, int64_t pad_w) {
  return {(H + 2 * pad_h - kh) / stride + 1, (W + 2 * pad_w - kw) / stride + 1};
}

// A GEMM description: these head fields, then kSegmentFields values per segment.
constexpr int64_t kGemmHead = 9;  // (stage, source, kh, kw, stride, pad_h, pad_w, cols, segments)
constexpr int64_t kSegmentFields = 4;  // (begin, end, destination, channel)
// One convolution of the backward plan.
constexpr int64_t kConvRecord = 8;  // (source, destination, channel, kh, kw, stride, pad_h, pad_w)

}  // namespace inception_fast::plan
