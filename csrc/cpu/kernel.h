// The CPU kernel: y = x·dequant(W)ᵀ (+ scaling·(x·Aᵀ)·Bᵀ + bias), and the dX of the
// backward, gx = dY·dequant(W). Included once per instruction set by linear_<isa>.cpp, each
// inside its own namespace QRA_CPU_NS; linear_cpu.cpp picks one at run time. This file holds
// the float GEMV (kPathGemv, below) and the entry points; int8.h the integer dot-product
// path for decode, gemm.h the panel-dequantizing GEMM for large M.
//
// Vectorisation is written with GCC/Clang vector extensions (QRA_CPU_LANES x 32-bit lanes),
// not intrinsics: the same source becomes AVX-512, AVX2, or SSE2/NEON/scalar code depending
// on the build, and — the point — the lane type goes through the very same templated
// primitives of ../dequant.cuh that the CUDA kernels call with a uint32_t.
//
// The float GEMV (kPathGemv). Why this loop order (forward):
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
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

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

// A float buffer (new/delete only: see parallel_for), zeroed unless `uninit`: the large
// packing buffers of the GEMM are written in full before they are read, and zeroing them
// would cost a pass over memory.
struct Buffer {
  float* p;
  explicit Buffer(int64_t n) : p(new float[n > 0 ? n : 1]()) {}
  Buffer(int64_t n, bool /*uninit*/) : p(new float[n > 0 ? n : 1]) {}
  ~Buffer() { delete[] p; }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

struct WordBuffer {
  uint32_t* p;
  explicit WordBuffer(int64_t n) : p(new uint32_t[n > 0 ? n : 1]()) {}
  ~WordBuffer() { delete[] p; }
  WordBuffer(const WordBuffer&) = delete;
  WordBuffer& operator=(const WordBuffer&) = delete;
};

template <class Fn>
static void run_parallel(int64_t n, int threads, Fn& fn) {
  parallel_for(n, threads, [](void* ctx, int64_t b, int64_t e) { (*static_cast<Fn*>(ctx))(b, e); },
               &fn);
}

// The GEMV's view of a call: x as fp32 [M, Kp] zero-padded, y as fp32 [M, N] (the entry
// points below convert other dtypes and strides into these first).
struct GemvArgs {
  const float* x;
  const int32_t* qweight;
  const uint16_t* scales;
  const uint16_t* zeros;
  int scale_dtype;
  int bits, group_size;
  int64_t M, N, K, Kp;
  const float* lora_A;
  const float* lora_B;
  int64_t rank;
  float scaling;
  const float* bias;
  float* y;
};

struct GemvBackArgs {
  const float* grad_out;   // [M, N] fp32
  const int32_t* qweight;
  const uint16_t* scales;
  const uint16_t* zeros;
  int scale_dtype;
  int bits, group_size;
  int64_t M, N, Kp;
  float* grad_x;           // [M, Kp] fp32
};

// QRA_CPU_LANES columns per vector: 8 (AVX2, 32-byte vectors) or 16 (AVX-512 build).
#ifndef QRA_CPU_LANES
#define QRA_CPU_LANES 8
#endif
typedef uint32_t u32xL __attribute__((vector_size(4 * QRA_CPU_LANES)));
typedef int32_t i32xL __attribute__((vector_size(4 * QRA_CPU_LANES)));
typedef float f32xL __attribute__((vector_size(4 * QRA_CPU_LANES)));
typedef uint16_t u16xL __attribute__((vector_size(2 * QRA_CPU_LANES)));

typedef f32xL F32V;

// QRA_CPU_LANES adjacent columns at once.
struct LanesV {
  using U = u32xL;
  using F = f32xL;
  static constexpr int L = QRA_CPU_LANES;
  static U load_words(const int32_t* p) { U v; memcpy(&v, p, sizeof v); return v; }
  static F load(const float* p) { F v; memcpy(&v, p, sizeof v); return v; }
  static void store(float* p, F v) { memcpy(p, &v, sizeof v); }
  // A broadcast. (Not `F{} + s`: 0 + s is not s for s = -0, so the compiler keeps the add —
  // an extra instruction on every broadcast of the inner loops.)
  static F splat(float s) {
#if QRA_CPU_LANES == 16 && defined(__AVX512F__)
    return (F)_mm512_set1_ps(s);  // vbroadcastss zmm, m32: a load, no shuffle
#elif QRA_CPU_LANES == 8 && defined(__AVX__)
    return (F)_mm256_set1_ps(s);
#else
    F v;
    for (int i = 0; i < L; ++i) v[i] = s;
    return v;
#endif
  }
  // Only called on values < 2^31 (see plane_code_in_place), so the signed conversion (one
  // instruction on AVX2/AVX-512) is exact.
  static F to_float(U c) { return __builtin_convertvector((i32xL)c, f32xL); }
  static F load_half(const uint16_t* p, int dtype) {
#if QRA_CPU_LANES == 16 && defined(__AVX512F__)
    // F16C's vcvtph2ps: one instruction for fp16 (exact, subnormals included).
    if (dtype == kFloat16) return (F)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
#elif QRA_CPU_LANES == 8 && defined(__F16C__)
    if (dtype == kFloat16) return (F)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
#endif
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

// ---- shared helpers ------------------------------------------------------------------
// sum_i a[i]·b[i] with L independent lanes (a plain loop would be one scalar FMA chain:
// GCC does not reorder a float reduction).
static inline float dot(const float* a, const float* b, int64_t n) {
  f32xL acc = LanesV::splat(0.f);
  int64_t i = 0;
  for (; i + LanesV::L <= n; i += LanesV::L) acc += LanesV::load(a + i) * LanesV::load(b + i);
  float s = LanesV::sum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// fp32 -> fp16 / bf16 bits, round to nearest even (finite inputs; fp16 overflow gives inf).
static inline uint16_t float_to_half(float f, int dtype) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if (dtype == kBFloat16) {
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);  // NaN stays NaN
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u);
  if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {  // fp16 subnormal or zero: add 0.5 so the FPU rounds for us
    float t;
    memcpy(&t, &a, 4);
    t += 0.5f;
    uint32_t tb;
    memcpy(&tb, &t, 4);
    return (uint16_t)(sign | (tb - 0x3F000000u));
  }
  const uint32_t r = a + 0xC8000FFFu + ((a >> 13) & 1u);  // rebias 127 -> 15, round
  return (uint16_t)(sign | (r >> 13));
}

// n fp32 values to dst in dtype (fp32 / fp16 / bf16), threads split the range.
static void store_rows(const float* src, void* dst, int dtype, int64_t n, int threads) {
  auto body = [&](int64_t i0, int64_t i1) {
    if (dtype == kFloat32) {
      memcpy(static_cast<float*>(dst) + i0, src + i0, (i1 - i0) * sizeof(float));
      return;
    }
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = i0; i < i1; ++i) d[i] = float_to_half(src[i], dtype);
  };
  run_parallel(n, n < (1 << 16) ? 1 : threads, body);
}

// Rows of x ([M, K], rows ldx apart, dtype) as fp32 [M, Kp], zero in columns K..Kp-1.
static void rows_to_f32(const void* x, int dtype, int64_t ldx, int64_t M, int64_t K, int64_t Kp,
                        float* out) {
  for (int64_t m = 0; m < M; ++m) {
    float* o = out + m * Kp;
    if (dtype == kFloat32) {
      memcpy(o, static_cast<const float*>(x) + m * ldx, K * sizeof(float));
    } else {
      const uint16_t* h = static_cast<const uint16_t*>(x) + m * ldx;
      for (int64_t k = 0; k < K; ++k) o[k] = half_to_float(h[k], dtype);
    }
    for (int64_t k = K; k < Kp; ++k) o[k] = 0.f;
  }
}

// The code of (n, k), scalar: tails and the portable paths.
template <int B>
static inline uint32_t code_at(const int32_t* q, int64_t N, int64_t Kp, int64_t n, int64_t k) {
  if constexpr (B == 3) {
    const uint32_t lo = ((uint32_t)q[(k / 16) * N + n] >> (2 * (k % 16))) & 3u;
    const uint32_t hi = ((uint32_t)q[(plane_row0<3>(1, Kp) + k / 32) * N + n] >> (k % 32)) & 1u;
    return lo | (hi << 2);
  } else {
    constexpr int PW = 32 / B;
    return ((uint32_t)q[(k / PW) * N + n] >> (B * (k % PW))) & ((1u << B) - 1u);
  }
}

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

// Independent accumulator chains per (row of x, column vector) in plane_dot. An FMA waits
// ~4 cycles for the previous one on the same accumulator, and two ports can start one each
// cycle: about 8 chains in flight keep them busy. The tile alone gives MT·NV chains (2 at
// M = 1), so the codes of a word are spread over kChains(MT, NV) accumulators (by slot j)
// and summed once at the end of the group. Measured on a 2-core AVX2 machine (M = 1,
// 4096x4096, group 64, one thread; 10th percentile of 60 calls, two runs each), before ->
// after: 4-bit 1.61-1.65 -> 1.00-1.05 ms, 3-bit 2.9-3.3 -> 2.15 ms, 8-bit 1.76-2.0 ->
// 1.50-1.59 ms, 2-bit 1.40-1.60 -> 1.30-1.36 ms. (The AVX-512 BF16 path, plane_dot_bf16,
// could not be run on that machine and is left as it was.)
static constexpr int kChains(int mt, int nv) {
  return mt * nv >= 8 ? 1 : 8 / (mt * nv);
}

// acc[i][v] += sum over the word rows [r0, r1) of a plane of width W of xs·code.
template <int W, int MT, int NV, class V>
static inline void plane_dot(const int32_t* plane, int64_t N, int64_t n0, int64_t r0, int64_t r1,
                             const float* xs, int64_t ldx, typename V::F (&acc)[MT][NV]) {
  using U = typename V::U;
  using F = typename V::F;
  constexpr int L = V::L, PW = 32 / W;
  constexpr int J = kChains(MT, NV) < PW ? kChains(MT, NV) : PW;
  F part[J][MT][NV];
  for (int c = 0; c < J; ++c)
    for (int i = 0; i < MT; ++i)
      for (int v = 0; v < NV; ++v) part[c][i][v] = V::splat(0.f);
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
        for (int v = 0; v < NV; ++v) part[j % J][i][v] += xv * c[v];
      }
    }
  }
  for (int c = 0; c < J; ++c)
    for (int i = 0; i < MT; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] += part[c][i][v];
}

