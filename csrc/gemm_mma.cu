// Tensor-core kernel for M > 16 rows of fp16/bf16 x (sm_80+): y = x·dequant(W)ᵀ + LoRA + bias,
// with the dequantization in the main loop (Marlin's idea: the packed words are the only
// weight bytes read; no dense copy of W ever exists).
//
// Tile: 64 rows x 64 columns per block, 4 warps of 32x32, K walked in 32-k chunks; each
// warp issues mma.sync.m16n8k16 (fp32 accumulate) on 2 x 4 sub-tiles, two k-steps a chunk.
// The tricks, where they are used below:
//  * The tensor cores multiply the *integer codes*, not dequantized weights: every code is
//    <= 255, exact in fp16 and bf16, so x·q is exact per product, and the scale and zero are
//    applied per chunk in fp32 registers —
//      sum_k x_k (q_k - z) s = s · (sum_k x_k q_k - z · sum_k x_k)
//    — with sum_k x_k of each row and chunk computed while x is staged. No rounding of
//    (q - z)·s to 16 bits, so the result is closer to the fp32 reference than a kernel that
//    dequantizes to fp16/bf16 first.
//  * Fragments are read from shared memory with 32-bit loads in the register layout the
//    PTX ISA gives for m16n8k16 (A row-major, B "col" = W's [n][k] rows); rows are padded
//    by 8 halves (80 bytes) so the 8 row-groups of a fragment land in distinct banks.
//  * The LoRA term and the bias are added in the epilogue, on the fp32 accumulators, and
//    y is written once.
// This is the straightforward single-stage version (no cp.async pipeline yet).
#include "cuda/common.cuh"

