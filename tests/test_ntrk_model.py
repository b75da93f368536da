"""bench/ntrk_model.py (the video case's modeled traffic) equals what the interpreter and AtenTraffic count."""
import pytest
import torch

import diffkern
from diffkern import _triton
from diffkern.bench import interpreted, ntrk, ntrk_model
from diffkern.ntrk import triton_kernels
from diffkern.ntrk.bands import bands_on
from diffkern.testing.triton_monitor import TritonMonitor

# (B, M, D, column chunk, dtype, input scale): one chunk; 3 chunks with a last one of 3 tiles (the clip
# kernel's binary search probes past M); 4 full chunks of 4; non-power-of-two D over 2 chunks with a last
# chunk of 1 tile; a scaled input the first pass clips, so a second pass runs on the fp32 iterate.
SHAPES = ((2, 5, 7, 1024, torch.float32, 1.0), (2, 19, 3, 8, torch.bfloat16, 1.0), (1, 16, 16, 4, torch.float32, 1.0),
          (3, 9, 6, 8, torch.float16, 1.0), (2, 19, 3, 8, torch.float32, 3.0))


@pytest.mark.parametrize("B,M,D,chunk,dtype,scale", SHAPES)
def test_project_kernel_bytes_equal_the_interpreters_count(B, M, D, chunk, dtype, scale, monkeypatch):
    monkeypatch.setattr(triton_kernels, "COL_CHUNK", chunk)
    x = (scale * torch.randn(B, M * D, generator=torch.Generator().manual_seed(M * D))).to(dtype)
    with diffkern.backend("triton"), TritonMonitor(check_bounds=True) as mon:
        diffkern.twoos_project(x, tile=D, passes=3)
    counted = mon.by_kernel()
    passes = counted["row_sort_kernel"]["launches"]
    assert (passes == 1) == (scale == 1.0), passes
    assert counted == ntrk_model.project_kernels(B, M, D, dtype.itemsize, passes)


def test_tilted_step_counts_equal_the_benchmarks_count(monkeypatch):
    """The whole bench entry (kernels, aten glue, launches; fwd and bwd) of a case with 3 column chunks."""
    monkeypatch.setattr(triton_kernels, "COL_CHUNK", 8)
    monkeypatch.setattr(_triton, "_DEBUG_FILL", False)  # as the benchmark's counting child runs
    case = ntrk._case(2, (3, 19), tile=3)
    bands_on.cache_clear()  # as in the counting child: its one call casts the band tables
    first = interpreted.count_case(ntrk.TILTED_WORKLOAD, case, torch.bfloat16)["counts"]
    again = interpreted.count_case(ntrk.TILTED_WORKLOAD, case, torch.bfloat16)["counts"]
    passes = first["fwd"]["kernel.row_sort_kernel.launches"]
    assert first == ntrk_model.tilted_step_counts(2, 19, 3, 2, passes)
    assert again == ntrk_model.tilted_step_counts(2, 19, 3, 2, passes, first_call=False)


def test_the_full_run_models_only_the_video_case():
    """The video case's traffic rows come from the model in every run and say so; the FLUX case is counted in
    the full run (the default one models it too)."""
    from diffkern.bench import traffic
    from diffkern.bench.mode import MODES
    flux, video = ntrk.TILTED_WORKLOAD.full_cases
    assert MODES["full"].counts(ntrk.TILTED_WORKLOAD, flux) and not MODES["default"].counts(ntrk.TILTED_WORKLOAD, flux)
    assert not MODES["full"].counts(ntrk.TILTED_WORKLOAD, video)
    entry = interpreted._modeled(ntrk.TILTED_WORKLOAD, video, "bfloat16").result()
    model = ntrk_model.tilted_step_counts(1, 8190, 256, 2)
    assert entry["counts"] == {"fwd": model["fwd"], "bwd": model["bwd"]} and entry["modeled"]
    rows = [r for r in traffic.rows(ntrk.TILTED_WORKLOAD, False, [entry], torch.bfloat16) if r["case"] == video.name]
    assert len(rows) == 3 and all(r["source"] == "modeled" for r in rows)
    fwd = next(r for r in rows if r["pass"] == "fwd")
    assert fwd["diffkern_kernel_bytes"] == model["fwd"]["triton.bytes_loaded"] + model["fwd"]["triton.bytes_stored"]
