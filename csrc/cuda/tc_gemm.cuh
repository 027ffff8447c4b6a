// Tensor-core GEMMs with the dequantization in the main loop (sm_80+, fp16/bf16 activations):
//   forward  (BWD = false): y[M, N]  = x[M, K]  · dequant(W)ᵀ  (+ LoRA epilogue + bias), M > 16
//   backward (BWD = true):  dx[M, Kp] = dy[M, N] · dequant(W)   (fp32 out; LoRA terms by torch)
// Instantiated in csrc/gemm_mma.cu and csrc/backward.cu.
//
// One kernel shape for both. A block computes a 64 x 128 output tile with 8 warps (32 x 32
// each, mma.m16n8k16, fp32 accumulators), walking the reduction 32 at a time through a
// 4-stage cp.async ring (LDGSTS, 16-byte pieces, zero-filled past the edges) that holds, per
// stage, the activation tile (64 x 32) and the packed words and scales of the W tile — the
// packed words are the only weight bytes read, and never more than once per block.
// Per stage the block dequantizes its 32 x 128 codes once into a 16-bit tile Wd — (q - z)·s
// in the activations' type, natural k order (magic::natural8: PRMT + LOP3 + one packed FMA
// per two codes, then HSUB2/HMUL2) — and every warp reads its fragments with ldmatrix:
// the activations' (row-major A) and Wd's, plain for the forward (Wd rows are n, k
// contiguous: the "col" B operand) and transposed for the backward (the reduction runs over
// n, Wd's rows). Row pitches are padded (80 and 272 bytes) so that ldmatrix's eight 16-byte
// rows fall in distinct banks. No local memory: every array is indexed by unrolled constants.
// Rounding: W is rounded to x's 16-bit type before the multiply, as every dense 16-bit
// kernel (and the Triton path) does; products and sums are fp32.
#pragma once

#include <type_traits>

#include "common.cuh"
#include "decode.cuh"  // cp.async and mma wrappers
#include "magic.cuh"

namespace qra {
namespace cuda {
namespace tc {

constexpr int kThreads = 256;
constexpr int kBM = 64, kBO = 128, kBR = 32, kStages = 4;
constexpr int kPitchA = 40;     // halves per activation row in shared memory (32 + 8)
constexpr int kPitchWf = 40;    // Wd [128 n][32 k] (forward)
constexpr int kPitchWb = 136;   // Wd [32 n][128 k] (backward)

struct Params {
  const void* act;          // x [M, K] (forward) or dy [M, N] (backward), 16-bit
  int act_dtype;
  int64_t M, N, K, Kp;
  const int32_t* qweight;
  const uint16_t* scales;
  const uint16_t* zeros;
  int scale_dtype, bits, group_size;
  bool aligned;             // 16-byte pieces are valid (row lengths % 8, pointers aligned)
  // forward epilogue
  void* y;
  const float* xa;          // [M, rank] fp32 (x·Aᵀ) or null
  const void* lora_B;       // [N, rank]
  int lora_dtype;
  int64_t rank;
  float scaling;
  const float* bias;
  // backward output
  float* grad_x;            // [M, Kp]
};

template <int B>
struct Sizes {
  static constexpr int kA = kBM * kPitchA * 2;  // bytes of one stage's activation tile
  static constexpr int kW = 512 * B;            // packed words of one stage
  static constexpr int kSZ = 512;               // scales and zeros of one stage
  static constexpr int kStage = kA + kW + kSZ;
  static constexpr int kWd = (kBO * kPitchWf > kBR * kPitchWb ? kBO * kPitchWf : kBR * kPitchWb) * 2;
  static constexpr int kSmem = kStages * kStage + kWd;
};

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(decode::smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(decode::smem_addr(p)));
}

// A scale/zero (stored fp16 or bf16) as a half2 of x's 16-bit type.
template <bool BF16>
__device__ __forceinline__ uint32_t sz_half2(uint16_t h, int scale_dtype) {
  const bool same = (scale_dtype == kBFloat16) == BF16;
  if (same) return magic::dup(h);
  const float f = half_to_float(h, scale_dtype);
  const uint32_t b = BF16 ? magic::float_to_bf16_bits(f) : (uint32_t)__half_as_ushort(__float2half_rn(f));
  return magic::dup(b);
}

// Two blocks of 256 threads per SM: <= 128 registers a thread (32 of them accumulators).
template <int B, bool BF16, bool BWD>
__global__ void __launch_bounds__(kThreads, 2) tc_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using S = Sizes<B>;
  extern __shared__ uint4 smem4[];
  char* smem = reinterpret_cast<char*>(smem4);
  uint16_t* wd = reinterpret_cast<uint16_t*>(smem + kStages * S::kStage);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, grp = lane >> 2, tig = lane & 3;
  const int wm = warp >> 2, wo = warp & 3;
  const int64_t M = p.M, N = p.N, Kp = p.Kp;
  const int64_t m0 = (int64_t)blockIdx.y * kBM;
  const int64_t o0 = (int64_t)blockIdx.x * kBO;  // first output column (n forward, k backward)
  const int64_t R = BWD ? N : p.K;                 // valid reduction length of the activations
  const int64_t ld = BWD ? N : p.K;                // activation row stride
  const int64_t steps = BWD ? (N + kBR - 1) / kBR : Kp / kBR;
  const uint16_t* act = static_cast<const uint16_t*>(p.act);

