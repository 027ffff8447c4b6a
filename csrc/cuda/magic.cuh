// Magic-number dequantization for the tensor-core kernels (decode.cuh, tc_gemm.cu), and the
// fp32 -> 3 x bf16 split. Everything here is QRA_HD: the CPU build compiles it too
// (csrc/cuda/host_check.cpp), and the CPU tests run it exhaustively against format.py
// (tests/qra_kernels/backends/test_cuda_backend.py). The device path is a handful of PTX
// instructions (lop3.b32, prmt.b32, fma.rn.{f16,bf16}x2); the host path evaluates the *same*
// LUT immediates, PRMT selectors and constants bit by bit, so a wrong truth table or
// selector fails on the CPU.
//
// The trick (Marlin, exllamav2, FasterTransformer): OR-ing a small integer q into the
// mantissa of a 16-bit float whose exponent makes the mantissa's last bit worth 1 gives
// exactly M + q (fp16: M = 1024 = 0x6400, 10 mantissa bits; bf16: M = 128 = 0x4300, 7 bits).
// One LOP3 (mask the code bits, OR the magic exponent) therefore turns the codes sitting in
// the two 16-bit halves of a 32-bit word into a half2 of (M + q0, M + q1), and one packed
// FMA removes M — or, for a code sitting 2^s above bit 0, scales by 2^-s and removes M·2^-s
// in the same instruction. Both steps are exact: every value involved is a small integer or
// a power of two. About one instruction per code, against five for shift, mask, I2F (or the
// fp32 magic), FADD, FMA.
//
// The tensor cores then multiply these *integer codes* (exact in fp16 and in bf16 up to 255)
// by x, and the kernels apply scale and zero per group on the fp32 accumulators:
//     sum_k x_k (q_k - z) s = s · (sum_k x_k q_k - z · sum_k x_k)
// so no dequantized weight is ever rounded to 16 bits on the decode path.
//
// Two pairings of codes into half2 lanes, for two kinds of kernel:
//  * decode pairs (decode_chunk): the two codes of a word that sit 16 bits apart, (j, j+C/2)
//    for a word of C codes — one LOP3 each. The tensor core does not care which k pairs up,
//    as long as x pairs up the same way, so the decode kernel stores x in shared memory in
//    this order (decode_k gives the k of every fragment slot) and reads the packed words as
//    they are stored: no weight permutation, the format stays the contract (FORMAT.md).
//  * natural pairs (natural8): (k, k+1), for kernels whose other operand arrives with cp.async
//    in memory order and is read with ldmatrix (tc_gemm.cu); one PRMT more per pair.
#pragma once

#include <stdint.h>

#include "../dequant.cuh"

#if !defined(__CUDA_ARCH__)
#include <math.h>
#endif

#if defined(__CUDACC__)
#define QRA_UNROLL _Pragma("unroll")
#else
#define QRA_UNROLL
#endif

namespace qra {
namespace magic {

// ---- the primitives ---------------------------------------------------------------------

// LOP3.LUT: any function of three 32-bit operands, given by its truth table on the
// canonical inputs a = 0xF0, b = 0xCC, c = 0xAA (PTX ISA, lop3).
template <uint32_t LUT>
QRA_HD uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(LUT));
  return d;
#else
  uint32_t d = 0;
  for (int i = 0; i < 8; ++i)
    if ((LUT >> i) & 1u)
      d |= ((i & 4) ? a : ~a) & ((i & 2) ? b : ~b) & ((i & 1) ? c : ~c);
  return d;
#endif
}

constexpr uint32_t kAndOr = 0xEA;  // (a & b) | c
constexpr uint32_t kMux = 0xE2;    // (a & b) | (c & ~b): bits of a where b is set, else of c

// PRMT (default mode): byte i of the result is byte (sel >> 4i) & 7 of the 8 bytes {b, a}
// (a = bytes 0-3, b = bytes 4-7); bit 3 of the nibble replicates that byte's sign instead.
QRA_HD uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
#else
  const uint64_t src = (uint64_t)a | ((uint64_t)b << 32);
  uint32_t d = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t s = (sel >> (4 * i)) & 0xFu;
    uint32_t byte = (uint32_t)(src >> (8 * (s & 7u))) & 0xFFu;
    if (s & 8u) byte = (byte & 0x80u) ? 0xFFu : 0x00u;
    d |= byte << (8 * i);
  }
  return d;
