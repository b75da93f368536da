"""Flow-GRPO: one-step policy optimisation for flow video models (specs/grpo.md)."""
from .distributed import IsoTimestepSampler, advantages
from .op import flow_sde_step, grpo_iso_loss
from .reference import flow_sigmas, grpo_iso_loss_reference
from .rollout import RolloutResult, rollout
from .train import GRPOStep, VelocityModule, grpo_train_step

__all__ = ["GRPOStep", "IsoTimestepSampler", "RolloutResult", "VelocityModule", "advantages", "flow_sde_step",
           "flow_sigmas", "grpo_iso_loss", "grpo_iso_loss_reference", "grpo_train_step", "rollout"]
