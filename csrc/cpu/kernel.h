// The CPU kernel for small M: y = x·dequant(W)ᵀ (+ scaling·(x·Aᵀ)·Bᵀ + bias), and the dX of
// the backward, gx = dY·dequant(W). Included once per instruction set by linear_avx2.cpp
// (built with -mavx2 -mfma -mf16c) and linear_generic.cpp (baseline x86-64 / any CPU),
// each inside its own namespace QRA_CPU_NS; linear_cpu.cpp picks one at run time.
//
// Vectorisation is written with GCC/Clang vector extensions (8 x 32-bit lanes), not
// intrinsics: the same source becomes AVX2 code in one build and SSE2/NEON/scalar code in
// the other, and — the point — the lane type goes through the very same templated
// primitives of ../dequant.cuh that the CUDA kernels call with a uint32_t.
//
// Why this loop order (forward):
//  * qweight is [Kp*bits/32, N] with N contiguous, so 8 lanes = 8 adjacent output
//    columns: one aligned 32-byte load gives the words of 8 columns and each shift+mask
//    yields 8 codes. No horizontal reductions are needed.
//  * The zero point is folded out of the inner loop: per group,
//      sum_k x_k (q_k - z) s = s · (sum_k x_k q_k - z · sum_k x_k),
//    so the inner loop is one convert and one FMA per code, and sum_k x_k per group is
//    computed once per row of x (xsum).
//  * A block is 16 columns (two vectors): a full 64-byte cache line of each word row.
//    Rows of x are taken MT (1, 2 or 4) at a time inside the block, so for M > 4 the block's
//    weights are re-read from L1/L2, not from memory.
//  * Threads split the columns into contiguous ranges (no write sharing).
#pragma once

#include <stdint.h>
#include <string.h>

#include "../dequant.cuh"
#include "linear_cpu.h"

#ifndef QRA_CPU_NS
#error "define QRA_CPU_NS before including cpu/kernel.h"
#endif

