// Decode kernel (M <= 16 rows of x, sm_80+): y = x·dequant(W)ᵀ + scaling·(x·Aᵀ)·Bᵀ + bias in
// ONE launch. Instantiated per bit-width in csrc/decode_b{2,3,4,8}.cu (parallel compiles).
//
// Decode is memory-bound: the kernel's job is to stream the packed words once, 16 bytes at a
// time, with enough bytes in flight, and to spend as few instructions per byte as it can so
// that it stays memory-bound on an H200 too. Where each trick is used:
//  * Tensor cores, operands swapped ("swap AB"): mma.m16n8k16 with 16 output columns x 16 k of
//    W as the A operand and x as the B operand (16 k x 8 rows), so 1-8 rows of x fill the
//    n8 side (9-16 rows: two n8 tiles). The A fragments are the *integer codes* as fp16/bf16,
//    made with the magic-number LOP3 of magic.cuh (~1 instruction per code); the tensor core
//    does the multiply-adds (1 HMMA per 256 codes and 8 rows).
//  * No weight permutation: the pairs that one LOP3 produces are the codes 16 bits apart in a
//    word, and x is staged in shared memory in that order (magic::decode_k / decode_slot).
//  * Zero point and scale once per group, on the fp32 accumulators:
//      sum_k x_k (q_k - z) s = s · (sum_k x_k q_k - z · sum_k x_k)
//    with sum_k x_k of each row and group precomputed in shared memory. The codes are exact,
//    so no dequantized weight is rounded to 16 bits.
//  * A cp.async ring per warp (LDGSTS, 16-byte pieces, zero-filled past N): each warp streams
//    its 32 columns of the block's K slice, 8 KiB in flight per warp; the warp waits only for
//    its own copies (wait_group + __syncwarp, no block barrier in the main loop). The ring is
//    XOR-swizzled so that the 16-byte reads of the fragments hit distinct banks.
//  * One main-loop iteration is one group (CPG = group/32 chunks, unrolled), so the SASS of
//    the loop is exactly the work per group: the static check (qra_kernels/bench/static.py)
//    reads it as instructions per packed byte.
//  * fp32 x: split into three bf16 planes (magic::split_bf16x3) and three mma per step: every
//    product is exact, accumulation is fp32 — the precision of an fp32 FMA loop.
//  * Split-K over blocks, deterministic: each slice writes fp32 partials; the last block of a
//    column tile to arrive (an arrival counter) adds them in slice order and finishes the tile.
//  * LoRA in the same launch: the first `xa_blocks` blocks compute x·Aᵀ (fp32) for a K range
//    each and the last of them sums the partials in order and raises a flag; the blocks that
//    finish a column tile (after all their streaming) wait for the flag, read x·Aᵀ (rows x r
//    floats) and add scaling·(x·Aᵀ)·Bᵀ and the bias before the single store of y. Those
//    blocks come first in the grid, so they are running before anyone waits for them.
//  * Counters are zero between launches: every launch resets what it used.
#pragma once

#include "common.cuh"
#include "magic.cuh"
#include "plan.h"

