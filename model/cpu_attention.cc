// Decode attention on the CPU: one query token per batch row against that row's KV cache.
//
// XLA's CPU backend runs this as a batched dot over (rows x kv heads) tiny matrices, each
// one an Eigen call: about 16 us apiece, so at 16 rows the attention of a 135M model took
// longer than all its matmuls together. Here a work item is one (row, kv head, piece of
// positions): it streams those keys and values once, for all the query heads that share the
// kv head, and only positions the row has (not a padded span).
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
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Positions per work item. A long row is split into pieces whose partial softmax results
// (max, sum, unnormalised output) are merged afterwards, so one row at a long context still
// keeps every core busy.
constexpr int64_t kPiece = 512;

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  const int32_t* rows;
  const int32_t* lens;
  float* out;
  int64_t B, N, K, H, R, S;
};

struct Item {
  int64_t b, kh, begin, end;
  float* partial;  // G x (H + 2): unnormalised output, then max and sum per query head
};

void RunItem(const Problem& p, const Item& it, std::vector<float>& scores) {
  const int64_t G = p.N / p.K, H = p.H, n = it.end - it.begin;
  const int64_t row = p.rows[it.b];
  const float* q = p.q + (it.b * p.N + it.kh * G) * H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  const int64_t stride = p.K * H;  // between consecutive positions of one kv head
  const float* keys = p.k + ((row * p.S + it.begin) * p.K + it.kh) * H;
  const float* values = p.v + ((row * p.S + it.begin) * p.K + it.kh) * H;

  scores.resize(G * n);
  for (int64_t s = 0; s < n; ++s) {
    const float* key = keys + s * stride;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * H;
      float dot = 0.0f;
      for (int64_t h = 0; h < H; ++h) dot += qg[h] * key[h];
      scores[g * n + s] = dot * scale;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores.data() + g * n;
    const float m = *std::max_element(sg, sg + n);
    float total = 0.0f;
    for (int64_t s = 0; s < n; ++s) {
      sg[s] = std::exp(sg[s] - m);
      total += sg[s];
    }
    float* part = it.partial + g * (H + 2);
    std::fill(part, part + H, 0.0f);
    part[H] = m;
    part[H + 1] = total;
  }
  for (int64_t s = 0; s < n; ++s) {
    const float* value = values + s * stride;
    for (int64_t g = 0; g < G; ++g) {
      const float w = scores[g * n + s];
      float* og = it.partial + g * (H + 2);
      for (int64_t h = 0; h < H; ++h) og[h] += w * value[h];
    }
  }
}

struct Shared {
  Problem problem;
  std::vector<Item> items;
  std::vector<float> partials;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void Drain(Shared& shared) {
  std::vector<float> scores;
  const int64_t count = static_cast<int64_t>(shared.items.size());
  int64_t finished = 0;
  for (int64_t i; (i = shared.next.fetch_add(1)) < count; ++finished)
    RunItem(shared.problem, shared.items[i], scores);
  shared.done.fetch_add(finished, std::memory_order_release);
}

// Merge the pieces of every (row, kv head), in item order, into the output.
void Combine(const Shared& shared) {
  const Problem& p = shared.problem;
  const int64_t G = p.N / p.K, H = p.H;
  std::fill(p.out, p.out + p.B * p.N * H, 0.0f);
  size_t i = 0;
  while (i < shared.items.size()) {
    size_t j = i;
    const Item& first = shared.items[i];
    while (j < shared.items.size() && shared.items[j].b == first.b && shared.items[j].kh == first.kh) ++j;
    for (int64_t g = 0; g < G; ++g) {
      float m = -INFINITY;
      for (size_t t = i; t < j; ++t) m = std::max(m, shared.items[t].partial[g * (H + 2) + H]);
      float total = 0.0f;
      float* out = p.out + (first.b * p.N + first.kh * G + g) * H;
      for (size_t t = i; t < j; ++t) {
        const float* part = shared.items[t].partial + g * (H + 2);
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

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> lens,
                               ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 ||
      !std::equal(kd.begin(), kd.end(), vd.begin()) || qd[2] != kd[3] || qd[1] % kd[2] != 0 ||
      rows.element_count() != static_cast<size_t>(qd[0]) ||
      lens.element_count() != static_cast<size_t>(qd[0]))
    return ffi::Error::InvalidArgument("decode attention: inconsistent shapes");

  auto shared = std::make_shared<Shared>();
  Problem& p = shared->problem;
  p = Problem{q.typed_data(), k.typed_data(), v.typed_data(), rows.typed_data(),
              lens.typed_data(), out->typed_data(), qd[0], qd[1], kd[2], qd[2], kd[0], kd[1]};
  const int64_t G = p.N / p.K;
  // Padding rows (row out of range) and empty rows get no items: their output stays zero.
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t row = p.rows[b], len = std::min<int64_t>(p.lens[b], p.S);
    if (row < 0 || row >= p.R || len <= 0) continue;
    for (int64_t kh = 0; kh < p.K; ++kh)
      for (int64_t s = 0; s < len; s += kPiece)
        shared->items.push_back(Item{b, kh, s, std::min(s + kPiece, len), nullptr});
  }
  shared->partials.resize(shared->items.size() * G * (p.H + 2));
  for (size_t i = 0; i < shared->items.size(); ++i)
    shared->items[i].partial = shared->partials.data() + i * G * (p.H + 2);

  const int64_t count = static_cast<int64_t>(shared->items.size());
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { Drain(*shared); });
  Drain(*shared);
  // The items still out are running on helpers; each is short (at most kPiece positions).
  while (shared->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
  Combine(*shared);
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
