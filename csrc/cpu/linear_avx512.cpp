// The CPU kernel built for AVX-512 (F, BW, VL, DQ) + FMA + F16C with 16-column vectors (see
// kernel.h); the int8 path uses vpmaddubsw. Chosen at run time when the CPU has them.
#define QRA_CPU_NS avx512
#define QRA_CPU_LANES 16
#include "kernel.h"
