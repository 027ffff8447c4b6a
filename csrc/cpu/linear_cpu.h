// Entry points of the CPU kernel: dispatch to the widest build the CPU runs (linear_cpu.cpp).
//
// Three paths compute the same product (the caller picks one per call; the Python side
// reads the measured table qra_kernels/configs/cpu_dispatch.json):
//   * kPathGemv  — the float GEMV of kernel.h: reads each packed word once per block of
//                  rows; exact fp32 arithmetic. Decode and small batches.
//   * kPathInt8  — int8.h: x quantized per row and group to int8, integer dot products of
//                  the codes (VNNI / AVX-VNNI vpdpbusd, AVX2 / AVX-512BW vpmaddubsw).
//                  Approximate in x (see int8.h for the error bound). Decode.
//   * kPathGemm  — gemm.h: cache-sized panels of W dequantized to fp32 and multiplied with
//                  a blocked register-tiled GEMM, LoRA as an extra K-slab. Prefill, training.
#pragma once
#include <stdint.h>

namespace qra {
namespace cpu {

enum Path : int { kPathGemv = 0, kPathInt8 = 1, kPathGemm = 2 };

struct ForwardArgs {
  const void* x;           // [M, K] rows ldx apart, x_dtype (fp32 / fp16 / bf16); columns
  int x_dtype;             //   K..Kp-1 are not read (the kernel pads with zeros)
  int64_t ldx;
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
  void* y;                 // [M, N] contiguous, y_dtype (fp32 / fp16 / bf16)
  int y_dtype;
};

struct BackwardArgs {
  const void* grad_out;    // [M, N] contiguous, g_dtype (fp32 / fp16 / bf16)
  int g_dtype;
  const int32_t* qweight;
  const uint16_t* scales;
  const uint16_t* zeros;
  int scale_dtype;
  int bits, group_size;
  int64_t M, N, K, Kp;
  // LoRA (optional): grad_x += scaling · (grad_out · lora_B) · lora_A, and grad_out · lora_B
  // is written to gb [M, r] (fp32, may be null) for the caller's grad_A.
  const float* lora_A;     // [r, K]
  const float* lora_B;     // [N, r]
  int64_t rank;
  float scaling;
  float* gb;
  float* grad_x;           // [M, K] contiguous fp32
};

// A panel of dequant(W)ᵀ for a GEMM library: out[(k − k0)·ldo + (n − n0)] = (code − z)·s
// for k in [k0, k1) (group aligned, k1 <= Kp) and n in [n0, n1), in bf16 (out_dtype
// kBFloat16, round to nearest even) or fp32. With `rows`, the same values as rows of
// dequant(W) itself: out[(n − n0)·ldo + (k − k0)]. The torch route of the large-M path
// (qra_kernels/backends/cpu_backend.py) multiplies such panels with torch's GEMM: rows for
// the forward (W's [out, in] layout, as F.linear's weight), the [k][n] panel for dX.
struct DequantArgs {
  const int32_t* qweight;
  const uint16_t* scales;
  const uint16_t* zeros;
  int scale_dtype;
  int bits, group_size;
  int64_t N, Kp;
  int64_t k0, k1, n0, n1;
  void* out;
  int out_dtype;
  int64_t ldo;
  bool rows;
};

// Throw-free: the binding validates everything first. `path` must be one of Path.
void forward(const ForwardArgs& a, int path, int threads);
void backward_dx(const BackwardArgs& a, int path, int threads);
void dequantize_panel(const DequantArgs& a, int threads);

// "avx512bf16", "avx512vnni", "avx512", "avx2vnni", "avx2" or "generic": the build the
// dispatcher uses on this CPU (QRA_CPU_ISA caps it, see linear_cpu.cpp).
const char* isa();
// Every build this CPU can run, widest first, comma-separated.
const char* runnable_isas();
}  // namespace cpu
}  // namespace qra
