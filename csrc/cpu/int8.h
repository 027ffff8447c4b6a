// The integer path for decode (kPathInt8): x quantized per row and group to int8, and the
// codes multiplied with it by integer dot products — vpdpbusd (AVX-512 VNNI, AVX-VNNI: four
// u8·s8 products added into an int32 lane per instruction) or vpmaddubsw + vpmaddwd (AVX2,
// AVX-512BW). The way llama.cpp's K-quant dot products work, on our layout.
//
// Numerics. Per row m and group g of x: d = max|x| / 127, x8 = round(x / d) in [-127, 127].
// Per group the kernel computes exactly (int32)  sum_k q_k·x8_k  and  sum_k x8_k, so
//   y[m, n] = sum_g s[g,n]·d[m,g]·(sum_k q·x8 − z[g,n]·sum_k x8)
//           = sum_k dequant(W)[n, k] · (d·x8)[m, k]
// up to fp32 rounding of the per-group terms: the float product with x replaced by its
// int8 rounding. The error against the reference is therefore bounded by
//   |y − y_ref| <= sum_k |dequant(W)[n, k]| · d[m, g(k)] / 2        (+ fp32 rounding),
// which is what the tests check (tests/qra_kernels/backends/test_cpu_backend.py). LoRA
// and bias are added in fp32 exactly as in the float GEMV.
//
// Layout. qweight words are contiguous along n, so a 32-bit lane is one column and holds
// 32/W codes of consecutive k. One "extraction" t of a word keeps, in each of its 4 bytes,
// one code: byte b gets the code of slot j = b·(8/W) + t (shift by W·t, mask each byte).
// The four x8 of those slots form one dword, prepared once per call and broadcast to all
// lanes; one dot-product instruction then adds 4 codes × x8 into every column's int32.
// Work per code: 4-bit 2 extractions per word (8 codes), 2-bit 4 (16 codes), the 1-bit
// plane of 3-bit 8 (32 codes), 8-bit none (the word is four u8 codes already).
// For 3-bit the high plane's bit is extracted to bit 2 of its byte, i.e. as 4·bit, so both
// planes add into one accumulator (the code is low + 4·high).
#pragma once

namespace int8 {

// Extractions per word of a plane of width W.
template <int W>
struct Ex {
  static constexpr int PW = 32 / W;      // codes per word
  static constexpr int T = W >= 8 ? 1 : 8 / W;  // extractions per word (codes per byte)
};

// Mask of one code per byte for plane width W, and the extraction.
template <int W, int MULT>
static inline u32xL extract(u32xL w, int t) {
  // MULT: the code's multiplier in the full code (4 for the high plane of 3-bit), placed
  // by shifting the field to bit log2(MULT) of its byte.
  constexpr uint32_t field = W >= 8 ? 0xFFFFFFFFu : ((1u << W) - 1u) * 0x01010101u;
  constexpr int up = MULT == 4 ? 2 : 0;
  const int shift = W * t - up;
  const u32xL moved = shift >= 0 ? (w >> (unsigned)shift) : (w << (unsigned)-shift);
  return moved & (field << (unsigned)up);
}

// acc += sum over the 4 bytes of each lane of e (u8) times the bytes of xd (s8, the same
// dword in every lane).
static inline i32xL dot4(i32xL acc, u32xL e, uint32_t xd) {
#if defined(QRA_CPU_VNNI512)
  return (i32xL)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)e, _mm512_set1_epi32((int)xd));
#elif defined(QRA_CPU_AVXVNNI)
  return (i32xL)_mm256_dpbusd_avx_epi32((__m256i)acc, (__m256i)e, _mm256_set1_epi32((int)xd));
#elif QRA_CPU_LANES == 16 && defined(__AVX512BW__)
  // u8·s8 pairs to int16 (codes <= 15 here: no saturation, see kAvx2Safe), then to int32.
  const __m512i p = _mm512_maddubs_epi16((__m512i)e, _mm512_set1_epi32((int)xd));
  return acc + (i32xL)_mm512_madd_epi16(p, _mm512_set1_epi16(1));