namespace qra {
namespace cuda {
namespace decode {

using plan::kDecodeCols;
using plan::kDecodeThreads;
using plan::kDecodeWarps;

struct Params {
  LinearArgs a;
  int64_t m0, rows;               // rows [m0, m0 + rows) of x, rows <= 16
  int64_t tiles, splits, groups_per_split;
  int64_t xa_blocks, k_per_xa_block;
  bool aligned;                   // N % 8 == 0 and 16-byte aligned qweight/scales/zeros
  float* partial;                 // [splits][rows][tiles * 128]
  float* xa_partial;              // [xa_blocks][rows][rank]
  float* xa;                      // [rows][rank]
  int* counters;                  // plan::decode_counter_ints(N), zero on entry
};

// ---- PTX wrappers ---------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}
// 16 bytes global -> shared, asynchronously; zero-filled (no read) when !pred.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <bool BF16>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint4 lds128(const void* p) { return *reinterpret_cast<const uint4*>(p); }

// The 16-bit bits of an activation value (fp16/bf16 as stored; fp32 x uses split_bf16x3).
__device__ __forceinline__ uint32_t act_bits16(const void* x, int64_t i) {
  return static_cast<const uint16_t*>(x)[i];
}

// Ring rows are swizzled: 16-byte piece u of chunk row r sits at u ^ swizzle(r), so the four
// rows that the four tig of a quarter-warp read in one LDS.128 fall in distinct banks.
template <int B>
__device__ __forceinline__ constexpr int swizzle(int row) {
  return B == 4 ? 2 * row : B == 8 ? 2 * (row >> 1) : B == 2 ? 2 * row : (row < 2 ? 2 * row : 0);
}

template <int B, int CPG>
struct Layout {
  static constexpr int kRing = plan::decode_ring_chunks(B);  // chunks per warp
  static constexpr int kStages = kRing / CPG;                // groups per warp in flight
  static constexpr int kWordsPerChunk = 32 * B;              // 32 columns x B words
  static constexpr int kRingWords = kRing * kWordsPerChunk;  // per warp
  static constexpr int kSzHalves = 64;                       // s, z of 32 columns per stage
};

// ---- the x·Aᵀ blocks -----------------------------------------------------------------------
// Block `bid` < xa_blocks: partial x·Aᵀ over k in [bid·kxa, (bid+1)·kxa) for every row and
// rank, fp32; the last to finish sums the partials in block order into p.xa, then raises
// counters[tiles + 1].
__device__ __forceinline__ void xa_block(const Params& p, int bid, float* smem) {
  const LinearArgs& a = p.a;
  const int tid = threadIdx.x;
  const int64_t rank = a.rank, rows = p.rows, K = a.K;
  const int64_t k0 = (int64_t)bid * p.k_per_xa_block;
  const int64_t kn = p.k_per_xa_block;
  float* xs = smem;  // [rows][kn] fp32
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t kk = tid; kk < kn; kk += kDecodeThreads) {
      const int64_t k = k0 + kk;
      xs[m * kn + kk] = k < K ? load_act(a.x, (p.m0 + m) * K + k, a.x_dtype) : 0.f;
    }
  __syncthreads();
  // 128 threads = 16 ranks x 8 k-lanes (a warp holds 4 ranks); rank chunks of 16.
  const int kl = tid & 7, rl = tid >> 3;
  for (int64_t r0 = 0; r0 < rank; r0 += 16) {
    const int64_t r = r0 + rl;
    float acc[plan::kDecodeMaxRows];
#pragma unroll
    for (int m = 0; m < plan::kDecodeMaxRows; ++m) acc[m] = 0.f;
    if (r < rank) {
      for (int64_t kk = kl; kk < kn && k0 + kk < K; kk += 8) {
        const float av = load_act(a.lora_A, r * K + k0 + kk, a.lora_dtype);
#pragma unroll
        for (int m = 0; m < plan::kDecodeMaxRows; ++m)
          if (m < rows) acc[m] = fmaf(xs[m * kn + kk], av, acc[m]);
      }
    }
#pragma unroll
    for (int m = 0; m < plan::kDecodeMaxRows; ++m) {
      float v = acc[m];
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      if (kl == 0 && r < rank && m < rows) p.xa_partial[((int64_t)bid * rows + m) * rank + r] = v;
    }
  }
  __shared__ int last;
  __threadfence();
  __syncthreads();
  int* ctr = p.counters + p.tiles;
  if (tid == 0) {
    last = atomicAdd(&ctr[0], 1) == (int)p.xa_blocks - 1;
    if (last) ctr[0] = 0;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int64_t i = tid; i < rows * rank; i += kDecodeThreads) {
    float s = 0.f;
    for (int64_t b = 0; b < p.xa_blocks; ++b) s += __ldcg(&p.xa_partial[b * rows * rank + i]);
    p.xa[i] = s;
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) atomicExch(&ctr[1], 1);
}

// ---- the column-tile blocks ---------------------------------------------------------------
// x types: fp16, bf16, and fp32 as three bf16 planes (the bf16 dequant, three mma per step).
enum XType : int { kXF16 = 0, kXBF16 = 1, kXF32 = 2 };
template <int XT> struct XTraits {
  static constexpr bool kBF16 = XT != kXF16;
  static constexpr int kPlanes = XT == kXF32 ? 3 : 1;
  // Raw decode pairs (magic::decode_chunk<..., RAW>) for 16-bit x; exact pairs for fp32 x,
  // which must not carry M·sum(x) through its accumulators (fp32 accuracy is the point).
  static constexpr bool kRaw = XT != kXF32;
};

// Per-block state of a column tile and K slice.
struct Tile {
  const int32_t* qweight;
  uint32_t* ring;           // this warp's ring
  uint16_t* sz;             // this warp's s/z stages
  uint16_t* xs;             // x, [plane][chunk][row][tig][8]
  float* xsum;              // [group][8·NT][2]: sum_k x, and M·sum_k x·2^-s (raw pairs)
  int64_t N, Kp, n_warp, g_begin, xs_plane;
  int ng, rows, lane, grp, tig;
};

// The ring's 16-byte pieces of one group, per lane: piece q = lane + 32·it of the group's
// CPG·B·8 pieces (8 per word row of 32 columns). Single-plane widths (2, 4, 8 bits) order a
// group's rows as chunk_word_row does, so q / 8 is the word row and a lane's pieces are 4
// rows apart; 3 bits (two planes) puts the 2-bit plane's rows first, then the 1-bit plane's.
// Sources are running pointers, advanced one group per issue; destinations are byte offsets
// inside a stage. Nothing is recomputed per group but the stage offset.
template <int B, int CPG>
struct Copy {
  static constexpr int kPieces = CPG * B * 8;
  static constexpr int kIters = (kPieces + 31) / 32;
  static constexpr int kSrcs = B == 3 ? kIters : 1;
  const int32_t* src[kSrcs];   // the next group's first word of each piece (3 bits) / piece 0
  int64_t step[kSrcs];         // words to the following group
  int64_t row4;                // 4 word rows (single plane: piece it is src[0] + it·row4)
  uint32_t dst[kIters];        // shared-memory byte offset inside stage 0
  bool ok[kIters];             // the piece exists and its columns are < N
  bool exists[kIters];         // lane + 32·it < kPieces
  const uint16_t* sz_src;      // scales (lanes 0-15) / zeros (16-31), 2 columns a lane
  uint32_t sz_dst;
  bool sz_ok;
  int issued;                  // groups issued so far
};

template <int B, int CPG>
__device__ __forceinline__ Copy<B, CPG> make_copy(const Tile& t, const LinearArgs& a) {
  Copy<B, CPG> cp;
  const int lane = t.lane, piece = lane & 7;
  const int64_t n = t.n_warp + 4 * piece;
#pragma unroll
  for (int it = 0; it < Copy<B, CPG>::kIters; ++it) {
    const int q = lane + 32 * it;
    int c, row;
    if constexpr (B == 3) {
      const bool low = q < 16 * CPG;  // 2-bit plane: rows 0, 1 of each chunk
      const int r = low ? q / 8 : (q - 16 * CPG) / 8;
      c = low ? r / 2 : r;
      row = low ? r % 2 : 2;
      const int64_t wrow = chunk_word_row<B>(row, t.g_begin * CPG + c, t.Kp);
      cp.src[it] = a.qweight + wrow * t.N + (n < t.N ? n : 0);
      cp.step[it] = (int64_t)(low ? 2 * CPG : CPG) * t.N;
    } else {
      c = (q / 8) / B;
      row = (q / 8) % B;
      if (it == 0) {
        const int64_t wrow = chunk_word_row<B>(row, t.g_begin * CPG + c, t.Kp);  // g·CPG·B + q/8
        cp.src[0] = a.qweight + wrow * t.N + (n < t.N ? n : 0);
        cp.step[0] = (int64_t)CPG * B * t.N;
      }
    }
    cp.dst[it] = smem_addr(t.ring + (c * B + row) * 32 + 4 * (piece ^ swizzle<B>(row)));
    cp.exists[it] = q < Copy<B, CPG>::kPieces;
    cp.ok[it] = cp.exists[it] && n < t.N;
  }
  cp.row4 = 4 * t.N;
  const int64_t nz = t.n_warp + 2 * (lane & 15);
  cp.sz_ok = nz < t.N;
  cp.sz_src = (lane < 16 ? a.scales : a.zeros) + t.g_begin * t.N + (cp.sz_ok ? nz : 0);
  cp.sz_dst = smem_addr(t.sz + 2 * lane);
  cp.issued = 0;
  return cp;
}

// The next group (g_begin + cp.issued) into its stage of the warp's ring; past the slice the
// copies are zero-filled (no byte is read). CPG chunks of B word rows x 32 columns and the
// group's scales and zeros. ALIGNED (N % 8 == 0): 16-byte cp.async pieces, 4 bytes of s/z
// per lane; otherwise 4-byte cp.async per word and synchronous 2-byte s/z stores (odd N).
template <int B, int CPG, bool ALIGNED>
__device__ __forceinline__ void issue(const Tile& t, const LinearArgs& a, Copy<B, CPG>& cp) {
  using L = Layout<B, CPG>;
  const int gi = cp.issued++;
  const int stage = gi & (L::kStages - 1);
  const bool live = gi < t.ng;
  const int lane = t.lane;
  if constexpr (ALIGNED) {
    const uint32_t ring_off = stage * (CPG * B * 32 * 4);
#pragma unroll
    for (int it = 0; it < Copy<B, CPG>::kIters; ++it) {
      const int32_t* src = B == 3 ? cp.src[B == 3 ? it : 0] : cp.src[0] + it * cp.row4;
      // Lanes past the group's pieces issue nothing (a zero-filling copy would still write
      // 16 bytes, into the next stage); the others zero-fill past N or past the slice.
      asm volatile(
          "{\n .reg .pred p;\n setp.ne.b32 p, %3, 0;\n"
          " @p cp.async.cg.shared.global [%0], [%1], 16, %2;\n}\n" ::"r"(cp.dst[it] + ring_off),
          "l"(src), "r"(live && cp.ok[it] ? 16 : 0), "r"((int)cp.exists[it]));
    }
#pragma unroll
    for (int i = 0; i < Copy<B, CPG>::kSrcs; ++i) cp.src[i] += cp.step[i];
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(cp.sz_dst + stage * (L::kSzHalves * 2)),
                 "l"(cp.sz_src), "r"(live && cp.sz_ok ? 4 : 0));
    cp.sz_src += t.N;
  } else {
    uint32_t* ring = t.ring + stage * CPG * B * 32;
    uint16_t* sz = t.sz + stage * L::kSzHalves;
    const int64_t n = t.n_warp + lane;
    const bool ok = live && n < t.N;
    const int64_t g = t.g_begin + (live ? gi : 0);
#pragma unroll
    for (int it = 0; it < CPG * B; ++it) {
      const int c = it / B, row = it % B;
      const int64_t src = chunk_word_row<B>(row, g * CPG + c, t.Kp) * t.N + n;
      uint32_t* dst = ring + (c * B + row) * 32 + 4 * ((lane >> 2) ^ swizzle<B>(row)) + (lane & 3);
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)),
                   "l"(t.qweight + (ok ? src : 0)), "r"(ok ? 4 : 0));
    }
    // s/z in stage order: [s of 32 columns][z of 32 columns].
    sz[lane] = ok ? __ldg(a.scales + g * t.N + n) : (uint16_t)0;
    sz[32 + lane] = ok ? __ldg(a.zeros + g * t.N + n) : (uint16_t)0;
  }
}

