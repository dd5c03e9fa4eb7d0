// Attention on the CPU: one query token per batch row against its sequence's KV, read from a
// paged pool through the sequence's block table. Decode steps have a row per sequence; a
// prefill chunk's T queries are T rows of one sequence.
//
// XLA's CPU backend runs this as a batched dot over (rows x kv heads) tiny matrices, each
// one an Eigen call: about 16 us apiece, so at 16 rows the attention of a 135M model took
// longer than all its matmuls together. Here a work item is one (block of rows, piece of
// positions): it streams those keys and values once, widened to float32 a block of
// positions at a time for all the query heads that share them, and only positions the rows
// have (not a padded span). A block of rows is one decode row, or up to 16 consecutive
// queries of a prefill chunk, which then share the pass over their common context.
//
//   q     (B, N, H)     f32   this step's queries, rope applied
//   k, v  (NB, BS, K, H) f32  the layer's block pool (this step's K/V already written); or
//                            u16 holding bfloat16 bits (a second entry point), widened as
//                            loaded; (NB, BS, K, H + 4) s8 for int8 (a third): each
//                            position's head is H values and the float32 bytes of their scale
//                            (value = int8 * scale)
//   rows  (B,)          s32   block-table row (the sequence) of each batch row; out of range:
//                            a padding row
//   lens  (B,)          s32   positions starts .. lens-1 are attended (the keys before a
//   starts (B,)         s32   row's start, its sliding window's, are never read). A query
//                            usually sees up to its own position; one inside an image that
//                            attends both ways sees up to the image's last position.
//   tables (R, MB)      s32   each sequence's blocks: position p is at offset p % BS of block
//                            tables[row, p / BS]
//   out   (B, N, H)     f32   zeros for padding rows
// Work items start at a block boundary and every inner block of positions lies in one block of
// the pool (BS is a multiple of 16), so the passes below stream a block's positions as before
// and only look the block up where a new one starts.
// Attributes: scale (scores are q.k * scale), softcap (> 0: scores become
// softcap * tanh(scores / softcap) before the softmax).
//
// Work items are shared between the calling thread and helpers scheduled on XLA's intra-op
// thread pool through an atomic counter; the caller returns once every item is done, so a
// helper that starts late finds nothing left and only drops its reference to the state.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Positions per work item, at most. A long row is split into pieces whose partial softmax
// results (max, sum, unnormalised output) are merged afterwards, so one row at a long
// context still keeps every core busy; few short rows are split finer for the same reason.
constexpr int64_t kMaxPiece = 512, kMinPiece = 64;
constexpr int64_t kQueryBlock = 16;  // queries of a prefill chunk per item

// How a cache element type stores one position's head: float and bfloat16 hold H values;
// int8 holds H values, then the 4 bytes of a float32 scale.
template <typename T>
struct Stored {
  static constexpr int64_t kExtra = 0;
  static float Scale(const T*, int64_t) { return 1.0f; }
};
template <>
struct Stored<int8_t> {
  static constexpr int64_t kExtra = 4;
  static float Scale(const int8_t* head, int64_t H) {
    float scale;
    __builtin_memcpy(&scale, head + H, sizeof(scale));
    return scale;
  }
};

template <typename T>  // cache element: float, uint16_t holding bfloat16, or int8 (see Stored)
struct Problem {
  const float* q;
  const T* k;
  const T* v;
  const int32_t* rows;
  const int32_t* lens;
  const int32_t* starts;
  const int32_t* tables;
  float* out;
  int64_t B, N, K, H, R, MB, BS;
  float scale, softcap;
  int64_t stride;  // entries between consecutive positions: K * (H + extra)

  // Position `pos` of table row `row` in the cache `base` (k or v).
  const T* At(const T* base, int64_t row, int64_t pos) const {
    return base + (static_cast<int64_t>(tables[row * MB + pos / BS]) * BS + pos % BS) * stride;
  }
};


// Batch rows b .. b + nb - 1 (a block of a prefill chunk's queries on one cache row at
// consecutive positions, or one row), cache positions [begin, end) clipped to each row's length.
struct Item {
  int64_t b, nb, begin, end;
  float* partial;  // nb x N x (H + 2): unnormalised output, then max and sum, per query head
};

