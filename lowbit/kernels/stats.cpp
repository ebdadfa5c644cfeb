// Statistics of one quantized GEMM operand in one pass (lowbit.diagnostics.stats).
//
// `operand_stats_tensor` compares an operand's high-precision values x with what its quantization
// stands for, d = v * s (carrier value times its scale): the largest finite |x|, sum x^2, the
// saturated, flushed, non-zero and non-finite counts, and the squared error sum(x - d)^2 in all,
// over the saturated and over the flushed elements. In PyTorch ops that is about 25 passes over the
// operand, and the `auto` recipe measures every operand of every layer against every rung of its
// ladder at each check (a check step of the parity study's model, one thread, took 3.0 s against
// 0.16 s for a plain step; 0.9-1.1 s with this kernel, scratch timing). Here it is one pass with
// the same elementwise arithmetic as the PyTorch path: d = v * s rounded to fp32, the saturation
// threshold (`clip_threshold`) times s in fp32 (a zero scale clips nothing: it flushes), x - d,
// (x - d)^2 and x^2 in float64 (in fp32 the squares of finite values above ~1.8e19 overflow and
// those below ~1e-23 flush to zero, which would make a healthy tensor read as non-finite or hide
// its error); counts are exact and the sums are accumulated in float64 (in chunks of a fixed size,
// added in chunk order, so the result does not depend on the thread count), which differs from
// PyTorch's float64 summation order only in the last bits. x and the carrier values are read in
// their own dtypes (fp32, bf16, fp16; int8 values), not converted first (non-contiguous operands
// are copied by the caller).
//
// `subnormal_below` (0: off) is for an x already in its operand's format (fp16-low's fp16
// gradients): the cast then flushes nothing, since what underflowed did so upstream, and the
// nonzero x below the format's smallest normal (its subnormals, what is left of the values
// underflowing) count as flushed. At 0 no value is below it: the counts are those without it.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 16;

struct Partial {
  float amax = 0.0f;
  double signal = 0.0, noise = 0.0, noise_saturated = 0.0, noise_flushed = 0.0;
  int64_t saturated = 0, flushed = 0, nonzero = 0, nonfinite = 0;

  void add(const Partial& p) {
    amax = std::max(amax, p.amax);
    signal += p.signal;
    noise += p.noise;
    noise_saturated += p.noise_saturated;
    noise_flushed += p.noise_flushed;
    saturated += p.saturated;
    flushed += p.flushed;
    nonzero += p.nonzero;
    nonfinite += p.nonfinite;
  }
};

// One chunk, in element order.
template <typename X, typename V>
Partial chunk_stats(const X* xp, const V* vp, const float* sp, int64_t scale_step, float threshold,
                    float subnormal_below, int64_t begin, int64_t end) {
  const float inf = std::numeric_limits<float>::infinity();
  Partial p;
  for (int64_t i = begin; i < end; ++i) {
    const float xv = static_cast<float>(xp[i]);
    const float s = sp[i * scale_step];
    const float d = static_cast<float>(vp[i]) * s;
    const float ax = std::fabs(xv);
    const bool finite = ax < inf;
    // x - d and the squares in float64 (see above), where x^2 is exact
    const double x64 = static_cast<double>(xv);
    const double diff = x64 - static_cast<double>(d);
    const double err2 = diff * diff;
    const double square = x64 * x64;
    const float limit = threshold * s;
    const bool saturated = finite && s > 0.0f && ax > limit;
    const bool nonzero = xv != 0.0f;
    const bool flushed = nonzero && (d == 0.0f || ax < subnormal_below);
    p.signal += square;
    p.noise += err2;
    if (saturated) {
      p.saturated += 1;
      p.noise_saturated += err2;
    }
    if (flushed) {
      p.flushed += 1;
      p.noise_flushed += err2;
    }
    p.nonzero += nonzero;
    p.nonfinite += !finite || !std::isfinite(d);
    if (finite && ax > p.amax) p.amax = ax;
  }
  return p;
}

