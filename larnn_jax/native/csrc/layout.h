// Shapes, options, memory layouts and the arguments of a LARNN layer's native forward and backward
// passes. Everything here is shared by the forward (forward.h), the backward (backward.h) and the
// XLA FFI handlers (larnn_ffi.cc).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <utility>

#include "simd.h"

namespace larnn {

constexpr double kEpsilon = 1e-5;   // FeatureNorm.epsilon
constexpr double kMomentum = 0.99;  // FeatureNorm.momentum
constexpr uint32_t kDropoutLevels = 1u << 16;

struct Shape {
  int64_t batch;        // B
  int64_t steps;        // T
  int64_t features;     // H
  int64_t num_heads;    // n
  int64_t window_size;  // k
  int64_t inputs;       // D, the features of the layer's input sequence
};

struct Options {
  bool training;     // batch statistics (updating the running averages) and dropout
  bool positional;   // use_positional_encoding
  bool activation;   // activation_on_keys_and_values (then BN∘elu on keys and values, folded)
  bool save_residuals;
  // Dropout: an element is kept when its 16-bit random half is below `levels`; kDropoutLevels
  // means no dropout (nothing is drawn).
  uint32_t kv_levels, attention_levels, output_levels;
  int threads;

  // The window's entries hold elu(W c + b) (else W c + b), and its batch statistics come from the
  // per-sample moment sums carried with the window (larnn_jax.window.WindowScheme).
  bool caches_activation() const { return activation && !positional; }
  bool carries_moments() const { return activation && !positional; }
};

// Memory blocks kept between calls, by size: the scratch of a call comes from the blocks of the
// calls before it, so that its pages are not mapped and zeroed by the kernel at every call
// (what a large fresh allocation costs with glibc's malloc). At most kCachedBytes are kept.
class BlockCache {
 public:
  static constexpr size_t kCachedBytes = size_t(512) << 20;
  static BlockCache& instance() {
    static BlockCache* cache = new BlockCache;  // never destroyed: blocks outlive static objects
    return *cache;
  }
  void* get(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto found = free_.find(bytes);
      if (found != free_.end()) {
        void* block = found->second;
        free_.erase(found);
        cached_ -= bytes;
        return block;
      }
    }
    return std::aligned_alloc(64, bytes);
  }
  void put(void* block, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    while (cached_ + bytes > kCachedBytes && !free_.empty()) {
      auto largest = std::prev(free_.end());
      cached_ -= largest->first;
      std::free(largest->second);
      free_.erase(largest);
    }
    if (cached_ + bytes > kCachedBytes) {
      std::free(block);
      return;
    }
    free_.emplace(bytes, block);
    cached_ += bytes;
  }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
};

// A 64-byte aligned, zero-initialised array (from BlockCache).
template <typename T>
class Array {
 public:
  Array() = default;
  explicit Array(int64_t size) { resize(size); }
  Array(Array&& other) noexcept { *this = std::move(other); }
  Array& operator=(Array&& other) noexcept {
    release();
    data_ = other.data_;
    size_ = other.size_;
    bytes_ = other.bytes_;
    other.data_ = nullptr;
    other.size_ = other.bytes_ = 0;
    return *this;
  }
  Array(const Array&) = delete;
  Array& operator=(const Array&) = delete;
  ~Array() { release(); }

  void resize(int64_t size) {
    release();
    bytes_ = size_t(round_up(std::max<int64_t>(size, 1) * int64_t(sizeof(T)), 64));
    data_ = static_cast<T*>(BlockCache::instance().get(bytes_));
    std::memset(data_, 0, bytes_);
    size_ = size;
  }
  T* data() const { return data_; }
  T& operator[](int64_t i) const { return data_[i]; }
  int64_t size() const { return size_; }

 private:
  void release() {
    if (data_ != nullptr) BlockCache::instance().put(data_, bytes_);
    data_ = nullptr;
  }
  T* data_ = nullptr;
  int64_t size_ = 0;
  size_t bytes_ = 0;
};

