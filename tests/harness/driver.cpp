// Runs one harness case: launches a test kernel through the host harness and checks it against a
// plain C++ reference in double. Exit 0: matches; 1: wrong answer ("mismatch"); 3: the harness
// caught a fault (its message on stderr). tests/test_cuda_harness.py asserts which each case gives.
//
//   driver CASE [--seed N] [--no-shuffle] [--no-race-check] [--out DIR]
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "block_reduce.cu"
#include "global_access.cu"
#include "row_math.cu"
#include "warp_reduce.cu"

namespace h = diffkern::harness;
using diffkern::gptr;

namespace {

std::string out_dir = ".";

std::vector<float> randn(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (float& x : v) x = d(g);
  return v;
}

template <typename T>
gptr<T> dev(std::vector<T>& v, const char* name) {
  return gptr<T>(v.data(), int64_t(v.size()), name);
}

int check(const std::vector<float>& got, const std::vector<double>& want, double rtol = 1e-5) {
  double worst = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::abs(double(got[i]) - want[i]) / (1.0 + std::abs(want[i]));
    if (!(err <= rtol)) {
      std::printf("mismatch at %zu: got %.9g want %.9g\n", i, double(got[i]), want[i]);
      return 1;
    }
    worst = std::max(worst, err);
  }
  std::printf("ok max_rel_err=%.3g\n", worst);
  return 0;
}

std::vector<double> row_sums(const std::vector<float>& x, size_t rows) {
  const size_t n = x.size() / rows;
  std::vector<double> s(rows, 0.0);
  for (size_t r = 0; r < rows; ++r)
    for (size_t i = 0; i < n; ++i) s[r] += x[r * n + i];
  return s;
}

int block_sum(void (*kernel)(gptr<const float>, gptr<float>, int), const char* name) {
  const int rows = 5, n = 1000;  // n: not a multiple of the block, so threads load different counts
  auto x = randn(size_t(rows * n), 1);
  std::vector<float> out(rows, NAN);
  h::launch(name, kernel, dim3(rows), dim3(kBlock), 0, dev(x, "x"), dev(out, "out"), n);
  return check(out, row_sums(x, rows));
}

int block_sum_dynamic() {
  const int rows = 3, n = 777, threads = 256;
  auto x = randn(size_t(rows * n), 2);
  std::vector<float> out(rows, NAN);
  h::launch("block_sum_dynamic_kernel", block_sum_dynamic_kernel, dim3(rows), dim3(threads), threads * sizeof(float),
            dev(x, "x"), dev(out, "out"), n);
  return check(out, row_sums(x, rows));
}

int warp_sum(void (*kernel)(gptr<const float>, gptr<float>), const char* name, bool every_lane) {
  const int rows = 4;
  auto x = randn(size_t(rows * 32), 3);
  std::vector<float> out(size_t(every_lane ? rows * 32 : rows), NAN);
  h::launch(name, kernel, dim3(rows), dim3(32), 0, dev(x, "x"), dev(out, "out"));
  auto s = row_sums(x, rows);
  std::vector<double> want;
  for (int r = 0; r < rows; ++r) want.insert(want.end(), every_lane ? 32 : 1, s[size_t(r)]);
  return check(out, want);
}

int warp_vote() {
  const int rows = 3;
  auto x = randn(size_t(rows * 32), 4);
  for (int l = 0; l < 32; ++l) x[size_t(32 + l)] = 1.0f + float(l);  // row 1: all positive
  for (int l = 0; l < 32; ++l) x[size_t(64 + l)] = -1.0f;            // row 2: none
  std::vector<float> out(size_t(rows * 4), NAN);
  h::launch("warp_vote_kernel", warp_vote_kernel, dim3(rows), dim3(32), 0, dev(x, "x"), dev(out, "out"));
  std::vector<double> want;
  for (int r = 0; r < rows; ++r) {
    int pos = 0;
    for (int l = 0; l < 32; ++l) pos += x[size_t(r * 32 + l)] > 0.0f;
    want.insert(want.end(), {double(pos), double(pos == 32), double(pos > 0), double(x[size_t(r * 32 + 31)])});
  }
  return check(out, want);
}

int warp_reverse(void (*kernel)(gptr<const float>, gptr<float>), const char* name) {
  const int rows = 3;
  auto x = randn(size_t(rows * 32), 9);
  std::vector<float> out(x.size(), NAN);
  h::launch(name, kernel, dim3(rows), dim3(32), 0, dev(x, "x"), dev(out, "out"));
  std::vector<double> want;
  for (int r = 0; r < rows; ++r)
    for (int l = 0; l < 32; ++l) want.push_back(x[size_t(r * 32 + 31 - l)]);
  return check(out, want);
}

