// Helpers shared by the CUDA kernels (gemv.cu, gemm_mma.cu, backward.cu, linear_cuda.cu):
// activation loads/stores by dtype code, and the launch-facing parameter structs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "../cuda_api.h"
#include "../dequant.cuh"

namespace qra {
namespace cuda {

// Activations, LoRA factors and gradients arrive in any of fp32/fp16/bf16; the kernels do
// their arithmetic in fp32 (the tensor-core kernel multiplies 16-bit operands exactly and
// accumulates in fp32). A runtime switch on the dtype costs one uniform branch per load and
// keeps the number of template instantiations — and the compile time — down.
__device__ __forceinline__ float load_act(const void* p, int64_t i, int dtype) {
  switch (dtype) {
    case kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_act(void* p, int64_t i, int dtype, float v) {
  switch (dtype) {
    case kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

__device__ __forceinline__ float load_half_bits(const uint16_t* p, int64_t i, int dtype) {
  return half_to_float(p[i], dtype);
}

// y[m, n] = acc + scaling · xa[m, :]·B[n, :] + bias[n], stored once in x's dtype: the LoRA
// epilogue every forward kernel ends with (xa = x·Aᵀ was computed once per call by
// lora_xa_kernel, so each output reads r floats of xa and r values of B).
__device__ __forceinline__ void store_output(const LinearArgs& a, const float* xa, int64_t m,
                                             int64_t n, float acc) {
  if (a.rank > 0) {
    float d = 0.f;
    for (int64_t r = 0; r < a.rank; ++r)
      d = fmaf(xa[m * a.rank + r], load_act(a.lora_B, n * a.rank + r, a.lora_dtype), d);
    acc = fmaf(a.scaling, d, acc);
  }
  if (a.bias) acc += a.bias[n];
  store_act(a.y, m * a.N + n, a.x_dtype, acc);
}

// Launchers (each returns nullptr or an error string).
const char* launch_gemv(const LinearArgs& a, const float* xa, float* partial, int sm_count,
                        cudaStream_t stream);
const char* launch_gemm_mma(const LinearArgs& a, const float* xa, cudaStream_t stream);

inline const char* cuda_error(cudaError_t e) {
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace cuda
}  // namespace qra