// One group g of the reduction for rows [m0, m0+MT) of x and columns [n0, n0 + NV·L) of y:
// y += s · (sum_k x_k q_k - z · sum_k x_k), y being the fp32 output (zeroed first). xs holds
// the pre-scaled x of each plane: plane p at xs + p * M * Kp.
template <int B, int MT, int NV, class V>
static void group_block(const GemvArgs& a, const float* xs, const float* xsum, int64_t g,
                        int64_t n0, int64_t m0) {
  using F = typename V::F;
  constexpr int L = V::L;
  const int64_t N = a.N, Kp = a.Kp, G = Kp / a.group_size, M = a.M;
  const int gs = a.group_size;
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
      float* yp = a.y + (m0 + i) * N + n0 + v * L;
      V::store(yp, V::load(yp) + s * (acc[i][v] - z * V::splat(xsum[(m0 + i) * G + g])));
    }
  }
}

#if defined(QRA_CPU_BF16DOT)
// ---- the AVX-512 BF16 path (2-, 3- and 4-bit) ---------------------------------------------
// vdpbf16ps multiplies pairs of bf16 and adds both products to an fp32 lane: 32 products
// per instruction, against 16 FMAs for the fp32 path. The codes become bf16 almost for
// free: one shift moves a pair of W-bit codes (k and k + PW/2 of a column, in the two
// 16-bit halves of the lane) to the top W bits of a bf16 mantissa, and one vpternlogd
// masks them and ORs in the pattern of 1.0 (0x3F80), giving exactly 1 + c·2^-W. With x
// pre-scaled by 2^W (exact), sum x'·(1 + c·2^-W) = sum x' + sum x·c, and sum x' is folded
// out with the zero point. Putting the code at the top of the mantissa keeps that constant
// part comparable to the code part (2^W vs c), so the fp32 accumulation loses a bit or
// two, not the five of the usual "128 + c" encoding.
// Products of bf16 are exact in fp32, so bf16 activations give the fp32 path's numbers up
// to summation order. An x that is not exactly bf16 would need a hi + lo split (two dot
// products); measured, that was no faster than the fp32 path, so such calls take the fp32
// path (the split is kept general here, has_lo, but forward_bits routes around it).
struct XPairs {
  uint32_t* hi;  // per plane: [M][Kp / 2] pairs of bf16 x (plane multiplier included)
  uint32_t* lo;
  float* sum;    // [M][G]: sum over the group and planes of (hi + lo), the constant fold
  bool has_lo;
};