#endif
}

// A selector taking byte x of a into byte 0 and byte y of b into byte 2 (bytes 1 and 3 get
// byte 0 of b: every caller masks them away).
QRA_HD constexpr uint32_t sel_02(uint32_t x, uint32_t y) { return x | (4u << 4) | ((4u + y) << 8) | (4u << 12); }

// ---- 16-bit float constants and packed arithmetic -----------------------------------------

template <bool BF16> struct F16 {
  static constexpr uint32_t kMagic = BF16 ? 0x4300u : 0x6400u;  // 128 / 1024
  static constexpr float kMagicValue = BF16 ? 128.0f : 1024.0f;
  static constexpr int kMantissa = BF16 ? 7 : 10;
  static constexpr uint32_t kMagic2 = kMagic | (kMagic << 16);
};

// Bits of a 16-bit float of an exact small value v (a power of two times a small integer).
template <bool BF16>
QRA_HD constexpr uint32_t bits16(float v);

#if !defined(__CUDA_ARCH__)
// Host: round a double to fp16/bf16 bits, to nearest even (once: see h2_fma).
QRA_HD uint32_t round_to_16(double v, bool bf16) {
  const int mant = bf16 ? 7 : 10, bias = bf16 ? 127 : 15, emax = bf16 ? 254 : 30;
  const uint32_t sign = signbit(v) ? 0x8000u : 0u;
  double a = fabs(v);
  if (isnan(a)) return 0x7FFFu;
  const double min_normal = ldexp(1.0, 1 - bias);
  if (a < min_normal) {  // subnormal: a multiple of 2^(1 - bias - mant)
    const double q = nearbyint(ldexp(a, bias - 1 + mant));
    return sign | (uint32_t)q;  // q == 2^mant is the smallest normal, and that is its bits
  }
  int e;
  const double f = frexp(a, &e);  // a = f·2^e, f in [0.5, 1)
  double m = nearbyint((2.0 * f - 1.0) * ldexp(1.0, mant));
  int biased = e - 1 + bias;
  if (m == ldexp(1.0, mant)) { m = 0; ++biased; }
  if (biased > emax) return sign | ((uint32_t)(emax + 1) << mant);  // overflow: inf
  return sign | ((uint32_t)biased << mant) | (uint32_t)m;
}
#endif

template <bool BF16>
QRA_HD float lane_to_float(uint32_t h) {
  return BF16 ? bf16_to_float((uint16_t)h) : fp16_to_float((uint16_t)h);
}

// d = a·b + c on both 16-bit lanes, one rounding (fma.rn.f16x2 / fma.rn.bf16x2). The host
// computes in double and rounds once, which is the exact fma whenever the double holds
// a·b + c exactly — always so for the kernels' operands (codes, powers of two, scales).
template <bool BF16>
QRA_HD uint32_t h2_fma(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  if constexpr (BF16) asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  else asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
#else
  uint32_t d = 0;
  for (int lane = 0; lane < 2; ++lane) {
    const int s = 16 * lane;
    const double r = (double)lane_to_float<BF16>((a >> s) & 0xFFFFu) *
                         (double)lane_to_float<BF16>((b >> s) & 0xFFFFu) +
                     (double)lane_to_float<BF16>((c >> s) & 0xFFFFu);
    d |= round_to_16(r, BF16) << s;
  }
  return d;
#endif
}

template <bool BF16> struct Const2 {
  static constexpr uint32_t kOne = BF16 ? 0x3F803F80u : 0x3C003C00u;
  static constexpr uint32_t kNegOne = BF16 ? 0xBF80BF80u : 0xBC00BC00u;
  static constexpr uint32_t kNegZero = 0x80008000u;
};
// a + b, a - b, a·b as exact-product fmas (bf16 add/sub need sm_90 in PTX; fma is sm_80).
template <bool BF16> QRA_HD uint32_t h2_add(uint32_t a, uint32_t b) { return h2_fma<BF16>(a, Const2<BF16>::kOne, b); }
template <bool BF16> QRA_HD uint32_t h2_sub(uint32_t a, uint32_t b) { return h2_fma<BF16>(b, Const2<BF16>::kNegOne, a); }
template <bool BF16> QRA_HD uint32_t h2_mul(uint32_t a, uint32_t b) { return h2_fma<BF16>(a, b, Const2<BF16>::kNegZero); }