#elif QRA_CPU_LANES == 8 && defined(__AVX2__)
  const __m256i p = _mm256_maddubs_epi16((__m256i)e, _mm256_set1_epi32((int)xd));
  return acc + (i32xL)_mm256_madd_epi16(p, _mm256_set1_epi16(1));
#else
  i32xL out = acc;
  for (int l = 0; l < QRA_CPU_LANES; ++l) {
    int32_t s = 0;
    for (int b = 0; b < 4; ++b)
      s += (int32_t)((e[l] >> (8 * b)) & 0xFFu) * (int32_t)(int8_t)((xd >> (8 * b)) & 0xFFu);
    out[l] += s;
  }
  return out;
#endif
}

// With vpmaddubsw (no VNNI) a pair of u8·s8 products is summed to int16 with saturation:
// codes must stay <= 128 (2·128·127 < 2^15). 8-bit codes are therefore split into nibbles on
// those builds (two extractions, the high one weighted by 16 in a second accumulator).
#if defined(QRA_CPU_VNNI512) || defined(QRA_CPU_AVXVNNI)
constexpr bool kSplit8 = false;
#else
constexpr bool kSplit8 = true;
#endif

// x quantized for one call: per plane width W, the broadcast dwords xq[m][word row][t]
// (one u32 each), and per (m, g) the scale d and sum of x8.
struct XQ {
  uint32_t* q[2];   // per plane
  float* d;         // [M][G]
  int32_t* sum;     // [M][G]
};

template <int W>
static void make_dwords(const int8_t* x8, int64_t M, int64_t Kp, uint32_t* out) {
  constexpr int PW = Ex<W>::PW, T = Ex<W>::T;
  const int64_t rows = Kp / PW;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < rows; ++r)
      for (int t = 0; t < T; ++t) {
        uint32_t d = 0;
        for (int b = 0; b < 4; ++b) {
          const int64_t k = r * PW + b * (PW / 4) + t;
          d |= (uint32_t)(uint8_t)x8[m * Kp + k] << (8 * b);
        }
        out[(m * rows + r) * T + t] = d;
      }
}

// Row-wise, group-wise symmetric int8 quantization of x (fp32 [M, Kp], zero padded).
static void quantize_x(const float* x, int64_t M, int64_t Kp, int gs, int8_t* x8, float* d,
                       int32_t* sum) {
  const int64_t G = Kp / gs;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + m * Kp + g * gs;
      f32xL mx = LanesV::splat(0.f);
      for (int k = 0; k < gs; k += LanesV::L) {
        const f32xL v = LanesV::load(xg + k);
        const f32xL av = v < 0 ? -v : v;
        mx = mx > av ? mx : av;
      }
      float amax = 0.f;
      for (int l = 0; l < LanesV::L; ++l) amax = amax > mx[l] ? amax : mx[l];
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t s = 0;
      for (int k = 0; k < gs; ++k) {
        float v = __builtin_rintf(xg[k] * inv);
        v = v > 127.f ? 127.f : (v < -127.f ? -127.f : v);
        x8[m * Kp + g * gs + k] = (int8_t)v;
        s += (int32_t)v;
      }
      d[m * G + g] = amax / 127.f;
      sum[m * G + g] = s;
    }
}

// Independent accumulators per (row, vector): a dot-product instruction waits ~5 cycles for
// the previous one on the same register, so with few rows and vectors the extractions of a
// word are spread over J chains (as kChains does for the float GEMV).
static constexpr int kChainsI8(int mt, int nv) { return mt * nv >= 8 ? 1 : 8 / (mt * nv); }