// Two 16-bit scales/zeros (one 32-bit word) as fp32.
__device__ __forceinline__ float2 sz_float2(uint32_t v, bool bf16) {
  if (bf16) return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xFFFF0000u));
  __half2 h;
  *reinterpret_cast<uint32_t*>(&h) = v;
  return __half22float2(h);
}

// The main loop: one group per iteration. out[rt][ct][r] accumulates column
// n_warp + 4·grp + decode_c_col(ct, r), row 8·rt + 2·tig + (r & 1).
template <int B, int XT, int NT, int CPG, bool ALIGNED>
__device__ __forceinline__ void main_loop(const Tile& t, const LinearArgs& a, Copy<B, CPG>& cp,
                                          float (&out)[NT][2][4]) {
  using L = Layout<B, CPG>;
  using X = XTraits<XT>;
  constexpr int kW = magic::DecodeWords<B>::value;
  const int grp = t.grp, tig = t.tig;
  const bool bf16_scales = a.scale_dtype == kBFloat16;
  // Fragment read offsets inside a chunk (words) and inside x (halves), loop-invariant.
  int w_off[kW];
#pragma unroll
  for (int j = 0; j < kW; ++j) {
    const int row = magic::decode_word<B>(tig, j);
    w_off[j] = row * 32 + 4 * (grp ^ swizzle<B>(row));
  }
  bool row_ok[NT];
  int x_off[NT];
#pragma unroll
  for (int rt = 0; rt < NT; ++rt) {
    row_ok[rt] = 8 * rt + grp < t.rows;
    x_off[rt] = ((8 * rt + grp) * 4 + tig) * 8;
  }
  uint4 xf[X::kPlanes][NT];
#pragma unroll
  for (int pl = 0; pl < X::kPlanes; ++pl)
#pragma unroll
    for (int rt = 0; rt < NT; ++rt) xf[pl][rt] = make_uint4(0, 0, 0, 0);
  const int x_chunk = t.rows * 32;  // halves per chunk of x

#pragma unroll 1
  for (int gi = 0; gi < t.ng; ++gi) {
    cp_async_wait<L::kStages - 2>();
    __syncwarp();
    issue<B, CPG, ALIGNED>(t, a, cp);
    cp_async_commit();
    const int stage = gi & (L::kStages - 1);
    // sum_k x and (raw pairs) M·sum_k x·2^-s of the group, for rows 8·rt + 2·tig + {0, 1}.
    float4 xsm[NT];
#pragma unroll
    for (int rt = 0; rt < NT; ++rt)
      xsm[rt] = *reinterpret_cast<const float4*>(t.xsum + (gi * 8 * NT + 8 * rt + 2 * tig) * 2);
    float acc[NT][2][4];  // raw pairs: start at -M·sum(x·2^-s), so acc ends as sum x·q
#pragma unroll
    for (int rt = 0; rt < NT; ++rt)
#pragma unroll
      for (int ct = 0; ct < 2; ++ct)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[rt][ct][r] = X::kRaw ? -((r & 1) ? xsm[rt].w : xsm[rt].y) : 0.f;
#pragma unroll
    for (int c = 0; c < CPG; ++c) {
      const uint32_t* chunk = t.ring + (stage * CPG + c) * B * 32;
      uint32_t w[4][kW];
#pragma unroll
      for (int j = 0; j < kW; ++j) {
        const uint4 v = lds128(chunk + w_off[j]);
        w[0][j] = v.x; w[1][j] = v.y; w[2][j] = v.z; w[3][j] = v.w;
      }
      uint32_t q[4][4];  // [column][pair]
#pragma unroll
      for (int col = 0; col < 4; ++col) magic::decode_chunk<B, X::kBF16, X::kRaw>(w[col], tig, q[col]);
      const uint16_t* xc = t.xs + (gi * CPG + c) * x_chunk;
#pragma unroll
      for (int rt = 0; rt < NT; ++rt)
        if (row_ok[rt])
#pragma unroll
          for (int pl = 0; pl < X::kPlanes; ++pl) xf[pl][rt] = lds128(xc + pl * t.xs_plane + x_off[rt]);
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int ct = 0; ct < 2; ++ct) {
          uint32_t af[4];
#pragma unroll
          for (int r = 0; r < 4; ++r) af[r] = q[magic::decode_a_col(ct, r)][magic::decode_a_pair(s, r)];
#pragma unroll
          for (int rt = 0; rt < NT; ++rt)
#pragma unroll
            for (int pl = 0; pl < X::kPlanes; ++pl) {
              const uint4 x4 = xf[pl][rt];
              mma<X::kBF16>(acc[rt][ct], af, s == 0 ? x4.x : x4.z, s == 0 ? x4.y : x4.w);
            }
        }
    }
    // Fold the group's scale and zero: out += s·(acc - z·sum_k x).
    const uint16_t* szs = t.sz + stage * L::kSzHalves + 4 * grp;
    const uint2 s4 = *reinterpret_cast<const uint2*>(szs);
    const uint2 z4 = *reinterpret_cast<const uint2*>(szs + 32);
    const float2 s01 = sz_float2(s4.x, bf16_scales), s23 = sz_float2(s4.y, bf16_scales);
    const float2 z01 = sz_float2(z4.x, bf16_scales), z23 = sz_float2(z4.y, bf16_scales);
    const float sc[4] = {s01.x, s01.y, s23.x, s23.y}, zc[4] = {z01.x, z01.y, z23.x, z23.y};
#pragma unroll
    for (int rt = 0; rt < NT; ++rt) {
#pragma unroll
      for (int ct = 0; ct < 2; ++ct)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int col = magic::decode_c_col(ct, r);
          const float xv = (r & 1) ? xsm[rt].z : xsm[rt].x;
          out[rt][ct][r] = fmaf(sc[col], fmaf(-zc[col], xv, acc[rt][ct][r]), out[rt][ct][r]);
        }
    }
  }
  cp_async_wait<0>();
}

