// The host-execution harness: everything cuda_compat.h maps CUDA onto when nvcc is not compiling.
#pragma once

#include <cmath>

#include "block.h"
#include "cuda_types.h"
#include "dev_ptr.h"
#include "half.h"
#include "intrinsics.h"
#include "launch.h"
#include "shared.h"
#include "warp.h"
