// The fused forward of a branch-graph Inception block (Inception-v3's InceptionA, C and E)
// on the CPU, NHWC, as stages of GEMMs planned in Python (ops/branch_graph.py):
//
//   stage 0 reads x: every 1x1 convolution that starts a branch, as one GEMM over x
//     (horizontal fusion), and the pool branch's 1x1 over 3x3-pooled rows made per block
//     of rows in a small buffer (the pooled tensor never exists);
//   each later stage reads zero-bordered intermediates of earlier stages with a kh x kw
//     implicit GEMM (1x7, 7x1, 3x3, 1x3, ...): the zero border makes every tap an
//     in-bounds load, as in the GoogLeNet kernel.
//
// Every GEMM adds its bias, applies ReLU and stores from its epilogue straight into
// channel slices of the output or of the intermediates the next stages read: there is
// no concat. An fp32 3x3, 5x5, 1x7/7x1 or 1x3/3x1 stride-1 stage whose B comes packed for
// it runs as Winograd's F(2x2, 3x3) or F(4x4, 3x3), F(2x2, 5x5), F(2, 7) or F(2, 3)
// (winograd.h): its rows are then output tiles, not pixels. An
// Inception-ResNet block's plan (plan_with_residual) ends in one more GEMM, the tail's 1x1
// over the concat, whose epilogue adds x and stores act(x + sum + bias) into the output.
// In training with batch norm (graph_forward_bn_train), every GEMM stores its sums as they
// are and the stages run one after another with each one's batch statistics in between
// (batch_norm_train.h). The GEMM itself is gemm.h's.

#include "batch_norm_train.h"
#include "gemm.h"
#include "huge_pages.h"
#include "inception_cpu.h"
#include "plan.h"
#include "winograd.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>

namespace inception_fast {
namespace {
using namespace gemm;
using namespace plan;

struct GemmDesc {
  int64_t stage, source, kh, kw, stride, pad_h, pad_w, cols;
  std::vector<std::array<int64_t, kSegmentFields>> segments;  // (begin, end, destination, channel)
};

// The grid a GEMM's rows run over (plan.h's conv_grid): x's own for 'same' padding at stride
// 1; the block's output grid for a grid reduction (stride 2) or an unpadded ('valid')
// convolution, which write only the output.
std::pair<int64_t, int64_t> gemm_grid(const GemmDesc& d, int64_t H, int64_t W) {
  return conv_grid(H, W, d.kh, d.kw, d.stride, d.pad_h, d.pad_w);
}

// Limits that keep the kernels' index arithmetic (channels x pixels, borders) far from
// int64 overflow; the plans of real blocks are orders of magnitude below them.
constexpr int64_t kMaxChannels = int64_t(1) << 24, kMaxKernel = 31, kMaxBorder = 15;

// One GEMM record. Every field is range-checked here and the plan as a whole in
// parse_flat_plan: the op is callable with any list, and a bad one must raise, never
// write outside its tensors or return memory it did not write.
GemmDesc parse_desc(at::IntArrayRef d, int64_t buffers) {
  const auto size = static_cast<int64_t>(d.size());
  TORCH_CHECK(size >= kGemmHead + kSegmentFields && (size - kGemmHead) % kSegmentFields == 0 &&
                  d[kGemmHead - 1] == (size - kGemmHead) / kSegmentFields,
              "a GEMM must be described as (stage, source, kh, kw, stride, pad_h, pad_w, cols, segments, then "
              "(begin, end, destination, channel) per segment), got ", size, " values");
  GemmDesc g{d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], {}};
  TORCH_CHECK(g.source >= kSourceAvgPoolExcludePad && g.source < buffers, "GEMM source ", g.source, " out of range");
  TORCH_CHECK(g.stride == 1 || g.stride == 2, "GEMM stride must be 1 or 2, got ", g.stride);
  TORCH_CHECK(1 <= g.kh && g.kh <= kMaxKernel && 1 <= g.kw && g.kw <= kMaxKernel && 0 <= g.pad_h && g.pad_h < g.kh &&
                  0 <= g.pad_w && g.pad_w < g.kw,
              "GEMM kernel ", g.kh, "x", g.kw, " with padding (", g.pad_h, ", ", g.pad_w, ") out of range");
  TORCH_CHECK(1 <= g.cols && g.cols <= kMaxChannels, "GEMM columns ", g.cols, " out of range");
  TORCH_CHECK(!pooled_source(g.source) || (g.kh == 1 && g.kw == 1 && g.stride == 1),
              "a GEMM over pooled x must be a stride-1 1x1");
  TORCH_CHECK(g.source != kSourceMaxPoolCopy || (g.kh == 3 && g.kw == 3 && g.stride == 2 && g.pad_h == 0),
              "the max-pool copy is 3x3, stride 2, no padding");
  int64_t next = 0;  // the segments cover the columns in order, each once
  for (int64_t s = 0; s < d[kGemmHead - 1]; ++s) {
    const int64_t* seg = d.data() + kGemmHead + kSegmentFields * s;
    TORCH_CHECK(seg[0] == next && seg[0] < seg[1] && seg[1] <= g.cols && seg[2] >= kDestOutResidualRelu &&
                    seg[2] < buffers && seg[3] >= 0,
                "bad segment (", seg[0], ", ", seg[1], ", ", seg[2], ", ", seg[3], ") of a GEMM with ", g.cols,
                " columns");
    TORCH_CHECK(g.stride == 1 || seg[2] == kDestOut, "a stride-2 GEMM must write the output");
    TORCH_CHECK(!residual_destination(seg[2]) || (g.source >= 0 && g.kh == 1 && g.kw == 1),
                "a residual epilogue ends a 1x1 over a buffer (the concat)");
    g.segments.push_back({seg[0], seg[1], seg[2], seg[3]});
    next = seg[1];
  }
  TORCH_CHECK(next == g.cols, "the segments of a GEMM must cover its ", g.cols, " columns");
  return g;
}

// dst[i][channel + c] = max of x[c] over the 3x3 window at (2h, 2w) of output pixel i, for
// channels c in [c0, c1) (no padding: a grid-reduction pool); NaN wins, as in torch.max_pool2d.
template <typename T>
void max_pool_stride2_rows(const Plane<const T>& x, int64_t c0, int64_t c1, const int64_t* pix_n,
                           const int64_t* pix_h, const int64_t* pix_w, int64_t rows, const Plane<T>& dst,
                           int64_t channel) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t n = pix_n[i], h0 = 2 * pix_h[i], w0 = 2 * pix_w[i];
    T* out = dst.interior_row(n, pix_h[i], pix_w[i]) + channel;
    std::memcpy(out + c0, x.interior_row(n, h0, w0) + c0, (c1 - c0) * sizeof(T));
    for (int64_t dy = 0; dy < 3; ++dy)
      for (int64_t dx = 0; dx < 3; ++dx) max_into(out + c0, x.interior_row(n, h0 + dy, w0 + dx) + c0, c1 - c0);
  }
}

