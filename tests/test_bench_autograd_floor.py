"""diffkern.bench.autograd_floor: the empty autograd step a training step's yardstick runs its sweeps in
(diffkern.bench.cpu_gap), checked for doing the engine's work and nothing else: a graph recorded, the given work run
in the forward and in the backward, every differentiated input handed the incoming gradient, no data touched."""
import pytest
import torch

from diffkern.bench.autograd_floor import GRAD, NONE, PER_SAMPLE, _Empty, floor_call


def test_the_floor_differentiates_its_grad_inputs_with_the_incoming_gradient():
    kinds = (GRAD, PER_SAMPLE, GRAD, PER_SAMPLE, GRAD, NONE)
    grads = floor_call((2, 5), kinds)()
    assert len(grads) == 3 and all(g.shape == (2, 5) for g in grads)
    # the incoming gradient passed through: no new tensor, no copy
    assert grads[0] is grads[1] is grads[2]


def test_the_work_runs_in_the_forward_then_in_the_backward_once_per_call():
    log = []
    call = floor_call((2, 5), (GRAD, PER_SAMPLE), lambda: log.append(("fwd", torch.is_grad_enabled())),
                      lambda: log.append(("bwd", torch.is_grad_enabled())))
    call()
    call()
    # the forward's work below autograd (as an op's kernel), the backward's under the engine without grad mode
    assert log == [("fwd", False), ("bwd", False)] * 2


def test_the_empty_function_records_a_node_and_returns_none_for_the_other_inputs():
    out, dout = torch.zeros(2, 3), torch.full((2, 3), 2.0)
    mu, sigma = torch.ones(2, 3, requires_grad=True), torch.ones(2)
    y = _Empty.apply(out, (True, False, False), (lambda: None, lambda: None), mu, sigma, None)
    assert y.requires_grad and y.grad_fn is not None and y.data_ptr() == out.data_ptr()
    (g,) = torch.autograd.grad(y, (mu,), dout)
    assert g is dout


@pytest.mark.parametrize("shape, kinds, match", [
    ((), (GRAD,), "shape"),
    ((2, 0), (GRAD,), "shape"),
    ((2, 3), (PER_SAMPLE, NONE), "kinds"),
    ((2, 3), (GRAD, "latent"), "kinds"),
])
def test_bad_arguments_are_refused_naming_them(shape, kinds, match):
    with pytest.raises(ValueError, match=match):
        floor_call(shape, kinds)
