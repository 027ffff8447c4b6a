// Dequantization primitives of the packed bit-plane layout (qra_kernels/format.py,
// docs/FORMAT.md), shared by the CUDA kernels and the CPU kernel.
//
// Everything here is `__host__ __device__` (QRA_HD) and templated on the word type, so the
// very same shift-and-mask code runs on a GPU thread (uint32_t), on a CPU scalar
// (uint32_t) and on a CPU SIMD vector (a GCC vector of 8 x uint32, see cpu/kernel.h). The
// CPU tests therefore exercise the bit logic the GPU runs.
//
// Layout recap, for a matrix W [N, K] quantized with `bits` and group size g (Kp = K
// rounded up to g):
//   * codes are split into power-of-two planes, low bits first: 2 -> {2}, 3 -> {2, 1},
//     4 -> {4}, 8 -> {8};
//   * a plane of width p packs 32/p consecutive k of one column n into one 32-bit word:
//     word row r holds k = r * (32/p) + j at bits [j*p, (j+1)*p);
//   * planes are stacked along the rows of qweight [Kp*bits/32, N] (N contiguous), so the
//     plane of width p starts at row  (sum of the widths of the planes before it) * Kp/32;
//   * W[n, k] = (code - zeros[k/g, n]) * scales[k/g, n], scales/zeros fp16 or bf16.
#pragma once

#include <stdint.h>

// `static`: internal linkage, so each translation unit keeps its own copy. The CPU kernel
// is compiled twice with different instruction sets (cpu/linear_avx2.cpp and
// cpu/linear_generic.cpp); with ordinary `inline` linkage the linker could keep the AVX2
// copy of a primitive for the generic build, which would then crash on a CPU without AVX2.
#if defined(__CUDACC__)
#define QRA_HD static __host__ __device__ __forceinline__
#else
#define QRA_HD static inline
#endif

namespace qra {

// Dtype codes used across the binding (qra_kernels/_ext.py has the same table).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---- the planes of one bit-width ---------------------------------------------------------
// Bits<B>: the plane widths and the bit offset of each plane inside the code. A 3-bit code
// is two planes (2 + 1) so that no code straddles a 32-bit word (10 codes per word would
// waste 2 bits and misalign k with the word boundary; 2+1 keeps every load aligned).
template <int B> struct Bits;
template <> struct Bits<2> { static constexpr int kPlanes = 1; static constexpr int kWidth[2] = {2, 0}; static constexpr int kOffset[2] = {0, 0}; };
template <> struct Bits<3> { static constexpr int kPlanes = 2; static constexpr int kWidth[2] = {2, 1}; static constexpr int kOffset[2] = {0, 2}; };
template <> struct Bits<4> { static constexpr int kPlanes = 1; static constexpr int kWidth[2] = {4, 0}; static constexpr int kOffset[2] = {0, 0}; };
template <> struct Bits<8> { static constexpr int kPlanes = 1; static constexpr int kWidth[2] = {8, 0}; static constexpr int kOffset[2] = {0, 0}; };

// Codes per 32-bit word of a plane of width W.
template <int W> struct PerWord { static constexpr int value = 32 / W; };

// First qweight row of plane `plane` of a B-bit matrix with padded reduction size kp.
template <int B>
QRA_HD int64_t plane_row0(int plane, int64_t kp) {
  // Planes before plane 1 of a 3-bit matrix hold 2 bits per k: 2*kp/32 rows.
  return plane == 0 ? 0 : (int64_t)Bits<B>::kWidth[0] * kp / 32;
}

// The j-th code (0 <= j < 32/W) of a plane word. Word is any type supporting unsigned
// >> and & with a broadcast scalar: uint32_t on device/host, a SIMD vector on the CPU.
// Unsigned shifts matter: format.py stores int32 words and the top code of a word sits in
// the sign bit; an arithmetic shift would smear it into the next code.
template <int W, class Word>
QRA_HD Word plane_code(Word word, int j) {
  return (word >> (unsigned)(j * W)) & ((1u << W) - 1u);
}

// The j-th code of a plane word left where it sits: code·2^(W·j), for 0 <= j < 32/W - 1
// (the top slot would reach the sign bit of a signed int conversion). One AND instead of a
// shift and an AND: the CPU kernel pre-scales the matching activation by 2^-(W·j), which is
// exact (a power of two), so the product is the same x·code.
template <int W, class Word>
QRA_HD Word plane_code_in_place(Word word, int j) {
  return word & (((1u << W) - 1u) << (unsigned)(j * W));
}

// The full B-bit code at position j of a word row, given the words of every plane that
// cover it. For 3-bit, k = 32*t + j sits in low-plane word 2t + j/16 at slot j%16, and in
// high-plane word t at slot j; callers pass those words.
template <class Word>
QRA_HD Word code3(Word low_word, int low_slot, Word high_word, int high_slot) {
  return plane_code<2>(low_word, low_slot) | (plane_code<1>(high_word, high_slot) << 2u);
}

// ---- one 32-k chunk ------------------------------------------------------------------
// The GPU kernels walk the reduction 32 k at a time: 32 codes of B bits are exactly B words
// of one column — word i < W0 (W0 = width of plane 0) is row chunk*W0 + i of plane 0, and
// for 3-bit word 2 is row `chunk` of the 1-bit plane. A chunk never crosses a group
// (groups are 32, 64 or 128), so one scale and zero serve the whole chunk.
template <int B>
QRA_HD int64_t chunk_word_row(int i, int64_t chunk, int64_t kp) {
  constexpr int W0 = Bits<B>::kWidth[0];
  return i < W0 ? chunk * W0 + i : plane_row0<B>(1, kp) + chunk;
}

// Code k (0 <= k < 32) of a chunk, from its B words in chunk_word_row order.
template <int B, class Word>
QRA_HD Word chunk_code(const Word* words, int k) {
  if constexpr (B == 3) {
    return code3<Word>(words[k >> 4], k & 15, words[2], k);
  } else {
    constexpr int PW = 32 / B;
    return plane_code<B, Word>(words[k / PW], k % PW);
  }
}

// ---- 16-bit float <-> fp32, bit exact, no intrinsics (host and device) ------------------
// Reinterpret the bits of a scalar or a SIMD vector of the same size.
template <class To, class From>
QRA_HD To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To to;
  __builtin_memcpy(&to, &from, sizeof(To));
  return to;
}