// The Winograd kind GEMM d's packed B is laid out for (winograd.h), (panels, (positions +
// taps) k_per_tap, width) in fp32, or none: the direct implicit GEMM's (panels, taps k_per_tap,
// width). ops/backend.py packs it so for an fp32 3x3, 5x5, 1x7/7x1 or 1x3/3x1 stride-1 convolution
// unless told not to, a 3x3 for either tile (winograd::packed_kind tells them apart).
std::optional<winograd::Kind> winograd_b(const at::Tensor& b, const GemmDesc& d, int64_t k_per_tap) {
  const auto kind = winograd::kind_of(d.source, d.kh, d.kw, d.stride, d.pad_h, d.pad_w);
  if (!kind || b.scalar_type() != at::kFloat || b.dim() != 3) return std::nullopt;
  return winograd::packed_kind(*kind, b.size(1), k_per_tap);
}

// Train-mode batch norm after every convolution (batch_norm_train.h): per GEMM segment with
// weights, in plan order, its pre-BN sums z ((N, grid, channels) NHWC, contiguous); per
// destination, the output first, then each buffer, the (3, channels) gamma / beta / eps
// rows and the (5, channels) mean / biased var / invstd / alpha / shift rows written.
struct BatchNormTrain {
  std::vector<at::Tensor> z, params, stats;
  // Per buffer, its (N, H, W, channels) interior, contiguous, as the backward reads it
  // (ATen's convolution backward ran ~3x slower on a bordered view): normalize_stage writes a
  // bordered buffer's twice, which costs one write where a copy after cost a read and a write
  // (0.9 ms of Inception-v3's Mixed_6e train step at batch 8); an unbordered buffer is its own.
  std::vector<at::Tensor> interiors;
};

