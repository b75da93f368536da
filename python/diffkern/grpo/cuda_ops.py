"""Fake (meta) implementations of the GRPO cuda backend's internal ops (csrc/cuda/grpo_api.cpp).

diffkern::flow_sde_step_cuda, grpo_log_prob_cuda and grpo_log_prob_bwd_cuda have the public ops'
signatures and share their fakes, so torch.library.opcheck and tracing see the same shapes.
"""
from __future__ import annotations

from .. import _registry


@_registry.register_fake("diffkern::flow_sde_step_cuda")
def _sde_step_fake(*args):
    from . import op
    return op._sde_step_fake(*args)


@_registry.register_fake("diffkern::grpo_log_prob_cuda")
def _log_prob_fake(*args):
    from . import op
    return op._log_prob_fake(*args)


@_registry.register_fake("diffkern::grpo_log_prob_bwd_cuda")
def _log_prob_bwd_fake(*args):
    from . import op
    return op._log_prob_bwd_fake(*args)