template <typename X, typename V>
Partial all_stats(const at::Tensor& x, const at::Tensor& values, const at::Tensor& scale,
                  float threshold, float subnormal_below) {
  const int64_t n = x.numel();
  const X* xp = x.const_data_ptr<X>();
  const V* vp = values.const_data_ptr<V>();
  const float* sp = scale.const_data_ptr<float>();
  const int64_t scale_step = scale.numel() == 1 ? 0 : 1;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<Partial> partials(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      partials[static_cast<size_t>(c)] = chunk_stats<X, V>(
          xp, vp, sp, scale_step, threshold, subnormal_below, c * kChunk,
          std::min(n, (c + 1) * kChunk));
    }
  });
  Partial total;
  for (const Partial& p : partials) total.add(p);
  return total;
}

template <typename X>
Partial stats_of(const at::Tensor& x, const at::Tensor& values, const at::Tensor& scale,
                 float threshold, float subnormal_below) {
  switch (values.scalar_type()) {
    case at::kFloat:
      return all_stats<X, float>(x, values, scale, threshold, subnormal_below);
    case at::kBFloat16:
      return all_stats<X, c10::BFloat16>(x, values, scale, threshold, subnormal_below);
    case at::kHalf:
      return all_stats<X, c10::Half>(x, values, scale, threshold, subnormal_below);
    case at::kChar:
      return all_stats<X, int8_t>(x, values, scale, threshold, subnormal_below);
    default:
      TORCH_CHECK(false, "operand_stats: values must be fp32, bf16, fp16 or int8, got ",
                  values.scalar_type());
  }
}

// x: fp32, bf16 or fp16; values: fp32, bf16, fp16 or int8 with x's size; both contiguous. scale:
// fp32, 1 or one per element. Returns the `STATS` vector of lowbit.diagnostics.stats with its
// scale entry 0 (the caller sets the median scale). subnormal_below: see the top of this file.
at::Tensor operand_stats(const at::Tensor& x, const at::Tensor& values, const at::Tensor& scale,
                         double saturation, double subnormal_below) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && values.is_contiguous() &&
                  values.numel() == x.numel(),
              "operand_stats: x and values must be contiguous CPU tensors of one size");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  (scale.numel() == 1 || scale.numel() == x.numel()),
              "operand_stats: scale must be contiguous fp32, one or one per element");
  const float threshold = static_cast<float>(saturation);
  const float below = static_cast<float>(subnormal_below);
  Partial total;
  switch (x.scalar_type()) {
    case at::kFloat:
      total = stats_of<float>(x, values, scale, threshold, below);
      break;
    case at::kBFloat16:
      total = stats_of<c10::BFloat16>(x, values, scale, threshold, below);
      break;
    case at::kHalf:
      total = stats_of<c10::Half>(x, values, scale, threshold, below);
      break;
    default:
      TORCH_CHECK(false, "operand_stats: x must be fp32, bf16 or fp16, got ", x.scalar_type());
  }
  const int64_t n = x.numel();
  const double count = static_cast<double>(std::max<int64_t>(n, 1));
  at::Tensor out = at::empty({10}, x.options().dtype(at::kDouble));
  double* o = out.mutable_data_ptr<double>();
  o[0] = static_cast<double>(total.amax);
  o[1] = std::sqrt(total.signal / count);
  o[2] = static_cast<double>(total.saturated) / count;
  o[3] = static_cast<double>(total.flushed) /
         static_cast<double>(std::max<int64_t>(total.nonzero, 1));
  o[4] = total.signal;
  o[5] = 0.0;
  o[6] = static_cast<double>(total.nonfinite) / count;
  o[7] = total.noise_saturated;
  o[8] = total.noise_flushed;
  o[9] = total.noise;
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def(
      "operand_stats(Tensor x, Tensor values, Tensor scale, float saturation, "
      "float subnormal_below=0.0) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("operand_stats", &operand_stats); }
