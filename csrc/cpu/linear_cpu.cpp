// Run-time choice between the AVX-512, AVX2 and portable builds of cpu/kernel.h.
#include "linear_cpu.h"

#include <stdlib.h>
#include <string.h>

#include <thread>
#include <vector>

namespace qra {
namespace cpu {
namespace avx2 {
void forward(const ForwardArgs& a, int threads);
void backward_dx(const BackwardArgs& a, int threads);
}
namespace avx512 {
void forward(const ForwardArgs& a, int threads);
void backward_dx(const BackwardArgs& a, int threads);
}
namespace avx512bf16 {
void forward(const ForwardArgs& a, int threads);
void backward_dx(const BackwardArgs& a, int threads);
}
namespace generic {
void forward(const ForwardArgs& a, int threads);
void backward_dx(const BackwardArgs& a, int threads);
}

void parallel_for(int64_t n, int threads, void (*fn)(void*, int64_t, int64_t), void* ctx) {
  const int64_t t = n < threads ? n : (threads < 1 ? 1 : threads);
  if (t <= 1) {
    fn(ctx, 0, n);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(t - 1);
  for (int64_t i = 1; i < t; ++i) pool.emplace_back(fn, ctx, i * n / t, (i + 1) * n / t);
  fn(ctx, 0, n / t);  // the calling thread takes the first chunk
  for (auto& th : pool) th.join();
}

enum Isa { kGeneric, kAvx2, kAvx512, kAvx512Bf16 };

static Isa detect_isa() {
#if defined(QRA_HAVE_AVX2_BUILD) && (defined(__x86_64__) || defined(__i386__))
  // QRA_CPU_ISA=generic|avx2|avx512 caps the choice (the tests use it to cover every build).
  const char* force = getenv("QRA_CPU_ISA");
  if (force && strcmp(force, "generic") == 0) return kGeneric;
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (!avx2) return kGeneric;
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (!avx512 || (force && strcmp(force, "avx2") == 0)) return kAvx2;
  if (__builtin_cpu_supports("avx512bf16") && !(force && strcmp(force, "avx512") == 0))
    return kAvx512Bf16;
  return kAvx512;
#else
  return kGeneric;
#endif
}

const char* isa() {
  switch (detect_isa()) {
    case kAvx512Bf16: return "avx512bf16";
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "generic";
  }
}

void forward(const ForwardArgs& a, int threads) {
#if defined(QRA_HAVE_AVX2_BUILD)
  switch (detect_isa()) {
    case kAvx512Bf16: return avx512bf16::forward(a, threads);
    case kAvx512: return avx512::forward(a, threads);
    case kAvx2: return avx2::forward(a, threads);
    default: break;
  }
#endif
  generic::forward(a, threads);
}

void backward_dx(const BackwardArgs& a, int threads) {
#if defined(QRA_HAVE_AVX2_BUILD)
  switch (detect_isa()) {
    case kAvx512Bf16: return avx512bf16::backward_dx(a, threads);
    case kAvx512: return avx512::backward_dx(a, threads);
    case kAvx2: return avx2::backward_dx(a, threads);
    default: break;
  }
#endif
  generic::backward_dx(a, threads);
}

}  // namespace cpu
}  // namespace qra
