// Fused CPU quantization: block amax, scale and rounding onto a format's grid in one pass.
//
// `lowbit.formats.quantize` spends most of its time in a dozen elementwise PyTorch passes per
// operand (amax, divide, clamp, exponent field, magic add/subtract, copysign, carrier conversion).
// This kernel does the same arithmetic, in the same order and in fp32, per block while the block
// is in cache: one read of the input and one write of the carrier values (two reads for scales
// that need the whole tensor's amax first). Every result is bit-identical to the PyTorch path
// (tests/kernels compare them bit for bit); the math is documented there:
//   lowbit/formats/cast.py     _nearest_on_grid (magic-number round-to-nearest-even), pow2, binade
//   lowbit/formats/scaling.py  scale_from_amax (amax / pow2 / mx_floor / mx_ceil), nvfp4_scales
//
// Inputs are the axis-last matrix (rows x cols, any strides) in fp32, bf16 or fp16; every element
// is widened to fp32 first, exactly as `x.float()` does. A random Hadamard transform of the rows
// (struct Hadamard; `lowbit/formats/hadamard.py` transform) can be applied to each block first,
// in cache, so that the transformed operand is never written out.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

enum Kind : int64_t { kFloatGrid = 0, kInt = 1 };
enum Rule : int64_t { kAmax = 0, kPow2 = 1, kMxFloor = 2, kMxCeil = 3, kNvfp4 = 4 };

constexpr uint32_t kExponentMask = 0x7F800000u;
constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
constexpr uint32_t kHalfMantissa = 0x00400000u;
constexpr int32_t kBias = 127;
constexpr int32_t kMantissaBits = 23;
constexpr float kFp4Max = 6.0f;
constexpr float kE4m3Max = 448.0f;

[[gnu::always_inline]] inline uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

[[gnu::always_inline]] inline float float_of(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

[[gnu::always_inline]] inline float widen(float x) { return x; }
[[gnu::always_inline]] inline float widen(c10::BFloat16 x) { return static_cast<float>(x); }
[[gnu::always_inline]] inline float widen(c10::Half x) { return static_cast<float>(x); }

// floor(log2|x|) from the exponent field (-127 for zero and subnormals), as `binade`.
[[gnu::always_inline]] inline int32_t binade(float x) {
  return static_cast<int32_t>((bits_of(x) >> kMantissaBits) & 0xFF) - kBias;
}

// Exact 2**e for e in [-127, 127] (2**-127 an fp32 subnormal) as the product of two normal powers
// of two, as `pow2`.
[[gnu::always_inline]] inline float pow2(int32_t e) {
  const int32_t high = std::max(e, -126) + kBias;
  const int32_t low = std::min(std::max(e + 126, -126), 0) + kBias;
  return float_of(static_cast<uint32_t>(high) << kMantissaBits) *
         float_of(static_cast<uint32_t>(low) << kMantissaBits);
}

// floor(r) for |r| < 2**22 (and NaN): round to nearest on the fp32 adder, minus one where that
// rounded up. Equal to std::floor there except floor(-0.0) = +0.0, which no caller can tell apart
// (it is only ever added to +0.0 or 1.0); unlike std::floor it vectorizes.
[[gnu::always_inline]] inline float floor_small(float r) {
  constexpr float magic = 12582912.0f;  // 1.5 * 2**23: ulp 1
  const float t = (r + magic) - magic;
  return t > r ? t - 1.0f : t;
}

// clamp(x, -max, max) with NaN passing through, as torch.clamp: std::max(x, -max) is
// x < -max ? -max : x, which keeps a NaN x, and so does std::min(., max). They compile to vmaxps
// and vminps, where the nested conditional took six instructions (compares, blends, mask logic):
// with round_int's vrndscaleps, 4096 x 128 fp32 rows took 200 -> 148 us to int8 and 219 -> 194 us
// to e4m3 (one thread, scratch timing): these loops are bound by their instruction count.
[[gnu::always_inline]] inline float clamp_nan(float x, float max) {
  return std::min(std::max(x, -max), max);
}

// The grid a float format's values lie on (see `_nearest_on_grid`).
struct Grid {
  float max;
  int32_t lowest;   // exponent field of the smallest normal binade, in fp32 bit position
  int32_t highest;  // exponent field of the largest binade
  int32_t offset;   // magic number = exponent field + offset: 1.5 * 2**(23 - mbits) * quantum

  Grid(int64_t mbits, int64_t emin, int64_t emax, double max_value)
      : max(static_cast<float>(max_value)),
        lowest(static_cast<int32_t>((emin + kBias) << kMantissaBits)),
        highest(static_cast<int32_t>((emax + kBias) << kMantissaBits)),
        offset(static_cast<int32_t>(((kMantissaBits - mbits) << kMantissaBits) + kHalfMantissa)),
        emin(static_cast<int32_t>(emin)),
        mbits(static_cast<int32_t>(mbits)) {}

  int32_t emin;
  int32_t mbits;

  // Round-to-nearest-even onto the grid, saturating at +-max; NaN stays NaN.
  [[gnu::always_inline]] inline float round(float x) const {
    const float y = clamp_nan(x, max);
    int32_t field = static_cast<int32_t>(bits_of(y) & kExponentMask);
    field = std::min(std::max(field, lowest), highest);
    const float magic = float_of(static_cast<uint32_t>(field + offset));
    const float out = (y + magic) - magic;
    return std::copysign(out, y);
  }

  // Stochastic rounding with the uniform draw u in [0, 1) (`_cast_float_generic`): the quantum q
  // of the clamped value's binade, then floor(y / q) + [u < frac], times q, with y's sign (a
  // negative value rounded to zero is -0.0, as `_round` gives).
  // The powers of two are built from their exponent fields directly: e - mbits and mbits - e are
  // normal exponents for every finite y (|y| <= max, binade at least emin); for NaN (binade 128)
  // they are garbage that NaN times anything ignores.
  [[gnu::always_inline]] inline float round_stochastic(float x, float u) const {
    const float y = clamp_nan(x, max);
    const int32_t e = std::max(binade(y), emin);
    const float r = y * float_of(static_cast<uint32_t>(kBias + mbits - e) << kMantissaBits);
    const float low = floor_small(r);
    const float quantum = float_of(static_cast<uint32_t>(kBias + e - mbits) << kMantissaBits);
    return std::copysign((low + (u < r - low ? 1.0f : 0.0f)) * quantum, y);
  }
};

// fp32 -> bf16 bits of a value bf16 holds exactly (NaN -> 0x7FC0, as c10::BFloat16).
[[gnu::always_inline]] inline uint16_t bf16_bits_exact(float x) {
  return std::isnan(x) ? uint16_t{0x7FC0} : static_cast<uint16_t>(bits_of(x) >> 16);
}

// fp32 -> bf16 bits, round to nearest even (c10::BFloat16's conversion).
[[gnu::always_inline]] inline uint16_t bf16_bits_nearest(float x) {
  if (std::isnan(x)) return uint16_t{0x7FC0};
  const uint32_t b = bits_of(x);
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

[[gnu::always_inline]] inline float bf16_value(uint16_t b) { return float_of(static_cast<uint32_t>(b) << 16); }

// Symmetric integer rounding: clamp to +-qmax, round half to even (std::nearbyint in the default
// rounding mode: one vrndscaleps, the same integer as the fp32 adder's 1.5 * 2**23 trick that took
// two additions); NaN gives 0. The NaN case is a select, not an early return: with the branch GCC
// vectorized the loop around it half as well (4096 x 128 fp32 rows: 389 -> 192 us, scratch timing).
[[gnu::always_inline]] inline int8_t round_int(float y, float qmax) {
  const float r = std::nearbyint(clamp_nan(y, qmax));
  return static_cast<int8_t>(static_cast<int32_t>(y == y ? r : 0.0f));
}

// Stochastic integer rounding (`_cast_int`): floor(y) + [u < frac] after clamping to +-qmax.
[[gnu::always_inline]] inline int8_t round_int_stochastic(float y, float qmax, float u) {
  const float r = clamp_nan(y, qmax);
  const float low = floor_small(r);
  const float rounded = low + (u < r - low ? 1.0f : 0.0f);
  return static_cast<int8_t>(static_cast<int32_t>(y == y ? rounded : 0.0f));
}

// The dequantization scale of a block with largest magnitude `amax` (`scale_from_amax`). Written
// without branches (every rule's candidate is computed, the rule selects), so that a loop over a
// row's blocks vectorizes.
[[gnu::always_inline]] inline float scale_from_amax(float amax, float fmt_max, int32_t emax_elem,
                                                    int64_t rule) {
  const bool positive = amax > 0.0f;
  const float ratio = amax / fmt_max;
  // kAmax: amax / max, at least the smallest normal; 1 for a zero (or NaN) amax
  const float by_amax = positive ? std::max(ratio, std::numeric_limits<float>::min()) : 1.0f;
  // kMxFloor: 2**(floor(log2 amax) - emax of the element format)
  const int32_t floor_exponent = binade(amax) - emax_elem;
  // kPow2, kMxCeil: the smallest power of two with amax / s <= max (2**0 for a zero amax), at
  // least 2**-127: binade reads a subnormal ratio as -127
  const int32_t guess = binade(ratio);
  const int32_t ceil_exponent = positive ? guess + (ratio > pow2(std::min(guess, 127)) ? 1 : 0) : 0;
  const int32_t exponent = rule == kMxFloor ? floor_exponent : ceil_exponent;
  // 2**[-127, 127], e8m0's range, which kPow2 keeps too: only kMxFloor's exponent falls below it
  const float scale = rule == kAmax ? by_amax : pow2(std::min(std::max(exponent, -127), 127));
  // inf and NaN amaxes pass through as fp32 scales; e8m0 (MX) holds no inf, so there both are NaN
  const bool e8m0 = rule == kMxFloor || rule == kMxCeil;
  const float non_finite = e8m0 ? std::numeric_limits<float>::quiet_NaN() : amax;
  return std::isfinite(amax) ? scale : non_finite;
}

// max |x| over n elements; NaN if any element is NaN. On the sign-cleared bit patterns integer
// order is float order, and every NaN pattern is above inf's.
template <typename T, typename N>
inline float block_amax(const T* __restrict__ x, N n) {
  uint32_t top = 0;
  for (int64_t i = 0; i < n; ++i) {
    top = std::max(top, bits_of(widen(x[i])) & kAbsMask);
  }
  return float_of(top);
}

// max |x| over a rows x cols matrix with strides (row_stride, col_stride): the loop runs along
// whichever stride is 1, so a transposed view is read in memory order.
template <typename T>
float tensor_amax(const T* x, int64_t rows, int64_t cols, int64_t row_stride,
                  int64_t col_stride) {
  if (col_stride != 1 && row_stride == 1) {
    std::swap(rows, cols);
    std::swap(row_stride, col_stride);
  }
  return at::parallel_reduce(
      0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(cols, 1)), 0.0f,
      [&](int64_t begin, int64_t end, float acc) {
        uint32_t top = bits_of(acc);
        for (int64_t r = begin; r < end; ++r) {
          const T* row = x + r * row_stride;
          if (col_stride == 1) {
            top = std::max(top, bits_of(block_amax(row, cols)));
          } else {
            for (int64_t c = 0; c < cols; ++c) {
              top = std::max(top, bits_of(widen(row[c * col_stride])) & kAbsMask);
            }
          }
        }
        return float_of(top);
      },
      [](float a, float b) { return float_of(std::max(bits_of(a), bits_of(b))); });
}

constexpr int64_t kTile = 16;  // rows of a strided matrix gathered together (64 B of fp32)

// dst[t * cols + c] = src[t * row_stride + c * col_stride] for t < n: a blocked transpose, in
// kTile x kTile blocks whose source cache lines stay in L1 while they are read row by row.
template <typename T>
void gather_rows(const T* __restrict__ src, int64_t n, int64_t cols, int64_t row_stride,
                 int64_t col_stride, T* __restrict__ dst) {
  for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
    const int64_t cn = std::min(kTile, cols - c0);
    for (int64_t t = 0; t < n; ++t) {
      const T* s = src + t * row_stride + c0 * col_stride;
      T* d = dst + t * cols + c0;
      for (int64_t c = 0; c < cn; ++c) d[c] = s[c * col_stride];
    }
  }
}

