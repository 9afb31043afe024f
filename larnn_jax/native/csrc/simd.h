// Portable SIMD: GCC/Clang vector extensions of the widest width the target has, and the
// element-wise functions of the LARNN step on such vectors.
//
// The width comes from the compiler's target flags (-march=native): 64 bytes with AVX-512, 32 with
// AVX, 16 otherwise (SSE2, NEON). Code written with these types compiles and is correct on any
// target; the compiler splits a vector that the target cannot hold in one register.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace larnn {

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

// Registers available for a matrix product's accumulators (32 with AVX-512 and on AArch64).
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif

template <typename T>
struct VectorOf {
  typedef T type __attribute__((vector_size(kVectorBytes)));
};
template <typename T>
using Vec = typename VectorOf<T>::type;

// The signed integer of the same width as T, and its vector.
template <typename T>
using IntOf = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
template <typename T>
using IntVec = Vec<IntOf<T>>;

// Lanes per vector.
template <typename T>
constexpr int kLanes = kVectorBytes / sizeof(T);

inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
inline Vec<T> splat(T x) {
  return Vec<T>{} + x;
}

template <typename T>
inline T lane_sum(Vec<T> v) {
  T total = 0;
  for (int i = 0; i < kLanes<T>; ++i) total += v[i];
  return total;
}

// max(a, b) and min(a, b) lane by lane; a NaN in `a` stays NaN (as XLA's maximum and minimum
// keep it), so that clamping a NaN does not turn it into a number.
template <typename T>
inline Vec<T> vmax(Vec<T> a, Vec<T> b) {
  return b > a ? b : a;
}

template <typename T>
inline Vec<T> vmin(Vec<T> a, Vec<T> b) {
  return b < a ? b : a;
}

// Asks the caches for `bytes` bytes from p on (for reading, or for writing with `write`): a
// sample's window is read from memory while the previous sample is being computed.
inline void prefetch(const void* p, int64_t bytes, bool write = false) {
  const char* c = static_cast<const char*>(p);
  for (int64_t offset = 0; offset < bytes; offset += 64) {
    if (write) {
      __builtin_prefetch(c + offset, 1, 3);
    } else {
      __builtin_prefetch(c + offset, 0, 3);
    }
  }
}

// exp(x), vectorised: x = n ln2 + r with |r| <= ln2 / 2, exp(x) = 2^n exp(r). Arguments are
// clamped to the range where 2^n is a normal number (results near 0 or near the largest finite
// value outside it, never inf); exp(NaN) is NaN. Relative error: about 1 ulp in float (Cephes' expf
// polynomial), below 1e-16 in double (Taylor series to degree 13).
template <typename T>
inline Vec<T> vexp(Vec<T> x) {
  using I = IntOf<T>;
  constexpr bool single = sizeof(T) == 4;
  constexpr int mantissa = single ? 23 : 52;
  constexpr I bias = single ? 127 : 1023;
  const T lo = single ? T(-87.0) : T(-708.0);
  const T hi = single ? T(88.0) : T(709.0);
  const T magic = T(1.5) * (single ? T(8388608.0) : T(4503599627370496.0));  // 1.5 * 2^mantissa
  const T ln2_hi = single ? T(0.693359375) : T(6.93145751953125e-1);
  const T ln2_lo = single ? T(-2.12194440e-4) : T(1.42860682030941723212e-6);
  x = vmin<T>(vmax<T>(x, splat<T>(lo)), splat<T>(hi));
  Vec<T> shifted = x * T(1.44269504088896340736) + magic;  // round(x / ln2) in the low bits
  Vec<T> n = shifted - magic;
  Vec<T> r = x - n * ln2_hi - n * ln2_lo;
  Vec<T> p;
  if constexpr (single) {
    p = splat<T>(T(1.9875691500e-4));
    p = p * r + T(1.3981999507e-3);
    p = p * r + T(8.3334519073e-3);
    p = p * r + T(4.1665795894e-2);
    p = p * r + T(1.6666665459e-1);
    p = p * r + T(5.0000001201e-1);
    p = p * (r * r) + r + T(1);
  } else {
    const T inverse_factorials[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0,
                                    1.0 / 3628800.0,    1.0 / 362880.0,    1.0 / 40320.0,
                                    1.0 / 5040.0,       1.0 / 720.0,       1.0 / 120.0,
                                    1.0 / 24.0,         1.0 / 6.0,         0.5,
                                    1.0,                1.0};
    p = splat<T>(inverse_factorials[0]);
    for (int i = 1; i < 14; ++i) p = p * r + inverse_factorials[i];
  }
  IntVec<T> exponent = ((IntVec<T>)shifted - (IntVec<T>)splat<T>(magic) + bias) << mantissa;
  return p * (Vec<T>)exponent;
}

// elu(x) = x for x > 0, exp(x) - 1 otherwise.
template <typename T>
inline Vec<T> velu(Vec<T> x) {
  return x > T(0) ? x : vexp<T>(vmin<T>(x, splat<T>(T(0)))) - T(1);
}

// elu'(x) from y = elu(x): 1 where y > 0 (x > 0), y + 1 = exp(x) elsewhere.
template <typename T>
inline Vec<T> velu_grad_from_output(Vec<T> y) {
  return y > T(0) ? splat<T>(T(1)) : y + T(1);
}

template <typename T>
inline Vec<T> vsigmoid(Vec<T> x) {
  return T(1) / (T(1) + vexp<T>(-x));
}

template <typename T>
inline Vec<T> vtanh(Vec<T> x) {
  return T(2) / (T(1) + vexp<T>(T(-2) * x)) - T(1);
}

}  // namespace larnn
