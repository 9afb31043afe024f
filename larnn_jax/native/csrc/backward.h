// The backward pass of a LARNN layer: the recurrent chain of cotangents, step T - 1 down to 0.
//
// It recomputes each step's element-wise activations from what the forward pass saved, pulls the
// cotangents of h_t, c_t, the window's entries and the carried moment sums back through the step,
// and writes, for every step, the cotangents of the pre-activations whose weight gradients are
// large products over all T·B rows (left to XLA): q, z, W_o attended + b_o, the entries; and the
// activations those products need (a_t, attended, c' after key/value dropout). The gradients of
// the norms' scales and biases and of the positional encodings are summed here.
#pragma once

#include <cmath>
#include <cstdint>

#include "gemm.h"
#include "model.h"
#include "profile.h"

namespace larnn {

template <typename T>
class Backward {
 public:
  Backward(const Model<T>& model, const ForwardOutputs<T>& forward, const Cotangents<T>& dout,
           const BackwardOutputs<T>& out, int members, Barrier& barrier)
      : m_(model), L_(model.layout), fwd_(forward), dout_(dout), out_(out), members_(members),
        barrier_(barrier), reducer_(members, 3 * L_.Ha + 2 * L_.G, barrier),
        residual_(L_.residual(true)) {
    const Layout<T>& L = L_;
    const int64_t B = L.B;
    dh_.resize(B * L.Hn);
    dc_.resize(B * L.Hn);
    dsums_.resize(B * L.S * L.Ha);
    dqz_.resize(B * L.QZ);
    normalised_gates_.resize(B * L.G);
    d_gates_.resize(B * L.G);
    cell_activation_.resize(B * L.Hn);
    output_input_.resize(B * L.Hn);
    dy_.resize(B * L.Hn);
    dc_prev_.resize(B * L.Hn);
    da_.resize(B * L.Hn);
    datt_.resize(B * L.Ha);
    dcd_.resize(B * L.Hn);
    if (model.options.positional) window_.resize(2 * B * L.k * L.Ha);
    accumulators_.resize(members * accumulator_size());
  }

  void run(int member) {
    const Layout<T>& L = L_;
    int64_t r0, r1;
    member_rows(L.B, member, members_, r0, r1);
    Local local(L, accumulators_.data() + member * accumulator_size());
    int parity = 0;
    prepare(r0, r1);
    for (int64_t t = L.T_ - 1; t >= 0; --t) step(member, parity, t, r0, r1, local);
    finish(r0, r1);
    barrier_.wait();
    if (member == 0) write_accumulated();
  }

 private:
  // Accumulated over the steps, per member: the norms' scale and bias gradients in the internal
  // layouts (NormOffsets order) and the positional encodings' (2, k, Ha).
  struct Accumulated {
    int64_t key_scale, value_scale, value_bias, attention_scale, attention_bias, gate_scale,
        gate_bias, cell_scale, cell_bias, output_scale, output_bias, positions, size;
  };
  Accumulated accumulated() const {
    const Layout<T>& L = L_;
    Accumulated a{};
    int64_t offset = 0;
    auto take = [&](int64_t size) {
      const int64_t at = offset;
      offset += size;
      return at;
    };
    a.key_scale = take(L.Ha);
    a.value_scale = take(L.Ha);
    a.value_bias = take(L.Ha);
    a.attention_scale = take(L.Hn);
    a.attention_bias = take(L.Hn);
    a.gate_scale = take(L.G);
    a.gate_bias = take(L.G);
    a.cell_scale = take(L.Hn);
    a.cell_bias = take(L.Hn);
    a.output_scale = take(L.Hn);
    a.output_bias = take(L.Hn);
    a.positions = take(2 * L.k * L.Ha);
    a.size = round_up(offset, 16);
    return a;
  }
  int64_t accumulator_size() const { return accumulated().size; }

  struct Local {
    Array<T> alpha, d_alpha, factors;  // (k, np) each
    Array<uint32_t> words;  // random words for the dropout masks
    Array<T> partial, row, moments;
    StepNorms<T> norms;
    T* accumulated;
    Local(const Layout<T>& L, T* accumulators)
        : alpha(L.k * L.np), d_alpha(L.k * L.np), factors(L.k * L.np),
          words(std::max(L.k * L.n, L.Hn) / 2 + 4 * kLanes<uint32_t>), partial(11 * L.Ha + 4 * L.G),
          row(std::max(7 * L.Ha + 2 * L.np, L.G) + kLanes<T>),
          moments(4 * L.Ha), norms(L),
          accumulated(accumulators) {}
  };

  const T* saved(int64_t offset) const { return fwd_.residual + offset; }
  const T* entry(const T* buffer, int64_t slot, int64_t row) const {
    return buffer + L_.entry_offset(slot, row);
  }
  T* d_entry(int kind, int64_t slot, int64_t row) const {
    return out_.scratch + kind * round_up(L_.slots() * L_.B * L_.Ha, 64) +
           L_.entry_offset(slot, row);
  }
  const T* keys_buffer() const { return saved(residual_.keys); }
  const T* values_buffer() const { return saved(residual_.values); }
  int64_t count(int64_t b, int64_t t) const { return m_.count(b, t); }
  const T* window_row(int kind, int64_t b, int64_t j, int64_t t) const {
    if (m_.options.positional) return window_.data() + ((kind * L_.B + b) * L_.k + j) * L_.Ha;
    return entry(kind == 0 ? keys_buffer() : values_buffer(), L_.T_ - t + j, b);
  }
  // c_{t-1}: the initial c, or step t - 1's.
  void previous_cell(int64_t t, int64_t b, T* c) const {
    const T* source = t == 0 ? m_.in.c0 + b * L_.H : fwd_.cells + ((t - 1) * L_.B + b) * L_.H;
    std::memset(c, 0, sizeof(T) * L_.Hn);
    std::memcpy(c, source, sizeof(T) * L_.H);
  }

