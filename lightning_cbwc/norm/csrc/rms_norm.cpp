// Fused RMSNorm CPU kernels behind the custom ops lightning_cbwc::rms_norm and
// lightning_cbwc::rms_norm_backward (schemas, dispatcher registration and autograd: rms_norm_op.cpp).
//
// y = x / sqrt(mean(x^2) + eps) * weight + bias over the trailing normalized dims.  float32, float64,
// bfloat16 and float16 in and out; float32 accumulation for the 16-bit types, float64 for float64.
// weight / bias may have another floating dtype than x (they are read in the accumulation type).
//
// Build: ATen's Vectorized<T> only uses SIMD when CPU_CAPABILITY_AVX2 / CPU_CAPABILITY_AVX512 (and
// CPU_CAPABILITY) are defined, and at::parallel_for only runs in parallel when compiled with -fopenmp; the
// Python loader passes both.
//
// Forward: one read of x and one write of y per row (the second pass over a row hits the cache).
// Backward: rstd is recomputed from x (no saved statistics), two passes per row:
//   pass 1: ss = sum(x^2), dot = sum(g * w * x), gs = sum(g * w)
//   pass 2: dx = r * (g * w - m) - x * (r^3 * dot / N);  dweight += g * x * r;  dbias += g
// with m = gs / N for zero_mean_rms_norm (LayerNorm's backward on a zero-mean input), else m = 0.
// dweight / dbias are accumulated per block of rows (one block per thread) in the accumulation type, each
// block's on its own cache lines (BlockSums), then reduced over blocks in a fixed order (deterministic for a
// given thread count); with neither asked for (frozen norm parameters) the second pass skips them.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/WrapDimUtils.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/core/ScalarType.h>

#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

// Native bf16 conversions (vcvtne2ps2bf16, vdpbf16ps): the loader adds -mavx512bf16 only on CPUs that have
// avx512_bf16, so the AVX-512 build without it keeps ATen's integer rounding.
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
#define LIGHTNING_CBWC_NATIVE_BF16 1
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <array>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::vec::Vectorized;

// Elements of work below which a parallel_for chunk is not worth a thread (ATen's internal GRAIN_SIZE).
constexpr int64_t kGrainSize = 32768;

#if defined(CPU_CAPABILITY_AVX512)
// The first c lanes of a 16- / 32-lane mask (none for c <= 0, all from 16 / 32 on).
inline __mmask16 mask16(int64_t c) {
  return c <= 0 ? __mmask16(0) : c >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << c) - 1u);
}
inline __mmask32 mask32(int64_t c) {
  return c <= 0 ? __mmask32(0) : c >= 32 ? __mmask32(0xFFFFFFFFu) : static_cast<__mmask32>((1ull << c) - 1ull);
}
#endif

// Load / store kStep elements of T as two vectors of the accumulation type.
template <typename T>
struct Io {
  using acc_t = at::opmath_type<T>;  // float for float / bfloat16 / half, double for double
  using V = Vectorized<acc_t>;
  static constexpr int64_t kStep = 2 * V::size();
  static inline void load(const T* p, V& a, V& b) {
    if constexpr (std::is_same_v<T, acc_t>) {
      a = V::loadu(p);
      b = V::loadu(p + V::size());
    } else {
      static_assert(Vectorized<T>::size() == 2 * V::size(), "reduced type vector width");
#if defined(CPU_CAPABILITY_AVX2)
      // Two 128-bit loads widened in place (vpmovzxwd / vcvtph2ps from memory) instead of ATen's 256-bit load
      // + lane extract: ~20% faster bf16 forward and backward on AVX2.
      const __m128i* q = reinterpret_cast<const __m128i*>(p);
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(q)), 16));
        b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(q + 1)), 16));
        return;
      } else if constexpr (std::is_same_v<T, at::Half>) {
        a = _mm256_cvtph_ps(_mm_loadu_si128(q));
        b = _mm256_cvtph_ps(_mm_loadu_si128(q + 1));
        return;
      }
#elif defined(CPU_CAPABILITY_AVX512)
      // Two 256-bit loads widened from memory (vpmovzxwd), as on AVX2: no 512-bit load + lane extract.
      const __m256i* q = reinterpret_cast<const __m256i*>(p);
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        a = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(q)), 16));
        b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(q + 1)), 16));
        return;
      } else if constexpr (std::is_same_v<T, at::Half>) {
        a = _mm512_cvtph_ps(_mm256_loadu_si256(q));
        b = _mm512_cvtph_ps(_mm256_loadu_si256(q + 1));
        return;
      }
#endif
      std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
    }
  }
  static inline void store(T* p, const V& a, const V& b) {
    if constexpr (std::is_same_v<T, acc_t>) {
      a.store(p);
      b.store(p + V::size());
    } else {
#if defined(LIGHTNING_CBWC_NATIVE_BF16)
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        // One vcvtne2ps2bf16 (round to nearest even) for 32 values instead of ATen's ~12 integer ops.
        _mm512_storeu_si512(p, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a)));
        return;
      }
#endif
      at::vec::convert_from_float<T>(a, b).store(p);
    }
  }
  // The last count (< kStep) values of a row: read with zeros after them, written without touching the bytes
  // after them.  Masked on AVX-512, where kStep is 32 floats and a scalar tail ran whole narrow rows (16, 24
  // wide: ConvNeXt's first stages) one value at a time; through a stack buffer elsewhere.
  static inline void load_tail(const T* p, int64_t count, V& a, V& b) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      a = _mm512_maskz_loadu_ps(mask16(count), p);
      b = _mm512_maskz_loadu_ps(mask16(count - 16), p + 16);
      return;
    } else if constexpr (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>) {
      const __m512i v = _mm512_maskz_loadu_epi16(mask32(count), p);
      const __m256i lo = _mm512_castsi512_si256(v), hi = _mm512_extracti64x4_epi64(v, 1);
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        a = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(lo), 16));
        b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
      } else {
        a = _mm512_cvtph_ps(lo);
        b = _mm512_cvtph_ps(hi);
      }
      return;
    }
