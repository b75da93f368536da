"""The roofline of one op call: its FLOPs and minimal HBM bytes from the shapes, and the time they imply.

Bytes are the workload's minimum (`Workload.min_bytes`: every input of the public op read once, every
output written once); FLOPs are those of the op's formula, a multiply and an add counting one each:
  * the matmul-shaped ops (recurse, sink_mass, sink_attention) count their products 2 m n k, as
    torch.utils.flop_counter does (the tests hold the two equal); their norms, softmaxes and gelus are left
    out (a few per element against 2 d per element of each product);
  * the elementwise and reduction ops count their arithmetic per latent element (each function's
    docstring gives the count); the 2OS projection sorts, which is counted as 0 FLOPs.
The predicted H100 time is max(bytes / HBM bandwidth, FLOPs / dense bf16 peak): a lower bound for a
kernel, and the unit the GPU check reports achieved GB/s and TFLOP/s against. A single kernel's products
run at the precision diffkern._dot picks on a GPU for the inputs' dtype, so its roofline
(diffkern.bench.kernel_roofline) takes that precision's peak (`dot_peak`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .._dot import dot_meta
from .workload import BWD, FWD, STEP, Case, Workload

# H100 SXM: HBM3 bandwidth and dense bf16 tensor-core throughput (the spec sheet's figures).
H100_HBM_BYTES_PER_S, H100_BF16_FLOPS = 3.35e12, 990e12
# What the SMs can pull from the L2 cache together, for traffic that hits there (a tile re-read by many programs):
# no spec-sheet figure, and not measured here. Published microbenchmark figures differ about twofold: ~5.5 TB/s
# is the low end (Chips and Cheese measured an H100 PCIe, 114 SMs, in "Nvidia's H100: Funny L2, and Tons of
# Bandwidth", 2023; its text could not be read back here to confirm the number), ~12 TB/s is quoted for the SXM
# part. The low end is used, so L2-bound launches are modeled pessimistically (at 12 TB/s the R-MDM backward's
# bf16 ratio halves); a GPU run should replace the figure with its own measurement.
H100_L2_BYTES_PER_S = 5.5e12
# Dense H100 SXM throughput of a product at each precision a tl.dot runs (diffkern._dot): 16-bit operands on
# the tensor cores, tf32 on them, tf32x3 (three tf32 products, a third of tf32), fp32 "ieee" on the CUDA cores.
H100_DOT_FLOPS = {"bf16": H100_BF16_FLOPS, "fp16": H100_BF16_FLOPS, "tf32": 495e12, "tf32x3": 165e12, "ieee": 67e12}
_SIXTEEN_BIT = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def dot_precision(dtype: torch.dtype) -> str:
    """The precision a kernel's products run at on a GPU for inputs of `dtype` (diffkern._dot's policy, as a GPU
    applies it even while this process interprets): a key of H100_DOT_FLOPS."""
    meta = dot_meta(dtype, interpreting=False)
    return meta["PRECISION"] if meta["DOT_F32"] else _SIXTEEN_BIT[dtype]


def dot_peak(dtype: torch.dtype) -> float:
    """The H100's dense FLOP/s for products at dot_precision(dtype)."""
    return H100_DOT_FLOPS[dot_precision(dtype)]


@dataclass(frozen=True)
class Roofline:
    """FLOPs and bytes of one call (one pass) or one kernel; `peak_flops`: the FLOP/s its products run at."""
    flops: float
    bytes: float
    peak_flops: float = H100_BF16_FLOPS

    def h100_s(self) -> float:
        """Predicted H100 time: the slower of moving the bytes and doing the FLOPs at peak."""
        return max(self.bytes / H100_HBM_BYTES_PER_S, self.flops / self.peak_flops)

    def bound(self) -> str:
        """Which roof limits the call on an H100: "memory" or "compute"."""
        return "memory" if self.bytes / H100_HBM_BYTES_PER_S >= self.flops / self.peak_flops else "compute"

    def achieved(self, seconds: float) -> dict:
        """GB/s and TFLOP/s the call reaches if it takes `seconds`."""
        return {"gbps": self.bytes / seconds / 1e9, "tflops": self.flops / seconds / 1e12}

    def as_dict(self) -> dict:
        return {"flops": self.flops, "bytes": self.bytes, "h100_us": self.h100_s() * 1e6, "bound": self.bound()}