// fp16 bits -> fp32 with two integer ops and one multiply, the same on every path (the
// CPU kernel runs it on 8 lanes at once): moving the 15 magnitude bits up by 13 lines the
// fp16 exponent and mantissa up with fp32's, and multiplying by 2^112 rebiases the exponent
// (15 -> 127). fp16 subnormals become fp32 subnormals first and come out exact, since a
// product by a power of two is exact; they matter because quantizers.py lifts scales that
// round to 0 to 2^-24. Inf/NaN are not handled: scales and zeros are finite by contract
// (quantize_weight rejects non-finite weights).
template <class U, class F>
QRA_HD F fp16_bits_to_float(U h) {
  // Scalars broadcast in GCC vector arithmetic, so this reads the same for U = uint32_t.
  const U sign = (h & 0x8000u) << 16u;
  const U mag_bits = (h & 0x7FFFu) << 13u;
  const F mag = bit_cast<F>(mag_bits) * 5.192296858534828e+33f;  // 2^112
  const U out = bit_cast<U>(mag) | sign;
  return bit_cast<F>(out);
}

// bf16 is the top half of an fp32.
template <class U, class F>
QRA_HD F bf16_bits_to_float(U h) {
  const U b = h << 16u;
  return bit_cast<F>(b);
}

QRA_HD float bf16_to_float(uint16_t h) { return bf16_bits_to_float<uint32_t, float>(h); }
QRA_HD float fp16_to_float(uint16_t h) { return fp16_bits_to_float<uint32_t, float>(h); }

// A 16-bit scale/zero as fp32, by dtype code (kFloat16 or kBFloat16).
QRA_HD float half_to_float(uint16_t h, int dtype) {
  return dtype == kBFloat16 ? bf16_to_float(h) : fp16_to_float(h);
}

// An integer code (< 2^23) as fp32 without an int-to-float conversion: OR-ing it into the
// mantissa of 2^23 gives exactly 2^23 + code, and one subtraction leaves the code. On GPUs
// the shift, mask and OR fuse into one LOP3 after the shift, and I2F runs at a quarter of
// the FP32 rate, so this is the cheaper way to dequantize.
QRA_HD float code_to_float(uint32_t code) {
  return bit_cast<float>(code | 0x4B000000u) - 8388608.0f;
}

}  // namespace qra
