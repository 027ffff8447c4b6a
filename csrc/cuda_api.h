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
  float* workspace;        // fp32, forward_workspace_floats(...) elements, any contents
  int* counters;           // forward_counter_ints(N) int32, zero before the first call; every
                           // call leaves them zero again. Calls that may run concurrently (other
                           // streams) need their own.
  void* stream;            // cudaStream_t (of `device`)
  int device;              // CUDA device index of every pointer above
};

// fp32 scratch of one forward call: the decode kernel's split-K partials, x·Aᵀ partials and
// x·Aᵀ (csrc/cuda/plan.h), or x·Aᵀ [M, r] for the tensor-core path.
int64_t forward_workspace_floats(int64_t M, int64_t N, int64_t Kp, int bits, int group_size,
                                 int64_t rank, int x_dtype, int device);
int64_t forward_counter_ints(int64_t N);

// Rows of x up to which the decode kernel is used; above it, the tensor-core kernel
// (fp16/bf16 x) — fp32 x always takes the decode kernel, 16 rows per pass (three bf16 planes).
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

// grad_x = grad_out · dequant(W)  (the LoRA terms are small matmuls done by the caller):
// the tensor-core kernel for fp16/bf16 grad_out, an fp32 SIMT kernel for fp32.
const char* linear_backward_dx(const BackwardArgs& a);

// Visible devices, or a negative number when the CUDA runtime cannot be initialised.
int device_count();

}  // namespace cuda
}  // namespace qra