namespace qra {
namespace cpu {

// Threads over [0, n) in contiguous chunks; fn(ctx, begin, end). Defined once, in the
// baseline build (linear_cpu.cpp): no standard-library template is instantiated in the
// AVX2 build, for the same reason as the `static` of QRA_HD (dequant.cuh).
void parallel_for(int64_t n, int threads, void (*fn)(void*, int64_t, int64_t), void* ctx);

namespace QRA_CPU_NS {

// A zeroed float buffer (new/delete only: see parallel_for).
struct Buffer {
  float* p;
  explicit Buffer(int64_t n) : p(new float[n > 0 ? n : 1]()) {}
  ~Buffer() { delete[] p; }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

template <class Fn>
static void run_parallel(int64_t n, int threads, Fn& fn) {
  parallel_for(n, threads, [](void* ctx, int64_t b, int64_t e) { (*static_cast<Fn*>(ctx))(b, e); },
               &fn);
}

typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

// Eight columns at once.
struct Lanes8 {
  using U = u32x8;
  using F = f32x8;
  static constexpr int L = 8;
  static U load_words(const int32_t* p) { U v; memcpy(&v, p, sizeof v); return v; }
  static F load(const float* p) { F v; memcpy(&v, p, sizeof v); return v; }
  static void store(float* p, F v) { memcpy(p, &v, sizeof v); }
  static F splat(float s) { F v = {}; return v + s; }
  // Codes are < 256, so the signed conversion (one instruction on AVX2) is exact.
  static F to_float(U c) { return __builtin_convertvector((i32x8)c, f32x8); }
  static F load_half(const uint16_t* p, int dtype) {
    u16x8 h;
    memcpy(&h, p, sizeof h);
    const U w = __builtin_convertvector(h, u32x8);
    return dtype == kBFloat16 ? bf16_bits_to_float<U, F>(w) : fp16_bits_to_float<U, F>(w);
  }
  static float sum(F v) {
    float s = 0.f;
    for (int i = 0; i < L; ++i) s += v[i];
    return s;
  }
};

// One column: the tail of N that does not fill a vector; same primitives, scalar lanes.
struct Lanes1 {
  using U = uint32_t;
  using F = float;
  static constexpr int L = 1;
  static U load_words(const int32_t* p) { return (uint32_t)*p; }
  static F load(const float* p) { return *p; }
  static void store(float* p, F v) { *p = v; }
  static F splat(float s) { return s; }
  static F to_float(U c) { return (float)(int32_t)c; }
  static F load_half(const uint16_t* p, int dtype) { return half_to_float(*p, dtype); }
  static float sum(F v) { return v; }
};

// Rows of x [MT] x columns [NV vectors of V::L] of y, over the whole reduction.
template <int B, int MT, int NV, class V>
static void forward_block(const ForwardArgs& a, const float* xsum, const float* xa,
                          int64_t n0, int64_t m0) {
  using U = typename V::U;
  using F = typename V::F;
  constexpr int L = V::L;
  const int64_t N = a.N, Kp = a.Kp, G = Kp / a.group_size;
  const int gs = a.group_size;
  const float* x = a.x + m0 * Kp;
  F out[MT][NV];
  for (int i = 0; i < MT; ++i)
    for (int v = 0; v < NV; ++v) out[i][v] = V::splat(0.f);

  for (int64_t g = 0; g < G; ++g) {
    F acc[MT][NV];
    for (int i = 0; i < MT; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] = V::splat(0.f);
    const int64_t k0 = g * gs;
    if constexpr (B == 3) {
      // 32 k per step: two words of the 2-bit plane and one of the 1-bit plane.
      const int32_t* hi_plane = a.qweight + plane_row0<3>(1, Kp) * N;
      for (int64_t t = k0 / 32; t < (k0 + gs) / 32; ++t) {
        U lo0[NV], lo1[NV], hi[NV];
        for (int v = 0; v < NV; ++v) {
          lo0[v] = V::load_words(a.qweight + (2 * t) * N + n0 + v * L);
          lo1[v] = V::load_words(a.qweight + (2 * t + 1) * N + n0 + v * L);
          hi[v] = V::load_words(hi_plane + t * N + n0 + v * L);
        }
#pragma GCC unroll 32
        for (int j = 0; j < 32; ++j) {
          F c[NV];
          for (int v = 0; v < NV; ++v)
            c[v] = V::to_float(code3<U>(j < 16 ? lo0[v] : lo1[v], j & 15, hi[v], j));
          for (int i = 0; i < MT; ++i) {
            const F xv = V::splat(x[i * Kp + 32 * t + j]);
            for (int v = 0; v < NV; ++v) acc[i][v] += xv * c[v];
          }
        }
      }
    } else {
      constexpr int W = B, PW = 32 / B;
      for (int64_t r = k0 / PW; r < (k0 + gs) / PW; ++r) {
        U w[NV];
        for (int v = 0; v < NV; ++v) w[v] = V::load_words(a.qweight + r * N + n0 + v * L);
#pragma GCC unroll 16
        for (int j = 0; j < PW; ++j) {
          F c[NV];
          for (int v = 0; v < NV; ++v) c[v] = V::to_float(plane_code<W, U>(w[v], j));
          for (int i = 0; i < MT; ++i) {
            const F xv = V::splat(x[i * Kp + r * PW + j]);
            for (int v = 0; v < NV; ++v) acc[i][v] += xv * c[v];
          }
        }
      }
    }
    for (int v = 0; v < NV; ++v) {
      const F s = V::load_half(a.scales + g * N + n0 + v * L, a.scale_dtype);
      const F z = V::load_half(a.zeros + g * N + n0 + v * L, a.scale_dtype);
      for (int i = 0; i < MT; ++i) {
        const F xs = V::splat(xsum[(m0 + i) * G + g]);
        out[i][v] += s * (acc[i][v] - z * xs);
      }
    }
  }

  // Epilogue: LoRA (xa = x·Aᵀ was computed once per call) and bias, then one store.
  for (int i = 0; i < MT; ++i) {
    float tmp[NV * L];
    for (int v = 0; v < NV; ++v) V::store(tmp + v * L, out[i][v]);
    for (int c = 0; c < NV * L; ++c) {
      const int64_t n = n0 + c;
      float val = tmp[c];
      if (a.rank > 0) {
        const float* b = a.lora_B + n * a.rank;
        const float* u = xa + (m0 + i) * a.rank;
        float d = 0.f;
        for (int64_t r = 0; r < a.rank; ++r) d += u[r] * b[r];
        val += a.scaling * d;
      }
      if (a.bias) val += a.bias[n];
      a.y[(m0 + i) * N + n] = val;
    }
  }
}

template <int B>
static void forward_bits(const ForwardArgs& a, int threads) {
  const int64_t M = a.M, Kp = a.Kp, G = Kp / a.group_size, K = a.K;
  Buffer xsum_buf(M * G), xa_buf(M * a.rank);
  float* xsum = xsum_buf.p;
  float* xa = xa_buf.p;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; ++k) s += a.x[m * Kp + k];
      xsum[m * G + g] = s;
    }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < a.rank; ++r) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += a.x[m * Kp + k] * a.lora_A[r * K + k];
      xa[m * a.rank + r] = s;
    }

  constexpr int NV = 2, COLS = NV * Lanes8::L;
  const int64_t full = a.N / COLS, tail = a.N % COLS;
  // Work units: the full 16-column blocks, then one unit for the tail columns.
  const int64_t units = full + (tail ? 1 : 0);
  // Below ~1M weights, starting threads costs more than it saves.
  const int64_t weights = a.N * Kp;
  const int nthreads = weights < (1 << 20) ? 1 : threads;
  auto body = [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      int64_t m0 = 0;
      if (u < full) {
        const int64_t n0 = u * COLS;
        for (; m0 + 4 <= M; m0 += 4) forward_block<B, 4, NV, Lanes8>(a, xsum, xa, n0, m0);
        for (; m0 + 2 <= M; m0 += 2) forward_block<B, 2, NV, Lanes8>(a, xsum, xa, n0, m0);
        for (; m0 < M; ++m0) forward_block<B, 1, NV, Lanes8>(a, xsum, xa, n0, m0);
      } else {
        for (int64_t n0 = full * COLS; n0 < a.N; ++n0)
          for (m0 = 0; m0 < M; ++m0) forward_block<B, 1, 1, Lanes1>(a, xsum, xa, n0, m0);
      }
    }
  };
  run_parallel(units, nthreads, body);
}