#endif
    alignas(64) T buf[kStep];
    std::memset(static_cast<void*>(buf), 0, sizeof(buf));
    std::memcpy(static_cast<void*>(buf), p, count * sizeof(T));
    load(buf, a, b);
  }
  static inline void store_tail(T* p, const V& a, const V& b, int64_t count) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      _mm512_mask_storeu_ps(p, mask16(count), a);
      _mm512_mask_storeu_ps(p + 16, mask16(count - 16), b);
      return;
    } else if constexpr (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>) {
      alignas(64) T buf[kStep];
      store(buf, a, b);
      _mm512_mask_storeu_epi16(p, mask32(count), _mm512_load_si512(buf));
      return;
    }
#endif
    alignas(64) T buf[kStep];
    store(buf, a, b);
    std::memcpy(static_cast<void*>(p), buf, count * sizeof(T));
  }
  // load / store of ``count`` values, kStep (a full step: the branch folds away where count is a constant)
  // or fewer (the row's tail).
  static inline void load_n(const T* p, int64_t count, V& a, V& b) {
    if (count == kStep) {
      load(p, a, b);
    } else {
      load_tail(p, count, a, b);
    }
  }
  static inline void store_n(T* p, const V& a, const V& b, int64_t count) {
    if (count == kStep) {
      store(p, a, b);
    } else {
      store_tail(p, a, b, count);
    }
  }
};

// Prefetch the bytes of one kStep of the next row while the second pass of this one runs from cache: that
// pass only stores, so without it the memory reads of a row wait for its first pass.
template <typename T, int64_t S>
inline void prefetch_step(const T* p) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < S * static_cast<int64_t>(sizeof(T)); o += 64) __builtin_prefetch(c + o);
}

template <typename T>
inline at::opmath_type<T> row_sumsq(const T* x, int64_t n) {
#if defined(LIGHTNING_CBWC_NATIVE_BF16)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    // vdpbf16ps: 32 squares per instruction, straight from the bf16 bits (a bf16 x bf16 product is exact in
    // float32, so this is the float32 sum of squares in another order).
    // Four accumulators: with two, the chain of dependent vdpbf16ps (latency ~6 cycles) held a 768 row ~13% longer.
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(),
           s3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 128 <= n; i += 128) {
      const __m512bh u = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + i));
      const __m512bh v = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + i + 32));
      const __m512bh p = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + i + 64));
      const __m512bh q = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + i + 96));
      s0 = _mm512_dpbf16_ps(s0, u, u);
      s1 = _mm512_dpbf16_ps(s1, v, v);
      s2 = _mm512_dpbf16_ps(s2, p, p);
      s3 = _mm512_dpbf16_ps(s3, q, q);
    }
    for (; i + 32 <= n; i += 32) {
      const __m512bh u = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + i));
      s0 = _mm512_dpbf16_ps(s0, u, u);
    }
    if (i < n) {
      const __m512bh u = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(mask32(n - i), x + i));  // zeros after
      s1 = _mm512_dpbf16_ps(s1, u, u);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
  }
#endif
  using IO = Io<T>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int64_t S = IO::kStep;
  V s0(acc_t(0)), s1(acc_t(0)), s2(acc_t(0)), s3(acc_t(0));
  V a, b, c, d;
  int64_t i = 0;
  for (; i + 2 * S <= n; i += 2 * S) {
    IO::load(x + i, a, b);
    IO::load(x + i + S, c, d);
    s0 = at::vec::fmadd(a, a, s0);
    s1 = at::vec::fmadd(b, b, s1);
    s2 = at::vec::fmadd(c, c, s2);
    s3 = at::vec::fmadd(d, d, s3);
  }
  for (; i + S <= n; i += S) {
    IO::load(x + i, a, b);
    s0 = at::vec::fmadd(a, a, s0);
    s1 = at::vec::fmadd(b, b, s1);
  }
  if (i < n) {
    IO::load_tail(x + i, n - i, c, d);
    s2 = at::vec::fmadd(c, c, s2);
    s3 = at::vec::fmadd(d, d, s3);
  }
  return at::vec::vec_reduce_all<acc_t>([](V& u, V& v) { return u + v; }, (s0 + s1) + (s2 + s3));
}

// One step of the forward at offset i of a row: y = x * rstd (* w + b) over count <= kStep values.
template <typename T, bool AFFINE, typename P>
inline void forward_step(const T* x, T* y, const P* w, const P* b, int64_t i,
                         const Vectorized<at::opmath_type<T>>& rv, int64_t count) {
  using IO = Io<T>;
  using V = typename IO::V;
  V a, c;
  IO::load_n(x + i, count, a, c);
  if constexpr (AFFINE) {
    V wa, wc, ba, bc;
    Io<P>::load_n(w + i, count, wa, wc);
    Io<P>::load_n(b + i, count, ba, bc);
    a = at::vec::fmadd(a * rv, wa, ba);
    c = at::vec::fmadd(c * rv, wc, bc);
  } else {
    a = a * rv;
    c = c * rv;
  }
  IO::store_n(y + i, a, c, count);
}

// AFFINE: y = x * rstd * w + b with both w and b given (a missing one is passed as ones / zeros: exact, and
// free for a memory-bound kernel); otherwise y = x * rstd.  P, the type w and b are read in: the accumulation
// type, or T itself (16-bit parameters of a 16-bit input, read as they are: at decode sizes, converting them
// first would cost more than the whole norm).
template <typename T, bool AFFINE, typename P = at::opmath_type<T>>
void forward_rows(const T* x, T* y, const P* w, const P* b, int64_t rows, int64_t n, double eps) {
  using IO = Io<T>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int64_t S = IO::kStep;
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * n;
      T* yr = y + r * n;
      const acc_t rstd = acc_t(1) / std::sqrt(row_sumsq(xr, n) / static_cast<acc_t>(n) + static_cast<acc_t>(eps));
      const V rv(rstd);
      const bool ahead = r + 1 < end;
      int64_t i = 0;
      for (; i + S <= n; i += S) {
        if (ahead) prefetch_step<T, S>(xr + n + i);
        forward_step<T, AFFINE, P>(xr, yr, w, b, i, rv, S);
      }
      if (i < n) forward_step<T, AFFINE, P>(xr, yr, w, b, i, rv, n - i);
    }
  });
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
#define LIGHTNING_CBWC_BF16_AVX2 1
// bfloat16 forward with 256-bit AVX2, 16 values per step.  A bf16 value is the top half of a float, so
// widening is one in-lane unpack with zeros (unpacklo / unpackhi): the two float vectors hold elements
// {0-3, 8-11} and {4-7, 12-15} of the step, an order a sum of squares does not care about and that packus
// undoes on the way out.  w and b are laid out in that order once per call (``permute``).  Against the
// generic path (order-preserving widen and narrow) this is about a third fewer instructions per value, and
// the bf16 forward is bound by instructions, not memory.
namespace bf16_avx2 {

inline void widen(__m256i v, __m256& lo, __m256& hi) {
  const __m256i z = _mm256_setzero_si256();
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v));
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v));
}

