// The parameters of a LARNN layer in the native step's layouts, and what the forward and backward
// passes share: dropout factors, batch-norm affine maps, reductions across the team.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__AVX512DQ__)
#include <immintrin.h>
#endif

#include "layout.h"
#include "simd.h"
#include "team.h"
#include "threefry.h"

namespace larnn {

// Which of a step's three keys draws which dropout mask.
enum KeyIndex : int { kKeyEntering = 0, kKeyAttention = 1, kKeyOutput = 2 };

template <typename T>
struct Model {
  Layout<T> layout;
  Options options;
  Inputs<T> in;

  // Products (all row-major, K x N): [q | z] = x @ W0 (D x QZ) + b0 + h @ W1 (H x QZ),
  // z += a @ Wa (H x G), [E_K | E_V] = c' @ Wkv (H x 2 Ha), W_o attended = attended @ Wo
  // (Ha x Hn); and the transposes of the recurrent ones for the backward pass.
  Array<T> W0, W1, W1T, Wa, WaT, Wkv, WkvT, Wo, WoT;
  Array<T> input_bias;   // (QZ): b0 = [b_q | b]
  Array<T> entry_bias;   // (2 Ha): b_k, b_v
  Array<T> attention_output_bias;  // (Hn): b_o
  Array<T> positions;    // (2, k, Ha)
  // Norm parameters: key scale, value scale and bias (Ha); attention scale and bias (Hn); gate
  // scale and bias (G); cell and output scales and biases (Hn).
  Array<T> key_scale, value_scale, value_bias, attention_scale, attention_bias, gate_scale,
      gate_bias, cell_scale, cell_bias, output_scale, output_bias;
  Array<T> running;      // the running averages in these layouts (RunningOffsets order)
  Array<T> reference;    // (2, Ha): the entries of a zero cell state (elu(b_k), elu(b_v))
  Array<T> head_lanes;   // (np): 1 for the real heads, 0 for the padding
  T score_scale;         // 1 / sqrt(d_k)
  // Inverted dropout's factor where an element is kept, 1 / keep probability, as
  // larnn_jax.cell.dropout_factors computes it (in double precision, then rounded to T).
  T kv_factor, attention_factor, output_factor;

  // Offsets into `running`, which holds [mean, var] of each norm back to back.
  int64_t run_key, run_value, run_attention, run_gate, run_cell, run_output;

