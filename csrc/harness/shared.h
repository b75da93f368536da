// Shared memory: per-block regions reached through checked pointers, and the hazard detector.
//
// A `__shared__` array cannot be a plain static here: accesses must be seen to be checked. Kernels
// declare shared memory with DIFFKERN_SHARED / DIFFKERN_EXTERN_SHARED (cuda_compat.h), which on the
// host yield a SharedPtr<T> into storage that the block owns, poisoned with 0xff bytes (NaN for
// floats) at block start. Every element access goes through SharedRef<T>, which bounds-checks it,
// may switch threads, and updates a per-byte shadow: who last wrote it and who read it since, in
// which barrier epoch. Two accesses by different threads to one byte in the same epoch, at least one
// a write (and not both atomics), are a hazard unless a __syncwarp of both lanes lies between them.
// Reading a byte no thread of the block has written is reported too.
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "block.h"

namespace diffkern::harness {

struct Shadow {
  int32_t writer = -1;  // thread index of the last write, -1 before any
  uint32_t write_epoch = 0;
  uint32_t write_sync = 0;  // length of the writer's warp __syncwarp history at the write
  bool atomic = false;      // the last write was an atomic
  int32_t reader = -1;      // the first thread that read it in read_epoch
  int32_t reader2 = -1;     // the latest other thread that read it in read_epoch, -1 if none
  uint32_t read_epoch = 0;
  uint32_t read_sync = 0;   // the reader's warp __syncwarp history length at its read
  uint32_t read_sync2 = 0;
};

struct SharedRegion {
  const char* name;
  const void* site;  // the declaration, so every thread of the block gets the same region
  std::vector<unsigned char> bytes;
  std::vector<Shadow> shadow;
};

enum class Access { read, write, atomic };

// Checks and records an access of `n` bytes at byte `offset` of `r` by the running thread.
void on_access(SharedRegion& r, size_t offset, size_t n, Access kind);

// The block's region for a declaration site (allocated on the first thread's request).
SharedRegion& static_region(const void* site, size_t bytes, const char* name);
SharedRegion& dynamic_region(const char* name);

template <typename T>
class SharedPtr;

// One element of shared memory, as a value that checks every load and store.
template <typename T>
class SharedRef {
 public:
  SharedRef(SharedRegion* r, size_t offset) : r_(r), off_(offset) {}
  operator T() const {
    on_access(*r_, off_, sizeof(T), Access::read);
    T v;
    std::memcpy(&v, r_->bytes.data() + off_, sizeof(T));
    return v;
  }
  SharedRef& operator=(const T& v) {
    on_access(*r_, off_, sizeof(T), Access::write);
    std::memcpy(r_->bytes.data() + off_, &v, sizeof(T));
    return *this;
  }
  SharedRef& operator=(const SharedRef& o) { return *this = T(o); }
  SharedRef& operator+=(const T& v) { return *this = T(*this) + v; }
  SharedRef& operator-=(const T& v) { return *this = T(*this) - v; }
  SharedRef& operator*=(const T& v) { return *this = T(*this) * v; }
  SharedPtr<T> operator&() const { return SharedPtr<T>(r_, off_); }
  // Atomics (intrinsics.h) read and write in one step, which on one OS thread is indivisible.
  T atomic_update(T (*f)(T, T), T v) {
    on_access(*r_, off_, sizeof(T), Access::atomic);
    T old;
    std::memcpy(&old, r_->bytes.data() + off_, sizeof(T));
    T next = f(old, v);
    std::memcpy(r_->bytes.data() + off_, &next, sizeof(T));
    return old;
  }

 private:
  SharedRegion* r_;
  size_t off_;
};

// A pointer into one shared region; indexing outside the region is an error.
template <typename T>
class SharedPtr {
 public:
  SharedPtr(SharedRegion* r, size_t offset) : r_(r), off_(offset) {}
  template <typename I>
  SharedRef<T> operator[](I i) const {
    return SharedRef<T>(r_, checked(int64_t(i)));
  }
  SharedRef<T> operator*() const { return (*this)[0]; }
  template <typename I>
  SharedPtr operator+(I i) const {
    return SharedPtr(r_, off_ + size_t(int64_t(i) * int64_t(sizeof(T))));
  }
  // The same bytes seen as another type, as a reinterpret_cast of a shared pointer would.
  template <typename U>
  SharedPtr<U> as() const {
    return SharedPtr<U>(r_, off_);
  }

 private:
  size_t checked(int64_t i) const;
  SharedRegion* r_;
  size_t off_;
};

[[noreturn]] void shared_out_of_bounds(const SharedRegion& r, int64_t byte, size_t n);

template <typename T>
size_t SharedPtr<T>::checked(int64_t i) const {
  const int64_t byte = int64_t(off_) + i * int64_t(sizeof(T));
  if (byte < 0 || byte + int64_t(sizeof(T)) > int64_t(r_->bytes.size())) shared_out_of_bounds(*r_, byte, sizeof(T));
  return size_t(byte);
}

template <typename T>
SharedPtr<T> static_shared(const void* site, size_t count, const char* name) {
  return SharedPtr<T>(&static_region(site, count * sizeof(T), name), 0);
}

template <typename T>
SharedPtr<T> dynamic_shared(const char* name) {
  return SharedPtr<T>(&dynamic_region(name), 0);
}

}  // namespace diffkern::harness