// Round to nearest even, NaN -> 0xffff (as c10::BFloat16 and ATen's vectorized conversion).
inline __m256i round_bits(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i ordered = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_ORD_Q));
  return _mm256_blendv_epi8(_mm256_set1_epi32(0xffff), r, ordered);
}

inline __m256i narrow(__m256 lo, __m256 hi) { return _mm256_packus_epi32(round_bits(lo), round_bits(hi)); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Full 16-value steps of ``src`` in widen()'s order; the tail (n % 16) as it is.
void permute(const float* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int k = 0; k < 4; ++k) {
      dst[i + k] = src[i + k];
      dst[i + 4 + k] = src[i + 8 + k];
      dst[i + 8 + k] = src[i + 4 + k];
      dst[i + 12 + k] = src[i + 12 + k];
    }
  }
  for (; i < n; ++i) dst[i] = src[i];
}

template <bool AFFINE>
void forward_rows(const at::BFloat16* x, at::BFloat16* y, const float* w, const float* b, int64_t rows, int64_t n,
                  double eps) {
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const at::BFloat16* xr = x + r * n;
      at::BFloat16* yr = y + r * n;
      __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(),
             s3 = _mm256_setzero_ps();
      __m256 a, c, d, e;
      int64_t i = 0;
      for (; i + 32 <= n; i += 32) {
        widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + i)), a, c);
        widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + i + 16)), d, e);
        s0 = _mm256_fmadd_ps(a, a, s0);
        s1 = _mm256_fmadd_ps(c, c, s1);
        s2 = _mm256_fmadd_ps(d, d, s2);
        s3 = _mm256_fmadd_ps(e, e, s3);
      }
      for (; i + 16 <= n; i += 16) {
        widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + i)), a, c);
        s0 = _mm256_fmadd_ps(a, a, s0);
        s1 = _mm256_fmadd_ps(c, c, s1);
      }
      float ss = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
      for (; i < n; ++i) {
        const float v = static_cast<float>(xr[i]);
        ss += v * v;
      }
      const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(n) + static_cast<float>(eps));
      const __m256 rv = _mm256_set1_ps(rstd);
      const bool ahead = r + 1 < end;
      i = 0;
      for (; i + 32 <= n; i += 32) {
        if (ahead) prefetch_step<at::BFloat16, 32>(xr + n + i);
        widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + i)), a, c);
        widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + i + 16)), d, e);
        if constexpr (AFFINE) {
          a = _mm256_fmadd_ps(_mm256_mul_ps(a, rv), _mm256_loadu_ps(w + i), _mm256_loadu_ps(b + i));
          c = _mm256_fmadd_ps(_mm256_mul_ps(c, rv), _mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(b + i + 8));
          d = _mm256_fmadd_ps(_mm256_mul_ps(d, rv), _mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(b + i + 16));
          e = _mm256_fmadd_ps(_mm256_mul_ps(e, rv), _mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(b + i + 24));
        } else {
          a = _mm256_mul_ps(a, rv);
          c = _mm256_mul_ps(c, rv);
          d = _mm256_mul_ps(d, rv);
          e = _mm256_mul_ps(e, rv);
        }
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(yr + i), narrow(a, c));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(yr + i + 16), narrow(d, e));
      }
      for (; i + 16 <= n; i += 16) {
        widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + i)), a, c);
        if constexpr (AFFINE) {
          a = _mm256_fmadd_ps(_mm256_mul_ps(a, rv), _mm256_loadu_ps(w + i), _mm256_loadu_ps(b + i));
          c = _mm256_fmadd_ps(_mm256_mul_ps(c, rv), _mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(b + i + 8));
        } else {
          a = _mm256_mul_ps(a, rv);
          c = _mm256_mul_ps(c, rv);
        }
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(yr + i), narrow(a, c));
      }
      for (; i < n; ++i) {
        float v = static_cast<float>(xr[i]) * rstd;
        if constexpr (AFFINE) v = v * w[i] + b[i];
        yr[i] = static_cast<at::BFloat16>(v);
      }
    }
  });
}

}  // namespace bf16_avx2
#endif

#if defined(LIGHTNING_CBWC_NATIVE_BF16)
// bfloat16 forward with AVX-512 and the native conversions, 32 values per step.  Widening is integer work,
// no shuffle: a 32-bit lane holds two bf16 values, the even one becomes a float by a shift left, the odd one
// by masking off the low half.  One vcvtne2ps2bf16 rounds both (evens then odds) and one vpermw interleaves
// them back.  Two shuffles per step instead of four (~15% faster on Zen 4, where the shuffle and FMA ports
// are the limit once the row is in L1).  w and b are laid out in the even / odd order once per call.
namespace bf16_avx512 {

inline void widen(__m512i v, __m512& even, __m512& odd) {
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

inline __m512i narrow(__m512 even, __m512 odd) {
  // cvtne2ps2bf16(odd, even) = [the 16 evens, the 16 odds]; word 2k takes even k (index k), 2k + 1 odd k.
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                       6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(odd, even)));
}