  Model(const Shape& shape, const Options& opts, const Inputs<T>& inputs)
      : layout(shape, opts), options(opts), in(inputs) {
    const Layout<T>& L = layout;
    const int64_t H = L.H, Ha = L.Ha, Hn = L.Hn, G = L.G, QZ = L.QZ;
    W1.resize(H * QZ);
    Wa.resize(H * G);
    Wkv.resize(H * 2 * Ha);
    Wo.resize(Ha * Hn);
    for (int64_t r = 0; r < H; ++r) {
      for (int64_t i = 0; i < H; ++i) {
        W1[r * QZ + L.head_minor(i)] = in.query_kernel[r * H + i];
        Wkv[r * 2 * Ha + L.head_minor(i)] = in.key_kernel[r * H + i];
        Wkv[r * 2 * Ha + Ha + L.head_minor(i)] = in.value_kernel[r * H + i];
        Wo[L.head_minor(r) * Hn + i] = in.output_kernel[r * H + i];
        for (int64_t g = 0; g < 4; ++g) {
          W1[r * QZ + Ha + g * Hn + i] = in.hidden_kernel[r * 4 * H + g * H + i];
          Wa[r * G + g * Hn + i] = in.attention_kernel[r * 4 * H + g * H + i];
        }
      }
    }
    W0.resize(L.D * QZ);
    input_bias.resize(QZ);
    for (int64_t i = 0; i < H; ++i) {
      for (int64_t r = 0; r < L.D; ++r) {
        W0[r * QZ + L.head_minor(i)] = in.query_input_kernel[r * H + i];
        for (int64_t g = 0; g < 4; ++g) {
          W0[r * QZ + Ha + g * Hn + i] = in.gate_input_kernel[r * 4 * H + g * H + i];
        }
      }
      input_bias[L.head_minor(i)] = in.query_bias[i];
      for (int64_t g = 0; g < 4; ++g) input_bias[Ha + g * Hn + i] = in.gate_bias[g * H + i];
    }
    transpose(W1, H, QZ, W1T, Hn);
    transpose(Wa, H, G, WaT, Hn);
    transpose(Wkv, H, 2 * Ha, WkvT, Hn);
    transpose(Wo, Ha, Hn, WoT, Ha);

    entry_bias.resize(2 * Ha);
    attention_output_bias.resize(Hn);
    positions.resize(2 * L.k * Ha);
    for (int64_t i = 0; i < H; ++i) {
      entry_bias[L.head_minor(i)] = in.key_bias[i];
      entry_bias[Ha + L.head_minor(i)] = in.value_bias[i];
      attention_output_bias[i] = in.output_bias[i];
      if (options.positional) {
        for (int64_t kind = 0; kind < 2; ++kind) {
          for (int64_t j = 0; j < L.k; ++j) {
            positions[(kind * L.k + j) * Ha + L.head_minor(i)] =
                in.positions[(kind * L.k + j) * H + i];
          }
        }
      }
    }

    const NormOffsets norms(H);
    key_scale = head_minor_vector(in.norms + norms.key_scale);
    value_scale = head_minor_vector(in.norms + norms.value_scale);
    value_bias = head_minor_vector(in.norms + norms.value_bias);
    attention_scale = natural_vector(in.norms + norms.attention_scale, 1);
    attention_bias = natural_vector(in.norms + norms.attention_bias, 1);
    gate_scale = natural_vector(in.norms + norms.gate_scale, 4);
    gate_bias = natural_vector(in.norms + norms.gate_bias, 4);
    cell_scale = natural_vector(in.norms + norms.cell_scale, 1);
    cell_bias = natural_vector(in.norms + norms.cell_bias, 1);
    output_scale = natural_vector(in.norms + norms.output_scale, 1);
    output_bias = natural_vector(in.norms + norms.output_bias, 1);

    const RunningOffsets run(H);
    run_key = 0;
    run_value = run_key + 2 * Ha;
    run_attention = run_value + 2 * Ha;
    run_gate = run_attention + 2 * Hn;
    run_cell = run_gate + 2 * G;
    run_output = run_cell + 2 * Hn;
    running.resize(run_output + 2 * Hn);
    for (int64_t part = 0; part < 2; ++part) {  // mean, var
      for (int64_t i = 0; i < H; ++i) {
        running[run_key + part * Ha + L.head_minor(i)] = in.running[run.key + part * H + i];
        running[run_value + part * Ha + L.head_minor(i)] = in.running[run.value + part * H + i];
        running[run_attention + part * Hn + i] = in.running[run.attention + part * H + i];
        running[run_cell + part * Hn + i] = in.running[run.cell + part * H + i];
        running[run_output + part * Hn + i] = in.running[run.output + part * H + i];
        for (int64_t g = 0; g < 4; ++g) {
          running[run_gate + part * G + g * Hn + i] =
              in.running[run.gate + part * 4 * H + g * H + i];
        }
      }
    }

    reference.resize(2 * Ha);
    for (int64_t i = 0; i < 2 * Ha; i += kLanes<T>) {
      store(reference.data() + i, velu<T>(load(entry_bias.data() + i)));
    }
    head_lanes.resize(L.np);
    for (int64_t h = 0; h < L.n; ++h) head_lanes[h] = T(1);
    score_scale = T(1.0 / std::sqrt(double(L.dk)));
    kv_factor = kept_factor(options.kv_levels);
    attention_factor = kept_factor(options.attention_levels);
    output_factor = kept_factor(options.output_levels);
  }

  // Writes running averages in these layouts (as `running`) in the natural order (RunningOffsets).
  void export_running(const Array<T>& running, T* out) const {
    const Layout<T>& L = layout;
    const int64_t H = L.H;
    const RunningOffsets run(H);
    for (int64_t part = 0; part < 2; ++part) {
      for (int64_t i = 0; i < H; ++i) {
        out[run.key + part * H + i] = running[run_key + part * L.Ha + L.head_minor(i)];
        out[run.value + part * H + i] = running[run_value + part * L.Ha + L.head_minor(i)];
        out[run.attention + part * H + i] = running[run_attention + part * L.Hn + i];
        out[run.cell + part * H + i] = running[run_cell + part * L.Hn + i];
        out[run.output + part * H + i] = running[run_output + part * L.Hn + i];
        for (int64_t g = 0; g < 4; ++g) {
          out[run.gate + part * 4 * H + g * H + i] = running[run_gate + part * L.G + g * L.Hn + i];
        }
      }
    }
  }

