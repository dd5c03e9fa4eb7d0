// Matmul on the CPU against weights packed into column panels: y (M, P*NR) = x (M, K) @ W.
//
// XLA's CPU dot runs the small-M products of decode (M = the live batch, 1..64) at a third of
// the machine's FMA rate or less. Here the weight (K, N) is stored once, at load time, as P
// panels of NR columns, each panel K x NR contiguous, so a micro-tile streams its panel in
// order: every load is a full vector the prefetcher saw coming, and each broadcast x value
// feeds NV vector FMAs. The tile (RM rows of x by one panel) keeps RM x NV accumulators in
// registers and writes them once: no horizontal sums.
//
//   x   (M, K)       f32   activations, row-major
//   w   (P, K, NR)   f32   packed weight: w[p, k, c] = W[k, p*NR + c] (zero past N);
//                    or bf16 (a second entry point): widened to f32 as loaded, half the bytes;
//                    or int8 (a third, with a f32 scale per column): a quarter
//   y   (M, P*NR)    f32
//
// Work items are (panel, block of rows), taken from an atomic counter by the calling thread
// and helpers on XLA's intra-op thread pool, as in cpu_attention.cc. The same kernel serves
// decode (M = batch rows) and prefill (M = chunk tokens), where it runs near the FMA peak.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>


#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kNV = 4, kRM = 6;  // 24 accumulators of 32 zmm registers
#elif defined(__AVX__)
constexpr int kNV = 2, kRM = 6;  // 12 accumulators of 16 ymm registers
#else
constexpr int kNV = 2, kRM = 4;
#endif
constexpr int kNR = kVW * kNV;
// Rows of x per work item: a multiple of kRM, small enough that a prefill chunk splits into
// several items per panel and both cores stay busy on narrow matrices.
constexpr int64_t kRowBlock = 16 * kRM;

// y[m0 .. m0+rm, panel's columns] = (x[m0 .. m0+rm, :] @ panel) * scale (scale: the panel's
// column scales, or null). With `pf`, the steps also ask for half a panel from there into L2,
// in order (see RunItem).
template <int rm, typename W>
inline void Tile(const W* panel, const float* scale, const float* x, float* y, int64_t K, int64_t ldy,
                 int64_t m0, const char* pf) {
  constexpr int64_t half = kNR * sizeof(W) / 2;  // bytes of half a panel per step
  vf acc[rm][kNV];
  for (int j = 0; j < rm; ++j)
    for (int v = 0; v < kNV; ++v) acc[j][v] = vf{};
  const float* xr = x + m0 * K;
  for (int64_t k = 0; k < K; ++k) {
    if (pf != nullptr && (k * half) % 64 < half)
      for (int64_t l = 0; l < (half + 63) / 64; ++l) __builtin_prefetch(pf + k * half + l * 64, 0, 2);
    const W* w = panel + k * kNR;
    vf wv[kNV];
    for (int v = 0; v < kNV; ++v) wv[v] = Load(w + v * kVW);
    for (int j = 0; j < rm; ++j) {
      const vf xb = vf{} + xr[j * K + k];
      for (int v = 0; v < kNV; ++v) acc[j][v] += xb * wv[v];
    }
  }
  if (scale != nullptr) {
    for (int v = 0; v < kNV; ++v) {
      const vf sv = Load(scale + v * kVW);
      for (int j = 0; j < rm; ++j) acc[j][v] *= sv;
    }
  }
  for (int j = 0; j < rm; ++j)
    for (int v = 0; v < kNV; ++v) Store(y + (m0 + j) * ldy + v * kVW, acc[j][v]);
}