// Full 32-value steps of ``src`` in widen()'s order (the 16 evens, then the 16 odds); the tail as it is.
void permute(const float* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int k = 0; k < 16; ++k) {
      dst[i + k] = src[i + 2 * k];
      dst[i + 16 + k] = src[i + 2 * k + 1];
    }
  }
  for (; i < n; ++i) dst[i] = src[i];
}

template <bool AFFINE>
void forward_rows(const at::BFloat16* x, at::BFloat16* y, const float* w, const float* b, int64_t rows, int64_t n,
                  double eps) {
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const at::BFloat16* xr = x + r * n;
      at::BFloat16* yr = y + r * n;
      const float rstd = 1.0f / std::sqrt(row_sumsq(xr, n) / static_cast<float>(n) + static_cast<float>(eps));
      const __m512 rv = _mm512_set1_ps(rstd);
      __m512 a, c;
      const bool ahead = r + 1 < end;
      int64_t i = 0;
      for (; i + 32 <= n; i += 32) {
        if (ahead) prefetch_step<at::BFloat16, 32>(xr + n + i);
        widen(_mm512_loadu_si512(xr + i), a, c);
        if constexpr (AFFINE) {
          a = _mm512_fmadd_ps(_mm512_mul_ps(a, rv), _mm512_loadu_ps(w + i), _mm512_loadu_ps(b + i));
          c = _mm512_fmadd_ps(_mm512_mul_ps(c, rv), _mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(b + i + 16));
        } else {
          a = _mm512_mul_ps(a, rv);
          c = _mm512_mul_ps(c, rv);
        }
        _mm512_storeu_si512(yr + i, narrow(a, c));
      }
      // the tail, in the natural order (permute leaves it as it is)
      if (i < n) forward_step<at::BFloat16, AFFINE, float>(xr, yr, w, b, i, Vectorized<float>(rv), n - i);
    }
  });
}

}  // namespace bf16_avx512
#endif

// Fused residual add: h = x + r (written, rounded to T), y = rms_norm(h) * w + b, per row in two passes
// (pass 1 adds, stores h and sums the squares of the stored values; pass 2 reads h back from cache).  One read
// of x and r and one write of h and y: the unfused add + norm reads h once more.
template <typename T, typename P = at::opmath_type<T>>
void add_forward_rows(const T* x, const T* res, T* h, T* y, const P* w, const P* b, int64_t rows, int64_t n,
                      double eps) {
  using IO = Io<T>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int64_t S = IO::kStep;
  constexpr int64_t H = V::size();
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(2 * n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * n;
      const T* rr = res + r * n;
      T* hr = h + r * n;
      T* yr = y + r * n;
      V s0(acc_t(0)), s1(acc_t(0));
      V a, c, d, e;
      int64_t i = 0;
      for (; i + S <= n; i += S) {
        IO::load(xr + i, a, c);
        IO::load(rr + i, d, e);
        IO::store(hr + i, a + d, c + e);
        if constexpr (!std::is_same_v<T, acc_t>) IO::load(hr + i, a, c);  // the rounded sum, as the norm sees it
        else { a = a + d; c = c + e; }
        s0 = at::vec::fmadd(a, a, s0);
        s1 = at::vec::fmadd(c, c, s1);
      }
      acc_t ss = at::vec::vec_reduce_all<acc_t>([](V& u, V& v) { return u + v; }, s0 + s1);
      for (int64_t j = i; j < n; ++j) {
        hr[j] = static_cast<T>(static_cast<acc_t>(xr[j]) + static_cast<acc_t>(rr[j]));
        const acc_t v = static_cast<acc_t>(hr[j]);
        ss += v * v;
      }
      const acc_t rstd = acc_t(1) / std::sqrt(ss / static_cast<acc_t>(n) + static_cast<acc_t>(eps));
      const V rv(rstd);
      const bool ahead = r + 1 < end;
      for (i = 0; i + S <= n; i += S) {
        if (ahead) {
          prefetch_step<T, S>(xr + n + i);
          prefetch_step<T, S>(rr + n + i);
        }
        IO::load(hr + i, a, c);
        if constexpr (std::is_same_v<P, acc_t>) {
          a = at::vec::fmadd(a * rv, V::loadu(w + i), V::loadu(b + i));
          c = at::vec::fmadd(c * rv, V::loadu(w + i + H), V::loadu(b + i + H));
        } else {
          IO::load(w + i, d, e);
          a = a * rv * d;
          c = c * rv * e;
          IO::load(b + i, d, e);
          a = a + d;
          c = c + e;
        }
        IO::store(yr + i, a, c);
      }
      for (; i < n; ++i) {
        yr[i] = static_cast<T>(static_cast<acc_t>(hr[i]) * rstd * static_cast<acc_t>(w[i]) + static_cast<acc_t>(b[i]));
      }
    }
  });
}

// o = row - mean(row) over d contiguous values (o may be row).  Two passes (sum, then subtract: the row is in
// cache); the second prefetches ``next`` (the row to come, or nullptr).
template <typename T>
inline void center_row(const T* row, T* o, int64_t d, const T* next = nullptr) {
  using IO = Io<T>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int64_t S = IO::kStep;
  V s0(acc_t(0)), s1(acc_t(0)), a, c;
  int64_t i = 0;
  for (; i + S <= d; i += S) {
    IO::load(row + i, a, c);
    s0 = s0 + a;
    s1 = s1 + c;
  }
  acc_t sum = at::vec::vec_reduce_all<acc_t>([](V& u, V& v) { return u + v; }, s0 + s1);
  for (int64_t j = i; j < d; ++j) sum += static_cast<acc_t>(row[j]);
  const acc_t mean = sum / static_cast<acc_t>(d);
  const V mv(mean);
  for (i = 0; i + S <= d; i += S) {
    if (next != nullptr) prefetch_step<T, S>(next + i);
    IO::load(row + i, a, c);
    IO::store(o + i, a - mv, c - mv);
  }
  for (; i < d; ++i) o[i] = static_cast<T>(static_cast<acc_t>(row[i]) - mean);
}

