// GEMM epilogue of row- and column-scaled operands: out[m, n] = (acc[m, n] * row[m]) * col[n].
//
// An emulated GEMM with per-row scales on both operands (int8 rows, fp8 rowwise) multiplies the
// accumulator by the two scale vectors. In PyTorch that is `acc.float().mul_(row).mul_(col)`:
// three passes over the output (and a slow int32 -> fp32 promotion). This is one pass with the
// same two fp32 roundings in the same order, so the result is bit-identical. The accumulator may
// also be a bf16 GEMM output, and the result may be rounded once more to bf16 (round to nearest
// even, as `.to(torch.bfloat16)` does), which saves the passes of the casts around it.
// `add_scaled_blocks_` sums the scaled partial products of a block-scaled GEMM's K blocks.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

namespace {

// fp32 -> bf16 bits, round to nearest even with NaN -> 0x7FC0: c10::BFloat16's conversion, with a
// select where c10 branches, so that the output loop vectorizes (a 4096 x 128 int32 accumulator to
// bf16: 56 -> 37 us, scratch timing).
[[gnu::always_inline]] inline uint16_t bf16_nearest(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const auto rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  return value != value ? uint16_t{0x7FC0} : rounded;
}

// The row and column scales of an M x N accumulator, checked and converted to fp32 (a step of 0
// repeats a single scale).
struct Scales {
  at::Tensor row, col;
  int64_t row_step, col_step;

  Scales(const at::Tensor& acc, const at::Tensor& r, const at::Tensor& c, const char* op)
      : row(r.to(at::kFloat).contiguous()), col(c.to(at::kFloat).contiguous()) {
    TORCH_CHECK(acc.dim() == 2 && acc.device().is_cpu(), op, " needs a 2-D CPU tensor");
    TORCH_CHECK(acc.stride(1) == 1 || acc.size(1) <= 1, op, " needs unit column stride");
    TORCH_CHECK(row.numel() == 1 || row.numel() == acc.size(0), "row scales: 1 or one per row");
    TORCH_CHECK(col.numel() == 1 || col.numel() == acc.size(1),
                "column scales: 1 or one per column");
    row_step = row.numel() == 1 ? 0 : 1;
    col_step = col.numel() == 1 ? 0 : 1;
  }
};

// out[m, n] = (acc[m, n] * row[m]) * col[n] rounded to O, or with Accumulate
// out[m, n] += (acc[m, n] * row[m]) * col[n] (O = float).
template <typename T, typename O, bool Accumulate>
void epilogue(const at::Tensor& acc, const Scales& scales, at::Tensor& out) {
  const int64_t rows = acc.size(0);
  const int64_t cols = acc.size(1);
  const int64_t stride = acc.stride(0);
  const T* a = acc.const_data_ptr<T>();
  const float* row = scales.row.const_data_ptr<float>();
  const float* col = scales.col.const_data_ptr<float>();
  O* o = out.mutable_data_ptr<O>();
  auto store = [](O& dst, float value) {
    if constexpr (Accumulate) {
      dst += value;
    } else if constexpr (std::is_same_v<O, c10::BFloat16>) {
      dst.x = bf16_nearest(value);
    } else {
      dst = static_cast<O>(value);
    }
  };
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t m = begin; m < end; ++m) {
                       const float r = row[m * scales.row_step];
                       const T* in = a + m * stride;
                       O* dst = o + m * cols;
                       if (scales.col_step == 0) {  // separate loops, so that each vectorizes
                         const float c = col[0];
                         for (int64_t n = 0; n < cols; ++n) {
                           store(dst[n], (static_cast<float>(in[n]) * r) * c);
                         }
                       } else {
                         for (int64_t n = 0; n < cols; ++n) {
                           store(dst[n], (static_cast<float>(in[n]) * r) * col[n]);
                         }
                       }
                     }
                   });
}

template <typename O, bool Accumulate>
void dispatch_accumulator(const at::Tensor& acc, const Scales& scales, at::Tensor& out) {
  switch (acc.scalar_type()) {
    case at::kInt:
      epilogue<int32_t, O, Accumulate>(acc, scales, out);
      break;
    case at::kFloat:
      epilogue<float, O, Accumulate>(acc, scales, out);
      break;
    case at::kBFloat16:
      epilogue<c10::BFloat16, O, Accumulate>(acc, scales, out);
      break;
    default:
      TORCH_CHECK(false, "the GEMM epilogue needs an int32, fp32 or bf16 accumulator");
  }
}

