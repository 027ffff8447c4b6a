// Decode kernel (M <= 16 rows of x): y = x·dequant(W)ᵀ + scaling·(x·Aᵀ)·Bᵀ + bias.
//
// Decode is memory-bound: the job is to stream the packed words once, with wide loads,
// and keep enough bytes in flight. The tricks, where they are used below:
//  * A block owns 128 output columns and a slice of the reduction (split-K, so that even a
//    4096-column layer puts several blocks on every SM). Each lane loads the words of 4
//    adjacent columns with one 16-byte load (qweight is N-contiguous), so a warp reads
//    512 contiguous bytes per word row.
//  * The reduction is walked in 32-k chunks (qra::chunk_word_row): exactly `bits` words
//    per column, all codes of the chunk in registers, and one scale/zero per chunk.
//  * The zero point is folded out of the inner loop: per chunk,
//      sum_k x_k (q_k - z) s = s · (sum_k x_k q_k - z · sum_k x_k),
//    with sum_k x_k precomputed per chunk in shared memory, so each code costs a shift, a
//    LOP3, an FADD (code_to_float) and one FMA per row of x.
//  * x of the block's slice sits in shared memory as fp32 (all lanes read the same
//    address: a broadcast, no bank conflicts).
//  * The LoRA epilogue is fused: the last block to finish a column tile (an arrival
//    counter in the workspace) reads the summed partials and writes y once, adding
//    scaling·xa·Bᵀ and the bias. With a single split, every block writes directly.
#include <algorithm>

#include "cuda/common.cuh"

namespace qra {
namespace cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kCols = 128;     // columns per block: 32 lanes x 4
constexpr int kSmemBytes = 48 * 1024;

struct GemvParams {
  LinearArgs a;
  const float* xa;
  float* partial;    // [rows, N], zero on entry when splits > 1
  int* counters;     // [ceil(N / 128)], zero on entry when splits > 1
  int64_t m0, rows;  // this pass covers rows [m0, m0 + rows) of x
  int64_t chunks_per_split;
  int splits;
};

template <int B, int MT>
__global__ void __launch_bounds__(kThreads) gemv_kernel(const GemvParams p) {
  extern __shared__ float smem[];
  const LinearArgs& a = p.a;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t N = a.N, K = a.K, Kp = a.Kp;
  const int64_t n_base = (int64_t)blockIdx.x * kCols;
  const int64_t c_begin = (int64_t)blockIdx.y * p.chunks_per_split;
  const int64_t c_end = min(c_begin + p.chunks_per_split, Kp / 32);
  const int nchunk = (int)(c_end - c_begin);
  const int ld = nchunk * 32;
  float* xs = smem;                                  // [MT][ld]
  float* xsum = smem + MT * p.chunks_per_split * 32;  // [MT][nchunk]

  for (int i = tid; i < MT * ld; i += kThreads) {
    const int m = i / ld, kk = i % ld;
    const int64_t k = c_begin * 32 + kk;
    xs[i] = (m < p.rows && k < K) ? load_act(a.x, (p.m0 + m) * K + k, a.x_dtype) : 0.f;
  }
  __syncthreads();
  for (int i = tid; i < MT * nchunk; i += kThreads) {
    const float* row = xs + (i / nchunk) * ld + (i % nchunk) * 32;
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < 32; ++k) s += row[k];
    xsum[i] = s;
  }
  __syncthreads();

  const int64_t n0 = n_base + lane * 4;
  // 16-byte loads need 4 in-range, 16-byte-aligned words: rows start at multiples of N
  // words, so N % 4 == 0 (and an aligned base, which torch allocations are) suffices.
  const bool vec = (N % 4 == 0) && ((reinterpret_cast<uintptr_t>(a.qweight) & 15) == 0) &&
                   n0 + 3 < N;
  float out[MT][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j) out[m][j] = 0.f;

