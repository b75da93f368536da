"""bench/dar_route_model.py (the default run's DAR routing traffic) equals what the interpreter and AtenTraffic count."""
import pytest
import torch

from diffkern import _triton
from diffkern.bench import dar, dar_route_model, interpreted

# (n, B, T, d, SMs modeled): a 16-token tile with d past a power of two; one source over odd T and d; a
# 2-token tile at d > 1024; 4 SMs make the backward walk 2 tiles per program, its last chunk's second slot
# past T (masked, but the source tables are still read).
SHAPES = ((4, 2, 64, 96, 132), (1, 3, 5, 40, 132), (3, 1, 9, 1100, 132), (2, 2, 17, 130, 1))


@pytest.mark.parametrize("n,B,T,d,sms", SHAPES)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_route_counts_equal_the_benchmarks_count(n, B, T, d, sms, dtype, monkeypatch):
    monkeypatch.setattr(_triton, "MODEL_SMS", sms)
    monkeypatch.setattr(_triton, "_DEBUG_FILL", False)  # as the benchmark's counting child runs
    counted = interpreted.count_case(dar.ROUTE, dar._case(n, B, T, d), dtype, cuda=False)["counts"]
    assert counted == dar_route_model.route_counts(n, B, T, d, dtype.itemsize)


def test_the_default_run_models_both_headline_cases():
    for case in dar.ROUTE.full_cases:
        entry = interpreted._modeled(dar.ROUTE, case, "bfloat16").result()
        p = case.params
        model = dar_route_model.route_counts(p["n"], p["B"], p["T"], p["d"], 2)
        assert entry["counts"] == {"fwd": model["fwd"], "bwd": model["bwd"]} and entry["modeled"]