// A half2 of one 16-bit value in both lanes.
QRA_HD constexpr uint32_t dup(uint32_t h) { return h | (h << 16); }

// 16-bit bits of 2^e (-14 <= e <= 15 for fp16).
template <bool BF16>
QRA_HD constexpr uint32_t pow2_bits(int e) {
  return BF16 ? (uint32_t)(127 + e) << 7 : (uint32_t)(15 + e) << 10;
}
// Bits of -(M · 2^-s): the magic value removed together with a 2^-s rescale.
template <bool BF16>
QRA_HD constexpr uint32_t neg_magic_bits(int s) {
  return 0x8000u | (BF16 ? (uint32_t)(127 + 7 - s) << 7 : (uint32_t)(15 + 10 - s) << 10);
}
// v = M + q·2^s on both lanes -> q, with one packed FMA: v·2^-s - M·2^-s.
template <bool BF16>
QRA_HD uint32_t unmagic(uint32_t v, int s) {
  return h2_fma<BF16>(v, dup(pow2_bits<BF16>(-s)), dup(neg_magic_bits<BF16>(s)));
}

// The last step of a pair: q from M + q·2^s (unmagic), or the raw value itself.
template <bool BF16, bool RAW>
QRA_HD uint32_t finish(uint32_t v, int s) { return RAW ? v : unmagic<BF16>(v, s); }

// ---- decode pairs ------------------------------------------------------------------------
// The decode kernel (decode.cuh) runs mma.m16n8k16 with the *weights* as the A operand
// (16 output columns x 16 k) and x as the B operand (16 k x 8 rows of x): "swap AB", so that
// one to eight rows of x fill the n8 side and nothing is wasted on padding 16 rows.
// Thread (grp = lane/4, tig = lane%4) holds, for each of its output columns, four half2
// registers per 32-k chunk — pair i = 0..3 — which feed (a0, a2) of mma step 0 (pairs 0, 1)
// and of step 1 (pairs 2, 3). Which k each pair holds is decode_k; which words of the chunk
// the thread reads is decode_word.

// Words of a chunk (chunk_word_row order) that one thread reads per output column.
template <int B> struct DecodeWords { static constexpr int value = (B == 3 || B == 8) ? 2 : 1; };

// Index (chunk_word_row order) of the j-th word thread `tig` reads.
template <int B>
QRA_HD constexpr int decode_word(int tig, int j) {
  return B == 4 ? tig : B == 2 ? tig >> 1 : B == 8 ? 2 * tig + j : (j == 0 ? tig >> 1 : 2);
}

// The k (0..31, inside the chunk) in `lane` (0 = low half) of pair i of thread tig.
template <int B>
QRA_HD constexpr int decode_k(int tig, int i, int lane) {
  return B == 4 ? 8 * tig + i + 4 * lane
       : B == 8 ? 4 * (2 * tig + (i >> 1)) + (i & 1) + 2 * lane
                : 16 * (tig >> 1) + 4 * (tig & 1) + i + 8 * lane;  // 2 and 3 bits
}

// The inverse: (tig, slot) of chunk position kk, as tig·8 + slot with slot = 2·pair + lane —
// where x[kk] goes in the decode kernel's shared-memory copy of x ([tig][8] per chunk row).
template <int B>
QRA_HD constexpr int decode_slot(int kk) {
  return B == 4 ? (kk >> 3) * 8 + 2 * (kk & 3) + ((kk >> 2) & 1)
       : B == 8 ? ((kk >> 3) * 8 + 2 * (2 * ((kk >> 2) & 1) + (kk & 1)) + ((kk >> 1) & 1))
                : (2 * (kk >> 4) + ((kk >> 2) & 1)) * 8 + 2 * (kk & 3) + ((kk >> 3) & 1);
}

