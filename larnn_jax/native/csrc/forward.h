// The forward pass of a LARNN layer over a whole sequence: LARNNCell.step, every time step, for the
// whole batch. The members of a team share the batch's rows; they meet where a batch norm needs
// the whole batch's statistics (five times per step in training, never in evaluation).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "gemm.h"
#include "model.h"
#include "profile.h"

namespace larnn {

// Rows of a block that runs a whole sequence at a time in evaluation: a whole micro-kernel row
// block of the products (gemm.h), with windows (2 k Ha each) that stay in a core's cache.
constexpr int64_t kEvaluationRows = 8;

template <typename T>
class Forward {
 public:
  Forward(const Model<T>& model, const ForwardOutputs<T>& out, int members, Barrier& barrier)
      : m_(model), L_(model.layout), out_(out), members_(members),
        reducer_(members, 4 * L_.Ha + 2 * L_.G, barrier),
        residual_(L_.residual(model.options.save_residuals)) {
    const Layout<T>& L = L_;
    const int64_t B = L.B;
    qz_.resize(B * L.QZ);
    attended_.resize(B * L.Ha);
    activated_.resize(B * L.Hn);
    gates_.resize(B * L.G);
    c_.resize(B * L.Hn);
    h_.resize(B * L.Hn);
    normalised_.resize(B * L.Hn);
    sums_.resize(B * L.S * L.Ha);
    if (!model.options.save_residuals) {
      query_.resize(B * L.Ha);
      context_.resize(B * L.Ha);
      activation_.resize(B * L.Hn);
      gate_inputs_.resize(B * L.G);
      softmax_.resize(3 * B * L.np);
    }
    if (model.options.positional) window_.resize(2 * B * L.k * L.Ha);
    running_.resize(model.running.size());
    std::memcpy(running_.data(), model.running.data(), sizeof(T) * model.running.size());
  }

  void run(int member) {
    const Layout<T>& L = L_;
    int64_t r0, r1;
    member_rows(L.B, member, members_, r0, r1);
    Local local(L);
    int parity = 0;
    if (m_.options.training) {  // the batch norms couple the samples at every step
      prepare(r0, r1, local);
      for (int64_t t = 0; t < L.T_; ++t) step(member, parity, t, r0, r1, local);
    } else {
      // Evaluation couples no samples: a few rows at a time run the whole sequence, so that their
      // windows stay in the core's cache from one step to the next.
      for (int64_t b0 = r0; b0 < r1; b0 += kEvaluationRows) {
        const int64_t b1 = std::min(r1, b0 + kEvaluationRows);
        prepare(b0, b1, local);
        for (int64_t t = 0; t < L.T_; ++t) step(member, parity, t, b0, b1, local);
      }
    }
    if (member == 0) m_.export_running(running_, out_.running);
  }

 private:
  struct Local {
    Array<T> scores;    // (k, np)
    Array<T> factors;   // (k, np) attention dropout factors
    Array<uint32_t> words;  // random words for the dropout masks
    Array<T> partial;   // partial sums for a reduction, and their totals
    Array<T> row;       // (max(4 Ha, G))
    Array<T> stats;     // this step's batch statistics (Layout::stats_size)
    StepNorms<T> norms;
    explicit Local(const Layout<T>& L)
        : scores(L.k * L.np), factors(L.k * L.np),
          words(std::max(L.k * L.n, L.Hn) / 2 + 4 * kLanes<uint32_t>),
          partial(8 * L.Ha + 2 * L.G), row(std::max(4 * L.Ha, L.G)), stats(L.stats_size()),
          norms(L) {}
  };

