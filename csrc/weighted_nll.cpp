// Weighted token NLL on the CPU with its gradients formed during the forward: three GEMMs.
//
//   L = -sum_t w_t log p(target_t),  z = H W^T + b (soft-capped), log p = z[target] - lse
//   dz = w_t (softmax(z) - onehot(target)) (* 1 - tanh^2 when capped)
//   dH = dz W,  dW = dz^T H,  db = sum_t dz
//
// token_logprob (token_logprob.cpp) serves any upstream gradient and so needs four GEMMs
// (forward, recomputed logits, dH, dW). Here the per-token weights w_t are known before the
// forward, so dz can be formed as soon as a token's log-sum-exp is known: tokens go in
// chunks of Tc (a multiple of the 64-token panel, ~64 MiB of logits), and per chunk
//
//   A  GEMM1  Z[v][t] = W[v] . H[t]           threads own vocabulary blocks (192 rows);
//             the epilogue finishes the logits in place and keeps each block's (max, sum)
//   B         lse[t] from the block partials, in vocabulary order;  logp[t]
//   C         Z <- dz in place, db += rows of Z;  GEMM2  dW[v] += sum_t Z[v][t] H[t]
//             threads own vocabulary blocks again (dW and db rows have one owner)
//   D  GEMM3  dH[t] = sum_v Z[v][t] W[v]      threads own 64-wide column panels of dH
//
// with barriers between the phases. The logits chunk is stored transposed (vocabulary rows,
// tokens contiguous) so that every epilogue is vectorized over 16 tokens, as in
// token_logprob.cpp; the three GEMMs use the shared blocked driver (blocked_gemm.h). Scratch:
// Z (V x Tc floats), H packed twice (Tc x D each), per-block partials and per-thread W
// panels (weighted_nll_workspace_bytes).
//
// Numerics: fp32 everywhere. Each block's exp terms go into 4 partial sums of their own, and
// the blocks' sums join in a compensated (TwoSum) running sum, so the softmax tail of a
// peaked distribution is kept; logp = (z_target - max) - log(sum). At the target, w*p*c' and
// w*c' come from the same vector ops, so dz is exactly 0 when p rounds to 1.
//
// Determinism (no atomics): every output element has one owner and one summation order that
// does not depend on the thread count (dW and db over chunks in token order, dH over
// vocabulary blocks in order): results are bitwise identical for any number of threads.
#include "weighted_nll.h"

#include <vector>

#include "blocked_gemm.h"

