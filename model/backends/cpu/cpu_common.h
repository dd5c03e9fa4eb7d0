// Helpers shared by the native CPU kernels.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <thread>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

// The vector the build's instruction set offers: kVW floats (-march picks the path).
#if defined(__AVX512F__)
constexpr int kVW = 16;
#elif defined(__AVX__)
constexpr int kVW = 8;
#else
constexpr int kVW = 4;
#endif
typedef float vf __attribute__((vector_size(kVW * 4)));
typedef float vfu __attribute__((vector_size(kVW * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(kVW * 4)));
typedef uint16_t vhu __attribute__((vector_size(kVW * 2), aligned(2)));
typedef uint32_t vu __attribute__((vector_size(kVW * 4)));
typedef uint32_t vuu __attribute__((vector_size(kVW * 4), aligned(2)));

inline vf Load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
// bfloat16 is the top half of a float32: widening is a shift, exact.
inline vf Load(const uint16_t* p) {
#if defined(__AVX512F__)
  // One widening load and a shift (GCC splits the generic conversion into halves).
  return reinterpret_cast<vf>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
#elif defined(__AVX2__)
  return reinterpret_cast<vf>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
#else
  const vu bits = __builtin_convertvector(*reinterpret_cast<const vhu*>(p), vu) << 16;
  vf out;
  __builtin_memcpy(&out, &bits, sizeof(out));
  return out;
#endif
}
// int8 to float. Intrinsics: GCC turns a generic int8 -> float vector conversion into one
// scalar convert per lane.
inline vf Load(const int8_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<vf>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(__AVX2__)  // implies kVW == 8
  return reinterpret_cast<vf>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#else
  vf out;
  for (int i = 0; i < kVW; ++i) out[i] = static_cast<float>(p[i]);
  return out;
#endif
}
inline void Store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }

// Buffers the kernels stream in full every step (packed weights, the KV cache) are read 4 KiB
// page after page; backed by 2 MiB pages they spare most TLB misses. Asked once per buffer
// address, with madvise, and collapsed in place where the kernel can; without transparent
// huge pages nothing changes.
inline void UseHugePages(const void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static std::mutex lock;
  static std::set<const void*> seen;
  {
    std::lock_guard<std::mutex> guard(lock);
    if (!seen.insert(data).second) return;
  }
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end <= begin) return;
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_COLLAPSE);
#endif
}

// Rows of a matmul's x that hold data: the first `live[0]` of `rows` (a step puts its padding
// rows last). The output's other rows are zeroed, not computed: a prefill chunk padded to
// its bucket or a decode batch padded to its size costs what its real rows need.
inline int64_t LiveRows(float* y, int64_t rows, int64_t cols, const int32_t* live) {
  const int64_t m = std::clamp<int64_t>(live[0], 0, rows);
  std::fill(y + m * cols, y + rows * cols, 0.0f);
  return m;
}

// Work shared between the calling thread and helpers on XLA's intra-op pool. `State` holds
// the items' inputs and two counters, `std::atomic<int64_t> next, done`; `drain(state)` takes
// items with TakeItems until none are left. The caller drains too and returns once every
// item is done, so a helper that starts late finds nothing left and only drops its
// reference to the state.
template <typename State, typename Fn>
inline void TakeItems(State& state, int64_t count, Fn&& run) {
  int64_t finished = 0;
  for (int64_t i; (i = state.next.fetch_add(1)) < count; ++finished) run(i);
  state.done.fetch_add(finished, std::memory_order_release);
}

// At decode's few rows a matmul item's first row tile waits on memory for its weight panel
// and the later tiles compute from cache; meanwhile the second and third tiles each ask for
// half of the thread's next panel (`next`: null when there is none, or nothing to gain).
// Each call hands the next tile its half to prefetch, or null.
class PanelAhead {
 public:
  PanelAhead(const void* next, int64_t bytes) : next_(static_cast<const char*>(next)), bytes_(bytes) {}
  const char* operator()() {
    const int64_t t = tile_++;
    return next_ != nullptr && (t == 1 || t == 2) ? next_ + (t - 1) * (bytes_ / 2) : nullptr;
  }

 private:
  const char* next_;
  int64_t bytes_;
  int64_t tile_ = 0;
};

// TakeItems, with each thread's next item claimed before it runs the current one, so the
// current one can prefetch the next one's data: run(item, next), next -1 after the last.
template <typename State, typename Fn>
inline void TakeItemsAhead(State& state, int64_t count, Fn&& run) {
  int64_t finished = 0;
  for (int64_t i = state.next.fetch_add(1); i < count; ++finished) {
    const int64_t next = state.next.fetch_add(1);
    run(i, next < count ? next : -1);
    i = next;
  }
  state.done.fetch_add(finished, std::memory_order_release);
}

template <typename Pool, typename State, typename Drain>
inline void ShareWork(Pool& pool, const std::shared_ptr<State>& state, int64_t count, Drain drain) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state, drain] { drain(*state); });
  drain(*state);
  // The items still out are running on helpers; each is short.
  while (state->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}
