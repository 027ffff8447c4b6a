// The CPU kernel built for the baseline instruction set (SSE2 on x86-64, NEON on arm64,
// scalar elsewhere): the portable fallback of kernel.h.
#define QRA_CPU_NS generic
#define QRA_CPU_GENERIC 1
#include "kernel.h"
