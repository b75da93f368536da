"""Triton forward of R-MDM's shared-block recursion (specs/rmdm.md): the tiled path and the backend's launcher.

`recurse_fwd` runs one of two forms per call:
  * persistent (triton_persistent.py): one cooperative launch, weight-stationary over K x PB programs with
    grid barriers; each weight is read once per call. Chosen where `triton_persistent.plan` allows
    (B*T <= 512 tokens, d <= 256, the slices fit the co-resident programs): small batches, where the call's
    time is latency and weight traffic, and the tiled form's launches would each keep only a few of the
    GPU's SMs busy (at B=1, T=81 a product has 3 row tiles). By the model (diffkern.bench.rmdm_model) at
    the Sudoku step B=1, d=256, K=2, L=4: the tiled form's roofline is about 10 us of bf16 tensor-core
    work and traffic but 56 dependent launches (2-4 us each without a CUDA graph); the persistent kernel's
    1.07 GFLOP of CUDA-core fp32 products take >= 16 us at 67 TFLOP/s, behind 41 grid barriers (about 1 us
    each) in one launch. Its products grow with B*T while the tiled form's launch count does not, so
    the two cross near a few hundred tokens, where `plan` stops (N <= 512). The GPU check measures this.
  * tiled (here): every block evaluation is seven launches, each spread over many programs:
        recurse_norm_kernel       LN1 (+adaLN) of the B*T rows, BLOCK_M rows a program     -> u [B*T, d]
        recurse_linear_kernel     u W_qkv^T + b_qkv, a BLOCK_M x BLOCK_N output tile a program
                                                                                      -> qkv [B*T, 3d]
        recurse_attention_kernel  softmax(q k^T / sqrt(d_h)) v, flash-style over key tiles, one program
                                  per (query tile, sample, head)                      -> ctx [B*T, d]
        recurse_linear_kernel     h' = h + g1 (ctx W_o^T + b_o): the gated residual as epilogue
        recurse_norm_kernel       LN2 (+adaLN)                                        -> u
        recurse_linear_kernel     gelu(u W_1^T + b_1): bias and gelu as epilogue      -> g [B*T, f]
        recurse_linear_kernel     h = h' + g2 (g W_2^T + b_2), and states[it] after an iteration's last block.
    The LayerNorm is its own launch rather than a product's prologue: a prologue would re-read the fp32 state
    (twice more for the row statistics) for every output-column tile, 3d/BLOCK_N times per row, where
    the separate norm reads it once and writes u once in the operand dtype (diffkern.bench.rmdm_model counts
    both). The residual state stays fp32, in two buffers (a residual launch reads one and writes the other,
    so any launch may be repeated, which autotuning does); u, qkv, ctx and g are stored in the inputs' dtype,
    the products' operand dtype. Every product goes through diffkern._dot: bf16/fp16 operands on tensor cores
    with fp32 accumulation, tf32x3 (or tf32 under torch's "high" matmul precision) for fp32 inputs, fp32
    "ieee" under the interpreter. Launch configurations: `diffkern._autotune.pick` over linear_configs,
    attention_configs and norm_configs (configs[0] under the interpreter and with DIFFKERN_AUTOTUNE=0).
    Large batches and d = 512 run here: at the Sudoku shape B=64 (5184 rows) a product has 81 x 24 tiles.
The backward (triton_backward.py) re-runs these launches for its recompute, with two runtime flags that the
forward leaves off: write_pre (a product's pre-activation kept) and write_lse (the attention rows' log-sum-exp).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _autotune, _cooperative, _dot, _triton
from .._autotune import Config
from .._triton import KernelSpec
from . import triton_persistent, triton_tiles
from .reference import N_PARAMS
from .triton_common import attend, gate, gelu, layer_norm, modulate, sample_mod_rows
from .triton_tiles import quarter, quarters, tile

MAX_D, MAX_T = 512, 256
STORE, GELU, RESIDUAL = 0, 1, 2  # recurse_linear_kernel's epilogues
# Candidates (configs[0] is what the interpreter runs): BLOCK_M x BLOCK_N output tiles reduced in BLOCK_K
# slices. Larger tiles re-read the operands less (an output tile reads BLOCK_M + BLOCK_N rows of Kd: the L2 traffic
# that bounds these launches in bench/rmdm_model.py's L2-aware model). fp32 operands (tf32x3: three products a dot)
# stop at 128 x 64. _WIDE, 16-bit operands only, is offered to aligned launches alone (every pointer 16-byte aligned,
# N and Kd multiples of 16, as at d = 512): there the shared tile loop and the column-quarter epilogues
# (triton_tiles.py) keep 128 x 256 (STORE, GELU) and 128 x 128 (RESIDUAL: state, gate and two stores beside the
# accumulator) free of spills on sm_80 and sm_90a, where element-wise loads of unaligned operands spill. BLOCK_K is
# 32 in every candidate, so each output element adds its products in the same order whichever wins. configs[0]
# compiles without spills even where the launch cannot assume 16-divisible sizes (tests/test_kernels_compile.py).
_FIRST = Config(dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32), 4)
_MEDIUM = (Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), 4), Config(dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32), 8))
_LARGE = (Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), 4), Config(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32), 8),
          Config(dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32), 4))
_WIDE = {STORE: Config(dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=32), 8),
         GELU: Config(dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=32), 8),
         RESIDUAL: Config(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32), 8)}
_ATTENTION_FIRST = Config(dict(BLOCK_Q=32, BLOCK_KV=32), 4)


def linear_configs(dtype: torch.dtype, epilogue: int, aligned: bool) -> tuple[Config, ...]:
    """recurse_linear_kernel's candidates for operands of `dtype` and this epilogue; `aligned`: the launch's pointers
    are 16-byte aligned and its N and Kd multiples of 16 (linear_aligned)."""
    if dtype == torch.float32:
        return (_FIRST, *_MEDIUM)
    return (_FIRST, *(_MEDIUM if epilogue == RESIDUAL else _LARGE), *((_WIDE[epilogue],) if aligned else ()))


def linear_aligned(N: int, Kd: int, *tensors: torch.Tensor) -> bool:
    """Whether a recurse_linear_kernel launch gets the aligned specialisation that _WIDE needs: N and Kd multiples of
    16 and every tensor's pointer 16-byte aligned (Triton's launcher then marks them all 16-divisible)."""
    return N % 16 == 0 and Kd % 16 == 0 and all(t.data_ptr() % 16 == 0 for t in tensors)


def largest_linear_side(dtype: torch.dtype) -> int:
    """The largest block side among recurse_linear_kernel's candidates for `dtype` (triton_tiles.check_tile_strides)."""
    return max(max(c.constexprs.values()) for e in (STORE, GELU, RESIDUAL) for c in linear_configs(dtype, e, True))


