// Backward dX: grad_x[m, k] = sum_n grad_out[m, n] · s[g, n] · (q[n, k] - z[g, n]).
//
// W is re-dequantized inside the kernels, tile by tile, and never materialised (the
// bitsandbytes habit of keeping a dequantized weight alive for backward is what this
// avoids). fp16/bf16 grad_out: the tensor-core kernel of csrc/cuda/tc_gemm.cuh (BWD = true).
// fp32 grad_out: the SIMT kernel below, in fp32 throughout (no 16-bit rounding of W). The
// reduction runs over n, the contiguous dimension of qweight, so:
//  * a block owns one 32-k chunk (one scale/zero per column) and MT rows of grad_out; its
//    threads stride over n, each loading the chunk's `bits` words of its column with
//    coalesced 4-byte loads, dequantizing the 32 codes once and using each for MT rows;
//  * per thread, MT x 32 fp32 accumulators; at the end a warp-shuffle tree and one pass
//    through shared memory reduce them over the block, and every grad_x element is
//    written exactly once (no atomics, no zero-fill needed).
// The scale varies along the reduction here, so the zero fold of the forward does not
// apply; the dequantized value (q - z)·s is formed in fp32.
#include "cuda/common.cuh"
#include "cuda/tc_gemm.cuh"

namespace qra {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 4;  // rows of grad_out per block (MT)

template <int B>
__global__ void __launch_bounds__(kThreads) backward_dx_kernel(const BackwardArgs a) {
  __shared__ float red[kWarps][kRows][32];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t chunk = blockIdx.x, m0 = (int64_t)blockIdx.y * kRows;
  const int64_t N = a.N, Kp = a.Kp, M = a.M;
  const int64_t g = chunk * 32 / a.group_size;

  float acc[kRows][32];
#pragma unroll
  for (int m = 0; m < kRows; ++m)
#pragma unroll
    for (int k = 0; k < 32; ++k) acc[m][k] = 0.f;

  for (int64_t n = tid; n < N; n += kThreads) {
    uint32_t w[B];
#pragma unroll
    for (int i = 0; i < B; ++i) w[i] = __ldg(a.qweight + chunk_word_row<B>(i, chunk, Kp) * N + n);
    const float s = load_half_bits(a.scales, g * N + n, a.scale_dtype);
    const float z = load_half_bits(a.zeros, g * N + n, a.scale_dtype);
    float d[kRows];
#pragma unroll
    for (int m = 0; m < kRows; ++m)
      d[m] = m0 + m < M ? load_act(a.grad_out, (m0 + m) * N + n, a.dtype) : 0.f;
#pragma unroll
    for (int k = 0; k < 32; ++k) {
      const float wv = (code_to_float(chunk_code<B, uint32_t>(w, k)) - z) * s;
#pragma unroll
      for (int m = 0; m < kRows; ++m) acc[m][k] = fmaf(d[m], wv, acc[m][k]);
    }
  }

#pragma unroll
  for (int m = 0; m < kRows; ++m)
#pragma unroll
    for (int k = 0; k < 32; ++k) {
      float v = acc[m][k];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0) red[warp][m][k] = v;
    }
  __syncthreads();
  if (tid < kRows * 32) {
    const int m = tid >> 5, k = tid & 31;
    float v = 0.f;
#pragma unroll
    for (int w2 = 0; w2 < kWarps; ++w2) v += red[w2][m][k];
    if (m0 + m < M) a.grad_x[(m0 + m) * Kp + chunk * 32 + k] = v;
  }
}

}  // namespace

const char* linear_backward_dx(const BackwardArgs& a) {
  if (a.M == 0) return nullptr;
  if (a.dtype != kFloat32 && a.dtype != kFloat16 && a.dtype != kBFloat16)
    return "grad_out must be float32, float16 or bfloat16";
  if (const char* e = cuda_error(cudaSetDevice(a.device))) return e;
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  if (a.dtype != kFloat32) {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, a.device);
    if (major < 8) return "the qra CUDA kernels need an sm_80 or newer GPU (mma.m16n8k16, cp.async)";
    const auto aligned16 = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15) == 0; };
    tc::Params p{};
    p.act = a.grad_out;
    p.act_dtype = a.dtype;
    p.M = a.M;
    p.N = a.N;
    p.K = a.Kp;
    p.Kp = a.Kp;
    p.qweight = a.qweight;
    p.scales = a.scales;
    p.zeros = a.zeros;
    p.scale_dtype = a.scale_dtype;
    p.bits = a.bits;
    p.group_size = a.group_size;
    p.aligned = a.N % 8 == 0 && aligned16(a.grad_out) && aligned16(a.qweight) &&
                aligned16(a.scales) && aligned16(a.zeros);
    p.grad_x = a.grad_x;
    switch (a.bits) {
      case 2: return tc::launch<2, true>(p, stream);
      case 3: return tc::launch<3, true>(p, stream);
      case 4: return tc::launch<4, true>(p, stream);
      case 8: return tc::launch<8, true>(p, stream);
    }
    return "unsupported bits";
  }
  const int64_t row_blocks = (a.M + kRows - 1) / kRows;
  if (row_blocks > 65535) return "too many rows of grad_out for one launch (max 262140)";
  const dim3 grid((unsigned)(a.Kp / 32), (unsigned)row_blocks);
  switch (a.bits) {
    case 2: backward_dx_kernel<2><<<grid, kThreads, 0, stream>>>(a); break;
    case 3: backward_dx_kernel<3><<<grid, kThreads, 0, stream>>>(a); break;
    case 4: backward_dx_kernel<4><<<grid, kThreads, 0, stream>>>(a); break;
    case 8: backward_dx_kernel<8><<<grid, kThreads, 0, stream>>>(a); break;
    default: return "unsupported bits";
  }
  return cuda_error(cudaGetLastError());
}

}  // namespace cuda
}  // namespace qra
