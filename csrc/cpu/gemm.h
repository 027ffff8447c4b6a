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


// ---- rows of dequant(W) for a GEMM library (the torch route's forward) --------------------
// out[(n − n0)·ldo + (k − k0)] = (code(k, n) − z)·s for n in [n0, n1), k in [k0, k1): W's
// own [out, in] layout, the one nn.Linear's weight has. torch.mm(x, out.t()) then takes the
// same oneDNN kernel as F.linear on a bf16 weight; on the [k][n] panel above it is slower
// (benches/README.md, "The torch path's forward panel"). The values are those of the panel
// above, bit for bit: the words are still read as vectors of L columns and dequantized the
// same way, 16 k at a time, and the 16 × L block is transposed before it is stored (in
// registers on AVX-512, through a small tile elsewhere). Threads split the columns.
#if QRA_CPU_LANES == 16 && defined(__AVX512F__)
// r[i] (row i, 16 lanes) -> r[j] = lane j of every row: the usual three shuffle levels (pairs
// of floats, then pairs of pairs inside each 128-bit lane, then the four 128-bit lanes).
static inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  // u[4i + j], 128-bit lane l: column 4l + j of rows 4i .. 4i + 3.
  for (int j = 0; j < 4; ++j) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x44);
    const __m512 v1 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xEE);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x44);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xEE);
    r[j] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[4 + j] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    r[8 + j] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}

// 16 values of one output row, k-contiguous.
static inline void store_row16(void* out, int dtype, int64_t i, __m512 v) {
#if defined(QRA_CPU_BF16DOT)
  // vcvtneps2bf16 rounds to nearest even like the integer rounding of store_lanes, but reads
  // subnormal inputs as zero: those (never seen in practice: |(q − z)·s| < 2^-126) take the
  // exact path.
  if (dtype == kBFloat16 && !_mm512_fpclass_ps_mask(v, 0x20)) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i),
                        (__m256i)_mm512_cvtneps_pbh(v));
    return;
  }
#endif
  store_lanes(out, dtype, i, (F)v);
}
#endif

#if defined(QRA_CPU_BF16DOT)
// The fast path of dequantize_rows_bits for 2-, 4- and 8-bit codes, bf16 out, fp16 scales.
// It transposes the packed words, not the values: four word rows of 16 columns become the
// 16 bytes of each column (8 bytes for 2-bit, two columns a vector), the bytes are widened
// to dword lanes (vpmovzxbd) and each bit field of them is one vector of codes in a fixed k
// pattern; after the FMA and the bf16 conversion one word permutation puts the 32 values of
// a chunk in k order (4-bit, 4096², four 1024-column panels: 1.05–1.9 ms against 2.8 ms
// transposing the values; benches/README.md).
// Numbers: the same fma((float)q, s, −z·s) as above; vcvtne2ps2bf16 rounds to nearest even
// and reads subnormals as zero, and with fp16 scales no value is subnormal: q·s and z·s are
// exact in fp32 (11 × 8 and 11 × 11 significant bits) and multiples of 2^-48, so a nonzero
// difference is >= 2^-48 (bf16 scales take the exact path above).
static inline __m128i lane128(__m512i v, int l) {
  switch (l) {  // an immediate operand: l is a constant once the callers' loops unroll
    case 0: return _mm512_castsi512_si128(v);
    case 1: return _mm512_extracti32x4_epi32(v, 1);
    case 2: return _mm512_extracti32x4_epi32(v, 2);
    default: return _mm512_extracti32x4_epi32(v, 3);
  }
}

static inline __m512i load_words16(const int32_t* p) { return _mm512_loadu_si512(p); }

// Four word rows r[0..3] of 16 columns -> t[j]: 128-bit lane l holds column 4l + j's four
// words, in row order.
static inline void transpose_words(const __m512i (&r)[4], __m512i (&t)[4]) {
  const __m512i ab0 = _mm512_unpacklo_epi32(r[0], r[1]), ab1 = _mm512_unpackhi_epi32(r[0], r[1]);
  const __m512i cd0 = _mm512_unpacklo_epi32(r[2], r[3]), cd1 = _mm512_unpackhi_epi32(r[2], r[3]);
  t[0] = _mm512_unpacklo_epi64(ab0, cd0);
  t[1] = _mm512_unpackhi_epi64(ab0, cd0);
  t[2] = _mm512_unpacklo_epi64(ab1, cd1);
  t[3] = _mm512_unpackhi_epi64(ab1, cd1);
}

