"""Attention sinks as torch ops: argument checks, fake (meta) implementations, backends, public API.

The schemas live in csrc/diffkern/ops.cpp and the CPU kernels in csrc/cpu/sinks.cpp; this file registers
everything Python owns for diffkern::sink_mass / sink_attention_fwd / sink_topk / sink_suppress /
sink_attention_given and builds `sink_mass`, `sink_attention` and `sink_attention_given` on them. Forward only:
no op has a backward.
"""
from __future__ import annotations

import math

import torch

from .. import _checks, _dtypes, _lazy, _nvtx, _ops, _registry, _triton
from ..ntrk.reference import philox_randint4x
from . import reference
triton_kernels = _lazy.module(__package__ + ".triton_kernels")  # imports triton on first use

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MASS_OP, ATTN_OP, GIVEN_OP = "sink_mass", "sink_attention", "sink_attention_given"
MODES = ("per_head", "head_union", "random", "bottom", "anti_sink", "measure")
ROW_SCOPES = ("image", "all")
INTERVENTIONS = ("mask", "scale", "value")
DEFAULT_BIAS = -1e4  # the paper's mask
# Most probabilities per row sink_attention_fwd returns (top_p); csrc/cpu/sinks.cpp kMaxRowTop. The statistics
# take each row's 5 largest (the paper's top_k_conc).
MAX_ROW_TOP = 8
STATS_ROW_TOP = 5


def _fail(op, msg):
    raise ValueError(f"{op}: {msg}")


