// The CPU kernel built for AVX-512 with the BF16 dot product (vdpbf16ps: Zen 4+, Sapphire
// Rapids+), 16-column vectors; 2/3/4-bit take the bf16 path of kernel.h. Chosen at run
// time when the CPU has AVX512_BF16.
#define QRA_CPU_NS avx512bf16
#define QRA_CPU_LANES 16
#define QRA_CPU_BF16DOT 1
#include "kernel.h"
