"""Reward-guided sampling for flow-matching models: NTRK (specs/ntrk.md) and the baselines, one API."""
from .ntrk.models import FlowModel
from .ntrk.sampling import BaseSampler, DPSSampler, NTRKSampler, SVDDSampler, Trace, best_of_n

__all__ = ["BaseSampler", "DPSSampler", "FlowModel", "NTRKSampler", "SVDDSampler", "Trace", "best_of_n"]