  // A step's saved window statistics (training) → key mean, key var, value mean, value var (4 Ha).
  // With carried moment sums they are kept as the mean deviation from the reference entry and the
  // variance before its clamp at 0 (as larnn_jax.window.moments_from_sums computes them), which
  // the backward pass needs; otherwise as mean and variance.
  void window_moments(const T* stats, T* moments) const {
    const int64_t Ha = layout.Ha;
    for (int kind = 0; kind < 2; ++kind) {
      const T* saved = stats + 2 * kind * Ha;
      T* mean = moments + 2 * kind * Ha;
      for (int64_t i = 0; i < Ha; ++i) {
        if (options.carries_moments()) {
          mean[i] = reference[kind * Ha + i] + saved[i];
          mean[Ha + i] = std::max(saved[Ha + i], T(0));
        } else {
          mean[i] = saved[i];
          mean[Ha + i] = saved[Ha + i];
        }
      }
    }
  }

  // How many entries sample b's window holds at step t.
  int64_t count(int64_t b, int64_t t) const {
    return std::min<int64_t>(int64_t(in.count[b]) + t + 1, layout.k);
  }

  // With positional encoding, the window's features of rows [r0, r1) at step t, elu(E_j + P_j)
  // (or E_j + P_j without activation), into `window` (2, B, k, Ha), from the entries buffers.
  void window_features(const T* keys, const T* values, int64_t t, int64_t r0, int64_t r1,
                       T* window) const {
    const Layout<T>& L = layout;
    for (int64_t b = r0; b < r1; ++b) {
      for (int64_t j = 0; j < count(b, t); ++j) {
        for (int kind = 0; kind < 2; ++kind) {
          const T* e = (kind == 0 ? keys : values) + L.entry_offset(L.T_ - t + j, b);
          const T* p = positions.data() + (kind * L.k + j) * L.Ha;
          T* w = window + ((kind * L.B + b) * L.k + j) * L.Ha;
          for (int64_t i = 0; i < L.Ha; i += kLanes<T>) {
            const Vec<T> v = load(e + i) + load(p + i);
            store(w + i, options.activation ? velu<T>(v) : v);
          }
        }
      }
    }
  }

  static T kept_factor(uint32_t levels) { return T(1.0 / (double(levels) / kDropoutLevels)); }

  RandomKey key(int64_t step, KeyIndex which) const {
    const uint32_t* k = in.keys + (step * 3 + which) * 2;
    return RandomKey{k[0], k[1]};
  }

  // A row of a window state's array (WindowState: head-minor, unpadded, position d n + h) to the
  // head-minor layout (Ha, position d np + h), and back.
  void from_window_order(const T* window, T* head_minor) const {
    const Layout<T>& L = layout;
    for (int64_t d = 0; d < L.dk; ++d) {
      std::memcpy(head_minor + d * L.np, window + d * L.n, sizeof(T) * L.n);
    }
  }
  void to_window_order(const T* head_minor, T* window) const {
    const Layout<T>& L = layout;
    for (int64_t d = 0; d < L.dk; ++d) {
      std::memcpy(window + d * L.n, head_minor + d * L.np, sizeof(T) * L.n);
    }
  }

  // A row of a natural-order array (feature h d_k + d at h d_k + d) to the head-minor layout (Ha),
  // and back.
  void to_head_minor(const T* natural, T* head_minor) const {
    const Layout<T>& L = layout;
    for (int64_t d = 0; d < L.dk; ++d) {
      for (int64_t h = 0; h < L.n; ++h) head_minor[d * L.np + h] = natural[h * L.dk + d];
    }
  }
  // (natural: feature i at natural[i * stride])
  void from_head_minor(const T* head_minor, T* natural, int64_t stride = 1) const {
    const Layout<T>& L = layout;
    for (int64_t d = 0; d < L.dk; ++d) {
      for (int64_t h = 0; h < L.n; ++h) {
        natural[(h * L.dk + d) * stride] = head_minor[d * L.np + h];
      }
    }
  }

 private:
  static void transpose(const Array<T>& a, int64_t rows, int64_t cols, Array<T>& out,
                        int64_t out_cols) {
    out.resize(cols * out_cols);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) out[c * out_cols + r] = a[r * cols + c];
    }
  }
  Array<T> head_minor_vector(const T* natural) const {
    Array<T> out(layout.Ha);
    to_head_minor(natural, out.data());
    return out;
  }
  Array<T> natural_vector(const T* natural, int64_t blocks) const {
    Array<T> out(blocks * layout.Hn);
    for (int64_t g = 0; g < blocks; ++g) {
      for (int64_t i = 0; i < layout.H; ++i) out[g * layout.Hn + i] = natural[g * layout.H + i];
    }
    return out;
  }
};

