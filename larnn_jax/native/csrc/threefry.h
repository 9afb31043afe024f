// Dropout keep decisions, bit for bit those of larnn_jax.cell.dropout_keep_mask.
//
// dropout_keep_mask(key, rate, shape) draws jax.random.bits(key, ((size + 1) // 2,), uint32) and
// splits every 32-bit word into two 16-bit halves, low half first; element e is kept when its half
// is below `levels` = round((1 - rate) * 2^16). With JAX's default PRNG (threefry2x32, with
// jax_threefry_partitionable, the default since JAX 0.5), word i is x0 ^ x1 of the Threefry-2x32
// hash of the counter (0, i) under the key. This file computes the same words, vectorised over i.
#pragma once

#include <algorithm>
#include <cstdint>

#include "simd.h"

namespace larnn {

struct RandomKey {
  uint32_t k0, k1;
};

namespace threefry_detail {

using Words = Vec<uint32_t>;
constexpr int kWordLanes = kLanes<uint32_t>;

template <int r>
inline Words rotate_left(Words x) {
  return (x << r) | (x >> (32 - r));
}

template <int r0, int r1, int r2, int r3>
inline void four_rounds(Words& x0, Words& x1) {
  x0 += x1; x1 = rotate_left<r0>(x1); x1 ^= x0;
  x0 += x1; x1 = rotate_left<r1>(x1); x1 ^= x0;
  x0 += x1; x1 = rotate_left<r2>(x1); x1 ^= x0;
  x0 += x1; x1 = rotate_left<r3>(x1); x1 ^= x0;
}

// Words first .. first + kWordLanes - 1 of jax.random.bits(key, (n,), uint32), for any n > them.
inline Words random_words(RandomKey key, uint32_t first) {
  const uint32_t ks0 = key.k0, ks1 = key.k1, ks2 = key.k0 ^ key.k1 ^ 0x1BD11BDAu;
  Words lane;
  for (int i = 0; i < kWordLanes; ++i) lane[i] = uint32_t(i);  // a constant
  const Words counter = lane + first;
  Words x0 = Words{} + ks0;  // the counter's high word is 0
  Words x1 = counter + ks1;
  four_rounds<13, 15, 26, 6>(x0, x1);
  x0 += ks1; x1 += ks2 + 1u;
  four_rounds<17, 29, 16, 24>(x0, x1);
  x0 += ks2; x1 += ks0 + 2u;
  four_rounds<13, 15, 26, 6>(x0, x1);
  x0 += ks0; x1 += ks1 + 3u;
  four_rounds<17, 29, 16, 24>(x0, x1);
  x0 += ks1; x1 += ks2 + 4u;
  four_rounds<13, 15, 26, 6>(x0, x1);
  x0 += ks2; x1 += ks0 + 5u;
  return x0 ^ x1;
}

}  // namespace threefry_detail

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "a word's 16-bit halves are read in memory order: low half first");

// out[i] = word first + i of jax.random.bits(key, (n,), uint32) for i < count, written in whole
// vectors: out needs room for count rounded up to kLanes<uint32_t>. Element e of
// dropout_keep_mask's array is the 16-bit half e % 2 (low half first) of word e / 2, so the
// halves of elements 2 first ... are ((const uint16_t*) out)[0 ...].
inline void random_words(RandomKey key, int64_t first, int64_t count, uint32_t* out) {
  using namespace threefry_detail;
  for (int64_t i = 0; i < count; i += kWordLanes) {
    const Words words = threefry_detail::random_words(key, uint32_t(first + i));
    std::memcpy(out + i, &words, sizeof(words));
  }
}

// The random halves of elements first ... first + count - 1 (see random_words): a pointer into
// `words` (room for count / 2 + 1 + kLanes<uint32_t> words).
inline const uint16_t* random_halves(RandomKey key, int64_t first, int64_t count,
                                     uint32_t* words) {
  const int64_t first_word = first >> 1;
  const int64_t last_word = (first + count - 1) >> 1;
  random_words(key, first_word, last_word - first_word + 1, words);
  return reinterpret_cast<const uint16_t*>(words) + (first & 1);
}

}  // namespace larnn
