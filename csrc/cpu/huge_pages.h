// Transparent huge pages for large kernel outputs.
//
// A fresh output of tens of MB comes from a new anonymous mapping (glibc mmaps every block over 32 MB), and the
// first write to each 4 KB page takes a page fault. For a one-pass elementwise kernel such as SwiGLU at
// (4096, 14336) fp32 (235 MB out) the ~57k faults cost about as much as the arithmetic and the reads together.
// madvise(MADV_HUGEPAGE) on the 2 MB-aligned interior of the buffer, before the first write, lets the kernel back
// it with 2 MB pages (512x fewer faults) when transparent huge pages are in "madvise" or "always" mode; in
// "never" mode, or off Linux, this is a no-op. PyTorch's allocator does the same for every allocation under
// THP_MEM_ALLOC_ENABLE=1; this applies it to the outputs of our streaming kernels only.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace intro2llm {

constexpr int64_t kHugePageBytes = int64_t{2} << 20;
constexpr int64_t kHugePageMinBytes = int64_t{32} << 20;  // below this glibc may hand back recycled heap memory

inline void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes < kHugePageMinBytes) return;
  const auto begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t a = (begin + kHugePageBytes - 1) & ~static_cast<uintptr_t>(kHugePageBytes - 1);
  const uintptr_t e = (begin + static_cast<uintptr_t>(bytes)) & ~static_cast<uintptr_t>(kHugePageBytes - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);  // advisory: failure changes nothing
#else
  (void)data;
  (void)bytes;
#endif
}

// at::empty_like(like) in contiguous layout, huge-page-advised when large. Call before anything writes to it.
inline at::Tensor empty_output_like(const at::Tensor& like) {
  at::Tensor out = at::empty_like(like, at::MemoryFormat::Contiguous);
  advise_huge_pages(out.mutable_data_ptr(), static_cast<int64_t>(out.nbytes()));
  return out;
}

}  // namespace intro2llm