  void prepare(int64_t r0, int64_t r1) {
    const Layout<T>& L = L_;
    for (int kind = 0; kind < 2; ++kind) {
      if (r1 > r0) std::memset(d_entry(kind, 0, r0), 0, sizeof(T) * (r1 - r0) * L.entry_stride());
    }
    // The final carry's window: entries T - last ... T - last + k - 2.
    for (int64_t b = r0; b < r1; ++b) {
      const int64_t last = m_.in.last[b];
      for (int64_t j = 0; j + 1 < L.k; ++j) {
        const T* cotangents[2] = {dout_.final_keys, dout_.final_values};
        for (int kind = 0; kind < 2; ++kind) {
          T* d = d_entry(kind, L.T_ - last + j, b);
          const T* window = cotangents[kind] + (b * (L.k - 1) + j) * L.H;
          for (int64_t p = 0; p < L.H; ++p) d[(p / L.n) * L.np + p % L.n] += window[p];
        }
      }
    }
  }

  void finish(int64_t r0, int64_t r1) {
    const Layout<T>& L = L_;
    for (int64_t b = r0; b < r1; ++b) {
      std::memcpy(out_.h0 + b * L.H, dh_.data() + b * L.Hn, sizeof(T) * L.H);
      std::memcpy(out_.c0 + b * L.H, dc_.data() + b * L.Hn, sizeof(T) * L.H);
      for (int64_t j = 0; j + 1 < L.k; ++j) {
        m_.to_window_order(d_entry(0, L.T_ + 1 + j, b),
                           out_.window_keys + (b * (L.k - 1) + j) * L.H);
        m_.to_window_order(d_entry(1, L.T_ + 1 + j, b),
                           out_.window_values + (b * (L.k - 1) + j) * L.H);
      }
      for (int64_t s = 0; s < L.S; ++s) {
        m_.to_window_order(dsums_.data() + (b * L.S + s) * L.Ha,
                           out_.moment_sums + (b * L.S + s) * L.H);
      }
    }
  }

  void write_accumulated() {
    const Layout<T>& L = L_;
    const Accumulated a = accumulated();
    T* total = accumulators_.data();
    for (int member = 1; member < members_; ++member) {
      const T* other = accumulators_.data() + member * a.size;
      for (int64_t i = 0; i < a.size; ++i) total[i] += other[i];
    }
    const NormOffsets norms(L.H);
    T* d = out_.norms;
    m_.from_head_minor(total + a.key_scale, d + norms.key_scale);
    m_.from_head_minor(total + a.value_scale, d + norms.value_scale);
    m_.from_head_minor(total + a.value_bias, d + norms.value_bias);
    auto natural = [&](int64_t from, int64_t to, int blocks) {
      for (int g = 0; g < blocks; ++g) {
        std::memcpy(d + to + g * L.H, total + from + g * L.Hn, sizeof(T) * L.H);
      }
    };
    natural(a.attention_scale, norms.attention_scale, 1);
    natural(a.attention_bias, norms.attention_bias, 1);
    natural(a.gate_scale, norms.gate_scale, 4);
    natural(a.gate_bias, norms.gate_bias, 4);
    natural(a.cell_scale, norms.cell_scale, 1);
    natural(a.cell_bias, norms.cell_bias, 1);
    natural(a.output_scale, norms.output_scale, 1);
    natural(a.output_bias, norms.output_bias, 1);
    for (int64_t kind = 0; kind < 2; ++kind) {
      for (int64_t j = 0; j < L.k; ++j) {
        m_.from_head_minor(total + a.positions + (kind * L.k + j) * L.Ha,
                           out_.positions + (kind * L.k + j) * L.H);
      }
    }
  }