// Rows of an embedding table, each minus its own mean: out[i] = w[ids[i]] - mean(w[ids[i]]), one call instead
// of a lookup, a mean and a subtraction (the centered lookup of a table tied to an LM head).
template <typename T>
void centered_rows(const T* w, const int64_t* ids, T* out, int64_t count, int64_t d) {
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(d, 1));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      center_row<T>(w + ids[r] * d, out + r * d, d, r + 1 < end ? w + ids[r + 1] * d : nullptr);
    }
  });
}

// The bf16 forward of this build, laying w and b out in its own order (``permute``): at most one exists.
#if defined(LIGHTNING_CBWC_NATIVE_BF16)
#define LIGHTNING_CBWC_BF16_PATH 1
namespace bf16_path = bf16_avx512;
#elif defined(LIGHTNING_CBWC_BF16_AVX2)
#define LIGHTNING_CBWC_BF16_PATH 1
namespace bf16_path = bf16_avx2;
#endif

// dx for rows [begin, end) and, when SUMS, the partial sums (length n, accumulation type) dbp += g and, when
// HAS_W, dwp += g * x * rstd.  Without SUMS (dx alone: frozen norm parameters, e.g. LoRA) the second pass
// skips their loads and stores, which cost as much as dx's own work there.
template <typename T, bool HAS_W, bool SUMS>
void backward_block(const T* g, const T* x, T* dx, const at::opmath_type<T>* w, at::opmath_type<T>* dwp,
                    at::opmath_type<T>* dbp, int64_t begin, int64_t end, int64_t n, double eps, bool zero_mean) {
  using IO = Io<T>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int64_t S = IO::kStep;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  for (int64_t r = begin; r < end; ++r) {
    const T* gr = g + r * n;
    const T* xr = x + r * n;
    T* dxr = dx + r * n;
    // pass 1: sum(x^2), sum(g * w * x) and sum(g * w) (LayerNorm's extra term, used when zero_mean)
    V ss0(acc_t(0)), ss1(acc_t(0)), dt0(acc_t(0)), dt1(acc_t(0)), gs0(acc_t(0)), gs1(acc_t(0));
    auto sums_step = [&](int64_t i, int64_t count) {
      V xa, xb, ga, gb;
      IO::load_n(xr + i, count, xa, xb);
      IO::load_n(gr + i, count, ga, gb);
      ss0 = at::vec::fmadd(xa, xa, ss0);
      ss1 = at::vec::fmadd(xb, xb, ss1);
      if constexpr (HAS_W) {
        V wa, wb;
        Io<acc_t>::load_n(w + i, count, wa, wb);
        ga = ga * wa;
        gb = gb * wb;
      }
      dt0 = at::vec::fmadd(ga, xa, dt0);
      dt1 = at::vec::fmadd(gb, xb, dt1);
      gs0 = gs0 + ga;
      gs1 = gs1 + gb;
    };
    int64_t i = 0;
    for (; i + S <= n; i += S) sums_step(i, S);
    if (i < n) sums_step(i, n - i);
    auto add = [](V& u, V& v) { return u + v; };
    const acc_t ss = at::vec::vec_reduce_all<acc_t>(add, ss0 + ss1);
    const acc_t dot = at::vec::vec_reduce_all<acc_t>(add, dt0 + dt1);
    const acc_t gsum = at::vec::vec_reduce_all<acc_t>(add, gs0 + gs1);
    const acc_t rstd = acc_t(1) / std::sqrt(ss * inv_n + static_cast<acc_t>(eps));
    const acc_t coef = dot * rstd * rstd * rstd * inv_n;
    // On a zero-mean input LayerNorm's dx is RMSNorm's minus r * mean(g * w): subtracted from g * w below.
    const acc_t gmean = zero_mean ? gsum * inv_n : acc_t(0);
    const V rv(rstd), cv(coef), mv(gmean);
    // pass 2 (row in cache): dx = r * (g * w - gmean) - coef * x;  dw += g * x * r;  db += g
    const bool ahead = r + 1 < end;
    auto dx_step = [&](int64_t i, int64_t count) {
      if (ahead && count == S) {
        prefetch_step<T, S>(xr + n + i);
        prefetch_step<T, S>(gr + n + i);
      }
      V xa, xb, ga, gb;
      IO::load_n(xr + i, count, xa, xb);
      IO::load_n(gr + i, count, ga, gb);
      if constexpr (SUMS) {
        V da, db;
        Io<acc_t>::load_n(dbp + i, count, da, db);
        Io<acc_t>::store_n(dbp + i, da + ga, db + gb, count);
      }
      if constexpr (HAS_W) {
        if constexpr (SUMS) {
          V da, db;
          Io<acc_t>::load_n(dwp + i, count, da, db);
          Io<acc_t>::store_n(dwp + i, at::vec::fmadd(ga, xa * rv, da), at::vec::fmadd(gb, xb * rv, db), count);
        }
        V wa, wb;
        Io<acc_t>::load_n(w + i, count, wa, wb);
        ga = ga * wa;
        gb = gb * wb;
      }
      IO::store_n(dxr + i, at::vec::fmsub(rv, ga - mv, cv * xa), at::vec::fmsub(rv, gb - mv, cv * xb), count);
    };
    i = 0;
    for (; i + S <= n; i += S) dx_step(i, S);
    if (i < n) dx_step(i, n - i);
  }
}

// Per-block partial sums of dweight and dbias, every panel on its own cache lines: two threads writing
// neighbouring panels would otherwise share a line at each boundary, and that false sharing cost 2.6x the
// whole backward at 3200 x 96.  Block b's dweight panel is panel(2b), its dbias panel panel(2b + 1).
template <typename acc_t>
struct BlockSums {
  static constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(acc_t));
  std::vector<acc_t> buf;
  acc_t* base = nullptr;
  int64_t stride = 0;
  BlockSums(int64_t panels, int64_t n) : stride((n + kLine - 1) / kLine * kLine) {
    if (panels == 0) return;
    buf.assign(panels * stride + kLine, acc_t(0));
    const auto addr = reinterpret_cast<std::uintptr_t>(buf.data());
    base = buf.data() + ((64 - addr % 64) % 64) / sizeof(acc_t);  // malloc aligns to 16: a whole acc_t count
  }
  acc_t* panel(int64_t i) { return base + i * stride; }
};

