// Host entry points of the CUDA kernels (cuda_api.h): the forward dispatch by M and dtype,
// workspace sizing and device queries.
//   M <= 16, or fp32 x:  the decode kernel (csrc/cuda/decode.cuh), LoRA x·Aᵀ in the same
//                        launch; fp32 x in passes of 16 rows, as three bf16 planes;
//   M > 16, fp16/bf16:   the tensor-core kernel (csrc/cuda/tc_gemm.cuh), after an x·Aᵀ pass.
// Every kernel needs sm_80 (mma.m16n8k16, cp.async).
#include "cuda/decode.cuh"
#include "cuda/plan.h"
#include "cuda/tc_gemm.cuh"

namespace qra {
namespace cuda {
namespace {

// Split-K target: slices until the grid covers every SM twice. Two resident blocks of 4 warps
// keep ~50 KiB in flight per SM (the ring), more than HBM needs; more slices would only add
// partials (8 bytes per output and slice) and shorten every warp's stream.
constexpr int kDecodeSplitBlocksPerSm = 2;  // qra_kernels/bench/model.py mirrors it

// xa[m, r] = sum_k x[m, k] · A[r, k] in fp32 for the tensor-core path (M > 16): a block
// per 16 rows x 16 ranks, 8 k-lanes per rank.
__global__ void __launch_bounds__(128) lora_xa_kernel(const LinearArgs a, float* xa) {
  const int tid = threadIdx.x, kl = tid & 7, rl = tid >> 3;
  const int64_t m0 = (int64_t)blockIdx.x * 16, r = (int64_t)blockIdx.y * 16 + rl;
  float acc[16];
#pragma unroll
  for (int m = 0; m < 16; ++m) acc[m] = 0.f;
  if (r < a.rank)
    for (int64_t k = kl; k < a.K; k += 8) {
      const float av = load_act(a.lora_A, r * a.K + k, a.lora_dtype);
#pragma unroll
      for (int m = 0; m < 16; ++m)
        if (m0 + m < a.M) acc[m] = fmaf(load_act(a.x, (m0 + m) * a.K + k, a.x_dtype), av, acc[m]);
    }
#pragma unroll
  for (int m = 0; m < 16; ++m) {
    float v = acc[m];
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    if (kl == 0 && r < a.rank && m0 + m < a.M) xa[(m0 + m) * a.rank + r] = v;
  }
}

struct DeviceInfo {
  int sm_count = 0, major = 0;
};

// Queried once per device (cudaDeviceGetAttribute is cheap, but not free per call).
DeviceInfo device_info(int device) {
  static DeviceInfo cache[64];
  if (device < 0 || device >= 64) return DeviceInfo{};
  DeviceInfo& d = cache[device];
  if (d.sm_count == 0) {
    cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device);
  }
  return d;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

bool use_decode(const LinearArgs& a) { return a.M <= kDecodeMaxRows || a.x_dtype == kFloat32; }

const char* launch_decode(const LinearArgs& a, int sm_count, cudaStream_t stream) {
  const bool aligned = a.N % 8 == 0 && aligned16(a.qweight) && aligned16(a.scales) &&
                       aligned16(a.zeros);
  for (int64_t m0 = 0; m0 < a.M; m0 += kDecodeMaxRows) {
    const int64_t rows = a.M - m0 < kDecodeMaxRows ? a.M - m0 : kDecodeMaxRows;
    const plan::DecodePlan pl = plan::decode_plan(rows, a.N, a.Kp, a.bits, a.group_size, a.rank,
                                                  a.x_dtype, sm_count, kDecodeSplitBlocksPerSm);
    decode::Params p;
    p.a = a;
    p.m0 = m0;
    p.rows = rows;
    p.tiles = pl.tiles;
    p.splits = pl.splits;
    p.groups_per_split = pl.groups_per_split;
    p.xa_blocks = pl.xa_blocks;
    p.k_per_xa_block = pl.k_per_xa_block;
    p.aligned = aligned;
    p.partial = a.workspace + pl.partial_offset();
    p.xa_partial = a.workspace + pl.xa_partial_offset();
    p.xa = a.workspace + pl.xa_offset(a.rank);
    p.counters = a.counters;
    const char* err = nullptr;
    switch (a.bits) {
      case 2: err = decode::launch<2>(p, pl.smem_bytes, stream); break;
      case 3: err = decode::launch<3>(p, pl.smem_bytes, stream); break;
      case 4: err = decode::launch<4>(p, pl.smem_bytes, stream); break;
      case 8: err = decode::launch<8>(p, pl.smem_bytes, stream); break;
      default: err = "unsupported bits";
    }
    if (err) return err;
  }
  return nullptr;
}

}  // namespace

const char* launch_tc_forward(const tc::Params& p, cudaStream_t stream);

int64_t forward_workspace_floats(int64_t M, int64_t N, int64_t Kp, int bits, int group_size,
                                 int64_t rank, int x_dtype, int device) {
  LinearArgs a{};
  a.M = M;
  a.x_dtype = x_dtype;
  if (!use_decode(a)) return M * rank + 1;
  const DeviceInfo info = device_info(device);
  const int64_t rows = M < kDecodeMaxRows ? M : kDecodeMaxRows;
  return plan::decode_plan(rows, N, Kp, bits, group_size, rank, x_dtype,
                           info.sm_count > 0 ? info.sm_count : 1, kDecodeSplitBlocksPerSm)
             .workspace_floats + 1;
}

int64_t forward_counter_ints(int64_t N) { return plan::decode_counter_ints(N); }

const char* linear_forward(const LinearArgs& a) {
  if (a.M == 0) return nullptr;
  for (int dt : {a.x_dtype, a.rank > 0 ? a.lora_dtype : kFloat32})
    if (dt != kFloat32 && dt != kFloat16 && dt != kBFloat16)
      return "activations and LoRA factors must be float32, float16 or bfloat16";
  // Our (statically linked) runtime keeps its own current device: set it to the tensors'.
  if (const char* e = cuda_error(cudaSetDevice(a.device))) return e;
  const DeviceInfo info = device_info(a.device);
  if (info.major < 8) return "the qra CUDA kernels need an sm_80 or newer GPU (mma.m16n8k16, cp.async)";
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  if (use_decode(a)) return launch_decode(a, info.sm_count, stream);

  float* xa = a.workspace;
  if (a.rank > 0) {
    if ((a.M + 15) / 16 > 2147483647LL || (a.rank + 15) / 16 > 65535) return "too many rows or ranks";
    lora_xa_kernel<<<dim3((unsigned)((a.M + 15) / 16), (unsigned)((a.rank + 15) / 16)), 128, 0,
                     stream>>>(a, xa);
    if (const char* e = cuda_error(cudaGetLastError())) return e;
  }
  tc::Params p{};
  p.act = a.x;
  p.act_dtype = a.x_dtype;
  p.M = a.M;
  p.N = a.N;
  p.K = a.K;
  p.Kp = a.Kp;
  p.qweight = a.qweight;
  p.scales = a.scales;
  p.zeros = a.zeros;
  p.scale_dtype = a.scale_dtype;
  p.bits = a.bits;
  p.group_size = a.group_size;
  p.aligned = a.K % 8 == 0 && a.N % 8 == 0 && aligned16(a.x) && aligned16(a.qweight) &&
              aligned16(a.scales) && aligned16(a.zeros);
  p.y = a.y;
  p.xa = a.rank > 0 ? xa : nullptr;
  p.lora_B = a.lora_B;
  p.lora_dtype = a.lora_dtype;
  p.rank = a.rank;
  p.scaling = a.scaling;
  p.bias = a.bias;
  return launch_tc_forward(p, stream);
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device / no driver" error
    return -1;
  }
  return n;
}

}  // namespace cuda
}  // namespace qra
