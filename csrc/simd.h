// SIMD building blocks of the CPU token log-likelihood kernels: a 16-lane float vector
// type `vf`, the exp/tanh the epilogues need, and the register-blocked GEMM micro-kernel.
//
// Three implementations with one interface: AVX-512 intrinsics when the compiler targets it
// (-march=native on an AVX-512 machine), AVX2 + FMA intrinsics (a 16-lane vector is two
// 8-lane registers) on CPUs without AVX-512, and plain C++ loops over 16 lanes otherwise (the
// portable build; the compiler vectorizes what it can). Every function is lane-wise and the
// exp/tanh polynomials are the same, so results agree to the last bit except where the
// generic path's std::nearbyint / ldexp round differently (never in practice).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#define R3V_AVX512 1
#define R3V_AVX2 0
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define R3V_AVX512 0
#define R3V_AVX2 1
#else
#define R3V_AVX512 0
#define R3V_AVX2 0
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
#elif R3V_AVX2
struct vf { __m256 lo, hi; };  // lanes 0-7, 8-15
inline __m256i half_mask(int n) {  // lane i of 8 active iff i < n (n may be <= 0 or >= 8)
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#define R3V_PAIR(f) vf{f(a.lo, b.lo), f(a.hi, b.hi)}
inline vf vset1(float x) { const __m256 v = _mm256_set1_ps(x); return {v, v}; }
inline vf vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline vf vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline vf vload_n(const float* p, int n) {  // lanes >= n are 0 and never read (no fault past the end)
  if (n >= kLanes) return vload(p);
  return {_mm256_maskload_ps(p, half_mask(n)), _mm256_maskload_ps(p + 8, half_mask(n - 8))};
}
inline void vstore(float* p, vf x) { _mm256_storeu_ps(p, x.lo); _mm256_storeu_ps(p + 8, x.hi); }
inline void vstore_n(float* p, vf x, int n) {
  if (n >= kLanes) return vstore(p, x);
  _mm256_maskstore_ps(p, half_mask(n), x.lo);
  _mm256_maskstore_ps(p + 8, half_mask(n - 8), x.hi);
}
inline vf vadd(vf a, vf b) { return R3V_PAIR(_mm256_add_ps); }
inline vf vsub(vf a, vf b) { return R3V_PAIR(_mm256_sub_ps); }
inline vf vmul(vf a, vf b) { return R3V_PAIR(_mm256_mul_ps); }
inline vf vmax(vf a, vf b) { return R3V_PAIR(_mm256_max_ps); }
inline vf vmin(vf a, vf b) { return R3V_PAIR(_mm256_min_ps); }
inline vf vdiv(vf a, vf b) { return R3V_PAIR(_mm256_div_ps); }
#undef R3V_PAIR
inline vf vfmadd(vf a, vf b, vf c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline vf vfnmadd(vf a, vf b, vf c) { return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)}; }
inline vf vabs(vf a) {
  const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  return {_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m)};
}
inline vf vcopysign(vf mag, vf sgn) {  // |mag| with the sign of sgn
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(int(0x80000000u)));
  return {_mm256_or_ps(_mm256_andnot_ps(sign, mag.lo), _mm256_and_ps(sign, sgn.lo)),
          _mm256_or_ps(_mm256_andnot_ps(sign, mag.hi), _mm256_and_ps(sign, sgn.hi))};
}
inline vf vselect_lt(vf a, vf b, vf if_lt, vf otherwise) {  // per lane: a < b ? if_lt : otherwise
  return {_mm256_blendv_ps(otherwise.lo, if_lt.lo, _mm256_cmp_ps(a.lo, b.lo, _CMP_LT_OQ)),
          _mm256_blendv_ps(otherwise.hi, if_lt.hi, _mm256_cmp_ps(a.hi, b.hi, _CMP_LT_OQ))};
}
inline vf vround(vf a) {
  return {_mm256_round_ps(a.lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
          _mm256_round_ps(a.hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
// y * 2^n for integral n in [-150, 128] (vexp's range): two exact factors 2^(n/2) and
// 2^(n - n/2), each a normal float built from its exponent bits, so that one rounding happens
// at most (into the subnormals) and 2^-150 flushes to 0, as scalef does.
inline __m256 scale2_half(__m256 y, __m256 n) {
  const __m256i k = _mm256_cvtps_epi32(n);
  const __m256i k1 = _mm256_srai_epi32(k, 1), k2 = _mm256_sub_epi32(k, k1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23));
  const __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(y, f1), f2);
}
inline vf vscale2(vf y, vf n) { return {scale2_half(y.lo, n.lo), scale2_half(y.hi, n.hi)}; }
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
#elif R3V_AVX2
  // 16 ymm registers cannot hold an MR x 64 tile: the tile is done as NV column slices of 16,
  // each MR x 16 (12 accumulators, 2 B registers, 1 broadcast). A is read once per slice (it
  // stays in L1); every B element is still loaded once.
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) {
    const int width = j == NV - 1 ? n_last : kLanes;  // valid columns in this slice
    const __m256i m0 = half_mask(width), m1 = half_mask(width - 8);
    float* c_ptr = C + 16 * j;
    __m256 c[MR][2];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      if (accumulate) {
        c[i][0] = _mm256_maskload_ps(c_ptr + i * ldc, m0);
        c[i][1] = _mm256_maskload_ps(c_ptr + i * ldc + 8, m1);
      } else {
        c[i][0] = c[i][1] = _mm256_setzero_ps();
      }
    }
    const float* a = A;
    const float* b = B + 16 * j;
    for (long k = 0; k < K; ++k) {
      // B panels are padded to whole 64-column widths, so full loads stay inside the panel;
      // lanes past `width` only feed accumulator lanes that are never stored.
      const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m256 ai = _mm256_broadcast_ss(a + i * rsa);
        c[i][0] = _mm256_fmadd_ps(ai, b0, c[i][0]);
        c[i][1] = _mm256_fmadd_ps(ai, b1, c[i][1]);
      }
      a += csa;
      b += ldb;
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      if (width == kLanes) {
        _mm256_storeu_ps(c_ptr + i * ldc, c[i][0]);
        _mm256_storeu_ps(c_ptr + i * ldc + 8, c[i][1]);
      } else {
        _mm256_maskstore_ps(c_ptr + i * ldc, m0, c[i][0]);
        _mm256_maskstore_ps(c_ptr + i * ldc + 8, m1, c[i][1]);
      }
    }
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