// The four pairs of one output column for thread tig, from its words w[0], w[1] (as
// decode_word lists them); the codes as 16-bit integers (exact), in x's 16-bit type.
// RAW: without the final packed FMA, i.e. M + q·2^s with s = decode_raw_shift(i) and
// M = decode_raw_magic (bf16 8-bit has no raw form: its q is exact either way, M = 0). The
// decode kernel feeds these to the tensor cores with x pre-scaled by 2^-s and its
// accumulators started at -M·sum(x·2^-s): half an instruction per code saved.
template <int B, bool BF16, bool RAW = false>
QRA_HD void decode_chunk(const uint32_t* w, int tig, uint32_t (&p)[4]) {
  constexpr uint32_t M = F16<BF16>::kMagic2;
  if constexpr (B == 4) {
    // Codes j and j+4 sit in bits [4j, 4j+4) of each half. fp16's 10 mantissa bits also take
    // the code at bit 4 (value M + 16q): two LOP3 per byte pair, one shift per word. bf16's 7
    // bits do not (bit 7 is its exponent), so every pair is shifted down.
    if constexpr (BF16) {
QRA_UNROLL
      for (int i = 0; i < 4; ++i) p[i] = finish<BF16, RAW>(lop3<kAndOr>(w[0] >> (4 * i), 0x000F000Fu, M), 0);
    } else {
      const uint32_t w8 = w[0] >> 8;
      p[0] = finish<BF16, RAW>(lop3<kAndOr>(w[0], 0x000F000Fu, M), 0);
      p[1] = finish<BF16, RAW>(lop3<kAndOr>(w[0], 0x00F000F0u, M), 4);
      p[2] = finish<BF16, RAW>(lop3<kAndOr>(w8, 0x000F000Fu, M), 0);
      p[3] = finish<BF16, RAW>(lop3<kAndOr>(w8, 0x00F000F0u, M), 4);
    }
  } else if constexpr (B == 2) {
    // 16 codes; this thread takes pairs 4h..4h+3 (h = tig & 1) of its word: one shift puts
    // them at bits 2i of each half.
    const uint32_t ws = w[0] >> (8 * (tig & 1));
QRA_UNROLL
    for (int i = 0; i < 4; ++i) {
      if (BF16 && i == 3) {  // bits 6-7: bit 7 is bf16's exponent; take it from 2 bits lower
        p[i] = finish<BF16, RAW>(lop3<kAndOr>(ws >> 2, 0x00300030u, M), 4);
      } else {
        p[i] = finish<BF16, RAW>(lop3<kAndOr>(ws, 0x00030003u << (2 * i), M), 2 * i);
      }
    }
  } else if constexpr (B == 8) {
    // Codes j and j+2 of a word are bytes j and j+2.
QRA_UNROLL
    for (int j = 0; j < 2; ++j)
QRA_UNROLL
      for (int t = 0; t < 2; ++t) {
        uint32_t& out = p[2 * j + t];
        if constexpr (BF16) {
          // 8-bit codes do not fit bf16's 7 mantissa bits: low and high nibbles separately,
          // then q = 16·(M + hi) - (16·M + M) + (M + lo), each step exact (integers <= 2431
          // that are multiples of 16 where bf16's spacing is 16).
          const uint32_t lo = lop3<kAndOr>(w[j] >> (8 * t), 0x000F000Fu, M);
          const uint32_t hi = lop3<kAndOr>(w[j] >> (8 * t + 4), 0x000F000Fu, M);
          const uint32_t hi16 = h2_fma<BF16>(hi, dup(pow2_bits<BF16>(4)), dup(0xC508u));  // -2176
          out = h2_add<BF16>(hi16, lo);
        } else {
          // fp16's 10 bits take a whole byte: PRMT drops bytes t and t+2 under the magic
          // exponent byte 0x64 (one instruction), then one subtraction.
          out = finish<BF16, RAW>(prmt(w[j], 0x64646464u, 0x4240u + 0x0101u * t), 0);
        }
      }
  } else {
    static_assert(B == 3, "bits must be 2, 3, 4 or 8");
    // Low plane: 2-bit codes, pairs (t, t+8) of word w[0] as for 2 bits. High plane w[1]:
    // bit k of the chunk. PRMT brings the high bits of this word's 16 k into byte 0 (k of the
    // low half) and byte 2 (k + 8), and one mux per pair puts each high bit right above its
    // 2 low bits: the 3-bit code is then contiguous under the magic exponent.
    const int j = tig >> 1, h = tig & 1;
    const uint32_t hb = prmt(w[1], w[1], sel_02(2 * j, 2 * j + 1));
    const uint32_t hs = (hb << 2) >> (4 * h);  // high bit of pair 4h + i at bit i + 2
    const uint32_t ws = w[0] >> (8 * h);       // low bits of pair 4h + i at bits 2i, 2i + 1
QRA_UNROLL
    for (int i = 0; i < 4; ++i) {
      const uint32_t lo = ws >> i;             // ... now at bits i, i + 1
      const uint32_t code = lop3<kMux>(lo, 0x00030003u << i, hs);
      p[i] = finish<BF16, RAW>(lop3<kAndOr>(code, 0x00070007u << i, M), i);
    }
  }
}

