// The large-M path of the CPU kernel (prefill, training, the dX of the backward):
// dequantize cache-sized panels of W to fp32 and multiply them with a blocked,
// register-tiled GEMM of our own. Included by cpu/kernel.h inside namespace QRA_CPU_NS, so
// one source becomes the AVX-512, AVX2 and portable builds.
//
// Why our own GEMM and not oneDNN/MKL through torch: the extension has no torch headers (one
// wheel for every torch), so torch's GEMM could only be called from Python on dequantized
// panels — a Python round trip per panel, a panel written to memory by us and repacked by
// the library, and the LoRA up-projection as a separate call. Here the dequantization *is*
// the packing step of the GEMM (the codes become fp32 directly in the layout the
// micro-kernel streams), the LoRA up-projection is one more K-slab of the same register
// tile (so y is written once), and nothing but a KC × NB·NR panel of W exists in fp32.
// Measured on the development machine (benches/README.md), this runs at the speed of
// torch's fp32 GEMM (MKL) and faster than its bf16 GEMM (oneDNN) on the same shapes.
//
// Blocking (Goto/BLIS, with the roles named for this product y[M,N] = A[M,Kr]·B[Kr,N]):
//   * A, the activations, is packed once per call into slivers of MR rows, [Kr][MR] each
//     (converted from fp32/bf16/fp16 and zero-padded, so the kernel never branches on dtype
//     or tails);
//   * B, the weight, is dequantized per block of KC reduction rows × NB slivers of NR
//     columns (KC·NB·NR·4 bytes: ~0.5 MB, an L2-sized panel), each sliver [KC][NR];
//   * the micro-kernel holds an MR × NR tile of y in registers and streams one A sliver
//     (KC·MR·4 bytes, L1) against one B sliver (from L2): per k, NR/L vector loads, MR
//     broadcasts and MR·NR/L FMAs;
//   * loops: KC blocks (outer) > B blocks of the thread's columns > A slivers > B slivers.
//     Every weight is dequantized exactly once per call, an A sliver is reused across the
//     NB slivers of a block, and the y tile is read and written once per KC block.
// Threads split the column slivers (each thread dequantizes only its own columns); when
// there are too few columns, they split the rows instead.
#pragma once

namespace gemm {

// Tile shape of the build: MR rows × NV vectors of L lanes. 32 vector registers with
// AVX-512 hold MR·NV = 24 accumulators + NV loads + a broadcast; 16 with AVX2 hold 12.
#if QRA_CPU_LANES == 16
constexpr int MR = 8, NV = 3;
#elif defined(QRA_CPU_GENERIC)
constexpr int MR = 4, NV = 1;
#else
constexpr int MR = 6, NV = 2;
#endif
constexpr int L = QRA_CPU_LANES;
constexpr int NR = NV * L;
// Reduction rows per block (a multiple of every group size and of 32, so a block starts on
// a word and a group boundary in every plane) and slivers per B block.
constexpr int64_t KC = 512;
constexpr int NB = 8;

using F = f32xL;
using U = u32xL;

static inline F loadf(const float* p) { F v; memcpy(&v, p, sizeof v); return v; }
static inline void storef(float* p, F v) { memcpy(p, &v, sizeof v); }
static inline F splat(float s) { return LanesV::splat(s); }

// acc[i][v] += sum over k < kc of a[k][i] · b[k][v·L .. v·L + L).
static inline void micro_kernel(int64_t kc, const float* __restrict a, const float* __restrict b,
                                F (&acc)[MR][NV]) {
  for (int64_t k = 0; k < kc; ++k) {
    F bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = loadf(b + k * NR + v * L);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const F av = splat(a[k * MR + i]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] += av * bv[v];
    }
  }
}

// ---- packing A -----------------------------------------------------------------------
// One element of a row of activations in any of the three dtypes, as fp32.
static inline float load_elem(const void* p, int dtype, int64_t i) {
  if (dtype == kFloat32) return static_cast<const float*>(p)[i];
  return half_to_float(static_cast<const uint16_t*>(p)[i], dtype);
}

