"""bench/aten_traffic.py: a dtype cast is a kernel (aten.to's schema may alias, so it looks like a view)."""
import torch

from diffkern.bench.aten_traffic import AtenTraffic


def test_to_counts_a_cast_and_not_a_no_op():
    x = torch.empty(3, 5, device="meta")
    with AtenTraffic() as cast:
        x.to(torch.bfloat16)
    assert (cast.traffic.bytes_read, cast.traffic.bytes_written, cast.traffic.kernels) == (60, 30, 1)
    with AtenTraffic() as same:
        x.to(torch.float32)
    assert (same.traffic.bytes, same.traffic.kernels) == (0, 0)