// Calls fn(r, row) for every row r of `x` in parallel, `row` pointing at its `cols` contiguous
// elements: the tensor's own memory when columns are contiguous, else a small buffer into which
// tiles of kTile rows are gathered while they are in cache, so a transposed view costs no extra
// pass over memory.
template <typename T, typename Fn>
void for_each_row(const at::Tensor& x, Fn&& fn) {
  const int64_t rows = x.size(0);
  const int64_t cols = x.size(1);
  const int64_t row_stride = x.stride(0);
  const int64_t col_stride = x.stride(1);
  const T* data = x.const_data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
  if (col_stride == 1 || cols <= 1) {
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) fn(r, data + r * row_stride);
    });
    return;
  }
  const int64_t tiles = (rows + kTile - 1) / kTile;
  at::parallel_for(0, tiles, std::max<int64_t>(1, grain / kTile), [&](int64_t begin, int64_t end) {
    std::vector<T> buffer(kTile * cols);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t r0 = tile * kTile;
      const int64_t n = std::min(kTile, rows - r0);
      gather_rows(data + r0 * row_stride, n, cols, row_stride, col_stride, buffer.data());
      for (int64_t t = 0; t < n; ++t) fn(r0 + t, buffer.data() + t * cols);
    }
  });
}

// A random Hadamard transform applied to every block of `n` elements along the rows before they
// are quantized (`lowbit.formats.hadamard.transform`, which documents the order that this code
// follows bit for bit): multiply by the signs, butterfly stages h = 1, 2, ..., n/2, multiply by
// fp32(1 / sqrt(n)). Off when n == 0. Rows are zero-padded to whole blocks of n.
struct Hadamard {
  int64_t n;
  const float* signs;  // n signs, repeated to at least 8 (a whole vector for blocks below 8)
  float norm;          // fp32(1 / sqrt(n))
};

// Eight floats as one vector (GCC/Clang vector extension: one AVX register, two SSE ones), so
// that the butterflies below compile to vector adds whatever the compiler's loop vectorizer does.
typedef float Vec8 __attribute__((vector_size(32)));

typedef uint16_t Bits16x8 __attribute__((vector_size(16)));
typedef uint32_t Bits32x8 __attribute__((vector_size(32)));

