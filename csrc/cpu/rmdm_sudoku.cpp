// Seeded Sudoku generator for R-MDM's benchmark task (specs/rmdm.md "Data and metrics").
//
// Puzzle i is made from its own random stream (seed and i mixed by splitmix64), so the output does not
// depend on the thread count and any prefix of a larger call repeats a smaller one. A solution is a
// random complete grid (randomised backtracking over candidate bitmasks, fewest-candidates cell first);
// the puzzle removes cells in a random order, keeping a removal only while the puzzle still has exactly
// one solution, until `clues` remain. Greedy removal can stall on a minimal puzzle with more clues than
// asked (rare above 26 clues, common below 24); the grid is then redrawn, up to kAttempts times.
#include <array>
#include <atomic>
#include <cstdint>
#include <tuple>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace diffkern::rmdm {
namespace {

constexpr int kCells = 81;
constexpr uint16_t kAll = 0x1FF;  // digits 1..9 as bits 0..8
constexpr int kAttempts = 200;
constexpr int kMinClues = 17;  // no 9x9 puzzle with fewer clues has a unique solution

uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct Rng {
  uint64_t s;
  uint32_t below(uint32_t n) { return static_cast<uint32_t>((splitmix64(s) >> 32) * n >> 32); }
};

inline int box_of(int c) { return (c / 27) * 3 + (c % 9) / 3; }

// A partial grid with the digits used per row, column and box as bitmasks.
struct Grid {
  std::array<uint8_t, kCells> v{};
  std::array<uint16_t, 9> row{}, col{}, box{};

  uint16_t candidates(int c) const { return kAll & ~(row[c / 9] | col[c % 9] | box[box_of(c)]); }
  void put(int c, int d) {
    v[c] = static_cast<uint8_t>(d);
    const uint16_t bit = 1u << (d - 1);
    row[c / 9] |= bit, col[c % 9] |= bit, box[box_of(c)] |= bit;
  }
  void clear(int c) {
    const uint16_t bit = ~(1u << (v[c] - 1));
    row[c / 9] &= bit, col[c % 9] &= bit, box[box_of(c)] &= bit;
    v[c] = 0;
  }
  // The empty cell with the fewest candidates, or -1 when full; sets `mask` to its candidates.
  int most_constrained(uint16_t& mask) const {
    int best = -1, best_n = 10;
    for (int c = 0; c < kCells; ++c) {
      if (v[c]) continue;
      const uint16_t m = candidates(c);
      const int n = __builtin_popcount(m);
      if (n < best_n) {
        best = c, best_n = n, mask = m;
        if (n <= 1) break;
      }
    }
    return best;
  }
};

// Number of completions of g, counting no further than `limit` (int64: the caller's limit is never narrowed).
int64_t count_solutions(Grid& g, int64_t limit) {
  uint16_t mask = 0;
  const int c = g.most_constrained(mask);
  if (c < 0) return 1;
  int64_t n = 0;
  for (uint16_t m = mask; m && n < limit; m &= m - 1) {
    g.put(c, __builtin_ctz(m) + 1);
    n += count_solutions(g, limit - n);
    g.clear(c);
  }
  return n;
}

// Completes g with candidates tried in random order; false if g has no completion.
bool fill_random(Grid& g, Rng& rng) {
  uint16_t mask = 0;
  const int c = g.most_constrained(mask);
  if (c < 0) return true;
  std::array<int, 9> digits;
  int n = 0;
  for (uint16_t m = mask; m; m &= m - 1) digits[n++] = __builtin_ctz(m) + 1;
  for (int i = n - 1; i > 0; --i) std::swap(digits[i], digits[rng.below(i + 1)]);
  for (int i = 0; i < n; ++i) {
    g.put(c, digits[i]);
    if (fill_random(g, rng)) return true;
    g.clear(c);
  }
  return false;
}

// Draws a solution and removes cells down to `clues`; false if removal stalled above `clues`.
bool try_make(Rng& rng, int clues, Grid& puzzle, Grid& solution) {
  solution = Grid{};
  fill_random(solution, rng);
  puzzle = solution;
  std::array<int, kCells> order;
  for (int c = 0; c < kCells; ++c) order[c] = c;
  for (int i = kCells - 1; i > 0; --i) std::swap(order[i], order[rng.below(i + 1)]);
  int left = kCells;
  for (int i = 0; i < kCells && left > clues; ++i) {
    const int c = order[i], d = puzzle.v[c];
    puzzle.clear(c);
    if (count_solutions(puzzle, 2) == 1) {
      --left;
    } else {
      puzzle.put(c, d);
    }
  }
  return left == clues;
}

std::tuple<at::Tensor, at::Tensor> rmdm_sudoku_cpu(int64_t n, int64_t clues, int64_t seed) {
  TORCH_CHECK_VALUE(n >= 0, "rmdm_sudoku: n must be >= 0, got ", n);
  TORCH_CHECK_VALUE(clues >= kMinClues && clues <= kCells, "rmdm_sudoku: clues must be in [", kMinClues, ", ",
                    kCells, "], got ", clues);
  at::Tensor puzzles = at::empty({n, kCells}, at::kLong), solutions = at::empty({n, kCells}, at::kLong);
  int64_t *pp = puzzles.mutable_data_ptr<int64_t>(), *ps = solutions.mutable_data_ptr<int64_t>();
  std::atomic<int64_t> failed{-1};
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      uint64_t s = static_cast<uint64_t>(seed) * 0x2545F4914F6CDD1Dull ^ static_cast<uint64_t>(i);
      Rng rng{splitmix64(s)};
      Grid puzzle, solution;
      int attempt = 0;
      while (!try_make(rng, static_cast<int>(clues), puzzle, solution) && ++attempt < kAttempts) {
      }
      if (attempt == kAttempts) {
        failed = i;
        return;
      }
      for (int c = 0; c < kCells; ++c) pp[i * kCells + c] = puzzle.v[c], ps[i * kCells + c] = solution.v[c];
    }
  });
  TORCH_CHECK_VALUE(failed.load() < 0, "rmdm_sudoku: no unique-solution puzzle with ", clues, " clues after ",
                    kAttempts, " grids (puzzle ", failed.load(), "); greedy removal stalls often below ~24 "
                    "clues, ask for more");
  return {puzzles, solutions};
}