// One word row r of one plane: acc[chain][i][v] += codes × x8 (weighted by MULT). BASE is the
// chain of the row's first extraction; it is a template argument, like every index into acc,
// so the accumulators stay in registers. (An index computed from the runtime row, as in
// `(r·T + t) % J`, made GCC keep acc on the stack: a load and a store around every
// vpdpbusd, a store-forwarding round trip on each chain: seen in objdump -d of
// group_block_i8<4, 1, 2> of the avx512bf16 build, 2026-12-02.)
template <int W, int MULT, int J, int MT, int NV, int BASE>
static inline void row_dot_i8(const int32_t* plane, int64_t N, int64_t n0, int64_t r,
                              const uint32_t* xq, int64_t ldq, i32xL (&acc)[J][MT][NV],
                              i32xL (&acc16)[MT][NV]) {
  constexpr int T = Ex<W>::T, L = QRA_CPU_LANES;
  u32xL w[NV];
  for (int v = 0; v < NV; ++v) memcpy(&w[v], plane + r * N + n0 + v * L, sizeof(u32xL));
  if constexpr (W == 8 && kSplit8) {
    // Nibbles: low into acc, high into acc16 (weighted by 16 at the end of the group).
    for (int v = 0; v < NV; ++v) {
      const u32xL lo = w[v] & 0x0F0F0F0Fu, hi = (w[v] >> 4u) & 0x0F0F0F0Fu;
      for (int i = 0; i < MT; ++i) {
        const uint32_t xd = xq[i * ldq + r];
        acc[BASE % J][i][v] = dot4(acc[BASE % J][i][v], lo, xd);
        acc16[i][v] = dot4(acc16[i][v], hi, xd);
      }
    }
  } else {
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      u32xL e[NV];
      for (int v = 0; v < NV; ++v) e[v] = extract<W, MULT>(w[v], t);
      const int c = (BASE + t) % J;  // t is a constant once unrolled
      for (int i = 0; i < MT; ++i) {
        const uint32_t xd = xq[(i * ldq + r) * T + t];
        for (int v = 0; v < NV; ++v) acc[c][i][v] = dot4(acc[c][i][v], e[v], xd);
      }
    }
  }
}

// S consecutive rows starting at r, rows s = 0 .. S-1 taking chains from s·T on.
template <int W, int MULT, int J, int MT, int NV, int S, int s = 0>
static inline void rows_dot_i8(const int32_t* plane, int64_t N, int64_t n0, int64_t r,
                               const uint32_t* xq, int64_t ldq, i32xL (&acc)[J][MT][NV],
                               i32xL (&acc16)[MT][NV]) {
  if constexpr (s < S) {
    row_dot_i8<W, MULT, J, MT, NV, (s * Ex<W>::T) % J>(plane, N, n0, r + s, xq, ldq, acc,
                                                        acc16);
    rows_dot_i8<W, MULT, J, MT, NV, S, s + 1>(plane, N, n0, r, xq, ldq, acc, acc16);
  }
}

// acc[c][i][v] += sum over word rows [r0, r1) of one plane: codes × x8 (weighted by MULT).
// Rows are taken S at a time so that the J chains are all used with constant indices.
template <int W, int MULT, int J, int MT, int NV>
static inline void plane_dot_i8(const int32_t* plane, int64_t N, int64_t n0, int64_t r0,
                                int64_t r1, const uint32_t* xq, int64_t ldq,
                                i32xL (&acc)[J][MT][NV], i32xL (&acc16)[MT][NV]) {
  constexpr int T = (W == 8 && kSplit8) ? 1 : Ex<W>::T;
  constexpr int S = J > T ? J / T : 1;
  int64_t r = r0;
  for (; r + S <= r1; r += S) rows_dot_i8<W, MULT, J, MT, NV, S>(plane, N, n0, r, xq, ldq, acc, acc16);
  for (; r < r1; ++r) row_dot_i8<W, MULT, J, MT, NV, 0>(plane, N, n0, r, xq, ldq, acc, acc16);
}

// What a call's blocks share, computed once (the divisions were per block before: an idiv
// and ~40 instructions of set-up for every 8-row block at 4-bit, 4 at 2-bit).
struct Ctx {
  int64_t N, G, gs;
  int64_t rows0, rows1;   // word rows per row of x, plane 0 and the 3-bit high plane
  const int32_t* plane1;  // the 3-bit high plane
};