namespace qra {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kBM = 64, kBN = 64, kBK = 32;
constexpr int kPad = 8;  // halves
constexpr int kLd = kBK + kPad;

template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// A small integer (a code) or an activation value as 16-bit bits of the mma's dtype.
template <bool BF16>
__device__ __forceinline__ uint16_t to_bits16(float v) {
  if constexpr (BF16) return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  else return __half_as_ushort(__float2half_rn(v));
}

template <bool BF16>
__device__ __forceinline__ float from_bits16(uint16_t h) {
  return BF16 ? bf16_to_float(h) : fp16_to_float(h);
}

template <int B, bool BF16>
__global__ void __launch_bounds__(kThreads) gemm_mma_kernel(const LinearArgs a, const float* xa) {
  __shared__ __align__(16) uint16_t As[kBM][kLd];
  __shared__ __align__(16) uint16_t Bs[kBN][kLd];
  __shared__ float s_scale[kBN], s_zero[kBN], s_xsum[kBM];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int grp = lane >> 2, tig = lane & 3;  // PTX fragment "groupID" / "threadID_in_group"
  const int warp_m = (warp >> 1) * 32, warp_n = (warp & 1) * 32;
  const int64_t m_base = (int64_t)blockIdx.y * kBM, n_base = (int64_t)blockIdx.x * kBN;
  const int64_t M = a.M, N = a.N, K = a.K, Kp = a.Kp;
  const uint16_t* x = static_cast<const uint16_t*>(a.x);

  float out[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) out[i][j][e] = 0.f;

  // Staging roles: x row `row` (two threads a row, 16 k each); W column `col` (two threads
  // a column, 16 k each).
  const int row = tid >> 1, half = tid & 1;
  const int col = tid & 63, khalf = tid >> 6;
  const int64_t m = m_base + row, n = n_base + col;

  for (int64_t chunk = 0; chunk < Kp / kBK; ++chunk) {
    // --- stage x: 16 values, and their fp32 sum for the zero-point fold.
    float xsum = 0.f;
    {
      const int64_t k0 = chunk * kBK + half * 16;
      uint32_t* dst = reinterpret_cast<uint32_t*>(&As[row][half * 16]);
#pragma unroll
      for (int kk = 0; kk < 16; kk += 2) {
        uint16_t lo = 0, hi = 0;
        if (m < M) {
          if (k0 + kk < K) lo = x[m * K + k0 + kk];
          if (k0 + kk + 1 < K) hi = x[m * K + k0 + kk + 1];
        }
        xsum += from_bits16<BF16>(lo) + from_bits16<BF16>(hi);
        dst[kk / 2] = (uint32_t)lo | ((uint32_t)hi << 16);
      }
      xsum += __shfl_xor_sync(0xffffffffu, xsum, 1);  // the row's other half
      if (half == 0) s_xsum[row] = xsum;
    }
    // --- stage W: the chunk's `B` words of column n, codes of this thread's 16 k as exact
    // 16-bit integers.
    {
      uint32_t w[B];
#pragma unroll
      for (int i = 0; i < B; ++i)
        w[i] = n < N ? __ldg(a.qweight + chunk_word_row<B>(i, chunk, Kp) * N + n) : 0u;
      uint32_t* dst = reinterpret_cast<uint32_t*>(&Bs[col][khalf * 16]);
#pragma unroll
      for (int kk = 0; kk < 16; kk += 2) {
        const int k = khalf * 16 + kk;
        const uint16_t lo = to_bits16<BF16>(code_to_float(chunk_code<B, uint32_t>(w, k)));
        const uint16_t hi = to_bits16<BF16>(code_to_float(chunk_code<B, uint32_t>(w, k + 1)));
        dst[kk / 2] = (uint32_t)lo | ((uint32_t)hi << 16);
      }
      if (khalf == 0) {
        const int64_t g = chunk * kBK / a.group_size;
        s_scale[col] = n < N ? load_half_bits(a.scales, g * N + n, a.scale_dtype) : 0.f;
        s_zero[col] = n < N ? load_half_bits(a.zeros, g * N + n, a.scale_dtype) : 0.f;
      }
    }
    __syncthreads();

    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      uint32_t af[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = warp_m + i * 16 + grp;
        af[i][0] = *reinterpret_cast<const uint32_t*>(&As[r][ks + 2 * tig]);
        af[i][1] = *reinterpret_cast<const uint32_t*>(&As[r + 8][ks + 2 * tig]);
        af[i][2] = *reinterpret_cast<const uint32_t*>(&As[r][ks + 2 * tig + 8]);
        af[i][3] = *reinterpret_cast<const uint32_t*>(&As[r + 8][ks + 2 * tig + 8]);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = warp_n + j * 8 + grp;
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(&Bs[c][ks + 2 * tig]);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(&Bs[c][ks + 2 * tig + 8]);
#pragma unroll
        for (int i = 0; i < 2; ++i) mma_16816<BF16>(acc[i][j], af[i], b0, b1);
      }
    }
    // Fold this chunk's scale and zero (accumulator layout: c0,c1 at row grp, columns
    // 2·tig and 2·tig+1; c2,c3 eight rows below).
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = warp_m + i * 16 + grp + 8 * (e >> 1);
          const int c = warp_n + j * 8 + 2 * tig + (e & 1);
          out[i][j][e] = fmaf(s_scale[c], acc[i][j][e] - s_zero[c] * s_xsum[r], out[i][j][e]);
        }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t mm = m_base + warp_m + i * 16 + grp + 8 * (e >> 1);
        const int64_t nn = n_base + warp_n + j * 8 + 2 * tig + (e & 1);
        if (mm < M && nn < N) store_output(a, xa, mm, nn, out[i][j][e]);
      }
}

template <int B>
const char* launch_bits(const LinearArgs& a, const float* xa, cudaStream_t stream) {
  const dim3 grid((unsigned)((a.N + kBN - 1) / kBN), (unsigned)((a.M + kBM - 1) / kBM));
  if (a.x_dtype == kBFloat16)
    gemm_mma_kernel<B, true><<<grid, kThreads, 0, stream>>>(a, xa);
  else
    gemm_mma_kernel<B, false><<<grid, kThreads, 0, stream>>>(a, xa);
  return cuda_error(cudaGetLastError());
}

}  // namespace

const char* launch_gemm_mma(const LinearArgs& a, const float* xa, cudaStream_t stream) {
  if (a.x_dtype != kFloat16 && a.x_dtype != kBFloat16)
    return "the tensor-core kernel takes fp16 or bf16 activations";
  if ((a.M + kBM - 1) / kBM > 65535) return "too many rows for one launch";
  switch (a.bits) {
    case 2: return launch_bits<2>(a, xa, stream);
    case 3: return launch_bits<3>(a, xa, stream);
    case 4: return launch_bits<4>(a, xa, stream);
    case 8: return launch_bits<8>(a, xa, stream);
  }
  return "unsupported bits";
}

}  // namespace cuda
}  // namespace qra