// Number of solutions of each puzzle ([n, 81], 0 = blank), counting no further than `limit`.
at::Tensor rmdm_sudoku_count_cpu(const at::Tensor& puzzles, int64_t limit) {
  TORCH_CHECK_VALUE(puzzles.dim() == 2 && puzzles.size(1) == kCells && puzzles.scalar_type() == at::kLong,
                    "rmdm_sudoku_count: puzzles must be an int64 [n, 81] tensor, got ", puzzles.sizes(), " ",
                    puzzles.scalar_type());
  TORCH_CHECK_VALUE(limit >= 1, "rmdm_sudoku_count: limit must be >= 1, got ", limit);
  const at::Tensor p = puzzles.contiguous();
  const int64_t n = p.size(0);
  at::Tensor counts = at::empty({n}, at::kLong);
  const int64_t* pp = p.const_data_ptr<int64_t>();
  int64_t* pc = counts.mutable_data_ptr<int64_t>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      Grid g;
      bool consistent = true;
      for (int c = 0; c < kCells && consistent; ++c) {
        const int64_t d = pp[i * kCells + c];
        TORCH_CHECK_VALUE(d >= 0 && d <= 9, "rmdm_sudoku_count: cells must be 0 (blank) or 1..9, got ", d);
        if (d == 0) continue;
        consistent = (g.candidates(c) >> (d - 1)) & 1u;
        if (consistent) g.put(c, static_cast<int>(d));
      }
      pc[i] = consistent ? count_solutions(g, limit) : 0;
    }
  });
  return counts;
}

}  // namespace
}  // namespace diffkern::rmdm

TORCH_LIBRARY_IMPL(diffkern, CompositeExplicitAutograd, m) {
  m.impl("rmdm_sudoku", TORCH_FN(diffkern::rmdm::rmdm_sudoku_cpu));
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("rmdm_sudoku_count", TORCH_FN(diffkern::rmdm::rmdm_sudoku_count_cpu));
}
