// The decode kernel (csrc/cuda/decode.cuh) for 4-bit weights: one file per bit-width so that
// the instantiations (fp16/bf16 x 1-8/9-16 rows x group 32/64/128) compile in parallel.
#include "cuda/decode.cuh"

namespace qra {
namespace cuda {
namespace decode {
QRA_DECODE_LAUNCH(4)
}  // namespace decode
}  // namespace cuda
}  // namespace qra