template <typename T>
void graph_forward_impl(const at::Tensor& x, const std::vector<int64_t>& buf_channels,
                        const std::vector<int64_t>& buf_border, const std::vector<GemmDesc>& descs,
                        at::TensorList b, at::TensorList bias, const std::vector<at::Tensor>& bufs,
                        at::Tensor& out, BatchNormTrain* bn = nullptr, bool linear = false) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const int64_t c_out = out.size(1), Ho = out.size(2), Wo = out.size(3);

  std::vector<Plane<T>> planes;  // over bufs: (N, H + 2 border, W + 2 border, channels) each
  for (size_t k = 0; k < buf_channels.size(); ++k)
    planes.push_back(padded_plane<T>(bufs[k], H, W, buf_channels[k], buf_border[k]));
  // With batch norm in training, every GEMM segment stores its sums as they are into its
  // own z, which normalize_stage turns into the real destination.
  std::vector<Plane<T>> z_planes;
  if (bn != nullptr)
    for (const at::Tensor& z : bn->z) z_planes.push_back({z.data_ptr<T>(), z.stride(0), z.stride(1), z.stride(2), 0});
  // Per GEMM: its grid (gemm_grid: x's, or the output's when it shrinks), the Winograd kind
  // its packed B is laid out for (winograd_b: fp32 only), and whether this call runs it as
  // Winograd (at least the transform's kMinTiles output tiles; below, the direct GEMM over
  // the panels' direct taps).
  std::vector<std::pair<int64_t, int64_t>> grids;
  std::vector<std::optional<winograd::Kind>> wino_packed;
  std::vector<bool> wino_runs;
  for (size_t g = 0; g < descs.size(); ++g) {
    const GemmDesc& d = descs[g];
    grids.push_back(gemm_grid(d, H, W));
    wino_packed.push_back(winograd_b(b[g], d, d.source >= 0 ? buf_channels[d.source] : C));
    wino_runs.push_back(wino_packed[g] && winograd::worth_it(*wino_packed[g], N, grids[g].first, grids[g].second));
  }
  // A convolution over x with padding (a stem's 'same' 3x3) reads x: as Winograd stages,
  // unbordered (window loads outside read zeros); as the direct implicit GEMM, from a
  // zero-bordered copy, as the later stages read their zero-bordered intermediates (every
  // tap an in-bounds load). The copy cost 27 ms of 130 for Conv2d_2b at batch 50.
  int64_t x_border = 0;
  bool copy_x = false;
  for (size_t g = 0; g < descs.size(); ++g) {
    const GemmDesc& d = descs[g];
    if (d.source != kSourceX || (d.pad_h == 0 && d.pad_w == 0)) continue;
    x_border = std::max({x_border, d.pad_h, d.pad_w});
    copy_x = copy_x || !wino_runs[g];
  }
  at::Tensor x_copy;
  if (copy_x) {
    // Only the border zeroed: the interior is x's (a zeroed copy wrote it twice).
    x_copy = empty_large({N, H + 2 * x_border, W + 2 * x_border, C}, x.options());
    const Plane<T> bordered = padded_plane<T>(x_copy, H, W, C, x_border);
    for (int64_t n = 0; n < N; ++n) zero_border(bordered, n, H, W, C);
    x_copy.narrow(1, x_border, H).narrow(2, x_border, W).copy_(x.permute({0, 2, 3, 1}));
  } else {
    x_border = 0;
  }
  const int64_t xw = W + 2 * x_border;
  const Plane<const T> x_plane{copy_x ? x_copy.data_ptr<T>() : x.data_ptr<T>(), (H + 2 * x_border) * xw * C,
                               xw * C, C, x_border};
  const Plane<T> out_plane{out.data_ptr<T>(), Ho * Wo * c_out, Wo * c_out, c_out, 0};

  std::vector<Gemm<T>> gemms;
  std::vector<size_t> first_z;  // per GEMM, the index in z_planes of its first segment's
  int64_t stages = 0;
  for (size_t g = 0, zi = 0; g < descs.size(); ++g) {
    first_z.push_back(zi);
    if (descs[g].source != kSourceMaxPoolCopy) zi += descs[g].segments.size();
    const GemmDesc& d = descs[g];
    const int64_t k_per_tap = d.source >= 0 ? buf_channels[d.source] : C;
    const bool has_weights = d.source != kSourceMaxPoolCopy;
    Gemm<T> gm{has_weights ? b[g].data_ptr<T>() : nullptr, has_weights ? bias[g].data_ptr<acc_t<T>>() : nullptr,
               d.cols, k_per_tap, {}, {}, {}};
    // Tap offsets from a row's window corner, (h * stride - pad_h, w * stride - pad_w).
    const int64_t sh = d.source >= 0 ? planes[d.source].stride_h : x_plane.stride_h;
    const int64_t sw = d.source >= 0 ? planes[d.source].stride_w : x_plane.stride_w;
    const bool pooled_rows = pooled_source(d.source);
    for (int64_t dy = 0; dy < (pooled_rows ? 1 : d.kh); ++dy)
      for (int64_t dx = 0; dx < (pooled_rows ? 1 : d.kw); ++dx) gm.tap_offset.push_back(dy * sh + dx * sw);
    for (const auto& [begin, end, dest, channel] : d.segments) {
      if (bn != nullptr && has_weights) {
        TORCH_CHECK(dest >= kDestOut, "a train-mode batch-norm forward has no residual epilogue");
        gm.segments.push_back({begin, end, z_planes[first_z[g] + gm.segments.size()], 0, Epilogue::kLinear});
        continue;
      }
      if (!out_destination(dest)) {
        gm.segments.push_back({begin, end, planes[dest], channel, linear ? Epilogue::kLinear : Epilogue::kRelu});
        continue;
      }
      const Epilogue epilogue = linear ? Epilogue::kLinear
                                : dest == kDestOut ? Epilogue::kRelu
                                : dest == kDestOutResidualRelu ? Epilogue::kResidualRelu
                                                               : Epilogue::kResidual;
      gm.segments.push_back({begin, end, out_plane, channel, epilogue, x_plane});
    }
    if (const auto kind = wino_packed[g]) {  // the direct GEMM runs over each panel's direct taps
      gm.b_packed += winograd::positions(*kind) * k_per_tap * kNR<T>;
      gm.panel_rows = winograd::packed_rows(*kind, k_per_tap);
    }
    if (has_weights) plan_chunks(gm);
    gemms.push_back(std::move(gm));
    stages = std::max(stages, d.stage + 1);
    // Buffers are x's grid; the output is (Ho, Wo), which graph_forward took from this rule.
    for (const auto& seg : d.segments) {
      const int64_t expect_h = out_destination(seg[2]) ? Ho : H, expect_w = out_destination(seg[2]) ? Wo : W;
      TORCH_CHECK(H + 2 * d.pad_h >= d.kh && W + 2 * d.pad_w >= d.kw && grids[g].first == expect_h &&
                      grids[g].second == expect_w,
                  "GEMM ", g, " (", d.kh, "x", d.kw, ", stride ", d.stride, ", padding (", d.pad_h, ", ", d.pad_w,
                  ")) does not map the ", H, "x", W, " input onto the ", expect_h, "x", expect_w, " grid it writes");
    }
  }

  // The Winograd stages (fp32 only): one winograd::Conv each, run on output tiles. Below its
  // transform's kMinTiles a Winograd-packed GEMM runs as the direct GEMM over its direct taps.
  std::vector<std::optional<winograd::Conv>> wino(gemms.size());
  int64_t wino_cin = 0, wino_panels = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (size_t g = 0; g < gemms.size(); ++g) {
      if (!wino_runs[g]) continue;
      const GemmDesc& d = descs[g];
      const Plane<const float> src = d.source == kSourceX
                                         ? x_plane
                                         : Plane<const float>{planes[d.source].data, planes[d.source].stride_n,
                                                              planes[d.source].stride_h, planes[d.source].stride_w,
                                                              planes[d.source].pad};
      wino[g].emplace(*wino_packed[g], src, H, W, grids[g].first, grids[g].second, d.pad_h, d.pad_w,
                      b[g].data_ptr<float>(), gemms[g]);
      wino_cin = std::max(wino_cin, gemms[g].k_per_tap);
      wino_panels = std::max(wino_panels, gemms[g].panels());
    }
  }
  int64_t max_panels = 1;
  bool pools = false;
  std::vector<bool> pack_a(gemms.size(), false);  // x rows at a set_conflicting stride: copied per K chunk
  for (size_t g = 0; g < gemms.size(); ++g) {
    max_panels = std::max(max_panels, gemms[g].panels());
    pools = pools || pooled_source(descs[g].source);
    pack_a[g] = descs[g].source == kSourceX && gemms[g].tap_offset.size() == 1 &&
                set_conflicting<T>(x_plane.stride_w * descs[g].stride);
  }
  const bool packs = std::find(pack_a.begin(), pack_a.end(), true) != pack_a.end();
  const int64_t pooled_ld = padded_stride<T>(C);
  // Per-thread scratch for one block of at most `block` rows: pixel coordinates, A row
  // pointers, the partial-sum tiles, and the pooled input rows of a pool projection.
  struct Scratch {
    int64_t block;
    std::vector<int64_t> pix;
    std::vector<const T*> a_rows;
    std::vector<acc_t<T>> acc;
    std::vector<T> pooled;
    std::vector<T> a_pack;
    std::unique_ptr<winograd::Workspace> wino;
  };
  auto make_scratch = [&](int64_t block) {
    return Scratch{block, std::vector<int64_t>(3 * block), std::vector<const T*>(block),
                   std::vector<acc_t<T>>(ceil_div(block, kMR) * max_panels * kMR * kNR<T>),
                   std::vector<T>(pools ? block * pooled_ld : 0), std::vector<T>(packs ? a_pack_size<T>(block) : 0),
                   wino_cin > 0 ? std::make_unique<winograd::Workspace>(wino_cin, wino_panels) : nullptr};
  };
  // GEMM g over one block of pixel rows of its grid, for column part `part` of `parts` (a
  // range of its weight panels; of its channels for the max-pool copy).
  auto run_one = [&](size_t g, int64_t rows, const int64_t* pn, const int64_t* ph, const int64_t* pw, Scratch& s,
                     int64_t part, int64_t parts) {
    const GemmDesc& d = descs[g];
    const T** a_rows = s.a_rows.data();
    if (d.source == kSourceMaxPoolCopy) {
      const int64_t c0 = C * part / parts, c1 = C * (part + 1) / parts;
      if (c0 < c1) max_pool_stride2_rows(x_plane, c0, c1, pn, ph, pw, rows, out_plane, d.segments[0][3]);
      return;
    }
    const int64_t panels = gemms[g].panels();
    if (panels * part / parts == panels * (part + 1) / parts) return;  // no panels: skip the pooling too
    if (wino[g].has_value()) {  // rows are tiles: (n, tile row, tile column)
      s.wino->run(*wino[g], pn, ph, pw, rows, part, parts);
      return;
    }
    if (pooled_source(d.source)) {
      if (d.source != kSourceMaxPool)
        avg_pool_rows(x_plane, H, W, C, pn, ph, pw, rows, s.pooled.data(), pooled_ld,
                      d.source == kSourceAvgPool ? PoolDivisor::kNine : PoolDivisor::kInBounds);
      else
        max_pool_rows(x_plane, H, W, C, pn, ph, pw, rows, s.pooled.data(), pooled_ld);
      for (int64_t i = 0; i < rows; ++i) a_rows[i] = s.pooled.data() + i * pooled_ld;
    } else {
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t h = ph[i] * d.stride - d.pad_h, w = pw[i] * d.stride - d.pad_w;
        a_rows[i] = d.source == kSourceX ? x_plane.interior_row(pn[i], h, w) : planes[d.source].interior_row(pn[i], h, w);
      }
    }
    run_gemm(gemms[g], a_rows, pn, ph, pw, rows, s.acc.data(), part, parts, pack_a[g] ? s.a_pack.data() : nullptr);
  };
  // The grid whose rows a GEMM runs over: pixels of its grid, or the output tiles of a
  // Winograd stage.
  auto grid_of = [&](size_t g) {
    if (wino[g].has_value()) {
      const auto [th, tw] = winograd::tile(wino[g]->kind);
      return std::make_pair(ceil_div(grids[g].first, th), ceil_div(grids[g].second, tw));
    }
    return grids[g];
  };
  // Rows [m0, m1) of GEMM g's grid, in blocks of at most `block` (<= s.block).
  auto for_rows = [&](size_t g, int64_t m0, int64_t m1, int64_t block, Scratch& s, int64_t part = 0,
                      int64_t parts = 1) {
    const auto [gh, gw] = grid_of(g);
    for (int64_t b0 = m0; b0 < m1; b0 += block) {
      const int64_t rows = std::min(block, m1 - b0);
      int64_t *pn = s.pix.data(), *ph = pn + s.block, *pw = ph + s.block;
      pixel_coords(b0, rows, gh, gw, pn, ph, pw);
      run_one(g, rows, pn, ph, pw, s, part, parts);
    }
  };
  auto zero_borders = [&](int64_t n) {
    for (size_t k = 0; k < planes.size(); ++k) zero_border(planes[k], n, H, W, buf_channels[k]);
  };
  // A stage's batch-norm slices: each segment of its GEMMs with weights, from z into its destination.
  using Acc = acc_t<T>;
  auto bn_stage = [&](int64_t stage) {
    if constexpr (std::is_same_v<T, Acc>) {  // float32 and float64: graph_forward refuses the others
      std::vector<bn_train::Slice<T, Acc>> slices;
      for (size_t g = 0; g < descs.size(); ++g) {
        const GemmDesc& d = descs[g];
        if (d.stage != stage || d.source == kSourceMaxPoolCopy) continue;
        for (size_t j = 0; j < d.segments.size(); ++j) {
          const auto& [begin, end, dest, channel] = d.segments[j];
          bn_train::Slice<T, Acc> slice;
          slice.z = z_planes[first_z[g] + j].data;
          slice.dst = dest == kDestOut ? out_plane : planes[dest];
          if (dest != kDestOut && planes[dest].pad > 0) {
            slice.copy = bn->interiors[dest].template data_ptr<T>();
            slice.copy_ld = buf_channels[dest];
          }
          slice.channel = channel;
          slice.count = end - begin;
          slice.N = N;
          slice.gh = grids[g].first;
          slice.gw = grids[g].second;
          slice.params = bn->params[dest + 1].template data_ptr<Acc>();
          slice.stats = bn->stats[dest + 1].template data_ptr<Acc>();
          slice.C = bn->params[dest + 1].size(1);
          slices.push_back(slice);
        }
      }
      bn_train::normalize_stage(slices);
    } else {
      TORCH_CHECK(false, "batch norm in training runs in float32 or float64");
    }
  };
  const int64_t threads = at::get_num_threads();
  const int64_t group = images_per_group(HW), groups = ceil_div(N, group);
  // Batch norm in training needs every image's sums of a stage before the next stage reads
  // them: stage after stage, then, whatever the batch.
  if (bn == nullptr && image_major(groups, threads)) {
    // Image-major: a thread runs every stage on a group of whole images, so their
    // intermediates pass from stage to stage through its cache. The images are cut into a
    // multiple of `threads` groups of near-equal size (at most `group` each): at::parallel_for
    // hands each thread the same number of consecutive groups, so the threads' shares differ
    // by at most one image. Groups of exactly `group` images left a short last group, so
    // that 50 images of 8x8 ran as 30 on one thread and 20 on the other.
    const int64_t even_groups = threads * ceil_div(N, threads * group);
    const int64_t block = block_rows(ceil_div(N, even_groups) * HW, 1);
    at::parallel_for(0, even_groups, 1, [&](int64_t g0, int64_t g1) {
      Scratch scratch = make_scratch(block);
      for (int64_t gi = g0; gi < g1; ++gi) {
        const int64_t n0 = N * gi / even_groups, n1 = N * (gi + 1) / even_groups;
        for (int64_t n = n0; n < n1; ++n) zero_borders(n);
        for (int64_t stage = 0; stage < stages; ++stage)
          for (size_t g = 0; g < gemms.size(); ++g) {
            if (descs[g].stage != stage) continue;
            const auto [gh, gw] = grid_of(g);
            for_rows(g, n0 * gh * gw, n1 * gh * gw, block, scratch);
          }
      }
    });
  } else {
    // Too few images to share out: the threads share each stage's GEMMs, stage after stage
    // (a stage reads its inputs' halo rows from other blocks), in one parallel region per
    // stage whose work items are (row block, column part, GEMM). With only a few register
    // tiles of rows per thread (a 7x7 grid at batch 1) the threads split every GEMM's weight
    // panels rather than its rows, as the GoogLeNet kernel does: weights then dominate the
    // traffic, and each thread reads only its part of them. Every GEMM of a stage is cut
    // into the same number of row blocks (a grid reduction's output grid has a quarter of
    // the input's rows, so its blocks are smaller), and items are ordered row block first:
    // at::parallel_for hands each thread a contiguous range of items, so each gets the same
    // share of every GEMM (in the column split, the same panel part of each).
    bool first_region = true;
    for (int64_t stage = 0; stage < stages; ++stage) {
      std::vector<size_t> members;  // the stage's GEMMs
      int64_t max_rows = 0, max_pixels = 0;
      for (size_t g = 0; g < gemms.size(); ++g) {
        if (descs[g].stage != stage) continue;
        members.push_back(g);
        const auto [gh, gw] = grid_of(g);
        max_rows = std::max(max_rows, N * gh * gw);
        max_pixels = std::max(max_pixels, N * grids[g].first * grids[g].second);
      }
      if (members.empty()) continue;
      // Split by pixels, not by a Winograd stage's tile rows: each tile is a window's worth
      // of pixels, and a column split makes every thread transform every tile (and left a
      // 96- or 32-column 3x3 as 1 panel against 2, or 0 against 1: a 35x35 or 28x28 grid
      // at batch 1 as F(4x4, 3x3) has 81 or 49 tile rows, under the column-split bound).
      const bool split_columns = max_pixels < threads * kSplitColumnsBelowRows;
      const int64_t parts = split_columns ? threads : 1;
      const int64_t blocks = block_count(max_rows, split_columns ? 1 : threads);
      const int64_t gemm_count = static_cast<int64_t>(members.size());
      std::vector<int64_t> rows(gemm_count), block(gemm_count);
      int64_t max_block = 1;
      for (int64_t j = 0; j < gemm_count; ++j) {
        const auto [gh, gw] = grid_of(members[j]);
        rows[j] = N * gh * gw;
        // An even split, not whole register tiles: 196 rows (14x14 at batch 1) as 108 + 88
        // left one thread 9 tiles and the other 7 and a part; 98 + 98 gives each 8 and a part.
        block[j] = ceil_div(rows[j], blocks);
        max_block = std::max(max_block, block[j]);
      }
      at::parallel_for(0, blocks * parts * gemm_count, 1, [&](int64_t i0, int64_t i1) {
        // The borders, by the first thread of the first region: a stage writes only
        // interiors and reads borders only from earlier stages, and a region of its own
        // would cost one more fork and join per call (batch 1 feels it).
        if (first_region && i0 == 0)
          for (int64_t n = 0; n < N; ++n) zero_borders(n);
        Scratch scratch = make_scratch(max_block);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t j = i % gemm_count, part = i / gemm_count % parts, b = i / (gemm_count * parts);
          const int64_t m0 = b * block[j], m1 = std::min(m0 + block[j], rows[j]);
          if (m0 < m1) for_rows(members[j], m0, m1, block[j], scratch, part, parts);
        }
      });
      first_region = false;
      if (bn != nullptr) bn_stage(stage);
    }
  }
}