  T* entry(T* buffer, int64_t slot, int64_t row) const {
    return buffer + L_.entry_offset(slot, row);
  }
  T* keys_buffer() const { return out_.residual + residual_.keys; }
  T* values_buffer() const { return out_.residual + residual_.values; }
  bool saving() const { return m_.options.save_residuals; }
  // This step's rows of the saved activations (or the scratch that replaces them).
  T* query_rows(int64_t t) const {
    return saving() ? out_.residual + residual_.query + t * L_.B * L_.Ha : query_.data();
  }
  T* context_rows(int64_t t) const {
    return saving() ? out_.residual + residual_.context + t * L_.B * L_.Ha : context_.data();
  }
  T* activation_rows(int64_t t) const {
    return saving() ? out_.residual + residual_.activation + t * L_.B * L_.Hn : activation_.data();
  }
  T* gate_rows(int64_t t) const {
    return saving() ? out_.residual + residual_.gates + t * L_.B * L_.G : gate_inputs_.data();
  }
  T* softmax_rows(int64_t t, int which) const {
    const int64_t offset[3] = {residual_.maxima, residual_.sums, residual_.totals};
    return saving() ? out_.residual + offset[which] + t * L_.B * L_.np
                    : softmax_.data() + which * L_.B * L_.np;
  }

  void prepare(int64_t r0, int64_t r1, Local& local) {
    const Layout<T>& L = L_;
    for (int64_t b = r0; b < r1; ++b) {
      for (int64_t i = 0; i < L.H; ++i) {
        c_[b * L.Hn + i] = m_.in.c0[b * L.H + i];
        h_[b * L.Hn + i] = m_.in.h0[b * L.H + i];
      }
      for (int64_t j = 0; j + 1 < L.k; ++j) {  // the initial window, slots T + 1 ...
        std::memset(entry(keys_buffer(), L.T_ + 1 + j, b), 0, sizeof(T) * L.Ha);
        std::memset(entry(values_buffer(), L.T_ + 1 + j, b), 0, sizeof(T) * L.Ha);
        m_.from_window_order(m_.in.window_keys + (b * (L.k - 1) + j) * L.H,
                             entry(keys_buffer(), L.T_ + 1 + j, b));
        m_.from_window_order(m_.in.window_values + (b * (L.k - 1) + j) * L.H,
                             entry(values_buffer(), L.T_ + 1 + j, b));
      }
      for (int64_t s = 0; s < L.S; ++s) {
        m_.from_window_order(m_.in.moment_sums + (b * L.S + s) * L.H,
                             sums_.data() + (b * L.S + s) * L.Ha);
      }
    }
    enter(0, r0, r1, local);
  }

  // c_{t-1} enters the window at step t: E = c' W + b (elu'd where the scheme caches it), with
  // c' = c_{t-1} after key/value dropout, written to slot T - t.
  void enter(int64_t t, int64_t r0, int64_t r1, Local& local) {
    Timed timed(kForwardEnter);
    const Layout<T>& L = L_;
    if (r1 <= r0) return;
    T* dropped = normalised_.data();  // free until the cell norm
    for (int64_t b = r0; b < r1; ++b) {
      std::memcpy(dropped + b * L.Hn, c_.data() + b * L.Hn, sizeof(T) * L.Hn);
      if (m_.options.training && m_.options.kv_levels < kDropoutLevels) {
        apply_dropout(m_, m_.key(t, kKeyEntering), m_.options.kv_levels, m_.kv_factor, b,
                      dropped + b * L.Hn, local.words.data());
      }
    }
    const int64_t slot = L.T_ - t;
    T* targets[2] = {entry(keys_buffer(), slot, r0), entry(values_buffer(), slot, r0)};
    for (int kind = 0; kind < 2; ++kind) {
      matmul<T>(r1 - r0, L.Ha, L.H, dropped + r0 * L.Hn, L.Hn, m_.Wkv.data() + kind * L.Ha,
                2 * L.Ha, targets[kind], L.entry_stride(), false);
      const T* bias = m_.entry_bias.data() + kind * L.Ha;
      for (int64_t b = 0; b < r1 - r0; ++b) {
        T* e = targets[kind] + b * L.entry_stride();
        for (int64_t i = 0; i < L.Ha; i += kLanes<T>) {
          Vec<T> v = load(e + i) + load(bias + i);
          if (m_.options.caches_activation()) v = velu<T>(v);
          store(e + i, v);
        }
      }
    }
  }