int scale(void (*kernel)(gptr<const float>, gptr<float>, float, int64_t), const char* name) {
  const int64_t n = 1000, threads = 128;  // 8 blocks; the last one is partly past the end
  auto x = randn(size_t(n), 5);
  std::vector<float> y(size_t(n), NAN);
  h::launch(name, kernel, dim3(unsigned((n + threads - 1) / threads)), dim3(unsigned(threads)), 0, dev(x, "x"),
            dev(y, "y"), 2.5f, n);
  std::vector<double> want(x.begin(), x.end());
  for (double& w : want) w *= 2.5;
  return check(y, want);
}

// `offset` shifts the rows by one float to plant a misaligned float4 load.
int row_sum_vec4(int64_t offset) {
  const int64_t rows = 6, d = 1156;  // d: a multiple of 4 that is not one of the block's 256-float stride
  auto x = randn(size_t(rows * d + offset), 6);
  std::vector<float> out(size_t(rows), NAN);
  h::launch("row_sum_vec4_kernel", row_sum_vec4_kernel, dim3(unsigned(rows)), dim3(64), 0, dev(x, "x") + offset,
            dev(out, "out"), d);
  return check(out, row_sums(std::vector<float>(x.begin() + offset, x.end()), size_t(rows)));
}

int row_stats() {
  const int64_t rows = 4, d = 45;  // d: lanes hold one or two values; some rows are large
  auto x = randn(size_t(rows * d), 7);
  for (int64_t i = 0; i < d; ++i) x[size_t(d + i)] *= 40.0f;
  std::vector<float> out(size_t(rows * 4), NAN);
  h::launch("row_stats_kernel", row_stats_kernel, dim3(unsigned(rows)), dim3(32), 0, dev(x, "x"), dev(out, "out"), d,
            1e-6f);
  std::vector<double> want;
  for (int64_t r = 0; r < rows; ++r) {
    double m = -INFINITY, s = 0.0, sq = 0.0, lo = INFINITY;
    for (int64_t i = 0; i < d; ++i) m = std::max(m, double(x[size_t(r * d + i)]));
    for (int64_t i = 0; i < d; ++i) {
      const double v = x[size_t(r * d + i)];
      s += std::exp(v - m), sq += v * v, lo = std::min(lo, v);
    }
    const double rstd = 1.0 / std::sqrt(sq / double(d) + 1e-6);
    want.insert(want.end(), {m + std::log(s), rstd, rstd, lo});
  }
  return check(out, want, 2e-5);
}

// Prints a digest of kernels whose output must not depend on block order or thread schedule.
int order_digest() {
  auto x = randn(5 * 1000, 1);
  std::vector<float> sums(5, NAN);
  h::launch("block_sum_kernel", block_sum_kernel, dim3(5), dim3(kBlock), 0, dev(x, "x"), dev(sums, "out"), 1000);
  std::vector<float> rows(5, NAN);
  h::launch("row_sum_vec4_kernel", row_sum_vec4_kernel, dim3(5), dim3(64), 0, dev(x, "x"), dev(rows, "out"),
            int64_t(1000));
  std::vector<int> keys(3000), counts(17, 0);
  for (size_t i = 0; i < keys.size(); ++i) keys[i] = int(i * 7919 % 17);
  h::launch("histogram_kernel", histogram_kernel, dim3(24), dim3(128), 0, dev(keys, "x"), dev(counts, "counts"),
            int64_t(keys.size()));
  std::vector<int> shared_counts(17, 0);
  h::launch("shared_histogram_kernel", shared_histogram_kernel, dim3(24), dim3(128), 0, dev(keys, "x"),
            dev(shared_counts, "counts"), int64_t(keys.size()), 17);
  if (shared_counts != counts) return std::printf("mismatch: shared-memory histogram\n"), 1;
  for (int c : counts)
    if (c != 3000 / 17 && c != 3000 / 17 + 1) return std::printf("mismatch: histogram\n"), 1;
  uint64_t digest = 1469598103934665603ull;  // FNV-1a over the output bytes
  auto mix = [&](const void* p, size_t n) {
    for (size_t i = 0; i < n; ++i) digest = (digest ^ static_cast<const unsigned char*>(p)[i]) * 1099511628211ull;
  };
  mix(sums.data(), sums.size() * 4), mix(rows.data(), rows.size() * 4), mix(counts.data(), counts.size() * 4);
  std::printf("digest %016llx\n", static_cast<unsigned long long>(digest));
  return 0;
}