// Eight elements widened to fp32 (m < 8: the first m, zeros after; m >= 8: eight). Whole vectors
// are loaded as vectors: eight scalar stores read back as one vector would stall store forwarding.
template <typename T>
[[gnu::always_inline]] inline Vec8 load8(const T* p, int64_t m) {
  m = std::min<int64_t>(m, 8);
  Vec8 out;
  if constexpr (std::is_same_v<T, float>) {
    if (m == 8) {
      std::memcpy(&out, p, sizeof out);
      return out;
    }
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (m == 8) {  // bf16 -> fp32 is the bits moved to the top half, as widen() does
      Bits16x8 bits;
      std::memcpy(&bits, p, sizeof bits);
      const Bits32x8 wide = __builtin_convertvector(bits, Bits32x8) << 16;
      std::memcpy(&out, &wide, sizeof out);
      return out;
    }
  }
  float v[8] = {};
  for (int64_t k = 0; k < m; ++k) v[k] = widen(p[k]);
  std::memcpy(&out, v, sizeof out);
  return out;
}

[[gnu::always_inline]] inline void store8(float* p, Vec8 x, int64_t m) {
  if (m == 8) {
    std::memcpy(p, &x, sizeof x);
  } else {
    for (int64_t k = 0; k < m; ++k) p[k] = x[k];
  }
}

// out[t] = levels(in[t] * sign[t]) * norm for the 2**L lines t, len elements each: butterfly level
// l pairs line t with t + 2**l (bit l of t clear): (a, b) -> (a + b, a - b). For lines j, j + h,
// j + 2h, ... of a block, levels 0, 1, 2 are the stages h, 2h, 4h: up to three stages per pass over
// memory, every addition as the stage-by-stage order has it. A pass that is not the first has
// signs of one, one that is not the last a norm of one (multiplying by one is exact).
template <int L, typename T>
void butterfly_pass(const T* const (&in)[1 << L], const float (&sign)[1 << L],
                    float* const (&out)[1 << L], float norm, int64_t len) {
  constexpr int kLines = 1 << L;
  for (int64_t i = 0; i < len; i += 8) {
    const int64_t m = std::min<int64_t>(8, len - i);
    Vec8 v[kLines];
#pragma GCC unroll 8
    for (int t = 0; t < kLines; ++t) v[t] = load8(in[t] + i, m) * sign[t];
#pragma GCC unroll 3
    for (int l = 0; l < L; ++l) {
#pragma GCC unroll 8
      for (int t = 0; t < kLines; ++t) {
        if (t & (1 << l)) continue;
        const Vec8 a = v[t], b = v[t + (1 << l)];
        v[t] = a + b;
        v[t + (1 << l)] = a - b;
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < kLines; ++t) store8(out[t] + i, v[t] * norm, m);
  }
}

// All stages of an n-line Hadamard block: line j of the input at line(j) (nullptr: a zero line
// of padding), times sign[j]; the result, times `norm`, in out + j * stride; len elements a line.
// Stages go three at a time (then two, then one) over every group of their lines.
template <typename T, typename LineFn>
void butterfly_block(LineFn line, const float* sign, float norm, int64_t n, float* out,
                     int64_t stride, int64_t len, const T* zeros) {
  if (n == 1) {  // no stage: the sign and the norm alone
    const T* p = line(0);
    for (int64_t i = 0; i < len; ++i) out[i] = (p ? widen(p[i]) * sign[0] : 0.0f) * norm;
    return;
  }
  bool first = true;
  for (int64_t h = 1; h < n;) {
    const int64_t left = n / h;  // 2**(stages left)
    const int levels = left >= 8 ? 3 : (left >= 4 ? 2 : 1);
    const int64_t span = h << levels;
    const float pass_norm = span == n ? norm : 1.0f;
    auto pass = [&](auto level_count) {
      constexpr int L = decltype(level_count)::value;
      for (int64_t base = 0; base < n; base += span) {
        for (int64_t j = base; j < base + h; ++j) {
          const T* in_first[1 << L];
          const float* in_later[1 << L];
          float in_sign[1 << L];
          float* out_lines[1 << L];
          for (int t = 0; t < (1 << L); ++t) {
            const int64_t at = j + t * h;
            out_lines[t] = out + at * stride;
            const T* p = first ? line(at) : nullptr;
            in_first[t] = p ? p : zeros;
            in_later[t] = out_lines[t];
            in_sign[t] = first ? sign[at] : 1.0f;
          }
          if (first) {
            butterfly_pass<L, T>(in_first, in_sign, out_lines, pass_norm, len);
          } else {
            butterfly_pass<L, float>(in_later, in_sign, out_lines, pass_norm, len);
          }
        }
      }
    };
    if (levels == 3) {
      pass(std::integral_constant<int, 3>{});
    } else if (levels == 2) {
      pass(std::integral_constant<int, 2>{});
    } else {
      pass(std::integral_constant<int, 1>{});
    }
    first = false;
    h = span;
  }
}

// Stage H (1, 2 or 4) inside eight lanes: lane j pairs with j ^ H; y = x * (+1 or -1) + partner
// gives a + b in the lane with bit H clear and b's partner minus b, a - b, in the other (x * -1 + p
// is p - x exactly: negation is exact and an addition of a negated operand rounds as the
// subtraction does).
template <int H>
[[gnu::always_inline]] inline Vec8 butterfly_lanes(Vec8 x) {
  constexpr float s0 = (0 & H) ? -1.0f : 1.0f, s1 = (1 & H) ? -1.0f : 1.0f;
  constexpr float s2 = (2 & H) ? -1.0f : 1.0f, s3 = (3 & H) ? -1.0f : 1.0f;
  constexpr float s4 = (4 & H) ? -1.0f : 1.0f, s5 = (5 & H) ? -1.0f : 1.0f;
  constexpr float s6 = (6 & H) ? -1.0f : 1.0f, s7 = (7 & H) ? -1.0f : 1.0f;
  const Vec8 sign = {s0, s1, s2, s3, s4, s5, s6, s7};
  const Vec8 partner =
      __builtin_shufflevector(x, x, 0 ^ H, 1 ^ H, 2 ^ H, 3 ^ H, 4 ^ H, 5 ^ H, 6 ^ H, 7 ^ H);
  return x * sign + partner;
}

constexpr int64_t kRowChunk = 64;  // floats of a row transformed in registers (eight vectors)

// One row of `cols` elements transformed into `out` (`padded` floats; rounded up to kRowChunk they
// are written, the tail past `padded` zeros that blocks below kRowChunk keep apart). The stages
// below 64 run on eight vectors in registers: 1, 2, 4 inside each vector, 8, 16, 32 across them
// (levels 0, 1, 2 of vectors t and t + 2**l); larger blocks go on across 64-float segments.
template <typename T>
void hadamard_row(const T* __restrict__ row, int64_t cols, int64_t padded, const Hadamard& h,
                  float* __restrict__ out) {
  const int64_t len = (padded + kRowChunk - 1) / kRowChunk * kRowChunk;
  const float norm = h.n > kRowChunk ? 1.0f : h.norm;  // else applied by the stages below
  for (int64_t c0 = 0; c0 < len; c0 += kRowChunk) {
    Vec8 v[8];
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) {
      const int64_t c = c0 + 8 * t;
      Vec8 signs;
      std::memcpy(&signs, h.signs + (c & (std::max<int64_t>(h.n, 8) - 1)), sizeof signs);
      v[t] = load8(row + std::min(c, cols), std::max<int64_t>(0, cols - c)) * signs;
      if (h.n > 1) v[t] = butterfly_lanes<1>(v[t]);
      if (h.n > 2) v[t] = butterfly_lanes<2>(v[t]);
      if (h.n > 4) v[t] = butterfly_lanes<4>(v[t]);
    }
#pragma GCC unroll 3
    for (int l = 0; l < 3; ++l) {
      if ((8 << l) >= h.n) break;
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) {
        if (t & (1 << l)) continue;
        const Vec8 a = v[t], b = v[t + (1 << l)];
        v[t] = a + b;
        v[t + (1 << l)] = a - b;
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) store8(out + c0 + 8 * t, v[t] * norm, 8);
  }
  if (h.n <= kRowChunk) return;
  // Stages 64 and up: the block's 64-float segments are its lines.
  static thread_local std::vector<float> ones;
  ones.assign(h.n / kRowChunk, 1.0f);
  for (int64_t start = 0; start < padded; start += h.n) {
    float* block = out + start;
    butterfly_block<float>([&](int64_t j) -> const float* { return block + kRowChunk * j; },
                           ones.data(), h.norm, h.n / kRowChunk, block, kRowChunk, kRowChunk,
                           static_cast<const float*>(nullptr));
  }
}

