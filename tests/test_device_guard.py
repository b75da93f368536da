"""Every Triton launch runs under a device guard for its tensors' device (diffkern._triton.device_guard).

Triton launches on the current CUDA device's current stream, not on its tensors' device, so an op on
cuda:1 tensors while cuda:0 is current must set the device first. Here the kernels run in the
interpreter on CPU tensors, where the guard changes nothing but is recorded by the launch monitor: one
call per op that has a Triton backend, and every launch it makes must have run inside a guard whose
device is the device of all of its tensor arguments.
"""
import pytest
import torch

from diffkern import _registry, _triton, backend
from diffkern.testing.triton_monitor import TritonMonitor
from test_autograd_contract import SAMPLES, detached

# Ops with a Triton kernel behind their triton backend (ntrk_step_bwd's is its reference, ATen ops: what the GPUs
# run for that backward; it launches nothing to guard).
TRITON_OPS = sorted(op for op, impls in _registry._impls.items()
                    if "triton" in impls and impls["triton"] is not impls.get("reference"))


def test_every_triton_op_has_a_sample():
    assert TRITON_OPS and set(TRITON_OPS) <= set(SAMPLES)


@pytest.mark.skipif(not _triton.interpreting(), reason="the launch monitor watches the Triton interpreter")
@pytest.mark.parametrize("op", TRITON_OPS)
def test_every_launch_runs_under_its_tensors_device(op):
    args = detached(SAMPLES[op]()[op])
    with torch.no_grad(), backend("triton"), TritonMonitor(check_bounds=False) as mon:
        getattr(torch.ops.diffkern, op)(*args)
    assert mon.launches, f"{op} launched no Triton kernel"
    for launch in mon.launches:
        assert launch.guard == torch.device("cpu") and launch.devices == {launch.guard}, \
            f"{op}: kernel {launch.kernel} ran under guard {launch.guard} with tensors on {set(launch.devices)}"


@pytest.mark.parametrize("op, name", [(op, name) for op in sorted(_registry._impls) for name in _registry._impls[op]])
def test_every_backend_is_called_under_the_guard(op, name, monkeypatch):
    """The single guard point: the registry calls every Python backend, and the CUDA C++ ops behind the `cuda`
    backends, inside the guard (the C++ ops also set their own CUDAGuard)."""
    seen = []
    monkeypatch.setitem(_registry._impls[op], name, lambda *args: seen.append(_triton.guarded_device()))
    _registry._implementation(op, name)(*detached(SAMPLES[op]()[op]))
    assert seen == [torch.device("cpu")]


def test_guard_is_the_first_tensor_in_nested_arguments():
    x = torch.zeros(1)
    with _triton.device_guard((3, [x], torch.zeros(1, device="meta"))):
        assert _triton.guarded_device() == torch.device("cpu")
        with _triton.device_guard((2.0,)):
            assert _triton.guarded_device() is None
        assert _triton.guarded_device() == torch.device("cpu")
    assert _triton.guarded_device() is None


@pytest.mark.gpu
def test_guard_sets_the_current_cuda_device():
    last = torch.device("cuda", torch.cuda.device_count() - 1)
    with torch.cuda.device(0), _triton.device_guard(([torch.zeros(1, device=last)],)):
        assert torch.cuda.current_device() == last.index
    assert torch.cuda.current_device() == 0