// Internal layouts. Feature axes are padded to whole vectors:
// * natural (Hn): feature i at i;
// * gates (G = 4 Hn): gate g's feature i at g Hn + i (gates g, f, i, o);
// * head-minor (Ha = d_k np): feature i = h d_k + d of head h at d np + h, heads padded to np: a
//   vector holds one component of np heads, so a head's sum over its d_k features is a sum of d_k
//   vectors.
template <typename T>
struct Layout {
  Shape shape;
  int64_t B, T_, D, H, n, dk, k;
  int64_t Hn, np, Ha, G, QZ, S;

  Layout(const Shape& s, const Options& options) : shape(s) {
    B = s.batch;
    T_ = s.steps;
    D = s.inputs;
    H = s.features;
    n = s.num_heads;
    dk = H / n;
    k = s.window_size;
    Hn = round_up(H, kLanes<T>);
    np = round_up(n, kLanes<T>);
    Ha = dk * np;
    G = 4 * Hn;
    QZ = Ha + G;  // a row of [q | z]
    S = options.carries_moments() ? 4 : 0;
  }
  int64_t head_minor(int64_t i) const { return (i % dk) * np + i / dk; }
  // The entries buffer: slot T - t holds the entry that enters at step t (from c_{t-1}); slots
  // T + 1 ... T + k - 1 the initial window's entries; slot 0 is unused.
  int64_t slots() const { return T_ + k; }
  // Sample-major: a sample's window is one contiguous block (k Ha) of its buffer.
  int64_t entry_offset(int64_t slot, int64_t row) const { return (row * slots() + slot) * Ha; }
  int64_t entry_stride() const { return slots() * Ha; }  // from one sample's slot to the next's

  // Per-step statistics of the batch norms in training (mean and variance each): the window's
  // keys and values (head-minor), the attention output, the gates, the cell state, the output.
  int64_t stats_size() const { return 4 * Ha + 2 * Hn + 2 * G + 2 * Hn + 2 * Hn; }
  int64_t stats_window() const { return 0; }
  int64_t stats_attention() const { return 4 * Ha; }
  int64_t stats_gates() const { return stats_attention() + 2 * Hn; }
  int64_t stats_cell() const { return stats_gates() + 2 * G; }
  int64_t stats_output() const { return stats_cell() + 2 * Hn; }

  // The forward pass's residual buffer, in elements of T: what the backward pass reads.
  struct Residual {
    int64_t keys, values, query, context, activation, gates, maxima, sums, totals, stats, masks,
        size;
  };
  Residual residual(bool full) const {
    Residual r{};
    int64_t offset = 0;
    auto take = [&](int64_t size) {
      const int64_t at = offset;
      offset += round_up(size, 64);
      return at;
    };
    const int64_t rows = T_ * B;
    r.keys = take(slots() * B * Ha);
    r.values = take(slots() * B * Ha);
    if (full) {
      r.query = take(rows * Ha);       // q = elu(W_q [x ; h] + b_q), before the key scale
      r.context = take(rows * Ha);     // Σ_j kept_j E_V,j
      r.activation = take(rows * Hn);  // u = elu(W_o attended + b_o)
      r.gates = take(rows * G);        // z before its norm
      r.maxima = take(rows * np);      // the softmax's maximum score per head
      r.sums = take(rows * np);        // and its sum of exponentials
      r.totals = take(rows * np);      // Σ_j kept_j per head
      r.stats = take(T_ * stats_size());
      // the attention dropout masks: per step, sample and entry, np / kLanes<T> 16-bit words
      r.masks = take((T_ * B * k * (np / kLanes<T>) * 2 + sizeof(T) - 1) / sizeof(T));
    }
    r.size = offset;
    return r;
  }
  // The backward pass's scratch: the cotangents of the entries buffers.
  int64_t backward_scratch_size() const { return 2 * round_up(slots() * B * Ha, 64); }
};

