// Large kernel outputs on transparent huge pages (Linux).
//
// glibc serves an allocation over its mmap threshold (32 MiB at most) with a fresh
// mapping when no free chunk of its heap fits, and unmaps it on free, so each call of a
// large block faults its outputs in anew: a 4 KiB page at a time, each fault zeroing and
// mapping one page. Inception-v3's stem at batch 32 writes 88-177 MB per conv unit; its
// forward faulted ~110,000 pages a call in our ops alone. Asking for huge pages on the
// storage before the first write (madvise(MADV_HUGEPAGE), what PyTorch's
// THP_MEM_ALLOC_ENABLE=1 does for every allocation) makes the kernel fault 2 MiB at a
// time. Only tensors of at least kHugePageMinBytes, the ones glibc's defaults usually map
// on their own. Where the allocator hands out memory it already holds (a free heap chunk,
// the rule under tuned MALLOC_* variables; tcmalloc's page heap) the advice does nothing
// for that call and stays on the range after the tensor is freed (as glibc's own
// glibc.malloc.hugetlb=1 tunable advises its whole heap). Advice only: where the kernel has
// no THP, or says no, nothing changes. INCEPTION_FAST_HUGE_PAGES=0 (or false/off/no) turns
// it off: a fault on a huge page may stall while the kernel compacts memory, which a
// latency-bound server may not want.
#pragma once

#include <ATen/ATen.h>

#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace inception_fast {

inline constexpr int64_t kHugePageMinBytes = int64_t(32) << 20;  // glibc's largest mmap threshold

// INCEPTION_FAST_HUGE_PAGES, read once: off for 0, false, off or no (any case, spaces
// around ignored), as ops/backend.py reads its switches.
inline bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("INCEPTION_FAST_HUGE_PAGES");
    if (v == nullptr) return true;
    std::string s;
    for (const char* c = v; *c != '\0'; ++c)
      if (!std::isspace(static_cast<unsigned char>(*c))) s += static_cast<char>(std::tolower(static_cast<unsigned char>(*c)));
    return !(s == "0" || s == "false" || s == "off" || s == "no");
  }();
  return enabled;
}

// `t`, fresh from at::empty and not yet written, with its storage advised onto huge pages
// where it is large enough (see above).
inline at::Tensor advise_huge_pages(at::Tensor t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const int64_t bytes = static_cast<int64_t>(t.storage().nbytes());
  if (bytes >= kHugePageMinBytes && huge_pages_enabled()) {
    const auto begin = reinterpret_cast<uintptr_t>(t.storage().data());
    const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + bytes) & ~(kHuge - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // a hint: its result does not matter
  }
#endif
  return t;
}

// at::empty, large ones on huge pages.
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return advise_huge_pages(at::empty(sizes, options));
}

}  // namespace inception_fast
