"""diffkern.bench.ntrk_parts (where NoiseTilt's training step spends its CPU time): a smoke run on the quick case
prints every part of the step, the yardstick's sweeps and the tiny pieces warm and after the sweeps."""
import re

from diffkern.bench import ntrk_parts


def test_the_quick_run_prints_every_part_and_the_cold_overhead(capsys):
    ntrk_parts.main(["--quick", "--rounds", "1"])
    out = capsys.readouterr().out
    for part in ("step", "op step", "kernels", "fwd kernel", "bwd kernel", "passes", "passes+autograd",
                 "passes_nt+autograd", "fwd passes_nt", "bwd passes"):
        assert re.search(rf"^  {re.escape(part)} +\d+\.\d us", out, re.M), part
    cold = re.findall(r"^  (step|op step|kernels|passes\+autograd) +(\d+\.\d) / +(\d+\.\d) us$", out, re.M)
    assert [c[0] for c in cold] == ["step", "op step", "kernels", "passes+autograd"]
    assert all(float(warm) > 0 and float(after) > 0 for _, warm, after in cold)
