// The CPU kernel built for AVX2 + FMA + F16C + AVX-VNNI (Alder Lake and later, Sapphire
// Rapids, Zen 5), 8-column vectors; the int8 path uses the 256-bit vpdpbusd.
#define QRA_CPU_NS avx2vnni
#define QRA_CPU_AVXVNNI 1
#include "kernel.h"
