// Weighted token NLL with its gradients formed during the forward, on the CPU (see
// weighted_nll.cpp): L = -sum_t w_t log p(target_t | hidden_t), logits never stored whole.
#pragma once

#include <cstdint>

namespace r3v {

struct WeightedNllProblem {
  const float* hidden;         // [N, D] row-major
  const float* weight;         // [V, D] row-major
  const float* bias;           // [V] or nullptr
  const int64_t* targets;      // [N], every 0 <= t < V (checked by the caller)
  const float* token_weights;  // [N]
  int64_t N, D, V;
  float softcap;               // > 0: z = softcap * tanh(z / softcap); 0: no cap
};

// logp[N] = log p(target); with dz = w * (softmax(z) - onehot(target)) (times 1 - tanh^2 when
// capped), the gradients of L: grad_hidden[N, D] = dz W, grad_weight[V, D] = dz^T H,
// grad_bias[V] = sum_n dz. A null gradient is not computed. Tokens go in chunks of
// chunk_tokens (0: weighted_nll_chunk_tokens). Bitwise identical for any thread count.
void weighted_nll_fwd(const WeightedNllProblem& p, float* logp, float* grad_hidden, float* grad_weight,
                      float* grad_bias, int64_t chunk_tokens, int num_threads);

// The chunk size used for chunk_tokens = 0 (or the request rounded up to whole 64-token panels).
int64_t weighted_nll_chunk_tokens(int64_t N, int64_t V, int64_t requested);

// Bytes of scratch memory one call allocates besides its outputs.
int64_t weighted_nll_workspace_bytes(int64_t N, int64_t D, int64_t V, int64_t chunk_tokens, int num_threads,
                                     bool need_hidden, bool need_weight);

}  // namespace r3v
