// The CPU kernel for small M: y = x·dequant(W)ᵀ (+ scaling·(x·Aᵀ)·Bᵀ + bias), and the dX of
// the backward, gx = dY·dequant(W). Included once per instruction set by linear_avx2.cpp
// (built with -mavx2 -mfma -mf16c) and linear_generic.cpp (baseline x86-64 / any CPU),
// each inside its own namespace QRA_CPU_NS; linear_cpu.cpp picks one at run time.
//
// Vectorisation is written with GCC/Clang vector extensions (QRA_CPU_LANES x 32-bit lanes),
// not intrinsics: the same source becomes AVX-512, AVX2, or SSE2/NEON/scalar code depending
// on the build, and — the point — the lane type goes through the very same templated
// primitives of ../dequant.cuh that the CUDA kernels call with a uint32_t.
//
// Why this loop order (forward):
//  * qweight is [Kp*bits/32, N] with N contiguous, so 8 lanes = 8 adjacent output
//    columns: one aligned 32-byte load gives the words of 8 columns and each shift+mask
//    yields 8 codes. No horizontal reductions are needed.
//  * The zero point is folded out of the inner loop: per group,
//      sum_k x_k (q_k - z) s = s · (sum_k x_k q_k - z · sum_k x_k),
//    so the inner loop is mask, convert, FMA per code (see plane_dot), and sum_k x_k per
//    group is computed once per row of x (xsum).
//  * A block is two vectors of columns (16 with AVX2, 32 with AVX-512): one or two full
//    64-byte cache lines of each word row.
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

// QRA_CPU_LANES columns per vector: 8 (AVX2, 32-byte vectors) or 16 (AVX-512 build).
#ifndef QRA_CPU_LANES
#define QRA_CPU_LANES 8
#endif
typedef uint32_t u32xL __attribute__((vector_size(4 * QRA_CPU_LANES)));
typedef int32_t i32xL __attribute__((vector_size(4 * QRA_CPU_LANES)));
typedef float f32xL __attribute__((vector_size(4 * QRA_CPU_LANES)));
typedef uint16_t u16xL __attribute__((vector_size(2 * QRA_CPU_LANES)));

