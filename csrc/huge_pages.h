// Large kernel outputs on transparent huge pages (Linux).
//
// glibc serves every allocation over its mmap threshold (32 MB at most) with a fresh
// mapping and unmaps it on free, so each call of a large block faults its outputs in anew:
// a 4 KiB page at a time, each fault zeroing and mapping one page. Inception-v3's stem at
// batch 32 writes 88-177 MB per conv unit; its forward faulted ~110,000 pages a call in
// our ops alone. Asking for huge pages on such a fresh mapping before the first write
// (madvise(MADV_HUGEPAGE), what PyTorch's THP_MEM_ALLOC_ENABLE=1 does for every
// allocation) makes the kernel fault 2 MiB at a time. Only for tensors of at least
// kHugePageMinBytes: those are mappings of their own, unmapped when freed, so the advice
// never lands on glibc's heap, which smaller tensors share. Advice only: where the kernel
// has no THP, or says no, nothing changes. INCEPTION_FAST_HUGE_PAGES=0 (or false/off/no),
// read once, turns it off: huge pages make the kernel compact memory on a fault where none
// is free, a stall some latency-bound servers would rather not have.
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
