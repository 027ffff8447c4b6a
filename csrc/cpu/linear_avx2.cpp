// The CPU kernel built for AVX2 + FMA + F16C, 8-column vectors (see kernel.h); the int8
// path uses vpmaddubsw. Chosen at run time when the CPU has them.
#define QRA_CPU_NS avx2
#include "kernel.h"