// Rows [m0, m0 + MR) of a row-major matrix src (rows `ld` apart, `cols` valid columns, the
// rest up to `kr` zero), as one sliver dst[kr][MR]; rows >= M are zero.
static void pack_a_sliver(const void* src, int dtype, int64_t ld, int64_t M, int64_t cols,
                          int64_t kr, int64_t m0, float* dst) {
  float row[64];
  for (int64_t k0 = 0; k0 < kr; k0 += 64) {
    const int64_t kn = kr - k0 < 64 ? kr - k0 : 64;
    for (int i = 0; i < MR; ++i) {
      const int64_t m = m0 + i;
      const int64_t valid = m < M ? (cols - k0 < 0 ? 0 : (cols - k0 < kn ? cols - k0 : kn)) : 0;
      if (dtype == kFloat32 && valid) {
        memcpy(row, static_cast<const float*>(src) + m * ld + k0, valid * sizeof(float));
      } else {
        for (int64_t k = 0; k < valid; ++k) row[k] = load_elem(src, dtype, m * ld + k0 + k);
      }
      for (int64_t k = valid; k < kn; ++k) row[k] = 0.f;
      for (int64_t k = 0; k < kn; ++k) dst[(k0 + k) * MR + i] = row[k];
    }
  }
}

struct PackedA {
  float* p = nullptr;
  int64_t kr = 0, slivers = 0;
  const float* sliver(int64_t s) const { return p + s * kr * MR; }
};

// The whole of A (M rows), packed in parallel.
static void pack_a(const void* src, int dtype, int64_t ld, int64_t M, int64_t cols, int64_t kr,
                   PackedA& out, int threads) {
  out.kr = kr;
  out.slivers = (M + MR - 1) / MR;
  auto body = [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s)
      pack_a_sliver(src, dtype, ld, M, cols, kr, s * MR, out.p + s * kr * MR);
  };
  run_parallel(out.slivers, M * kr < (1 << 16) ? 1 : threads, body);
}

// ---- B sources -------------------------------------------------------------------------
// Each fills one sliver dst[kc][NR] with rows [k0, k0 + kc) of the reduction and columns
// [n0, n0 + NR) of the output (columns past the end are zero).

// A dense fp32 matrix stored [out][red] (row-major, `ld` apart): lora_A for x·Aᵀ, lora_B for
// the forward's K-slab — a transposed copy.
struct DenseOutRed {
  const float* p;
  int64_t ld, n_out, n_red;
  void pack(int64_t k0, int64_t kc, int64_t n0, float* dst) const {
    const int64_t cols = n_out - n0 < NR ? n_out - n0 : NR;
    const int64_t ks = n_red - k0 < kc ? (n_red - k0 > 0 ? n_red - k0 : 0) : kc;
    if (cols < NR || ks < kc) memset(dst, 0, kc * NR * sizeof(float));
    for (int64_t j = 0; j < cols; ++j) {
      const float* src = p + (n0 + j) * ld + k0;
      for (int64_t k = 0; k < ks; ++k) dst[k * NR + j] = src[k];
    }
  }
};

// A dense fp32 matrix stored [red][out]: lora_B for dY·B, lora_A for the backward's K-slab.
struct DenseRedOut {
  const float* p;
  int64_t ld, n_out, n_red;
  void pack(int64_t k0, int64_t kc, int64_t n0, float* dst) const {
    for (int64_t k = 0; k < kc; ++k) {
      const int64_t kk = k0 + k;
      const int64_t valid = kk < n_red ? (n_out - n0 < NR ? n_out - n0 : NR) : 0;
      if (valid > 0) memcpy(dst + k * NR, p + kk * ld + n0, valid * sizeof(float));
      for (int64_t j = valid < 0 ? 0 : valid; j < NR; ++j) dst[k * NR + j] = 0.f;
    }
  }
};

