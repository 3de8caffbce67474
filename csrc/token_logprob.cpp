// Fused LM-head token log-likelihood, forward and backward, on the CPU.
//
// Forward:  z = H W^T + b (fp32 accumulation), z <- cap * tanh(z / cap) if capped,
//           lse = logsumexp_v z, logp = z[target] - lse.
// Backward: dz = g * (onehot(target) - softmax(z)) * (1 - tanh^2 if capped),
//           dH = dz W, dW = dz^T H, db = sum_n dz  (z recomputed; nothing [N, V] is saved).
//
// Blocking. Tokens come in blocks of MC = 192, vocabulary rows in blocks of NC = 192. For one
// (vocab block, token block) pair the logits tile is computed *transposed*, ZT[NC][MC]
// (vocab rows x token columns, 144 KiB, stays in L2), so that every epilogue is vectorized
// over 16 tokens with per-lane running max / sum: no horizontal reductions. Three GEMMs run
// on the same register-blocked micro-kernel (simd.h, 6 x 64 tile, 24 zmm accumulators):
//   GEMM1  ZT[v][t]  = sum_d W[v][d] Hp[d][t]   M=vocab   N=tokens K=D     (H packed once)
//   GEMM2  dW[v][:] += sum_t dZT[v][t] H[t][:]  M=vocab   N=D      K=tokens
//   GEMM3  dH[t][:] += sum_v dZT[v][t] W[v][:]  M=tokens  N=D      K=vocab
// The micro-kernel broadcasts A elements, so W rows and the dZT tile serve as A in place. The
// B operands are packed so each K x 64 sliver is one contiguous stream: H twice per call (Hp:
// 64-token panels, d-major, for GEMM1; Hc: 64-wide column panels, for GEMM2) and each W block
// once per vocabulary block (for GEMM3). Scratch: 2 x N x D floats + per-thread tiles, plus
// about one N x D of dH partials when both dH and dW are wanted (token_logprob_workspace_bytes).
//
// Threads and determinism (no atomics anywhere). Forward: each thread owns a range of 64-token
// panels and walks the vocabulary blocks in order; a token's result never depends on which
// thread or block holds it, so the forward is bitwise identical for any thread count.
// Backward with dW/db: each thread owns a range of vocabulary blocks; dW and db rows
// accumulate over tokens in token order (again independent of the thread count), while dH
// goes to per-thread partials summed in thread order at the end: bitwise reproducible for a
// fixed thread count. With more than 2 threads, tokens are processed in chunks so that the
// partials stay about one dH in size. Backward with only dH: threads own tokens, no partials.
#include "token_logprob.h"

#include <vector>

#include "blocked_gemm.h"