static inline uint16_t bf16_round(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even (values are finite)
  return (uint16_t)(u >> 16);
}

static inline float bf16_value(uint16_t h) { return bf16_bits_to_float<uint32_t, float>(h); }

// Pairs for one plane of width W: pair slot j of word row r holds k = r·PW + j and
// k + PW/2, matching the code pairs of plane_dot_bf16; x is scaled by 2^W·mult.
template <int W>
static void make_pairs(const GemvArgs& a, float mult, uint32_t* hi, uint32_t* lo,
                       float* sum, bool* has_lo) {
  constexpr int PW = 32 / W, P2 = PW / 2;
  const int64_t Kp = a.Kp, G = Kp / a.group_size, gs = a.group_size;
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t r = 0; r < Kp / PW; ++r)
      for (int j = 0; j < P2; ++j) {
        uint16_t h[2], l[2];
        for (int e = 0; e < 2; ++e) {
          const int64_t k = r * PW + j + e * P2;
          const float v = a.x[m * Kp + k] * mult * (float)(1 << W);
          h[e] = bf16_round(v);
          l[e] = bf16_round(v - bf16_value(h[e]));
          if (l[e]) *has_lo = true;
          sum[m * G + k / gs] += bf16_value(h[e]) + bf16_value(l[e]);
        }
        const int64_t i = (m * (Kp / PW) + r) * P2 + j;
        hi[i] = (uint32_t)h[0] | ((uint32_t)h[1] << 16);
        lo[i] = (uint32_t)l[0] | ((uint32_t)l[1] << 16);
      }
}