// The packed weight, forward (y = x·Wᵀ): reduction over k, output columns n. The words of
// a plane row are contiguous along n, so a vector of L words gives L columns and each
// shift + mask yields one k for all of them: W = q·s − z·s, one FMA per code.
template <int B>
struct QuantForward {
  const ForwardArgs* a;
  void pack(int64_t k0, int64_t kc, int64_t n0, float* dst) const {
    const int64_t N = a->N, Kp = a->Kp;
    const int gs = a->group_size;
    const int64_t cols = N - n0 < NR ? N - n0 : NR;
    const int32_t* q = a->qweight;
    // The last sliver may run past N: its words are copied to a zero-padded row first, so
    // no load reads outside qweight.
    alignas(64) int32_t tail[4][NR];
    for (int64_t g = k0 / gs; g < (k0 + kc) / gs; ++g) {
      F s[NV], zs[NV];
      for (int v = 0; v < NV; ++v) {
        if (n0 + (v + 1) * L <= N) {
          s[v] = LanesV::load_half(a->scales + g * N + n0 + v * L, a->scale_dtype);
          zs[v] = LanesV::load_half(a->zeros + g * N + n0 + v * L, a->scale_dtype) * s[v];
          continue;
        }
        float sv[L], zv[L];
        for (int l = 0; l < L; ++l) {
          const int64_t n = n0 + v * L + l;
          sv[l] = n < N ? half_to_float(a->scales[g * N + n], a->scale_dtype) : 0.f;
          zv[l] = n < N ? half_to_float(a->zeros[g * N + n], a->scale_dtype) * sv[l] : 0.f;
        }
        s[v] = loadf(sv);
        zs[v] = loadf(zv);
      }
      // 32 k at a time: B words per column (chunk_word_row order, see dequant.cuh).
      for (int64_t c = g * gs / 32; c < (g + 1) * gs / 32; ++c) {
        const int32_t* rows[4];
        for (int i = 0; i < B && i < 4; ++i) {
          const int64_t row = chunk_word_row<B>(i, c, Kp);
          rows[i] = q + row * N + n0;
          if (cols < NR) {
            for (int j = 0; j < NR; ++j) tail[i][j] = j < cols ? rows[i][j] : 0;
            rows[i] = tail[i];
          }
        }
        float* out = dst + (c * 32 - k0) * NR;
        if constexpr (B == 8) {
          // 8 rows of 4 codes each: too many for `rows`, decoded row by row.
          for (int i = 0; i < 8; ++i) {
            const int32_t* src = q + (c * 8 + i) * N + n0;
            int32_t pad[NR];
            if (cols < NR) {
              for (int j = 0; j < NR; ++j) pad[j] = j < cols ? src[j] : 0;
              src = pad;
            }
            for (int v = 0; v < NV; ++v) {
              U w;
              memcpy(&w, src + v * L, sizeof w);
#pragma GCC unroll 4
              for (int j = 0; j < 4; ++j) {
                const F code = __builtin_convertvector((i32xL)((w >> (unsigned)(8 * j)) & 255u), F);
                storef(out + (i * 4 + j) * NR + v * L, code * s[v] - zs[v]);
              }
            }
          }
        } else {
          for (int v = 0; v < NV; ++v) {
            U w[4];
            for (int i = 0; i < B && i < 4; ++i) memcpy(&w[i], rows[i] + v * L, sizeof(U));
#pragma GCC unroll 32
            for (int k = 0; k < 32; ++k) {
              const F cf = __builtin_convertvector((i32xL)chunk_code<B, U>(w, k), F);
              storef(out + k * NR + v * L, cf * s[v] - zs[v]);
            }
          }
        }
      }
    }
  }
};

// The packed weight, backward (gx = dY·W): reduction over n, output columns k. For one n
// the codes of L consecutive k sit in one to four words of that column (one word row per
// 32/W k), so each vector is built from broadcast words and one variable shift.
template <int B>
struct QuantBackward {
  const BackwardArgs* a;
  void pack(int64_t n0, int64_t nc, int64_t k0, float* dst) const {
    const int64_t N = a->N, Kp = a->Kp;
    const int gs = a->group_size;
    const int32_t* q = a->qweight;
    // Lane l of vector v holds k = k0 + v·L + l; every such vector lies in one group
    // (groups are multiples of L, slivers start at multiples of NR).
    for (int64_t i = 0; i < nc; ++i) {
      const int64_t n = n0 + i;
      int64_t g_prev = -1;
      F s = splat(0.f), zs = s;
      for (int v = 0; v < NV; ++v) {
        const int64_t kb = k0 + v * L;
        float* out = dst + i * NR + v * L;
        if (kb >= Kp) {
          storef(out, splat(0.f));
          continue;
        }
        const int64_t g = kb / gs;
        if (g != g_prev) {  // a group spans gs / L vectors: convert its scale and zero once
          const float sf = half_to_float(a->scales[g * N + n], a->scale_dtype);
          s = splat(sf);
          zs = splat(half_to_float(a->zeros[g * N + n], a->scale_dtype) * sf);
          g_prev = g;
        }
        const U code = codes_of_column(q, N, Kp, n, kb);
        storef(out, __builtin_convertvector((i32xL)code, F) * s - zs);
      }
    }
  }