  // ---- one stage of the ring: activation tile, packed words, scales and zeros -----------
  // `aligned` is a compile-time constant (the loop below exists twice): the copies of the
  // unaligned path are unrolled, so each version of the main loop is one straight loop.
  auto issue = [&](int64_t it, auto aligned_c) {
    constexpr bool kAligned = decltype(aligned_c)::value;
    if (it >= steps) return;
    char* st = smem + (it % kStages) * S::kStage;
    uint16_t* sa = reinterpret_cast<uint16_t*>(st);
    uint32_t* sw = reinterpret_cast<uint32_t*>(st + S::kA);
    uint16_t* ssz = reinterpret_cast<uint16_t*>(st + S::kA + S::kW);
    const int64_t r0 = it * kBR;
    if constexpr (kAligned) {
      {  // activations: 64 rows x 4 pieces of 8
        const int row = tid >> 2, piece = tid & 3;
        const int64_t m = m0 + row, k = r0 + 8 * piece;
        const bool ok = m < M && k < R;
        decode::cp_async16(sa + row * kPitchA + 8 * piece, act + (ok ? m * ld + k : 0), ok);
      }
      if (tid < 32 * B) {
        int64_t wrow, n;
        bool ok;
        if constexpr (!BWD) {  // B word rows x 128 columns: 32 pieces a row
          const int row = tid >> 5, piece = tid & 31;
          wrow = chunk_word_row<B>(row, it, Kp);
          n = o0 + 4 * piece;
          ok = n < N;
          decode::cp_async16(sw + row * kBO + 4 * piece, p.qweight + (ok ? wrow * N + n : 0), ok);
        } else {  // 4 chunks x B rows x 32 columns: 8 pieces a row
          const int cr = tid >> 3, piece = tid & 7;
          const int64_t chunk = o0 / 32 + cr / B;
          wrow = chunk_word_row<B>(cr % B, chunk, Kp);
          n = r0 + 4 * piece;
          ok = n < N && chunk < Kp / 32;
          decode::cp_async16(sw + cr * 32 + 4 * piece, p.qweight + (ok ? wrow * N + n : 0), ok);
        }
      }
      if constexpr (!BWD) {
        if (tid < 32) {  // s (pieces 0-15), z (16-31) of the stage's group, 128 columns
          const int piece = tid & 15;
          const int64_t g = r0 / p.group_size, n = o0 + 8 * piece;
          const bool ok = n < N;
          const uint16_t* src = (tid < 16 ? p.scales : p.zeros) + (ok ? g * N + n : 0);
          decode::cp_async16(ssz + 128 * (tid >> 4) + 8 * piece, src, ok);
        }
      } else {
        const int gpt = kBO / p.group_size;  // groups in the 128 k (1, 2 or 4)
        if (tid < 8 * gpt) {  // [gl][s|z][32 columns]: 4 pieces each
          const int gl = tid >> 3, which = (tid >> 2) & 1, piece = tid & 3;
          const int64_t g = o0 / p.group_size + gl, n = r0 + 8 * piece;
          const bool ok = n < N && g < Kp / p.group_size;
          const uint16_t* src = (which ? p.zeros : p.scales) + (ok ? g * N + n : 0);
          decode::cp_async16(ssz + 64 * gl + 32 * which + 8 * piece, src, ok);
        }
      }
    } else {  // unaligned rows: synchronous element copies (ordered by the barrier)
#pragma unroll
      for (int j = 0; j < kBM * kBR / kThreads; ++j) {
        const int i = tid + kThreads * j;
        const int row = i / kBR, kk = i % kBR;
        const int64_t m = m0 + row, k = r0 + kk;
        sa[row * kPitchA + kk] = (m < M && k < R) ? act[m * ld + k] : (uint16_t)0;
      }
#pragma unroll
      for (int j = 0; j < 128 * B / kThreads + (128 * B % kThreads != 0); ++j) {
        const int i = tid + kThreads * j;
        if (i < 128 * B) {
        if constexpr (!BWD) {
          const int row = i / kBO, col = i % kBO;
          const int64_t n = o0 + col;
          sw[row * kBO + col] =
              n < N ? (uint32_t)p.qweight[chunk_word_row<B>(row, it, Kp) * N + n] : 0u;
        } else {
          const int cr = i / 32, col = i % 32;
          const int64_t chunk = o0 / 32 + cr / B, n = r0 + col;
          sw[cr * 32 + col] = (n < N && chunk < Kp / 32)
                                  ? (uint32_t)p.qweight[chunk_word_row<B>(cr % B, chunk, Kp) * N + n]
                                  : 0u;
        }
        }
      }
      if constexpr (!BWD) {
        const int i = tid;  // 256 threads: s of 128 columns, then z
        const int64_t g = r0 / p.group_size, n = o0 + (i & 127);
        ssz[i] = n < N ? (i < 128 ? p.scales : p.zeros)[g * N + n] : (uint16_t)0;
      } else {
        const int gpt = kBO / p.group_size;
        const int i = tid;  // up to 4 groups x (s, z) x 32 columns = 256
        if (i < 64 * gpt) {
          const int gl = i / 64, which = (i / 32) & 1, col = i % 32;
          const int64_t g = o0 / p.group_size + gl, n = r0 + col;
          ssz[i] = (n < N && g < Kp / p.group_size) ? (which ? p.zeros : p.scales)[g * N + n]
                                                     : (uint16_t)0;
        }
      }
    }
  };

