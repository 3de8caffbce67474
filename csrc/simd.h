// SIMD building blocks of the CPU token log-likelihood kernels: a 16-lane float vector
// type `vf`, the exp/tanh the epilogues need, and the register-blocked GEMM micro-kernel.
//
// Two implementations with one interface: AVX-512 intrinsics when the compiler targets it
// (-march=native on this AMD EPYC), and plain C++ loops over 16 lanes otherwise (the
// portable build; the compiler vectorizes what it can). Every function is lane-wise, so the
// two paths differ only in rounding of exp/tanh (both are ~1-2 ulp).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#define R3V_AVX512 1
#else
#define R3V_AVX512 0
#endif

namespace r3v {

constexpr int kLanes = 16;  // floats per vector (one zmm register)

#if R3V_AVX512
using vf = __m512;
inline __mmask16 lane_mask(int n) { return n >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vload_n(const float* p, int n) { return _mm512_maskz_loadu_ps(lane_mask(n), p); }  // lanes >= n are 0
inline void vstore(float* p, vf x) { _mm512_storeu_ps(p, x); }
inline void vstore_n(float* p, vf x, int n) { _mm512_mask_storeu_ps(p, lane_mask(n), x); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vfmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }   // a*b + c, one rounding
inline vf vfnmadd(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); } // c - a*b, one rounding
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf vabs(vf a) { return _mm512_abs_ps(a); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vcopysign(vf mag, vf sgn) {  // |mag| with the sign of sgn
  const __m512i sign = _mm512_set1_epi32(int(0x80000000u));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_andnot_si512(sign, _mm512_castps_si512(mag)),
                                             _mm512_and_si512(sign, _mm512_castps_si512(sgn))));
}
inline vf vselect_lt(vf a, vf b, vf if_lt, vf otherwise) {  // per lane: a < b ? if_lt : otherwise
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), otherwise, if_lt);
}
inline vf vround(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vscale2(vf y, vf n) { return _mm512_scalef_ps(y, n); }  // y * 2^n, flushes to 0 / inf at the ends
#else
struct vf { float x[kLanes]; };
#define R3V_LANEWISE(expr) vf r; for (int i = 0; i < kLanes; ++i) r.x[i] = (expr); return r
inline vf vset1(float v) { R3V_LANEWISE(v); }
inline vf vzero() { R3V_LANEWISE(0.0f); }
inline vf vload(const float* p) { R3V_LANEWISE(p[i]); }
inline vf vload_n(const float* p, int n) { R3V_LANEWISE(i < n ? p[i] : 0.0f); }
inline void vstore(float* p, vf a) { for (int i = 0; i < kLanes; ++i) p[i] = a.x[i]; }
inline void vstore_n(float* p, vf a, int n) { for (int i = 0; i < kLanes && i < n; ++i) p[i] = a.x[i]; }
inline vf vadd(vf a, vf b) { R3V_LANEWISE(a.x[i] + b.x[i]); }
inline vf vsub(vf a, vf b) { R3V_LANEWISE(a.x[i] - b.x[i]); }
inline vf vmul(vf a, vf b) { R3V_LANEWISE(a.x[i] * b.x[i]); }
inline vf vfmadd(vf a, vf b, vf c) { R3V_LANEWISE(std::fma(a.x[i], b.x[i], c.x[i])); }
inline vf vfnmadd(vf a, vf b, vf c) { R3V_LANEWISE(std::fma(-a.x[i], b.x[i], c.x[i])); }
inline vf vmax(vf a, vf b) { R3V_LANEWISE(a.x[i] > b.x[i] ? a.x[i] : b.x[i]); }
inline vf vmin(vf a, vf b) { R3V_LANEWISE(a.x[i] < b.x[i] ? a.x[i] : b.x[i]); }
inline vf vabs(vf a) { R3V_LANEWISE(std::fabs(a.x[i])); }
inline vf vdiv(vf a, vf b) { R3V_LANEWISE(a.x[i] / b.x[i]); }
inline vf vcopysign(vf mag, vf sgn) { R3V_LANEWISE(std::copysign(mag.x[i], sgn.x[i])); }
inline vf vselect_lt(vf a, vf b, vf t, vf f) { R3V_LANEWISE(a.x[i] < b.x[i] ? t.x[i] : f.x[i]); }
inline vf vround(vf a) { R3V_LANEWISE(std::nearbyint(a.x[i])); }
inline vf vscale2(vf y, vf n) { R3V_LANEWISE(std::ldexp(y.x[i], int(n.x[i]))); }
#undef R3V_LANEWISE
#endif

// exp(x) for x <= ~88 (the epilogues only ever pass x = z - max <= 0 or -2|x|).
// Cephes expf: x = n*ln2 + r with |r| <= ln2/2 (ln2 split in two for an exact product),
// exp(r) by a degree-6 polynomial (~1 ulp), times 2^n. Inputs are clamped at -104 so that
// -inf gives exactly 0 instead of NaN (2^-150 underflows to 0 in vscale2).
inline vf vexp(vf x) {
  x = vmin(vmax(x, vset1(-104.0f)), vset1(88.5f));
  const vf n = vround(vmul(x, vset1(1.44269504088896341f)));
  vf r = vfnmadd(n, vset1(0.693359375f), x);
  r = vfnmadd(n, vset1(-2.12194440e-4f), r);
  vf p = vset1(1.9875691500e-4f);
  p = vfmadd(p, r, vset1(1.3981999507e-3f));
  p = vfmadd(p, r, vset1(8.3334519073e-3f));
  p = vfmadd(p, r, vset1(4.1665795894e-2f));
  p = vfmadd(p, r, vset1(1.6666665459e-1f));
  p = vfmadd(p, r, vset1(5.0000001201e-1f));
  p = vfmadd(p, vmul(r, r), vadd(r, vset1(1.0f)));
  return vscale2(p, n);
}

// tanh(x). Cephes tanhf: an odd polynomial for |x| < 0.625 (where 1 - 2/(e^2x + 1) would
// cancel), else (1 - e)/(1 + e) with e = exp(-2|x|) <= 1 (no overflow), sign restored.
inline vf vtanh(vf x) {
  const vf ax = vabs(x);
  const vf x2 = vmul(x, x);
  vf p = vset1(-5.70498872745e-3f);
  p = vfmadd(p, x2, vset1(2.06390887954e-2f));
  p = vfmadd(p, x2, vset1(-5.37397155531e-2f));
  p = vfmadd(p, x2, vset1(1.33314422036e-1f));
  p = vfmadd(p, x2, vset1(-3.33332819422e-1f));
  const vf small = vfmadd(vmul(p, x2), x, x);
  const vf e = vexp(vmul(ax, vset1(-2.0f)));
  const vf large = vcopysign(vdiv(vsub(vset1(1.0f), e), vadd(vset1(1.0f), e)), x);
  return vselect_lt(ax, vset1(0.625f), small, large);
}

// ---------------------------------------------------------------------------------------
// GEMM micro-kernel: C[MR x 16*NV] (+)= sum_{k<K} A(i,k) * B(k, 0:16*NV)
//   A(i,k) = A[i*rsa + k*csa]   (broadcast one scalar per row and k: any layout works)
//   B(k,j) = B[k*ldb + j]       (16*NV contiguous floats per k; the last vector keeps only
//                                n_last lanes, for a column count that is not a multiple of 16)
//   C(i,j) = C[i*ldc + j]
// The MR*NV accumulators live in registers for the whole K loop (6 x 4 = 24 of the 32 zmm
// registers; 4 hold the B row, 1 the broadcast), so each k costs NV loads + MR broadcasts for
// MR*NV FMAs: compute bound on one FMA per cycle. Sums run in fp32 in k order.
template <int MR, int NV>
inline void micro_kernel(long K, const float* A, long rsa, long csa, const float* B, long ldb,
                         float* C, long ldc, int n_last, bool accumulate) {
#if R3V_AVX512
  const __mmask16 m_last = lane_mask(n_last);
  __m512 c[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      c[i][j] = accumulate ? _mm512_maskz_loadu_ps(j == NV - 1 ? m_last : __mmask16(0xFFFF), C + i * ldc + 16 * j)
                           : _mm512_setzero_ps();
  for (long k = 0; k < K; ++k) {
    __m512 b[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      b[j] = (j == NV - 1 && n_last < kLanes) ? _mm512_maskz_loadu_ps(m_last, B + 16 * j) : _mm512_loadu_ps(B + 16 * j);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(A[i * rsa]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) c[i][j] = _mm512_fmadd_ps(a, b[j], c[i][j]);
    }
    A += csa;
    B += ldb;
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      if (j == NV - 1) _mm512_mask_storeu_ps(C + i * ldc + 16 * j, m_last, c[i][j]);
      else _mm512_storeu_ps(C + i * ldc + 16 * j, c[i][j]);
    }
#else
  constexpr int NR = 16 * NV;
  const int ncols = 16 * (NV - 1) + n_last;
  float c[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) c[i][j] = (accumulate && j < ncols) ? C[i * ldc + j] : 0.0f;
  for (long k = 0; k < K; ++k) {
    float b[NR];
    for (int j = 0; j < NR; ++j) b[j] = j < ncols ? B[j] : 0.0f;
    for (int i = 0; i < MR; ++i) {
      const float a = A[i * rsa];
      for (int j = 0; j < NR; ++j) c[i][j] = std::fma(a, b[j], c[i][j]);
    }
    A += csa;
    B += ldb;
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < ncols; ++j) C[i * ldc + j] = c[i][j];
#endif
}

}  // namespace r3v
