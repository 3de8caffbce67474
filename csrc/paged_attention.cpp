// Paged cascade decode attention, CPU kernel (the continuous-batching sampler's decode step).
//
// Work item: one (question row, KV head). Its query rows are the G = H / Hkv heads of each of
// the row's slots: the prefix keys are streamed once for all of them (the cascade: a question's
// prefix is read once, not once per branch), then each slot's own keys for that slot's rows
// only. Keys are visited in chunks of up to kChunk: scores for the chunk, one rescale of the
// running (max, sum, accumulator) per row and chunk, then the weighted values (the online
// softmax of FlashAttention, exact up to rounding). Only valid tokens are touched: a long
// branch costs its own slot, not every slot.
//
// Numerics: fp32 throughout (scores, exponentials, sums, accumulators); no fast-math. Dot
// products sum 16 interleaved partial sums, then those in order. Each output depends only on
// its own row's data, in a fixed order: results do not depend on the thread count.
#include "paged_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace r3v {
namespace {

constexpr int64_t kChunk = 64;
constexpr int kLanes = 16;

// Dot product with kLanes independent partial sums (vectorizable without reassociating the
// compiler's way: the lanes and their final sum have a fixed order, so results do not depend
// on the build's SIMD width).
inline float dot(const float* a, const float* b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes)
    for (int i = 0; i < kLanes; ++i) lanes[i] += a[d + i] * b[d + i];
  float sum = 0.0f;
  for (; d < n; ++d) sum += a[d] * b[d];
  for (int i = 0; i < kLanes; ++i) sum += lanes[i];
  return sum;
}

// Running softmax state of one query row.
struct RowState {
  float max = -std::numeric_limits<float>::infinity();
  float sum = 0.0f;
};

// Folds keys [first, last) of one token sequence into the state of query rows [row0, row1).
// token(t) returns the pool offset (in floats) of token t's key / value vector for this head.
template <typename TokenOffset>
void fold(const PagedAttentionProblem& p, const std::vector<const float*>& queries, int64_t row0, int64_t row1,
          int64_t first, int64_t last, TokenOffset token, std::vector<RowState>& state, std::vector<float>& acc,
          std::vector<float>& scores) {
  const int64_t dh = p.Dh;
  for (int64_t c0 = first; c0 < last; c0 += kChunk) {
    const int64_t n = std::min(kChunk, last - c0);
    for (int64_t r = row0; r < row1; ++r) {
      const float* q = queries[r];
      float chunk_max = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        scores[j] = dot(q, p.k_pool + token(c0 + j), dh) * p.scale;
        chunk_max = std::max(chunk_max, scores[j]);
      }
      RowState& st = state[r];
      const float new_max = std::max(st.max, chunk_max);
      const float alpha = st.max == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(st.max - new_max);
      float* a = acc.data() + r * dh;
      for (int64_t d = 0; d < dh; ++d) a[d] *= alpha;
      float sum = st.sum * alpha;
      for (int64_t j = 0; j < n; ++j) {
        const float w = std::exp(scores[j] - new_max);
        sum += w;
        const float* v = p.v_pool + token(c0 + j);
        for (int64_t d = 0; d < dh; ++d) a[d] += w * v[d];
      }
      st.max = new_max;
      st.sum = sum;
    }
  }
}

}  // namespace

void paged_cascade_decode_attention(const PagedAttentionProblem& p, float* out, float* lse, int num_threads) {
  const int64_t group = p.H / p.Hkv;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::fill(out, out + p.S * p.H * p.Dh, 0.0f);
  std::fill(lse, lse + p.S * p.H, neg_inf);
  const int64_t items = p.R * p.Hkv;
#ifdef _OPENMP
  if (num_threads <= 0) num_threads = omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
#endif
  for (int64_t item = 0; item < items; ++item) {
    const int64_t row = item / p.Hkv, head = item % p.Hkv;
    const int32_t* slots = p.question_slots + row * p.W;
    std::vector<int64_t> own;  // slots of this row, in table order
    for (int64_t w = 0; w < p.W; ++w)
      if (slots[w] >= 0) own.push_back(slots[w]);
    if (own.empty()) continue;
    const int64_t rows = static_cast<int64_t>(own.size()) * group;
    std::vector<const float*> queries(rows);
    for (int64_t i = 0; i < static_cast<int64_t>(own.size()); ++i)
      for (int64_t g = 0; g < group; ++g) queries[i * group + g] = p.q + (own[i] * p.H + head * group + g) * p.Dh;
    std::vector<RowState> state(rows);
    std::vector<float> acc(rows * p.Dh, 0.0f), scores(kChunk);
    const int64_t block_stride = p.Hkv * p.BS * p.Dh, head_offset = head * p.BS * p.Dh;

    // 1. the prefix, once for every row of the question.
    const int32_t* prefix_table = p.prefix_tables + row * p.MPB;
    const int64_t prefix_len = std::clamp<int64_t>(p.prefix_lens[row], 0, p.MPB * p.BS);
    auto prefix_token = [&](int64_t t) {
      return prefix_table[t / p.BS] * block_stride + head_offset + (t % p.BS) * p.Dh;
    };
    fold(p, queries, 0, rows, 0, prefix_len, prefix_token, state, acc, scores);

    // 2. each slot's own tokens, for that slot's rows only.
    for (int64_t i = 0; i < static_cast<int64_t>(own.size()); ++i) {
      const int32_t* table = p.slot_tables + own[i] * p.MSB;
      const int64_t len = std::clamp<int64_t>(p.slot_lens[own[i]], 0, p.MSB * p.BS);
      auto own_token = [&](int64_t t) { return table[t / p.BS] * block_stride + head_offset + (t % p.BS) * p.Dh; };
      fold(p, queries, i * group, (i + 1) * group, 0, len, own_token, state, acc, scores);
    }

    for (int64_t i = 0; i < static_cast<int64_t>(own.size()); ++i) {
      for (int64_t g = 0; g < group; ++g) {
        const int64_t r = i * group + g, h = head * group + g;
        const RowState& st = state[r];
        if (st.sum <= 0.0f) continue;  // no key at all: stays (0, -inf)
        float* o = out + (own[i] * p.H + h) * p.Dh;
        const float inv = 1.0f / st.sum;
        for (int64_t d = 0; d < p.Dh; ++d) o[d] = acc[r * p.Dh + d] * inv;
        lse[own[i] * p.H + h] = st.max + std::log(st.sum);
      }
    }
  }
}

}  // namespace r3v
