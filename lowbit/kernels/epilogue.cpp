// GEMM epilogue of row- and column-scaled operands: out[m, n] = (acc[m, n] * row[m]) * col[n].
//
// An emulated GEMM with per-row scales on both operands (int8 rows, fp8 rowwise) multiplies the
// accumulator by the two scale vectors. In PyTorch that is `acc.float().mul_(row).mul_(col)`:
// three passes over the output (and a slow int32 -> fp32 promotion). This is one pass with the
// same two fp32 roundings in the same order, so the result is bit-identical. The accumulator may
// also be a bf16 GEMM output, and the result may be rounded once more to bf16 (round to nearest
// even, as `.to(torch.bfloat16)` does), which saves the passes of the casts around it.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace {

template <typename T, typename O>
void scale_rows_cols_impl(const at::Tensor& acc, const float* row, int64_t row_step,
                          const float* col, int64_t col_step, at::Tensor& out) {
  const int64_t rows = acc.size(0);
  const int64_t cols = acc.size(1);
  const int64_t stride = acc.stride(0);
  const T* a = acc.const_data_ptr<T>();
  O* o = out.mutable_data_ptr<O>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t m = begin; m < end; ++m) {
                       const float r = row[m * row_step];
                       const T* in = a + m * stride;
                       O* dst = o + m * cols;
                       if (col_step == 0) {  // separate loops, so that each one vectorizes
                         const float c = col[0];
                         for (int64_t n = 0; n < cols; ++n) {
                           dst[n] = static_cast<O>((static_cast<float>(in[n]) * r) * c);
                         }
                       } else {
                         for (int64_t n = 0; n < cols; ++n) {
                           dst[n] = static_cast<O>((static_cast<float>(in[n]) * r) * col[n]);
                         }
                       }
                     }
                   });
}

template <typename O>
void dispatch_accumulator(const at::Tensor& acc, const float* row, int64_t row_step,
                          const float* col, int64_t col_step, at::Tensor& out) {
  switch (acc.scalar_type()) {
    case at::kInt:
      scale_rows_cols_impl<int32_t, O>(acc, row, row_step, col, col_step, out);
      break;
    case at::kFloat:
      scale_rows_cols_impl<float, O>(acc, row, row_step, col, col_step, out);
      break;
    case at::kBFloat16:
      scale_rows_cols_impl<c10::BFloat16, O>(acc, row, row_step, col, col_step, out);
      break;
    default:
      TORCH_CHECK(false, "scale_rows_cols needs an int32, fp32 or bf16 accumulator");
  }
}

// acc: M x N int32, fp32 or bf16 (unit column stride); row: M or 1 values; col: N or 1 values
// (fp32); out_dtype: fp32 (default) or bf16.
at::Tensor scale_rows_cols(const at::Tensor& acc, const at::Tensor& row, const at::Tensor& col,
                           std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(acc.dim() == 2 && acc.device().is_cpu(), "scale_rows_cols needs a 2-D CPU tensor");
  TORCH_CHECK(acc.stride(1) == 1 || acc.size(1) <= 1, "scale_rows_cols needs unit column stride");
  const at::Tensor r = row.to(at::kFloat).contiguous();
  const at::Tensor c = col.to(at::kFloat).contiguous();
  TORCH_CHECK(r.numel() == 1 || r.numel() == acc.size(0), "row scales: 1 or one per row");
  TORCH_CHECK(c.numel() == 1 || c.numel() == acc.size(1), "column scales: 1 or one per column");
  const at::ScalarType dtype = out_dtype.value_or(at::kFloat);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "scale_rows_cols writes fp32 or bf16");
  at::Tensor out = at::empty({acc.size(0), acc.size(1)}, acc.options().dtype(dtype));
  const int64_t row_step = r.numel() == 1 ? 0 : 1;
  const int64_t col_step = c.numel() == 1 ? 0 : 1;
  if (dtype == at::kFloat) {
    dispatch_accumulator<float>(acc, r.const_data_ptr<float>(), row_step,
                                c.const_data_ptr<float>(), col_step, out);
  } else {
    dispatch_accumulator<c10::BFloat16>(acc, r.const_data_ptr<float>(), row_step,
                                        c.const_data_ptr<float>(), col_step, out);
  }
  return out;
}

// out[m, n] += (acc[m, n] * row[m]) * col[n], out fp32 M x N contiguous: the accumulation of one
// K block's scaled partial product in a block-scaled GEMM (`lowbit.nn.gemm._grouped_mm`), in one
// pass instead of materializing every block's product and summing them.
template <typename T>
void add_scaled_impl(at::Tensor& out, const at::Tensor& acc, const float* row, int64_t row_step,
                     const float* col, int64_t col_step) {
  const int64_t rows = acc.size(0);
  const int64_t cols = acc.size(1);
  const int64_t stride = acc.stride(0);
  const T* a = acc.const_data_ptr<T>();
  float* o = out.mutable_data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t m = begin; m < end; ++m) {
                       const float r = row[m * row_step];
                       const T* in = a + m * stride;
                       float* dst = o + m * cols;
                       if (col_step == 0) {
                         const float c = col[0];
                         for (int64_t n = 0; n < cols; ++n) {
                           dst[n] += (static_cast<float>(in[n]) * r) * c;
                         }
                       } else {
                         for (int64_t n = 0; n < cols; ++n) {
                           dst[n] += (static_cast<float>(in[n]) * r) * col[n];
                         }
                       }
                     }
                   });
}

void add_scaled_rows_cols_(at::Tensor out, const at::Tensor& acc, const at::Tensor& row,
                           const at::Tensor& col) {
  TORCH_CHECK(acc.dim() == 2 && acc.device().is_cpu(), "add_scaled_rows_cols_ needs 2-D CPU input");
  TORCH_CHECK(acc.stride(1) == 1 || acc.size(1) <= 1, "add_scaled_rows_cols_ needs unit column stride");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.sizes() == acc.sizes(),
              "add_scaled_rows_cols_ accumulates into a contiguous fp32 tensor of acc's shape");
  const at::Tensor r = row.to(at::kFloat).contiguous();
  const at::Tensor c = col.to(at::kFloat).contiguous();
  TORCH_CHECK(r.numel() == 1 || r.numel() == acc.size(0), "row scales: 1 or one per row");
  TORCH_CHECK(c.numel() == 1 || c.numel() == acc.size(1), "column scales: 1 or one per column");
  const int64_t row_step = r.numel() == 1 ? 0 : 1;
  const int64_t col_step = c.numel() == 1 ? 0 : 1;
  switch (acc.scalar_type()) {
    case at::kFloat:
      add_scaled_impl<float>(out, acc, r.const_data_ptr<float>(), row_step,
                             c.const_data_ptr<float>(), col_step);
      break;
    case at::kBFloat16:
      add_scaled_impl<c10::BFloat16>(out, acc, r.const_data_ptr<float>(), row_step,
                                     c.const_data_ptr<float>(), col_step);
      break;
    default:
      TORCH_CHECK(false, "add_scaled_rows_cols_ needs an fp32 or bf16 partial product");
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("scale_rows_cols(Tensor acc, Tensor row, Tensor col, ScalarType? out_dtype=None) -> Tensor");
  m.def("add_scaled_rows_cols_(Tensor(a!) out, Tensor acc, Tensor row, Tensor col) -> ()");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("scale_rows_cols", &scale_rows_cols);
  m.impl("add_scaled_rows_cols_", &add_scaled_rows_cols_);
}