  int64_t count(int64_t b, int64_t t) const { return m_.count(b, t); }
  // The window's key (kind 0) or value (kind 1) features of entry j of sample b at step t.
  const T* window_row(int kind, int64_t b, int64_t j, int64_t t) const {
    if (m_.options.positional) return window_.data() + ((kind * L_.B + b) * L_.k + j) * L_.Ha;
    return entry(kind == 0 ? keys_buffer() : values_buffer(), L_.T_ - t + j, b);
  }

  void step(int member, int& parity, int64_t t, int64_t r0, int64_t r1, Local& local) {
    const Layout<T>& L = L_;
    const Options& o = m_.options;
    const int64_t Ha = L.Ha, Hn = L.Hn, G = L.G;
    constexpr int lanes = kLanes<T>;
    T* stats = local.stats.data();
    StepNorms<T>& norms = local.norms;  // this step's norms as affine maps

    {
      Timed timed(kForwardWindow);
      // Positional encoding: the window's features, elu(E_j + P_j) (or E_j + P_j), for this step.
      if (o.positional) {
        m_.window_features(keys_buffer(), values_buffer(), t, r0, r1, window_.data());
      }

      // The window's batch statistics (moments of the keys and values over the batch and the
      // valid entries), and the carried moment sums.
      window_statistics(member, parity, t, r0, r1, local, stats);
      if (o.activation) {
        T* moments = local.row.data();  // key mean, key var, value mean, value var
        if (o.training) {
          m_.window_moments(stats, moments);
        } else {
          std::memcpy(moments, running_.data() + m_.run_key, sizeof(T) * 4 * Ha);
        }
        norms.set_window(m_, moments);
        if (o.training && member == 0) update_running(running_.data() + m_.run_key, moments, 4 * Ha);
      }
    }

    // [q | z] = x_t @ [W_q^x | W_x] + h_{t-1} @ [W_q^h | W_h] (the biases b0 are added below)
    T* qz = qz_.data();
    {
      Timed timed(kForwardProducts);
      if (r1 > r0) {
        matmul<T>(r1 - r0, L.QZ, L.D, m_.in.sequence + (t * L.B + r0) * L.D, L.D, m_.W0.data(),
                  L.QZ, qz + r0 * L.QZ, L.QZ, false);
        matmul<T>(r1 - r0, L.QZ, L.H, h_.data() + r0 * Hn, Hn, m_.W1.data(), L.QZ, qz + r0 * L.QZ,
                  L.QZ, true);
      }
    }

    // q = elu(W_q [x_t ; h_{t-1}] + b_q), head-minor; then the attention of each sample.
    T* query = query_rows(t);
    T* context = context_rows(t);
    T* maxima = softmax_rows(t, 0);
    T* sums = softmax_rows(t, 1);
    T* totals = softmax_rows(t, 2);
    {
      Timed timed(kForwardAttention);
      const T* query_bias = m_.input_bias.data();
      for (int64_t b = r0; b < r1; ++b) {
        T* q = query + b * Ha;
        for (int64_t i = 0; i < Ha; i += lanes) {
          store(q + i, velu<T>(load(qz + b * L.QZ + i) + load(query_bias + i)));
        }
        attend(t, b, q, norms.key_scale, context + b * Ha, maxima + b * L.np, sums + b * L.np,
               totals + b * L.np, local);
        // attended = context * value scale + weight total * value shift
        T* att = attended_.data() + b * Ha;
        for (int64_t d = 0; d < L.dk; ++d) {
          for (int64_t h = 0; h < L.np; h += lanes) {
            const int64_t i = d * L.np + h;
            Vec<T> v = load(context + b * Ha + i);
            if (o.activation) {
              v = v * load(norms.value_scale + i) + load(totals + b * L.np + h) * load(norms.value_shift + i);
            }
            store(att + i, v);
          }
        }
      }
    }

    // u = elu(W_o attended + b_o); a = BN_a(u)
    T* u = activation_rows(t);
    if (r1 > r0) {
      Timed timed(kForwardProducts);
      matmul<T>(r1 - r0, Hn, Ha, attended_.data() + r0 * Ha, Ha, m_.Wo.data(), Hn, u + r0 * Hn,
                Hn, false);
    }
    {
      Timed timed(kForwardAttention);
      const T* bias = m_.attention_output_bias.data();
      for (int64_t b = r0; b < r1; ++b) {
        for (int64_t i = 0; i < Hn; i += lanes) {
          store(u + b * Hn + i, velu<T>(load(u + b * Hn + i) + load(bias + i)));
        }
      }
    }
    normalise(member, parity, u, Hn, r0, r1, m_.attention_scale.data(),
              m_.attention_bias.data(), m_.run_attention, stats + L.stats_attention(),
              norms.attention_scale, norms.attention_shift, activated_.data(), local);

    // z = (W_x x_t + W_h h_{t-1} + b) + W_a a_t; BN_z
    T* z = gate_rows(t);
    T* a_terms = gates_.data();
    if (r1 > r0) {
      Timed timed(kForwardProducts);
      matmul<T>(r1 - r0, G, L.H, activated_.data() + r0 * Hn, Hn, m_.Wa.data(), G,
                a_terms + r0 * G, G, false);
    }
    {
      Timed timed(kForwardGates);
      for (int64_t b = r0; b < r1; ++b) {
        T* zb = z + b * G;
        const T* gate_bias = m_.input_bias.data() + Ha;
        for (int64_t i = 0; i < G; i += lanes) {
          store(zb + i,
                (load(qz + b * L.QZ + Ha + i) + load(gate_bias + i)) + load(a_terms + b * G + i));
        }
      }
    }
    normalise(member, parity, z, G, r0, r1, m_.gate_scale.data(), m_.gate_bias.data(),
              m_.run_gate, stats + L.stats_gates(), norms.gate_scale, norms.gate_shift, gates_.data(), local);

    {
      Timed timed(kForwardGates);
      // c_t = σ(f) c_{t-1} + σ(i) tanh(g)
      for (int64_t b = r0; b < r1; ++b) {
        const T* zn = gates_.data() + b * G;
        T* c = c_.data() + b * Hn;
        for (int64_t i = 0; i < Hn; i += lanes) {
          const Vec<T> g = vtanh<T>(load(zn + i));
          const Vec<T> f = vsigmoid<T>(load(zn + Hn + i));
          const Vec<T> in = vsigmoid<T>(load(zn + 2 * Hn + i));
          store(c + i, f * load(c + i) + in * g);
        }
        std::memcpy(out_.cells + (t * L.B + b) * L.H, c, sizeof(T) * L.H);
      }
    }

    // h_t = dropout(BN_h(σ(o) elu(BN_c(c_t))))
    normalise(member, parity, c_.data(), Hn, r0, r1, m_.cell_scale.data(), m_.cell_bias.data(),
              m_.run_cell, stats + L.stats_cell(), norms.cell_scale, norms.cell_shift, normalised_.data(),
              local);
    {
      Timed timed(kForwardGates);
      for (int64_t b = r0; b < r1; ++b) {
        const T* zn = gates_.data() + b * G;
        T* x = normalised_.data() + b * Hn;
        for (int64_t i = 0; i < Hn; i += lanes) {
          store(x + i, vsigmoid<T>(load(zn + 3 * Hn + i)) * velu<T>(load(x + i)));
        }
      }
    }
    normalise(member, parity, normalised_.data(), Hn, r0, r1, m_.output_scale.data(),
              m_.output_bias.data(), m_.run_output, stats + L.stats_output(), norms.output_scale,
              norms.output_shift, h_.data(), local);
    {
      Timed timed(kForwardGates);
      for (int64_t b = r0; b < r1; ++b) {
        T* h = h_.data() + b * Hn;
        if (o.training && o.output_levels < kDropoutLevels) {
          apply_dropout(m_, m_.key(t, kKeyOutput), o.output_levels, m_.output_factor, b, h,
                        local.words.data());
        }
        std::memcpy(out_.outputs + (t * L.B + b) * L.H, h, sizeof(T) * L.H);
      }
    }

    if (member == 0 && saving() && o.training) {
      std::memcpy(out_.residual + residual_.stats + t * L.stats_size(), stats,
                  sizeof(T) * L.stats_size());
    }
    // c_t enters the next step's window; the final carry of the samples whose last step this is.
    if (t + 1 < L.T_) enter(t + 1, r0, r1, local);
    for (int64_t b = r0; b < r1; ++b) {
      if (m_.in.last[b] != t) continue;
      for (int64_t j = 0; j + 1 < L.k; ++j) {
        m_.to_window_order(entry(keys_buffer(), L.T_ - t + j, b),
                           out_.final_keys + (b * (L.k - 1) + j) * L.H);
        m_.to_window_order(entry(values_buffer(), L.T_ - t + j, b),
                           out_.final_values + (b * (L.k - 1) + j) * L.H);
      }
      for (int64_t s = 0; s < L.S; ++s) {
        m_.to_window_order(sums_.data() + (b * L.S + s) * Ha,
                           out_.final_sums + (b * L.S + s) * L.H);
      }
    }
  }