// Lines c0 .. c0 + n - 1 of a transposed operand (line c: `rows` elements at src + c * rows),
// elements r0 .. r0 + count - 1 of each, transformed into `out` (line j at out + j * stride);
// lines at or past `cols` are the zero padding.
template <typename T>
void hadamard_lines(const T* __restrict__ src, int64_t rows, int64_t cols, int64_t c0,
                    int64_t r0, int64_t count, const Hadamard& h, float* __restrict__ out,
                    int64_t stride) {
  static thread_local std::vector<T> zeros;
  if (static_cast<int64_t>(zeros.size()) < count) zeros.assign(count, T(0.0f));
  butterfly_block<T>(
      [&](int64_t j) -> const T* { return c0 + j < cols ? src + (c0 + j) * rows + r0 : nullptr; },
      h.signs, h.norm, h.n, out, stride, count, zeros.data());
}

struct Params {
  int64_t kind;
  Grid grid;
  float fmt_max;
  int32_t emax_elem;
  int64_t rule;
};

// Stochastic rounding's uniform draws, computed where they are used: draw i (the row-major index
// in the rows x padded-cols matrix) is half of SplitMix64's output function of
// seed + (i / 2 + 1) * golden, its top 24 bits for even i and the 24 below them for odd i, over
// 2**24 -- the same values as `lowbit.formats.counter_rng.uniforms` (its docstring says why a
// counter-based generator, and why two draws per hash). `on` false: round to nearest even.
struct Noise {
  bool on;
  uint64_t seed;
  int64_t stride;  // indices per row (the padded column count)

  [[gnu::always_inline]] inline uint64_t hash(uint64_t k) const {
    uint64_t z = seed + (k + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  [[gnu::always_inline]] static inline float high(uint64_t z) {
    return static_cast<float>(static_cast<int32_t>(z >> 40)) * 0x1p-24f;
  }
  [[gnu::always_inline]] static inline float low(uint64_t z) {
    return static_cast<float>(static_cast<int32_t>((z >> 16) & 0xFFFFFFu)) * 0x1p-24f;
  }

  // u[i] = draw first + i for i < n: one hash per pair of draws (separate loops, which vectorize).
  inline void fill(uint64_t first, int64_t n, float* __restrict__ u) const {
    if (n <= 0) return;
    int64_t i = 0;
    if (first & 1) u[i++] = low(hash(first >> 1));
    const uint64_t k0 = (first + i) >> 1;
    const int64_t pairs = (n - i) / 2;
    for (int64_t m = 0; m < pairs; ++m) {
      const uint64_t z = hash(k0 + m);
      u[i + 2 * m] = high(z);
      u[i + 2 * m + 1] = low(z);
    }
    if (i + 2 * pairs < n) u[n - 1] = high(hash(k0 + pairs));
  }

  // u[i] = draw first + i * step for i < n.
  inline void fill_strided(uint64_t first, int64_t n, uint64_t step, float* __restrict__ u) const {
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t index = first + static_cast<uint64_t>(i) * step;
      const uint64_t z = hash(index >> 1);
      u[i] = (index & 1) ? low(z) : high(z);
    }
  }

  // Two neighbouring columns of a transposed operand: even[i] = draw first + i * step and
  // odd[i] = draw first + 1 + i * step (first and step even: one hash for both).
  inline void fill_pair(uint64_t first, int64_t n, uint64_t step, float* __restrict__ even,
                        float* __restrict__ odd) const {
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t z = hash((first + static_cast<uint64_t>(i) * step) >> 1);
      even[i] = high(z);
      odd[i] = low(z);
    }
  }
};

// The draws first .. first + n - 1 in a per-thread buffer (valid until the next call on the thread);
// nullptr with noise off (round to nearest even). Not inlined: inlined, it pushed the callers over
// GCC's inlining budget, which then left the rounding loops scalar (8x slower).
__attribute__((noinline)) const float* draws(const Noise& noise, uint64_t first, int64_t n) {
  if (!noise.on) return nullptr;
  static thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  noise.fill(first, n, buffer.data());
  return buffer.data();
}

// A divisor or block scale: one for the whole block (float), or one per element (a pointer: a
// column of a transposed operand, each element in its own row's block).
[[gnu::always_inline]] inline float scale_at(float s, int64_t) { return s; }
[[gnu::always_inline]] inline float scale_at(const float* __restrict__ s, int64_t i) {
  return s[i];
}

// Round `n` elements scaled by `divisor` into the carrier; `noise` (uniform draws, one per
// element) selects stochastic rounding, nullptr round-to-nearest-even. With `folded` (float
// formats), also (or, with `out_bf16` nullptr, only) write each rounded value times the block
// scale `s`, rounded to bf16: the operand an emulated GEMM consumes (`lowbit.nn.gemm._fold`),
// computed while the value is in a register (a second loop over the written values stayed scalar
// and took 60% of an NVFP4 quantization).
// Whether x / d == x * (1 / d) for every x: d a normal power of two (1 / d is then exact, at worst
// the subnormal 2**-127, and both round the same real number). MX and power-of-two scales are.
[[gnu::always_inline]] inline bool reciprocal_is_exact(float d) {
  const uint32_t b = bits_of(d) & kAbsMask;
  return (b & 0x007FFFFFu) == 0 && b >= 0x00800000u && b < kExponentMask;
}

// x divided by the divisor, or (kInverse) multiplied by its exact reciprocal: the same bits, but a
// vector division costs several times a multiplication.
// Other divisors stay a division: Markstein's r = RN(1 / d), q = RN(x * r),
// q' = fma(-fma(q, d, -x), r, q) gives the same bits where every intermediate is a normal number,
// but with the per-element range check that needs (inf, NaN, overflowing and near-underflowing
// quotients fall back to the division) and a -0.0 guard (GCC folds -(q * d - x) into x - q * d),
// it measured 1.25-1.45x slower than vdivps on AMD EPYC (Zen 4, AVX-512; scratch timing): the
// division's throughput (about 5 cycles a vector) overlaps the clamp and rounding around it.
template <bool kInverse, typename S>
[[gnu::always_inline]] inline float scale_down(float x, S by, int64_t i) {
  if constexpr (kInverse) {
    return x * scale_at(by, i);
  } else {
    return x / scale_at(by, i);
  }
}

