// The CPU kernel built for AVX2 + FMA + F16C (see kernel.h); chosen at run time when the
// CPU has them.
#define QRA_CPU_NS avx2
#include "kernel.h"
