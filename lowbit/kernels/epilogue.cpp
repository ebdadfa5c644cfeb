// GEMM epilogue of row- and column-scaled operands: out[m, n] = (acc[m, n] * row[m]) * col[n].
//
// An emulated GEMM with per-row scales on both operands (int8 rows, fp8 rowwise) multiplies the
// accumulator by the two scale vectors. In PyTorch that is `acc.float().mul_(row).mul_(col)`:
// three passes over the output (and a slow int32 -> fp32 promotion). This is one pass with the
// same two fp32 roundings in the same order, so the result is bit-identical.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>

namespace {

template <typename T>
void scale_rows_cols_impl(const at::Tensor& acc, const float* row, int64_t row_step,
                          const float* col, int64_t col_step, at::Tensor& out) {
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
                       if (col_step == 0) {  // separate loops, so that each one vectorizes
                         const float c = col[0];
                         for (int64_t n = 0; n < cols; ++n) {
                           dst[n] = (static_cast<float>(in[n]) * r) * c;
                         }
                       } else {
                         for (int64_t n = 0; n < cols; ++n) {
                           dst[n] = (static_cast<float>(in[n]) * r) * col[n];
                         }
                       }
                     }
                   });
}

// acc: M x N int32 or fp32 (unit column stride); row: M or 1 values; col: N or 1 values (fp32).
at::Tensor scale_rows_cols(const at::Tensor& acc, const at::Tensor& row, const at::Tensor& col) {
  TORCH_CHECK(acc.dim() == 2 && acc.device().is_cpu(), "scale_rows_cols needs a 2-D CPU tensor");
  TORCH_CHECK(acc.stride(1) == 1 || acc.size(1) <= 1, "scale_rows_cols needs unit column stride");
  const at::Tensor r = row.to(at::kFloat).contiguous();
  const at::Tensor c = col.to(at::kFloat).contiguous();
  TORCH_CHECK(r.numel() == 1 || r.numel() == acc.size(0), "row scales: 1 or one per row");
  TORCH_CHECK(c.numel() == 1 || c.numel() == acc.size(1), "column scales: 1 or one per column");
  at::Tensor out = at::empty({acc.size(0), acc.size(1)}, acc.options().dtype(at::kFloat));
  const int64_t row_step = r.numel() == 1 ? 0 : 1;
  const int64_t col_step = c.numel() == 1 ? 0 : 1;
  if (acc.scalar_type() == at::kInt) {
    scale_rows_cols_impl<int32_t>(acc, r.const_data_ptr<float>(), row_step,
                                  c.const_data_ptr<float>(), col_step, out);
  } else {
    TORCH_CHECK(acc.scalar_type() == at::kFloat, "scale_rows_cols needs int32 or fp32");
    scale_rows_cols_impl<float>(acc, r.const_data_ptr<float>(), row_step,
                                c.const_data_ptr<float>(), col_step, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("scale_rows_cols(Tensor acc, Tensor row, Tensor col) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("scale_rows_cols", &scale_rows_cols); }