template <int W, int MT, int NV>
static inline void plane_dot_bf16(const int32_t* plane, int64_t N, int64_t n0, int64_t r0,
                                  int64_t r1, const uint32_t* xh, const uint32_t* xl,
                                  int64_t ldp, bool has_lo, __m512 (&acc)[MT][NV]) {
  constexpr int PW = 32 / W, P2 = PW / 2;
  const __m512i one = _mm512_set1_epi32(0x3F803F80);  // bf16 1.0 in both halves
  // The top W bits of a bf16 mantissa (bits 7-W .. 6) in both halves.
  const __m512i pair_mask = _mm512_set1_epi32((int)((((1u << W) - 1u) << (7 - W)) * 0x00010001u));
  for (int64_t r = r0; r < r1; ++r) {
    __m512i w[NV];
    for (int v = 0; v < NV; ++v)
      w[v] = _mm512_loadu_si512((const void*)(plane + r * N + n0 + v * 16));
#pragma GCC unroll 16
    for (int j = 0; j < P2; ++j) {
      // Codes j and j + P2 sit at bits W·j and 16 + W·j; move both to bit 7 - W.
      const int shift = W * j - (7 - W);
      __m512bh c[NV];
      for (int v = 0; v < NV; ++v) {
        const __m512i t = shift >= 0 ? _mm512_srli_epi32(w[v], (unsigned)shift)
                                     : _mm512_slli_epi32(w[v], (unsigned)-shift);
        // (t & mask) | one in one vpternlogd: truth table (a & b) | c = 0xEA.
        c[v] = (__m512bh)_mm512_ternarylogic_epi32(t, pair_mask, one, 0xEA);
      }
      for (int i = 0; i < MT; ++i) {
        const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)xh[i * ldp + r * P2 + j]);
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], c[v], xv);
        if (has_lo) {
          const __m512bh xl_v = (__m512bh)_mm512_set1_epi32((int)xl[i * ldp + r * P2 + j]);
          for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], c[v], xl_v);
        }
      }
    }
  }
}