template <int NT>
__device__ __forceinline__ void finish_tile(const Params& p, int64_t tile, int64_t n_warp,
                                            float (&out)[NT][2][4], float* smem);

template <int B, int XT, int NT, int CPG>
__device__ __forceinline__ void gemv_block(const Params& p, int64_t tile, int64_t split, uint4* smem4) {
  using L = Layout<B, CPG>;
  using X = XTraits<XT>;
  constexpr int G = 32 * CPG;
  const LinearArgs& a = p.a;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, grp = lane >> 2, tig = lane & 3;
  const int64_t N = a.N, K = a.K, Kp = a.Kp, rows = p.rows;
  const int64_t groups = Kp / G;
  const int64_t g_begin = split * p.groups_per_split;
  const int64_t g_end = min(g_begin + p.groups_per_split, groups);
  const int ng = (int)(g_end - g_begin);
  const int64_t k_begin = g_begin * G;
  const int64_t n_warp = tile * kDecodeCols + warp * 32;

  // Shared memory: rings of every warp, their s/z stages, x ([plane][chunk][row][tig][8] of
  // 16-bit values), and sum_k x per (group, row) for 8·NT rows (zero past `rows`).
  uint32_t* ring_all = reinterpret_cast<uint32_t*>(smem4);
  uint16_t* sz_all = reinterpret_cast<uint16_t*>(ring_all + kDecodeWarps * L::kRingWords);
  Tile t;
  t.qweight = a.qweight;
  t.ring = ring_all + warp * L::kRingWords;
  t.sz = sz_all + warp * L::kStages * L::kSzHalves;
  t.xs = sz_all + kDecodeWarps * L::kStages * L::kSzHalves;
  t.xs_plane = (int64_t)p.groups_per_split * CPG * rows * 32;  // halves
  t.xsum = reinterpret_cast<float*>(t.xs + X::kPlanes * t.xs_plane);
  t.N = N; t.Kp = Kp; t.n_warp = n_warp; t.g_begin = g_begin;
  t.ng = ng; t.rows = (int)rows; t.lane = lane; t.grp = grp; t.tig = tig;

  // Prologue: the first kStages - 1 groups in flight before x is even staged.
  Copy<B, CPG> cp = make_copy<B, CPG>(t, a);
#pragma unroll 1
  for (int s = 0; s < L::kStages - 1; ++s) {
    if (p.aligned) issue<B, CPG, true>(t, a, cp);
    else issue<B, CPG, false>(t, a, cp);
    cp_async_commit();
  }

  // x of the slice into shared memory in the decode pair order (magic::decode_k), one
  // (group, row) per thread-item: its CPG x 4 slots of 8 values (x·2^-s for raw pairs, three
  // bf16 planes for fp32 x), and the group's sums in a fixed order (deterministic). Rows
  // past `rows` (up to 8·NT) get zero sums.
  const int rows32 = (int)rows;  // 32-bit: a 64-bit division is a call (and spills)
  constexpr float kM = X::kRaw ? magic::decode_raw_magic<B, X::kBF16>() : 0.f;
  for (int it = tid; it < ng * 8 * NT; it += kDecodeThreads) {
    const int gl = it / (8 * NT), m = it % (8 * NT);
    float sx = 0.f, smx = 0.f;
    if (m < rows32) {
      for (int c = 0; c < CPG; ++c)
#pragma unroll
        for (int ti = 0; ti < 4; ++ti) {
          uint32_t h[3][4];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            uint32_t v[3][2];
#pragma unroll
            for (int l = 0; l < 2; ++l) {
              const int64_t k = k_begin + G * gl + 32 * c + magic::decode_k<B>(ti, i, l);
              const int64_t idx = (p.m0 + m) * K + k;
              if constexpr (XT == kXF32) {
                const float f = k < K ? static_cast<const float*>(a.x)[idx] : 0.f;
                magic::split_bf16x3(f, v[0][l], v[1][l], v[2][l]);
                sx += f;
              } else {
                const uint32_t hb = k < K ? act_bits16(a.x, idx) : 0u;
                const float f = X::kBF16 ? bf16_to_float((uint16_t)hb) : fp16_to_float((uint16_t)hb);
                const float fs = f * (1.0f / (float)(1 << magic::decode_raw_shift<B, X::kBF16>(i)));
                v[0][l] = X::kBF16 ? magic::float_to_bf16_bits(fs) : (uint32_t)__half_as_ushort(__float2half_rn(fs));
                v[1][l] = v[2][l] = 0u;
                sx += f;
                smx += X::kBF16 ? bf16_to_float((uint16_t)v[0][l]) : fp16_to_float((uint16_t)v[0][l]);
              }
            }
#pragma unroll
            for (int pl = 0; pl < 3; ++pl) h[pl][i] = v[pl][0] | (v[pl][1] << 16);
          }
          const int cl = gl * CPG + c;
#pragma unroll
          for (int pl = 0; pl < X::kPlanes; ++pl)
            *reinterpret_cast<uint4*>(t.xs + pl * t.xs_plane + ((cl * rows32 + m) * 4 + ti) * 8) =
                make_uint4(h[pl][0], h[pl][1], h[pl][2], h[pl][3]);
        }
    }
    t.xsum[(gl * 8 * NT + m) * 2] = sx;
    t.xsum[(gl * 8 * NT + m) * 2 + 1] = kM * smx;
  }
  __syncthreads();

  float out[NT][2][4];
