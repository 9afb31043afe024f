// Where the native step's time goes: thread CPU time per section, summed over the members of every
// call, when the environment sets LARNN_JAX_NATIVE_PROFILE=1 (read once per process). Read and
// reset with larnn_profile_read (larnn_jax.native.read_profile, benchmarks/profile_step.py). Off, a
// section costs one branch.
#pragma once

#include <atomic>
#include <ctime>
#include <cstdint>
#include <cstdlib>

namespace larnn {

enum Section : int {
  // forward
  kForwardEnter,       // key/value dropout, [E_K | E_V] = c' W + b, elu
  kForwardWindow,      // the window's statistics (moment sums; positional features)
  kForwardProducts,    // h @ [W_q | W_h], attended @ W_o, a @ W_a
  kForwardAttention,   // q, scores, softmax, attention dropout, context
  kForwardNorms,       // the batch norms of a, z, c, h (statistics and application)
  kForwardGates,       // z, the LSTM update, σ(o) elu(cn), output dropout, copies out
  // backward
  kBackwardRecompute,  // the norms' affine maps, zn, elu(cn), output dropout
  kBackwardNorms,      // the norms' backward passes
  kBackwardGates,      // the LSTM update's and the output gate's backward passes
  kBackwardProducts,   // dz W_a^T, d(W_o att) W_o^T, [dq | dz] [W_q | W_h]^T, dE W^T
  kBackwardAttention,  // the attention's backward pass, window cotangents
  kBackwardWindow,     // the window's norms and moment sums
  kBackwardEnter,      // the entering entry's cotangent, c' and its dropout
  kBarrier,            // waiting for the other members (both passes)
  kSections
};

inline bool profiling() {
  static const bool enabled = [] {
    const char* value = std::getenv("LARNN_JAX_NATIVE_PROFILE");
    return value != nullptr && value[0] == '1';
  }();
  return enabled;
}

inline std::atomic<int64_t>* profile_nanoseconds() {
  static std::atomic<int64_t> totals[kSections];
  return totals;
}

// This thread's time spent waiting at barriers so far.
inline int64_t& barrier_nanoseconds() {
  thread_local int64_t total = 0;
  return total;
}

// This thread's CPU time: unlike the wall clock, it does not count time the thread was not
// running (the machine may be shared).
inline int64_t now_nanoseconds() {
  timespec now;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
  return int64_t(now.tv_sec) * 1000000000 + now.tv_nsec;
}

// Adds the time from its construction to its destruction to a section, less the time this thread
// waited at barriers meanwhile (counted in kBarrier).
class Timed {
 public:
  explicit Timed(Section section) : section_(section), on_(profiling()) {
    if (on_) {
      start_ = now_nanoseconds();
      waited_ = barrier_nanoseconds();
    }
  }
  ~Timed() {
    if (!on_) return;
    const int64_t elapsed = now_nanoseconds() - start_ - (barrier_nanoseconds() - waited_);
    profile_nanoseconds()[section_].fetch_add(elapsed, std::memory_order_relaxed);
  }
  Timed(const Timed&) = delete;
  Timed& operator=(const Timed&) = delete;

 private:
  Section section_;
  bool on_;
  int64_t start_ = 0, waited_ = 0;
};

// Times a barrier wait.
class TimedWait {
 public:
  TimedWait() : on_(profiling()), start_(on_ ? now_nanoseconds() : 0) {}
  ~TimedWait() {
    if (!on_) return;
    const int64_t elapsed = now_nanoseconds() - start_;
    barrier_nanoseconds() += elapsed;
    profile_nanoseconds()[kBarrier].fetch_add(elapsed, std::memory_order_relaxed);
  }

 private:
  bool on_;
  int64_t start_;
};

}  // namespace larnn