// GraphPlan.flat() (inception_fast/ops/plan.py): (buffers, buf_channels..., buf_border...,
// out_channels, stride, gemms, then per GEMM its record length and record, then x's channels).
struct FlatPlan {
  std::vector<int64_t> buf_channels, buf_border;
  int64_t out_channels, stride, in_channels = 0;
  std::vector<GemmDesc> descs;
  bool residual = false;  // some output goes through a residual epilogue: x has out_channels channels
};

FlatPlan parse_flat_plan(at::IntArrayRef flat) {
  const auto size = static_cast<int64_t>(flat.size());
  TORCH_CHECK(size >= 4 && flat[0] >= 0 && flat[0] <= (size - 4) / 2,
              "flat_plan is not a GraphPlan.flat() list: ", size, " values");
  const int64_t buffers = flat[0];
  FlatPlan p{{flat.begin() + 1, flat.begin() + 1 + buffers},
             {flat.begin() + 1 + buffers, flat.begin() + 1 + 2 * buffers},
             flat[1 + 2 * buffers], flat[2 + 2 * buffers], {}};
  TORCH_CHECK(p.stride == 1 || p.stride == 2, "flat_plan: stride must be 1 or 2, got ", p.stride);
  TORCH_CHECK(1 <= p.out_channels && p.out_channels <= kMaxChannels, "flat_plan: out_channels ", p.out_channels,
              " out of range");
  for (int64_t k = 0; k < buffers; ++k)
    TORCH_CHECK(1 <= p.buf_channels[k] && p.buf_channels[k] <= kMaxChannels && 0 <= p.buf_border[k] &&
                    p.buf_border[k] <= kMaxBorder,
                "flat_plan: buffer ", k, " of ", p.buf_channels[k], " channels and border ", p.buf_border[k],
                " out of range");
  const int64_t count = flat[3 + 2 * buffers];
  TORCH_CHECK(count >= 1 && count <= size, "flat_plan: ", count, " GEMMs");
  int64_t i = 4 + 2 * buffers;
  for (int64_t g = 0; g < count; ++g) {
    TORCH_CHECK(i < size && flat[i] > 0 && flat[i] <= size - i - 1, "flat_plan: GEMM ", g, " runs past its end");
    p.descs.push_back(parse_desc(flat.slice(i + 1, flat[i]), buffers));
    i += 1 + flat[i];
  }
  TORCH_CHECK(i == size - 1, "flat_plan: ", size - i, " values after the last GEMM, not one (x's channels)");
  p.in_channels = flat[i];
  TORCH_CHECK(1 <= p.in_channels && p.in_channels <= kMaxChannels, "flat_plan: in_channels ", p.in_channels,
              " out of range");

  // The plan as a whole: every channel of the output and of each buffer written exactly
  // once (nothing returned or read is left unwritten), the output only at the block's
  // stride, and each buffer read only in a later stage than every GEMM writing it.
  ChannelCoverage written(p.out_channels, p.buf_channels);
  std::vector<int64_t> last_write(buffers, -1);
  for (size_t g = 0; g < p.descs.size(); ++g) {
    const GemmDesc& d = p.descs[g];
    TORCH_CHECK(0 <= d.stage && d.stage < count, "flat_plan: GEMM ", g, " has stage ", d.stage, " (", count,
                " GEMMs)");
    for (const auto& [begin, end, dest, channel] : d.segments) {
      TORCH_CHECK(!out_destination(dest) || d.stride == p.stride, "flat_plan: GEMM ", g,
                  " writes the output at stride ", d.stride, " in a stride-", p.stride, " block");
      if (residual_destination(dest)) p.residual = true;
      written.mark(out_destination(dest) ? kDestOut : dest, channel, end - begin, "flat_plan: GEMM",
                   static_cast<int64_t>(g));
      if (dest >= 0) last_write[dest] = std::max(last_write[dest], d.stage);
    }
  }
  written.check_complete("flat_plan");
  for (size_t g = 0; g < p.descs.size(); ++g) {
    const GemmDesc& d = p.descs[g];
    if (d.source < 0) continue;
    TORCH_CHECK(d.stage > last_write[d.source], "flat_plan: GEMM ", g, " (stage ", d.stage, ") reads buffer ",
                d.source, " before stage ", last_write[d.source], " has written it");
    TORCH_CHECK(p.buf_border[d.source] >= d.pad_h && p.buf_border[d.source] >= d.pad_w, "flat_plan: buffer ",
                d.source, " has a border of ", p.buf_border[d.source], ", too narrow for GEMM ", g, "'s padding");
  }
  return p;
}

