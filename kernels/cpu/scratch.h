// The rows' working memory: Scratch<T>, a std::vector whose buffers come from a per-thread pool of freed ones and
// whose new elements are left unset.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <new>
#include <utility>
#include <vector>

#include "common.h"

namespace hsr {
namespace {   // (hsr_decode.cpp includes the stages; nothing here is seen by another file)

// A thread's freed buffers, kept by size class (powers of two from 64 bytes) and handed out again. A thread
// decodes its rows one after another, each building the same few dozen buffers: taken from here they are the
// previous row's memory, still in cache and TLB, where malloc hands back scattered chunks (measured: ~8% of a
// top-k call at 7.5K tokens and 8 rows, 6-8% at 4K and in softmax). What a thread keeps is bounded
// (KEPT_PER_CLASS buffers of a class, KEPT_BYTES in all) and freed when the thread ends.
class ScratchPool {
 public:
  static constexpr int MIN_SHIFT = 6;                 // 64 bytes: a cache line, the buffers' alignment
  static constexpr int CLASSES = 36;                  // up to 2^41 bytes; larger ones bypass the pool
  static constexpr int KEPT_PER_CLASS = 16;
  static constexpr size_t KEPT_BYTES = size_t(64) << 20;

  static ScratchPool& mine() {
    thread_local ScratchPool pool;
    return pool;
  }

  void* take(size_t bytes) {
    const int c = size_class(bytes);
    if (c >= CLASSES) return ::operator new(bytes);
    if (count_[c]) {
      kept_bytes_ -= class_bytes(c);
      return kept_[c][--count_[c]];
    }
    void* p = std::aligned_alloc(size_t(1) << MIN_SHIFT, class_bytes(c));
    if (!p) throw std::bad_alloc();
    return p;
  }

  void give(void* p, size_t bytes) {
    const int c = size_class(bytes);
    if (c >= CLASSES) return ::operator delete(p);
    if (count_[c] < KEPT_PER_CLASS && kept_bytes_ + class_bytes(c) <= KEPT_BYTES) {
      kept_[c][count_[c]++] = p;
      kept_bytes_ += class_bytes(c);
    } else {
      std::free(p);
    }
  }

  ~ScratchPool() {
    for (int c = 0; c < CLASSES; ++c)
      for (int i = 0; i < count_[c]; ++i) std::free(kept_[c][i]);
  }

 private:
  void* kept_[CLASSES][KEPT_PER_CLASS];
  int count_[CLASSES] = {};
  size_t kept_bytes_ = 0;

  // the smallest class that holds `bytes` (CLASSES: none)
  static int size_class(size_t bytes) {
    if (bytes <= class_bytes(0)) return 0;
    return std::min(CLASSES, 64 - __builtin_clzll(bytes - 1) - MIN_SHIFT);
  }
  static size_t class_bytes(int c) { return size_t(1) << (MIN_SHIFT + c); }
};

// Elements a container value-initializes (resize(n), Scratch<T>(n)) are default-initialized instead, as by
// `new T[n]`: numbers are left unset, not zero-filled. A row writes most of its buffers whole before reading them
// (bounds, flags, lists), and zero-filling them cost ~3% of a top-k call at 7.5K tokens; where zeros are needed
// they are given, as in Scratch<double>(n, 0.0).
template <typename T>
struct ScratchAllocator {
  using value_type = T;
  ScratchAllocator() = default;
  template <typename U>
  ScratchAllocator(const ScratchAllocator<U>&) {}
  T* allocate(size_t n) {
    if (n > size_t(-1) / sizeof(T)) throw std::bad_array_new_length();
    return static_cast<T*>(ScratchPool::mine().take(n * sizeof(T)));
  }
  void deallocate(T* p, size_t n) { ScratchPool::mine().give(p, n * sizeof(T)); }
  template <typename U>
  void construct(U* p) noexcept(noexcept(U())) { ::new (static_cast<void*>(p)) U; }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) { ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...); }
  template <typename U>
  bool operator==(const ScratchAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const ScratchAllocator<U>&) const { return false; }
};

template <typename T>
using Scratch = std::vector<T, ScratchAllocator<T>>;

}  // namespace
}  // namespace hsr