// Positions of row b that item `it` covers.
template <typename T>
inline int64_t Covered(const Problem<T>& p, const Item& it, int64_t b) {
  return std::max<int64_t>(0, std::min<int64_t>(it.end, p.lens[b]) - it.begin);
}

// Row b's first attended position: the start of its window.
template <typename T>
inline int64_t First(const Problem<T>& p, int64_t b) {
  return std::clamp<int64_t>(p.starts[b], 0, p.lens[b]);
}

// Positions at the start of item `it` that lie before row b's window: never read for b.
template <typename T>
inline int64_t Skipped(const Problem<T>& p, const Item& it, int64_t b) {
  return std::max<int64_t>(0, First(p, b) - it.begin);
}

inline float ToFloat(float x) { return x; }
inline float ToFloat(int8_t x) { return static_cast<float>(x); }
inline float ToFloat(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float out;
  __builtin_memcpy(&out, &bits, sizeof(out));
  return out;
}
inline float Sum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < kVW; ++i) s += v[i];
  return s;
}

// exp(x) for x <= 0 (a score minus its row's max), to about 2 ulp: x = n ln2 + r with
// |r| <= ln2/2, a degree-6 polynomial for exp(r), and 2^n put into the exponent bits.
inline vf Exp(vf x) {
  x = x < -87.0f ? vf{} - 87.0f : x;
  const vf n = __builtin_convertvector(__builtin_convertvector(x * 1.44269504f + (x < 0 ? -0.5f : 0.5f), vi), vf);
  const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = vf{} + 1.3888889e-3f;
  p = p * r + 8.3333333e-3f;
  p = p * r + 4.1666667e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Horizontal sums of kVW vectors at once: out lane i = sum of v[i]'s lanes. Each level adds
// the two halves of every segment of pairs of vectors, halving the vectors and the segment
// width, so kVW sums cost kVW - 1 adds (and twice as many shuffles), not kVW trees.
template <int h, size_t... I>
inline vf Lo(vf x, vf y, std::index_sequence<I...>) {
  return __builtin_shufflevector(x, y, static_cast<int>((I / h) * 2 * h + I % h)...);
}
template <int h, size_t... I>
inline vf Hi(vf x, vf y, std::index_sequence<I...>) {
  return __builtin_shufflevector(x, y, static_cast<int>((I / h) * 2 * h + I % h + h)...);
}
template <int h>
inline void SumLevels(vf* v, int count) {
  constexpr auto lanes = std::make_index_sequence<kVW>{};
  for (int i = 0; i < count / 2; ++i)
    v[i] = Lo<h>(v[2 * i], v[2 * i + 1], lanes) + Hi<h>(v[2 * i], v[2 * i + 1], lanes);
  if constexpr (h > 1) SumLevels<h / 2>(v, count / 2);
}

// Positions per block: a block's keys (then values) are widened to float32 once into a scratch
// buffer that stays in L1 while every query head of the block reads it.
constexpr int64_t kBlock = kVW;
constexpr int64_t kValueBlock = 2 * kVW;
constexpr int64_t kAhead = 3;  // blocks

// A block of n <= kB positions x kv heads x H as float32 rows of `stride` floats: the cache
// itself when it is float32 and the block is whole, else widened into buf. Rows past n are
// left as they are: scores past a row's length are overwritten, values past it never read.
template <int64_t kB>
inline const float* Widened(const float* src, int64_t n, int64_t stride, float* buf) {
  if (n == kB) return src;
  std::copy(src, src + n * stride, buf);
  return buf;
}
template <int64_t kB>
inline const float* Widened(const uint16_t* src, int64_t n, int64_t stride, float* buf) {
  int64_t i = 0;
  for (; i + kVW <= n * stride; i += kVW) Store(buf + i, Load(src + i));
  for (; i < n * stride; ++i) buf[i] = ToFloat(src[i]);
  return buf;
}

// Scores of one query head against kVW keys: dot(s) is key s's products summed into one
// vector. Every key is its own chain of FMAs, so the kVW chains overlap instead of waiting on
// one another; the horizontal sums then come from one shuffle tree.
template <typename Dot>
__attribute__((always_inline)) inline vf ScoresOf(Dot dot) {
  vf dots[kVW];
#pragma GCC unroll 16
  for (int s = 0; s < kVW; ++s) dots[s] = dot(s);
  SumLevels<kVW / 2>(dots, kVW);
  return dots[0];
}

// Against float32 keys `stride` floats apart, or int8 ones `stride` bytes apart (their scales
// applied by the caller); qh is C vectors.
template <int C, typename E>
inline vf Scores(const float* qh, const E* keys, int64_t stride) {
  vf qv[C];
  for (int c = 0; c < C; ++c) qv[c] = Load(qh + c * kVW);
  return ScoresOf([&](int s) __attribute__((always_inline)) {
    vf d = qv[0] * Load(keys + s * stride);
    for (int c = 1; c < C; ++c) d += qv[c] * Load(keys + s * stride + c * kVW);
    return d;
  });
}

// out[0..C) += sum over positions s < n of w[s] * (position s's values), with two sets of
// accumulators (even and odd positions) so the FMA chains keep both units busy. add(acc, ws, s)
// adds the broadcast weight ws times position s's values into acc[0..C).
template <int C, typename Add>
__attribute__((always_inline)) inline void WeightedOf(const float* w, int64_t n, float* out, Add add) {
  vf a[C], b[C];
  for (int c = 0; c < C; ++c) a[c] = Load(out + c * kVW), b[c] = vf{};
  int64_t s = 0;
  for (; s + 2 <= n; s += 2) {
    add(a, vf{} + w[s], s);
    add(b, vf{} + w[s + 1], s + 1);
  }
  if (s < n) add(a, vf{} + w[s], s);
  for (int c = 0; c < C; ++c) Store(out + c * kVW, a[c] + b[c]);
}

// Over float32 values `stride` floats apart.
template <int C>
inline void Weighted(const float* w, const float* values, int64_t n, int64_t stride, float* out) {
  WeightedOf<C>(w, n, out, [&](vf* acc, vf ws, int64_t s) __attribute__((always_inline)) {
    for (int c = 0; c < C; ++c) acc[c] += ws * Load(values + s * stride + c * kVW);
  });
}

// Over int8 values read straight from the cache, `stride` bytes apart, each position's
// weight times its scale.
template <int C>
inline void Weighted(const float* w, const int8_t* values, int64_t n, int64_t stride, float* out) {
  WeightedOf<C>(w, n, out, [&](vf* acc, vf ws, int64_t s) __attribute__((always_inline)) {
    const vf wv = ws * Stored<int8_t>::Scale(values + s * stride, C * kVW);
    for (int c = 0; c < C; ++c) acc[c] += wv * Load(values + s * stride + c * kVW);
  });
}

// bfloat16 without widening: a vector of 32-bit lanes loaded from 2 * kVW bfloat16 values
// holds each even position's bits in its low half and each odd one's in its high half, so a
// shift gives the even positions as float32 and a mask the odd ones, exactly. Dot products
// then take the other operand in that order (even dims, then odd, per 2 * kVW), and the
// value pass keeps its sums in it, put back in order at the end. This spares the pass that
// widened every block into a scratch buffer (as many instructions as the products it fed).
inline vu LoadPairs(const uint16_t* p) { return *reinterpret_cast<const vuu*>(p); }
inline vf Even(vu bits) { return reinterpret_cast<vf>(bits << 16); }
inline vf Odd(vu bits) { return reinterpret_cast<vf>(bits & 0xFFFF0000u); }

// x (H floats) in the order above: per 2 * kVW, the even entries, then the odd ones.
inline void ToPairOrder(const float* x, int64_t H, float* out) {
  for (int64_t c = 0; c < H; c += 2 * kVW)
    for (int64_t i = 0; i < kVW; ++i) out[c + i] = x[c + 2 * i], out[c + kVW + i] = x[c + 2 * i + 1];
}
inline void FromPairOrder(const float* x, int64_t H, float* out) {
  for (int64_t c = 0; c < H; c += 2 * kVW)
    for (int64_t i = 0; i < kVW; ++i) out[c + 2 * i] = x[c + i], out[c + 2 * i + 1] = x[c + kVW + i];
}

// Scores against bfloat16 keys read straight from the cache; qh in pair order.
template <int C>
inline vf ScoresPairs(const float* qh, const uint16_t* keys, int64_t stride) {
  vf qv[C];
  for (int c = 0; c < C; ++c) qv[c] = Load(qh + c * kVW);
  return ScoresOf([&](int s) __attribute__((always_inline)) {
    const vu k0 = LoadPairs(keys + s * stride);
    vf d = qv[0] * Even(k0) + qv[1] * Odd(k0);
    for (int c = 2; c < C; c += 2) {
      const vu kc = LoadPairs(keys + s * stride + c * kVW);
      d += qv[c] * Even(kc);
      d += qv[c + 1] * Odd(kc);
    }
    return d;
  });
}

// Over bfloat16 values read straight from the cache; out in pair order.
template <int C>
inline void WeightedPairs(const float* w, const uint16_t* values, int64_t n, int64_t stride, float* out) {
  WeightedOf<C>(w, n, out, [&](vf* acc, vf ws, int64_t s) __attribute__((always_inline)) {
    for (int c = 0; c < C; c += 2) {
      const vu x = LoadPairs(values + s * stride + c * kVW);
      acc[c] += ws * Even(x);
      acc[c + 1] += ws * Odd(x);
    }
  });
}

// An item's rows (one, or a block of queries sharing a cache row), its positions, every head,
// for H == C * kVW. Both passes walk positions in blocks and read each block's keys (then
// values) for all kv heads together: they are contiguous in the cache, so the reads stream,
// and a block widened once serves every query of the item.
template <int C, typename T>
void RunItem(const Problem<T>& p, const Item& it, std::vector<float>& scores, std::vector<float>& acc,
             std::vector<float>& buf) {
  const int64_t G = p.N / p.K, H = C * kVW, N = p.N;
  const int64_t row = p.rows[it.b];
  const float scale = p.scale;
  const int64_t stride = p.K * (H + Stored<T>::kExtra);  // between consecutive positions
  const int64_t wide = p.K * H;  // the same in a block widened to float32
  int64_t n = 0;  // positions of the item's longest row
  for (int64_t i = 0; i < it.nb; ++i) n = std::max(n, Covered(p, it, it.b + i));
  const int64_t padded = (n + kBlock - 1) / kBlock * kBlock;
  // Position s of the item (from it.begin) in the keys or values: a block [s, s + count) of
  // the passes below never crosses a block of the pool.
  auto key_at = [&](int64_t s) { return p.At(p.k, row, it.begin + s); };
  auto value_at = [&](int64_t s) { return p.At(p.v, row, it.begin + s); };
  // The value pass's blocks: kValueBlock positions where the pool's blocks hold whole ones.
  const int64_t vstep = p.BS % kValueBlock == 0 ? kValueBlock : kBlock;
  scores.resize(it.nb * N * padded);  // scores[(query * N + head) * padded + position]
  acc.assign(it.nb * N * H, 0.0f);
  // bfloat16 with an even C: products straight from the cache, queries in pair order (in
  // buf, then the item's last partial block of keys, copied so no read passes the cache).
  // int8: products straight from the cache too (widened as loaded), each key's scale applied
  // to its score and each value's to its weight.
  constexpr bool pairs = std::is_same_v<T, uint16_t> && C % 2 == 0;
  constexpr bool bytes = std::is_same_v<T, int8_t>;
  const int64_t hs = H + Stored<T>::kExtra;  // entries per head in the cache
  const int64_t qfloats = pairs ? it.nb * N * H : 0;
  const int64_t block_floats = std::max(kBlock, kValueBlock) * wide;
  buf.resize(qfloats + block_floats + (bytes ? p.K * kVW : 0));
  float* key_scales = buf.data() + qfloats + block_floats;
  if constexpr (pairs)
    for (int64_t qh = 0; qh < it.nb * N; ++qh) ToPairOrder(p.q + it.b * N * H + qh * H, H, buf.data() + qh * H);
  constexpr int64_t line = 64 / sizeof(T);
  // The first blocks, before the loops below take over.
  for (int64_t s = 0; s < std::min<int64_t>(n, kAhead * kBlock); s += kBlock)
    for (int64_t l = 0; l < std::min<int64_t>(kBlock, n - s) * stride; l += line) __builtin_prefetch(key_at(s) + l, 0, 2);
  for (int64_t s = 0; s < n; s += kBlock) {
    const int64_t count = std::min<int64_t>(kBlock, n - s);
    // Keys kAhead blocks on are asked for a few lines per head, spread through the block's
    // work so the requests never queue up.
    const int64_t lines = std::max<int64_t>(0, std::min<int64_t>(kBlock, n - s - kAhead * kBlock)) * stride / line;
    const T* next = lines > 0 ? key_at(s + kAhead * kBlock) : nullptr;
    const float* kb = nullptr;
    const T* kraw = key_at(s);
    if constexpr (pairs || bytes) {
      if (count < kBlock) {
        T* tail = reinterpret_cast<T*>(buf.data() + qfloats);
        std::copy(kraw, kraw + count * stride, tail);
        kraw = tail;
      }
    } else {
      kb = Widened<kBlock>(kraw, count, wide, buf.data());
    }
    // int8: the block's key scales, kVW per kv head.
    if constexpr (bytes)
      for (int64_t kh = 0; kh < p.K; ++kh)
        for (int k = 0; k < kVW; ++k) key_scales[kh * kVW + k] = Stored<T>::Scale(kraw + k * stride + kh * hs, H);
    for (int64_t i = 0; i < it.nb; ++i) {
      if (s >= Covered(p, it, it.b + i) || s + count <= Skipped(p, it, it.b + i)) continue;
      for (int64_t head = 0; head < N; ++head) {
        if (i == it.nb - 1)
          for (int64_t l = head * lines / N; l < (head + 1) * lines / N; ++l) __builtin_prefetch(next + l * line, 0, 2);
        vf dots;
        if constexpr (pairs) {
          dots = ScoresPairs<C>(buf.data() + (i * N + head) * H, kraw + (head / G) * H, stride);
        } else if constexpr (bytes) {
          dots = Scores<C>(p.q + ((it.b + i) * N + head) * H, kraw + (head / G) * hs, stride) *
                 Load(key_scales + (head / G) * kVW);
        } else {
          dots = Scores<C>(p.q + ((it.b + i) * N + head) * H, kb + (head / G) * H, wide);
        }
        Store(scores.data() + (i * N + head) * padded + s, dots * scale);
      }
    }
  }
  for (int64_t i = 0; i < it.nb; ++i) {
    const int64_t ni = Covered(p, it, it.b + i), pi = (ni + kVW - 1) / kVW * kVW;
    // Positions before the query's window: scores of -inf in the vector its window starts in,
    // and no vectors before it.
    const int64_t lo = Skipped(p, it, it.b + i), first = lo / kVW * kVW;
    for (int64_t head = 0; head < N; ++head) {
      float* sh = scores.data() + (i * N + head) * padded;
      float* part = it.partial + (i * N + head) * (H + 2);
      if (lo >= ni) {  // no positions here: a piece past this query's length or before its window
        part[H] = -INFINITY;
        part[H + 1] = 0.0f;
        continue;
      }
      if (p.softcap > 0.0f)
        for (int64_t s = lo; s < ni; ++s) sh[s] = p.softcap * std::tanh(sh[s] / p.softcap);
      std::fill(sh + first, sh + lo, -INFINITY);
      std::fill(sh + ni, sh + pi, -INFINITY);
      vf top = Load(sh + first);
      for (int64_t s = first + kVW; s < pi; s += kVW) {
        const vf x = Load(sh + s);
        top = x > top ? x : top;
      }
      float m = top[0];
      for (int l = 1; l < kVW; ++l) m = std::max(m, top[l]);
      vf total = vf{};
      for (int64_t s = first; s < pi; s += kVW) {
        const vf e = Exp(Load(sh + s) - m);
        Store(sh + s, e);
        total += e;
      }
      part[H] = m;
      part[H + 1] = Sum(total);
    }
  }
  for (int64_t s = 0; s < std::min<int64_t>(n, kAhead * vstep); s += vstep)
    for (int64_t l = 0; l < std::min<int64_t>(vstep, n - s) * stride; l += line) __builtin_prefetch(value_at(s) + l, 0, 2);
  for (int64_t s = 0; s < n; s += vstep) {
    const int64_t count = std::min<int64_t>(vstep, n - s);
    const int64_t lines = std::max<int64_t>(0, std::min<int64_t>(vstep, n - s - kAhead * vstep)) * stride / line;
    const T* next = lines > 0 ? value_at(s + kAhead * vstep) : nullptr;
    const T* values = value_at(s);  // position s + j at values + j * stride
    const float* vb = nullptr;
    if constexpr (!pairs && !bytes) vb = Widened<kValueBlock>(values, count, wide, buf.data());
    for (int64_t i = 0; i < it.nb; ++i) {
      // This block's positions [s + off, s + ci) for query i: from its window's start.
      const int64_t off = std::max<int64_t>(0, Skipped(p, it, it.b + i) - s);
      const int64_t ci = std::min<int64_t>(count, Covered(p, it, it.b + i) - s);
      if (ci <= off) continue;
      for (int64_t head = 0; head < N; ++head) {
        if (i == it.nb - 1)
          for (int64_t l = head * lines / N; l < (head + 1) * lines / N; ++l) __builtin_prefetch(next + l * line, 0, 2);
        const float* w = scores.data() + (i * N + head) * padded + s + off;
        float* a = acc.data() + (i * N + head) * H;
        if constexpr (pairs)
          WeightedPairs<C>(w, values + off * stride + (head / G) * H, ci - off, stride, a);
        else if constexpr (bytes)
          Weighted<C>(w, values + off * stride + (head / G) * hs, ci - off, stride, a);
        else
          Weighted<C>(w, vb + off * wide + (head / G) * H, ci - off, wide, a);
      }
    }
  }
  for (int64_t qh = 0; qh < it.nb * N; ++qh) {
    if constexpr (pairs)
      FromPairOrder(acc.data() + qh * H, H, it.partial + qh * (H + 2));
    else
      std::copy(acc.data() + qh * H, acc.data() + (qh + 1) * H, it.partial + qh * (H + 2));
  }
}

// The same for a head size that is not a multiple of the vector width.
template <typename T>
void RunItemScalar(const Problem<T>& p, const Item& it, std::vector<float>& scores) {
  const int64_t G = p.N / p.K, H = p.H;
  const int64_t row = p.rows[it.b];
  const float scale = p.scale;
  const int64_t hs = H + Stored<T>::kExtra;
  for (int64_t i = 0; i < it.nb; ++i) {
    const int64_t n = Covered(p, it, it.b + i), lo = std::min(n, Skipped(p, it, it.b + i));
    scores.resize(std::max<int64_t>(1, n));
    for (int64_t kh = 0; kh < p.K; ++kh) {
      const float* q = p.q + ((it.b + i) * p.N + kh * G) * H;
      for (int64_t g = 0; g < G; ++g) {
        float* part = it.partial + ((i * p.N) + kh * G + g) * (H + 2);
        std::fill(part, part + H, 0.0f);
        float m = -INFINITY, total = 0.0f;
        for (int64_t s = lo; s < n; ++s) {
          const T* key = p.At(p.k, row, it.begin + s) + kh * hs;
          float dot = 0.0f;
          for (int64_t h = 0; h < H; ++h) dot += q[g * H + h] * ToFloat(key[h]);
          scores[s] = dot * Stored<T>::Scale(key, H) * scale;
          if (p.softcap > 0.0f) scores[s] = p.softcap * std::tanh(scores[s] / p.softcap);
          m = std::max(m, scores[s]);
        }
        for (int64_t s = lo; s < n; ++s) {
          const float w = std::exp(scores[s] - m);
          total += w;
          const T* value = p.At(p.v, row, it.begin + s) + kh * hs;
          const float ws = w * Stored<T>::Scale(value, H);
          for (int64_t h = 0; h < H; ++h) part[h] += ws * ToFloat(value[h]);
        }
        part[H] = m;
        part[H + 1] = total;
      }
    }
  }
}

template <typename T>
struct Shared {
  Problem<T> problem;
  std::vector<Item> items;
  std::vector<float> partials;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// The vector path for a head size of C vectors; 0 where there is none (scalar path).
template <typename T>
using ItemFn = void (*)(const Problem<T>&, const Item&, std::vector<float>&, std::vector<float>&,
                        std::vector<float>&);
template <typename T>
ItemFn<T> VectorItem(int64_t H) {
  if (H % kVW != 0) return nullptr;
  switch (H / kVW) {
    case 1: return RunItem<1, T>;
    case 2: return RunItem<2, T>;
    case 3: return RunItem<3, T>;
    case 4: return RunItem<4, T>;
    case 5: return RunItem<5, T>;
    case 6: return RunItem<6, T>;
    case 8: return RunItem<8, T>;
    case 16: return RunItem<16, T>;
    default: return nullptr;
  }
}

template <typename T>
void Drain(Shared<T>& shared) {
  std::vector<float> scores, acc, buf;
  const ItemFn<T> vector_item = VectorItem<T>(shared.problem.H);
  TakeItems(shared, static_cast<int64_t>(shared.items.size()), [&](int64_t i) {
    if (vector_item != nullptr)
      vector_item(shared.problem, shared.items[i], scores, acc, buf);
    else
      RunItemScalar(shared.problem, shared.items[i], scores);
  });
}

// Merge the pieces of every row into the output: the items of one block of rows are
// consecutive, one per piece of positions.
template <typename T>
void Combine(const Shared<T>& shared) {
  const Problem<T>& p = shared.problem;
  const int64_t H = p.H;
  std::fill(p.out, p.out + p.B * p.N * H, 0.0f);
  size_t i = 0;
  while (i < shared.items.size()) {
    size_t j = i;
    const Item& first = shared.items[i];
    while (j < shared.items.size() && shared.items[j].b == first.b) ++j;
    for (int64_t qh = 0; qh < first.nb * p.N; ++qh) {
      float m = -INFINITY;
      for (size_t t = i; t < j; ++t) m = std::max(m, shared.items[t].partial[qh * (H + 2) + H]);
      if (m == -INFINITY) continue;
      float total = 0.0f;
      float* out = p.out + (first.b * p.N + qh) * H;
      for (size_t t = i; t < j; ++t) {
        const float* part = shared.items[t].partial + qh * (H + 2);
        if (part[H + 1] == 0.0f) continue;
        const float w = std::exp(part[H] - m);
        total += w * part[H + 1];
        for (int64_t h = 0; h < H; ++h) out[h] += w * part[h];
      }
      const float inv = 1.0f / total;
      for (int64_t h = 0; h < H; ++h) out[h] *= inv;
    }
    i = j;
  }
}

template <typename T, ffi::DataType D>
ffi::Error Attend(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<D> k, ffi::Buffer<D> v,
                  ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> lens, ffi::Buffer<ffi::S32> starts,
                  ffi::Buffer<ffi::S32> tables, ffi::ResultBuffer<ffi::F32> out, float scale, float softcap) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), td = tables.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || td.size() != 2 ||
      !std::equal(kd.begin(), kd.end(), vd.begin()) || qd[2] + Stored<T>::kExtra != kd[3] ||
      qd[1] % kd[2] != 0 || (kd[1] % 16 != 0 && td[1] != 1) ||
      rows.element_count() != static_cast<size_t>(qd[0]) ||
      lens.element_count() != static_cast<size_t>(qd[0]) || starts.element_count() != static_cast<size_t>(qd[0]))
    return ffi::Error::InvalidArgument("decode attention: inconsistent shapes");

  // The cache is read in full every step.
  UseHugePages(k.untyped_data(), k.size_bytes());
  UseHugePages(v.untyped_data(), v.size_bytes());
  auto shared = std::make_shared<Shared<T>>();
  Problem<T>& p = shared->problem;
  p = Problem<T>{q.typed_data(), reinterpret_cast<const T*>(k.untyped_data()),
                 reinterpret_cast<const T*>(v.untyped_data()), rows.typed_data(), lens.typed_data(),
                 starts.typed_data(), tables.typed_data(), out->typed_data(), qd[0], qd[1], kd[2], qd[2], td[0],
                 td[1], kd[1], scale, softcap, kd[2] * kd[3]};
  // Padding rows (row out of range) and empty rows get no items: their output stays zero.
  auto live_len = [&](int64_t b) {
    const int64_t row = p.rows[b];
    return row < 0 || row >= p.R ? int64_t{0} : std::max<int64_t>(0, std::min<int64_t>(p.lens[b], p.MB * p.BS));
  };
  // Every block a live row reads must be in the pool: a table entry past it would read
  // outside the buffer.
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t len = live_len(b);
    for (int64_t i = len > 0 ? First(p, b) / p.BS : 0; i < (len + p.BS - 1) / p.BS; ++i) {
      const int32_t block = p.tables[p.rows[b] * p.MB + i];
      if (block < 0 || block >= kd[0])
        return ffi::Error::InvalidArgument("decode attention: a block table names a block outside the pool");
    }
  }
  int64_t total = 0;
  for (int64_t b = 0; b < p.B; ++b) total += live_len(b) - (live_len(b) > 0 ? First(p, b) : 0);
  // About four items per thread, in pieces of kMinPiece..kMaxPiece positions.
  const int64_t threads = pool.num_threads() + 1;
  // Pieces of whole pool blocks, so every item starts at a block boundary.
  int64_t piece = std::clamp<int64_t>((total / (4 * threads) + kMinPiece - 1) / kMinPiece * kMinPiece,
                                      kMinPiece, kMaxPiece);
  piece = (piece + p.BS - 1) / p.BS * p.BS;
  // Blocks of rows: a prefill chunk's queries (same cache row, consecutive lengths) share
  // one pass over their keys and values, up to kQueryBlock at a time.
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (first row, rows)
  for (int64_t b = 0; b < p.B; ++b) {
    if (live_len(b) == 0) continue;
    if (!blocks.empty()) {
      auto& [b0, nb] = blocks.back();
      // (An image's tokens all see up to its end: equal lengths, then one more per token.)
      const int64_t grows = live_len(b) - live_len(b - 1);
      if (b0 + nb == b && nb < kQueryBlock && p.rows[b] == p.rows[b - 1] && (grows == 0 || grows == 1) &&
          p.starts[b] >= p.starts[b - 1]) {
        ++nb;
        continue;
      }
    }
    blocks.emplace_back(b, 1);
  }
  // Longest blocks first (a chunk's last queries see the most positions), so no thread is
  // left with a long item at the end.
  size_t partial_floats = 0;
  for (auto block = blocks.rbegin(); block != blocks.rend(); ++block) {
    const auto [b0, nb] = *block;
    const int64_t len = live_len(b0 + nb - 1);
    // From the pool block holding the window start of the block's first query (the
    // earliest): nothing before it is read.
    for (int64_t s = std::min(First(p, b0) / p.BS * p.BS, len); s < len; s += piece) {
      shared->items.push_back(Item{b0, nb, s, std::min(s + piece, len), nullptr});
      partial_floats += nb * p.N * (p.H + 2);
    }
  }
  shared->partials.resize(partial_floats);
  float* next_partial = shared->partials.data();
  for (Item& item : shared->items) {
    item.partial = next_partial;
    next_partial += item.nb * p.N * (p.H + 2);
  }

  const int64_t count = static_cast<int64_t>(shared->items.size());
  ShareWork(pool, shared, count, Drain<T>);  // items are short: at most kMaxPiece positions
  Combine(*shared);
  return ffi::Error::Success();
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> lens,
                               ffi::Buffer<ffi::S32> starts, ffi::Buffer<ffi::S32> tables,
                               ffi::ResultBuffer<ffi::F32> out, float scale, float softcap) {
  return Attend<float>(pool, q, k, v, rows, lens, starts, tables, out, scale, softcap);
}

ffi::Error DecodeAttentionBf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                                   ffi::Buffer<ffi::U16> k, ffi::Buffer<ffi::U16> v,
                                   ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> lens,
                                   ffi::Buffer<ffi::S32> starts, ffi::Buffer<ffi::S32> tables,
                                   ffi::ResultBuffer<ffi::F32> out, float scale, float softcap) {
  return Attend<uint16_t>(pool, q, k, v, rows, lens, starts, tables, out, scale, softcap);
}

ffi::Error DecodeAttentionInt8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                                   ffi::Buffer<ffi::S8> k, ffi::Buffer<ffi::S8> v,
                                   ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> lens,
                                   ffi::Buffer<ffi::S32> starts, ffi::Buffer<ffi::S32> tables,
                                   ffi::ResultBuffer<ffi::F32> out, float scale, float softcap) {
  return Attend<int8_t>(pool, q, k, v, rows, lens, starts, tables, out, scale, softcap);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaserveDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaserveDecodeAttentionBf16, DecodeAttentionBf16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaserveDecodeAttentionInt8, DecodeAttentionInt8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));
