"""Shared-block recursion as torch ops: argument checks, fake (meta) implementations, backends, API.

The schemas live in csrc/diffkern/ops.cpp, the C++ CPU kernels in csrc/cpu/rmdm_recurse*.cpp and the
autograd in csrc/diffkern/autograd_rmdm.cpp; this file registers everything Python owns for
diffkern::rmdm_recurse / rmdm_recurse_bwd and the CPU training pair rmdm_recurse_keep / rmdm_recurse_keep_bwd.
"""
from __future__ import annotations

import math

import torch

from .. import _checks, _lazy, _nvtx, _ops, _registry
from . import reference
triton_kernels = _lazy.module(__package__ + ".triton_kernels")  # imports triton on first use
triton_backward = _lazy.module(__package__ + ".triton_backward")
from .reference import N_MOD, N_PARAMS, param_shapes

OP = "recurse"
# The training pair (forward keeping its activations, backward reading them) is used while the activations and
# the backward's kept output gradients take at most this many bytes; beyond it the backward recomputes.
KEEP_LIMIT_BYTES = 2 << 30


def _fail(msg: str):
    raise ValueError(f"{OP}: {msg}")


def _check_like(name: str, t: torch.Tensor, shape, x: torch.Tensor) -> None:
    if list(t.shape) != list(shape):
        _fail(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    _checks.check_like(OP, name, t, "x", x)


def check_recurse(x, weights, mod, n_iter, heads, eps) -> None:
    """The checks csrc/cpu/rmdm_recurse.cpp makes, in the same order and words."""
    if x.dim() != 3:
        _fail(f"x must be [B, T, d], got shape {list(x.shape)}")
    _checks.check_float_contiguous(OP, "x", x)
    B, T, d = x.shape
    if len(weights) == 0 or len(weights) % N_PARAMS:
        _fail(f"weights must hold K blocks of {N_PARAMS} tensors, got {len(weights)} tensors")
    if weights[8].dim() != 2:
        _fail(f"weights[8] (w_1 of block 0) must be [f, d], got shape {list(weights[8].shape)}")
    shapes = param_shapes(d, weights[8].shape[0])
    for i, w in enumerate(weights):
        _check_like(f"weights[{i}] ({reference.BLOCK_PARAMS[i % N_PARAMS]} of block {i // N_PARAMS})", w,
                    shapes[i % N_PARAMS], x)
    if mod is not None:
        _check_like("mod", mod, (B, len(weights) // N_PARAMS, N_MOD, d), x)
    if n_iter < 1:
        _fail(f"n_iter must be >= 1, got {n_iter}")
    if heads < 1 or d % heads:
        _fail(f"heads must be >= 1 and divide d = {d}, got {heads}")
    if not 0 < eps < math.inf:
        _fail(f"eps must be finite and > 0, got {eps}")


def check_recurse_bwd(dstates, x, states, weights, mod, heads, eps) -> None:
    for name, t in (("states", states), ("dstates", dstates)):
        if t.dim() != 4 or t.shape[0] < 1:
            _fail(f"{name} must be [n_iter, B, T, d] with n_iter >= 1, got shape {list(t.shape)}")
    check_recurse(x, weights, mod, states.shape[0], heads, eps)
    for name, t in (("states", states), ("dstates", dstates)):
        _check_like(name, t, (states.shape[0], *x.shape), x)


def acts_numel(B, T, d, f, heads, K, n_iter, with_mod) -> int:
    """Elements of rmdm_recurse_keep's activations (csrc/include/diffkern/rmdm_acts.h): per row of every block
    evaluation, two normalised rows, u1, qkv, ctx, u2 (8d), two deviations, the attention probabilities
    (heads * T), gelu(z) and its slope gelu'(z) at the MLP's pre-activation z (2f), and with adaLN the two
    ungated branch outputs (2d)."""
    return K * n_iter * B * T * (8 * d + 2 + heads * T + 2 * f + (2 * d if with_mod else 0))


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _acts_shape(x, weights, mod, n_iter, heads):
    B, T, d = x.shape
    return (acts_numel(B, T, d, weights[8].shape[0], heads, len(weights) // N_PARAMS, n_iter, mod is not None),)


def check_recurse_keep_bwd(dstates, x, states, acts, weights, mod, heads, eps) -> None:
    check_recurse_bwd(dstates, x, states, weights, mod, heads, eps)
    shape = _acts_shape(x, weights, mod, states.shape[0], heads)
    if acts.dim() != 1 or acts.shape[0] != shape[0] or acts.dtype != _acc_dtype(x) or not acts.is_contiguous() \
            or acts.device != x.device:
        _fail(f"acts must be the contiguous {str(_acc_dtype(x)).removeprefix('torch.')} [{shape[0]}] tensor "
              f"rmdm_recurse_keep returned for these arguments, got {str(acts.dtype).removeprefix('torch.')} of "
              f"shape {list(acts.shape)}")


def _recomputing(backend):
    """rmdm_recurse_bwd's backend `backend` as one of rmdm_recurse_keep_bwd (acts unused: it recomputes)."""
    return lambda dstates, x, states, acts, *rest: backend(dstates, x, states, *rest)


_registry.register("rmdm_recurse", check_recurse, triton=triton_kernels.function("recurse_fwd"),
                   reference=reference.recurse)
# On CUDA tensors the backward is Triton's (rmdm/triton_backward.py) by default; `cuda`, the C++ backward on ATen
# and cuBLAS, stays forceable.
_registry.register("rmdm_recurse_bwd", check_recurse_bwd, reference=reference.recurse_bwd,
                   cuda=lambda *args: torch.ops.diffkern.rmdm_recurse_bwd_cuda(*args),
                   triton=triton_backward.function("recurse_bwd"), gpu_preference=("triton", "cuda"))
# The training pair is the C++ CPU kernels' alone (`recurse` takes it only there): its activations' layout is
# theirs, so no other backend could return what the fake promises; a forced one is refused, naming the op.
_registry.register("rmdm_recurse_keep", check_recurse)
_registry.register("rmdm_recurse_keep_bwd", check_recurse_keep_bwd, cuda_twin="rmdm_recurse_bwd",
                   reference=_recomputing(reference.recurse_bwd),
                   cuda=_recomputing(lambda *args: torch.ops.diffkern.rmdm_recurse_bwd_cuda(*args)),
                   triton=_recomputing(triton_backward.function("recurse_bwd")), gpu_preference=("triton", "cuda"))


@_registry.register_fake("diffkern::rmdm_recurse")
def _recurse_fake(x, weights, mod, n_iter, heads, eps):
    check_recurse(x, weights, mod, n_iter, heads, eps)
    return x.new_empty((n_iter, *x.shape))


@_registry.register_fake("diffkern::rmdm_recurse_keep")
def _recurse_keep_fake(x, weights, mod, n_iter, heads, eps):
    check_recurse(x, weights, mod, n_iter, heads, eps)
    return x.new_empty((n_iter, *x.shape)), x.new_empty(_acts_shape(x, weights, mod, n_iter, heads),
                                                        dtype=_acc_dtype(x))


def _bwd_outputs(x, weights, mod):
    return x.new_empty(x.shape), [w.new_empty(w.shape) for w in weights], \
        (mod.new_empty(mod.shape) if mod is not None else x.new_empty(0))


@_registry.register_fake("diffkern::rmdm_recurse_bwd")
@_registry.register_fake("diffkern::rmdm_recurse_bwd_cuda")
def _recurse_bwd_fake(dstates, x, states, weights, mod, heads, eps):
    check_recurse_bwd(dstates, x, states, weights, mod, heads, eps)
    return _bwd_outputs(x, weights, mod)


@_registry.register_fake("diffkern::rmdm_recurse_keep_bwd")
def _recurse_keep_bwd_fake(dstates, x, states, acts, weights, mod, heads, eps):
    check_recurse_keep_bwd(dstates, x, states, acts, weights, mod, heads, eps)
    return _bwd_outputs(x, weights, mod)


def _keeps(x, weights, mod, n_iter, heads, eps, recompute) -> bool:
    """Whether this call runs the training pair: a CPU call that records a graph, on the C++ kernels (no other
    backend forced), unless `recompute` says otherwise or (recompute None) the kept tensors pass KEEP_LIMIT_BYTES."""
    if recompute or x.device.type != "cpu" or any(b != "cpu" for b in _registry._forced) \
            or not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, mod, *weights)):
        return False
    if recompute is not None:
        return True
    check_recurse(x, weights, mod, n_iter, heads, eps)  # the sizes below assume valid shapes
    B, T, d = x.shape
    dy = len(weights) // N_PARAMS * n_iter * B * T * (5 * d + weights[8].shape[0])  # the backward's kept gradients
    kept = _acts_shape(x, weights, mod, n_iter, heads)[0] + dy
    return kept * _acc_dtype(x).itemsize <= KEEP_LIMIT_BYTES


def recurse(block_params, x: torch.Tensor, n_iter: int, *, heads: int, mod: torch.Tensor | None = None,
            eps: float = 1e-5, return_all: bool = False, recompute: bool | None = None) -> torch.Tensor:
    """Applies the same K pre-norm transformer blocks n_iter times: R-MDM's shared-block recursion.

        h_0 = x,   h_k = Blocks(h_{k-1}),   Blocks = block_K o ... o block_1,
        block: h <- h + g1 * MHA(LN1(h)(1 + s1) + b1);  h <- h + g2 * MLP(LN2(h)(1 + s2) + b2)
    with bidirectional multi-head attention, an exact-gelu MLP and, with `mod`, adaLN (shift b, scale s,
    gate g per block and sample; without it b = s = 0, g = 1). See diffkern.rmdm.reference for the math.

    Args:
        block_params: K blocks, each a sequence of 12 tensors in reference.BLOCK_PARAMS order (shapes from
            reference.param_shapes(d, f)), in x's dtype and on its device, contiguous.
        x: [B, T, d] contiguous, float16/bfloat16/float32 (float64 on cpu/reference).
        n_iter: iterations L >= 1. heads: attention heads (divides d). eps: the LayerNorm epsilon.
        mod: optional adaLN modulation [B, K, 6, d] (shift1, scale1, gate1, shift2, scale2, gate2).
        return_all: return every iteration's state (deep supervision) instead of the last.
        recompute: whether the backward recomputes the forward instead of reading kept activations (CPU).
            None (default): keep them when they fit KEEP_LIMIT_BYTES (2 GiB, with the backward's kept output
            gradients: K * n_iter * B * T * (13d + 3f + heads * T + 2) floats, 2d more with mod).
    Returns:
        h_L [B, T, d], or states [n_iter, B, T, d] with states[k-1] = h_k.
    Autograd: gradients reach x, every weight and mod. Recomputing (CUDA tensors, another backend forced, or
        recompute=True): saved are x, the n_iter states (the iteration inputs) and the weights; the backward
        re-runs one iteration at a time (memory: one iteration's activations). Keeping (CPU kernels): the
        training forward diffkern::rmdm_recurse_keep also saves every block evaluation's activations
        (acts_numel floats) and the backward reads them, with each weight gradient one GEMM over all
        iterations' rows. Its activation and gradient buffers come from the CPU output cache: reused by the
        next call once autograd has released them, so a training loop does not fault in fresh pages;
        diffkern.empty_cache() frees them.
        Double backward is refused: differentiating the gradient raises NotImplementedError naming
        diffkern.recurse.
    Backends: C++ (CPU tensors), reference (plain PyTorch, any device). On CUDA tensors the forward is Triton
        (T <= 256, d <= 512): the persistent weight-stationary kernel (one launch, each weight read once per
        call) where it fits (small batches), else the tiled kernels (seven launches per block evaluation, spread
        over rows, heads and output columns, products on tensor cores; rmdm/triton_kernels.py says which when); the
        backward is Triton's (rmdm/triton_backward.py: the same recomputation, products on tensor cores, fixed-order
        reductions), or, with the backward run inside diffkern.backend("cuda"), the C++ backward on ATen's CUDA kernels
        and cuBLAS (the `cuda` backend of rmdm_recurse_bwd; it needs a CUDA build). See `diffkern.backend`.
    Bad input: TypeError (not a tensor, a float n_iter or heads) or ValueError (shapes, dtypes, devices,
        n_iter < 1, heads not dividing d, eps <= 0), naming the argument.
    NaN/inf policy: propagated like the reference: a NaN/inf in x, mod or a weight makes the affected
        samples' states NaN (attention mixes it over the sample's tokens); values are not checked.
    """
    _checks.tensor(OP, "x", x)
    _checks.tensor(OP, "mod", mod, optional=True)
    if isinstance(block_params, torch.Tensor) or not isinstance(block_params, (list, tuple)):
        raise TypeError(f"{OP}: block_params must be a list of K blocks, each a sequence of {N_PARAMS} tensors, got "
                        f"{type(block_params).__name__}")
    weights = []
    for k, blk in enumerate(block_params):
        weights += _checks.tensor_list(OP, f"block_params[{k}]", blk)
    n_iter, heads = _checks.integer(OP, "n_iter", n_iter), _checks.integer(OP, "heads", heads)
    if recompute is not None and not isinstance(recompute, bool):
        raise TypeError(f"{OP}: recompute must be None or a bool, got {type(recompute).__name__}")
    eps = _checks.number(OP, "eps", eps)
    with _nvtx.range("diffkern.recurse"):
        if _keeps(x, weights, mod, n_iter, heads, eps, recompute):
            states = _ops.ops.rmdm_recurse_keep(x, weights, mod, n_iter, heads, eps)[0]
        else:
            states = _ops.ops.rmdm_recurse(x, weights, mod, n_iter, heads, eps)
    return states if return_all else states[-1]


# The Sudoku data ops (csrc/cpu/rmdm_sudoku.cpp) run on CPU only; their fakes give the output shapes
# so code that calls them traces under torch.compile and fake tensors.
@_registry.register_fake("diffkern::rmdm_sudoku")
def _sudoku_fake(n, clues, seed):
    if n < 0:
        raise ValueError(f"rmdm_sudoku: n must be >= 0, got {n}")
    return (torch.empty(n, 81, dtype=torch.int64, device="cpu"), torch.empty(n, 81, dtype=torch.int64, device="cpu"))


@_registry.register_fake("diffkern::rmdm_sudoku_count")
def _sudoku_count_fake(puzzles, limit):
    if not (puzzles.dim() == 2 and puzzles.shape[1] == 81 and puzzles.dtype == torch.int64):
        raise ValueError(f"rmdm_sudoku_count: puzzles must be an int64 [n, 81] tensor, got {list(puzzles.shape)} "
                         f"{puzzles.dtype}")
    return puzzles.new_empty(puzzles.shape[0])
