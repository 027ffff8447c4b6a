// The CPU kernel built for AVX-512 (F, BW, VL, DQ) + VNNI (Cascade Lake, Ice Lake and later),
// 16-column vectors; the int8 path uses vpdpbusd.
#define QRA_CPU_NS avx512vnni
#define QRA_CPU_LANES 16
#define QRA_CPU_VNNI512 1
#include "kernel.h"