// `divisor` holds reciprocals with kInverse (see scale_down), divisors without.
template <bool kInverse, typename T, typename N, typename S>
inline void cast_block(const T* __restrict__ x, N n, S divisor, const Params& p,
                       const float* __restrict__ noise, uint16_t* __restrict__ out_bf16,
                       int8_t* __restrict__ out_int, S s, uint16_t* __restrict__ folded) {
  const Grid grid = p.grid;
  if (p.kind == kInt && noise) {
    for (int64_t i = 0; i < n; ++i) {
      out_int[i] = round_int_stochastic(scale_down<kInverse>(widen(x[i]), divisor, i), p.fmt_max, noise[i]);
    }
  } else if (p.kind == kInt) {
    for (int64_t i = 0; i < n; ++i) {
      out_int[i] = round_int(scale_down<kInverse>(widen(x[i]), divisor, i), p.fmt_max);
    }
  } else if (noise && folded) {
    for (int64_t i = 0; i < n; ++i) {
      const float v = grid.round_stochastic(scale_down<kInverse>(widen(x[i]), divisor, i), noise[i]);
      if (out_bf16) out_bf16[i] = bf16_bits_exact(v);  // (the test is hoisted out of the loop)
      folded[i] = bf16_bits_nearest(v * scale_at(s, i));  // v is exact in bf16: as re-reading it
    }
  } else if (noise) {
    for (int64_t i = 0; i < n; ++i) {
      out_bf16[i] =
          bf16_bits_exact(grid.round_stochastic(scale_down<kInverse>(widen(x[i]), divisor, i), noise[i]));
    }
  } else if (folded) {
    for (int64_t i = 0; i < n; ++i) {
      const float v = grid.round(scale_down<kInverse>(widen(x[i]), divisor, i));
      if (out_bf16) out_bf16[i] = bf16_bits_exact(v);
      folded[i] = bf16_bits_nearest(v * scale_at(s, i));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      out_bf16[i] = bf16_bits_exact(grid.round(scale_down<kInverse>(widen(x[i]), divisor, i)));
    }
  }
}

// cast_block for one divisor: a multiplication by its reciprocal where that is exact.
template <typename T, typename N>
inline void cast_block(const T* __restrict__ x, N n, float divisor, const Params& p,
                       const float* __restrict__ noise, uint16_t* __restrict__ out_bf16,
                       int8_t* __restrict__ out_int, float s, uint16_t* __restrict__ folded) {
  if (reciprocal_is_exact(divisor)) {
    cast_block<true>(x, n, 1.0f / divisor, p, noise, out_bf16, out_int, s, folded);
  } else {
    cast_block<false>(x, n, divisor, p, noise, out_bf16, out_int, s, folded);
  }
}

