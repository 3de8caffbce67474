// pybind11 module r3v_fast._C: the C++ CPU kernels, called by r3v_fast/ops/cpp_backend.py.
//
// Arguments are numpy arrays (torch tensors pass through zero-copy via Tensor.numpy()), so the
// build needs no torch headers. Nothing is converted or copied here: every array must already
// have the exact dtype, shape and C layout, and outputs are written in place; anything else
// raises a ValueError/TypeError naming the argument. The GIL is released while computing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "paged_attention.h"
#include "token_logprob.h"
#include "weighted_nll.h"

namespace py = pybind11;

namespace {

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Checks dtype, C-contiguity, shape (and writeability for outputs); returns the data pointer.
template <typename T>
T* buffer(const py::array& a, const char* name, const std::vector<int64_t>& shape, bool writable) {
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(name) + ": expected dtype " + std::string(py::str(py::dtype::of<T>())) +
                         ", got " + std::string(py::str(a.dtype())));
  std::vector<int64_t> got(a.shape(), a.shape() + a.ndim());
  if (got != shape) throw py::value_error(std::string(name) + ": expected shape " + shape_str(shape) + ", got " + shape_str(got));
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + ": must be C-contiguous");
  if (writable && !a.writeable()) throw py::value_error(std::string(name) + ": output array is read-only");
  return static_cast<T*>(const_cast<void*>(a.data()));
}

r3v::TokenLogprobProblem problem(const py::array& hidden, const py::array& weight, const py::object& bias,
                                 const py::array& targets, float softcap) {
  if (hidden.ndim() != 2 || weight.ndim() != 2)
    throw py::value_error("hidden and weight must be 2-D ([N, D] and [V, D])");
  r3v::TokenLogprobProblem p{};
  p.N = hidden.shape(0);
  p.D = hidden.shape(1);
  p.V = weight.shape(0);
  if (p.V < 1) throw py::value_error("weight: the vocabulary is empty (V = 0)");
  if (!(softcap >= 0.0f)) throw py::value_error("softcap must be >= 0 (0 = no cap), got " + std::to_string(softcap));
  p.softcap = softcap;
  p.hidden = buffer<float>(hidden, "hidden", {p.N, p.D}, false);
  p.weight = buffer<float>(weight, "weight", {p.V, p.D}, false);
  p.bias = bias.is_none() ? nullptr : buffer<float>(bias.cast<py::array>(), "bias", {p.V}, false);
  p.targets = buffer<int64_t>(targets, "targets", {p.N}, false);
  for (int64_t i = 0; i < p.N; ++i)  // out-of-range targets would read outside the tile
    if (p.targets[i] < 0 || p.targets[i] >= p.V)
      throw py::value_error("targets[" + std::to_string(i) + "] = " + std::to_string(p.targets[i]) +
                            " is out of range [0, " + std::to_string(p.V) + ")");
  return p;
}