template <int B>
static Ctx make_ctx(const GemvArgs& a) {
  constexpr int W = Bits<B>::kWidth[0];
  return Ctx{a.N, a.Kp / a.group_size, a.group_size, a.Kp / (32 / W), a.Kp / 32,
             a.qweight + plane_row0<B>(1, a.Kp) * a.N};
}

// Group g of the reduction for rows [m0, m0+MT) of x and columns [n0, n0 + NV·L) of y:
// y += s·d·(sum q·x8 − z·sum x8).
template <int B, int MT, int NV>
__attribute__((always_inline)) static inline void group_block_i8(const GemvArgs& a,
                                                                 const Ctx& c, const XQ& xq,
                                                                 int64_t g, int64_t n0,
                                                                 int64_t m0) {
  constexpr int L = QRA_CPU_LANES;
  constexpr int W = Bits<B>::kWidth[0], PW = 32 / W;
  constexpr int J = kChainsI8(MT, NV);
  const int64_t N = c.N, G = c.G, gs = c.gs;
  i32xL acc[J][MT][NV], acc16[MT][NV];
  for (int i = 0; i < MT; ++i)
    for (int v = 0; v < NV; ++v) {
      acc16[i][v] = (i32xL){} + 0;
      for (int j = 0; j < J; ++j) acc[j][i][v] = acc16[i][v];
    }
  const int64_t rpg0 = gs / PW;  // word rows per group (gs is a multiple of 32)
  plane_dot_i8<W, 1, J, MT, NV>(a.qweight, N, n0, g * rpg0, (g + 1) * rpg0,
                                xq.q[0] + m0 * c.rows0 * Ex<W>::T, c.rows0, acc, acc16);
  if constexpr (B == 3) {
    const int64_t rpg1 = gs / 32;
    plane_dot_i8<1, 4, J, MT, NV>(c.plane1, N, n0, g * rpg1, (g + 1) * rpg1,
                                  xq.q[1] + m0 * c.rows1 * 8, c.rows1, acc, acc16);
  }
  for (int j = 1; j < J; ++j)
    for (int i = 0; i < MT; ++i)
      for (int v = 0; v < NV; ++v) acc[0][i][v] += acc[j][i][v];
  for (int v = 0; v < NV; ++v) {
    const f32xL s = LanesV::load_half(a.scales + g * N + n0 + v * L, a.scale_dtype);
    const f32xL z = LanesV::load_half(a.zeros + g * N + n0 + v * L, a.scale_dtype);
    for (int i = 0; i < MT; ++i) {
      const int64_t m = m0 + i;
      i32xL q = acc[0][i][v];
      if constexpr (B == 8 && kSplit8) q += acc16[i][v] << 4;
      const f32xL qf = __builtin_convertvector(q, f32xL);
      const float d = xq.d[m * G + g];
      const float xs = (float)xq.sum[m * G + g];
      float* yp = a.y + m * N + n0 + v * L;
      LanesV::store(yp, LanesV::load(yp) + (s * d) * (qf - z * xs));
    }
  }
}

// Group g for the column blocks [u0, u1) and every row of x: the loop the threads run.
template <int B, int MT, int NV>
static void group_strip_i8(const GemvArgs& a, const Ctx& c, const XQ& xq, int64_t g,
                           int64_t u0, int64_t u1) {
  constexpr int COLS = NV * QRA_CPU_LANES;
  const int64_t M = a.M;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t n0 = u * COLS;
    int64_t m0 = 0;
    for (; m0 + MT <= M; m0 += MT) group_block_i8<B, MT, NV>(a, c, xq, g, n0, m0);
    if constexpr (MT > 2)
      for (; m0 + 2 <= M; m0 += 2) group_block_i8<B, 2, NV>(a, c, xq, g, n0, m0);
    for (; m0 < M; ++m0) group_block_i8<B, 1, NV>(a, c, xq, g, n0, m0);
  }
}