// Writes x, x through bf16 and x through fp16 as raw float32 files for the test to compare with torch.
int round_trip() {
  std::vector<float> x = {0.0f, -0.0f, 1.0f, -1.0f, INFINITY, -INFINITY, NAN, 3.0e38f, 3.4028235e38f,
                          1e-40f, -1e-45f, 65504.0f, 65520.0f, 6e-8f, 1e-5f};
  std::mt19937 g(8);
  for (int i = 0; i < 4096; ++i) {
    uint32_t bits = g();
    if (i % 2) bits = (bits & 0xffff0000u) | 0x8000u;  // exact bf16 half-way cases
    float f;
    std::memcpy(&f, &bits, 4);
    x.push_back(f);
  }
  std::vector<float> bf(x.size(), 0.0f), hf(x.size(), 0.0f);
  h::launch("round_trip_kernel", round_trip_kernel, dim3(4), dim3(128), 0, dev(x, "x"), dev(bf, "via_bf16"),
            dev(hf, "via_fp16"), int64_t(x.size()));
  for (auto [name, v] : {std::pair{"x", &x}, {"bf16", &bf}, {"fp16", &hf}}) {
    FILE* f = std::fopen((out_dir + "/" + name + ".f32").c_str(), "wb");
    std::fwrite(v->data(), 4, v->size(), f);
    std::fclose(f);
  }
  std::printf("ok wrote %zu values\n", x.size());
  return 0;
}

// Measures the harness's cost per fiber switch: 1024 threads through 200 barriers.
__global__ void barriers_kernel(int rounds) {
  for (int i = 0; i < rounds; ++i) __syncthreads();
}

int switch_cost() {
  const int rounds = 200;
  auto t0 = std::chrono::steady_clock::now();
  h::launch("barriers_kernel", barriers_kernel, dim3(1), dim3(1024), 0, rounds);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("ok %.0f ns per thread switch (%d switches)\n", s * 1e9 / (1024.0 * rounds), 1024 * rounds);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, std::function<int()>> cases = {
      {"block_sum", [] { return block_sum(block_sum_kernel, "block_sum_kernel"); }},
      {"block_sum_missing_sync", [] { return block_sum(block_sum_missing_sync_kernel, "block_sum_missing_sync_kernel"); }},
      {"block_sum_dynamic", block_sum_dynamic},
      {"early_exit_barrier",
       [] {
         std::vector<float> out(64, NAN);
         h::launch("early_exit_barrier_kernel", early_exit_barrier_kernel, dim3(1), dim3(64), 0, dev(out, "out"));
         return 0;
       }},
      {"warp_sum_xor", [] { return warp_sum(warp_sum_xor_kernel, "warp_sum_xor_kernel", true); }},
      {"warp_sum_down", [] { return warp_sum(warp_sum_down_kernel, "warp_sum_down_kernel", false); }},
      {"warp_sum_wrong_width", [] { return warp_sum(warp_sum_wrong_width_kernel, "warp_sum_wrong_width_kernel", false); }},
      {"warp_vote", warp_vote},
      {"shfl_outside_mask",
       [] {
         auto x = randn(32, 10);
         std::vector<float> out(1, NAN);
         h::launch("shfl_outside_mask_kernel", shfl_outside_mask_kernel, dim3(1), dim3(32), 0, dev(x, "x"),
                   dev(out, "out"));
         return 0;
       }},
      {"warp_reverse", [] { return warp_reverse(warp_reverse_kernel, "warp_reverse_kernel"); }},
      {"warp_reverse_missing_syncwarp",
       [] { return warp_reverse(warp_reverse_missing_syncwarp_kernel, "warp_reverse_missing_syncwarp_kernel"); }},
      {"shfl_divergent",
       [] {
         std::vector<float> out(32, NAN);
         h::launch("shfl_divergent_kernel", shfl_divergent_kernel, dim3(1), dim3(32), 0, dev(out, "out"));
         return 0;
       }},
      {"scale", [] { return scale(scale_kernel, "scale_kernel"); }},
      {"scale_oob", [] { return scale(scale_oob_kernel, "scale_oob_kernel"); }},
      {"row_sum_vec4", [] { return row_sum_vec4(0); }},
      {"row_sum_vec4_misaligned", [] { return row_sum_vec4(1); }},
      {"row_stats", row_stats},
      {"order_digest", order_digest},
      {"round_trip", round_trip},
      {"switch_cost", switch_cost},
  };
  if (argc < 2 || !cases.count(argv[1])) {
    std::fprintf(stderr, "usage: %s CASE [--seed N] [--no-shuffle] [--no-race-check] [--out DIR]\n", argv[0]);
    return 2;
  }
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--seed" && i + 1 < argc) h::options().seed = std::stoull(argv[++i]);
    else if (a == "--no-shuffle") h::options().shuffle_blocks = false;
    else if (a == "--no-race-check") h::options().detect_races = false;
    else if (a == "--out" && i + 1 < argc) out_dir = argv[++i];
    else return std::fprintf(stderr, "unknown option %s\n", argv[i]), 2;
  }
  return cases.at(argv[1])();
}