template <typename T>
void quantize_impl(const at::Tensor& x, int64_t cols, int64_t block, int64_t block_rows,
                   bool transposed, const Hadamard& hadamard, const Params& p,
                   const c10::optional<at::Tensor>& given_amax, const Noise& noise,
                   at::Tensor& values, at::Tensor& scale,
                   at::Tensor& tensor_scale_out, at::Tensor& folded, at::Tensor& measured) {
  const int64_t rows = x.size(0);
  const int64_t in_cols = x.size(1);  // cols is in_cols padded to whole Hadamard blocks
  uint16_t* out_bf16 = p.kind == kFloatGrid && values.numel()
                           ? reinterpret_cast<uint16_t*>(values.mutable_data_ptr())
                           : nullptr;  // nullptr: folded values only
  int8_t* out_int = p.kind == kInt ? values.mutable_data_ptr<int8_t>() : nullptr;
  float* scales = scale.mutable_data_ptr<float>();
  uint16_t* out_folded =
      folded.numel() ? reinterpret_cast<uint16_t*>(folded.mutable_data_ptr()) : nullptr;
  // Transposed layout with a Hadamard transform: tasks of up to kHadamardRows rows, so that a
  // task's transformed lines stay in the L1 cache.
  constexpr int64_t kHadamardRows = 128;
  auto transformed_amax = [&]() {
    const auto max_of = [](float a, float b) { return float_of(std::max(bits_of(a), bits_of(b))); };
    if (transposed) {
      const T* src = x.const_data_ptr<T>();
      const int64_t chunks = (rows + kHadamardRows - 1) / kHadamardRows;
      return at::parallel_reduce(
          0, cols / hadamard.n * chunks, 1, 0.0f,
          [&](int64_t begin, int64_t end, float acc) {
            std::vector<float> lines(hadamard.n * kHadamardRows);
            for (int64_t task = begin; task < end; ++task) {
              const int64_t r0 = (task % chunks) * kHadamardRows;
              const int64_t n = std::min(kHadamardRows, rows - r0);
              hadamard_lines(src, rows, in_cols, task / chunks * hadamard.n, r0, n, hadamard,
                             lines.data(), n);
              acc = max_of(acc, block_amax(lines.data(), hadamard.n * n));
            }
            return acc;
          },
          max_of);
    }
    const at::Tensor xc = x.contiguous();
    const T* src = xc.const_data_ptr<T>();
    return at::parallel_reduce(
        0, rows, std::max<int64_t>(1, 32768 / cols), 0.0f,
        [&](int64_t begin, int64_t end, float acc) {
          std::vector<float> row((cols + kRowChunk - 1) / kRowChunk * kRowChunk);
          for (int64_t r = begin; r < end; ++r) {
            hadamard_row(src + r * in_cols, in_cols, cols, hadamard, row.data());
            acc = max_of(acc, block_amax(row.data(), cols));
          }
          return acc;
        },
        max_of);
  };
  auto measured_tensor_amax = [&]() {
    if (given_amax.has_value()) return given_amax->item<float>();
    if (hadamard.n) return transformed_amax();
    return tensor_amax(x.const_data_ptr<T>(), rows, in_cols, x.stride(0), x.stride(1));
  };

  if (block == 0) {  // one scale for the whole tensor
    const float amax = measured_tensor_amax();
    const float s = scale_from_amax(amax, p.fmt_max, p.emax_elem, p.rule);
    scales[0] = s;
    // With a given (delayed) amax the tensor's own amax is still wanted for the history: taken
    // from each row while it is in cache, as max |x| bits (NaN above inf, -0 as +0).
    const bool measure_rows = measured.numel() && given_amax.has_value();
    if (measured.numel() && !measure_rows) measured.mutable_data_ptr<float>()[0] = amax;
    std::vector<uint32_t> row_top(measure_rows ? rows : 0);
    for_each_row<T>(x, [&](int64_t r, const auto* row) {
      if (!row_top.empty()) {
        uint32_t top = 0;
        for (int64_t c = 0; c < cols; ++c) top = std::max(top, bits_of(widen(row[c])) & kAbsMask);
        row_top[r] = top;
      }
      cast_block(row, cols, s, p, draws(noise, static_cast<uint64_t>(r * noise.stride), cols),
                 out_bf16 ? out_bf16 + r * cols : nullptr, out_int ? out_int + r * cols : nullptr,
                 1.0f, nullptr);  // no folding: one scale for the whole tensor
    });
    if (measure_rows) {
      uint32_t top = 0;
      for (const uint32_t t : row_top) top = std::max(top, t);
      measured.mutable_data_ptr<float>()[0] = float_of(top);
    }
    return;
  }

  const int64_t blocks_per_row = (cols + block - 1) / block;
  const float* row_amax = nullptr;  // a given per-row amax (granularity axis)
  float tensor_scale = 1.0f;
  if (p.rule == kNvfp4) {
    const float amax = measured_tensor_amax();
    // `nvfp4_scales`: 1 for a zero (or NaN) amax; a tiny one's scale, which would round to 0
    // (NaN or saturated block scales), is floored at fp32's smallest subnormal
    const float ratio = amax / (kFp4Max * kE4m3Max);
    tensor_scale = amax > 0.0f ? std::max(ratio, std::numeric_limits<float>::denorm_min()) : 1.0f;
    tensor_scale_out.fill_(tensor_scale);
  } else if (given_amax.has_value()) {
    row_amax = given_amax->const_data_ptr<float>();
  }
  const Grid e4m3(3, -6, 8, kE4m3Max);
  // The (stored scale, divisor) of a block with largest magnitude amax.
  auto scale_of = [&](float amax) __attribute__((always_inline)) {
    if (p.rule == kNvfp4) {
      const float s = e4m3.round((amax / kFp4Max) / tensor_scale);
      const float divisor = s * tensor_scale;
      return std::pair<float, float>{s, divisor > 0.0f ? divisor : 1.0f};
    }
    const float s = scale_from_amax(amax, p.fmt_max, p.emax_elem, p.rule);
    return std::pair<float, float>{s, s};
  };
  // Rounds the n elements of row r from column start (n is a compile-time constant for the usual
  // 16 and 32, so that the loops are unrolled and vectorized without run-time checks).
  // `block_noise`: the block's draws (nullptr: round to nearest even).
  auto emit = [&](int64_t r, const auto* row, int64_t start, auto n, float s, float divisor,
                  const float* block_noise) {
    const int64_t at = r * cols + start;
    cast_block(row + start, n, divisor, p, block_noise, out_bf16 ? out_bf16 + at : nullptr,
               out_int ? out_int + at : nullptr, s,
               out_folded ? out_folded + at : nullptr);
    if (p.rule == kNvfp4 && !(s > 0.0f)) {  // an underflowed block scale holds zeros
      if (out_bf16) std::fill(out_bf16 + at, out_bf16 + at + n, uint16_t{0});
      if (out_folded) std::fill(out_folded + at, out_folded + at + n, bf16_bits_nearest(0.0f * s));
    }
  };

  if (transposed) {
    // x is the transpose of a contiguous cols x rows matrix (the weight gradient's x.T and
    // grad_out.T), and values and folded are laid out the same way. Each of x's column blocks is
    // then `block` contiguous lines of `rows` elements, one element per row of x: the block
    // amaxes of all rows are a running max over those lines, the scales one loop over the rows,
    // and the rounding goes line by line with a divisor per element -- every loop along the
    // contiguous axis, so no transposition is needed.
    const T* src = x.const_data_ptr<T>();
    // Tasks are (column unit, chunk of rows) pairs, a unit being a block or, with a Hadamard
    // transform, the blocks of one Hadamard block: whole lines when there are units enough for
    // every thread, else (a per-row scale: one block per row) the rows split among the threads.
    const int64_t unit = hadamard.n ? hadamard.n : block;
    const int64_t units = (cols + unit - 1) / unit;
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    int64_t chunks = std::min<int64_t>((rows + 15) / 16, (threads + units - 1) / units);
    if (hadamard.n) chunks = std::max(chunks, (rows + kHadamardRows - 1) / kHadamardRows);
    const int64_t kChunk = ((rows + chunks - 1) / chunks + 15) / 16 * 16;
    at::parallel_for(0, units * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint32_t> top(kChunk);
      std::vector<float> s(kChunk), divisor(kChunk), u(noise.on ? 2 * kChunk : 0);
      std::vector<float> transformed(hadamard.n * kChunk);
      // Quantizes block b of rows r0 .. r0 + n - 1; line(c) points at element r0 of line c.
      auto quantize_block = [&](int64_t b, int64_t r0, int64_t n, auto line) {
        const int64_t c0 = b * block;
        const int64_t c1 = std::min(cols, c0 + block);
        if (row_amax) {
          for (int64_t i = 0; i < n; ++i) top[i] = bits_of(row_amax[r0 + i]);
        } else {
          std::fill(top.begin(), top.begin() + n, 0u);
          for (int64_t c = c0; c < c1; ++c) {
            const auto* __restrict__ in = line(c);
            uint32_t* __restrict__ t = top.data();
            for (int64_t i = 0; i < n; ++i) t[i] = std::max(t[i], bits_of(widen(in[i])) & kAbsMask);
          }
        }
        for (int64_t i = 0; i < n; ++i) {
          const auto [scale_i, divisor_i] = scale_of(float_of(top[i]));
          s[i] = scale_i;
          divisor[i] = divisor_i;
          scales[(r0 + i) * blocks_per_row + b] = scale_i;
        }
        // Multiply by the reciprocals where every one is exact (see scale_down).
        bool inverse = true;
        for (int64_t i = 0; i < n; ++i) inverse &= reciprocal_is_exact(divisor[i]);
        if (inverse) {
          for (int64_t i = 0; i < n; ++i) divisor[i] = 1.0f / divisor[i];
        }
        // Draws for line c in u (or, filled with line c - 1's, in its second half).
        bool have_next = false;
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t at = c * rows + r0;
          const float* draws_c = nullptr;
          if (noise.on) {
            const uint64_t first = static_cast<uint64_t>(r0 * noise.stride + c);
            if (have_next) {
              draws_c = u.data() + kChunk;
              have_next = false;
            } else if (first % 2 == 0 && noise.stride % 2 == 0 && c + 1 < c1) {
              noise.fill_pair(first, n, noise.stride, u.data(), u.data() + kChunk);
              draws_c = u.data();
              have_next = true;
            } else {
              noise.fill_strided(first, n, noise.stride, u.data());
              draws_c = u.data();
            }
          }
          auto cast = [&](auto inverse_tag) {
            cast_block<decltype(inverse_tag)::value>(
                line(c), n, static_cast<const float*>(divisor.data()), p, draws_c,
                out_bf16 ? out_bf16 + at : nullptr, out_int ? out_int + at : nullptr,
                static_cast<const float*>(s.data()), out_folded ? out_folded + at : nullptr);
          };
          if (inverse) {
            cast(std::true_type{});
          } else {
            cast(std::false_type{});
          }
        }
        if (p.rule == kNvfp4) {  // rows whose block scale underflowed hold zeros
          for (int64_t i = 0; i < n; ++i) {
            if (s[i] > 0.0f) continue;
            for (int64_t c = c0; c < c1; ++c) {
              if (out_bf16) out_bf16[c * rows + r0 + i] = 0;
              if (out_folded) out_folded[c * rows + r0 + i] = bf16_bits_nearest(0.0f * s[i]);
            }
          }
        }
      };
      for (int64_t task = begin; task < end; ++task) {
        const int64_t first = task / chunks * unit;  // first column of the unit
        const int64_t r0 = (task % chunks) * kChunk;
        const int64_t n = std::min(kChunk, rows - r0);
        if (hadamard.n) {
          hadamard_lines(src, rows, in_cols, first, r0, n, hadamard, transformed.data(), kChunk);
          const float* lines = transformed.data();
          for (int64_t c0 = first; c0 < first + unit; c0 += block) {
            quantize_block(c0 / block, r0, n,
                           [&](int64_t c) { return lines + (c - first) * kChunk; });
          }
        } else {
          quantize_block(first / block, r0, n, [&](int64_t c) { return src + c * rows + r0; });
        }
      }
    });
    return;
  }

  if (block_rows > 1) {  // 2-D tiles of block_rows x block (x has contiguous columns)
    const T* data = x.const_data_ptr<T>();
    const int64_t row_stride = x.stride(0);
    const int64_t tile_rows = (rows + block_rows - 1) / block_rows;
    at::parallel_for(0, tile_rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t r0 = tile * block_rows;
        const int64_t r1 = std::min(rows, r0 + block_rows);
        for (int64_t start = 0; start < cols; start += block) {
          const int64_t n = std::min(block, cols - start);
          uint32_t top = 0;
          for (int64_t r = r0; r < r1; ++r) {
            top = std::max(top, bits_of(block_amax(data + r * row_stride + start, n)));
          }
          const auto [s, divisor] = scale_of(float_of(top));
          scales[tile * blocks_per_row + start / block] = s;
          for (int64_t r = r0; r < r1; ++r) {
            emit(r, data + r * row_stride, start, n, s, divisor,
                 draws(noise, static_cast<uint64_t>(r * noise.stride + start), n));
          }
        }
      }
    });
    return;
  }

  // One row: every block's amax, then every block's scale and divisor (two loops across the
  // row's blocks, which vectorize), then the rounding block by block.
  auto quantize_row = [&](int64_t r, const auto* row, auto full) {
    if (blocks_per_row == 1) {  // one scale per row (row-wise int8, fp8): no per-row buffers
      const auto [s, divisor] = scale_of(row_amax ? row_amax[r] : block_amax(row, cols));
      scales[r] = s;
      emit(r, row, 0, cols, s, divisor, draws(noise, static_cast<uint64_t>(r * noise.stride), cols));
      return;
    }
    static thread_local std::vector<float> buffer;
    if (static_cast<int64_t>(buffer.size()) < 2 * blocks_per_row) buffer.resize(2 * blocks_per_row);
    float* __restrict__ amax = buffer.data();
    float* __restrict__ divisor = amax + blocks_per_row;
    float* __restrict__ row_scales = scales + r * blocks_per_row;
    const int64_t whole = cols / block;  // blocks of `full` elements; one shorter block may follow
    if (row_amax) {
      std::fill(amax, amax + blocks_per_row, row_amax[r]);
    } else {
      for (int64_t b = 0; b < whole; ++b) amax[b] = block_amax(row + b * block, full);
      if (whole < blocks_per_row) amax[whole] = block_amax(row + whole * block, cols - whole * block);
    }
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      const auto [s, d] = scale_of(amax[b]);
      row_scales[b] = s;
      divisor[b] = d;
    }
    // The row's draws at once (a call per block cost more than the hashing of a 16-element block).
    const float* row_noise = draws(noise, static_cast<uint64_t>(r * noise.stride), cols);
    auto noise_at = [&](int64_t start) { return row_noise ? row_noise + start : nullptr; };
    for (int64_t b = 0; b < whole; ++b) {
      emit(r, row, b * block, full, row_scales[b], divisor[b], noise_at(b * block));
    }
    if (whole < blocks_per_row) {
      emit(r, row, whole * block, cols - whole * block, row_scales[whole], divisor[whole],
           noise_at(whole * block));
    }
  };
  auto quantize_any_row = [&](int64_t r, const auto* row) {
    if (block == 32) {
      quantize_row(r, row, std::integral_constant<int64_t, 32>{});
    } else if (block == 16) {
      quantize_row(r, row, std::integral_constant<int64_t, 16>{});
    } else {
      quantize_row(r, row, block);
    }
  };
  if (blocks_per_row == 1 && !hadamard.n && (x.stride(1) == 1 || cols <= 1)) {
    // One scale per row (row-wise int8 and fp8) of contiguous rows: the scales of a group of rows
    // first, then their rounding. Row by row, each row's rounding waited on its amax, scale and
    // divisor (a chain of some 50 cycles that the rest of the row's work did not hide); grouped,
    // the chains of the group's rows overlap (4096 x 128 fp32 rows, one thread: int8 148 -> 97 us,
    // e4m3 194 -> 137 us, scratch timing). The group stays in the L1 cache (32 KiB of input).
    const T* data = x.const_data_ptr<T>();
    const int64_t row_stride = x.stride(0);
    constexpr int64_t kGroup = 16;
    const int64_t row_bytes = std::max<int64_t>(cols, 1) * static_cast<int64_t>(sizeof(T));
    const int64_t group = std::clamp<int64_t>(32768 / row_bytes, 1, kGroup);
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      float divisor[kGroup];
      for (int64_t r0 = begin; r0 < end; r0 += group) {
        const int64_t n = std::min(group, end - r0);
        for (int64_t t = 0; t < n; ++t) {
          const T* row = data + (r0 + t) * row_stride;
          const auto [s, d] = scale_of(row_amax ? row_amax[r0 + t] : block_amax(row, cols));
          scales[r0 + t] = s;
          divisor[t] = d;
        }
        for (int64_t t = 0; t < n; ++t) {
          const int64_t r = r0 + t;
          emit(r, data + r * row_stride, 0, cols, scales[r], divisor[t],
               draws(noise, static_cast<uint64_t>(r * noise.stride), cols));
        }
      }
    });
    return;
  }
  for_each_row<T>(x, [&](int64_t r, const auto* row) {
    if (hadamard.n) {
      static thread_local std::vector<float> transformed;
      transformed.resize((cols + kRowChunk - 1) / kRowChunk * kRowChunk);
      hadamard_row(row, in_cols, cols, hadamard, transformed.data());
      quantize_any_row(r, static_cast<const float*>(transformed.data()));
    } else {
      quantize_any_row(r, row);
    }
  });
}