  for (int c = warp; c < nchunk; c += kWarps) {
    const int64_t chunk = c_begin + c;
    uint32_t w[4][B];  // [column][word of the chunk]
#pragma unroll
    for (int i = 0; i < B; ++i) {
      const int32_t* src = a.qweight + chunk_word_row<B>(i, chunk, Kp) * N + n0;
      if (vec) {
        // Read-only, streamed once: the non-coherent path keeps it out of L1's way.
        const int4 v = __ldg(reinterpret_cast<const int4*>(src));
        w[0][i] = v.x; w[1][i] = v.y; w[2][i] = v.z; w[3][i] = v.w;
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) w[j][i] = n0 + j < N ? __ldg(src + j) : 0u;
      }
    }
    float acc[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[m][j] = 0.f;
    const float* xc = xs + c * 32;
#pragma unroll
    for (int k = 0; k < 32; ++k) {
      float q[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) q[j] = code_to_float(chunk_code<B, uint32_t>(w[j], k));
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float xv = xc[m * ld + k];
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[m][j] = fmaf(xv, q[j], acc[m][j]);
      }
    }
    const int64_t g = chunk * 32 / a.group_size;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (n0 + j >= N) break;
      const float s = load_half_bits(a.scales, g * N + n0 + j, a.scale_dtype);
      const float z = load_half_bits(a.zeros, g * N + n0 + j, a.scale_dtype);
#pragma unroll
      for (int m = 0; m < MT; ++m) out[m][j] = fmaf(s, acc[m][j] - z * xsum[m * nchunk + c], out[m][j]);
    }
  }

  // Sum the warps' partial results: shared memory is free again once x is consumed.
  __syncthreads();
  float* red = smem;  // [kWarps][MT][kCols]
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j) red[(warp * MT + m) * kCols + lane * 4 + j] = out[m][j];
  __syncthreads();
  const int64_t n = n_base + tid;
  float v[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    v[m] = 0.f;
#pragma unroll
    for (int w2 = 0; w2 < kWarps; ++w2) v[m] += red[(w2 * MT + m) * kCols + tid];
  }
  if (p.splits == 1) {
    if (n < N)
      for (int m = 0; m < MT && m < p.rows; ++m) store_output(a, p.xa, p.m0 + m, n, v[m]);
    return;
  }
  if (n < N)
    for (int m = 0; m < MT && m < p.rows; ++m) atomicAdd(&p.partial[m * N + n], v[m]);
  // Last block of this column tile: make every block's atomics visible, then finish.
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (tid == 0) last = atomicAdd(&p.counters[blockIdx.x], 1) == p.splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (n < N)
    for (int m = 0; m < MT && m < p.rows; ++m)
      store_output(a, p.xa, p.m0 + m, n, __ldcg(&p.partial[m * N + n]));
}

template <int B, int MT>
const char* launch(const GemvParams& p, int tiles, cudaStream_t stream) {
  const int xs_floats = MT * (int)p.chunks_per_split * 33;
  const int red_floats = kWarps * MT * kCols;
  const size_t smem = sizeof(float) * (size_t)std::max(xs_floats, red_floats);
  gemv_kernel<B, MT><<<dim3(tiles, p.splits), kThreads, smem, stream>>>(p);
  return cuda_error(cudaGetLastError());
}

template <int B>
const char* launch_rows(const GemvParams& p, int tiles, cudaStream_t stream) {
  // Row counts are rounded up to a power of two: 5 instantiations per bit-width.
  if (p.rows <= 1) return launch<B, 1>(p, tiles, stream);
  if (p.rows <= 2) return launch<B, 2>(p, tiles, stream);
  if (p.rows <= 4) return launch<B, 4>(p, tiles, stream);
  if (p.rows <= 8) return launch<B, 8>(p, tiles, stream);
  return launch<B, 16>(p, tiles, stream);
}

int rows_bucket(int64_t rows) { return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : rows <= 8 ? 8 : 16; }

}  // namespace

const char* launch_gemv(const LinearArgs& a, const float* xa, float* partial, int sm_count,
                        cudaStream_t stream) {
  const int tiles = (int)((a.N + kCols - 1) / kCols);
  const int64_t chunks = a.Kp / 32;
  for (int64_t m0 = 0; m0 < a.M; m0 += kDecodeMaxRows) {
    GemvParams p{a, xa, partial, nullptr, m0, std::min(kDecodeMaxRows, a.M - m0), 0, 1};
    const int mt = rows_bucket(p.rows);
    // Split K until there are ~4 blocks per SM, within the shared memory for x.
    const int64_t want = std::max<int64_t>(1, (4 * (int64_t)sm_count + tiles - 1) / tiles);
    int64_t cps = (chunks + want - 1) / want;
    const int64_t cps_max = kSmemBytes / (int64_t)(sizeof(float) * 33 * mt);
    cps = std::max<int64_t>(1, std::min(cps, cps_max));
    p.chunks_per_split = cps;
    p.splits = (int)((chunks + cps - 1) / cps);
    if (p.splits > 1) {
      // The partial sums and arrival counters must start at zero in every pass.
      const size_t bytes = sizeof(float) * (size_t)(p.rows * a.N) + sizeof(int) * tiles;
      if (const char* e = cuda_error(cudaMemsetAsync(partial, 0, bytes, stream))) return e;
      p.counters = reinterpret_cast<int*>(partial + p.rows * a.N);
    }
    const char* err = nullptr;
    switch (a.bits) {
      case 2: err = launch_rows<2>(p, tiles, stream); break;
      case 3: err = launch_rows<3>(p, tiles, stream); break;
      case 4: err = launch_rows<4>(p, tiles, stream); break;
      case 8: err = launch_rows<8>(p, tiles, stream); break;
      default: err = "unsupported bits";
    }
    if (err) return err;
  }
  return nullptr;
}

}  // namespace cuda
}  // namespace qra