#pragma unroll
  for (int rt = 0; rt < NT; ++rt)
#pragma unroll
    for (int ct = 0; ct < 2; ++ct)
#pragma unroll
      for (int r = 0; r < 4; ++r) out[rt][ct][r] = 0.f;
  if (p.aligned) main_loop<B, XT, NT, CPG, true>(t, a, cp, out);
  else main_loop<B, XT, NT, CPG, false>(t, a, cp, out);

  // ---- finish: direct (one slice) or through the partials (last block of the tile) -------
  // Thread outputs: column n_warp + 4·grp + decode_c_col(ct, r), row 8·rt + 2·tig + (r & 1).
  __shared__ int last;
  if (p.splits > 1) {
    float* part = p.partial + (split * rows) * (p.tiles * kDecodeCols);
#pragma unroll
    for (int rt = 0; rt < NT; ++rt)
#pragma unroll
      for (int r2 = 0; r2 < 2; ++r2) {
        const int64_t m = 8 * rt + 2 * tig + r2;
        if (m >= rows) continue;
        float4 v;
        v.x = out[rt][0][r2]; v.y = out[rt][0][2 + r2]; v.z = out[rt][1][r2]; v.w = out[rt][1][2 + r2];
        *reinterpret_cast<float4*>(part + m * (p.tiles * kDecodeCols) + n_warp + 4 * grp) = v;
      }
    __threadfence();
    __syncthreads();
    if (tid == 0) {
      last = atomicAdd(&p.counters[tile], 1) == (int)p.splits - 1;
      if (last) p.counters[tile] = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
  }
  finish_tile<NT>(p, tile, n_warp, out, reinterpret_cast<float*>(smem4));
}

