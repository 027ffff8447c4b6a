// pybind11 module qra_kernels._C: raw pointers (Python ints), sizes, dtype codes and the
// CUDA stream in; no torch headers, so one built wheel works with any torch version. The
// torch-side wrappers (qra_kernels/_ext.py and backends/) pass tensor.data_ptr() and
// validate shapes, dtypes, devices and contiguity before calling in here.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cpu/linear_cpu.h"
#include "dequant.cuh"
#if defined(QRA_WITH_CUDA)
#include "cuda_api.h"
#endif

namespace py = pybind11;

// The CUDA kernels' bit tricks and launch plans, host-compiled for the CPU tests
// (csrc/cuda/host_check.cpp); in every build, with or without nvcc.
namespace qra { namespace cuda_host { void register_bindings(py::module_& m); } }

#ifndef QRA_CUDA_ARCHS
#define QRA_CUDA_ARCHS ""
#endif

namespace {

template <class T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

void check_layout(int bits, int group_size, int64_t M, int64_t N, int64_t K, int64_t Kp) {
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
    throw std::invalid_argument("bits must be one of 2, 3, 4, 8, got " + std::to_string(bits));
  if (group_size != 32 && group_size != 64 && group_size != 128)
    throw std::invalid_argument("group_size must be one of 32, 64, 128, got " +
                                std::to_string(group_size));
  if (M < 0 || N < 1 || K < 1 || Kp < K || Kp % group_size)
    throw std::invalid_argument("bad sizes: M=" + std::to_string(M) + " N=" + std::to_string(N) +
                                " K=" + std::to_string(K) + " Kp=" + std::to_string(Kp));
}

void check_scale_dtype(int dtype) {
  if (dtype != qra::kFloat16 && dtype != qra::kBFloat16)
    throw std::invalid_argument("scale_dtype must be float16 (1) or bfloat16 (2)");
}

void check_act_dtype(int dtype, const char* name) {
  if (dtype != qra::kFloat32 && dtype != qra::kFloat16 && dtype != qra::kBFloat16)
    throw std::invalid_argument(std::string(name) + " must be float32 (0), float16 (1) or "
                                "bfloat16 (2)");
}

void check_cpu_path(int path, bool forward) {
  if (path == qra::cpu::kPathGemv || path == qra::cpu::kPathGemm ||
      (forward && path == qra::cpu::kPathInt8))
    return;
  throw std::invalid_argument(std::string("path must be ") +
                              (forward ? "cpu_path_gemv, cpu_path_int8 or cpu_path_gemm"
                                       : "cpu_path_gemv or cpu_path_gemm (the int8 path is "
                                         "forward only)") +
                              ", got " + std::to_string(path));
}

py::dict build_info() {
  py::dict d;
#if defined(QRA_WITH_CUDA)
  d["cuda_compiled"] = true;
  py::list archs;
  std::string s = QRA_CUDA_ARCHS, cur;
  for (char c : s + ";") {
    if (c == ';' || c == ',' || c == ' ') {
      if (!cur.empty()) archs.append(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  d["cuda_archs"] = archs;
#else
  d["cuda_compiled"] = false;
  d["cuda_archs"] = py::list();
#endif
  d["cpu_extension"] = true;
  d["cpu_isa"] = std::string(qra::cpu::isa());
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "qra compiled kernels (CPU and, when built with nvcc, CUDA); raw-pointer API";
  m.def("build_info", &build_info, "What this extension was built with.");
  qra::cuda_host::register_bindings(m);

  // ---- CPU ----
  m.attr("cpu_path_gemv") = (int)qra::cpu::kPathGemv;
  m.attr("cpu_path_int8") = (int)qra::cpu::kPathInt8;
  m.attr("cpu_path_gemm") = (int)qra::cpu::kPathGemm;
  m.def("cpu_isa", [] { return std::string(qra::cpu::isa()); },
        "The build the CPU dispatcher uses now (QRA_CPU_ISA caps it).");
  m.def("cpu_runnable_isas", [] { return std::string(qra::cpu::runnable_isas()); },
        "Every build this CPU can run, widest first, comma-separated.");
  m.def(
      "cpu_forward",
      [](uintptr_t x, int x_dtype, int64_t ldx, uintptr_t qweight, uintptr_t scales,
         uintptr_t zeros, int scale_dtype, int bits, int group_size, int64_t M, int64_t N,
         int64_t K, int64_t Kp, uintptr_t lora_A, uintptr_t lora_B, int64_t rank,
         double scaling, uintptr_t bias, uintptr_t y, int y_dtype, int path, int threads) {
        check_layout(bits, group_size, M, N, K, Kp);
        check_scale_dtype(scale_dtype);
        check_act_dtype(x_dtype, "x_dtype");
        check_act_dtype(y_dtype, "y_dtype");
        check_cpu_path(path, true);
        if (ldx < K) throw std::invalid_argument("ldx must be >= K");
        if (rank < 0 || (rank > 0 && (!lora_A || !lora_B)))
          throw std::invalid_argument("rank > 0 needs lora_A and lora_B");
        qra::cpu::ForwardArgs a{ptr<const void>(x), x_dtype, ldx, ptr<const int32_t>(qweight),
                                ptr<const uint16_t>(scales), ptr<const uint16_t>(zeros),
                                scale_dtype, bits, group_size, M, N, K, Kp,
                                ptr<const float>(lora_A), ptr<const float>(lora_B), rank,
                                (float)scaling, ptr<const float>(bias), ptr<void>(y), y_dtype};
        py::gil_scoped_release release;
        qra::cpu::forward(a, path, threads);
      },
      "y[M,N] (y_dtype) = x[M,K] (x_dtype, rows ldx apart) · dequant(W)ᵀ + "
      "scaling·(x·Aᵀ)·Bᵀ + bias, by path cpu_path_gemv / cpu_path_int8 / cpu_path_gemm");

  m.def(
      "cpu_backward_dx",
      [](uintptr_t grad_out, int g_dtype, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
         int scale_dtype, int bits, int group_size, int64_t M, int64_t N, int64_t K,
         int64_t Kp, uintptr_t lora_A, uintptr_t lora_B, int64_t rank, double scaling,
         uintptr_t gb, uintptr_t grad_x, int path, int threads) {
        check_layout(bits, group_size, M, N, K, Kp);
        check_scale_dtype(scale_dtype);
        check_act_dtype(g_dtype, "g_dtype");
        check_cpu_path(path, false);
        if (rank < 0 || (rank > 0 && (!lora_A || !lora_B)))
          throw std::invalid_argument("rank > 0 needs lora_A and lora_B");
        qra::cpu::BackwardArgs a{ptr<const void>(grad_out), g_dtype, ptr<const int32_t>(qweight),
                                 ptr<const uint16_t>(scales), ptr<const uint16_t>(zeros),
                                 scale_dtype, bits, group_size, M, N, K, Kp,
                                 ptr<const float>(lora_A), ptr<const float>(lora_B), rank,
                                 (float)scaling, ptr<float>(gb), ptr<float>(grad_x)};
        py::gil_scoped_release release;
        qra::cpu::backward_dx(a, path, threads);
      },
      "grad_x[M,K] (fp32) = grad_out[M,N] (g_dtype) · dequant(W) + scaling·(grad_out·B)·A; "
      "gb[M,r] (fp32, optional) = grad_out·B; path cpu_path_gemv or cpu_path_gemm");

  // The torch route's dequantized panels, in its two layouts (linear_cpu.h, DequantArgs).
  auto dequantize = [](bool rows) {
    return [rows](uintptr_t qweight, uintptr_t scales, uintptr_t zeros, int scale_dtype,
                  int bits, int group_size, int64_t N, int64_t Kp, int64_t k0, int64_t k1,
                  int64_t n0, int64_t n1, uintptr_t out, int out_dtype, int64_t ldo,
                  int threads) {
      check_layout(bits, group_size, 1, N, Kp, Kp);
      check_scale_dtype(scale_dtype);
      if (out_dtype != qra::kFloat32 && out_dtype != qra::kBFloat16)
        throw std::invalid_argument("out_dtype must be float32 or bfloat16");
      if (k0 < 0 || k1 > Kp || k0 > k1 || k0 % group_size || k1 % group_size)
        throw std::invalid_argument("[k0, k1) must be group-aligned and within [0, Kp]");
      if (n0 < 0 || n1 > N || n0 > n1) throw std::invalid_argument("[n0, n1) must be within [0, N]");
      if (rows ? ldo < k1 - k0 : ldo < n1 - n0)
        throw std::invalid_argument(rows ? "ldo must be >= k1 - k0" : "ldo must be >= n1 - n0");
      if (!out && k1 > k0 && n1 > n0) throw std::invalid_argument("out is null");
      qra::cpu::DequantArgs a{ptr<const int32_t>(qweight), ptr<const uint16_t>(scales),
                              ptr<const uint16_t>(zeros), scale_dtype, bits, group_size, N,
                              Kp, k0, k1, n0, n1, ptr<void>(out), out_dtype, ldo, rows};
      py::gil_scoped_release release;
      qra::cpu::dequantize_panel(a, threads);
    };
  };
  m.def("cpu_dequantize_panel", dequantize(false),
        "out[(k-k0)*ldo + (n-n0)] = dequant(W)[n, k] for k in [k0,k1), n in [n0,n1), as "
        "float32 or bfloat16 (out_dtype): a panel of dequant(W)ᵀ for torch's GEMM");
  m.def("cpu_dequantize_rows", dequantize(true),
        "out[(n-n0)*ldo + (k-k0)] = dequant(W)[n, k]: rows n0..n1 of dequant(W) over "
        "[k0,k1), W's own [out, in] layout (same arguments as cpu_dequantize_panel)");

#if defined(QRA_WITH_CUDA)
  m.def("cuda_device_count", &qra::cuda::device_count);
  m.def("cuda_forward_workspace_floats", &qra::cuda::forward_workspace_floats,
        "fp32 scratch of one forward: (M, N, Kp, bits, group_size, rank, x_dtype, device)");
  m.def("cuda_forward_counter_ints", &qra::cuda::forward_counter_ints,
        "int32 counters (zero before the first call, zero after every call) for N columns");
  m.attr("cuda_decode_max_rows") = qra::cuda::kDecodeMaxRows;
  m.def(
      "cuda_forward",
      [](uintptr_t x, int x_dtype, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
         int scale_dtype, int bits, int group_size, int64_t M, int64_t N, int64_t K, int64_t Kp,
         uintptr_t lora_A, uintptr_t lora_B, int lora_dtype, int64_t rank, double scaling,
         uintptr_t bias, uintptr_t y, uintptr_t workspace, uintptr_t counters, uintptr_t stream,
         int device) {
        check_layout(bits, group_size, M, N, K, Kp);
        check_scale_dtype(scale_dtype);
        qra::cuda::LinearArgs a{ptr<const void>(x), x_dtype, ptr<const int32_t>(qweight),
                                ptr<const uint16_t>(scales), ptr<const uint16_t>(zeros),
                                scale_dtype, bits, group_size, M, N, K, Kp,
                                ptr<const void>(lora_A), ptr<const void>(lora_B), lora_dtype,
                                rank, (float)scaling, ptr<const float>(bias), ptr<void>(y),
                                ptr<float>(workspace), ptr<int>(counters), ptr<void>(stream),
                                device};
        const char* err;
        {
          py::gil_scoped_release release;
          err = qra::cuda::linear_forward(a);
        }
        if (err) throw std::runtime_error(std::string("qra cuda forward: ") + err);
      });
  m.def(
      "cuda_backward_dx",
      [](uintptr_t grad_out, int dtype, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
         int scale_dtype, int bits, int group_size, int64_t M, int64_t N, int64_t Kp,
         uintptr_t grad_x, uintptr_t stream, int device) {
        check_layout(bits, group_size, M, N, Kp, Kp);
        check_scale_dtype(scale_dtype);
        qra::cuda::BackwardArgs a{ptr<const void>(grad_out), dtype, ptr<const int32_t>(qweight),
                                  ptr<const uint16_t>(scales), ptr<const uint16_t>(zeros),
                                  scale_dtype, bits, group_size, M, N, Kp, ptr<float>(grad_x),
                                  ptr<void>(stream), device};
        const char* err;
        {
          py::gil_scoped_release release;
          err = qra::cuda::linear_backward_dx(a);
        }
        if (err) throw std::runtime_error(std::string("qra cuda backward: ") + err);
      });
#endif
}