  // The cotangent dy (rows, F) of y = BN(x) → the cotangent of x, in place; adds this member's
  // rows' terms of the scale's and bias's gradients to d_gamma and d_beta.
  void norm_backward(int member, int& parity, const T* x, T* dy, int64_t F, int64_t r0,
                     int64_t r1, const T* mean, const T* var, const T* scale, T* d_gamma,
                     T* d_beta, Local& local) {
    Timed timed(kBackwardNorms);
    const Layout<T>& L = L_;
    constexpr int lanes = kLanes<T>;
    T* rstd = local.row.data();
    for (int64_t i = 0; i < F; ++i) rstd[i] = T(1) / std::sqrt(var[i] + T(kEpsilon));
    T* partial = local.partial.data();  // Σ dy, Σ dy x̂
    std::memset(partial, 0, sizeof(T) * 2 * F);
    for (int64_t b = r0; b < r1; ++b) {
      for (int64_t i = 0; i < F; i += lanes) {
        const Vec<T> g = load(dy + b * F + i);
        const Vec<T> normal = (load(x + b * F + i) - load(mean + i)) * load(rstd + i);
        store(partial + i, load(partial + i) + g);
        store(partial + F + i, load(partial + F + i) + g * normal);
      }
    }
    for (int64_t i = 0; i < F; i += lanes) {
      store(d_beta + i, load(d_beta + i) + load(partial + i));
      store(d_gamma + i, load(d_gamma + i) + load(partial + F + i));
    }
    if (!m_.options.training) {
      for (int64_t b = r0; b < r1; ++b) {
        for (int64_t i = 0; i < F; i += lanes) {
          store(dy + b * F + i, load(dy + b * F + i) * load(scale + i));
        }
      }
      return;
    }
    T* sums = partial + 2 * F;
    reducer_.sum(member, parity, partial, 2 * F, sums);
    const T inverse = T(1) / T(L.B);
    for (int64_t b = r0; b < r1; ++b) {
      for (int64_t i = 0; i < F; i += lanes) {
        const Vec<T> normal = (load(x + b * F + i) - load(mean + i)) * load(rstd + i);
        const Vec<T> g = load(dy + b * F + i) - load(sums + i) * inverse -
                         normal * (load(sums + F + i) * inverse);
        store(dy + b * F + i, g * load(scale + i));
      }
    }
  }