// The forward into `out` (or a new tensor); the intermediates are left in `bufs`.
at::Tensor graph_forward(const at::Tensor& x_in, const FlatPlan& p, at::TensorList b_in, at::TensorList bias_in,
                         const std::optional<at::Tensor>& out_opt, std::vector<at::Tensor>& bufs,
                         BatchNormTrain* bn = nullptr, bool linear = false) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 4, "x must be a 4-D CPU tensor, got ", x_in.sizes(),
              " on ", x_in.device());
  TORCH_CHECK(x_in.size(1) == p.in_channels, "x must have the plan's ", p.in_channels, " channels, got ",
              x_in.sizes());
  TORCH_CHECK(p.descs.size() == b_in.size() && b_in.size() == bias_in.size(),
              "one packed B and one bias per GEMM of the plan, got ", p.descs.size(), ", ", b_in.size(),
              " and ", bias_in.size());
  // Any strides in, as an ATen op takes them: a compiled graph (inductor's constant folding,
  // an AOTInductor package) may hand over the packed weights in another layout. A no-op
  // for the module's own packed weights.
  std::vector<at::Tensor> b, bias;
  for (size_t g = 0; g < b_in.size(); ++g) {
    b.push_back(b_in[g].contiguous());
    bias.push_back(bias_in[g].contiguous());
  }
  // fp16 has no micro-kernel of its own: it runs the fp32 one on a widened x, with weights
  // packed in fp32, and the output is rounded to fp16 once (4-5x eager fp16 on an
  // AVX-512 CPU, where ATen's fp16 convolutions are slow). bf16 sums (and so its biases)
  // are fp32, and its B rows come in pairs per tap.
  const bool half = x_in.scalar_type() == at::kHalf;
  const at::ScalarType compute = half ? at::kFloat : x_in.scalar_type();
  const int64_t C = x_in.size(1), width = panel_width(compute);
  const bool bf16 = compute == at::kBFloat16;
  const at::ScalarType bias_type = bf16 ? at::kFloat : compute;
  for (size_t g = 0; g < p.descs.size(); ++g) {
    const GemmDesc& d = p.descs[g];
    if (d.source == kSourceMaxPoolCopy) {
      TORCH_CHECK(d.cols == C && d.segments.size() == 1, "the max-pool copy passes x's ", C, " channels to one slice");
      continue;  // no weights
    }
    const bool pooled_rows = pooled_source(d.source);
    const int64_t channels = d.source >= 0 ? p.buf_channels[d.source] : C;
    const auto kind = winograd_b(b[g], d, channels);
    const int64_t k = kind ? winograd::packed_rows(*kind, channels)
                          : (pooled_rows ? 1 : d.kh * d.kw) * (bf16 ? ceil_div(channels, 2) * 2 : channels);
    TORCH_CHECK(b[g].device().is_cpu() && bias[g].device().is_cpu(), "packed B and bias of GEMM ", g,
                " must be CPU tensors, got ", b[g].device(), " and ", bias[g].device());
    // A convolution that has Winograd forms may come packed for one of them instead (fp32).
    std::string winograd_rows;
    if (const auto shape = winograd::kind_of(d.source, d.kh, d.kw, d.stride, d.pad_h, d.pad_w);
        shape && compute == at::kFloat && !kind) {
      for (const auto form : winograd::packings(*shape))
        winograd_rows += " or " + std::to_string(winograd::packed_rows(form, channels));
      winograd_rows += " (Winograd panels)";
    }
    TORCH_CHECK(b[g].scalar_type() == compute && b[g].dim() == 3 && b[g].size(0) == ceil_div(d.cols, width) &&
                    b[g].size(1) == k && b[g].size(2) == width,
                "packed B of GEMM ", g, " must be a (", ceil_div(d.cols, width), ", ", k, winograd_rows, ", ", width,
                ") tensor of ", compute, " (x's dtype", half ? ", widened" : "", "), got ", b[g].sizes(), " of ",
                b[g].scalar_type());
    TORCH_CHECK(bias[g].scalar_type() == bias_type && bias[g].dim() == 1 && bias[g].size(0) == d.cols,
                "bias of GEMM ", g, " must be a (", d.cols, ",) tensor of ", bias_type, " (x's accumulator type)");
  }
  TORCH_CHECK(!linear || !p.residual, "graph_forward_linear: a plan with a residual epilogue has no linear form");
  TORCH_CHECK(!p.residual || C == p.out_channels, "flat_plan: a residual epilogue adds x to the output, so x must "
              "have its ", p.out_channels, " channels, got ", C);
  const at::Tensor x = x_in.to(compute).contiguous(at::MemoryFormat::ChannelsLast);
  // The output grid is that of the GEMMs writing it (gemm_grid): x's, or smaller for a grid
  // reduction (3x3 stride-2 unpadded convolutions and pool) or unpadded convolutions.
  int64_t out_h = -1, out_w = -1;
  for (const GemmDesc& d : p.descs) {
    if (std::none_of(d.segments.begin(), d.segments.end(), [](const auto& s) { return out_destination(s[2]); }))
      continue;
    TORCH_CHECK(x.size(2) + 2 * d.pad_h >= d.kh && x.size(3) + 2 * d.pad_w >= d.kw, "x must be at least ",
                d.kh - 2 * d.pad_h, "x", d.kw - 2 * d.pad_w, " for the block's ", d.kh, "x", d.kw, " convolution",
                d.pad_h + d.pad_w == 0 ? "s without padding" : "s", ", got ", x.size(2), "x", x.size(3));
    const auto [gh, gw] = gemm_grid(d, x.size(2), x.size(3));
    TORCH_CHECK(out_h < 0 || (gh == out_h && gw == out_w), "flat_plan: GEMMs write the output on ", out_h, "x",
                out_w, " and ", gh, "x", gw, " grids");
    out_h = gh;
    out_w = gw;
  }
  const std::vector<int64_t> shape{x.size(0), p.out_channels, out_h, out_w};
  at::Tensor out;
  if (out_opt.has_value()) {
    out = *out_opt;
    TORCH_CHECK(out.sizes() == at::IntArrayRef(shape) && out.scalar_type() == x_in.scalar_type() &&
                    out.is_contiguous(at::MemoryFormat::ChannelsLast) && out.device().is_cpu(),
                "out must be a channels_last CPU ", x_in.scalar_type(), " tensor of shape ", at::IntArrayRef(shape));
    at::assert_no_overlap(out, x_in);  // the kernel reads x, the weights and biases while it writes out
    for (size_t g = 0; g < b.size(); ++g) {
      if (b[g].numel() > 0) at::assert_no_overlap(out, b[g]);
      if (bias[g].numel() > 0) at::assert_no_overlap(out, bias[g]);
    }
  } else {
    out = empty_large(shape, x_in.options().memory_format(at::MemoryFormat::ChannelsLast));
  }
  // The kernel's own output: `out` itself, or for fp16 an fp32 one rounded into it after.
  at::Tensor work = half ? empty_large(shape, x.options().memory_format(at::MemoryFormat::ChannelsLast)) : out;
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  for (size_t k = 0; k < p.buf_channels.size(); ++k) {
    const int64_t pad = p.buf_border[k];
    bufs.push_back(empty_large({N, H + 2 * pad, W + 2 * pad, p.buf_channels[k]}, x.options()));
  }
  if (bn != nullptr) {
    TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
                "batch norm in training runs in float32 or float64, got x of ", x_in.scalar_type());
    TORCH_CHECK(bn->params.size() == p.buf_channels.size() + 1, "bn_params: one (3, channels) tensor for the output "
                "and one per buffer, ", p.buf_channels.size() + 1, " in all, got ", bn->params.size());
    for (size_t d = 0; d < bn->params.size(); ++d) {
      const int64_t channels = d == 0 ? p.out_channels : p.buf_channels[d - 1];
      at::Tensor& params = bn->params[d];
      TORCH_CHECK(params.scalar_type() == x.scalar_type() && params.dim() == 2 && params.size(0) == 3 &&
                      params.size(1) == channels && params.device().is_cpu(),
                  "bn_params[", d, "] (gamma, beta, eps rows) must be a (3, ", channels, ") CPU tensor of ",
                  x.scalar_type(), ", got ", params.sizes(), " of ", params.scalar_type());
      params = params.contiguous();
      bn->stats.push_back(at::zeros({5, channels}, x.options()));
    }
    for (size_t k = 0; k < bufs.size(); ++k)
      bn->interiors.push_back(p.buf_border[k] > 0 ? empty_large({N, H, W, p.buf_channels[k]}, x.options()) : bufs[k]);
    for (const GemmDesc& d : p.descs) {
      if (d.source == kSourceMaxPoolCopy) continue;
      for (const auto& [begin, end, dest, channel] : d.segments)
        bn->z.push_back(dest == kDestOut ? empty_large({N, out_h, out_w, end - begin}, x.options())
                                         : empty_large({N, H, W, end - begin}, x.options()));
    }
  }
  if (out.numel() == 0 || x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "inception_graph_forward", [&] {
    graph_forward_impl<scalar_t>(x, p.buf_channels, p.buf_border, p.descs, b, bias, bufs, work, bn, linear);
  });
  if (half) out.copy_(work);
  return out;
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
inception_graph_forward_bn_train(const at::Tensor& x, at::TensorList b, at::TensorList bias,
                                 at::TensorList bn_params, at::IntArrayRef flat_plan) {
  std::vector<at::Tensor> bufs;
  BatchNormTrain bn{{}, bn_params.vec(), {}, {}};
  at::Tensor out = graph_forward(x, parse_flat_plan(flat_plan), b, bias, std::nullopt, bufs, &bn);
  return {out, bn.interiors, bn.z, bn.stats};
}