  // The codes of k = kb .. kb + L - 1 of column n.
  static U codes_of_column(const int32_t* q, int64_t N, int64_t Kp, int64_t n, int64_t kb) {
    U out;
    if constexpr (B == 3) {
      const U lo = plane_lanes<2>(q, N, n, kb);
      const U hi = plane_lanes<1>(q + plane_row0<3>(1, Kp) * N, N, n, kb);
      out = lo | (hi << 2u);
    } else {
      out = plane_lanes<B>(q, N, n, kb);
    }
    return out;
  }

  // Lanes l = 0..L-1: the code of k = kb + l in the plane of width W starting at `plane`
  // (kb a multiple of L). Lane l reads word (kb + l) / PW of the column and shifts it by
  // W·((kb + l) % PW): the words are broadcast (one, two or four per vector) and one
  // variable shift (vpsrlvd) and a mask finish.
  template <int W>
  static U plane_lanes(const int32_t* plane, int64_t N, int64_t n, int64_t kb) {
    constexpr int PW = 32 / W;
    const int32_t* col = plane + (kb / PW) * N + n;
    U shifts;
    for (int l = 0; l < L; ++l) shifts[l] = (uint32_t)(W * ((kb + l) % PW));
    U words;
#if QRA_CPU_LANES == 16 && defined(__AVX512F__)
    if constexpr (PW >= 16) {
      words = (U)_mm512_set1_epi32(col[0]);
    } else if constexpr (PW == 8) {
      words = (U)_mm512_mask_set1_epi32(_mm512_set1_epi32(col[0]), 0xFF00, col[N]);
    } else {
      const __m128i four = _mm_set_epi32(col[3 * N], col[2 * N], col[N], col[0]);
      const __m512i idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
      words = (U)_mm512_permutexvar_epi32(idx, _mm512_castsi128_si512(four));
    }
#elif QRA_CPU_LANES == 8 && defined(__AVX2__)
    if constexpr (PW >= 8) {
      words = (U)_mm256_set1_epi32(col[0]);
    } else {
      words = (U)_mm256_set_m128i(_mm_set1_epi32(col[N]), _mm_set1_epi32(col[0]));
    }
#else
    for (int l = 0; l < L; ++l) words[l] = (uint32_t)col[(l + kb % PW) / PW * N];
#endif
    return (words >> shifts) & ((1u << W) - 1u);
  }
};

// ---- the driver ----------------------------------------------------------------------
// y[M, n_out] (fp32, rows ldy apart) = A·B (+ A2·B2, the LoRA slab) (+ bias), where A is
// packed, B comes from a source as above, A2 is packed [slivers][r][MR] and B2 a source of
// r reduction rows. `accumulate` keeps what y holds (used for nothing else than the KC
// blocks of one call).
template <class BSrc, class BSlab>
struct Gemm {
  const PackedA* a;
  const BSrc* b;
  int64_t kr;              // reduction length of A·B (a multiple of 32 when B is quantized)
  const PackedA* a2;       // or null
  const BSlab* b2;
  int64_t r;
  const float* bias;       // [n_out] or null
  float* y;
  int64_t M, n_out, ldy;
};

static inline void load_tile(const float* y, int64_t ldy, int64_t rows, int64_t cols,
                             F (&acc)[MR][NV]) {
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) {
      if (i < rows && cols >= (v + 1) * L) {
        acc[i][v] = loadf(y + i * ldy + v * L);
      } else {
        float t[L];
        for (int l = 0; l < L; ++l)
          t[l] = (i < rows && v * L + l < cols) ? y[i * ldy + v * L + l] : 0.f;
        acc[i][v] = loadf(t);
      }
    }
}

static inline void store_tile(float* y, int64_t ldy, int64_t rows, int64_t cols,
                              const F (&acc)[MR][NV]) {
  for (int i = 0; i < rows; ++i)
    for (int v = 0; v < NV; ++v) {
      if (cols >= (v + 1) * L) {
        storef(y + i * ldy + v * L, acc[i][v]);
      } else {
        float t[L];
        storef(t, acc[i][v]);
        for (int l = 0; v * L + l < cols; ++l) y[i * ldy + v * L + l] = t[l];
      }
    }
}