def _per_element(fwd: int, bwd: int, elements: Callable[[dict], int]):
    def flops(p: dict) -> dict:
        n = elements(p)
        return {FWD: fwd * n, BWD: bwd * n}
    return flops


def _latents(p: dict) -> int:
    return p["B"] * p["D"]


def _samples(p: dict) -> int:
    return p["B"] * p["N"]


def dar_route_flops(p: dict) -> dict:
    """Per token and source element: fwd 6 (the sum of squares for rstd, the dot with q*gain, the weighted
    sum); bwd 14 (both dots again, <dh, v_i>, dv_i = alpha_i dh + beta_i q*gain + gamma_i v_i, the dq/dgain
    sums)."""
    n = p["n"] * p["B"] * p["T"] * p["d"]
    return {FWD: 6 * n, BWD: 14 * n}


def dar_gather_flops(p: dict) -> dict:
    """dar_route's over the n sources and the new chunk summary c, and the a - 1 additions forming c."""
    route = dar_route_flops({**p, "n": p["n"] + 1})
    return {FWD: route[FWD] + (p["a"] - 1) * p["B"] * p["T"] * p["d"], BWD: route[BWD]}


def recurse_flops(p: dict) -> dict:
    """The products of K blocks applied L times (forward only): per token 2 d (3d + d + 2f) for QKV, W_o and
    the MLP, per sample and head 4 T^2 d_h for the scores and P v."""
    B, T, d, f = p["B"], p["T"], p["d"], p["f"]
    per_block = 2 * B * T * d * (4 * d + 2 * f) + 4 * B * T * T * d
    return {FWD: p["K"] * p["L"] * per_block, BWD: 0}


def sink_mass_flops(p: dict) -> dict:
    """The scores of every query (the lse needs all rows), 2 N_q N_k d per (b, h)."""
    return {FWD: 2 * p["B"] * p["H"] * p["N_q"] * p["N_k"] * p["d"], BWD: 0}


def sink_attention_flops(p: dict) -> dict:
    """One attention's products, 4 N_q N_k d per (b, h) (the mass sums the same probabilities, so the op's
    formula needs no second QK^T; the kernels' extra pass over the image queries is their overhead)."""
    return {FWD: 4 * p["B"] * p["H"] * p["N_q"] * p["N_k"] * p["d"], BWD: 0}


# FLOPs per workload name (the op, or the op and the form of its call).
FLOPS: dict[str, Callable[[dict], dict]] = {
    "dar_route": dar_route_flops,
    "dar_gather": dar_gather_flops,
    # fwd: mu = a x + b v, x_next - mu, its square summed (6); y form: y - b v, squared and summed (4);
    # bwd: the residual again and dv = c r (4; y form 3)
    "grpo_iso_loss": _per_element(6, 4, _latents),
    "grpo_iso_loss_y": _per_element(4, 3, _latents),
    # a x + b v + s eps (5), (y - b v)^2 summed for log_prob (3)
    "flow_sde_step": _per_element(8, 0, _latents),
    # mu + sigma (sqrt(rho) w + sqrt(1 - rho) eps): 4; bwd: dw and deps scaled copies of dx: 2
    "ntrk_step": _per_element(4, 2, _samples),
    "ntrk_tilted_step": _per_element(4, 1, _samples),
    "twoos_project": _per_element(0, 0, _samples),
    "recurse": recurse_flops,
    "sink_mass": sink_mass_flops,
    "sink_attention": sink_attention_flops,
    "sink_attention_given": sink_attention_flops,
}


def roofline(workload: Workload, case: Case, itemsize: int) -> dict[str, Roofline]:
    """Per pass (fwd, bwd, fwd+bwd): the call's FLOPs and minimal bytes. KeyError for a workload with no
    FLOP formula here."""
    flops = FLOPS[workload.name](case.params)
    nbytes = workload.min_bytes(case, itemsize)
    out = {p: Roofline(flops[p], nbytes[p]) for p in (FWD, BWD)}
    out[STEP] = Roofline(flops[FWD] + flops[BWD], nbytes[FWD] + nbytes[BWD])
    return out
