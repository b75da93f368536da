// Global-memory pointers that know their buffer: kernels take diffkern::gptr<T>, which is a raw T*
// under nvcc and a DevPtr<T> here, so an index outside the allocation stops the kernel with its
// name, block, thread, index and extent instead of corrupting the host heap.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "report.h"
#include "traffic.h"

namespace diffkern::harness {

[[noreturn]] inline void global_out_of_bounds(const char* name, int64_t index, int64_t extent) {
  fail("global out of bounds", "index " + std::to_string(index) + " of " + name + " (extent " +
                                   std::to_string(extent) + " elements)");
}

template <typename T>
class DevPtr {
 public:
  DevPtr() = default;
  DevPtr(T* base, int64_t extent, const char* name) : base_(base), extent_(extent), name_(name) {}
  // gptr<T> converts to gptr<const T>, as T* does to const T*.
  template <typename U, typename = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  DevPtr(const DevPtr<U>& o) : base_(o.base()), extent_(o.extent()), off_(o.offset()), name_(o.name()) {}

  template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
  T& operator[](I i) const {
    return base_[counted(checked(int64_t(i)), 1)];
  }
  T& operator*() const { return base_[counted(checked(0), 1)]; }
  template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
  DevPtr operator+(I i) const {
    DevPtr p = *this;
    p.off_ += int64_t(i);
    return p;
  }
  // Element `i` onward as one contiguous run of `n`: what a vector load reads (vec.h).
  T* span(int64_t i, int64_t n) const {
    counted(checked(i), n);
    checked(i + n - 1);
    return base_ + off_ + i;
  }

  T* base() const { return base_; }
  int64_t extent() const { return extent_; }
  int64_t offset() const { return off_; }
  const char* name() const { return name_; }

 private:
  int64_t checked(int64_t i) const {
    const int64_t at = off_ + i;
    if (at < 0 || at >= extent_) global_out_of_bounds(name_, at, extent_);
    return at;
  }
  int64_t counted(int64_t at, int64_t n) const {
    if (counting_traffic()) touch(base_, at * int64_t(sizeof(T)), n * int64_t(sizeof(T)));
    return at;
  }
  T* base_ = nullptr;
  int64_t extent_ = 0;
  int64_t off_ = 0;
  const char* name_ = "";
};

}  // namespace diffkern::harness