// The work of one thread: column slivers [s0, s1) and A slivers [m0, m1).
template <class BSrc, class BSlab>
static void gemm_range(const Gemm<BSrc, BSlab>& G, int64_t s0, int64_t s1, int64_t m0,
                       int64_t m1) {
  if (s0 >= s1 || m0 >= m1) return;
  const int64_t nb_max = s1 - s0 < NB ? s1 - s0 : NB;
  const int64_t kc_max = G.kr < KC ? G.kr : KC;
  Buffer panel(kc_max * nb_max * NR, true);
  Buffer slab(G.r > 0 ? G.r * nb_max * NR : 1, true);
  for (int64_t k0 = 0; k0 < G.kr; k0 += KC) {
    const int64_t kc = G.kr - k0 < KC ? G.kr - k0 : KC;
    const bool first = k0 == 0, last = k0 + kc >= G.kr;
    for (int64_t sb = s0; sb < s1; sb += NB) {
      const int64_t nb = s1 - sb < NB ? s1 - sb : NB;
      for (int64_t j = 0; j < nb; ++j) {
        G.b->pack(k0, kc, (sb + j) * NR, panel.p + j * kc * NR);
        if (last && G.r > 0) G.b2->pack(0, G.r, (sb + j) * NR, slab.p + j * G.r * NR);
      }
      for (int64_t ms = m0; ms < m1; ++ms) {
        const int64_t rows = G.M - ms * MR < MR ? G.M - ms * MR : MR;
        const float* as = G.a->sliver(ms) + k0 * MR;
        for (int64_t j = 0; j < nb; ++j) {
          const int64_t n0 = (sb + j) * NR;
          const int64_t cols = G.n_out - n0 < NR ? G.n_out - n0 : NR;
          float* yt = G.y + ms * MR * G.ldy + n0;
          F acc[MR][NV];
          if (first) {
            for (int i = 0; i < MR; ++i)
              for (int v = 0; v < NV; ++v) acc[i][v] = splat(0.f);
          } else {
            load_tile(yt, G.ldy, rows, cols, acc);
          }
          micro_kernel(kc, as, panel.p + j * kc * NR, acc);
          if (last) {
            if (G.r > 0) micro_kernel(G.r, G.a2->sliver(ms), slab.p + j * G.r * NR, acc);
            if (G.bias) {
              float bv[NR];
              for (int c = 0; c < NR; ++c) bv[c] = c < cols ? G.bias[n0 + c] : 0.f;
              for (int i = 0; i < MR; ++i)
                for (int v = 0; v < NV; ++v) acc[i][v] += loadf(bv + v * L);
            }
          }
          store_tile(yt, G.ldy, rows, cols, acc);
        }
      }
    }
  }
}

template <class BSrc, class BSlab>
static void run(const Gemm<BSrc, BSlab>& G, int threads) {
  const int64_t slivers = (G.n_out + NR - 1) / NR;
  const int64_t mslivers = G.a->slivers;
  // Enough column slivers: threads take contiguous column ranges (each dequantizes only its
  // own part of W). Otherwise (few outputs, e.g. x·Aᵀ of a LoRA) they split the rows.
  const int64_t work = G.M * G.n_out * (G.kr + G.r);
  const int t = work < (1 << 21) ? 1 : threads;
  const bool by_cols = slivers >= 2 * (int64_t)t || mslivers < (int64_t)t;
  auto body = [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (by_cols)
        gemm_range(G, i * slivers / t, (i + 1) * slivers / t, 0, mslivers);
      else
        gemm_range(G, 0, slivers, i * mslivers / t, (i + 1) * mslivers / t);
    }
  };
  run_parallel(t, t, body);
}

// No slab.
struct NoSlab {
  void pack(int64_t, int64_t, int64_t, float*) const {}
};