// The block that completes a column tile: the split partials (in slice order), the LoRA term
// and the bias, then the single store of y. Everything it must read — the partials, x·Aᵀ and
// the tile's rows of B — is requested before any of it is used, so the epilogue costs one
// memory round trip (plus the wait for x·Aᵀ, normally long done). The rank is taken in chunks
// of plan::kDecodeEpilogueRanks to bound shared memory.
template <int NT>
__device__ __forceinline__ void finish_tile(const Params& p, int64_t tile, int64_t n_warp,
                                            float (&out)[NT][2][4], float* smem) {
  const LinearArgs& a = p.a;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, grp = lane >> 2, tig = lane & 3;
  const int64_t N = a.N, rows = p.rows, rank = a.rank;
  const int64_t ld = p.tiles * kDecodeCols;
  if (p.splits > 1) {
    float4 sum[NT][2];
#pragma unroll
    for (int rt = 0; rt < NT; ++rt)
#pragma unroll
      for (int r2 = 0; r2 < 2; ++r2) sum[rt][r2] = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int64_t s = 0; s < p.splits; ++s)
#pragma unroll
      for (int rt = 0; rt < NT; ++rt)
#pragma unroll
        for (int r2 = 0; r2 < 2; ++r2) {
          const int64_t m = 8 * rt + 2 * tig + r2;
          if (m < rows) {
            const float4 v = __ldcg(reinterpret_cast<const float4*>(p.partial + (s * rows + m) * ld + n_warp + 4 * grp));
            sum[rt][r2].x += v.x; sum[rt][r2].y += v.y; sum[rt][r2].z += v.z; sum[rt][r2].w += v.w;
          }
        }
#pragma unroll
    for (int rt = 0; rt < NT; ++rt)
#pragma unroll
      for (int r2 = 0; r2 < 2; ++r2) {
        out[rt][0][r2] = sum[rt][r2].x; out[rt][0][2 + r2] = sum[rt][r2].y;
        out[rt][1][r2] = sum[rt][r2].z; out[rt][1][2 + r2] = sum[rt][r2].w;
      }
  }
  float lora[NT][2][4];