// A step's batch norms as affine maps (FeatureNorm.scale_and_shift): the window's key scale and
// value scale and shift (head-minor, Ha; the key norm's shift cancels in the softmax), then the
// scales and shifts of the attention output's (Hn), the gates' (G), the cell state's and the
// output's (Hn) norms.
template <typename T>
struct StepNorms {
  Array<T> storage;
  T *key_scale, *value_scale, *value_shift, *attention_scale, *attention_shift, *gate_scale,
      *gate_shift, *cell_scale, *cell_shift, *output_scale, *output_shift;

  explicit StepNorms(const Layout<T>& L) : storage(3 * L.Ha + 2 * L.Hn + 2 * L.G + 4 * L.Hn) {
    key_scale = storage.data();
    value_scale = key_scale + L.Ha;
    value_shift = value_scale + L.Ha;
    attention_scale = value_shift + L.Ha;
    attention_shift = attention_scale + L.Hn;
    gate_scale = attention_shift + L.Hn;
    gate_shift = gate_scale + L.G;
    cell_scale = gate_shift + L.G;
    cell_shift = cell_scale + L.Hn;
    output_scale = cell_shift + L.Hn;
    output_shift = output_scale + L.Hn;
  }

  // The window's maps from its moments: key mean, key var, value mean, value var (4 Ha).
  void set_window(const Model<T>& model, const T* moments);
};

// Batch norm as an affine map, as FeatureNorm.scale_and_shift computes it:
// scale = gamma * rsqrt(var + eps), shift = beta - mean * scale (beta null: no bias).
template <typename T>
inline void norm_affine(const T* gamma, const T* beta, const T* mean, const T* var, int64_t size,
                        T* scale, T* shift) {
  for (int64_t i = 0; i < size; ++i) {
    scale[i] = gamma[i] * (T(1) / std::sqrt(var[i] + T(kEpsilon)));
    shift[i] = (beta != nullptr ? beta[i] : T(0)) - mean[i] * scale[i];
  }
}

template <typename T>
void StepNorms<T>::set_window(const Model<T>& model, const T* moments) {
  const int64_t Ha = model.layout.Ha;
  T* ignored = value_shift;  // written over next
  norm_affine<T>(model.key_scale.data(), nullptr, moments, moments + Ha, Ha, key_scale, ignored);
  norm_affine<T>(model.value_scale.data(), model.value_bias.data(), moments + 2 * Ha,
                 moments + 3 * Ha, Ha, value_scale, value_shift);
}

// r <- momentum r + (1 - momentum) batch, as FeatureNorm updates its running averages.
template <typename T>
inline void update_running(T* running, const T* batch, int64_t size) {
  for (int64_t i = 0; i < size; ++i) {
    running[i] = T(kMomentum) * running[i] + T(1.0 - kMomentum) * batch[i];
  }
}

// The members' rows of the batch: contiguous, whole micro-kernel row blocks where possible.
inline void member_rows(int64_t batch, int member, int members, int64_t& first, int64_t& end) {
  const int64_t per = round_up((batch + members - 1) / members, 8);
  first = std::min<int64_t>(batch, member * per);
  end = std::min<int64_t>(batch, first + per);
}

// Sums of per-member partial results, identical in every member (added in member order).
template <typename T>
class Reducer {
 public:
  Reducer(int members, int64_t capacity, Barrier& barrier)
      : members_(members), capacity_(round_up(capacity, 16)), barrier_(barrier) {
    for (auto& slots : slots_) slots.resize(members_ * capacity_);
  }

  // out[i] = Σ_members local[i] for i < size; every member calls it with its own `local`. Two
  // slot arrays alternate, so that a member's next write never meets a slower member's read.
  void sum(int member, int& parity, const T* local, int64_t size, T* out) {
    if (members_ == 1) {
      if (out != local) std::memcpy(out, local, sizeof(T) * size);
      return;
    }
    T* slots = slots_[parity].data();
    parity ^= 1;
    std::memcpy(slots + member * capacity_, local, sizeof(T) * size);
    barrier_.wait();
    for (int64_t i = 0; i < size; ++i) {
      T total = slots[i];
      for (int m = 1; m < members_; ++m) total += slots[m * capacity_ + i];
      out[i] = total;
    }
  }