def _check_qkv(op, q, k, v=None) -> None:
    """The checks csrc/cpu/sinks.cpp makes, in the same order and words."""
    if q.dim() != 4:
        _fail(op, f"q must be [B, H, N_q, head_dim], got shape {list(q.shape)}")
    if q.dtype not in _FLOATS:
        _fail(op, f"q dtype must be float16, bfloat16, float32 or float64, got {_dtypes.name(q.dtype)}")
    for name, x in (("k", k), ("v", v)):
        if x is None:
            continue
        if x.dim() != 4:
            _fail(op, f"{name} must be [B, H, N_k, head_dim], got shape {list(x.shape)}")
        if x.dtype != q.dtype:
            _fail(op, f"{name} dtype {_dtypes.name(x.dtype)} differs from q dtype {_dtypes.name(q.dtype)}")
        if x.device != q.device:
            _fail(op, f"{name} is on {x.device} but q is on {q.device}")
        if (x.shape[0], x.shape[1], x.shape[3]) != (q.shape[0], q.shape[1], q.shape[3]):
            _fail(op, f"{name} has shape {list(x.shape)} but q has shape {list(q.shape)}: B, H and head_dim must agree")
    if v is not None and v.shape[2] != k.shape[2]:
        _fail(op, f"v has shape {list(v.shape)} but k has shape {list(k.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x is not None and x.shape[-1] > 1 and x.stride(-1) != 1:
            _fail(op, f"{name} must have unit stride in its last dim (got stride {x.stride(-1)}); call .contiguous()")
    if q.shape[3] < 1:
        _fail(op, "head_dim must be at least 1")
    if k.shape[2] < 1:
        _fail(op, "k must hold at least one key (N_k >= 1)")


def _check_scalars(op, q, n_query, scale) -> None:
    N_q = q.shape[2]
    lo = min(1, N_q)
    if not lo <= n_query <= N_q:
        _fail(op, f"n_query must be in [{lo}, N_q] = [{lo}, {N_q}], got {n_query}")
    if not 0 < scale < math.inf:
        _fail(op, f"scale must be finite and > 0, got {scale}")


def check_mass(q, k, n_query, scale) -> None:
    _check_qkv(MASS_OP, q, k)
    _check_scalars(MASS_OP, q, n_query, scale)


def check_fwd(q, k, v, n_query, scale, row_top=0) -> None:
    _check_qkv(ATTN_OP, q, k, v)
    _check_scalars(ATTN_OP, q, n_query, scale)
    if not 0 <= row_top <= MAX_ROW_TOP:
        _fail(ATTN_OP, f"row_top must be in [0, {MAX_ROW_TOP}], got {row_top}")


def check_topk(score, k, largest) -> None:
    if score.dim() != 3:
        _fail(ATTN_OP, f"score must be [B, G, N], got shape {list(score.shape)}")
    if score.dtype not in (torch.float32, torch.float64):
        _fail(ATTN_OP, f"score dtype must be float32 or float64, got {_dtypes.name(score.dtype)}")
    if score.shape[-1] > 1 and score.stride(-1) != 1:
        _fail(ATTN_OP, f"score must have unit stride in its last dim (got stride {score.stride(-1)}); "
                       "call .contiguous()")
    if not 0 <= k <= score.shape[2]:
        _fail(ATTN_OP, f"k must be in [0, N] = [0, {score.shape[2]}], got {k}")


def check_suppress(q, k, v, o, lse, idx, n_rows, scale, bias, renormalize=True) -> None:
    _check_qkv(ATTN_OP, q, k, v)
    B, H, N_q, _ = q.shape
    acc = _dtypes.acc(q.dtype)
    for name, x, layout, shape in (("o", o, "[B, H, N_q, head_dim]", list(q.shape)),
                                   ("lse", lse, "[B, H, N_q]", [B, H, N_q])):
        if x.device != q.device:
            _fail(ATTN_OP, f"{name} is on {x.device} but q is on {q.device}")
        if list(x.shape) != shape or x.dtype != acc or not x.is_contiguous():
            _fail(ATTN_OP, f"{name} must be a contiguous {layout} = {shape} tensor of dtype {_dtypes.name(acc)} (the "
                           f"accumulation dtype), got shape {list(x.shape)}, dtype {_dtypes.name(x.dtype)}, strides "
                           f"{list(x.stride())}")
    _check_idx(ATTN_OP, q, k, idx)
    _check_rows_scale_bias(ATTN_OP, q, n_rows, scale, bias)


def check_given(q, k, v, idx, n_rows, scale, bias) -> None:
    _check_qkv(GIVEN_OP, q, k, v)
    _check_idx(GIVEN_OP, q, k, idx)
    _check_rows_scale_bias(GIVEN_OP, q, n_rows, scale, bias)


def _check_idx(op, q, k, idx) -> None:
    """idx [B, G, K] of q's (b, h): its layout (its values: _check_idx_values)."""
    B, H, N_k = q.shape[0], q.shape[1], k.shape[2]
    if idx.device != q.device:
        _fail(op, f"idx is on {idx.device} but q is on {q.device}")
    if not (idx.dim() == 3 and idx.dtype == torch.int64 and idx.is_contiguous() and idx.shape[0] == B
            and idx.shape[1] in (1, H) and 1 <= idx.shape[2] <= N_k):
        _fail(op, f"idx must be a contiguous int64 [B, G, K] tensor with B = {B}, G = 1 or H = {H} and "
                       f"1 <= K <= N_k = {N_k}, got shape {list(idx.shape)}, dtype {_dtypes.name(idx.dtype)}")


def _check_rows_scale_bias(op, q, n_rows, scale, bias) -> None:
    N_q = q.shape[2]
    if not 0 <= n_rows <= N_q:
        _fail(op, f"n_rows must be in [0, N_q] = [0, {N_q}], got {n_rows}")
    if not 0 < scale < math.inf:
        _fail(op, f"scale must be finite and > 0, got {scale}")
    if math.isnan(bias) or bias == math.inf:
        _fail(op, f"bias must be finite or -inf, got {bias}")


def _check_idx_values(op, idx, n_keys) -> None:
    """Index values, which fakes cannot see: checked by the Python backends before any gather, on the host
    and exactly (naming the offending range), on CPU and CUDA alike.

    On CUDA the check costs one D2H copy of idx's (min, max) and a wait for the current stream, per call;
    it is skipped under CUDA-graph capture and torch.compile tracing (_checks.values_readable), where the
    Triton kernels keep every access in bounds: an out-of-range index suppresses nothing (its key gets no
    bias and no correction term). The reference backend gathers by idx with torch ops, whose own index
    checks fail on such an index.
    """
    if idx.numel() and _checks.values_readable(idx):
        lo, hi = torch.stack(torch.aminmax(idx)).tolist()
        if lo < 0 or hi >= n_keys:
            _fail(op, f"idx values must be in [0, N_k) = [0, {n_keys}), got [{lo}, {hi}]")


def _triton_checked(launch, op=ATTN_OP):
    def run(q, *args):
        _triton.check_float32_math(op, q.dtype, "q, k, v")
        if q.shape[-1] > triton_kernels.MAX_D:
            _fail(op, f"the triton backend takes head_dim <= {triton_kernels.MAX_D}, got {q.shape[-1]}")
        return launch(q, *args)
    return run


def _topk_triton(score, k, largest):
    _triton.check_float32_math(ATTN_OP, score.dtype, "score")
    if k > triton_kernels.MAX_TOPK:
        _fail(ATTN_OP, f"the triton backend selects at most {triton_kernels.MAX_TOPK} keys per row, got k={k}")
    return triton_kernels.sink_topk(score, k, largest)


def _idx_checked(fn, op, at):
    """fn with the values of its argument `at` (idx) checked against N_k (k, argument 1) first."""
    def run(*args):
        _check_idx_values(op, args[at], args[1].shape[2])
        return fn(*args)
    return run


_registry.register("sink_mass", check_mass, triton=_triton_checked(triton_kernels.function("sink_mass")),
                   reference=reference.sink_mass)
_registry.register("sink_attention_fwd", check_fwd, triton=_triton_checked(triton_kernels.function("attention_fwd")),
                   reference=reference.attention_fwd)
_registry.register("sink_topk", check_topk, triton=_topk_triton, reference=reference.sink_topk)
_registry.register("sink_suppress", check_suppress,
                   triton=_idx_checked(_triton_checked(triton_kernels.function("sink_suppress")), ATTN_OP, 5),
                   reference=_idx_checked(reference.sink_suppress, ATTN_OP, 5))
_registry.register("sink_attention_given", check_given,
                   triton=_idx_checked(_triton_checked(triton_kernels.function("attention_given"), GIVEN_OP), GIVEN_OP,
                                       3),
                   reference=_idx_checked(reference.attention_given, GIVEN_OP, 3))


@_registry.register_fake("diffkern::sink_mass")
def _mass_fake(q, k, n_query, scale):
    check_mass(q, k, n_query, scale)
    acc = _dtypes.acc(q.dtype)
    return q.new_empty(k.shape[:3], dtype=acc), q.new_empty(q.shape[:3], dtype=acc)


@_registry.register_fake("diffkern::sink_attention_fwd")
def _fwd_fake(q, k, v, n_query, scale, row_top=0):
    check_fwd(q, k, v, n_query, scale, row_top)
    acc = _dtypes.acc(q.dtype)
    return (q.new_empty(q.shape, dtype=acc), q.new_empty(q.shape[:3], dtype=acc),
            q.new_empty(k.shape[:3], dtype=acc), q.new_empty(q.shape[:3], dtype=acc),
            q.new_empty((*q.shape[:3], row_top), dtype=acc))


@_registry.register_fake("diffkern::sink_topk")
def _topk_fake(score, k, largest):
    check_topk(score, k, largest)
    return score.new_empty((*score.shape[:2], k), dtype=torch.int64)


@_registry.register_fake("diffkern::sink_suppress")
def _suppress_fake(q, k, v, o, lse, idx, n_rows, scale, bias, renormalize=True):
    check_suppress(q, k, v, o, lse, idx, n_rows, scale, bias, renormalize)
    return q.new_empty(q.shape), q.new_empty((*q.shape[:2], n_rows), dtype=_dtypes.acc(q.dtype))


@_registry.register_fake("diffkern::sink_attention_given")
def _given_fake(q, k, v, idx, n_rows, scale, bias):
    check_given(q, k, v, idx, n_rows, scale, bias)
    return q.new_empty(q.shape)


def _forward_only(op, *tensors) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(f"{op} is forward-only (no backward): call it under torch.no_grad() or pass detached "
                           "tensors")


def _public(op, q, k, v, n_query, scale):
    """The Python types of the public arguments, and the defaults that need a valid shape:
    (n_query, scale) as the op takes them (its schema checks the rest)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(op, name, t, optional=name == "v" and op == MASS_OP)
    if q.dim() != 4:
        _fail(op, f"q must be [B, H, N_q, head_dim], got shape {list(q.shape)}")
    if q.shape[3] < 1:
        _fail(op, "head_dim must be at least 1")
    n = q.shape[2] if n_query is None else _checks.integer(op, "n_query", n_query)
    return n, 1.0 / math.sqrt(q.shape[-1]) if scale is None else _checks.number(op, "scale", scale)


def sink_mass(q, k, n_query: int | None = None, scale: float | None = None):
    """Incoming attention mass per key, averaged over the first n_query (image) queries, in O(N) memory.

        P[b,h,i,j] = softmax_j(scale q_i . k_j),   mass[b,h,j] = (1/n_query) sum_{i<n_query} P[b,h,i,j]
    Never forms the N_q x N_k matrix: a flash pass gives each row's log-sum-exp, then a column pass sums
    exp(s_ij - lse_i) down each key's column.

    Args:
        q: [B, H, N_q, head_dim], k: [B, H, N_k, head_dim]; float16, bfloat16, float32 (float64 on the
            cpu/reference backends); any strides with a unit last stride (diffusers' transposed views work).
        n_query: the image queries, the first n_query rows (default N_q). scale: default 1/sqrt(head_dim).
    Returns:
        (mass [B, H, N_k], lse [B, H, N_q] over all queries), float32 (float64 for float64).
    No backward (forward-only; inputs requiring grad raise under grad mode). Nothing is saved.
    Backends: C++/ATen blocked (CPU tensors), Triton (CUDA tensors), reference; see `diffkern.backend`.
    Bad input: TypeError (not a tensor, a float n_query) or ValueError (shape, dtype, device, stride,
        head_dim 0, no keys, n_query outside [1, N_q], scale <= 0), naming the argument.
    NaN/inf policy: propagated like the reference: a NaN/inf in a row's q or in any k of the row's
        (b, h) makes that row's lse NaN and the masses of that (b, h) NaN; values are not checked.
    """
    n, sc = _public(MASS_OP, q, k, None, n_query, scale)
    _forward_only(MASS_OP, q, k)
    with _nvtx.range("diffkern.sink_mass"):
        return _ops.ops.sink_mass(q, k, n, sc)


def _random_keys(B, n_keys, K, seed, call_index, device):
    """A fresh reproducible set of K keys per (seed, call_index, b), by tensor ops only (no generator, no
    host sync: it compiles): key j of sample b gets the first Philox4x32-10 word at counter
    (j, b, call_index), key seed (ntrk.reference.philox_randint4x), and the K smallest (word, j) win: a
    uniform K-subset for each (seed, call_index, b)."""
    j = torch.arange(n_keys, dtype=torch.int64, device=device)
    b = torch.arange(B, dtype=torch.int64, device=device)[:, None]
    call = torch.as_tensor(call_index, dtype=torch.int64, device=device)
    word = philox_randint4x(seed, j + (b << 32), high=call)[0]
    return torch.topk((word << 31) | j, K, dim=-1, largest=False).indices[:, None, :]


def _select(mass, row_max, mode, k_sink, seed, call_index):
    """(idx [B, G, K], the chosen keys' m (per head) or mbar [B, G, K]) for a suppressing mode; row_max
    [B, H, n_query]: each image row's largest probability (read by anti_sink only)."""
    B, H, N_k = mass.shape
    if mode == "per_head":
        score = mass
        idx = _ops.ops.sink_topk(mass, min(k_sink, N_k), True)
    else:
        score = mass.mean(1, keepdim=True)
        K = min(k_sink * H, N_k)
        if mode == "random":
            idx = _random_keys(B, N_k, K, seed, call_index, mass.device)
        elif mode == "anti_sink":  # image token i is key i
            r = row_max.mean(1, keepdim=True)
            idx = _ops.ops.sink_topk(r, min(k_sink * H, r.shape[-1]), True)
        else:
            idx = _ops.ops.sink_topk(score, K, mode == "head_union")
    return idx, torch.gather(score, -1, idx)


def _check_mode(mode, row_scope, k_sink, bias, seed):
    if mode not in MODES:
        _fail(ATTN_OP, f"mode must be one of {MODES}, got {mode!r}")
    _check_scope_bias(row_scope, bias)
    if not (isinstance(k_sink, int) and not isinstance(k_sink, bool) and k_sink >= 0):
        _fail(ATTN_OP, f"k_sink must be an int >= 0, got {k_sink!r}")
    if mode == "random" and seed is None:
        _fail(ATTN_OP, "mode 'random' needs a seed (the set is drawn from seed, call_index and b)")
    if seed is not None:
        _checks.integer(ATTN_OP, "seed", seed)


def _check_scope_bias(row_scope, bias, op=ATTN_OP):
    if row_scope not in ROW_SCOPES:
        _fail(op, f"row_scope must be one of {ROW_SCOPES}, got {row_scope!r}")
    if not _checks.number(op, "bias", bias) <= 0:
        _fail(op, f"bias must be <= 0 (a suppression; -inf allowed), got {bias}")


def _intervention(intervention, alpha, bias, op=ATTN_OP) -> tuple[float, bool]:
    """(the op's bias, renormalize) for an intervention; each reads only its own parameter, and a value
    given to the other one is refused (it would be silently ignored)."""
    if intervention not in INTERVENTIONS:
        _fail(op, f"intervention must be one of {INTERVENTIONS}, got {intervention!r}")
    alpha = _checks.number(op, "alpha", alpha)
    if not 0 <= alpha < math.inf:
        _fail(op, f"alpha must be finite and >= 0, got {alpha}")
    if intervention == "mask":
        if alpha != 0:
            _fail(op, f"alpha applies to the interventions 'scale' and 'value' (intervention 'mask' uses bias), "
                           f"got alpha={alpha}")
        return float(bias), True
    if bias != DEFAULT_BIAS:
        _fail(op, f"bias applies to intervention 'mask' only (intervention {intervention!r} uses alpha), "
                       f"got bias={bias}")
    return math.log(alpha) if alpha > 0 else -math.inf, intervention == "scale"


def sink_attention(q, k, v, k_sink: int = 1, mode: str = "per_head", row_scope: str = "image",
                   n_query: int | None = None, bias: float = DEFAULT_BIAS, seed: int | None = None,
                   call_index: int | None = None, return_stats: bool = False, scale: float | None = None,
                   intervention: str = "mask", alpha: float = 0.0):
    """Attention with the keys that receive the most (or a control set of) attention mass suppressed.

    With m the incoming mass over the first n_query (image) queries (see `sink_mass`), the mode picks S:
      per_head    top-k_sink keys of m[b, h, :] per (b, h);
      head_union  top k_sink*H keys of mbar[b, :] = mean_h m[b, h, :] per sample, shared by all heads;
      bottom      the k_sink*H keys of lowest mbar; random: k_sink*H keys drawn per (seed, call_index, b);
      anti_sink   the control: per sample, the k_sink*H image tokens i < n_query of largest
                  r[b, i] = mean_h max_j P[b, h, i, j], suppressed as keys (keys are ordered [image, text]:
                  image token i is key i); needs N_k >= n_query;
      measure     nothing suppressed: the unmasked output, bit-identical to the op with k_sink = 0.
    The intervention changes rows i < n_query (row_scope "image") or all rows ("all"), P = softmax_j(s_ij):
      mask   (default, the paper's) softmax_j(s_ij + bias [j in S]) v: S's logits biased, the row
             re-softmaxed; values untouched;
      scale  S's probabilities times alpha, the row renormalised: P'_ij = alpha^[j in S] P_ij / sum_l
             alpha^[l in S] P_il, out = P' v (= mask with bias = log alpha; alpha = 0 is bias -inf,
             alpha > 1 amplifies S, alpha = 1 is the unmasked output);
      value  S's values times alpha, probabilities untouched, no renormalisation:
             out = P v - (1 - alpha) sum_{j in S} P_ij v_j (alpha = 0, the default, removes S's values).
    At most N_k keys are selected; for mask and scale, when S holds every key the bias shifts the whole row
    and cancels, so such a row keeps its unmasked attention (for bias = -inf too, the limit); value with
    S = every key gives alpha times the unmasked output.
    The fused path: a flash forward (unmasked o, lse, entropy), the column-mass pass, top-k, then the
    unmasked o corrected by the |S| selected keys' terms, in fp32, with g = e^bias (mask) or alpha:
    out = (o - (1 - g) sum_S P v) / (1 - (1 - g) sum_S P) (for g > 1 divided through by g), and for value
    out = o - (1 - alpha) sum_S P v. Through the factor 1 - (1 - g) sum_S P (the denominator; for value, the
    cancellation), the rounding of o, lse and the selected keys' logits is amplified by up to its inverse, so
    a row where that factor is at most reference.recompute_below(dtype) is recomputed as the masked softmax
    itself (value: the softmax times the scaled values), a flash pass over its query tile (CPU: its block of
    rows): for bf16/fp16 that is 1/8 (with g = 0, the suppressed keys hold over 7/8 of its mass, as a strong
    sink does; at most 8x, 3 bits of the fp32 accumulation, below the output's rounding), for float32/float64
    1/2 (over half of its mass; at most 2x, within the tests' error model); g >= 1 never recomputes. The cost
    of that pass is paid only by the tiles holding such rows.
    NaN policy: NaN in q, k or v propagates to the rows (and statistics) it reaches, as in the reference.

    Args:
        q: [B, H, N_q, d]; k, v: [B, H, N_k, d]; float16/bfloat16/float32 (float64 on cpu/reference),
            unit last stride. Keys are ordered [image, text] as in SD3; n_query defaults to N_q.
        bias: <= 0, default -1e4 (the paper's), intervention "mask" only.
        intervention: "mask", "scale" or "value" (above). alpha: finite, >= 0, default 0; "scale" and "value"
            only (a bias other than the default with them, or an alpha other than 0 with "mask", raises).
        seed/call_index: the random mode's reproducible draw
            (call_index an int or a 0-dim int64 tensor, e.g. a counter kept on the device).
        scale: default 1/sqrt(d).
    Returns:
        out [B, H, N_q, d] in q's dtype, or (out, stats) with return_stats. stats (tensors): indices
        [B, G, K] (G = H per head, 1 otherwise; None in measure mode), index_mass (their m or mbar),
        max_mass (mean over b, h of max_j m), index0_mass (mean m[:, :, 0]), row_entropy (mean over image
        rows of -sum P log P, unmasked), top5_mass (mean over b, h of the 5 largest m summed), top_k_conc
        (the paper's: mean over b, h and image rows i of the sum of row i's 5 largest P_ij, 0 past N_k),
        max_act (mean over b, h of max over image rows i and keys j of P_ij), sink_at_index0 /
        sink_in_image / sink_in_text (the fractions of (b, h) whose top-1 key j* = argmax_j m[b, h, j],
        ties to the lower index, is 0 / in 1..n_query-1 / >= n_query, a text key), top_sink_mass_after
        (the mean over b, h and image rows of the first selected key's probability after suppression, in the
        suppressed rows: for "value" its unchanged probability; None in measure mode). All unmasked but
        top_sink_mass_after, 0-dim, in the accumulation dtype. The per-row top-5 comes from the fused forward
        (row_top = 5, O(N_q) memory), requested only with return_stats.
    No backward (forward-only; inputs requiring grad raise under grad mode). Memory O(N): never N_q x N_k.
    Backends: C++/ATen blocked (CPU tensors), Triton (CUDA tensors), reference; see `diffkern.backend`.
    Bad input: TypeError (not a tensor, a float n_query, seed or call_index, a bias or alpha not a number) or
        ValueError (shape, dtype, device, stride, head_dim 0, an unknown mode, row_scope or intervention,
        k_sink not an int >= 0, bias > 0, alpha negative or not finite, bias or alpha given to an intervention
        that does not read it, random mode without a seed, anti_sink with N_k < n_query), naming the argument.
    NaN/inf policy: propagated like the reference: a NaN/inf in q, k or v of a (b, h) makes the affected
        rows' outputs (and with q or k, that (b, h)'s masses, hence the selection) NaN; values are not checked.
    """
    n, sc = _public(ATTN_OP, q, k, v, n_query, scale)
    _check_mode(mode, row_scope, k_sink, bias, seed)
    change, renormalize = _intervention(intervention, alpha, bias)
    if mode == "anti_sink" and k.dim() == 4 and k.shape[2] < n:
        _fail(ATTN_OP, f"mode 'anti_sink' suppresses image tokens as keys (keys ordered [image, text]) and needs "
                       f"N_k >= n_query, got N_k = {k.shape[2]}, n_query = {n}")
    _forward_only(ATTN_OP, q, k, v)
    # each row's top-5 probabilities for the statistics; anti_sink needs only each row's largest
    row_top = STATS_ROW_TOP if return_stats else int(mode == "anti_sink")
    with _nvtx.range("diffkern.sink_attention"):
        o, lse, mass, entropy, top_p = _ops.ops.sink_attention_fwd(q, k, v, n, sc, row_top)
        idx = post = chosen = None
        if mode == "measure" or k_sink == 0 or q.shape[0] == 0 or (mode == "anti_sink" and n == 0):
            out = o.to(q.dtype)
        else:
            call = call_index if isinstance(call_index, torch.Tensor) else \
                0 if call_index is None else _checks.integer(ATTN_OP, "call_index", call_index)
            idx, chosen = _select(mass, top_p[:, :, :n, 0] if row_top else None, mode, k_sink, seed, call)
            n_rows = n if row_scope == "image" else q.shape[2]
            out, post = _ops.ops.sink_suppress(q, k, v, o, lse, idx, n_rows, sc, change, renormalize)
        if not return_stats:
            return out
        return out, _stats(mass, entropy, top_p, n, idx, chosen, post)


def sink_attention_given(q, k, v, idx, row_scope: str = "image", n_query: int | None = None,
                         bias: float = DEFAULT_BIAS, scale: float | None = None, intervention: str = "mask",
                         alpha: float = 0.0):
    """Attention with a set of keys S known before the call suppressed: one flash forward with S's bias in the logits.

        out[b,h,i] = sum_j softmax_j(scale q_i . k_j + bias [j in S_bh]) v_j   for rows i < n_query (row_scope
        "image") or every row ("all"); the other rows get plain attention.
    The same output as `sink_attention` (intervention "mask" or "scale") when S is the set it selects, at the
    cost of one attention forward (no mass, no column pass, no correction: the keys to suppress, e.g. the previous
    step's sinks, a fixed set or the random control, are not chosen from this call's attention). Suppression as
    sink_attention's: bias (default -1e4, the paper's; -inf removes S) added to S's logits and the row
    re-softmaxed, or intervention "scale", S's probabilities times alpha and the row renormalised (bias log alpha);
    a (b, h) whose S holds every key keeps its unmasked attention (the bias shifts the whole row and cancels,
    also for -inf). A key listed twice is suppressed once.

    Args:
        q: [B, H, N_q, d]; k, v: [B, H, N_k, d]; float16/bfloat16/float32 (float64 on cpu/reference), unit last
            stride; keys ordered [image, text], the image queries first.
        idx: the keys S, int64, values in [0, N_k): [B, H, K] (per head), [B, 1, K] or [B, K] (one set per sample,
            shared by the heads); 0 <= K <= N_k (K = 0 suppresses nothing).
        row_scope: "image" (rows < n_query, default N_q) or "all". bias: <= 0 ("mask" only). intervention: "mask" or
            "scale" (alpha finite >= 0; "value" does not bias the logits: use sink_attention). scale: default
            1/sqrt(d).
    Returns:
        out [B, H, N_q, d] in q's dtype (computed in fp32, float64 for float64, written once).
    No backward (forward-only; inputs requiring grad raise under grad mode). Memory O(N): never N_q x N_k.
    Backends: C++/ATen blocked (CPU tensors), Triton (CUDA tensors: attn_fwd_kernel with the key bias), reference.
    Bad input: TypeError (not a tensor, a float n_query, a bias or alpha not a number) or ValueError (shape, dtype,
        device, stride, an idx not int64 [B, H or 1, K] on q's device or with values outside [0, N_k),
        an unknown row_scope or intervention, "value", bias > 0, alpha < 0), naming the argument. Values of
        idx on a GPU are not checked under CUDA-graph capture or torch.compile: there an out-of-range index
        suppresses nothing.
    NaN/inf policy: propagated like the reference: a NaN/inf in q, k or v of a (b, h) makes the rows it reaches
        NaN; values are not checked.
    """
    n, sc = _public(GIVEN_OP, q, k, v, n_query, scale)
    _checks.tensor(GIVEN_OP, "idx", idx)
    _check_scope_bias(row_scope, bias, GIVEN_OP)
    change, renormalize = _intervention(intervention, alpha, bias, GIVEN_OP)
    if not renormalize:
        _fail(GIVEN_OP, "intervention 'value' scales values, not logits: sink_attention_given takes 'mask' or 'scale' "
                       "(use sink_attention for 'value')")
    if idx.dim() == 2:
        idx = idx[:, None]
    if idx.dim() != 3 or idx.dtype != torch.int64:
        _fail(GIVEN_OP, f"idx must be an int64 [B, H, K], [B, 1, K] or [B, K] tensor, got shape {list(idx.shape)}, "
                       f"dtype {_dtypes.name(idx.dtype)}")
    _forward_only(GIVEN_OP, q, k, v)
    n_rows = n if row_scope == "image" else q.shape[2]
    if idx.shape[-1] == 0:  # nothing suppressed: no row biased
        idx, n_rows = idx.new_zeros((idx.shape[0], 1, 1)), 0
    with _nvtx.range("diffkern.sink_attention_given"):
        return _ops.ops.sink_attention_given(q, k, v, idx.contiguous(), n_rows, sc, change)


def _stats(mass, entropy, top_p, n_query, idx, chosen, post) -> dict:
    """sink_attention's statistics (its docstring); top_p [B, H, N_q, 5] each row's 5 largest probabilities."""
    image_top = top_p[:, :, :n_query]
    max_mass, sink = mass.max(-1)  # one pass: the largest mass and its key, the first of equal maxima

    def fraction(where):
        return where.to(mass.dtype).mean()
    return {
        "indices": idx,
        "index_mass": chosen,
        "max_mass": max_mass.mean(),
        "index0_mass": mass[..., 0].mean(),
        "row_entropy": entropy[:, :, :n_query].mean(),
        "top5_mass": mass.topk(min(5, mass.shape[-1]), -1).values.sum(-1).mean(),
        "top_k_conc": image_top.sum(-1).mean(),
        "max_act": image_top[..., 0].amax(-1).mean() if n_query else mass.new_tensor(math.nan),
        "sink_at_index0": fraction(sink == 0),
        "sink_in_image": fraction((sink > 0) & (sink < n_query)),
        "sink_in_text": fraction(sink >= n_query),
        "top_sink_mass_after": None if post is None else post[:, :, :n_query].mean(),
    }