std::tuple<at::Tensor, at::Tensor> relu_batch_norm_backward_out(
    const at::Tensor& grad, const std::optional<at::Tensor>& y_opt, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& alpha_opt,
    const std::optional<at::Tensor>& shift_opt, at::Tensor& dz) {
  TORCH_CHECK(z.dim() == 2, "relu_batch_norm_backward: z must be (M, channels) rows, got ", z.sizes());
  const int64_t rows = z.size(0), count = z.size(1);
  TORCH_CHECK(y_opt.has_value() || (alpha_opt.has_value() && shift_opt.has_value()),
              "relu_batch_norm_backward: the ReLU mask needs y, or alpha and shift");
  const at::Tensor y = y_opt.has_value() ? *y_opt : z;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad", &grad}, {"y", &y}, {"z", &z}})
    // One channel: its stride is never stepped (the rows of an NCHW (N, 1, H, W) tensor have
    // stride H*W there, and row stride 1).
    TORCH_CHECK(t->dim() == 2 && t->size(0) == rows && t->size(1) == count && (t->stride(1) == 1 || count == 1) &&
                    t->stride(0) >= count && t->scalar_type() == z.scalar_type() && t->device().is_cpu(),
                "relu_batch_norm_backward: ", name, " must be (", rows, ", ", count, ") CPU rows of ", z.scalar_type(),
                " with contiguous channels, got ", t->sizes(), " strides ", t->strides());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "relu_batch_norm_backward runs in float32 or float64, got ", z.scalar_type());
  const at::Tensor m = mean.contiguous(), is = invstd.contiguous();
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor a = alpha_opt.has_value() ? alpha_opt->contiguous() : at::Tensor();
  const at::Tensor sh = shift_opt.has_value() ? shift_opt->contiguous() : at::Tensor();
  for (const at::Tensor* t : {&m, &is, &w, &a, &sh})
    TORCH_CHECK(!t->defined() || (t->numel() == count && t->scalar_type() == z.scalar_type()),
                "relu_batch_norm_backward: mean, invstd, weight, alpha and shift must be (", count, ",) tensors of ",
                z.scalar_type());
  TORCH_CHECK(dz.dim() == 2 && dz.size(0) == rows && dz.size(1) == count && (dz.stride(1) == 1 || count == 1) &&
                  dz.stride(0) >= count && dz.scalar_type() == z.scalar_type() && dz.device().is_cpu(),
              "relu_batch_norm_backward: out must be (", rows, ", ", count, ") CPU rows of ", z.scalar_type(),
              " with contiguous channels, got ", dz.sizes(), " strides ", dz.strides());
  for (const at::Tensor* t : {&grad, &z})
    at::assert_no_overlap(dz, *t);
  at::Tensor d_gamma = at::empty({count}, z.options()), d_beta = at::empty({count}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "relu_batch_norm_backward", [&] {
    bn_train::relu_bn_backward<scalar_t, scalar_t>(
        grad.data_ptr<scalar_t>(), grad.stride(0), y_opt.has_value() ? y.data_ptr<scalar_t>() : nullptr, y.stride(0),
        z.data_ptr<scalar_t>(), z.stride(0), rows, count, m.data_ptr<scalar_t>(), is.data_ptr<scalar_t>(),
        w.defined() ? w.data_ptr<scalar_t>() : nullptr, dz.data_ptr<scalar_t>(), dz.stride(0),
        d_gamma.data_ptr<scalar_t>(), d_beta.data_ptr<scalar_t>(), y_opt.has_value() ? nullptr : a.data_ptr<scalar_t>(),
        y_opt.has_value() ? nullptr : sh.data_ptr<scalar_t>());
  });
  return {d_gamma, d_beta};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relu_batch_norm_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& y, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& alpha,
    const std::optional<at::Tensor>& shift) {
  TORCH_CHECK(z.dim() == 2, "relu_batch_norm_backward: z must be (M, channels) rows, got ", z.sizes());
  at::Tensor dz = empty_large({z.size(0), z.size(1)}, z.options());
  auto [d_gamma, d_beta] = relu_batch_norm_backward_out(grad, y, z, mean, invstd, weight, alpha, shift, dz);
  return {dz, d_gamma, d_beta};
}

