// Decode attention on the CPU: one query token per batch row against that row's KV cache.
//
// XLA's CPU backend runs this as a batched dot over (rows x kv heads) tiny matrices, each
// one an Eigen call: about 16 us apiece, so at 16 rows the attention of a 135M model took
// longer than all its matmuls together. Here each (row, kv head) pair is one work item: it
// streams that row's keys and values once, for all the query heads that share the kv head,
// and reads only the positions the row has (not a padded span).
//
//   q     (B, N, H)     f32   this step's queries, rope applied
//   k, v  (R, S, K, H)  f32   the layer's cache (this step's K/V already written)
//   rows  (B,)          s32   cache row of each batch row; out of range: a padding row
//   lens  (B,)          s32   positions 0 .. lens-1 are attended
//   out   (B, N, H)     f32   zeros for padding rows
//
// Work items are shared between the calling thread and helpers scheduled on XLA's intra-op
// thread pool through an atomic counter; the caller returns once every item is done, so a
// helper that starts late finds nothing left and only drops its reference to the state.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  const int32_t* rows;
  const int32_t* lens;
  float* out;
  int64_t B, N, K, H, R, S;
};

void RunItem(const Problem& p, int64_t item, std::vector<float>& scores) {
  const int64_t b = item / p.K, kh = item % p.K, G = p.N / p.K, H = p.H;
  float* out = p.out + (b * p.N + kh * G) * H;
  std::fill(out, out + G * H, 0.0f);
  const int64_t row = p.rows[b];
  const int64_t len = std::min<int64_t>(p.lens[b], p.S);
  if (row < 0 || row >= p.R || len <= 0) return;

  const float* q = p.q + (b * p.N + kh * G) * H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  const int64_t stride = p.K * H;  // between consecutive positions of one kv head
  const float* keys = p.k + (row * p.S * p.K + kh) * H;
  const float* values = p.v + (row * p.S * p.K + kh) * H;

  scores.resize(G * len);
  for (int64_t s = 0; s < len; ++s) {
    const float* key = keys + s * stride;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * H;
      float dot = 0.0f;
      for (int64_t h = 0; h < H; ++h) dot += qg[h] * key[h];
      scores[g * len + s] = dot * scale;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores.data() + g * len;
    const float m = *std::max_element(sg, sg + len);
    float total = 0.0f;
    for (int64_t s = 0; s < len; ++s) {
      sg[s] = std::exp(sg[s] - m);
      total += sg[s];
    }
    const float inv = 1.0f / total;
    for (int64_t s = 0; s < len; ++s) sg[s] *= inv;
  }
  for (int64_t s = 0; s < len; ++s) {
    const float* value = values + s * stride;
    for (int64_t g = 0; g < G; ++g) {
      const float w = scores[g * len + s];
      float* og = out + g * H;
      for (int64_t h = 0; h < H; ++h) og[h] += w * value[h];
    }
  }
}

struct Shared {
  Problem problem;
  int64_t items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void Drain(Shared& shared) {
  std::vector<float> scores;
  int64_t finished = 0;
  for (int64_t i; (i = shared.next.fetch_add(1)) < shared.items; ++finished)
    RunItem(shared.problem, i, scores);
  shared.done.fetch_add(finished, std::memory_order_release);
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> lens,
                               ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions();
  auto vd = v.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || !std::equal(kd.begin(), kd.end(), vd.begin()) || qd[2] != kd[3] ||
      qd[1] % kd[2] != 0 || rows.element_count() != static_cast<size_t>(qd[0]) ||
      lens.element_count() != static_cast<size_t>(qd[0]))
    return ffi::Error::InvalidArgument("decode attention: inconsistent shapes");

  auto shared = std::make_shared<Shared>();
  shared->problem = Problem{q.typed_data(), k.typed_data(), v.typed_data(), rows.typed_data(),
                            lens.typed_data(), out->typed_data(),
                            qd[0], qd[1], kd[2], qd[2], kd[0], kd[1]};
  shared->items = qd[0] * kd[2];
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), shared->items) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { Drain(*shared); });
  Drain(*shared);
  // The items still out are running on helpers; each is short (one row's keys and values).
  while (shared->done.load(std::memory_order_acquire) < shared->items) std::this_thread::yield();
  return ffi::Error::Success();
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
                                  .Ret<ffi::Buffer<ffi::F32>>());