  void step(int member, int& parity, int64_t t, int64_t r0, int64_t r1, Local& local) {
    const Layout<T>& L = L_;
    const Options& o = m_.options;
    const int64_t Ha = L.Ha, Hn = L.Hn, G = L.G, H = L.H;
    constexpr int lanes = kLanes<T>;
    const Accumulated acc = accumulated();
    T* accumulated = local.accumulated;

    // This step's norms, as the forward pass computed them.
    const T* stats = saved(residual_.stats) + t * L.stats_size();
    T* moments = local.moments.data();
    StepNorms<T>& norms = local.norms;
    auto norm_moments = [&](int64_t stats_offset, int64_t run) -> const T* {
      return o.training ? stats + stats_offset : m_.running.data() + run;
    };
    const T* attention_moments = norm_moments(L.stats_attention(), m_.run_attention);
    const T* gate_moments = norm_moments(L.stats_gates(), m_.run_gate);
    const T* cell_moments = norm_moments(L.stats_cell(), m_.run_cell);
    const T* output_moments = norm_moments(L.stats_output(), m_.run_output);
    norm_affine<T>(m_.attention_scale.data(), m_.attention_bias.data(), attention_moments,
                   attention_moments + Hn, Hn, norms.attention_scale, norms.attention_shift);
    norm_affine<T>(m_.gate_scale.data(), m_.gate_bias.data(), gate_moments, gate_moments + G, G,
                   norms.gate_scale, norms.gate_shift);
    norm_affine<T>(m_.cell_scale.data(), m_.cell_bias.data(), cell_moments, cell_moments + Hn, Hn,
                   norms.cell_scale, norms.cell_shift);
    norm_affine<T>(m_.output_scale.data(), m_.output_bias.data(), output_moments,
                   output_moments + Hn, Hn, norms.output_scale, norms.output_shift);
    if (o.activation) {
      if (o.training) {
        m_.window_moments(stats, moments);
      } else {
        std::memcpy(moments, m_.running.data() + m_.run_key, sizeof(T) * 4 * Ha);
      }
      norms.set_window(m_, moments);
    }

    const T* z = saved(residual_.gates) + t * L.B * G;
    const T* u = saved(residual_.activation) + t * L.B * Hn;
    const T* query = saved(residual_.query) + t * L.B * Ha;
    const T* context = saved(residual_.context) + t * L.B * Ha;
    const T* maxima = saved(residual_.maxima) + t * L.B * L.np;
    const T* sums = saved(residual_.sums) + t * L.B * L.np;
    const T* totals = saved(residual_.totals) + t * L.B * L.np;
    T* c_t = dc_prev_.data();  // c_t, then the cotangent of c_{t-1} through the forget gate

    {
      Timed timed(kBackwardRecompute);
      // Recomputed: zn = BN_z(z); cn = BN_c(c_t), elu(cn); x_h = σ(o) elu(cn).
      // And the cotangent of h_t before its dropout.
      for (int64_t b = r0; b < r1; ++b) {
        T* zn = normalised_gates_.data() + b * G;
        for (int64_t i = 0; i < G; i += lanes) {
          store(zn + i, load(z + b * G + i) * load(norms.gate_scale + i) + load(norms.gate_shift + i));
        }
        T* c = c_t + b * Hn;
        std::memset(c, 0, sizeof(T) * Hn);
        std::memcpy(c, fwd_.cells + (t * L.B + b) * H, sizeof(T) * H);
        T* activation = cell_activation_.data() + b * Hn;
        T* x = output_input_.data() + b * Hn;
        for (int64_t i = 0; i < Hn; i += lanes) {
          const Vec<T> e = velu<T>(load(c + i) * load(norms.cell_scale + i) + load(norms.cell_shift + i));
          store(activation + i, e);
          store(x + i, vsigmoid<T>(load(zn + 3 * Hn + i)) * e);
        }
        T* dy = dy_.data() + b * Hn;
        for (int64_t i = 0; i < Hn; ++i) {
          dy[i] = dh_[b * Hn + i] + (i < H ? dout_.outputs[(t * L.B + b) * H + i] : T(0));
        }
        if (o.training && o.output_levels < kDropoutLevels) {
          apply_dropout(m_, m_.key(t, kKeyOutput), o.output_levels, m_.output_factor, b, dy,
                        local.words.data());
        }
      }
    }
    // BN_h
    norm_backward(member, parity, output_input_.data(), dy_.data(), Hn, r0, r1, output_moments,
                  output_moments + Hn, norms.output_scale, accumulated + acc.output_scale,
                  accumulated + acc.output_bias, local);
    {
      Timed timed(kBackwardGates);
      // x_h = σ(o) elu(cn): the cotangents of o's pre-activation and of cn
      for (int64_t b = r0; b < r1; ++b) {
        const T* zn = normalised_gates_.data() + b * G;
        const T* activation = cell_activation_.data() + b * Hn;
        T* dy = dy_.data() + b * Hn;
        T* dzn = d_gates_.data() + b * G;
        for (int64_t i = 0; i < Hn; i += lanes) {
          const Vec<T> o_gate = vsigmoid<T>(load(zn + 3 * Hn + i));
          const Vec<T> e = load(activation + i);
          const Vec<T> g = load(dy + i);
          store(dzn + 3 * Hn + i, g * e * o_gate * (T(1) - o_gate));
          store(dy + i, g * o_gate * velu_grad_from_output<T>(e));
        }
      }
    }
    // BN_c
    norm_backward(member, parity, c_t, dy_.data(), Hn, r0, r1, cell_moments, cell_moments + Hn,
                  norms.cell_scale, accumulated + acc.cell_scale, accumulated + acc.cell_bias, local);
    {
      Timed timed(kBackwardGates);
      // c_t = σ(f) c_{t-1} + σ(i) tanh(g)
      for (int64_t b = r0; b < r1; ++b) {
        const T* zn = normalised_gates_.data() + b * G;
        T* dzn = d_gates_.data() + b * G;
        T* c_prev = local.row.data();
        previous_cell(t, b, c_prev);
        T* dc_prev = dc_prev_.data() + b * Hn;
        for (int64_t i = 0; i < Hn; ++i) {
          const T d_cell = i < H ? dout_.cells[(t * L.B + b) * H + i] : T(0);
          dy_[b * Hn + i] = dy_[b * Hn + i] + dc_[b * Hn + i] + d_cell;
        }
        for (int64_t i = 0; i < Hn; i += lanes) {
          const Vec<T> g = vtanh<T>(load(zn + i));
          const Vec<T> f = vsigmoid<T>(load(zn + Hn + i));
          const Vec<T> in = vsigmoid<T>(load(zn + 2 * Hn + i));
          const Vec<T> dc = load(dy_.data() + b * Hn + i);
          store(dzn + i, dc * in * (T(1) - g * g));
          store(dzn + Hn + i, dc * load(c_prev + i) * f * (T(1) - f));
          store(dzn + 2 * Hn + i, dc * g * in * (T(1) - in));
          store(dc_prev + i, dc * f);
        }
      }
    }
    // BN_z: dz, the cotangent of z (and of the gate terms)
    norm_backward(member, parity, z, d_gates_.data(), G, r0, r1, gate_moments, gate_moments + G,
                  norms.gate_scale, accumulated + acc.gate_scale, accumulated + acc.gate_bias, local);
    {
      Timed timed(kBackwardGates);
      for (int64_t b = r0; b < r1; ++b) {
        const T* dz = d_gates_.data() + b * G;
        std::memcpy(dqz_.data() + b * L.QZ + Ha, dz, sizeof(T) * G);
        for (int64_t g = 0; g < 4; ++g) {
          std::memcpy(out_.gates + (t * L.B + b) * 4 * H + g * H, dz + g * Hn, sizeof(T) * H);
        }
      }
    }
    // da = dz W_a^T; BN_a; the cotangent of W_o attended + b_o
    if (r1 > r0) {
      Timed timed(kBackwardProducts);
      matmul<T>(r1 - r0, Hn, G, d_gates_.data() + r0 * G, G, m_.WaT.data(), Hn,
                da_.data() + r0 * Hn, Hn, false);
    }
    norm_backward(member, parity, u, da_.data(), Hn, r0, r1, attention_moments,
                  attention_moments + Hn, norms.attention_scale, accumulated + acc.attention_scale,
                  accumulated + acc.attention_bias, local);
    {
      Timed timed(kBackwardAttention);
      for (int64_t b = r0; b < r1; ++b) {
        T* d = da_.data() + b * Hn;
        T* a = out_.activated + t * L.B + b;  // transposed
        for (int64_t i = 0; i < Hn; i += lanes) {
          const Vec<T> activation = load(u + b * Hn + i);
          store(d + i, load(d + i) * velu_grad_from_output<T>(activation));
        }
        for (int64_t i = 0; i < H; ++i) {
          a[i * L.T_ * L.B] = u[b * Hn + i] * norms.attention_scale[i] + norms.attention_shift[i];
        }
        std::memcpy(out_.attention + (t * L.B + b) * H, d, sizeof(T) * H);
      }
    }
    // d attended = d(W_o attended) W_o^T
    if (r1 > r0) {
      Timed timed(kBackwardProducts);
      matmul<T>(r1 - r0, Ha, Hn, da_.data() + r0 * Hn, Hn, m_.WoT.data(), Ha,
                datt_.data() + r0 * Ha, Ha, false);
    }

    {
      Timed timed(kBackwardAttention);
      // The attention. Partial sums over this member's rows: the cotangents of the key scale, the
      // value scale and the value shift.
      if (o.positional) m_.window_features(keys_buffer(), values_buffer(), t, r0, r1, window_.data());
      T* partial = local.partial.data();
      std::memset(partial, 0, sizeof(T) * 3 * Ha);
      T* d_key_scale = partial;
      T* d_value_scale = partial + Ha;
      T* d_value_shift = partial + 2 * Ha;
      for (int64_t b = r0; b < r1; ++b) {
        T* datt = datt_.data() + b * Ha;
        const T* ctx = context + b * Ha;
        const T* total = totals + b * L.np;
        T* att = local.row.data();
        for (int64_t d = 0; d < L.dk; ++d) {
          for (int64_t h = 0; h < L.np; h += lanes) {
            const int64_t i = d * L.np + h;
            Vec<T> v = load(ctx + i);
            if (o.activation) {
              v = v * load(norms.value_scale + i) + load(total + h) * load(norms.value_shift + i);
            }
            store(att + i, v);
          }
        }
        m_.from_head_minor(att, out_.attended + t * L.B + b, L.T_ * L.B);
        // d context = d attended * value scale; d weight total (per head) = Σ_d d attended * shift
        T* d_total = local.row.data() + Ha;
        std::memset(d_total, 0, sizeof(T) * L.np);
        if (o.activation) {
          for (int64_t d = 0; d < L.dk; ++d) {
            for (int64_t h = 0; h < L.np; h += lanes) {
              const int64_t i = d * L.np + h;
              const Vec<T> g = load(datt + i);
              store(d_value_scale + i, load(d_value_scale + i) + g * load(ctx + i));
              store(d_value_shift + i, load(d_value_shift + i) + g * load(total + h));
              store(d_total + h, load(d_total + h) + g * load(norms.value_shift + i));
              store(datt + i, g * load(norms.value_scale + i));
            }
          }
        }
        T* dq = dqz_.data() + b * L.QZ;
        attention_backward(t, b, query + b * Ha, norms.key_scale, datt, d_total, maxima + b * L.np,
                           sums + b * L.np, dq, accumulated + acc.positions, local);
        // query = q * key scale: d q = d query * key scale; then q = elu(pre-activation)
        const T* q = query + b * Ha;
        for (int64_t i = 0; i < Ha; i += lanes) {
          Vec<T> g = load(dq + i);
          if (o.activation) {
            store(d_key_scale + i, load(d_key_scale + i) + g * load(q + i));
            g = g * load(norms.key_scale + i);
          }
          store(dq + i, g * velu_grad_from_output<T>(load(q + i)));
        }
        m_.from_head_minor(dq, out_.query + (t * L.B + b) * H);
      }
    }
    if (o.activation) window_norm_backward(member, parity, t, r0, r1, moments, local);

    // d h_{t-1} = [d q | d z] [W_q^h | W_h]^T
    if (r1 > r0) {
      Timed timed(kBackwardProducts);
      matmul<T>(r1 - r0, Hn, L.QZ, dqz_.data() + r0 * L.QZ, L.QZ, m_.W1T.data(), Hn,
                dh_.data() + r0 * Hn, Hn, false);
    }
    // The entry of c_{t-1} (slot T - t) has all its cotangent: every step that read it is done.
    enter_backward(t, r0, r1, local);
  }

