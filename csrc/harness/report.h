// How the harness reports a broken kernel: one line naming the kernel, block and thread, then exit.
#pragma once

#include <string>

namespace diffkern::harness {

// Ends the process with exit code 3 and "diffkern harness: <kind>: kernel K block (..) thread (..): what".
// A kernel fault is fatal on a GPU too; unwinding through fiber stacks would not be safe anyway.
[[noreturn]] void fail(const char* kind, const std::string& what);

}  // namespace diffkern::harness