  // ---- dequantize one stage's W tile into wd ------------------------------------------
  auto dequant = [&](int64_t it) {
    const char* st = smem + (it % kStages) * S::kStage;
    const uint32_t* sw = reinterpret_cast<const uint32_t*>(st + S::kA);
    const uint16_t* ssz = reinterpret_cast<const uint16_t*>(st + S::kA + S::kW);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int item = tid + kThreads * j;
      int n, oct, szi;
      const uint32_t* words;
      int stride;
      uint16_t* dst;
      if constexpr (!BWD) {  // 128 columns x 4 octets
        n = item & 127;
        oct = item >> 7;
        words = sw + n;
        stride = kBO;
        szi = n;
        dst = wd + n * kPitchWf + 8 * oct;
      } else {  // 32 columns x (4 chunks x 4 octets)
        n = item & 31;
        const int o = item >> 5;
        oct = o & 3;
        words = sw + (o >> 2) * B * 32 + n;
        stride = 32;
        szi = 64 * (((o >> 2) * 32) / p.group_size) + n;
        dst = wd + n * kPitchWb + 8 * o;
      }
      uint32_t q[4];
      magic::natural8<B, BF16>(words, stride, oct, q);
      const uint32_t s2 = sz_half2<BF16>(ssz[szi], p.scale_dtype);
      const uint32_t z2 = sz_half2<BF16>(ssz[szi + (BWD ? 32 : 128)], p.scale_dtype);
#pragma unroll
      for (int u = 0; u < 4; ++u) q[u] = magic::h2_mul<BF16>(magic::h2_sub<BF16>(q[u], z2), s2);
      *reinterpret_cast<uint4*>(dst) = make_uint4(q[0], q[1], q[2], q[3]);
      // One octet at a time (a compiler-only fence: the second octet's loads are not hoisted
      // above the first one's store), so its temporaries do not pile up on the accumulators.
      asm volatile("" ::: "memory");
    }
  };

  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