def attention_configs() -> tuple[Config, ...]:
    """recurse_attention_kernel's one configuration, 32 x 32 score tiles: a 64-query tile lays the row sums out
    differently on the GPU (another order of the additions, tests/test_autotune_candidates.py), a wider key tile
    changes the online softmax's steps, and fp32's tf32x3 products spill on sm_80 in any larger tile."""
    return (_ATTENTION_FIRST,)


NORM_ELEMENTS = (4096, 8192)  # elements of a norm program's [BLOCK_M, BLOCK_D] tile, per candidate


def norm_configs(d: int) -> tuple[Config, ...]:
    """recurse_norm_kernel's candidates at width d: BLOCK_M rows of BLOCK_D = next_power_of_2(d) columns."""
    block_d = triton.next_power_of_2(d)
    return tuple(Config(dict(BLOCK_M=max(1, n // block_d), BLOCK_D=block_d), w) for n, w in zip(NORM_ELEMENTS, (4, 8)))


def block_dh(dh: int) -> int:
    """recurse_attention_kernel's BLOCK_DH for head width dh (tl.dot needs >= 16)."""
    return max(16, triton.next_power_of_2(dh))


@triton.jit
def recurse_norm_kernel(h_ptr, w_ptr, b_ptr, mod_ptr, u_ptr, M, T, D, K, kb, eps, SHIFT: tl.constexpr,
                HAS_MOD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """u = LN(h) w + b, then adaLN's (1 + scale) and shift of block kb when HAS_MOD, for rows
    pid * BLOCK_M ... of the fp32 state h [M, D]; u is stored in its own dtype."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    cm = cols < D
    m = (rows < M)[:, None] & cm[None, :]
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    u = layer_norm(tl.load(h_ptr + offs, mask=m, other=0.0), w, b, cm, D, eps)
    if HAS_MOD:
        u = modulate(u, sample_mod_rows(mod_ptr, rows, kb, K, T, D), SHIFT, cols[None, :], m, D)
    tl.store(u_ptr + offs, u.to(u_ptr.dtype.element_ty), mask=m)


@triton.jit
def recurse_linear_kernel(a_ptr, w_ptr, bias_ptr, out_ptr, h_ptr, state_ptr, mod_ptr, pre_ptr, M, N, Kd, T, K, kb,
                          write_state, write_pre, EPILOGUE: tl.constexpr, PART: tl.constexpr, HAS_MOD: tl.constexpr,
                          DOT_F32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """y = a W^T + bias for one [BLOCK_M, BLOCK_N] tile (a [M, Kd], W [N, Kd], fp32 accumulation), then
    EPILOGUE: STORE y or GELU gelu(y) into out [M, N]; RESIDUAL: out = h + gate * y (h, out: fp32 [M, N],
    N = d; gate: adaLN's part PART of block kb, or 1) and, when write_state, out rounded into state. When
    write_pre, y itself (before gelu, gate and residual) is stored into pre [M, N] too: the backward's recompute
    keeps it (triton_backward.py). The product is triton_tiles.tile (W read as stored, [N, Kd]: TRANS_B); the
    epilogue runs a column quarter at a time (triton_tiles.quarters)."""
    _, acc, _ = tile(a_ptr, Kd, w_ptr, Kd, M, N, Kd, False, True, False, DOT_F32, PRECISION, BLOCK_M, BLOCK_N,
                     BLOCK_K)
    parts = quarters(acc, BLOCK_M, BLOCK_N)
    for q in tl.static_range(4):
        corner, rows, n, offs, om = quarter(q, M, N, BLOCK_M, BLOCK_N)
        y = parts[q] + tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        if write_pre:
            tl.store(pre_ptr + corner + offs, y.to(pre_ptr.dtype.element_ty), mask=om)
        if EPILOGUE == 2:
            g = gate(sample_mod_rows(mod_ptr, rows, kb, K, T, N), PART, n[None, :], om, N, HAS_MOD)
            out = tl.load(h_ptr + corner + offs, mask=om, other=0.0) + g * y
            tl.store(out_ptr + corner + offs, out, mask=om)
            if write_state:
                tl.store(state_ptr + corner + offs, out.to(state_ptr.dtype.element_ty), mask=om)
        else:
            if EPILOGUE == 1:
                y = gelu(y)
            tl.store(out_ptr + corner + offs, y.to(out_ptr.dtype.element_ty), mask=om)


@triton.jit
def recurse_attention_kernel(qkv_ptr, ctx_ptr, lse_ptr, T, D, H, DH, scale, write_lse, DOT_F32: tl.constexpr,
                             PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
                             BLOCK_DH: tl.constexpr):
    """ctx = softmax(q k^T * scale) v for query tile program_id(0) of (sample, head) program_id(1), online over
    key tiles; qkv [B*T, 3D] (q | k | v, heads contiguous in each), ctx [B*T, D], both in the operand dtype.
    When write_lse, the rows' log-sum-exp goes to lse [B*H, T] (fp32), for the backward."""
    bh = tl.program_id(1)
    sample = (bh // H).to(tl.int64) * T
    lse = attend(qkv_ptr + sample * 3 * D, ctx_ptr + sample * D, tl.program_id(0) * BLOCK_Q, bh % H, T, D, DH, scale,
                 DOT_F32, PRECISION, BLOCK_Q, BLOCK_KV, BLOCK_DH)
    if write_lse:
        rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        tl.store(lse_ptr + bh.to(tl.int64) * T + rows, lse, mask=rows < T)


def recurse_fwd(x, weights, mod, n_iter, heads, eps):
    """The triton backend of diffkern::rmdm_recurse: the persistent kernel where its plan allows and the device
    accepts its cooperative launch, else the tiled kernels (the same states). Refuses, naming it, an f past the
    products' int32 offsets within a tile (triton_tiles.check_tile_strides: f >= 2**23 - 1 in 16 bits)."""
    B, T, d = x.shape
    if d > MAX_D or T > MAX_T:
        raise ValueError(f"recurse: the triton backend runs T <= {MAX_T} and d <= {MAX_D}, got T={T}, d={d}")
    _triton.check_float32_math("recurse", x.dtype, "x")
    triton_tiles.check_tile_strides(largest_linear_side(x.dtype), weights[8].shape[0],
                                    "the CPU op runs it on CPU tensors")
    pb = triton_persistent.plan(B * T, d, weights[8].shape[0], len(weights) // N_PARAMS, x.element_size(),
                                _cooperative.max_programs(x.device))
    if pb is not None:
        try:
            return triton_persistent.recurse_persistent(x, weights, mod, n_iter, heads, eps, pb)
        except _cooperative.LaunchRefused as refused:  # the grid cannot be co-resident here after all
            _cooperative.fall_back(refused, "the tiled kernels")
    return recurse_tiled(x, weights, mod, n_iter, heads, eps)


def _launch_norm(h, u, w, b, mod, kb, K, T, eps, shift):
    M, d = h.shape
    meta = dict(SHIFT=shift, HAS_MOD=mod is not None)

    def launch(cfg: Config):
        return recurse_norm_kernel[(triton.cdiv(M, cfg.constexprs["BLOCK_M"]),)](
            h, w, b, mod if mod is not None else u, u, M, T, d, K, kb, eps, **meta, **cfg.meta())
    key = (str(u.dtype), triton.next_power_of_2(M), d)
    return launch(_autotune.pick("recurse_norm_kernel", key, norm_configs(d), launch,
                                 kernel=recurse_norm_kernel))


def _launch_linear(a, w, bias, out, epilogue, h=None, state=None, mod=None, kb=0, K=1, T=1, part=0, pre=None):
    M, Kd = a.shape
    N = w.shape[0]
    meta = dict(EPILOGUE=epilogue, PART=part, HAS_MOD=mod is not None, **_dot.dot_meta(a.dtype))
    h = h if h is not None else out
    flags = (int(state is not None), int(pre is not None))
    state, mod_or_a, pre = (t if t is not None else a for t in (state, mod, pre))
    aligned = linear_aligned(N, Kd, a, w, bias, out, h, state, mod_or_a, pre)

    def launch(cfg: Config):
        grid = (triton.cdiv(M, cfg.constexprs["BLOCK_M"]), triton.cdiv(N, cfg.constexprs["BLOCK_N"]))
        return recurse_linear_kernel[grid](a, w, bias, out, h, state, mod_or_a, pre, M, N, Kd, T, K, kb, *flags,
                                           **meta, **cfg.meta())
    key = (str(a.dtype), triton.next_power_of_2(M), N, Kd, epilogue, mod is not None, aligned)
    return launch(_autotune.pick("recurse_linear_kernel", key, linear_configs(a.dtype, epilogue, aligned), launch,
                                 kernel=recurse_linear_kernel))


def _launch_attention(qkv, ctx, B, T, heads, lse=None):
    d = ctx.shape[1]
    dh = d // heads
    meta = dict(BLOCK_DH=block_dh(dh), **_dot.dot_meta(qkv.dtype))
    # lse_ptr is fp32 in every launch (one specialisation); one element, as an empty tensor's pointer may be null
    no_lse = qkv.new_empty(1, dtype=torch.float32) if lse is None else None

    def launch(cfg: Config):
        return recurse_attention_kernel[(triton.cdiv(T, cfg.constexprs["BLOCK_Q"]), B * heads)](
            qkv, ctx, lse if lse is not None else no_lse, T, d, heads, dh, dh ** -0.5, int(lse is not None), **meta,
            **cfg.meta())
    key = (str(qkv.dtype), B, T, dh)
    return launch(_autotune.pick("recurse_attention_kernel", key, attention_configs(), launch,
                                 kernel=recurse_attention_kernel))


def recurse_tiled(x, weights, mod, n_iter, heads, eps):
    """The tiled form: seven launches per block evaluation (module docstring). Returns states [n_iter, B, T, d]."""
    B, T, d = x.shape
    M, f, K = B * T, weights[8].shape[0], len(weights) // N_PARAMS
    states = _triton.empty((n_iter, M, d), x.dtype, x.device)
    h = x.reshape(M, d).to(torch.float32, copy=True)
    h2 = _triton.empty((M, d), torch.float32, x.device)
    u, ctx = (_triton.empty((M, d), x.dtype, x.device) for _ in range(2))
    qkv = _triton.empty((M, 3 * d), x.dtype, x.device)
    g = _triton.empty((M, f), x.dtype, x.device)
    for it in range(n_iter):
        for kb in range(K):
            ln1_w, ln1_b, w_qkv, b_qkv, w_o, b_o, ln2_w, ln2_b, w_1, b_1, w_2, b_2 = weights[kb * N_PARAMS:
                                                                                               (kb + 1) * N_PARAMS]
            res = dict(mod=mod, kb=kb, K=K, T=T)
            _launch_norm(h, u, ln1_w, ln1_b, mod, kb, K, T, eps, 0)
            _launch_linear(u, w_qkv, b_qkv, qkv, STORE)
            _launch_attention(qkv, ctx, B, T, heads)
            _launch_linear(ctx, w_o, b_o, h2, RESIDUAL, h=h, part=2, **res)
            _launch_norm(h2, u, ln2_w, ln2_b, mod, kb, K, T, eps, 3)
            _launch_linear(u, w_1, b_1, g, GELU)
            _launch_linear(g, w_2, b_2, h, RESIDUAL, h=h2, state=states[it] if kb == K - 1 else None, part=5, **res)
    return states.view(n_iter, B, T, d)


def _specs(name, kernel, sig, constexprs, configs, tags, widths) -> list[KernelSpec]:
    """Every candidate's spec with the divisibility a launch infers: every pointer and the `widths` arguments
    16-divisible; widths None: configs[0] alone with nothing assumed (a launch at odd sizes from unaligned
    tensors)."""
    attrs = {} if widths is None else {n: [["tt.divisibility", 16]] for n, t in sig.items()
                                       if t.startswith("*") or n in widths}
    tags = {**tags, "divisible": widths is not None}
    group = f"{name}[{','.join(f'{k}={v}' for k, v in tags.items())}]"
    return _autotune.candidate_specs(group, kernel, sig, constexprs, configs if widths is not None else configs[:1],
                                     tags, attrs)


def tiled_specs(dtype: torch.dtype, d: int, dh: int, has_mod: bool, divisible: bool = True,
                products: bool = True, fp32_precision: str = "tf32x3") -> list[KernelSpec]:
    """The tiled form's three kernels at width d, head width dh, in `dtype` as a GPU runs them (16-bit operands, or
    fp32 at `fp32_precision`, _dot.gpu_meta): every candidate with the widths 16-divisible, or (divisible False) each
    kernel's configs[0] with nothing assumed. products False leaves out recurse_linear_kernel, whose compiled code
    does not depend on d (its widths are runtime arguments)."""
    ty = _triton.TRITON_DTYPE[dtype]
    p = f"*{ty}"
    dot = _dot.gpu_meta(dtype, fp32_precision)
    tags = {"dtype": str(dtype).removeprefix("torch."), "d": d, **_dot.precision_tags(dtype, fp32_precision)}
    sig = {"h_ptr": "*fp32", "w_ptr": p, "b_ptr": p, "mod_ptr": p, "u_ptr": p,
           **{n: "i32" for n in ("M", "T", "D", "K", "kb")}, "eps": "fp32"}
    specs = _specs("recurse_norm_kernel", recurse_norm_kernel, sig, {"SHIFT": 0, "HAS_MOD": has_mod}, norm_configs(d),
                   {**tags, "HAS_MOD": has_mod}, ("D",) if divisible else None)
    for epilogue in (STORE, GELU, RESIDUAL) if products else ():
        res = epilogue == RESIDUAL
        sig = {"a_ptr": p, "w_ptr": p, "bias_ptr": p, **{n: "*fp32" if res else p for n in ("out_ptr", "h_ptr")},
               "state_ptr": p, "mod_ptr": p, "pre_ptr": p,
               **{n: "i32" for n in ("M", "N", "Kd", "T", "K", "kb", "write_state", "write_pre")}}
        specs += _specs("recurse_linear_kernel", recurse_linear_kernel, sig,
                        {"EPILOGUE": epilogue, "PART": 5, "HAS_MOD": has_mod and res, **dot},
                        linear_configs(dtype, epilogue, divisible), {**tags, "EPILOGUE": epilogue,
                                                                     "HAS_MOD": has_mod and res},
                        ("N", "Kd") if divisible else None)
    sig = {"qkv_ptr": p, "ctx_ptr": p, "lse_ptr": "*fp32", **{n: "i32" for n in ("T", "D", "H", "DH")}, "scale": "fp32",
           "write_lse": "i32"}
    specs += _specs("recurse_attention_kernel", recurse_attention_kernel, sig, {**dot, "BLOCK_DH": block_dh(dh)},
                    attention_configs(), {**tags, "dh": dh}, ("D", "DH") if divisible else None)
    return specs


# (dtype, d, head width, adaLN, divisible, products, fp32 precision) of the tiled form's AOT specs: d = 512 with 8
# heads in every dtype; at d = 256 (head width 32) the norm and attention kernels, whose code depends on the width;
# configs[0] at an odd width (d = 40, 2 heads) assuming nothing, fp32 there in both precisions.
TILED_AOT = ((torch.bfloat16, 512, 64, True, True, True, "tf32x3"),
             (torch.float16, 512, 64, False, True, True, "tf32x3"),
             (torch.float32, 512, 64, True, True, True, "tf32x3"),
             (torch.bfloat16, 256, 32, False, True, False, "tf32x3"),
             (torch.bfloat16, 40, 20, True, False, True, "tf32x3"),
             (torch.float32, 40, 20, True, False, True, "tf32x3"),
             (torch.float32, 40, 20, True, False, True, "tf32"))


def aot_specs() -> list[KernelSpec]:
    """The tiled form's candidates (TILED_AOT), the persistent kernel's configurations, then the backward's
    (triton_backward.py, which launches this module's kernels for its recompute)."""
    from . import triton_backward
    return [s for args in TILED_AOT for s in tiled_specs(*args)] + triton_persistent.aot_specs() + \
        triton_backward.aot_specs()


def aligned_only(spec: KernelSpec) -> bool:
    """Whether `spec` is a recurse_linear_kernel candidate offered to aligned launches alone (_WIDE)."""
    return spec.tags.get("group", "").startswith("recurse_linear_kernel[") and \
        spec.tags["config"] == _WIDE[spec.constexprs["EPILOGUE"]].describe()
