// A team of threads that splits the batch of a LARNN step and meets at barriers.
//
// The calling thread is member 0; the others are tasks scheduled on XLA's intra-op thread pool.
// A task that has not started when the caller is ready to begin would make the caller wait on a
// thread that may be busy with other work (or, with every pool thread inside such a call, never
// come): so the caller waits only briefly, and if a helper has not claimed its place by then the
// caller cancels it and the team runs with the members that did start. The members' share of the
// batch is fixed once the team is formed, so every result is a function of the team size only.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <thread>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "profile.h"

namespace larnn {

inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins on `done()`, yielding the core now and then (the machine may be shared).
template <typename Done>
inline void spin_until(Done done) {
  for (int spins = 0; !done(); ++spins) {
    if (spins < 4000) {
      spin_pause();
    } else {
      std::this_thread::yield();
    }
  }
}

// Blocks while *word == expected (or returns at once if it differs), and wakes every thread
// blocked on word: the kernel's futex on Linux; elsewhere, yielding the core in a loop.
inline void wait_while_equal(std::atomic<int32_t>& word, int32_t expected) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<int32_t*>(&word), FUTEX_WAIT_PRIVATE, expected, nullptr,
          nullptr, 0);
#else
  if (word.load() == expected) std::this_thread::yield();
#endif
}
inline void wake_all(std::atomic<int32_t>& word) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<int32_t*>(&word), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr,
          nullptr, 0);
#else
  (void)word;
#endif
}

// A barrier that spins briefly, then sleeps until the last member arrives: on a machine with
// more runnable threads than cores, a member that spun (or yielded in a loop) while another was
// descheduled would take the core from it.
class Barrier {
 public:
  explicit Barrier(int members) : members_(members) {}

  // Every member calls wait(); no member returns before all have called it. Writes before the
  // barrier are visible to every member after it.
  void wait() {
    if (members_ == 1) return;
    TimedWait timed;
    const int32_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == members_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(int32_t(uint32_t(generation) + 1), std::memory_order_seq_cst);
      if (sleepers_.load(std::memory_order_seq_cst) > 0) wake_all(generation_);
      return;
    }
    for (int spins = 0; spins < kSpins; ++spins) {
      if (generation_.load(std::memory_order_acquire) != generation) return;
      spin_pause();
    }
    // Counted as a sleeper before the generation is read again: the last member either sees the
    // count and wakes it, or has already moved the generation on, which the futex call sees.
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    while (generation_.load(std::memory_order_seq_cst) == generation) {
      wait_while_equal(generation_, generation);
    }
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
  }

 private:
  static constexpr int kSpins = 4000;
  const int members_;
  std::atomic<int> arrived_{0};
  std::atomic<int32_t> generation_{0};
  std::atomic<int> sleepers_{0};
};

// Runs work(member, members, barrier) on up to `wanted` threads: the caller and wanted - 1 tasks
// given to schedule(task) (which may run them on any thread, at any later time, or at once).
template <typename Schedule, typename Work>
void run_team(int wanted, Schedule schedule, Work work) {
  if (wanted <= 1) {
    Barrier single(1);
    work(0, 1, single);
    return;
  }
  enum : int { kPending = 0, kClaimed = 1, kCancelled = 2 };
  struct Shared {
    std::atomic<int> slot_state[8];
    std::atomic<int> members{0};
    std::atomic<int> finished{0};
    std::atomic<bool> formed{false};
    std::unique_ptr<Barrier> barrier;
  };
  if (wanted > 8) wanted = 8;
  auto shared = std::make_shared<Shared>();
  for (auto& state : shared->slot_state) state.store(kPending);
  for (int slot = 1; slot < wanted; ++slot) {
    schedule([shared, slot, &work]() {
      int expected = kPending;
      if (!shared->slot_state[slot].compare_exchange_strong(expected, kClaimed)) return;
      // The team is formed once the caller has counted the helpers; a member's index is its
      // place among the helpers that claimed their slot.
      spin_until([&] { return shared->formed.load(std::memory_order_acquire); });
      int member = 1;
      for (int other = 1; other < slot; ++other) {
        member += shared->slot_state[other].load(std::memory_order_relaxed) == kClaimed;
      }
      work(member, shared->members.load(std::memory_order_relaxed), *shared->barrier);
      shared->finished.fetch_add(1, std::memory_order_acq_rel);
    });
  }
  // Helpers get a short while to start; those that have not are cancelled.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
  for (int slot = 1; slot < wanted; ++slot) {
    spin_until([&] {
      return shared->slot_state[slot].load(std::memory_order_acquire) != kPending ||
             std::chrono::steady_clock::now() > deadline;
    });
  }
  int members = 1;
  for (int slot = 1; slot < wanted; ++slot) {
    int expected = kPending;
    shared->slot_state[slot].compare_exchange_strong(expected, kCancelled);
    members += shared->slot_state[slot].load() == kClaimed;
  }
  shared->members.store(members, std::memory_order_relaxed);
  shared->barrier = std::make_unique<Barrier>(members);
  shared->formed.store(true, std::memory_order_release);
  work(0, members, *shared->barrier);
  spin_until([&] { return shared->finished.load(std::memory_order_acquire) == members - 1; });
}

}  // namespace larnn