template <typename T, bool HAS_W, bool SUMS>
void backward_rows(const T* g, const T* x, T* dx, const at::opmath_type<T>* w, BlockSums<at::opmath_type<T>>& sums,
                   int64_t nblocks, int64_t rows, int64_t n, double eps, bool zero_mean) {
  const int64_t per_block = (rows + nblocks - 1) / nblocks;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      // zeroed at allocation; each block writes only its own two panels
      auto* dwp = HAS_W && SUMS ? sums.panel(2 * blk) : nullptr;
      auto* dbp = SUMS ? sums.panel(2 * blk + 1) : nullptr;
      const int64_t begin = std::min(rows, blk * per_block);
      const int64_t end = std::min(rows, begin + per_block);
      backward_block<T, HAS_W, SUMS>(g, x, dx, w, dwp, dbp, begin, end, n, eps, zero_mean);
    }
  });
}

int64_t check_shapes(const at::Tensor& x, at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias) {
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(k >= 1, "rms_norm: normalized_shape must have at least one dim");
  TORCH_CHECK(x.dim() >= k, "rms_norm: input of shape ", x.sizes(), " has fewer dims than normalized_shape ",
              normalized_shape);
  int64_t n = 1;
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(x.size(x.dim() - k + i) == normalized_shape[i], "rms_norm: input of shape ", x.sizes(),
                " does not end with normalized_shape ", normalized_shape);
    n *= normalized_shape[i];
  }
  for (const auto* p : {&weight, &bias}) {
    if (p->has_value() && (*p)->defined()) {
      TORCH_CHECK((*p)->numel() == n && (*p)->sizes().equals(normalized_shape), "rms_norm: weight/bias of shape ",
                  (*p)->sizes(), " does not match normalized_shape ", normalized_shape);
      TORCH_CHECK((*p)->device() == x.device(), "rms_norm: weight/bias on ", (*p)->device(), ", input on ",
                  x.device());
    }
  }
  return n;
}

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Below this many rows, 16-bit w and b are read in their own dtype instead of converted once per call.
constexpr int64_t kFewRows = 16;

template <typename T>
bool same_dtype_params(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  const auto st = c10::CppTypeToScalarType<T>::value;
  for (const auto* p : {&weight, &bias}) {
    if (!present(*p) || (*p)->scalar_type() != st || !(*p)->is_contiguous()) return false;
  }
  return true;
}

// An affine parameter as n contiguous values of the accumulation type: its own data when it already is that,
// otherwise converted into ``buf`` (a missing one: filled with ``fill``).  A plain loop over n values, not a
// tensor op: two .to() calls on small bf16 vectors cost ~7 us of dispatch per call, most of a small norm.
template <typename acc_t>
const acc_t* param_values(const std::optional<at::Tensor>& t, int64_t n, acc_t fill, std::vector<acc_t>& buf) {
  if (present(t) && t->scalar_type() == c10::CppTypeToScalarType<acc_t>::value && t->is_contiguous()) {
    return t->const_data_ptr<acc_t>();
  }
  buf.resize(n);
  if (!present(t)) {
    std::fill(buf.begin(), buf.end(), fill);
  } else {
    const at::Tensor c = t->contiguous();
    if constexpr (std::is_same_v<acc_t, float>) {
      if (c.scalar_type() == at::kBFloat16) {  // a bf16 value is the top half of a float: a loop that vectorizes
        const auto* src = reinterpret_cast<const uint16_t*>(c.const_data_ptr());
        for (int64_t i = 0; i < n; ++i) {
          const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
          std::memcpy(&buf[i], &bits, sizeof(float));
        }
        return buf.data();
      }
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "rms_norm_param", [&] {
      const scalar_t* src = c.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
    });
  }
  return buf.data();
}

// out[i] = sum over blocks of part[block * step + i] (in block order: deterministic for a given thread count),
// cast to out's dtype.  out is contiguous with n elements.
template <typename acc_t>
void reduce_blocks(const acc_t* part, int64_t nblocks, int64_t step, int64_t n, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "rms_norm_reduce", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      acc_t v = part[i];
      for (int64_t blk = 1; blk < nblocks; ++blk) v += part[blk * step + i];
      o[i] = static_cast<scalar_t>(v);
    }
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Entry points (registered with the dispatcher in rms_norm_op.cpp).