namespace r3v {
namespace {

using namespace blocked;

constexpr long NC = 192;                       // vocabulary rows per block (32 micro-tile rows)
constexpr long kChunkBudgetFloats = 16L << 20;  // default chunk: ~64 MiB of fp32 logits
constexpr long kMinChunk = 256, kMaxChunk = 2048;  // tokens; dW is re-read once per chunk

inline vf finish_logits(vf z, const WeightedNllProblem& p, long v) {
  if (p.bias) z = vadd(z, vset1(p.bias[v]));
  if (p.softcap > 0.0f) z = vmul(vset1(p.softcap), vtanh(vmul(z, vset1(1.0f / p.softcap))));
  return z;
}

// One token chunk: tokens [t0, t0 + nt) of the problem; the logits live in Z[v * ldz + t].
struct Chunk {
  long t0, nt, ldz;
  float* z;          // [V][ldz]
  float* part_max;   // [blocks][ldz]: per vocabulary block, the max over the block
  float* part_sum;   // [blocks][ldz]: and sum exp(z - block max)
  float* z_target;   // [ldz]
  float* lse;        // [ldz]
};

// Phase A epilogue for vocabulary block vb (rows v0 .. v0 + nv): logits finished in place,
// the block's (max, sum of exp) per token, the target logit (fp32, before any rounding).
void block_stats(const WeightedNllProblem& p, const Chunk& c, long vb, long v0, long nv) {
  float* zb = c.z + v0 * c.ldz;
  for (long c0 = 0; c0 < c.nt; c0 += kLanes) {
    const int n = int(std::min<long>(kLanes, c.nt - c0));
    vf block_max = vset1(-std::numeric_limits<float>::infinity());
    for (long v = 0; v < nv; ++v) {
      float* row = zb + v * c.ldz + c0;
      const vf z = finish_logits(vload_n(row, n), p, v0 + v);
      vstore_n(row, z, n);
      block_max = vmax(block_max, z);
    }
    // 4 interleaved partial sums (<= 48 terms each): no term is added into a sum ~1 that
    // has grown over hundreds of terms, so the tail below half an ulp is not dropped.
    const float* col = zb + c0;
    vf acc0 = vzero(), acc1 = vzero(), acc2 = vzero(), acc3 = vzero();
    long v = 0;
    for (; v + 4 <= nv; v += 4) {
      acc0 = vadd(acc0, vexp(vsub(vload_n(col + (v + 0) * c.ldz, n), block_max)));
      acc1 = vadd(acc1, vexp(vsub(vload_n(col + (v + 1) * c.ldz, n), block_max)));
      acc2 = vadd(acc2, vexp(vsub(vload_n(col + (v + 2) * c.ldz, n), block_max)));
      acc3 = vadd(acc3, vexp(vsub(vload_n(col + (v + 3) * c.ldz, n), block_max)));
    }
    for (; v < nv; ++v) acc0 = vadd(acc0, vexp(vsub(vload_n(col + v * c.ldz, n), block_max)));
    vstore_n(c.part_max + vb * c.ldz + c0, block_max, n);
    vstore_n(c.part_sum + vb * c.ldz + c0, vadd(vadd(acc0, acc1), vadd(acc2, acc3)), n);
  }
  for (long t = 0; t < c.nt; ++t) {
    const long k = p.targets[c.t0 + t] - v0;
    if (k >= 0 && k < nv) c.z_target[t] = zb[k * c.ldz + t];
  }
}

// Phase B for tokens [c0, c0 + 16): merge the block partials in vocabulary order into
// (max m, sum s, compensation c): (s, c) rescaled to each new max, every block's sum added
// by an error-free TwoSum whose rounding error goes into c. Then lse and logp.
void token_lse(const Chunk& c, long blocks, long c0, float* logp) {
  const int n = int(std::min<long>(kLanes, c.nt - c0));
  vf m = vset1(-std::numeric_limits<float>::infinity()), s = vzero(), comp = vzero();
  for (long vb = 0; vb < blocks; ++vb) {
    const vf block_max = vload_n(c.part_max + vb * c.ldz + c0, n);
    const vf m_new = vmax(m, block_max);
    const vf scale = vexp(vsub(m, m_new));  // exp(-inf) = 0 at the start
    const vf a = vmul(s, scale);
    const vf b = vmul(vload_n(c.part_sum + vb * c.ldz + c0, n), vexp(vsub(block_max, m_new)));
    const vf t = vadd(a, b);  // TwoSum (Knuth): t + err == a + b exactly, in any magnitude order
    const vf b_part = vsub(t, a);
    const vf err = vadd(vsub(a, vsub(t, b_part)), vsub(b, b_part));
    comp = vadd(vmul(comp, scale), err);
    s = t;
    m = m_new;
  }
  alignas(64) float m_l[kLanes], s_l[kLanes];
  vstore(m_l, m);
  vstore(s_l, vadd(s, comp));
  for (int j = 0; j < n; ++j) {
    // sum >= 1 (the max's own term). logp = (z_target - max) - log(sum): z_target - max is
    // exact, while z_target - lse would keep lse's absolute rounding (~1e-6 at lse ~ 20).
    const float log_sum = std::log(s_l[j]);
    c.lse[c0 + j] = m_l[j] + log_sum;
    logp[c.t0 + c0 + j] = (c.z_target[c0 + j] - m_l[j]) - log_sum;
  }
}

// Phase C epilogue for one vocabulary block: Z <- dz = w * (p - onehot) * c' in place, where
// p = exp(z - lse) and c' = 1 - (z / cap)^2 = 1 - tanh^2 on the capped logit (1 uncapped);
// written as w*p*c' everywhere, then - w*c' at each target in the block. db += the rows.
void block_gradient(const WeightedNllProblem& p, const Chunk& c, long v0, long nv, float* target_slope,
                    float* grad_bias) {
  const bool capped = p.softcap > 0.0f;
  const vf inv_cap = vset1(capped ? 1.0f / p.softcap : 0.0f);
  float* zb = c.z + v0 * c.ldz;
  const float* w = p.token_weights + c.t0;
  for (long t = 0; t < c.nt; ++t) {
    const long k = p.targets[c.t0 + t] - v0;
    if (k < 0 || k >= nv) continue;
    if (!capped) { target_slope[t] = 1.0f; continue; }
    // The same vector ops as the loop below, so that w*p*c' - w*c' is exactly 0 when p = 1.
    const vf th = vmul(vset1(zb[k * c.ldz + t]), inv_cap);
    alignas(64) float slope[kLanes];
    vstore(slope, vfnmadd(th, th, vset1(1.0f)));
    target_slope[t] = slope[0];
  }
  for (long c0 = 0; c0 < c.nt; c0 += kLanes) {
    const int n = int(std::min<long>(kLanes, c.nt - c0));
    const vf lse_v = vload_n(c.lse + c0, n);
    const vf w_v = vload_n(w + c0, n);
    for (long v = 0; v < nv; ++v) {
      float* row = zb + v * c.ldz + c0;
      const vf z = vload_n(row, n);
      vf dz = vmul(w_v, vexp(vsub(z, lse_v)));
      if (capped) {
        const vf th = vmul(z, inv_cap);
        dz = vmul(dz, vfnmadd(th, th, vset1(1.0f)));
      }
      vstore_n(row, dz, n);
    }
  }
  for (long t = 0; t < c.nt; ++t) {
    const long k = p.targets[c.t0 + t] - v0;
    if (k >= 0 && k < nv) zb[k * c.ldz + t] -= w[t] * target_slope[t];
  }
  if (grad_bias)  // in token order, chunk after chunk: independent of the thread count
    for (long v = 0; v < nv; ++v) {
      float s = grad_bias[v0 + v];
      for (long t = 0; t < c.nt; ++t) s += zb[v * c.ldz + t];
      grad_bias[v0 + v] = s;
    }
}

long column_panels(long D) { return ceil_div(D, NR); }

}  // namespace

int64_t weighted_nll_chunk_tokens(int64_t N, int64_t V, int64_t requested) {
  long tc = requested > 0 ? long(requested)
                          : std::clamp<long>(kChunkBudgetFloats / std::max<long>(V, 1) / NR * NR, kMinChunk, kMaxChunk);
  tc = ceil_div(tc, NR) * NR;                             // whole 64-token panels
  return std::max<long>(NR, std::min<long>(tc, ceil_div(N, NR) * NR));
}

int64_t weighted_nll_workspace_bytes(int64_t N, int64_t D, int64_t V, int64_t chunk_tokens, int num_threads,
                                     bool need_hidden, bool need_weight) {
  if (N == 0) return 0;
  const long tc = weighted_nll_chunk_tokens(N, V, chunk_tokens), blocks = ceil_div(V, NC);
  const long threads = std::min<long>(team_size(num_threads), blocks);
  int64_t floats = tc * D + V * tc + 2 * blocks * tc + 2 * tc + threads * tc;  // Hp, Z, partials, lse, slopes
  if (need_weight) floats += tc * column_panels(D) * NR;                        // Hc
  if (need_hidden) floats += threads * column_panels(D) * NC * NR;                // W panels
  return floats * int64_t(sizeof(float));
}

void weighted_nll_fwd(const WeightedNllProblem& p, float* logp, float* grad_hidden, float* grad_weight,
                      float* grad_bias, int64_t chunk_tokens, int num_threads) {
  if (grad_bias) std::memset(grad_bias, 0, sizeof(float) * size_t(p.V));  // accumulated over chunks
  if (p.N == 0) {  // no tokens: dW is 0 (otherwise the first chunk writes it)
    if (grad_weight) std::memset(grad_weight, 0, sizeof(float) * size_t(p.V * p.D));
    return;
  }
  const long D = p.D, blocks = ceil_div(p.V, NC), panels = column_panels(D);
  const long tc = weighted_nll_chunk_tokens(p.N, p.V, chunk_tokens);
  const int threads = int(std::min<long>(team_size(num_threads), blocks));
  // Scratch, allocated here: an exception must not leave a parallel region.
  Buffer z = alloc_floats(size_t(p.V) * tc), hp = alloc_floats(size_t(tc) * D);
  Buffer parts = alloc_floats(size_t(2 * blocks * tc)), token_buf = alloc_floats(size_t(2 * tc));
  Buffer hc;
  if (grad_weight) hc = alloc_floats(size_t(tc) * panels * NR);
  std::vector<Buffer> slopes, w_panels;  // per thread; W panels sized for every column (a few MiB)
  for (int i = 0; i < threads; ++i) {
    slopes.push_back(alloc_floats(size_t(tc)));
    if (grad_hidden) w_panels.push_back(alloc_floats(size_t(panels * NC * NR)));
  }
  for (long t0 = 0; t0 < p.N; t0 += tc) {
    const Chunk c{t0, std::min(tc, p.N - t0), tc, z.get(), parts.get(), parts.get() + blocks * tc,
                  token_buf.get(), token_buf.get() + tc};
    const long padded = ceil_div(c.nt, NR) * NR;  // GEMM1 computes whole panels (zero tokens past nt)
    const bool first_chunk = t0 == 0;
    pack_row_panels(p.hidden + t0 * D, c.nt, D, hp.get(), threads);          // GEMM1's B: [Tc/64][D][64]
    if (grad_weight) pack_column_panels(p.hidden + t0 * D, c.nt, D, hc.get());  // GEMM2's B: [D/64][nt][64]
#pragma omp parallel num_threads(threads)
    {
      const int tid = thread_id(), nthr = thread_count();
      const long vb0 = range_begin(blocks, nthr, tid), vb1 = range_begin(blocks, nthr, tid + 1);
      // A: logits of my vocabulary blocks and their per-block statistics.
      for (long vb = vb0; vb < vb1; ++vb) {
        const long v0 = vb * NC, nv = std::min(NC, p.V - v0);
        gemm(nv, padded, D, p.weight + v0 * D, D, 1, hp.get(), NR, D * NR, c.z + v0 * c.ldz, c.ldz, false);
        block_stats(p, c, vb, v0, nv);
      }
#pragma omp barrier
      // B: lse and logp of my 16-token groups.
      const long groups = ceil_div(c.nt, kLanes);
      for (long g = range_begin(groups, nthr, tid); g < range_begin(groups, nthr, tid + 1); ++g)
        token_lse(c, blocks, g * kLanes, logp);
#pragma omp barrier
      // C: dz in place over my vocabulary blocks, then their dW rows (the first chunk writes).
      for (long vb = vb0; vb < vb1; ++vb) {
        const long v0 = vb * NC, nv = std::min(NC, p.V - v0);
        block_gradient(p, c, v0, nv, slopes[tid].get(), grad_bias);
        if (grad_weight)
          gemm(nv, D, c.nt, c.z + v0 * c.ldz, c.ldz, 1, hc.get(), NR, c.nt * NR, grad_weight + v0 * D, D,
               !first_chunk);
      }
      if (grad_hidden) {
#pragma omp barrier
        // D: dH rows of the chunk, my column panels, over every vocabulary block in order.
        const long q0 = range_begin(panels, nthr, tid), q1 = range_begin(panels, nthr, tid + 1);
        const long n0 = q0 * NR, ncols = std::min(D, q1 * NR) - n0;
        float* wc = w_panels[tid].get();
        for (long vb = 0; vb < blocks && ncols > 0; ++vb) {
          const long v0 = vb * NC, nv = std::min(NC, p.V - v0);
          pack_column_panels(p.weight + v0 * D, nv, D, wc, q0, q1);  // [q1 - q0][nv][64]
          gemm(c.nt, ncols, nv, c.z + v0 * c.ldz, 1, c.ldz, wc, NR, nv * NR, grad_hidden + t0 * D + n0, D, vb > 0);
        }
      }
    }
  }
}

}  // namespace r3v
