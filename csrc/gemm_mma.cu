// The tensor-core forward for M > 16 rows of fp16/bf16 x (csrc/cuda/tc_gemm.cuh).
#include "cuda/tc_gemm.cuh"

namespace qra {
namespace cuda {

const char* launch_tc_forward(const tc::Params& p, cudaStream_t stream) {
  switch (p.bits) {
    case 2: return tc::launch<2, false>(p, stream);
    case 3: return tc::launch<3, false>(p, stream);
    case 4: return tc::launch<4, false>(p, stream);
    case 8: return tc::launch<8, false>(p, stream);
  }
  return "unsupported bits";
}

}  // namespace cuda
}  // namespace qra