  // Moments of the window's keys and values over the batch's valid entries (training), written
  // to stats[0 : 4 Ha] (Model::window_moments reads them); and the carried sums.
  void window_statistics(int member, int& parity, int64_t t, int64_t r0, int64_t r1,
                         Local& local, T* stats) {
    const Layout<T>& L = L_;
    const Options& o = m_.options;
    const int64_t Ha = L.Ha;
    constexpr int lanes = kLanes<T>;
    if (!o.activation) return;
    int64_t valid = 0;  // Σ_b count: the number of entries the statistics are taken over
    for (int64_t b = 0; b < L.B; ++b) valid += count(b, t);
    T* partial = local.partial.data();
    std::memset(partial, 0, sizeof(T) * 4 * Ha);
    if (o.carries_moments()) {
      // next = sums + entering - leaving; the window's sums = next + leaving
      // (larnn_jax.window.slide_moment_sums), with d = entry - reference, [d_K, d_V, d_K², d_V²].
      for (int64_t b = r0; b < r1; ++b) {
        const bool full = count(b, t) == L.k;
        T* s = sums_.data() + b * 4 * Ha;
        for (int kind = 0; kind < 2; ++kind) {
          T* buffer = kind == 0 ? keys_buffer() : values_buffer();
          const T* entering = entry(buffer, L.T_ - t, b);
          const T* leaving = entry(buffer, L.T_ - t + L.k - 1, b);
          const T* reference = m_.reference.data() + kind * Ha;
          for (int64_t i = 0; i < Ha; i += lanes) {
            const Vec<T> r = load(reference + i);
            const Vec<T> d_in = load(entering + i) - r;
            const Vec<T> d_out = full ? load(leaving + i) - r : Vec<T>{};
            for (int power = 0; power < 2; ++power) {
              T* sum = s + (2 * power + kind) * Ha + i;
              const Vec<T> in = power == 0 ? d_in : d_in * d_in;
              const Vec<T> out = power == 0 ? d_out : d_out * d_out;
              const Vec<T> next = load(sum) + in - out;
              store(sum, next);
              T* p = partial + (2 * power + kind) * Ha + i;
              store(p, load(p) + (next + out));
            }
          }
        }
      }
      if (!o.training) return;
      T* totals = local.partial.data() + 4 * Ha;
      reducer_.sum(member, parity, partial, 4 * Ha, totals);
      // larnn_jax.window.moments_from_sums; kept as the mean deviation and the variance before
      // its clamp at 0 (Model::window_moments).
      for (int64_t i = 0; i < Ha; ++i) {
        for (int kind = 0; kind < 2; ++kind) {
          const T deviation_mean = totals[kind * Ha + i] / T(valid);
          const T square_mean = totals[(2 + kind) * Ha + i] / T(valid);
          stats[2 * kind * Ha + i] = deviation_mean;
          stats[(2 * kind + 1) * Ha + i] = square_mean - deviation_mean * deviation_mean;
        }
      }
      return;
    }
    if (!o.training) return;
    // Positional encoding: two passes over the window's features (mean, then variance).
    T* result = local.partial.data() + 2 * Ha;
    for (int pass = 0; pass < 2; ++pass) {
      std::memset(partial, 0, sizeof(T) * 2 * Ha);
      for (int64_t b = r0; b < r1; ++b) {
        for (int64_t j = 0; j < count(b, t); ++j) {
          for (int kind = 0; kind < 2; ++kind) {
            const T* w = window_row(kind, b, j, t);
            const T* mean = stats + 2 * kind * Ha;
            T* p = partial + kind * Ha;
            for (int64_t i = 0; i < Ha; i += lanes) {
              Vec<T> v = load(w + i);
              if (pass == 1) {
                v = v - load(mean + i);
                v = v * v;
              }
              store(p + i, load(p + i) + v);
            }
          }
        }
      }
      reducer_.sum(member, parity, partial, 2 * Ha, result);
      for (int kind = 0; kind < 2; ++kind) {
        for (int64_t i = 0; i < Ha; ++i) {
          stats[(2 * kind + pass) * Ha + i] = result[kind * Ha + i] / T(valid);
        }
      }
    }
  }

