// Entry points of the CPU kernel: dispatch to the widest build the CPU runs (linear_cpu.cpp).
#pragma once
#include <stdint.h>

namespace qra {
namespace cpu {
struct ForwardArgs {
  const float* x;          // [M, Kp] fp32, columns K..Kp-1 zero
  const int32_t* qweight;  // [Kp*bits/32, N]
  const uint16_t* scales;  // [Kp/g, N] fp16 or bf16 bits
  const uint16_t* zeros;   // [Kp/g, N]
  int scale_dtype;         // kFloat16 or kBFloat16
  int bits, group_size;
  int64_t M, N, K, Kp;
  const float* lora_A;     // [r, K] fp32 or null
  const float* lora_B;     // [N, r] fp32 or null
  int64_t rank;
  float scaling;
  const float* bias;       // [N] fp32 or null
  float* y;                // [M, N] fp32
};

struct BackwardArgs {
  const float* grad_out;   // [M, N] fp32
  const int32_t* qweight;
  const uint16_t* scales;
  const uint16_t* zeros;
  int scale_dtype;
  int bits, group_size;
  int64_t M, N, Kp;
  float* grad_x;           // [M, Kp] fp32 (the caller drops columns K..Kp-1)
};

void forward(const ForwardArgs& a, int threads);
void backward_dx(const BackwardArgs& a, int threads);
// "avx512bf16", "avx512", "avx2" or "generic": the instruction set the dispatcher uses on this CPU.
const char* isa();
}  // namespace cpu
}  // namespace qra
