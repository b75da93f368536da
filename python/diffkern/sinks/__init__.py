"""Attention sinks: find the keys that receive the most attention mass and suppress them (specs/sinks.md)."""
from .op import sink_attention, sink_attention_given, sink_mass

__all__ = ["sink_attention", "sink_attention_given", "sink_mass"]