  // The attention of sample b's query q (head-minor, Ha) over its window at step t.
  void attend(int64_t t, int64_t b, const T* q, const T* key_scale, T* context, T* maximum,
              T* sum, T* total, Local& local) {
    const Layout<T>& L = L_;
    const Options& o = m_.options;
    constexpr int lanes = kLanes<T>;
    const int64_t np = L.np, valid = count(b, t);
    // The next sample's window rows are fetched a row at a time while this sample's are computed.
    const int64_t next_valid = b + 1 < L.B ? count(b + 1, t) : 0;
    // The query, scaled by the key norm's scale and by 1 / sqrt(d_k), in that order.
    T* scaled = local.row.data();
    for (int64_t i = 0; i < L.Ha; i += lanes) {
      Vec<T> v = load(q + i);
      if (o.activation) v = v * load(key_scale + i);
      store(scaled + i, v * m_.score_scale);
    }
    // Scores (and their maximum per head) in one pass over the keys.
    T* scores = local.scores.data();
    T* top = scaled + L.Ha;  // (np)
    for (int64_t j = 0; j < valid; ++j) {
      const T* key = window_row(0, b, j, t);
      if (j < next_valid) {
        prefetch(window_row(0, b + 1, j, t), sizeof(T) * L.Ha);
        prefetch(window_row(1, b + 1, j, t), sizeof(T) * L.Ha);
      }
      for (int64_t h = 0; h < np; h += lanes) {
        Vec<T> s = Vec<T>{};
        for (int64_t d = 0; d < L.dk; ++d) s += load(scaled + d * np + h) * load(key + d * np + h);
        store(scores + j * np + h, s);
        store(top + h, j == 0 ? s : vmax<T>(load(top + h), s));
      }
    }
    uint16_t* bits = nullptr;  // kept for the backward pass
    if (saving() && o.training) {
      bits = reinterpret_cast<uint16_t*>(out_.residual + residual_.masks) +
             (t * L.B + b) * L.k * (np / lanes);
    }
    int64_t stride;
    const T* factors =
        attention_factors(m_, o.training ? m_.key(t, kKeyAttention) : RandomKey{}, b,
                          local.factors.data(), local.words.data(), bits, nullptr, stride);
    // Softmax over the valid entries: exp(s - max) / Σ exp, then the dropout factors.
    std::memset(sum, 0, sizeof(T) * np);
    for (int64_t j = 0; j < valid; ++j) {
      for (int64_t h = 0; h < np; h += lanes) {
        const Vec<T> e = vexp<T>(load(scores + j * np + h) - load(top + h));
        store(scores + j * np + h, e);
        store(sum + h, load(sum + h) + e);
      }
    }
    std::memcpy(maximum, top, sizeof(T) * np);
    T* inverse = top;  // the maximum is saved
    for (int64_t h = 0; h < np; h += lanes) store(inverse + h, T(1) / load(sum + h));
    std::memset(total, 0, sizeof(T) * np);
    std::memset(context, 0, sizeof(T) * L.Ha);
    for (int64_t j = 0; j < valid; ++j) {
      const T* value = window_row(1, b, j, t);
      for (int64_t h = 0; h < np; h += lanes) {
        const Vec<T> kept =
            load(scores + j * np + h) * load(inverse + h) * load(factors + j * stride + h);
        store(total + h, load(total + h) + kept);
        for (int64_t d = 0; d < L.dk; ++d) {
          T* c = context + d * np + h;
          store(c, load(c) + kept * load(value + d * np + h));
        }
      }
    }
  }