void forward(const ForwardArgs& a, int threads) {
  switch (a.bits) {
    case 2: forward_bits<2>(a, threads); break;
    case 3: forward_bits<3>(a, threads); break;
    case 4: forward_bits<4>(a, threads); break;
    case 8: forward_bits<8>(a, threads); break;
  }
}

// ---- backward dX -------------------------------------------------------------------------
// gx[m, k] = sum_n dY[m, n] s[g, n] (q[n, k] - z[g, n])
//          = sum_n gs[m, g, n] q[n, k] - gz[m, g],  gs = dY·s,  gz = sum_n gs·z.
// The code is linear in its planes (q = low + 4·high for 3-bit), so each plane is reduced
// on its own and scaled by 2^offset: one loop serves every bit-width. Lanes run over n
// (the contiguous dimension of qweight), so each k ends with one horizontal sum.
// Threads split the groups of k (each writes its own columns of gx).
template <int W, class V>
static void backward_plane_rows(const BackwardArgs& a, const float* gs, float* acc_k,
                                int64_t g, int64_t m, int64_t row0, int64_t n0, int64_t n1,
                                float mult) {
  using U = typename V::U;
  using F = typename V::F;
  constexpr int L = V::L, PW = 32 / W;
  const int64_t N = a.N, G = a.Kp / a.group_size;
  const float* gsm = gs + (m * G + g) * N;
  const int64_t rows = a.group_size / PW;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* wrow = a.qweight + (row0 + g * rows + r) * N;
    // Eight codes of a word at a time keep the accumulators in registers.
    for (int j0 = 0; j0 < PW; j0 += 8) {
      F acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = V::splat(0.f);
      for (int64_t n = n0; n + L <= n1; n += L) {
        const U w = V::load_words(wrow + n);
        const F gv = V::load(gsm + n);
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) acc[j] += gv * V::to_float(plane_code<W, U>(w, j0 + j));
      }
      for (int j = 0; j < 8 && j0 + j < PW; ++j)
        acc_k[r * PW + j0 + j] += mult * V::sum(acc[j]);
    }
  }
}

template <int B>
static void backward_bits(const BackwardArgs& a, int threads) {
  const int64_t M = a.M, N = a.N, Kp = a.Kp, gsz = a.group_size, G = Kp / gsz;
  Buffer gs_buf(M * G * N), gz_buf(M * G);
  float* gs = gs_buf.p;
  float* gz = gz_buf.p;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float z_sum = 0.f;
      for (int64_t n = 0; n < N; ++n) {
        const float v = a.grad_out[m * N + n] * half_to_float(a.scales[g * N + n], a.scale_dtype);
        gs[(m * G + g) * N + n] = v;
        z_sum += v * half_to_float(a.zeros[g * N + n], a.scale_dtype);
      }
      gz[m * G + g] = z_sum;
    }
  const int64_t n_vec = N / Lanes8::L * Lanes8::L;
  const int nthreads = N * Kp < (1 << 20) ? 1 : threads;
  auto body = [&](int64_t g0, int64_t g1) {
    Buffer acc_buf(gsz);
    float* acc_k = acc_buf.p;
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t j = 0; j < gsz; ++j) acc_k[j] = 0.f;
        for (int p = 0; p < Bits<B>::kPlanes; ++p) {
          const int64_t row0 = plane_row0<B>(p, Kp);
          const float mult = (float)(1 << Bits<B>::kOffset[p]);
          if (Bits<B>::kWidth[p] == 1) {
            backward_plane_rows<1, Lanes8>(a, gs, acc_k, g, m, row0, 0, n_vec, mult);
            backward_plane_rows<1, Lanes1>(a, gs, acc_k, g, m, row0, n_vec, N, mult);
          } else {
            constexpr int W0 = Bits<B>::kWidth[0];
            backward_plane_rows<W0, Lanes8>(a, gs, acc_k, g, m, row0, 0, n_vec, mult);
            backward_plane_rows<W0, Lanes1>(a, gs, acc_k, g, m, row0, n_vec, N, mult);
          }
        }
        for (int64_t j = 0; j < gsz; ++j) a.grad_x[m * Kp + g * gsz + j] = acc_k[j] - gz[m * G + g];
      }
  };
  run_parallel(G, nthreads, body);
}

void backward_dx(const BackwardArgs& a, int threads) {
  switch (a.bits) {
    case 2: backward_bits<2>(a, threads); break;
    case 3: backward_bits<3>(a, threads); break;
    case 4: backward_bits<4>(a, threads); break;
    case 8: backward_bits<8>(a, threads); break;
  }
}

}  // namespace QRA_CPU_NS
}  // namespace cpu
}  // namespace qra