namespace r3v {
namespace {

using namespace blocked;

constexpr long MC = 192;         // tokens per block (3 panels)
constexpr long NC = 192;         // vocabulary rows per block (32 micro-tile rows)
static_assert(MC % NR == 0, "a token block is a whole number of packed panels");
static_assert(MC % kLanes == 0, "epilogue rows are whole vectors");

// Hp[q][d][j] = H[q*NR + j][d], zero for j past the last token: GEMM1's B operand, NR
// contiguous tokens per d.
Buffer pack_hidden(const TokenLogprobProblem& p, int threads) {
  Buffer hp = alloc_floats(size_t(ceil_div(p.N, NR)) * NR * p.D);
  pack_row_panels(p.hidden, p.N, p.D, hp.get(), threads);
  return hp;
}

// GEMM1 for one tile: ZT[v][t] = W[v0+v] . H[t0+t] over d, v < nv, t < ceil(nt/NR)*NR.
void logits_tile(const TokenLogprobProblem& p, const float* hp, long v0, long nv, long t0, long nt, float* zt) {
  for (long q = 0; q < ceil_div(nt, NR); ++q)
    gemm(nv, NR, p.D, p.weight + v0 * p.D, p.D, 1, hp + (t0 / NR + q) * p.D * NR, NR, NR, zt + q * NR, MC, false);
}

// Adds the bias and applies the soft cap, in place, to 16 tokens of one ZT row.
inline vf finish_logits(vf z, const TokenLogprobProblem& p, long v) {
  if (p.bias) z = vadd(z, vset1(p.bias[v]));
  if (p.softcap > 0.0f) z = vmul(vset1(p.softcap), vtanh(vmul(z, vset1(1.0f / p.softcap))));
  return z;
}

// Forward epilogue: fold the tile into each token's running (max m, sum s, compensation c)
// and pick up the target logit. Per 16-token group the block max is found first, so the
// running pair is rescaled once per block: (s, c) <- (s, c) * exp(m_old - m_new).
//
// Summation (numerics): adding each exp(z_v - m) straight into a running sum that is already
// ~1 drops every term below half an ulp (6e-8), so a peaked distribution (a trained model's)
// loses its whole softmax tail: 1.2e-3 per token at V = 151,936. Instead the block's terms
// go into 4 interleaved partial sums of their own (<= 48 terms each, combined pairwise), and
// the block total joins the running sum by an error-free TwoSum whose rounding error is kept
// in c. The order is fixed (vocabulary blocks in order, lanes independent): deterministic.
void forward_epilogue(const TokenLogprobProblem& p, float* zt, long v0, long nv, long t0, long nt,
                      float* run_max, float* run_sum, float* run_comp, float* z_target) {
  for (long c0 = 0; c0 < nt; c0 += kLanes) {
    const int n = int(std::min<long>(kLanes, nt - c0));
    vf block_max = vset1(-std::numeric_limits<float>::infinity());
    for (long v = 0; v < nv; ++v) {
      float* row = zt + v * MC + c0;
      const vf z = finish_logits(vload_n(row, n), p, v0 + v);
      vstore_n(row, z, n);
      block_max = vmax(block_max, z);
    }
    const vf m_old = vload_n(run_max + t0 + c0, n);
    const vf m_new = vmax(m_old, block_max);
    const float* col = zt + c0;
    vf acc0 = vzero(), acc1 = vzero(), acc2 = vzero(), acc3 = vzero();
    long v = 0;
    for (; v + 4 <= nv; v += 4) {
      acc0 = vadd(acc0, vexp(vsub(vload_n(col + (v + 0) * MC, n), m_new)));
      acc1 = vadd(acc1, vexp(vsub(vload_n(col + (v + 1) * MC, n), m_new)));
      acc2 = vadd(acc2, vexp(vsub(vload_n(col + (v + 2) * MC, n), m_new)));
      acc3 = vadd(acc3, vexp(vsub(vload_n(col + (v + 3) * MC, n), m_new)));
    }
    for (; v < nv; ++v) acc0 = vadd(acc0, vexp(vsub(vload_n(col + v * MC, n), m_new)));
    const vf block = vadd(vadd(acc0, acc1), vadd(acc2, acc3));
    const vf scale = vexp(vsub(m_old, m_new));  // exp(-inf) = 0 at the start
    const vf s = vmul(vload_n(run_sum + t0 + c0, n), scale);
    const vf c = vmul(vload_n(run_comp + t0 + c0, n), scale);
    // TwoSum (Knuth): t + err == s + block exactly, whichever of the two is larger.
    const vf t = vadd(s, block);
    const vf block_part = vsub(t, s);
    const vf err = vadd(vsub(s, vsub(t, block_part)), vsub(block, block_part));
    vstore_n(run_max + t0 + c0, m_new, n);
    vstore_n(run_sum + t0 + c0, t, n);
    vstore_n(run_comp + t0 + c0, vadd(c, err), n);
  }
  for (long t = 0; t < nt; ++t) {
    const long k = p.targets[t0 + t] - v0;
    if (k >= 0 && k < nv) z_target[t0 + t] = zt[k * MC + t];  // fp32 logit, before any rounding
  }
}

// Backward epilogue: overwrite the raw logits tile with dZT, and add this block's part of db.
//   dz = g * (onehot - p) * c',  p = exp(z - lse),  c' = 1 - tanh^2(z_raw / cap) (1 uncapped)
// computed as -g*p*c' for every entry, then + g*c' at each token's target.
void backward_epilogue(const TokenLogprobProblem& p, float* zt, long v0, long nv, long t0, long nt,
                       const float* lse, const float* grad, float* grad_bias) {
  const bool capped = p.softcap > 0.0f;
  float target_slope[MC];  // c' at each token's target when it falls in this block
  for (long t = 0; t < nt; ++t) {
    const long k = p.targets[t0 + t] - v0;
    if (k < 0 || k >= nv) continue;
    if (!capped) { target_slope[t] = 1.0f; continue; }
    // Same vector ops as the loop below, so that -g*p*c' + g*c' cancels exactly when p = 1.
    vf z = vset1(zt[k * MC + t]);
    if (p.bias) z = vadd(z, vset1(p.bias[v0 + k]));
    const vf th = vtanh(vmul(z, vset1(1.0f / p.softcap)));
    alignas(64) float slope[kLanes];
    vstore(slope, vfnmadd(th, th, vset1(1.0f)));
    target_slope[t] = slope[0];
  }
  for (long c0 = 0; c0 < nt; c0 += kLanes) {
    const int n = int(std::min<long>(kLanes, nt - c0));
    const vf lse_v = vload_n(lse + t0 + c0, n);
    const vf neg_g = vsub(vzero(), vload_n(grad + t0 + c0, n));
    for (long v = 0; v < nv; ++v) {
      float* row = zt + v * MC + c0;
      vf z = vload_n(row, n);
      if (p.bias) z = vadd(z, vset1(p.bias[v0 + v]));
      vf dz;
      if (capped) {
        const vf th = vtanh(vmul(z, vset1(1.0f / p.softcap)));
        const vf prob = vexp(vsub(vmul(vset1(p.softcap), th), lse_v));
        dz = vmul(vmul(neg_g, prob), vfnmadd(th, th, vset1(1.0f)));
      } else {
        dz = vmul(neg_g, vexp(vsub(z, lse_v)));
      }
      vstore_n(row, dz, n);
    }
  }
  for (long t = 0; t < nt; ++t) {
    const long k = p.targets[t0 + t] - v0;
    if (k >= 0 && k < nv) zt[k * MC + t] += grad[t0 + t] * target_slope[t];
  }
  if (grad_bias)  // in token order, so db does not depend on how tokens are blocked
    for (long v = 0; v < nv; ++v) {
      float s = grad_bias[v0 + v];
      for (long t = 0; t < nt; ++t) s += zt[v * MC + t];
      grad_bias[v0 + v] = s;
    }
}

// Thread `tid` of `nthr` owns tokens [begin, end): whole 64-token panels, evenly split.
struct TokenRange { long begin, end; };
TokenRange token_range(long N, long panels, int nthr, int tid) {
  return {range_begin(panels, nthr, tid) * NR, std::min(N, range_begin(panels, nthr, tid + 1) * NR)};
}

// Backward with dW: tokens are processed in chunks so that the dH partials of threads 1..T-1
// hold about one dH in total ((T-1) x chunk x D <= N x D); with 2 threads one chunk is all.
long backward_chunk_tokens(long N, int threads, bool partials) {
  const long panels = ceil_div(N, NR);
  return partials && threads > 2 ? std::max(1L, panels / (threads - 1)) * NR : panels * NR;
}

}  // namespace

void token_logprob_fwd(const TokenLogprobProblem& p, float* logp, float* lse, int num_threads) {
  if (p.N == 0) return;
  const long panels = ceil_div(p.N, NR), vocab_blocks = ceil_div(p.V, NC);
  const int threads = int(std::min<long>(team_size(num_threads), panels));
  Buffer hp = pack_hidden(p, threads);
  // lse holds the running max and logp the target logit until the final combine.
  std::vector<float> run_sum(size_t(p.N), 0.0f), run_comp(size_t(p.N), 0.0f);
  std::fill(lse, lse + p.N, -std::numeric_limits<float>::infinity());
  // Per-thread scratch is allocated here: an exception must not leave a parallel region.
  std::vector<Buffer> tiles;
  for (int i = 0; i < threads; ++i) tiles.push_back(alloc_floats(size_t(NC * MC)));
#pragma omp parallel num_threads(threads)
  {
    const int tid = thread_id();
    const TokenRange own = token_range(p.N, panels, thread_count(), tid);
    float* zt = tiles[tid].get();
    for (long vb = 0; vb < vocab_blocks; ++vb) {  // vocabulary order fixed for every token
      const long v0 = vb * NC, nv = std::min(NC, p.V - v0);
      for (long t0 = own.begin; t0 < own.end; t0 += MC) {
        const long nt = std::min(MC, own.end - t0);
        logits_tile(p, hp.get(), v0, nv, t0, nt, zt);
        forward_epilogue(p, zt, v0, nv, t0, nt, lse, run_sum.data(), run_comp.data(), logp);
      }
    }
  }
  for (long t = 0; t < p.N; ++t) {
    // sum >= 1 (the max's own term). logp = (z_target - max) - log(sum) rather than
    // z_target - lse: lse ~ 20 carries an absolute rounding of ~1e-6 that the difference
    // would keep, while z_target - max is exact (0 when the target is the max).
    const float log_sum = std::log(run_sum[t] + run_comp[t]);
    logp[t] = (logp[t] - lse[t]) - log_sum;
    lse[t] += log_sum;
  }
}

void token_logprob_bwd(const TokenLogprobProblem& p, const float* lse, const float* grad_logp,
                       float* grad_hidden, float* grad_weight, float* grad_bias, int num_threads) {
  if (!grad_hidden && !grad_weight && !grad_bias) return;
  if (p.N == 0 || p.D == 0) {  // no tokens: zero gradients; D = 0: only db is non-empty
    if (grad_weight) std::memset(grad_weight, 0, sizeof(float) * size_t(p.V * p.D));
    if (grad_bias) std::memset(grad_bias, 0, sizeof(float) * size_t(p.V));
    if (p.N == 0) return;
  }
  const long panels = ceil_div(p.N, NR), vocab_blocks = ceil_div(p.V, NC), D = p.D;
  // dW / db need vocab ownership; with only dH, threads own tokens and need no partials.
  const bool by_vocab = grad_weight || grad_bias;
  const int threads = int(std::min<long>(team_size(num_threads), by_vocab ? vocab_blocks : panels));
  const bool partials = by_vocab && grad_hidden && threads > 1;
  const long chunk = by_vocab ? backward_chunk_tokens(p.N, threads, partials) : p.N;
  const long d_padded = ceil_div(D, NR) * NR;
  Buffer hp = pack_hidden(p, threads);
  Buffer hc;  // H in column panels [D/NR][N][NR]: GEMM2's B operand
  if (grad_weight) {
    hc = alloc_floats(size_t(p.N * d_padded));
    pack_column_panels(p.hidden, p.N, D, hc.get());
  }
  if (grad_bias) std::memset(grad_bias, 0, sizeof(float) * size_t(p.V));
  std::vector<Buffer> tiles, w_blocks, dh_partial;  // per thread; dh_partial[i - 1] for thread i
  for (int i = 0; i < threads; ++i) {
    tiles.push_back(alloc_floats(size_t(NC * MC)));
    if (grad_hidden) w_blocks.push_back(alloc_floats(size_t(NC * d_padded)));
    if (partials && i > 0) dh_partial.push_back(alloc_floats(size_t(chunk * D)));
  }
  for (long c0 = 0; c0 < p.N; c0 += chunk) {  // one chunk unless > 2 threads compute dH and dW
    const long c1 = std::min(p.N, c0 + chunk);
    int team = 1;
#pragma omp parallel num_threads(threads)
    {
      const int tid = thread_id(), nthr = thread_count();
      if (tid == 0) team = nthr;
      long vb0 = 0, vb1 = vocab_blocks;
      TokenRange own{c0, c1};
      if (by_vocab) vb0 = range_begin(vocab_blocks, nthr, tid), vb1 = range_begin(vocab_blocks, nthr, tid + 1);
      else own = token_range(p.N, panels, nthr, tid);
      // Thread 0 (and every thread when owning tokens) writes dH rows directly; others into
      // their partial, whose row 0 is token c0.
      const bool direct = tid == 0 || !by_vocab;
      float* dh = !grad_hidden ? nullptr : direct ? grad_hidden : dh_partial[tid - 1].get();
      const long dh_row0 = direct ? 0 : c0;
      float* zt = tiles[tid].get();
      float* wc = dh ? w_blocks[tid].get() : nullptr;
      for (long vb = vb0; vb < vb1; ++vb) {
        const long v0 = vb * NC, nv = std::min(NC, p.V - v0);
        if (dh) pack_column_panels(p.weight + v0 * D, nv, D, wc);
        for (long t0 = own.begin; t0 < own.end; t0 += MC) {
          const long nt = std::min(MC, own.end - t0);
          logits_tile(p, hp.get(), v0, nv, t0, nt, zt);
          backward_epilogue(p, zt, v0, nv, t0, nt, lse, grad_logp, grad_bias);
          if (grad_weight)  // GEMM2: the first token block writes, later ones accumulate in token order
            gemm(nv, D, nt, zt, MC, 1, hc.get() + t0 * NR, NR, p.N * NR, grad_weight + v0 * D, D, t0 > 0);
          if (dh)  // GEMM3: this thread's first vocab block writes, later ones accumulate
            gemm(nt, D, nv, zt, 1, MC, wc, NR, nv * NR, dh + (t0 - dh_row0) * D, D, vb > vb0);
        }
      }
    }
    if (partials && team > 1) {  // dH rows of the chunk += partial_1 + partial_2 + ..., in thread order
      const long total = (c1 - c0) * D;
      float* out = grad_hidden + c0 * D;
#pragma omp parallel for num_threads(threads) schedule(static)
      for (long i = 0; i < total; i += 4096) {
        const long end = std::min(total, i + 4096);
        for (int j = 0; j < team - 1; ++j) {
          const float* src = dh_partial[j].get();
          for (long e = i; e < end; ++e) out[e] += src[e];
        }
      }
    }
  }
}

int64_t token_logprob_workspace_bytes(int64_t N, int64_t D, int64_t V, int num_threads, bool backward,
                                      bool need_hidden, bool need_weight, bool need_bias) {
  if (N == 0) return 0;
  const long panels = ceil_div(N, NR), vocab_blocks = ceil_div(V, NC), d_padded = ceil_div(D, NR) * NR;
  const bool by_vocab = backward && (need_weight || need_bias);
  const long threads = std::min<long>(team_size(num_threads), by_vocab ? vocab_blocks : panels);
  const bool partials = by_vocab && need_hidden && threads > 1;
  int64_t floats = panels * NR * D + threads * NC * MC;                       // Hp, logit tiles
  if (!backward) floats += 2 * N;                                             // running sums + compensations
  if (backward && need_hidden) floats += threads * NC * d_padded;             // packed W blocks
  if (backward && need_weight) floats += N * d_padded;                        // Hc
  if (partials) floats += (threads - 1) * backward_chunk_tokens(N, int(threads), true) * D;  // dH partials
  return floats * int64_t(sizeof(float));
}

int max_threads() { return team_size(0); }
const char* simd_name() { return R3V_AVX512 ? "avx512" : R3V_AVX2 ? "avx2" : "generic"; }

}  // namespace r3v