// Word rows row0 .. row0 + 3 of the 16 columns from n, transposed (transpose_words).
static inline void load_columns(const int32_t* q, int64_t N, int64_t row0, int64_t n,
                                __m512i (&t)[4]) {
  __m512i r[4];
  for (int i = 0; i < 4; ++i) r[i] = load_words16(q + (row0 + i) * N + n);
  transpose_words(r, t);
}

static inline __m512 dq16(__m512i codes, __m512 s, __m512 zs) {
  return _mm512_fmsub_ps(_mm512_cvtepi32_ps(codes), s, zs);
}

// One chunk (32 k) of 16 columns starting at column n: out + l·ldo is column l's row, at the
// chunk's first k. sv/zv: the group's s and z·s of the 16 columns.
template <int B>
static inline void rows_chunk_bf16(const int32_t* q, int64_t N, int64_t c, int64_t n,
                                   const float* sv, const float* zv, uint16_t* out, int64_t ldo) {
  if constexpr (B == 4) {
    __m512i t[4];
    load_columns(q, N, c * 4, n, t);
    // byte b of a column holds k = 2b (low nibble) and 2b + 1: even k, then odd k
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                           24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
                                           1, 16, 0);
#pragma GCC unroll 4
    for (int l = 0; l < 4; ++l)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const int col = 4 * l + j;
        const __m512 s = _mm512_set1_ps(sv[col]), zs = _mm512_set1_ps(zv[col]);
        const __m512i d = _mm512_cvtepu8_epi32(lane128(t[j], l));
        const __m512 e = dq16(_mm512_and_si512(d, _mm512_set1_epi32(15)), s, zs);
        const __m512 o = dq16(_mm512_srli_epi32(d, 4), s, zs);
        const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(o, e);
        _mm512_storeu_si512(out + col * ldo, _mm512_permutexvar_epi16(order, h));
      }
  } else if constexpr (B == 8) {
    __m512i t0[4], t1[4];
    load_columns(q, N, c * 8, n, t0);      // k 0 .. 15
    load_columns(q, N, c * 8 + 4, n, t1);  // k 16 .. 31
#pragma GCC unroll 4
    for (int l = 0; l < 4; ++l)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const int col = 4 * l + j;
        const __m512 s = _mm512_set1_ps(sv[col]), zs = _mm512_set1_ps(zv[col]);
        const __m512 lo = dq16(_mm512_cvtepu8_epi32(lane128(t0[j], l)), s, zs);
        const __m512 hi = dq16(_mm512_cvtepu8_epi32(lane128(t1[j], l)), s, zs);
        _mm512_storeu_si512(out + col * ldo, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
  } else {  // B == 2: two words a column; a 128-bit lane holds two columns' 8 bytes
    const __m512i w0 = load_words16(q + (c * 2) * N + n), w1 = load_words16(q + (c * 2 + 1) * N + n);
    const __m512i u[2] = {_mm512_unpacklo_epi32(w0, w1), _mm512_unpackhi_epi32(w0, w1)};
    // u[p], lane l: columns 4l + 2p (dwords 0-7 after widening) and 4l + 2p + 1 (8-15).
    // Field j of byte b is k = 4b + j; after the two conversions, words: field 0 (A: 0-7,
    // B: 8-15), field 1 (16-31), then fields 2, 3 (32-63) in the second source.
    // output k of column A (first) or B: (k & 3)·16 + (k >> 2) (+ 8 for B)
    alignas(64) static const int16_t kOrder[2][32] = {
        {0, 16, 32, 48, 1, 17, 33, 49, 2, 18, 34, 50, 3, 19, 35, 51, 4, 20, 36, 52, 5, 21, 37, 53, 6, 22, 38, 54, 7, 23, 39, 55},
        {8, 24, 40, 56, 9, 25, 41, 57, 10, 26, 42, 58, 11, 27, 43, 59, 12, 28, 44, 60, 13, 29, 45, 61, 14, 30, 46, 62, 15, 31, 47, 63}};
    const __m512i ia = _mm512_load_si512(kOrder[0]), ib = _mm512_load_si512(kOrder[1]);
    const __m512i three = _mm512_set1_epi32(3);
#pragma GCC unroll 4
    for (int l = 0; l < 4; ++l)
#pragma GCC unroll 2
      for (int p = 0; p < 2; ++p) {
        const int col = 4 * l + 2 * p;
        const __m512 s = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sv[col]), _mm512_set1_ps(sv[col + 1]));
        const __m512 zs = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(zv[col]), _mm512_set1_ps(zv[col + 1]));
        const __m512i d = _mm512_cvtepu8_epi32(lane128(u[p], l));
        const __m512 f0 = dq16(_mm512_and_si512(d, three), s, zs);
        const __m512 f1 = dq16(_mm512_and_si512(_mm512_srli_epi32(d, 2), three), s, zs);
        const __m512 f2 = dq16(_mm512_and_si512(_mm512_srli_epi32(d, 4), three), s, zs);
        const __m512 f3 = dq16(_mm512_srli_epi32(d, 6), s, zs);
        const __m512i h01 = (__m512i)_mm512_cvtne2ps_pbh(f1, f0);
        const __m512i h23 = (__m512i)_mm512_cvtne2ps_pbh(f3, f2);
        _mm512_storeu_si512(out + col * ldo, _mm512_permutex2var_epi16(h01, ia, h23));
        _mm512_storeu_si512(out + (col + 1) * ldo, _mm512_permutex2var_epi16(h01, ib, h23));
      }
  }
}
#endif