  // Adds the cotangent `d` (Ha) of sample b's window feature j (kind 0: key, 1: value) at step t
  // to its entry's cotangent (and, with positional encoding, to the encoding's).
  void add_to_entry(int kind, int64_t b, int64_t j, int64_t t, const T* d, T* d_positions) {
    const Layout<T>& L = L_;
    T* target = d_entry(kind, L.T_ - t + j, b);
    if (!m_.options.positional) {
      for (int64_t i = 0; i < L.Ha; i += kLanes<T>) store(target + i, load(target + i) + load(d + i));
      return;
    }
    const T* feature = window_row(kind, b, j, t);
    T* dp = d_positions + (kind * L.k + j) * L.Ha;
    for (int64_t i = 0; i < L.Ha; i += kLanes<T>) {
      Vec<T> g = load(d + i);
      if (m_.options.activation) g = g * velu_grad_from_output<T>(load(feature + i));
      store(target + i, load(target + i) + g);
      store(dp + i, load(dp + i) + g);
    }
  }

  // The attention's backward pass for sample b (larnn_jax.attention._attention_backward_rule):
  // from d context (Ha) and d weight total (np), the cotangent of the query after the key scale
  // (into dq, Ha) and of the window's keys and values (into the entries' cotangents).
  void attention_backward(int64_t t, int64_t b, const T* q, const T* key_scale, const T* d_context,
                          const T* d_total, const T* maximum, const T* sum, T* dq,
                          T* d_positions, Local& local) {
    const Layout<T>& L = L_;
    const Options& o = m_.options;
    constexpr int lanes = kLanes<T>;
    const int64_t np = L.np, Ha = L.Ha, valid = count(b, t);
    // The next sample's window rows (and their cotangents) are fetched a row at a time while this
    // sample's are computed.
    const int64_t next_valid = b + 1 < L.B ? count(b + 1, t) : 0;
    T* query = local.row.data() + Ha + np;  // q * key scale
    T* scaled = query + Ha;                 // ... * 1 / sqrt(d_k)
    for (int64_t i = 0; i < Ha; i += lanes) {
      Vec<T> v = load(q + i);
      if (o.activation) v = v * load(key_scale + i);
      store(query + i, v);
      store(scaled + i, v * m_.score_scale);
    }
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(saved(residual_.masks)) +
                           (t * L.B + b) * L.k * (np / lanes);
    int64_t stride;
    const T* factors =
        attention_factors(m_, RandomKey{}, b, local.factors.data(), nullptr, nullptr, bits, stride);
    T* alpha = local.alpha.data();
    T* d_alpha = local.d_alpha.data();
    // One pass over the window's keys and values: the weights α_j, their cotangents dα_j, and
    // the query's cotangent Σ_j α_j (dα_j - Σ_i α_i dα_i) K_j / sqrt(d_k), accumulated as
    // Σ_j α_j dα_j K_j and Σ_j α_j K_j so that the keys are read once.
    T* weighted = scaled + Ha;    // Σ_j α_j dα_j K_j (Ha)
    T* averaged = weighted + Ha;  // Σ_j α_j K_j (Ha)
    T* dot = averaged + Ha;       // Σ_j α_j dα_j (np)
    std::memset(weighted, 0, sizeof(T) * (2 * Ha + np));
    for (int64_t j = 0; j < valid; ++j) {
      const T* key = window_row(0, b, j, t);
      const T* value = window_row(1, b, j, t);
      if (j < next_valid) {
        prefetch(window_row(0, b + 1, j, t), sizeof(T) * Ha);
        prefetch(window_row(1, b + 1, j, t), sizeof(T) * Ha);
      }
      for (int64_t h = 0; h < np; h += lanes) {
        Vec<T> s = Vec<T>{};
        Vec<T> d_kept = load(d_total + h);
        for (int64_t d = 0; d < L.dk; ++d) {
          s += load(scaled + d * np + h) * load(key + d * np + h);
          d_kept += load(value + d * np + h) * load(d_context + d * np + h);
        }
        const Vec<T> a = vexp<T>(s - load(maximum + h)) * (T(1) / load(sum + h));
        const Vec<T> da = d_kept * load(factors + j * stride + h);
        store(alpha + j * np + h, a);
        store(d_alpha + j * np + h, da);
        const Vec<T> ada = a * da;
        store(dot + h, load(dot + h) + ada);
        for (int64_t d = 0; d < L.dk; ++d) {
          const Vec<T> k = load(key + d * np + h);
          store(weighted + d * np + h, load(weighted + d * np + h) + ada * k);
          store(averaged + d * np + h, load(averaged + d * np + h) + a * k);
        }
      }
    }
    for (int64_t d = 0; d < L.dk; ++d) {
      for (int64_t h = 0; h < np; h += lanes) {
        const int64_t i = d * np + h;
        store(dq + i, (load(weighted + i) - load(dot + h) * load(averaged + i)) * m_.score_scale);
      }
    }
    // A second pass over the entries' cotangents: d K_j = d s_j q / sqrt(d_k) with
    // d s_j = α_j (dα_j - Σ_i α_i dα_i), and d V_j = kept_j d context.
    T* d_feature = dot + np;  // (2 Ha): the cotangents of K_j and V_j
    for (int64_t j = 0; j < valid; ++j) {
      if (j < next_valid) {
        prefetch(d_entry(0, L.T_ - t + j, b + 1), sizeof(T) * Ha, true);
        prefetch(d_entry(1, L.T_ - t + j, b + 1), sizeof(T) * Ha, true);
      }
      for (int64_t h = 0; h < np; h += lanes) {
        const Vec<T> a = load(alpha + j * np + h);
        const Vec<T> ds = a * (load(d_alpha + j * np + h) - load(dot + h)) * m_.score_scale;
        const Vec<T> kept = a * load(factors + j * stride + h);
        for (int64_t d = 0; d < L.dk; ++d) {
          store(d_feature + d * np + h, ds * load(query + d * np + h));
          store(d_feature + Ha + d * np + h, kept * load(d_context + d * np + h));
        }
      }
      add_to_entry(0, b, j, t, d_feature, d_positions);
      add_to_entry(1, b, j, t, d_feature + Ha, d_positions);
    }
  }

