// A team of threads that splits the batch of a LARNN step and meets at barriers.
//
// The calling thread is member 0; the others run on worker threads that the library owns
// (Workers), not on XLA's intra-op pool: that pool may be busy with the very calls that wait for
// a member (two layers run side by side, or several computations from several Python threads),
// so a team formed from it would have to start without the members that did not come, and a
// call's sums over the batch would depend on how busy the machine was. A team always has the
// members it asked for, and every result is a function of the call's inputs and its thread count.
#pragma once

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
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

// Worker threads for the teams' helpers, started as needed: a task given to schedule() starts
// at once on an idle worker, or on a new one, so a member never waits for a thread that is
// itself waiting (no deadlock however many teams run at once). Idle workers sleep. A child
// process made by fork() starts with no workers (they do not survive the fork).
class Workers {
 public:
  static Workers& instance() {
    static const bool registered = [] {
      pthread_atfork(nullptr, nullptr, [] { current() = new Workers(); });  // the old one leaks
      return true;
    }();
    (void)registered;
    return *current();
  }

  void schedule(std::function<void()> task) {
    std::lock_guard<std::mutex> lock(mutex_);
    tasks_.push_back(std::move(task));
    if (idle_ > 0) {
      ready_.notify_one();
    } else {
      std::thread([this] { serve(); }).detach();
    }
  }

 private:
  static Workers*& current() {
    static Workers* workers = new Workers();  // never destroyed: its threads may outlive main
    return workers;
  }

  void serve() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      if (tasks_.empty()) {
        ++idle_;
        ready_.wait(lock, [this] { return !tasks_.empty(); });
        --idle_;
      }
      std::function<void()> task = std::move(tasks_.front());
      tasks_.pop_front();
      lock.unlock();
      task();
      lock.lock();
    }
  }

  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> tasks_;
  int idle_ = 0;  // workers waiting for a task
};

// Runs work(member, members, barrier) on `members` threads: the caller and members - 1 workers.
template <typename Work>
void run_team(int members, Work work) {
  if (members <= 1) {
    Barrier single(1);
    work(0, 1, single);
    return;
  }
  struct Shared {
    explicit Shared(int members) : barrier(members) {}
    Barrier barrier;
    std::atomic<int> finished{0};
  };
  auto shared = std::make_shared<Shared>(members);
  for (int member = 1; member < members; ++member) {
    Workers::instance().schedule([shared, member, members, &work] {
      work(member, members, shared->barrier);
      shared->finished.fetch_add(1, std::memory_order_acq_rel);
    });
  }
  work(0, members, shared->barrier);
  spin_until([&] { return shared->finished.load(std::memory_order_acquire) == members - 1; });
}

}  // namespace larnn
