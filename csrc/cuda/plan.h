// Launch plans of the CUDA kernels: tile sizes, split-K and the LoRA pre-pass blocks of the
// decode kernel, shared memory and workspace sizes. Plain host C++ (no CUDA headers): the
// launchers (linear_cuda.cu) and the CPU tests (host_check.cpp) compute the same plan.
#pragma once

#include <stdint.h>

namespace qra {
namespace plan {

// ---- decode kernel (decode.cuh) ------------------------------------------------------------
constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = 32 * kDecodeWarps;
constexpr int kDecodeWarpCols = 32;                        // 8 lanes x 4 columns (16 B)
constexpr int kDecodeCols = kDecodeWarps * kDecodeWarpCols;  // output columns per block
constexpr int kDecodeMaxRows = 16;                         // rows of x per launch
// Resident blocks per SM the decode kernel is built for (__launch_bounds__: <= 128 registers)
// and that split-K aims to fill.
constexpr int kDecodeBlocksPerSm = 4;

// Chunks (32 k x 32 columns x `bits` words = 128·bits bytes) in each warp's cp.async ring:
// 8 KiB per warp at every bit-width but 3 (6 KiB: the ring must hold whole groups of up to
// 4 chunks). With 4-5 blocks of 4 warps per SM that is 100+ KiB in flight per SM, beyond the
// ~25 KiB that Little's law asks at 4.8 TB/s x ~0.7 us across 132 SMs.
constexpr int decode_ring_chunks(int bits) { return bits == 2 ? 32 : bits == 3 ? 16 : bits == 4 ? 16 : 8; }
constexpr int decode_ring_bytes(int bits) { return kDecodeWarps * decode_ring_chunks(bits) * 128 * bits; }
// Scales and zeros of each group in flight: 32 columns x (s, z) x 2 bytes per ring slot.
constexpr int decode_sz_bytes(int bits, int group_size) {
  return kDecodeWarps * (decode_ring_chunks(bits) / (group_size / 32)) * 128;
}

// Shared memory for x of one split, as 16-bit values ([chunk][row][tig][8], see decode.cuh):
// at most this many bytes, which bounds the k of one split for 16 rows or fp32 x (3 planes).
constexpr int64_t kDecodeXBytes = 64 * 1024;
// Ranks of the LoRA epilogue staged at a time (x·Aᵀ [rows][r] and B [128][r + 1], fp32).
constexpr int kDecodeEpilogueRanks = 64;

struct DecodePlan {
  int64_t tiles = 0;             // column tiles of kDecodeCols
  int64_t splits = 1;            // K slices (split-K); 1 writes y directly
  int64_t groups_per_split = 0;  // groups of the weight per slice
  int64_t xa_blocks = 0;         // blocks computing x·Aᵀ (0 for rank 0)
  int64_t k_per_xa_block = 0;
  int64_t rows = 0;              // rows of x in this launch (<= 16)
  int64_t smem_bytes = 0;        // dynamic shared memory of a block
  int64_t workspace_floats = 0;  // fp32 scratch: partials, x·Aᵀ partials, x·Aᵀ
  int64_t blocks() const { return tiles * splits + xa_blocks; }
  // Offsets (floats) into the workspace.
  int64_t partial_offset() const { return 0; }
  int64_t xa_partial_offset() const { return splits > 1 ? splits * rows * tiles * kDecodeCols : 0; }
  int64_t xa_offset(int64_t rank) const { return xa_partial_offset() + xa_blocks * rows * rank; }
};

constexpr int kFloat32Code = 0;  // qra::kFloat32

// The plan for `M` (<= 16) rows. Split-K until the grid covers every SM `blocks_per_sm`
// times (memory-bound: bytes in flight, not FLOPs, decide), within the shared memory for x;
// the x·Aᵀ blocks so that each streams <= 16 KiB of A, does <= 1024 FMAs per thread and
// stages <= 32 KiB of x.
inline DecodePlan decode_plan(int64_t M, int64_t N, int64_t Kp, int bits, int group_size,
                              int64_t rank, int x_dtype, int sm_count, int blocks_per_sm) {
  DecodePlan p;
  p.rows = M < kDecodeMaxRows ? M : kDecodeMaxRows;
  if (p.rows < 1) p.rows = 1;
  p.tiles = (N + kDecodeCols - 1) / kDecodeCols;
  const int64_t groups = Kp / group_size;
  const int64_t planes = x_dtype == kFloat32Code ? 3 : 1;
  const int64_t k_cap = kDecodeXBytes / (2 * planes * p.rows);  // k of x that fit
  int64_t gps_cap = k_cap / group_size;
  if (gps_cap < 1) gps_cap = 1;
  const int64_t want = (int64_t)sm_count * blocks_per_sm;
  int64_t splits = (want + p.tiles - 1) / p.tiles;
  if (splits < 1) splits = 1;
  if (splits > groups) splits = groups;
  int64_t gps = (groups + splits - 1) / splits;
  if (gps > gps_cap) gps = gps_cap;
  p.groups_per_split = gps;
  p.splits = (groups + gps - 1) / gps;  // no empty slice
  const int64_t k_slice = gps * group_size;
  p.smem_bytes = decode_ring_bytes(bits) + decode_sz_bytes(bits, group_size) +
                 2 * planes * p.rows * k_slice    // x
                 + 8 * 16 * gps;                  // x sums per group (16 rows x 2)
  if (rank > 0) {
    // x·Aᵀ: A is rank x K (K <= Kp); K split over the blocks in multiples of 32.
    const int64_t by_bytes = (rank * Kp * 4 + 16383) / 16384;
    const int64_t by_flops = (p.rows * rank * Kp + kDecodeThreads * 1024 - 1) / (kDecodeThreads * 1024);
    // ... and so that each block's slice of x (fp32, staged) fits in 32 KiB.
    const int64_t by_smem = (4 * p.rows * Kp + 32767) / 32768;
    int64_t xb = by_bytes > by_flops ? by_bytes : by_flops;
    if (by_smem > xb) xb = by_smem;
    const int64_t chunks = Kp / 32;
    if (xb > chunks) xb = chunks;
    if (xb > 128) xb = 128;
    if (xb < 1) xb = 1;
    p.k_per_xa_block = ((chunks + xb - 1) / xb) * 32;
    p.xa_blocks = (Kp + p.k_per_xa_block - 1) / p.k_per_xa_block;
    // The x·Aᵀ blocks stage their slice of x as fp32; the epilogue stages x·Aᵀ and B.
    const int64_t xa_smem = 4 * p.rows * p.k_per_xa_block;
    const int64_t rc = rank < kDecodeEpilogueRanks ? rank : kDecodeEpilogueRanks;
    const int64_t epi_smem = 4 * (p.rows * kDecodeEpilogueRanks + kDecodeCols * (kDecodeEpilogueRanks + 1));
    (void)rc;
    if (xa_smem > p.smem_bytes) p.smem_bytes = xa_smem;
    if (epi_smem > p.smem_bytes) p.smem_bytes = epi_smem;
  }
  p.workspace_floats = p.xa_offset(rank) + p.rows * rank;
  return p;
}

// Counters (int32) the decode kernel uses, zero between launches (each launch resets what it
// used): one per column tile, then x·Aᵀ arrivals, x·Aᵀ ready, epilogues done.
inline int64_t decode_counter_ints(int64_t N) { return (N + kDecodeCols - 1) / kDecodeCols + 3; }

}  // namespace plan
}  // namespace qra
