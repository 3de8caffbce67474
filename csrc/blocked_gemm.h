// Blocked fp32 GEMM driver, operand packing and OpenMP helpers shared by the CPU kernels
// (token_logprob.cpp, weighted_nll.cpp). The micro-kernel itself is in simd.h.
//
// gemm() computes C (+)= A B with A read in place through two strides (any layout: W rows,
// a logits tile, its transpose) and B packed in NR-wide column panels, so that every K x NR
// sliver of B is one contiguous stream (see pack_column_panels / pack_row_panels).
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace r3v {
namespace blocked {

constexpr int MR = 6;            // micro-tile rows
constexpr int NV = 4;            // micro-tile width in vectors
constexpr int NR = kLanes * NV;  // micro-tile columns = packed panel width (64)

struct FreeDeleter { void operator()(float* p) const { std::free(p); } };
using Buffer = std::unique_ptr<float[], FreeDeleter>;
inline Buffer alloc_floats(size_t n) {  // 64-byte aligned, uninitialized
  const size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
  float* p = static_cast<float*>(std::aligned_alloc(64, bytes ? bytes : 64));
  if (!p) throw std::bad_alloc();  // pybind11 turns this into MemoryError
  return Buffer(p);
}

using Kernel = void (*)(long, const float*, long, long, const float*, long, float*, long, int, bool);
#define R3V_ROW(m) {&micro_kernel<m, 1>, &micro_kernel<m, 2>, &micro_kernel<m, 3>, &micro_kernel<m, 4>}
inline const Kernel kKernels[MR][NV] = {R3V_ROW(1), R3V_ROW(2), R3V_ROW(3), R3V_ROW(4), R3V_ROW(5), R3V_ROW(6)};
#undef R3V_ROW
static_assert(MR == 6 && NV == 4, "kKernels lists every (rows, vectors) tail case");

inline long ceil_div(long a, long b) { return (a + b - 1) / b; }
inline long range_begin(long n, int parts, int i) { return n * i / parts; }  // even static split

// C[M, N] (+)= A[M, K] B[K, N] with A(i,k) = A[i*rsa + k*csa] and C(i,j) = C[i*ldc + j].
// B comes in column panels of NR: B(k, n) = B[(n / NR) * ldp + k * ldb + n % NR]; row-major
// B is ldp = NR, a packed [N/NR][K][NR] panel array is ldb = NR, ldp = K * NR. Column
// panels outer, so one K x NR sliver of B is reused by all row slivers of A.
inline void gemm(long M, long N, long K, const float* A, long rsa, long csa, const float* B, long ldb, long ldp,
                 float* C, long ldc, bool accumulate) {
  for (long n0 = 0; n0 < N; n0 += NR, B += ldp) {
    const int width = int(std::min<long>(NR, N - n0));
    const int nv = (width + kLanes - 1) / kLanes;
    const int n_last = width - kLanes * (nv - 1);
    for (long i0 = 0; i0 < M; i0 += MR) {
      const int mr = int(std::min<long>(MR, M - i0));
      if (accumulate) {  // prefetch the next tile's C rows (4 KiB apart: the hardware misses them)
        const bool wrap = i0 + MR >= M;
        const long r0 = wrap ? 0 : i0 + MR, c0 = wrap ? n0 + NR : n0;
        if (c0 < N)
          for (long r = r0; r < std::min(M, r0 + MR); ++r)
            for (long l = c0; l < std::min(N, c0 + NR); l += kLanes) __builtin_prefetch(C + r * ldc + l, 1, 3);
      }
      kKernels[mr - 1][nv - 1](K, A + i0 * rsa, rsa, csa, B, ldb, C + i0 * ldc + n0, ldc, n_last, accumulate);
    }
  }
}

// dst[q][d][j] = src[q*NR + j][d] for rows q*NR + j < rows, zero past the last row: a [rows, D]
// matrix as the B operand of C = A src^T (NR contiguous rows per d). Transposed in 16-wide
// d strips so writes stay in L1.
inline void pack_row_panels(const float* src, long rows, long D, float* dst, int threads) {
  const long panels = ceil_div(rows, NR);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long q = 0; q < panels; ++q) {
    float* out = dst + q * D * NR;
    for (long d0 = 0; d0 < D; d0 += kLanes) {
      const long d1 = std::min(D, d0 + kLanes);
      for (long j = 0; j < NR; ++j) {
        const long t = q * NR + j;
        for (long d = d0; d < d1; ++d) out[d * NR + j] = t < rows ? src[t * D + d] : 0.0f;
      }
    }
  }
}

// dst[q][r][j] = src[r][q*NR + j] (zero past column D): rows of src cut into NR-wide column
// panels, each panel contiguous: a [rows, D] matrix as the B operand of C = A src. Rows of a
// [*, D] matrix sit 4 KiB apart for D = 1024, which would map a K x NR sliver onto a few L1
// sets and defeat the prefetcher; packed, the sliver is one contiguous stream. Only panels
// [q0, q1) are written (dst holds q1 - q0 panels), so a thread can pack the columns it owns.
inline void pack_column_panels(const float* src, long rows, long D, float* dst, long q0 = 0, long q1 = -1) {
  if (q1 < 0) q1 = ceil_div(D, NR);
  for (long q = q0; q < q1; ++q) {
    const long width = std::min<long>(NR, D - q * NR);
    for (long r = 0; r < rows; ++r) {
      float* out = dst + ((q - q0) * rows + r) * NR;
      std::memcpy(out, src + r * D + q * NR, sizeof(float) * size_t(width));
      std::memset(out + width, 0, sizeof(float) * size_t(NR - width));
    }
  }
}

inline int team_size(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}
inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
inline int thread_count() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

}  // namespace blocked
}  // namespace r3v