  auto run = [&](auto aligned_c) {
#pragma unroll 1
    for (int s = 0; s < kStages - 1; ++s) {
      issue(s, aligned_c);
      decode::cp_async_commit();
    }
#pragma unroll 1
    for (int64_t it = 0; it < steps; ++it) {
      decode::cp_async_wait<kStages - 2>();
      __syncthreads();  // the stage landed for every thread; wd and stage it-1 are free
      issue(it + kStages - 1, aligned_c);
      decode::cp_async_commit();
      dequant(it);
      __syncthreads();
      const uint16_t* sa = reinterpret_cast<const uint16_t*>(smem + (it % kStages) * S::kStage);
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        uint32_t af[2][4];
#pragma unroll
        for (int i = 0; i < 2; ++i)
          ldmatrix_x4(af[i], sa + (32 * wm + 16 * i + (lane & 15)) * kPitchA + 16 * ks + 8 * (lane >> 4));
        uint32_t bf[4][2];
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {  // n8 tiles 2jj, 2jj + 1
          uint32_t r[4];
          const int blk = lane >> 3, row = lane & 7;
          if constexpr (!BWD) {
            ldmatrix_x4(r, wd + (32 * wo + 8 * (2 * jj + (blk >> 1)) + row) * kPitchWf + 16 * ks + 8 * (blk & 1));
          } else {
            ldmatrix_x4_trans(r, wd + (16 * ks + 8 * (blk & 1) + row) * kPitchWb + 32 * wo + 8 * (2 * jj + (blk >> 1)));
          }
          bf[2 * jj][0] = r[0]; bf[2 * jj][1] = r[1]; bf[2 * jj + 1][0] = r[2]; bf[2 * jj + 1][1] = r[3];
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) decode::mma<BF16>(acc[i][j], af[i], bf[j][0], bf[j][1]);
      }
    }
  };
  if (p.aligned) run(std::integral_constant<bool, true>{});
  else run(std::integral_constant<bool, false>{});
  decode::cp_async_wait<0>();

  // ---- epilogue -------------------------------------------------------------------------
  // acc[i][j][r]: row m0 + 32wm + 16i + grp + 8(r >> 1), column o0 + 32wo + 8j + 2tig + (r & 1).
  if constexpr (BWD) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t m = m0 + 32 * wm + 16 * i + grp + 8 * h;
          const int64_t k = o0 + 32 * wo + 8 * j + 2 * tig;
          if (m < M && k < Kp)
            *reinterpret_cast<float2*>(p.grad_x + m * Kp + k) = make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
        }
  } else {
    // LoRA: scaling · xa[m, :]·B[n, :], rank in chunks of 32 staged in shared memory.
    if (p.rank > 0) {
      __syncthreads();
      float* xs = reinterpret_cast<float*>(smem);   // [64][33]
      float* bs = xs + kBM * 33;                    // [128][33]
      float lora[2][4][4];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) lora[i][j][r] = 0.f;
      for (int64_t r0 = 0; r0 < p.rank; r0 += 32) {
        for (int i = tid; i < kBM * 32; i += kThreads) {
          const int row = i >> 5, rr = i & 31;
          const int64_t m = m0 + row, r = r0 + rr;
          xs[row * 33 + rr] = (m < M && r < p.rank) ? p.xa[m * p.rank + r] : 0.f;
        }
        for (int i = tid; i < kBO * 32; i += kThreads) {
          const int col = i >> 5, rr = i & 31;
          const int64_t n = o0 + col, r = r0 + rr;
          bs[col * 33 + rr] = (n < N && r < p.rank) ? load_act(p.lora_B, n * p.rank + r, p.lora_dtype) : 0.f;
        }
        __syncthreads();
#pragma unroll 4
        for (int rr = 0; rr < 32; ++rr) {
          float xv[2][2], bv[4][2];
#pragma unroll
          for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) xv[i][h] = xs[(32 * wm + 16 * i + grp + 8 * h) * 33 + rr];
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) bv[j][e] = bs[(32 * wo + 8 * j + 2 * tig + e) * 33 + rr];
#pragma unroll
          for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
              for (int r = 0; r < 4; ++r) lora[i][j][r] = fmaf(xv[i][r >> 1], bv[j][r & 1], lora[i][j][r]);
        }
        __syncthreads();
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[i][j][r] = fmaf(p.scaling, lora[i][j][r], acc[i][j][r]);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int64_t m = m0 + 32 * wm + 16 * i + grp + 8 * (r >> 1);
          const int64_t n = o0 + 32 * wo + 8 * j + 2 * tig + (r & 1);
          if (m < M && n < N)
            store_act(p.y, m * N + n, p.act_dtype, acc[i][j][r] + (p.bias ? p.bias[n] : 0.f));
        }
  }
#endif
}

template <int B, bool BWD>
const char* launch(const Params& p, cudaStream_t stream) {
  const int64_t out_cols = BWD ? p.Kp : p.N;
  const dim3 grid((unsigned)((out_cols + kBO - 1) / kBO), (unsigned)((p.M + kBM - 1) / kBM));
  if ((p.M + kBM - 1) / kBM > 65535) return "too many rows for one launch";
  const int smem = Sizes<B>::kSmem;
  auto run = [&](auto kernel) -> const char* {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return cudaGetErrorString(e);
    kernel<<<grid, kThreads, smem, stream>>>(p);
    return cuda_error(cudaGetLastError());
  };
  if (p.act_dtype == kBFloat16) return run(tc_kernel<B, true, BWD>);
  if (p.act_dtype == kFloat16) return run(tc_kernel<B, false, BWD>);
  return "the tensor-core kernels take fp16 or bf16 activations";
}

}  // namespace tc
}  // namespace cuda
}  // namespace qra