  // The key and value norms, folded into the attention: from the partial cotangents of the key
  // scale, value scale and value shift (local.partial[0 : 3 Ha]), their parameters' gradients
  // and, in training, the cotangents of the window's batch statistics, pulled back to the
  // window's entries (through the carried moment sums, or directly with positional encoding).
  // Without statistics (evaluation), only the carried sums' own cotangent flows.
  void window_norm_backward(int member, int& parity, int64_t t, int64_t r0, int64_t r1,
                            const T* moments, Local& local) {
    Timed timed(kBackwardWindow);
    const Layout<T>& L = L_;
    const Options& o = m_.options;
    const int64_t Ha = L.Ha;
    const Accumulated acc = accumulated();
    T* accumulated = local.accumulated;
    T* partial = local.partial.data();
    const T* mean_k = moments;
    const T* var_k = moments + Ha;
    const T* mean_v = moments + 2 * Ha;
    const T* var_v = moments + 3 * Ha;
    // Parameter gradients: linear in the partial sums, so each member adds its own.
    for (int64_t i = 0; i < Ha; ++i) {
      const T rstd_k = T(1) / std::sqrt(var_k[i] + T(kEpsilon));
      const T rstd_v = T(1) / std::sqrt(var_v[i] + T(kEpsilon));
      const T d_scale_v = partial[Ha + i] - partial[2 * Ha + i] * mean_v[i];
      accumulated[acc.key_scale + i] += partial[i] * rstd_k;
      accumulated[acc.value_scale + i] += d_scale_v * rstd_v;
      accumulated[acc.value_bias + i] += partial[2 * Ha + i];
    }
    T* grads = partial + 3 * Ha;  // (4 Ha): d mean_k, d var_k, d mean_v, d var_v
    std::memset(grads, 0, sizeof(T) * 4 * Ha);
    int64_t valid = 0;
    for (int64_t b = 0; b < L.B; ++b) valid += count(b, t);
    if (o.training) {
      T* totals = partial + 7 * Ha;
      reducer_.sum(member, parity, partial, 3 * Ha, totals);
      for (int64_t i = 0; i < Ha; ++i) {
        const T rstd_k = T(1) / std::sqrt(var_k[i] + T(kEpsilon));
        const T rstd_v = T(1) / std::sqrt(var_v[i] + T(kEpsilon));
        const T value_scale = m_.value_scale[i] * rstd_v;
        const T d_scale_v = totals[Ha + i] - totals[2 * Ha + i] * mean_v[i];
        // d rsqrt(v + eps) / dv = -rsqrt(v + eps)^3 / 2
        grads[Ha + i] = totals[i] * m_.key_scale[i] * (T(-0.5) * rstd_k * rstd_k * rstd_k);
        grads[2 * Ha + i] = -totals[2 * Ha + i] * value_scale;
        grads[3 * Ha + i] = d_scale_v * m_.value_scale[i] * (T(-0.5) * rstd_v * rstd_v * rstd_v);
      }
    }
    if (o.carries_moments()) {
      carried_sums_backward(t, r0, r1, grads, valid);
    } else if (o.training) {
      // d x = (d mean + 2 d var (x - mean)) / count for every valid entry (the masked moments'
      // gradient, larnn_jax.normalization._weighted_moments_backward).
      T* d_feature = local.row.data();
      for (int64_t b = r0; b < r1; ++b) {
        for (int64_t j = 0; j < count(b, t); ++j) {
          for (int kind = 0; kind < 2; ++kind) {
            const T* feature = window_row(kind, b, j, t);
            const T* mean = kind == 0 ? mean_k : mean_v;
            const T* d_mean = grads + 2 * kind * Ha;
            const T* d_var = grads + (2 * kind + 1) * Ha;
            for (int64_t i = 0; i < Ha; i += kLanes<T>) {
              const Vec<T> g = (load(d_mean + i) +
                                T(2) * load(d_var + i) * (load(feature + i) - load(mean + i))) /
                               T(valid);
              store(d_feature + i, g);
            }
            add_to_entry(kind, b, j, t, d_feature, accumulated + acc.positions);
          }
        }
      }
    }
  }

