// The CPU kernel built for AVX-512 with VNNI and the BF16 dot product (vdpbf16ps: Zen 4+,
// Sapphire Rapids+), 16-column vectors; the float GEMV takes its bf16 path for bf16-exact x
// (2/3/4-bit), the int8 path uses vpdpbusd. Chosen at run time when the CPU has
// AVX512_BF16 and AVX512_VNNI.
#define QRA_CPU_NS avx512bf16
#define QRA_CPU_LANES 16
#define QRA_CPU_BF16DOT 1
#define QRA_CPU_VNNI512 1
#include "kernel.h"
