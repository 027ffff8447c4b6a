// Host entry points of the CUDA kernels (cuda_api.h): the forward dispatch by M and dtype,
// the x·Aᵀ pre-pass of the fused LoRA epilogue, workspace sizing and device queries.
#include "cuda/common.cuh"

namespace qra {
namespace cuda {
namespace {

constexpr int kGemvCols = 128;

// xa[m, r] = sum_k x[m, k] · A[r, k] in fp32: one block per (r, m), a block-wide sum.
// Tiny next to the main kernel (r·K per row), and computing it once per call is what lets
// the epilogue add the LoRA term with r multiply-adds per output.
__global__ void __launch_bounds__(128) lora_xa_kernel(const LinearArgs a, float* xa) {
  __shared__ float warp_sums[4];
  const int64_t r = blockIdx.x, m = blockIdx.y;
  float s = 0.f;
  for (int64_t k = threadIdx.x; k < a.K; k += blockDim.x)
    s = fmaf(load_act(a.x, m * a.K + k, a.x_dtype), load_act(a.lora_A, r * a.K + k, a.lora_dtype), s);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) xa[m * a.rank + r] = warp_sums[0] + warp_sums[1] + warp_sums[2] + warp_sums[3];
}

struct DeviceInfo {
  int sm_count = 0, major = 0;
};

// Queried once per device (cudaDeviceGetAttribute is cheap, but not free per call).
DeviceInfo device_info(int device) {
  static DeviceInfo cache[64];
  if (device < 0 || device >= 64) return DeviceInfo{};
  DeviceInfo& d = cache[device];
  if (d.sm_count == 0) {
    cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device);
  }
  return d;
}

}  // namespace

int64_t forward_workspace_floats(int64_t M, int64_t N, int64_t rank) {
  const int64_t rows = M < kDecodeMaxRows ? M : kDecodeMaxRows;
  // xa, the split-K partials of one pass, then the arrival counters (ints, same size).
  return M * rank + rows * N + (N + kGemvCols - 1) / kGemvCols + 4;
}

const char* linear_forward(const LinearArgs& a) {
  if (a.M == 0) return nullptr;
  for (int dt : {a.x_dtype, a.rank > 0 ? a.lora_dtype : kFloat32})
    if (dt != kFloat32 && dt != kFloat16 && dt != kBFloat16)
      return "activations and LoRA factors must be float32, float16 or bfloat16";
  if (a.rank > 0 && a.M > 65535) return "too many rows of x for the LoRA pre-pass (max 65535)";
  // Our (statically linked) runtime keeps its own current device: set it to the tensors'.
  if (const char* e = cuda_error(cudaSetDevice(a.device))) return e;
  const DeviceInfo info = device_info(a.device);
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  float* xa = a.workspace;
  float* partial = a.workspace + a.M * a.rank;
  if (a.rank > 0) {
    lora_xa_kernel<<<dim3((unsigned)a.rank, (unsigned)a.M), 128, 0, stream>>>(a, xa);
    if (const char* e = cuda_error(cudaGetLastError())) return e;
  }
  // Decode sizes, and fp32 x (the tensor cores take 16-bit operands), go to the GEMV
  // kernel; more rows of fp16/bf16 x on sm_80+ to the tensor-core kernel.
  const bool mma = a.M > kDecodeMaxRows && a.x_dtype != kFloat32 && info.major >= 8;
  if (mma) return launch_gemm_mma(a, xa, stream);
  return launch_gemv(a, xa, partial, info.sm_count > 0 ? info.sm_count : 1, stream);
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device / no driver" error
    return -1;
  }
  return n;
}

}  // namespace cuda
}  // namespace qra
