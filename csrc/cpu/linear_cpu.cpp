// Run-time choice between the builds of cpu/kernel.h, and the thread pool they share.
#include "linear_cpu.h"

#include <stdlib.h>
#include <string.h>

#if defined(_OPENMP)
#include <omp.h>
#else
#include <thread>
#include <vector>
#endif

namespace qra {
namespace cpu {

#define QRA_DECLARE_BUILD(ns)                                          \
  namespace ns {                                                       \
  void forward(const ForwardArgs& a, int path, int threads);           \
  void backward_dx(const BackwardArgs& a, int path, int threads);      \
  void dequantize_panel(const DequantArgs& a, int threads);            \
  }
QRA_DECLARE_BUILD(generic)
#if defined(QRA_HAVE_AVX2_BUILD)
QRA_DECLARE_BUILD(avx2)
QRA_DECLARE_BUILD(avx2vnni)
QRA_DECLARE_BUILD(avx512)
QRA_DECLARE_BUILD(avx512vnni)
QRA_DECLARE_BUILD(avx512bf16)
#endif

// Threads: OpenMP, and on purpose the same OpenMP runtime as torch. torch's CPU wheels load
// their libgomp.so.1 before this extension is imported, and the dynamic loader resolves our
// libgomp.so.1 to that already loaded copy (same soname), so our parallel regions run on
// torch's worker threads. With a pool of our own (std::thread, as before), torch's workers
// spin-wait after each of torch's parallel regions (GOMP's default) while ours start: on a
// 2-core machine a bf16 call at M = 16 — whose conversion to fp32 in torch ran an OpenMP
// region just before — took twice as long as the same call with fp32 x, and the gap closed
// with OMP_WAIT_POLICY=PASSIVE (measured, benches/README.md). That was also why bf16 x at
// M = 16 ran 4x slower than fp32 x on the Zen 4 machine of issue 18.
void parallel_for(int64_t n, int threads, void (*fn)(void*, int64_t, int64_t), void* ctx) {
  const int64_t t = n < threads ? n : (threads < 1 ? 1 : threads);
  if (t <= 1) {
    fn(ctx, 0, n);
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel num_threads((int)t)
  {
    const int64_t i = omp_get_thread_num(), nt = omp_get_num_threads();
    fn(ctx, i * n / nt, (i + 1) * n / nt);
  }
#else
  std::vector<std::thread> pool;
  pool.reserve(t - 1);
  for (int64_t i = 1; i < t; ++i) pool.emplace_back(fn, ctx, i * n / t, (i + 1) * n / t);
  fn(ctx, 0, n / t);  // the calling thread takes the first chunk
  for (auto& th : pool) th.join();
#endif
}

// The builds, widest first. Each needs the features of `supported` at run time.
enum Isa { kAvx512Bf16, kAvx512Vnni, kAvx512, kAvx2Vnni, kAvx2, kGeneric, kIsaCount };
static const char* const kIsaNames[kIsaCount] = {"avx512bf16", "avx512vnni", "avx512",
                                                 "avx2vnni",   "avx2",       "generic"};

static bool supported(Isa isa) {
#if defined(QRA_HAVE_AVX2_BUILD) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool vnni512 = avx512 && __builtin_cpu_supports("avx512vnni");
  switch (isa) {
    case kAvx512Bf16: return vnni512 && __builtin_cpu_supports("avx512bf16");
    case kAvx512Vnni: return vnni512;
    case kAvx512: return avx512;
    case kAvx2Vnni: return avx2 && __builtin_cpu_supports("avxvnni");
    case kAvx2: return avx2;
    default: return true;
  }
#else
  return isa == kGeneric;
#endif
}

// QRA_CPU_ISA=<name> selects that build (the tests use it to run every build the CPU has);
// a build the CPU cannot run is capped to the widest one below it that it can.
static Isa detect_isa() {
  int start = 0;
  const char* force = getenv("QRA_CPU_ISA");
  if (force && *force)
    for (int i = 0; i < kIsaCount; ++i)
      if (strcmp(force, kIsaNames[i]) == 0) start = i;
  for (int i = start; i < kIsaCount; ++i)
    if (supported((Isa)i)) return (Isa)i;
  return kGeneric;
}

const char* isa() { return kIsaNames[detect_isa()]; }

const char* runnable_isas() {
  static char buf[128];
  buf[0] = 0;
  for (int i = 0; i < kIsaCount; ++i)
    if (supported((Isa)i)) {
      if (buf[0]) strcat(buf, ",");
      strcat(buf, kIsaNames[i]);
    }
  return buf;
}

void forward(const ForwardArgs& a, int path, int threads) {
  switch (detect_isa()) {
#if defined(QRA_HAVE_AVX2_BUILD)
    case kAvx512Bf16: return avx512bf16::forward(a, path, threads);
    case kAvx512Vnni: return avx512vnni::forward(a, path, threads);
    case kAvx512: return avx512::forward(a, path, threads);
    case kAvx2Vnni: return avx2vnni::forward(a, path, threads);
    case kAvx2: return avx2::forward(a, path, threads);
#endif
    default: return generic::forward(a, path, threads);
  }
}

void backward_dx(const BackwardArgs& a, int path, int threads) {
  switch (detect_isa()) {
#if defined(QRA_HAVE_AVX2_BUILD)
    case kAvx512Bf16: return avx512bf16::backward_dx(a, path, threads);
    case kAvx512Vnni: return avx512vnni::backward_dx(a, path, threads);
    case kAvx512: return avx512::backward_dx(a, path, threads);
    case kAvx2Vnni: return avx2vnni::backward_dx(a, path, threads);
    case kAvx2: return avx2::backward_dx(a, path, threads);
#endif
    default: return generic::backward_dx(a, path, threads);
  }
}

void dequantize_panel(const DequantArgs& a, int threads) {
  switch (detect_isa()) {
#if defined(QRA_HAVE_AVX2_BUILD)
    case kAvx512Bf16: return avx512bf16::dequantize_panel(a, threads);
    case kAvx512Vnni: return avx512vnni::dequantize_panel(a, threads);
    case kAvx512: return avx512::dequantize_panel(a, threads);
    case kAvx2Vnni: return avx2vnni::dequantize_panel(a, threads);
    case kAvx2: return avx2::dequantize_panel(a, threads);
#endif
    default: return generic::dequantize_panel(a, threads);
  }
}

}  // namespace cpu
}  // namespace qra