#pragma unroll
  for (int rt = 0; rt < NT; ++rt)
#pragma unroll
    for (int ct = 0; ct < 2; ++ct)
#pragma unroll
      for (int r = 0; r < 4; ++r) lora[rt][ct][r] = 0.f;
  if (rank > 0) {
    if (tid == 0) {  // x·Aᵀ is complete once the last x·Aᵀ block raised the flag
      volatile int* ready = p.counters + p.tiles + 1;
      while (*ready == 0) __nanosleep(64);
      __threadfence();
    }
    __syncthreads();
    constexpr int RC = plan::kDecodeEpilogueRanks;
    float* xa_s = smem;                // [rows][RC]
    float* b_s = smem + rows * RC;     // [128][RC + 1]
    const int64_t n_tile = tile * kDecodeCols;
    for (int64_t r0 = 0; r0 < rank; r0 += RC) {
      const int rc = (int)min((int64_t)RC, rank - r0);
      for (int i = tid; i < rows * rc; i += kDecodeThreads) {
        const int m = i / rc, r = i % rc;  // 32-bit, once per element of a small tile
        xa_s[m * RC + r] = __ldcg(&p.xa[m * rank + r0 + r]);
      }
      for (int c = warp; c < kDecodeCols; c += kDecodeWarps) {
        const int64_t n = n_tile + c;
        for (int r = lane; r < rc; r += 32)
          b_s[c * (RC + 1) + r] = n < N ? load_act(a.lora_B, n * rank + r0 + r, a.lora_dtype) : 0.f;
      }
      __syncthreads();
      for (int r = 0; r < rc; ++r) {
        float bv[4];
#pragma unroll
        for (int col = 0; col < 4; ++col) bv[col] = b_s[(warp * 32 + 4 * grp + col) * (RC + 1) + r];
#pragma unroll
        for (int rt = 0; rt < NT; ++rt)
#pragma unroll
          for (int ct = 0; ct < 2; ++ct)
#pragma unroll
            for (int reg = 0; reg < 4; ++reg) {
              const int64_t m = 8 * rt + 2 * tig + (reg & 1);
              const float xv = m < rows ? xa_s[m * RC + r] : 0.f;
              lora[rt][ct][reg] = fmaf(xv, bv[magic::decode_c_col(ct, reg)], lora[rt][ct][reg]);
            }
      }
      __syncthreads();
    }
    if (tid == 0) {
      int* ctr = p.counters + p.tiles;
      if (atomicAdd(&ctr[2], 1) == (int)p.tiles - 1) {  // every tile has read x·Aᵀ
        ctr[1] = 0;
        ctr[2] = 0;
      }
    }
  }
