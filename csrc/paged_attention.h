// Paged cascade decode attention on the CPU: one query per decode slot over its question's
// prefix (read once for all the question's slots) and its own tokens, with keys and values in
// fixed-size blocks of one pool found through block tables (see paged_attention.cpp).
#pragma once

#include <cstdint>

namespace r3v {

struct PagedAttentionProblem {
  const float* q;                 // [S, H, Dh]
  const float* k_pool;            // [NB, Hkv, BS, Dh]
  const float* v_pool;            // [NB, Hkv, BS, Dh]
  const int32_t* question_slots;  // [R, W], -1 = no slot
  const int32_t* prefix_tables;   // [R, MPB]
  const int32_t* prefix_lens;     // [R]
  const int32_t* slot_tables;     // [S, MSB]
  const int32_t* slot_lens;       // [S]
  int64_t S, H, Dh, NB, Hkv, BS, R, W, MPB, MSB;
  float scale;
};

// out [S, H, Dh] and lse [S, H] (natural log): slots no row lists get 0 and -inf. Block ids
// and slot indices are assumed in range (checked by the caller); lengths are clamped to the
// tables' capacity. Deterministic for any thread count (rows are independent).
void paged_cascade_decode_attention(const PagedAttentionProblem& p, float* out, float* lse, int num_threads);

}  // namespace r3v
