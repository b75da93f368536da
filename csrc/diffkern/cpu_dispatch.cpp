// Run-time choice of the CPU kernels' instruction set.
//
// This library (schemas, CUDA glue) is compiled for the portable baseline. The CPU kernels
// (csrc/cpu/*.cpp) are compiled once per ISA variant into libraries of their own, named after this
// one: _C.<suffix>.so -> _C_cpu_x86_64_v3.<suffix>.so, libdiffkern.so -> libdiffkern_cpu_x86_64_v3.so.
// Exactly one is loaded, when this library loads: the widest variant the CPU supports, or the one
// DIFFKERN_CPU_ISA names ("baseline" = the first). Separate libraries rather than variants side by
// side in one: each variant's inline and template code (ours, torch's, the standard library's) is
// then bound within its own library, so no wide instruction can reach the baseline path through a
// shared weak symbol, and the choice is fixed for the process.
//
// DIFFKERN_CPU_VARIANTS (set by the build) lists the variants, baseline first, as -march names
// ("x86-64-v2,x86-64-v3,x86-64-v4"; "default" for the compiler's own target).
#include <dlfcn.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/library.h>

#define DIFFKERN_STRINGIFY_(...) #__VA_ARGS__
#define DIFFKERN_STRINGIFY(...) DIFFKERN_STRINGIFY_(__VA_ARGS__)

namespace diffkern::cpu_dispatch {
namespace {

std::vector<std::string> compiled_variants() {
  std::vector<std::string> names;
  const std::string list = DIFFKERN_STRINGIFY(DIFFKERN_CPU_VARIANTS);
  for (size_t begin = 0; begin <= list.size();) {
    const size_t end = std::min(list.find(',', begin), list.size());
    names.push_back(list.substr(begin, end - begin));
    begin = end + 1;
  }
  return names;
}

// Whether this CPU runs code compiled with -march=`name`. The baseline is taken as given (this very
// library was compiled for it); a wide variant must be an x86-64 level, the ones the build adds.
bool supported(const std::string& name, bool baseline) {
  if (baseline) return true;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (name == "x86-64-v2") return __builtin_cpu_supports("x86-64-v2");
  if (name == "x86-64-v3") return __builtin_cpu_supports("x86-64-v3");
  if (name == "x86-64-v4") return __builtin_cpu_supports("x86-64-v4");
#endif
  return false;
}

// The variant to load, or an empty name and the reason in `error`.
std::string select(const std::vector<std::string>& variants, std::string& error) {
  const char* env = std::getenv("DIFFKERN_CPU_ISA");
  const std::string forced = env == nullptr ? "" : env;
  if (forced.empty()) {
    size_t i = variants.size() - 1;
    while (!supported(variants[i], i == 0)) --i;
    return variants[i];
  }
  const std::string want = forced == "baseline" ? variants.front() : forced;
  const auto it = std::find(variants.begin(), variants.end(), want);
  if (it == variants.end()) {
    error = "DIFFKERN_CPU_ISA=" + forced + " names no compiled variant (baseline, " +
            DIFFKERN_STRINGIFY(DIFFKERN_CPU_VARIANTS) + ")";
  } else if (!supported(want, it == variants.begin())) {
    error = "DIFFKERN_CPU_ISA=" + forced + ": this CPU does not support " + want;
  } else {
    return want;
  }
  return {};
}

// The kernel library of `variant` beside this one: "_cpu_<variant>" inserted before the first dot of
// this library's file name, with every character of the variant's name but letters and digits spelled
// '_' (as setup.py and CMakeLists.txt name the libraries).
std::string kernel_library(const std::string& variant) {
  Dl_info self{};
  if (dladdr(reinterpret_cast<void*>(&kernel_library), &self) == 0 || self.dli_fname == nullptr) return {};
  const std::string path = self.dli_fname;
  const size_t slash = path.rfind('/');
  const size_t dot = path.find('.', slash == std::string::npos ? 0 : slash + 1);
  std::string tag = variant;
  for (char& c : tag) {
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  return path.substr(0, dot) + "_cpu_" + tag + (dot == std::string::npos ? "" : path.substr(dot));
}

// The outcome of loading, once per process: the variant in use, or why none is.
struct Selection {
  std::string variant;
  std::string error;
};

Selection load_kernels() {
  Selection s;
  const std::string chosen = select(compiled_variants(), s.error);
  if (!chosen.empty()) {
    const std::string path = kernel_library(chosen);
    // RTLD_LOCAL: the variant's symbols never interpose on another library's.
    if (!path.empty() && dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL) != nullptr) {
      s.variant = chosen;
    } else {
      const char* why = path.empty() ? "dladdr found no path for this library" : dlerror();
      s.error = "cannot load the " + chosen + " CPU kernels (" + path + "): " + why;
    }
  }
  // A C++ program otherwise learns of it only as a missing CPU kernel; Python raises it on import.
  if (!s.error.empty()) TORCH_WARN("diffkern: no CPU kernels loaded: ", s.error);
  return s;
}

const Selection& selection() {
  static const Selection loaded = load_kernels();
  return loaded;
}

// Loads the kernels as this library loads, so that loading it is all a program does.
[[maybe_unused]] const Selection& kLoadedAtStartup = selection();

std::string cpu_isa() {
  TORCH_CHECK(selection().error.empty(), "diffkern: no CPU kernels loaded: ", selection().error);
  return selection().variant;
}

}  // namespace
}  // namespace diffkern::cpu_dispatch

TORCH_LIBRARY_IMPL(diffkern, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", TORCH_FN(diffkern::cpu_dispatch::cpu_isa));
}