template <int B>
static void dequantize_rows_bits(const DequantArgs& a, int threads) {
  const int64_t N = a.N, Kp = a.Kp, gs = a.group_size;
  const int64_t g0 = a.k0 / gs, g1 = a.k1 / gs;
  const int64_t vecs = (a.n1 - a.n0) / L;  // full vectors of columns; the rest is scalar
  const int32_t* q = a.qweight;
  const bool fast = a.out_dtype == kBFloat16 && a.scale_dtype == kFloat16;  // see rows_chunk_bf16
  (void)fast;
  auto body = [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      if (u == vecs) {  // the columns past the last full vector
        for (int64_t n = a.n0 + vecs * L; n < a.n1; ++n)
          for (int64_t g = g0; g < g1; ++g) {
            const float s = half_to_float(a.scales[g * N + n], a.scale_dtype);
            const float zs = half_to_float(a.zeros[g * N + n], a.scale_dtype) * s;
            for (int64_t k = g * gs; k < (g + 1) * gs; ++k)
              store_one(a.out, a.out_dtype, (n - a.n0) * a.ldo + (k - a.k0),
                        (float)code_at<B>(q, N, Kp, n, k) * s - zs);
          }
        continue;
      }
      const int64_t n = a.n0 + u * L;
      const int64_t o0 = (n - a.n0) * a.ldo - a.k0;  // out index of (n, k) is o0 + l·ldo + k
      for (int64_t g = g0; g < g1; ++g) {
        const F s = LanesV::load_half(a.scales + g * N + n, a.scale_dtype);
        const F zs = LanesV::load_half(a.zeros + g * N + n, a.scale_dtype) * s;
#if defined(QRA_CPU_BF16DOT)
        if constexpr (B != 3) {
          if (fast) {
            alignas(64) float sv[16], zv[16];
            memcpy(sv, &s, sizeof sv);
            memcpy(zv, &zs, sizeof zv);
            uint16_t* out = static_cast<uint16_t*>(a.out) + o0;
            for (int64_t c = g * gs / 32; c < (g + 1) * gs / 32; ++c)
              rows_chunk_bf16<B>(q, N, c, n, sv, zv, out + c * 32, a.ldo);
            continue;
          }
        }
#endif
        for (int64_t c = g * gs / 32; c < (g + 1) * gs / 32; ++c) {
          U w[8];  // the chunk's B words (chunk_word_row order), as in the panel above
          for (int i = 0; i < B; ++i) memcpy(&w[i], q + chunk_word_row<B>(i, c, Kp) * N + n, sizeof(U));
          for (int h = 0; h < 32; h += 16) {
#if QRA_CPU_LANES == 16 && defined(__AVX512F__)
            __m512 r[16];
#pragma GCC unroll 16
            for (int i = 0; i < 16; ++i)
              r[i] = (__m512)(__builtin_convertvector((i32xL)chunk_code<B, U>(w, h + i), F) * s - zs);
            transpose16(r);
            for (int l = 0; l < 16; ++l) store_row16(a.out, a.out_dtype, o0 + l * a.ldo + c * 32 + h, r[l]);
#else
            float tile[16][L];
#pragma GCC unroll 16
            for (int i = 0; i < 16; ++i) {
              const F v = __builtin_convertvector((i32xL)chunk_code<B, U>(w, h + i), F) * s - zs;
              memcpy(tile[i], &v, sizeof v);
            }
            for (int l = 0; l < L; ++l)
              for (int i = 0; i < 16; ++i)
                store_one(a.out, a.out_dtype, o0 + l * a.ldo + c * 32 + h + i, tile[i][l]);
#endif
          }
        }
      }
    }
  };
  const int64_t units = vecs + ((a.n1 - a.n0) % L ? 1 : 0);
  run_parallel(units, (g1 - g0) * (a.n1 - a.n0) < (1 << 16) ? 1 : threads, body);
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