template <typename W>
struct Shared {
  const float* x;
  const W* w;
  const float* scale;  // (P * NR,) column scales of an int8 weight, else null
  float* y;
  int64_t M, K, P, blocks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// `next` is the item this thread runs after this one (-1: none). At decode's few rows the
// first row tile of a panel waits on memory and the later ones compute from cache, so the
// second and third ask for half of the next item's panel each (PanelAhead).
template <typename W>
void RunItem(const Shared<W>& s, int64_t item, int64_t next) {
  const int64_t p = item / s.blocks, m_begin = (item % s.blocks) * kRowBlock;
  const int64_t m_end = std::min(s.M, m_begin + kRowBlock), ldy = s.P * kNR;
  const W* panel = s.w + p * s.K * kNR;
  const float* scale = s.scale == nullptr ? nullptr : s.scale + p * kNR;
  float* y = s.y + p * kNR;
  PanelAhead pf(next >= 0 && s.blocks == 1 ? s.w + (next / s.blocks) * s.K * kNR : nullptr,
                s.K * kNR * sizeof(W));
  int64_t m = m_begin;
  for (; m + kRM <= m_end; m += kRM) Tile<kRM>(panel, scale, s.x, y, s.K, ldy, m, pf());
  switch (m_end - m) {
    case 1: Tile<1>(panel, scale, s.x, y, s.K, ldy, m, pf()); break;
    case 2: Tile<2>(panel, scale, s.x, y, s.K, ldy, m, pf()); break;
    case 3: Tile<3>(panel, scale, s.x, y, s.K, ldy, m, pf()); break;
    case 4: if constexpr (kRM > 4) Tile<4>(panel, scale, s.x, y, s.K, ldy, m, pf()); break;
    case 5: if constexpr (kRM > 5) Tile<5>(panel, scale, s.x, y, s.K, ldy, m, pf()); break;
    default: break;
  }
}

template <typename W, ffi::DataType T>
ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w, ffi::Buffer<ffi::S32> live,
                  ffi::ResultBuffer<ffi::F32> y, const float* scale = nullptr) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kNR || xd[1] != wd[1] ||
      yd[0] != xd[0] || yd[1] != wd[0] * kNR || live.element_count() != 1)
    return ffi::Error::InvalidArgument("packed matmul: inconsistent shapes");
  auto shared = std::make_shared<Shared<W>>();
  Shared<W>& s = *shared;
  s.x = x.typed_data();
  s.w = reinterpret_cast<const W*>(w.untyped_data());
  UseHugePages(s.w, w.size_bytes());
  s.scale = scale;
  s.y = y->typed_data();
  s.M = LiveRows(y->typed_data(), xd[0], yd[1], live.typed_data());
  s.K = xd[1];
  s.P = wd[0];
  s.blocks = (s.M + kRowBlock - 1) / kRowBlock;
  const int64_t count = s.P * s.blocks;
  if (count == 0) return ffi::Error::Success();
  ShareWork(pool, shared, count, [count](Shared<W>& state) {
    TakeItemsAhead(state, count, [&](int64_t i, int64_t next) { RunItem(state, i, next); });
  });
  return ffi::Error::Success();
}

ffi::Error PackedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                            ffi::Buffer<ffi::S32> live, ffi::ResultBuffer<ffi::F32> y) {
  return Matmul<float>(pool, x, w, live, y);
}

ffi::Error PackedMatmulBf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                                ffi::Buffer<ffi::S32> live, ffi::ResultBuffer<ffi::F32> y) {
  return Matmul<uint16_t>(pool, x, w, live, y);
}

ffi::Error PackedMatmulInt8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> scale,
                                ffi::Buffer<ffi::S32> live, ffi::ResultBuffer<ffi::F32> y) {
  if (w.dimensions().size() != 3 || scale.element_count() != static_cast<size_t>(w.dimensions()[0] * kNR))
    return ffi::Error::InvalidArgument("packed matmul: one scale per packed column expected");
  return Matmul<int8_t>(pool, x, w, live, y, scale.typed_data());
}

}  // namespace

// The panel width this build packs for (it follows the vector ISA of -march=native).
extern "C" int32_t XlaservePanelWidth() { return kNR; }

// What the kernels do to a buffer on their first call (UseHugePages), done at load instead,
// so the first request does not wait for the collapse (about 1.8 s for 1.6 GB).
extern "C" void XlaserveUseHugePages(const void* data, int64_t bytes) { UseHugePages(data, bytes); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaservePackedMatmul, PackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaservePackedMatmulBf16, PackedMatmulBf16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaservePackedMatmulInt8, PackedMatmulInt8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
