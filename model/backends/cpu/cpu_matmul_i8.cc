// Matmul with int8 weights and int8 activations (W8A8) on the CPU: y = x @ W, products in
// int8, sums in int32, then float32.
//
// At decode's batch sizes and in prefill the float32 kernel (cpu_matmul.cc) runs at the
// machine's FMA peak; an AVX512-VNNI dot product does four times the multiply-adds per
// instruction. The activations are quantized on entry, per row and per block of kKB
// positions along K (a scale each, like llama.cpp's Q8_0 blocks); the weights were
// quantized at load with one scale per output column.
//
//   x       (M, K)                f32   activations
//   w       (P, Kp/4, 64, 4)      s8    w[p, g, c, j] = Wq[4g + j, 64p + c]; Kp = K rounded up
//                                       to kKB, zero rows and columns past the weight's
//   scale   (P*64,)               f32   per-column weight scale: W ~= Wq * scale
//   colsum  (Kp/kKB, P*64)        s32   128 * (sum of Wq over each block of kKB rows)
//   y       (M, P*64)             f32
//
// vpdpbusd multiplies unsigned by signed bytes, so x is stored as q + 128 and 128 * the
// block's column sum is taken off each block's int32 sum before it is scaled. Without
// AVX512-VNNI a scalar loop computes the same numbers, slowly (int8_dot_native() says which).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kNative = true;
#else
constexpr bool kNative = false;
#endif
constexpr int64_t kCols = 64;  // columns per panel
constexpr int64_t kKB = 64;    // positions per activation block
constexpr int kRM = 3;         // rows per tile: 3 x 4 int32 + 3 x 4 float accumulators
constexpr int64_t kRowBlock = 32 * kRM;

struct Shared {
  const float* x;
  const int8_t* w;
  const float* scale;
  const int32_t* colsum;
  float* y;
  int64_t M, K, Kp, P, nkb, blocks;
  std::vector<uint8_t> xq;  // (M, Kp): quantized x + 128
  std::vector<float> xs;    // (M, nkb): its scales
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void QuantizeRows(Shared& s) {
  s.xq.assign(s.M * s.Kp, 128);
  s.xs.assign(s.M * s.nkb, 1.0f);
  for (int64_t m = 0; m < s.M; ++m) {
    const float* row = s.x + m * s.K;
    for (int64_t b = 0; b < s.nkb; ++b) {
      const int64_t k0 = b * kKB, k1 = std::min(s.K, k0 + kKB);
      float amax = 0.0f;
      int64_t k = k0;
#if defined(__AVX512F__)
      __m512 vmax = _mm512_setzero_ps();
      for (; k + 16 <= k1; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
      amax = _mm512_reduce_max_ps(vmax);
#endif
      for (; k < k1; ++k) amax = std::max(amax, std::fabs(row[k]));
      if (amax == 0.0f) continue;
      const float scale = amax / 127.0f, inv = 127.0f / amax;
      s.xs[m * s.nkb + b] = scale;
      k = k0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
      // The same rounding as nearbyint (the current mode: to nearest even); q + 128 as a
      // byte is q's byte with the top bit flipped.
      const __m512 vinv = _mm512_set1_ps(inv);
      for (; k + 16 <= k1; k += 16) {
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + k), vinv));
        q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(s.xq.data() + m * s.Kp + k),
                         _mm_xor_si128(_mm512_cvtepi32_epi8(q), _mm_set1_epi8(static_cast<char>(0x80))));
      }
#endif
      for (; k < k1; ++k) {
        const float q = std::nearbyint(row[k] * inv);
        s.xq[m * s.Kp + k] = static_cast<uint8_t>(static_cast<int>(std::clamp(q, -127.0f, 127.0f)) + 128);
      }
    }
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// int32 sums of one block of kKB positions: rows x (4 vectors of 16 columns). With `pf`, each
// step also asks for two lines from there into L2 (see RunItem).
template <int rm>
__attribute__((always_inline)) inline void BlockSums(__m512i (&acc)[rm][4], const uint8_t* x, int64_t ldx,
                                                     const int8_t* w, const char* pf) {
  __m512i a[rm][4];
  for (int j = 0; j < rm; ++j)
    for (int v = 0; v < 4; ++v) a[j][v] = _mm512_setzero_si512();
#pragma GCC unroll 4
  for (int64_t g = 0; g < kKB / 4; ++g) {
    if (pf != nullptr) {
      _mm_prefetch(pf + g * 128, _MM_HINT_T1);
      _mm_prefetch(pf + g * 128 + 64, _MM_HINT_T1);
    }
    const __m512i w0 = _mm512_loadu_si512(w + g * 256), w1 = _mm512_loadu_si512(w + g * 256 + 64);
    const __m512i w2 = _mm512_loadu_si512(w + g * 256 + 128), w3 = _mm512_loadu_si512(w + g * 256 + 192);
    for (int j = 0; j < rm; ++j) {
      const __m512i xb = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x + j * ldx + g * 4));
      a[j][0] = _mm512_dpbusd_epi32(a[j][0], xb, w0);
      a[j][1] = _mm512_dpbusd_epi32(a[j][1], xb, w1);
      a[j][2] = _mm512_dpbusd_epi32(a[j][2], xb, w2);
      a[j][3] = _mm512_dpbusd_epi32(a[j][3], xb, w3);
    }
  }
  for (int j = 0; j < rm; ++j)
    for (int v = 0; v < 4; ++v) acc[j][v] = a[j][v];
}

