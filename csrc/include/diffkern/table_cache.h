// A content-keyed cache of device tables (kernel pointer tables), safe under CUDA-graph capture and
// replay; the twin of python/diffkern/_tables.py (the same rules, tested by the same trace in
// tests/test_tables.py). Torch-free: the caller's Value holds the device table and its pinned host source.
//
// A key is (device, stream, the table's rows): the rows are the table's whole content, so a hit is correct
// for any call that builds the same rows, and a table is used only on the stream it was made on (its
// memory goes back to the caching allocator on that stream). Rules:
//  * miss: `make()` builds the value (fill a pinned host table, copy it asynchronously on the stream);
//  * entries made or used while the stream is capturing are never evicted: a graph re-reads the table,
//    and re-runs the copy from the pinned source, at every replay;
//  * the others form an LRU of at most `capacity` entries.
// Memory bound: capacity x (largest table) x 2 (device + pinned) in the LRU, plus one entry per distinct
// table captured in a graph, kept for the life of the process.
#pragma once

#include <cstddef>
#include <list>
#include <mutex>
#include <unordered_map>
#include <utility>

namespace diffkern {

template <class Key, class Value, class Hash>
class TableCache {
 public:
  explicit TableCache(std::size_t capacity) : capacity_(capacity) {}

  template <class Make>
  Value get(const Key& key, bool capturing, Make&& make) {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (const auto kept = kept_.find(key); kept != kept_.end()) return kept->second;
    if (const auto hit = index_.find(key); hit != index_.end()) {
      Value value = hit->second->second;
      lru_.erase(hit->second);
      index_.erase(hit);
      return insert(key, std::move(value), capturing);
    }
    return insert(key, make(), capturing);
  }

 private:
  Value insert(const Key& key, Value value, bool capturing) {
    if (capturing) return kept_.emplace(key, std::move(value)).first->second;
    lru_.emplace_back(key, value);
    index_.emplace(key, std::prev(lru_.end()));
    while (lru_.size() > capacity_) {
      index_.erase(lru_.front().first);
      lru_.pop_front();
    }
    return value;
  }

  using Entries = std::list<std::pair<Key, Value>>;
  std::size_t capacity_;
  std::mutex mutex_;
  Entries lru_;  // least recently used first
  std::unordered_map<Key, typename Entries::iterator, Hash> index_;
  std::unordered_map<Key, Value, Hash> kept_;
};

}  // namespace diffkern