namespace lightning_cbwc {

at::Tensor rms_norm_cpu(const at::Tensor& x_in, at::IntArrayRef normalized_shape,
                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                        double eps) {
  const int64_t n = check_shapes(x_in, normalized_shape, weight, bias);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  const int64_t rows = x.numel() / n;
  const bool affine = present(weight) || present(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lightning_cbwc::rms_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      // A few rows (token-by-token decoding) of a 16-bit input with its own-dtype w and b: read them as they
      // are.  Converting (and laying out) 2n parameters first would cost more than the rows themselves.
      if (rows < kFewRows && same_dtype_params<scalar_t>(weight, bias)) {
        forward_rows<scalar_t, true, scalar_t>(xp, yp, weight->const_data_ptr<scalar_t>(),
                                               bias->const_data_ptr<scalar_t>(), rows, n, eps);
        return;
      }
    }
#if defined(LIGHTNING_CBWC_BF16_PATH)
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      // (the lambda is not a template, so the branch is compiled for every dtype: hence the casts)
      const auto* xb = reinterpret_cast<const at::BFloat16*>(xp);
      auto* yb = reinterpret_cast<at::BFloat16*>(yp);
      if (affine) {
        std::vector<float> wbuf, bbuf;
        std::vector<float> wb(2 * n);
        bf16_path::permute(param_values<float>(weight, n, 1.0f, wbuf), wb.data(), n);
        bf16_path::permute(param_values<float>(bias, n, 0.0f, bbuf), wb.data() + n, n);
        bf16_path::forward_rows<true>(xb, yb, wb.data(), wb.data() + n, rows, n, eps);
      } else {
        bf16_path::forward_rows<false>(xb, yb, nullptr, nullptr, rows, n, eps);
      }
      return;
    }
#endif
    if (affine) {
      std::vector<acc_t> wbuf, bbuf;
      const acc_t* wp = param_values<acc_t>(weight, n, acc_t(1), wbuf);
      const acc_t* bp = param_values<acc_t>(bias, n, acc_t(0), bbuf);
      forward_rows<scalar_t, true>(xp, yp, wp, bp, rows, n, eps);
    } else {
      forward_rows<scalar_t, false, acc_t>(xp, yp, nullptr, nullptr, rows, n, eps);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x_in, const at::Tensor& res_in,
                                                    at::IntArrayRef normalized_shape,
                                                    const std::optional<at::Tensor>& weight,
                                                    const std::optional<at::Tensor>& bias, double eps) {
  const int64_t n = check_shapes(x_in, normalized_shape, weight, bias);
  TORCH_CHECK(res_in.sizes().equals(x_in.sizes()) && res_in.scalar_type() == x_in.scalar_type(),
              "add_rms_norm: residual of shape ", res_in.sizes(), " and dtype ", res_in.scalar_type(),
              " for an input of shape ", x_in.sizes(), " and dtype ", x_in.scalar_type(),
              ": they must match (no broadcasting)");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor res = res_in.contiguous();
  at::Tensor h = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return {y, h};
  const int64_t rows = x.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lightning_cbwc::add_rms_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      if (rows < kFewRows && same_dtype_params<scalar_t>(weight, bias)) {  // as in rms_norm_cpu
        add_forward_rows<scalar_t, scalar_t>(x.const_data_ptr<scalar_t>(), res.const_data_ptr<scalar_t>(),
                                             h.mutable_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                             weight->const_data_ptr<scalar_t>(), bias->const_data_ptr<scalar_t>(),
                                             rows, n, eps);
        return;
      }
    }
    std::vector<acc_t> wbuf, bbuf;
    const acc_t* wp = param_values<acc_t>(weight, n, acc_t(1), wbuf);
    const acc_t* bp = param_values<acc_t>(bias, n, acc_t(0), bbuf);
    add_forward_rows<scalar_t>(x.const_data_ptr<scalar_t>(), res.const_data_ptr<scalar_t>(),
                               h.mutable_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), wp, bp, rows, n,
                               eps);
  });
  return {y, h};
}

// center_columns_: every tensor minus its mean over one dim, in place.  A tensor is seen as [pre, D, post]
// (D = its size along the dim); each work item is one (tensor, pre index, panel of post columns as wide as
// keeps it in L2): the first pass sums the D rows of the panel, the second subtracts the means while the panel
// is still in cache; over the last dim (post = 1), a chunk of contiguous rows.  All tensors in one parallel
// loop, no per-tensor dispatch.
namespace {
constexpr int64_t kPanel = 1024;

// Columns [c0, c1) (at most kPanel) of a (d, post) block: as wide as keeps the panel (256k values) in L2 for
// the 2nd pass, at least 64 (whole cache lines, sequential enough for the prefetchers), and narrower when
// one tensor alone would give fewer panels than threads: then a multiple of 32 columns, so that two threads'
// panels of a 16-bit tensor never share a cache line (false sharing on every row).
int64_t panel_width(int64_t d, int64_t post, int64_t panels_wanted) {
  int64_t w = std::clamp<int64_t>((int64_t{1} << 18) / std::max<int64_t>(d, 1), 64, kPanel);
  w = std::min(w, (post + panels_wanted - 1) / panels_wanted);
  return std::max<int64_t>(32, (w + 31) / 32 * 32);
}

// Sums run in the working type (float; double for double) over blocks of kSumBlock rows, so the inner loops
// vectorize, and the block sums add up in double.
constexpr int64_t kSumBlock = 32;

template <typename T>
void center_panel(T* base, int64_t d, int64_t post, int64_t c0, int64_t c1) {
  using work_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  double sums[kPanel] = {};
  work_t block[kPanel];
  const int64_t w = c1 - c0;
  for (int64_t r0 = 0; r0 < d; r0 += kSumBlock) {
    for (int64_t j = 0; j < w; ++j) block[j] = work_t(0);
    for (int64_t r = r0; r < std::min(d, r0 + kSumBlock); ++r) {
      const T* row = base + r * post + c0;
      for (int64_t j = 0; j < w; ++j) block[j] += static_cast<work_t>(row[j]);
    }
    for (int64_t j = 0; j < w; ++j) sums[j] += static_cast<double>(block[j]);
  }
  work_t means[kPanel];
  for (int64_t j = 0; j < w; ++j) means[j] = static_cast<work_t>(sums[j] / static_cast<double>(d));
  for (int64_t r = 0; r < d; ++r) {
    T* row = base + r * post + c0;
    for (int64_t j = 0; j < w; ++j) row[j] = static_cast<T>(static_cast<work_t>(row[j]) - means[j]);
  }
}
}  // namespace

void center_columns_cpu(at::TensorList tensors, at::IntArrayRef dims) {
  TORCH_CHECK(tensors.size() == dims.size(), "center_columns_: ", tensors.size(), " tensors but ", dims.size(),
              " dims");
  struct Item {
    size_t t;
    int64_t p, c0, c1;
  };
  std::vector<Item> items;
  std::vector<std::array<int64_t, 3>> layout(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "center_columns_: tensor ", i,
                " must be a contiguous CPU tensor");
    const int64_t dim = at::maybe_wrap_dim(dims[i], t.dim());
    int64_t pre = 1, post = 1;
    for (int64_t k = 0; k < dim; ++k) pre *= t.size(k);
    for (int64_t k = dim + 1; k < t.dim(); ++k) post *= t.size(k);
    const int64_t d = t.size(dim);
    layout[i] = {pre, d, post};
    if (t.numel() == 0) continue;
    if (post == 1) {  // the mean over contiguous rows: chunks of rows
      const int64_t rows = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(d, 1));
      for (int64_t p = 0; p < pre; p += rows) items.push_back({i, -1, p, std::min(pre, p + rows)});
      continue;
    }
    const int64_t width = panel_width(d, post, tensors.size() == 1 ? at::get_num_threads() : 1);
    for (int64_t p = 0; p < pre; ++p)
      for (int64_t c = 0; c < post; c += width) items.push_back({i, p, c, std::min(post, c + width)});
  }
  const int64_t n = static_cast<int64_t>(items.size());
  if (n == 0) return;
  at::parallel_for(0, n, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t k = b0; k < b1; ++k) {
      const Item& it = items[k];
      const at::Tensor& t = tensors[it.t];
      const auto [pre, d, post] = layout[it.t];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "center_columns_", [&] {
        scalar_t* data = t.data_ptr<scalar_t>();
        if (it.p < 0) {
          for (int64_t r = it.c0; r < it.c1; ++r) {
            center_row<scalar_t>(data + r * d, data + r * d, d, r + 1 < it.c1 ? data + (r + 1) * d : nullptr);
          }
        } else {
          center_panel<scalar_t>(data + it.p * d * post, d, post, it.c0, it.c1);
        }
      });
    }
  });
}