  // The carried moment sums (larnn_jax.window.slide_moment_sums, moments_from_sums) pulled back
  // through step t: `grads` holds the cotangents of the key/value means and variances (zero in
  // evaluation). The cotangent of the sums after step t (from later steps and from the final
  // carry) flows to the entering and leaving entries and to the sums before the step.
  void carried_sums_backward(int64_t t, int64_t r0, int64_t r1, const T* grads, int64_t valid) {
    const Layout<T>& L = L_;
    const int64_t Ha = L.Ha;
    constexpr int lanes = kLanes<T>;
    // Cotangent of the window's sums (every sample alike): from mean = reference + deviation
    // mean and var = max(square mean - deviation mean², 0), with the means = totals / valid.
    T* d_window = const_cast<T*>(grads) + 4 * Ha;  // room after the 4 Ha grads (local.partial)
    if (m_.options.training) {
      const T* stats = saved(residual_.stats) + t * L.stats_size();
      for (int kind = 0; kind < 2; ++kind) {
        const T* deviation_mean = stats + 2 * kind * Ha;
        const T* unclamped = stats + (2 * kind + 1) * Ha;
        const T* d_mean = grads + 2 * kind * Ha;
        const T* d_var = grads + (2 * kind + 1) * Ha;
        for (int64_t i = 0; i < Ha; ++i) {
          // jnp.maximum's gradient: 1 above 0, 1/2 at a tie, 0 below
          const T through = unclamped[i] > T(0) ? T(1) : unclamped[i] == T(0) ? T(0.5) : T(0);
          const T d_square_mean = d_var[i] * through;
          const T d_deviation_mean = d_mean[i] - T(2) * deviation_mean[i] * d_square_mean;
          d_window[kind * Ha + i] = d_deviation_mean / T(valid);
          d_window[(2 + kind) * Ha + i] = d_square_mean / T(valid);
        }
      }
    } else {
      std::memset(d_window, 0, sizeof(T) * 4 * Ha);
    }
    for (int64_t b = r0; b < r1; ++b) {
      T* ds = dsums_.data() + b * 4 * Ha;  // the cotangent of the sums after step t
      if (m_.in.last[b] == t) {
        for (int64_t s = 0; s < 4; ++s) {
          const T* window = dout_.final_sums + (b * 4 + s) * L.H;
          for (int64_t p = 0; p < L.H; ++p) ds[s * Ha + (p / L.n) * L.np + p % L.n] += window[p];
        }
      }
      const bool full = count(b, t) == L.k;
      for (int kind = 0; kind < 2; ++kind) {
        const T* buffer = kind == 0 ? keys_buffer() : values_buffer();
        const T* entering = entry(buffer, L.T_ - t, b);
        const T* leaving = entry(buffer, L.T_ - t + L.k - 1, b);
        T* d_entering = d_entry(kind, L.T_ - t, b);
        T* d_leaving = d_entry(kind, L.T_ - t + L.k - 1, b);
        const T* reference = m_.reference.data() + kind * Ha;
        for (int64_t i = 0; i < Ha; i += lanes) {
          const Vec<T> r = load(reference + i);
          const Vec<T> later_d = load(ds + kind * Ha + i);
          const Vec<T> later_d2 = load(ds + (2 + kind) * Ha + i);
          // next = sums + entering - leaving; window = next + leaving
          const Vec<T> next_d = later_d + load(d_window + kind * Ha + i);
          const Vec<T> next_d2 = later_d2 + load(d_window + (2 + kind) * Ha + i);
          const Vec<T> in = load(entering + i) - r;
          store(d_entering + i, load(d_entering + i) + next_d + T(2) * in * next_d2);
          if (full) {
            const Vec<T> out = load(leaving + i) - r;
            store(d_leaving + i, load(d_leaving + i) - later_d - T(2) * out * later_d2);
          }
          store(ds + kind * Ha + i, next_d);
          store(ds + (2 + kind) * Ha + i, next_d2);
        }
      }
    }
  }