template <int B, int MT, int NV>
static void group_block_bf16(const GemvArgs& a, const XPairs& xp, const float* xsum,
                             int64_t g, int64_t n0, int64_t m0) {
  const int64_t N = a.N, Kp = a.Kp, G = Kp / a.group_size;
  const int gs = a.group_size;
  __m512 acc[MT][NV];
  for (int i = 0; i < MT; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  const int64_t k0 = g * gs;
  {
    constexpr int W = Bits<B>::kWidth[0], PW = 32 / W;
    const int64_t ldp = Kp / 2;  // pairs per row of x
    plane_dot_bf16<W, MT, NV>(a.qweight, N, n0, k0 / PW, (k0 + gs) / PW, xp.hi + m0 * ldp,
                              xp.lo + m0 * ldp, ldp, xp.has_lo, acc);
    if constexpr (B == 3) {
      const int64_t off = a.M * ldp;  // the second plane's pairs
      plane_dot_bf16<1, MT, NV>(a.qweight + plane_row0<3>(1, Kp) * N, N, n0, k0 / 32,
                                (k0 + gs) / 32, xp.hi + off + m0 * ldp, xp.lo + off + m0 * ldp,
                                ldp, xp.has_lo, acc);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const F32V s = LanesV::load_half(a.scales + g * N + n0 + v * 16, a.scale_dtype);
    const F32V z = LanesV::load_half(a.zeros + g * N + n0 + v * 16, a.scale_dtype);
    for (int i = 0; i < MT; ++i) {
      float* yp = a.y + (m0 + i) * N + n0 + v * 16;
      const F32V q = (F32V)acc[i][v] - LanesV::splat(xp.sum[(m0 + i) * G + g]);
      LanesV::store(yp, LanesV::load(yp) + s * (q - z * LanesV::splat(xsum[(m0 + i) * G + g])));
    }
  }
}
#endif  // QRA_CPU_BF16DOT

template <int B>
static void forward_bits(const GemvArgs& a, int threads) {
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
    for (int64_t r = 0; r < a.rank; ++r) xa[m * a.rank + r] = dot(a.x + m * Kp, a.lora_A + r * K, K);

#if defined(QRA_CPU_BF16DOT)
  // 8-bit codes do not fit a bf16 mantissa, and the bf16 path pays off only when x is
  // exactly bf16 (bf16 activations): for fp32 x the hi + lo split doubles the dot products
  // and the fp32 FMA path was as fast or faster (and exact), so it is taken instead.
  constexpr bool kBf16Dot = B != 8;
  const int64_t pair_count = Bits<B>::kPlanes * M * Kp / 2;
  WordBuffer pair_hi(kBf16Dot ? pair_count : 1), pair_lo(kBf16Dot ? pair_count : 1);
  Buffer pair_sum(M * G);
  XPairs xp{pair_hi.p, pair_lo.p, pair_sum.p, false};
  if constexpr (kBf16Dot) {
    make_pairs<Bits<B>::kWidth[0]>(a, 1.f, xp.hi, xp.lo, xp.sum, &xp.has_lo);
    if (B == 3)
      make_pairs<1>(a, 4.f, xp.hi + M * Kp / 2, xp.lo + M * Kp / 2, xp.sum, &xp.has_lo);
  }
#endif
  constexpr int NV = 2, COLS = NV * LanesV::L;
  const int64_t full = a.N / COLS, tail = a.N % COLS;
  // Work units: the full 16-column blocks, then one unit for the tail columns.
  const int64_t units = full + (tail ? 1 : 0);
  // Below ~1M weights, starting threads costs more than it saves.
  const int64_t weights = a.N * Kp;
  const int nthreads = weights < (1 << 20) ? 1 : threads;
  // Loop order: groups outside, column blocks inside. For one group a thread reads a few
  // word rows (8 at 4-bit, g = 64) left to right across its columns — a handful of
  // sequential streams the hardware prefetcher follows — instead of walking down a column
  // block, where every word row is a new page 4·N bytes further on (TLB misses, and no
  // prefetching: that order ran at half the memory bandwidth). The partial sums live in
  // y itself (fp32, the thread's own columns: a few KB, in L1/L2).
  auto body = [&](int64_t u0, int64_t u1) {
    const int64_t c0 = u0 * COLS, c1 = u1 * COLS < a.N ? u1 * COLS : a.N;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = c0; n < c1; ++n) a.y[m * a.N + n] = 0.f;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t u = u0; u < u1; ++u) {
        int64_t m0 = 0;
        if (u < full) {
          const int64_t n0 = u * COLS;
#if defined(QRA_CPU_BF16DOT)
          if constexpr (kBf16Dot) {
            if (!xp.has_lo) {
              for (; m0 + 4 <= M; m0 += 4) group_block_bf16<B, 4, NV>(a, xp, xsum, g, n0, m0);
              for (; m0 + 2 <= M; m0 += 2) group_block_bf16<B, 2, NV>(a, xp, xsum, g, n0, m0);
              for (; m0 < M; ++m0) group_block_bf16<B, 1, NV>(a, xp, xsum, g, n0, m0);
              continue;
            }
          }
#endif
          for (; m0 + 4 <= M; m0 += 4) group_block<B, 4, NV, LanesV>(a, xs, xsum, g, n0, m0);
          for (; m0 + 2 <= M; m0 += 2) group_block<B, 2, NV, LanesV>(a, xs, xsum, g, n0, m0);
          for (; m0 < M; ++m0) group_block<B, 1, NV, LanesV>(a, xs, xsum, g, n0, m0);
        } else {
          for (int64_t n0 = full * COLS; n0 < a.N; ++n0)
            for (m0 = 0; m0 < M; ++m0) group_block<B, 1, 1, Lanes1>(a, xs, xsum, g, n0, m0);
        }
      }
    // Epilogue: LoRA (xa = x·Aᵀ was computed once per call) and bias, on the thread's
    // columns while they are still in cache.
    if (a.rank > 0 || a.bias)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = c0; n < c1; ++n) {
          float val = a.y[m * a.N + n];
          if (a.rank > 0) {
            const float* b = a.lora_B + n * a.rank;
            const float* u = xa + m * a.rank;
            float d = 0.f;
            for (int64_t r = 0; r < a.rank; ++r) d += u[r] * b[r];
            val += a.scaling * d;
          }
          if (a.bias) val += a.bias[n];
          a.y[m * a.N + n] = val;
        }
  };
  run_parallel(units, nthreads, body);
}