// out (packed A sliver layout [slivers][r][MR], scaled by `scale`) = A·B for a B source of
// n_out = r columns: the LoRA down-projection x·Aᵀ (forward) or dY·B (backward), packed
// directly as the A operand of the slab. `plain` (optional, [M][r]) gets the unscaled rows.
template <class BSrc>
static void small_product_packed(const PackedA& a, const BSrc& b, int64_t kr, int64_t M,
                                 int64_t r, float scale, PackedA& out, float* plain,
                                 int threads) {
  out.kr = r;
  out.slivers = a.slivers;
  const int64_t rs = (r + NR - 1) / NR;
  auto body = [&](int64_t s0, int64_t s1) {
    Buffer panel(kr * NR > 0 ? kr * NR : 1, true);
    for (int64_t j = 0; j < rs; ++j) {
      b.pack(0, kr, j * NR, panel.p);
      for (int64_t ms = s0; ms < s1; ++ms) {
        F acc[MR][NV];
        for (int i = 0; i < MR; ++i)
          for (int v = 0; v < NV; ++v) acc[i][v] = splat(0.f);
        micro_kernel(kr, a.sliver(ms), panel.p, acc);
        float t[MR][NR];
        for (int i = 0; i < MR; ++i)
          for (int v = 0; v < NV; ++v) storef(&t[i][v * L], acc[i][v]);
        for (int c = 0; c < NR && j * NR + c < r; ++c)
          for (int i = 0; i < MR; ++i) {
            out.p[(ms * r + j * NR + c) * MR + i] = scale * t[i][c];
            const int64_t m = ms * MR + i;
            if (plain && m < M) plain[m * r + j * NR + c] = t[i][c];
          }
      }
    }
  };
  run_parallel(a.slivers, M * r * kr < (1 << 20) ? 1 : threads, body);
}

// ---- a dequantized panel for a GEMM library (the torch route) ----------------------------
// out[(k − k0)·ldo + (n − n0)] = (code(k, n) − z)·s for k in [k0, k1), n in [n0, n1): the
// layout of qweight (n contiguous), so each word vector gives L columns of 32/W rows of k.
// Threads split the groups of [k0, k1). bf16 rounding is to nearest even, as torch's .to().
static inline void store_lanes(void* out, int dtype, int64_t i, F v) {
  if (dtype == kFloat32) {
    storef(static_cast<float*>(out) + i, v);
    return;
  }
  U u;
  memcpy(&u, &v, sizeof u);
  u = (u + 0x7FFFu + ((u >> 16u) & 1u)) >> 16u;
  const u16xL h = __builtin_convertvector(u, u16xL);
  memcpy(static_cast<uint16_t*>(out) + i, &h, sizeof h);
}

static inline void store_one(void* out, int dtype, int64_t i, float v) {
  if (dtype == kFloat32) {
    static_cast<float*>(out)[i] = v;
    return;
  }
  uint32_t u;
  memcpy(&u, &v, 4);
  static_cast<uint16_t*>(out)[i] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <int B>
static void dequantize_panel_bits(const DequantArgs& a, int threads) {
  const int64_t N = a.N, Kp = a.Kp, gs = a.group_size;
  const int64_t g0 = a.k0 / gs, g1 = a.k1 / gs;
  const int64_t full = a.n0 + (a.n1 - a.n0) / L * L;  // vector columns end here
  const int32_t* q = a.qweight;
  auto body = [&](int64_t ga, int64_t gb) {
    for (int64_t g = g0 + ga; g < g0 + gb; ++g) {
      for (int64_t n = a.n0; n < full; n += L) {
        const F s = LanesV::load_half(a.scales + g * N + n, a.scale_dtype);
        const F zs = LanesV::load_half(a.zeros + g * N + n, a.scale_dtype) * s;
        for (int64_t c = g * gs / 32; c < (g + 1) * gs / 32; ++c) {
          const int64_t o = (c * 32 - a.k0) * a.ldo + (n - a.n0);
          if constexpr (B == 8) {
            for (int i = 0; i < 8; ++i) {
              U w;
              memcpy(&w, q + (c * 8 + i) * N + n, sizeof w);
#pragma GCC unroll 4
              for (int j = 0; j < 4; ++j) {
                const F cf = __builtin_convertvector((i32xL)((w >> (unsigned)(8 * j)) & 255u), F);
                store_lanes(a.out, a.out_dtype, o + (i * 4 + j) * a.ldo, cf * s - zs);
              }
            }
          } else {
            U w[4];  // B words (2 and 4 bits) or 3 (3-bit: two low-plane words, one high)
            for (int i = 0; i < B && i < 4; ++i)
              memcpy(&w[i], q + chunk_word_row<B>(i, c, Kp) * N + n, sizeof(U));
#pragma GCC unroll 32
            for (int k = 0; k < 32; ++k) {
              const F cf = __builtin_convertvector((i32xL)chunk_code<B, U>(w, k), F);
              store_lanes(a.out, a.out_dtype, o + k * a.ldo, cf * s - zs);
            }
          }
        }
      }
      for (int64_t n = full; n < a.n1; ++n) {  // columns past the last full vector
        const float s = half_to_float(a.scales[g * N + n], a.scale_dtype);
        const float zs = half_to_float(a.zeros[g * N + n], a.scale_dtype) * s;
        for (int64_t k = g * gs; k < (g + 1) * gs; ++k)
          store_one(a.out, a.out_dtype, (k - a.k0) * a.ldo + (n - a.n0),
                    (float)code_at<B>(q, N, Kp, n, k) * s - zs);
      }
    }
  };
  run_parallel(g1 - g0, (g1 - g0) * (a.n1 - a.n0) < (1 << 16) ? 1 : threads, body);
}

}  // namespace gemm

