// Fused LM-head token log-likelihood on the CPU: logits = hidden @ weight^T (+ bias,
// soft-capped), lse = logsumexp over the vocabulary, logp = logits[target] - lse, and the
// matching backward, without ever storing the [N, V] logits (see token_logprob.cpp).
#pragma once

#include <cstdint>

namespace r3v {

struct TokenLogprobProblem {
  const float* hidden;     // [N, D] row-major
  const float* weight;     // [V, D] row-major
  const float* bias;       // [V] or nullptr
  const int64_t* targets;  // [N], every 0 <= t < V (checked by the caller)
  int64_t N, D, V;
  float softcap;           // > 0: z = softcap * tanh(z / softcap); 0: no cap
};

// logp[N] = z[target] - lse, lse[N] = logsumexp_v z. Deterministic for any thread count.
void token_logprob_fwd(const TokenLogprobProblem& p, float* logp, float* lse, int num_threads);

// With dz = grad_logp * (onehot(target) - softmax(z)) (times 1 - tanh^2 when capped):
// grad_hidden[N, D] = dz @ W, grad_weight[V, D] = dz^T @ H, grad_bias[V] = sum_n dz.
// A null output is not computed. grad_weight / grad_bias are bitwise identical for any thread
// count, grad_hidden for a fixed thread count (per-thread partials, summed in thread order).
void token_logprob_bwd(const TokenLogprobProblem& p, const float* lse, const float* grad_logp,
                       float* grad_hidden, float* grad_weight, float* grad_bias, int num_threads);

// Bytes of scratch memory the calls above allocate (packed hidden, logit tiles, per-thread
// partial grad_hidden); the benchmark reports it next to the measured peak.
int64_t token_logprob_workspace_bytes(int64_t N, int64_t D, int64_t V, int num_threads, bool backward,
                                      bool need_hidden, bool need_weight, bool need_bias);

int max_threads();   // OpenMP's default team size (1 without OpenMP)
const char* simd_name();  // "avx512", "avx2" or "generic"

}  // namespace r3v
