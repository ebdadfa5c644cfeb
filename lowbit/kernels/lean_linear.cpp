// int8's layer in one call each way: the lean path of `lowbit.nn.linear` (`_lean`).
//
// An int8 layer's forward is: quantize the weight's rows to int8 (the input's rows come quantized,
// shared among the layers that read one input), an int8 GEMM with exact int32 sums, the epilogue
// that applies both operands' row scales, the bias, and the casts to the output dtype. Its
// backward is two plain bf16 GEMMs (input and weight gradients), their casts, and the bias
// gradient. Composed in Python, the calls around these kernels cost ~140 us a layer (16 x 16
// operands: as much as the kernels themselves at the default workload's 4096 x 128), so each
// direction is one op here that makes the same calls in the same order: the same bits as the
// general path (tests/nn/test_lean_path.py), with the Python left to the autograd function.
//
// Autocast is off inside both ops: none of their GEMMs autocasts (the Python path runs them with
// autocast off too), and a backward may run inside an autocast region.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/constant_pad_nd.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace {

constexpr int64_t kIntKind = 1;  // quantize_rows' kind for symmetric integer formats

// `lowbit.kernels.quantize_rows` and `scale_rows_cols` (quantize.cpp, epilogue.cpp), by the
// dispatcher: they live in other translation units' anonymous namespaces.
at::Tensor quantize_int_rows(const at::Tensor& x, double fmt_max, int64_t rule, at::Tensor& scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lowbit::quantize_rows", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double,
              int64_t, const std::optional<at::Tensor>&, std::optional<int64_t>, bool,
              const std::optional<at::Tensor>&, bool, bool)>();
  auto quantized = op.call(x, x.size(1), 1, kIntKind, 0, 0, 0, fmt_max, rule, std::nullopt,
                           std::nullopt, false, std::nullopt, true, false);
  scale = std::get<1>(quantized);
  return std::get<0>(quantized);
}

at::Tensor scale_rows_cols(const at::Tensor& acc, const at::Tensor& row, const at::Tensor& col,
                           at::ScalarType dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lowbit::scale_rows_cols", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, std::optional<at::ScalarType>)>();
  return op.call(acc, row, col, dtype);
}

// `lowbit.nn.gemm.int_mm` on CPU: a @ b with exact int32 sums; a contraction of K = 1 is padded
// to 2 (PyTorch's CPU kernel returns wrong sums there when N > 1).
at::Tensor int_mm(const at::Tensor& a, const at::Tensor& b) {
  if (a.size(1) != 1) return at::_int_mm(a, b);
  return at::_int_mm(at::constant_pad_nd(a, {0, 1}), at::constant_pad_nd(b.t(), {0, 1}).t());
}

// The forward of an int8 layer: ((qx @ qw.T) * sx) * sw, with qw, sw the weight's rows quantized
// to the integer format of largest value `w_max` by scale rule `w_rule`; plus the bias; rounded to
// `rounding` if given (fp16 emulation's outputs), then to `out_dtype`. The epilogue rounds to
// `out_dtype` itself where nothing follows it (the same bits as rounding its fp32 result), else
// it writes fp32, as `LowbitLinearFunction.forward` does.
at::Tensor int_rows_linear(const at::Tensor& qx, const at::Tensor& sx, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, double w_max, int64_t w_rule,
                           std::optional<at::ScalarType> rounding, at::ScalarType out_dtype) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  at::Tensor sw;
  const at::Tensor qw = quantize_int_rows(weight, w_max, w_rule, sw);
  const at::Tensor acc = int_mm(qx.contiguous(), qw.contiguous().t());
  const bool direct = !bias.has_value() && !rounding.has_value();
  const at::ScalarType gemm_dtype = direct ? out_dtype : at::kFloat;
  at::Tensor out;
  if (gemm_dtype == at::kFloat || gemm_dtype == at::kBFloat16) {
    out = scale_rows_cols(acc, sx, sw, gemm_dtype);
  } else {  // the epilogue writes fp32 or bf16; the PyTorch path rounds its fp32 result so
    out = scale_rows_cols(acc, sx, sw, at::kFloat).to(gemm_dtype);
  }
  if (bias.has_value()) out.add_(*bias);
  if (rounding.has_value()) out = out.to(*rounding);
  return out.to(out_dtype);
}

// `lowbit.nn.gemm.cast_gemm`: a @ b.T of a and b cast to `a_dtype`, `b_dtype`, as a bf16 GEMM with
// a bf16 output when both are bf16 (and `bf16_gemms`: not `exact_accumulation`), else in fp32;
// then cast to `out_dtype`.
at::Tensor cast_gemm(const at::Tensor& a, const at::Tensor& b, at::ScalarType a_dtype,
                     at::ScalarType b_dtype, at::ScalarType out_dtype, bool bf16_gemms) {
  const at::Tensor ca = a.to(a_dtype);
  const at::Tensor cb = b.to(b_dtype);
  const bool bf16 = bf16_gemms && ca.scalar_type() == at::kBFloat16 &&
                    cb.scalar_type() == at::kBFloat16;
  const at::Tensor out =
      bf16 ? ca.mm(cb.t()) : ca.to(at::kFloat).mm(cb.to(at::kFloat).t());
  return out.scalar_type() == out_dtype ? out : out.to(out_dtype);
}

// The backward of a layer whose gradient GEMMs are plain casts: (grad_input, grad_weight,
// grad_bias), each undefined (None) where not asked for. grad_input = grad_out @ w and
// grad_weight = grad_out.T @ x, with the operand dtypes of each GEMM, returned in the input's and
// the weight's dtype; grad_bias = the fp32 sum of grad_out's rows in the weight's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cast_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, bool grad_input,
    bool grad_weight, bool grad_bias, at::ScalarType grad_input_a, at::ScalarType grad_input_b,
    at::ScalarType grad_weight_a, at::ScalarType grad_weight_b, at::ScalarType input_dtype,
    at::ScalarType weight_dtype, bool bf16_gemms) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  at::Tensor grad_x, grad_w, grad_b;
  if (grad_input) {
    grad_x = cast_gemm(grad_out, weight.t(), grad_input_a, grad_input_b, input_dtype, bf16_gemms);
  }
  if (grad_weight) {
    grad_w = cast_gemm(grad_out.t(), x.t(), grad_weight_a, grad_weight_b, weight_dtype, bf16_gemms);
  }
  if (grad_bias) {
    const int64_t rows = 0;
    grad_b = grad_out.to(at::kFloat).sum(at::IntArrayRef(rows)).to(weight_dtype);
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def(
      "int_rows_linear(Tensor qx, Tensor sx, Tensor weight, Tensor? bias, float w_max, int w_rule, "
      "ScalarType? rounding, ScalarType out_dtype) -> Tensor");
  m.def(
      "cast_linear_backward(Tensor grad_out, Tensor x, Tensor weight, bool grad_input, "
      "bool grad_weight, bool grad_bias, ScalarType grad_input_a, ScalarType grad_input_b, "
      "ScalarType grad_weight_a, ScalarType grad_weight_b, ScalarType input_dtype, "
      "ScalarType weight_dtype, bool bf16_gemms) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("int_rows_linear", &int_rows_linear);
  m.impl("cast_linear_backward", &cast_linear_backward);
}