// QRA_CPU_LANES adjacent columns at once.
struct LanesV {
  using U = u32xL;
  using F = f32xL;
  static constexpr int L = QRA_CPU_LANES;
  static U load_words(const int32_t* p) { U v; memcpy(&v, p, sizeof v); return v; }
  static F load(const float* p) { F v; memcpy(&v, p, sizeof v); return v; }
  static void store(float* p, F v) { memcpy(p, &v, sizeof v); }
  static F splat(float s) { F v = {}; return v + s; }
  // Only called on values < 2^31 (see plane_code_in_place), so the signed conversion (one
  // instruction on AVX2/AVX-512) is exact.
  static F to_float(U c) { return __builtin_convertvector((i32xL)c, f32xL); }
  static F load_half(const uint16_t* p, int dtype) {
    u16xL h;
    memcpy(&h, p, sizeof h);
    const U w = __builtin_convertvector(h, u32xL);
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

// ---- forward -----------------------------------------------------------------------------
// The inner loop does three vector ops per code and column vector: mask, convert, FMA.
// The usual shift before the mask is saved by plane_code_in_place (dequant.cuh): the code
// at slot j of a word is used where it sits, as the integer code·2^(W·j), and the matching
// x is pre-scaled by 2^-(W·j) once per call (a power of two: exact). The top slot would land
// in the sign bit, so it alone is shifted down (a logical shift needs no mask).
// For 3-bit, the code is linear in its planes (code = low + 4·high), so each plane is
// reduced on its own against its own pre-scaled x (the high plane's carries the 4).
template <int W>
static void prescale_x(const float* x, float* xs, int64_t n, float plane_mult) {
  constexpr int PW = 32 / W;
  for (int64_t k = 0; k < n; ++k) {
    const int j = (int)(k % PW);
    const float f = j == PW - 1 ? 1.f : 1.f / (float)(1u << (W * j));
    xs[k] = x[k] * f * plane_mult;
  }
}

// acc[i][v] += sum over the word rows [r0, r1) of a plane of width W of xs·code.
template <int W, int MT, int NV, class V>
static inline void plane_dot(const int32_t* plane, int64_t N, int64_t n0, int64_t r0, int64_t r1,
                             const float* xs, int64_t ldx, typename V::F (&acc)[MT][NV]) {
  using U = typename V::U;
  using F = typename V::F;
  constexpr int L = V::L, PW = 32 / W;
  for (int64_t r = r0; r < r1; ++r) {
    U w[NV];
    for (int v = 0; v < NV; ++v) w[v] = V::load_words(plane + r * N + n0 + v * L);
#pragma GCC unroll 32
    for (int j = 0; j < PW; ++j) {
      F c[NV];
      for (int v = 0; v < NV; ++v)
        c[v] = V::to_float(j == PW - 1 ? (U)(w[v] >> (unsigned)(W * j))
                                       : plane_code_in_place<W, U>(w[v], j));
      for (int i = 0; i < MT; ++i) {
        const F xv = V::splat(xs[i * ldx + r * PW + j]);
        for (int v = 0; v < NV; ++v) acc[i][v] += xv * c[v];
      }
    }
  }
}

// Rows of x [MT] x columns [NV vectors of V::L] of y, over the whole reduction. xs holds
// the pre-scaled x of each plane: plane p at xs + p * M * Kp.
template <int B, int MT, int NV, class V>
static void forward_block(const ForwardArgs& a, const float* xs, const float* xsum,
                          const float* xa, int64_t n0, int64_t m0) {
  using F = typename V::F;
  constexpr int L = V::L;
  const int64_t N = a.N, Kp = a.Kp, G = Kp / a.group_size, M = a.M;
  const int gs = a.group_size;
  F out[MT][NV];
  for (int i = 0; i < MT; ++i)
    for (int v = 0; v < NV; ++v) out[i][v] = V::splat(0.f);

  for (int64_t g = 0; g < G; ++g) {
    F acc[MT][NV];
    for (int i = 0; i < MT; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] = V::splat(0.f);
    const int64_t k0 = g * gs;
    for (int p = 0; p < Bits<B>::kPlanes; ++p) {
      const int32_t* plane = a.qweight + plane_row0<B>(p, Kp) * N;
      const float* xp = xs + (p * M + m0) * Kp;
      if (p == 0) {
        constexpr int W = Bits<B>::kWidth[0], PW = 32 / W;
        plane_dot<W, MT, NV, V>(plane, N, n0, k0 / PW, (k0 + gs) / PW, xp, Kp, acc);
      } else {  // the 1-bit high plane of 3-bit
        plane_dot<1, MT, NV, V>(plane, N, n0, k0 / 32, (k0 + gs) / 32, xp, Kp, acc);
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
  Buffer xsum_buf(M * G), xa_buf(M * a.rank), xs_buf(Bits<B>::kPlanes * M * Kp);
  float* xsum = xsum_buf.p;
  float* xa = xa_buf.p;
  float* xs = xs_buf.p;
  for (int p = 0; p < Bits<B>::kPlanes; ++p) {
    const float mult = (float)(1 << Bits<B>::kOffset[p]);
    if (p == 0)
      prescale_x<Bits<B>::kWidth[0]>(a.x, xs, M * Kp, mult);
    else
      prescale_x<1>(a.x, xs + M * Kp, M * Kp, mult);
  }
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

  constexpr int NV = 2, COLS = NV * LanesV::L;
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
        for (; m0 + 4 <= M; m0 += 4) forward_block<B, 4, NV, LanesV>(a, xs, xsum, xa, n0, m0);
        for (; m0 + 2 <= M; m0 += 2) forward_block<B, 2, NV, LanesV>(a, xs, xsum, xa, n0, m0);
        for (; m0 < M; ++m0) forward_block<B, 1, NV, LanesV>(a, xs, xsum, xa, n0, m0);
      } else {
        for (int64_t n0 = full * COLS; n0 < a.N; ++n0)
          for (m0 = 0; m0 < M; ++m0) forward_block<B, 1, 1, Lanes1>(a, xs, xsum, xa, n0, m0);
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
  const int64_t n_vec = N / LanesV::L * LanesV::L;
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
            backward_plane_rows<1, LanesV>(a, gs, acc_k, g, m, row0, 0, n_vec, mult);
            backward_plane_rows<1, Lanes1>(a, gs, acc_k, g, m, row0, n_vec, N, mult);
          } else {
            constexpr int W0 = Bits<B>::kWidth[0];
            backward_plane_rows<W0, LanesV>(a, gs, acc_k, g, m, row0, 0, n_vec, mult);
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