// One block per row, of the row's length whatever it is: `lowbit.kernels.ROW_BLOCK`, a block longer
// than any row (a traced graph's row length may be a symbolic size, which an int block fixes).
constexpr int64_t kRowBlock = int64_t{1} << 62;

// Noise::stride, the draws' indices per row: the columns padded to whole blocks, as the PyTorch
// path pads them; the row's length for one scale (block 0) or one per row (kRowBlock), whose
// padding to 2**62 columns would overflow r * stride.
int64_t noise_stride(int64_t rows, int64_t cols, int64_t block) {
  if (block == 0 || block >= kRowBlock) return cols;
  const int64_t padded = (cols + block - 1) / block * block;
  TORCH_CHECK(rows <= 1 || padded <= INT64_MAX / rows,
              "stochastic rounding: rows x (cols padded to whole blocks) overflows int64; "
              "pass a block that is at most the row's length");
  return padded;
}

// (values, scale, tensor_scale, folded) of `x` (rows x cols, any strides: a transposed view is
// gathered in tiles, see for_each_row).
//   block: columns per block; 0 for one scale over the whole tensor.
//   block_rows: rows per block (1; more for 2-D tiles, which need contiguous columns).
//   kind: 0 float format (values in bf16), 1 symmetric integer (values in int8, qmax = fmt_max).
//   rule: 0 amax, 1 pow2, 2 mx_floor, 3 mx_ceil, 4 nvfp4 (e4m3 block scales, fp32 tensor scale).
//   amax: a given amax: the tensor's (block 0, nvfp4) or one per row (block >= cols).
//   noise_seed: stochastic rounding with the draws of this seed (see Noise), indexed over rows x
//     (cols padded to whole blocks; see noise_stride): the layout in which the PyTorch path draws
//     them for its zero-padded blocks; none: round to nearest even.
//   fold: also return the values times their block scale in bf16 (float formats, blocks shorter
//     than a row): the operand an emulated GEMM consumes (`lowbit.nn.gemm._fold`), else empty.
//   write_values: false (with fold) returns values empty: the folded operand is all a GEMM reads,
//     and the values follow from it exactly (`QTensor.values`); one output stream less.
//   hadamard: the random signs of a Hadamard transform (see struct Hadamard) applied to every
//     block of len(signs) columns first; the columns are zero-padded to whole such blocks, which
//     must hold whole quantization blocks (1-D, no given amax). Results have the padded columns.
//   measure_amax (block 0): also return max |x| as one fp32 (else empty), measured in the
//     rounding pass when an amax is given: delayed scaling's history needs the tensor's own amax
//     but not before the rounding, so no separate pass over x is needed for it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_rows(
    const at::Tensor& x, int64_t block, int64_t block_rows, int64_t kind, int64_t mbits,
    int64_t emin, int64_t emax,
    double fmt_max, int64_t rule, const c10::optional<at::Tensor>& amax,
    c10::optional<int64_t> noise_seed, bool fold, const c10::optional<at::Tensor>& hadamard,
    bool write_values, bool measure_amax) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "quantize_rows needs a 2-D CPU tensor");
  TORCH_CHECK(block >= 0 && block_rows >= 1, "block must be >= 0 and block_rows >= 1");
  TORCH_CHECK(block_rows == 1 || (block > 0 && (x.stride(1) == 1 || x.size(1) <= 1)),
              "2-D tiles need column blocks and contiguous columns");
  const int64_t rows = x.size(0);
  at::Tensor signs;
  Hadamard transform{0, nullptr, 1.0f};
  if (hadamard.has_value()) {
    const int64_t n = hadamard->numel();
    TORCH_CHECK(n > 0 && (n & (n - 1)) == 0, "hadamard: the signs' count must be a power of two");
    signs = hadamard->to(at::kFloat).contiguous();
    if (n < 8) signs = signs.repeat({8 / n});
    TORCH_CHECK(block > 0 && block_rows == 1 && n % block == 0 && !amax.has_value(),
                "hadamard: needs 1-D blocks that divide its length and no given amax");
    transform = {n, signs.const_data_ptr<float>(), static_cast<float>(1.0 / std::sqrt(n))};
  }
  const int64_t in_cols = x.size(1);
  const int64_t cols =
      transform.n ? (in_cols + transform.n - 1) / transform.n * transform.n : in_cols;
  c10::optional<at::Tensor> given;
  if (amax.has_value()) {
    given = amax->to(at::kFloat).contiguous();
    if (block != 0 && rule != kNvfp4) {
      TORCH_CHECK(block >= cols && given->numel() == rows, "a per-row amax needs one per row");
    }
  }
  const Noise noise{noise_seed.has_value(), static_cast<uint64_t>(noise_seed.value_or(0)),
                    noise_seed.has_value() ? noise_stride(rows, cols, block) : 0};
  const Params p{kind, Grid(mbits, emin, emax, fmt_max), static_cast<float>(fmt_max),
                 binade(static_cast<float>(fmt_max)), rule};
  const auto opts = x.options();
  // A transposed contiguous input (strides 1, rows) in column blocks: values and folded in its
  // layout too (quantize_impl's transposed path), returned as transposed views.
  const bool transposed = block > 0 && block_rows == 1 && rows > 1 && in_cols > 1 &&
                          x.stride(0) == 1 && x.stride(1) == rows;
  const auto layout = [&](at::Tensor t) { return transposed ? t.t() : t; };
  const auto shape = [&](int64_t r, int64_t c) {
    return transposed ? std::vector<int64_t>{c, r} : std::vector<int64_t>{r, c};
  };
  TORCH_CHECK(write_values || fold, "write_values=False needs fold (the folded values)");
  TORCH_CHECK(!measure_amax || block == 0, "measure_amax needs one scale for the tensor (block 0)");
  at::Tensor measured = at::empty({measure_amax ? 1 : 0}, opts.dtype(at::kFloat));
  at::Tensor values =
      write_values
          ? layout(at::empty(shape(rows, cols), opts.dtype(kind == kInt ? at::kChar : at::kBFloat16)))
          : at::empty({0, 0}, opts.dtype(at::kBFloat16));
  const int64_t grid_cols = block == 0 ? 1 : (cols + block - 1) / block;
  const int64_t grid_rows = block == 0 ? 1 : (rows + block_rows - 1) / block_rows;
  at::Tensor scale = at::empty({grid_rows, grid_cols}, opts.dtype(at::kFloat));
  at::Tensor tensor_scale = at::empty({rule == kNvfp4 ? 1 : 0}, opts.dtype(at::kFloat));
  TORCH_CHECK(!fold || (kind == kFloatGrid && block > 0), "fold needs a float format in blocks");
  at::Tensor folded =
      fold ? layout(at::empty(shape(rows, cols), opts.dtype(at::kBFloat16)))
           : at::empty({0, 0}, opts.dtype(at::kBFloat16));
  switch (x.scalar_type()) {
    case at::kFloat:
      quantize_impl<float>(x, cols, block, block_rows, transposed, transform, p, given,
                           noise, values, scale, tensor_scale, folded, measured);
      break;
    case at::kBFloat16:
      quantize_impl<c10::BFloat16>(x, cols, block, block_rows, transposed, transform, p, given,
                                   noise, values, scale, tensor_scale, folded, measured);
      break;
    case at::kHalf:
      quantize_impl<c10::Half>(x, cols, block, block_rows, transposed, transform, p, given,
                               noise, values, scale, tensor_scale, folded, measured);
      break;
    default:
      TORCH_CHECK(false, "quantize_rows needs fp32, bf16 or fp16 input, got ", x.scalar_type());
  }
  return {values, scale, tensor_scale, folded, measured};
}

}  // namespace

TORCH_LIBRARY(lowbit, m) {
  m.def(
      "quantize_rows(Tensor x, int block, int block_rows, int kind, int mbits, int emin, int emax, float fmt_max, "
      "int rule, Tensor? amax, int? noise_seed, bool fold, Tensor? hadamard, bool write_values=True, "
      "bool measure_amax=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("quantize_rows", &quantize_rows); }
