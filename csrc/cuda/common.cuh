// Helpers shared by the CUDA kernels (decode.cuh, tc_gemm.cuh, backward.cu, linear_cuda.cu):
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
// keeps the number of template instantiations — and the compile time — down; the main loops
// never call these (they read 16-bit x as raw bits).
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

inline const char* cuda_error(cudaError_t e) {
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace cuda
}  // namespace qra