static void gemv_forward(const GemvArgs& a, int threads) {
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
static void backward_plane_rows(const GemvBackArgs& a, const float* gs, float* acc_k,
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
static void backward_bits(const GemvBackArgs& a, int threads) {
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

static void gemv_backward_dx(const GemvBackArgs& a, int threads) {
  // backward_bits keeps grad_out·s for every group, [rows, G, N] floats (G·N·4 bytes a
  // row: 1 MiB for 4096x4096 at g = 64), so rows are taken 8 at a time.
  constexpr int64_t kRows = 8;
  for (int64_t m0 = 0; m0 < a.M; m0 += kRows) {
    GemvBackArgs b = a;
    b.grad_out = a.grad_out + m0 * a.N;
    b.grad_x = a.grad_x + m0 * a.Kp;
    b.M = a.M - m0 < kRows ? a.M - m0 : kRows;
    switch (a.bits) {
      case 2: backward_bits<2>(b, threads); break;
      case 3: backward_bits<3>(b, threads); break;
      case 4: backward_bits<4>(b, threads); break;
      case 8: backward_bits<8>(b, threads); break;
    }
  }
}

#include "int8.h"
#include "gemm.h"

// ---- entry points ------------------------------------------------------------------------
template <template <int> class Fn, class... Args>
static void by_bits(int bits, Args&&... args) {
  switch (bits) {
    case 2: Fn<2>::run(args...); break;
    case 3: Fn<3>::run(args...); break;
    case 4: Fn<4>::run(args...); break;
    case 8: Fn<8>::run(args...); break;
  }
}
template <int B> struct GemmForward { static void run(const ForwardArgs& a, int t) { gemm_forward_bits<B>(a, t); } };
template <int B> struct GemmBackward { static void run(const BackwardArgs& a, int t) { gemm_backward_bits<B>(a, t); } };
template <int B> struct DequantPanel { static void run(const DequantArgs& a, int t) { gemm::dequantize_panel_bits<B>(a, t); } };
template <int B> struct DequantRows { static void run(const DequantArgs& a, int t) { gemm::dequantize_rows_bits<B>(a, t); } };

void dequantize_panel(const DequantArgs& a, int threads) {
  if (a.rows) return by_bits<DequantRows>(a.bits, a, threads);
  by_bits<DequantPanel>(a.bits, a, threads);
}

void forward(const ForwardArgs& a, int path, int threads) {
  if (path == kPathGemm) return by_bits<GemmForward>(a.bits, a, threads);
  // The GEMV and int8 paths read x as fp32 [M, Kp] and write fp32 y: other dtypes, strides
  // and padding are converted here (M is small on these paths, so the copies are too).
  const int64_t M = a.M, N = a.N, Kp = a.Kp;
  const bool x_ready = a.x_dtype == kFloat32 && a.K == Kp && a.ldx == Kp;
  Buffer xbuf(x_ready ? 1 : M * Kp, true);
  if (!x_ready) rows_to_f32(a.x, a.x_dtype, a.ldx, M, a.K, Kp, xbuf.p);
  const bool y_ready = a.y_dtype == kFloat32;
  Buffer ybuf(y_ready ? 1 : M * N, true);
  GemvArgs g{x_ready ? static_cast<const float*>(a.x) : xbuf.p, a.qweight, a.scales, a.zeros,
             a.scale_dtype, a.bits, a.group_size, M, N, a.K, Kp, a.lora_A, a.lora_B, a.rank,
             a.scaling, a.bias, y_ready ? static_cast<float*>(a.y) : ybuf.p};
  if (path == kPathInt8)
    int8_forward(g, threads);
  else
    gemv_forward(g, threads);
  if (!y_ready) store_rows(g.y, a.y, a.y_dtype, M * N, threads);
}

void backward_dx(const BackwardArgs& a, int path, int threads) {
  if (path == kPathGemm) return by_bits<GemmBackward>(a.bits, a, threads);
  const int64_t M = a.M, N = a.N, K = a.K, Kp = a.Kp, r = a.rank;
  const bool g_ready = a.g_dtype == kFloat32;
  Buffer gbuf(g_ready ? 1 : M * N, true);
  if (!g_ready) rows_to_f32(a.grad_out, a.g_dtype, N, M, N, N, gbuf.p);
  const float* go = g_ready ? static_cast<const float*>(a.grad_out) : gbuf.p;
  Buffer gx(M * Kp, true);
  GemvBackArgs b{go, a.qweight, a.scales, a.zeros, a.scale_dtype, a.bits, a.group_size,
                 M, N, Kp, gx.p};
  gemv_backward_dx(b, threads);
  // LoRA: gb = dY·B, grad_x += scaling·gb·A (row by row, as axpys the compiler vectorizes).
  Buffer gb(M * r > 0 ? M * r : 1);
  for (int64_t m = 0; m < M; ++m) {
    float* gbm = gb.p + m * r;
    for (int64_t n = 0; n < N && r > 0; ++n) {
      const float gv = go[m * N + n];
      const float* bn = a.lora_B + n * r;
      for (int64_t j = 0; j < r; ++j) gbm[j] += gv * bn[j];
    }
    float* out = a.grad_x + m * K;
    memcpy(out, gx.p + m * Kp, K * sizeof(float));
    for (int64_t j = 0; j < r; ++j) {
      const float c = a.scaling * gbm[j];
      const float* aj = a.lora_A + j * K;
      for (int64_t k = 0; k < K; ++k) out[k] += c * aj[k];
    }
  }
  if (a.gb && r > 0) memcpy(a.gb, gb.p, M * r * sizeof(float));
}

}  // namespace QRA_CPU_NS
}  // namespace cpu
}  // namespace qra