// ---- entry points of the GEMM path ---------------------------------------------------
// y = x·dequant(W)ᵀ + scaling·(x·Aᵀ)·Bᵀ + bias.
template <int B>
static void gemm_forward_bits(const ForwardArgs& a, int threads) {
  using namespace gemm;
  const int64_t M = a.M, N = a.N;
  const int64_t slivers = (M + MR - 1) / MR;
  Buffer xbuf(slivers * a.Kp * MR, true);
  PackedA xp;
  xp.p = xbuf.p;
  pack_a(a.x, a.x_dtype, a.ldx, M, a.K, a.Kp, xp, threads);
  Buffer xabuf(a.rank > 0 ? slivers * a.rank * MR : 1);
  PackedA xa;
  xa.p = xabuf.p;
  const DenseOutRed lora_a{a.lora_A, a.K, a.rank, a.K};
  if (a.rank > 0)
    small_product_packed(xp, lora_a, a.Kp, M, a.rank, a.scaling, xa, nullptr, threads);
  const bool f32_out = a.y_dtype == kFloat32;
  Buffer ybuf(f32_out ? 1 : M * N, true);
  float* y = f32_out ? static_cast<float*>(a.y) : ybuf.p;
  const QuantForward<B> w{&a};
  const DenseOutRed lora_b{a.lora_B, a.rank, N, a.rank};
  Gemm<QuantForward<B>, DenseOutRed> G{&xp, &w, a.Kp, a.rank > 0 ? &xa : nullptr, &lora_b,
                                       a.rank, a.bias, y, M, N, N};
  run(G, threads);
  if (!f32_out) store_rows(y, a.y, a.y_dtype, M * N, threads);
}

// grad_x = dY·dequant(W) + scaling·(dY·B)·A, gb = dY·B.
template <int B>
static void gemm_backward_bits(const BackwardArgs& a, int threads) {
  using namespace gemm;
  const int64_t M = a.M, N = a.N;
  const int64_t slivers = (M + MR - 1) / MR;
  Buffer gbuf(slivers * N * MR, true);
  PackedA gp;
  gp.p = gbuf.p;
  pack_a(a.grad_out, a.g_dtype, N, M, N, N, gp, threads);
  Buffer gbbuf(a.rank > 0 ? slivers * a.rank * MR : 1);
  PackedA gbp;
  gbp.p = gbbuf.p;
  const DenseRedOut lora_b{a.lora_B, a.rank, a.rank, N};
  if (a.rank > 0)
    small_product_packed(gp, lora_b, N, M, a.rank, a.scaling, gbp, a.gb, threads);
  const QuantBackward<B> w{&a};
  const DenseRedOut lora_a{a.lora_A, a.K, a.K, a.rank};
  // Output columns: K (the padding columns K..Kp-1 are never stored).
  Gemm<QuantBackward<B>, DenseRedOut> G{&gp, &w, N, a.rank > 0 ? &gbp : nullptr, &lora_a,
                                        a.rank, nullptr, a.grad_x, M, a.K, a.K};
  run(G, threads);
}
