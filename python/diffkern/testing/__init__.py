"""Shared test helpers: tolerances, backend switches, the Triton interpreter monitor, torch.compile against eager
and ahead-of-time GPU compiles."""