 private:
  int members_;
  int64_t capacity_;
  Barrier& barrier_;
  Array<T> slots_[2];
};

// Multiplies row `row` of a natural-order (B, H) array, x (padded to Hn), by its dropout factors:
// `factor` where kept, 0 where dropped (elements row * H + i of the (B, H) mask); `words` needs
// room for Hn / 2 + 2 kLanes<uint32_t> words.
template <typename T>
inline void apply_dropout(const Model<T>& model, RandomKey key, uint32_t levels, T factor,
                          int64_t row, T* x, uint32_t* words) {
  constexpr int lanes = kLanes<T>;
  typedef uint16_t Halves __attribute__((vector_size(lanes * 2)));
  const int64_t H = model.layout.H;
  const uint16_t* halves = random_halves(key, row * H, H, words);
  for (int64_t i = 0; i < model.layout.Hn; i += lanes) {
    Halves values;
    std::memcpy(&values, halves + i, sizeof(values));
    const IntVec<T> wide = __builtin_convertvector(values, IntVec<T>);
    // lanes past H are padding (0 in x), whatever their random halves
    store(x + i, wide < IntOf<T>(levels) ? load(x + i) * factor : Vec<T>{});
  }
}

// The bits of a vector mask (lanes all ones or zero), lane i in bit i.
template <typename T>
inline uint32_t mask_bits(IntVec<T> mask) {
#if defined(__AVX512DQ__)
  if constexpr (sizeof(T) == 4) return _mm512_movepi32_mask((__m512i)mask);
  if constexpr (sizeof(T) == 8) return _mm512_movepi64_mask((__m512i)mask);
#endif
  uint32_t bits = 0;
  for (int lane = 0; lane < kLanes<T>; ++lane) bits |= uint32_t(mask[lane] & 1) << lane;
  return bits;
}

// The vector mask of `bits` (lane i all ones where bit i is set).
template <typename T>
inline IntVec<T> bits_mask(uint32_t bits) {
  IntVec<T> lane_index;
  for (int lane = 0; lane < kLanes<T>; ++lane) lane_index[lane] = lane;
  return ((IntVec<T>{} + IntOf<T>(bits)) >> lane_index & 1) != 0;
}

// The attention dropout factors of sample `row` (1 / p where kept, 0 where dropped, 0 on the
// padding heads): entry j's (np) at the result + j * the returned stride. Without dropout, the
// padding mask itself (stride 0); with it, `factors` (k, np), drawn (`words`: room for
// k n / 2 + 2 kLanes<uint32_t>) and written to `bits` as one mask per (j, block of kLanes heads)
// (if not null), or read from `saved`.
template <typename T>
inline const T* attention_factors(const Model<T>& model, RandomKey key, int64_t row, T* factors,
                                  uint32_t* words, uint16_t* bits, const uint16_t* saved,
                                  int64_t& stride) {
  const Layout<T>& L = model.layout;
  constexpr int lanes = kLanes<T>;
  const int64_t blocks = L.np / lanes;
  if (model.options.attention_levels >= kDropoutLevels) {
    stride = 0;
    return model.head_lanes.data();
  }
  stride = L.np;
  typedef uint16_t Halves __attribute__((vector_size(lanes * 2)));
  const T inverse = model.attention_factor;
  const IntOf<T> levels = IntOf<T>(model.options.attention_levels);
  const uint16_t* halves = saved == nullptr
                               ? random_halves(key, row * L.k * L.n, L.k * L.n, words)
                               : nullptr;
  for (int64_t j = 0; j < L.k; ++j) {
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t h = block * lanes;
      IntVec<T> kept;
      if (saved != nullptr) {
        kept = bits_mask<T>(saved[j * blocks + block]);
      } else {
        Halves values;
        std::memcpy(&values, halves + j * L.n + h, sizeof(values));
        kept = __builtin_convertvector(values, IntVec<T>) < levels;
        if (bits != nullptr) bits[j * blocks + block] = uint16_t(mask_bits<T>(kept));
      }
      const Vec<T> factor = kept ? splat<T>(inverse) : splat<T>(T(0));
      store(factors + j * L.np + h, factor * load(model.head_lanes.data() + h));
    }
  }
  return factors;
}

}  // namespace larnn