// acc: M x N int32, fp32 or bf16 (unit column stride); row: M or 1 values; col: N or 1 values
// (fp32); out_dtype: fp32 (default) or bf16.
at::Tensor scale_rows_cols(const at::Tensor& acc, const at::Tensor& row, const at::Tensor& col,
                           std::optional<at::ScalarType> out_dtype) {
  const Scales scales(acc, row, col, "scale_rows_cols");
  const at::ScalarType dtype = out_dtype.value_or(at::kFloat);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "scale_rows_cols writes fp32 or bf16");
  at::Tensor out = at::empty({acc.size(0), acc.size(1)}, acc.options().dtype(dtype));
  if (dtype == at::kFloat) {
    dispatch_accumulator<float, false>(acc, scales, out);
  } else {
    dispatch_accumulator<c10::BFloat16, false>(acc, scales, out);
  }
  return out;
}

// out += (acc * row) * col with out fp32 M x N contiguous: the accumulation of one K block's
// scaled partial product in a block-scaled GEMM (`lowbit.nn.gemm._grouped_mm`), in one pass
// instead of materializing every block's product and summing them.
void add_scaled_rows_cols_(at::Tensor out, const at::Tensor& acc, const at::Tensor& row,
                           const at::Tensor& col) {
  const Scales scales(acc, row, col, "add_scaled_rows_cols_");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.sizes() == acc.sizes(),
              "add_scaled_rows_cols_ accumulates into a contiguous fp32 tensor of acc's shape");
  dispatch_accumulator<float, true>(acc, scales, out);
}

// out[m, n] += sum over k of (partials[k, m, n] * row[k, m]) * col[k, n], added in increasing k:
// the same roundings in the same order as one add_scaled_rows_cols_ per K block, for the partial
// products of all K blocks computed by one batched GEMM.
template <typename T>
void add_scaled_blocks(at::Tensor& out, const at::Tensor& partials, const at::Tensor& row,
                       const at::Tensor& col) {
  const int64_t blocks = partials.size(0);
  const int64_t rows = partials.size(1);
  const int64_t cols = partials.size(2);
  const T* p = partials.const_data_ptr<T>();
  const float* r = row.const_data_ptr<float>();
  const float* c = col.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(cols * blocks, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t m = begin; m < end; ++m) {
                       float* dst = o + m * cols;
                       for (int64_t k = 0; k < blocks; ++k) {
                         const T* in = p + (k * rows + m) * cols;
                         const float scale = r[k * rows + m];
                         const float* col_k = c + k * cols;
                         for (int64_t n = 0; n < cols; ++n) {
                           dst[n] += (static_cast<float>(in[n]) * scale) * col_k[n];
                         }
                       }
                     }
                   });
}

// out: M x N fp32 contiguous; partials: K/block x M x N int32, fp32 or bf16; row: K/block x M;
// col: K/block x N (`lowbit.nn.gemm._grouped_mm`).
void add_scaled_blocks_(at::Tensor out, const at::Tensor& partials, const at::Tensor& row,
                        const at::Tensor& col) {
  TORCH_CHECK(partials.dim() == 3 && partials.device().is_cpu(),
              "add_scaled_blocks_ needs K-blocks x M x N CPU partial products");
  const int64_t blocks = partials.size(0);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 &&
                  out.size(0) == partials.size(1) && out.size(1) == partials.size(2),
              "add_scaled_blocks_ accumulates into a contiguous fp32 M x N tensor");
  const at::Tensor p = partials.contiguous();
  const at::Tensor r = row.to(at::kFloat).contiguous();
  const at::Tensor c = col.to(at::kFloat).contiguous();
  TORCH_CHECK(r.numel() == blocks * partials.size(1) && c.numel() == blocks * partials.size(2),
              "add_scaled_blocks_ needs one row scale per (block, row), one column scale per "
              "(block, column)");
  switch (p.scalar_type()) {
    case at::kInt:
      add_scaled_blocks<int32_t>(out, p, r, c);
      break;
    case at::kFloat:
      add_scaled_blocks<float>(out, p, r, c);
      break;
    case at::kBFloat16:
      add_scaled_blocks<c10::BFloat16>(out, p, r, c);
      break;
    default:
      TORCH_CHECK(false, "add_scaled_blocks_ needs int32, fp32 or bf16 partial products");
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("scale_rows_cols(Tensor acc, Tensor row, Tensor col, ScalarType? out_dtype=None) -> Tensor");
  m.def("add_scaled_rows_cols_(Tensor(a!) out, Tensor acc, Tensor row, Tensor col) -> ()");
  m.def("add_scaled_blocks_(Tensor(a!) out, Tensor partials, Tensor row, Tensor col) -> ()");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("scale_rows_cols", &scale_rows_cols);
  m.impl("add_scaled_rows_cols_", &add_scaled_rows_cols_);
  m.impl("add_scaled_blocks_", &add_scaled_blocks_);
}