// Norm parameters, natural order, concatenated (FeatureNorm scale and bias of each norm).
struct NormOffsets {
  int64_t key_scale, value_scale, value_bias, attention_scale, attention_bias, gate_scale,
      gate_bias, cell_scale, cell_bias, output_scale, output_bias, size;
  explicit NormOffsets(int64_t H) {
    key_scale = 0;
    value_scale = H;
    value_bias = 2 * H;
    attention_scale = 3 * H;
    attention_bias = 4 * H;
    gate_scale = 5 * H;
    gate_bias = 9 * H;
    cell_scale = 13 * H;
    cell_bias = 14 * H;
    output_scale = 15 * H;
    output_bias = 16 * H;
    size = 17 * H;
  }
};

// Running averages, natural order, concatenated: mean and var of the key, value, attention,
// gate (4H each), cell and output norms.
struct RunningOffsets {
  int64_t key, value, attention, gate, cell, output, size;  // each: mean, then var
  explicit RunningOffsets(int64_t H) {
    key = 0;
    value = 2 * H;
    attention = 4 * H;
    gate = 6 * H;
    cell = 14 * H;
    output = 16 * H;
    size = 18 * H;
  }
};

template <typename T>
struct Inputs {
  const T* sequence;     // (T, B, D): the layer's input x_t
  const T* h0;           // (B, H)
  const T* c0;           // (B, H)
  const T* window_keys;    // (B, k-1, H) head-minor
  const T* window_values;  // (B, k-1, H) head-minor
  const int32_t* count;    // (B,)
  const T* moment_sums;    // (B, S, H) head-minor
  const uint32_t* keys;    // (T + 1, 3, 2): step t's dropout keys: kv (for c_{t-1}), attention, output
  const int32_t* last;     // (B,): the step after which each sample's final carry is taken
  const T* query_input_kernel;  // (D, H): W_q^x
  const T* query_bias;     // (H): b_q
  const T* gate_input_kernel;  // (D, 4H): W_x
  const T* gate_bias;      // (4H): b
  const T* query_kernel;   // (H, H): W_q^h
  const T* hidden_kernel;  // (H, 4H)
  const T* attention_kernel;  // (H, 4H)
  const T* key_kernel;     // (H, H)
  const T* key_bias;       // (H)
  const T* value_kernel;   // (H, H)
  const T* value_bias;     // (H)
  const T* output_kernel;  // (H, H): W_o
  const T* output_bias;    // (H)
  const T* positions;      // (2, k, H): the projected positional encodings of keys and values
  const T* norms;          // NormOffsets
  const T* running;        // RunningOffsets
};

template <typename T>
struct ForwardOutputs {
  T* outputs;        // (T, B, H)
  T* cells;          // (T, B, H)
  T* final_keys;     // (B, k-1, H) head-minor
  T* final_values;   // (B, k-1, H) head-minor
  T* final_sums;     // (B, S, H) head-minor
  T* running;        // RunningOffsets, after the sequence
  T* residual;       // Layout::residual
};

template <typename T>
struct Cotangents {
  const T* outputs;       // (T, B, H)
  const T* cells;         // (T, B, H)
  const T* final_keys;    // (B, k-1, H)
  const T* final_values;  // (B, k-1, H)
  const T* final_sums;    // (B, S, H)
};

template <typename T>
struct BackwardOutputs {
  T* query;      // (T, B, H): cotangent of q's pre-activation (= of W_q^x x_t + b_q)
  T* gates;      // (T, B, 4H): cotangent of z before its norm (= of W_x x_t + b)
  T* attention;  // (T, B, H): cotangent of W_o attended + b_o
  T* entries;    // (T, B, 2H): cotangent of W_k c' + b_k and W_v c' + b_v, entry of c_{t-1} at t
  // The left operands of the weights' gradients, transposed: (H, T B), step t's sample b in
  // column t B + b.
  T* activated;  // a_t, the attention norm's output
  T* attended;   // the attention's result, natural order
  T* dropped;    // c_{t-1} after key/value dropout
  T* hidden;     // h_{t-1}
  T* norms;      // NormOffsets
  T* positions;  // (2, k, H)
  T* h0;         // (B, H)
  T* c0;         // (B, H)
  T* window_keys;    // (B, k-1, H)
  T* window_values;  // (B, k-1, H)
  T* moment_sums;    // (B, S, H)
  T* scratch;        // Layout::backward_scratch_size
};

}  // namespace larnn