float* optional_out(const py::object& a, const char* name, const std::vector<int64_t>& shape) {
  return a.is_none() ? nullptr : buffer<float>(a.cast<py::array>(), name, shape, true);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "r3v_fast C++ CPU kernels (fused LM-head token log-likelihood, weighted NLL, paged cascade decode attention)";
  m.attr("simd") = r3v::simd_name();
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  m.def("max_threads", &r3v::max_threads, "Default number of threads (1 without OpenMP).");

  m.def(
      "token_logprob_fwd",
      [](py::array hidden, py::array weight, py::object bias, py::array targets, float softcap, py::array out_logp,
         py::array out_lse, int num_threads) {
        const auto p = problem(hidden, weight, bias, targets, softcap);
        float* logp = buffer<float>(out_logp, "out_logp", {p.N}, true);
        float* lse = buffer<float>(out_lse, "out_lse", {p.N}, true);
        py::gil_scoped_release release;
        r3v::token_logprob_fwd(p, logp, lse, num_threads);
      },
      py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("targets"), py::arg("softcap"),
      py::arg("out_logp"), py::arg("out_lse"), py::arg("num_threads") = 0,
      "Writes logp[N] = z[target] - lse and lse[N] = logsumexp(z), z = hidden @ weight.T (+ bias, soft-capped).");

  m.def(
      "token_logprob_bwd",
      [](py::array hidden, py::array weight, py::object bias, py::array targets, py::array lse, py::array grad_logp,
         float softcap, py::object out_grad_hidden, py::object out_grad_weight, py::object out_grad_bias,
         int num_threads) {
        const auto p = problem(hidden, weight, bias, targets, softcap);
        const float* lse_p = buffer<float>(lse, "lse", {p.N}, false);
        const float* g = buffer<float>(grad_logp, "grad_logp", {p.N}, false);
        float* dh = optional_out(out_grad_hidden, "out_grad_hidden", {p.N, p.D});
        float* dw = optional_out(out_grad_weight, "out_grad_weight", {p.V, p.D});
        float* db = optional_out(out_grad_bias, "out_grad_bias", {p.V});
        if (db && !p.bias) throw py::value_error("out_grad_bias given but bias is None");
        py::gil_scoped_release release;
        r3v::token_logprob_bwd(p, lse_p, g, dh, dw, db, num_threads);
      },
      py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("targets"), py::arg("lse"), py::arg("grad_logp"),
      py::arg("softcap"), py::arg("out_grad_hidden"), py::arg("out_grad_weight"), py::arg("out_grad_bias"),
      py::arg("num_threads") = 0,
      "Writes the requested gradients (None = skip) of sum(grad_logp * logp) w.r.t. hidden, weight, bias.");

  m.def(
      "paged_cascade_decode_attention",
      [](py::array q, py::array k_pool, py::array v_pool, py::array question_slots, py::array prefix_tables,
         py::array prefix_lens, py::array slot_tables, py::array slot_lens, float scale, py::array out, py::array lse,
         int num_threads) {
        if (q.ndim() != 3 || k_pool.ndim() != 4 || question_slots.ndim() != 2 || prefix_tables.ndim() != 2 ||
            slot_tables.ndim() != 2)
          throw py::value_error("paged attention: q [S, H, Dh], pools [NB, Hkv, BS, Dh], tables 2-D");
        r3v::PagedAttentionProblem p{};
        p.S = q.shape(0), p.H = q.shape(1), p.Dh = q.shape(2);
        p.NB = k_pool.shape(0), p.Hkv = k_pool.shape(1), p.BS = k_pool.shape(2);
        p.R = question_slots.shape(0), p.W = question_slots.shape(1);
        p.MPB = prefix_tables.shape(1), p.MSB = slot_tables.shape(1);
        if (p.Hkv < 1 || p.H % p.Hkv != 0) throw py::value_error("paged attention: H must be a multiple of Hkv");
        p.scale = scale;
        p.q = buffer<float>(q, "q", {p.S, p.H, p.Dh}, false);
        p.k_pool = buffer<float>(k_pool, "k_pool", {p.NB, p.Hkv, p.BS, p.Dh}, false);
        p.v_pool = buffer<float>(v_pool, "v_pool", {p.NB, p.Hkv, p.BS, p.Dh}, false);
        p.question_slots = buffer<int32_t>(question_slots, "question_slots", {p.R, p.W}, false);
        p.prefix_tables = buffer<int32_t>(prefix_tables, "prefix_tables", {p.R, p.MPB}, false);
        p.prefix_lens = buffer<int32_t>(prefix_lens, "prefix_lens", {p.R}, false);
        p.slot_tables = buffer<int32_t>(slot_tables, "slot_tables", {p.S, p.MSB}, false);
        p.slot_lens = buffer<int32_t>(slot_lens, "slot_lens", {p.S}, false);
        float* o = buffer<float>(out, "out", {p.S, p.H, p.Dh}, true);
        float* l = buffer<float>(lse, "lse", {p.S, p.H}, true);
        // Indices that would read outside the arrays are errors, not undefined behaviour.
        for (int64_t i = 0; i < p.R * p.W; ++i)
          if (p.question_slots[i] >= p.S) throw py::value_error("question_slots: slot index out of range");
        for (int64_t i = 0; i < p.R * p.MPB; ++i)
          if (p.prefix_tables[i] < 0 || p.prefix_tables[i] >= p.NB) throw py::value_error("prefix_tables: block out of range");
        for (int64_t i = 0; i < p.S * p.MSB; ++i)
          if (p.slot_tables[i] < 0 || p.slot_tables[i] >= p.NB) throw py::value_error("slot_tables: block out of range");
        py::gil_scoped_release release;
        r3v::paged_cascade_decode_attention(p, o, l, num_threads);
      },
      py::arg("q"), py::arg("k_pool"), py::arg("v_pool"), py::arg("question_slots"), py::arg("prefix_tables"),
      py::arg("prefix_lens"), py::arg("slot_tables"), py::arg("slot_lens"), py::arg("scale"), py::arg("out"),
      py::arg("lse"), py::arg("num_threads") = 0,
      "Writes out [S, H, Dh] and lse [S, H]: each listed slot's attention over its row's prefix and its own tokens.");

  m.def(
      "weighted_nll_fwd",
      [](py::array hidden, py::array weight, py::object bias, py::array targets, py::array token_weights,
         float softcap, py::array out_logp, py::object out_grad_hidden, py::object out_grad_weight,
         py::object out_grad_bias, int64_t chunk_tokens, int num_threads) {
        const auto tp = problem(hidden, weight, bias, targets, softcap);
        r3v::WeightedNllProblem p{tp.hidden, tp.weight, tp.bias, tp.targets, nullptr, tp.N, tp.D, tp.V, tp.softcap};
        p.token_weights = buffer<float>(token_weights, "token_weights", {p.N}, false);
        float* logp = buffer<float>(out_logp, "out_logp", {p.N}, true);
        float* dh = optional_out(out_grad_hidden, "out_grad_hidden", {p.N, p.D});
        float* dw = optional_out(out_grad_weight, "out_grad_weight", {p.V, p.D});
        float* db = optional_out(out_grad_bias, "out_grad_bias", {p.V});
        if (db && !p.bias) throw py::value_error("out_grad_bias given but bias is None");
        if (chunk_tokens < 0) throw py::value_error("chunk_tokens must be >= 0 (0 = automatic)");
        py::gil_scoped_release release;
        r3v::weighted_nll_fwd(p, logp, dh, dw, db, chunk_tokens, num_threads);
      },
      py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("targets"), py::arg("token_weights"),
      py::arg("softcap"), py::arg("out_logp"), py::arg("out_grad_hidden"), py::arg("out_grad_weight"),
      py::arg("out_grad_bias"), py::arg("chunk_tokens") = 0, py::arg("num_threads") = 0,
      "Writes logp[N] and the requested gradients (None = skip) of -sum(token_weights * logp).");

  m.def("weighted_nll_chunk_tokens", &r3v::weighted_nll_chunk_tokens, py::arg("N"), py::arg("V"),
        py::arg("requested") = 0, "Tokens per chunk for a request (0 = automatic).");

  m.def("weighted_nll_workspace_bytes", &r3v::weighted_nll_workspace_bytes, py::arg("N"), py::arg("D"), py::arg("V"),
        py::arg("chunk_tokens"), py::arg("num_threads"), py::arg("need_hidden") = true, py::arg("need_weight") = true,
        "Scratch bytes one weighted_nll_fwd call allocates (besides its outputs).");

  m.def("token_logprob_workspace_bytes", &r3v::token_logprob_workspace_bytes, py::arg("N"), py::arg("D"), py::arg("V"),
        py::arg("num_threads"), py::arg("backward"), py::arg("need_hidden") = true, py::arg("need_weight") = true,
        py::arg("need_bias") = false, "Scratch bytes one call allocates (besides its outputs).");
}