#pragma unroll
  for (int col = 0; col < 4; ++col) {
    const int64_t n = n_warp + 4 * grp + col;
    if (n >= N) continue;
    const int ct = col >> 1, rr = (col & 1) * 2;  // out[..][ct][rr + (row & 1)]
    const float bias = a.bias ? a.bias[n] : 0.f;
#pragma unroll
    for (int rt = 0; rt < NT; ++rt)
#pragma unroll
      for (int r2 = 0; r2 < 2; ++r2) {
        const int64_t m = 8 * rt + 2 * tig + r2;
        if (m >= rows) continue;
        const float v = fmaf(a.scaling, lora[rt][ct][rr + r2], out[rt][ct][rr + r2]) + bias;
        store_act(a.y, (p.m0 + m) * N + n, a.x_dtype, v);
      }
  }
}

template <int B, int XT, int NT, int CPG>
// Four blocks per SM (plan::kDecodeBlocksPerSm): <= 128 registers a thread. Without the
// minimum, ptxas aims at a higher occupancy for sm_90 and spills the 9-16-row variants.
__global__ void __launch_bounds__(kDecodeThreads, plan::kDecodeBlocksPerSm) decode_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ uint4 smem4[];
  const int64_t bid = blockIdx.x;
  if (bid < p.xa_blocks) {
    xa_block(p, (int)bid, reinterpret_cast<float*>(smem4));
    return;
  }
  const int b = (int)(bid - p.xa_blocks), tiles = (int)p.tiles;  // 32-bit division
  gemv_block<B, XT, NT, CPG>(p, b % tiles, b / tiles, smem4);
#endif
}

// Launch one pass (the plan's rows). Defined in decode_b<B>.cu, one file per bit-width.
template <int B>
const char* launch(const Params& p, int64_t smem_bytes, cudaStream_t stream);
template <> const char* launch<2>(const Params& p, int64_t smem_bytes, cudaStream_t stream);
template <> const char* launch<3>(const Params& p, int64_t smem_bytes, cudaStream_t stream);
template <> const char* launch<4>(const Params& p, int64_t smem_bytes, cudaStream_t stream);
template <> const char* launch<8>(const Params& p, int64_t smem_bytes, cudaStream_t stream);

template <int B, int XT, int NT, int CPG>
const char* launch_one(const Params& p, int64_t smem_bytes, cudaStream_t stream) {
  auto kernel = decode_kernel<B, XT, NT, CPG>;
  if (smem_bytes > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               (int)smem_bytes);
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  kernel<<<(unsigned)(p.tiles * p.splits + p.xa_blocks), kDecodeThreads, smem_bytes, stream>>>(p);
  return cuda_error(cudaGetLastError());
}

template <int B, int XT, int NT>
const char* launch_group(const Params& p, int64_t smem_bytes, cudaStream_t stream) {
  switch (p.a.group_size) {
    case 32: return launch_one<B, XT, NT, 1>(p, smem_bytes, stream);
    case 64: return launch_one<B, XT, NT, 2>(p, smem_bytes, stream);
    case 128: return launch_one<B, XT, NT, 4>(p, smem_bytes, stream);
  }
  return "unsupported group size";
}

// fp32 x: one instantiation (9-16 rows) serves every row count.
#define QRA_DECODE_LAUNCH(B)                                                                 \
  template <>                                                                                \
  const char* launch<B>(const Params& p, int64_t smem_bytes, cudaStream_t stream) {          \
    switch (p.a.x_dtype) {                                                                   \
      case kFloat32: return launch_group<B, kXF32, 2>(p, smem_bytes, stream);                \
      case kBFloat16:                                                                        \
        return p.rows > 8 ? launch_group<B, kXBF16, 2>(p, smem_bytes, stream)                \
                          : launch_group<B, kXBF16, 1>(p, smem_bytes, stream);               \
      default:                                                                               \
        return p.rows > 8 ? launch_group<B, kXF16, 2>(p, smem_bytes, stream)                 \
                          : launch_group<B, kXF16, 1>(p, smem_bytes, stream);                \
    }                                                                                        \
  }

}  // namespace decode
}  // namespace cuda
}  // namespace qra