// The bit position s of pair i's code in decode_chunk's RAW form, and its magic value M.
template <int B, bool BF16>
QRA_HD constexpr int decode_raw_shift(int i) {
  return B == 4 ? (BF16 ? 0 : 4 * (i & 1)) : B == 2 ? (BF16 && i == 3 ? 4 : 2 * i) : B == 3 ? i : 0;
}
template <int B, bool BF16>
QRA_HD constexpr float decode_raw_magic() {
  return (B == 8 && BF16) ? 0.0f : F16<BF16>::kMagicValue;
}

// Which registers of mma.m16n8k16 (PTX ISA "matrix fragments for mma.m16n8k16") carry what,
// in the decode kernel. Thread (grp, tig) owns output columns c = 0..3 at n0 + 4·grp + c (one
// 16-byte load of each word row); column tile T (0, 1) has A rows grp (c = 2T) and grp + 8
// (c = 2T + 1). a0/a2 are row grp, a1/a3 row grp + 8; a0/a1 hold k-slots 2tig, 2tig + 1 and
// a2/a3 slots 2tig + 8, 2tig + 9, which step s fills with pairs 2s and 2s + 1.
QRA_HD constexpr int decode_a_col(int T, int reg) { return 2 * T + (reg & 1); }
QRA_HD constexpr int decode_a_pair(int s, int reg) { return 2 * s + (reg >> 1); }
// b0/b1 (slots 2tig.., 2tig + 8..) of x row m = grp (+ 8 in the second n8 tile).
QRA_HD constexpr int decode_b_pair(int s, int reg) { return 2 * s + reg; }
// c0..c3: output column 2T + (reg >> 1), x row 2·tig + (reg & 1) (+ 8 in the second n8 tile).
QRA_HD constexpr int decode_c_col(int T, int reg) { return 2 * T + (reg >> 1); }
QRA_HD constexpr int decode_c_row(int tig, int reg) { return 2 * tig + (reg & 1); }

