// A register-blocked matrix product for the LARNN step's small products.
//
// C (M x N) = A (M x K) @ B (K x N) [+ C]: A and C row-major with leading dimensions lda and ldc,
// B row-major with leading dimension ldb, N a multiple of the vector width. The micro-kernel holds
// an MR x NV-vector block of C in registers and, for each k, broadcasts MR elements of A's column
// k against NV vectors of B's row k. The sizes here (M <= 256 rows of one thread, K and N of a
// few hundred) keep B's panel in L1 across a column of micro-kernels; no packing is needed.
#pragma once

#include <cstdint>

#include "simd.h"

namespace larnn {

namespace gemm_detail {

// MR rows x NV vectors: 8 x 3 with 32 vector registers (24 accumulators), 4 x 3 with 16.
constexpr int kRows = kVectorRegisters >= 32 ? 8 : 4;
constexpr int kColumnVectors = 3;

template <typename T, int MR, int NV>
inline void micro_kernel(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                         int64_t ldc, bool accumulate) {
  constexpr int L = kLanes<T>;
  Vec<T> acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? load(C + r * ldc + v * L) : Vec<T>{};
  }
  for (int64_t k = 0; k < K; ++k) {
    Vec<T> b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + v * L);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const T a = A[r * lda + k];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * L, acc[r][v]);
  }
}

template <typename T, int MR>
inline void row_block(int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                      T* C, int64_t ldc, bool accumulate) {
  constexpr int L = kLanes<T>;
  constexpr int NV = kColumnVectors;
  int64_t j = 0;
  for (; j + NV * L <= N; j += NV * L) {
    micro_kernel<T, MR, NV>(K, A, lda, B + j, ldb, C + j, ldc, accumulate);
  }
  if (N - j == 2 * L) micro_kernel<T, MR, 2>(K, A, lda, B + j, ldb, C + j, ldc, accumulate);
  if (N - j == L) micro_kernel<T, MR, 1>(K, A, lda, B + j, ldb, C + j, ldc, accumulate);
}

}  // namespace gemm_detail

// C[0:M, 0:N] (+)= A[0:M, 0:K] @ B[0:K, 0:N]; N must be a multiple of kLanes<T>.
template <typename T>
void matmul(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
            int64_t ldc, bool accumulate) {
  using namespace gemm_detail;
  constexpr int MR = kRows;
  int64_t i = 0;
  for (; i + MR <= M; i += MR) {
    row_block<T, MR>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
  }
  const T* a = A + i * lda;
  T* c = C + i * ldc;
  switch (M - i) {
    case 7: row_block<T, 7>(N, K, a, lda, B, ldb, c, ldc, accumulate); break;
    case 6: row_block<T, 6>(N, K, a, lda, B, ldb, c, ldc, accumulate); break;
    case 5: row_block<T, 5>(N, K, a, lda, B, ldb, c, ldc, accumulate); break;
    case 4: row_block<T, 4>(N, K, a, lda, B, ldb, c, ldc, accumulate); break;
    case 3: row_block<T, 3>(N, K, a, lda, B, ldb, c, ldc, accumulate); break;
    case 2: row_block<T, 2>(N, K, a, lda, B, ldb, c, ldc, accumulate); break;
    case 1: row_block<T, 1>(N, K, a, lda, B, ldb, c, ldc, accumulate); break;
    default: break;
  }
}

}  // namespace larnn