  // y = BN(x) over the batch's rows of x (rows, F): batch statistics (two passes, as
  // jnp.mean(x) and jnp.mean(square(x - mean))) in training, updating the running averages
  // (member 0's copy), or the running averages in evaluation. `stats` receives mean and var.
  void normalise(int member, int& parity, const T* x, int64_t F, int64_t r0, int64_t r1,
                 const T* gamma, const T* beta, int64_t run, T* stats, T* scale, T* shift, T* y,
                 Local& local) {
    Timed timed(kForwardNorms);
    const Layout<T>& L = L_;
    constexpr int lanes = kLanes<T>;
    const T* mean;
    const T* var;
    if (m_.options.training) {
      T* partial = local.partial.data();
      for (int pass = 0; pass < 2; ++pass) {
        std::memset(partial, 0, sizeof(T) * F);
        for (int64_t b = r0; b < r1; ++b) {
          for (int64_t i = 0; i < F; i += lanes) {
            Vec<T> v = load(x + b * F + i);
            if (pass == 1) {
              v = v - load(stats + i);
              v = v * v;
            }
            store(partial + i, load(partial + i) + v);
          }
        }
        T* result = stats + pass * F;
        reducer_.sum(member, parity, partial, F, result);
        for (int64_t i = 0; i < F; ++i) result[i] = result[i] / T(L.B);
      }
      mean = stats;
      var = stats + F;
      if (member == 0) {
        update_running(running_.data() + run, mean, F);
        update_running(running_.data() + run + F, var, F);
      }
    } else {
      mean = running_.data() + run;
      var = running_.data() + run + F;
    }
    norm_affine<T>(gamma, beta, mean, var, F, scale, shift);
    for (int64_t b = r0; b < r1; ++b) {
      for (int64_t i = 0; i < F; i += lanes) {
        store(y + b * F + i, load(x + b * F + i) * load(scale + i) + load(shift + i));
      }
    }
  }

  const Model<T>& m_;
  const Layout<T>& L_;
  ForwardOutputs<T> out_;
  int members_;
  Reducer<T> reducer_;
  typename Layout<T>::Residual residual_;
  // Shared (each member writes its own rows): this step's activations and the carry.
  Array<T> qz_, attended_, activated_, gates_, c_, h_, normalised_, sums_;
  Array<T> query_, context_, activation_, gate_inputs_, softmax_;  // without saved residuals
  Array<T> window_;       // (2, B, k, Ha): the window's features with positional encoding
  Array<T> running_;      // the running averages (member 0 updates them)
};

}  // namespace larnn
