// Run-time choice between the AVX2 and the portable builds of cpu/kernel.h.
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

static bool use_avx2() {
#if defined(QRA_HAVE_AVX2_BUILD) && (defined(__x86_64__) || defined(__i386__))
  // QRA_CPU_ISA=generic forces the fallback (used by the tests to cover both builds).
  const char* force = getenv("QRA_CPU_ISA");
  if (force && strcmp(force, "generic") == 0) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

const char* isa() { return use_avx2() ? "avx2" : "generic"; }

void forward(const ForwardArgs& a, int threads) {
#if defined(QRA_HAVE_AVX2_BUILD)
  if (use_avx2()) return avx2::forward(a, threads);
#endif
  generic::forward(a, threads);
}

void backward_dx(const BackwardArgs& a, int threads) {
#if defined(QRA_HAVE_AVX2_BUILD)
  if (use_avx2()) return avx2::backward_dx(a, threads);
#endif
  generic::backward_dx(a, threads);
}

}  // namespace cpu
}  // namespace qra