at::Tensor inception_graph_forward(const at::Tensor& x, at::TensorList b, at::TensorList bias,
                                   at::IntArrayRef flat_plan) {
  std::vector<at::Tensor> bufs;
  return graph_forward(x, parse_flat_plan(flat_plan), b, bias, std::nullopt, bufs);
}

at::Tensor inception_graph_forward_linear(const at::Tensor& x, at::TensorList b, at::TensorList bias,
                                          at::IntArrayRef flat_plan) {
  std::vector<at::Tensor> bufs;
  return graph_forward(x, parse_flat_plan(flat_plan), b, bias, std::nullopt, bufs, nullptr, true);
}

at::Tensor& inception_graph_forward_out(const at::Tensor& x, at::TensorList b, at::TensorList bias,
                                        at::IntArrayRef flat_plan, at::Tensor& out) {
  std::vector<at::Tensor> bufs;
  graph_forward(x, parse_flat_plan(flat_plan), b, bias, out, bufs);
  return out;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> inception_graph_forward_saving(const at::Tensor& x, at::TensorList b,
                                                                               at::TensorList bias,
                                                                               at::IntArrayRef flat_plan) {
  std::vector<at::Tensor> bufs;
  at::Tensor out = graph_forward(x, parse_flat_plan(flat_plan), b, bias, std::nullopt, bufs);
  return {out, bufs};
}

}  // namespace inception_fast
