"""The GRPO and NTRK cuda backends' internal ops as ops: opcheck (schema, fakes, dispatch) and their own
argument checks, which keep a direct call (bypassing the public op's checks) from reaching a kernel
with memory it may not touch."""
import re

import pytest
import torch

from diffkern.grpo import reference
from diffkern.testing import cuda_harness

pytestmark = pytest.mark.skipif(not cuda_harness.loaded(), reason="the internal ops run in the harness on CPU here")

WAN = reference.STD_RULES["wan"], reference.WAN_STD_COEF
B, D = 2, 37


def latents(n, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, D, generator=g).to(dtype) for _ in range(n)]


def sigmas():
    s = reference.flow_sigmas()
    return s[[0, 3]].float(), s[[1, 4]].float()


def calls():
    x, v, t, r, u = latents(5)
    lp = (v, x, t, *sigmas(), r, u, 4.5, *WAN)
    return {
        "flow_sde_step_cuda": (x, v, *sigmas(), t, *WAN),
        "grpo_log_prob_cuda": lp,
        "grpo_log_prob_bwd_cuda": (torch.ones(B), torch.ones(B), *lp),
        "ntrk_step_cuda": (x, torch.rand(B), v, torch.rand(B), None, torch.tensor([3, 0])),
    }


@pytest.mark.parametrize("name", calls())
def test_internal_op_passes_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.diffkern, name), calls()[name])


def replaced(args, index, value):
    return tuple(value if k == index else a for k, a in enumerate(args))


# (op, argument index, bad value, words the error must hold)
BAD = [
    ("flow_sde_step_cuda", 1, torch.zeros(B, D + 1), "v has shape [2, 38] but x has shape [2, 37]"),
    ("flow_sde_step_cuda", 0, torch.zeros(B, D, dtype=torch.float64), "float64"),
    ("flow_sde_step_cuda", 2, torch.zeros(B + 1), "sigma must be [B]"),
    ("grpo_log_prob_cuda", 2, torch.zeros(D, B).t(), "x_next must be contiguous; call .contiguous()"),
    ("grpo_log_prob_cuda", 5, torch.zeros(B, D, dtype=torch.float16), "v_ref dtype float16 differs from v dtype float32"),
    ("grpo_log_prob_bwd_cuda", 0, torch.ones(B + 1), "dlog_prob must be a contiguous [B]"),
    ("ntrk_step_cuda", 2, torch.zeros(B, D - 1), "w has shape [2, 36] but mu has shape [2, 37]"),
    ("ntrk_step_cuda", 3, torch.zeros(B, 1), "rho must be [B]"),
    ("ntrk_step_cuda", 5, torch.zeros(2, dtype=torch.int32), "philox must be a contiguous int64 [2] tensor"),
]


@pytest.mark.parametrize("name,index,value,words", BAD, ids=[f"{b[0]}-{b[3][:12]}" for b in BAD])
def test_direct_call_with_bad_arguments_raises_value_error(name, index, value, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        getattr(torch.ops.diffkern, name)(*replaced(calls()[name], index, value))
