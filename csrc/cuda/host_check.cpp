// The CUDA kernels' bit tricks (magic.cuh) and launch heuristics (plan.h), compiled by the
// host compiler into every build of qra_kernels._C — with or without nvcc — so the CPU tests
// run the very functions the GPU runs (tests/qra_kernels/backends/test_cuda_backend.py).
// Batch calls take and return little-endian uint32 arrays as bytes (numpy-friendly).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "magic.cuh"
#include "plan.h"

namespace py = pybind11;

namespace qra {
namespace cuda_host {
namespace {

std::vector<uint32_t> words_of(const py::bytes& b) {
  const std::string s = b;
  if (s.size() % 4) throw std::invalid_argument("word buffer length must be a multiple of 4");
  std::vector<uint32_t> w(s.size() / 4);
  if (!w.empty()) __builtin_memcpy(w.data(), s.data(), s.size());
  return w;
}

py::bytes bytes_of(const std::vector<uint32_t>& w) {
  return py::bytes(reinterpret_cast<const char*>(w.data()), w.size() * 4);
}

void check_bits(int bits) {
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
    throw std::invalid_argument("bits must be 2, 3, 4 or 8, got " + std::to_string(bits));
}

template <int B, bool BF16, bool RAW>
std::vector<uint32_t> decode_batch(const std::vector<uint32_t>& w, int tig) {
  constexpr int nw = magic::DecodeWords<B>::value;
  if (w.size() % nw) throw std::invalid_argument("word count must be a multiple of the words per column");
  std::vector<uint32_t> out(w.size() / nw * 4);
  for (size_t c = 0; c < w.size() / nw; ++c) {
    uint32_t p[4];
    magic::decode_chunk<B, BF16, RAW>(&w[c * nw], tig, p);
    for (int i = 0; i < 4; ++i) out[c * 4 + i] = p[i];
  }
  return out;
}

template <int B, bool BF16>
std::vector<uint32_t> natural_batch(const std::vector<uint32_t>& w, int oct) {
  if (w.size() % B) throw std::invalid_argument("word count must be a multiple of bits (one chunk column)");
  std::vector<uint32_t> out(w.size() / B * 4);
  for (size_t c = 0; c < w.size() / B; ++c) {
    uint32_t p[4];
    magic::natural8<B, BF16>(&w[c * B], 1, oct, p);
    for (int i = 0; i < 4; ++i) out[c * 4 + i] = p[i];
  }
  return out;
}

template <bool RAW>
py::bytes decode_as(int bits, bool bf16, const std::vector<uint32_t>& w, int tig) {
  switch (bits * 2 + bf16) {
    case 4: return bytes_of(decode_batch<2, false, RAW>(w, tig));
    case 5: return bytes_of(decode_batch<2, true, RAW>(w, tig));
    case 6: return bytes_of(decode_batch<3, false, RAW>(w, tig));
    case 7: return bytes_of(decode_batch<3, true, RAW>(w, tig));
    case 8: return bytes_of(decode_batch<4, false, RAW>(w, tig));
    case 9: return bytes_of(decode_batch<4, true, RAW>(w, tig));
    case 16: return bytes_of(decode_batch<8, false, RAW>(w, tig));
    default: return bytes_of(decode_batch<8, true, RAW>(w, tig));
  }
}

py::bytes decode(int bits, bool bf16, const py::bytes& words, int tig, bool raw) {
  check_bits(bits);
  if (tig < 0 || tig > 3) throw std::invalid_argument("tig must be 0..3");
  const auto w = words_of(words);
  return raw ? decode_as<true>(bits, bf16, w, tig) : decode_as<false>(bits, bf16, w, tig);
}

template <int B, bool BF16>
py::tuple raw_form() {
  py::list shifts;
  for (int i = 0; i < 4; ++i) shifts.append(magic::decode_raw_shift<B, BF16>(i));
  return py::make_tuple(shifts, magic::decode_raw_magic<B, BF16>());
}

py::tuple decode_raw_form(int bits, bool bf16) {
  check_bits(bits);
  switch (bits * 2 + bf16) {
    case 4: return raw_form<2, false>();
    case 5: return raw_form<2, true>();
    case 6: return raw_form<3, false>();
    case 7: return raw_form<3, true>();
    case 8: return raw_form<4, false>();
    case 9: return raw_form<4, true>();
    case 16: return raw_form<8, false>();
    default: return raw_form<8, true>();
  }
}

py::bytes natural(int bits, bool bf16, const py::bytes& words, int oct) {
  check_bits(bits);
  if (oct < 0 || oct > 3) throw std::invalid_argument("oct must be 0..3");
  const auto w = words_of(words);
  switch (bits * 2 + bf16) {
    case 4: return bytes_of(natural_batch<2, false>(w, oct));
    case 5: return bytes_of(natural_batch<2, true>(w, oct));
    case 6: return bytes_of(natural_batch<3, false>(w, oct));
    case 7: return bytes_of(natural_batch<3, true>(w, oct));
    case 8: return bytes_of(natural_batch<4, false>(w, oct));
    case 9: return bytes_of(natural_batch<4, true>(w, oct));
    case 16: return bytes_of(natural_batch<8, false>(w, oct));
    default: return bytes_of(natural_batch<8, true>(w, oct));
  }
}

template <int B>
py::tuple layout_of(int tig) {
  py::list words, ks;
  for (int j = 0; j < magic::DecodeWords<B>::value; ++j) words.append(magic::decode_word<B>(tig, j));
  py::list slots;
  for (int i = 0; i < 4; ++i)
    for (int lane = 0; lane < 2; ++lane) {
      ks.append(magic::decode_k<B>(tig, i, lane));
      slots.append(magic::decode_slot<B>(magic::decode_k<B>(tig, i, lane)));
    }
  return py::make_tuple(words, ks, slots);
}

py::tuple decode_layout(int bits, int tig) {
  check_bits(bits);
  if (tig < 0 || tig > 3) throw std::invalid_argument("tig must be 0..3");
  switch (bits) {
    case 2: return layout_of<2>(tig);
    case 3: return layout_of<3>(tig);
    case 4: return layout_of<4>(tig);
    default: return layout_of<8>(tig);
  }
}

}  // namespace

void register_bindings(py::module_& m) {
  py::module_ h = m.def_submodule(
      "cuda_host", "The CUDA kernels' bit tricks and launch plans, compiled for the host (tests).");
  h.def("lop3", [](uint32_t lut, uint32_t a, uint32_t b, uint32_t c) {
    // Runtime LUT for testing the emulation itself; the kernels use compile-time LUTs.
    switch (lut) {
      case magic::kAndOr: return magic::lop3<magic::kAndOr>(a, b, c);
      case magic::kMux: return magic::lop3<magic::kMux>(a, b, c);
      default: throw std::invalid_argument("only the kernels' LUTs (0xEA, 0xE2) are compiled");
    }
  });
  h.attr("LUT_AND_OR") = magic::kAndOr;
  h.attr("LUT_MUX") = magic::kMux;
  h.def("prmt", &magic::prmt, "PRMT.b32 (default mode), as the kernels use it");
  h.def("decode_chunk", &decode, py::arg("bits"), py::arg("bf16"), py::arg("words"), py::arg("tig"),
        py::arg("raw") = false, "decode pairs: per column, 4 half2 words (uint32 bytes)");
  h.def("decode_raw_form", &decode_raw_form, "([shift of pair i], magic value) of the raw pairs");
  h.def("decode_layout", &decode_layout, "(chunk words read, k of each (pair, lane), its x slot) of a thread");
  h.def("natural8", &natural, "natural pairs of octet `oct`: per column, 4 half2 words");
  h.def("fragments", []() {
    py::dict d;
    py::list a_col, a_pair, b_pair, c_col, c_row;
    for (int reg = 0; reg < 4; ++reg) {
      a_col.append(py::make_tuple(magic::decode_a_col(0, reg), magic::decode_a_col(1, reg)));
      a_pair.append(py::make_tuple(magic::decode_a_pair(0, reg), magic::decode_a_pair(1, reg)));
      c_col.append(py::make_tuple(magic::decode_c_col(0, reg), magic::decode_c_col(1, reg)));
      c_row.append(magic::decode_c_row(0, reg));
    }
    for (int reg = 0; reg < 2; ++reg)
      b_pair.append(py::make_tuple(magic::decode_b_pair(0, reg), magic::decode_b_pair(1, reg)));
    d["a_col"] = a_col;    // [reg] -> (tile 0, tile 1) column of the thread
    d["a_pair"] = a_pair;  // [reg] -> (step 0, step 1) pair
    d["b_pair"] = b_pair;  // [reg] -> (step 0, step 1) pair
    d["c_col"] = c_col;    // [reg] -> (tile 0, tile 1) column
    d["c_row"] = c_row;    // [reg] -> x row offset from 2·tig
    return d;
  });
  h.def("split_bf16x3", [](float x) {
    uint32_t hi, mid, lo;
    magic::split_bf16x3(x, hi, mid, lo);
    return py::make_tuple(hi, mid, lo);
  });
  h.def("decode_plan", [](int64_t M, int64_t N, int64_t Kp, int bits, int group_size, int64_t rank,
                          int x_dtype, int sm_count, int blocks_per_sm) {
    const plan::DecodePlan p = plan::decode_plan(M, N, Kp, bits, group_size, rank, x_dtype,
                                                 sm_count, blocks_per_sm);
    py::dict d;
    d["tiles"] = p.tiles;
    d["splits"] = p.splits;
    d["groups_per_split"] = p.groups_per_split;
    d["xa_blocks"] = p.xa_blocks;
    d["k_per_xa_block"] = p.k_per_xa_block;
    d["rows"] = p.rows;
    d["smem_bytes"] = p.smem_bytes;
    d["workspace_floats"] = p.workspace_floats;
    d["blocks"] = p.blocks();
    return d;
  }, "the decode kernel's launch plan (what linear_cuda.cu launches)");
}

}  // namespace cuda_host
}  // namespace qra