at::Tensor centered_embedding_cpu(const at::Tensor& weight_in, const at::Tensor& indices) {
  TORCH_CHECK(weight_in.dim() == 2, "centered_embedding: weight must be 2-D (num_embeddings, dim), got ",
              weight_in.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
              "centered_embedding: indices must be int64 or int32, got ", indices.scalar_type());
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor ids = indices.to(at::kLong).contiguous();
  const int64_t num = weight.size(0), d = weight.size(1), count = ids.numel();
  const int64_t* ip = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(ip[i] >= 0 && ip[i] < num, "centered_embedding: index ", ip[i], " out of range for ", num,
                " embeddings");
  }
  std::vector<int64_t> out_shape(indices.sizes().begin(), indices.sizes().end());
  out_shape.push_back(d);
  at::Tensor out = at::empty(out_shape, weight.options());
  if (count == 0 || d == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "centered_embedding", [&] {
    centered_rows<scalar_t>(weight.const_data_ptr<scalar_t>(), ip, out.mutable_data_ptr<scalar_t>(), count, d);
  });
  return out;
}

// Outputs not asked for in output_mask are returned as empty (size 0) tensors.  The two row passes compute
// dx and, when dweight or dbias is asked for, both partial sums together.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_in,
                                                                     const at::Tensor& x_in,
                                                                     at::IntArrayRef normalized_shape,
                                                                     const std::optional<at::Tensor>& weight,
                                                                     double eps, std::array<bool, 3> mask,
                                                                     bool zero_mean) {
  const int64_t n = check_shapes(x_in, normalized_shape, weight, std::nullopt);
  TORCH_CHECK(grad_in.sizes().equals(x_in.sizes()), "rms_norm_backward: grad of shape ", grad_in.sizes(),
              " for input of shape ", x_in.sizes());
  const bool has_w = present(weight);
  const bool need_dw = mask[1] && has_w;
  const bool need_db = mask[2];
  const at::Tensor x = x_in.contiguous();
  const at::Tensor g = grad_in.to(x.scalar_type()).contiguous();
  at::Tensor dx = mask[0] ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  at::Tensor dw = need_dw ? at::empty(normalized_shape, weight->options()) : at::empty({0}, x.options());
  at::Tensor db = need_db ? at::empty(normalized_shape, x.options()) : at::empty({0}, x.options());
  if (!mask[0] && !need_dw && !need_db) return {dx, dw, db};
  if (x.numel() == 0) {
    if (need_dw) dw.zero_();
    if (need_db) db.zero_();
    return {dx, dw, db};
  }
  const int64_t rows = x.numel() / n;
  at::Tensor dx_buf = mask[0] ? dx : at::empty_like(x, at::MemoryFormat::Contiguous);
  // One block of rows per thread, but no block smaller than ~kGrainSize elements of work.
  const int64_t max_blocks = std::max<int64_t>(1, x.numel() / kGrainSize);
  const int64_t nblocks = std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()),
                                                                    rows, max_blocks}));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lightning_cbwc::rms_norm_backward",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx_buf.mutable_data_ptr<scalar_t>();
    // Per-block partial sums in plain buffers, reduced by a loop: no tensor ops, which cost a small call
    // more than its arithmetic.
    const bool sums = need_dw || need_db;
    BlockSums<acc_t> parts(sums ? 2 * nblocks : 0, n);
    std::vector<acc_t> wbuf;
    const acc_t* wp = has_w ? param_values<acc_t>(weight, n, acc_t(1), wbuf) : nullptr;
    if (has_w && sums) {
      backward_rows<scalar_t, true, true>(gp, xp, dxp, wp, parts, nblocks, rows, n, eps, zero_mean);
    } else if (has_w) {
      backward_rows<scalar_t, true, false>(gp, xp, dxp, wp, parts, nblocks, rows, n, eps, zero_mean);
    } else if (sums) {
      backward_rows<scalar_t, false, true>(gp, xp, dxp, nullptr, parts, nblocks, rows, n, eps, zero_mean);
    } else {
      backward_rows<scalar_t, false, false>(gp, xp, dxp, nullptr, parts, nblocks, rows, n, eps, zero_mean);
    }
    if (need_dw) reduce_blocks<acc_t>(parts.panel(0), nblocks, 2 * parts.stride, n, dw);
    if (need_db) reduce_blocks<acc_t>(parts.panel(1), nblocks, 2 * parts.stride, n, db);
  });
  return {dx, dw, db};
}

std::string build_info() {
#if defined(CPU_CAPABILITY_AVX512)
  std::string s = "AVX512";
#if defined(LIGHTNING_CBWC_NATIVE_BF16)
  s += " + native bf16";
#endif
#elif defined(CPU_CAPABILITY_AVX2)
  std::string s = "AVX2";
#else
  std::string s = "no SIMD capability";
#endif
#ifdef _OPENMP
  s += ", OpenMP, " + std::to_string(at::get_num_threads()) + " threads";
#else
  s += ", no OpenMP (serial)";
#endif
  return s;
}

}  // namespace lightning_cbwc
