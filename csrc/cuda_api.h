// The host-side interface of the CUDA kernels (gemv.cu, gemm_mma.cu, backward.cu), included
// by bindings.cpp. Plain pointers and sizes only: no CUDA or torch headers here, so the
// bindings compile with the host compiler and the wheel does not depend on torch's ABI.
#pragma once
#include <stdint.h>

namespace qra {
namespace cuda {

struct LinearArgs {
  const void* x;           // [M, K], x_dtype, rows contiguous
  int x_dtype;             // qra::DType
  const int32_t* qweight;  // [Kp*bits/32, N]
  const uint16_t* scales;  // [Kp/g, N]
  const uint16_t* zeros;   // [Kp/g, N]
  int scale_dtype;
  int bits, group_size;
  int64_t M, N, K, Kp;
  const void* lora_A;      // [r, K] or null
  const void* lora_B;      // [N, r] or null
  int lora_dtype;
  int64_t rank;
  float scaling;
  const float* bias;       // [N] fp32 or null
  void* y;                 // [M, N], x_dtype
  float* workspace;        // fp32, forward_workspace_floats(M, N, rank) elements
  void* stream;            // cudaStream_t (of `device`)
  int device;              // CUDA device index of every pointer above
};

// fp32 scratch the forward needs: x·Aᵀ [M, r], and for the decode path the split-K partial
// sums [min(M, 16), N] and one arrival counter per 128 columns.
int64_t forward_workspace_floats(int64_t M, int64_t N, int64_t rank);

// Rows of x up to which the decode (GEMV) kernel is used; above it, the tensor-core kernel
// (fp16/bf16 x) — fp32 x always takes the GEMV kernel, 16 rows per pass.
constexpr int64_t kDecodeMaxRows = 16;

// nullptr on success, else an error message (a CUDA error string or a bad argument).
const char* linear_forward(const LinearArgs& a);

struct BackwardArgs {
  const void* grad_out;    // [M, N], dtype, rows contiguous
  int dtype;
  const int32_t* qweight;
  const uint16_t* scales;
  const uint16_t* zeros;
  int scale_dtype;
  int bits, group_size;
  int64_t M, N, Kp;
  float* grad_x;           // [M, Kp] fp32, every element written
  void* stream;            // cudaStream_t (of `device`)
  int device;
};

// grad_x = grad_out · dequant(W)  (the LoRA terms are small matmuls done by the caller).
const char* linear_backward_dx(const BackwardArgs& a);

// Visible devices, or a negative number when the CUDA runtime cannot be initialised.
int device_count();

}  // namespace cuda
}  // namespace qra
