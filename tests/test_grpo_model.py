"""bench/grpo_model.py (the default run's Flow-GRPO loss traffic) equals what the interpreter and AtenTraffic count."""
import pytest
import torch

from diffkern import _triton
from diffkern.bench import grpo, interpreted

# (B, latent, SMs modeled): two tiles a sample, the last partial; one partial tile; 1 SM makes each
# program walk 4 tiles (9 a sample, the last partial): the last chunk has 1 tile and 3 slots past D.
SHAPES = ((2, (4, 3, 8, 13), 132), (3, (5, 7), 132), (2, (9, 1001), 1))


@pytest.mark.parametrize("workload", grpo.WORKLOADS, ids=lambda w: w.name)
@pytest.mark.parametrize("B,latent,sms", SHAPES)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_loss_counts_equal_the_benchmarks_count(workload, B, latent, sms, dtype, monkeypatch):
    monkeypatch.setattr(_triton, "MODEL_SMS", sms)
    monkeypatch.setattr(_triton, "_DEBUG_FILL", False)  # as the benchmark's counting child runs
    case = grpo._case(B, latent)
    counted = interpreted.count_case(workload, case, dtype, cuda=False)["counts"]
    modeled = workload.modeled_counts(case, dtype)
    assert counted == {"fwd": modeled["fwd"], "bwd": modeled["bwd"]}