  // The entry with which c_{t-1} entered at step t: from its cotangent (complete now), the
  // cotangent of its pre-activation W c' + b (written out) and of c_{t-1}; and c' itself.
  void enter_backward(int64_t t, int64_t r0, int64_t r1, Local& local) {
    Timed timed(kBackwardEnter);
    const Layout<T>& L = L_;
    const Options& o = m_.options;
    const int64_t Ha = L.Ha, Hn = L.Hn, H = L.H, slot = L.T_ - t;
    if (r1 <= r0) return;
    for (int kind = 0; kind < 2; ++kind) {
      for (int64_t b = r0; b < r1; ++b) {
        const T* e = entry(kind == 0 ? keys_buffer() : values_buffer(), slot, b);
        T* d = d_entry(kind, slot, b);
        if (o.caches_activation()) {
          for (int64_t i = 0; i < Ha; i += kLanes<T>) {
            store(d + i, load(d + i) * velu_grad_from_output<T>(load(e + i)));
          }
        }
        T* natural = out_.entries + (t * L.B + b) * 2 * H + kind * H;
        m_.from_head_minor(d, natural);
      }
      matmul<T>(r1 - r0, Hn, Ha, d_entry(kind, slot, r0), L.entry_stride(),
                m_.WkvT.data() + kind * Ha * Hn, Hn,
                dcd_.data() + r0 * Hn, Hn, kind == 1);
    }
    const bool dropping = o.training && o.kv_levels < kDropoutLevels;
    for (int64_t b = r0; b < r1; ++b) {
      T* c = local.row.data();
      previous_cell(t, b, c);
      T* dcd = dcd_.data() + b * Hn;
      if (dropping) {
        apply_dropout(m_, m_.key(t, kKeyEntering), o.kv_levels, m_.kv_factor, b, c,
                      local.words.data());
        apply_dropout(m_, m_.key(t, kKeyEntering), o.kv_levels, m_.kv_factor, b, dcd,
                      local.words.data());
      }
      for (int64_t i = 0; i < H; ++i) out_.dropped[i * L.T_ * L.B + t * L.B + b] = c[i];
      const T* h = t == 0 ? m_.in.h0 + b * H : fwd_.outputs + ((t - 1) * L.B + b) * H;
      for (int64_t i = 0; i < H; ++i) out_.hidden[i * L.T_ * L.B + t * L.B + b] = h[i];
      for (int64_t i = 0; i < Hn; i += kLanes<T>) {
        store(dc_.data() + b * Hn + i, load(dc_prev_.data() + b * Hn + i) + load(dcd + i));
      }
    }
  }

  const Model<T>& m_;
  const Layout<T>& L_;
  ForwardOutputs<T> fwd_;
  Cotangents<T> dout_;
  BackwardOutputs<T> out_;
  int members_;
  Barrier& barrier_;
  Reducer<T> reducer_;
  typename Layout<T>::Residual residual_;
  // Shared (each member its own rows)
  Array<T> dh_, dc_, dsums_, dqz_, normalised_gates_, d_gates_, cell_activation_, output_input_,
      dy_, dc_prev_, da_, datt_, dcd_, window_;
  Array<T> accumulators_;  // (members, accumulator_size)
};

}  // namespace larnn