template <int rm>
void Tile(const Shared& s, int64_t p, int64_t m0, const char* pf) {
  const int64_t ldy = s.P * kCols, groups = kKB / 4;
  const int8_t* panel = s.w + p * (s.Kp / 4) * kCols * 4;
  __m512 accf[rm][4];
  for (int j = 0; j < rm; ++j)
    for (int v = 0; v < 4; ++v) accf[j][v] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < s.nkb; ++kb) {
    __m512i acci[rm][4];
    BlockSums<rm>(acci, s.xq.data() + m0 * s.Kp + kb * kKB, s.Kp, panel + kb * groups * kCols * 4,
                  pf == nullptr ? nullptr : pf + kb * groups * 128);
    const int32_t* cs = s.colsum + kb * ldy + p * kCols;
    for (int v = 0; v < 4; ++v) {
      const __m512i corr = _mm512_loadu_si512(cs + v * 16);
      for (int j = 0; j < rm; ++j) {
        const __m512 xs = _mm512_set1_ps(s.xs[(m0 + j) * s.nkb + kb]);
        accf[j][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acci[j][v], corr)), xs, accf[j][v]);
      }
    }
  }
  for (int v = 0; v < 4; ++v) {
    const __m512 sv = _mm512_loadu_ps(s.scale + p * kCols + v * 16);
    for (int j = 0; j < rm; ++j)
      _mm512_storeu_ps(s.y + (m0 + j) * ldy + p * kCols + v * 16, _mm512_mul_ps(accf[j][v], sv));
  }
}
#else
template <int rm>
void Tile(const Shared& s, int64_t p, int64_t m0, const char*) {
  const int64_t ldy = s.P * kCols;
  const int8_t* panel = s.w + p * (s.Kp / 4) * kCols * 4;
  for (int j = 0; j < rm; ++j)
    for (int64_t c = 0; c < kCols; ++c) {
      float total = 0.0f;
      for (int64_t kb = 0; kb < s.nkb; ++kb) {
        int32_t dot = 0;
        for (int64_t k = kb * kKB; k < (kb + 1) * kKB; ++k)
          dot += static_cast<int32_t>(s.xq[(m0 + j) * s.Kp + k]) * panel[((k / 4) * kCols + c) * 4 + k % 4];
        dot -= s.colsum[kb * ldy + p * kCols + c];
        total += static_cast<float>(dot) * s.xs[(m0 + j) * s.nkb + kb];
      }
      s.y[(m0 + j) * ldy + p * kCols + c] = total * s.scale[p * kCols + c];
    }
}
#endif

// `next` is the item this thread runs after this one (-1: none). At decode's few rows the
// first row tile of a panel waits on memory and the later ones compute from cache, so the
// later ones ask for the next item's panel meanwhile: the second and third tiles half of it
// each (PanelAhead; two lines a step, into L2; docs/PERFORMANCE.md has what each choice
// measured). Prefill (many row blocks) is compute-bound and skips it.
void RunItem(const Shared& s, int64_t item, int64_t next) {
  const int64_t p = item / s.blocks, m_begin = (item % s.blocks) * kRowBlock;
  const int64_t m_end = std::min(s.M, m_begin + kRowBlock);
  const int64_t panel_bytes = (s.Kp / 4) * kCols * 4;  // a tile's steps ask for half of it
  PanelAhead pf(next >= 0 && s.blocks == 1 ? s.w + (next / s.blocks) * panel_bytes : nullptr, panel_bytes);
  int64_t m = m_begin;
  for (; m + kRM <= m_end; m += kRM) Tile<kRM>(s, p, m, pf());
  switch (m_end - m) {
    case 1: Tile<1>(s, p, m, pf()); break;
    case 2: Tile<2>(s, p, m, pf()); break;
    default: break;
  }
}

ffi::Error MatmulW8A8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                          ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::S32> colsum,
                          ffi::Buffer<ffi::S32> live, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions(), cd = colsum.dimensions();
  if (xd.size() != 2 || wd.size() != 4 || yd.size() != 2 || cd.size() != 2 || wd[2] != kCols ||
      wd[3] != 4 || (wd[1] * 4) % kKB != 0 || xd[1] > wd[1] * 4 || yd[0] != xd[0] ||
      yd[1] != wd[0] * kCols || cd[0] != wd[1] * 4 / kKB || cd[1] != yd[1] ||
      scale.element_count() != static_cast<size_t>(yd[1]) || live.element_count() != 1)
    return ffi::Error::InvalidArgument("w8a8 matmul: inconsistent shapes");
  auto shared = std::make_shared<Shared>();
  Shared& s = *shared;
  s.x = x.typed_data();
  s.w = w.typed_data();
  UseHugePages(s.w, w.size_bytes());
  s.scale = scale.typed_data();
  s.colsum = colsum.typed_data();
  s.y = y->typed_data();
  s.M = LiveRows(s.y, xd[0], yd[1], live.typed_data());
  s.K = xd[1];
  s.Kp = wd[1] * 4;
  s.P = wd[0];
  s.nkb = s.Kp / kKB;
  s.blocks = (s.M + kRowBlock - 1) / kRowBlock;
  const int64_t count = s.P * s.blocks;
  if (count == 0) return ffi::Error::Success();
  QuantizeRows(s);
  ShareWork(pool, shared, count, [count](Shared& state) {
    TakeItemsAhead(state, count, [&](int64_t i, int64_t next) { RunItem(state, i, next); });
  });
  return ffi::Error::Success();
}

}  // namespace

// 1 when this build multiplies with AVX512-VNNI, 0 when it falls back to scalar code.
extern "C" int32_t XlaserveInt8DotNative() { return kNative ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaserveMatmulW8A8, MatmulW8A8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