// The one-column tail of N: scalar, same numbers.
template <int B>
static void tail_column_i8(const GemvArgs& a, const int8_t* x8, const XQ& xq, int64_t n) {
  const int64_t N = a.N, Kp = a.Kp, G = Kp / a.group_size;
  for (int64_t m = 0; m < a.M; ++m) {
    float y = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      int32_t acc = 0;
      for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; ++k)
        acc += (int32_t)code_at<B>(a.qweight, N, Kp, n, k) * x8[m * Kp + k];
      const float s = half_to_float(a.scales[g * N + n], a.scale_dtype);
      const float z = half_to_float(a.zeros[g * N + n], a.scale_dtype);
      y += s * xq.d[m * G + g] * ((float)acc - z * (float)xq.sum[m * G + g]);
    }
    a.y[m * N + n] += y;
  }
}

template <int B>
static void forward_bits_i8(const GemvArgs& a, int threads) {
  const int64_t M = a.M, Kp = a.Kp, G = Kp / a.group_size, K = a.K, N = a.N;
  Buffer xa_buf(M * a.rank), d_buf(M * G);
  float* xa = xa_buf.p;
  int8_t* x8 = new int8_t[M * Kp];
  int32_t* xsum = new int32_t[M * G];
  quantize_x(a.x, M, Kp, a.group_size, x8, d_buf.p, xsum);
  constexpr int W0 = Bits<B>::kWidth[0];
  const int64_t n0_words = M * (Kp / Ex<W0>::PW) * Ex<W0>::T;
  const int64_t n1_words = B == 3 ? M * (Kp / 32) * 8 : 1;
  uint32_t* q0 = new uint32_t[n0_words];
  uint32_t* q1 = new uint32_t[n1_words];
  make_dwords<W0>(x8, M, Kp, q0);
  if (B == 3) make_dwords<1>(x8, M, Kp, q1);
  XQ xq{{q0, q1}, d_buf.p, xsum};
  const Ctx ctx = make_ctx<B>(a);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < a.rank; ++r) xa[m * a.rank + r] = dot(a.x + m * Kp, a.lora_A + r * K, K);

  constexpr int L = QRA_CPU_LANES;
  // Columns per block: NV vectors. With AVX-512 (32 registers) four rows × two vectors of
  // int32 accumulators; AVX2 two × two.
  constexpr int NV = 2, COLS = NV * L;
  constexpr int MT = L == 16 ? 4 : 2;
  const int64_t full = N / COLS;
  const int64_t units = full + (N % COLS ? 1 : 0);
  const int nthreads = N * Kp < (1 << 20) ? 1 : threads;
  auto body = [&](int64_t u0, int64_t u1) {
    const int64_t c0 = u0 * COLS, c1 = u1 * COLS < N ? u1 * COLS : N;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = c0; n < c1; ++n) a.y[m * N + n] = 0.f;
    const int64_t uf = u1 < full ? u1 : full;
    for (int64_t g = 0; g < G; ++g) group_strip_i8<B, MT, NV>(a, ctx, xq, g, u0, uf);
    if (u1 > full)
      for (int64_t n = full * COLS; n < N; ++n) tail_column_i8<B>(a, x8, xq, n);
    if (a.rank > 0 || a.bias)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = c0; n < c1; ++n) {
          float val = a.y[m * N + n];
          if (a.rank > 0) val += a.scaling * dot(xa + m * a.rank, a.lora_B + n * a.rank, a.rank);
          if (a.bias) val += a.bias[n];
          a.y[m * N + n] = val;
        }
  };
  run_parallel(units, nthreads, body);
  delete[] x8;
  delete[] xsum;
  delete[] q0;
  delete[] q1;
}

}  // namespace int8

static void int8_forward(const GemvArgs& a, int threads) {
  switch (a.bits) {
    case 2: int8::forward_bits_i8<2>(a, threads); break;
    case 3: int8::forward_bits_i8<3>(a, threads); break;
    case 4: int8::forward_bits_i8<4>(a, threads); break;
    case 8: int8::forward_bits_i8<8>(a, threads); break;
  }
}