// ---- natural pairs -----------------------------------------------------------------------
// Codes k0 + 2u, k0 + 2u + 1 (u = 0..3) of one column as four half2 — an octet of 8
// consecutive k, octet `oct` (0..3) of a 32-k chunk, from the chunk's B words of the column
// in chunk_word_row order at words[0], words[stride], ... (only the words the octet needs are
// read). For kernels whose other operand is in memory order.
template <int B, bool BF16>
QRA_HD void natural8(const uint32_t* words, int stride, int oct, uint32_t (&p)[4]) {
  constexpr uint32_t M = F16<BF16>::kMagic2;
  if constexpr (B == 4) {
    // Byte u holds codes 2u (low nibble) and 2u + 1 (high nibble): PRMT takes byte u of w
    // and of w >> 4 into the two halves; both codes are then at bit 0.
    const uint32_t w = words[oct * stride], w4 = w >> 4;
    QRA_UNROLL
    for (int u = 0; u < 4; ++u)
      p[u] = unmagic<BF16>(lop3<kAndOr>(prmt(w, w4, sel_02(u, u)), 0x000F000Fu, M), 0);
  } else if constexpr (B == 2) {
    // Octet oct is byte pair 2(oct & 1) + {0, 1} of word oct / 2; byte b holds codes at bits
    // 0, 2 (pair u even) and 4, 6 (pair u odd): w and w >> 2 give both codes at bit 4(u & 1).
    const uint32_t w = words[(oct >> 1) * stride], w2 = w >> 2;
    QRA_UNROLL
    for (int u = 0; u < 4; ++u) {
      const uint32_t b = 2 * (oct & 1) + (u >> 1);
      const int s = 4 * (u & 1);
      p[u] = unmagic<BF16>(lop3<kAndOr>(prmt(w, w2, sel_02(b, b)), 0x00030003u << s, M), s);
    }
  } else if constexpr (B == 8) {
    QRA_UNROLL
    for (int u = 0; u < 4; ++u) {
      const uint32_t w = words[(2 * oct + (u >> 1)) * stride];
      const uint32_t b = 2 * (u & 1);  // bytes b, b + 1
      if constexpr (BF16) {
        const uint32_t lo = lop3<kAndOr>(prmt(w, w, sel_02(b, b + 1)), 0x000F000Fu, M);
        const uint32_t hi = lop3<kAndOr>(prmt(w >> 4, w >> 4, sel_02(b, b + 1)), 0x000F000Fu, M);
        p[u] = h2_add<BF16>(h2_fma<BF16>(hi, dup(pow2_bits<BF16>(4)), dup(0xC508u)), lo);
      } else {
        p[u] = unmagic<BF16>(prmt(w, 0x64646464u, b | (4u << 4) | ((b + 1) << 8) | (4u << 12)), 0);
      }
    }
  } else {
    static_assert(B == 3, "bits must be 2, 3, 4 or 8");
    // Low plane as for 2 bits; high plane word words[2], bit k of the chunk: byte oct holds
    // this octet's high bits, bits 2u and 2u + 1. hb puts bit 2u at 2u (low half) and bit
    // 2u + 1 at 16 + 2u (from hi >> 1); each is then shifted to sit above its 2 low bits.
    const uint32_t w = words[(oct >> 1) * stride], w2 = w >> 2;
    const uint32_t hi = words[2 * stride];
    const uint32_t hb = prmt(hi, hi >> 1, sel_02(oct, oct));
    QRA_UNROLL
    for (int u = 0; u < 4; ++u) {
      const uint32_t b = 2 * (oct & 1) + (u >> 1);
      const int s = 4 * (u & 1);                 // low bits at s, s + 1
      const int shift = s + 2 - 2 * u;           // high bit from 2u to s + 2
      const uint32_t hs = shift >= 0 ? hb << shift : hb >> -shift;
      const uint32_t lo = prmt(w, w2, sel_02(b, b));
      const uint32_t code = lop3<kMux>(lo, 0x00030003u << s, hs);
      p[u] = unmagic<BF16>(lop3<kAndOr>(code, 0x00070007u << s, M), s);
    }
  }
}

// ---- fp32 x on bf16 tensor cores -----------------------------------------------------------
// x = hi + mid + lo, each a bf16 (RNE); the residuals are exact in fp32, so the three carry
// x's 24 significant bits (less only for |x| near fp32's smallest normals). The codes are exact
// bf16 integers and every product exact in fp32: three mma.sync give fp32 x·q to fp32
// accumulation accuracy (the "bf16x3" emulation of fp32 GEMM).
QRA_HD uint32_t float_to_bf16_bits(float f) {
#if defined(__CUDA_ARCH__)
  uint16_t h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  const uint32_t u = bit_cast<uint32_t>(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;  // NaN
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
#endif
}

QRA_HD void split_bf16x3(float x, uint32_t& hi, uint32_t& mid, uint32_t& lo) {
  hi = float_to_bf16_bits(x);
  const float r1 = x - bf16_to_float((uint16_t)hi);
  mid = float_to_bf16_bits(r1);
  const float r2 = r1 - bf16_to_float((uint16_t)mid);
  lo = float_to_bf16_bits(r2);
}

}  // namespace magic
}  // namespace qra
